// CUDA's execution model on the CPU, for compiling the kernel sources with a host C++ compiler.
//
// Kernels/src/*.cu include this header (through relora_cuda.cuh) when __CUDACC__ is not defined and
// are compiled by g++ into libreloracuda-emu.so, with the same extern "C" ABI as the CUDA build. What it
// provides, and how:
//
// - Launches. RELORA_LAUNCH(kernel, grid, block, shmem, stream)(args...) expands to kernel<<<...>>>
//   under nvcc and to relora_emu::make_launch(...)(args...) here: the arguments are converted to the
//   kernel's parameter types once (as a launch copies them), then the grid runs to completion before
//   the call returns, block after block (x fastest, then y, then z), on the calling host thread.
//   Launches from several host threads are serialized by one lock (one emulated device).
// - Threads. Each thread of a block is a fiber (x86-64: a hand-written stack switch; elsewhere ucontext) with its own small
//   stack (64 KiB, RELORA_EMU_STACK_KB; a guard page below it turns an overflow into SIGSEGV). A
//   scheduler runs the block's fibers in turn (in one of four orders, relora_emu_set_schedule); a fiber
//   runs until it finishes or waits at a barrier, so fibers never preempt each other and plain
//   read-modify-writes are atomic.
// - __syncthreads() is a real barrier across the block's fibers: a fiber that reaches it waits until
//   every thread of the block has. A thread that exits while others wait (a barrier in divergent code)
//   is reported as an error, not a hang.
// - Warp collectives (__shfl_sync, __shfl_up/down/xor_sync, __ballot_sync, __any/__all_sync,
//   __syncwarp; warp size 32, lanes = linear thread index mod 32): a barrier across the lanes named in
//   the mask, with a per-warp exchange buffer (double-buffered by the barrier's generation). Reading a
//   lane that is not in the mask or does not exist, or lanes that disagree on the mask, is an error.
// - Warp-level matrix operations (relora_emu_mma_m16n8k16_bf16, relora_emu_ldmatrix): collectives of the whole
//   warp with the PTX ISA's fragment layouts; cp.async copies are deferred until the wait that retires them.
//   src/relora_mma.cuh puts the same names on these and on the PTX instructions, for the kernel sources.
// - __shared__ is `static`: one instance per kernel, which every fiber of the running block sees and
//   the next block reuses (blocks never run concurrently). Dynamic shared memory
//   (RELORA_DYNAMIC_SHARED) is a per-launch buffer refilled with 0xFF (a NaN) before each block.
// - __nv_bfloat16 and __half with CUDA's conversions: float -> 16 bits rounds to nearest even,
//   overflow goes to inf, NaN becomes the canonical 0x7FFF (as cuda_bf16.hpp / cuda_fp16.hpp do; relora's
//   FloatBits keeps a NaN's payload instead, the only difference); 16 bits -> float is exact.
// - The _rn intrinsics are plain IEEE float operations: build with -ffp-contract=off so that no
//   product is fused with an addition (relora_quant.h requires it too).
// - The runtime (cuda_emu.cpp): device memory is host memory between canary bytes (256 before, and from
//   the requested end to a 256-byte boundary plus 256 after), filled with 0xFF at allocation; canaries
//   are checked after every launch, at cudaFree and at synchronization, and an overwritten canary is
//   cudaErrorIllegalAddress (sticky, with the kernel and allocation named). cudaMemGetInfo reports a
//   configurable total (RELORA_EMU_DEVICE_MEMORY, default 24 GiB) less what is allocated, and cudaMalloc
//   fails past it.
// - Streams and events are ordering constraints, not no-ops. In the deferred orders (the default) every
//   stream keeps a queue of the work enqueued on it (launches, async copies and memsets, cuBLAS calls) and
//   runs it, in order, only when something forces it: a synchronize of the stream, of an event recorded on
//   it or of the device, a copy to pageable host memory, cudaFree, an NCCL call on the stream, or a
//   cudaStreamWaitEvent / legacy-default-stream dependency of work being run. So work on stream B that
//   reads what stream A wrote, without an event between them, runs before A's work and sees stale data
//   (or A's later write lands before B's earlier read): a missing event is a wrong result, which the tests
//   see. RELORA_EMU_STREAM_ORDER (or relora_emu_set_stream_order) picks the order: `deferred` (default:
//   a device-wide synchronize runs the streams in creation order), `reverse` (the newest stream first, the
//   legacy default stream last) or `eager` (every stream's work runs at the call: what a missing event
//   cannot be caught under). Errors a kernel causes surface when its stream runs, as on a GPU: at the next
//   synchronization, not at the launch (configuration errors are still reported at the launch). A timing
//   event (not cudaEventDisableTiming) stamps the host clock when its stream runs up to its record, so
//   cudaEventElapsedTime gives the host time of the work run between two records.
//
// What it cannot catch is listed in Kernels/README.md.
#ifndef RELORA_CUDA_EMU_H
#define RELORA_CUDA_EMU_H

