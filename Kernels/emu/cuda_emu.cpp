// The emulation's runtime: fiber scheduler (launches, __syncthreads, warp collectives) and the
// stand-in CUDA runtime (guarded device memory, copies, streams and events). See cuda_emu.h.
// The standard headers first: cuda_emu.h defines __noinline__, which libstdc++'s <memory> spells as an attribute.
#include <deque>
#include <memory>

#include "cuda_emu.h"
#include "emu_format.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace relora_emu {
extern "C" {
uint3 relora_emu_thread_idx = {0, 0, 0};
uint3 relora_emu_block_idx = {0, 0, 0};
dim3 relora_emu_block_dim = dim3(1, 1, 1);
dim3 relora_emu_grid_dim = dim3(1, 1, 1);
unsigned int relora_emu_linear_tid = 0;
}

namespace {

// ---- Errors ------------------------------------------------------------------------------------------
// CUDA keeps the last error per host thread; errors a kernel causes (illegal address, a failed launch)
// are sticky for the whole context until cudaDeviceReset.
thread_local cudaError_t t_last = cudaSuccess;
thread_local std::string t_message;       // detail of the last error this thread saw
thread_local cudaError_t t_message_code = cudaSuccess;
cudaError_t g_sticky = cudaSuccess;
std::string g_sticky_message;

using relora_emu_text::format;

cudaError_t fail(cudaError_t code, const std::string &message, bool sticky) {
    t_last = code;
    t_message = message;
    t_message_code = code;
    if (sticky && g_sticky == cudaSuccess) {
        g_sticky = code;
        g_sticky_message = message;
    }
    return code;
}

const char *generic_text(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    }
    return "unknown error";
}

// One emulated device: every runtime call and every launch holds this lock.
std::mutex g_lock;

// ---- Device memory ------------------------------------------------------------------------------------
constexpr size_t kGuard = 256;        // canary bytes before the allocation (and after its 256-byte round-up)
constexpr unsigned char kCanary = 0xA5;
constexpr unsigned char kPoison = 0xFF;  // fresh device memory: NaN as f32 and bf16, -1 as integers

struct Allocation {
    unsigned char *base;  // kGuard canaries, then the user's bytes
    size_t size;          // requested bytes
    size_t tail;          // canary bytes after the user's bytes
    uint64_t serial;
    bool host;            // cudaHostAlloc'd (pinned host memory the kernels may read): not device memory
};

std::map<uintptr_t, Allocation> g_allocations;  // by user pointer
uint64_t g_serial = 0;
size_t g_used = 0;
size_t g_total = 0;  // 0 until configured

size_t parse_bytes(const char *text, size_t fallback) {
    if (!text || !*text) return fallback;
    char *end = nullptr;
    double v = strtod(text, &end);
    if (end == text || v <= 0) return fallback;
    switch (*end) {
    case 'k': case 'K': v *= 1024.0; break;
    case 'm': case 'M': v *= 1024.0 * 1024.0; break;
    case 'g': case 'G': v *= 1024.0 * 1024.0 * 1024.0; break;
    default: break;
    }
    return (size_t)v;
}

size_t total_memory() {
    if (g_total == 0) g_total = parse_bytes(getenv("RELORA_EMU_DEVICE_MEMORY"), (size_t)24 << 30);
    return g_total;
}

// RELORA_EMU_DEVICE_MALLOCS=N: the device allocations after the first N fail as out of memory. A plan that
// counts every block lets a run use exactly the memory it plans, so a test that needs a run to run out in
// the middle of a step (as when another process takes memory after the run's check) says where instead.
uint64_t g_device_mallocs = 0;
uint64_t device_malloc_limit() {
    static const uint64_t limit = [] {
        const char *text = getenv("RELORA_EMU_DEVICE_MALLOCS");
        return text && *text ? strtoull(text, nullptr, 10) : UINT64_MAX;
    }();
    return limit;
}

// The first overwritten canary byte of `a` as a signed offset from the user pointer, or 0 if intact.
bool find_corruption(const Allocation &a, long long *offset) {
    for (size_t i = kGuard; i-- > 0;) {  // nearest to the data first
        if (a.base[i] != kCanary) {
            *offset = (long long)i - (long long)kGuard;
            return true;
        }
    }
    const unsigned char *end = a.base + kGuard + a.size;
    for (size_t i = 0; i < a.tail; ++i) {
        if (end[i] != kCanary) {
            *offset = (long long)(a.size + i);
            return true;
        }
    }
    return false;
}

std::string corruption_message(const Allocation &a, long long offset, const char *when) {
    return format("%s wrote outside a device allocation: byte %+lld of the %zu-byte allocation #%llu at %p "
                  "(%s) was overwritten",
                  when, offset, a.size, (unsigned long long)a.serial, (void *)(a.base + kGuard),
                  offset < 0 ? "before its start" : "past its end");
}

// Checks every live allocation's canaries; an overwritten one is a sticky illegal address.
cudaError_t check_all(const char *when) {
    for (const auto &entry : g_allocations) {
        long long offset = 0;
        if (find_corruption(entry.second, &offset)) {
            return fail(cudaErrorIllegalAddress, corruption_message(entry.second, offset, when), true);
        }
    }
    return cudaSuccess;
}

// The allocation holding [p, p + bytes), or null.
const Allocation *find_allocation(const void *p, size_t bytes, bool *inside_one) {
    *inside_one = false;
    const uintptr_t u = (uintptr_t)p;
    auto it = g_allocations.upper_bound(u);
    if (it == g_allocations.begin()) return nullptr;
    --it;
    const Allocation &a = it->second;
    if (u < it->first || u >= it->first + (a.size ? a.size : 1)) return nullptr;
    *inside_one = true;
    if (u + bytes > it->first + a.size) return nullptr;
    return &a;
}

bool is_device_pointer(const void *p) {
    bool inside = false;
    find_allocation(p, 0, &inside);
    return inside;
}

cudaError_t check_device_range(const void *p, size_t bytes, const char *what) {
    bool inside = false;
    if (find_allocation(p, bytes, &inside)) return cudaSuccess;
    if (inside) {
        return fail(cudaErrorInvalidValue,
                    format("%s of %zu bytes at %p runs past the end of its device allocation", what, bytes, p), false);
    }
    return fail(cudaErrorInvalidValue, format("%s: %p is not a live device allocation", what, p), false);
}

// ---- Streams and events: queues and ordering constraints -----------------------------------------------
// Every stream keeps the work enqueued on it (`Work`: a host function, or a wait for another stream to have
// run a number of its items) and a count of items enqueued and run. An event is a position in one stream's
// sequence (the count enqueued when it was recorded): it has completed when that stream has run that many.
// Draining a stream up to a position runs its items in order; a wait item first drains the stream it waits
// for up to the waited position. Positions a wait names were enqueued before the wait, so draining never
// cycles. In the eager order every item runs at the call and the queues stay empty.
struct Work {
    std::shared_ptr<void> context;  // owns the launch's arguments (or the stand-in's state)
    void (*run)(void *) = nullptr;  // null for a wait
    relora_emu_stream *wait_for = nullptr;
    uint64_t wait_until = 0;
};

}  // namespace
}  // namespace relora_emu

