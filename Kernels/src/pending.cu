// PENDING(issue 9): entry points of ABI v3 whose kernels are being written. Each returns
// RELORA_ERR_INVALID_ARGUMENT with a message naming it, so the loader accepts the library and every
// caller gets a clear failure. A kernel's author deletes its stub here when the real one lands; this
// file goes away when it is empty.
#include "relora_cuda.cuh"

#define RELORA_PENDING(name) return ::relora::fail(RELORA_ERR_INVALID_ARGUMENT, #name ": not implemented yet")

// ---- kernels-a: attention, RoPE, cross-entropy ----
relora_status relora_cuda_rope(void *, int64_t, int64_t, int64_t, int64_t, float, int32_t, int32_t, void *) {
    RELORA_PENDING(rope);
}
relora_status relora_cuda_attention_forward(const void *, const void *, const void *, void *, float *, int64_t, int64_t,
                                            int64_t, int64_t, int64_t, int32_t, void *) {
    RELORA_PENDING(attention_forward);
}
relora_status relora_cuda_attention_backward(const void *, const void *, const void *, const void *, const void *,
                                             const float *, void *, void *, void *, int64_t, int64_t, int64_t, int64_t,
                                             int64_t, int32_t, void *) {
    RELORA_PENDING(attention_backward);
}
relora_status relora_cuda_cross_entropy(void *, const int32_t *, float *, int64_t, int64_t, int32_t, float, int32_t,
                                        void *) {
    RELORA_PENDING(cross_entropy);
}
