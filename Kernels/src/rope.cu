// Rotary position embedding in place (Backend.rope), Hugging Face's rotate-half convention:
// for each head, pairs (i, i + half) with half = head_dim / 2 rotate by angle pos * invFreq_i.
//
// Angles exactly as CPUBackend.ropeTables: invFreq = 1 / pow(double(theta), double(2i) / double(head_dim)),
// angle = double(pos) * invFreq, cos and sin in double, rounded to f32 once. One block per token row
// (grid-stride): its threads compute the row's half cos/sin pairs into shared memory (double math once
// per row and pair, shared by every head), then rotate heads * half pairs. The rotation is the CPU's
// f32 expression a*c - b*s, b*c + a*s (s negated for the inverse) with _rn intrinsics, so nvcc cannot
// contract it into FMAs: f32 results are bit-identical to the CPU's whenever the device's double
// pow/cos/sin round to the same f32 as the host's libm (CUDA's are within 2 ulp of double, so a
// different f32 needs the exact value within ~2^-52 relative of an f32 rounding boundary). bf16: loaded
// to f32, the same expression, one rounding on store.
#include "relora_cuda.cuh"

namespace relora {
namespace {

constexpr int kRopeThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kRopeThreads)
    rope_kernel(T *x, int64_t rows, int64_t seq_len, int64_t heads, int64_t head_dim, double theta, float sign) {
    RELORA_DYNAMIC_SHARED(float, table);  // [0, half): cos, [half, 2 half): sin (already signed)
    const int64_t half = head_dim / 2, width = heads * head_dim;
    for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
        const int64_t pos = n % seq_len;
        __syncthreads();  // the previous row's readers are done with the table
        for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
            const double inv_freq = 1.0 / pow(theta, (double)(2 * i) / (double)head_dim);
            const double angle = (double)pos * inv_freq;
            table[i] = (float)cos(angle);
            table[half + i] = sign * (float)sin(angle);  // negation is exact
        }
        __syncthreads();
        T *row = x + n * width;
        for (int64_t k = threadIdx.x; k < heads * half; k += blockDim.x) {
            const int64_t h = k / half, i = k - h * half;
            T *v = row + h * head_dim;
            const float a = to_float(v[i]), b = to_float(v[i + half]);
            const float c = table[i], s = table[half + i];
            v[i] = from_float<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
            v[i + half] = from_float<T>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
        }
    }
}

template <typename T>
relora_status launch(void *x, int64_t rows, int64_t seq_len, int64_t heads, int64_t head_dim, float theta, float sign,
                     cudaStream_t stream) {
    const size_t shmem = (size_t)head_dim * sizeof(float);  // 2 * half floats
    RELORA_LAUNCH(rope_kernel<T>, dim3(grid_for(rows, 1)), dim3(kRopeThreads), shmem, stream)
    (static_cast<T *>(x), rows, seq_len, heads, head_dim, (double)theta, sign);
    return check_launch("rope_kernel");
}

}  // namespace
}  // namespace relora

using namespace relora;

// head_dim must be even and at most 8192 (its cos/sin table lives in 32 KiB of shared memory).
relora_status relora_cuda_rope(void *x, int64_t batch, int64_t seq_len, int64_t heads, int64_t head_dim, float theta,
                               int32_t inverse, int32_t dtype, void *stream) {
    RELORA_REQUIRE(batch >= 0 && seq_len >= 0 && heads >= 0 && head_dim >= 0, "rope", "negative shape");
    RELORA_REQUIRE(head_dim % 2 == 0 && head_dim <= 8192, "rope", "head_dim %lld must be even and <= 8192",
                   (long long)head_dim);
    if (batch == 0 || seq_len == 0 || heads == 0 || head_dim == 0) return RELORA_OK;
    RELORA_REQUIRE(x, "rope", "null pointer");
    RELORA_REQUIRE(theta > 0.0f, "rope", "theta %g must be positive", (double)theta);
    const float sign = inverse ? -1.0f : 1.0f;
    switch (dtype) {
    case RELORA_DTYPE_F32: return launch<float>(x, batch * seq_len, seq_len, heads, head_dim, theta, sign, as_stream(stream));
    case RELORA_DTYPE_BF16:
        return launch<__nv_bfloat16>(x, batch * seq_len, seq_len, heads, head_dim, theta, sign, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "rope: unknown dtype %d", (int)dtype);
    }
}
