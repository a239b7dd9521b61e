// The NCCL stand-in (nccl_emu.h): communicators over TCP between the processes (or threads) of a job.
//
// Each communicator owns one worker thread, which runs its initialisation and then one operation list at a
// time (a group's sends, receives and self copies); the calling thread only enqueues and, for a blocking
// communicator, waits. All waits of the worker are poll() calls that also watch the communicator's wake
// pipe, which ncclCommAbort writes to, so an abort takes effect at once wherever the worker is.
//
// Wire format (host byte order on both ends: the emulation's ranks run on one kind of machine):
//   hello     rank q -> rank 0    {kHello, nranks, q, port of q's listening socket}
//   reply     rank 0 -> rank q    {kTable or kRefused, nranks, 0, 0}, then for kTable nranks {ipv4, port}
//   mesh      rank q -> rank p<q  {kMesh, nranks, q, 0}
//   ready/go  rank q <-> rank 0   {kReady} then {kGo}: every rank has its mesh
//   data      {kData, 0, bytes (64-bit)} then the bytes, for every send of every operation
// Process-wide state: the listening sockets that ncclGetUniqueId keeps for rank 0 (by port, under a mutex)
// and, per thread, the open group and the last error message.
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// After the system headers: cuda_emu.h defines __noinline__ & co., which glibc's and libstdc++'s headers use.
#include "emu_format.h"
#include "nccl_emu.h"

namespace {

// ---- Messages ------------------------------------------------------------------------------------------
thread_local std::string t_last_error;

using relora_emu_text::format;

// Records the calling thread's last error (ncclGetLastError(NULL)) and returns `result`.
ncclResult_t call_error(ncclResult_t result, const std::string &message) {
    t_last_error = message;
    return result;
}

// ---- The unique id ---------------------------------------------------------------------------------------
constexpr char kIdTag[16] = "relora-nccl-emu";
struct IdLayout {
    char tag[16];
    uint32_t ipv4;  // network byte order
    uint16_t port;  // network byte order
};
static_assert(sizeof(IdLayout) <= NCCL_UNIQUE_ID_BYTES, "the address fits in an id");

ncclUniqueId encode_id(uint32_t ipv4, uint16_t port) {
    IdLayout layout;
    memset(&layout, 0, sizeof layout);
    memcpy(layout.tag, kIdTag, sizeof kIdTag);
    layout.ipv4 = ipv4;
    layout.port = port;
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    memcpy(id.internal, &layout, sizeof layout);
    return id;
}

bool decode_id(const ncclUniqueId &id, sockaddr_in *address) {
    IdLayout layout;
    memcpy(&layout, id.internal, sizeof layout);
    if (memcmp(layout.tag, kIdTag, sizeof kIdTag) != 0 || layout.port == 0) return false;
    memset(address, 0, sizeof *address);
    address->sin_family = AF_INET;
    address->sin_addr.s_addr = layout.ipv4;
    address->sin_port = layout.port;
    return true;
}

std::string address_text(const sockaddr_in &a) {
    char host[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &a.sin_addr, host, sizeof host);
    return format("%s:%u", host, (unsigned)ntohs(a.sin_port));
}

// NCCL_COMM_ID=host:port (IPv4 or a name that resolves to one).
ncclResult_t parse_comm_id(const char *text, sockaddr_in *address) {
    const char *colon = strrchr(text, ':');
    char *end = nullptr;
    const long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || colon == text || end == colon + 1 || *end != '\0' || port <= 0 || port > 65535) {
        return call_error(ncclInvalidArgument, format("NCCL_COMM_ID='%s' is not host:port", text));
    }
    const std::string host(text, (size_t)(colon - text));
    addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo *found = nullptr;
    const int e = getaddrinfo(host.c_str(), nullptr, &hints, &found);
    if (e != 0 || !found) {
        return call_error(ncclInvalidArgument,
                          format("NCCL_COMM_ID='%s': cannot resolve %s to an IPv4 address (%s)", text, host.c_str(),
                                 gai_strerror(e)));
    }
    *address = *(const sockaddr_in *)found->ai_addr;
    address->sin_port = htons((uint16_t)port);
    freeaddrinfo(found);
    return ncclSuccess;
}

// Listening sockets made by ncclGetUniqueId, by port, until rank 0's init takes one.
std::mutex g_kept_lock;
std::vector<std::pair<uint16_t, int>> g_kept;  // (port in network order, fd)

int take_kept_listener(uint16_t port) {
    std::lock_guard<std::mutex> guard(g_kept_lock);
    for (size_t i = 0; i < g_kept.size(); ++i) {
        if (g_kept[i].first == port) {
            const int fd = g_kept[i].second;
            g_kept.erase(g_kept.begin() + (long)i);
            return fd;
        }
    }
    return -1;
}

