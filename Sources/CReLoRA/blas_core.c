// OpenBLAS core check and re-exec. See relora_blas_core.h for the contract.
#define _GNU_SOURCE  // RTLD_DEFAULT
#include "relora_blas_core.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

// Set by relora_blas_ensure_best_core in the re-executed process: the core OpenBLAS had picked.
#define RELORA_REEXEC_ENV "RELORA_BLAS_REEXEC"

enum { TIER_UNKNOWN = -1, TIER_SSE = 0, TIER_AVX = 1, TIER_AVX2 = 2, TIER_AVX512 = 3 };

// OpenBLAS's x86-64 core names (driver/others/dynamic.c, `corename[]`; a build without DYNAMIC_ARCH
// reports its target in capitals, hence the case-blind match) by the widest vector ISA of the chips
// they name. A name missing here is a core newer than this table and is left alone.
static const struct {
    const char *name;
    int tier;
} core_tiers[] = {
    {"Unknown", TIER_SSE},     {"Katmai", TIER_SSE},      {"Coppermine", TIER_SSE},  {"Northwood", TIER_SSE},
    {"Prescott", TIER_SSE},    {"Banias", TIER_SSE},      {"Atom", TIER_SSE},        {"Core2", TIER_SSE},
    {"Penryn", TIER_SSE},      {"Dunnington", TIER_SSE},  {"Nehalem", TIER_SSE},     {"Athlon", TIER_SSE},
    {"Opteron", TIER_SSE},     {"Opteron_SSE3", TIER_SSE}, {"Barcelona", TIER_SSE},  {"Nano", TIER_SSE},
    {"Bobcat", TIER_SSE},      {"Sandybridge", TIER_AVX}, {"Bulldozer", TIER_AVX},   {"Piledriver", TIER_AVX},
    {"Steamroller", TIER_AVX}, {"Excavator", TIER_AVX2},  {"Haswell", TIER_AVX2},    {"Zen", TIER_AVX2},
    {"SkylakeX", TIER_AVX512}, {"Cooperlake", TIER_AVX512}, {"SapphireRapids", TIER_AVX512},
};

static int core_tier(const char *name) {
    for (size_t i = 0; i < sizeof(core_tiers) / sizeof(core_tiers[0]); i++)
        if (strcasecmp(name, core_tiers[i].name) == 0) return core_tiers[i].tier;
    return TIER_UNKNOWN;
}

#if defined(__x86_64__)
// XCR0: which register states the OS saves on a context switch (needs CPUID.1:ECX.OSXSAVE).
static uint64_t read_xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

relora_cpu_features relora_cpu_features_detect(void) {
    relora_cpu_features f;
    memset(&f, 0, sizeof(f));
#if defined(__x86_64__)
    unsigned int eax, ebx, ecx, edx;
    unsigned int max_leaf = __get_cpuid_max(0, NULL);
    if (max_leaf < 1) return f;
    __cpuid(1, eax, ebx, ecx, edx);
    f.fma = (ecx >> 12) & 1;
    f.avx = (ecx >> 28) & 1;
    int osxsave = (ecx >> 27) & 1;
    if (max_leaf >= 7) {
        __cpuid_count(7, 0, eax, ebx, ecx, edx);
        f.avx2 = (ebx >> 5) & 1;
        f.avx512f = (ebx >> 16) & 1;
        f.avx512dq = (ebx >> 17) & 1;
        f.avx512bw = (ebx >> 30) & 1;
        f.avx512vl = (ebx >> 31) & 1;
    }
    if (osxsave) {
        uint64_t xcr0 = read_xcr0();
        f.os_ymm = (xcr0 & 0x6) == 0x6;    // SSE + AVX state
        f.os_zmm = (xcr0 & 0xE6) == 0xE6;  // + opmask, ZMM0-15 upper halves, ZMM16-31
    }
#endif
    return f;
}

// Cooperlake (AVX512_BF16) is not chosen: it differs from SkylakeX only in bf16 sbgemm, which relora
// does not call, and OpenBLAS before 0.3.10 does not know the name.
const char *relora_blas_best_core(const relora_cpu_features *cpu) {
    int ymm = cpu->avx && cpu->os_ymm;
    if (ymm && cpu->avx2 && cpu->fma && cpu->os_zmm && cpu->avx512f && cpu->avx512bw && cpu->avx512dq &&
        cpu->avx512vl)
        return "SkylakeX";
    if (ymm && cpu->avx2 && cpu->fma) return "Haswell";
    if (ymm) return "Sandybridge";
    return NULL;
}

