// Every kernel of libreloracuda against scalar references, through the ABI table the Swift side uses
// (loaded with relora_cuda_load). Run on the emulated library in CI; the same file runs against a CUDA
// build on a GPU machine (the emulation checks are then skipped).
//
// usage: test_kernels path/to/libreloracuda[-emu].so
//
// Sizes are awkward on purpose: odd counts, rows that are not multiples of a quantization block, dims that
// are not multiples of 32 or 256, and counts above the emulation's grid cap (8 blocks), so the grid-stride
// loops wrap.
//
// Tolerances (comments at each check derive them): f32 unit roundoff u = 2^-24, bf16 unit roundoff
// ub = 2^-8 (one rounding to storage). References are computed in double from the stored (bf16-rounded)
// inputs, so a bound is the f32 arithmetic's error plus one rounding to the output dtype. Ops whose result
// is defined bit for bit (dequantize, quantize, merge, embedding, dropout, AdamW) are compared bitwise.
#include <dlfcn.h>
#include <stdlib.h>

#include <algorithm>

#include "harness.h"
#include "relora_adam8.h"

namespace harness {

relora_cuda_api api;
static int g_passed = 0, g_failed = 0;

void record(bool ok, const char *name, const char *fmt, ...) {
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    printf("%s  %-58s %s\n", ok ? "PASS" : "FAIL", name, detail);
    fflush(stdout);
    (ok ? g_passed : g_failed)++;
}

int failures() { return g_failed; }

const char *dtype_name(int32_t dtype) { return dtype == RELORA_DTYPE_BF16 ? "bf16" : "f32"; }

std::vector<float> uniform(size_t n, float lo, float hi, uint64_t stream) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = lo + (hi - lo) * relora_rng_uniform(0x7E57, stream, i);
    return v;
}

std::vector<float> stored(std::vector<float> v, int32_t dtype) {
    if (dtype == RELORA_DTYPE_BF16) {
        for (float &x : v) x = round_bf16(x);
    }
    return v;
}

Buffer::Buffer(int64_t n) : bytes(n) {
    if (api.malloc(&ptr, n) != RELORA_OK) {
        fprintf(stderr, "test_kernels: cannot allocate %lld device bytes: %s\n", (long long)n, api.last_error());
        exit(2);
    }
}
Buffer::~Buffer() {
    if (api.free(ptr) != RELORA_OK) record(false, "free", "%s", api.last_error());
}
void Buffer::upload(const void *host, int64_t n) const {
    if (api.memcpy(ptr, host, n, RELORA_MEMCPY_HOST_TO_DEVICE, nullptr) != RELORA_OK) record(false, "upload", "%s", api.last_error());
}
void Buffer::download(void *host, int64_t n) const {
    if (api.memcpy(host, ptr, n, RELORA_MEMCPY_DEVICE_TO_HOST, nullptr) != RELORA_OK ||
        api.stream_synchronize(nullptr) != RELORA_OK) {
        record(false, "download", "%s", api.last_error());
    }
}

Tensor::Tensor(int32_t d, int64_t n) : dtype(d), count(n), buffer(n * (d == RELORA_DTYPE_BF16 ? 2 : 4)) {}

void Tensor::upload(const std::vector<float> &values) const {
    if (dtype == RELORA_DTYPE_BF16) {
        std::vector<uint16_t> bits(values.size());
        for (size_t i = 0; i < values.size(); ++i) bits[i] = bf16_bits(values[i]);
        buffer.upload(bits.data(), (int64_t)bits.size() * 2);
    } else {
        buffer.upload(values.data(), (int64_t)values.size() * 4);
    }
}

std::vector<float> Tensor::download() const {
    std::vector<float> out((size_t)count);
    if (dtype == RELORA_DTYPE_BF16) {
        std::vector<uint16_t> bits((size_t)count);
        buffer.download(bits.data(), count * 2);
        for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_value(bits[i]);
    } else {
        buffer.download(out.data(), count * 4);
    }
    return out;
}

bool check_bounds(const std::string &name, const std::vector<float> &got, const std::vector<double> &ref,
                  const std::vector<double> &bound) {
    double worst = 0.0;
    long long bad = -1;
    for (size_t i = 0; i < got.size(); ++i) {
        const double err = fabs((double)got[i] - ref[i]);
        const double ratio = bound[i] > 0 ? err / bound[i] : (err == 0 ? 0 : INFINITY);
        if (!(err <= bound[i])) {
            if (bad < 0) bad = (long long)i;
            worst = INFINITY;
        } else if (ratio > worst) {
            worst = ratio;
        }
    }
    if (bad >= 0) {
        record(false, name.c_str(), "[%lld]: got %.9g, reference %.9g, bound %.3g", bad, (double)got[(size_t)bad],
               ref[(size_t)bad], bound[(size_t)bad]);
        return false;
    }
    record(true, name.c_str(), "n=%zu max |err|/bound %.3f", got.size(), worst);
    return true;
}

bool check_bits(const std::string &name, const std::vector<float> &got, const std::vector<float> &want) {
    for (size_t i = 0; i < got.size(); ++i) {
        if (f32_bits(got[i]) != f32_bits(want[i])) {
            record(false, name.c_str(), "[%zu]: got %.9g (0x%08x), want %.9g (0x%08x)", i, (double)got[i],
                   f32_bits(got[i]), (double)want[i], f32_bits(want[i]));
            return false;
        }
    }
    record(true, name.c_str(), "n=%zu bit-identical", got.size());
    return true;
}

bool check_bytes(const std::string &name, const std::vector<uint8_t> &got, const std::vector<uint8_t> &want) {
    if (got.size() != want.size()) {
        record(false, name.c_str(), "size %zu, want %zu", got.size(), want.size());
        return false;
    }
    for (size_t i = 0; i < got.size(); ++i) {
        if (got[i] != want[i]) {
            record(false, name.c_str(), "byte %zu: got 0x%02x, want 0x%02x", i, got[i], want[i]);
            return false;
        }
    }
    record(true, name.c_str(), "%zu bytes identical", got.size());
    return true;
}

bool sync(const char *name) {
    if (api.stream_synchronize(nullptr) != RELORA_OK) {
        record(false, name, "synchronize: %s", api.last_error());
        return false;
    }
    return true;
}

}  // namespace harness

using namespace harness;