struct relora_emu_stream {
    bool blocking = true;     // orders with the legacy default stream (cudaStreamDefault)
    bool legacy = false;      // the legacy default stream (handle 0)
    uint64_t enqueued = 0, completed = 0;
    std::deque<relora_emu::Work> queue;
};

struct relora_emu_event {
    relora_emu_stream *stream = nullptr;  // null until recorded
    uint64_t position = 0;
    bool timing = true;                   // false for cudaEventDisableTiming
    // A timing event's latest record: the host clock (ms) when the stream ran up to it, negative until then.
    // Shared with the queued item that sets it, which outlives a destroyed event.
    std::shared_ptr<double> stamp;
};

namespace relora_emu {
namespace {

relora_emu_stream g_legacy_stream = [] {
    relora_emu_stream s;
    s.legacy = true;
    return s;
}();
std::set<relora_emu_stream *> g_streams;        // live handles
std::vector<relora_emu_stream *> g_stream_order;  // every stream ever made, in creation order (a destroyed
                                                  // one stays: events recorded on it may still be waited for)
std::set<relora_emu_event *> g_events;
int g_order = -1;  // RELORA_EMU_STREAMS_*, read from the environment at first use

bool valid_stream(cudaStream_t s) { return s == nullptr || g_streams.count(s) != 0; }
relora_emu_stream *stream_of(cudaStream_t s) { return s ? s : &g_legacy_stream; }

int stream_order() {
    if (g_order < 0) {
        const char *text = getenv("RELORA_EMU_STREAM_ORDER");
        g_order = RELORA_EMU_STREAMS_DEFERRED;
        if (text && *text) {
            if (!strcmp(text, "eager")) {
                g_order = RELORA_EMU_STREAMS_EAGER;
            } else if (!strcmp(text, "reverse")) {
                g_order = RELORA_EMU_STREAMS_REVERSE;
            } else if (strcmp(text, "deferred") != 0) {
                fprintf(stderr, "relora emulation: RELORA_EMU_STREAM_ORDER='%s' is not eager, deferred or reverse; using deferred\n", text);
            }
        }
    }
    return g_order;
}

bool sticky_set() { return g_sticky != cudaSuccess; }

void drain(relora_emu_stream *s, uint64_t until) {
    while (s->completed < until && !s->queue.empty()) {
        Work w = std::move(s->queue.front());
        s->queue.pop_front();
        if (w.wait_for) {
            drain(w.wait_for, w.wait_until);
        } else if (w.run && !sticky_set()) {
            w.run(w.context.get());  // after a kernel fault the context is dead: later work is dropped
        }
        ++s->completed;
    }
}

void drain_all() {
    // Device-wide: every stream; which goes first is what the deferred and reverse orders differ in.
    if (stream_order() == RELORA_EMU_STREAMS_REVERSE) {
        for (size_t i = g_stream_order.size(); i-- > 0;) drain(g_stream_order[i], g_stream_order[i]->enqueued);
        drain(&g_legacy_stream, g_legacy_stream.enqueued);
    } else {
        drain(&g_legacy_stream, g_legacy_stream.enqueued);
        for (relora_emu_stream *s : g_stream_order) drain(s, s->enqueued);
    }
}

void push(relora_emu_stream *s, Work w) {
    ++s->enqueued;
    s->queue.push_back(std::move(w));
}

// Enqueues `run(context)` on `s` (the caller holds g_lock); runs it now in the eager order. Legacy default
// stream semantics: work on it waits for every blocking stream's earlier work, and work on a blocking stream
// for its earlier work.
void enqueue(relora_emu_stream *s, void (*run)(void *), std::shared_ptr<void> context) {
    if (stream_order() == RELORA_EMU_STREAMS_EAGER) {
        ++s->enqueued;
        if (!sticky_set()) run(context.get());
        ++s->completed;
        return;
    }
    if (s->legacy) {
        for (relora_emu_stream *t : g_stream_order) {
            if (t->blocking && t->completed < t->enqueued) push(s, Work{nullptr, nullptr, t, t->enqueued});
        }
    } else if (s->blocking && g_legacy_stream.completed < g_legacy_stream.enqueued) {
        push(s, Work{nullptr, nullptr, &g_legacy_stream, g_legacy_stream.enqueued});
    }
    push(s, Work{std::move(context), run, nullptr, 0});
}

uint64_t pending_items() {
    uint64_t n = g_legacy_stream.queue.size();
    for (const relora_emu_stream *s : g_stream_order) n += s->queue.size();
    return n;
}

// ---- Fibers -----------------------------------------------------------------------------------------------
enum FiberState { kRunnable, kAtBarrier, kAtWarpBarrier, kDone };

// Context switches. glibc's swapcontext saves and restores the signal mask with a system call on every
// switch, which made it most of the emulation's cost; on x86-64 a fiber switch is instead the function
// below: push the callee-saved registers (and MXCSR / the x87 control word, which the ABI also makes
// callee-saved), store the stack pointer, load the other one, pop, return. Elsewhere: ucontext.
#if defined(__x86_64__)
#define RELORA_EMU_FAST_SWITCH 1
extern "C" void relora_emu_switch(void **save_sp, void *load_sp);
__asm__(R"(
    .text
    .globl relora_emu_switch
    .hidden relora_emu_switch
    .type relora_emu_switch, @function
relora_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size relora_emu_switch, .-relora_emu_switch
)");
#endif

// A cp.async copy not yet performed: it lands when its thread's cp.async.wait_group retires its group.
struct AsyncCopy {
    void *dst;
    const void *src;
    unsigned int bytes, src_bytes;  // src_bytes < bytes: the rest of dst is zero-filled
    unsigned int group;             // the commit group it belongs to (the thread's count of commits at issue)
};

struct Fiber {
#if defined(RELORA_EMU_FAST_SWITCH)
    void *sp;  // saved stack pointer (relora_emu_switch's frame on the fiber's stack)
#else
    ucontext_t context;
#endif
    uint3 tid;
    FiberState state;
    std::vector<AsyncCopy> copies;  // issued, not yet landed
    unsigned int commits;           // cp.async.commit_group calls so far in this block
};

// Per-lane bytes a wide collective can publish (an mma's A and B fragments: 24; an ldmatrix address: 8).
constexpr size_t kExchangeBytes = 32;

struct Warp {
    unsigned int lanes;     // lanes that exist
    unsigned int arrived;   // lanes waiting in the current collective
    unsigned int mask;      // the current collective's mask
    unsigned int generation;
    uint64_t slots[2][32];  // values published, by generation parity
    unsigned char payload[2][32][kExchangeBytes];  // wide values published (relora_emu_warp_exchange), by parity
    uint32_t results[2][32][4];  // what a collective's completion step computed for each lane, by parity
};

struct Stack {
    void *memory;
    size_t bytes;
};

std::vector<Stack> g_stacks;
std::vector<Fiber> g_fibers;
std::vector<Warp> g_warps;
#if defined(RELORA_EMU_FAST_SWITCH)
void *g_scheduler_sp;
#else
ucontext_t g_scheduler;
#endif
unsigned int g_current = 0;  // index of the running fiber
unsigned int g_threads = 0;  // threads per block
unsigned int g_at_barrier = 0;
unsigned int g_done = 0;
bool g_abort = false;
std::string g_abort_message;
const char *g_kernel = "";
BlockBody g_body = nullptr;
void *g_closure = nullptr;
std::vector<unsigned char> g_dynamic_shared;
int g_schedule = RELORA_EMU_ROUND_ROBIN;
// Dynamic shared memory per launch: 48 KiB unless the kernel opted in to more with cudaFuncSetAttribute, up
// to the smallest opt-in limit of the architectures the library is built for (sm_86 and sm_89: 99 KiB).
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicShared = 99 * 1024;
std::map<const void *, size_t> g_max_dynamic_shared;  // by kernel
std::map<std::string, uint64_t> g_launches_by_name;
bool g_barriers = true;
uint64_t g_launches = 0, g_blocks = 0, g_fibers_started = 0, g_switches = 0;
// relora_emu_host_counters: calls that make the host wait for the device, and successful cudaMalloc calls.
uint64_t g_host_waits = 0, g_mallocs = 0;
// relora_emu_command_counters: memsets and copies enqueued (device work that is not a kernel launch).
uint64_t g_memsets = 0, g_copies = 0;

size_t stack_bytes() {
    static size_t bytes = 0;
    if (bytes == 0) {
        const char *kb = getenv("RELORA_EMU_STACK_KB");
        bytes = (size_t)(kb && atoi(kb) > 0 ? atoi(kb) : 64) * 1024;
    }
    return bytes;
}

bool ensure_stacks(unsigned int count) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t usable = (stack_bytes() + page - 1) / page * page;
    while (g_stacks.size() < count) {
        // A PROT_NONE page below the stack: an overflow faults instead of corrupting a neighbour.
        void *m = mmap(nullptr, usable + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return false;
        mprotect(m, page, PROT_NONE);
        g_stacks.push_back(Stack{(unsigned char *)m + page, usable});
    }
    return true;
}

void switch_to(unsigned int i) {
    g_current = i;
    relora_emu_thread_idx = g_fibers[i].tid;
    relora_emu_linear_tid = i;
    ++g_switches;
#if defined(RELORA_EMU_FAST_SWITCH)
    relora_emu_switch(&g_scheduler_sp, g_fibers[i].sp);
#else
    swapcontext(&g_scheduler, &g_fibers[i].context);
#endif
}

void yield_to_scheduler() {
#if defined(RELORA_EMU_FAST_SWITCH)
    relora_emu_switch(&g_fibers[g_current].sp, g_scheduler_sp);
#else
    swapcontext(&g_fibers[g_current].context, &g_scheduler);
#endif
}

void abort_launch(const std::string &message);
std::string where();

void fiber_entry(int index) {
    g_body(g_closure);
    if (!g_fibers[(unsigned int)index].copies.empty()) {
        // On a GPU the copies would still land, but nothing the thread did waited for them: a missing
        // cp.async.wait_group, or a copy whose result is never used.
        abort_launch(where() + ": the thread exited with cp.async copies it never waited for (cp.async.wait_group)");
    }
    g_fibers[(unsigned int)index].state = kDone;
    ++g_done;
    yield_to_scheduler();
    abort();  // a finished fiber is never resumed
}

#if defined(RELORA_EMU_FAST_SWITCH)
// Where a new fiber's first switch returns to: it runs the thread whose switch_to started it.
void fiber_start() { fiber_entry((int)g_current); }

// A fresh stack laid out as relora_emu_switch leaves a suspended one: the saved MXCSR / x87 control words
// (their defaults), six zero registers, then fiber_start as the return address, placed so that fiber_start
// begins with the stack aligned as after a call (rsp + 8 a multiple of 16).
void *initial_stack(void *memory, size_t bytes) {
    uint64_t *top = (uint64_t *)(((uintptr_t)memory + bytes) & ~(uintptr_t)15);
    *--top = 0;                             // fiber_start's own (never used) return address
    *--top = (uint64_t)(uintptr_t)&fiber_start;  // 16-byte aligned slot: ret pops it
    for (int r = 0; r < 6; ++r) *--top = 0;  // rbp, rbx, r12-r15
    uint32_t control[2] = {0x1F80u, 0x037Fu};  // MXCSR, x87 control word: the ABI's initial values
    uint64_t packed;
    memcpy(&packed, control, sizeof packed);
    *--top = packed;
    return top;
}
#endif

std::string where() {
    const uint3 b = relora_emu_block_idx, t = g_fibers[g_current].tid;
    return format("kernel '%s' block (%u,%u,%u) thread (%u,%u,%u)", g_kernel, b.x, b.y, b.z, t.x, t.y, t.z);
}

void abort_launch(const std::string &message) {
    g_abort = true;
    g_abort_message = message;
}

// Arrives at the warp barrier of the lanes in `mask`, having published `value` (slots) and `bytes` of `data`
// (payload). The last lane to arrive runs `complete` (if any) before any lane resumes: a collective that reads
// memory does so there, at one instant for the whole warp, as the hardware instruction does. Returns the
// parity under which this collective's values and results are kept (valid until the lane's next collective:
// the one after cannot complete before this lane arrives at it).
typedef void (*Completion)(Warp &w, unsigned int parity);
unsigned int warp_arrive(unsigned int mask, uint64_t value, const void *data, size_t bytes, Completion complete) {
    const unsigned int lane = g_current & 31u;
    Warp &w = g_warps[g_current / 32u];
    if (!((mask >> lane) & 1u)) relora_emu_kernel_error("a warp collective's mask excludes the calling lane", (int)lane, (int)mask);
    const unsigned int expected = mask & w.lanes;
    if (w.arrived == 0) {
        w.mask = mask;
    } else if (w.mask != mask) {
        // Also what two disjoint groups of one warp in concurrent collectives look like: the emulation
        // keeps one collective per warp at a time.
        relora_emu_kernel_error("lanes of a warp are in collectives with different masks", (int)lane, (int)mask);
    }
    const unsigned int parity = w.generation & 1u;
    w.slots[parity][lane] = value;
    if (bytes) memcpy(w.payload[parity][lane], data, bytes);
    w.arrived |= 1u << lane;
    if (w.arrived == expected) {
        if (complete) complete(w, parity);
        ++w.generation;
        w.arrived = 0;
        const unsigned int first = g_current & ~31u;
        for (unsigned int l = 0; l < 32u && first + l < g_threads; ++l) {
            if (g_fibers[first + l].state == kAtWarpBarrier) g_fibers[first + l].state = kRunnable;
        }
        return parity;
    }
    g_fibers[g_current].state = kAtWarpBarrier;
    yield_to_scheduler();
    return parity;
}

struct MmaFragments {
    uint32_t a[4], b[2];
};
static_assert(sizeof(MmaFragments) <= kExchangeBytes, "mma fragments fit a lane's exchange slot");

float bf16_half(uint32_t word, int high) { return __uint_as_float((high ? word >> 16 : word & 0xFFFFu) << 16); }
struct LdmatrixRequest {
    const unsigned char *address;
    int matrices, trans;
};
static_assert(sizeof(LdmatrixRequest) <= kExchangeBytes, "an ldmatrix request fits a lane's exchange slot");

void ldmatrix_complete(Warp &w, unsigned int parity) {
    LdmatrixRequest first;
    memcpy(&first, w.payload[parity][0], sizeof first);
    for (int l = 0; l < 32; ++l) {
        LdmatrixRequest r;
        memcpy(&r, w.payload[parity][l], sizeof r);
        if (r.matrices != first.matrices || r.trans != first.trans) {
            abort_launch(where() + ": lanes of a warp disagree on an ldmatrix's shape (.x1/.x2/.x4, .trans)");
            return;
        }
        if (l < 8 * first.matrices && ((uintptr_t)r.address & 15u) != 0) {
            abort_launch(where() + format(": ldmatrix row address of lane %d is not 16-byte aligned (%p)", l,
                                          (const void *)r.address));
            return;
        }
    }
    auto row = [&](int m, int r) {
        LdmatrixRequest q;
        memcpy(&q, w.payload[parity][8 * m + r], sizeof q);
        return q.address;
    };
    for (int l = 0; l < 32; ++l) {
        for (int m = 0; m < first.matrices; ++m) {
            uint16_t lo, hi;
            if (!first.trans) {
                const unsigned char *p = row(m, l / 4) + 4 * (l % 4);
                memcpy(&lo, p, 2);
                memcpy(&hi, p + 2, 2);
            } else {
                memcpy(&lo, row(m, 2 * (l % 4)) + 2 * (l / 4), 2);
                memcpy(&hi, row(m, 2 * (l % 4) + 1) + 2 * (l / 4), 2);
            }
            w.results[parity][l][m] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
}

// Runs the current block's fibers to completion; false if the launch was aborted.
bool run_block() {
    const dim3 bd = relora_emu_block_dim;
    for (unsigned int i = 0; i < g_threads; ++i) {
        Fiber &f = g_fibers[i];
        f.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
        f.state = kRunnable;
        f.copies.clear();
        f.commits = 0;
#if defined(RELORA_EMU_FAST_SWITCH)
        f.sp = initial_stack(g_stacks[i].memory, g_stacks[i].bytes);
#else
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = g_stacks[i].memory;
        f.context.uc_stack.ss_size = g_stacks[i].bytes;
        f.context.uc_link = nullptr;
        makecontext(&f.context, (void (*)())fiber_entry, 1, (int)i);
#endif
    }
    for (size_t w = 0; w < g_warps.size(); ++w) {
        Warp &warp = g_warps[w];
        const unsigned int first = (unsigned int)w * 32u;
        const unsigned int count = g_threads - first < 32u ? g_threads - first : 32u;
        warp.lanes = count == 32u ? 0xffffffffu : ((1u << count) - 1u);
        warp.arrived = warp.mask = warp.generation = 0;
        memset(warp.slots, 0, sizeof warp.slots);
    }
    g_at_barrier = 0;
    g_done = 0;
    if (!g_dynamic_shared.empty()) memset(g_dynamic_shared.data(), kPoison, g_dynamic_shared.size());
    g_fibers_started += g_threads;
    const bool reverse = g_schedule == RELORA_EMU_ROUND_ROBIN_REVERSE || g_schedule == RELORA_EMU_GREEDY_REVERSE;
    const bool greedy = g_schedule == RELORA_EMU_GREEDY || g_schedule == RELORA_EMU_GREEDY_REVERSE;
    while (g_done < g_threads) {
        bool progressed = false;
        for (unsigned int k = 0; k < g_threads; ++k) {
            const unsigned int i = reverse ? g_threads - 1 - k : k;
            if (g_fibers[i].state != kRunnable) continue;
            switch_to(i);
            progressed = true;
            if (g_abort) return false;
            if (greedy) break;  // rescan from the first thread
        }
        if (!progressed) {
            unsigned int at_warp = 0;
            for (unsigned int i = 0; i < g_threads; ++i) at_warp += g_fibers[i].state == kAtWarpBarrier;
            const uint3 b = relora_emu_block_idx;
            abort_launch(format("kernel '%s' block (%u,%u,%u) deadlocked: %u threads wait at __syncthreads(), %u in a "
                                "warp collective, %u have exited (a barrier or collective in divergent code)",
                                g_kernel, b.x, b.y, b.z, g_at_barrier, at_warp, g_done));
            return false;
        }
    }
    return true;
}

// A launch as its stream queues it.
struct GridLaunch {
    const char *name;
    dim3 grid, block;
    size_t shmem;
    BlockBody body;
    void *closure;
    void (*destroy)(void *);
    ~GridLaunch() { destroy(closure); }
};

// Runs a queued launch's grid to completion, block after block (g_lock held, the configuration checked at the
// launch). A failure is sticky: on a GPU it would surface at the next synchronization.
void run_grid(void *context) {
    const GridLaunch &l = *static_cast<const GridLaunch *>(context);
    const unsigned int threads = l.block.x * l.block.y * l.block.z;
    if (!ensure_stacks(threads)) {
        fail(cudaErrorMemoryAllocation, format("kernel '%s': cannot map fiber stacks", l.name), true);
        return;
    }
    g_threads = threads;
    if (g_fibers.size() < threads) g_fibers.resize(threads);
    g_warps.assign((threads + 31) / 32, Warp{});
    g_dynamic_shared.assign(l.shmem, kPoison);
    g_kernel = l.name;
    g_body = l.body;
    g_closure = l.closure;
    g_abort = false;
    relora_emu_block_dim = l.block;
    relora_emu_grid_dim = l.grid;
    for (unsigned int z = 0; z < l.grid.z; ++z) {
        for (unsigned int y = 0; y < l.grid.y; ++y) {
            for (unsigned int x = 0; x < l.grid.x; ++x) {
                relora_emu_block_idx = uint3{x, y, z};
                ++g_blocks;
                if (!run_block()) {
                    fail(cudaErrorLaunchFailure, g_abort_message, true);
                    return;
                }
            }
        }
    }
    check_all(format("kernel '%s'", l.name).c_str());
}

}  // namespace

// ---- Launch and collectives (called from kernels) --------------------------------------------------
extern "C" {

void relora_emu_launch(const char *name, const void *func, dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
                       BlockBody body, void *closure, void (*destroy)(void *)) {
    // The arguments' owner from here on: freed after the grid ran, or now if the launch is refused.
    std::shared_ptr<GridLaunch> launch(new GridLaunch{name, grid, block, shmem, body, closure, destroy});
    std::lock_guard<std::mutex> guard(g_lock);
    if (g_sticky != cudaSuccess) {
        fail(g_sticky, g_sticky_message, false);
        return;
    }
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (block.x == 0 || block.y == 0 || block.z == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
        fail(cudaErrorInvalidConfiguration,
             format("kernel '%s': invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)", name, grid.x, grid.y,
                    grid.z, block.x, block.y, block.z),
             false);
        return;
    }
    const auto opted = g_max_dynamic_shared.find(func);
    const size_t allowed = opted == g_max_dynamic_shared.end() ? kDefaultDynamicShared : opted->second;
    if (shmem > allowed) {
        fail(cudaErrorInvalidConfiguration,
             opted == g_max_dynamic_shared.end()
                 ? format("kernel '%s': %zu bytes of dynamic shared memory exceed the 48 KiB a launch gets without "
                          "opting in (cudaFuncSetAttribute, cudaFuncAttributeMaxDynamicSharedMemorySize)",
                          name, shmem)
                 : format("kernel '%s': %zu bytes of dynamic shared memory exceed the %zu it opted in to", name, shmem,
                          allowed),
             false);
        return;
    }
    if (!valid_stream(stream)) {
        fail(cudaErrorInvalidResourceHandle, format("kernel '%s': launched on a destroyed or unknown stream", name), false);
        return;
    }
    ++g_launches;
    ++g_launches_by_name[name];
    enqueue(stream_of(stream), run_grid, std::static_pointer_cast<void>(launch));
}

void *relora_emu_dynamic_shared(void) { return g_dynamic_shared.empty() ? nullptr : g_dynamic_shared.data(); }

unsigned int relora_emu_warp_lanes(void) { return g_warps[g_current / 32u].lanes; }

void relora_emu_kernel_error(const char *what, int lane, int other) {
    abort_launch(format("%s: %s (lane %d, other %d)", where().c_str(), what, lane, other));
    yield_to_scheduler();
    abort();  // never resumed
}

void relora_emu_syncthreads(void) {
    if (!g_barriers) return;
    Fiber &f = g_fibers[g_current];
    f.state = kAtBarrier;
    if (++g_at_barrier == g_threads) {
        for (unsigned int i = 0; i < g_threads; ++i) {
            if (g_fibers[i].state == kAtBarrier) g_fibers[i].state = kRunnable;
        }
        g_at_barrier = 0;
        return;
    }
    yield_to_scheduler();
}

const uint64_t *relora_emu_warp_collective(unsigned int mask, uint64_t value) {
    const unsigned int parity = warp_arrive(mask, value, nullptr, 0, nullptr);
    return g_warps[g_current / 32u].slots[parity];
}

const unsigned char *relora_emu_warp_exchange(unsigned int mask, const void *data, size_t bytes) {
    const unsigned int parity = warp_arrive(mask, 0, data, bytes, nullptr);
    return &g_warps[g_current / 32u].payload[parity][0][0];
}

// ---- Warp-level matrix operations ----------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the fragment layouts of the PTX ISA ("Matrix
// Fragments for mma.m16n8k16 with floating point type"): groupID = lane >> 2, threadID_in_group = lane % 4;
// each .b32 register holds two bf16, the lower-indexed element in the low 16 bits.
//   A (16 x 16, row-major), a[0..3] = {a0,a1}, {a2,a3}, {a4,a5}, {a6,a7}: row = groupID (+ 8 for a2, a3, a6,
//     a7), col = threadID_in_group * 2 + (i & 1) (+ 8 for a4..a7);
//   B (16 x 8, "col"), b[0..1] = {b0,b1}, {b2,b3}: row (k) = threadID_in_group * 2 + (i & 1) (+ 8 for b2, b3),
//     col (n) = groupID;
//   C, D (16 x 8 f32), c[0..3]: row = groupID (+ 8 for c2, c3), col = threadID_in_group * 2 + (i & 1).
// Each lane computes its own four elements of D after the rendezvous: d = c + a_row,0 b_0,col + ... +
// a_row,15 b_15,col, the products exact in f32 (8-bit significands) and added one at a time in k order,
// each addition rounded to nearest. A tensor core's internal order and rounding are not specified (they
// differ between architectures), so tests compare with bounds, never bits.

void relora_emu_mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    if (relora_emu_warp_lanes() != 0xffffffffu) {
        relora_emu_kernel_error("mma.sync needs all 32 lanes of a warp (a partial warp cannot execute it)", lane_id(), 0);
    }
    MmaFragments mine;
    memcpy(mine.a, a, sizeof mine.a);
    memcpy(mine.b, b, sizeof mine.b);
    const unsigned char *table = relora_emu_warp_exchange(0xffffffffu, &mine, sizeof mine);
    // Row (k) of A and column (k) of B where the layout puts them: A[row][k] is in lane 4 (row % 8) + (k % 8) / 2,
    // register (row >= 8) + 2 (k >= 8); B[k][n] in lane 4 n + (k % 8) / 2, register k >= 8; half k % 2.
    auto word = [&](int owner, size_t offset) {
        uint32_t w;
        memcpy(&w, table + (size_t)owner * kExchangeBytes + offset, sizeof w);
        return w;
    };
    const int lane = lane_id(), group = lane >> 2, tig = lane & 3;
    float a_rows[2][16], b_cols[2][16];  // rows group and group + 8 of A; columns 2 tig and 2 tig + 1 of B
    for (int k = 0; k < 16; ++k) {
        const int hi = k & 1, high_k = k >= 8 ? 1 : 0;
        for (int r = 0; r < 2; ++r) {
            a_rows[r][k] = bf16_half(word(group * 4 + (k & 7) / 2, offsetof(MmaFragments, a) + 4 * (r + 2 * high_k)), hi);
            b_cols[r][k] = bf16_half(word((tig * 2 + r) * 4 + (k & 7) / 2, offsetof(MmaFragments, b) + 4 * high_k), hi);
        }
    }
    float out[4];
    for (int i = 0; i < 4; ++i) {
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += a_rows[i >> 1][k] * b_cols[i & 1][k];  // -ffp-contract=off: the product exact
        out[i] = acc;
    }
    memcpy(d, out, sizeof out);  // d may alias c
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16: lanes 8m .. 8m + 7 give the addresses of rows 0..7
// of matrix m (16 bytes each, 16-byte aligned); without .trans, register m of lane l holds row l / 4,
// columns 2 (l % 4) and 2 (l % 4) + 1 of matrix m; with .trans, rows 2 (l % 4) and 2 (l % 4) + 1 of column
// l / 4 (the transposed matrix's fragment). The whole warp's reads happen at the rendezvous, when the last
// lane arrives, as one instruction's would: a lane that runs ahead cannot change what another one loads.

void relora_emu_ldmatrix(uint32_t *r, int matrices, int trans, const void *row_address) {
    if (relora_emu_warp_lanes() != 0xffffffffu) {
        relora_emu_kernel_error("ldmatrix needs all 32 lanes of a warp", lane_id(), 0);
    }
    if (matrices != 1 && matrices != 2 && matrices != 4) relora_emu_kernel_error("ldmatrix loads 1, 2 or 4 matrices", lane_id(), matrices);
    const LdmatrixRequest mine{static_cast<const unsigned char *>(row_address), matrices, trans ? 1 : 0};
    const unsigned int parity = warp_arrive(0xffffffffu, 0, &mine, sizeof mine, ldmatrix_complete);
    if (g_abort) {
        yield_to_scheduler();  // the launch is over; this fiber is never resumed
        abort();
    }
    for (int m = 0; m < matrices; ++m) r[m] = g_warps[g_current / 32u].results[parity][lane_id()][m];
}

// ---- cp.async ----------------------------------------------------------------------------------------------
// Every copy is deferred to the latest moment the PTX memory model allows: the issuing thread's
// cp.async.wait_group that retires its group. Data read before that (a missing wait, or a missing barrier
// after another thread's wait) is still the poison or the previous tile.
void relora_emu_cp_async(void *dst, const void *src, unsigned int bytes, unsigned int src_bytes) {
    if (bytes != 4 && bytes != 8 && bytes != 16) relora_emu_kernel_error("cp.async copies 4, 8 or 16 bytes", lane_id(), (int)bytes);
    if (src_bytes > bytes) relora_emu_kernel_error("cp.async: src-size exceeds cp-size", lane_id(), (int)src_bytes);
    if (((uintptr_t)dst | (uintptr_t)src) % bytes != 0) {
        relora_emu_kernel_error("cp.async: source and destination must be aligned to the copy size", lane_id(), (int)bytes);
    }
    const unsigned char *shared = g_dynamic_shared.data();
    if (g_dynamic_shared.empty() || (const unsigned char *)dst < shared ||
        (const unsigned char *)dst + bytes > shared + g_dynamic_shared.size()) {
        relora_emu_kernel_error("cp.async: the destination is not inside the block's dynamic shared memory", lane_id(),
                                (int)bytes);
    }
    Fiber &f = g_fibers[g_current];
    f.copies.push_back(AsyncCopy{dst, src, bytes, src_bytes, f.commits});
}

void relora_emu_cp_async_commit(void) { ++g_fibers[g_current].commits; }

void relora_emu_cp_async_wait(int pending) {
    Fiber &f = g_fibers[g_current];
    // Groups 0 .. commits - 1 are committed; all but the newest `pending` must have landed.
    const unsigned int retire_below = f.commits > (unsigned int)pending ? f.commits - (unsigned int)pending : 0u;
    size_t kept = 0;
    for (size_t i = 0; i < f.copies.size(); ++i) {
        const AsyncCopy &c = f.copies[i];
        if (c.group < retire_below) {
            memcpy(c.dst, c.src, c.src_bytes);
            memset((unsigned char *)c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
        } else {
            f.copies[kept++] = c;
        }
    }
    f.copies.resize(kept);
}

void relora_emu_func_set_max_dynamic_shared(const void *func, int bytes, int *ok) {
    std::lock_guard<std::mutex> guard(g_lock);
    *ok = bytes >= 0 && (size_t)bytes <= kMaxDynamicShared;
    if (*ok) g_max_dynamic_shared[func] = (size_t)bytes;
}


}  // extern "C"
}  // namespace relora_emu

// ---- Runtime API -------------------------------------------------------------------------------------------
using namespace relora_emu;

#define RELORA_EMU_STICKY_CHECK()                              \
    do {                                                       \
        if (g_sticky != cudaSuccess) return fail(g_sticky, g_sticky_message, false); \
    } while (0)

extern "C" {

// ---- Controls --------------------------------------------------------------------------------------
void relora_emu_set_device_memory(size_t bytes) {
    std::lock_guard<std::mutex> guard(g_lock);
    g_total = bytes;
}

// The scheduling controls act on launches made after them: queued work runs first, under the old setting.
void relora_emu_set_schedule(int schedule) {
    std::lock_guard<std::mutex> guard(g_lock);
    drain_all();
    g_schedule = schedule >= RELORA_EMU_ROUND_ROBIN && schedule <= RELORA_EMU_GREEDY_REVERSE ? schedule : RELORA_EMU_ROUND_ROBIN;
}

void relora_emu_set_barriers_enabled(int enabled) {
    std::lock_guard<std::mutex> guard(g_lock);
    drain_all();
    g_barriers = enabled != 0;
}

uint64_t relora_emu_launches_named(const char *substring) {
    std::lock_guard<std::mutex> guard(g_lock);
    uint64_t n = 0;
    for (const auto &entry : g_launches_by_name) {
        if (strstr(entry.first.c_str(), substring)) n += entry.second;
    }
    return n;
}

void relora_emu_counters(uint64_t *launches, uint64_t *blocks, uint64_t *fibers, uint64_t *switches) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (launches) *launches = g_launches;
    if (blocks) *blocks = g_blocks;
    if (fibers) *fibers = g_fibers_started;
    if (switches) *switches = g_switches;
}

void relora_emu_host_counters(uint64_t *synchronizations, uint64_t *mallocs) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (synchronizations) *synchronizations = g_host_waits;
    if (mallocs) *mallocs = g_mallocs;
}

void relora_emu_command_counters(uint64_t *memsets, uint64_t *copies) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (memsets) *memsets = g_memsets;
    if (copies) *copies = g_copies;
}

// ---- Runtime API ----
namespace {
// cudaMalloc and cudaHostAlloc: guarded memory; only device allocations count against the device's limit.
cudaError_t allocate_guarded(void **ptr, size_t bytes, bool host, const char *what) {
    std::lock_guard<std::mutex> guard(g_lock);
    RELORA_EMU_STICKY_CHECK();
    if (!ptr) return fail(cudaErrorInvalidValue, format("%s: null result pointer", what), false);
    *ptr = nullptr;
    if (!host && bytes > total_memory() - g_used) {
        return fail(cudaErrorMemoryAllocation,
                    format("%s of %zu bytes: the emulated device has %zu of %zu bytes free", what, bytes,
                           total_memory() - g_used, total_memory()),
                    false);
    }
    if (!host && g_device_mallocs >= device_malloc_limit()) {
        return fail(cudaErrorMemoryAllocation,
                    format("%s of %zu bytes: RELORA_EMU_DEVICE_MALLOCS allows %llu device allocations", what, bytes,
                           (unsigned long long)device_malloc_limit()),
                    false);
    }
    if (!host) ++g_device_mallocs;
    const size_t rounded = (bytes + 255) / 256 * 256;
    const size_t tail = rounded - bytes + kGuard;
    unsigned char *base = (unsigned char *)aligned_alloc(256, kGuard + rounded + kGuard);
    if (!base) return fail(cudaErrorMemoryAllocation, format("%s of %zu bytes: host memory exhausted", what, bytes), false);
    memset(base, kCanary, kGuard);
    memset(base + kGuard, kPoison, bytes);
    memset(base + kGuard + bytes, kCanary, tail);
    g_allocations[(uintptr_t)(base + kGuard)] = Allocation{base, bytes, tail, ++g_serial, host};
    if (!host) g_used += bytes;
    *ptr = base + kGuard;
    return cudaSuccess;
}

// cudaFree and cudaFreeHost synchronize the device first (as CUDA's do): no queued work can touch freed memory.
cudaError_t free_guarded(void *ptr, bool host, const char *what) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (!ptr) return cudaSuccess;
    drain_all();
    RELORA_EMU_STICKY_CHECK();
    auto it = g_allocations.find((uintptr_t)ptr);
    if (it == g_allocations.end() || it->second.host != host) {
        return fail(cudaErrorInvalidValue,
                    format("%s(%p): not a live %s allocation (freed twice?)", what, ptr, host ? "cudaHostAlloc" : "device"),
                    false);
    }
    const Allocation a = it->second;
    long long offset = 0;
    const std::string corruption =
        find_corruption(a, &offset) ? corruption_message(a, offset, format("a kernel (found at %s)", what).c_str()) : std::string();
    g_allocations.erase(it);
    if (!host) g_used -= a.size;
    free(a.base);
    if (!corruption.empty()) return fail(cudaErrorIllegalAddress, corruption, true);
    return cudaSuccess;
}
}  // namespace

