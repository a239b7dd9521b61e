// Library identity, error reporting, device memory and streams: thin wrappers over the CUDA runtime
// (or the emulation's stand-in), so the Swift side never links CUDA.
#include <stdarg.h>
#include <stdio.h>

#include "relora_cuda.cuh"

namespace relora {

namespace {
thread_local char t_message[1024] = "";

relora_status status_for(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return RELORA_OK;
    case cudaErrorMemoryAllocation: return RELORA_ERR_OUT_OF_MEMORY;
    case cudaErrorIllegalAddress: return RELORA_ERR_OUT_OF_BOUNDS;
    case cudaErrorNoDevice: return RELORA_ERR_NO_DEVICE;
    case cudaErrorInvalidValue: return RELORA_ERR_INVALID_ARGUMENT;
    default: return RELORA_ERR_CUDA;
    }
}
}  // namespace

relora_status fail(relora_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_message, sizeof t_message, fmt, ap);
    va_end(ap);
    return status;
}

relora_status check(cudaError_t error, const char *what) {
    if (error == cudaSuccess) return RELORA_OK;
    return fail(status_for(error), "%s: %s", what, cudaGetErrorString(error));
}

}  // namespace relora

using relora::check;
using relora::fail;

int relora_cuda_abi_version(void) { return RELORA_ABI_VERSION; }

int relora_cuda_device_count(int *count) {
    if (!count) return fail(RELORA_ERR_INVALID_ARGUMENT, "device_count: null result pointer");
    *count = 0;
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    // No driver or no device is an answer (zero devices), not a failure of the library.
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        fail(RELORA_OK, "no CUDA device: %s", cudaGetErrorString(e));
        return RELORA_OK;
    }
    *count = n;
    return RELORA_OK;
}

const char *relora_cuda_last_error(void) { return relora::t_message; }

relora_status relora_cuda_library_info(relora_library_info *info) {
    if (!info) return fail(RELORA_ERR_INVALID_ARGUMENT, "library_info: null result pointer");
    memset(info, 0, sizeof *info);
    info->abi_version = RELORA_ABI_VERSION;
#if defined(RELORA_EMU)
    info->emulated = 1;
    snprintf(info->build, sizeof info->build, "CPU emulation, g++ %d.%d (fibers)", __GNUC__, __GNUC_MINOR__);
#else
    info->emulated = 0;
    snprintf(info->build, sizeof info->build, "nvcc %d.%d, host g++ %d.%d, %s", __CUDACC_VER_MAJOR__,
             __CUDACC_VER_MINOR__, __GNUC__, __GNUC_MINOR__, RELORA_CUDA_ARCHS);
#endif
    info->info_size = (int32_t)sizeof(relora_library_info);
    info->block_q8_0_size = (int32_t)sizeof(block_q8_0);
    info->block_q4_0_size = (int32_t)sizeof(block_q4_0);
    info->block_nf4_size = (int32_t)sizeof(block_nf4);
    info->block_nf4_align = (int32_t)alignof(block_nf4);
    info->bf16_size = (int32_t)sizeof(__nv_bfloat16);
    info->device_properties_size = (int32_t)sizeof(relora_device_properties);
    info->norm_entry_size = (int32_t)sizeof(relora_norm_entry);
    info->adam_entry_size = (int32_t)sizeof(relora_adam_entry);
    return RELORA_OK;
}

// A rank's GPU for this process (its local rank, usually). The range is checked here so that the sentence
// says how many devices there are; CUDA would only say "invalid device ordinal".
relora_status relora_cuda_set_device(int32_t ordinal) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return fail(RELORA_ERR_NO_DEVICE, "set_device: no CUDA device: %s", cudaGetErrorString(e));
    }
    if (ordinal < 0 || ordinal >= count) {
#if defined(RELORA_EMU)
        const char *note = " (the emulation has one device, 0)";
#else
        const char *note = "";
#endif
        return fail(RELORA_ERR_INVALID_ARGUMENT, "set_device: there is no device %d: this machine has %d%s", (int)ordinal,
                    count, note);
    }
    return check(cudaSetDevice(ordinal), "cudaSetDevice");
}