namespace {

const int32_t kDtypes[] = {RELORA_DTYPE_F32, RELORA_DTYPE_BF16};

std::string label(const char *op, int32_t dtype, long long a, long long b = -1) {
    char buf[128];
    if (b >= 0) {
        snprintf(buf, sizeof buf, "%s %s [%lld, %lld]", op, dtype_name(dtype), a, b);
    } else {
        snprintf(buf, sizeof buf, "%s %s n=%lld", op, dtype_name(dtype), a);
    }
    return buf;
}

// ---- Quantized formats ------------------------------------------------------------------------------
struct Format {
    int32_t id;
    const char *name;
    int block;       // elements per block
    int block_bytes;
    int (*quantize_row)(const float *, void *, int64_t, int64_t *);
    int (*dequantize_row)(const void *, float *, int64_t);
};

int q8_quant(const float *x, void *y, int64_t n, int64_t *bad) { return relora_quantize_row_q8_0(x, (block_q8_0 *)y, n, bad); }
int q4_quant(const float *x, void *y, int64_t n, int64_t *bad) { return relora_quantize_row_q4_0(x, (block_q4_0 *)y, n, bad); }
int nf4_quant(const float *x, void *y, int64_t n, int64_t *bad) { return relora_quantize_row_nf4(x, (block_nf4 *)y, n, bad); }
int q8_dequant(const void *x, float *y, int64_t n) { return relora_dequantize_row_q8_0((const block_q8_0 *)x, y, n); }
int q4_dequant(const void *x, float *y, int64_t n) { return relora_dequantize_row_q4_0((const block_q4_0 *)x, y, n); }
int nf4_dequant(const void *x, float *y, int64_t n) { return relora_dequantize_row_nf4((const block_nf4 *)x, y, n); }

const Format kFormats[] = {
    {RELORA_FORMAT_Q8_0, "q8_0", RELORA_QK8_0, (int)sizeof(block_q8_0), q8_quant, q8_dequant},
    {RELORA_FORMAT_Q4_0, "q4_0", RELORA_QK4_0, (int)sizeof(block_q4_0), q4_quant, q4_dequant},
    {RELORA_FORMAT_NF4, "nf4", RELORA_QKNF4, (int)sizeof(block_nf4), nf4_quant, nf4_dequant},
};

// Rows x cols: one element, a partial block, several rows with padding, and more quantization blocks
// than one CUDA block's 128 (the tile loop and the row boundaries inside a tile).
const int64_t kQuantShapes[][2] = {{1, 1}, {3, 37}, {5, 69}, {17, 200}, {9, 1000}};

struct Quantized {
    int64_t rows, cols, padded, row_bytes;
    std::vector<uint8_t> blocks;
};

// The reference quantization of x [rows, cols], rows zero-padded (what CPUBackend.quantize does).
// Returns the row function's status for the first failing row (and its *row / *col), else OK.
int reference_quantize(const Format &f, const std::vector<float> &x, int64_t rows, int64_t cols, Quantized *q,
                       int64_t *bad_row = nullptr, int64_t *bad_col = nullptr) {
    q->rows = rows;
    q->cols = cols;
    q->padded = (cols + f.block - 1) / f.block * f.block;
    q->row_bytes = q->padded / f.block * f.block_bytes;
    q->blocks.assign((size_t)(rows * q->row_bytes), 0);
    std::vector<float> row((size_t)q->padded, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
        std::copy(x.begin() + r * cols, x.begin() + (r + 1) * cols, row.begin());
        int64_t bad = -1;
        const int status = f.quantize_row(row.data(), q->blocks.data() + r * q->row_bytes, q->padded, &bad);
        if (status != RELORA_QUANT_OK) {
            if (bad_row) *bad_row = r;
            if (bad_col) *bad_col = bad;
            return status;
        }
    }
    return RELORA_QUANT_OK;
}

std::vector<float> reference_dequantize(const Format &f, const Quantized &q) {
    std::vector<float> out((size_t)(q.rows * q.cols)), row((size_t)q.padded);
    for (int64_t r = 0; r < q.rows; ++r) {
        f.dequantize_row(q.blocks.data() + r * q.row_bytes, row.data(), q.padded);
        std::copy(row.begin(), row.begin() + q.cols, out.begin() + r * q.cols);
    }
    return out;
}

// Weights with the cases that matter: ordinary values, an all-zero block (canonical zero block), tiny
// values whose fp16 scale is subnormal, and a lone large value per row (the block's absmax).
std::vector<float> weights(int64_t rows, int64_t cols, uint64_t stream) {
    std::vector<float> w = uniform((size_t)(rows * cols), -1.0f, 1.0f, stream);
    for (int64_t r = 0; r < rows; ++r) {
        float *row = w.data() + r * cols;
        if (cols > 40) {
            for (int64_t c = 0; c < 32 && c < cols; ++c) row[c] = 0.0f;          // a zero block (q8/q4)
            for (int64_t c = 32; c < 40; ++c) row[c] *= 1e-6f;                   // tiny values
        }
        row[(r * 7) % cols] = 3.5f * (r % 2 ? -1.0f : 1.0f);                      // absmax with a sign
    }
    return w;
}

bool test_dequantize(const Format &f, int64_t rows, int64_t cols) {
    const std::vector<float> w = weights(rows, cols, 100 + (uint64_t)f.id);
    Quantized q;
    reference_quantize(f, w, rows, cols, &q);
    const std::vector<float> want = reference_dequantize(f, q);
    Buffer blocks((int64_t)q.blocks.size());
    blocks.upload(q.blocks.data(), (int64_t)q.blocks.size());
    bool ok = true;
    for (int32_t dtype : kDtypes) {
        Tensor out(dtype, rows * cols);
        char name[96];
        snprintf(name, sizeof name, "dequantize %s -> %s [%lld, %lld]", f.name, dtype_name(dtype), (long long)rows,
                 (long long)cols);
        EXPECT_OK(name, api.dequantize(f.id, blocks.ptr, rows, cols, out.buffer.ptr, dtype, nullptr));
        // Exact: the header's element function, then (bf16) one round to nearest even.
        ok &= check_bits(name, out.download(), stored(want, dtype));
    }
    // A tile of rows from the middle: the caller offsets the block pointer by whole rows.
    if (rows > 2) {
        Tensor out(RELORA_DTYPE_F32, (rows - 2) * cols);
        char name[96];
        snprintf(name, sizeof name, "dequantize %s rows 1..%lld of %lld", f.name, (long long)rows - 2, (long long)rows);
        EXPECT_OK(name, api.dequantize(f.id, (uint8_t *)blocks.ptr + q.row_bytes, rows - 2, cols, out.buffer.ptr,
                                      RELORA_DTYPE_F32, nullptr));
        ok &= check_bits(name, out.download(), std::vector<float>(want.begin() + cols, want.end() - cols));
    }
    return ok;
}

// The output wherever the caller puts it: at element offsets 0..7 of an aligned buffer, so row starts fall on
// every position relative to the 16-byte boundaries the kernel's vector stores need (head, whole chunks, tail),
// and a row wider than the emulated grid's 8 x 256 chunks (the x-stride loop wraps). The elements before the
// offset and after the end keep their sentinel.
bool test_dequantize_offsets(const Format &f) {
    bool ok = true;
    const int64_t shapes[][2] = {{3, 45}, {2, 7}, {1, 16411}};
    for (const auto &shape : shapes) {
        const int64_t rows = shape[0], cols = shape[1];
        const std::vector<float> w = weights(rows, cols, 150 + (uint64_t)f.id);
        Quantized q;
        reference_quantize(f, w, rows, cols, &q);
        const std::vector<float> want = reference_dequantize(f, q);
        Buffer blocks((int64_t)q.blocks.size());
        blocks.upload(q.blocks.data(), (int64_t)q.blocks.size());
        for (int32_t dtype : kDtypes) {
            const int64_t size = dtype == RELORA_DTYPE_F32 ? 4 : 2, total = rows * cols + 16;
            for (int64_t offset = 0; offset < 8; ++offset) {
                if (cols > 1000 && offset % 3 != 1) continue;  // the wide row at two offsets is enough
                Buffer out(total * size);
                const std::vector<uint8_t> sentinel((size_t)(total * size), 0x5A);
                out.upload(sentinel.data(), out.bytes);
                char name[112];
                snprintf(name, sizeof name, "dequantize %s -> %s [%lld, %lld] at element offset %lld", f.name,
                         dtype_name(dtype), (long long)rows, (long long)cols, (long long)offset);
                EXPECT_OK(name, api.dequantize(f.id, blocks.ptr, rows, cols, (uint8_t *)out.ptr + offset * size, dtype, nullptr));
                std::vector<uint8_t> got((size_t)out.bytes);
                out.download(got.data(), out.bytes);
                std::vector<uint8_t> expect = sentinel;
                for (size_t i = 0; i < want.size(); ++i) {
                    uint8_t *dst = expect.data() + (offset + (int64_t)i) * size;
                    if (dtype == RELORA_DTYPE_F32) {
                        memcpy(dst, &want[i], 4);
                    } else {
                        const uint16_t b = bf16_bits(want[i]);
                        memcpy(dst, &b, 2);
                    }
                }
                ok &= check_bytes(name, got, expect);
            }
        }
    }
    return ok;
}

// The kernels dequantize with relora_quant.h's element functions, the CPU with its block functions: two
// spellings of one product, checked equal here on every code (every byte value in every position) under
// scales that include negative, subnormal and zero ones.
bool test_element_functions() {
    const uint16_t scales[] = {0x3C00, 0xBC00, 0x0001, 0x83FF, 0x0000, 0x8000, 0x7BFF, 0x2E66, 0x1400};
    const float absmaxes[] = {1.0f, 3.5f, 1e-30f, 0.0f, 6.5e4f, 0x1p-126f};
    int mismatches = 0, checked = 0;
    for (int b = 0; b < 256; ++b) {
        block_q8_0 q8;
        block_q4_0 q4;
        block_nf4 nf;
        q8.d = q4.d = scales[b % 9];
        nf.absmax = absmaxes[b % 6];
        for (int j = 0; j < 32; ++j) q8.qs[j] = (int8_t)(uint8_t)(b + 8 * j);
        for (int j = 0; j < 16; ++j) q4.qs[j] = (uint8_t)(b + 16 * j);
        for (int j = 0; j < 32; ++j) nf.qs[j] = (uint8_t)(b + 8 * j);
        float y8[32], y4[32], yn[64];
        relora_dequantize_block_q8_0(&q8, y8);
        relora_dequantize_block_q4_0(&q4, y4);
        relora_dequantize_block_nf4(&nf, yn);
        for (int j = 0; j < 32; ++j) {
            mismatches += f32_bits(relora_dequantize_q8_0_at(&q8, j)) != f32_bits(y8[j]);
            mismatches += f32_bits(relora_dequantize_q4_0_at(&q4, j)) != f32_bits(y4[j]);
            checked += 2;
        }
        for (int j = 0; j < 64; ++j) {
            mismatches += f32_bits(relora_dequantize_nf4_at(&nf, j)) != f32_bits(yn[j]);
            ++checked;
        }
    }
    record(mismatches == 0, "element dequantizers == block dequantizers", "%d of %d elements differ", mismatches, checked);
    return mismatches == 0;
}

std::vector<uint8_t> download_bytes(const Buffer &b) {
    std::vector<uint8_t> out((size_t)b.bytes);
    b.download(out.data(), b.bytes);
    return out;
}

uint64_t download_failure(const Buffer &b) {
    uint64_t word = 0;
    b.download(&word, 8);
    return word;
}

bool test_quantize(const Format &f, int64_t rows, int64_t cols) {
    const std::vector<float> w = weights(rows, cols, 200 + (uint64_t)f.id);
    Quantized q;
    reference_quantize(f, w, rows, cols, &q);
    Buffer src(rows * cols * 4), blocks((int64_t)q.blocks.size()), failure(8);
    src.upload(w.data(), src.bytes);
    char name[96];
    snprintf(name, sizeof name, "quantize %s [%lld, %lld]", f.name, (long long)rows, (long long)cols);
    EXPECT_OK(name, api.quantize(f.id, (const float *)src.ptr, rows, cols, blocks.ptr, RELORA_ROUND_NEAREST, 0, 0, (uint64_t *)failure.ptr, nullptr));
    bool ok = check_bytes(name, download_bytes(blocks), q.blocks);
    if (download_failure(failure) != RELORA_QUANT_NO_FAILURE) {
        record(false, name, "failure word set for valid input");
        ok = false;
    }
    return ok;
}

// Non-finite inputs and scale overflow: the failure word names the first failing element in row-major
// order of the padded matrix, with the reference's status and in-block index.
bool test_quantize_failures(const Format &f) {
    const int64_t rows = 4, cols = 3 * f.block + 5;
    bool ok = true;
    struct Case {
        const char *what;
        int64_t r1, c1;
        float v1;
        int64_t r2, c2;
        float v2;
    };
    const float big = f.id == RELORA_FORMAT_Q4_0 ? 6e5f : 9e6f;  // past q4_0's 5.24e5, q8_0's 8.32e6
    const Case cases[] = {
        {"NaN, then inf in a later row", 1, 40, NAN, 2, 3, INFINITY},
        {"inf after NaN in the same row", 2, 7, -INFINITY, 2, cols - 1, NAN},
        {"scale overflow", 3, f.block + 2, big, 3, 2 * f.block + 1, NAN},
    };
    for (const Case &c : cases) {
        if (f.id == RELORA_FORMAT_NF4 && c.v1 == big) continue;  // nf4 stores an f32 absmax: no overflow
        std::vector<float> w = weights(rows, cols, 300);
        w[(size_t)(c.r1 * cols + c.c1)] = c.v1;
        w[(size_t)(c.r2 * cols + c.c2)] = c.v2;
        Quantized q;
        int64_t want_row = -1, want_col = -1;
        const int want_status = reference_quantize(f, w, rows, cols, &q, &want_row, &want_col);
        Buffer src(rows * cols * 4), blocks((int64_t)q.blocks.size()), failure(8);
        src.upload(w.data(), src.bytes);
        char name[128];
        snprintf(name, sizeof name, "quantize %s failure: %s", f.name, c.what);
        EXPECT_OK(name, api.quantize(f.id, (const float *)src.ptr, rows, cols, blocks.ptr, RELORA_ROUND_NEAREST, 0, 0, (uint64_t *)failure.ptr, nullptr));
        const uint64_t word = download_failure(failure);
        const int64_t index = (int64_t)(word >> 2), padded = q.padded;
        const bool match = word != RELORA_QUANT_NO_FAILURE && (int)(word & 3) == want_status && index / padded == want_row &&
                           index % padded == want_col;
        record(match, name, "status %d at [%lld, %lld], reference %d at [%lld, %lld]", (int)(word & 3),
               (long long)(index / padded), (long long)(index % padded), want_status, (long long)want_row,
               (long long)want_col);
        ok &= match;
    }
    return ok;
}

// ---- RMSNorm ----------------------------------------------------------------------------------------------
bool test_rmsnorm(int32_t dtype, int64_t rows, int64_t dim) {
    const float eps = 1e-5f;
    const std::vector<float> x = stored(uniform((size_t)(rows * dim), -2.0f, 2.0f, 10), dtype);
    const std::vector<float> w = stored(uniform((size_t)dim, 0.5f, 1.5f, 11), dtype);
    const std::vector<float> dy = stored(uniform((size_t)(rows * dim), -1.0f, 1.0f, 12), dtype);
    const std::vector<float> dx0 = stored(uniform((size_t)(rows * dim), -0.5f, 0.5f, 13), dtype);
    const std::vector<float> dw0 = uniform((size_t)dim, -0.5f, 0.5f, 14);
    Tensor tx(dtype, rows * dim), tw(dtype, dim), tout(dtype, rows * dim), tdy(dtype, rows * dim), tdx(dtype, rows * dim);
    Tensor trstd(RELORA_DTYPE_F32, rows), tdw(RELORA_DTYPE_F32, dim);
    tx.upload(x);
    tw.upload(w);
    tdy.upload(dy);
    tdx.upload(dx0);
    tdw.upload(dw0);
    const std::string fwd = label("rmsnorm_forward", dtype, rows, dim);
    EXPECT_OK(fwd.c_str(), api.rmsnorm_forward(tx.buffer.ptr, tw.buffer.ptr, tout.buffer.ptr, (float *)trstd.buffer.ptr,
                                               rows, dim, eps, dtype, nullptr));
    const std::vector<float> rstd = trstd.download();
    // Forward, per row: ss is a sum of dim non-negative f32 terms (per thread dim/256 in sequence, then
    // a tree of depth 8), relative error <= (dim/256 + 9) u; s = 1/sqrt(ss/dim + eps) halves that and adds
    // 4 roundings; out = (x s) w adds 2. So rstd is within ((dim/256 + 9)/2 + 4) u and out within
    // ((dim/256 + 9)/2 + 6) u of the exact values, plus one rounding to the output dtype (ub for bf16).
    const double k = (double)dim / 256.0 + 9.0;
    std::vector<double> ref_out(x.size()), bound_out(x.size()), ref_rstd((size_t)rows), bound_rstd((size_t)rows);
    for (int64_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (int64_t i = 0; i < dim; ++i) ss += (double)x[(size_t)(r * dim + i)] * x[(size_t)(r * dim + i)];
        const double s = 1.0 / sqrt(ss / (double)dim + (double)eps);
        ref_rstd[(size_t)r] = s;
        bound_rstd[(size_t)r] = (k / 2 + 4) * kU32 * s;
        for (int64_t i = 0; i < dim; ++i) {
            const size_t j = (size_t)(r * dim + i);
            ref_out[j] = (double)x[j] * s * w[(size_t)i];
            bound_out[j] = ((k / 2 + 6) * kU32 + (dtype == RELORA_DTYPE_BF16 ? kUBF16 : 0)) * fabs(ref_out[j]) + 1e-30;
        }
    }
    bool ok = check_bounds(fwd + " out", tout.download(), ref_out, bound_out);
    ok &= check_bounds(fwd + " rstd", rstd, ref_rstd, bound_rstd);

    const std::string bwd = label("rmsnorm_backward", dtype, rows, dim);
    EXPECT_OK(bwd.c_str(), api.rmsnorm_backward(tdy.buffer.ptr, tx.buffer.ptr, tw.buffer.ptr, (const float *)trstd.buffer.ptr,
                                                tdx.buffer.ptr, (float *)tdw.buffer.ptr, rows, dim, dtype, nullptr));
    // Backward, with the kernel's own rstd s as input (exact for the reference):
    //   dx = dx0 + s w dy - c x,  c = s^3 dot / dim,  dot = sum w dy x.
    // dot's f32 error is <= (dim/256 + 10) u sum|w dy x| (2 roundings per term, then the sum as above); c adds
    // 5 roundings; g = s w dy - c x and the add to dx0 add 4 more relative to the terms' magnitudes. So
    // |err| <= 6u (|s w dy| + |c x| + |dx0|) + (s^3/dim) |x| (dim/256 + 10) u sum|w dy x|, plus one rounding
    // of the result (u for f32, ub for bf16).
    // dweight = dw0 + sum_r dy x s in CPUBackend.rmsnormBackward's f32 order, compared bit for bit: row blocks of
    // max(16, ceil(rows / 64)) rows (ReductionBlocks(rows, minSize: 16, maxBlocks: 64)), each summed in row order
    // from 0 as ((dy x) s), then the partials added to dw0 in block order. This file is compiled with
    // -ffp-contract=off, so these are the CPU's roundings exactly.
    std::vector<float> want_dw = dw0;
    {
        const int64_t block_rows = std::max<int64_t>(16, (rows + 63) / 64);
        const int64_t blocks = (rows + block_rows - 1) / block_rows;
        std::vector<float> partial((size_t)(blocks * dim), 0.0f);
        for (int64_t b = 0; b < blocks; ++b) {
            for (int64_t r = b * block_rows; r < std::min(rows, (b + 1) * block_rows); ++r) {
                for (int64_t i = 0; i < dim; ++i) {
                    const size_t j = (size_t)(r * dim + i);
                    partial[(size_t)(b * dim + i)] += dy[j] * x[j] * rstd[(size_t)r];
                }
            }
        }
        for (int64_t i = 0; i < dim; ++i) {
            for (int64_t b = 0; b < blocks; ++b) want_dw[(size_t)i] += partial[(size_t)(b * dim + i)];
        }
    }
    std::vector<double> ref_dx(x.size()), bound_dx(x.size()), ref_dw((size_t)dim), bound_dw((size_t)dim);
    std::vector<double> abs_dw((size_t)dim, 0.0);
    for (int64_t i = 0; i < dim; ++i) ref_dw[(size_t)i] = dw0[(size_t)i];
    for (int64_t r = 0; r < rows; ++r) {
        const double s = rstd[(size_t)r];
        double dot = 0, dot_abs = 0;
        for (int64_t i = 0; i < dim; ++i) {
            const size_t j = (size_t)(r * dim + i);
            dot += (double)w[(size_t)i] * dy[j] * x[j];
            dot_abs += fabs((double)w[(size_t)i] * dy[j] * x[j]);
        }
        const double c = s * s * s * dot / (double)dim;
        for (int64_t i = 0; i < dim; ++i) {
            const size_t j = (size_t)(r * dim + i);
            const double a = s * w[(size_t)i] * dy[j], b = c * x[j];
            ref_dx[j] = dx0[j] + a - b;
            bound_dx[j] = 6 * kU32 * (fabs(a) + fabs(b) + fabs((double)dx0[j])) +
                          s * s * s / (double)dim * fabs((double)x[j]) * ((double)dim / 256 + 10) * kU32 * dot_abs +
                          (dtype == RELORA_DTYPE_BF16 ? kUBF16 : kU32) * fabs(ref_dx[j]) + 1e-30;
            ref_dw[(size_t)i] += (double)dy[j] * x[j] * s;
            abs_dw[(size_t)i] += fabs((double)dy[j] * x[j] * s);
        }
    }
    // And the order's error against the exact sum (a check of the reference itself): each term 2 roundings,
    // a block of R = max(16, ceil(rows / 64)) rows R more, then at most 64 partials and dw0 in sequence:
    // |err| <= (R + 66) u (sum|dy x s| + |dw0|).
    const double block_rows = (double)std::max<int64_t>(16, (rows + 63) / 64);
    for (int64_t i = 0; i < dim; ++i) {
        bound_dw[(size_t)i] = (block_rows + 66) * kU32 * (abs_dw[(size_t)i] + fabs((double)dw0[(size_t)i])) + 1e-30;
    }
    ok &= check_bounds(bwd + " dx", tdx.download(), ref_dx, bound_dx);
    const std::vector<float> got_dw = tdw.download();
    ok &= check_bounds(bwd + " dweight", got_dw, ref_dw, bound_dw);
    ok &= check_bits(bwd + " dweight == CPU order", got_dw, want_dw);
    return ok;
}

// ---- SwiGLU -------------------------------------------------------------------------------------------------
bool test_swiglu(int32_t dtype, int64_t n) {
    const std::vector<float> g = stored(uniform((size_t)n, -8.0f, 8.0f, 20), dtype);
    const std::vector<float> u = stored(uniform((size_t)n, -2.0f, 2.0f, 21), dtype);
    const std::vector<float> dy = stored(uniform((size_t)n, -1.0f, 1.0f, 22), dtype);
    Tensor tg(dtype, n), tu(dtype, n), tout(dtype, n), tdy(dtype, n), tdg(dtype, n), tdu(dtype, n);
    tg.upload(g);
    tu.upload(u);
    tdy.upload(dy);
    const std::string fwd = label("swiglu_forward", dtype, n), bwd = label("swiglu_backward", dtype, n);
    EXPECT_OK(fwd.c_str(), api.swiglu_forward(tg.buffer.ptr, tu.buffer.ptr, tout.buffer.ptr, n, dtype, nullptr));
    EXPECT_OK(bwd.c_str(), api.swiglu_backward(tdy.buffer.ptr, tg.buffer.ptr, tu.buffer.ptr, tdg.buffer.ptr, tdu.buffer.ptr, n,
                                               dtype, nullptr));
    // e = expf(-x) is within 2 ulp (CUDA's documented bound; glibc's is tighter); 1 + e passes at most e's
    // relative error on (e/(1+e) <= 1) and adds a rounding, the division and the product one each:
    // out within 6u of exact, plus the output rounding. sig = 1/(1+e) within 4u; du = dy (x sig) within 6u.
    // dgate = dy u sig (1 + x (1 - sig)): 1 - sig is off by <= 5u sig + u, so x (1 - sig) by <= 6u |x| sig...
    // overall |err| <= 8u (|ref| + |dy u sig x|), plus the output rounding.
    const double out_rounding = dtype == RELORA_DTYPE_BF16 ? kUBF16 : 0.0;
    std::vector<double> rf((size_t)n), bf((size_t)n), rdu((size_t)n), bdu((size_t)n), rdg((size_t)n), bdg((size_t)n);
    for (size_t i = 0; i < (size_t)n; ++i) {
        const double x = g[i], sig = 1.0 / (1.0 + exp(-x));
        rf[i] = x * sig * u[i];
        bf[i] = (6 * kU32 + out_rounding) * fabs(rf[i]) + 1e-30;
        rdu[i] = dy[i] * x * sig;
        bdu[i] = (6 * kU32 + out_rounding) * fabs(rdu[i]) + 1e-30;
        rdg[i] = dy[i] * u[i] * sig * (1.0 + x * (1.0 - sig));
        bdg[i] = (8 * kU32 + out_rounding) * fabs(rdg[i]) + 8 * kU32 * fabs(dy[i] * u[i] * sig * x) + 1e-30;
    }
    bool ok = check_bounds(fwd, tout.download(), rf, bf);
    ok &= check_bounds(bwd + " dup", tdu.download(), rdu, bdu);
    ok &= check_bounds(bwd + " dgate", tdg.download(), rdg, bdg);
    return ok;
}

// ---- Embedding ------------------------------------------------------------------------------------------------
// ids: "spread" (t * 5 + t / 3) % vocab, few distinct values when vocab is small; "frequent": one id for every
// third token (a run longer than a sort tile, across tiles) and pseudo-random ids between. Either way token 3 is
// vocab and token 5 is -1 (zero rows forward, skipped backward).
bool test_embedding(int32_t dtype, int64_t tokens, int64_t dim, int64_t vocab, bool frequent = false) {
    const std::vector<float> table = stored(uniform((size_t)(vocab * dim), -1.0f, 1.0f, 30), dtype);
    const std::vector<float> dout = stored(uniform((size_t)(tokens * dim), -1.0f, 1.0f, 31), dtype);
    const std::vector<float> dtable0 = uniform((size_t)(vocab * dim), -0.25f, 0.25f, 32);
    std::vector<int32_t> ids((size_t)tokens);
    for (int64_t t = 0; t < tokens; ++t) {
        ids[(size_t)t] = frequent ? (t % 3 == 0 ? (int32_t)(vocab / 2) : (int32_t)(relora_rng_u64(7, 33, (uint64_t)t) % (uint64_t)vocab))
                                  : (int32_t)((t * 5 + t / 3) % vocab);
    }
    if (tokens > 3) ids[3] = (int32_t)vocab;
    if (tokens > 5) ids[5] = -1;
    Buffer bids(tokens * 4);
    bids.upload(ids.data(), bids.bytes);
    Tensor ttable(dtype, vocab * dim), tout(dtype, tokens * dim), tdout(dtype, tokens * dim);
    Tensor tdtable(RELORA_DTYPE_F32, vocab * dim);
    ttable.upload(table);
    tdout.upload(dout);
    tdtable.upload(dtable0);
    // Exactly the bytes the library asks for: the emulation's guard bytes catch any overrun.
    const int64_t work_bytes = api.embedding_backward_workspace_bytes(tokens);
    Buffer work(std::max<int64_t>(work_bytes, 1));
    std::string fwd = label("embedding_forward", dtype, tokens, dim), bwd = label("embedding_backward", dtype, tokens, dim);
    const std::string detail = " vocab " + std::to_string(vocab) + (frequent ? " frequent id" : "");
    fwd += detail;
    bwd += detail;
    EXPECT_OK(fwd.c_str(), api.embedding_forward((const int32_t *)bids.ptr, ttable.buffer.ptr, tout.buffer.ptr, tokens, dim,
                                                 vocab, dtype, nullptr));
    EXPECT_OK(bwd.c_str(), api.embedding_backward((const int32_t *)bids.ptr, tdout.buffer.ptr, (float *)tdtable.buffer.ptr,
                                                  tokens, dim, vocab, dtype, work.ptr, nullptr));
    std::vector<float> want_out((size_t)(tokens * dim), 0.0f), want_dtable = dtable0;
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t id = ids[(size_t)t];
        if (id < 0 || id >= vocab) continue;
        for (int64_t c = 0; c < dim; ++c) {
            want_out[(size_t)(t * dim + c)] = table[(size_t)(id * dim + c)];
            // In token order, in f32: the CPU reference's additions exactly.
            want_dtable[(size_t)(id * dim + c)] += dout[(size_t)(t * dim + c)];
        }
    }
    bool ok = check_bits(fwd, tout.download(), want_out);
    ok &= check_bits(bwd + " (token order)", tdtable.download(), want_dtable);
    return ok;
}

