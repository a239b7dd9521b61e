// Collectives for data-parallel training over NCCL: all-gather, all-to-all, broadcast, and the waits,
// timeouts and aborts around them (relora_abi.h's nccl_* entries).
//
// NCCL is not linked. The CUDA build includes nccl.h (the pinned nvidia-nccl-cu13 wheel's, for the types
// and prototypes only) and opens the library with dlopen on first use: $RELORA_NCCL_LIB if set, else
// libnccl.so.2 from the loader's search path. Its functions go into a table typed by decltype of nccl.h's
// prototypes, so a signature cannot drift from the header. Without NCCL, libreloracuda.so still loads and
// every other entry works; these return RELORA_ERR_UNAVAILABLE with one sentence. The emulation compiles
// this same file against emu/nccl_emu.h (NCCL's API over TCP sockets) and fills the table from it, so the
// tests run this code: the table, the non-blocking polling, the timeout and the aborts.
//
// Communicators are non-blocking (ncclCommInitRankConfig with config.blocking = 0, NCCL >= 2.14): every
// NCCL call may return ncclInProgress, and then ncclCommGetAsyncError is polled until it is not (NCCL
// requires that before the next call) with the communicator's timeout. So a rank that never joins makes
// nccl_init fail after the timeout instead of hanging, and so does a peer that stops while a call is being
// enqueued. With an NCCL older than 2.14 (no ncclCommInitRankConfig) the communicator is blocking:
// ncclCommInitRank has no timeout, but nccl_wait still has one.
//
// One thread at a time may use a communicator (as NCCL's own rule); nccl_abort is that thread's too.
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <chrono>
#include <mutex>
#include <thread>

#include "relora_cuda.cuh"

#if defined(RELORA_EMU)
#include "nccl_emu.h"
#else
#include <dlfcn.h>
#include <nccl.h>
#endif