int listen_on(sockaddr_in address, bool reuse) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    const int one = 1;
    if (reuse) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (const sockaddr *)&address, sizeof address) != 0 || listen(fd, SOMAXCONN) != 0) {
        const int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

uint16_t local_port(int fd) {
    sockaddr_in a;
    socklen_t length = sizeof a;
    memset(&a, 0, sizeof a);
    getsockname(fd, (sockaddr *)&a, &length);
    return a.sin_port;
}

// ---- Messages on the wire ----------------------------------------------------------------------------------
enum : uint32_t {
    kHello = 0x524c4801,
    kTable = 0x524c4802,
    kRefused = 0x524c4803,
    kMesh = 0x524c4804,
    kReady = 0x524c4805,
    kGo = 0x524c4806,
    kData = 0x524c4807,
};
struct Control {
    uint32_t kind;
    int32_t nranks;
    int32_t rank;
    uint32_t port;  // network order, in the low 16 bits
};
struct TableEntry {
    uint32_t ipv4;
    uint32_t port;
};
struct DataHeader {
    uint32_t kind;
    uint32_t reserved;
    uint64_t bytes;
};

size_t type_size(ncclDataType_t type) {
    switch (type) {
    case ncclInt8: case ncclUint8: case ncclFloat8e4m3: case ncclFloat8e5m2: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
    }
}

// One send, receive or self copy of an operation list. A send to self and a receive from self are matched
// in order before the network part runs.
struct Transfer {
    enum Kind { kSend, kRecv } kind;
    int peer;
    char *buffer;  // the send's source (never written) or the receive's destination
    size_t bytes;
    size_t done = 0;  // bytes of header + payload moved so far
    DataHeader header{kData, 0, 0};
};

struct GroupEntry {
    ncclComm_t comm;
    Transfer transfer;
};

thread_local int t_group_depth = 0;
thread_local std::vector<GroupEntry> t_group;
thread_local ncclResult_t t_group_error = ncclSuccess;

}  // namespace

// ---- The communicator ------------------------------------------------------------------------------------------
struct ncclComm {
    int nranks = 0, rank = 0;
    bool blocking = true;
    sockaddr_in root{};          // rank 0's address (from the id)
    int kept_listener = -1;      // rank 0: the socket ncclGetUniqueId kept, or -1
    std::vector<int> peers;      // fd per rank (-1 for self)
    int wake[2] = {-1, -1};      // ncclCommAbort writes to wake[1]; every poll watches wake[0]

    std::mutex lock;
    std::condition_variable changed;
    ncclResult_t state = ncclInProgress;  // ncclInProgress while busy; otherwise the last result (errors stick)
    std::string message;                  // the error's sentence
    bool has_job = false, stopping = false;
    std::vector<Transfer> job;
    std::atomic<bool> aborting{false};
    std::thread worker;

    // ---- Worker side ----
    ncclResult_t fail(ncclResult_t result, const std::string &text) {
        std::lock_guard<std::mutex> guard(lock);
        if (message.empty()) message = text;
        return result;
    }

    // Waits until fd is ready for `events`, or the communicator is aborted (ncclInternalError with its
    // sentence), or timeout_ms passes (-1: no timeout; returns ncclInProgress).
    ncclResult_t wait_for(int fd, short events, int timeout_ms = -1) {
        pollfd p[2] = {{fd, events, 0}, {wake[0], POLLIN, 0}};
        for (;;) {
            const int n = poll(p, 2, timeout_ms);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return fail(ncclSystemError, format("poll failed: %s", strerror(errno)));
            if (aborting.load() || (p[1].revents & POLLIN)) return fail(ncclInternalError, "the communicator was aborted");
            return n == 0 ? ncclInProgress : ncclSuccess;
        }
    }

    // peer -1: a rank whose hello has not arrived yet.
    std::string closed(int peer) const {
        if (peer < 0) return "a joining rank closed its connection: it died or aborted";
        return format("rank %d closed its connection: it died or aborted", peer);
    }