cudaError_t cudaMalloc(void **ptr, size_t bytes) {
    const cudaError_t e = allocate_guarded(ptr, bytes, false, "cudaMalloc");
    if (e == cudaSuccess) {
        std::lock_guard<std::mutex> guard(g_lock);
        ++g_mallocs;
    }
    return e;
}

namespace {
void count_host_wait() {
    std::lock_guard<std::mutex> guard(g_lock);
    ++g_host_waits;
}
}  // namespace

cudaError_t cudaHostAlloc(void **ptr, size_t bytes, unsigned int flags) {
    (void)flags;  // every emulated allocation is host memory the kernels can read: mapped, portable
    return allocate_guarded(ptr, bytes, true, "cudaHostAlloc");
}

cudaError_t cudaFreeHost(void *ptr) { return free_guarded(ptr, true, "cudaFreeHost"); }

cudaError_t cudaFree(void *ptr) { return free_guarded(ptr, false, "cudaFree"); }

namespace {
// A queued copy: from `src`, or from the bytes staged at the call (a pageable host source, which CUDA copies
// out before the call returns).
struct CopyWork {
    void *dst;
    const void *src;
    size_t bytes;
    std::vector<unsigned char> staged;
};
void run_copy(void *context) {
    CopyWork &c = *static_cast<CopyWork *>(context);
    memmove(c.dst, c.staged.empty() ? c.src : c.staged.data(), c.bytes);
}

struct MemsetWork {
    void *ptr;
    int value;
    size_t bytes;
};
void run_memset(void *context) {
    const MemsetWork &m = *static_cast<const MemsetWork *>(context);
    memset(m.ptr, m.value, m.bytes);
}

// Host memory that is not a cudaHostAlloc allocation: CUDA copies to or from it synchronously.
bool pageable(const void *p) { return !is_device_pointer(p); }

// An async copy in stream order (g_lock held, arguments checked). To pageable host memory it waits for the
// stream and copies at the call; from pageable host memory it stages the source at the call (CUDA's
// behaviour for both); between device and pinned memory it is queued.
cudaError_t copy_locked(void *dst, const void *src, size_t bytes, cudaStream_t stream) {
    relora_emu_stream *s = stream_of(stream);
    ++g_copies;
    if (pageable(dst)) {
        drain(s, s->enqueued);
        RELORA_EMU_STICKY_CHECK();
        memmove(dst, src, bytes);
        return cudaSuccess;
    }
    std::shared_ptr<CopyWork> work(new CopyWork{dst, src, bytes, {}});
    if (pageable(src)) work->staged.assign((const unsigned char *)src, (const unsigned char *)src + bytes);
    enqueue(s, run_copy, std::static_pointer_cast<void>(work));
    return cudaSuccess;
}
}  // namespace

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
    std::lock_guard<std::mutex> guard(g_lock);
    RELORA_EMU_STICKY_CHECK();
    if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaMemcpy on an unknown stream", false);
    if (bytes == 0) return cudaSuccess;
    if (!dst || !src) return fail(cudaErrorInvalidValue, "cudaMemcpy with a null pointer", false);
    bool dst_device = false, src_device = false;
    switch (kind) {
    case cudaMemcpyHostToHost: break;
    case cudaMemcpyHostToDevice: dst_device = true; break;
    case cudaMemcpyDeviceToHost: src_device = true; break;
    case cudaMemcpyDeviceToDevice: dst_device = src_device = true; break;
    case cudaMemcpyDefault:
        dst_device = is_device_pointer(dst);
        src_device = is_device_pointer(src);
        break;
    default: return fail(cudaErrorInvalidValue, "cudaMemcpy: unknown kind", false);
    }
    if (dst_device) {
        const cudaError_t e = check_device_range(dst, bytes, "cudaMemcpy destination");
        if (e != cudaSuccess) return e;
    }
    if (src_device) {
        const cudaError_t e = check_device_range(src, bytes, "cudaMemcpy source");
        if (e != cudaSuccess) return e;
    }
    return copy_locked(dst, src, bytes, stream);
}

