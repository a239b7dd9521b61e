// Rotary position embedding in place (Backend.rope), Hugging Face's rotate-half convention:
// for each head, pairs (i, i + half) with half = head_dim / 2 rotate by angle pos * invFreq_i.
//
// The angles' cos and sin come from the caller's table, f32 [2, seq_len, half]: the values of
// CPUBackend.ropeTables (invFreq = 1 / pow(double(theta), double(2i) / double(head_dim)), angle = double(pos) *
// invFreq, cos and sin in double, rounded to f32 once), which the Swift backend computes with the CPU's own code
// (RoPETables) once per (seq_len, head_dim, theta) and keeps on the device. So no kernel evaluates pow/cos/sin,
// and the rotation's inputs are the CPU's bits on any device. One block per token row (grid-stride), its threads
// over the row's heads * half pairs; the rotation is the CPU's f32 expression a*c - b*s, b*c + a*s (s negated
// for the inverse) with _rn intrinsics, so nvcc cannot contract it into FMAs: f32 results are bit-identical to
// the CPU's. bf16: loaded to f32, the same expression, one rounding on store.
#include "relora_cuda.cuh"

namespace relora {
namespace {

constexpr int kRopeThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kRopeThreads)
    rope_kernel(T *x, const float *table, int64_t table_len, int64_t first, int64_t rows, int64_t seq_len,
                int64_t heads, int64_t head_dim, float sign) {
    const int64_t half = head_dim / 2, width = heads * head_dim;
    const float *sin_table = table + table_len * half;
    for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
        const int64_t pos = first + n % seq_len;
        const float *cos_row = table + pos * half, *sin_row = sin_table + pos * half;
        T *row = x + n * width;
        for (int64_t k = threadIdx.x; k < heads * half; k += blockDim.x) {
            const int64_t h = k / half, i = k - h * half;
            T *v = row + h * head_dim;
            const float a = to_float(v[i]), b = to_float(v[i + half]);
            const float c = cos_row[i], s = sign * sin_row[i];  // negation is exact
            v[i] = from_float<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
            v[i + half] = from_float<T>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
        }
    }
}

template <typename T>
relora_status launch(void *x, const float *table, int64_t table_len, int64_t first, int64_t rows, int64_t seq_len,
                     int64_t heads, int64_t head_dim, float sign, cudaStream_t stream) {
    RELORA_LAUNCH(rope_kernel<T>, dim3(grid_for(rows, 1)), dim3(kRopeThreads), 0, stream)
    (static_cast<T *>(x), table, table_len, first, rows, seq_len, heads, head_dim, sign);
    return check_launch("rope_kernel");
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_rope(void *x, const float *table, int64_t batch, int64_t seq_len, int64_t heads,
                               int64_t head_dim, int32_t inverse, int32_t dtype, void *stream) {
    RELORA_REQUIRE(batch >= 0 && seq_len >= 0 && heads >= 0 && head_dim >= 0, "rope", "negative shape");
    RELORA_REQUIRE(head_dim % 2 == 0, "rope", "head_dim %lld must be even", (long long)head_dim);
    if (batch == 0 || seq_len == 0 || heads == 0 || head_dim == 0) return RELORA_OK;
    RELORA_REQUIRE(x && table, "rope", "null pointer");
    const float sign = inverse ? -1.0f : 1.0f;
    switch (dtype) {
    case RELORA_DTYPE_F32:
        return launch<float>(x, table, seq_len, 0, batch * seq_len, seq_len, heads, head_dim, sign, as_stream(stream));
    case RELORA_DTYPE_BF16:
        return launch<__nv_bfloat16>(x, table, seq_len, 0, batch * seq_len, seq_len, heads, head_dim, sign,
                                     as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "rope: unknown dtype %d", (int)dtype);
    }
}

// Rows at positions position .. position + rows - 1 of a table of table_len positions: the same kernel with
// the table's sin half found by table_len and the row's position offset (one "sequence" of `rows` rows).
relora_status relora_cuda_rope_at(void *x, const float *table, int64_t table_len, int64_t position, int64_t rows,
                                  int64_t heads, int64_t head_dim, int32_t dtype, void *stream) {
    RELORA_REQUIRE(table_len >= 0 && position >= 0 && rows >= 0 && heads >= 0 && head_dim >= 0, "rope_at",
                   "negative shape");
    RELORA_REQUIRE(head_dim % 2 == 0, "rope_at", "head_dim %lld must be even", (long long)head_dim);
    RELORA_REQUIRE(position + rows <= table_len, "rope_at", "positions %lld ..< %lld past the table's %lld",
                   (long long)position, (long long)(position + rows), (long long)table_len);
    if (rows == 0 || heads == 0 || head_dim == 0) return RELORA_OK;
    RELORA_REQUIRE(x && table, "rope_at", "null pointer");
    switch (dtype) {
    case RELORA_DTYPE_F32:
        return launch<float>(x, table, table_len, position, rows, rows, heads, head_dim, 1.0f, as_stream(stream));
    case RELORA_DTYPE_BF16:
        return launch<__nv_bfloat16>(x, table, table_len, position, rows, rows, heads, head_dim, 1.0f, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "rope_at: unknown dtype %d", (int)dtype);
    }
}
