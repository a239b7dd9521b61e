// Quantized weight formats: block layouts and the scalar reference quantizers/dequantizers.
//
// This header is the executable spec. Swift calls these functions directly; the CUDA kernels include
// the same header and must match them bit for bit. Every format stores a row of n weights (n a multiple
// of the block size) as n / block_size consecutive blocks, little-endian, no padding between blocks:
//
//   format  block  bytes  bits/weight  byte-compatible with
//   q8_0     32     34     8.5         ggml Q8_0 (GGUF type 8): gguf-py quants.Q8_0, ggml quantize_row_q8_0_ref
//   q4_0     32     18     4.5         ggml Q4_0 (GGUF type 2): gguf-py quants.Q4_0, ggml quantize_row_q4_0_ref
//   nf4      64     36     4.5         bitsandbytes NF4 (quantize_4bit, quant_type="nf4", blocksize=64,
//                                      compress_statistics=False): its absmax array element and 32 code bytes
//
// Rows whose length is not a multiple of the block are rejected here (RELORA_QUANT_ERR_LENGTH); the
// caller zero-pads each row to whole blocks (the padding is stored but never reaches a GEMM).
// For nf4, bitsandbytes blocks the row-major flattened tensor, so a matrix matches its bytes exactly
// when the row length is a multiple of 64 (every LLaMA linear but the 1b config's down_proj).
//
// Where the references disagree or are undefined, this header chooses, and says so:
// - Degenerate blocks. A block whose scale rounds to zero in fp16 (q8_0, q4_0: |d| <= 2^-25, i.e. every
//   |x| <= ~3.8e-6 for q8_0, ~2.4e-7 for q4_0), or whose absmax is below bitsandbytes' 1e-38 clamp (nf4),
//   is written as the canonical zero block: the bytes ggml's C reference writes for a block of +0s
//   (q8_0: d = +0, codes 0; q4_0: d = -0 (0x8000), codes 8; nf4: absmax +0, codes 7 (byte 0x77)).
//   ggml and gguf-py compute such codes with 1/d taken from the unrounded fp32 d, which gives non-zero
//   codes under a zero scale (or, once 1/d overflows, undefined behaviour in C and NaN casts in numpy);
//   bitsandbytes divides by 1e-38 instead of the absmax and stores the true absmax. Both dequantize to
//   (nearly) zero either way: the canonical block dequantizes to exactly zero and requantizes to itself,
//   which the references' blocks do not, so a merge of a zero update leaves every code unchanged.
// - The sign of an all-zero q4_0 block's scale: ggml's C starts its running max at +0.0f, so d = +0/-8 =
//   -0 for every all-zero block; gguf-py takes the block's first element, so d = +0 when that element is
//   -0. This header follows ggml's C (it is the canonical zero block above, and it is idempotent; with
//   gguf-py's rule the sign of d flips on every requantization).
// - Rounding. q8_0 rounds x/d half away from zero (C roundf); gguf-py's np_roundf is the same function
//   (floor(a) + floor(2 * frac(a)), with the sign restored), not numpy's half-to-even np.round.
//   q4_0 truncates x/d + 8.5 toward zero, i.e. rounds half up. nf4 picks the codebook entry nearest
//   to x/absmax with ties to the lower code (see relora_nf4_code).
// - Non-finite inputs are an error (RELORA_QUANT_ERR_NONFINITE), and so is a scale that overflows fp16
//   (RELORA_QUANT_ERR_SCALE_OVERFLOW: q8_0 needs max |x| < 127 * 65520 ~ 8.32e6, q4_0 needs
//   max |x| < 8 * 65520 ~ 5.24e5); the references would write an inf scale and NaN weights.
// - nf4 absmax is stored unquantized (fp32): no double quantization. It costs 0.5 bits/weight against
//   ~0.127 with bitsandbytes' 8-bit double quantization (8/64 + 32/(64*256)); for the 6.5e9 frozen
//   weights of a 7b model that is 0.40 GB of absmax instead of 0.10 GB. In exchange a block is
//   self-contained (dequantizing a tile needs no second-level lookup) and the merge's quantization error
//   is the codes' alone.
//
// Floating point: every product and quotient below is a single IEEE round-to-nearest operation; none may
// be fused with an addition (q4_0's x*id + 8.5 would change codes at ties). Clang (Swift's importer)
// contracts only within one expression, so the product is its own statement; CUDA uses __fmul_rn etc.
// Host compilers other than clang must build with -ffp-contract=off (gcc's default is "fast").
// Subnormals must not be flushed (no -ffast-math, no --use_fast_math / -ftz=true).
#ifndef RELORA_QUANT_H
#define RELORA_QUANT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "relora_rng.h"  // also defines RELORA_HD (host and device, inlined)

#if defined(__cplusplus)
#define RELORA_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define RELORA_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

// Single correctly rounded float operations that a compiler may not fuse.
#if defined(__CUDA_ARCH__)
#define RELORA_FMUL(a, b) __fmul_rn((a), (b))
#define RELORA_FADD(a, b) __fadd_rn((a), (b))
#define RELORA_FDIV(a, b) __fdiv_rn((a), (b))
#else
#define RELORA_FMUL(a, b) ((a) * (b))
#define RELORA_FADD(a, b) ((a) + (b))
#define RELORA_FDIV(a, b) ((a) / (b))
#endif

// ---- Status codes (returned by the row functions) -------------------------------------------------
#define RELORA_QUANT_OK 0
#define RELORA_QUANT_ERR_LENGTH 1           // n < 0 or n not a multiple of the format's block size
#define RELORA_QUANT_ERR_NONFINITE 2        // an input is inf or NaN; *bad_index = the first one
#define RELORA_QUANT_ERR_SCALE_OVERFLOW 3   // a block's fp16 scale would be inf; *bad_index = its largest |x|

