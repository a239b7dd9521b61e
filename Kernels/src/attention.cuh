// Shared by attention.cu (the entry points, the f32 CUDA-core kernels) and attention_mma.cu (the bf16
// tensor-core kernels for head_dim 64 and 128): the problem shape and the tensor-core path's entries.
#ifndef RELORA_ATTENTION_CUH
#define RELORA_ATTENTION_CUH

#include "relora_cuda.cuh"

namespace relora {
namespace attention {

struct Shape {
    int64_t batch, seq, heads, kv_heads, group;  // group = heads / kv_heads: query head h reads kv head h / group
    int D;                                       // head_dim
    float scale;                                 // 1 / sqrt(D) in f32, as the CPU computes it
};

// Whether the tensor-core kernels take this call: bf16 storage, head_dim 64 or 128, every pointer 16-byte
// aligned (cp.async and vector loads), and RELORA_ATTENTION_TENSOR_CORES not set to 0 (the escape hatch
// that sends every call to the CUDA-core kernels).
bool mma_eligible(const Shape &sh, int32_t dtype, const void *const *pointers, int count);

// The tensor-core forward (out, lse) and backward (dq, dk, dv): bf16 tensors, same layouts and contracts as
// the ABI entries (attention_mma.cu).
relora_status forward_mma(const void *q, const void *k, const void *v, void *out, float *lse, const Shape &sh,
                          cudaStream_t stream);
relora_status backward_mma(const void *dout, const void *q, const void *k, const void *v, const void *out,
                           const float *lse, void *dq, void *dk, void *dv, const Shape &sh, cudaStream_t stream);

}  // namespace attention
}  // namespace relora

#endif  // RELORA_ATTENTION_CUH