// ---- Dropout --------------------------------------------------------------------------------------------------
// cols > 0: the n elements are rows of `cols` stored `cols + pad` apart; element i keeps counter i and the
// padding (here 7.5) comes back as it was.
bool test_dropout(int32_t dtype, int64_t n, float p, bool in_place, int64_t cols = 0, int64_t pad = 0) {
    const uint64_t seed = 1234, stream = 0x44524F50ull;
    const int64_t row = cols ? cols : n, ld = row + pad, rows = (n + row - 1) / row, stored_n = rows * ld;
    const std::vector<float> x = stored(uniform((size_t)n, -3.0f, 3.0f, 40), dtype);
    const float fill = 7.5f;
    std::vector<float> xs((size_t)stored_n, fill);
    for (int64_t i = 0; i < n; ++i) xs[(size_t)(i / row * ld + i % row)] = x[(size_t)i];
    Tensor tx(dtype, stored_n), tout(dtype, stored_n);
    tx.upload(xs);
    tout.upload(std::vector<float>((size_t)stored_n, fill));
    Tensor &dst = in_place ? tx : tout;
    char name[128];
    snprintf(name, sizeof name, "dropout %s n=%lld p=%.2f%s%s", dtype_name(dtype), (long long)n, (double)p,
             in_place ? " in place" : "", pad ? " padded rows" : "");
    EXPECT_OK(name, api.dropout(tx.buffer.ptr, dst.buffer.ptr, n, cols, cols ? ld : 0, p, seed, stream, dtype, nullptr));
    // Bit for bit: the mask is relora_rng.h's, the kept value x * keep one f32 product (then bf16 rounding).
    const float keep = 1.0f / (1.0f - p);
    std::vector<float> want((size_t)stored_n, fill);
    for (int64_t i = 0; i < n; ++i) {
        want[(size_t)(i / row * ld + i % row)] = relora_rng_uniform(seed, stream, (uint64_t)i) >= p ? x[(size_t)i] * keep : 0.0f;
    }
    return check_bits(name, dst.download(), stored(want, dtype));
}