// ---- Block layouts --------------------------------------------------------------------------------
#define RELORA_QK8_0 32
#define RELORA_QK4_0 32
#define RELORA_QKNF4 64

// fp16 bit patterns (IEEE binary16) are carried as uint16_t, never as a compiler half type.
typedef uint16_t relora_half;

// q8_0: weight j of the block = qs[j] * d.
typedef struct {
    relora_half d;               // scale = fp16(absmax / 127)
    int8_t qs[RELORA_QK8_0];     // codes, round(x / d) half away from zero, in [-127, 127]
} block_q8_0;
RELORA_STATIC_ASSERT(sizeof(block_q8_0) == 2 + 32, "q8_0 block must be 34 bytes (ggml layout)");

// q4_0: weight j = ((qs[j] & 15) - 8) * d and weight j + 16 = ((qs[j] >> 4) - 8) * d, for j in [0, 16):
// byte j holds element j in its low nibble and element j + 16 in its high nibble.
typedef struct {
    relora_half d;                   // scale = fp16(m / -8), m = the first element of largest |x|
    uint8_t qs[RELORA_QK4_0 / 2];    // codes in [0, 15], offset 8
} block_q4_0;
RELORA_STATIC_ASSERT(sizeof(block_q4_0) == 2 + 16, "q4_0 block must be 18 bytes (ggml layout)");

// nf4: weight 2k = NF4[qs[k] >> 4] * absmax and weight 2k + 1 = NF4[qs[k] & 15] * absmax, for k in
// [0, 32): element 2i in the HIGH nibble (bitsandbytes' order, the opposite of q4_0's nibble order).
// bitsandbytes keeps absmax in a separate float32 array and the codes in a uint8 array; this block
// interleaves them so that every format is one array of blocks and a tile of rows is one byte range.
// absmax is a native float: the block must be 4-byte aligned (36-byte blocks keep that in an array).
typedef struct {
    float absmax;                    // max |x| of the block, fp32, exact
    uint8_t qs[RELORA_QKNF4 / 2];    // 4-bit indices into the NF4 codebook
} block_nf4;
RELORA_STATIC_ASSERT(sizeof(block_nf4) == 4 + 32, "nf4 block must be 36 bytes");

// bitsandbytes clamps the absmax to at least float32(1e-38) before taking its reciprocal; blocks below
// it are degenerate (see the top of this file). float32(1e-38) is the subnormal 7136238 * 2^-149; it is
// given by its bits (a subnormal float literal would draw an underflow warning in every Swift importer).
#define RELORA_NF4_ABSMAX_MIN_BITS 0x006CE3EEu

// ---- Bits -----------------------------------------------------------------------------------------
RELORA_HD uint32_t relora_f32_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

RELORA_HD float relora_f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

// 1 if f is neither inf nor NaN.
RELORA_HD int relora_f32_is_finite(float f) {
    return (relora_f32_bits(f) & 0x7F800000u) != 0x7F800000u;
}

// float32(1e-38), bitsandbytes' lower clamp of the nf4 absmax.
RELORA_HD float relora_nf4_absmax_min(void) { return relora_f32_from_bits(RELORA_NF4_ABSMAX_MIN_BITS); }

// ---- fp16 <-> fp32 --------------------------------------------------------------------------------
// binary32 -> binary16, round to nearest, ties to even: numpy's astype(np.float16), ggml's
// GGML_FP32_TO_FP16, Swift's Float16(x). Overflow (|x| >= 65520) gives inf, |x| <= 2^-25 gives a zero of
// x's sign, subnormal results are rounded correctly. NaN -> quiet NaN with x's sign and the top 9 bits of
// its payload (compiler-rt's __truncsfhf2, which Swift uses; numpy and ggml differ on NaN payloads, and
// quantized formats never store a NaN).
RELORA_HD relora_half relora_fp32_to_fp16(float f) {
    const uint32_t bits = relora_f32_bits(f);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    const uint32_t mag = bits & 0x7FFFFFFFu;
    if (mag > 0x7F800000u) {                       // NaN
        return (relora_half)(sign | 0x7E00u | ((mag >> 13) & 0x01FFu));
    }
    if (mag >= 0x477FF000u) {                      // >= 65520 (and inf): rounds to inf
        return (relora_half)(sign | 0x7C00u);
    }
    if (mag >= 0x38800000u) {                      // >= 2^-14: a normal fp16
        // Rebias the exponent (127 -> 15), then round the 13 dropped mantissa bits to nearest even;
        // a carry out of the mantissa correctly bumps the exponent.
        const uint32_t v = mag - 0x38000000u;
        return (relora_half)(sign | ((v + 0x0FFFu + ((v >> 13) & 1u)) >> 13));
    }
    if (mag < 0x33000000u) {                       // < 2^-25: rounds to zero
        return (relora_half)sign;
    }
    // Subnormal fp16 (or the smallest normal after rounding up): value = m * 2^(e - 150) and the fp16
    // unit is 2^-24, so the result is m >> (126 - e), rounded to nearest even. e in [102, 112].
    const uint32_t e = mag >> 23;
    const uint32_t m = (mag & 0x007FFFFFu) | 0x00800000u;
    const uint32_t shift = 126u - e;               // 14 ... 24
    const uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    const uint32_t rounded = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return (relora_half)(sign | rounded);
}

