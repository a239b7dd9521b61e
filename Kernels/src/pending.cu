// PENDING(issue 9): entry points of ABI v3 whose kernels are being written. Each returns
// RELORA_ERR_INVALID_ARGUMENT with a message naming it, so the loader accepts the library and every
// caller gets a clear failure. A kernel's author deletes its stub here when the real one lands; this
// file goes away when it is empty.
#include "relora_cuda.cuh"

#define RELORA_PENDING(name) return ::relora::fail(RELORA_ERR_INVALID_ARGUMENT, #name ": not implemented yet")

// ---- kernels-b: GEMM, fills, conversions, pruning, changed codes ----
relora_status relora_cuda_count_changed_codes(int32_t, const void *, const void *, int64_t, int64_t, float *, int64_t,
                                              void *, void *) {
    RELORA_PENDING(count_changed_codes);
}
relora_status relora_cuda_convert(const void *, int32_t, void *, int32_t, int64_t, void *) { RELORA_PENDING(convert); }
relora_status relora_cuda_fill(void *, float, int64_t, int32_t, void *) { RELORA_PENDING(fill); }
relora_status relora_cuda_fill_uniform(void *, int64_t, float, uint64_t, uint64_t, int32_t, void *) {
    RELORA_PENDING(fill_uniform);
}
relora_status relora_cuda_fill_normal(void *, int64_t, float, uint64_t, uint64_t, int32_t, void *) {
    RELORA_PENDING(fill_normal);
}
relora_status relora_cuda_axpy(float, const void *, int32_t, void *, int32_t, int64_t, void *) { RELORA_PENDING(axpy); }
relora_status relora_cuda_scale(void *, float, int64_t, int32_t, void *) { RELORA_PENDING(scale); }
relora_status relora_cuda_gemm(int32_t, int32_t, int64_t, int64_t, int64_t, float, const float *, const void *,
                               const void *, int32_t, float, void *, int32_t, void *) {
    RELORA_PENDING(gemm);
}
relora_status relora_cuda_prune_magnitude(void *, int64_t, int32_t, int64_t, void *, int64_t *, void *) {
    RELORA_PENDING(prune_magnitude);
}
relora_status relora_cuda_prune_random(void *, int64_t, int32_t, double, uint64_t, uint64_t, int64_t *, void *) {
    RELORA_PENDING(prune_random);
}
relora_status relora_cuda_prune_moments(float *, float *, int64_t, int64_t, float, void *, int64_t *, void *) {
    RELORA_PENDING(prune_moments);
}
