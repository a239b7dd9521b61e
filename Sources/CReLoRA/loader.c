// dlopen loader for libreloracuda.so. See relora_abi.h for the contract.
#include "relora_abi.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

static void set_error(char *errbuf, size_t len, const char *fmt, const char *a, const char *b) {
    if (errbuf && len > 0) snprintf(errbuf, len, fmt, a ? a : "", b ? b : "");
}

int relora_cuda_load(const char *path, relora_cuda_api *api, char *errbuf, size_t errbuf_len) {
    memset(api, 0, sizeof(*api));
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        set_error(errbuf, errbuf_len, "cannot open the CUDA kernel library %s: %s", path, dlerror());
        return 1;
    }
    api->handle = handle;
    // One dlsym per entry of RELORA_CUDA_FUNCTIONS, into the member of the same name. A function
    // pointer cannot be assigned from dlsym's void * in ISO C; POSIX guarantees the memcpy works.
    const char *missing = NULL;
#define RELORA_CUDA_RESOLVE(ret, name, params)                          \
    {                                                                   \
        void *symbol = dlsym(handle, "relora_cuda_" #name);             \
        if (!symbol && !missing) missing = "relora_cuda_" #name;        \
        memcpy(&api->name, &symbol, sizeof symbol);                     \
    }
    RELORA_CUDA_FUNCTIONS(RELORA_CUDA_RESOLVE)
#undef RELORA_CUDA_RESOLVE
    if (missing) {
        // Check the version first when it can be read: an old library lacks the new entry points.
        if (api->abi_version && api->abi_version() != RELORA_ABI_VERSION) {
            char have[32];
            snprintf(have, sizeof have, "%d", api->abi_version());
            set_error(errbuf, errbuf_len,
                      "%s was built for kernel ABI version %s; rebuild it with `make -C Kernels`", path, have);
            relora_cuda_unload(api);
            return 3;
        }
        set_error(errbuf, errbuf_len, "%s is not a relora kernel library (it lacks %s)", path, missing);
        relora_cuda_unload(api);
        return 2;
    }
    int version = api->abi_version();
    if (version != RELORA_ABI_VERSION) {
        char have[32];
        snprintf(have, sizeof have, "%d", version);
        set_error(errbuf, errbuf_len,
                  "%s was built for kernel ABI version %s; rebuild it with `make -C Kernels`", path, have);
        relora_cuda_unload(api);
        return 3;
    }
    return 0;
}

void relora_cuda_unload(relora_cuda_api *api) {
    if (api->handle) dlclose(api->handle);
    memset(api, 0, sizeof(*api));
}
