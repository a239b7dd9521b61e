// Blockwise 8-bit Adam moments (recipe `optimizer_states: int8`): the executable spec.
//
// The scheme of bitsandbytes' 8-bit optimizers (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
// Quantization"): a moment tensor of n f32 values is stored as n uint8 codes plus one f32 scale (absmax)
// per block of RELORA_ADAM8_BLOCK consecutive elements; value i = map[code_i] * absmax[i / BLOCK]. The first
// moment m uses the signed dynamic map, the second moment v (never negative) the unsigned one. Each update
// dequantizes a block's moments, runs the ordinary f32 AdamW update on them (the parameter is updated from
// the unquantized new moments), then requantizes them with the block's new absmax. 1 + 4/256 bytes per
// moment entry instead of 4: the two moments of N trained parameters take 2.03 N bytes instead of 8 N.
//
// The dynamic map (bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)): for
// decades e = 0..6, the means of adjacent points of linspace(0.1, 1, K_e + 1) times 10^(e - 6), with
// K_e = 2^e (signed: both signs) or 2^(e + 1) (unsigned), plus 0 and 1; 256 values, sorted ascending.
// Relative precision is ~1/(2 K_e) within each decade, and 7 decades below absmax are representable
// (values under ~1e-7 * absmax become 0). Here every value is computed in double and rounded once to
// float, so entries may differ from bitsandbytes' float32 torch computation in the last bit; the codes
// are relora's own (optimizer states are not exchanged with other tools). One deliberate difference: the
// signed map's most negative entry is -1 (bitsandbytes': -0.99297, the mean of its top decade's last
// interval), so a block's extreme value is stored exactly whatever its sign. With bitsandbytes' map a
// block whose extreme is negative dequantizes to an absmax 0.7 % smaller, and requantizing it moves codes
// (measured: 447 of 2000 random blocks); here quantize(dequantize(q)) == q for every block, so the
// optimizer reset's dequantize -> prune -> requantize changes only the pruned entries.
//
// Host and device: the maps are data (relora_adam8_build_maps on the host, 512 floats: signed, then
// unsigned) that the CPU uses directly and the CUDA backend uploads once; every function taking a map
// reads the same bytes, and all arithmetic is single correctly rounded f32 operations in a fixed order
// (RELORA_FMUL etc., never fused), so the GPU produces the CPU's codes, scales and parameters bit for bit.
#ifndef RELORA_ADAM8_H
#define RELORA_ADAM8_H

#include <math.h>
#include <stdint.h>

#include "relora_quant.h"  // RELORA_HD, RELORA_FMUL / FADD / FDIV

#define RELORA_ADAM8_BLOCK 256   // elements per absmax (bitsandbytes' blockwise optimizers use 256 too)
#define RELORA_ADAM8_MAP 256     // entries per map
// Tensors with fewer entries keep f32 moments (bitsandbytes' min_8bit_size): norm gains and other small
// tensors cost nothing to keep exact.
#define RELORA_ADAM8_MIN_COUNT 4096

#if defined(__CUDA_ARCH__)
#define RELORA_FSQRT(a) __fsqrt_rn(a)
#else
#define RELORA_FSQRT(a) sqrtf(a)
#endif

// Number of absmax blocks of a tensor of `count` entries.
RELORA_HD int64_t relora_adam8_blocks(int64_t count) { return (count + RELORA_ADAM8_BLOCK - 1) / RELORA_ADAM8_BLOCK; }

// Writes the signed map to maps[0..255] and the unsigned map to maps[256..511], each ascending (host).
static inline void relora_adam8_build_maps(float *maps) {
    for (int is_signed = 1; is_signed >= 0; --is_signed) {
        float *map = maps + (is_signed ? 0 : RELORA_ADAM8_MAP);
        int n = 0;
        for (int e = 0; e < 7; ++e) {
            const int k = is_signed ? (1 << e) : (1 << (e + 1));
            const double scale = pow(10.0, (double)(e - 6));
            for (int j = 0; j < k; ++j) {
                // linspace(0.1, 1, k + 1): point j is 0.1 + 0.9 j / k; the mean of points j and j + 1.
                const double mean = 0.1 + 0.9 * (2.0 * j + 1.0) / (2.0 * k);
                map[n++] = (float)(scale * mean);
                if (is_signed) map[n++] = (float)(-scale * mean);
            }
        }
        map[n++] = 0.0f;
        map[n++] = 1.0f;
        // n == 256; insertion sort (once per process).
        for (int i = 1; i < n; ++i) {
            const float x = map[i];
            int j = i - 1;
            while (j >= 0 && map[j] > x) { map[j + 1] = map[j]; --j; }
            map[j + 1] = x;
        }
        if (is_signed) map[0] = -1.0f;  // symmetric ends (see the top of this file)
    }
}

