// GEMM through cuBLAS (cublasGemmEx), Backend.matmul's row-major semantics:
//   c[m, n] = alpha * s * op(a)[m, k] op(b)[k, n] + beta * c,   s = *alpha_scale (device f32) or 1.
//
// Row-major onto column-major: a row-major [r, c] matrix is the column-major [c, r] matrix with the same
// leading dimension, so c^T = op(b)^T op(a)^T is computed as the column-major product of b (first
// operand) and a (second): m' = n, n' = m, transa' = trans_b, transb' = trans_a, ldc = n.
//
// Numerics: CUBLAS_COMPUTE_32F with CUBLAS_DEFAULT_MATH (no TF32: that needs CUBLAS_TF32_TENSOR_OP_MATH or
// CUBLAS_COMPUTE_32F_FAST_TF32) and reduced-precision reductions disallowed, so f32 inputs are multiplied in
// f32 and bf16 inputs are widened exactly and accumulated in f32; c is rounded once when bf16. The order of
// the accumulation is cuBLAS' (split-K and tensor-core algorithms included), so results are not the CPU's bit
// for bit: the tests bound the error by k * u32 * sum |a||b| (+ one bf16 rounding of the output).
//
// alpha_scale: cuBLAS reads alpha and beta from device memory (CUBLAS_POINTER_MODE_DEVICE). With alpha == 1
// (every LoRA GEMM of a training step) alpha * s is s itself, so alpha is the caller's scalar *alpha_scale as
// it is, and beta 0 or 1 is one of two constants the library keeps on the device: no extra kernel. Any other
// alpha or beta (the merge's alpha = -1, tests) goes through a one-thread kernel that writes {alpha * s, beta}
// (one f32 multiply, as the CPU's `alpha * scale`) into a per-stream pair of device floats. Without
// alpha_scale the scalars are host values. beta == 0 ignores c in either pointer mode: cuBLAS documents beta as a
// "host or device scalar" and "if beta == 0, C does not have to be a valid input", so c is not cleared first
// (no memset a GEMM; the conformance suite's beta = 0 over NaN with a device scale is what checks it on a GPU).
//
// c bf16 with f32 inputs is not a type combination cublasGemmEx offers: the product goes through a
// temporary f32 [m, n] (cudaMalloc, and the call synchronizes the stream before freeing it): a slow path,
// correct but not for a training step's hot loop.
#if defined(__CUDACC__)
#include <cublas_v2.h>
#else
#include "cublas_emu.h"
#endif

#include <limits.h>
#include <string.h>

#include <mutex>
#include <unordered_map>

#include "relora_cuda.cuh"

