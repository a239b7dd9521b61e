// AdamW over f32 master weights, writing an optional bf16 working copy (Backend.adamw), one tensor a call
// or every tensor of a step in one launch (adamw_multi, Backend.adamwStep).
//
// The update is written with the _rn intrinsics in the CPU reference's exact order, so that nvcc
// cannot contract a product into an FMA: for the same inputs the GPU produces the CPU's bits (and
// the emulation, built with -ffp-contract=off, the same). adamw_multi runs relora_adamw_element
// (relora_adam8.h), the same operations in the same order on the same scalars (relora_adam_scalars_make
// computes them as relora_cuda_adamw does), so it gives adamw_kernel's bits.
#include <math.h>

#include "relora_cuda.cuh"
#include "relora_adam8.h"

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

// Every entry of the table, one RELORA_ADAM_CHUNK of elements per unit (grid-stride over the units): the
// gradient scaled by the clip factor and stored (as `scale` would), the update, the bf16 working copy (as
// `convert` would). Each element is read and written once.
__global__ void __launch_bounds__(kThreads)
    adamw_multi_kernel(const relora_adam_entry *entries, int64_t tensors, int64_t units, const float *clip_factor,
                       relora_adam_scalars scalars) {
    const float factor = clip_factor ? *clip_factor : 1.0f;
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
        const relora_adam_entry e = entries[find_entry(entries, tensors, u)];
        relora_adam_scalars s = scalars;
        if (!e.decay) s.decay = 1.0f;  // 1 - lr * 0, as a call with weight_decay 0 computes it
        const int64_t start = (u - e.first_unit) * RELORA_ADAM_CHUNK;
        const int64_t end = e.count < start + RELORA_ADAM_CHUNK ? e.count : start + RELORA_ADAM_CHUNK;
        float *m = static_cast<float *>(e.m), *v = static_cast<float *>(e.v);
        __nv_bfloat16 *working = static_cast<__nv_bfloat16 *>(e.working);
        for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
            float g = e.grad[i];
            if (factor != 1.0f) {
                g = __fmul_rn(g, factor);
                e.grad[i] = g;
            }
            float p = e.param[i], mi = m[i], vi = v[i];
            relora_adamw_element(&s, &p, g, &mi, &vi);
            m[i] = mi;
            v[i] = vi;
            e.param[i] = p;
            if (working) working[i] = __float2bfloat16_rn(p);
        }
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

relora_status relora_cuda_adamw_multi(const relora_adam_entry *entries, int64_t tensors, int64_t total_units,
                                      const float *clip_factor, float lr, float beta1, float beta2, float eps,
                                      float weight_decay, int64_t step, void *stream) {
    RELORA_REQUIRE(tensors >= 0 && total_units >= 0, "adamw_multi", "negative count");
    RELORA_REQUIRE(step >= 1, "adamw_multi", "step %lld: steps count from 1", (long long)step);
    if (tensors == 0 || total_units == 0) return RELORA_OK;
    RELORA_REQUIRE(entries, "adamw_multi", "null table");
    const relora_adam_scalars s = relora_adam_scalars_make(lr, beta1, beta2, eps, weight_decay, step);
    RELORA_LAUNCH(adamw_multi_kernel, dim3(grid_for(total_units, 1)), dim3(kThreads), 0, as_stream(stream))
    (entries, tensors, total_units, clip_factor, s);
    return check_launch("adamw_multi_kernel");
}
