// AdamW over f32 master weights, writing an optional bf16 working copy (Backend.adamw).
//
// The update is written with the _rn intrinsics in the CPU reference's exact order, so that nvcc
// cannot contract a product into an FMA: for the same inputs the GPU produces the CPU's bits (and
// the emulation, built with -ffp-contract=off, the same).
#include <math.h>

#include "relora_cuda.cuh"

namespace relora {
namespace {

constexpr int kThreads = 256;

// Per element, as CPUBackend.adamw:
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g * g
//   p = p * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps)
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(float *param, const float *grad, float *m, float *v, __nv_bfloat16 *param_bf16, int64_t count,
                 float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float step_size,
                 float bc2_sqrt, float decay) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = grad[i];
        const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_minus_beta1, g));
        const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        const float p = __fsub_rn(__fmul_rn(param[i], decay), __fdiv_rn(__fmul_rn(step_size, mi), denom));
        m[i] = mi;
        v[i] = vi;
        param[i] = p;
        if (param_bf16) param_bf16[i] = __float2bfloat16_rn(p);
    }
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_adamw(float *param, const float *grad, float *m, float *v, void *param_bf16, int64_t count,
                                float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                                void *stream) {
    RELORA_REQUIRE(count >= 0, "adamw", "negative count %lld", (long long)count);
    RELORA_REQUIRE(step >= 1, "adamw", "step %lld: steps count from 1", (long long)step);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(param && grad && m && v, "adamw", "null pointer");
    // The scalars exactly as the CPU computes them (f32 operations on f32 values; pow in double).
    const float bc1 = 1.0f - (float)pow((double)beta1, (double)step);
    const float bc2 = 1.0f - (float)pow((double)beta2, (double)step);
    const float step_size = lr / bc1;
    const float bc2_sqrt = sqrtf(bc2);
    const float lr_wd = lr * weight_decay;
    const float decay = 1.0f - lr_wd;
    RELORA_LAUNCH(adamw_kernel, dim3(grid_for(count, kThreads)), dim3(kThreads), 0, as_stream(stream))
    (param, grad, m, v, static_cast<__nv_bfloat16 *>(param_bf16), count, beta1, 1.0f - beta1, beta2, 1.0f - beta2, eps,
     step_size, bc2_sqrt, decay);
    return check_launch("adamw_kernel");
}
