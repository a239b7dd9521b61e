// GEMM, conversions, fills, axpy/scale, stochastic-rounding quantize, changed codes and optimizer-state
// pruning against scalar references, through the ABI table (run_ops_suite, called by run_kernel_suite).
//
// Exact ops are compared bit for bit (or byte for byte): convert, fill, fill_uniform, axpy, scale (the
// kernels use _rn intrinsics in the CPU's order), the stochastic quantizer (relora_quant.h's row functions),
// changed codes (an integer count), pruning (the threshold is an exact order statistic). fill_normal is
// compared bit for bit too: in the emulation both sides use the host's libm; on a GPU CUDA's double log/cos
// may move a value by 1 ulp of f32 in rare cases (fill.cu), so on a CUDA build the check allows 1 ulp.
// GEMM is bounded: see test_gemm.
#include <dlfcn.h>

#include <algorithm>

#include "harness.h"

using namespace harness;

namespace {

uint32_t bits_of(float x) { return f32_bits(x); }
float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

bool g_emulated = true;

// ---- GEMM -------------------------------------------------------------------------------------------------
// Reference in double from the stored inputs: ref = (alpha * s) * sum_p op(a)[i,p] op(b)[p,j] + beta * c,
// alpha * s rounded to f32 first (the device forms that product in f32, as the CPU does).
// Bound (f32 output): a recursive f32 dot product of length k has error <= k * u * sum |a||b| (plus
// O(u^2)); scaling by alpha * s, the product beta * c and the final addition add three more roundings of
// at most u of the magnitudes involved: bound = (k + 3) * u * (|alpha s| sum |a||b| + |beta c|). cuBLAS'
// blocked / split-K orders have the same bound (each element's sum still has depth <= k).
// bf16 output: the f32 result rounded once more: + ub * (|ref| + f32 bound).
// pad > 0: every operand's rows are stored `pad` elements longer than they are (the model's padded
// activations): a and b hold NaN there (read, they would poison the result) and c's padding must come back
// unchanged.
bool test_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, int32_t ab_dtype, int32_t c_dtype, float alpha,
               float beta, bool with_scale, int64_t pad = 0) {
    char name[176];
    snprintf(name, sizeof name, "gemm %s%s %s->%s m=%lld n=%lld k=%lld alpha=%g beta=%g%s%s", ta ? "T" : "N", tb ? "T" : "N",
             dtype_name(ab_dtype), dtype_name(c_dtype), (long long)m, (long long)n, (long long)k, (double)alpha,
             (double)beta, with_scale ? " scaled" : "", pad ? " padded rows" : "");
    const uint64_t salt = (uint64_t)(m * 1000003 + n * 1009 + k + (ta ? 7 : 0) + (tb ? 13 : 0));
    const std::vector<float> a = stored(uniform((size_t)(m * k), -1.0f, 1.0f, 900 + salt), ab_dtype);
    const std::vector<float> b = stored(uniform((size_t)(k * n), -1.0f, 1.0f, 901 + salt), ab_dtype);
    std::vector<float> c0 = stored(uniform((size_t)(m * n), -2.0f, 2.0f, 902 + salt), c_dtype);
    if (beta == 0.0f) std::fill(c0.begin(), c0.end(), NAN);  // must not leak into the result
    const float scale = 0.625f;
    const float as = with_scale ? alpha * scale : alpha;
    // Stored row-major [rows, cols] with row stride cols + pad, the padding filled with `fill`.
    auto padded = [pad](const std::vector<float> &x, int64_t rows, int64_t cols, float fill) {
        std::vector<float> out((size_t)(rows * (cols + pad)), fill);
        for (int64_t r = 0; r < rows; ++r) std::copy_n(x.begin() + r * cols, cols, out.begin() + r * (cols + pad));
        return out;
    };
    const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
    const float c_fill = 12.5f;  // exact in bf16
    Tensor da(ab_dtype, a_rows * (a_cols + pad)), db(ab_dtype, b_rows * (b_cols + pad)), dc(c_dtype, m * (n + pad)),
        ds(RELORA_DTYPE_F32, 1);
    da.upload(padded(a, a_rows, a_cols, NAN));
    db.upload(padded(b, b_rows, b_cols, NAN));
    dc.upload(padded(c0, m, n, c_fill));
    ds.upload({scale});
    const int64_t lda = pad ? a_cols + pad : 0, ldb = pad ? b_cols + pad : 0, ldc = pad ? n + pad : 0;
    EXPECT_OK(name, api.gemm(ta, tb, m, n, k, alpha, with_scale ? (const float *)ds.buffer.ptr : nullptr, da.buffer.ptr,
                             db.buffer.ptr, ab_dtype, beta, dc.buffer.ptr, c_dtype, lda, ldb, ldc, nullptr));
    const std::vector<float> stored_c = dc.download();
    std::vector<float> got((size_t)(m * n));
    bool pad_kept = true;
    for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n + pad; ++j) {
            const float v = stored_c[(size_t)(i * (n + pad) + j)];
            if (j < n) got[(size_t)(i * n + j)] = v;
            else pad_kept &= v == c_fill;
        }
    }
    if (pad) record(pad_kept, (std::string(name) + ": c's padding untouched").c_str(), "%s", pad_kept ? "" : "written");
    std::vector<double> ref((size_t)(m * n)), bound((size_t)(m * n));
    for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
            double sum = 0, mag = 0;
            for (int64_t p = 0; p < k; ++p) {
                const double x = a[(size_t)(ta ? p * m + i : i * k + p)], y = b[(size_t)(tb ? j * k + p : p * n + j)];
                sum += x * y;
                mag += fabs(x * y);
            }
            const double cterm = beta == 0.0f ? 0.0 : (double)beta * c0[(size_t)(i * n + j)];
            const double r = (double)as * sum + cterm;
            double e = (double)(k + 3) * kU32 * (fabs((double)as) * mag + fabs(cterm));
            if (c_dtype == RELORA_DTYPE_BF16) e += kUBF16 * (fabs(r) + e);
            ref[(size_t)(i * n + j)] = r;
            bound[(size_t)(i * n + j)] = e + 1e-30;
        }
    }
    return check_bounds(name, got, ref, bound) && pad_kept;
}