#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers; nvcc uses the CUDA headers"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#define RELORA_EMU 1
#define RELORA_EMU_API extern "C" __attribute__((visibility("default")))

// ---- Qualifiers ------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
// __restrict__ is understood by g++ and clang as it is.

// ---- Vector types and built-in variables -----------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace relora_emu {
// The running fiber's coordinates; the scheduler rewrites them at every switch.
RELORA_EMU_API uint3 relora_emu_thread_idx;
RELORA_EMU_API uint3 relora_emu_block_idx;
RELORA_EMU_API dim3 relora_emu_block_dim;
RELORA_EMU_API dim3 relora_emu_grid_dim;
RELORA_EMU_API unsigned int relora_emu_linear_tid;  // x + y * bx + z * bx * by
}  // namespace relora_emu

#define threadIdx (::relora_emu::relora_emu_thread_idx)
#define blockIdx (::relora_emu::relora_emu_block_idx)
#define blockDim (::relora_emu::relora_emu_block_dim)
#define gridDim (::relora_emu::relora_emu_grid_dim)
constexpr int warpSize = 32;

// ---- Runtime API subset ------------------------------------------------------------------------------
typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNoDevice = 100,
    cudaErrorNotReady = 600,  // cudaEventElapsedTime of an event whose work has not run
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchFailure = 719,
} cudaError_t;

typedef enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
} cudaMemcpyKind;

typedef struct relora_emu_stream *cudaStream_t;
typedef struct relora_emu_event *cudaEvent_t;

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    int warpSize;
    int maxThreadsPerBlock;
    int multiProcessorCount;
    int major;
    int minor;
};

RELORA_EMU_API cudaError_t cudaMalloc(void **ptr, size_t bytes);
RELORA_EMU_API cudaError_t cudaFree(void *ptr);
#define cudaHostAllocPortable 0x01
#define cudaHostAllocMapped 0x02
RELORA_EMU_API cudaError_t cudaHostAlloc(void **ptr, size_t bytes, unsigned int flags);
RELORA_EMU_API cudaError_t cudaFreeHost(void *ptr);
RELORA_EMU_API cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind);
RELORA_EMU_API cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                                           cudaStream_t stream);
RELORA_EMU_API cudaError_t cudaMemset(void *ptr, int value, size_t bytes);
RELORA_EMU_API cudaError_t cudaMemsetAsync(void *ptr, int value, size_t bytes, cudaStream_t stream);
RELORA_EMU_API cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes);
RELORA_EMU_API cudaError_t cudaGetDeviceCount(int *count);
RELORA_EMU_API cudaError_t cudaSetDevice(int device);
RELORA_EMU_API cudaError_t cudaGetDevice(int *device);
RELORA_EMU_API cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device);
RELORA_EMU_API cudaError_t cudaDeviceSynchronize(void);
RELORA_EMU_API cudaError_t cudaDeviceReset(void);
RELORA_EMU_API cudaError_t cudaStreamCreate(cudaStream_t *stream);
// cudaStreamDefault: a blocking stream (its work waits for the legacy default stream's earlier work, and the
// default stream's work for its earlier work); cudaStreamNonBlocking: no implicit ordering with the default
// stream.
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
RELORA_EMU_API cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags);
RELORA_EMU_API cudaError_t cudaStreamDestroy(cudaStream_t stream);
RELORA_EMU_API cudaError_t cudaStreamSynchronize(cudaStream_t stream);
// Runs the stream's queued work (the emulated device makes progress when asked) and returns cudaSuccess or the
// sticky error, as cudaStreamSynchronize: a polling loop always ends.
RELORA_EMU_API cudaError_t cudaStreamQuery(cudaStream_t stream);
RELORA_EMU_API cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags);
RELORA_EMU_API cudaError_t cudaEventCreate(cudaEvent_t *event);
#define cudaEventDefault 0x00
#define cudaEventDisableTiming 0x02
RELORA_EMU_API cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags);
RELORA_EMU_API cudaError_t cudaEventDestroy(cudaEvent_t event);
RELORA_EMU_API cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
RELORA_EMU_API cudaError_t cudaEventSynchronize(cudaEvent_t event);
RELORA_EMU_API cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
RELORA_EMU_API cudaError_t cudaGetLastError(void);
RELORA_EMU_API cudaError_t cudaPeekAtLastError(void);
// For the code of the last error, the emulation's detailed message (which kernel, which allocation);
// otherwise the generic text of the code.
RELORA_EMU_API const char *cudaGetErrorString(cudaError_t error);