// The calling thread's current device (set_device's, else device 0).
relora_status relora_cuda_device_properties(relora_device_properties *props) {
    RELORA_REQUIRE(props, "device_properties", "null result pointer");
    memset(props, 0, sizeof *props);
    int device = 0;
    RELORA_CHECK(check(cudaGetDevice(&device), "cudaGetDevice"));
    cudaDeviceProp prop;
    RELORA_CHECK(check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
    // Truncating copy (cudaDeviceProp.name is 256 bytes): always terminated.
    const size_t length = strnlen(prop.name, sizeof props->name - 1);
    memcpy(props->name, prop.name, length);
    props->total_memory = (int64_t)prop.totalGlobalMem;
    props->compute_major = prop.major;
    props->compute_minor = prop.minor;
    props->multiprocessors = prop.multiProcessorCount;
#if !defined(RELORA_EMU)
    int clock_khz = 0;
    if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device) == cudaSuccess) props->clock_khz = clock_khz;
    (void)cudaGetLastError();
#endif
    return RELORA_OK;
}

relora_status relora_cuda_malloc(void **ptr, int64_t bytes) {
    RELORA_REQUIRE(ptr, "malloc", "null result pointer");
    RELORA_REQUIRE(bytes >= 0, "malloc", "negative size %lld", (long long)bytes);
    *ptr = nullptr;
    if (bytes == 0) return RELORA_OK;
    const cudaError_t e = cudaMalloc(ptr, (size_t)bytes);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();  // not sticky: the caller may free and retry
        size_t free_bytes = 0, total = 0;
        cudaMemGetInfo(&free_bytes, &total);
        return fail(RELORA_ERR_OUT_OF_MEMORY, "cannot allocate %lld bytes of device memory (%zu of %zu bytes free)",
                    (long long)bytes, free_bytes, total);
    }
    return check(e, "cudaMalloc");
}

relora_status relora_cuda_free(void *ptr) { return check(cudaFree(ptr), "cudaFree"); }

relora_status relora_cuda_host_alloc(void **ptr, int64_t bytes) {
    RELORA_REQUIRE(ptr, "host_alloc", "null result pointer");
    RELORA_REQUIRE(bytes >= 0, "host_alloc", "negative size %lld", (long long)bytes);
    *ptr = nullptr;
    if (bytes == 0) return RELORA_OK;
    const cudaError_t e = cudaHostAlloc(ptr, (size_t)bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        return fail(RELORA_ERR_OUT_OF_MEMORY, "cannot allocate %lld bytes of pinned host memory", (long long)bytes);
    }
    return check(e, "cudaHostAlloc");
}

relora_status relora_cuda_host_free(void *ptr) { return check(cudaFreeHost(ptr), "cudaFreeHost"); }

relora_status relora_cuda_memcpy(void *dst, const void *src, int64_t bytes, int32_t kind, void *stream) {
    RELORA_REQUIRE(bytes >= 0, "memcpy", "negative size %lld", (long long)bytes);
    RELORA_REQUIRE(kind == RELORA_MEMCPY_HOST_TO_DEVICE || kind == RELORA_MEMCPY_DEVICE_TO_HOST ||
                       kind == RELORA_MEMCPY_DEVICE_TO_DEVICE || kind == RELORA_MEMCPY_DEFAULT,
                   "memcpy", "unknown direction %d", (int)kind);
    if (bytes == 0) return RELORA_OK;
    RELORA_REQUIRE(dst && src, "memcpy", "null pointer");
    return check(cudaMemcpyAsync(dst, src, (size_t)bytes, (cudaMemcpyKind)kind, relora::as_stream(stream)), "cudaMemcpyAsync");
}

relora_status relora_cuda_memset(void *ptr, int32_t value, int64_t bytes, void *stream) {
    RELORA_REQUIRE(bytes >= 0, "memset", "negative size %lld", (long long)bytes);
    if (bytes == 0) return RELORA_OK;
    RELORA_REQUIRE(ptr, "memset", "null pointer");
    return check(cudaMemsetAsync(ptr, value, (size_t)bytes, relora::as_stream(stream)), "cudaMemsetAsync");
}