// The legacy default stream's copy; it returns when the copy is done unless both sides are device memory.
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    count_host_wait();  // the blocking copy waits for the device's queued work
    const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
    if (e != cudaSuccess || bytes == 0) return e;
    std::lock_guard<std::mutex> guard(g_lock);
    bool dst_inside = false, src_inside = false;
    const Allocation *d = find_allocation(dst, 0, &dst_inside), *h = find_allocation(src, 0, &src_inside);
    const bool device_to_device = dst_inside && src_inside && d && h && !d->host && !h->host;
    if (!device_to_device) drain(&g_legacy_stream, g_legacy_stream.enqueued);
    RELORA_EMU_STICKY_CHECK();
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *ptr, int value, size_t bytes, cudaStream_t stream) {
    std::lock_guard<std::mutex> guard(g_lock);
    RELORA_EMU_STICKY_CHECK();
    if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaMemset on an unknown stream", false);
    if (bytes == 0) return cudaSuccess;
    const cudaError_t e = check_device_range(ptr, bytes, "cudaMemset");
    if (e != cudaSuccess) return e;
    ++g_memsets;
    enqueue(stream_of(stream), run_memset, std::shared_ptr<void>(new MemsetWork{ptr, value, bytes}, [](void *m) {
                delete static_cast<MemsetWork *>(m);
            }));
    return cudaSuccess;
}

