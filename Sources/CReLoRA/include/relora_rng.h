// Counter-based random numbers shared by the Swift code and the CUDA kernels.
//
// A value is a pure function of (seed, stream, counter): no hidden state, so CPU and GPU (and a
// resumed run) draw exactly the same numbers for the same element, in any order or thread layout.
// The mixer is SplitMix64's finalizer applied twice to a Weyl-sequence position; it passes
// BigCrush as a stream and is ample for weight init, dropout and stochastic rounding.
#ifndef RELORA_RNG_H
#define RELORA_RNG_H

#include <stdint.h>

// Host and device, inlined; the one definition (relora_quant.h and Kernels/ include this header).
#if !defined(RELORA_HD)
#if defined(__CUDACC__)
#define RELORA_HD __host__ __device__ __forceinline__
#else
#define RELORA_HD static inline
#endif
#endif

RELORA_HD uint64_t relora_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// 64 random bits for element `counter` of stream `stream` under `seed`.
RELORA_HD uint64_t relora_rng_u64(uint64_t seed, uint64_t stream, uint64_t counter) {
    uint64_t key = relora_mix64(seed + 0x9E3779B97F4A7C15ull * (stream + 1));
    return relora_mix64(key + 0x9E3779B97F4A7C15ull * (counter + 1));
}

// Uniform float in [0, 1) with 24 random bits (exactly representable in fp32).
RELORA_HD float relora_rng_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
    return (float)(relora_rng_u64(seed, stream, counter) >> 40) * (1.0f / 16777216.0f);
}

#endif  // RELORA_RNG_H