namespace relora {
namespace {

// X(table member, NCCL symbol, required). The optional ones appeared in NCCL 2.13 (ncclGetLastError) and
// 2.14 (ncclCommInitRankConfig, ncclCommFinalize); the required ones are all in NCCL 2.7 and later.
#define RELORA_NCCL_FUNCTIONS(X)                            \
    X(GetVersion, ncclGetVersion, true)                     \
    X(GetUniqueId, ncclGetUniqueId, true)                   \
    X(CommInitRank, ncclCommInitRank, true)                 \
    X(CommInitRankConfig, ncclCommInitRankConfig, false)    \
    X(AllGather, ncclAllGather, true)                       \
    X(Broadcast, ncclBroadcast, true)                       \
    X(Send, ncclSend, true)                                 \
    X(Recv, ncclRecv, true)                                 \
    X(GroupStart, ncclGroupStart, true)                     \
    X(GroupEnd, ncclGroupEnd, true)                         \
    X(CommGetAsyncError, ncclCommGetAsyncError, true)       \
    X(CommFinalize, ncclCommFinalize, false)                \
    X(CommAbort, ncclCommAbort, true)                       \
    X(CommDestroy, ncclCommDestroy, true)                   \
    X(GetErrorString, ncclGetErrorString, true)             \
    X(GetLastError, ncclGetLastError, false)

struct NcclApi {
#define RELORA_NCCL_MEMBER(member, symbol, required) decltype(&symbol) member = nullptr;
    RELORA_NCCL_FUNCTIONS(RELORA_NCCL_MEMBER)
#undef RELORA_NCCL_MEMBER
    int version = 0;         // NCCL_VERSION_CODE of the library
    char origin[200] = "";   // where it came from, for nccl_version's message
};

std::mutex g_nccl_lock;
NcclApi g_nccl;
bool g_nccl_ready = false;  // g_nccl is complete (then never written again)

// The table, loaded on first use; null after recording RELORA_ERR_UNAVAILABLE's sentence (a later call
// tries again: NCCL may have been installed, or RELORA_NCCL_LIB set, in between).
const NcclApi *nccl_api(const char *op) {
    std::lock_guard<std::mutex> guard(g_nccl_lock);
    if (g_nccl_ready) return &g_nccl;
    NcclApi api;
#if defined(RELORA_EMU)
#define RELORA_NCCL_TAKE(member, symbol, required) api.member = &symbol;
    RELORA_NCCL_FUNCTIONS(RELORA_NCCL_TAKE)
#undef RELORA_NCCL_TAKE
    snprintf(api.origin, sizeof api.origin, "the CPU emulation of NCCL's API over TCP sockets (emu/nccl_emu.cpp)");
#else
    const char *env = getenv("RELORA_NCCL_LIB");
    const char *path = env && *env ? env : "libnccl.so.2";
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        fail(RELORA_ERR_UNAVAILABLE,
             "%s: NCCL is not available on this machine: cannot open %s (%s); install NCCL or set RELORA_NCCL_LIB", op,
             path, dlerror());
        return nullptr;
    }
    const char *missing = nullptr;
#define RELORA_NCCL_RESOLVE(member, symbol, required)                                     \
    api.member = reinterpret_cast<decltype(&symbol)>(dlsym(handle, #symbol));             \
    if (required && !api.member && !missing) missing = #symbol;
    RELORA_NCCL_FUNCTIONS(RELORA_NCCL_RESOLVE)
#undef RELORA_NCCL_RESOLVE
    if (missing) {
        dlclose(handle);
        fail(RELORA_ERR_UNAVAILABLE, "%s: %s is not a usable NCCL: it has no %s (NCCL 2.7 or newer is needed)", op, path,
             missing);
        return nullptr;
    }
    snprintf(api.origin, sizeof api.origin, "%s", path);
    // The handle stays open for the life of the process: communicators may outlive any caller.
#endif
    const ncclResult_t r = api.GetVersion(&api.version);
    if (r != ncclSuccess) {
        fail(RELORA_ERR_UNAVAILABLE, "%s: ncclGetVersion of %s failed: %s", op, api.origin, api.GetErrorString(r));
        return nullptr;
    }
    g_nccl = api;
    g_nccl_ready = true;
    return &g_nccl;
}

// 2.8.x and earlier: 1000 * major + 100 * minor + patch; from 2.9: 10000 * major + 100 * minor + patch.
void split_version(int code, int *major, int *minor, int *patch) {
    const int scale = code >= 10000 ? 10000 : 1000;
    *major = code / scale;
    *minor = code % scale / 100;
    *patch = code % 100;
}

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
}

// The communicator handle behind the ABI's void *comm.
struct Communicator {
    const NcclApi *nccl = nullptr;
    ncclComm_t comm = nullptr;  // null once aborted (ncclCommAbort frees it)
    int32_t nranks = 0, rank = 0;
    double timeout_seconds = 0;
    bool blocking = false;      // NCCL < 2.14: ncclCommInitRank, never ncclInProgress
    char reason[480] = "";      // why it was aborted
};

Communicator *as_communicator(void *comm) { return static_cast<Communicator *>(comm); }

// NCCL's sentence for a failure: the library's last error (which names the peer where NCCL knows it) and
// the result's own text.
void describe(const Communicator *c, ncclResult_t result, char *out, size_t size) {
    const char *text = c->nccl->GetErrorString(result);
    const char *last = c->nccl->GetLastError ? c->nccl->GetLastError(c->comm) : nullptr;
    if (last && *last) {
        snprintf(out, size, "%s (%s)", last, text);
    } else {
        snprintf(out, size, "%s", text);
    }
}

relora_status status_of(ncclResult_t result) {
    switch (result) {
    case ncclInvalidArgument:
    case ncclInvalidUsage: return RELORA_ERR_INVALID_ARGUMENT;  // a caller's or the ranks' disagreement
    case ncclUnhandledCudaError: return RELORA_ERR_CUDA;
    default: return RELORA_ERR_COMMUNICATION;
    }
}

// Aborts the communicator (its peers' collectives then fail too) and records `status` with the sentence.
relora_status abort_with(Communicator *c, relora_status status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
relora_status abort_with(Communicator *c, relora_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->reason, sizeof c->reason, fmt, ap);
    va_end(ap);
    if (c->comm) c->nccl->CommAbort(c->comm);  // frees NCCL's communicator whatever it returns
    c->comm = nullptr;
    return fail(status, "%s; the communicator is aborted", c->reason);
}

relora_status abort_on(Communicator *c, ncclResult_t result, const char *op) {
    char text[400];
    describe(c, result, text, sizeof text);
    return abort_with(c, status_of(result), "%s: %s", op, text);
}

// What a timeout means, for its sentence: "<op>: <what> in <timeout> s: <why>".
struct Stall {
    const char *what;
    const char *why;
};
constexpr Stall kInitStall = {"the communicator was not formed",
                              "a rank did not join (not started, given another id or nranks, or died)"};
constexpr Stall kPeerStall = {"no collective progress", "a peer rank died or stopped"};

// After an NCCL call: RELORA_OK when it is done. ncclInProgress (a non-blocking communicator) is polled
// with ncclCommGetAsyncError until it is not, sleeping 0.1 ms growing to 1 ms, for at most the
// communicator's timeout from `start`. Any failure aborts the communicator.
relora_status settle(Communicator *c, ncclResult_t result, const char *op, Clock::time_point start, Stall stall) {
    if (result == ncclSuccess) return RELORA_OK;
    if (result != ncclInProgress) return abort_on(c, result, op);
    auto pause = std::chrono::microseconds(100);
    for (;;) {
        ncclResult_t state = ncclInProgress;
        const ncclResult_t r = c->nccl->CommGetAsyncError(c->comm, &state);
        if (r != ncclSuccess) return abort_on(c, r, op);
        if (state == ncclSuccess) return RELORA_OK;
        if (state != ncclInProgress) return abort_on(c, state, op);
        if (seconds_since(start) > c->timeout_seconds) {
            return abort_with(c, RELORA_ERR_COMMUNICATION, "%s: %s in %g s: %s", op, stall.what, c->timeout_seconds,
                              stall.why);
        }
        std::this_thread::sleep_for(pause);
        if (pause < std::chrono::milliseconds(1)) pause *= 2;
    }
}

// The checks every entry that takes a communicator starts with.
relora_status usable(const Communicator *c, const char *op) {
    if (!c) return fail(RELORA_ERR_INVALID_ARGUMENT, "%s: null communicator", op);
    if (!c->comm) {
        return fail(RELORA_ERR_COMMUNICATION, "%s: the communicator was aborted earlier (%s); create a new one with nccl_init",
                    op, c->reason);
    }
    return RELORA_OK;
}

}  // namespace
}  // namespace relora

