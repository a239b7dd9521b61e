// Small test harness for the kernel library: results table, host bf16, deterministic inputs, device
// buffers through the loaded ABI table.
#ifndef RELORA_KERNEL_HARNESS_H
#define RELORA_KERNEL_HARNESS_H

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <vector>

#include "relora_abi.h"
#include "relora_quant.h"
#include "relora_rng.h"

namespace harness {

// The library under test, loaded with relora_cuda_load (test_kernels.cpp).
extern relora_cuda_api api;

// Records one check: prints "PASS|FAIL  name  detail" and counts it.
void record(bool ok, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int failures();

// ---- Floating point -------------------------------------------------------------------------------
// Unit roundoffs of round-to-nearest: f32 has 24 significant bits, bf16 8, so one rounding changes a
// value by at most 2^-24 (f32) or 2^-8 (bf16) of its magnitude (normal range).
constexpr double kU32 = 0x1p-24;
constexpr double kUBF16 = 0x1p-8;

// binary32 -> bfloat16 bits, round to nearest even (Sources/ReLoRA/Util/FloatBits.swift for finite
// values and infinities).
inline uint16_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_value(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline float round_bf16(float x) { return bf16_value(bf16_bits(x)); }
inline uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

const char *dtype_name(int32_t dtype);

// Deterministic inputs: uniform in [lo, hi) from the shared counter RNG (stream names the tensor).
std::vector<float> uniform(size_t n, float lo, float hi, uint64_t stream);
// Values as they are after storage in `dtype` (bf16: rounded), so references see the stored inputs.
std::vector<float> stored(std::vector<float> v, int32_t dtype);

// ---- Device memory through the ABI ----------------------------------------------------------------
struct Buffer {
    void *ptr = nullptr;
    int64_t bytes = 0;
    explicit Buffer(int64_t n);
    ~Buffer();
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;
    void upload(const void *host, int64_t n) const;
    void download(void *host, int64_t n) const;
};

// A float tensor in `dtype` storage: upload converts (bf16: round to nearest even), download widens.
struct Tensor {
    int32_t dtype;
    int64_t count;
    Buffer buffer;
    Tensor(int32_t dtype, int64_t count);
    void upload(const std::vector<float> &values) const;
    std::vector<float> download() const;
};

// Compares got against ref elementwise with a per-element bound; records one line with the worst
// |err| / bound. Returns true when every |got - ref| <= bound (NaN fails).
bool check_bounds(const std::string &name, const std::vector<float> &got, const std::vector<double> &ref,
                  const std::vector<double> &bound);
// Bitwise equality of two float arrays (+0 and -0 differ).
bool check_bits(const std::string &name, const std::vector<float> &got, const std::vector<float> &want);
// Bytewise equality.
bool check_bytes(const std::string &name, const std::vector<uint8_t> &got, const std::vector<uint8_t> &want);

// Syncs the default stream; a failure is recorded with the library's message.
bool sync(const char *name);

}  // namespace harness

// Calls an ABI entry; a non-OK status fails the current check (records, then returns false from the
// enclosing function).
#define EXPECT_OK(name, call)                                                                              \
    do {                                                                                                   \
        const relora_status s_ = (call);                                                                   \
        if (s_ != RELORA_OK) {                                                                             \
            ::harness::record(false, name, "%s returned %d: %s", #call, (int)s_, ::harness::api.last_error()); \
            return false;                                                                                  \
        }                                                                                                  \
    } while (0)

// Entry points of the emulation self-checks (test_emulation.cu).
bool run_emulation_checks();
// GEMM, conversions, fills, axpy/scale, stochastic quantize, changed codes, pruning (test_ops.cpp).
bool run_ops_suite();
// RoPE, attention and cross-entropy checks (test_attention.cpp), part of the kernel suite.
bool run_attention_suite();
// set_device and the NCCL collectives (test_collectives.cpp): run once, outside the schedule loop; on the
// emulation with ranks in forked processes.
bool run_collectives_suite(bool emulated);

#endif  // RELORA_KERNEL_HARNESS_H
