// A cuBLAS stand-in for the CPU emulation: the subset of cuBLAS that Kernels/src/gemm.cu calls, with
// cuBLAS' names, enum values and signatures, implemented over OpenBLAS' cblas_sgemm (cublas_emu.cpp).
//
// What it models: column-major GEMM semantics (op(A) op(B), leading dimensions, alpha/beta from host or
// device pointers per the handle's pointer mode, beta == 0 never reading C), the type combinations that
// cublasGemmEx accepts for CUBLAS_COMPUTE_32F (A/B/C f32; A/B bf16 with C bf16 or f32; anything else is
// CUBLAS_STATUS_NOT_SUPPORTED), and the argument checks (CUBLAS_STATUS_INVALID_VALUE for negative sizes and
// leading dimensions below the rows of a stored matrix). bf16 operands are widened to f32 copies (exact),
// the product is OpenBLAS' sgemm in f32, and a bf16 C is rounded once at the end (round to nearest even).
// What it does not model: tensor cores and cuBLAS' own algorithms (accumulation order, split-K, TF32/bf16
// MMA numerics) and workspaces. Each GEMM is queued on the handle's stream like a kernel (cuda_emu.h's
// stream model: it runs when the stream is drained; alpha and beta are read at the call in host pointer mode,
// when it runs in device pointer mode).
#ifndef RELORA_CUBLAS_EMU_H
#define RELORA_CUBLAS_EMU_H

#include "cuda_emu.h"

typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16
} cublasStatus_t;

typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 } cublasPointerMode_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TENSOR_OP_MATH = 1, CUBLAS_PEDANTIC_MATH = 2,
               CUBLAS_TF32_TENSOR_OP_MATH = 3, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16 } cublasMath_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_PEDANTIC = 69 } cublasComputeType_t;
typedef enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 } cudaDataType;

typedef struct relora_emu_cublas *cublasHandle_t;

RELORA_EMU_API cublasStatus_t cublasCreate(cublasHandle_t *handle);
RELORA_EMU_API cublasStatus_t cublasDestroy(cublasHandle_t handle);
RELORA_EMU_API cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);
// Checked (a 256-byte aligned device allocation of at least `bytes`, or null with 0 bytes) and otherwise unused.
RELORA_EMU_API cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void *workspace, size_t bytes);
RELORA_EMU_API cublasStatus_t cublasSetPointerMode(cublasHandle_t handle, cublasPointerMode_t mode);
RELORA_EMU_API cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);
RELORA_EMU_API const char *cublasGetStatusString(cublasStatus_t status);
RELORA_EMU_API cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                           int m, int n, int k, const void *alpha, const void *A, cudaDataType Atype,
                                           int lda, const void *B, cudaDataType Btype, int ldb, const void *beta,
                                           void *C, cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                                           cublasGemmAlgo_t algo);

#endif  // RELORA_CUBLAS_EMU_H