// Function attributes: only the dynamic shared memory opt-in (CUDA's enum value). A launch may use up to
// 48 KiB without it, and up to 99 KiB (the opt-in limit of sm_86 and sm_89, the smallest of the architectures
// the library is built for) with it; cudaErrorInvalidValue above that.
typedef enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
} cudaFuncAttribute;

// ---- Emulation controls (tests and debugging; not part of CUDA) --------------------------------------
// Total device memory reported and enforced (bytes).
RELORA_EMU_API void relora_emu_set_device_memory(size_t bytes);
// How the scheduler picks the next fiber of a block. Round robin runs every runnable fiber once per pass
// (thread 0 first, or the last thread first); greedy always resumes the lowest (highest) runnable thread,
// so one warp runs as far ahead of the others as the barriers allow. Each order satisfies some missing
// barriers by luck and exposes others: the tests run the kernels under all four. This control and the next act
// on launches made after them (work already queued runs first, under the previous setting).
#define RELORA_EMU_ROUND_ROBIN 0
#define RELORA_EMU_ROUND_ROBIN_REVERSE 1
#define RELORA_EMU_GREEDY 2
#define RELORA_EMU_GREEDY_REVERSE 3
RELORA_EMU_API void relora_emu_set_schedule(int schedule);
// 0 turns __syncthreads() into a no-op: only for the self-test that proves the barrier is real.
RELORA_EMU_API void relora_emu_set_barriers_enabled(int enabled);
// Whether [p, p + bytes) lies inside one live allocation (cudaMalloc or cudaHostAlloc): 0 yes, 1 it starts
// inside one and runs past its end, 2 p is not inside any. Records no error (the NCCL stand-in's check).
RELORA_EMU_API int relora_emu_device_range(const void *p, size_t bytes);
// Launches since load of the kernels whose name (the text RELORA_LAUNCH was given) contains `substring`.
RELORA_EMU_API uint64_t relora_emu_launches_named(const char *substring);
// The order in which streams' work runs (cuda_emu.h's header comment): RELORA_EMU_STREAM_ORDER=eager|deferred|
// reverse at load (deferred if unset; anything else is reported on stderr and taken as deferred). Setting it
// first runs every stream's queued work.
#define RELORA_EMU_STREAMS_EAGER 0
#define RELORA_EMU_STREAMS_DEFERRED 1
#define RELORA_EMU_STREAMS_REVERSE 2
RELORA_EMU_API void relora_emu_set_stream_order(int order);
RELORA_EMU_API int relora_emu_stream_order(void);
// Queued work items not yet run, on every stream (0 in the eager order).
RELORA_EMU_API uint64_t relora_emu_pending_work(void);
// For the library's other stand-ins (cuBLAS, NCCL): run(context) in `stream`'s order (at the call in the eager
// order, else when the stream is drained), then destroy(context) (also when it never runs: a sticky error, a
// device reset); cudaErrorInvalidResourceHandle for an unknown stream (nothing runs, destroy is called).
RELORA_EMU_API cudaError_t relora_emu_enqueue(cudaStream_t stream, void (*run)(void *), void (*destroy)(void *),
                                              void *context);
// Runs everything queued on `stream` so far (and what it waits for): an NCCL call's data is read and written
// at the call, in the stream's order.
RELORA_EMU_API cudaError_t relora_emu_stream_drain(cudaStream_t stream);
// Counters since load: launches, blocks, fibers started, context switches.
RELORA_EMU_API void relora_emu_counters(uint64_t *launches, uint64_t *blocks, uint64_t *fibers,
                                        uint64_t *switches);