    // Moves exactly n bytes on a non-blocking socket, waiting as needed.
    ncclResult_t send_all(int fd, const void *data, size_t n, int peer) {
        const char *p = (const char *)data;
        while (n > 0) {
            const ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
            if (k > 0) {
                p += k;
                n -= (size_t)k;
            } else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                const ncclResult_t r = wait_for(fd, POLLOUT);
                if (r != ncclSuccess) return r;
            } else if (k < 0 && errno == EINTR) {
                continue;
            } else {
                return socket_error(peer, "sending to");
            }
        }
        return ncclSuccess;
    }

    ncclResult_t recv_all(int fd, void *data, size_t n, int peer) {
        char *p = (char *)data;
        while (n > 0) {
            const ssize_t k = recv(fd, p, n, 0);
            if (k > 0) {
                p += k;
                n -= (size_t)k;
            } else if (k == 0) {
                return fail(ncclRemoteError, closed(peer));
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                const ncclResult_t r = wait_for(fd, POLLIN);
                if (r != ncclSuccess) return r;
            } else if (errno != EINTR) {
                return socket_error(peer, "receiving from");
            }
        }
        return ncclSuccess;
    }

    ncclResult_t socket_error(int peer, const char *doing) {
        if (errno == EPIPE || errno == ECONNRESET) return fail(ncclRemoteError, closed(peer));
        return fail(ncclSystemError, format("%s rank %d failed: %s", doing, peer, strerror(errno)));
    }

    // Connects to `address`, retrying while nobody listens there yet, until connected or aborted.
    ncclResult_t connect_to(const sockaddr_in &address, int *out) {
        for (;;) {
            const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) return fail(ncclSystemError, format("socket failed: %s", strerror(errno)));
            int error = 0;
            if (connect(fd, (const sockaddr *)&address, sizeof address) != 0) {
                error = errno;
                if (error == EINPROGRESS) {
                    const ncclResult_t r = wait_for(fd, POLLOUT);
                    if (r != ncclSuccess) {
                        close(fd);
                        return r;
                    }
                    socklen_t length = sizeof error;
                    getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
                }
            }
            if (error == 0) {
                const int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                *out = fd;
                return ncclSuccess;
            }
            close(fd);
            if (error != ECONNREFUSED && error != ETIMEDOUT && error != ENETUNREACH && error != EHOSTUNREACH) {
                return fail(ncclSystemError, format("cannot connect to %s: %s", address_text(address).c_str(), strerror(error)));
            }
            const ncclResult_t r = wait_for(wake[0], 0, 20);  // nobody listens yet: retry in 20 ms
            if (r != ncclInProgress) return r;
        }
    }

    ncclResult_t accept_from(int listener, int *out, sockaddr_in *from) {
        for (;;) {
            socklen_t length = sizeof *from;
            const int fd = accept4(listener, (sockaddr *)from, &length, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd >= 0) {
                const int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                *out = fd;
                return ncclSuccess;
            }
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
                return fail(ncclSystemError, format("accept failed: %s", strerror(errno)));
            }
            const ncclResult_t r = wait_for(listener, POLLIN);
            if (r != ncclSuccess) return r;
        }
    }

    ncclResult_t bootstrap();
    ncclResult_t bootstrap_root();
    ncclResult_t bootstrap_peer();
    ncclResult_t run(std::vector<Transfer> &transfers);
    void work();
};

namespace {

bool loopback(const sockaddr_in &a) { return (ntohl(a.sin_addr.s_addr) >> 24) == 127; }

}  // namespace

// Rank 0: accept every other rank's hello, send the address table, then the barrier.
ncclResult_t ncclComm::bootstrap_root() {
    int listener = kept_listener;
    kept_listener = -1;
    while (listener < 0) {
        listener = listen_on(root, true);
        if (listener >= 0) break;
        if (errno != EADDRINUSE) {
            return fail(ncclSystemError,
                        format("rank 0 cannot listen on %s: %s", address_text(root).c_str(), strerror(errno)));
        }
        const ncclResult_t r = wait_for(wake[0], 0, 20);  // the port is still held: retry in 20 ms
        if (r != ncclInProgress) return r;
    }
    std::vector<TableEntry> table((size_t)nranks, TableEntry{0, 0});
    ncclResult_t result = ncclSuccess;
    for (int joined = 1; joined < nranks && result == ncclSuccess;) {
        int fd = -1;
        sockaddr_in from;
        result = accept_from(listener, &fd, &from);
        if (result != ncclSuccess) break;
        Control hello;
        result = recv_all(fd, &hello, sizeof hello, -1);
        if (result != ncclSuccess) {
            close(fd);
            break;
        }
        std::string refusal;
        if (hello.kind != kHello) {
            refusal = format("a connection from %s is not a rank of the emulation", address_text(from).c_str());
        } else if (hello.nranks != nranks) {
            refusal = format("rank %d joined with nranks %d, but this communicator has %d ranks", hello.rank,
                             hello.nranks, nranks);
        } else if (hello.rank <= 0 || hello.rank >= nranks || peers[(size_t)hello.rank] >= 0) {
            refusal = format("rank %d joined twice or is out of range (nranks %d)", hello.rank, nranks);
        }
        if (!refusal.empty()) {
            const Control no{kRefused, nranks, 0, 0};
            send_all(fd, &no, sizeof no, hello.rank);
            close(fd);
            result = fail(ncclInvalidUsage, refusal);
            break;
        }
        peers[(size_t)hello.rank] = fd;
        table[(size_t)hello.rank] = TableEntry{from.sin_addr.s_addr, hello.port};
        ++joined;
    }
    close(listener);
    if (result != ncclSuccess) return result;
    const Control header{kTable, nranks, 0, 0};
    for (int q = 1; q < nranks && result == ncclSuccess; ++q) {
        result = send_all(peers[(size_t)q], &header, sizeof header, q);
        if (result == ncclSuccess) result = send_all(peers[(size_t)q], table.data(), table.size() * sizeof(TableEntry), q);
    }
    for (int q = 1; q < nranks && result == ncclSuccess; ++q) {
        Control ready;
        result = recv_all(peers[(size_t)q], &ready, sizeof ready, q);
        if (result == ncclSuccess && ready.kind != kReady) result = fail(ncclRemoteError, format("rank %d sent a malformed message", q));
    }
    const Control go{kGo, nranks, 0, 0};
    for (int q = 1; q < nranks && result == ncclSuccess; ++q) result = send_all(peers[(size_t)q], &go, sizeof go, q);
    return result;
}