namespace relora {
namespace {

// One cuBLAS handle per stream, made at the stream's first GEMM: bound to its stream once and given a workspace
// of its own, so GEMMs on two streams never share cuBLAS' scratch (a handle's default workspace pool is per
// handle, but cuBLAS' documentation asks for one handle per stream when streams run concurrently), and the
// stream's two device scalars. cublasSetStream resets a handle's workspace to cuBLAS' default pool, which is why
// the stream is set once, before the workspace. A cuBLAS handle is not safe for concurrent use, so every call
// holds the lock from the lookup to the enqueue.
struct StreamGemm {
    cublasHandle_t handle = nullptr;
    void *workspace = nullptr;  // workspace_bytes(), cudaMalloc'd (outside the Swift allocator)
    float *scalars = nullptr;   // {alpha * s, beta} for the scalar kernel, made on first use
};
std::mutex g_mutex;
std::unordered_map<cudaStream_t, StreamGemm> g_streams;
float *g_constants = nullptr;  // device {0, 1}: beta for alpha_scale GEMMs with alpha == 1

relora_status cublas_check(cublasStatus_t status, const char *what) {
    if (status == CUBLAS_STATUS_SUCCESS) return RELORA_OK;
    // cuBLAS could not allocate its handle or workspace: out of memory like any other allocation.
    return fail(status == CUBLAS_STATUS_ALLOC_FAILED ? RELORA_ERR_OUT_OF_MEMORY : RELORA_ERR_CUBLAS, "gemm: %s: %s (cuBLAS status %d)", what, cublasGetStatusString(status), (int)status);
}

// A handle's workspace: what cublasSetWorkspace's documentation recommends, 32 MiB from sm_90 on, and before it
// PyTorch's default (2 x 4 MiB + 8 x 16 KiB). The memory plan counts the same figure per stream that runs GEMMs
// (GPUProfile.cublasWorkspaceBytes, Sources/ReLoRACore/Backend/DeviceMemoryModel.swift). The emulation's
// cuBLAS stand-in needs none.
size_t workspace_bytes() {
#if defined(RELORA_EMU)
    return 0;
#else
    int device = 0, major = 9;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
        (void)cudaGetLastError();
        major = 9;  // the larger figure
    }
    return major >= 9 ? (size_t)32 << 20 : (size_t)2 * (4 << 20) + (size_t)8 * (16 << 10);
#endif
}

relora_status handle_locked(cudaStream_t stream, StreamGemm **out) {
    auto it = g_streams.find(stream);
    if (it == g_streams.end()) {
        StreamGemm g;
        RELORA_CHECK(cublas_check(cublasCreate(&g.handle), "cublasCreate"));
        cublasStatus_t s =
            cublasSetMathMode(g.handle, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
        const char *what = "cublasSetMathMode";
        if (s == CUBLAS_STATUS_SUCCESS) {
            s = cublasSetStream(g.handle, stream);
            what = "cublasSetStream";
        }
        const size_t bytes = workspace_bytes();
        if (s == CUBLAS_STATUS_SUCCESS && bytes > 0) {
            if (cudaMalloc(&g.workspace, bytes) != cudaSuccess) {
                (void)cudaGetLastError();
                cublasDestroy(g.handle);
                return fail(RELORA_ERR_OUT_OF_MEMORY, "gemm: cannot allocate cuBLAS' %zu-byte workspace for a stream", bytes);
            }
            s = cublasSetWorkspace(g.handle, g.workspace, bytes);
            what = "cublasSetWorkspace";
        }
        if (s != CUBLAS_STATUS_SUCCESS) {
            cublasDestroy(g.handle);
            if (g.workspace) cudaFree(g.workspace);
            return cublas_check(s, what);
        }
        it = g_streams.emplace(stream, g).first;
    }
    *out = &it->second;
    return RELORA_OK;
}

// The device constants {0, 1}, made once (a synchronous upload, the first time an alpha_scale GEMM runs).
relora_status constants_locked(float **out) {
    if (!g_constants) {
        static const float kValues[2] = {0.0f, 1.0f};
        float *p = nullptr;
        RELORA_CHECK(check(cudaMalloc((void **)&p, sizeof kValues), "gemm: device constants"));
        const relora_status s = check(cudaMemcpy(p, kValues, sizeof kValues, cudaMemcpyHostToDevice), "gemm: device constants");
        if (s != RELORA_OK) {
            cudaFree(p);
            return s;
        }
        g_constants = p;
    }
    *out = g_constants;
    return RELORA_OK;
}

relora_status scalars_locked(StreamGemm *g, float **out) {
    if (!g->scalars) RELORA_CHECK(check(cudaMalloc((void **)&g->scalars, 2 * sizeof(float)), "gemm: device scalars"));
    *out = g->scalars;
    return RELORA_OK;
}

// scalars = {alpha * *alpha_scale, beta}: one f32 product, as the CPU computes `alpha * scale`.
__global__ void __launch_bounds__(32) gemm_scalars_kernel(float alpha, const float *alpha_scale, float beta,
                                                          float *scalars) {
    if (threadIdx.x == 0) {
        scalars[0] = __fmul_rn(alpha, alpha_scale[0]);
        scalars[1] = beta;
    }
}

uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

// A leading dimension cuBLAS accepts when a dimension is 0 (it requires ld >= max(1, rows)).
int64_t ld(int64_t rows) { return rows > 1 ? rows : 1; }

cudaDataType data_type(int32_t dtype) { return dtype == RELORA_DTYPE_F32 ? CUDA_R_32F : CUDA_R_16BF; }

// One cublasGemmEx on `stream` (the lock held; g is the stream's handle). c_type is the type of c as cuBLAS sees it.
relora_status gemm_locked(StreamGemm *g, bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                          const float *alpha_scale, const void *a, const void *b, cudaDataType ab_type, float beta,
                          void *c, cudaDataType c_type, int lda, int ldb, int ldc, cudaStream_t stream) {
    cublasHandle_t h = g->handle;
    const void *alpha_p = &alpha, *beta_p = &beta;
    if (alpha_scale) {
        // +0 and 1 by their bits: a beta of -0 keeps the kernel path (its sign reaches the sum when alpha s acc is -0).
        const bool constant_beta = f32_bits(beta) == f32_bits(0.0f) || beta == 1.0f;
        if (alpha == 1.0f && constant_beta) {
            float *constants = nullptr;
            RELORA_CHECK(constants_locked(&constants));
            alpha_p = alpha_scale;
            beta_p = constants + (beta == 1.0f ? 1 : 0);
        } else {
            float *scalars = nullptr;
            RELORA_CHECK(scalars_locked(g, &scalars));
            RELORA_LAUNCH(gemm_scalars_kernel, dim3(1), dim3(32), 0, stream)(alpha, alpha_scale, beta, scalars);
            RELORA_CHECK(check_launch("gemm_scalars_kernel"));
            alpha_p = scalars;
            beta_p = scalars + 1;
        }
        RELORA_CHECK(cublas_check(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_DEVICE), "cublasSetPointerMode"));
    } else {
        RELORA_CHECK(cublas_check(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode"));
    }
    // Column-major: c^T [n, m] = op(b)^T [n, k] op(a)^T [k, m]; a row-major row stride is cuBLAS' leading dimension.
    const cublasStatus_t s = cublasGemmEx(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n,
                                          m, k, alpha_p, b, ab_type, ldb, a, ab_type, lda, beta_p, c, c_type, ldc,
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    RELORA_CHECK(cublas_check(s, "cublasGemmEx"));
    return check_launch("cublasGemmEx");
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_gemm(int32_t trans_a, int32_t trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                               const float *alpha_scale, const void *a, const void *b, int32_t ab_dtype, float beta,
                               void *c, int32_t c_dtype, int64_t lda, int64_t ldb, int64_t ldc, void *stream) {
    RELORA_REQUIRE(m >= 0 && n >= 0 && k >= 0, "gemm", "negative shape m=%lld n=%lld k=%lld", (long long)m,
                   (long long)n, (long long)k);
    RELORA_REQUIRE(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX, "gemm", "a dimension above 2^31 - 1 (m=%lld n=%lld k=%lld)",
                   (long long)m, (long long)n, (long long)k);
    RELORA_REQUIRE(ab_dtype == RELORA_DTYPE_F32 || ab_dtype == RELORA_DTYPE_BF16, "gemm", "unknown input dtype %d",
                   (int)ab_dtype);
    RELORA_REQUIRE(c_dtype == RELORA_DTYPE_F32 || c_dtype == RELORA_DTYPE_BF16, "gemm", "unknown output dtype %d",
                   (int)c_dtype);
    // Row strides: 0 = packed; cuBLAS needs each >= max(1, stored row length).
    const int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
    RELORA_REQUIRE((lda == 0 || lda >= a_cols) && (ldb == 0 || ldb >= b_cols) && (ldc == 0 || ldc >= n), "gemm",
                   "a row stride below its row length (lda=%lld ldb=%lld ldc=%lld for m=%lld n=%lld k=%lld)", (long long)lda,
                   (long long)ldb, (long long)ldc, (long long)m, (long long)n, (long long)k);
    lda = ld(lda ? lda : a_cols);
    ldb = ld(ldb ? ldb : b_cols);
    ldc = ld(ldc ? ldc : n);
    RELORA_REQUIRE(lda <= INT_MAX && ldb <= INT_MAX && ldc <= INT_MAX, "gemm", "a row stride above 2^31 - 1");
    if (m == 0 || n == 0) return RELORA_OK;
    RELORA_REQUIRE(c && ((a && b) || k == 0), "gemm", "null pointer");
    const cudaStream_t s = as_stream(stream);
    std::lock_guard<std::mutex> lock(g_mutex);
    StreamGemm *h = nullptr;
    RELORA_CHECK(handle_locked(s, &h));
    if (!(ab_dtype == RELORA_DTYPE_F32 && c_dtype == RELORA_DTYPE_BF16)) {
        return gemm_locked(h, trans_a != 0, trans_b != 0, (int)m, (int)n, (int)k, alpha, alpha_scale, a, b,
                           data_type(ab_dtype), beta, c, data_type(c_dtype), (int)lda, (int)ldb, (int)ldc, s);
    }
    // f32 inputs, bf16 output: through a temporary f32 c (packed c only).
    RELORA_REQUIRE(ldc == n, "gemm", "f32 inputs with a bf16 c of row stride %lld != n %lld", (long long)ldc, (long long)n);
    float *tmp = nullptr;
    RELORA_CHECK(check(cudaMalloc((void **)&tmp, (size_t)(m * n) * sizeof(float)), "gemm: temporary f32 output"));
    relora_status status = RELORA_OK;
    if (beta != 0.0f) status = relora_cuda_convert(c, RELORA_DTYPE_BF16, tmp, RELORA_DTYPE_F32, m * n, stream);
    if (status == RELORA_OK) {
        status = gemm_locked(h, trans_a != 0, trans_b != 0, (int)m, (int)n, (int)k, alpha, alpha_scale, a, b,
                             CUDA_R_32F, beta, tmp, CUDA_R_32F, (int)lda, (int)ldb, (int)ldc, s);
    }
    if (status == RELORA_OK) status = relora_cuda_convert(tmp, RELORA_DTYPE_F32, c, RELORA_DTYPE_BF16, m * n, stream);
    const relora_status synced = check(cudaStreamSynchronize(s), "gemm: synchronizing before freeing the temporary");
    const relora_status freed = check(cudaFree(tmp), "gemm: freeing the temporary");
    RELORA_CHECK(status);
    RELORA_CHECK(synced);
    return freed;
}