// Counters since load: calls that make the host wait for the device (cudaDeviceSynchronize,
// cudaStreamSynchronize, cudaEventSynchronize, the blocking cudaMemcpy) and successful cudaMalloc calls
// (not cudaHostAlloc). CUDALibrary.emulationCounters reads them (with relora_emu_counters' launches) for the
// tests that bound a training step's launches, synchronizations and allocations.
RELORA_EMU_API void relora_emu_host_counters(uint64_t *synchronizations, uint64_t *mallocs);
// Counters since load: memsets (cudaMemsetAsync of at least one byte) and copies (cudaMemcpyAsync and the
// blocking cudaMemcpy of at least one byte): device work that is not a kernel launch. The step-budget tests
// count zeroing and transfers with them.
RELORA_EMU_API void relora_emu_command_counters(uint64_t *memsets, uint64_t *copies);

// ---- Launch -------------------------------------------------------------------------------------------
namespace relora_emu {
typedef void (*BlockBody)(void *closure);
// Enqueues the grid on `stream`: `body(closure)` runs as every thread of every block when the stream runs
// it, then `destroy(closure)` (called in any case, also when the launch is refused). Configuration errors go
// to cudaGetLastError at the call; errors of the run are sticky (seen at the next synchronization). `func`
// identifies the kernel (its dynamic shared memory opt-in, cudaFuncSetAttribute).
RELORA_EMU_API void relora_emu_launch(const char *name, const void *func, dim3 grid, dim3 block, size_t shmem,
                                      cudaStream_t stream, BlockBody body, void *closure, void (*destroy)(void *));
// The running block's dynamic shared memory.
RELORA_EMU_API void *relora_emu_dynamic_shared(void);

template <typename... Params>
struct Launch {
    void (*kernel)(Params...);
    dim3 grid, block;
    size_t shmem;
    cudaStream_t stream;
    const char *name;

    template <typename... Args>
    void operator()(Args &&...args) const {
        static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
        // Converted once to the parameter types, like a launch's argument copy (kept until the stream runs
        // the grid); every thread then receives its own copy by value.
        struct Closure {
            void (*kernel)(Params...);
            std::tuple<std::decay_t<Params>...> values;
        };
        Closure *closure = new Closure{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
        relora_emu_launch(name, reinterpret_cast<const void *>(kernel), grid, block, shmem, stream,
                          [](void *c) {
                              Closure *self = static_cast<Closure *>(c);
                              std::apply(self->kernel, self->values);
                          },
                          closure, [](void *c) { delete static_cast<Closure *>(c); });
    }
};

template <typename... Params>
Launch<Params...> make_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shmem,
                              cudaStream_t stream, const char *name) {
    return Launch<Params...>{kernel, grid, block, shmem, stream, name};
}

// ---- Barriers and warp collectives (implemented in cuda_emu.cpp) ----
RELORA_EMU_API void relora_emu_syncthreads(void);
// Arrives at the warp barrier of the lanes in `mask` after publishing `value`; returns the warp's 32
// published values of this collective (valid until the lane's next collective).
RELORA_EMU_API const uint64_t *relora_emu_warp_collective(unsigned int mask, uint64_t value);
// The lanes of the running fiber's warp that exist (a block whose size is not a multiple of 32 ends
// with a partial warp).
RELORA_EMU_API unsigned int relora_emu_warp_lanes(void);
// Like relora_emu_warp_collective, for up to 32 bytes a lane: returns the warp's table of 32 slots of 32
// bytes (lane l's data at l * 32), valid until the lane's next collective.
RELORA_EMU_API const unsigned char *relora_emu_warp_exchange(unsigned int mask, const void *data, size_t bytes);
// Warp-level matrix operations (cuda_emu.cpp documents the fragment layouts and the accumulation order):
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (d = a b + c; d may alias c) and
// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 into r[0 .. matrices). Both are collectives of the
// whole warp (every lane, full mask), as the .sync.aligned instructions are.
RELORA_EMU_API void relora_emu_mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);
RELORA_EMU_API void relora_emu_ldmatrix(uint32_t *r, int matrices, int trans, const void *row_address);
// cp.async.{ca,cg}.shared.global of `bytes` (4, 8, 16; both addresses aligned to it; the destination inside the
// block's dynamic shared memory), of which the first `src_bytes` are read and the rest zero-filled;
// cp.async.commit_group; cp.async.wait_group `pending`. A copy lands only when its thread's wait retires its
// group (the latest moment PTX allows), and a thread that exits with copies not waited for fails the launch.
RELORA_EMU_API void relora_emu_cp_async(void *dst, const void *src, unsigned int bytes, unsigned int src_bytes);
RELORA_EMU_API void relora_emu_cp_async_commit(void);
RELORA_EMU_API void relora_emu_cp_async_wait(int pending);
RELORA_EMU_API void relora_emu_func_set_max_dynamic_shared(const void *func, int bytes, int *ok);
// Reports a kernel-side error (bad shuffle width, lane not in mask) and aborts the launch.
RELORA_EMU_API void relora_emu_kernel_error(const char *what, int lane, int other) __attribute__((noreturn));