cudaError_t cudaMemset(void *ptr, int value, size_t bytes) { return cudaMemsetAsync(ptr, value, bytes, nullptr); }

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    std::lock_guard<std::mutex> guard(g_lock);
    RELORA_EMU_STICKY_CHECK();
    if (free_bytes) *free_bytes = total_memory() - g_used;
    if (total_bytes) *total_bytes = total_memory();
    return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int *count) {
    if (count) *count = 1;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
    return device == 0 ? cudaSuccess : fail(cudaErrorInvalidValue, format("cudaSetDevice(%d): the emulation has device 0 only", device), false);
}

cudaError_t cudaGetDevice(int *device) {
    if (device) *device = 0;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device) {
    if (!prop || device != 0) return fail(cudaErrorInvalidValue, "cudaGetDeviceProperties: device 0 only", false);
    std::lock_guard<std::mutex> guard(g_lock);
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "relora CPU emulation (fibers)");
    prop->totalGlobalMem = total_memory();
    prop->sharedMemPerBlock = 48 * 1024;
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    prop->multiProcessorCount = 1;
    prop->major = 8;
    prop->minor = 0;
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
    count_host_wait();
    std::lock_guard<std::mutex> guard(g_lock);
    drain_all();
    RELORA_EMU_STICKY_CHECK();
    return check_all("a kernel (found at synchronization)");
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    count_host_wait();
    std::lock_guard<std::mutex> guard(g_lock);
    if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize on an unknown stream", false);
    relora_emu_stream *s = stream_of(stream);
    drain(s, s->enqueued);
    RELORA_EMU_STICKY_CHECK();
    return check_all("a kernel (found at synchronization)");
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamQuery on an unknown stream", false);
    relora_emu_stream *s = stream_of(stream);
    drain(s, s->enqueued);
    RELORA_EMU_STICKY_CHECK();
    return check_all("a kernel (found at a stream query)");
}

