// AdamW with blockwise 8-bit moments (Backend.adamw8 / recipe `optimizer_states: int8`; adamw_8bit_multi: every
// tensor of a step in one launch, Backend.adamwStep) and the moment
// quantizer and dequantizer, written around relora_adam8.h: the header's functions are called as they are
// (relora_adam8_value, relora_adamw_element, relora_adam8_quantize_value; _rn intrinsics under nvcc), so
// for the same inputs the GPU produces relora_adamw8_block's / relora_adam8_quantize_block's bits.
//
// One CUDA block of 256 threads per absmax block of RELORA_ADAM8_BLOCK = 256 elements (a grid-stride loop
// over the absmax blocks): thread j owns element j of the block. The block's absmax is a max over the
// block, reduced in any order (max is exact). The 512 map floats are staged in shared memory once per
// CUDA block: the codes' binary searches and the dequantizing lookups read the shared copy.
#include <math.h>

#include "relora_cuda.cuh"
#include "relora_adam8.h"

namespace relora {
namespace {

constexpr int kThreads = RELORA_ADAM8_BLOCK;  // one thread per element of an absmax block
static_assert(kThreads % 32 == 0, "whole warps");

// Copies n floats of global memory into shared memory (consecutive threads, consecutive floats), then waits.
__device__ __forceinline__ void stage_map(float *shared, const float *global, int n) {
    for (int i = (int)threadIdx.x; i < n; i += kThreads) shared[i] = global[i];
    __syncthreads();
}

// A value's contribution to its block's absmax: |x|, or 0 for NaN (and for threads past the tail).
__device__ __forceinline__ float absmax_term(float x) { return fmaxf(0.0f, fabsf(x)); }

// relora_adamw8_block on absmax block b of one tensor, thread j on element j: dequantize m and v,
// relora_adamw_element (param updated from the unquantized moments), block maxima of |m| and |v|, requantize each
// element under the new scales. g_scale: the gradient is multiplied by it (and stored) first unless it is 1;
// working: the bf16 working copy written from the new param, or NULL. Every thread of the block calls it.
__device__ __forceinline__ void adamw8_block(float *param, float *grad, uint8_t *m_codes, float *m_absmax, uint8_t *v_codes,
                                             float *v_absmax, __nv_bfloat16 *working, const float *map_m,
                                             const float *map_v, int64_t count, int64_t b, const relora_adam_scalars &s,
                                             float g_scale) {
    const int64_t i = b * RELORA_ADAM8_BLOCK + threadIdx.x;
    const bool live = i < count;
    float m = 0.0f, v = 0.0f;
    if (live) {
        // Every read of m_absmax[b] / v_absmax[b] precedes block_max's barriers; thread 0 writes them after.
        m = relora_adam8_value(map_m, m_codes[i], m_absmax[b]);
        v = relora_adam8_value(map_v, v_codes[i], v_absmax[b]);
        float g = grad[i];
        if (g_scale != 1.0f) {
            g = __fmul_rn(g, g_scale);
            grad[i] = g;
        }
        float p = param[i];
        relora_adamw_element(&s, &p, g, &m, &v);
        param[i] = p;
        if (working) working[i] = __float2bfloat16_rn(p);
    }
    const float am = block_max(absmax_term(m)), av = block_max(absmax_term(v));
    if (live) {
        m_codes[i] = relora_adam8_quantize_value(map_m, m, am);
        v_codes[i] = relora_adam8_quantize_value(map_v, v, av);
    }
    if (threadIdx.x == 0) {
        m_absmax[b] = am;
        v_absmax[b] = av;
    }
}

// adamw8_block for every absmax block of one tensor.
__global__ void __launch_bounds__(kThreads)
    adamw8_kernel(float *param, const float *grad, uint8_t *m_codes, float *m_absmax, uint8_t *v_codes,
                  float *v_absmax, const float *maps, int64_t count, int64_t blocks, relora_adam_scalars scalars) {
    __shared__ float smaps[2 * RELORA_ADAM8_MAP];
    stage_map(smaps, maps, 2 * RELORA_ADAM8_MAP);
    const relora_adam_scalars s = scalars;
    for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
        // g_scale 1: the gradient is only read.
        adamw8_block(param, const_cast<float *>(grad), m_codes, m_absmax, v_codes, v_absmax, nullptr, smaps,
                     smaps + RELORA_ADAM8_MAP, count, b, s, 1.0f);
    }
}

// adamw8_block for every absmax block of every entry of the table (unit u: block u - first_unit of its entry).
__global__ void __launch_bounds__(kThreads)
    adamw8_multi_kernel(const relora_adam_entry *entries, int64_t tensors, int64_t units, const float *clip_factor,
                        const float *maps, relora_adam_scalars scalars) {
    __shared__ float smaps[2 * RELORA_ADAM8_MAP];
    stage_map(smaps, maps, 2 * RELORA_ADAM8_MAP);
    const float factor = clip_factor ? *clip_factor : 1.0f;
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
        const relora_adam_entry e = entries[find_entry(entries, tensors, u)];
        relora_adam_scalars s = scalars;
        if (!e.decay) s.decay = 1.0f;  // 1 - lr * 0, as a call with weight_decay 0 computes it
        adamw8_block(e.param, e.grad, static_cast<uint8_t *>(e.m), e.m_absmax, static_cast<uint8_t *>(e.v), e.v_absmax,
                     static_cast<__nv_bfloat16 *>(e.working), smaps, smaps + RELORA_ADAM8_MAP, e.count, u - e.first_unit, s,
                     factor);
    }
}