using relora::Clock;
using relora::Communicator;
using relora::fail;

relora_status relora_cuda_nccl_version(int32_t *version) {
    RELORA_REQUIRE(version, "nccl_version", "null result pointer");
    *version = 0;
    const relora::NcclApi *nccl = relora::nccl_api("nccl_version");
    if (!nccl) return RELORA_ERR_UNAVAILABLE;
    *version = nccl->version;
    int major = 0, minor = 0, patch = 0;
    relora::split_version(nccl->version, &major, &minor, &patch);
    fail(RELORA_OK, "NCCL %d.%d.%d from %s", major, minor, patch, nccl->origin);  // for the caller's log line
    return RELORA_OK;
}

relora_status relora_cuda_nccl_unique_id(uint8_t *id) {
    RELORA_REQUIRE(id, "nccl_unique_id", "null result pointer");
    const relora::NcclApi *nccl = relora::nccl_api("nccl_unique_id");
    if (!nccl) return RELORA_ERR_UNAVAILABLE;
    static_assert(sizeof(ncclUniqueId) == RELORA_NCCL_ID_BYTES, "RELORA_NCCL_ID_BYTES is NCCL's id size");
    ncclUniqueId unique;
    const ncclResult_t r = nccl->GetUniqueId(&unique);
    if (r != ncclSuccess) {
        const char *last = nccl->GetLastError ? nccl->GetLastError(nullptr) : "";
        return fail(relora::status_of(r), "nccl_unique_id: ncclGetUniqueId failed: %s (%s)", last, nccl->GetErrorString(r));
    }
    memcpy(id, unique.internal, RELORA_NCCL_ID_BYTES);
    return RELORA_OK;
}

