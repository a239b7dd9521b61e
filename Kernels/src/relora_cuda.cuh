// Shared by every kernel source: the CUDA headers (nvcc) or the CPU emulation (a host compiler), the
// ABI and the shared C headers, storage conversions, block reductions and status helpers.
//
// Numerics: storage is f32 or bf16; every kernel loads to f32, computes in f32 (double where a sum
// spans a whole tensor) and rounds once when it stores (bf16: round to nearest even).
#ifndef RELORA_CUDA_CUH
#define RELORA_CUDA_CUH

#define RELORA_CUDA_LIBRARY 1  // relora_abi.h: declare the entry points this library defines

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define RELORA_LAUNCH(kernel, grid, block, shmem, stream) kernel<<<(grid), (block), (shmem), (stream)>>>
#define RELORA_DYNAMIC_SHARED(T, name)                          \
    extern __shared__ __align__(16) unsigned char relora_smem_[]; \
    T *name = reinterpret_cast<T *>(relora_smem_)
#else
#include "cuda_emu.h"
#endif

// `#pragma unroll n` for nvcc; nothing for the host compiler (which warns on the unknown pragma).
#if defined(__CUDACC__)
#define RELORA_PRAGMA_(text) _Pragma(#text)
#define RELORA_UNROLL_BY(n) RELORA_PRAGMA_(unroll n)
#else
#define RELORA_UNROLL_BY(n)
#endif

#include <stdint.h>

#include "relora_abi.h"
#include "relora_quant.h"
#include "relora_rng.h"

namespace relora {

// ---- Status (runtime.cu) -----------------------------------------------------------------------
// Records a one-sentence message for relora_cuda_last_error and returns `status`.
relora_status fail(relora_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// RELORA_OK for cudaSuccess; otherwise the matching relora_status with "what: CUDA's message".
relora_status check(cudaError_t error, const char *what);
// After a launch: launch errors (bad configuration) and sticky errors of earlier kernels.
inline relora_status check_launch(const char *kernel) { return check(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(void *stream) { return static_cast<cudaStream_t>(stream); }

// ---- Launch shapes ----------------------------------------------------------------------------------
// Grid-stride loops everywhere, so any grid covers any size. The emulation caps grids much lower than a
// GPU would: each emulated thread costs two context switches, and a small cap makes every test walk
// the stride loops several times.
#if defined(RELORA_EMU)
constexpr int64_t kMaxGrid = 8;
constexpr int64_t kMaxGridY = 8;
#else
constexpr int64_t kMaxGrid = 1 << 16;
constexpr int64_t kMaxGridY = 65535;  // gridDim.y's hardware limit
#endif

inline unsigned int grid_for(int64_t items, int64_t per_block, int64_t cap = kMaxGrid) {
    int64_t g = (items + per_block - 1) / per_block;
    if (g > cap) g = cap;
    return (unsigned int)(g < 1 ? 1 : g);
}

// ---- Multi-tensor tables (relora_norm_entry, relora_adam_entry) ---------------------------------------------
// The entry of work unit `unit`: the last entry whose first_unit <= unit (an entry with no units shares its
// first_unit with the next, which is the one that owns the unit). Binary search; every thread of a block
// searches the same unit, so the loads are uniform.
template <typename Entry>
__device__ __forceinline__ int64_t find_entry(const Entry *entries, int64_t count, int64_t unit) {
    int64_t lo = 0, hi = count;  // entries[lo].first_unit <= unit < entries[hi].first_unit (entries[count]: +inf)
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) >> 1;
        if (entries[mid].first_unit <= unit) lo = mid; else hi = mid;
    }
    return lo;
}

// ---- Storage conversions --------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- 16-byte stores ---------------------------------------------------------------------------------
// Four 32-bit words stored with one 16-byte instruction (st.global.v4). The address must be 16-byte aligned:
// a GPU faults otherwise, and the emulation reports it as a kernel error (it would not notice on its own).
#if defined(__CUDACC__)
typedef uint4 Vec16;
#else
struct alignas(16) Vec16 {
    uint32_t x, y, z, w;
};
#endif

__device__ __forceinline__ void store_vec16(void *dst, const Vec16 &v) {
#if defined(RELORA_EMU)
    if (reinterpret_cast<uintptr_t>(dst) & 15u) {
        relora_emu::relora_emu_kernel_error("a 16-byte store to an address that is not 16-byte aligned",
                                            relora_emu::lane_id(), (int)(reinterpret_cast<uintptr_t>(dst) & 15u));
    }
#endif
    *static_cast<Vec16 *>(dst) = v;
}

// ---- Reductions -------------------------------------------------------------------------------------
// Butterfly sum / max over the 32 lanes of a full warp: every lane ends with the same result, combined in
// a fixed order (fp addition and fmaxf are commutative, so lane i and lane i^o compute the same pair).
struct SumOp {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) { return warp_reduce(v, SumOp{}); }

// Reduction over a block whose blockDim.x is a multiple of 32 (blockDim.y = blockDim.z = 1); every thread
// gets the result. Warps reduce by shuffles, warp results meet in shared memory, warp 0's tree finishes:
// the same tree for the same block size, so results are deterministic. `identity` fills the missing warps.
// Safe to call repeatedly: the first barrier keeps a previous call's readers ahead of this call's writers.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity) {
    __shared__ T warp_results[32];
    const int lane = (int)(threadIdx.x & 31u), warp = (int)(threadIdx.x >> 5);
    const int warps = (int)(blockDim.x >> 5);
    v = warp_reduce(v, op);
    __syncthreads();  // readers of a previous call are done with warp_results
    if (lane == 0) warp_results[warp] = v;
    __syncthreads();
    v = lane < warps ? warp_results[lane] : identity;
    return warp_reduce(v, op);
}

template <typename T>
__device__ T block_sum(T v) { return block_reduce(v, SumOp{}, T(0)); }

// Max over the block (fmaxf: NaN inputs are skipped unless every input is NaN).
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, MaxOp{}, -INFINITY); }

}  // namespace relora

// Each file's entry points go through these: argument checks that name the op.
#define RELORA_REQUIRE(cond, op, ...) \
    do {                              \
        if (!(cond)) return ::relora::fail(RELORA_ERR_INVALID_ARGUMENT, op ": " __VA_ARGS__); \
    } while (0)

#define RELORA_CHECK(expr)                          \
    do {                                            \
        const relora_status relora_s_ = (expr);     \
        if (relora_s_ != RELORA_OK) return relora_s_; \
    } while (0)

#endif  // RELORA_CUDA_CUH