// relora_adam8_quantize_block for every absmax block of x under `map` (256 floats).
__global__ void __launch_bounds__(kThreads)
    quantize8_kernel(const float *x, const float *map, int64_t count, int64_t blocks, uint8_t *codes, float *absmax) {
    __shared__ float smap[RELORA_ADAM8_MAP];
    stage_map(smap, map, RELORA_ADAM8_MAP);
    for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
        const int64_t i = b * RELORA_ADAM8_BLOCK + threadIdx.x;
        const bool live = i < count;
        const float xi = live ? x[i] : 0.0f;
        const float a = block_max(absmax_term(xi));
        if (live) codes[i] = relora_adam8_quantize_value(smap, xi, a);
        if (threadIdx.x == 0) absmax[b] = a;
    }
}

// out[i] = relora_adam8_value(map, codes[i], absmax[i / 256]); elementwise, grid-stride.
__global__ void __launch_bounds__(kThreads)
    dequantize8_kernel(const uint8_t *codes, const float *absmax, const float *map, int64_t count, float *out) {
    __shared__ float smap[RELORA_ADAM8_MAP];
    stage_map(smap, map, RELORA_ADAM8_MAP);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = relora_adam8_value(smap, codes[i], absmax[i / RELORA_ADAM8_BLOCK]);
    }
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_adamw_8bit(float *param, const float *grad, uint8_t *m_codes, float *m_absmax,
                                     uint8_t *v_codes, float *v_absmax, const float *maps, int64_t count, float lr,
                                     float beta1, float beta2, float eps, float weight_decay, int64_t step,
                                     void *stream) {
    RELORA_REQUIRE(count >= 0, "adamw_8bit", "negative count %lld", (long long)count);
    RELORA_REQUIRE(step >= 1, "adamw_8bit", "step %lld: steps count from 1", (long long)step);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(param && grad && m_codes && m_absmax && v_codes && v_absmax && maps, "adamw_8bit", "null pointer");
    // The scalars exactly as the CPU computes them (the header's host function).
    const relora_adam_scalars s = relora_adam_scalars_make(lr, beta1, beta2, eps, weight_decay, step);
    const int64_t blocks = relora_adam8_blocks(count);
    RELORA_LAUNCH(adamw8_kernel, dim3(grid_for(blocks, 1)), dim3(kThreads), 0, as_stream(stream))
    (param, grad, m_codes, m_absmax, v_codes, v_absmax, maps, count, blocks, s);
    return check_launch("adamw8_kernel");
}

relora_status relora_cuda_dequantize_8bit(const uint8_t *codes, const float *absmax, const float *maps,
                                          int32_t is_signed, int64_t count, float *out, void *stream) {
    RELORA_REQUIRE(count >= 0, "dequantize_8bit", "negative count %lld", (long long)count);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(codes && absmax && maps && out, "dequantize_8bit", "null pointer");
    const float *map = is_signed ? maps : maps + RELORA_ADAM8_MAP;
    RELORA_LAUNCH(dequantize8_kernel, dim3(grid_for(count, kThreads)), dim3(kThreads), 0, as_stream(stream))
    (codes, absmax, map, count, out);
    return check_launch("dequantize8_kernel");
}

relora_status relora_cuda_quantize_8bit(const float *x, const float *maps, int32_t is_signed, int64_t count,
                                        uint8_t *codes, float *absmax, void *stream) {
    RELORA_REQUIRE(count >= 0, "quantize_8bit", "negative count %lld", (long long)count);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(x && maps && codes && absmax, "quantize_8bit", "null pointer");
    const float *map = is_signed ? maps : maps + RELORA_ADAM8_MAP;
    const int64_t blocks = relora_adam8_blocks(count);
    RELORA_LAUNCH(quantize8_kernel, dim3(grid_for(blocks, 1)), dim3(kThreads), 0, as_stream(stream))
    (x, map, count, blocks, codes, absmax);
    return check_launch("quantize8_kernel");
}

relora_status relora_cuda_adamw_8bit_multi(const relora_adam_entry *entries, int64_t tensors, int64_t total_units,
                                           const float *clip_factor, const float *maps, float lr, float beta1, float beta2,
                                           float eps, float weight_decay, int64_t step, void *stream) {
    RELORA_REQUIRE(tensors >= 0 && total_units >= 0, "adamw_8bit_multi", "negative count");
    RELORA_REQUIRE(step >= 1, "adamw_8bit_multi", "step %lld: steps count from 1", (long long)step);
    if (tensors == 0 || total_units == 0) return RELORA_OK;
    RELORA_REQUIRE(entries && maps, "adamw_8bit_multi", "null pointer");
    const relora_adam_scalars s = relora_adam_scalars_make(lr, beta1, beta2, eps, weight_decay, step);
    RELORA_LAUNCH(adamw8_multi_kernel, dim3(grid_for(total_units, 1)), dim3(kThreads), 0, as_stream(stream))
    (entries, tensors, total_units, clip_factor, maps, s);
    return check_launch("adamw8_multi_kernel");
}