// ---- AdamW ------------------------------------------------------------------------------------------------------
// CPUBackend.adamw's scalar loop transcribed (the Swift reference; this file is built with -ffp-contract=off
// like the emulated library, and Swift does not contract either).
void reference_adamw(std::vector<float> &p, const std::vector<float> &g, std::vector<float> &m, std::vector<float> &v,
                     float lr, float beta1, float beta2, float eps, float weightDecay, int step) {
    const float bc1 = 1 - (float)pow((double)beta1, (double)step);
    const float bc2 = 1 - (float)pow((double)beta2, (double)step);
    const float stepSize = lr / bc1;
    const float bc2Sqrt = sqrtf(bc2);
    const float decay = 1 - lr * weightDecay;
    for (size_t i = 0; i < p.size(); ++i) {
        const float gi = g[i];
        const float mi = beta1 * m[i] + (1 - beta1) * gi;
        const float vi = beta2 * v[i] + (1 - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - stepSize * mi / (sqrtf(vi) / bc2Sqrt + eps);
    }
}

bool test_adamw(int64_t n) {
    std::vector<float> p = uniform((size_t)n, -1.0f, 1.0f, 50), m((size_t)n, 0.0f), v((size_t)n, 0.0f);
    Buffer bp(n * 4), bg(n * 4), bm(n * 4), bv(n * 4), bcopy(n * 2);
    bp.upload(p.data(), bp.bytes);
    bm.upload(m.data(), bm.bytes);
    bv.upload(v.data(), bv.bytes);
    bool ok = true;
    const float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, wd = 0.01f;
    for (int step = 1; step <= 3; ++step) {
        const std::vector<float> g = uniform((size_t)n, -0.1f, 0.1f, 50 + (uint64_t)step);
        bg.upload(g.data(), bg.bytes);
        reference_adamw(p, g, m, v, lr, beta1, beta2, eps, wd, step);
        char name[96];
        snprintf(name, sizeof name, "adamw n=%lld step %d", (long long)n, step);
        EXPECT_OK(name, api.adamw((float *)bp.ptr, (const float *)bg.ptr, (float *)bm.ptr, (float *)bv.ptr,
                                  step == 2 ? nullptr : bcopy.ptr, n, lr, beta1, beta2, eps, wd, step, nullptr));
        std::vector<float> gp((size_t)n), gm((size_t)n), gv((size_t)n);
        bp.download(gp.data(), bp.bytes);
        bm.download(gm.data(), bm.bytes);
        bv.download(gv.data(), bv.bytes);
        ok &= check_bits(std::string(name) + " param", gp, p);
        ok &= check_bits(std::string(name) + " m", gm, m);
        ok &= check_bits(std::string(name) + " v", gv, v);
        if (step != 2) {
            std::vector<uint16_t> bits((size_t)n);
            bcopy.download(bits.data(), bcopy.bytes);
            std::vector<float> copy((size_t)n);
            for (size_t i = 0; i < bits.size(); ++i) copy[i] = bf16_value(bits[i]);
            ok &= check_bits(std::string(name) + " bf16 copy", copy, stored(p, RELORA_DTYPE_BF16));
        }
    }
    return ok;
}

// ---- AdamW with 8-bit moments (relora_adam8.h) ------------------------------------------------------------------
// Every check here is bit for bit (bytes for codes) against the header's host functions, called in plain C++:
// relora_adamw8_block, relora_adam8_quantize_block, relora_adam8_value.
std::vector<float> adam8_maps() {
    std::vector<float> maps(2 * RELORA_ADAM8_MAP);
    relora_adam8_build_maps(maps.data());
    return maps;
}

// Host only: the maps' shape (256 strictly ascending entries each; signed: from -1 to 1 with 0 present;
// unsigned: from 0 to 1).
bool test_adam8_maps() {
    const std::vector<float> maps = adam8_maps();
    bool ok = true;
    for (int is_signed = 1; is_signed >= 0; --is_signed) {
        const float *map = maps.data() + (is_signed ? 0 : RELORA_ADAM8_MAP);
        int ascending = 1, zero = 0, one = 0;
        for (int i = 0; i < RELORA_ADAM8_MAP; ++i) {
            if (i > 0 && !(map[i - 1] < map[i])) ascending = 0;
            zero += map[i] == 0.0f;
            one += map[i] == 1.0f;
        }
        const bool ends = is_signed ? (map[0] == -1.0f && zero == 1 && one == 1)
                                    : (f32_bits(map[0]) == 0 && map[RELORA_ADAM8_MAP - 1] == 1.0f);
        const bool good = ascending && ends;
        record(good, is_signed ? "adam8 signed map" : "adam8 unsigned map",
               "256 entries, strictly ascending %d, [%.9g, %.9g], zeros %d, ones %d", ascending, (double)map[0],
               (double)map[RELORA_ADAM8_MAP - 1], zero, one);
        ok &= good;
    }
    return ok;
}

// Gradients of one step: absmax block b has magnitude 10^-(b % 6); a block with (b + step) % 5 == 1 is all zero
// this step (its moments decay), one with (b + step) % 5 == 2 has one huge element (+1e4 or -3e4; its other
// moments fall far down the map or to 0), and blocks with b % 7 == 3 are zero at every step (absmax 0 throughout).
std::vector<float> adam8_grads(int64_t n, int step) {
    static const float kScale[] = {1.0f, 1e-1f, 1e-2f, 1e-3f, 1e-4f, 1e-5f};
    std::vector<float> g = uniform((size_t)n, -1.0f, 1.0f, 80 + (uint64_t)step);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t b = i / RELORA_ADAM8_BLOCK, j = i % RELORA_ADAM8_BLOCK;
        const int64_t len = std::min<int64_t>(RELORA_ADAM8_BLOCK, n - b * RELORA_ADAM8_BLOCK);
        const int kind = (int)((b + step) % 5);
        if (b % 7 == 3 || kind == 1) {
            g[(size_t)i] = 0.0f;
        } else if (kind == 2 && j == (b * 37 + step) % len) {
            g[(size_t)i] = step % 2 ? 1e4f : -3e4f;
        } else {
            g[(size_t)i] *= kScale[b % 6];
        }
    }
    return g;
}