relora_status relora_cuda_nccl_init(void **comm, const uint8_t *id, int32_t nranks, int32_t rank, double timeout_seconds) {
    RELORA_REQUIRE(comm && id, "nccl_init", "null pointer");
    *comm = nullptr;
    RELORA_REQUIRE(nranks >= 1 && rank >= 0 && rank < nranks, "nccl_init", "rank %d of %d ranks", (int)rank, (int)nranks);
    RELORA_REQUIRE(timeout_seconds > 0 && isfinite(timeout_seconds), "nccl_init", "timeout %g s is not positive and finite",
                   timeout_seconds);
    const relora::NcclApi *nccl = relora::nccl_api("nccl_init");
    if (!nccl) return RELORA_ERR_UNAVAILABLE;
    ncclUniqueId unique;
    memcpy(unique.internal, id, RELORA_NCCL_ID_BYTES);
    Communicator *c = new Communicator;
    c->nccl = nccl;
    c->nranks = nranks;
    c->rank = rank;
    c->timeout_seconds = timeout_seconds;
    const Clock::time_point start = Clock::now();
    ncclResult_t r;
    if (nccl->CommInitRankConfig && nccl->version >= NCCL_VERSION(2, 14, 0)) {
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0;
        r = nccl->CommInitRankConfig(&c->comm, nranks, unique, rank, &config);
    } else {
        c->blocking = true;
        r = nccl->CommInitRank(&c->comm, nranks, unique, rank);
    }
    const relora_status s = relora::settle(c, r, "nccl_init", start, relora::kInitStall);
    if (s != RELORA_OK) {
        delete c;
        return s;
    }
    *comm = c;
    return RELORA_OK;
}

relora_status relora_cuda_nccl_all_gather(void *comm, const void *send, void *receive, int64_t bytes, void *stream) {
    Communicator *c = relora::as_communicator(comm);
    RELORA_CHECK(relora::usable(c, "nccl_all_gather"));
    RELORA_REQUIRE(bytes >= 0, "nccl_all_gather", "negative size %lld", (long long)bytes);
    RELORA_REQUIRE(bytes <= INT64_MAX / c->nranks, "nccl_all_gather", "%lld bytes from each of %d ranks overflow",
                   (long long)bytes, (int)c->nranks);
    if (bytes == 0) return RELORA_OK;
    RELORA_REQUIRE(send && receive, "nccl_all_gather", "null buffer");
    const Clock::time_point start = Clock::now();
    const ncclResult_t r = c->nccl->AllGather(send, receive, (size_t)bytes, ncclUint8, c->comm, relora::as_stream(stream));
    return relora::settle(c, r, "nccl_all_gather", start, relora::kPeerStall);
}

// One group of a send and a receive per peer (self included): block p of send goes to rank p, block q of
// receive comes from rank q. NCCL progresses the group's transfers together, so the order does not matter.
relora_status relora_cuda_nccl_all_to_all(void *comm, const void *send, void *receive, int64_t block_bytes, void *stream) {
    Communicator *c = relora::as_communicator(comm);
    RELORA_CHECK(relora::usable(c, "nccl_all_to_all"));
    RELORA_REQUIRE(block_bytes >= 0, "nccl_all_to_all", "negative size %lld", (long long)block_bytes);
    RELORA_REQUIRE(block_bytes <= INT64_MAX / c->nranks, "nccl_all_to_all", "%d blocks of %lld bytes overflow",
                   (int)c->nranks, (long long)block_bytes);
    if (block_bytes == 0) return RELORA_OK;
    RELORA_REQUIRE(send && receive, "nccl_all_to_all", "null buffer");
    const Clock::time_point start = Clock::now();
    const relora::NcclApi *nccl = c->nccl;
    const cudaStream_t s = relora::as_stream(stream);
    ncclResult_t r = nccl->GroupStart();
    if (r != ncclSuccess) return relora::abort_on(c, r, "nccl_all_to_all");
    ncclResult_t first = ncclSuccess;  // the first failing call; the group is closed in any case
    for (int32_t p = 0; p < c->nranks && (first == ncclSuccess || first == ncclInProgress); ++p) {
        const size_t offset = (size_t)p * (size_t)block_bytes;
        first = nccl->Send(static_cast<const char *>(send) + offset, (size_t)block_bytes, ncclUint8, p, c->comm, s);
        if (first == ncclSuccess || first == ncclInProgress) {
            first = nccl->Recv(static_cast<char *>(receive) + offset, (size_t)block_bytes, ncclUint8, p, c->comm, s);
        }
    }
    r = nccl->GroupEnd();
    if (first != ncclSuccess && first != ncclInProgress) return relora::abort_on(c, first, "nccl_all_to_all");
    return relora::settle(c, r, "nccl_all_to_all", start, relora::kPeerStall);
}