inline int lane_id() { return (int)(relora_emu_linear_tid & 31u); }

template <typename T>
inline T shuffle_from(unsigned int mask, T value, int src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move 4- or 8-byte values");
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof(T));
    const uint64_t *slots = relora_emu_warp_collective(mask, bits);
    if (!(((mask & relora_emu_warp_lanes()) >> src) & 1u))
        relora_emu_kernel_error("a shuffle reads a lane that is outside its mask or does not exist", lane_id(), src);
    T out;
    memcpy(&out, &slots[src], sizeof(T));
    return out;
}

inline void check_width(int width) {
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
        relora_emu_kernel_error("a shuffle width must be a power of 2 in [1, 32]", lane_id(), width);
}
}  // namespace relora_emu

template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
    int ok = 0;
    ::relora_emu::relora_emu_func_set_max_dynamic_shared(reinterpret_cast<const void *>(kernel), value, &ok);
    return ok ? cudaSuccess : cudaErrorInvalidValue;
}

#define RELORA_LAUNCH(kernel, grid, block, shmem, stream) \
    ::relora_emu::make_launch(kernel, grid, block, shmem, stream, #kernel)
#define RELORA_DYNAMIC_SHARED(T, name) T *name = static_cast<T *>(::relora_emu::relora_emu_dynamic_shared())

inline void __syncthreads() { ::relora_emu::relora_emu_syncthreads(); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { (void)::relora_emu::relora_emu_warp_collective(mask, 0); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __shfl_sync(unsigned int mask, T var, int srcLane, int width = warpSize) {
    ::relora_emu::check_width(width);
    const int lane = ::relora_emu::lane_id();
    return ::relora_emu::shuffle_from(mask, var, (lane & ~(width - 1)) + (srcLane & (width - 1)));
}

template <typename T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
    ::relora_emu::check_width(width);
    const int lane = ::relora_emu::lane_id();
    const int src = lane - (int)delta;
    return ::relora_emu::shuffle_from(mask, var, src < (lane & ~(width - 1)) ? lane : src);
}

template <typename T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
    ::relora_emu::check_width(width);
    const int lane = ::relora_emu::lane_id();
    const int src = lane + (int)delta;
    return ::relora_emu::shuffle_from(mask, var, src >= (lane & ~(width - 1)) + width ? lane : src);
}

// A source in a later width-group returns the caller's own value (CUDA's documented behaviour).
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T var, int laneMask, int width = warpSize) {
    ::relora_emu::check_width(width);
    const int lane = ::relora_emu::lane_id();
    const int src = lane ^ laneMask;
    return ::relora_emu::shuffle_from(mask, var, src >= (lane & ~(width - 1)) + width ? lane : src);
}

// Lanes of the mask that do not exist vote 0 (the ballot holds only lanes that voted).
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    const uint64_t *slots = ::relora_emu::relora_emu_warp_collective(mask, predicate ? 1u : 0u);
    const unsigned int voters = mask & ::relora_emu::relora_emu_warp_lanes();
    unsigned int out = 0;
    for (int l = 0; l < 32; ++l) {
        if (((voters >> l) & 1u) && slots[l]) out |= 1u << l;
    }
    return out;
}
inline int __any_sync(unsigned int mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned int mask, int predicate) { return __ballot_sync(mask, !predicate) == 0; }