int relora_emu_device_range(const void *p, size_t bytes) {
    std::lock_guard<std::mutex> guard(g_lock);
    bool inside = false;
    if (find_allocation(p, bytes, &inside)) return 0;
    return inside ? 1 : 2;
}

cudaError_t cudaDeviceReset(void) {
    std::lock_guard<std::mutex> guard(g_lock);
    // Queued work is dropped, never run (its arguments are freed).
    g_legacy_stream.queue.clear();
    g_legacy_stream.enqueued = g_legacy_stream.completed = 0;
    for (relora_emu_stream *s : g_stream_order) delete s;
    for (relora_emu_event *e : g_events) delete e;
    g_stream_order.clear();
    g_streams.clear();
    g_events.clear();
    for (auto &entry : g_allocations) free(entry.second.base);
    g_allocations.clear();
    g_used = 0;
    g_sticky = cudaSuccess;
    g_sticky_message.clear();
    t_last = cudaSuccess;
    t_message.clear();
    t_message_code = cudaSuccess;
    return cudaSuccess;
}

namespace {
cudaError_t create_stream(cudaStream_t *stream, bool blocking) {
    std::lock_guard<std::mutex> guard(g_lock);
    RELORA_EMU_STICKY_CHECK();
    if (!stream) return fail(cudaErrorInvalidValue, "cudaStreamCreate: null result pointer", false);
    relora_emu_stream *s = new relora_emu_stream;
    s->blocking = blocking;
    g_streams.insert(s);
    g_stream_order.push_back(s);
    *stream = s;
    return cudaSuccess;
}
}  // namespace