bool test_gemms() {
    bool ok = true;
    const int64_t shapes[][3] = {{1, 1, 1}, {7, 33, 65}, {65, 7, 33}, {33, 65, 7}, {1, 7, 65}};
    const int32_t dtypes[] = {RELORA_DTYPE_F32, RELORA_DTYPE_BF16};
    int variant = 0;
    for (int t = 0; t < 4; ++t) {
        for (int32_t ab : dtypes) {
            for (int32_t cd : dtypes) {
                for (const auto &s : shapes) {
                    // Cycle through alpha/beta/alpha_scale so every combination of trans and dtypes meets each;
                    // v 4 and 5 are the LoRA GEMMs' alpha 1 with beta 1 or 0 (the device scalars without a kernel).
                    const int v = variant++ % 6;
                    const float alphas[] = {1.0f, -0.75f, 1.5f, 1.5f, 1.0f, 1.0f}, betas[] = {0.0f, 0.5f, 0.0f, -1.25f, 1.0f, 0.0f};
                    ok &= test_gemm(t & 1, t >> 1, s[0], s[1], s[2], ab, cd, alphas[v], betas[v], v >= 2);
                }
            }
        }
    }
    // The emulation counts launches: alpha 1 with a device scale and beta 0 or 1 launches no kernel of the library's
    // (the scale is cuBLAS' alpha as it is); alpha -1 (the merge) still forms -s on the device.
    void (*counters)(uint64_t *, uint64_t *, uint64_t *, uint64_t *) =
        g_emulated ? (void (*)(uint64_t *, uint64_t *, uint64_t *, uint64_t *))dlsym(api.handle, "relora_emu_counters") : nullptr;
    if (counters) {
        uint64_t l0 = 0, l1 = 0, l2 = 0, unused = 0;
        counters(&l0, &unused, &unused, &unused);
        ok &= test_gemm(false, true, 9, 5, 4, RELORA_DTYPE_BF16, RELORA_DTYPE_F32, 1.0f, 1.0f, true);
        ok &= test_gemm(true, false, 9, 5, 4, RELORA_DTYPE_BF16, RELORA_DTYPE_BF16, 1.0f, 0.0f, true);
        counters(&l1, &unused, &unused, &unused);
        ok &= test_gemm(false, false, 9, 5, 4, RELORA_DTYPE_F32, RELORA_DTYPE_F32, -1.0f, 1.0f, true);
        counters(&l2, &unused, &unused, &unused);
        const bool launches = l1 == l0 && l2 == l1 + 1;
        record(launches, "gemm: no scalar kernel for alpha 1 with alpha_scale", "alpha 1: %llu launches, alpha -1: %llu",
               (unsigned long long)(l1 - l0), (unsigned long long)(l2 - l1));
        ok &= launches;
    }
    // Padded rows, every transpose and dtype pair (the model's MLP and logits on CUDA).
    for (int t = 0; t < 4; ++t) {
        ok &= test_gemm(t & 1, t >> 1, 13, 21, 9, RELORA_DTYPE_BF16, RELORA_DTYPE_BF16, 1.0f, 1.0f, true, 11);
        ok &= test_gemm(t & 1, t >> 1, 21, 9, 13, RELORA_DTYPE_F32, RELORA_DTYPE_F32, 1.0f, 0.0f, false, 3);
        ok &= test_gemm(t & 1, t >> 1, 9, 13, 21, RELORA_DTYPE_BF16, RELORA_DTYPE_F32, -0.75f, 0.5f, false, 16);
    }
    // k = 0: c = beta * c (and beta = 0: zeros, whatever c held).
    ok &= test_gemm(false, false, 7, 5, 0, RELORA_DTYPE_F32, RELORA_DTYPE_F32, 1.0f, 0.5f, false);
    ok &= test_gemm(false, true, 7, 5, 0, RELORA_DTYPE_BF16, RELORA_DTYPE_F32, 1.0f, 0.0f, true);
    // Argument checks.
    void *p = (void *)64;
    const bool rejected = api.gemm(0, 0, -1, 2, 2, 1.0f, nullptr, nullptr, nullptr, RELORA_DTYPE_F32, 0.0f, nullptr,
                                   RELORA_DTYPE_F32, 0, 0, 0, nullptr) == RELORA_ERR_INVALID_ARGUMENT &&
                          api.gemm(0, 0, 2, 2, 2, 1.0f, nullptr, nullptr, nullptr, RELORA_DTYPE_F16, 0.0f, nullptr,
                                   RELORA_DTYPE_F32, 0, 0, 0, nullptr) == RELORA_ERR_INVALID_ARGUMENT &&
                          api.gemm(0, 1, 4, 3, 5, 1.0f, nullptr, p, p, RELORA_DTYPE_F32, 0.0f, p, RELORA_DTYPE_F32, 5, 4, 3,
                                   nullptr) == RELORA_ERR_INVALID_ARGUMENT &&
                          api.gemm(0, 0, 4, 3, 5, 1.0f, nullptr, p, p, RELORA_DTYPE_F32, 0.0f, p, RELORA_DTYPE_F32, 5, 3, 2,
                                   nullptr) == RELORA_ERR_INVALID_ARGUMENT;
    record(rejected, "gemm rejects a negative size, an f16 input and a row stride below its row length", "%s",
           rejected ? "" : api.last_error());
    return ok && rejected;
}