// ---- Atomics: fibers never preempt, so plain read-modify-writes are atomic ----------------------------
template <typename T>
inline T atomicAdd(T *address, T value) {
    T old = *address;
    *address = old + value;
    return old;
}
template <typename T>
inline T atomicMin(T *address, T value) {
    T old = *address;
    if (value < old) *address = value;
    return old;
}
template <typename T>
inline T atomicMax(T *address, T value) {
    T old = *address;
    if (value > old) *address = value;
    return old;
}
template <typename T>
inline T atomicExch(T *address, T value) {
    T old = *address;
    *address = value;
    return old;
}
template <typename T>
inline T atomicCAS(T *address, T compare, T value) {
    T old = *address;
    if (old == compare) *address = value;
    return old;
}

// ---- Float intrinsics (IEEE single operations; see -ffp-contract=off above) --------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return sqrt(a); }
inline float __double2float_rn(double a) { return (float)a; }
inline float __ll2float_rn(long long a) { return (float)a; }
inline float __ull2float_rn(unsigned long long a) { return (float)a; }
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
inline int __float_as_int(float f) { return (int)__float_as_uint(f); }
inline float __int_as_float(int i) { return __uint_as_float((unsigned int)i); }
template <typename T>
inline T __ldg(const T *p) { return *p; }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// ---- 16-bit floats ---------------------------------------------------------------------------------
// Storage only, as with __CUDA_NO_BFLOAT16_CONVERSIONS__ / __CUDA_NO_HALF_CONVERSIONS__ (which the CUDA
// build defines): converting needs the explicit intrinsics below, on both compilers.
struct __nv_bfloat16 {
    unsigned short __x;
};
struct __half {
    unsigned short __x;
};
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivial<__nv_bfloat16>::value, "bf16 is 2 plain bytes");
static_assert(sizeof(__half) == 2 && std::is_trivial<__half>::value, "half is 2 plain bytes");

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned int)h.__x << 16); }

// Round to nearest, ties to even; inf stays inf and overflow rounds to inf; NaN -> 0x7FFF.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const unsigned int bits = __float_as_uint(f);
    __nv_bfloat16 out;
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
        out.__x = 0x7FFFu;
    } else {
        out.__x = (unsigned short)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }
    return out;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 h;
    h.__x = u;
    return h;
}

inline float __half2float(__half h) {
    // Exact: the same bit manipulation as relora_fp16_to_fp32.
    const unsigned int sign = (unsigned int)(h.__x & 0x8000u) << 16;
    const unsigned int exponent = (h.__x >> 10) & 0x1Fu;
    const unsigned int mantissa = h.__x & 0x03FFu;
    if (exponent == 0) {
        const float magnitude = (float)mantissa * 0x1p-24f;
        return __uint_as_float(__float_as_uint(magnitude) | sign);
    }
    if (exponent == 0x1F) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest, ties to even, subnormals included; NaN -> 0x7FFF (cuda_fp16.hpp's host path).
inline __half __float2half_rn(float f) {
    const unsigned int bits = __float_as_uint(f);
    const unsigned short sign = (unsigned short)((bits >> 16) & 0x8000u);
    const unsigned int mag = bits & 0x7FFFFFFFu;
    __half out;
    if (mag > 0x7F800000u) {
        out.__x = 0x7FFFu;
    } else if (mag >= 0x477FF000u) {
        out.__x = (unsigned short)(sign | 0x7C00u);
    } else if (mag >= 0x38800000u) {
        const unsigned int v = mag - 0x38000000u;
        out.__x = (unsigned short)(sign | ((v + 0x0FFFu + ((v >> 13) & 1u)) >> 13));
    } else if (mag < 0x33000000u) {
        out.__x = sign;
    } else {
        const unsigned int e = mag >> 23;
        const unsigned int m = (mag & 0x007FFFFFu) | 0x00800000u;
        const unsigned int shift = 126u - e;
        const unsigned int q = m >> shift;
        const unsigned int rem = m & ((1u << shift) - 1u);
        const unsigned int half = 1u << (shift - 1u);
        out.__x = (unsigned short)(sign | (q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u)));
    }
    return out;
}
inline __half __float2half(float f) { return __float2half_rn(f); }

#endif  // RELORA_CUDA_EMU_H
