// RMSNorm forward and backward (Backend.rmsnormForward / rmsnormBackward).
// The products are written in the CPU reference's order ((x * s) * w, (s * w) * dy, ...); sums over a
// row are fp32 block reductions (fixed tree), the weight gradient the CPU's own two-pass column sum (bit-identical
// in f32): every result is deterministic for a given shape.
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

// dweight in CPUBackend.rmsnormBackward's order, so an f32 run gives the CPU's bits. The CPU splits the rows
// into `blocks` consecutive row blocks of `block_rows` rows (ReductionBlocks(rows, minSize: 16, maxBlocks: 64):
// block_rows = max(16, ceil(rows / 64)), at most 64 blocks), sums each block's rows in order from 0 into a
// partial row, then adds the partials to dweight in block order. Here the same two passes run inside one CUDA
// block per 16 columns (grid-stride over column tiles): thread (c, l) sums row block l of column c in row order
// into shared memory (pass 1; rows of a block are independent loads, so the serial chain is only the adds),
// then thread (c, 0) adds the partials of blocks 0, 1, ... to dweight[c] (pass 2). Products and sums are _rn
// intrinsics: ((dy * x) * s) then one addition, never fused, as the CPU's `dw[i] += dy[i] * xr[i] * s`.
// Parallelism: dim / 16 blocks of 1024 threads (the 1b config's dim 2048: 128 blocks), each thread
// streaming block_rows rows of one column; a warp reads 16 consecutive columns of two rows.
constexpr int kDwColumns = 16;
constexpr int kDwLanes = 64;  // = the CPU's maxBlocks: one lane per row block

template <typename T>
__global__ void __launch_bounds__(kDwColumns * kDwLanes)
    rmsnorm_backward_dweight_kernel(const T *dout, const T *x, const float *rstd, float *dweight, int64_t rows,
                                    int64_t dim, int64_t block_rows, int blocks) {
    __shared__ float partial[kDwLanes][kDwColumns];  // [row block][column]: a warp's writes hit 32 banks
    const int lane = (int)threadIdx.y;
    for (int64_t tile = blockIdx.x; tile * kDwColumns < dim; tile += gridDim.x) {
        const int64_t col = tile * kDwColumns + threadIdx.x;
        if (lane < blocks && col < dim) {
            const int64_t first = (int64_t)lane * block_rows;
            const int64_t end = first + block_rows < rows ? first + block_rows : rows;
            float acc = 0.0f;
            RELORA_UNROLL_BY(4)
            for (int64_t r = first; r < end; ++r) {
                const float term = __fmul_rn(__fmul_rn(to_float(dout[r * dim + col]), to_float(x[r * dim + col])), rstd[r]);
                acc = __fadd_rn(acc, term);
            }
            partial[lane][threadIdx.x] = acc;
        }
        __syncthreads();
        if (lane == 0 && col < dim) {
            float total = dweight[col];
            for (int b = 0; b < blocks; ++b) total = __fadd_rn(total, partial[b][threadIdx.x]);
            dweight[col] = total;
        }
        __syncthreads();  // the next tile rewrites partial
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
    // The CPU's row blocks (ReductionBlocks(rows, minSize: 16, maxBlocks: 64)).
    const int64_t per_lane = (rows + kDwLanes - 1) / kDwLanes;
    const int64_t block_rows = per_lane > 16 ? per_lane : 16;
    const int blocks = (int)((rows + block_rows - 1) / block_rows);
    RELORA_LAUNCH(rmsnorm_backward_dweight_kernel<T>, dim3(grid_for(dim, kDwColumns)), dim3(kDwColumns, kDwLanes), 0, stream)
    (static_cast<const T *>(dout), static_cast<const T *>(x), rstd, dweight, rows, dim, block_rows, blocks);
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