// Rank q > 0: hello to rank 0 (retrying until it listens), the table, the mesh, the barrier.
ncclResult_t ncclComm::bootstrap_peer() {
    int listener = -1;
    if (rank + 1 < nranks) {  // ranks above this one connect to it
        sockaddr_in any;
        memset(&any, 0, sizeof any);
        any.sin_family = AF_INET;
        any.sin_addr.s_addr = loopback(root) ? htonl(INADDR_LOOPBACK) : htonl(INADDR_ANY);
        listener = listen_on(any, false);
        if (listener < 0) return fail(ncclSystemError, format("rank %d cannot listen: %s", rank, strerror(errno)));
    }
    ncclResult_t result = connect_to(root, &peers[0]);
    const Control hello{kHello, nranks, rank, listener >= 0 ? local_port(listener) : 0u};
    if (result == ncclSuccess) result = send_all(peers[0], &hello, sizeof hello, 0);
    Control reply{0, 0, 0, 0};
    if (result == ncclSuccess) result = recv_all(peers[0], &reply, sizeof reply, 0);
    if (result == ncclSuccess && reply.kind == kRefused) {
        result = fail(ncclInvalidUsage, format("rank 0 refused rank %d: it has nranks %d, this rank was given %d", rank,
                                               reply.nranks, nranks));
    } else if (result == ncclSuccess && (reply.kind != kTable || reply.nranks != nranks)) {
        result = fail(ncclRemoteError, "rank 0 sent a malformed reply");
    }
    std::vector<TableEntry> table((size_t)nranks);
    if (result == ncclSuccess) result = recv_all(peers[0], table.data(), table.size() * sizeof(TableEntry), 0);
    // The mesh: connect to every rank in (0, rank), accept every rank in (rank, nranks).
    for (int p = 1; p < rank && result == ncclSuccess; ++p) {
        sockaddr_in address;
        memset(&address, 0, sizeof address);
        address.sin_family = AF_INET;
        address.sin_addr.s_addr = table[(size_t)p].ipv4;
        address.sin_port = (uint16_t)table[(size_t)p].port;
        result = connect_to(address, &peers[(size_t)p]);
        const Control mesh{kMesh, nranks, rank, 0};
        if (result == ncclSuccess) result = send_all(peers[(size_t)p], &mesh, sizeof mesh, p);
    }
    for (int accepted = rank + 1; accepted < nranks && result == ncclSuccess; ++accepted) {
        int fd = -1;
        sockaddr_in from;
        result = accept_from(listener, &fd, &from);
        Control mesh{0, 0, 0, 0};
        if (result == ncclSuccess) result = recv_all(fd, &mesh, sizeof mesh, -1);
        if (result == ncclSuccess && (mesh.kind != kMesh || mesh.nranks != nranks || mesh.rank <= rank ||
                                      mesh.rank >= nranks || peers[(size_t)mesh.rank] >= 0)) {
            result = fail(ncclRemoteError, format("rank %d got a malformed connection from %s", rank, address_text(from).c_str()));
        }
        if (result == ncclSuccess) {
            peers[(size_t)mesh.rank] = fd;
        } else if (fd >= 0) {
            close(fd);
        }
    }
    if (listener >= 0) close(listener);
    const Control ready{kReady, nranks, rank, 0};
    if (result == ncclSuccess) result = send_all(peers[0], &ready, sizeof ready, 0);
    Control go{0, 0, 0, 0};
    if (result == ncclSuccess) result = recv_all(peers[0], &go, sizeof go, 0);
    if (result == ncclSuccess && go.kind != kGo) result = fail(ncclRemoteError, "rank 0 sent a malformed message");
    return result;
}

ncclResult_t ncclComm::bootstrap() {
    if (nranks == 1) {
        if (kept_listener >= 0) close(kept_listener);
        kept_listener = -1;
        return ncclSuccess;
    }
    return rank == 0 ? bootstrap_root() : bootstrap_peer();
}

