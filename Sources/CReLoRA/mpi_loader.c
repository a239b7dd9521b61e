// dlopen loader for librelora-mpi.so, the MPI plugin. See relora_mpi_abi.h for the contract.
#include "relora_mpi_abi.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

int relora_mpi_load(const char *path, relora_mpi_api *api, char *errbuf, size_t errbuf_len) {
    memset(api, 0, sizeof(*api));
    // RTLD_GLOBAL: the plugin pulls in the MPI library (libmpi.so), and Open MPI later dlopens its own
    // components, which expect libmpi's and libopen-pal's symbols in the global scope.
    void *handle = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (!handle) {
        // dlerror names the file that is missing: the plugin itself, or the MPI library it was built against.
        if (errbuf && errbuf_len > 0) snprintf(errbuf, errbuf_len, "cannot open %s: %s", path, dlerror());
        return 1;
    }
    api->handle = handle;
    // One dlsym per entry of RELORA_MPI_FUNCTIONS (memcpy: ISO C cannot assign dlsym's void * to a
    // function pointer; POSIX guarantees the copy works).
    const char *missing = NULL;
#define RELORA_MPI_RESOLVE(ret, name, params)                           \
    {                                                                   \
        void *symbol = dlsym(handle, "relora_mpi_" #name);              \
        if (!symbol && !missing) missing = "relora_mpi_" #name;         \
        memcpy(&api->name, &symbol, sizeof symbol);                     \
    }
    RELORA_MPI_FUNCTIONS(RELORA_MPI_RESOLVE)
#undef RELORA_MPI_RESOLVE
    // The version first when it can be read: an old plugin lacks the new entry points.
    if (api->abi_version && api->abi_version() != RELORA_MPI_ABI_VERSION) {
        if (errbuf && errbuf_len > 0)
            snprintf(errbuf, errbuf_len, "%s was built for MPI plugin ABI version %d, this relora expects %d; rebuild it with `make -C Kernels mpi`",
                     path, api->abi_version(), RELORA_MPI_ABI_VERSION);
        relora_mpi_unload(api);
        return 3;
    }
    if (missing) {
        if (errbuf && errbuf_len > 0)
            snprintf(errbuf, errbuf_len, "%s is not a relora MPI plugin (it lacks %s)", path, missing);
        relora_mpi_unload(api);
        return 2;
    }
    return 0;
}

void relora_mpi_unload(relora_mpi_api *api) {
    if (api->handle) dlclose(api->handle);
    memset(api, 0, sizeof(*api));
}
