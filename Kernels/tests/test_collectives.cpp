// The collective entries (nccl_*) and set_device, through the ABI table (run_collectives_suite, called once
// by test_kernels.cpp's main, not under every schedule).
//
// On the emulation, ranks are processes: rank 0 runs in this process, ranks 1..n-1 in children made with
// fork() before any communicator exists, each with its own communicator over loopback TCP (emu/nccl_emu.cpp).
// A child reports one sentence through a pipe ("" when every check passed) and ends with _exit. Checked:
// - all_gather, all_to_all, broadcast from every root, an in-place all_gather, sizes 1, 1000 and 3 MiB + 7
//   bytes, byte for byte: byte i of what rank a sends to rank b is pattern(a, b, i), a hash, so a block
//   from the wrong rank, for the wrong rank, or shifted shows as a wrong byte; receive buffers are
//   pre-filled with a byte the pattern cannot be told from only by chance (a check covers all of them);
// - zero-byte calls (null buffers allowed) succeed and leave the communicator working;
// - 2 ranks from nccl_unique_id's id (passed to the children as the bytes an MPI broadcast would carry),
//   3 ranks from NCCL_COMM_ID=127.0.0.1:<free port> (every rank computes the id itself: identical bytes),
//   1 rank in process;
// - failures end within the timeout, never hang: a rank that exits right after init (the others'
//   all_gather fails with RELORA_ERR_COMMUNICATION naming a rank that closed its connection, then every call
//   on the aborted communicator fails at once); a rank that stops (alive, sockets open) makes its peer's
//   broadcast fail after the 0.5 s timeout; a rank 0 alone, and a rank 1 whose rank 0 never listens, fail
//   nccl_init after the timeout; a rank joining with another nranks is refused on both sides at once;
// - argument checks (no NCCL call, the communicator stays usable), a host pointer (NCCL's own check, which
//   aborts the communicator), nccl_version, set_device and device_properties;
// - a second stream ordered by an event, and timing events (event_elapsed).
//
// On a CUDA build (test_kernels_cuda): fork() after CUDA is initialised is not supported, so only the
// in-process checks run: RELORA_NCCL_LIB=/nonexistent gives RELORA_ERR_UNAVAILABLE with its sentence (the
// failure is not cached, so the next call loads the real NCCL), then, where NCCL loads, the 1-rank
// communicator. The multi-rank path on GPUs is the training run's (docs/distributed.md).
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>

#include "../emu/emu_format.h"
#include "harness.h"