// The code of s given lo, the largest index with map[lo] <= s: the nearer of map[lo] and map[lo + 1],
// ties to the lower index.
RELORA_HD uint8_t relora_adam8_nearest(const float *map, int lo, float s) {
    if (lo == RELORA_ADAM8_MAP - 1) return (uint8_t)lo;
    return (uint8_t)(RELORA_FADD(s, -map[lo]) <= RELORA_FADD(map[lo + 1], -s) ? lo : lo + 1);
}

// The code of a scaled value s = x / absmax: the index of the nearest map entry, ties to the lower index;
// at or below map[0] (and NaN) gives 0, at or above map[255] gives 255. Binary search over the ascending
// map (8 steps); the GPU kernels use this.
RELORA_HD uint8_t relora_adam8_code(const float *map, float s) {
    if (!(s > map[0])) return 0;
    int lo = 0, hi = RELORA_ADAM8_MAP;  // map[lo] <= s < map[hi] (map[256] read as +inf)
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (map[mid] <= s) lo = mid; else hi = mid;
    }
    return relora_adam8_nearest(map, lo, s);
}

// Host acceleration of relora_adam8_code (the binary search's unpredictable branches cost ~40 ns a code
// on a CPU): `start` holds, for every 16-bit prefix P of s's bit pattern (sign, exponent, 7 mantissa
// bits), the largest index lo with map[lo] <= the smallest value of that prefix (0 if none). From there
// a short walk up (a prefix spans 2^-7 relative, within which the map has at most a few entries) reaches
// the largest lo with map[lo] <= s, and the same tie rule gives exactly relora_adam8_code's result
// (tested over every map entry, its neighbouring floats and random values of every magnitude).
#define RELORA_ADAM8_INDEX 65536

static inline void relora_adam8_build_index(const float *map, uint8_t *start) {
    for (uint32_t prefix = 0; prefix < RELORA_ADAM8_INDEX; ++prefix) {
        // Patterns ascend with the value for + and descend for -: the smallest value is the lowest pattern
        // of a positive prefix and the highest of a negative one.
        const uint32_t bits = (prefix << 16) | ((prefix & 0x8000u) ? 0xFFFFu : 0u);
        float x;
        memcpy(&x, &bits, sizeof x);
        int lo = 0;
        if (x == x) {
            while (lo < RELORA_ADAM8_MAP - 1 && map[lo + 1] <= x) ++lo;
        }
        start[prefix] = (uint8_t)lo;
    }
}

static inline uint8_t relora_adam8_code_indexed(const float *map, const uint8_t *start, float s) {
    if (!(s > map[0])) return 0;
    uint32_t bits;
    memcpy(&bits, &s, sizeof bits);
    int lo = start[bits >> 16];
    while (lo < RELORA_ADAM8_MAP - 1 && map[lo + 1] <= s) ++lo;
    return relora_adam8_nearest(map, lo, s);
}

// Element value of a code under a block scale.
RELORA_HD float relora_adam8_value(const float *map, uint8_t code, float absmax) { return RELORA_FMUL(map[code], absmax); }

// The block scale of values x[0..count): max |x| (0 for an all-zero block; NaN entries are skipped).
RELORA_HD float relora_adam8_absmax(const float *x, int count) {
    float a = 0.0f;
    for (int i = 0; i < count; ++i) a = fmaxf(a, fabsf(x[i]));
    return a;
}

// The code of x in a block of scale absmax (absmax 0: the code of 0).
RELORA_HD uint8_t relora_adam8_quantize_value(const float *map, float x, float absmax) {
    return relora_adam8_code(map, absmax > 0.0f ? RELORA_FDIV(x, absmax) : 0.0f);
}

// The same, through a host index (relora_adam8_build_index of `map`), or the binary search if index is NULL.
static inline uint8_t relora_adam8_quantize_value_host(const float *map, const uint8_t *index, float x, float absmax) {
    if (!index) return relora_adam8_quantize_value(map, x, absmax);
    return relora_adam8_code_indexed(map, index, absmax > 0.0f ? RELORA_FDIV(x, absmax) : 0.0f);
}

// AdamW's per-tensor scalars for a 1-based step, computed as CPUBackend.adamw and the f32 adamw kernel do
// (pow in double, everything else in f32).
typedef struct {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, decay;
} relora_adam_scalars;

