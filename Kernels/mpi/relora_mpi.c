// librelora-mpi.so: relora's MPI plugin, compiled with the machine's own mpicc (`make -C Kernels mpi`).
//
// The flat functions of Sources/CReLoRA/include/relora_mpi_abi.h over the MPI library mpicc links:
// initialize, all-gather, all-to-all, broadcast, barrier, abort, finalize. Everything above the byte level
// (the ordered sums, typed gathers) is Swift (Communicator.swift), the same for every engine.
//
// Counts: the ABI's byte counts are int64_t, an MPI count is an int. A call whose per-rank count is at most
// `max_call` (INT_MAX unless initialize was given less) is one MPI call on MPI_BYTE. A larger one is cut
// into pieces of at most `max_call` bytes: piece [off, off + len) of every rank's block moves in one call, with
// a datatype of `len` contiguous bytes resized to the block's extent, so piece k of rank q lands at
// q * block + off in the receive buffer without any staging copy.
#define RELORA_MPI_PLUGIN
#include "relora_mpi_abi.h"

#include <limits.h>
#include <mpi.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static _Thread_local char error_text[512];

static int initialized, finalized;
static MPI_Comm comm = MPI_COMM_NULL;  // the plugin's duplicate of MPI_COMM_WORLD
static int world_size;
static int thread_level;               // MPI_THREAD_* that MPI_Init_thread provided
static pthread_t init_thread;
static int64_t max_call = INT_MAX;

static relora_mpi_status fail(relora_mpi_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(error_text, sizeof error_text, fmt, args);
    va_end(args);
    return status;
}

// An MPI call's error code as one sentence: the call and MPI's own text.
static relora_mpi_status fail_mpi(const char *call, int code) {
    char text[MPI_MAX_ERROR_STRING + 1] = "";
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) snprintf(text, sizeof text, "unknown error");
    text[length < MPI_MAX_ERROR_STRING ? length : MPI_MAX_ERROR_STRING] = '\0';
    int name = (int)strcspn(call, "(");  // MPI_CHECK passes the whole call: keep the function's name
    return fail(RELORA_MPI_ERR_MPI, "%.*s failed: %s (MPI error %d)", name, call, text, code);
}

#define MPI_CHECK(call)                                          \
    do {                                                         \
        int mpi_check_code = (call);                             \
        if (mpi_check_code != MPI_SUCCESS) return fail_mpi(#call, mpi_check_code); \
    } while (0)

// Every collective: initialised, not finalised, and on init's thread unless the library is serialized.
static relora_mpi_status check_state(const char *op) {
    if (!initialized) return fail(RELORA_MPI_ERR_STATE, "relora_mpi_%s was called before relora_mpi_initialize", op);
    if (finalized) return fail(RELORA_MPI_ERR_STATE, "relora_mpi_%s was called after relora_mpi_finalize", op);
    if (thread_level < MPI_THREAD_SERIALIZED && !pthread_equal(pthread_self(), init_thread))
        return fail(RELORA_MPI_ERR_STATE,
                    "relora_mpi_%s was called from another thread than relora_mpi_initialize, and this MPI library provides only MPI_THREAD_FUNNELED",
                    op);
    return RELORA_MPI_OK;
}

static relora_mpi_status check_buffer(const char *op, const char *name, const void *p, int64_t bytes) {
    if (bytes < 0) return fail(RELORA_MPI_ERR_INVALID_ARGUMENT, "relora_mpi_%s: negative byte count %lld", op, (long long)bytes);
    if (bytes > 0 && !p) return fail(RELORA_MPI_ERR_INVALID_ARGUMENT, "relora_mpi_%s: %s is NULL for %lld bytes", op, name, (long long)bytes);
    return RELORA_MPI_OK;
}

int relora_mpi_abi_version(void) { return RELORA_MPI_ABI_VERSION; }

const char *relora_mpi_last_error(void) { return error_text; }

relora_mpi_status relora_mpi_initialize(int64_t max_call_bytes, relora_mpi_info *info) {
    if (!info) return fail(RELORA_MPI_ERR_INVALID_ARGUMENT, "relora_mpi_initialize: info is NULL");
    if (initialized) return fail(RELORA_MPI_ERR_STATE, "relora_mpi_initialize was called twice (MPI initialises once per process)");
    int already = 0;
    MPI_Initialized(&already);
    if (already) return fail(RELORA_MPI_ERR_STATE, "MPI was already initialised in this process by something else than relora");

    // Errors during MPI_Init_thread itself are fatal in most MPIs (no communicator to set a handler on yet).
    int provided = MPI_THREAD_SINGLE;
    MPI_CHECK(MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided));
    initialized = 1;
    thread_level = provided;
    init_thread = pthread_self();
    max_call = (max_call_bytes > 0 && max_call_bytes < INT_MAX) ? max_call_bytes : INT_MAX;

    MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm));
    MPI_CHECK(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
    int rank = 0, local_rank = 0, local_size = 0;
    MPI_CHECK(MPI_Comm_rank(comm, &rank));
    MPI_CHECK(MPI_Comm_size(comm, &world_size));
    MPI_Comm node = MPI_COMM_NULL;
    MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
    MPI_CHECK(MPI_Comm_rank(node, &local_rank));
    MPI_CHECK(MPI_Comm_size(node, &local_size));
    MPI_CHECK(MPI_Comm_free(&node));

    memset(info, 0, sizeof *info);
    info->info_size = (int32_t)sizeof *info;
    info->rank = rank;
    info->size = world_size;
    info->local_rank = local_rank;
    info->local_size = local_size;
    info->thread_level = provided == MPI_THREAD_MULTIPLE ? 3 : provided == MPI_THREAD_SERIALIZED ? 2
                       : provided == MPI_THREAD_FUNNELED ? 1 : 0;
    int version = 0, subversion = 0;
    MPI_CHECK(MPI_Get_version(&version, &subversion));
    info->mpi_version = version;
    info->mpi_subversion = subversion;
    char library[MPI_MAX_LIBRARY_VERSION_STRING + 1] = "";
    int length = 0;
    MPI_CHECK(MPI_Get_library_version(library, &length));
    library[length < MPI_MAX_LIBRARY_VERSION_STRING ? length : MPI_MAX_LIBRARY_VERSION_STRING] = '\0';
    library[strcspn(library, "\r\n")] = '\0';
    snprintf(info->library, sizeof info->library, "%s", library);
    return RELORA_MPI_OK;
}

