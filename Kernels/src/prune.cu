// ReLoRA's optimizer-state reset and the merge report: prune_magnitude, prune_moments, prune_random
// (CPUBackend.prune / pruneMoments) and count_changed_codes (CPUQuantized.countChangedCodes). They run once
// per restart, not on a training step's path.
//
// Pruning by magnitude zeroes every entry whose key is <= the k-th smallest key, the key being the 31
// magnitude bits of |x| (prune_magnitude; bf16 values widened to f32 bits) or of the score
// |m| / (sqrt(v) + eps) (prune_moments, IEEE f32 operations as the CPU computes it). For non-negative
// floats the bit pattern orders like the value (NaN above everything), so the k-th smallest key is found
// exactly by a radix select on the bit patterns, as the CPU does: a 65,536-bin histogram of the high 16
// bits, a scan to the bin holding the k-th key, then a histogram of the low 16 bits inside that bin and a
// second scan. The scores are recomputed in every pass instead of stored (the same IEEE operations give
// the same bits), so the device needs no n-float buffer: the workspace holds one histogram and a few
// control words. Histograms use integer atomics (deterministic: integer addition is associative).
#include "relora_cuda.cuh"

namespace relora {
namespace {

constexpr int kThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kBins = 65536;
constexpr int kBinsPerThread = kBins / kScanThreads;  // 64

// Workspace layout (RELORA_SELECT_WORKSPACE_BYTES = 1 MiB): the histogram, then the control words.
struct Control {
    unsigned long long high;       // high 16 bits of the threshold (after the first scan)
    unsigned long long remaining;  // rank of the k-th key inside the chosen bin (1-based)
    unsigned long long threshold;  // the k-th smallest key (after the second scan)
    unsigned long long zeroed;     // entries zeroed
};
constexpr size_t kHistBytes = kBins * sizeof(unsigned long long);  // 512 KiB
static_assert(kHistBytes + sizeof(Control) <= RELORA_SELECT_WORKSPACE_BYTES, "histogram and control fit");
// count_changed_codes: one partial count per block of its first pass.
constexpr int64_t kMaxCountBlocks = 1024;
static_assert(kMaxCountBlocks * 8 <= RELORA_SELECT_WORKSPACE_BYTES, "partial counts fit");

#define RELORA_GRID_STRIDE(i, count) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (count); i += (int64_t)gridDim.x * blockDim.x)

// ---- Keys -------------------------------------------------------------------------------------------------
template <typename T>
struct MagnitudeKey {
    T *x;
    __device__ __forceinline__ uint32_t key(int64_t i) const { return __float_as_uint(to_float(x[i])) & 0x7FFFFFFFu; }
    __device__ __forceinline__ void zero(int64_t i) const { x[i] = from_float<T>(0.0f); }
};

// CPUBackend.pruneMoments: |m| / (m.squareRoot() + eps) with IEEE f32 operations.
struct MomentKey {
    float *m, *v;
    float eps;
    __device__ __forceinline__ uint32_t key(int64_t i) const {
        const float score = __fdiv_rn(fabsf(m[i]), __fadd_rn(__fsqrt_rn(v[i]), eps));
        return __float_as_uint(score) & 0x7FFFFFFFu;
    }
    __device__ __forceinline__ void zero(int64_t i) const {
        m[i] = 0.0f;
        v[i] = 0.0f;
    }
};

// Pass 1 (kLow = false): hist[key >> 16] += 1 for every key. Pass 2 (kLow = true): hist[key & 0xFFFF] += 1
// for the keys whose high 16 bits are control->high.
template <typename K, bool kLow>
__global__ void __launch_bounds__(kThreads)
    select_histogram_kernel(K k, int64_t count, unsigned long long *hist, const Control *control) {
    const uint32_t high = kLow ? (uint32_t)control->high : 0u;
    RELORA_GRID_STRIDE(i, count) {
        const uint32_t key = k.key(i);
        if (!kLow) {
            atomicAdd(&hist[key >> 16], 1ull);
        } else if ((key >> 16) == high) {
            atomicAdd(&hist[key & 0xFFFFu], 1ull);
        }
    }
}

// One block: the bin in which the running count of hist reaches `rank` (pass 1: rank = k; pass 2:
// control->remaining). Each thread sums 64 consecutive bins, thread 0 scans the 1024 sums, and the thread
// whose range holds the rank walks its bins. Pass 1 writes control->high and ->remaining, pass 2
// control->threshold = high << 16 | low.
template <bool kLow>
__global__ void __launch_bounds__(kScanThreads)
    select_scan_kernel(const unsigned long long *hist, unsigned long long k, Control *control) {
    __shared__ unsigned long long sums[kScanThreads];
    const int t = (int)threadIdx.x;
    const unsigned long long *mine = hist + (int64_t)t * kBinsPerThread;
    unsigned long long own = 0;
    for (int b = 0; b < kBinsPerThread; ++b) own += mine[b];
    sums[t] = own;
    __syncthreads();
    if (t == 0) {
        unsigned long long run = 0;  // exclusive prefix sums
        for (int i = 0; i < kScanThreads; ++i) {
            const unsigned long long s = sums[i];
            sums[i] = run;
            run += s;
        }
    }
    __syncthreads();
    unsigned long long remaining = kLow ? control->remaining : k;
    const unsigned long long before = sums[t];
    if (remaining > before && remaining <= before + own) {
        remaining -= before;
        int b = 0;
        while (remaining > mine[b]) remaining -= mine[b++];
        const unsigned long long bin = (unsigned long long)(t * kBinsPerThread + b);
        if (kLow) {
            control->threshold = (control->high << 16) | bin;
        } else {
            control->high = bin;
            control->remaining = remaining;
        }
    }
}

// Zeroes every entry whose key is <= control->threshold and adds the number zeroed to control->zeroed.
template <typename K>
__global__ void __launch_bounds__(kThreads) select_zero_kernel(K k, int64_t count, Control *control) {
    const uint32_t threshold = (uint32_t)control->threshold;
    unsigned long long zeroed = 0;
    RELORA_GRID_STRIDE(i, count) {
        if (k.key(i) <= threshold) {
            k.zero(i);
            ++zeroed;
        }
    }
    zeroed = block_sum(zeroed);
    if (threadIdx.x == 0 && zeroed != 0) atomicAdd(&control->zeroed, zeroed);
}

// prune_random: zero where (double)u < probability, u = relora_rng_uniform(seed, stream_id, i).
template <typename T>
__global__ void __launch_bounds__(kThreads) prune_random_kernel(T *x, int64_t count, double probability, uint64_t seed,
                                                                uint64_t stream_id, unsigned long long *zeroed_out) {
    unsigned long long zeroed = 0;
    RELORA_GRID_STRIDE(i, count) {
        if ((double)relora_rng_uniform(seed, stream_id, (uint64_t)i) < probability) {
            x[i] = from_float<T>(0.0f);
            ++zeroed;
        }
    }
    zeroed = block_sum(zeroed);
    if (threadIdx.x == 0 && zeroed != 0) atomicAdd(zeroed_out, zeroed);
}

// ---- Changed codes ----------------------------------------------------------------------------------------
struct Q8Codes {
    using Block = block_q8_0;
    static constexpr int64_t kSize = RELORA_QK8_0;
    static __device__ __forceinline__ int64_t changed(const Block *a, const Block *b) {
        return relora_changed_codes_q8_0(a, b, 1);
    }
};
struct Q4Codes {
    using Block = block_q4_0;
    static constexpr int64_t kSize = RELORA_QK4_0;
    static __device__ __forceinline__ int64_t changed(const Block *a, const Block *b) {
        return relora_changed_codes_q4_0(a, b, 1);
    }
};
struct NF4Codes {
    using Block = block_nf4;
    static constexpr int64_t kSize = RELORA_QKNF4;
    static __device__ __forceinline__ int64_t changed(const Block *a, const Block *b) {
        return relora_changed_codes_nf4(a, b, 1);
    }
};

// Pass 1: one thread per block of the format (rows of whole blocks are contiguous, so the matrix is one
// array of `blocks` blocks); partial[blockIdx.x] = the CUDA block's count. Pass 2 sums the partials.
template <typename F>
__global__ void __launch_bounds__(kThreads)
    changed_codes_kernel(const unsigned char *old_blocks, const unsigned char *new_blocks, int64_t blocks,
                         unsigned long long *partial) {
    const typename F::Block *a = reinterpret_cast<const typename F::Block *>(old_blocks);
    const typename F::Block *b = reinterpret_cast<const typename F::Block *>(new_blocks);
    unsigned long long changed = 0;
    RELORA_GRID_STRIDE(i, blocks) { changed += (unsigned long long)F::changed(a + i, b + i); }
    changed = block_sum(changed);
    if (threadIdx.x == 0) partial[blockIdx.x] = changed;
}

// out[0] = Float(total), rounded to nearest even as Swift's Float(Int) does.
__global__ void __launch_bounds__(kThreads)
    changed_codes_final_kernel(const unsigned long long *partial, int64_t parts, float *out) {
    unsigned long long total = 0;
    for (int64_t i = threadIdx.x; i < parts; i += blockDim.x) total += partial[i];
    total = block_sum(total);
    if (threadIdx.x == 0) out[0] = __ull2float_rn(total);
}

template <typename K>
relora_status prune_by_key(const char *op, K key, int64_t count, int64_t k, void *workspace, int64_t *zeroed,
                           cudaStream_t stream) {
    unsigned long long *hist = static_cast<unsigned long long *>(workspace);
    Control *control = reinterpret_cast<Control *>(static_cast<unsigned char *>(workspace) + kHistBytes);
    const dim3 grid(grid_for(count, kThreads));
    RELORA_CHECK(check(cudaMemsetAsync(workspace, 0, kHistBytes + sizeof(Control), stream), op));
    RELORA_LAUNCH((select_histogram_kernel<K, false>), grid, dim3(kThreads), 0, stream)(key, count, hist, control);
    RELORA_CHECK(check_launch("select_histogram_kernel"));
    RELORA_LAUNCH(select_scan_kernel<false>, dim3(1), dim3(kScanThreads), 0, stream)(hist, (unsigned long long)k, control);
    RELORA_CHECK(check_launch("select_scan_kernel"));
    RELORA_CHECK(check(cudaMemsetAsync(workspace, 0, kHistBytes, stream), op));
    RELORA_LAUNCH((select_histogram_kernel<K, true>), grid, dim3(kThreads), 0, stream)(key, count, hist, control);
    RELORA_CHECK(check_launch("select_histogram_kernel"));
    RELORA_LAUNCH(select_scan_kernel<true>, dim3(1), dim3(kScanThreads), 0, stream)(hist, 0ull, control);
    RELORA_CHECK(check_launch("select_scan_kernel"));
    RELORA_LAUNCH(select_zero_kernel<K>, grid, dim3(kThreads), 0, stream)(key, count, control);
    RELORA_CHECK(check_launch("select_zero_kernel"));
    unsigned long long result = 0;
    RELORA_CHECK(check(cudaMemcpyAsync(&result, &control->zeroed, sizeof result, cudaMemcpyDeviceToHost, stream), op));
    RELORA_CHECK(check(cudaStreamSynchronize(stream), op));
    *zeroed = (int64_t)result;
    return RELORA_OK;
}

// k <= 0: nothing; k >= count: everything (the CPU's zero(tensor): every byte 0).
relora_status prune_trivial(const char *op, void *x, void *y, int64_t count, int64_t bytes_per, int64_t k,
                            int64_t *zeroed, cudaStream_t stream, bool *done) {
    *done = true;
    if (count == 0 || k <= 0) {
        *zeroed = 0;
        return check(cudaStreamSynchronize(stream), op);
    }
    if (k >= count) {
        RELORA_CHECK(check(cudaMemsetAsync(x, 0, (size_t)(count * bytes_per), stream), op));
        if (y) RELORA_CHECK(check(cudaMemsetAsync(y, 0, (size_t)(count * bytes_per), stream), op));
        RELORA_CHECK(check(cudaStreamSynchronize(stream), op));
        *zeroed = count;
        return RELORA_OK;
    }
    *done = false;
    return RELORA_OK;
}

template <typename F>
relora_status count_changed(const void *old_blocks, const void *new_blocks, int64_t rows, int64_t cols, float *out,
                            void *workspace, cudaStream_t stream) {
    const int64_t blocks = rows * ((cols + F::kSize - 1) / F::kSize);
    const unsigned int grid = grid_for(blocks, kThreads, kMaxCountBlocks);
    unsigned long long *partial = static_cast<unsigned long long *>(workspace);
    RELORA_LAUNCH(changed_codes_kernel<F>, dim3(grid), dim3(kThreads), 0, stream)
    (static_cast<const unsigned char *>(old_blocks), static_cast<const unsigned char *>(new_blocks), blocks, partial);
    RELORA_CHECK(check_launch("changed_codes_kernel"));
    RELORA_LAUNCH(changed_codes_final_kernel, dim3(1), dim3(kThreads), 0, stream)(partial, (int64_t)grid, out);
    return check_launch("changed_codes_final_kernel");
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_prune_magnitude(void *x, int64_t count, int32_t dtype, int64_t k, void *workspace,
                                          int64_t *zeroed, void *stream) {
    RELORA_REQUIRE(count >= 0, "prune_magnitude", "negative count %lld", (long long)count);
    RELORA_REQUIRE(zeroed, "prune_magnitude", "null result pointer");
    RELORA_REQUIRE(dtype == RELORA_DTYPE_F32 || dtype == RELORA_DTYPE_BF16, "prune_magnitude", "unknown dtype %d", (int)dtype);
    RELORA_REQUIRE(x || count == 0, "prune_magnitude", "null pointer");
    const cudaStream_t s = as_stream(stream);
    bool done = false;
    RELORA_CHECK(prune_trivial("prune_magnitude", x, nullptr, count, dtype == RELORA_DTYPE_F32 ? 4 : 2, k, zeroed, s, &done));
    if (done) return RELORA_OK;
    RELORA_REQUIRE(workspace, "prune_magnitude", "null workspace");
    if (dtype == RELORA_DTYPE_F32) {
        return prune_by_key("prune_magnitude", MagnitudeKey<float>{static_cast<float *>(x)}, count, k, workspace, zeroed, s);
    }
    return prune_by_key("prune_magnitude", MagnitudeKey<__nv_bfloat16>{static_cast<__nv_bfloat16 *>(x)}, count, k,
                        workspace, zeroed, s);
}

relora_status relora_cuda_prune_moments(float *m, float *v, int64_t count, int64_t k, float eps, void *workspace,
                                        int64_t *zeroed, void *stream) {
    RELORA_REQUIRE(count >= 0, "prune_moments", "negative count %lld", (long long)count);
    RELORA_REQUIRE(zeroed, "prune_moments", "null result pointer");
    RELORA_REQUIRE((m && v) || count == 0, "prune_moments", "null pointer");
    const cudaStream_t s = as_stream(stream);
    bool done = false;
    RELORA_CHECK(prune_trivial("prune_moments", m, v, count, 4, k, zeroed, s, &done));
    if (done) return RELORA_OK;
    RELORA_REQUIRE(workspace, "prune_moments", "null workspace");
    return prune_by_key("prune_moments", MomentKey{m, v, eps}, count, k, workspace, zeroed, s);
}

relora_status relora_cuda_prune_random(void *x, int64_t count, int32_t dtype, double probability, uint64_t seed,
                                       uint64_t stream_id, int64_t *zeroed, void *stream) {
    RELORA_REQUIRE(count >= 0, "prune_random", "negative count %lld", (long long)count);
    RELORA_REQUIRE(zeroed, "prune_random", "null result pointer");
    RELORA_REQUIRE(dtype == RELORA_DTYPE_F32 || dtype == RELORA_DTYPE_BF16, "prune_random", "unknown dtype %d", (int)dtype);
    RELORA_REQUIRE(x || count == 0, "prune_random", "null pointer");
    const cudaStream_t s = as_stream(stream);
    if (count == 0) {
        *zeroed = 0;
        return check(cudaStreamSynchronize(s), "prune_random");
    }
    // The call has no workspace argument: a temporary device counter (the call synchronizes anyway).
    unsigned long long *counter = nullptr;
    RELORA_CHECK(check(cudaMalloc((void **)&counter, sizeof *counter), "prune_random: counter"));
    relora_status status = check(cudaMemsetAsync(counter, 0, sizeof *counter, s), "prune_random");
    if (status == RELORA_OK) {
        const dim3 grid(grid_for(count, kThreads));
        if (dtype == RELORA_DTYPE_F32) {
            RELORA_LAUNCH(prune_random_kernel<float>, grid, dim3(kThreads), 0, s)
            (static_cast<float *>(x), count, probability, seed, stream_id, counter);
        } else {
            RELORA_LAUNCH(prune_random_kernel<__nv_bfloat16>, grid, dim3(kThreads), 0, s)
            (static_cast<__nv_bfloat16 *>(x), count, probability, seed, stream_id, counter);
        }
        status = check_launch("prune_random_kernel");
    }
    unsigned long long result = 0;
    if (status == RELORA_OK) {
        status = check(cudaMemcpyAsync(&result, counter, sizeof result, cudaMemcpyDeviceToHost, s), "prune_random");
    }
    if (status == RELORA_OK) status = check(cudaStreamSynchronize(s), "prune_random");
    const relora_status freed = check(cudaFree(counter), "prune_random: counter");
    if (status != RELORA_OK) return status;
    RELORA_CHECK(freed);
    *zeroed = (int64_t)result;
    return RELORA_OK;
}

relora_status relora_cuda_count_changed_codes(int32_t format, const void *old_blocks, const void *new_blocks,
                                              int64_t rows, int64_t cols, float *out, int64_t index, void *workspace,
                                              void *stream) {
    RELORA_REQUIRE(rows >= 0 && cols >= 0 && index >= 0, "count_changed_codes", "negative shape or index");
    RELORA_REQUIRE(out && workspace, "count_changed_codes", "null pointer");
    RELORA_REQUIRE((old_blocks && new_blocks) || rows == 0 || cols == 0, "count_changed_codes", "null pointer");
    const cudaStream_t s = as_stream(stream);
    switch (format) {
    case RELORA_FORMAT_Q8_0: return count_changed<Q8Codes>(old_blocks, new_blocks, rows, cols, out + index, workspace, s);
    case RELORA_FORMAT_Q4_0: return count_changed<Q4Codes>(old_blocks, new_blocks, rows, cols, out + index, workspace, s);
    case RELORA_FORMAT_NF4: return count_changed<NF4Codes>(old_blocks, new_blocks, rows, cols, out + index, workspace, s);
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "count_changed_codes: unknown format %d", (int)format);
    }
}
