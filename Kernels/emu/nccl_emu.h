// An NCCL stand-in for the CPU emulation: the subset of NCCL's API that Kernels/src/collectives.cu calls,
// with NCCL's names, enum values and signatures (nccl.h, 2.28), implemented over TCP sockets between the
// processes of a job (nccl_emu.cpp). collectives.cu compiles against this header under g++ and against
// nccl.h under nvcc, so its code path (the function table, the polling of a non-blocking communicator, the
// timeout, the aborts, the error sentences) is the one the tests run.
//
// What it models:
// - The unique id. ncclGetUniqueId encodes an IPv4 address and port: NCCL_COMM_ID=host:port if set (every
//   rank computes the same id; rank 0 listens there in init), else a listening socket bound now on
//   127.0.0.1, port 0, which this process keeps for rank 0's init (the id then travels by other means,
//   e.g. MPI). As NCCL's, an id created without NCCL_COMM_ID is for one communicator whose rank 0 runs in
//   the process that created it.
// - Initialisation (ncclCommInitRankConfig, ncclCommInitRank): rank 0 accepts a hello from every other
//   rank (its rank, nranks, and the port it listens on; a wrong nranks, a rank out of range or a duplicate
//   is refused, and both sides fail), then sends everyone the table of addresses; each pair of ranks gets
//   its own connection (a full mesh: rank q > p connects to p), then all ranks meet at a barrier through
//   rank 0. Ranks other than 0 retry their connection until they are aborted (rank 0 may start later).
// - Non-blocking communicators (config.blocking = 0): every call that communicates returns ncclInProgress
//   and runs on the communicator's worker thread; ncclCommGetAsyncError reports ncclInProgress until it is
//   done, then ncclSuccess or the error (sticky). Blocking communicators wait for the worker instead. As
//   with NCCL, calling another function while the communicator is in progress is ncclInvalidUsage.
// - Data: ncclAllGather, ncclBroadcast (any root, in place or not), ncclSend/ncclRecv, and groups
//   (ncclGroupStart/ncclGroupEnd, per thread, nestable): the operations of a group (collectives are
//   lowered to sends and receives) progress together, so a group of sends and receives to every peer
//   (an all-to-all) cannot deadlock. A send to self is matched with the receive from self of the same
//   group. Every message carries a small header with its byte count; a receive of another size fails with
//   ncclInvalidUsage naming the peer (the ranks called different collectives or sizes).
// - Buffers must lie inside live allocations of the emulated device (cudaMalloc or cudaHostAlloc):
//   ncclInvalidArgument otherwise, as NCCL's pointer checks.
// - Failures: a peer that closed its connection (it exited, was killed, or aborted), a socket error, or a
//   malformed message makes the operation fail with ncclRemoteError (ncclSystemError for local socket
//   errors) and a sentence naming the peer's rank (ncclGetLastError). The emulation has no timer of its
//   own, as NCCL has none: a peer that stops without closing its sockets leaves the operation in progress
//   until the caller's timeout aborts the communicator (collectives.cu does). ncclCommAbort wakes the worker
//   at once (a pipe in every poll), joins it and closes the sockets, so the peers' operations fail.
// - Streams: an operation first runs its stream's queued work (cuda_emu.h's stream model), then moves the
//   data, so the data is in place when ncclCommGetAsyncError stops reporting ncclInProgress, and what the
//   stream's earlier work wrote is what is sent (work on other streams only if the stream waited for it).
// What it does not model: reductions (no ncclAllReduce & co.), NCCL's algorithms (ring, tree), its
// transports and topology, CUDA graphs, communicator splitting, several devices per process, IPv6 and
// NCCL's other environment variables. It is a correctness emulation: every byte goes through rank-to-rank
// TCP connections, with the copies that implies.
#ifndef RELORA_NCCL_EMU_H
#define RELORA_NCCL_EMU_H

#include <limits.h>
#include <stddef.h>

#include "cuda_emu.h"

#define RELORA_NCCL_EMU_API extern "C" __attribute__((visibility("hidden")))

// The NCCL API level the emulation mirrors (the pinned nvidia-nccl-cu13 header's): what ncclGetVersion
// reports, so collectives.cu takes the code path it takes with that NCCL (ncclCommInitRankConfig with
// blocking = 0, ncclCommFinalize, ncclGetLastError).
#define NCCL_MAJOR 2
#define NCCL_MINOR 28
#define NCCL_PATCH 9
#define NCCL_VERSION(X, Y, Z) (((X) <= 2 && (Y) <= 8) ? (X) * 1000 + (Y) * 100 + (Z) : (X) * 10000 + (Y) * 100 + (Z))
#define NCCL_VERSION_CODE NCCL_VERSION(NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH)

typedef struct ncclComm *ncclComm_t;

#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
    char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
    ncclNumResults = 8
} ncclResult_t;

typedef enum {
    ncclInt8 = 0, ncclChar = 0,
    ncclUint8 = 1,
    ncclInt32 = 2, ncclInt = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6, ncclHalf = 6,
    ncclFloat32 = 7, ncclFloat = 7,
    ncclFloat64 = 8, ncclDouble = 8,
    ncclBfloat16 = 9,
    ncclFloat8e4m3 = 10,
    ncclFloat8e5m2 = 11,
    ncclNumTypes = 12
} ncclDataType_t;

// The leading fields of NCCL's ncclConfig_t (the ones the emulation reads); NCCL reads a prefix of the
// size given too. blocking: 0 = non-blocking, anything else (NCCL_CONFIG_UNDEF_INT included) = blocking.
#define NCCL_CONFIG_UNDEF_INT INT_MIN
typedef struct {
    size_t size;
    unsigned int magic;
    unsigned int version;
    int blocking;
} ncclConfig_t;
#define NCCL_CONFIG_INITIALIZER {sizeof(ncclConfig_t), 0xcafebeef, NCCL_VERSION_CODE, NCCL_CONFIG_UNDEF_INT}

RELORA_NCCL_EMU_API ncclResult_t ncclGetVersion(int *version);
RELORA_NCCL_EMU_API ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId);
RELORA_NCCL_EMU_API ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank,
                                                        ncclConfig_t *config);
RELORA_NCCL_EMU_API ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank);
RELORA_NCCL_EMU_API ncclResult_t ncclCommFinalize(ncclComm_t comm);
RELORA_NCCL_EMU_API ncclResult_t ncclCommDestroy(ncclComm_t comm);
RELORA_NCCL_EMU_API ncclResult_t ncclCommAbort(ncclComm_t comm);
RELORA_NCCL_EMU_API ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError);
RELORA_NCCL_EMU_API const char *ncclGetErrorString(ncclResult_t result);
RELORA_NCCL_EMU_API const char *ncclGetLastError(ncclComm_t comm);
RELORA_NCCL_EMU_API ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount,
                                               ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
RELORA_NCCL_EMU_API ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count,
                                               ncclDataType_t datatype, int root, ncclComm_t comm,
                                               cudaStream_t stream);
RELORA_NCCL_EMU_API ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer,
                                          ncclComm_t comm, cudaStream_t stream);
RELORA_NCCL_EMU_API ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer,
                                          ncclComm_t comm, cudaStream_t stream);
RELORA_NCCL_EMU_API ncclResult_t ncclGroupStart(void);
RELORA_NCCL_EMU_API ncclResult_t ncclGroupEnd(void);

#endif  // RELORA_NCCL_EMU_H