bool test_adamw_8bit(int64_t n) {
    const std::vector<float> maps = adam8_maps();
    const int64_t blocks = relora_adam8_blocks(n);
    // Zero moments: the code of 0 under each map, absmax 0.
    std::vector<float> p = uniform((size_t)n, -1.0f, 1.0f, 85), m_absmax((size_t)blocks, 0.0f), v_absmax((size_t)blocks, 0.0f);
    std::vector<uint8_t> m_codes((size_t)n, relora_adam8_code(maps.data(), 0.0f));
    std::vector<uint8_t> v_codes((size_t)n, relora_adam8_code(maps.data() + RELORA_ADAM8_MAP, 0.0f));
    Buffer bp(n * 4), bg(n * 4), bmc(n), bvc(n), bma(blocks * 4), bva(blocks * 4), bmaps(2 * RELORA_ADAM8_MAP * 4);
    bp.upload(p.data(), bp.bytes);
    bmc.upload(m_codes.data(), bmc.bytes);
    bvc.upload(v_codes.data(), bvc.bytes);
    bma.upload(m_absmax.data(), bma.bytes);
    bva.upload(v_absmax.data(), bva.bytes);
    bmaps.upload(maps.data(), bmaps.bytes);
    const float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, wd = 0.01f;
    bool ok = true;
    for (int step = 1; step <= 5; ++step) {
        const std::vector<float> g = adam8_grads(n, step);
        bg.upload(g.data(), bg.bytes);
        const relora_adam_scalars s = relora_adam_scalars_make(lr, beta1, beta2, eps, wd, step);
        for (int64_t b = 0; b < blocks; ++b) {
            relora_adamw8_block(maps.data(), nullptr, &s, p.data(), g.data(), m_codes.data(), m_absmax.data(), v_codes.data(),
                                v_absmax.data(), n, b);
        }
        char name[96];
        snprintf(name, sizeof name, "adamw_8bit n=%lld step %d", (long long)n, step);
        EXPECT_OK(name, api.adamw_8bit((float *)bp.ptr, (const float *)bg.ptr, (uint8_t *)bmc.ptr, (float *)bma.ptr,
                                       (uint8_t *)bvc.ptr, (float *)bva.ptr, (const float *)bmaps.ptr, n, lr, beta1,
                                       beta2, eps, wd, step, nullptr));
        std::vector<float> gp((size_t)n), gma((size_t)blocks), gva((size_t)blocks);
        std::vector<uint8_t> gmc((size_t)n), gvc((size_t)n);
        bp.download(gp.data(), bp.bytes);
        bmc.download(gmc.data(), bmc.bytes);
        bvc.download(gvc.data(), bvc.bytes);
        bma.download(gma.data(), bma.bytes);
        bva.download(gva.data(), bva.bytes);
        ok &= check_bits(std::string(name) + " param", gp, p);
        ok &= check_bytes(std::string(name) + " m codes", gmc, m_codes);
        ok &= check_bytes(std::string(name) + " v codes", gvc, v_codes);
        ok &= check_bits(std::string(name) + " m absmax", gma, m_absmax);
        ok &= check_bits(std::string(name) + " v absmax", gva, v_absmax);
    }
    // The inputs reached what they were meant to: moments that are not all zero, and (n >= 1024) a block whose
    // scales stayed 0.
    const uint8_t m_zero = relora_adam8_code(maps.data(), 0.0f);
    int64_t zero_blocks = 0, nonzero_codes = 0;
    for (int64_t b = 0; b < blocks; ++b) zero_blocks += m_absmax[(size_t)b] == 0.0f && v_absmax[(size_t)b] == 0.0f;
    for (int64_t i = 0; i < n; ++i) nonzero_codes += m_codes[(size_t)i] != m_zero || v_codes[(size_t)i] != 0;
    const bool exercised = nonzero_codes > 0 && (n < 4 * RELORA_ADAM8_BLOCK || zero_blocks > 0);
    char name[96];
    snprintf(name, sizeof name, "adamw_8bit n=%lld inputs exercised", (long long)n);
    record(exercised, name, "%lld of %lld blocks with zero scales, %lld elements with a nonzero m or v code",
           (long long)zero_blocks, (long long)blocks, (long long)nonzero_codes);
    return ok && exercised;
}

// Inputs for the moment quantizer: block b has magnitude 10^-(b % 6); b % 4 == 1 all zero, b % 4 == 2 one element
// 1000 times the rest, b % 4 == 3 (signed) a negative extreme. Unsigned: |x|. With positive_extreme, instead, the
// first element of every block is +scale, above every other |x| of the block (see test_quantize_8bit).
std::vector<float> adam8_inputs(int64_t n, bool is_signed, bool positive_extreme, uint64_t stream) {
    static const float kScale[] = {1.0f, 1e-1f, 1e-2f, 1e-3f, 1e-4f, 1e-5f};
    std::vector<float> x = uniform((size_t)n, -1.0f, 1.0f, stream);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t b = i / RELORA_ADAM8_BLOCK, j = i % RELORA_ADAM8_BLOCK;
        float v = x[(size_t)i] * kScale[b % 6];
        if (!is_signed) v = fabsf(v);
        if (positive_extreme) {
            if (j == 0) v = kScale[b % 6];
        } else if (b % 4 == 1) {
            v = 0.0f;
        } else if (b % 4 == 2 && j == 3 % std::min<int64_t>(RELORA_ADAM8_BLOCK, n - b * RELORA_ADAM8_BLOCK)) {
            v = 1000.0f * kScale[b % 6];
        } else if (b % 4 == 3 && is_signed && j == 5) {
            v = -2.0f * kScale[b % 6];
        }
        x[(size_t)i] = v;
    }
    return x;
}

// quantize_8bit and dequantize_8bit against relora_adam8_quantize_block and relora_adam8_value, then
// idempotence: quantizing the dequantized values gives the same codes and scales, on both passes' inputs (the
// maps end at -1 and +1, so a block's extreme dequantizes to +-absmax exactly whatever its sign).
bool test_quantize_8bit(int64_t n, bool is_signed) {
    const std::vector<float> maps = adam8_maps();
    const float *map = maps.data() + (is_signed ? 0 : RELORA_ADAM8_MAP);
    const int64_t blocks = relora_adam8_blocks(n);
    Buffer bx(n * 4), by(n * 4), bc(n), bc2(n), ba(blocks * 4), ba2(blocks * 4), bmaps(2 * RELORA_ADAM8_MAP * 4);
    bmaps.upload(maps.data(), bmaps.bytes);
    char name[96];
    snprintf(name, sizeof name, "quantize_8bit %s n=%lld", is_signed ? "signed" : "unsigned", (long long)n);
    bool ok = true;
    for (int pass = 0; pass < 2; ++pass) {
        const bool idempotence = pass == 1;
        const std::string tag = std::string(name) + (idempotence ? " (positive extremes)" : "");
        const std::vector<float> x = adam8_inputs(n, is_signed, idempotence, 90 + (uint64_t)is_signed + 2 * (uint64_t)pass);
        std::vector<uint8_t> codes((size_t)n);
        std::vector<float> absmax((size_t)blocks), y((size_t)n);
        for (int64_t b = 0; b < blocks; ++b) relora_adam8_quantize_block(map, nullptr, x.data(), codes.data(), absmax.data(), n, b);
        for (int64_t i = 0; i < n; ++i) {
            y[(size_t)i] = relora_adam8_value(map, codes[(size_t)i], absmax[(size_t)(i / RELORA_ADAM8_BLOCK)]);
        }
        bx.upload(x.data(), bx.bytes);
        EXPECT_OK(tag.c_str(), api.quantize_8bit((const float *)bx.ptr, (const float *)bmaps.ptr, is_signed, n,
                                                 (uint8_t *)bc.ptr, (float *)ba.ptr, nullptr));
        std::vector<uint8_t> got_codes((size_t)n);
        std::vector<float> got_absmax((size_t)blocks), got_y((size_t)n);
        bc.download(got_codes.data(), bc.bytes);
        ba.download(got_absmax.data(), ba.bytes);
        ok &= check_bytes(tag + " codes", got_codes, codes);
        ok &= check_bits(tag + " absmax", got_absmax, absmax);
        // Dequantize the reference's codes and scales (the device's, if they differ, were reported above).
        bc.upload(codes.data(), bc.bytes);
        ba.upload(absmax.data(), ba.bytes);
        EXPECT_OK(tag.c_str(), api.dequantize_8bit((const uint8_t *)bc.ptr, (const float *)ba.ptr,
                                                   (const float *)bmaps.ptr, is_signed, n, (float *)by.ptr, nullptr));
        by.download(got_y.data(), by.bytes);
        ok &= check_bits(std::string(tag).replace(0, 8, "dequantize") + " values", got_y, y);
        {
            EXPECT_OK(tag.c_str(), api.quantize_8bit((const float *)by.ptr, (const float *)bmaps.ptr, is_signed, n,
                                                     (uint8_t *)bc2.ptr, (float *)ba2.ptr, nullptr));
            std::vector<uint8_t> again((size_t)n);
            std::vector<float> again_absmax((size_t)blocks);
            bc2.download(again.data(), bc2.bytes);
            ba2.download(again_absmax.data(), ba2.bytes);
            ok &= check_bytes(tag + " requantized codes", again, codes);
            ok &= check_bits(tag + " requantized absmax", again_absmax, absmax);
        }
    }
    return ok;
}

