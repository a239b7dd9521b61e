// Whole-tensor reductions: sum of squares (gradient norms) and dot products (Backend.sumOfSquares,
// Backend.dotAccumulate), in double like the CPU reference.
//
// Deterministic two-pass scheme, no atomics: pass 1 runs G blocks, G a function of the count only
// (never of the device), each summing a fixed grid-stride subset per thread and reducing the block
// with warp shuffles and shared memory (block_sum) into workspace[block]; pass 2 is one block that
// sums the G partials in a fixed tree. Same count, same bits, on any GPU and in the emulation.
#include "relora_cuda.cuh"

namespace relora {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = RELORA_REDUCE_WORKSPACE_BYTES / (int64_t)sizeof(double);  // 1024
constexpr int64_t kPerBlock = kThreads * 16;  // elements per block before the grid is capped

static_assert(kMaxBlocks == 1024, "the workspace holds one double per block of pass 1");

inline unsigned int reduce_blocks(int64_t count) { return grid_for(count, kPerBlock, kMaxBlocks); }

// Products are exact in double (24-bit significands), so the only rounding is the summation's.
template <typename T, bool kDot>
__global__ void __launch_bounds__(kThreads) reduce_partial_kernel(const T *a, const T *b, int64_t count, double *partial) {
    double acc = 0.0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
        const double x = (double)to_float(a[i]);
        acc += kDot ? x * (double)to_float(b[i]) : x * x;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = (float)total, or out[0] += (float)total (the CPU's `out += Float(acc)`).
template <bool kAccumulate>
__global__ void __launch_bounds__(kThreads) reduce_final_kernel(const double *partial, int64_t blocks, float *out) {
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < blocks; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[0] = kAccumulate ? out[0] + (float)acc : (float)acc;
}

template <typename T, bool kDot>
relora_status reduce(const void *a, const void *b, int64_t count, float *out, void *workspace, cudaStream_t stream) {
    const unsigned int blocks = reduce_blocks(count);
    double *partial = static_cast<double *>(workspace);
    RELORA_LAUNCH((reduce_partial_kernel<T, kDot>), dim3(blocks), dim3(kThreads), 0, stream)
    (static_cast<const T *>(a), static_cast<const T *>(b), count, partial);
    RELORA_CHECK(check_launch("reduce_partial_kernel"));
    RELORA_LAUNCH(reduce_final_kernel<kDot>, dim3(1), dim3(kThreads), 0, stream)(partial, (int64_t)blocks, out);
    return check_launch("reduce_final_kernel");
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_sum_of_squares(const void *x, int64_t count, int32_t dtype, float *out, int64_t index,
                                         void *workspace, void *stream) {
    RELORA_REQUIRE(count >= 0 && index >= 0, "sum_of_squares", "negative count or index");
    RELORA_REQUIRE(out && workspace && (x || count == 0), "sum_of_squares", "null pointer");
    switch (dtype) {
    case RELORA_DTYPE_F32: return reduce<float, false>(x, nullptr, count, out + index, workspace, as_stream(stream));
    case RELORA_DTYPE_BF16: return reduce<__nv_bfloat16, false>(x, nullptr, count, out + index, workspace, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "sum_of_squares: unknown dtype %d", (int)dtype);
    }
}

relora_status relora_cuda_dot_accumulate(const void *a, const void *b, int64_t count, int32_t dtype, float *out,
                                         void *workspace, void *stream) {
    RELORA_REQUIRE(count >= 0, "dot_accumulate", "negative count %lld", (long long)count);
    RELORA_REQUIRE(out && workspace && ((a && b) || count == 0), "dot_accumulate", "null pointer");
    switch (dtype) {
    case RELORA_DTYPE_F32: return reduce<float, true>(a, b, count, out, workspace, as_stream(stream));
    case RELORA_DTYPE_BF16: return reduce<__nv_bfloat16, true>(a, b, count, out, workspace, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "dot_accumulate: unknown dtype %d", (int)dtype);
    }
}