// Runs one operation list: self copies first, then every transfer with a peer, progressing all of them
// together (each peer's sends in order, each peer's receives in order) so that no pair waits on the other.
ncclResult_t ncclComm::run(std::vector<Transfer> &transfers) {
    std::vector<Transfer *> self_sends, self_recvs;
    std::vector<std::vector<Transfer *>> sends((size_t)nranks), recvs((size_t)nranks);
    for (Transfer &t : transfers) {
        t.header.bytes = t.bytes;
        if (t.peer == rank) {
            (t.kind == Transfer::kSend ? self_sends : self_recvs).push_back(&t);
        } else {
            (t.kind == Transfer::kSend ? sends : recvs)[(size_t)t.peer].push_back(&t);
        }
    }
    if (self_sends.size() != self_recvs.size()) {
        return fail(ncclInvalidUsage, format("rank %d: %zu sends to itself but %zu receives from itself in one group", rank,
                                             self_sends.size(), self_recvs.size()));
    }
    for (size_t i = 0; i < self_sends.size(); ++i) {
        if (self_sends[i]->bytes != self_recvs[i]->bytes) {
            return fail(ncclInvalidUsage, format("rank %d sends %zu bytes to itself but receives %zu", rank,
                                                 self_sends[i]->bytes, self_recvs[i]->bytes));
        }
        memmove(self_recvs[i]->buffer, self_sends[i]->buffer, self_sends[i]->bytes);
    }
    std::vector<size_t> next_send((size_t)nranks, 0), next_recv((size_t)nranks, 0);
    std::vector<pollfd> polls;
    std::vector<int> polled_peer;
    for (;;) {
        polls.clear();
        polled_peer.clear();
        for (int p = 0; p < nranks; ++p) {
            short events = 0;
            if (next_send[(size_t)p] < sends[(size_t)p].size()) events |= POLLOUT;
            if (next_recv[(size_t)p] < recvs[(size_t)p].size()) events |= POLLIN;
            if (events) {
                polls.push_back(pollfd{peers[(size_t)p], events, 0});
                polled_peer.push_back(p);
            }
        }
        if (polls.empty()) return ncclSuccess;
        polls.push_back(pollfd{wake[0], POLLIN, 0});
        const int n = poll(polls.data(), (nfds_t)polls.size(), -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return fail(ncclSystemError, format("poll failed: %s", strerror(errno)));
        if (aborting.load() || (polls.back().revents & POLLIN)) return fail(ncclInternalError, "the communicator was aborted");
        for (size_t i = 0; i + 1 < polls.size(); ++i) {
            const int p = polled_peer[i];
            const int fd = polls[i].fd;
            const short revents = polls[i].revents;
            // Readable (data, or the end of the stream): the head receive progresses or finds the close.
            if ((revents & (POLLIN | POLLHUP | POLLERR)) && next_recv[(size_t)p] < recvs[(size_t)p].size()) {
                for (;;) {
                    Transfer &t = *recvs[(size_t)p][next_recv[(size_t)p]];
                    const bool in_header = t.done < sizeof(DataHeader);
                    char *target = in_header ? (char *)&t.header + t.done : t.buffer + (t.done - sizeof(DataHeader));
                    const size_t want = in_header ? sizeof(DataHeader) - t.done : t.bytes - (t.done - sizeof(DataHeader));
                    ssize_t k = 0;
                    if (want > 0) {
                        k = recv(fd, target, want, 0);
                        if (k == 0) return fail(ncclRemoteError, closed(p));
                        if (k < 0) {
                            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
                            return socket_error(p, "receiving from");
                        }
                        t.done += (size_t)k;
                    }
                    if (in_header && t.done == sizeof(DataHeader)) {
                        if (t.header.kind != kData) return fail(ncclRemoteError, format("rank %d sent a malformed message", p));
                        if (t.header.bytes != t.bytes) {
                            return fail(ncclInvalidUsage,
                                        format("rank %d sent %llu bytes where rank %d receives %zu: the ranks called "
                                               "different collectives or sizes",
                                               p, (unsigned long long)t.header.bytes, rank, t.bytes));
                        }
                    }
                    if (t.done == sizeof(DataHeader) + t.bytes) {
                        if (++next_recv[(size_t)p] == recvs[(size_t)p].size()) break;
                    }
                }
            }
            if ((revents & (POLLOUT | POLLHUP | POLLERR)) && next_send[(size_t)p] < sends[(size_t)p].size()) {
                for (;;) {
                    Transfer &t = *sends[(size_t)p][next_send[(size_t)p]];
                    const bool in_header = t.done < sizeof(DataHeader);
                    const char *source = in_header ? (const char *)&t.header + t.done : t.buffer + (t.done - sizeof(DataHeader));
                    const size_t left = in_header ? sizeof(DataHeader) - t.done : t.bytes - (t.done - sizeof(DataHeader));
                    if (left > 0) {
                        const ssize_t k = send(fd, source, left, MSG_NOSIGNAL);
                        if (k < 0) {
                            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
                            return socket_error(p, "sending to");
                        }
                        t.done += (size_t)k;
                    }
                    if (t.done == sizeof(DataHeader) + t.bytes) {
                        if (++next_send[(size_t)p] == sends[(size_t)p].size()) break;
                    }
                }
            }
        }
    }
}

// The worker: the initialisation, then one operation list at a time until stopped.
void ncclComm::work() {
    ncclResult_t result = bootstrap();
    for (;;) {
        std::unique_lock<std::mutex> guard(lock);
        state = result;
        has_job = false;
        changed.notify_all();
        if (result != ncclSuccess) return;  // errors stick; nothing runs after one
        changed.wait(guard, [this] { return has_job || stopping; });
        if (stopping) return;
        std::vector<Transfer> transfers;
        transfers.swap(job);
        guard.unlock();
        result = run(transfers);
    }
}

namespace {

ncclResult_t stop_and_free(ncclComm_t comm) {
    {
        std::lock_guard<std::mutex> guard(comm->lock);
        comm->stopping = true;
        comm->aborting.store(true);
        comm->changed.notify_all();
    }
    const char byte = 1;
    if (write(comm->wake[1], &byte, 1) < 0) {
        // The pipe is non-blocking and fresh: it cannot be full. The flag above stops the worker anyway.
    }
    if (comm->worker.joinable()) comm->worker.join();
    for (int fd : comm->peers) {
        if (fd >= 0) close(fd);
    }
    if (comm->kept_listener >= 0) close(comm->kept_listener);
    close(comm->wake[0]);
    close(comm->wake[1]);
    delete comm;
    return ncclSuccess;
}

// Hands `transfers` to the worker; a blocking communicator waits for the result.
ncclResult_t submit(ncclComm_t comm, std::vector<Transfer> &&transfers) {
    std::unique_lock<std::mutex> guard(comm->lock);
    if (comm->state == ncclInProgress) {
        return call_error(ncclInvalidUsage, "an operation was enqueued while the communicator was in progress "
                                            "(poll ncclCommGetAsyncError until it is not)");
    }
    if (comm->state != ncclSuccess) return call_error(comm->state, comm->message);
    comm->job = std::move(transfers);
    comm->has_job = true;
    comm->state = ncclInProgress;
    comm->changed.notify_all();
    if (!comm->blocking) return ncclInProgress;
    comm->changed.wait(guard, [comm] { return comm->state != ncclInProgress; });
    if (comm->state != ncclSuccess) return call_error(comm->state, comm->message);
    return ncclSuccess;
}

ncclResult_t check_comm(ncclComm_t comm, const char *what) {
    if (!comm) return call_error(ncclInvalidArgument, format("%s: null communicator", what));
    return ncclSuccess;
}

ncclResult_t check_buffer(const void *p, size_t bytes, const char *what, const char *which) {
    switch (relora_emu_device_range(p, bytes)) {
    case 0: return ncclSuccess;
    case 1:
        return call_error(ncclInvalidArgument, format("%s: the %s buffer of %zu bytes at %p runs past the end of its "
                                                      "device allocation", what, which, bytes, p));
    default:
        return call_error(ncclInvalidArgument, format("%s: the %s buffer %p is not device memory", what, which, p));
    }
}

// Adds one transfer to the open group (a call outside a group opens one of its own).
ncclResult_t add_transfer(ncclComm_t comm, Transfer::Kind kind, int peer, const void *buffer, size_t bytes) {
    if (bytes == 0) return ncclSuccess;
    Transfer t{kind, peer, const_cast<char *>((const char *)buffer), bytes};
    t_group.push_back(GroupEntry{comm, t});
    return ncclSuccess;
}

// Records an argument error inside a group: ncclGroupEnd then fails and drops the group.
ncclResult_t group_error(ncclResult_t result) {
    if (t_group_depth > 0 && t_group_error == ncclSuccess) t_group_error = result;
    return result;
}

}  // namespace

extern "C" {

ncclResult_t ncclGetVersion(int *version) {
    if (!version) return call_error(ncclInvalidArgument, "ncclGetVersion: null result pointer");
    *version = NCCL_VERSION_CODE;
    return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId) {
    if (!uniqueId) return call_error(ncclInvalidArgument, "ncclGetUniqueId: null result pointer");
    const char *comm_id = getenv("NCCL_COMM_ID");
    if (comm_id && *comm_id) {
        sockaddr_in address;
        memset(&address, 0, sizeof address);
        const ncclResult_t r = parse_comm_id(comm_id, &address);
        if (r != ncclSuccess) return r;
        *uniqueId = encode_id(address.sin_addr.s_addr, address.sin_port);
        return ncclSuccess;
    }
    sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const int fd = listen_on(address, false);
    if (fd < 0) return call_error(ncclSystemError, format("ncclGetUniqueId: cannot listen on 127.0.0.1: %s", strerror(errno)));
    const uint16_t port = local_port(fd);
    {
        std::lock_guard<std::mutex> guard(g_kept_lock);
        g_kept.emplace_back(port, fd);
    }
    *uniqueId = encode_id(address.sin_addr.s_addr, port);
    return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank, ncclConfig_t *config) {
    if (!comm) return call_error(ncclInvalidArgument, "ncclCommInitRankConfig: null result pointer");
    *comm = nullptr;
    if (nranks < 1 || rank < 0 || rank >= nranks) {
        return call_error(ncclInvalidArgument, format("ncclCommInitRank: rank %d of %d is out of range", rank, nranks));
    }
    if (config && config->magic != 0xcafebeef) {
        return call_error(ncclInvalidArgument, "ncclCommInitRankConfig: the config was not set from NCCL_CONFIG_INITIALIZER");
    }
    sockaddr_in root;
    if (!decode_id(commId, &root)) {
        return call_error(ncclInvalidArgument, "ncclCommInitRank: the id was not made by the emulation's ncclGetUniqueId");
    }
    ncclComm_t c = new ncclComm;
    c->nranks = nranks;
    c->rank = rank;
    c->blocking = !(config && config->blocking == 0);
    c->root = root;
    c->peers.assign((size_t)nranks, -1);
    if (rank == 0) c->kept_listener = take_kept_listener(root.sin_port);
    if (pipe2(c->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
        delete c;
        return call_error(ncclSystemError, format("ncclCommInitRank: pipe failed: %s", strerror(errno)));
    }
    c->worker = std::thread([c] { c->work(); });
    *comm = c;
    if (!c->blocking) return ncclInProgress;
    ncclResult_t state;
    {
        std::unique_lock<std::mutex> guard(c->lock);
        c->changed.wait(guard, [c] { return c->state != ncclInProgress; });
        state = c->state;
        if (state != ncclSuccess) call_error(state, c->message);
    }
    if (state != ncclSuccess) {  // a blocking init that failed leaves no communicator
        stop_and_free(c);
        *comm = nullptr;
    }
    return state;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank) {
    return ncclCommInitRankConfig(comm, nranks, commId, rank, nullptr);
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) { return check_comm(comm, "ncclCommFinalize"); }

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclSuccess;
    return stop_and_free(comm);
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (!comm) return ncclSuccess;
    return stop_and_free(comm);
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError) {
    if (!comm || !asyncError) return call_error(ncclInvalidArgument, "ncclCommGetAsyncError: null argument");
    std::lock_guard<std::mutex> guard(comm->lock);
    *asyncError = comm->state;
    return ncclSuccess;
}

const char *ncclGetErrorString(ncclResult_t result) {
    switch (result) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error (a socket or system call failed)";
    case ncclInternalError: return "internal error (or the communicator was aborted)";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage (the ranks disagree, or a call came at the wrong time)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

const char *ncclGetLastError(ncclComm_t comm) {
    thread_local std::string copy;
    copy.clear();
    if (comm) {
        std::lock_guard<std::mutex> guard(comm->lock);
        copy = comm->message;
    }
    if (copy.empty()) copy = t_last_error;
    return copy.c_str();
}

ncclResult_t ncclGroupStart(void) {
    ++t_group_depth;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void) {
    if (t_group_depth == 0) return call_error(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--t_group_depth > 0) return ncclSuccess;
    std::vector<GroupEntry> entries;
    entries.swap(t_group);
    const ncclResult_t error = t_group_error;
    t_group_error = ncclSuccess;
    if (error != ncclSuccess) return error;
    // One operation list per communicator, in the order of the calls.
    ncclResult_t result = ncclSuccess;
    std::vector<bool> taken(entries.size(), false);
    for (size_t i = 0; i < entries.size(); ++i) {
        if (taken[i]) continue;
        const ncclComm_t comm = entries[i].comm;
        std::vector<Transfer> transfers;
        for (size_t j = i; j < entries.size(); ++j) {
            if (!taken[j] && entries[j].comm == comm) {
                transfers.push_back(entries[j].transfer);
                taken[j] = true;
            }
        }
        const ncclResult_t r = submit(comm, std::move(transfers));
        if (r != ncclSuccess && (result == ncclSuccess || result == ncclInProgress)) result = r;
    }
    return result;
}

// The data of an operation on `stream` is read and written at the call (its transfers start now), so the
// stream's queued work runs first: what the kernels before it wrote is what it sends (cuda_emu.h's stream
// model). A failure there is a CUDA error, as NCCL reports one.
ncclResult_t stream_failed(const char *op) {
    return call_error(ncclUnhandledCudaError, format("%s: the stream's earlier work failed: %s", op, cudaGetErrorString(cudaPeekAtLastError())));
}

ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
    if (relora_emu_stream_drain(stream) != cudaSuccess) return group_error(stream_failed("ncclSend"));
    ncclResult_t r = check_comm(comm, "ncclSend");
    if (r != ncclSuccess) return group_error(r);
    const size_t bytes = count * type_size(datatype);
    if (type_size(datatype) == 0) return group_error(call_error(ncclInvalidArgument, "ncclSend: unknown data type"));
    if (peer < 0 || peer >= comm->nranks) {
        return group_error(call_error(ncclInvalidArgument, format("ncclSend: peer %d of %d ranks", peer, comm->nranks)));
    }
    if (bytes > 0 && (r = check_buffer(sendbuff, bytes, "ncclSend", "send")) != ncclSuccess) return group_error(r);
    ncclGroupStart();
    add_transfer(comm, Transfer::kSend, peer, sendbuff, bytes);
    return ncclGroupEnd();
}

ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
    if (relora_emu_stream_drain(stream) != cudaSuccess) return group_error(stream_failed("ncclRecv"));
    ncclResult_t r = check_comm(comm, "ncclRecv");
    if (r != ncclSuccess) return group_error(r);
    const size_t bytes = count * type_size(datatype);
    if (type_size(datatype) == 0) return group_error(call_error(ncclInvalidArgument, "ncclRecv: unknown data type"));
    if (peer < 0 || peer >= comm->nranks) {
        return group_error(call_error(ncclInvalidArgument, format("ncclRecv: peer %d of %d ranks", peer, comm->nranks)));
    }
    if (bytes > 0 && (r = check_buffer(recvbuff, bytes, "ncclRecv", "receive")) != ncclSuccess) return group_error(r);
    ncclGroupStart();
    add_transfer(comm, Transfer::kRecv, peer, recvbuff, bytes);
    return ncclGroupEnd();
}

// Every rank sends its block to every other rank and receives theirs; its own block is a self copy
// (memmove: in place, sendbuff == recvbuff + rank * bytes, copies nothing).
ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount, ncclDataType_t datatype,
                           ncclComm_t comm, cudaStream_t stream) {
    if (relora_emu_stream_drain(stream) != cudaSuccess) return group_error(stream_failed("ncclAllGather"));
    ncclResult_t r = check_comm(comm, "ncclAllGather");
    if (r != ncclSuccess) return group_error(r);
    if (type_size(datatype) == 0) return group_error(call_error(ncclInvalidArgument, "ncclAllGather: unknown data type"));
    const size_t bytes = sendcount * type_size(datatype);
    if (bytes == 0) return ncclSuccess;
    if ((r = check_buffer(sendbuff, bytes, "ncclAllGather", "send")) != ncclSuccess ||
        (r = check_buffer(recvbuff, bytes * (size_t)comm->nranks, "ncclAllGather", "receive")) != ncclSuccess) {
        return group_error(r);
    }
    ncclGroupStart();
    for (int p = 0; p < comm->nranks; ++p) {
        add_transfer(comm, Transfer::kSend, p, sendbuff, bytes);
        add_transfer(comm, Transfer::kRecv, p, (char *)recvbuff + (size_t)p * bytes, bytes);
    }
    return ncclGroupEnd();
}