// Argument checks of the three 8-bit entry points; count 0 is a no-op that touches no pointer.
bool test_adam8_invalid_arguments() {
    float *f = (float *)16;
    uint8_t *c = (uint8_t *)16;
    const relora_status a = api.adamw_8bit(nullptr, f, c, f, c, f, f, 4, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1, nullptr);
    const relora_status b = api.adamw_8bit(f, f, c, f, c, f, f, -1, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1, nullptr);
    const relora_status d = api.adamw_8bit(f, f, c, f, c, f, f, 4, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 0, nullptr);
    const relora_status e = api.adamw_8bit(f, f, c, f, c, f, nullptr, 4, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1, nullptr);
    const relora_status q = api.quantize_8bit(f, f, 1, -5, c, f, nullptr);
    const relora_status r = api.quantize_8bit(f, nullptr, 0, 5, c, f, nullptr);
    const relora_status s = api.dequantize_8bit(c, f, f, 1, -5, f, nullptr);
    const relora_status t = api.dequantize_8bit(c, nullptr, f, 0, 5, f, nullptr);
    const relora_status bad = RELORA_ERR_INVALID_ARGUMENT;
    const bool rejected = a == bad && b == bad && d == bad && e == bad && q == bad && r == bad && s == bad && t == bad;
    record(rejected, "adam8 invalid arguments rejected",
           "adamw_8bit null param %d, negative count %d, step 0 %d, null maps %d; quantize_8bit negative count %d, "
           "null maps %d; dequantize_8bit negative count %d, null absmax %d (last: %s)",
           a, b, d, e, q, r, s, t, api.last_error());
    const relora_status z1 = api.adamw_8bit(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 1e-3f, 0.9f,
                                            0.999f, 1e-8f, 0.0f, 1, nullptr);
    const relora_status z2 = api.quantize_8bit(nullptr, nullptr, 1, 0, nullptr, nullptr, nullptr);
    const relora_status z3 = api.dequantize_8bit(nullptr, nullptr, nullptr, 0, 0, nullptr, nullptr);
    const bool noop = z1 == RELORA_OK && z2 == RELORA_OK && z3 == RELORA_OK;
    record(noop, "adam8 zero-size calls are no-ops", "statuses %d %d %d", z1, z2, z3);
    return rejected && noop;
}

// ---- Reductions --------------------------------------------------------------------------------------------------
bool test_reductions(int32_t dtype, int64_t n) {
    const std::vector<float> a = stored(uniform((size_t)n, -2.0f, 2.0f, 60), dtype);
    const std::vector<float> b = stored(uniform((size_t)n, -2.0f, 2.0f, 61), dtype);
    Tensor ta(dtype, n > 0 ? n : 1), tb(dtype, n > 0 ? n : 1);
    if (n > 0) {
        ta.upload(a);
        tb.upload(b);
    }
    Buffer out(3 * 4), work(RELORA_REDUCE_WORKSPACE_BYTES);
    const float out0[3] = {7.0f, -3.25f, 11.0f};
    out.upload(out0, sizeof out0);
    const std::string ss_name = label("sum_of_squares", dtype, n), dot_name = label("dot_accumulate", dtype, n);
    EXPECT_OK(ss_name.c_str(), api.sum_of_squares(ta.buffer.ptr, n, dtype, (float *)out.ptr, 1, work.ptr, nullptr));
    EXPECT_OK(dot_name.c_str(), api.dot_accumulate(ta.buffer.ptr, tb.buffer.ptr, n, dtype, (float *)out.ptr + 2, work.ptr, nullptr));
    float got[3];
    out.download(got, sizeof got);
    double ss = 0, ss_abs = 0, dot = 0, dot_abs = 0;
    for (size_t i = 0; i < (size_t)n; ++i) {
        ss += (double)a[i] * a[i];
        ss_abs += (double)a[i] * a[i];
        dot += (double)a[i] * b[i];
        dot_abs += fabs((double)a[i] * b[i]);
    }
    // Products are exact in double; the double sums err by < n 2^-53 of the absolute sum; the store to f32
    // rounds once (sum_of_squares) or twice (dot: the total, then its add to out) by u.
    const double sum_err = (double)n * 0x1p-53;
    bool ok = check_bounds(ss_name, {got[1]}, {ss}, {kU32 * ss + sum_err * ss_abs + 1e-30});
    const double dot_ref = (double)out0[2] + dot;
    ok &= check_bounds(dot_name, {got[2]}, {dot_ref}, {kU32 * (fabs(dot_ref) + fabs(dot) + 0) + sum_err * dot_abs + 1e-30});
    const bool untouched = got[0] == out0[0];
    record(untouched, (ss_name + " leaves other entries").c_str(), "out[0] = %g", (double)got[0]);
    return ok && untouched;
}

// Same inputs, same bits: the reduction tree does not depend on timing (here: fiber order).
bool test_reduction_determinism() {
    const int64_t n = 300001;
    const std::vector<float> a = uniform((size_t)n, -1.0f, 1.0f, 70);
    Tensor ta(RELORA_DTYPE_F32, n);
    ta.upload(a);
    Buffer out(4), work(RELORA_REDUCE_WORKSPACE_BYTES);
    float first = 0, again = 0;
    EXPECT_OK("sum_of_squares determinism", api.sum_of_squares(ta.buffer.ptr, n, RELORA_DTYPE_F32, (float *)out.ptr, 0, work.ptr, nullptr));
    out.download(&first, 4);
    EXPECT_OK("sum_of_squares determinism", api.sum_of_squares(ta.buffer.ptr, n, RELORA_DTYPE_F32, (float *)out.ptr, 0, work.ptr, nullptr));
    out.download(&again, 4);
    const bool same = f32_bits(first) == f32_bits(again);
    record(same, "sum_of_squares repeatable bits n=300001", "%.9g vs %.9g", (double)first, (double)again);
    return same;
}

