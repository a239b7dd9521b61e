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
constexpr int64_t kMaxBlocks = RELORA_REDUCE_MAX_BLOCKS;  // 1024
constexpr int64_t kPerBlock = RELORA_REDUCE_BLOCK_ELEMENTS;  // kThreads * 16 elements per block before the cap

static_assert(kMaxBlocks == 1024 && kPerBlock == kThreads * 16, "the workspace holds one double per block of pass 1");

inline unsigned int reduce_blocks(int64_t count) { return (unsigned int)relora_reduce_blocks(count); }

// One thread's terms of pass 1: elements start, start + stride, ... of a (times b, or squared), in double.
// Products are exact in double (24-bit significands), so the only rounding is the summation's.
template <typename T, bool kDot>
__device__ __forceinline__ double strided_terms(const T *a, const T *b, int64_t count, int64_t start, int64_t stride) {
    double acc = 0.0;
    for (int64_t i = start; i < count; i += stride) {
        const double x = (double)to_float(a[i]);
        acc += kDot ? x * (double)to_float(b[i]) : x * x;
    }
    return acc;
}

// Pass 2's sum of `blocks` partials: thread t takes partial t, t + kThreads, ..., then the block's tree.
__device__ __forceinline__ double sum_partials(const double *partial, int64_t blocks) {
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < blocks; i += blockDim.x) acc += partial[i];
    return block_sum(acc);
}