relora_status relora_cuda_nccl_broadcast(void *comm, void *buffer, int64_t bytes, int32_t root, void *stream) {
    Communicator *c = relora::as_communicator(comm);
    RELORA_CHECK(relora::usable(c, "nccl_broadcast"));
    RELORA_REQUIRE(bytes >= 0, "nccl_broadcast", "negative size %lld", (long long)bytes);
    RELORA_REQUIRE(root >= 0 && root < c->nranks, "nccl_broadcast", "root %d of %d ranks", (int)root, (int)c->nranks);
    if (bytes == 0) return RELORA_OK;
    RELORA_REQUIRE(buffer, "nccl_broadcast", "null buffer");
    const Clock::time_point start = Clock::now();
    const ncclResult_t r =
        c->nccl->Broadcast(buffer, buffer, (size_t)bytes, ncclUint8, root, c->comm, relora::as_stream(stream));
    return relora::settle(c, r, "nccl_broadcast", start, relora::kPeerStall);
}

// Polls the stream (cudaStreamQuery) and NCCL's asynchronous error, sleeping 0.1 ms growing to 1 ms
// between polls, for at most the communicator's timeout: a peer that died mid-collective leaves NCCL's
// kernels waiting forever, and only ncclCommAbort releases them (and the stream).
relora_status relora_cuda_nccl_wait(void *comm, void *stream) {
    Communicator *c = relora::as_communicator(comm);
    RELORA_CHECK(relora::usable(c, "nccl_wait"));
    const cudaStream_t s = relora::as_stream(stream);
    const Clock::time_point start = Clock::now();
    auto pause = std::chrono::microseconds(100);
    for (;;) {
        const cudaError_t e = cudaStreamQuery(s);
        ncclResult_t state = ncclSuccess;
        const ncclResult_t r = c->nccl->CommGetAsyncError(c->comm, &state);
        if (r != ncclSuccess) return relora::abort_on(c, r, "nccl_wait");
        if (state != ncclSuccess && state != ncclInProgress) return relora::abort_on(c, state, "nccl_wait");
        if (e == cudaSuccess) return RELORA_OK;
        if (e != cudaErrorNotReady) {
            (void)cudaGetLastError();
            return relora::abort_with(c, relora::check(e, "cudaStreamQuery"), "nccl_wait: the stream failed: %s",
                                      cudaGetErrorString(e));
        }
        if (relora::seconds_since(start) > c->timeout_seconds) {
            return relora::abort_with(c, RELORA_ERR_COMMUNICATION, "nccl_wait: %s in %g s: %s", relora::kPeerStall.what,
                                      c->timeout_seconds, relora::kPeerStall.why);
        }
        std::this_thread::sleep_for(pause);
        if (pause < std::chrono::milliseconds(1)) pause *= 2;
    }
}

relora_status relora_cuda_nccl_abort(void *comm) {
    Communicator *c = relora::as_communicator(comm);
    if (!c) return RELORA_OK;
    relora_status s = RELORA_OK;
    if (c->comm) {
        const ncclResult_t r = c->nccl->CommAbort(c->comm);
        if (r != ncclSuccess) {
            s = fail(RELORA_ERR_COMMUNICATION, "nccl_abort: ncclCommAbort failed: %s", c->nccl->GetErrorString(r));
        }
    }
    delete c;
    return s;
}

// A normal end: ncclCommFinalize (NCCL >= 2.14: flushes the communicator's work, non-blocking, polled with
// the timeout), then ncclCommDestroy frees the rest locally. comm is freed in every case.
relora_status relora_cuda_nccl_destroy(void *comm) {
    Communicator *c = relora::as_communicator(comm);
    if (!c) return RELORA_OK;
    relora_status s = RELORA_OK;
    if (c->comm && c->nccl->CommFinalize && !c->blocking) {
        s = relora::settle(c, c->nccl->CommFinalize(c->comm), "nccl_destroy", Clock::now(), relora::kPeerStall);
    }
    if (c->comm) {  // still there: not aborted by a failed finalize
        const ncclResult_t r = c->nccl->CommDestroy(c->comm);
        if (r != ncclSuccess) {
            char text[400];
            relora::describe(c, r, text, sizeof text);
            s = fail(relora::status_of(r), "nccl_destroy: ncclCommDestroy failed: %s", text);
        }
        c->comm = nullptr;
    }
    delete c;
    return s;
}
