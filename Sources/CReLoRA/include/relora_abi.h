// relora kernel ABI: the contract between the Swift code and libreloracuda.so (Kernels/).
//
// The Swift package never links CUDA. Kernels/ builds a shared library that exports the flat
// `extern "C"` functions declared here; Sources/CReLoRA/loader.c opens it with dlopen at run time
// and resolves them into a table. Every entry point takes device pointers, sizes, scalars and a
// stream, and returns a relora_status (0 = success). Bump RELORA_ABI_VERSION whenever a signature or
// a memory layout below changes: the loader refuses a library built against another version.
#ifndef RELORA_ABI_H
#define RELORA_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RELORA_ABI_VERSION 1

typedef enum relora_status {
    RELORA_OK = 0,
    RELORA_ERR_INVALID_ARGUMENT = 1,  // a size, pointer or enum value the kernel cannot accept
    RELORA_ERR_CUDA = 2,              // a CUDA runtime call failed (see relora_cuda_last_error)
    RELORA_ERR_CUBLAS = 3,            // a cuBLAS call failed
    RELORA_ERR_OUT_OF_MEMORY = 4,
    RELORA_ERR_NO_DEVICE = 5,
} relora_status;

// ---- Entry points the kernel library must export (resolved by the loader) -----------------------
// int  relora_cuda_abi_version(void);                       must return RELORA_ABI_VERSION
// int  relora_cuda_device_count(int *count);
// const char *relora_cuda_last_error(void);                 human-readable text of the last failure

// ---- Loader (implemented in loader.c, always available, CUDA or not) ---------------------------
typedef struct relora_cuda_api {
    void *handle;  // dlopen handle
    int (*abi_version)(void);
    int (*device_count)(int *count);
    const char *(*last_error)(void);
} relora_cuda_api;

// Opens `path` with dlopen and resolves the entry points above into *api.
// Returns 0 on success; otherwise writes one sentence into errbuf (if non-NULL) and returns non-zero:
// 1 = the file could not be opened, 2 = a symbol is missing, 3 = ABI version mismatch.
int relora_cuda_load(const char *path, relora_cuda_api *api, char *errbuf, size_t errbuf_len);
void relora_cuda_unload(relora_cuda_api *api);

#ifdef __cplusplus
}
#endif
#endif  // RELORA_ABI_H
