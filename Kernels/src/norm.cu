// RMSNorm forward and backward (Backend.rmsnormForward / rmsnormBackward).
// The products are written in the CPU reference's order ((x * s) * w, (s * w) * dy, ...); sums over a
// row are fp32 block reductions (fixed tree), the weight gradient a fixed-order column sum: every
// result is deterministic for a given shape.
#include "relora_cuda.cuh"

namespace relora {
namespace {

constexpr int kRowThreads = 256;

// One block per row (grid-stride over rows). rstd[r] = 1 / sqrt(mean(x^2) + eps) with IEEE division
// and square root (no fast-math in this library).
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    rmsnorm_forward_kernel(const T *x, const T *weight, T *out, float *rstd, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *xr = x + r * dim;
        T *orow = out + r * dim;
        float ss = 0.0f;
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
            const float v = to_float(xr[i]);
            ss += v * v;
        }
        ss = block_sum(ss);
        const float s = 1.0f / sqrtf(ss / (float)dim + eps);
        if (threadIdx.x == 0) rstd[r] = s;
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
            orow[i] = from_float<T>(to_float(xr[i]) * s * to_float(weight[i]));
        }
    }
}

// dx += s * w * dy - c * x with c = s^3 * sum(w * dy * x) / dim (one block per row).
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    rmsnorm_backward_dx_kernel(const T *dout, const T *x, const T *weight, const float *rstd, T *dx, int64_t rows,
                               int64_t dim) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *dy = dout + r * dim, *xr = x + r * dim;
        T *dxr = dx + r * dim;
        const float s = rstd[r];
        float dot = 0.0f;
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dot += to_float(weight[i]) * to_float(dy[i]) * to_float(xr[i]);
        dot = block_sum(dot);
        const float c = s * s * s * dot / (float)dim;
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
            const float g = s * to_float(weight[i]) * to_float(dy[i]) - c * to_float(xr[i]);
            dxr[i] = from_float<T>(to_float(dxr[i]) + g);
        }
    }
}

constexpr int kColumns = 32;   // columns per block: one warp reads 32 consecutive elements of a row
constexpr int kRowLanes = 16;  // rows summed in parallel per column

// dweight[i] += sum_r dy[r, i] * x[r, i] * rstd[r]. Thread (c, l) of a block sums rows l, l + 16, ...
// of its column in order, then lane 0 adds the 16 partial sums in order: each column has one owner
// and a fixed summation order, so no atomics and the same bits on every run.
template <typename T>
__global__ void __launch_bounds__(kColumns * kRowLanes)
    rmsnorm_backward_dweight_kernel(const T *dout, const T *x, const float *rstd, float *dweight, int64_t rows,
                                    int64_t dim) {
    __shared__ float partial[kRowLanes][kColumns + 1];
    const int64_t col = (int64_t)blockIdx.x * kColumns + threadIdx.x;
    float acc = 0.0f;
    if (col < dim) {
        for (int64_t r = threadIdx.y; r < rows; r += kRowLanes) {
            acc += to_float(dout[r * dim + col]) * to_float(x[r * dim + col]) * rstd[r];
        }
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < dim) {
        float total = 0.0f;
        for (int l = 0; l < kRowLanes; ++l) total += partial[l][threadIdx.x];
        dweight[col] += total;
    }
}

template <typename T>
relora_status forward(const void *x, const void *weight, void *out, float *rstd, int64_t rows, int64_t dim, float eps,
                      cudaStream_t stream) {
    RELORA_LAUNCH(rmsnorm_forward_kernel<T>, dim3(grid_for(rows, 1)), dim3(kRowThreads), 0, stream)
    (static_cast<const T *>(x), static_cast<const T *>(weight), static_cast<T *>(out), rstd, rows, dim, eps);
    return check_launch("rmsnorm_forward_kernel");
}

template <typename T>
relora_status backward(const void *dout, const void *x, const void *weight, const float *rstd, void *dx,
                       float *dweight, int64_t rows, int64_t dim, cudaStream_t stream) {
    RELORA_LAUNCH(rmsnorm_backward_dx_kernel<T>, dim3(grid_for(rows, 1)), dim3(kRowThreads), 0, stream)
    (static_cast<const T *>(dout), static_cast<const T *>(x), static_cast<const T *>(weight), rstd, static_cast<T *>(dx),
     rows, dim);
    RELORA_CHECK(check_launch("rmsnorm_backward_dx_kernel"));
    // One block per 32 columns (no stride loop: a grid of 2^31 blocks covers any dim).
    RELORA_LAUNCH(rmsnorm_backward_dweight_kernel<T>, dim3(grid_for(dim, kColumns, 0x7FFFFFFF)), dim3(kColumns, kRowLanes),
                  0, stream)
    (static_cast<const T *>(dout), static_cast<const T *>(x), rstd, dweight, rows, dim);
    return check_launch("rmsnorm_backward_dweight_kernel");
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_rmsnorm_forward(const void *x, const void *weight, void *out, float *rstd, int64_t rows,
                                          int64_t dim, float eps, int32_t dtype, void *stream) {
    RELORA_REQUIRE(rows >= 0 && dim >= 0, "rmsnorm_forward", "negative shape [%lld, %lld]", (long long)rows, (long long)dim);
    if (rows == 0 || dim == 0) return RELORA_OK;
    RELORA_REQUIRE(x && weight && out && rstd, "rmsnorm_forward", "null pointer");
    switch (dtype) {
    case RELORA_DTYPE_F32: return forward<float>(x, weight, out, rstd, rows, dim, eps, as_stream(stream));
    case RELORA_DTYPE_BF16: return forward<__nv_bfloat16>(x, weight, out, rstd, rows, dim, eps, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "rmsnorm_forward: unknown dtype %d", (int)dtype);
    }
}

relora_status relora_cuda_rmsnorm_backward(const void *dout, const void *x, const void *weight, const float *rstd,
                                           void *dx, float *dweight, int64_t rows, int64_t dim, int32_t dtype,
                                           void *stream) {
    RELORA_REQUIRE(rows >= 0 && dim >= 0, "rmsnorm_backward", "negative shape [%lld, %lld]", (long long)rows, (long long)dim);
    if (rows == 0 || dim == 0) return RELORA_OK;
    RELORA_REQUIRE(dout && x && weight && rstd && dx && dweight, "rmsnorm_backward", "null pointer");
    switch (dtype) {
    case RELORA_DTYPE_F32: return backward<float>(dout, x, weight, rstd, dx, dweight, rows, dim, as_stream(stream));
    case RELORA_DTYPE_BF16: return backward<__nv_bfloat16>(dout, x, weight, rstd, dx, dweight, rows, dim, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "rmsnorm_backward: unknown dtype %d", (int)dtype);
    }
}