// A datatype of `len` contiguous bytes whose extent is `stride`: piece `off` of every rank's block.
static relora_mpi_status strided_piece(int64_t len, int64_t stride, MPI_Datatype *type) {
    MPI_Datatype piece;
    MPI_CHECK(MPI_Type_contiguous((int)len, MPI_BYTE, &piece));
    int code = MPI_Type_create_resized(piece, 0, (MPI_Aint)stride, type);
    MPI_Type_free(&piece);
    if (code != MPI_SUCCESS) return fail_mpi("MPI_Type_create_resized", code);
    MPI_CHECK(MPI_Type_commit(type));
    return RELORA_MPI_OK;
}

relora_mpi_status relora_mpi_all_gather(const void *send, void *receive, int64_t bytes) {
    relora_mpi_status s;
    if ((s = check_state("all_gather")) || (s = check_buffer("all_gather", "send", send, bytes)) ||
        (s = check_buffer("all_gather", "receive", receive, bytes)))
        return s;
    if (bytes > INT64_MAX / world_size)
        return fail(RELORA_MPI_ERR_INVALID_ARGUMENT, "relora_mpi_all_gather: %lld bytes from each of %d ranks overflow", (long long)bytes, world_size);
    if (bytes <= max_call) {
        MPI_CHECK(MPI_Allgather(send, (int)bytes, MPI_BYTE, receive, (int)bytes, MPI_BYTE, comm));
        return RELORA_MPI_OK;
    }
    for (int64_t off = 0; off < bytes; off += max_call) {
        int64_t len = bytes - off < max_call ? bytes - off : max_call;
        MPI_Datatype strided;
        if ((s = strided_piece(len, bytes, &strided))) return s;
        int code = MPI_Allgather((const char *)send + off, (int)len, MPI_BYTE, (char *)receive + off, 1, strided, comm);
        MPI_Type_free(&strided);
        if (code != MPI_SUCCESS) return fail_mpi("MPI_Allgather", code);
    }
    return RELORA_MPI_OK;
}

relora_mpi_status relora_mpi_all_to_all(const void *send, void *receive, int64_t block_bytes) {
    relora_mpi_status s;
    if ((s = check_state("all_to_all")) || (s = check_buffer("all_to_all", "send", send, block_bytes)) ||
        (s = check_buffer("all_to_all", "receive", receive, block_bytes)))
        return s;
    if (block_bytes > INT64_MAX / world_size)
        return fail(RELORA_MPI_ERR_INVALID_ARGUMENT, "relora_mpi_all_to_all: %d blocks of %lld bytes overflow", world_size, (long long)block_bytes);
    if (block_bytes <= max_call) {
        MPI_CHECK(MPI_Alltoall(send, (int)block_bytes, MPI_BYTE, receive, (int)block_bytes, MPI_BYTE, comm));
        return RELORA_MPI_OK;
    }
    for (int64_t off = 0; off < block_bytes; off += max_call) {
        int64_t len = block_bytes - off < max_call ? block_bytes - off : max_call;
        MPI_Datatype strided;
        if ((s = strided_piece(len, block_bytes, &strided))) return s;
        int code = MPI_Alltoall((const char *)send + off, 1, strided, (char *)receive + off, 1, strided, comm);
        MPI_Type_free(&strided);
        if (code != MPI_SUCCESS) return fail_mpi("MPI_Alltoall", code);
    }
    return RELORA_MPI_OK;
}

relora_mpi_status relora_mpi_broadcast(void *buffer, int64_t bytes, int32_t root) {
    relora_mpi_status s;
    if ((s = check_state("broadcast")) || (s = check_buffer("broadcast", "buffer", buffer, bytes))) return s;
    if (root < 0 || root >= world_size)
        return fail(RELORA_MPI_ERR_INVALID_ARGUMENT, "relora_mpi_broadcast: root %d is not a rank of %d", root, world_size);
    int64_t off = 0;
    do {  // a zero-byte broadcast is still one (empty) collective
        int64_t len = bytes - off < max_call ? bytes - off : max_call;
        MPI_CHECK(MPI_Bcast((char *)buffer + off, (int)len, MPI_BYTE, root, comm));
        off += len;
    } while (off < bytes);
    return RELORA_MPI_OK;
}

relora_mpi_status relora_mpi_barrier(void) {
    relora_mpi_status s;
    if ((s = check_state("barrier"))) return s;
    MPI_CHECK(MPI_Barrier(comm));
    return RELORA_MPI_OK;
}

void relora_mpi_abort(int32_t code) {
    if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
    _exit(code);  // MPI_Abort does not return; nor does a process without MPI
}

relora_mpi_status relora_mpi_finalize(void) {
    if (!initialized || finalized) return RELORA_MPI_OK;
    finalized = 1;
    if (comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
    MPI_CHECK(MPI_Finalize());
    return RELORA_MPI_OK;
}