// The root sends to every other rank (and copies to its own receive buffer unless in place).
ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype, int root,
                           ncclComm_t comm, cudaStream_t stream) {
    if (relora_emu_stream_drain(stream) != cudaSuccess) return group_error(stream_failed("ncclBroadcast"));
    ncclResult_t r = check_comm(comm, "ncclBroadcast");
    if (r != ncclSuccess) return group_error(r);
    if (type_size(datatype) == 0) return group_error(call_error(ncclInvalidArgument, "ncclBroadcast: unknown data type"));
    if (root < 0 || root >= comm->nranks) {
        return group_error(call_error(ncclInvalidArgument, format("ncclBroadcast: root %d of %d ranks", root, comm->nranks)));
    }
    const size_t bytes = count * type_size(datatype);
    if (bytes == 0) return ncclSuccess;
    if ((comm->rank == root && (r = check_buffer(sendbuff, bytes, "ncclBroadcast", "send")) != ncclSuccess) ||
        (r = check_buffer(recvbuff, bytes, "ncclBroadcast", "receive")) != ncclSuccess) {
        return group_error(r);
    }
    ncclGroupStart();
    if (comm->rank == root) {
        for (int p = 0; p < comm->nranks; ++p) {
            if (p != root) add_transfer(comm, Transfer::kSend, p, sendbuff, bytes);
        }
        add_transfer(comm, Transfer::kSend, root, sendbuff, bytes);
        add_transfer(comm, Transfer::kRecv, root, recvbuff, bytes);
    } else {
        add_transfer(comm, Transfer::kRecv, root, recvbuff, bytes);
    }
    return ncclGroupEnd();
}

}  // extern "C"