template <typename T, bool kDot>
__global__ void __launch_bounds__(kThreads) reduce_partial_kernel(const T *a, const T *b, int64_t count, double *partial) {
    double acc = strided_terms<T, kDot>(a, b, count, (int64_t)blockIdx.x * blockDim.x + threadIdx.x,
                                        (int64_t)gridDim.x * blockDim.x);
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = (float)total, or out[0] += (float)total (the CPU's `out += Float(acc)`).
template <bool kAccumulate>
__global__ void __launch_bounds__(kThreads) reduce_final_kernel(const double *partial, int64_t blocks, float *out) {
    const double acc = sum_partials(partial, blocks);
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

// ---- gradient_norm: sum_of_squares over many tensors in three launches ----------------------------------------
// Pass 1 runs every (tensor, block) unit of the table: unit u of entry e is block u - e.first_unit of
// e.blocks, summing the very elements reduce_partial_kernel's block of that index sums, in the same order
// (grid-stride over the units: the grid no longer has to be the blocks). Pass 2: one unit per tensor,
// reduce_final_kernel's sum of its partials, rounded to f32 (sum_of_squares' value). Pass 3: one thread adds the
// f32 squares in entry order in double (the host's sum over downloaded squares), takes the square root and the
// clip factor, all correctly rounded double operations: the same bits as the per-tensor path read back.
__global__ void __launch_bounds__(kThreads)
    norm_partial_kernel(const relora_norm_entry *entries, int64_t tensors, int64_t units, double *partials) {
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
        const relora_norm_entry e = entries[find_entry(entries, tensors, u)];
        const int64_t start = (u - e.first_unit) * blockDim.x + threadIdx.x, stride = (int64_t)e.blocks * blockDim.x;
        double acc = e.dtype == RELORA_DTYPE_BF16
                         ? strided_terms<__nv_bfloat16, false>(static_cast<const __nv_bfloat16 *>(e.x), nullptr, e.count, start, stride)
                         : strided_terms<float, false>(static_cast<const float *>(e.x), nullptr, e.count, start, stride);
        acc = block_sum(acc);
        if (threadIdx.x == 0) partials[u] = acc;
    }
}

__global__ void __launch_bounds__(kThreads)
    norm_final_kernel(const relora_norm_entry *entries, int64_t tensors, const double *partials, float *squares) {
    for (int64_t t = blockIdx.x; t < tensors; t += gridDim.x) {
        const relora_norm_entry e = entries[t];
        const double acc = sum_partials(partials + e.first_unit, e.blocks);
        if (threadIdx.x == 0) squares[t] = (float)acc;
    }
}

__global__ void __launch_bounds__(32)
    norm_total_kernel(const float *squares, int64_t tensors, double clip, double *norm, float *clip_factor) {
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (int64_t t = 0; t < tensors; ++t) total = __dadd_rn(total, (double)squares[t]);
    const double root = __dsqrt_rn(total);
    *norm = root;
    *clip_factor = clip > 0.0 && root > clip ? __double2float_rn(__ddiv_rn(clip, root)) : 1.0f;
}

// ---- zero_multi: every gradient of a group zeroed in one launch ------------------------------------------------
// The norm table's units again: unit u of entry e zeroes the grid-stride elements norm_partial_kernel's unit u
// reads (coalesced: consecutive threads, consecutive elements), so the table and its prefix sums serve both
// (the entry's `x` is const for the norm; the gradients it points at are the caller's to write).
template <typename T>
__device__ __forceinline__ void zero_strided(void *x, int64_t count, int64_t start, int64_t stride) {
    T *p = static_cast<T *>(x);
    const T zero = from_float<T>(0.0f);
    for (int64_t i = start; i < count; i += stride) p[i] = zero;
}

__global__ void __launch_bounds__(kThreads) zero_multi_kernel(const relora_norm_entry *entries, int64_t tensors, int64_t units) {
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
        const relora_norm_entry e = entries[find_entry(entries, tensors, u)];
        const int64_t start = (u - e.first_unit) * blockDim.x + threadIdx.x, stride = (int64_t)e.blocks * blockDim.x;
        void *x = const_cast<void *>(e.x);
        if (e.dtype == RELORA_DTYPE_BF16) {
            zero_strided<__nv_bfloat16>(x, e.count, start, stride);
        } else {
            zero_strided<float>(x, e.count, start, stride);
        }
    }
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_zero_multi(const relora_norm_entry *entries, int64_t tensors, int64_t total_units, void *stream) {
    RELORA_REQUIRE(tensors >= 0 && total_units >= tensors, "zero_multi", "%lld tensors in %lld units", (long long)tensors,
                   (long long)total_units);
    if (tensors == 0) return RELORA_OK;
    RELORA_REQUIRE(entries, "zero_multi", "null table");
    RELORA_LAUNCH(zero_multi_kernel, dim3(grid_for(total_units, 1)), dim3(kThreads), 0, as_stream(stream))(entries, tensors, total_units);
    return check_launch("zero_multi_kernel");
}

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

relora_status relora_cuda_gradient_norm(const relora_norm_entry *entries, int64_t tensors, int64_t total_units,
                                        double *partials, float *squares, double clip, double *norm, float *clip_factor,
                                        void *stream) {
    RELORA_REQUIRE(tensors >= 0 && total_units >= tensors, "gradient_norm", "%lld tensors in %lld units", (long long)tensors,
                   (long long)total_units);
    RELORA_REQUIRE(norm && clip_factor && ((entries && partials && squares) || tensors == 0), "gradient_norm", "null pointer");
    const cudaStream_t s = as_stream(stream);
    if (tensors > 0) {
        RELORA_LAUNCH(norm_partial_kernel, dim3(grid_for(total_units, 1)), dim3(kThreads), 0, s)(entries, tensors, total_units, partials);
        RELORA_CHECK(check_launch("norm_partial_kernel"));
        RELORA_LAUNCH(norm_final_kernel, dim3(grid_for(tensors, 1)), dim3(kThreads), 0, s)(entries, tensors, partials, squares);
        RELORA_CHECK(check_launch("norm_final_kernel"));
    }
    RELORA_LAUNCH(norm_total_kernel, dim3(1), dim3(32), 0, s)(squares, tensors, clip, norm, clip_factor);
    return check_launch("norm_total_kernel");
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