// binary16 -> binary32, exact (subnormals, infinities and NaN payloads included).
RELORA_HD float relora_fp16_to_fp32(relora_half h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1Fu;
    const uint32_t mantissa = h & 0x03FFu;
    if (exponent == 0) {
        // Zero or subnormal: mantissa * 2^-24, exact in binary32.
        const float magnitude = RELORA_FMUL((float)mantissa, 0x1p-24f);
        return relora_f32_from_bits(relora_f32_bits(magnitude) | sign);
    }
    if (exponent == 0x1F) {
        return relora_f32_from_bits(sign | 0x7F800000u | (mantissa << 13));
    }
    return relora_f32_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// 1 if the fp16 value is +0 or -0.
RELORA_HD int relora_fp16_is_zero(relora_half h) { return (h & 0x7FFFu) == 0; }
// 1 if the fp16 value is +inf or -inf.
RELORA_HD int relora_fp16_is_inf(relora_half h) { return (h & 0x7FFFu) == 0x7C00u; }

// ---- NF4 codebook ---------------------------------------------------------------------------------
// bitsandbytes' NormalFloat4 values (functional.get_4bit_type("nf4")), exact float32, ascending.
// Code 7 is exactly 0 and codes 0 and 15 are exactly -1 and +1, so the block's largest |x| dequantizes
// to exactly +-absmax.
RELORA_HD float relora_nf4_value(int code) {
    const float table[16] = {
        -0x1p+0f,         -0x1.647362p-1f, -0x1.0cd66p-1f,  -0x1.94654p-2f,
        -0x1.23449ap-2f,  -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0p+0f,
        0x1.45f5fep-4f,   0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,
        0x1.c3497p-2f,    0x1.200f56p-1f,  0x1.722766p-1f,  0x1p+0f,
    };
    return table[code & 15];
}

// The code of a scaled value s (normally in [-1, 1]): the number of decision thresholds strictly below s.
// Threshold k is the float32 midpoint (NF4[k] + NF4[k+1]) / 2 as bitsandbytes' CPU path computes it
// (torch.bucketize over those midpoints, right=False); its CUDA kernel's decision tree (dQuantizeNF4,
// strict `x > t`) uses the same 15 float32 values. A value exactly at a midpoint takes the lower code.
RELORA_HD int relora_nf4_code(float s) {
    const float mid[15] = {
        -0x1.b239bp-1f,   -0x1.38a4ep-1f,  -0x1.d709p-2f,   -0x1.5bd4ecp-2f,
        -0x1.e079d8p-3f,  -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f,
        0x1.ec90c4p-4f,   0x1.a0cfcp-3f,   0x1.2b05a8p-2f,  0x1.8ea7f2p-2f,
        0x1.00da08p-1f,   0x1.491b5ep-1f,  0x1.b913b4p-1f,
    };
    int code = 0;
    for (int k = 0; k < 15; ++k) code += (s > mid[k]) ? 1 : 0;
    return code;
}

// ---- Block functions (one block; the inputs must be finite) -----------------------------------------
// Each quantizer returns RELORA_QUANT_OK, or RELORA_QUANT_ERR_SCALE_OVERFLOW with *bad_j set to the
// in-block index of the largest |x| (the block is then not written).

// The scans every block quantizer (round to nearest and stochastic) starts with. Both start from +0 and
// keep the first index on a tie (strict >), so an all-zero block gives +0 and index 0; NaNs never compare
// greater (the row functions reject non-finite inputs before any block is quantized).
// The largest |x[j]| of n values and its index.
RELORA_HD float relora_block_absmax(const float *x, int n, int *jmax) {
    float amax = 0.0f;
    *jmax = 0;
    for (int j = 0; j < n; ++j) {
        const float a = fabsf(x[j]);
        if (a > amax) { amax = a; *jmax = j; }
    }
    return amax;
}

// The signed value of largest magnitude (q4_0's scale source; +a before -a keeps +a) and its index.
RELORA_HD float relora_block_signed_extreme(const float *x, int n, int *jmax) {
    float amax = 0.0f, max = 0.0f;
    *jmax = 0;
    for (int j = 0; j < n; ++j) {
        const float a = fabsf(x[j]);
        if (a > amax) { amax = a; max = x[j]; *jmax = j; }
    }
    return max;
}

RELORA_HD int relora_quantize_block_q8_0(const float *x, block_q8_0 *y, int *bad_j) {
    int jmax;
    const float amax = relora_block_absmax(x, RELORA_QK8_0, &jmax);
    const float d = RELORA_FDIV(amax, 127.0f);
    const relora_half dh = relora_fp32_to_fp16(d);
    if (relora_fp16_is_inf(dh)) { *bad_j = jmax; return RELORA_QUANT_ERR_SCALE_OVERFLOW; }
    // ggml multiplies by 1/d of the unrounded d; a zero fp16 scale makes the canonical zero block.
    const float id = relora_fp16_is_zero(dh) ? 0.0f : RELORA_FDIV(1.0f, d);
    y->d = dh;  // d >= +0, so a zero scale is already +0
    for (int j = 0; j < RELORA_QK8_0; ++j) {
        const float v = RELORA_FMUL(x[j], id);
        y->qs[j] = (int8_t)roundf(v);   // |v| <= 127 * (1 + 2^-23): in range
    }
    return RELORA_QUANT_OK;
}

RELORA_HD void relora_dequantize_block_q8_0(const block_q8_0 *x, float *y) {
    const float d = relora_fp16_to_fp32(x->d);
    for (int j = 0; j < RELORA_QK8_0; ++j) y[j] = RELORA_FMUL((float)x->qs[j], d);
}

// Element j of a block, the same arithmetic as the block dequantizer above (one product of the code and
// the scale): what the GPU kernels call, one element per thread (Kernels/src/quant.cu). The block
// functions keep their own loops because they are the CPU's hot path (the scale converted once per
// block; clang does not hoist it out of a loop over the element functions). Kernels/tests checks that
// the two agree on every code.
RELORA_HD float relora_dequantize_q8_0_at(const block_q8_0 *x, int j) {
    return RELORA_FMUL((float)x->qs[j], relora_fp16_to_fp32(x->d));
}

RELORA_HD int relora_quantize_block_q4_0(const float *x, block_q4_0 *y, int *bad_j) {
    // The signed value of largest magnitude; the first one on a tie (+a before -a keeps +a).
    // Starting from +0.0f makes an all-zero block's d = +0 / -8 = -0, as in ggml's C.
    int jmax;
    const float max = relora_block_signed_extreme(x, RELORA_QK4_0, &jmax);
    const float d = RELORA_FDIV(max, -8.0f);
    const relora_half dh = relora_fp32_to_fp16(d);
    if (relora_fp16_is_inf(dh)) { *bad_j = jmax; return RELORA_QUANT_ERR_SCALE_OVERFLOW; }
    if (relora_fp16_is_zero(dh)) {
        // Canonical zero block: d = -0, every code 8 (the value 0).
        y->d = 0x8000u;
        for (int j = 0; j < RELORA_QK4_0 / 2; ++j) y->qs[j] = 0x88u;
        return RELORA_QUANT_OK;
    }
    const float id = RELORA_FDIV(1.0f, d);
    y->d = dh;
    for (int j = 0; j < RELORA_QK4_0 / 2; ++j) {
        // x * id lies in [-8, 8] up to rounding, so x * id + 8.5 lies in [0.5, 16.5]: truncation is
        // floor, the codes are round-half-up of x / d + 8, and only 16 needs the clamp.
        const float v0 = RELORA_FMUL(x[j], id);
        const float v1 = RELORA_FMUL(x[j + RELORA_QK4_0 / 2], id);
        int c0 = (int)RELORA_FADD(v0, 8.5f);
        int c1 = (int)RELORA_FADD(v1, 8.5f);
        c0 = c0 > 15 ? 15 : c0;
        c1 = c1 > 15 ? 15 : c1;
        y->qs[j] = (uint8_t)(c0 | (c1 << 4));
    }
    return RELORA_QUANT_OK;
}

RELORA_HD void relora_dequantize_block_q4_0(const block_q4_0 *x, float *y) {
    const float d = relora_fp16_to_fp32(x->d);
    for (int j = 0; j < RELORA_QK4_0 / 2; ++j) {
        y[j] = RELORA_FMUL((float)((int)(x->qs[j] & 15u) - 8), d);
        y[j + RELORA_QK4_0 / 2] = RELORA_FMUL((float)((int)(x->qs[j] >> 4) - 8), d);
    }
}

// Element j (see relora_dequantize_q8_0_at): j < 16 is byte j's low nibble, j >= 16 byte j - 16's high one.
RELORA_HD float relora_dequantize_q4_0_at(const block_q4_0 *x, int j) {
    const int code = j < RELORA_QK4_0 / 2 ? (int)(x->qs[j] & 15u) : (int)(x->qs[j - RELORA_QK4_0 / 2] >> 4);
    return RELORA_FMUL((float)(code - 8), relora_fp16_to_fp32(x->d));
}

// nf4 has no scale overflow (absmax is stored in fp32), so this always returns RELORA_QUANT_OK.
RELORA_HD int relora_quantize_block_nf4(const float *x, block_nf4 *y, int *bad_j) {
    (void)bad_j;
    int jmax;
    const float absmax = relora_block_absmax(x, RELORA_QKNF4, &jmax);
    (void)jmax;
    if (absmax < relora_nf4_absmax_min()) {
        // Canonical zero block (also what bitsandbytes writes when absmax is exactly 0).
        y->absmax = 0.0f;
        for (int k = 0; k < RELORA_QKNF4 / 2; ++k) y->qs[k] = 0x77u;
        return RELORA_QUANT_OK;
    }
    // bitsandbytes: x * (1 / absmax), clamped to [-1, 1] (the clamp cannot change a code).
    const float inv = RELORA_FDIV(1.0f, absmax);
    y->absmax = absmax;
    for (int k = 0; k < RELORA_QKNF4 / 2; ++k) {
        const int hi = relora_nf4_code(RELORA_FMUL(x[2 * k], inv));
        const int lo = relora_nf4_code(RELORA_FMUL(x[2 * k + 1], inv));
        y->qs[k] = (uint8_t)((hi << 4) | lo);
    }
    return RELORA_QUANT_OK;
}

RELORA_HD void relora_dequantize_block_nf4(const block_nf4 *x, float *y) {
    const float absmax = x->absmax;
    for (int k = 0; k < RELORA_QKNF4 / 2; ++k) {
        y[2 * k] = RELORA_FMUL(relora_nf4_value(x->qs[k] >> 4), absmax);
        y[2 * k + 1] = RELORA_FMUL(relora_nf4_value(x->qs[k] & 15), absmax);
    }
}

// Element j (see relora_dequantize_q8_0_at): 2k is byte k's high nibble, 2k + 1 its low nibble.
RELORA_HD float relora_dequantize_nf4_at(const block_nf4 *x, int j) {
    const int byte = x->qs[j >> 1];
    return RELORA_FMUL(relora_nf4_value((j & 1) ? (byte & 15) : (byte >> 4)), x->absmax);
}

// ---- Row functions (the reference entry points) ---------------------------------------------------
// quantize: x holds n floats (n a multiple of the block size), y receives n / block blocks. Returns
// RELORA_QUANT_OK, or an error with *bad_index (if not NULL) set to the offending element's index in x
// (-1 for RELORA_QUANT_ERR_LENGTH). Blocks are processed in order and the first bad block stops the
// row: the blocks before it are written, it and the rest are not.
// dequantize: the inverse; returns RELORA_QUANT_OK or RELORA_QUANT_ERR_LENGTH.

// The index of the first inf or NaN among x[0 ..< count], or -1.
RELORA_HD int relora_first_nonfinite(const float *x, int count) {
    for (int j = 0; j < count; ++j) {
        if (!relora_f32_is_finite(x[j])) return j;
    }
    return -1;
}

// The row loop shared by every format and rounding: the length check, the non-finite check of each
// block, BLOCK_CALL quantizing block `b` (input `xb`, output `y + b`, failing element `bad_j`), and the
// first failing block stops the row with `*bad_index` = its element. Used as a function's whole body.
#define RELORA_QUANTIZE_ROW(QK, BLOCK_CALL)                                                   \
    if (n < 0 || n % (QK) != 0) {                                                             \
        if (bad_index) *bad_index = -1;                                                       \
        return RELORA_QUANT_ERR_LENGTH;                                                       \
    }                                                                                         \
    for (int64_t b = 0; b < n / (QK); ++b) {                                                  \
        const float *xb = x + b * (QK);                                                       \
        int bad_j = relora_first_nonfinite(xb, (QK));                                         \
        int status = bad_j >= 0 ? RELORA_QUANT_ERR_NONFINITE : (BLOCK_CALL);                  \
        if (status != RELORA_QUANT_OK) {                                                      \
            if (bad_index) *bad_index = b * (QK) + bad_j;                                     \
            return status;                                                                    \
        }                                                                                     \
    }                                                                                         \
    return RELORA_QUANT_OK;

// The body of relora_dequantize_row_<format>: n must be whole blocks (else RELORA_QUANT_ERR_LENGTH, y
// untouched); block b of x fills y[b * QK, (b + 1) * QK).
#define RELORA_DEQUANTIZE_ROW(QK, BLOCK_FN)                                                   \
    if (n < 0 || n % (QK) != 0) return RELORA_QUANT_ERR_LENGTH;                               \
    for (int64_t b = 0; b < n / (QK); ++b) BLOCK_FN(x + b, y + b * (QK));                     \
    return RELORA_QUANT_OK;

RELORA_HD int relora_quantize_row_q8_0(const float *x, block_q8_0 *y, int64_t n, int64_t *bad_index) {
    RELORA_QUANTIZE_ROW(RELORA_QK8_0, relora_quantize_block_q8_0(xb, y + b, &bad_j))
}

RELORA_HD int relora_dequantize_row_q8_0(const block_q8_0 *x, float *y, int64_t n) {
    RELORA_DEQUANTIZE_ROW(RELORA_QK8_0, relora_dequantize_block_q8_0)
}

RELORA_HD int relora_quantize_row_q4_0(const float *x, block_q4_0 *y, int64_t n, int64_t *bad_index) {
    RELORA_QUANTIZE_ROW(RELORA_QK4_0, relora_quantize_block_q4_0(xb, y + b, &bad_j))
}

RELORA_HD int relora_dequantize_row_q4_0(const block_q4_0 *x, float *y, int64_t n) {
    RELORA_DEQUANTIZE_ROW(RELORA_QK4_0, relora_dequantize_block_q4_0)
}

RELORA_HD int relora_quantize_row_nf4(const float *x, block_nf4 *y, int64_t n, int64_t *bad_index) {
    RELORA_QUANTIZE_ROW(RELORA_QKNF4, relora_quantize_block_nf4(xb, y + b, &bad_j))
}

RELORA_HD int relora_dequantize_row_nf4(const block_nf4 *x, float *y, int64_t n) {
    RELORA_DEQUANTIZE_ROW(RELORA_QKNF4, relora_dequantize_block_nf4)
}

// ---- Stochastic rounding (the `stochastic` merge policy) -------------------------------------------
// The same block scale as the round-to-nearest quantizer above, computed from the block's values exactly
// as it computes it (so the degenerate blocks, the canonical zero block and the scale-overflow error are
// the same); then every code rounds down or up between the two neighbouring representable values
// lo <= x <= hi (for q8_0 and q4_0 the multiples of the fp16 scale; for nf4 neighbouring codebook
// entries times absmax), up with probability p = (x - lo) / (hi - lo), so E[deq(code)] = x: the rounding
// is unbiased and a sum of updates each smaller than a step survives in expectation. Values outside the
// code range (q8_0: |x / d| > 127 by the fp16 rounding of d; q4_0: -8 * d, which the asymmetric code
// range lacks) clamp to the end code, as round to nearest does; that is the only bias.
//
// Randomness: element i of a row (its index in the padded row, i = block * block_size + j) draws
// u = relora_rng_uniform(seed, stream, counter0 + i), 24 bits, and rounds up iff u < p. So a code is a
// pure function of (seed, stream, element): a GPU kernel reproduces it bit for bit in any thread layout.
// P(up) = ceil(p * 2^24) / 2^24, which exceeds p by less than 2^-24: a bias below 2^-24 of a step.
// An exactly representable x has p = 0 and keeps its code (so requantizing deq(q) gives back q, as for
// round to nearest, and a merge of a zero update changes no code under either rounding).
//
// How p is computed: q8_0 and q4_0 take v = x / d (one IEEE division by the fp16 scale widened to fp32)
// and p = v - floor(v) (exact), the code being floor(v) (+ 8 for q4_0) or one more; nf4 works with the
// dequantized values themselves, lo = NF4[k] * absmax <= x < hi = NF4[k + 1] * absmax (the products the
// dequantizer computes) and p = (x - lo) / (hi - lo). Either way a dequantized value x gives p = 0
// exactly (x / d is then the integer code; x - lo is 0), which is what makes requantizing idempotent.

RELORA_HD int relora_quantize_block_q8_0_sr(const float *x, block_q8_0 *y, uint64_t seed, uint64_t stream,
                                            uint64_t counter0, int *bad_j) {
    int jmax;
    const float amax = relora_block_absmax(x, RELORA_QK8_0, &jmax);
    const float d = RELORA_FDIV(amax, 127.0f);
    const relora_half dh = relora_fp32_to_fp16(d);
    if (relora_fp16_is_inf(dh)) { *bad_j = jmax; return RELORA_QUANT_ERR_SCALE_OVERFLOW; }
    y->d = dh;
    if (relora_fp16_is_zero(dh)) {
        for (int j = 0; j < RELORA_QK8_0; ++j) y->qs[j] = 0;   // the canonical zero block, as RTN writes it
        return RELORA_QUANT_OK;
    }
    const float step = relora_fp16_to_fp32(dh);   // > 0
    for (int j = 0; j < RELORA_QK8_0; ++j) {
        const float v = RELORA_FDIV(x[j], step);
        const float lo = floorf(v);
        const float p = RELORA_FADD(v, -lo);       // exact: the fractional part of a float
        int c = (int)lo + (relora_rng_uniform(seed, stream, counter0 + (uint64_t)j) < p ? 1 : 0);
        c = c > 127 ? 127 : (c < -127 ? -127 : c);
        y->qs[j] = (int8_t)c;
    }
    return RELORA_QUANT_OK;
}

RELORA_HD int relora_quantize_block_q4_0_sr(const float *x, block_q4_0 *y, uint64_t seed, uint64_t stream,
                                            uint64_t counter0, int *bad_j) {
    int jmax;
    const float max = relora_block_signed_extreme(x, RELORA_QK4_0, &jmax);
    const float d = RELORA_FDIV(max, -8.0f);
    const relora_half dh = relora_fp32_to_fp16(d);
    if (relora_fp16_is_inf(dh)) { *bad_j = jmax; return RELORA_QUANT_ERR_SCALE_OVERFLOW; }
    if (relora_fp16_is_zero(dh)) {
        y->d = 0x8000u;
        for (int j = 0; j < RELORA_QK4_0 / 2; ++j) y->qs[j] = 0x88u;
        return RELORA_QUANT_OK;
    }
    const float step = relora_fp16_to_fp32(dh);   // non-zero, of either sign: weight = (code - 8) * step
    y->d = dh;
    int codes[RELORA_QK4_0];
    for (int j = 0; j < RELORA_QK4_0; ++j) {
        const float v = RELORA_FDIV(x[j], step);
        const float lo = floorf(v);
        const float p = RELORA_FADD(v, -lo);
        int c = (int)lo + 8 + (relora_rng_uniform(seed, stream, counter0 + (uint64_t)j) < p ? 1 : 0);
        codes[j] = c > 15 ? 15 : (c < 0 ? 0 : c);
    }
    for (int j = 0; j < RELORA_QK4_0 / 2; ++j) {
        y->qs[j] = (uint8_t)(codes[j] | (codes[j + RELORA_QK4_0 / 2] << 4));
    }
    return RELORA_QUANT_OK;
}

RELORA_HD int relora_quantize_block_nf4_sr(const float *x, block_nf4 *y, uint64_t seed, uint64_t stream,
                                           uint64_t counter0, int *bad_j) {
    (void)bad_j;
    int jmax;
    const float absmax = relora_block_absmax(x, RELORA_QKNF4, &jmax);
    (void)jmax;
    if (absmax < relora_nf4_absmax_min()) {
        y->absmax = 0.0f;
        for (int k = 0; k < RELORA_QKNF4 / 2; ++k) y->qs[k] = 0x77u;
        return RELORA_QUANT_OK;
    }
    y->absmax = absmax;
    int codes[RELORA_QKNF4];
    for (int j = 0; j < RELORA_QKNF4; ++j) {
        // The largest k whose dequantized value NF4[k] * absmax (the dequantizer's product) is <= x; k = 15
        // only for x = absmax, since NF4[0] * absmax = -absmax <= x <= absmax = NF4[15] * absmax.
        int k = 0;
        for (int c = 1; c < 16; ++c) k += RELORA_FMUL(relora_nf4_value(c), absmax) <= x[j] ? 1 : 0;
        int c = k;
        if (k < 15) {
            const float lo = RELORA_FMUL(relora_nf4_value(k), absmax);
            const float hi = RELORA_FMUL(relora_nf4_value(k + 1), absmax);
            // hi > lo except where both products underflow to the same subnormal (absmax near 1e-38).
            const float p = hi > lo ? RELORA_FDIV(RELORA_FADD(x[j], -lo), RELORA_FADD(hi, -lo)) : 0.0f;
            c += relora_rng_uniform(seed, stream, counter0 + (uint64_t)j) < p ? 1 : 0;
        }
        codes[j] = c;
    }
    for (int k = 0; k < RELORA_QKNF4 / 2; ++k) y->qs[k] = (uint8_t)((codes[2 * k] << 4) | codes[2 * k + 1]);
    return RELORA_QUANT_OK;
}

// Row entry points of stochastic rounding: as the round-to-nearest rows above (length check, non-finite
// check, first bad block stops the row), element i of the row drawing counter counter0 + i.
RELORA_HD int relora_quantize_row_q8_0_sr(const float *x, block_q8_0 *y, int64_t n, uint64_t seed, uint64_t stream,
                                          uint64_t counter0, int64_t *bad_index) {
    RELORA_QUANTIZE_ROW(RELORA_QK8_0, relora_quantize_block_q8_0_sr(xb, y + b, seed, stream, counter0 + (uint64_t)(b * RELORA_QK8_0), &bad_j))
}

RELORA_HD int relora_quantize_row_q4_0_sr(const float *x, block_q4_0 *y, int64_t n, uint64_t seed, uint64_t stream,
                                          uint64_t counter0, int64_t *bad_index) {
    RELORA_QUANTIZE_ROW(RELORA_QK4_0, relora_quantize_block_q4_0_sr(xb, y + b, seed, stream, counter0 + (uint64_t)(b * RELORA_QK4_0), &bad_j))
}

RELORA_HD int relora_quantize_row_nf4_sr(const float *x, block_nf4 *y, int64_t n, uint64_t seed, uint64_t stream,
                                         uint64_t counter0, int64_t *bad_index) {
    RELORA_QUANTIZE_ROW(RELORA_QKNF4, relora_quantize_block_nf4_sr(xb, y + b, seed, stream, counter0 + (uint64_t)(b * RELORA_QKNF4), &bad_j))
}

// ---- Changed codes (the merge report's `codes_changed`) -------------------------------------------
// How many of the element codes of blocks a[0 ..< nblocks] and b[0 ..< nblocks] differ: per weight, not
// per byte (a q4_0/nf4 byte holds two codes) and not counting the scales (a block whose scale moved but
// whose codes did not counts 0).
RELORA_HD int64_t relora_changed_codes_q8_0(const block_q8_0 *a, const block_q8_0 *b, int64_t nblocks) {
    int64_t changed = 0;
    for (int64_t i = 0; i < nblocks; ++i) {
        for (int j = 0; j < RELORA_QK8_0; ++j) changed += a[i].qs[j] != b[i].qs[j] ? 1 : 0;
    }
    return changed;
}

RELORA_HD int64_t relora_changed_codes_q4_0(const block_q4_0 *a, const block_q4_0 *b, int64_t nblocks) {
    int64_t changed = 0;
    for (int64_t i = 0; i < nblocks; ++i) {
        for (int j = 0; j < RELORA_QK4_0 / 2; ++j) {
            changed += (a[i].qs[j] & 15u) != (b[i].qs[j] & 15u) ? 1 : 0;
            changed += (a[i].qs[j] >> 4) != (b[i].qs[j] >> 4) ? 1 : 0;
        }
    }
    return changed;
}

RELORA_HD int64_t relora_changed_codes_nf4(const block_nf4 *a, const block_nf4 *b, int64_t nblocks) {
    int64_t changed = 0;
    for (int64_t i = 0; i < nblocks; ++i) {
        for (int k = 0; k < RELORA_QKNF4 / 2; ++k) {
            changed += (a[i].qs[k] & 15u) != (b[i].qs[k] & 15u) ? 1 : 0;
            changed += (a[i].qs[k] >> 4) != (b[i].qs[k] >> 4) ? 1 : 0;
        }
    }
    return changed;
}

// ---- ggml K-quants (read only: GGUF files made by llama.cpp's quantizer) ---------------------------
// relora never quantizes to these; a GGUF tensor stored in one is dequantized (warm start, eval) with the
// arithmetic of ggml's dequantize_row_q{4,5,6}_K (ggml-quants.c), which gguf-py's numpy dequantizers
// (gguf.quants.Q4_K/Q5_K/Q6_K.dequantize_blocks) repeat: the fp16 super-block scales widened exactly,
// then d * sc and dmin * m (one fp32 product each), then (d * sc) * q - dmin * m as one product and one
// subtraction (never fused), so the values equal both references bit for bit (Tests/Fixtures/
// kquant_reference.safetensors). A super-block holds 256 weights of a row (QK_K); rows are whole blocks.
#define RELORA_QK_K 256
#define RELORA_K_SCALE_SIZE 12

// q4_K: 8 sub-blocks of 32 weights; sub-block s has a 6-bit scale sc_s and 6-bit min m_s packed in
// `scales` (relora_kquant_scale_min); weight = (d * sc_s) * q - (dmin * m_s), q a 4-bit code. Codes:
// for each 64-weight group g, byte 32g + l holds weight 64g + l in its low nibble and 64g + 32 + l in
// its high nibble.
typedef struct {
    relora_half d;                          // super-block scale of the sub-block scales
    relora_half dmin;                       // super-block scale of the sub-block mins
    uint8_t scales[RELORA_K_SCALE_SIZE];    // 8 scales and 8 mins, 6 bits each
    uint8_t qs[RELORA_QK_K / 2];            // 4-bit codes
} block_q4_K;
RELORA_STATIC_ASSERT(sizeof(block_q4_K) == 2 + 2 + 12 + 128, "q4_K block must be 144 bytes (ggml layout)");

// q5_K: q4_K plus a fifth bit per weight in qh: bit 2g of qh[l] is the high bit of weight 64g + l, bit
// 2g + 1 that of weight 64g + 32 + l.
typedef struct {
    relora_half d;
    relora_half dmin;
    uint8_t scales[RELORA_K_SCALE_SIZE];
    uint8_t qh[RELORA_QK_K / 8];            // high bits
    uint8_t qs[RELORA_QK_K / 2];            // low 4 bits
} block_q5_K;
RELORA_STATIC_ASSERT(sizeof(block_q5_K) == 2 + 2 + 12 + 32 + 128, "q5_K block must be 176 bytes (ggml layout)");

// q6_K: 16 sub-blocks of 16 weights with int8 scales; weight = (d * scales[s]) * (q - 32), q a 6-bit
// code: low 4 bits in ql, high 2 bits in qh (layout in relora_dequantize_block_q6_K).
typedef struct {
    uint8_t ql[RELORA_QK_K / 2];            // low 4 bits
    uint8_t qh[RELORA_QK_K / 4];            // high 2 bits
    int8_t scales[RELORA_QK_K / 16];        // sub-block scales
    relora_half d;                          // super-block scale
} block_q6_K;
RELORA_STATIC_ASSERT(sizeof(block_q6_K) == 128 + 64 + 16 + 2, "q6_K block must be 210 bytes (ggml layout)");

// The 6-bit scale and min of sub-block j (0 ..< 8) of a q4_K/q5_K block (ggml's get_scale_min_k4):
// sub-blocks 0-3 are the low 6 bits of bytes j and j + 4; sub-blocks 4-7 take their low 4 bits from
// byte j + 4 (scale: low nibble, min: high nibble) and their top 2 bits from the top of bytes j - 4 and j.
RELORA_HD void relora_kquant_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// The scales and mins of 64-weight group g of a q4_K/q5_K block (its sub-blocks 2g and 2g + 1), times the
// super-block's d and dmin: weight w of sub-block 2g is d1 * q - m1, of sub-block 2g + 1 d2 * q - m2.
RELORA_HD void relora_kquant_group_scales(int g, const uint8_t *scales, float d, float dmin, float *d1, float *m1,
                                          float *d2, float *m2) {
    uint8_t sc, m;
    relora_kquant_scale_min(2 * g, scales, &sc, &m);
    *d1 = RELORA_FMUL(d, (float)sc);
    *m1 = RELORA_FMUL(dmin, (float)m);
    relora_kquant_scale_min(2 * g + 1, scales, &sc, &m);
    *d2 = RELORA_FMUL(d, (float)sc);
    *m2 = RELORA_FMUL(dmin, (float)m);
}

RELORA_HD void relora_dequantize_block_q4_K(const block_q4_K *x, float *y) {
    const float d = relora_fp16_to_fp32(x->d);
    const float dmin = relora_fp16_to_fp32(x->dmin);
    const uint8_t *q = x->qs;
    for (int g = 0; g < RELORA_QK_K / 64; ++g) {
        float d1, m1, d2, m2;
        relora_kquant_group_scales(g, x->scales, d, dmin, &d1, &m1, &d2, &m2);
        for (int l = 0; l < 32; ++l) y[64 * g + l] = RELORA_FADD(RELORA_FMUL(d1, (float)(q[l] & 0xF)), -m1);
        for (int l = 0; l < 32; ++l) y[64 * g + 32 + l] = RELORA_FADD(RELORA_FMUL(d2, (float)(q[l] >> 4)), -m2);
        q += 32;
    }
}

RELORA_HD void relora_dequantize_block_q5_K(const block_q5_K *x, float *y) {
    const float d = relora_fp16_to_fp32(x->d);
    const float dmin = relora_fp16_to_fp32(x->dmin);
    const uint8_t *ql = x->qs;
    for (int g = 0; g < RELORA_QK_K / 64; ++g) {
        float d1, m1, d2, m2;
        relora_kquant_group_scales(g, x->scales, d, dmin, &d1, &m1, &d2, &m2);
        const uint8_t u1 = (uint8_t)(1u << (2 * g)), u2 = (uint8_t)(2u << (2 * g));
        for (int l = 0; l < 32; ++l) {
            const int q = (ql[l] & 0xF) + ((x->qh[l] & u1) ? 16 : 0);
            y[64 * g + l] = RELORA_FADD(RELORA_FMUL(d1, (float)q), -m1);
        }
        for (int l = 0; l < 32; ++l) {
            const int q = (ql[l] >> 4) + ((x->qh[l] & u2) ? 16 : 0);
            y[64 * g + 32 + l] = RELORA_FADD(RELORA_FMUL(d2, (float)q), -m2);
        }
        ql += 32;
    }
}

// Each half h (128 weights) uses ql[64h ..< 64h + 64], qh[32h ..< 32h + 32] and scales[8h ..< 8h + 8]:
// for l in [0, 32), weights 128h + l + 32k (k = 0..3) take the low nibble of ql[l] (k = 0), of
// ql[l + 32] (k = 1), the high nibble of ql[l] (k = 2), of ql[l + 32] (k = 3), with bits 2k, 2k + 1 of
// qh[l] on top, and scale scales[8h + l / 16 + 2k].
RELORA_HD void relora_dequantize_block_q6_K(const block_q6_K *x, float *y) {
    const float d = relora_fp16_to_fp32(x->d);
    for (int h = 0; h < 2; ++h) {
        const uint8_t *ql = x->ql + 64 * h;
        const uint8_t *qh = x->qh + 32 * h;
        const int8_t *sc = x->scales + 8 * h;
        float *yh = y + 128 * h;
        for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            yh[l] = RELORA_FMUL(RELORA_FMUL(d, (float)sc[is + 0]), (float)q1);
            yh[l + 32] = RELORA_FMUL(RELORA_FMUL(d, (float)sc[is + 2]), (float)q2);
            yh[l + 64] = RELORA_FMUL(RELORA_FMUL(d, (float)sc[is + 4]), (float)q3);
            yh[l + 96] = RELORA_FMUL(RELORA_FMUL(d, (float)sc[is + 6]), (float)q4);
        }
    }
}

RELORA_HD int relora_dequantize_row_q4_K(const block_q4_K *x, float *y, int64_t n) {
    RELORA_DEQUANTIZE_ROW(RELORA_QK_K, relora_dequantize_block_q4_K)
}

RELORA_HD int relora_dequantize_row_q5_K(const block_q5_K *x, float *y, int64_t n) {
    RELORA_DEQUANTIZE_ROW(RELORA_QK_K, relora_dequantize_block_q5_K)
}

RELORA_HD int relora_dequantize_row_q6_K(const block_q6_K *x, float *y, int64_t n) {
    RELORA_DEQUANTIZE_ROW(RELORA_QK_K, relora_dequantize_block_q6_K)
}

#endif  // RELORA_QUANT_H