// ---- Multi-tensor optimizer ops (gradient_norm, adamw_multi, adamw_8bit_multi, zero_multi) -----------------------------------
// One table for tensors of awkward sizes (1; 300; 9000 = 3 chunks; 5000 and 70000 with 8-bit moments, the latter
// 274 blocks so the unit loop wraps; a bf16 gradient no update reads), three steps (clip, no clip, clip). The
// references are scalar: sum_of_squares per tensor (itself checked against double sums above) for the squares,
// the host's double sum, sqrt and division for the norm and factor, reference_adamw / relora_adamw8_block on
// gradients scaled by the factor in f32, and round-to-nearest-even bf16 for the working copies. Bit for bit.
bool test_multi_tensor_optimizer() {
    struct T {
        int64_t n;
        bool eight, decay, working;
    };
    const T kTensors[] = {{1, false, false, true}, {300, false, true, false}, {5000, true, true, true},
                          {9000, false, true, true}, {70000, true, false, true}};
    const int kCount = (int)(sizeof kTensors / sizeof kTensors[0]);
    const std::vector<float> maps = adam8_maps();
    Buffer bmaps(2 * RELORA_ADAM8_MAP * 4);
    bmaps.upload(maps.data(), bmaps.bytes);
    struct Host {
        std::vector<float> p, m, v, m_absmax, v_absmax;
        std::vector<uint8_t> m_codes, v_codes;
    };
    std::vector<Host> host((size_t)kCount);
    std::vector<Buffer *> owned;
    auto buffer = [&](int64_t bytes) {
        owned.push_back(new Buffer(bytes > 0 ? bytes : 1));
        return owned.back();
    };
    std::vector<relora_adam_entry> f32_table, e8_table;
    std::vector<relora_norm_entry> norm_table;
    std::vector<Buffer *> grads((size_t)kCount), params((size_t)kCount), workings((size_t)kCount), ms((size_t)kCount),
        vs((size_t)kCount), mas((size_t)kCount), vas((size_t)kCount);
    int64_t f32_units = 0, e8_units = 0, norm_units = 0;
    for (int i = 0; i < kCount; ++i) {
        const T &t = kTensors[i];
        Host &h = host[(size_t)i];
        const int64_t blocks = relora_adam8_blocks(t.n);
        h.p = uniform((size_t)t.n, -1.0f, 1.0f, 90 + (uint64_t)i);
        params[(size_t)i] = buffer(t.n * 4);
        params[(size_t)i]->upload(h.p.data(), t.n * 4);
        grads[(size_t)i] = buffer(t.n * 4);
        workings[(size_t)i] = t.working ? buffer(t.n * 2) : nullptr;
        relora_adam_entry e = {};
        e.param = (float *)params[(size_t)i]->ptr;
        e.grad = (float *)grads[(size_t)i]->ptr;
        e.working = t.working ? workings[(size_t)i]->ptr : nullptr;
        e.working_dtype = t.working ? RELORA_DTYPE_BF16 : 0;
        e.count = t.n;
        e.decay = t.decay ? 1 : 0;
        if (t.eight) {
            h.m_codes.assign((size_t)t.n, relora_adam8_code(maps.data(), 0.0f));
            h.v_codes.assign((size_t)t.n, relora_adam8_code(maps.data() + RELORA_ADAM8_MAP, 0.0f));
            h.m_absmax.assign((size_t)blocks, 0.0f);
            h.v_absmax.assign((size_t)blocks, 0.0f);
            ms[(size_t)i] = buffer(t.n);
            vs[(size_t)i] = buffer(t.n);
            mas[(size_t)i] = buffer(blocks * 4);
            vas[(size_t)i] = buffer(blocks * 4);
            ms[(size_t)i]->upload(h.m_codes.data(), t.n);
            vs[(size_t)i]->upload(h.v_codes.data(), t.n);
            mas[(size_t)i]->upload(h.m_absmax.data(), blocks * 4);
            vas[(size_t)i]->upload(h.v_absmax.data(), blocks * 4);
            e.m_absmax = (float *)mas[(size_t)i]->ptr;
            e.v_absmax = (float *)vas[(size_t)i]->ptr;
            e.first_unit = e8_units;
            e8_units += blocks;
        } else {
            h.m.assign((size_t)t.n, 0.0f);
            h.v.assign((size_t)t.n, 0.0f);
            ms[(size_t)i] = buffer(t.n * 4);
            vs[(size_t)i] = buffer(t.n * 4);
            ms[(size_t)i]->upload(h.m.data(), t.n * 4);
            vs[(size_t)i]->upload(h.v.data(), t.n * 4);
            e.first_unit = f32_units;
            f32_units += (t.n + RELORA_ADAM_CHUNK - 1) / RELORA_ADAM_CHUNK;
        }
        e.m = ms[(size_t)i]->ptr;
        e.v = vs[(size_t)i]->ptr;
        (t.eight ? e8_table : f32_table).push_back(e);
    }
    // The norm's table: every gradient, then a bf16 one no update reads (another rank's).
    const int64_t kOther = 20001;
    Tensor other(RELORA_DTYPE_BF16, kOther);
    other.upload(stored(uniform((size_t)kOther, -0.01f, 0.01f, 97), RELORA_DTYPE_BF16));
    for (int i = 0; i <= kCount; ++i) {
        relora_norm_entry e = {};
        e.x = i < kCount ? grads[(size_t)i]->ptr : other.buffer.ptr;
        e.count = i < kCount ? kTensors[i].n : kOther;
        e.dtype = i < kCount ? RELORA_DTYPE_F32 : RELORA_DTYPE_BF16;
        e.blocks = (int32_t)relora_reduce_blocks(e.count);
        e.first_unit = norm_units;
        norm_units += e.blocks;
        norm_table.push_back(e);
    }
    const int64_t tensors = (int64_t)norm_table.size();
    Buffer bnorm_table((int64_t)(norm_table.size() * sizeof(relora_norm_entry))),
        bf32_table((int64_t)(f32_table.size() * sizeof(relora_adam_entry))), be8_table((int64_t)(e8_table.size() * sizeof(relora_adam_entry))),
        partials(norm_units * 8), squares(tensors * 4), norm_out(8), factor_out(4), single(tensors * 4), work(RELORA_REDUCE_WORKSPACE_BYTES);
    bnorm_table.upload(norm_table.data(), bnorm_table.bytes);
    bf32_table.upload(f32_table.data(), bf32_table.bytes);
    be8_table.upload(e8_table.data(), be8_table.bytes);
    const float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, wd = 0.1f;
    bool ok = true;
    const double kClips[] = {0.05, 0.0, 0.02};
    for (int step = 1; step <= 3; ++step) {
        const double clip = kClips[step - 1];
        std::vector<std::vector<float>> g((size_t)kCount);
        for (int i = 0; i < kCount; ++i) {
            g[(size_t)i] = kTensors[i].eight ? adam8_grads(kTensors[i].n, step) : uniform((size_t)kTensors[i].n, -0.1f, 0.1f, 95 + (uint64_t)step);
            if (kTensors[i].eight) {
                for (float &x : g[(size_t)i]) x *= 1e-5f;  // adam8_grads' outliers (3e4) would leave no clip factor to test
            }
            grads[(size_t)i]->upload(g[(size_t)i].data(), kTensors[i].n * 4);
        }
        // The reference squares: sum_of_squares per tensor; the norm and factor from them on the host.
        for (int64_t i = 0; i < tensors; ++i) {
            const relora_norm_entry &e = norm_table[(size_t)i];
            EXPECT_OK("gradient_norm reference", api.sum_of_squares(e.x, e.count, e.dtype, (float *)single.ptr, i, work.ptr, nullptr));
        }
        std::vector<float> want_squares((size_t)tensors), got_squares((size_t)tensors);
        single.download(want_squares.data(), tensors * 4);
        double total = 0.0;
        for (float x : want_squares) total += (double)x;
        const double want_norm = sqrt(total);
        const float want_factor = clip > 0 && want_norm > clip ? (float)(clip / want_norm) : 1.0f;
        char name[96];
        snprintf(name, sizeof name, "gradient_norm step %d", step);
        EXPECT_OK(name, api.gradient_norm((const relora_norm_entry *)bnorm_table.ptr, tensors, norm_units, (double *)partials.ptr,
                                          (float *)squares.ptr, clip, (double *)norm_out.ptr, (float *)factor_out.ptr, nullptr));
        double got_norm = 0;
        float got_factor = 0;
        squares.download(got_squares.data(), tensors * 4);
        norm_out.download(&got_norm, 8);
        factor_out.download(&got_factor, 4);
        ok &= check_bits(std::string(name) + " squares", got_squares, want_squares);
        ok &= check_bits(std::string(name) + " clip factor", {got_factor}, {want_factor});
        const bool norm_exact = memcmp(&got_norm, &want_norm, 8) == 0 && (clip == 0 || want_factor < 1.0f);
        record(norm_exact, (std::string(name) + " norm bits (f64), clipping as intended").c_str(), "%.17g vs %.17g, factor %.9g",
               got_norm, want_norm, (double)want_factor);
        ok &= norm_exact;
        // The reference updates on the scaled gradients.
        snprintf(name, sizeof name, "adamw_multi step %d", step);
        EXPECT_OK(name, api.adamw_multi((const relora_adam_entry *)bf32_table.ptr, (int64_t)f32_table.size(), f32_units,
                                        (const float *)factor_out.ptr, lr, beta1, beta2, eps, wd, step, nullptr));
        snprintf(name, sizeof name, "adamw_8bit_multi step %d", step);
        EXPECT_OK(name, api.adamw_8bit_multi((const relora_adam_entry *)be8_table.ptr, (int64_t)e8_table.size(), e8_units,
                                             (const float *)factor_out.ptr, (const float *)bmaps.ptr, lr, beta1, beta2, eps, wd,
                                             step, nullptr));
        for (int i = 0; i < kCount; ++i) {
            const T &t = kTensors[i];
            Host &h = host[(size_t)i];
            std::vector<float> &gi = g[(size_t)i];
            if (want_factor != 1.0f) {
                for (float &x : gi) x = x * want_factor;
            }
            const float decay_wd = t.decay ? wd : 0.0f;
            if (t.eight) {
                const relora_adam_scalars s = relora_adam_scalars_make(lr, beta1, beta2, eps, decay_wd, step);
                for (int64_t b = 0; b < relora_adam8_blocks(t.n); ++b) {
                    relora_adamw8_block(maps.data(), nullptr, &s, h.p.data(), gi.data(), h.m_codes.data(), h.m_absmax.data(),
                                        h.v_codes.data(), h.v_absmax.data(), t.n, b);
                }
            } else {
                reference_adamw(h.p, gi, h.m, h.v, lr, beta1, beta2, eps, decay_wd, step);
            }
            snprintf(name, sizeof name, "%s step %d tensor %d (n=%lld)", t.eight ? "adamw_8bit_multi" : "adamw_multi", step, i,
                     (long long)t.n);
            std::vector<float> gp((size_t)t.n), gg((size_t)t.n);
            params[(size_t)i]->download(gp.data(), t.n * 4);
            grads[(size_t)i]->download(gg.data(), t.n * 4);
            ok &= check_bits(std::string(name) + " param", gp, h.p);
            ok &= check_bits(std::string(name) + " scaled grad", gg, gi);
            if (t.eight) {
                const int64_t blocks = relora_adam8_blocks(t.n);
                std::vector<uint8_t> gmc((size_t)t.n), gvc((size_t)t.n);
                std::vector<float> gma((size_t)blocks), gva((size_t)blocks);
                ms[(size_t)i]->download(gmc.data(), t.n);
                vs[(size_t)i]->download(gvc.data(), t.n);
                mas[(size_t)i]->download(gma.data(), blocks * 4);
                vas[(size_t)i]->download(gva.data(), blocks * 4);
                ok &= check_bytes(std::string(name) + " m codes", gmc, h.m_codes);
                ok &= check_bytes(std::string(name) + " v codes", gvc, h.v_codes);
                ok &= check_bits(std::string(name) + " absmax", gma, h.m_absmax);
                ok &= check_bits(std::string(name) + " v absmax", gva, h.v_absmax);
            } else {
                std::vector<float> gm((size_t)t.n), gv((size_t)t.n);
                ms[(size_t)i]->download(gm.data(), t.n * 4);
                vs[(size_t)i]->download(gv.data(), t.n * 4);
                ok &= check_bits(std::string(name) + " m", gm, h.m);
                ok &= check_bits(std::string(name) + " v", gv, h.v);
            }
            if (t.working) {
                std::vector<uint16_t> bits((size_t)t.n);
                workings[(size_t)i]->download(bits.data(), t.n * 2);
                std::vector<float> copy((size_t)t.n);
                for (size_t k = 0; k < bits.size(); ++k) copy[k] = bf16_value(bits[k]);
                ok &= check_bits(std::string(name) + " bf16 working copy", copy, stored(h.p, RELORA_DTYPE_BF16));
            }
        }
    }
    // zero_multi over the norm's table: every gradient (f32) and the bf16 one, all bits 0 (memset's), nothing
    // around them written (the emulation's guard bytes are checked when the buffers are freed).
    EXPECT_OK("zero_multi", api.zero_multi((const relora_norm_entry *)bnorm_table.ptr, tensors, norm_units, nullptr));
    bool zeroed = true;
    for (int64_t i = 0; i < tensors; ++i) {
        const relora_norm_entry &e = norm_table[(size_t)i];
        std::vector<uint8_t> bytes((size_t)(e.count * (e.dtype == RELORA_DTYPE_BF16 ? 2 : 4)), 0xAB);
        EXPECT_OK("zero_multi download", api.memcpy(bytes.data(), e.x, (int64_t)bytes.size(), RELORA_MEMCPY_DEVICE_TO_HOST, nullptr));
        EXPECT_OK("zero_multi synchronize", api.stream_synchronize(nullptr));
        for (uint8_t x : bytes) zeroed &= x == 0;
    }
    record(zeroed, "zero_multi zeroes every entry of the norm table (f32 and bf16)", "%lld tensors, %lld units", (long long)tensors,
           (long long)norm_units);
    ok &= zeroed;
    // zero_multi's arguments: fewer units than tensors is refused; no tensors is a no-op.
    const relora_status zm = api.zero_multi(nullptr, 2, 1, nullptr), zm0 = api.zero_multi(nullptr, 0, 0, nullptr);
    ok &= zm == RELORA_ERR_INVALID_ARGUMENT && zm0 == RELORA_OK;
    record(zm == RELORA_ERR_INVALID_ARGUMENT && zm0 == RELORA_OK, "zero_multi arguments", "units < tensors %d, empty %d", zm, zm0);
    // Arguments: a step of 0 and a null table with units are refused; no tensors is a no-op.
    const relora_status a = api.adamw_multi(nullptr, 1, 1, nullptr, lr, beta1, beta2, eps, wd, 1, nullptr);
    const relora_status b = api.adamw_8bit_multi((const relora_adam_entry *)be8_table.ptr, 1, 1, nullptr, (const float *)bmaps.ptr,
                                                 lr, beta1, beta2, eps, wd, 0, nullptr);
    const relora_status c = api.gradient_norm(nullptr, 2, 1, nullptr, nullptr, 0, (double *)norm_out.ptr, (float *)factor_out.ptr, nullptr);
    const relora_status z = api.adamw_multi(nullptr, 0, 0, nullptr, lr, beta1, beta2, eps, wd, 1, nullptr);
    double empty_norm = -1;
    const relora_status zn = api.gradient_norm(nullptr, 0, 0, nullptr, nullptr, 1.0, (double *)norm_out.ptr, (float *)factor_out.ptr, nullptr);
    norm_out.download(&empty_norm, 8);
    const bool args = a == RELORA_ERR_INVALID_ARGUMENT && b == RELORA_ERR_INVALID_ARGUMENT && c == RELORA_ERR_INVALID_ARGUMENT &&
                      z == RELORA_OK && zn == RELORA_OK && empty_norm == 0.0;
    record(args, "multi-tensor arguments", "null table %d, step 0 %d, units < tensors %d, empty %d %d (norm %g)", a, b, c, z, zn, empty_norm);
    for (Buffer *buf : owned) delete buf;
    return ok && args;
}