relora_status relora_cuda_mem_get_info(int64_t *free_bytes, int64_t *total_bytes) {
    RELORA_REQUIRE(free_bytes && total_bytes, "mem_get_info", "null result pointer");
    size_t f = 0, t = 0;
    RELORA_CHECK(check(cudaMemGetInfo(&f, &t), "cudaMemGetInfo"));
    *free_bytes = (int64_t)f;
    *total_bytes = (int64_t)t;
    return RELORA_OK;
}

relora_status relora_cuda_stream_create(void **stream) {
    RELORA_REQUIRE(stream, "stream_create", "null result pointer");
    cudaStream_t s = nullptr;
    // Non-blocking: the backend computes on the legacy default stream, which would otherwise wait for this
    // stream's work (and it for the default stream's) at every launch, and nothing would overlap.
    RELORA_CHECK(check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"));
    *stream = static_cast<void *>(s);
    return RELORA_OK;
}

relora_status relora_cuda_stream_destroy(void *stream) {
    return check(cudaStreamDestroy(relora::as_stream(stream)), "cudaStreamDestroy");
}

relora_status relora_cuda_event_create(void **event) {
    RELORA_REQUIRE(event, "event_create", "null result pointer");
    cudaEvent_t e = nullptr;
    RELORA_CHECK(check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags"));
    *event = static_cast<void *>(e);
    return RELORA_OK;
}

relora_status relora_cuda_event_destroy(void *event) {
    RELORA_REQUIRE(event, "event_destroy", "null event");
    return check(cudaEventDestroy(static_cast<cudaEvent_t>(event)), "cudaEventDestroy");
}

relora_status relora_cuda_event_record(void *event, void *stream) {
    RELORA_REQUIRE(event, "event_record", "null event");
    return check(cudaEventRecord(static_cast<cudaEvent_t>(event), relora::as_stream(stream)), "cudaEventRecord");
}

namespace relora {
relora_status take_cross_entropy_failure();  // loss.cu: a target >= vocab since the last check
}

// Only the wait: the cross-entropy failure word is read at the next stream synchronize (reading it here would
// be a blocking copy, i.e. a wait for the whole device, not just up to the event).
relora_status relora_cuda_event_synchronize(void *event) {
    RELORA_REQUIRE(event, "event_synchronize", "null event");
    return check(cudaEventSynchronize(static_cast<cudaEvent_t>(event)), "cudaEventSynchronize");
}

relora_status relora_cuda_event_create_timing(void **event) {
    RELORA_REQUIRE(event, "event_create_timing", "null result pointer");
    cudaEvent_t e = nullptr;
    RELORA_CHECK(check(cudaEventCreateWithFlags(&e, cudaEventDefault), "cudaEventCreateWithFlags"));
    *event = static_cast<void *>(e);
    return RELORA_OK;
}

relora_status relora_cuda_event_elapsed(void *start, void *end, float *milliseconds) {
    RELORA_REQUIRE(start && end, "event_elapsed", "null event");
    RELORA_REQUIRE(milliseconds, "event_elapsed", "null result pointer");
    RELORA_CHECK(check(cudaEventSynchronize(static_cast<cudaEvent_t>(end)), "cudaEventSynchronize"));
    const cudaError_t e = cudaEventElapsedTime(milliseconds, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end));
    if (e != cudaSuccess) (void)cudaGetLastError();  // not sticky: the next launch must not report it
    return check(e, "cudaEventElapsedTime");
}

relora_status relora_cuda_stream_wait_event(void *stream, void *event) {
    RELORA_REQUIRE(event, "stream_wait_event", "null event");
    return check(cudaStreamWaitEvent(relora::as_stream(stream), static_cast<cudaEvent_t>(event), 0), "cudaStreamWaitEvent");
}

// Kernel failures recorded in device words (not CUDA errors) surface here, after the stream is idle.
relora_status relora_cuda_stream_synchronize(void *stream) {
    RELORA_CHECK(check(cudaStreamSynchronize(relora::as_stream(stream)), "cudaStreamSynchronize"));
    return relora::take_cross_entropy_failure();
}