static inline relora_adam_scalars relora_adam_scalars_make(float lr, float beta1, float beta2, float eps,
                                                           float weight_decay, int64_t step) {
    relora_adam_scalars s;
    const float bc1 = 1.0f - (float)pow((double)beta1, (double)step);
    const float bc2 = 1.0f - (float)pow((double)beta2, (double)step);
    s.beta1 = beta1; s.one_minus_beta1 = 1.0f - beta1;
    s.beta2 = beta2; s.one_minus_beta2 = 1.0f - beta2;
    s.eps = eps;
    s.step_size = lr / bc1;
    s.bc2_sqrt = sqrtf(bc2);
    const float lr_wd = lr * weight_decay;
    s.decay = 1.0f - lr_wd;
    return s;
}

// One element of AdamW (the f32 update's formula and operation order):
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + ((1 - beta2) g) g;  p = p decay - (step_size m) / (sqrt(v) / bc2_sqrt + eps)
// One operation per statement: clang (Swift's importer) fuses a product with an addition only within one
// expression, so none is fused here (see relora_quant.h).
RELORA_HD void relora_adamw_element(const relora_adam_scalars *s, float *p, float g, float *m, float *v) {
    const float m_old = RELORA_FMUL(s->beta1, *m);
    const float m_new = RELORA_FMUL(s->one_minus_beta1, g);
    const float mi = RELORA_FADD(m_old, m_new);
    const float v_old = RELORA_FMUL(s->beta2, *v);
    const float g_scaled = RELORA_FMUL(s->one_minus_beta2, g);
    const float v_new = RELORA_FMUL(g_scaled, g);
    const float vi = RELORA_FADD(v_old, v_new);
    const float root = RELORA_FSQRT(vi);
    const float corrected = RELORA_FDIV(root, s->bc2_sqrt);
    const float denom = RELORA_FADD(corrected, s->eps);
    const float decayed = RELORA_FMUL(*p, s->decay);
    const float numerator = RELORA_FMUL(s->step_size, mi);
    const float update = RELORA_FDIV(numerator, denom);
    *p = RELORA_FADD(decayed, -update);
    *m = mi;
    *v = vi;
}

// AdamW on block `b` of a tensor of `count` entries with 8-bit moments: elements [b * BLOCK, min(count,
// (b + 1) * BLOCK)). maps: the 512 floats of relora_adam8_build_maps; index: NULL (binary search) or the
// two maps' relora_adam8_build_index tables, 2 * RELORA_ADAM8_INDEX bytes (the same codes, faster). A GPU
// kernel may update the block's elements in any order and reduce the absmax in any order (max is exact):
// the result is the same.
static inline void relora_adamw8_block(const float *maps, const uint8_t *index, const relora_adam_scalars *s,
                                       float *param, const float *grad, uint8_t *m_codes, float *m_absmax,
                                       uint8_t *v_codes, float *v_absmax, int64_t count, int64_t b) {
    const float *map_m = maps, *map_v = maps + RELORA_ADAM8_MAP;
    const uint8_t *index_m = index, *index_v = index ? index + RELORA_ADAM8_INDEX : NULL;
    const int64_t start = b * RELORA_ADAM8_BLOCK;
    const int n = (int)(count - start < RELORA_ADAM8_BLOCK ? count - start : RELORA_ADAM8_BLOCK);
    float m[RELORA_ADAM8_BLOCK], v[RELORA_ADAM8_BLOCK];
    for (int j = 0; j < n; ++j) {
        m[j] = relora_adam8_value(map_m, m_codes[start + j], m_absmax[b]);
        v[j] = relora_adam8_value(map_v, v_codes[start + j], v_absmax[b]);
        relora_adamw_element(s, param + start + j, grad[start + j], m + j, v + j);
    }
    const float am = relora_adam8_absmax(m, n), av = relora_adam8_absmax(v, n);
    for (int j = 0; j < n; ++j) {
        m_codes[start + j] = relora_adam8_quantize_value_host(map_m, index_m, m[j], am);
        v_codes[start + j] = relora_adam8_quantize_value_host(map_v, index_v, v[j], av);
    }
    m_absmax[b] = am;
    v_absmax[b] = av;
}

// Quantizes block b of x[0..count) into codes and absmax[b] under `map` (one of the two halves of maps),
// through its index (or NULL) as relora_adamw8_block.
static inline void relora_adam8_quantize_block(const float *map, const uint8_t *index, const float *x, uint8_t *codes,
                                               float *absmax, int64_t count, int64_t b) {
    const int64_t start = b * RELORA_ADAM8_BLOCK;
    const int n = (int)(count - start < RELORA_ADAM8_BLOCK ? count - start : RELORA_ADAM8_BLOCK);
    const float a = relora_adam8_absmax(x + start, n);
    for (int j = 0; j < n; ++j) codes[start + j] = relora_adam8_quantize_value_host(map, index, x[start + j], a);
    absmax[b] = a;
}

#endif  // RELORA_ADAM8_H
