// The cuBLAS stand-in of the emulation (cublas_emu.h): cublasGemmEx over OpenBLAS' cblas_sgemm.
#include "cublas_emu.h"

#include <cblas.h>

#include <new>
#include <vector>

struct relora_emu_cublas {
    cudaStream_t stream = nullptr;
    cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
    cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;
};

cublasStatus_t cublasCreate(cublasHandle_t *handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new (std::nothrow) relora_emu_cublas();
    return *handle ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void *workspace, size_t bytes) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (bytes == 0) return CUBLAS_STATUS_SUCCESS;
    if (!workspace || (uintptr_t)workspace % 256 != 0 || relora_emu_device_range(workspace, bytes) != 0) return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode(cublasHandle_t handle, cublasPointerMode_t mode) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) return CUBLAS_STATUS_INVALID_VALUE;
    handle->pointer_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->math_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusString(cublasStatus_t status) {
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "the operation completed successfully";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    default: return "unknown cuBLAS status";
    }
}

namespace {

// A stored column-major matrix of `rows` x `cols` (leading dimension ld) widened to a dense f32 copy.
std::vector<float> widen(const void *p, cudaDataType type, int rows, int cols, int ld) {
    std::vector<float> out((size_t)rows * (size_t)cols);
    for (int j = 0; j < cols; ++j) {
        for (int i = 0; i < rows; ++i) {
            const size_t at = (size_t)j * (size_t)ld + (size_t)i;
            out[(size_t)j * rows + i] = type == CUDA_R_32F ? static_cast<const float *>(p)[at]
                                                           : __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[at]);
        }
    }
    return out;
}

// One queued cublasGemmEx (arguments checked): alpha and beta as values (host pointer mode) or device pointers.
struct Gemm {
    cublasOperation_t transa, transb;
    int m, n, k;
    const void *A;
    cudaDataType Atype;
    int lda;
    const void *B;
    cudaDataType Btype;
    int ldb;
    void *C;
    cudaDataType Ctype;
    int ldc;
    int a_rows, a_cols, b_rows, b_cols;
    const float *alpha, *beta;  // device pointer mode, else null
    float alpha_value, beta_value;
};

void run_gemm(void *context) {
    const Gemm &g = *static_cast<const Gemm *>(context);
    const int m = g.m, n = g.n, k = g.k;
    const float a_s = g.alpha ? *g.alpha : g.alpha_value, b_s = g.beta ? *g.beta : g.beta_value;
    // C as dense f32 [m, n]: beta == 0 never reads it (cuBLAS: C need not be a valid input).
    std::vector<float> c((size_t)m * (size_t)n, 0.0f);
    if (b_s != 0.0f) c = widen(g.C, g.Ctype, m, n, g.ldc);
    if (k > 0 && a_s != 0.0f) {
        const std::vector<float> a = widen(g.A, g.Atype, g.a_rows, g.a_cols, g.lda), b = widen(g.B, g.Btype, g.b_rows, g.b_cols, g.ldb);
        cblas_sgemm(CblasColMajor, g.transa == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                    g.transb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, a_s, a.data(), g.a_rows > 1 ? g.a_rows : 1,
                    b.data(), g.b_rows > 1 ? g.b_rows : 1, b_s, c.data(), m);
    } else if (b_s != 0.0f) {
        for (float &x : c) x *= b_s;
    }
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
            const float v = c[(size_t)j * m + i];
            const size_t at = (size_t)j * (size_t)g.ldc + (size_t)i;
            if (g.Ctype == CUDA_R_32F) {
                static_cast<float *>(g.C)[at] = v;
            } else {
                static_cast<__nv_bfloat16 *>(g.C)[at] = __float2bfloat16_rn(v);
            }
        }
    }
}

}  // namespace

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void *alpha, const void *A, cudaDataType Atype, int lda, const void *B,
                            cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    (void)algo;
    if (computeType != CUBLAS_COMPUTE_32F && computeType != CUBLAS_COMPUTE_32F_PEDANTIC) return CUBLAS_STATUS_NOT_SUPPORTED;
    // cublasGemmEx's table for CUBLAS_COMPUTE_32F (the types this stand-in knows).
    const bool types_ok = Atype == Btype && ((Atype == CUDA_R_32F && Ctype == CUDA_R_32F) ||
                                             (Atype == CUDA_R_16BF && (Ctype == CUDA_R_16BF || Ctype == CUDA_R_32F)));
    if (!types_ok) return CUBLAS_STATUS_NOT_SUPPORTED;
    if ((transa != CUBLAS_OP_N && transa != CUBLAS_OP_T) || (transb != CUBLAS_OP_N && transb != CUBLAS_OP_T))
        return CUBLAS_STATUS_INVALID_VALUE;
    const int a_rows = transa == CUBLAS_OP_N ? m : k, a_cols = transa == CUBLAS_OP_N ? k : m;
    const int b_rows = transb == CUBLAS_OP_N ? k : n, b_cols = transb == CUBLAS_OP_N ? n : k;
    if (m < 0 || n < 0 || k < 0 || lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
        ldc < (m > 1 ? m : 1) || !alpha || !beta)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    // Queued on the handle's stream like a GPU's kernel: the operands are read when the stream runs it. Host
    // pointer mode reads alpha and beta now (cuBLAS does, before returning); device pointer mode when it runs.
    Gemm *g = new Gemm{transa, transb, m, n, k, A, Atype, lda, B, Btype, ldb, C, Ctype, ldc, a_rows, a_cols, b_rows, b_cols,
                       nullptr, nullptr, 0.0f, 0.0f};
    if (handle->pointer_mode == CUBLAS_POINTER_MODE_HOST) {
        g->alpha_value = *static_cast<const float *>(alpha);
        g->beta_value = *static_cast<const float *>(beta);
    } else {
        g->alpha = static_cast<const float *>(alpha);
        g->beta = static_cast<const float *>(beta);
    }
    if (relora_emu_enqueue(handle->stream, run_gemm, [](void *p) { delete static_cast<Gemm *>(p); }, g) != cudaSuccess)
        return CUBLAS_STATUS_EXECUTION_FAILED;
    return CUBLAS_STATUS_SUCCESS;
}