// ---- Argument checks --------------------------------------------------------------------------------------------
bool test_invalid_arguments() {
    bool ok = true;
    const relora_status a = api.dequantize(99, (void *)16, 1, 1, (void *)16, RELORA_DTYPE_F32, nullptr);
    const relora_status b = api.rmsnorm_forward((void *)16, (void *)16, (void *)16, (float *)16, 1, 1, 1e-5f, 7, nullptr);
    const relora_status c = api.dropout((void *)16, (void *)16, 1, 0, 0, 1.0f, 0, 0, RELORA_DTYPE_F32, nullptr);
    const relora_status d = api.swiglu_forward(nullptr, nullptr, nullptr, -1, RELORA_DTYPE_F32, nullptr);
    const relora_status e = api.adamw(nullptr, nullptr, nullptr, nullptr, nullptr, 4, 1, 0.9f, 0.99f, 1e-8f, 0, 0, nullptr);
    ok = a == RELORA_ERR_INVALID_ARGUMENT && b == RELORA_ERR_INVALID_ARGUMENT && c == RELORA_ERR_INVALID_ARGUMENT &&
         d == RELORA_ERR_INVALID_ARGUMENT && e == RELORA_ERR_INVALID_ARGUMENT;
    record(ok, "invalid arguments rejected", "format %d, dtype %d, p=1 %d, negative count %d, step 0 %d (last: %s)", a, b, c,
           d, e, api.last_error());
    // The embedding backward without its workspace or past int32 ids; rope without its table; dequantize into an
    // f32 output that is not 4-byte aligned (its 16-byte stores need the element alignment to find boundaries).
    const int32_t *ids = (const int32_t *)16;
    const relora_status f = api.embedding_backward(ids, (void *)16, (float *)16, 4, 4, 10, RELORA_DTYPE_F32, nullptr, nullptr);
    const relora_status g = api.embedding_backward(ids, (void *)16, (float *)16, 4, 4, 1ll << 31, RELORA_DTYPE_F32, (void *)16,
                                                   nullptr);
    const relora_status h = api.rope((void *)16, nullptr, 1, 4, 2, 8, 0, RELORA_DTYPE_F32, nullptr);
    const relora_status i = api.dequantize(RELORA_FORMAT_Q8_0, (void *)16, 1, 32, (void *)18, RELORA_DTYPE_F32, nullptr);
    const bool more = f == RELORA_ERR_INVALID_ARGUMENT && g == RELORA_ERR_INVALID_ARGUMENT && h == RELORA_ERR_INVALID_ARGUMENT &&
                      i == RELORA_ERR_INVALID_ARGUMENT;
    record(more, "workspace, table and alignment arguments rejected",
           "embedding without workspace %d, vocab 2^31 %d, rope without table %d, misaligned dequantize %d (last: %s)", f, g,
           h, i, api.last_error());
    ok &= more;
    // Zero-size calls succeed without touching their (null) pointers.
    const relora_status z = api.swiglu_forward(nullptr, nullptr, nullptr, 0, RELORA_DTYPE_BF16, nullptr);
    record(z == RELORA_OK, "zero-size call is a no-op", "status %d", z);
    return ok && z == RELORA_OK;
}

bool run_kernel_suite() {
    bool ok = true;
    for (const Format &f : kFormats) {
        for (const auto &s : kQuantShapes) {
            ok &= test_dequantize(f, s[0], s[1]);
            ok &= test_quantize(f, s[0], s[1]);
        }
        ok &= test_quantize_failures(f);
        ok &= test_dequantize_offsets(f);
    }
    for (int32_t dtype : kDtypes) {
        ok &= test_rmsnorm(dtype, 1, 1);
        ok &= test_rmsnorm(dtype, 3, 31);
        ok &= test_rmsnorm(dtype, 37, 257);  // > 8 rows per block, dim not a multiple of 32
        ok &= test_rmsnorm(dtype, 2, 1000);
        // 61 row blocks of 17 rows (the CPU's split past 1024 rows); f32 only: 1030 rows of block reductions cost
        // the emulation ~25 M fiber switches per dtype.
        if (dtype == RELORA_DTYPE_F32) ok &= test_rmsnorm(dtype, 1030, 37);
        ok &= test_swiglu(dtype, 1);
        ok &= test_swiglu(dtype, 4099);  // > 8 blocks x 256 threads: the stride loop wraps
        ok &= test_embedding(dtype, 1, 1, 1);
        ok &= test_embedding(dtype, 45, 70, 13);
        ok &= test_embedding(dtype, 19, 2100, 7);  // dim > 8 x 256
        ok &= test_embedding(dtype, 3000, 5, 300);  // 12 sort tiles (more than the emulated grid's 8), 2 passes
        ok &= test_embedding(dtype, 2100, 3, 70001, true);  // 3 passes; a run of 700 tokens
        ok &= test_embedding(dtype, 600, 260, 256, true);    // vocab 256: the invalid key needs a 9th bit
        ok &= test_dropout(dtype, 4099, 0.1f, false);
        ok &= test_dropout(dtype, 1001, 0.5f, true);
        ok &= test_dropout(dtype, 33, 0.0f, false);
        ok &= test_dropout(dtype, 5 * 37, 0.3f, false, 37, 11);
        ok &= test_dropout(dtype, 4 * 37 + 5, 0.3f, true, 37, 3);
        ok &= test_reductions(dtype, 0);
        ok &= test_reductions(dtype, 1);
        ok &= test_reductions(dtype, 1000);
        ok &= test_reductions(dtype, 70001);  // 18 blocks in pass 1
    }
    ok &= test_adamw(1);
    ok &= test_adamw(5003);
    for (int64_t n : {1, 255, 256, 257, 5003, 70000}) ok &= test_adamw_8bit(n);  // 70000: 274 blocks, the stride loop wraps
    for (int64_t n : {1, 255, 256, 257, 5003}) {
        ok &= test_quantize_8bit(n, true);
        ok &= test_quantize_8bit(n, false);
    }
    ok &= test_adam8_invalid_arguments();
    ok &= test_multi_tensor_optimizer();
    ok &= test_reduction_determinism();
    ok &= test_invalid_arguments();
    ok &= run_ops_suite();
    ok &= run_attention_suite();
    return ok;
}

bool check_library(const char *path) {
    relora_library_info info;
    if (api.library_info(&info) != RELORA_OK) {
        record(false, "library_info", "%s", api.last_error());
        return false;
    }
    const bool sizes = info.abi_version == RELORA_ABI_VERSION && info.info_size == (int32_t)sizeof(relora_library_info) &&
                       info.block_q8_0_size == (int32_t)sizeof(block_q8_0) &&
                       info.block_q4_0_size == (int32_t)sizeof(block_q4_0) &&
                       info.block_nf4_size == (int32_t)sizeof(block_nf4) &&
                       info.block_nf4_align == (int32_t)alignof(block_nf4) && info.bf16_size == 2 &&
                       info.norm_entry_size == (int32_t)sizeof(relora_norm_entry) &&
                       info.adam_entry_size == (int32_t)sizeof(relora_adam_entry);
    record(sizes, "ABI version and layouts match the header", "%s: ABI %d, %s, blocks %d/%d/%d bytes", path,
           info.abi_version, info.build, info.block_q8_0_size, info.block_q4_0_size, info.block_nf4_size);
    int count = -1;
    const bool device = api.device_count(&count) == RELORA_OK && count >= 1;
    record(device, "device_count", "%d device(s)", count);
    return sizes && device;
}

}  // namespace

#if defined(RELORA_NO_EMULATION_CHECKS)
// test_kernels_cuda: for a CUDA build on a GPU machine, without the emulation's self-checks.
bool run_emulation_checks() { return true; }
#endif

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s path/to/libreloracuda[-emu].so\n", argv[0]);
        return 2;
    }
    char err[512];
    if (relora_cuda_load(argv[1], &api, err, sizeof err) != 0) {
        fprintf(stderr, "test_kernels: %s\n", err);
        return 1;
    }
    relora_library_info info;
    api.library_info(&info);
    bool ok = check_library(argv[1]);
    int devices = 0;
    api.device_count(&devices);
    if (devices == 0) {
        printf("FAILED: %s sees no CUDA device (%s)\n", argv[1], api.last_error());
        return 1;
    }
    ok &= test_element_functions();
    ok &= test_adam8_maps();
    if (info.emulated) {
        // The emulation runs a block's threads in turn until they wait. Each scheduling order satisfies some
        // missing barriers by luck: run the suite under all of them.
        void (*set_schedule)(int) = (void (*)(int))dlsym(api.handle, "relora_emu_set_schedule");
        const char *orders[] = {"round robin", "round robin, last thread first", "greedy (lowest thread first)",
                                "greedy (highest thread first)"};
        for (int order = 0; order < (set_schedule ? 4 : 1); ++order) {
            if (set_schedule) set_schedule(order);
            printf("---- kernels, emulated, %s\n", orders[order]);
            ok &= run_kernel_suite();
        }
        if (set_schedule) set_schedule(0);
        printf("---- the emulation's own checks\n");
        ok &= run_emulation_checks();
    } else {
        printf("---- kernels on %s\n", info.build);
        ok &= run_kernel_suite();
    }
    printf("---- devices and collectives%s\n", info.emulated ? " (NCCL emulated over TCP, ranks in processes)" : "");
    ok &= run_collectives_suite(info.emulated != 0);
    printf("%s: %d failed\n", ok && failures() == 0 ? "ALL PASSED" : "FAILED", failures());
    relora_cuda_unload(&api);
    return ok && failures() == 0 ? 0 : 1;
}