cudaError_t cudaStreamCreate(cudaStream_t *stream) { return create_stream(stream, true); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags) {
    if (flags & ~(unsigned)cudaStreamNonBlocking) {
        std::lock_guard<std::mutex> guard(g_lock);
        return fail(cudaErrorInvalidValue, "cudaStreamCreateWithFlags: unknown flags", false);
    }
    return create_stream(stream, (flags & cudaStreamNonBlocking) == 0);
}

// CUDA lets the stream's queued work finish after the call returns; the emulation runs it now. The stream's
// record stays (events recorded on it may still be waited for); its handle is no longer valid.
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (!stream || !g_streams.erase(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy: unknown stream", false);
    drain(stream, stream->enqueued);
    return cudaSuccess;
}

// Later work on `stream` waits for the work the event's latest record captured (nothing if never recorded).
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
    (void)flags;
    std::lock_guard<std::mutex> guard(g_lock);
    if (!valid_stream(stream) || !g_events.count(event)) {
        return fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent: unknown stream or event", false);
    }
    relora_emu_stream *s = stream_of(stream), *t = event->stream;
    if (t && t != s && t->completed < event->position) push(s, Work{nullptr, nullptr, t, event->position});
    return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *event) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (!event) return fail(cudaErrorInvalidValue, "cudaEventCreate: null result pointer", false);
    relora_emu_event *e = new relora_emu_event;
    g_events.insert(e);
    *event = e;
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags) {
    if (flags & ~(unsigned)cudaEventDisableTiming) {
        std::lock_guard<std::mutex> guard(g_lock);
        return fail(cudaErrorInvalidValue, "cudaEventCreateWithFlags: unknown flags", false);
    }
    const cudaError_t e = cudaEventCreate(event);
    if (e == cudaSuccess && (flags & cudaEventDisableTiming)) {
        std::lock_guard<std::mutex> guard(g_lock);
        (*event)->timing = false;
    }
    return e;
}