const char *relora_blas_core_to_force(const relora_cpu_features *cpu, const char *current_core,
                                      const char *user_coretype, int dynamic_arch) {
    if (user_coretype && user_coretype[0]) return NULL;
    if (!current_core || !dynamic_arch) return NULL;
    const char *best = relora_blas_best_core(cpu);
    if (!best) return NULL;
    int have = core_tier(current_core);
    if (have == TIER_UNKNOWN || have >= core_tier(best)) return NULL;
    return best;
}

const char *relora_blas_core_name(void) {
    char *(*get_corename)(void) = (char *(*)(void))dlsym(RTLD_DEFAULT, "openblas_get_corename");
    return get_corename ? get_corename() : NULL;
}

// "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Cooperlake MAX_THREADS=64", or NULL.
static const char *blas_config(void) {
    char *(*get_config)(void) = (char *(*)(void))dlsym(RTLD_DEFAULT, "openblas_get_config");
    return get_config ? get_config() : NULL;
}

static int blas_dynamic_arch(void) {
    const char *config = blas_config();
    return config && strstr(config, "DYNAMIC_ARCH") != NULL;
}

void relora_blas_ensure_best_core(char *const argv[]) {
#if defined(__x86_64__) && defined(__linux__)
    const char *current = relora_blas_core_name();
    if (!current) return;
    relora_cpu_features cpu = relora_cpu_features_detect();
    const char *best = relora_blas_best_core(&cpu);
    if (getenv(RELORA_REEXEC_ENV)) {
        // Second run: OPENBLAS_CORETYPE is ours. Say so once if OpenBLAS did not take it.
        if (relora_blas_core_to_force(&cpu, current, NULL, 1))
            fprintf(stderr, "relora: warning: OpenBLAS kept its slow %s kernels although OPENBLAS_CORETYPE=%s was set\n",
                    current, getenv("OPENBLAS_CORETYPE") ? getenv("OPENBLAS_CORETYPE") : "");
        return;
    }
    const char *force = relora_blas_core_to_force(&cpu, current, getenv("OPENBLAS_CORETYPE"), blas_dynamic_arch());
    if (!force || !argv || !argv[0]) return;
    char chose[64];
    snprintf(chose, sizeof(chose), "%s", current);
    int err = 0;
    if (setenv("OPENBLAS_CORETYPE", force, 1) == 0 && setenv(RELORA_REEXEC_ENV, chose, 1) == 0) {
        fflush(NULL);
        execv("/proc/self/exe", argv);  // returns only on failure
    }
    err = errno;
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv(RELORA_REEXEC_ENV);
    fprintf(stderr,
            "relora: warning: OpenBLAS picked its slow %s kernels on a CPU that runs %s ones, and restarting with "
            "OPENBLAS_CORETYPE=%s failed (%s); set OPENBLAS_CORETYPE=%s yourself\n",
            chose, best, force, strerror(err), force);
#else
    (void)argv;
#endif
}

char *relora_blas_describe(char *buf, size_t size) {
    if (!buf || size == 0) return buf;
    const char *core = relora_blas_core_name();
    if (!core) {
        snprintf(buf, size, "no OpenBLAS in this process");
        return buf;
    }
    // Version: the second word of the config string.
    char version[32] = "";
    const char *config = blas_config();
    if (config && strncmp(config, "OpenBLAS ", 9) == 0) {
        size_t n = strcspn(config + 9, " ");
        if (n >= sizeof(version)) n = sizeof(version) - 1;
        memcpy(version, config + 9, n);
        version[n] = 0;
    }
    relora_cpu_features cpu = relora_cpu_features_detect();
    const char *best = relora_blas_best_core(&cpu);
    const char *user = getenv("OPENBLAS_CORETYPE");
    const char *reexec = getenv(RELORA_REEXEC_ENV);
    const char *force = relora_blas_core_to_force(&cpu, core, user, blas_dynamic_arch());
    char note[160] = "";
    if (reexec && user)
        snprintf(note, sizeof(note), "; OPENBLAS_CORETYPE=%s set by relora, OpenBLAS chose %s", user, reexec);
    else if (user && user[0])
        snprintf(note, sizeof(note), "; OPENBLAS_CORETYPE=%s set by the user", user);
    else if (force)
        snprintf(note, sizeof(note), "; slower than the CPU allows: run with OPENBLAS_CORETYPE=%s", force);
    snprintf(buf, size, "OpenBLAS%s%s core %s (cpu supports %s%s)", version[0] ? " " : "", version, core,
             best ? best : "SSE only", note);
    return buf;
}