// ---- convert ---------------------------------------------------------------------------------------------
// References written independently of the kernels: f32 -> bf16 with integer RNE, f32 -> f16 with g++'s
// _Float16 conversion (IEEE RNE, subnormals, overflow to inf); NaN narrows to the canonical 0x7FFF (CUDA's
// conversions); widening is exact, NaN payloads kept (f16 -> f32: sign | 0x7F800000 | mantissa << 13).
uint16_t ref_bf16(uint32_t u) {
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
uint16_t ref_f16(uint32_t u) {
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
    const _Float16 h = (_Float16)from_bits(u);
    uint16_t b;
    memcpy(&b, &h, 2);
    return b;
}
uint32_t ref_f16_to_f32(uint16_t h) {
    if ((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu)) return ((uint32_t)(h & 0x8000u) << 16) | 0x7F800000u | ((uint32_t)(h & 0x3FFu) << 13);
    _Float16 x;
    memcpy(&x, &h, 2);
    return bits_of((float)x);
}

int64_t width(int32_t dtype) { return dtype == RELORA_DTYPE_F32 ? 4 : 2; }
const char *dname(int32_t dtype) { return dtype == RELORA_DTYPE_F32 ? "f32" : (dtype == RELORA_DTYPE_BF16 ? "bf16" : "f16"); }

// Element i of the source as f32 bits (exact widening), and the destination bits expected.
uint32_t src_as_f32(int32_t dtype, const std::vector<uint8_t> &raw, size_t i) {
    if (dtype == RELORA_DTYPE_F32) {
        uint32_t u;
        memcpy(&u, &raw[4 * i], 4);
        return u;
    }
    uint16_t h;
    memcpy(&h, &raw[2 * i], 2);
    return dtype == RELORA_DTYPE_BF16 ? (uint32_t)h << 16 : ref_f16_to_f32(h);
}

bool test_convert() {
    // f32 bit patterns: zeros, ones, infinities, NaNs (quiet, payload, negative, signalling), f32
    // subnormals, bf16 ties (to even both ways), bf16 and f16 overflow, f16 subnormals and their ties, the
    // largest f16, then random values over many binades.
    std::vector<uint32_t> pats = {0x00000000, 0x80000000, 0x3F800000, 0xBF800000, 0x7F800000, 0xFF800000, 0x7FC00000,
                                  0x7FC12345, 0xFFC00001, 0x7F800001, 0x00000001, 0x007FFFFF, 0x80000010, 0x3F808000,
                                  0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7F7F8000, 0x477FF000, 0x477FEFFF, 0x477FE000,
                                  0x33800000, 0x33000000, 0x33000001, 0x33C00000, 0x38800000, 0x387FE000, 0xB3400000};
    for (uint32_t i = 0; i < 3000; ++i) {
        const uint64_t r = relora_rng_u64(77, 1, i);
        // exponents spread over [2^-30, 2^30] mostly, every mantissa
        pats.push_back((uint32_t)(r & 0x807FFFFFu) | (uint32_t)((97 + (r >> 32) % 60) << 23));
    }
    const int64_t n = (int64_t)pats.size();
    const int32_t dtypes[] = {RELORA_DTYPE_F32, RELORA_DTYPE_BF16, RELORA_DTYPE_F16};
    bool ok = true;
    for (int32_t sd : dtypes) {
        // The source in its dtype: f32 patterns narrowed by the reference (so 16-bit sources hold NaNs,
        // infinities, subnormals and ties of their own format too), plus every f16 NaN/inf/subnormal kind.
        std::vector<uint8_t> raw((size_t)(n * width(sd)));
        for (int64_t i = 0; i < n; ++i) {
            if (sd == RELORA_DTYPE_F32) {
                memcpy(&raw[(size_t)(4 * i)], &pats[(size_t)i], 4);
            } else {
                uint16_t h = sd == RELORA_DTYPE_BF16 ? ref_bf16(pats[(size_t)i]) : ref_f16(pats[(size_t)i]);
                static const uint16_t kSpecial[8] = {0x7C01, 0xFE00, 0x0001, 0x83FF, 0x7D55, 0xFF81, 0x0080, 0x8001};
                if (i < 8) h = kSpecial[i];
                memcpy(&raw[(size_t)(2 * i)], &h, 2);
            }
        }
        for (int32_t dd : dtypes) {
            char name[96];
            snprintf(name, sizeof name, "convert %s -> %s n=%lld", dname(sd), dname(dd), (long long)n);
            Buffer src(n * width(sd)), dst(n * width(dd));
            src.upload(raw.data(), src.bytes);
            EXPECT_OK(name, api.convert(src.ptr, sd, dst.ptr, dd, n, nullptr));
            std::vector<uint8_t> got((size_t)dst.bytes), want((size_t)dst.bytes);
            dst.download(got.data(), dst.bytes);
            if (sd == dd) {
                want = raw;  // equal dtypes: the bytes
            } else {
                for (int64_t i = 0; i < n; ++i) {
                    const uint32_t f = src_as_f32(sd, raw, (size_t)i);
                    if (dd == RELORA_DTYPE_F32) {
                        memcpy(&want[(size_t)(4 * i)], &f, 4);
                    } else {
                        const uint16_t h = dd == RELORA_DTYPE_BF16 ? ref_bf16(f) : ref_f16(f);
                        memcpy(&want[(size_t)(2 * i)], &h, 2);
                    }
                }
            }
            ok &= check_bytes(name, got, want);
        }
    }
    return ok;
}

// ---- fills, axpy, scale ----------------------------------------------------------------------------------
// Downloads a tensor as f32 bit patterns (bf16 widened exactly).
bool test_fills(int32_t dtype, int64_t n) {
    bool ok = true;
    char name[96];
    Tensor t(dtype, n);
    {
        snprintf(name, sizeof name, "fill %s n=%lld", dtype_name(dtype), (long long)n);
        EXPECT_OK(name, api.fill(t.buffer.ptr, 0.3f, n, dtype, nullptr));
        ok &= check_bits(name, t.download(), stored(std::vector<float>((size_t)n, 0.3f), dtype));
    }
    {
        // CPUBackend.fillUniform: (2 * u - 1) * bound in f32.
        const float bound = 0.0625f * 1.7f;
        std::vector<float> want((size_t)n);
        for (int64_t i = 0; i < n; ++i) want[(size_t)i] = (2.0f * relora_rng_uniform(11, 3, (uint64_t)i) - 1.0f) * bound;
        snprintf(name, sizeof name, "fill_uniform %s n=%lld", dtype_name(dtype), (long long)n);
        EXPECT_OK(name, api.fill_uniform(t.buffer.ptr, n, bound, 11, 3, dtype, nullptr));
        ok &= check_bits(name, t.download(), stored(want, dtype));
    }
    {
        // CPUBackend.fillNormal, transcribed (double Box-Muller, f32 product with std).
        const float std_ = 0.02f;
        std::vector<float> want((size_t)n);
        for (int64_t i = 0; i < n; ++i) {
            const double u1 = (double)(relora_rng_u64(5, 9, (uint64_t)(2 * i)) >> 11) * 0x1p-53;
            const double u2 = (double)(relora_rng_u64(5, 9, (uint64_t)(2 * i + 1)) >> 11) * 0x1p-53;
            const double r = sqrt(-2 * log(1 - u1));
            want[(size_t)i] = (float)(r * cos(2 * M_PI * u2)) * std_;
        }
        snprintf(name, sizeof name, "fill_normal %s n=%lld", dtype_name(dtype), (long long)n);
        EXPECT_OK(name, api.fill_normal(t.buffer.ptr, n, std_, 5, 9, dtype, nullptr));
        const std::vector<float> got = t.download(), w = stored(want, dtype);
        if (g_emulated) {
            ok &= check_bits(name, got, w);
        } else {
            // CUDA's double log/cos: at most 1 ulp of the f32 (bf16: of the bf16) value, rarely.
            std::vector<double> ref(w.begin(), w.end()), bound((size_t)n);
            for (int64_t i = 0; i < n; ++i) bound[(size_t)i] = fabs(w[(size_t)i]) * (dtype == RELORA_DTYPE_BF16 ? 0x1p-7 : 0x1p-23);
            ok &= check_bounds(name, got, ref, bound);
        }
        if (n < 1000) return ok;  // the moments below need a sample
        double mean = 0, var = 0;
        for (float x : got) mean += x;
        mean /= (double)n;
        for (float x : got) var += (x - mean) * (x - mean);
        const double sd = sqrt(var / (double)n);
        const bool moments = fabs(mean) < 5 * 0.02 / sqrt((double)n) && fabs(sd / 0.02 - 1) < 0.1;
        record(moments, name, "mean %.3g, std %.4g (want 0, 0.02)", mean, sd);
        ok &= moments;
    }
    return ok;
}

bool test_axpy(int32_t a_dtype, int32_t b_dtype, int64_t n) {
    char name[96];
    snprintf(name, sizeof name, "axpy a %s += alpha * b %s n=%lld", dtype_name(a_dtype), dtype_name(b_dtype), (long long)n);
    const std::vector<float> a = stored(uniform((size_t)n, -1, 1, 31), a_dtype), b = stored(uniform((size_t)n, -3, 3, 32), b_dtype);
    Tensor da(a_dtype, n), db(b_dtype, n);
    da.upload(a);
    db.upload(b);
    const float alpha = -0.3f;
    EXPECT_OK(name, api.axpy(alpha, db.buffer.ptr, b_dtype, da.buffer.ptr, a_dtype, n, nullptr));
    std::vector<float> want((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        const float p = alpha * b[(size_t)i];  // a product, then a sum: two roundings (no FMA: -ffp-contract=off)
        want[(size_t)i] = a[(size_t)i] + p;
    }
    return check_bits(name, da.download(), stored(want, a_dtype));
}

bool test_scale(int32_t dtype, int64_t n) {
    char name[96];
    snprintf(name, sizeof name, "scale %s n=%lld", dtype_name(dtype), (long long)n);
    const std::vector<float> x = stored(uniform((size_t)n, -5, 5, 41), dtype);
    Tensor d(dtype, n);
    d.upload(x);
    EXPECT_OK(name, api.scale(d.buffer.ptr, 0.7f, n, dtype, nullptr));
    std::vector<float> want((size_t)n);
    for (int64_t i = 0; i < n; ++i) want[(size_t)i] = x[(size_t)i] * 0.7f;
    return check_bits(name, d.download(), stored(want, dtype));
}

// ---- stochastic quantize, changed codes -------------------------------------------------------------------
struct Fmt {
    int32_t id;
    const char *name;
    int block, bytes;
};
const Fmt kFmts[] = {{RELORA_FORMAT_Q8_0, "q8_0", RELORA_QK8_0, (int)sizeof(block_q8_0)},
                     {RELORA_FORMAT_Q4_0, "q4_0", RELORA_QK4_0, (int)sizeof(block_q4_0)},
                     {RELORA_FORMAT_NF4, "nf4", RELORA_QKNF4, (int)sizeof(block_nf4)}};

int row_sr(const Fmt &f, const float *x, void *y, int64_t n, uint64_t seed, uint64_t stream, uint64_t c0, int64_t *bad) {
    switch (f.id) {
    case RELORA_FORMAT_Q8_0: return relora_quantize_row_q8_0_sr(x, (block_q8_0 *)y, n, seed, stream, c0, bad);
    case RELORA_FORMAT_Q4_0: return relora_quantize_row_q4_0_sr(x, (block_q4_0 *)y, n, seed, stream, c0, bad);
    default: return relora_quantize_row_nf4_sr(x, (block_nf4 *)y, n, seed, stream, c0, bad);
    }
}
int row_rtn(const Fmt &f, const float *x, void *y, int64_t n) {
    switch (f.id) {
    case RELORA_FORMAT_Q8_0: return relora_quantize_row_q8_0(x, (block_q8_0 *)y, n, nullptr);
    case RELORA_FORMAT_Q4_0: return relora_quantize_row_q4_0(x, (block_q4_0 *)y, n, nullptr);
    default: return relora_quantize_row_nf4(x, (block_nf4 *)y, n, nullptr);
    }
}

// The weights of test_kernels.cpp's quantize checks: ordinary values, a zero block, tiny values, absmax.
std::vector<float> qweights(int64_t rows, int64_t cols, uint64_t stream) {
    std::vector<float> w = uniform((size_t)(rows * cols), -1.0f, 1.0f, stream);
    for (int64_t r = 0; r < rows; ++r) {
        float *row = w.data() + r * cols;
        if (cols > 40) {
            for (int64_t c = 0; c < 32; ++c) row[c] = 0.0f;
            for (int64_t c = 32; c < 40; ++c) row[c] *= 1e-6f;
        }
        row[(r * 7) % cols] = 3.5f * (r % 2 ? -1.0f : 1.0f);
    }
    return w;
}

// Reference: CPUBackend's stochastic quantize, element (r, c) drawing counter r * padded + c.
std::vector<uint8_t> ref_quantize(const Fmt &f, const std::vector<float> &x, int64_t rows, int64_t cols, bool sr,
                                  uint64_t seed, uint64_t stream) {
    const int64_t padded = (cols + f.block - 1) / f.block * f.block, row_bytes = padded / f.block * f.bytes;
    std::vector<uint8_t> out((size_t)(rows * row_bytes), 0);
    std::vector<float> row((size_t)padded, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
        std::copy(x.begin() + r * cols, x.begin() + (r + 1) * cols, row.begin());
        int64_t bad = -1;
        if (sr) {
            row_sr(f, row.data(), out.data() + r * row_bytes, padded, seed, stream, (uint64_t)(r * padded), &bad);
        } else {
            row_rtn(f, row.data(), out.data() + r * row_bytes, padded);
        }
    }
    return out;
}

bool test_quantize_sr(const Fmt &f, int64_t rows, int64_t cols) {
    char name[96];
    snprintf(name, sizeof name, "quantize stochastic %s [%lld, %lld]", f.name, (long long)rows, (long long)cols);
    const std::vector<float> w = qweights(rows, cols, 300 + (uint64_t)f.id);
    const std::vector<uint8_t> want = ref_quantize(f, w, rows, cols, true, 1234, 56);
    Buffer src(rows * cols * 4), blocks((int64_t)want.size()), failure(8);
    src.upload(w.data(), src.bytes);
    EXPECT_OK(name, api.quantize(f.id, (const float *)src.ptr, rows, cols, blocks.ptr, RELORA_ROUND_STOCHASTIC, 1234, 56,
                                 (uint64_t *)failure.ptr, nullptr));
    std::vector<uint8_t> got(want.size());
    blocks.download(got.data(), blocks.bytes);
    uint64_t word = 0;
    failure.download(&word, 8);
    bool ok = check_bytes(name, got, want);
    if (word != RELORA_QUANT_NO_FAILURE) {
        record(false, name, "failure word set for valid input");
        ok = false;
    }
    // Stochastic, not nearest: the codes differ from round to nearest somewhere (in any non-trivial shape).
    if (rows * cols >= 100) {
        const bool differs = ref_quantize(f, w, rows, cols, false, 0, 0) != got;
        record(differs, name, "codes differ from round to nearest: %s", differs ? "yes" : "no");
        ok &= differs;
    }
    return ok;
}

// A NaN: the failure word names it (index row * padded + col, status NONFINITE), as for round to nearest.
bool test_quantize_sr_failure(const Fmt &f) {
    const int64_t rows = 3, cols = 2 * f.block + 3, padded = 3 * f.block;
    std::vector<float> w = qweights(rows, cols, 400);
    w[(size_t)(1 * cols + 5)] = NAN;
    char name[96];
    snprintf(name, sizeof name, "quantize stochastic %s: NaN reported", f.name);
    Buffer src(rows * cols * 4), blocks(rows * (padded / f.block) * f.bytes), failure(8);
    src.upload(w.data(), src.bytes);
    EXPECT_OK(name, api.quantize(f.id, (const float *)src.ptr, rows, cols, blocks.ptr, RELORA_ROUND_STOCHASTIC, 1, 2,
                                 (uint64_t *)failure.ptr, nullptr));
    uint64_t word = 0;
    failure.download(&word, 8);
    const uint64_t want = ((uint64_t)(1 * padded + 5) << 2) | RELORA_QUANT_ERR_NONFINITE;
    record(word == want, name, "failure word 0x%llx, want 0x%llx", (unsigned long long)word, (unsigned long long)want);
    return word == want;
}

int64_t ref_changed(const Fmt &f, const std::vector<uint8_t> &a, const std::vector<uint8_t> &b) {
    const int64_t nb = (int64_t)a.size() / f.bytes;
    switch (f.id) {
    case RELORA_FORMAT_Q8_0: return relora_changed_codes_q8_0((const block_q8_0 *)a.data(), (const block_q8_0 *)b.data(), nb);
    case RELORA_FORMAT_Q4_0: return relora_changed_codes_q4_0((const block_q4_0 *)a.data(), (const block_q4_0 *)b.data(), nb);
    default: return relora_changed_codes_nf4((const block_nf4 *)a.data(), (const block_nf4 *)b.data(), nb);
    }
}

// old = rtn(w), new = stochastic(w) with a few scales changed by hand (scales are not compared) and one
// block with only one nibble changed; out[2] of a 4-float buffer receives the count, the others untouched.
bool test_changed_codes(const Fmt &f, int64_t rows, int64_t cols) {
    char name[96];
    snprintf(name, sizeof name, "count_changed_codes %s [%lld, %lld]", f.name, (long long)rows, (long long)cols);
    const std::vector<float> w = qweights(rows, cols, 500 + (uint64_t)f.id);
    const std::vector<uint8_t> old_b = ref_quantize(f, w, rows, cols, false, 0, 0);
    std::vector<uint8_t> new_b = ref_quantize(f, w, rows, cols, true, 9, 9);
    const int64_t nb = (int64_t)old_b.size() / f.bytes;
    for (int64_t b = 0; b < nb; b += 5) new_b[(size_t)(b * f.bytes)] ^= 0x01;  // scale bytes only
    if (nb > 3) {  // block 3: the codes of old, with one high nibble flipped (one code)
        const size_t at = (size_t)(3 * f.bytes);
        const int scale_bytes = f.id == RELORA_FORMAT_NF4 ? 4 : 2;
        std::copy(old_b.begin() + at + scale_bytes, old_b.begin() + at + f.bytes, new_b.begin() + at + scale_bytes);
        new_b[at + scale_bytes] ^= 0x40;
    }
    const int64_t want = ref_changed(f, old_b, new_b);
    Buffer a((int64_t)old_b.size()), b((int64_t)new_b.size()), out(16), ws(RELORA_SELECT_WORKSPACE_BYTES);
    a.upload(old_b.data(), a.bytes);
    b.upload(new_b.data(), b.bytes);
    const float init[4] = {-1, -2, -3, -4};
    out.upload(init, 16);
    EXPECT_OK(name, api.count_changed_codes(f.id, a.ptr, b.ptr, rows, cols, (float *)out.ptr, 2, ws.ptr, nullptr));
    float got[4];
    out.download(got, 16);
    const bool ok = got[2] == (float)want && got[0] == -1 && got[1] == -2 && got[3] == -4 && want > 0;
    record(ok, name, "%.0f changed, reference %lld (of %lld codes)", (double)got[2], (long long)want,
           (long long)(nb * f.block));
    return ok;
}

// ---- pruning ------------------------------------------------------------------------------------------------
uint32_t key_of(float x) { return bits_of(x) & 0x7FFFFFFFu; }

// The k-th smallest key (1-based), by sorting: independent of the radix select.
uint32_t kth_key(std::vector<uint32_t> keys, int64_t k) {
    std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
    return keys[(size_t)(k - 1)];
}

// CPUBackend.prune(.magnitude) with k given: k <= 0 nothing, k >= n everything, else the threshold rule.
int64_t ref_prune(std::vector<float> &x, int64_t k) {
    const int64_t n = (int64_t)x.size();
    if (k <= 0 || n == 0) return 0;
    if (k >= n) {
        std::fill(x.begin(), x.end(), 0.0f);
        return n;
    }
    std::vector<uint32_t> keys((size_t)n);
    for (int64_t i = 0; i < n; ++i) keys[(size_t)i] = key_of(x[(size_t)i]);
    const uint32_t t = kth_key(keys, k);
    int64_t z = 0;
    for (float &v : x) {
        if (key_of(v) <= t) {
            v = 0.0f;
            ++z;
        }
    }
    return z;
}

bool test_prune_magnitude(const char *what, int32_t dtype, std::vector<float> x, int64_t k) {
    char name[128];
    snprintf(name, sizeof name, "prune_magnitude %s %s n=%zu k=%lld", dtype_name(dtype), what, x.size(), (long long)k);
    x = stored(x, dtype);
    const int64_t n = (int64_t)x.size();
    Tensor d(dtype, n);
    d.upload(x);
    Buffer ws(RELORA_SELECT_WORKSPACE_BYTES);
    int64_t zeroed = -1;
    EXPECT_OK(name, api.prune_magnitude(d.buffer.ptr, n, dtype, k, ws.ptr, &zeroed, nullptr));
    const int64_t want = ref_prune(x, k);
    bool ok = check_bits(name, d.download(), x);
    record(zeroed == want, name, "zeroed %lld, reference %lld", (long long)zeroed, (long long)want);
    return ok && zeroed == want;
}

bool test_prunes(int32_t dtype) {
    bool ok = true;
    const int64_t n = 3001;  // > the emulation's 8 blocks x 256 threads: the stride loops wrap
    std::vector<float> spread = uniform((size_t)n, -2.0f, 2.0f, 601);
    // Ties: values on a grid of 1/8 (many equal magnitudes, exact zeros of both signs, a NaN and an inf).
    std::vector<float> ties(spread);
    for (float &v : ties) v = roundf(v * 8.0f) / 8.0f;
    ties[10] = -0.0f;
    ties[20] = NAN;
    ties[30] = -INFINITY;
    // Same high 16 bits, different low bits (f32: the second pass decides; bf16 keeps only the high bits).
    std::vector<float> close((size_t)n);
    for (int64_t i = 0; i < n; ++i) close[(size_t)i] = from_bits(0x3F800000u + (uint32_t)((i * 7919) % 65536)) * (i % 2 ? -1.0f : 1.0f);
    ok &= test_prune_magnitude("spread", dtype, spread, (int64_t)ceil(0.3 * (double)n));
    ok &= test_prune_magnitude("ties", dtype, ties, 1000);
    ok &= test_prune_magnitude("ties", dtype, ties, 1);
    ok &= test_prune_magnitude("close", dtype, close, 1500);
    ok &= test_prune_magnitude("spread", dtype, spread, 1);
    ok &= test_prune_magnitude("spread", dtype, spread, n - 1);
    ok &= test_prune_magnitude("ties", dtype, ties, n - 1);
    ok &= test_prune_magnitude("all zeros", dtype, std::vector<float>((size_t)n, 0.0f), 5);
    ok &= test_prune_magnitude("spread", dtype, spread, 0);
    ok &= test_prune_magnitude("spread", dtype, spread, n);
    ok &= test_prune_magnitude("spread", dtype, spread, n + 7);
    ok &= test_prune_magnitude("one element", dtype, {0.5f}, 1);

    // prune_random: (double)u < p zeroes.
    for (double p : {0.0, 0.3, 1.0}) {
        char name[96];
        snprintf(name, sizeof name, "prune_random %s n=%lld p=%g", dtype_name(dtype), (long long)n, p);
        std::vector<float> x = stored(spread, dtype);
        Tensor d(dtype, n);
        d.upload(x);
        int64_t zeroed = -1, want = 0;
        EXPECT_OK(name, api.prune_random(d.buffer.ptr, n, dtype, p, 21, 22, &zeroed, nullptr));
        for (int64_t i = 0; i < n; ++i) {
            if ((double)relora_rng_uniform(21, 22, (uint64_t)i) < p) {
                x[(size_t)i] = 0.0f;
                ++want;
            }
        }
        ok &= check_bits(name, d.download(), x);
        record(zeroed == want, name, "zeroed %lld, reference %lld", (long long)zeroed, (long long)want);
        ok &= zeroed == want;
    }
    return ok;
}

// CPUBackend.pruneMoments: score = |m| / (sqrt(v) + eps) in f32, the same threshold rule on the scores.
bool test_prune_moments(int64_t n, int64_t k) {
    char name[96];
    snprintf(name, sizeof name, "prune_moments n=%lld k=%lld", (long long)n, (long long)k);
    std::vector<float> m = uniform((size_t)n, -1e-2f, 1e-2f, 701), v = uniform((size_t)n, 0.0f, 1e-4f, 702);
    for (int64_t i = 0; i < n; i += 17) v[(size_t)i] = 0.0f;     // sqrt(0) + eps
    for (int64_t i = 5; i < n; i += 23) m[(size_t)i] = 0.0f;     // score 0: ties at the bottom
    for (int64_t i = 7; i < n; i += 29) m[(size_t)i] = m[(size_t)(i - 1)], v[(size_t)i] = v[(size_t)(i - 1)];  // equal scores
    const float eps = 1e-8f;
    Tensor dm(RELORA_DTYPE_F32, n), dv(RELORA_DTYPE_F32, n);
    dm.upload(m);
    dv.upload(v);
    Buffer ws(RELORA_SELECT_WORKSPACE_BYTES);
    int64_t zeroed = -1, want = 0;
    EXPECT_OK(name, api.prune_moments((float *)dm.buffer.ptr, (float *)dv.buffer.ptr, n, k, eps, ws.ptr, &zeroed, nullptr));
    if (k >= n) {
        std::fill(m.begin(), m.end(), 0.0f);
        std::fill(v.begin(), v.end(), 0.0f);
        want = n;
    } else if (k > 0) {
        std::vector<uint32_t> keys((size_t)n);
        for (int64_t i = 0; i < n; ++i) {
            const float root = sqrtf(v[(size_t)i]);
            const float den = root + eps;
            keys[(size_t)i] = key_of(fabsf(m[(size_t)i]) / den);
        }
        const uint32_t t = kth_key(keys, k);
        for (int64_t i = 0; i < n; ++i) {
            if (keys[(size_t)i] <= t) {
                m[(size_t)i] = v[(size_t)i] = 0.0f;
                ++want;
            }
        }
    }
    bool ok = check_bits(std::string(name) + " m", dm.download(), m);
    ok &= check_bits(std::string(name) + " v", dv.download(), v);
    record(zeroed == want, name, "zeroed %lld, reference %lld", (long long)zeroed, (long long)want);
    return ok && zeroed == want;
}

}  // namespace

bool run_ops_suite() {
    relora_library_info info;
    api.library_info(&info);
    g_emulated = info.emulated != 0;
    bool ok = test_gemms();
    ok &= test_convert();
    for (int32_t dtype : {RELORA_DTYPE_F32, RELORA_DTYPE_BF16}) {
        ok &= test_fills(dtype, 1);
        ok &= test_fills(dtype, 2100);
        ok &= test_scale(dtype, 2100);
        for (int32_t b : {RELORA_DTYPE_F32, RELORA_DTYPE_BF16}) ok &= test_axpy(dtype, b, 2100);
    }
    const int64_t shapes[][2] = {{1, 1}, {3, 37}, {5, 69}, {9, 200}, {40, 300}};
    for (const Fmt &f : kFmts) {
        for (const auto &s : shapes) ok &= test_quantize_sr(f, s[0], s[1]);
        ok &= test_quantize_sr_failure(f);
        ok &= test_changed_codes(f, 9, 200);
        ok &= test_changed_codes(f, 300, 250);  // 2400 q8_0 blocks: more than the emulation's 8 x 256 threads
    }
    for (int32_t dtype : {RELORA_DTYPE_F32, RELORA_DTYPE_BF16}) ok &= test_prunes(dtype);
    ok &= test_prune_moments(3001, 1201);
    ok &= test_prune_moments(3001, 1);
    ok &= test_prune_moments(3001, 3000);
    ok &= test_prune_moments(50, 50);
    ok &= test_prune_moments(50, 0);
    return ok;
}