// Waits already enqueued keep the position they captured.
cudaError_t cudaEventDestroy(cudaEvent_t event) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (!event || !g_events.erase(event)) return fail(cudaErrorInvalidResourceHandle, "cudaEventDestroy: unknown event", false);
    delete event;
    return cudaSuccess;
}

// The event captures the work enqueued on the stream so far. A timing event also enqueues an item that
// stamps the host clock when the stream runs it: the time the work before it finished, as the queue ran it.
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (!g_events.count(event) || !valid_stream(stream)) {
        return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord: unknown event or stream", false);
    }
    event->stream = stream_of(stream);
    if (event->timing) {
        event->stamp = std::make_shared<double>(-1.0);
        enqueue(event->stream, [](void *stamp) {
            *static_cast<double *>(stamp) =
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
        }, event->stamp);
    }
    event->position = event->stream->enqueued;
    return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    count_host_wait();
    std::lock_guard<std::mutex> guard(g_lock);
    if (!g_events.count(event)) return fail(cudaErrorInvalidResourceHandle, "cudaEventSynchronize: unknown event", false);
    if (event->stream) drain(event->stream, event->position);
    RELORA_EMU_STICKY_CHECK();
    return cudaSuccess;
}

// The host time between the two records' stamps, i.e. of the work the queues ran between them (kernels run
// on the host). As CUDA: cudaErrorNotReady while either has work still queued; an event without timing
// (cudaEventDisableTiming) or never recorded is an invalid handle.
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (!ms || !g_events.count(start) || !g_events.count(end)) {
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: unknown event", false);
    }
    for (const relora_emu_event *e : {start, end}) {
        if (!e->timing) {
            return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event created with cudaEventDisableTiming", false);
        }
        if (!e->stamp) return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event that was never recorded", false);
        if (e->stream->completed < e->position || *e->stamp < 0) {  // (a stamp after a kernel fault never runs)
            return fail(cudaErrorNotReady, "cudaEventElapsedTime: an event's work has not run yet (synchronize it first)", false);
        }
    }
    *ms = (float)(*end->stamp - *start->stamp);
    return cudaSuccess;
}

// ---- Stream controls (cuda_emu.h) ----
void relora_emu_set_stream_order(int order) {
    std::lock_guard<std::mutex> guard(g_lock);
    drain_all();
    g_order = order == RELORA_EMU_STREAMS_EAGER || order == RELORA_EMU_STREAMS_REVERSE ? order : RELORA_EMU_STREAMS_DEFERRED;
}

int relora_emu_stream_order(void) {
    std::lock_guard<std::mutex> guard(g_lock);
    return stream_order();
}

uint64_t relora_emu_pending_work(void) {
    std::lock_guard<std::mutex> guard(g_lock);
    return pending_items();
}

cudaError_t relora_emu_enqueue(cudaStream_t stream, void (*run)(void *), void (*destroy)(void *), void *context) {
    std::shared_ptr<void> owned(context, destroy);
    std::lock_guard<std::mutex> guard(g_lock);
    if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle, "work enqueued on an unknown stream", false);
    enqueue(stream_of(stream), run, std::move(owned));
    return cudaSuccess;
}

cudaError_t relora_emu_stream_drain(cudaStream_t stream) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (!valid_stream(stream)) return fail(cudaErrorInvalidResourceHandle, "an unknown stream", false);
    relora_emu_stream *s = stream_of(stream);
    drain(s, s->enqueued);
    RELORA_EMU_STICKY_CHECK();
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (g_sticky != cudaSuccess) return g_sticky;
    const cudaError_t e = t_last;
    t_last = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) {
    std::lock_guard<std::mutex> guard(g_lock);
    return g_sticky != cudaSuccess ? g_sticky : t_last;
}

const char *cudaGetErrorString(cudaError_t error) {
    std::lock_guard<std::mutex> guard(g_lock);
    if (error != cudaSuccess && error == g_sticky) return g_sticky_message.c_str();
    if (error != cudaSuccess && error == t_message_code) return t_message.c_str();
    return generic_text(error);
}

}  // extern "C"