namespace {

using harness::api;
using harness::record;

using relora_emu_text::format;

// Byte i of what rank a sends to rank b (b = kAll: the same bytes for every rank).
constexpr uint64_t kAll = 0xA11;
uint8_t pattern(uint64_t a, uint64_t b, uint64_t i) {
    uint64_t x = (a + 1) * 0x9E3779B97F4A7C15ull ^ (b + 7) * 0xC2B2AE3D27D4EB4Full ^ i * 0x165667B19E3779F9ull;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    return (uint8_t)x;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// Device memory for a rank (no harness::Buffer: its failure path calls exit(), not for a child).
struct Device {
    void *ptr = nullptr;
    int64_t bytes = 0;
    explicit Device(int64_t n) : bytes(n) {
        if (api.malloc(&ptr, n) != RELORA_OK) ptr = nullptr;
    }
    ~Device() { api.free(ptr); }
    Device(const Device &) = delete;
    Device &operator=(const Device &) = delete;
    bool upload(const std::vector<uint8_t> &host, int64_t offset = 0) const {
        return api.memcpy((char *)ptr + offset, host.data(), (int64_t)host.size(), RELORA_MEMCPY_HOST_TO_DEVICE, nullptr) ==
                   RELORA_OK &&
               api.stream_synchronize(nullptr) == RELORA_OK;
    }
    std::vector<uint8_t> download() const {
        std::vector<uint8_t> host((size_t)bytes);
        if (api.memcpy(host.data(), ptr, bytes, RELORA_MEMCPY_DEVICE_TO_HOST, nullptr) != RELORA_OK ||
            api.stream_synchronize(nullptr) != RELORA_OK) {
            host.clear();
        }
        return host;
    }
};

std::vector<uint8_t> block(uint64_t a, uint64_t b, size_t n) {
    std::vector<uint8_t> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = pattern(a, b, i);
    return v;
}

// "" when got[offset + i] == pattern(a, b, i) for i < n; else the first wrong byte.
std::string compare(const std::vector<uint8_t> &got, size_t offset, uint64_t a, uint64_t b, size_t n, const char *what) {
    if (got.size() < offset + n) return format("%s: the download failed (%s)", what, api.last_error());
    for (size_t i = 0; i < n; ++i) {
        if (got[offset + i] != pattern(a, b, i)) {
            return format("%s: byte %zu of the block from rank %llu is 0x%02x, want 0x%02x", what, i, (unsigned long long)a,
                          got[offset + i], pattern(a, b, i));
        }
    }
    return "";
}

#define RANK_CHECK(cond, ...)                                  \
    do {                                                       \
        if (!(cond)) return format(__VA_ARGS__);               \
    } while (0)
#define RANK_OK(call, what)                                                                                      \
    do {                                                                                                         \
        const relora_status s_ = (call);                                                                         \
        if (s_ != RELORA_OK) return format("rank %d: %s returned %d: %s", rank, what, (int)s_, api.last_error()); \
    } while (0)
#define RANK_TRY(expr)                      \
    do {                                    \
        const std::string e_ = (expr);      \
        if (!e_.empty()) return e_;         \
    } while (0)

// A rank's program: "" when all its checks passed, else one sentence.
using Program = std::function<std::string(int rank)>;

// Runs `program` as ranks 0..nranks-1: rank 0 here, the others in forked children. Returns each rank's
// sentence; a child that does not finish in 30 s is killed (a hang is a failure, never a stuck test).
std::vector<std::string> run_ranks(int nranks, const Program &program) {
    std::vector<std::string> results((size_t)nranks);
    std::vector<pid_t> pids((size_t)nranks, -1);
    std::vector<int> pipes((size_t)nranks, -1);
    fflush(stdout);
    fflush(stderr);
    for (int q = 1; q < nranks; ++q) {
        int fds[2];
        if (pipe(fds) != 0) {
            results[(size_t)q] = format("pipe failed: %s", strerror(errno));
            continue;
        }
        const pid_t pid = fork();
        if (pid == 0) {
            close(fds[0]);
            const std::string r = program(q);
            if (write(fds[1], r.data(), r.size()) < 0) _exit(3);
            _exit(r.empty() ? 0 : 1);
        }
        close(fds[1]);
        if (pid < 0) {
            close(fds[0]);
            results[(size_t)q] = format("fork failed: %s", strerror(errno));
            continue;
        }
        pids[(size_t)q] = pid;
        pipes[(size_t)q] = fds[0];
    }
    results[0] = program(0);
    const auto start = std::chrono::steady_clock::now();
    for (int q = 1; q < nranks; ++q) {
        if (pids[(size_t)q] < 0) continue;
        std::string text;
        char buf[512];
        for (;;) {
            const double left = 30.0 - seconds_since(start);
            pollfd p{pipes[(size_t)q], POLLIN, 0};
            if (left <= 0 || poll(&p, 1, (int)(left * 1000) + 1) == 0) {
                kill(pids[(size_t)q], SIGKILL);
                text = format("rank %d did not finish in 30 s (killed)", q);
                break;
            }
            const ssize_t k = read(pipes[(size_t)q], buf, sizeof buf);
            if (k <= 0) break;
            text.append(buf, (size_t)k);
        }
        close(pipes[(size_t)q]);
        int status = 0;
        waitpid(pids[(size_t)q], &status, 0);
        if (text.empty() && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
            text = format("rank %d ended with status 0x%x", q, status);
        }
        results[(size_t)q] = text;
    }
    return results;
}

bool record_ranks(const char *name, const std::vector<std::string> &results, const char *detail) {
    std::string failures;
    for (const std::string &r : results) {
        if (!r.empty()) failures += (failures.empty() ? "" : " | ") + r;
    }
    record(failures.empty(), name, "%s", failures.empty() ? detail : failures.c_str());
    return failures.empty();
}

// A port on 127.0.0.1 that nothing listens on (bound, read, released).
int free_port() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof a;
    if (fd < 0 || bind(fd, (sockaddr *)&a, sizeof a) != 0 || getsockname(fd, (sockaddr *)&a, &length) != 0) {
        if (fd >= 0) close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

// Every data entry at every size on an initialised communicator, checked byte for byte.
std::string exercise(void *comm, int rank, int nranks, const std::vector<int64_t> &sizes) {
    for (int64_t bytes : sizes) {
        const size_t n = (size_t)bytes;
        // all_gather: block q of receive = rank q's bytes.
        {
            Device send(bytes), receive(bytes * nranks);
            RANK_CHECK(send.ptr && receive.ptr, "rank %d: cannot allocate %lld bytes", rank, (long long)bytes);
            RANK_CHECK(send.upload(block((uint64_t)rank, kAll, n)), "rank %d: upload failed", rank);
            RANK_OK(api.nccl_all_gather(comm, send.ptr, receive.ptr, bytes, nullptr), "nccl_all_gather");
            RANK_OK(api.nccl_wait(comm, nullptr), "nccl_wait");
            const std::vector<uint8_t> got = receive.download();
            for (int q = 0; q < nranks; ++q) {
                RANK_TRY(compare(got, (size_t)q * n, (uint64_t)q, kAll, n,
                                 format("rank %d, all_gather of %lld bytes", rank, (long long)bytes).c_str()));
            }
        }
        // all_to_all: block p of send goes to rank p; block q of receive comes from rank q.
        {
            Device send(bytes * nranks), receive(bytes * nranks);
            RANK_CHECK(send.ptr && receive.ptr, "rank %d: cannot allocate %lld bytes", rank, (long long)(bytes * nranks));
            for (int p = 0; p < nranks; ++p) {
                RANK_CHECK(send.upload(block((uint64_t)rank, (uint64_t)p, n), (int64_t)p * bytes), "rank %d: upload failed", rank);
            }
            RANK_OK(api.nccl_all_to_all(comm, send.ptr, receive.ptr, bytes, nullptr), "nccl_all_to_all");
            RANK_OK(api.nccl_wait(comm, nullptr), "nccl_wait");
            const std::vector<uint8_t> got = receive.download();
            for (int q = 0; q < nranks; ++q) {
                RANK_TRY(compare(got, (size_t)q * n, (uint64_t)q, (uint64_t)rank, n,
                                 format("rank %d, all_to_all of %lld-byte blocks", rank, (long long)bytes).c_str()));
            }
        }
        // broadcast from every root, in place; the other ranks start with the root's bytes shifted by one.
        for (int root = 0; root < nranks; ++root) {
            Device buffer(bytes);
            RANK_CHECK(buffer.ptr, "rank %d: cannot allocate %lld bytes", rank, (long long)bytes);
            std::vector<uint8_t> start = block((uint64_t)root, 0xB0, n + 1);
            if (rank != root) start.erase(start.begin());
            start.resize(n);
            RANK_CHECK(buffer.upload(start), "rank %d: upload failed", rank);
            RANK_OK(api.nccl_broadcast(comm, buffer.ptr, bytes, root, nullptr), "nccl_broadcast");
            RANK_OK(api.nccl_wait(comm, nullptr), "nccl_wait");
            RANK_TRY(compare(buffer.download(), 0, (uint64_t)root, 0xB0, n,
                             format("rank %d, broadcast of %lld bytes from rank %d", rank, (long long)bytes, root).c_str()));
        }
    }
    // In place: send is this rank's block of receive (NCCL's in-place all_gather).
    {
        const int64_t bytes = 4099;
        Device receive(bytes * nranks);
        RANK_CHECK(receive.ptr, "rank %d: cannot allocate", rank);
        RANK_CHECK(receive.upload(block((uint64_t)rank, kAll, (size_t)bytes), rank * bytes), "rank %d: upload failed", rank);
        RANK_OK(api.nccl_all_gather(comm, (char *)receive.ptr + rank * bytes, receive.ptr, bytes, nullptr),
                "in-place nccl_all_gather");
        RANK_OK(api.nccl_wait(comm, nullptr), "nccl_wait");
        const std::vector<uint8_t> got = receive.download();
        for (int q = 0; q < nranks; ++q) {
            RANK_TRY(compare(got, (size_t)q * (size_t)bytes, (uint64_t)q, kAll, (size_t)bytes,
                             format("rank %d, in-place all_gather", rank).c_str()));
        }
    }
    // Zero bytes: nothing to do, null buffers allowed, the communicator still works after.
    RANK_OK(api.nccl_all_gather(comm, nullptr, nullptr, 0, nullptr), "nccl_all_gather of 0 bytes");
    RANK_OK(api.nccl_all_to_all(comm, nullptr, nullptr, 0, nullptr), "nccl_all_to_all of 0 bytes");
    RANK_OK(api.nccl_broadcast(comm, nullptr, 0, nranks - 1, nullptr), "nccl_broadcast of 0 bytes");
    RANK_OK(api.nccl_wait(comm, nullptr), "nccl_wait after zero-byte calls");
    {
        Device send(3), receive(3 * nranks);
        RANK_CHECK(send.upload(block((uint64_t)rank, kAll, 3)), "rank %d: upload failed", rank);
        RANK_OK(api.nccl_all_gather(comm, send.ptr, receive.ptr, 3, nullptr), "nccl_all_gather after zero-byte calls");
        RANK_OK(api.nccl_wait(comm, nullptr), "nccl_wait");
        const std::vector<uint8_t> got = receive.download();
        for (int q = 0; q < nranks; ++q) RANK_TRY(compare(got, (size_t)q * 3, (uint64_t)q, kAll, 3, "all_gather after zero bytes"));
    }
    return "";
}

const std::vector<int64_t> kSizes = {1, 1000, (3 << 20) + 7};

bool test_data(int nranks, bool comm_id) {
    uint8_t id[RELORA_NCCL_ID_BYTES];
    char env[64] = "";
    if (comm_id) {
        const int port = free_port();
        snprintf(env, sizeof env, "127.0.0.1:%d", port);
        setenv("NCCL_COMM_ID", env, 1);
    }
    if (api.nccl_unique_id(id) != RELORA_OK) {
        record(false, "collectives: nccl_unique_id", "%s", api.last_error());
        if (comm_id) unsetenv("NCCL_COMM_ID");
        return false;
    }
    const auto start = std::chrono::steady_clock::now();
    const std::vector<std::string> results = run_ranks(nranks, [&](int rank) -> std::string {
        uint8_t mine[RELORA_NCCL_ID_BYTES];
        memcpy(mine, id, sizeof mine);
        if (comm_id && rank > 0) {  // every rank makes the id from NCCL_COMM_ID: the same bytes
            RANK_OK(api.nccl_unique_id(mine), "nccl_unique_id");
            RANK_CHECK(memcmp(mine, id, sizeof mine) == 0, "rank %d: its NCCL_COMM_ID id differs from rank 0's", rank);
        }
        void *comm = nullptr;
        RANK_OK(api.nccl_init(&comm, mine, nranks, rank, 10.0), "nccl_init");
        const std::string r = exercise(comm, rank, nranks, kSizes);
        if (!r.empty()) {
            api.nccl_abort(comm);
            return r;
        }
        RANK_OK(api.nccl_destroy(comm), "nccl_destroy");
        return "";
    });
    if (comm_id) unsetenv("NCCL_COMM_ID");
    const std::string name = format("collectives: %d rank%s, %s", nranks, nranks > 1 ? "s" : "",
                                    comm_id ? "NCCL_COMM_ID" : "unique id");
    const std::string detail = format("%s all_gather, all_to_all, broadcast from every root at 1, 1000 and %lld bytes, "
                                      "in place, zero bytes: byte for byte (%.2f s)",
                                      comm_id ? env : "", (long long)kSizes.back(), seconds_since(start));
    return record_ranks(name.c_str(), results, detail.c_str());
}

// "" when `status` is `want` and the message contains every one of `words`.
std::string expect_failure(int rank, const char *what, relora_status status, relora_status want,
                           std::initializer_list<const char *> words) {
    const std::string message = api.last_error();
    if (status != want) return format("rank %d: %s returned %d (want %d): %s", rank, what, (int)status, (int)want, message.c_str());
    for (const char *w : words) {
        if (message.find(w) == std::string::npos) {
            return format("rank %d: %s: the message does not say '%s': %s", rank, what, w, message.c_str());
        }
    }
    return "";
}

// A rank that exits right after init: the others' all_gather fails at once (not at the timeout) naming a
// rank that closed its connection (rank 2, or the other survivor if it noticed first and aborted), and
// every later call on the aborted communicator fails without touching the network.
bool test_dead_peer() {
    const int nranks = 3;
    const double timeout = 5.0;
    uint8_t id[RELORA_NCCL_ID_BYTES];
    if (api.nccl_unique_id(id) != RELORA_OK) return false;
    std::string sentence;
    const std::vector<std::string> results = run_ranks(nranks, [&](int rank) -> std::string {
        void *comm = nullptr;
        RANK_OK(api.nccl_init(&comm, id, nranks, rank, timeout), "nccl_init");
        if (rank == 2) _exit(0);  // dies before the collective, sockets closed by the kernel
        Device send(65536), receive(65536 * nranks);
        const auto start = std::chrono::steady_clock::now();
        relora_status s = api.nccl_all_gather(comm, send.ptr, receive.ptr, 65536, nullptr);
        if (s == RELORA_OK) s = api.nccl_wait(comm, nullptr);
        const double elapsed = seconds_since(start);
        if (rank == 0) sentence = api.last_error();
        RANK_TRY(expect_failure(rank, "nccl_all_gather with a dead rank", s, RELORA_ERR_COMMUNICATION,
                                {"closed its connection", "aborted"}));
        RANK_CHECK(elapsed < timeout, "rank %d: the failure took %.2f s, the timeout is %g s", rank, elapsed, timeout);
        s = api.nccl_broadcast(comm, send.ptr, 65536, 0, nullptr);
        RANK_TRY(expect_failure(rank, "a call after the abort", s, RELORA_ERR_COMMUNICATION, {"aborted earlier"}));
        RANK_OK(api.nccl_abort(comm), "nccl_abort");
        return "";
    });
    return record_ranks("collectives: a rank exits after init (3 ranks)", results,
                        format("ranks 0 and 1 fail at once: \"%s\"", sentence.c_str()).c_str());
}

// A rank that stops (alive, connections open): its peer's broadcast from it fails after the timeout.
// The stopped rank then resumes and finds rank 0 gone (an all_gather needs rank 0's bytes).
bool test_stopped_peer() {
    const double timeout = 0.5;
    uint8_t id[RELORA_NCCL_ID_BYTES];
    if (api.nccl_unique_id(id) != RELORA_OK) return false;
    int resume[2];
    if (pipe(resume) != 0) return false;
    double elapsed = 0;
    std::string sentence;
    const std::vector<std::string> results = run_ranks(2, [&](int rank) -> std::string {
        void *comm = nullptr;
        RANK_OK(api.nccl_init(&comm, id, 2, rank, timeout), "nccl_init");
        Device buffer(1 << 16), receive(2 << 16);
        if (rank == 0) {
            const auto start = std::chrono::steady_clock::now();
            relora_status s = api.nccl_broadcast(comm, buffer.ptr, 1 << 16, 1, nullptr);
            if (s == RELORA_OK) s = api.nccl_wait(comm, nullptr);
            elapsed = seconds_since(start);
            sentence = api.last_error();
            const char byte = 1;
            const bool told = write(resume[1], &byte, 1) == 1;
            RANK_TRY(expect_failure(0, "nccl_broadcast from a stopped rank", s, RELORA_ERR_COMMUNICATION,
                                    {"no collective progress in 0.5 s", "aborted"}));
            RANK_CHECK(elapsed >= timeout && elapsed < timeout + 4.5, "rank 0: the timeout took %.2f s (%g s set)", elapsed, timeout);
            RANK_CHECK(told, "rank 0: cannot resume rank 1");
            RANK_OK(api.nccl_abort(comm), "nccl_abort");
            return "";
        }
        pollfd p{resume[0], POLLIN, 0};
        char byte = 0;
        RANK_CHECK(poll(&p, 1, 20000) == 1 && read(resume[0], &byte, 1) == 1, "rank 1: rank 0 never said to resume");
        const relora_status s = api.nccl_all_gather(comm, buffer.ptr, receive.ptr, 1 << 16, nullptr);
        RANK_TRY(expect_failure(1, "nccl_all_gather after rank 0 aborted", s, RELORA_ERR_COMMUNICATION,
                                {"rank 0 closed its connection"}));
        RANK_OK(api.nccl_abort(comm), "nccl_abort");
        return "";
    });
    close(resume[0]);
    close(resume[1]);
    return record_ranks("collectives: a stopped rank times out (0.5 s)", results,
                        format("rank 0 after %.2f s: \"%s\"", elapsed, sentence.c_str()).c_str());
}

// nccl_init gives up after its timeout: rank 0 whose peer never comes, and rank 1 whose rank 0 never listens.
bool test_init_timeouts() {
    const double timeout = 0.4;
    bool ok = true;
    uint8_t id[RELORA_NCCL_ID_BYTES];
    for (int rank = 0; rank < 2; ++rank) {
        if (rank == 1) {
            char env[64];
            snprintf(env, sizeof env, "127.0.0.1:%d", free_port());
            setenv("NCCL_COMM_ID", env, 1);
        }
        relora_status s = api.nccl_unique_id(id);
        if (rank == 1) unsetenv("NCCL_COMM_ID");
        void *comm = (void *)&id;  // must come back null
        const auto start = std::chrono::steady_clock::now();
        if (s == RELORA_OK) s = api.nccl_init(&comm, id, 2, rank, timeout);
        const double elapsed = seconds_since(start);
        std::string why = expect_failure(rank, "nccl_init alone", s, RELORA_ERR_COMMUNICATION,
                                         {"not formed in 0.4 s", "did not join"});
        if (why.empty() && comm != nullptr) why = "the communicator pointer was not cleared";
        if (why.empty() && !(elapsed >= timeout && elapsed < timeout + 4.5)) why = format("it took %.2f s", elapsed);
        record(why.empty(), rank == 0 ? "collectives: nccl_init times out, rank 0 alone" : "collectives: nccl_init times out, no rank 0",
               "%.2f s: %s", elapsed, why.empty() ? api.last_error() : why.c_str());
        ok &= why.empty();
    }
    return ok;
}

// Rank 1 joins with nranks 3 where rank 0 has 2: both refuse at once (not at the timeout).
bool test_mismatched_nranks() {
    uint8_t id[RELORA_NCCL_ID_BYTES];
    if (api.nccl_unique_id(id) != RELORA_OK) return false;
    std::string sentence;
    const std::vector<std::string> results = run_ranks(2, [&](int rank) -> std::string {
        void *comm = nullptr;
        const auto start = std::chrono::steady_clock::now();
        const relora_status s = api.nccl_init(&comm, id, rank == 0 ? 2 : 3, rank, 5.0);
        const double elapsed = seconds_since(start);
        if (rank == 0) sentence = api.last_error();
        RANK_TRY(expect_failure(rank, "nccl_init with another nranks", s, RELORA_ERR_INVALID_ARGUMENT,
                                {rank == 0 ? "joined with nranks 3" : "refused", "aborted"}));
        RANK_CHECK(comm == nullptr, "rank %d: a communicator came back", rank);
        RANK_CHECK(elapsed < 4.0, "rank %d: the refusal took %.2f s", rank, elapsed);
        return "";
    });
    return record_ranks("collectives: mismatched nranks refused", results, format("rank 0: \"%s\"", sentence.c_str()).c_str());
}

// Argument checks (no NCCL call: the communicator stays usable), then a buffer that is not device memory
// (NCCL's check: the communicator is aborted).
bool test_arguments(bool emulated) {
    uint8_t id[RELORA_NCCL_ID_BYTES] = {0};
    void *comm = nullptr;
    const relora_status a = api.nccl_init(nullptr, id, 1, 0, 1.0);
    const relora_status b = api.nccl_init(&comm, id, 2, 2, 1.0);
    const relora_status c = api.nccl_init(&comm, id, 0, 0, 1.0);
    const relora_status d = api.nccl_init(&comm, id, 1, 0, 0.0);
    const relora_status e = api.nccl_init(&comm, id, 1, 0, NAN);
    const relora_status f = api.nccl_all_gather(nullptr, nullptr, nullptr, 0, nullptr);
    const relora_status g = api.nccl_wait(nullptr, nullptr);
    const bool rejected = a == RELORA_ERR_INVALID_ARGUMENT && b == RELORA_ERR_INVALID_ARGUMENT &&
                          c == RELORA_ERR_INVALID_ARGUMENT && d == RELORA_ERR_INVALID_ARGUMENT &&
                          e == RELORA_ERR_INVALID_ARGUMENT && f == RELORA_ERR_INVALID_ARGUMENT &&
                          g == RELORA_ERR_INVALID_ARGUMENT && comm == nullptr;
    record(rejected, "collectives: nccl_init and a null communicator rejected", "%d %d %d %d %d %d %d (last: %s)", a, b, c, d, e,
           f, g, api.last_error());
    if (api.nccl_unique_id(id) != RELORA_OK || api.nccl_init(&comm, id, 1, 0, 5.0) != RELORA_OK) {
        record(false, "collectives: a 1-rank communicator", "%s", api.last_error());
        return false;
    }
    Device buffer(64), receive(64);
    const relora_status h = api.nccl_all_gather(comm, buffer.ptr, receive.ptr, -1, nullptr);
    const relora_status i = api.nccl_broadcast(comm, buffer.ptr, 64, 1, nullptr);
    const relora_status j = api.nccl_broadcast(comm, buffer.ptr, 64, -1, nullptr);
    const relora_status k = api.nccl_all_to_all(comm, nullptr, receive.ptr, 8, nullptr);
    const relora_status still = api.nccl_broadcast(comm, buffer.ptr, 64, 0, nullptr);
    const bool checked = h == RELORA_ERR_INVALID_ARGUMENT && i == RELORA_ERR_INVALID_ARGUMENT &&
                         j == RELORA_ERR_INVALID_ARGUMENT && k == RELORA_ERR_INVALID_ARGUMENT &&
                         still == RELORA_OK;
    record(checked, "collectives: argument checks keep the communicator", "%d %d %d %d, then %d", h, i, j, k, still);
    bool ok = rejected && checked;
    if (emulated) {  // a host array where device memory is due: NCCL's own check, which aborts the communicator
        char host[64];
        const relora_status m = api.nccl_broadcast(comm, host, 64, 0, nullptr);
        const std::string why = expect_failure(0, "a host buffer", m, RELORA_ERR_INVALID_ARGUMENT, {"not device memory", "aborted"});
        const relora_status n = api.nccl_broadcast(comm, buffer.ptr, 64, 0, nullptr);
        const bool aborted = why.empty() && n == RELORA_ERR_COMMUNICATION && strstr(api.last_error(), "aborted earlier");
        record(aborted, "collectives: a host buffer is refused by NCCL, aborting", "%s", why.empty() ? api.last_error() : why.c_str());
        ok &= aborted;
        ok &= api.nccl_destroy(comm) == RELORA_OK;  // an aborted communicator is only freed
    } else {
        ok &= api.nccl_destroy(comm) == RELORA_OK;
    }
    return ok;
}

bool test_devices(bool emulated) {
    const relora_status a = api.set_device(0);
    relora_device_properties props;
    const relora_status b = api.device_properties(&props);
    int count = 0;
    api.device_count(&count);
    const relora_status c = api.set_device(count);
    const std::string message = api.last_error();
    const relora_status d = api.set_device(-1);
    const bool ok = a == RELORA_OK && b == RELORA_OK && props.name[0] != 0 && c == RELORA_ERR_INVALID_ARGUMENT &&
                    d == RELORA_ERR_INVALID_ARGUMENT && message.find(format("no device %d", count)) != std::string::npos &&
                    (!emulated || strcmp(props.name, "relora CPU emulation (fibers)") == 0);
    record(ok, "set_device, device_properties of the current device", "set_device(0) %d, '%s'; set_device(%d) %d: %s; (-1) %d", a,
           props.name, count, c, message.c_str(), d);
    return ok;
}

// Timing events (the per-op profile's): the time between two records around 64 MiB of memset is positive
// and under a minute; a timing-free event (event_create) and null arguments are refused, and the library
// works on after the refusal.
bool test_timing_events() {
    const int64_t bytes = 64 << 20;
    void *a = nullptr, *start = nullptr, *end = nullptr, *untimed = nullptr;
    float ms = -1, untimed_ms = -1;
    bool ok = api.malloc(&a, bytes) == RELORA_OK && api.event_create_timing(&start) == RELORA_OK &&
              api.event_create_timing(&end) == RELORA_OK && api.event_create(&untimed) == RELORA_OK &&
              api.event_record(start, nullptr) == RELORA_OK && api.memset(a, 1, bytes, nullptr) == RELORA_OK &&
              api.event_record(end, nullptr) == RELORA_OK && api.event_record(untimed, nullptr) == RELORA_OK &&
              api.event_elapsed(start, end, &ms) == RELORA_OK && ms > 0 && ms < 60e3;
    const relora_status no_timing = api.event_elapsed(start, untimed, &untimed_ms);
    const relora_status null_event = api.event_elapsed(nullptr, end, &ms);
    const relora_status null_result = api.event_elapsed(start, end, nullptr);
    ok &= no_timing != RELORA_OK && null_event == RELORA_ERR_INVALID_ARGUMENT && null_result == RELORA_ERR_INVALID_ARGUMENT;
    ok &= api.memset(a, 0, bytes, nullptr) == RELORA_OK && api.stream_synchronize(nullptr) == RELORA_OK;
    ok &= api.event_destroy(start) == RELORA_OK && api.event_destroy(end) == RELORA_OK && api.event_destroy(untimed) == RELORA_OK;
    api.free(a);
    record(ok, "timing events: event_elapsed around a memset, refusals", "%.3f ms; no timing %d, null %d %d (%s)", ms, (int)no_timing,
           (int)null_event, (int)null_result, api.last_error());
    return ok;
}

// A second (non-blocking) stream ordered after the default stream by an event: what the gradient sums'
// overlap relies on. The default stream fills a with a 1 MiB pattern, records the event; the new stream
// waits for it and copies a into b; synchronizing the new stream alone must give b == the pattern (on a
// GPU a missing wait would let the copy read a before the fill).
bool test_streams_and_events() {
    const int64_t bytes = 1 << 20;
    std::vector<uint8_t> pattern((size_t)bytes), out((size_t)bytes, 0);
    for (size_t i = 0; i < pattern.size(); i++) pattern[i] = (uint8_t)(i * 131 + 7);
    void *a = nullptr, *b = nullptr, *stream = nullptr, *event = nullptr;
    bool ok = api.malloc(&a, bytes) == RELORA_OK && api.malloc(&b, bytes) == RELORA_OK &&
              api.stream_create(&stream) == RELORA_OK && api.event_create(&event) == RELORA_OK &&
              api.memcpy(a, pattern.data(), bytes, RELORA_MEMCPY_HOST_TO_DEVICE, nullptr) == RELORA_OK &&
              api.event_record(event, nullptr) == RELORA_OK && api.stream_wait_event(stream, event) == RELORA_OK &&
              api.memcpy(b, a, bytes, RELORA_MEMCPY_DEVICE_TO_DEVICE, stream) == RELORA_OK &&
              api.stream_synchronize(stream) == RELORA_OK &&
              api.memcpy(out.data(), b, bytes, RELORA_MEMCPY_DEVICE_TO_HOST, stream) == RELORA_OK &&
              api.stream_synchronize(stream) == RELORA_OK && out == pattern;
    const relora_status null_event = api.event_record(nullptr, nullptr);
    ok &= null_event == RELORA_ERR_INVALID_ARGUMENT;
    ok &= api.event_destroy(event) == RELORA_OK && api.stream_destroy(stream) == RELORA_OK;
    api.free(a);
    api.free(b);
    record(ok, "streams: a second stream ordered after the default one by an event", "%s", api.last_error());
    return ok;
}

}  // namespace

bool run_collectives_suite(bool emulated) {
    bool ok = test_devices(emulated);
    ok &= test_streams_and_events();
    ok &= test_timing_events();
#if defined(RELORA_NO_EMULATION_CHECKS)
    // The CUDA build: NCCL from RELORA_NCCL_LIB or libnccl.so.2. A path that cannot be opened gives
    // RELORA_ERR_UNAVAILABLE and its sentence (the emulation has no library to miss, so this runs here only).
    const char *saved = getenv("RELORA_NCCL_LIB");
    const std::string restore = saved ? saved : "";
    setenv("RELORA_NCCL_LIB", "/nonexistent/libnccl.so.2", 1);
    int32_t none = 0;
    const relora_status missing = api.nccl_version(&none);
    const std::string sentence = api.last_error();
    if (saved) setenv("RELORA_NCCL_LIB", restore.c_str(), 1); else unsetenv("RELORA_NCCL_LIB");
    // Already loaded earlier in this process (a cached table) would return OK: then there is nothing to check.
    const bool unavailable = missing == RELORA_OK ||
                             (missing == RELORA_ERR_UNAVAILABLE && sentence.find("NCCL is not available") != std::string::npos &&
                              sentence.find("RELORA_NCCL_LIB") != std::string::npos);
    record(unavailable, "collectives: no NCCL is RELORA_ERR_UNAVAILABLE", "%s", sentence.c_str());
    ok &= unavailable;
#endif
    int32_t version = 0;
    const relora_status v = api.nccl_version(&version);
    if (v == RELORA_ERR_UNAVAILABLE && !emulated) {
        record(true, "collectives: NCCL not installed here, the rest skipped", "%s", api.last_error());
        return ok;
    }
    const bool versioned = v == RELORA_OK && version >= 21400 &&
                           (!emulated || (version == 22809 && strstr(api.last_error(), "emulation")));
    record(versioned, "collectives: nccl_version", "%d: %s", version, api.last_error());
    ok &= versioned;
    ok &= test_arguments(emulated);
    ok &= test_data(1, false);
    if (!emulated) return ok;  // fork() after CUDA is initialised is not supported: one process, one rank
    ok &= test_data(2, false);
    ok &= test_data(3, true);
    ok &= test_dead_peer();
    ok &= test_stopped_peer();
    ok &= test_init_timeouts();
    ok &= test_mismatched_nranks();
    return ok;
}
