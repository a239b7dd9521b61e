// Fills, conversions and elementwise updates: convert, fill, fill_uniform, fill_normal, axpy, scale.
// Grid-stride loops over count elements, each element written by exactly one thread.
//
// Exactness: every f32 operation is an explicit _rn intrinsic (nvcc cannot contract a product into an
// FMA), in the order of the CPU reference (CPUBackend), so f32 results are the CPU's bit for bit and bf16
// results are those rounded once (round to nearest even). fill_normal's log/cos run in double as the CPU's
// do; see normal_at for how far CUDA's double log/cos can move a value.
#include "relora_cuda.cuh"

namespace relora {
namespace {

constexpr int kThreads = 256;

#define RELORA_GRID_STRIDE(i, count) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (count); i += (int64_t)gridDim.x * blockDim.x)

// ---- Storage of the three float dtypes ----------------------------------------------------------------
// Widening is exact. f16 -> f32 is written out with integer operations (relora_quant.h's
// relora_fp16_to_fp32), so a NaN keeps its payload on both compilers; bf16 -> f32 is a shift.
// Narrowing rounds to nearest even with CUDA's conversions: overflow goes to inf, NaN becomes the
// canonical 0x7FFF (FloatBits on the host keeps a NaN's payload instead; the only difference).
__device__ __forceinline__ float load_any(const __half *p, int64_t i) {
    return relora_fp16_to_fp32(*reinterpret_cast<const uint16_t *>(p + i));
}
__device__ __forceinline__ float load_any(const __nv_bfloat16 *p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_any(const float *p, int64_t i) { return p[i]; }
__device__ __forceinline__ void store_any(__half *p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_any(__nv_bfloat16 *p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_any(float *p, int64_t i, float v) { p[i] = v; }

template <typename S, typename D>
__global__ void __launch_bounds__(kThreads) convert_kernel(const S *src, D *dst, int64_t count) {
    RELORA_GRID_STRIDE(i, count) { store_any(dst, i, load_any(src, i)); }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fill_kernel(T *x, float value, int64_t count) {
    const T v = from_float<T>(value);
    RELORA_GRID_STRIDE(i, count) { x[i] = v; }
}

// CPUBackend.fillUniform: (2 * u - 1) * bound in f32 (2u and 2u - 1 are exact: u has 24 bits).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fill_uniform_kernel(T *x, int64_t count, float bound, uint64_t seed, uint64_t stream_id) {
    RELORA_GRID_STRIDE(i, count) {
        const float u = relora_rng_uniform(seed, stream_id, (uint64_t)i);
        x[i] = from_float<T>(__fmul_rn(__fadd_rn(__fmul_rn(2.0f, u), -1.0f), bound));
    }
}

// CPUBackend.fillNormal, Box-Muller in double:
//   u1 = (rng_u64(2i) >> 11) * 2^-53, u2 = (rng_u64(2i + 1) >> 11) * 2^-53   (exact)
//   r = sqrt(-2 * log(1 - u1))                                                 (1 - u1, -2 * ., sqrt: IEEE)
//   x = Float(r * cos(2 * pi * u2)) * std                                      (2 * pi exact; f32 product)
// Every + - * / and sqrt is a correctly rounded IEEE operation on both sides. log and cos are not: CUDA's
// double log is within 1 ulp and cos within 2 ulp (CUDA C Programming Guide, double-precision functions),
// the CPU's libm (glibc) within 1 ulp, so the double before the rounding to f32 can differ by a few ulp of
// double (relative ~2^-50). That changes the f32 only when it lies that close to a rounding boundary of f32
// (probability ~2^-26 per element), and then by 1 ulp of f32 (before and after the product with std, which
// is monotone). In the emulation (host libm on both sides) the values are bit-identical.
__device__ __forceinline__ float normal_at(int64_t i, float std, uint64_t seed, uint64_t stream_id) {
    const double u1 = (double)(relora_rng_u64(seed, stream_id, (uint64_t)(2 * i)) >> 11) * 0x1p-53;
    const double u2 = (double)(relora_rng_u64(seed, stream_id, (uint64_t)(2 * i + 1)) >> 11) * 0x1p-53;
    const double r = __dsqrt_rn(__dmul_rn(-2.0, log(__dadd_rn(1.0, -u1))));
    const double angle = __dmul_rn(2.0 * 3.141592653589793, u2);
    return __fmul_rn(__double2float_rn(__dmul_rn(r, cos(angle))), std);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fill_normal_kernel(T *x, int64_t count, float std, uint64_t seed, uint64_t stream_id) {
    RELORA_GRID_STRIDE(i, count) { x[i] = from_float<T>(normal_at(i, std, seed, stream_id)); }
}

// CPUBackend.axpy: a[i] += alpha * b[i] (f32 product, then f32 sum: no FMA).
template <typename A, typename B>
__global__ void __launch_bounds__(kThreads) axpy_kernel(float alpha, const B *b, A *a, int64_t count) {
    RELORA_GRID_STRIDE(i, count) { a[i] = from_float<A>(__fadd_rn(to_float(a[i]), __fmul_rn(alpha, to_float(b[i])))); }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_kernel(T *x, float alpha, int64_t count) {
    RELORA_GRID_STRIDE(i, count) { x[i] = from_float<T>(__fmul_rn(to_float(x[i]), alpha)); }
}

inline dim3 grid(int64_t count) { return dim3(grid_for(count, kThreads)); }

template <typename S, typename D>
relora_status launch_convert(const void *src, void *dst, int64_t count, cudaStream_t stream) {
    RELORA_LAUNCH((convert_kernel<S, D>), grid(count), dim3(kThreads), 0, stream)
    (static_cast<const S *>(src), static_cast<D *>(dst), count);
    return check_launch("convert_kernel");
}

template <typename S>
relora_status convert_from(const void *src, void *dst, int32_t dst_dtype, int64_t count, cudaStream_t stream) {
    switch (dst_dtype) {
    case RELORA_DTYPE_F32: return launch_convert<S, float>(src, dst, count, stream);
    case RELORA_DTYPE_BF16: return launch_convert<S, __nv_bfloat16>(src, dst, count, stream);
    case RELORA_DTYPE_F16: return launch_convert<S, __half>(src, dst, count, stream);
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "convert: unknown destination dtype %d", (int)dst_dtype);
    }
}

int64_t dtype_bytes(int32_t dtype) {
    switch (dtype) {
    case RELORA_DTYPE_F32: return 4;
    case RELORA_DTYPE_BF16:
    case RELORA_DTYPE_F16: return 2;
    default: return 0;
    }
}

template <typename A>
relora_status axpy_into(float alpha, const void *b, int32_t b_dtype, void *a, int64_t count, cudaStream_t stream) {
    switch (b_dtype) {
    case RELORA_DTYPE_F32:
        RELORA_LAUNCH((axpy_kernel<A, float>), grid(count), dim3(kThreads), 0, stream)
        (alpha, static_cast<const float *>(b), static_cast<A *>(a), count);
        return check_launch("axpy_kernel");
    case RELORA_DTYPE_BF16:
        RELORA_LAUNCH((axpy_kernel<A, __nv_bfloat16>), grid(count), dim3(kThreads), 0, stream)
        (alpha, static_cast<const __nv_bfloat16 *>(b), static_cast<A *>(a), count);
        return check_launch("axpy_kernel");
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "axpy: unknown dtype %d of b", (int)b_dtype);
    }
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_convert(const void *src, int32_t src_dtype, void *dst, int32_t dst_dtype, int64_t count,
                                  void *stream) {
    RELORA_REQUIRE(count >= 0, "convert", "negative count %lld", (long long)count);
    RELORA_REQUIRE(dtype_bytes(src_dtype) > 0 && dtype_bytes(dst_dtype) > 0, "convert", "unknown dtype %d -> %d",
                   (int)src_dtype, (int)dst_dtype);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(src && dst, "convert", "null pointer");
    const cudaStream_t s = as_stream(stream);
    if (src_dtype == dst_dtype) {
        if (src == dst) return RELORA_OK;
        return check(cudaMemcpyAsync(dst, src, (size_t)(count * dtype_bytes(src_dtype)), cudaMemcpyDeviceToDevice, s),
                     "convert: copy");
    }
    switch (src_dtype) {
    case RELORA_DTYPE_F32: return convert_from<float>(src, dst, dst_dtype, count, s);
    case RELORA_DTYPE_BF16: return convert_from<__nv_bfloat16>(src, dst, dst_dtype, count, s);
    default: return convert_from<__half>(src, dst, dst_dtype, count, s);
    }
}

relora_status relora_cuda_fill(void *x, float value, int64_t count, int32_t dtype, void *stream) {
    RELORA_REQUIRE(count >= 0, "fill", "negative count %lld", (long long)count);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(x, "fill", "null pointer");
    const cudaStream_t s = as_stream(stream);
    switch (dtype) {
    case RELORA_DTYPE_F32:
        RELORA_LAUNCH(fill_kernel<float>, grid(count), dim3(kThreads), 0, s)(static_cast<float *>(x), value, count);
        return check_launch("fill_kernel");
    case RELORA_DTYPE_BF16:
        RELORA_LAUNCH(fill_kernel<__nv_bfloat16>, grid(count), dim3(kThreads), 0, s)
        (static_cast<__nv_bfloat16 *>(x), value, count);
        return check_launch("fill_kernel");
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "fill: unknown dtype %d", (int)dtype);
    }
}

relora_status relora_cuda_fill_uniform(void *x, int64_t count, float bound, uint64_t seed, uint64_t stream_id,
                                       int32_t dtype, void *stream) {
    RELORA_REQUIRE(count >= 0, "fill_uniform", "negative count %lld", (long long)count);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(x, "fill_uniform", "null pointer");
    const cudaStream_t s = as_stream(stream);
    switch (dtype) {
    case RELORA_DTYPE_F32:
        RELORA_LAUNCH(fill_uniform_kernel<float>, grid(count), dim3(kThreads), 0, s)
        (static_cast<float *>(x), count, bound, seed, stream_id);
        return check_launch("fill_uniform_kernel");
    case RELORA_DTYPE_BF16:
        RELORA_LAUNCH(fill_uniform_kernel<__nv_bfloat16>, grid(count), dim3(kThreads), 0, s)
        (static_cast<__nv_bfloat16 *>(x), count, bound, seed, stream_id);
        return check_launch("fill_uniform_kernel");
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "fill_uniform: unknown dtype %d", (int)dtype);
    }
}

relora_status relora_cuda_fill_normal(void *x, int64_t count, float std, uint64_t seed, uint64_t stream_id,
                                      int32_t dtype, void *stream) {
    RELORA_REQUIRE(count >= 0, "fill_normal", "negative count %lld", (long long)count);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(x, "fill_normal", "null pointer");
    const cudaStream_t s = as_stream(stream);
    switch (dtype) {
    case RELORA_DTYPE_F32:
        RELORA_LAUNCH(fill_normal_kernel<float>, grid(count), dim3(kThreads), 0, s)
        (static_cast<float *>(x), count, std, seed, stream_id);
        return check_launch("fill_normal_kernel");
    case RELORA_DTYPE_BF16:
        RELORA_LAUNCH(fill_normal_kernel<__nv_bfloat16>, grid(count), dim3(kThreads), 0, s)
        (static_cast<__nv_bfloat16 *>(x), count, std, seed, stream_id);
        return check_launch("fill_normal_kernel");
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "fill_normal: unknown dtype %d", (int)dtype);
    }
}

relora_status relora_cuda_axpy(float alpha, const void *b, int32_t b_dtype, void *a, int32_t a_dtype, int64_t count,
                               void *stream) {
    RELORA_REQUIRE(count >= 0, "axpy", "negative count %lld", (long long)count);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(a && b, "axpy", "null pointer");
    const cudaStream_t s = as_stream(stream);
    switch (a_dtype) {
    case RELORA_DTYPE_F32: return axpy_into<float>(alpha, b, b_dtype, a, count, s);
    case RELORA_DTYPE_BF16: return axpy_into<__nv_bfloat16>(alpha, b, b_dtype, a, count, s);
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "axpy: unknown dtype %d of a", (int)a_dtype);
    }
}

relora_status relora_cuda_scale(void *x, float alpha, int64_t count, int32_t dtype, void *stream) {
    RELORA_REQUIRE(count >= 0, "scale", "negative count %lld", (long long)count);
    if (count == 0) return RELORA_OK;
    RELORA_REQUIRE(x, "scale", "null pointer");
    const cudaStream_t s = as_stream(stream);
    switch (dtype) {
    case RELORA_DTYPE_F32:
        RELORA_LAUNCH(scale_kernel<float>, grid(count), dim3(kThreads), 0, s)(static_cast<float *>(x), alpha, count);
        return check_launch("scale_kernel");
    case RELORA_DTYPE_BF16:
        RELORA_LAUNCH(scale_kernel<__nv_bfloat16>, grid(count), dim3(kThreads), 0, s)
        (static_cast<__nv_bfloat16 *>(x), alpha, count);
        return check_launch("scale_kernel");
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "scale: unknown dtype %d", (int)dtype);
    }
}
