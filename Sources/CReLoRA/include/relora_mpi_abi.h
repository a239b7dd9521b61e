// relora MPI plugin ABI: the contract between the Swift code (MPICommunicator) and librelora-mpi.so.
//
// Open MPI and MPICH (and its derivatives) are not ABI compatible: an `MPI_Comm` is a pointer in one and an
// int in the other, and their constants differ. So the Swift package never includes mpi.h nor links an MPI:
// `make -C Kernels mpi` compiles Kernels/mpi/relora_mpi.c with the machine's own `mpicc` into
// Kernels/build/librelora-mpi.so, which exports the flat functions below, and Sources/CReLoRA/mpi_loader.c
// opens it with dlopen at run time. Bump RELORA_MPI_ABI_VERSION whenever a signature or layout below
// changes: the loader refuses a plugin built against another version.
//
// The entry points are listed once, in RELORA_MPI_FUNCTIONS. That list gives the loader's table
// (struct relora_mpi_api) and, when RELORA_MPI_PLUGIN is defined (inside the plugin only), the prototypes
// the plugin compiles its definitions against, so a signature cannot drift between the two sides.
//
// Conventions:
// - Byte counts are int64_t. The plugin splits a call whose counts exceed what one MPI call takes (an int
//   count of MPI_BYTE, or the `max_call_bytes` given to initialize) into several calls: a caller never sees it.
//   A negative count, or a null pointer with a non-zero count, is RELORA_MPI_ERR_INVALID_ARGUMENT; a
//   zero-byte collective still takes part in the collective (every rank must call it) and succeeds.
// - Every function returns a relora_mpi_status; after a failure `last_error` (of the calling thread)
//   describes it in one sentence (the operation and MPI's own error string). MPI_ERRORS_RETURN is set on the communicators,
//   so a peer that died is an error code here where the MPI library detects it, not an abort inside MPI
//   (most MPIs still end the whole job when a process dies: mpirun's default).
// - The plugin asks for MPI_THREAD_SERIALIZED: calls may come from any thread, one at a time (the Swift
//   side holds a lock). Where the library provides only MPI_THREAD_FUNNELED, a call from another thread
//   than initialize's is RELORA_MPI_ERR_STATE instead of undefined behaviour.
// - Collectives run on a duplicate of MPI_COMM_WORLD (the plugin's own communicator): nothing else in the
//   process can match its messages.
#ifndef RELORA_MPI_ABI_H
#define RELORA_MPI_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RELORA_MPI_ABI_VERSION 1

typedef enum relora_mpi_status {
    RELORA_MPI_OK = 0,
    RELORA_MPI_ERR_INVALID_ARGUMENT = 1,  // a count, pointer or rank the call cannot accept
    RELORA_MPI_ERR_MPI = 2,               // an MPI call returned an error (a dead peer, a network failure)
    RELORA_MPI_ERR_STATE = 3,             // not initialised, initialised twice, finalised, or the wrong thread
} relora_mpi_status;

// What initialize found: this process's place in the world, filled by initialize.
typedef struct relora_mpi_info {
    int32_t info_size;     // sizeof(relora_mpi_info) as the plugin sees it (checked by the Swift side)
    int32_t rank;          // in MPI_COMM_WORLD
    int32_t size;          // of MPI_COMM_WORLD
    int32_t local_rank;    // in the ranks that share this node's memory (MPI_COMM_TYPE_SHARED)
    int32_t local_size;
    int32_t thread_level;  // 0 single, 1 funneled, 2 serialized, 3 multiple: what MPI_Init_thread provided
    int32_t mpi_version;   // MPI_Get_version: the standard the library implements, e.g. 3.1
    int32_t mpi_subversion;
    char library[160];     // the first line of MPI_Get_library_version, e.g. "Open MPI v4.1.4, ..."
} relora_mpi_info;

// X(return type, name without the relora_mpi_ prefix, parameter list)
#define RELORA_MPI_FUNCTIONS(X)                                                                           \
    /* must return RELORA_MPI_ABI_VERSION; callable before initialize */                                  \
    X(int, abi_version, (void))                                                                           \
    /* the calling thread's last failure, one sentence ("" before any); callable before initialize */     \
    X(const char *, last_error, (void))                                                                   \
    /* MPI_Init_thread, a duplicate of MPI_COMM_WORLD with MPI_ERRORS_RETURN, the node's ranks. Once per  */ \
    /* process. max_call_bytes: the most bytes one MPI call may move per rank (0: INT_MAX; tests pass a  */ \
    /* small value to exercise the splitting). */                                                         \
    X(relora_mpi_status, initialize, (int64_t max_call_bytes, relora_mpi_info *info))                     \
    /* every rank's `bytes` bytes, in rank order, into receive (size * bytes) */                          \
    X(relora_mpi_status, all_gather, (const void *send, void *receive, int64_t bytes))                    \
    /* send holds size blocks of block_bytes, block s for rank s; receive gets, as block q, rank q's     */ \
    /* block for this rank */                                                                             \
    X(relora_mpi_status, all_to_all, (const void *send, void *receive, int64_t block_bytes))              \
    /* root's bytes into buffer on every rank */                                                          \
    X(relora_mpi_status, broadcast, (void *buffer, int64_t bytes, int32_t root))                          \
    X(relora_mpi_status, barrier, (void))                                                                 \
    /* MPI_Abort on MPI_COMM_WORLD: ends every process of the job with exit status `code` where the     */ \
    /* launcher passes it on; does not return */                                                          \
    X(void, abort, (int32_t code))                                                                        \
    /* MPI_Finalize, for a process that ends normally (every rank calls it). Idempotent. A process that  */ \
    /* exits without it makes mpirun end the whole job: what a rank that fails alone should cause. */     \
    X(relora_mpi_status, finalize, (void))

// ---- Prototypes, for the plugin only ------------------------------------------------------------------
#if defined(RELORA_MPI_PLUGIN)
#define RELORA_MPI_DECLARE(ret, name, params) __attribute__((visibility("default"))) ret relora_mpi_##name params;
RELORA_MPI_FUNCTIONS(RELORA_MPI_DECLARE)
#undef RELORA_MPI_DECLARE
#endif

// ---- Loader (implemented in mpi_loader.c, always available, MPI or not) -------------------------------
#define RELORA_MPI_MEMBER(ret, name, params) ret (*name) params;
typedef struct relora_mpi_api {
    void *handle;  // dlopen handle
    RELORA_MPI_FUNCTIONS(RELORA_MPI_MEMBER)
} relora_mpi_api;
#undef RELORA_MPI_MEMBER

// Opens `path` with dlopen (RTLD_GLOBAL: Open MPI opens its own components later, and they must see the
// MPI library's symbols) and resolves every entry point above into *api. Returns 0 on success; otherwise
// writes one sentence into errbuf (if non-NULL) and returns non-zero: 1 = the file could not be opened
// (missing, or its MPI library is not installed on this machine), 2 = a symbol is missing, 3 = ABI
// version mismatch.
int relora_mpi_load(const char *path, relora_mpi_api *api, char *errbuf, size_t errbuf_len);
void relora_mpi_unload(relora_mpi_api *api);

#ifdef __cplusplus
}
#endif
#endif  // RELORA_MPI_ABI_H
