// Which OpenBLAS kernels (its "core") the process runs, and a fix when OpenBLAS picked weak ones.
//
// A DYNAMIC_ARCH OpenBLAS (Debian's is one) chooses its kernels once, when the library loads, from a
// CPUID table compiled into that release. A CPU newer than the table falls back to `Prescott` (SSE3):
// OpenBLAS 0.3.21 on an Emerald Rapids Xeon (family 6 model 207) ran sgemm at 55-64 GFLOP/s on two
// threads, against 296 with OPENBLAS_CORETYPE=SkylakeX. The choice cannot be changed after load, so
// `relora_blas_ensure_best_core` sets OPENBLAS_CORETYPE and re-executes the program before any work.
//
// OpenBLAS is found with dlsym in the process's global scope, so this file adds no link dependency
// and every function degrades to "no information" in a process without OpenBLAS.
#ifndef RELORA_BLAS_CORE_H
#define RELORA_BLAS_CORE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// CPUID feature bits that decide the usable kernel family; 1 = present. `os_ymm` / `os_zmm`: the OS
// saves the 256-bit / 512-bit register state (XCR0 via XGETBV), without which AVX / AVX-512 faults.
typedef struct {
    int avx, avx2, fma;
    int avx512f, avx512bw, avx512dq, avx512vl;
    int os_ymm, os_zmm;
} relora_cpu_features;

// Features of the CPU this process runs on (all zero off x86-64).
relora_cpu_features relora_cpu_features_detect(void);

// Strongest OpenBLAS core the features can run: "SkylakeX" (AVX-512 F/BW/DQ/VL, zmm state),
// "Haswell" (AVX2 + FMA), "Sandybridge" (AVX), or NULL (SSE only: nothing to gain over any choice).
const char *relora_blas_best_core(const relora_cpu_features *cpu);

// The core to force with OPENBLAS_CORETYPE, or NULL to leave OpenBLAS as it is. Pure: a function of
//   cpu            the CPU's features,
//   current_core   openblas_get_corename() (NULL: not OpenBLAS),
//   user_coretype  getenv("OPENBLAS_CORETYPE") (set and non-empty: the user's choice, never overridden),
//   dynamic_arch   OpenBLAS was built with DYNAMIC_ARCH (otherwise it ignores OPENBLAS_CORETYPE).
// It answers relora_blas_best_core(cpu) only when current_core is a known OpenBLAS core of a lower
// instruction-set tier (SSE < AVX < AVX2 < AVX-512). AMD cores count at the tier of the chips they
// name (Excavator is AVX2), so a correctly detected AMD core is never replaced by an Intel one, and an
// unknown (newer) name is trusted.
const char *relora_blas_core_to_force(const relora_cpu_features *cpu, const char *current_core,
                                      const char *user_coretype, int dynamic_arch);

// Call first thing in main, with main's argv. When relora_blas_core_to_force answers a core, sets
// OPENBLAS_CORETYPE to it and RELORA_BLAS_REEXEC to the core OpenBLAS had picked, then execv's
// /proc/self/exe with the same argv (same pid, open files and environment otherwise). Returns
// normally when nothing needs doing, when RELORA_BLAS_REEXEC is already set (one re-exec at most), or
// when execv fails (then with a one-line warning on stderr and the environment restored).
void relora_blas_ensure_best_core(char *const argv[]);

// openblas_get_corename() ("Prescott", "SkylakeX", ...), or NULL without OpenBLAS.
const char *relora_blas_core_name(void);

// One line for logs, without a newline, e.g.
//   "OpenBLAS 0.3.21 core SkylakeX (cpu supports SkylakeX; OPENBLAS_CORETYPE set by relora, OpenBLAS chose Prescott)"
// Returns `buf`; truncates to `size` bytes including the terminating zero.
char *relora_blas_describe(char *buf, size_t size);

#ifdef __cplusplus
}
#endif

#endif  // RELORA_BLAS_CORE_H
