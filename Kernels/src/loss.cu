// Fused softmax cross-entropy (Backend.crossEntropy): one block per row (grid-stride over rows).
//   pass 1: the row max (block max) and x[target];
//   pass 2: sum = sum_j expf(x_j - max) (f32, block sum: a fixed tree for the block size);
//   loss = max + logf(sum) - x[target] (the CPU's expression; 0 where target < 0);
//   pass 3 (with_grad): x_j = expf(x_j - max) * (grad_scale / sum), minus grad_scale at the target (the
//   CPU's two f32 steps), written over the logits in the logits' dtype (one rounding for bf16). The
//   exponentials are recomputed rather than stored, so no buffer beyond the logits and no double rounding.
// Deterministic: every reduction is a fixed tree, each element written by one thread.
//
// A target >= vocab: the row's loss (and, with_grad, its gradient row) is NaN, and the row is recorded
// in a device word that the next relora_cuda_stream_synchronize (any stream) turns into
// RELORA_ERR_INVALID_ARGUMENT naming the row (then the word is cleared).
#include <math.h>

#include "relora_cuda.cuh"

namespace relora {

namespace {

constexpr int kThreads = 256;
constexpr unsigned long long kNoBadRow = ~0ull;

// The lowest row with an out-of-range target since the last check (kNoBadRow: none).
__device__ unsigned long long g_bad_target_row = ~0ull;
// Set on the host when a cross_entropy launch may have written the word since the last check (host
// threads may launch and synchronize concurrently: atomic builtins).
bool g_armed = false;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(T *logits, const int32_t *targets, float *losses, int64_t rows, int64_t vocab, int64_t ld,
                         int with_grad, float grad_scale) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        T *row = logits + r * ld;
        const int32_t target = targets[r];
        if (target < 0) {
            if (threadIdx.x == 0) losses[r] = 0.0f;
            if (with_grad) {
                for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = from_float<T>(0.0f);
            }
            continue;  // uniform across the block: no barrier is skipped by part of it
        }
        if ((int64_t)target >= vocab) {
            if (threadIdx.x == 0) {
                losses[r] = NAN;
                atomicMin(&g_bad_target_row, (unsigned long long)r);
            }
            if (with_grad) {
                for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = from_float<T>(NAN);
            }
            continue;
        }
        float mx = -INFINITY;
        for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, to_float(row[j]));
        const float target_logit = to_float(row[target]);  // read by every thread before any write
        mx = block_max(mx);
        float sum = 0.0f;
        for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(to_float(row[j]) - mx);
        sum = block_sum(sum);  // its barriers also order every read above before the writes below
        if (threadIdx.x == 0) losses[r] = mx + logf(sum) - target_logit;
        if (with_grad) {
            const float inv = grad_scale / sum;
            for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
                float g = expf(to_float(row[j]) - mx) * inv;
                if (j == target) g = g - grad_scale;
                row[j] = from_float<T>(g);
            }
        }
    }
}

template <typename T>
relora_status launch(void *logits, const int32_t *targets, float *losses, int64_t rows, int64_t vocab, int64_t ld,
                     int with_grad, float grad_scale, cudaStream_t stream) {
    __atomic_store_n(&g_armed, true, __ATOMIC_SEQ_CST);
    RELORA_LAUNCH(cross_entropy_kernel<T>, dim3(grid_for(rows, 1)), dim3(kThreads), 0, stream)
    (static_cast<T *>(logits), targets, losses, rows, vocab, ld, with_grad, grad_scale);
    return check_launch("cross_entropy_kernel");
}

}  // namespace

// Called by relora_cuda_stream_synchronize after the stream is idle.
relora_status take_cross_entropy_failure() {
    if (!__atomic_exchange_n(&g_armed, false, __ATOMIC_SEQ_CST)) return RELORA_OK;
    unsigned long long row = kNoBadRow;
#if defined(RELORA_EMU)
    row = g_bad_target_row;
    g_bad_target_row = kNoBadRow;
#else
    RELORA_CHECK(check(cudaMemcpyFromSymbol(&row, g_bad_target_row, sizeof row), "cross_entropy failure word"));
    if (row != kNoBadRow) {
        RELORA_CHECK(check(cudaMemcpyToSymbol(g_bad_target_row, &kNoBadRow, sizeof kNoBadRow), "cross_entropy failure word"));
    }
#endif
    if (row == kNoBadRow) return RELORA_OK;
    return fail(RELORA_ERR_INVALID_ARGUMENT, "cross_entropy: row %llu has a target >= vocab (its loss is NaN)", row);
}

}  // namespace relora

using namespace relora;

relora_status relora_cuda_cross_entropy(void *logits, const int32_t *targets, float *losses, int64_t rows, int64_t vocab,
                                        int64_t ld, int32_t with_grad, float grad_scale, int32_t dtype, void *stream) {
    RELORA_REQUIRE(rows >= 0 && vocab >= 0, "cross_entropy", "negative shape [%lld, %lld]", (long long)rows,
                   (long long)vocab);
    if (rows == 0) return RELORA_OK;
    RELORA_REQUIRE(vocab > 0, "cross_entropy", "vocab 0 with %lld rows", (long long)rows);
    RELORA_REQUIRE(logits && targets && losses, "cross_entropy", "null pointer");
    RELORA_REQUIRE(ld == 0 || ld >= vocab, "cross_entropy", "row stride %lld < vocab %lld", (long long)ld, (long long)vocab);
    if (ld == 0) ld = vocab;
    switch (dtype) {
    case RELORA_DTYPE_F32:
        return launch<float>(logits, targets, losses, rows, vocab, ld, with_grad != 0, grad_scale, as_stream(stream));
    case RELORA_DTYPE_BF16:
        return launch<__nv_bfloat16>(logits, targets, losses, rows, vocab, ld, with_grad != 0, grad_scale, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "cross_entropy: unknown dtype %d", (int)dtype);
    }
}
