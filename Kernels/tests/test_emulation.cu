// The emulation's own checks: the execution model behaves as on a GPU where the kernels rely on it, and
// the errors it promises to catch are caught. Compiled by the host compiler against emu/cuda_emu.h and
// linked with libreloracuda-emu.so (the same runtime instance the loaded library uses).
#include "cuda_emu.h"
#include "harness.h"
#include "relora_mma.cuh"

using harness::record;

namespace {

// Each thread publishes a value, then reads its two neighbours' values. Correct only if every thread
// has written before any reads, i.e. with a real barrier between the phases.
__global__ void neighbours_kernel(int *out) {
    __shared__ int slots[256];
    const int t = (int)threadIdx.x, n = (int)blockDim.x;
    const int base = (int)blockIdx.x * 1000;
    slots[t] = base + 3 * t + 1;
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = slots[(t + 1) % n] + slots[(t + n - 1) % n];
}

// Warp sums with __shfl_xor_sync (butterfly) and __shfl_down_sync (tree to lane 0), an inclusive scan
// with __shfl_up_sync, a broadcast with __shfl_sync, and a ballot: per warp, into out[warp * 5 + k].
__global__ void warp_kernel(const int *in, int *out) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const int lane = (int)(threadIdx.x & 31u), warp = i / 32;
    const int v = in[i];
    int x = v;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    int d = v;
    for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(0xffffffffu, d, (unsigned int)o);
    int scan = v;
    for (int o = 1; o < 32; o <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, scan, (unsigned int)o);
        if (lane >= o) scan += up;
    }
    const int from7 = __shfl_sync(0xffffffffu, v, 7);
    const unsigned int odd = __ballot_sync(0xffffffffu, v & 1);
    if (lane == 0) {
        out[warp * 5 + 0] = x;
        out[warp * 5 + 1] = d;
        out[warp * 5 + 3] = from7;
        out[warp * 5 + 4] = (int)odd;
    }
    if (lane == 31) out[warp * 5 + 2] = scan;
}

// double shuffles move 8 bytes: the reduction kernels sum doubles this way.
__global__ void double_shuffle_kernel(double *out) {
    double v = 1.0 + (double)threadIdx.x * 0x1p-40;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) *out = v;
}

__global__ void write_kernel(float *p, long long index) { p[index] = 1.0f; }

__global__ void divergent_barrier_kernel(int *out) {
    if (threadIdx.x == 0) return;  // thread 0 never reaches the barrier
    __syncthreads();
    out[threadIdx.x] = 1;
}

__global__ void shuffle_outside_mask_kernel(int *out) {
    // Lanes 0..15 shuffle among themselves but lane 0 reads lane 20, which is not in the mask.
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, (int)threadIdx.x, threadIdx.x == 0 ? 20 : 1);
}

__global__ void dynamic_shared_kernel(unsigned int *out) {
    RELORA_DYNAMIC_SHARED(unsigned int, scratch);
    const unsigned int t = threadIdx.x;
    out[t] = scratch[t];  // before anyone wrote: the poison
    __syncthreads();
    scratch[t] = t * t;
    __syncthreads();
    out[blockDim.x + t] = scratch[blockDim.x - 1 - t];
}

__global__ void noop_kernel(int *) {}

// Streams: a producer and a consumer of one buffer.
__global__ void fill_value_kernel(float *p, float value, int n) {
    for (int i = (int)threadIdx.x; i < n; i += (int)blockDim.x) p[i] = value;
}
__global__ void copy_values_kernel(const float *src, float *dst, int n) {
    for (int i = (int)threadIdx.x; i < n; i += (int)blockDim.x) dst[i] = src[i];
}

__global__ void convert_kernel(const float *x, unsigned short *bf16, unsigned short *half, float *back, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
        bf16[i] = __bfloat16_as_ushort(b);
        half[i] = __float2half_rn(x[i]).__x;
        back[i] = __bfloat162float(b);
    }
}

// ---- Warp-level matrix operations -------------------------------------------------------------------------
// Test matrices with small integer entries (every product and sum exact in f32, so any summation order gives
// the same bits), distinct per warp: A 16 x 16, B 16 x 8, C 16 x 8 of warp w.
float mma_a(int w, int r, int k) { return (float)((r * 16 + k * 3 + w * 5) % 7 - 3); }
float mma_b(int w, int k, int n) { return (float)((k * 8 + n * 5 + w) % 5 - 2); }
float mma_c(int w, int r, int n) { return (float)(r - 2 * n + w); }

uint32_t bf16_pair(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) | ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

// Every lane fills its fragments with the formulas of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
// floating point type", transcribed here independently of the emulation's code), multiplies, and writes its
// four results where the accumulator formula says they belong: out[warp][row][col].
__global__ void mma_layout_kernel(float *out) {
    const int lane = (int)(threadIdx.x & 31u), w = (int)(threadIdx.x >> 5);
    const int groupID = lane >> 2, threadID_in_group = lane % 4;
    float a_elems[8], b_elems[4], c[4];
    for (int i = 0; i < 8; ++i) {
        const int row = (i < 2 || (i >= 4 && i < 6)) ? groupID : groupID + 8;
        const int col = i < 4 ? threadID_in_group * 2 + (i & 0x1) : threadID_in_group * 2 + (i & 0x1) + 8;
        a_elems[i] = mma_a(w, row, col);
    }
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? threadID_in_group * 2 + (i & 0x1) : threadID_in_group * 2 + (i & 0x1) + 8;
        b_elems[i] = mma_b(w, row, groupID);
    }
    for (int i = 0; i < 4; ++i) c[i] = mma_c(w, i < 2 ? groupID : groupID + 8, threadID_in_group * 2 + (i & 0x1));
    const uint32_t a[4] = {bf16_pair(a_elems[0], a_elems[1]), bf16_pair(a_elems[2], a_elems[3]),
                           bf16_pair(a_elems[4], a_elems[5]), bf16_pair(a_elems[6], a_elems[7])};
    relora::mma_bf16_m16n8k16(c, a, bf16_pair(b_elems[0], b_elems[1]), bf16_pair(b_elems[2], b_elems[3]));
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? groupID : groupID + 8, col = threadID_in_group * 2 + (i & 0x1);
        out[(w * 16 + row) * 8 + col] = c[i];
    }
}

// A 16 x 16 bf16 tile in dynamic shared memory (rows 24 elements apart: 48 bytes, 16-byte aligned), element
// (r, c) = r * 16 + c; lane l gives the address of row (l % 8) + 8 ((l / 8) % 2), column 8 (l / 16): matrix m
// = l / 8 is the 8 x 8 block (m % 2, m / 2) of the tile. Each lane stores its 4 registers of ldmatrix x4 and of
// ldmatrix x4 .trans.
__global__ void ldmatrix_kernel(uint32_t *out, int misalign) {
    RELORA_DYNAMIC_SHARED(__nv_bfloat16, tile);
    const int lane = (int)threadIdx.x;
    for (int e = lane; e < 16 * 24; e += 32) tile[e] = __float2bfloat16_rn((float)((e / 24) * 16 + e % 24));
    __syncwarp();
    const __nv_bfloat16 *row = tile + ((lane % 8) + 8 * ((lane / 8) % 2)) * 24 + 8 * (lane / 16) + (misalign && lane == 5);
    uint32_t r[4], t[4];
    relora::ldmatrix_x4(r, row);
    relora::ldmatrix_x4_trans(t, row);
    for (int m = 0; m < 4; ++m) {
        out[lane * 8 + m] = r[m];
        out[lane * 8 + 4 + m] = t[m];
    }
}

// cp.async: thread t copies bytes [16 t, 16 t + 16) of src into dynamic shared memory in two groups (even
// chunks, then odd ones; chunk 3 zero-filled) and records what it sees of its own chunks before any wait,
// after wait_group 1 (the first group only) and after wait_group 0: out[t][phase][0..1] = first word of its
// even chunk and of its odd chunk.
__global__ void cp_async_kernel(const uint32_t *src, uint32_t *out) {
    RELORA_DYNAMIC_SHARED(uint32_t, dst);
    const int t = (int)threadIdx.x;
    relora::cp_async_16(dst + 8 * t, src + 8 * t, true);
    relora::cp_async_commit();
    relora::cp_async_16(dst + 8 * t + 4, src + 8 * t + 4, t != 1);  // odd chunk 2t + 1 == 3 is zero-filled
    relora::cp_async_commit();
    out[t * 6 + 0] = dst[8 * t];
    out[t * 6 + 1] = dst[8 * t + 4];
    relora::cp_async_wait<1>();
    out[t * 6 + 2] = dst[8 * t];
    out[t * 6 + 3] = dst[8 * t + 4];
    relora::cp_async_wait<0>();
    out[t * 6 + 4] = dst[8 * t];
    out[t * 6 + 5] = dst[8 * t + 4];
}

__global__ void cp_async_unwaited_kernel(const uint32_t *src) {
    RELORA_DYNAMIC_SHARED(uint32_t, dst);
    relora::cp_async_16(dst + 4 * threadIdx.x, src + 4 * threadIdx.x, true);
    relora::cp_async_commit();
}

__global__ void big_shared_kernel(unsigned char *out) {
    RELORA_DYNAMIC_SHARED(unsigned char, scratch);
    scratch[64 * 1024 - 1] = 7;
    out[0] = scratch[64 * 1024 - 1];
}

template <typename T>
std::vector<T> download(const void *d, size_t n) {
    std::vector<T> h(n);
    cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
}

bool barrier_checks() {
    const int blocks = 3, threads = 256;
    int *d = nullptr;
    cudaMalloc((void **)&d, blocks * threads * sizeof(int));
    auto count_wrong = [&]() {
        const std::vector<int> h = download<int>(d, blocks * threads);
        int wrong = 0;
        for (int b = 0; b < blocks; ++b) {
            for (int t = 0; t < threads; ++t) {
                const int want = (b * 1000 + 3 * ((t + 1) % threads) + 1) + (b * 1000 + 3 * ((t + threads - 1) % threads) + 1);
                wrong += h[(size_t)(b * threads + t)] != want;
            }
        }
        return wrong;
    };
    bool ok = true;
    for (int order = 0; order < 4; ++order) {
        relora_emu_set_schedule(order);
        RELORA_LAUNCH(neighbours_kernel, dim3(blocks), dim3(threads), 0, nullptr)(d);
        const int wrong = count_wrong();
        char name[96];
        snprintf(name, sizeof name, "__syncthreads is a barrier (schedule %d)", order);
        record(wrong == 0 && cudaGetLastError() == cudaSuccess, name, "%d of %d wrong", wrong, blocks * threads);
        ok &= wrong == 0;
    }
    // The same kernel without the barrier must go wrong, or the check above proves nothing.
    relora_emu_set_schedule(RELORA_EMU_ROUND_ROBIN);
    relora_emu_set_barriers_enabled(0);
    RELORA_LAUNCH(neighbours_kernel, dim3(blocks), dim3(threads), 0, nullptr)(d);
    relora_emu_set_barriers_enabled(1);
    const int wrong = count_wrong();
    record(wrong > 0, "without the barrier the kernel is wrong", "%d of %d wrong", wrong, blocks * threads);
    ok &= wrong > 0;
    cudaFree(d);
    return ok;
}

bool warp_checks() {
    const int threads = 96, blocks = 2, warps = blocks * threads / 32;  // 3 warps per block
    std::vector<int> in((size_t)(blocks * threads));
    for (size_t i = 0; i < in.size(); ++i) in[i] = (int)((i * 37 + 11) % 101);
    int *din = nullptr, *dout = nullptr;
    cudaMalloc((void **)&din, in.size() * sizeof(int));
    cudaMalloc((void **)&dout, (size_t)warps * 5 * sizeof(int));
    cudaMemcpy(din, in.data(), in.size() * sizeof(int), cudaMemcpyHostToDevice);
    bool ok = true;
    for (int order = 0; order < 4; ++order) {
        relora_emu_set_schedule(order);
        RELORA_LAUNCH(warp_kernel, dim3(blocks), dim3(threads), 0, nullptr)(din, dout);
        const std::vector<int> h = download<int>(dout, (size_t)warps * 5);
        int wrong = 0;
        for (int w = 0; w < warps; ++w) {
            int sum = 0;
            unsigned int odd = 0;
            for (int l = 0; l < 32; ++l) {
                sum += in[(size_t)(w * 32 + l)];
                if (in[(size_t)(w * 32 + l)] & 1) odd |= 1u << l;
            }
            wrong += h[(size_t)(w * 5)] != sum;
            wrong += h[(size_t)(w * 5 + 1)] != sum;
            wrong += h[(size_t)(w * 5 + 2)] != sum;  // the scan's last element
            wrong += h[(size_t)(w * 5 + 3)] != in[(size_t)(w * 32 + 7)];
            wrong += (unsigned int)h[(size_t)(w * 5 + 4)] != odd;
        }
        char name[96];
        snprintf(name, sizeof name, "warp shuffles and ballot (schedule %d)", order);
        record(wrong == 0 && cudaGetLastError() == cudaSuccess, name, "%d warps, %d wrong results", warps, wrong);
        ok &= wrong == 0;
    }
    relora_emu_set_schedule(RELORA_EMU_ROUND_ROBIN);
    double *dd = nullptr;
    cudaMalloc((void **)&dd, sizeof(double));
    RELORA_LAUNCH(double_shuffle_kernel, dim3(1), dim3(32), 0, nullptr)(dd);
    const double got = download<double>(dd, 1)[0], want = 32.0 + 496.0 * 0x1p-40;
    record(got == want, "8-byte (double) shuffles", "%.17g vs %.17g", got, want);
    ok &= got == want;
    cudaFree(dd);
    cudaFree(din);
    cudaFree(dout);
    return ok;
}

// Out-of-bounds writes: one element past the end, one before the start, through the library's status
// codes (what the Swift backend sees) and cudaGetLastError; then reset, since the error is sticky.
bool bounds_checks() {
    bool ok = true;
    const long long offsets[] = {37, -1, 40};  // 37 floats allocated: past the end, before, in the round-up slack
    for (long long index : offsets) {
        float *p = nullptr;
        cudaMalloc((void **)&p, 37 * sizeof(float));
        RELORA_LAUNCH(write_kernel, dim3(1), dim3(1), 0, nullptr)(p, index);
        const relora_status s = harness::api.stream_synchronize(nullptr);
        const std::string message = harness::api.last_error();
        const bool named = message.find("write_kernel") != std::string::npos;
        char name[96];
        snprintf(name, sizeof name, "out-of-bounds write at [%lld] of 37 floats detected", index);
        record(s == RELORA_ERR_OUT_OF_BOUNDS && named, name, "status %d: %s", (int)s, message.c_str());
        ok &= s == RELORA_ERR_OUT_OF_BOUNDS && named;
        // Sticky, as on a GPU: later calls fail too, until the context is reset.
        void *q = nullptr;
        ok &= harness::api.malloc(&q, 16) == RELORA_ERR_OUT_OF_BOUNDS;
        cudaDeviceReset();
    }
    // Found at cudaFree too when nothing synchronized in between (the canaries are checked after every
    // launch; here the write bypasses any launch).
    unsigned char *p = nullptr;
    cudaMalloc((void **)&p, 100);
    p[100] = 0;  // host-side stray write, as a buggy copy would make
    const cudaError_t e = cudaFree(p);
    record(e == cudaErrorIllegalAddress, "overwritten canary detected at cudaFree", "%s", cudaGetErrorString(e));
    ok &= e == cudaErrorIllegalAddress;
    cudaDeviceReset();
    // Copies are range-checked against their allocation.
    void *d = nullptr;
    harness::api.malloc(&d, 64);
    char host[65] = {0};
    const relora_status s = harness::api.memcpy(d, host, 65, RELORA_MEMCPY_HOST_TO_DEVICE, nullptr);
    record(s == RELORA_ERR_INVALID_ARGUMENT, "memcpy past an allocation rejected", "status %d: %s", (int)s,
           harness::api.last_error());
    ok &= s == RELORA_ERR_INVALID_ARGUMENT;
    harness::api.free(d);
    return ok;
}

bool error_checks() {
    bool ok = true;
    int *d = nullptr;
    cudaMalloc((void **)&d, 64 * sizeof(int));
    RELORA_LAUNCH(divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr)(d);
    cudaDeviceSynchronize();  // a kernel's failure surfaces when its stream runs, as on a GPU
    cudaError_t e = cudaGetLastError();
    record(e == cudaErrorLaunchFailure, "__syncthreads in divergent code reported", "%s", cudaGetErrorString(e));
    ok &= e == cudaErrorLaunchFailure;
    cudaDeviceReset();
    cudaMalloc((void **)&d, 64 * sizeof(int));
    RELORA_LAUNCH(shuffle_outside_mask_kernel, dim3(1), dim3(32), 0, nullptr)(d);
    cudaDeviceSynchronize();
    e = cudaGetLastError();
    record(e == cudaErrorLaunchFailure, "shuffle from a lane outside the mask reported", "%s", cudaGetErrorString(e));
    ok &= e == cudaErrorLaunchFailure;
    cudaDeviceReset();
    RELORA_LAUNCH(noop_kernel, dim3(1), dim3(2048), 0, nullptr)(nullptr);
    e = cudaGetLastError();
    record(e == cudaErrorInvalidConfiguration, "2048-thread block rejected", "%s", cudaGetErrorString(e));
    ok &= e == cudaErrorInvalidConfiguration;
    e = cudaGetLastError();
    record(e == cudaSuccess, "configuration errors are not sticky", "%s", cudaGetErrorString(e));
    ok &= e == cudaSuccess;
    return ok;
}

bool dynamic_shared_checks() {
    const unsigned int threads = 40;  // not a multiple of 32: a partial warp
    unsigned int *d = nullptr;
    cudaMalloc((void **)&d, 2 * threads * sizeof(unsigned int));
    RELORA_LAUNCH(dynamic_shared_kernel, dim3(2), dim3(threads), threads * sizeof(unsigned int), nullptr)(d);
    const std::vector<unsigned int> h = download<unsigned int>(d, 2 * threads);
    int wrong = 0;
    for (unsigned int t = 0; t < threads; ++t) {
        wrong += h[t] != 0xFFFFFFFFu;  // block 1 ran last: its scratch was re-poisoned before it started
        wrong += h[threads + t] != (threads - 1 - t) * (threads - 1 - t);
    }
    record(wrong == 0, "dynamic shared memory: poisoned per block, shared by the block", "%d wrong", wrong);
    cudaFree(d);
    return wrong == 0;
}

// bf16 and half conversions: round to nearest even as relora's FloatBits and relora_quant.h's
// relora_fp32_to_fp16 specify for finite values and infinities (ties, carries into the exponent, overflow to
// inf, subnormal halves), and NaN -> 0x7FFF as CUDA's headers do. 2^32 / 65521 patterns plus edge cases.
bool conversion_checks() {
    std::vector<float> x;
    for (uint64_t u = 0; u < (1ull << 32); u += 65521) {
        const uint32_t bits = (uint32_t)u;
        float f;
        memcpy(&f, &bits, 4);
        x.push_back(f);
    }
    const uint32_t edges[] = {0x3F808000u, 0x3F818000u, 0x3F80FFFFu, 0x7F7FFFFFu, 0x7F7F8000u, 0x477FEFFFu, 0x477FF000u,
                              0x33000000u, 0x33000001u, 0x38800000u, 0x387FE000u, 0x00000001u, 0x80000000u, 0x7F800000u,
                              0xFF800000u, 0x7FC00001u, 0xFFFFFFFFu};
    for (uint32_t bits : edges) {
        float f;
        memcpy(&f, &bits, 4);
        x.push_back(f);
    }
    const long long n = (long long)x.size();
    float *dx = nullptr, *dback = nullptr;
    unsigned short *dbf = nullptr, *dhalf = nullptr;
    cudaMalloc((void **)&dx, (size_t)n * 4);
    cudaMalloc((void **)&dback, (size_t)n * 4);
    cudaMalloc((void **)&dbf, (size_t)n * 2);
    cudaMalloc((void **)&dhalf, (size_t)n * 2);
    cudaMemcpy(dx, x.data(), (size_t)n * 4, cudaMemcpyHostToDevice);
    RELORA_LAUNCH(convert_kernel, dim3(8), dim3(256), 0, nullptr)(dx, dbf, dhalf, dback, n);
    const std::vector<unsigned short> bf = download<unsigned short>(dbf, (size_t)n), half = download<unsigned short>(dhalf, (size_t)n);
    const std::vector<float> back = download<float>(dback, (size_t)n);
    int wrong = 0;
    for (long long i = 0; i < n; ++i) {
        const float f = x[(size_t)i];
        const bool nan = isnan(f);
        const unsigned short want_bf = nan ? 0x7FFF : harness::bf16_bits(f);
        const unsigned short want_half = nan ? 0x7FFF : relora_fp32_to_fp16(f);
        const bool back_ok = nan ? isnan(back[(size_t)i]) : harness::f32_bits(back[(size_t)i]) == harness::f32_bits(harness::bf16_value(want_bf));
        if (bf[(size_t)i] != want_bf || half[(size_t)i] != want_half || !back_ok) {
            if (wrong++ < 3) {
                printf("  conversion of 0x%08x: bf16 0x%04x (want 0x%04x), half 0x%04x (want 0x%04x)\n", harness::f32_bits(f),
                       bf[(size_t)i], want_bf, half[(size_t)i], want_half);
            }
        }
    }
    record(wrong == 0, "bf16 and half conversions round to nearest even", "%lld values, %d wrong", n, wrong);
    cudaFree(dx);
    cudaFree(dback);
    cudaFree(dbf);
    cudaFree(dhalf);
    return wrong == 0;
}

bool memory_checks() {
    relora_emu_set_device_memory((size_t)1 << 20);
    int64_t free_bytes = 0, total = 0;
    harness::api.mem_get_info(&free_bytes, &total);
    void *a = nullptr, *b = nullptr;
    const relora_status first = harness::api.malloc(&a, 600 * 1024);
    int64_t free_after = 0;
    harness::api.mem_get_info(&free_after, &total);
    const relora_status second = harness::api.malloc(&b, 600 * 1024);
    const bool ok = total == (1 << 20) && free_bytes == total && first == RELORA_OK && free_after == total - 600 * 1024 &&
                    second == RELORA_ERR_OUT_OF_MEMORY;
    record(ok, "configurable device memory (1 MiB)", "total %lld, free %lld -> %lld; second 600 KiB: status %d (%s)",
           (long long)total, (long long)free_bytes, (long long)free_after, (int)second, harness::api.last_error());
    harness::api.free(a);
    relora_emu_set_device_memory((size_t)24 << 30);
    // Fresh allocations are poisoned (0xFF: NaN as f32 and bf16), so a kernel reading memory nobody wrote
    // produces NaNs rather than plausible zeros.
    float *p = nullptr;
    cudaMalloc((void **)&p, 8);
    const std::vector<float> h = download<float>(p, 2);
    const bool poisoned = isnan(h[0]) && isnan(h[1]);
    record(poisoned, "fresh device memory reads as NaN", "%g %g", (double)h[0], (double)h[1]);
    cudaFree(p);
    return ok && poisoned;
}

// relora_emu_host_counters: cudaMalloc counts (a failed one and cudaHostAlloc do not); the synchronizes and the
// blocking cudaMemcpy count as host waits, cudaMemcpyAsync, memsets and launches do not.
// relora_emu_command_counters: the memset and both copies (the blocking one too), not a zero-byte memset.
bool host_counter_checks() {
    uint64_t syncs0 = 0, mallocs0 = 0, syncs1 = 0, mallocs1 = 0, launches0 = 0, launches1 = 0;
    uint64_t memsets0 = 0, copies0 = 0, memsets1 = 0, copies1 = 0;
    relora_emu_host_counters(&syncs0, &mallocs0);
    relora_emu_counters(&launches0, nullptr, nullptr, nullptr);
    relora_emu_command_counters(&memsets0, &copies0);
    float *p = nullptr, *q = nullptr, *h = nullptr, host[2] = {0, 0};
    cudaMalloc((void **)&p, 8);
    cudaMalloc((void **)&q, (size_t)1 << 50);  // fails: more than the device has
    (void)cudaGetLastError();
    cudaHostAlloc((void **)&h, 8, 0);
    cudaMemsetAsync(p, 0, 8, nullptr);
    cudaMemcpyAsync(host, p, 8, cudaMemcpyDeviceToHost, nullptr);  // 0 waits
    RELORA_LAUNCH(write_kernel, dim3(1), dim3(1), 0, nullptr)(p, 0);
    cudaStreamSynchronize(nullptr);                                  // 1
    cudaDeviceSynchronize();                                         // 2
    cudaMemcpy(host, p, 8, cudaMemcpyDeviceToHost);                  // 3
    cudaMemsetAsync(p, 0, 0, nullptr);                               // 0 bytes: not a memset
    relora_emu_host_counters(&syncs1, &mallocs1);
    relora_emu_counters(&launches1, nullptr, nullptr, nullptr);
    relora_emu_command_counters(&memsets1, &copies1);
    cudaFree(p);
    cudaFreeHost(h);
    const bool ok = mallocs1 - mallocs0 == 1 && syncs1 - syncs0 == 3 && launches1 - launches0 == 1;
    record(ok, "host counters: cudaMalloc calls and host waits", "%llu mallocs (want 1), %llu waits (want 3), %llu launches (want 1)",
           (unsigned long long)(mallocs1 - mallocs0), (unsigned long long)(syncs1 - syncs0),
           (unsigned long long)(launches1 - launches0));
    const bool commands = memsets1 - memsets0 == 1 && copies1 - copies0 == 2;
    record(commands, "command counters: memsets and copies", "%llu memsets (want 1), %llu copies (want 2)",
           (unsigned long long)(memsets1 - memsets0), (unsigned long long)(copies1 - copies0));
    return ok && commands;
}

// mma.sync m16n8k16 against the PTX ISA's fragment formulas (mma_layout_kernel), 2 warps with different
// matrices, under every schedule; ldmatrix x4 with and without .trans against its definition; a misaligned
// ldmatrix row reported.
bool matrix_checks() {
    const int warps = 2;
    float *d = nullptr;
    cudaMalloc((void **)&d, (size_t)warps * 16 * 8 * sizeof(float));
    bool ok = true;
    for (int order = 0; order < 4; ++order) {
        relora_emu_set_schedule(order);
        RELORA_LAUNCH(mma_layout_kernel, dim3(1), dim3(32 * warps), 0, nullptr)(d);
        const cudaError_t e = cudaGetLastError();
        const std::vector<float> h = download<float>(d, (size_t)warps * 16 * 8);
        int wrong = 0;
        for (int w = 0; w < warps; ++w) {
            for (int r = 0; r < 16; ++r) {
                for (int n = 0; n < 8; ++n) {
                    float want = mma_c(w, r, n);
                    for (int k = 0; k < 16; ++k) want += mma_a(w, r, k) * mma_b(w, k, n);
                    wrong += h[(size_t)((w * 16 + r) * 8 + n)] != want;
                }
            }
        }
        char name[96];
        snprintf(name, sizeof name, "mma m16n8k16 bf16: the PTX fragment layouts (schedule %d)", order);
        record(wrong == 0 && e == cudaSuccess, name, "%d of %d wrong (%s)", wrong, warps * 128, cudaGetErrorString(e));
        ok &= wrong == 0 && e == cudaSuccess;
    }
    relora_emu_set_schedule(RELORA_EMU_ROUND_ROBIN);
    cudaFree(d);

    uint32_t *dl = nullptr;
    cudaMalloc((void **)&dl, 32 * 8 * sizeof(uint32_t));
    RELORA_LAUNCH(ldmatrix_kernel, dim3(1), dim3(32), 16 * 24 * sizeof(__nv_bfloat16), nullptr)(dl, 0);
    cudaError_t e = cudaGetLastError();
    const std::vector<uint32_t> h = download<uint32_t>(dl, 32 * 8);
    int wrong = 0;
    auto element = [](int m, int r, int c) { return (float)((8 * (m % 2) + r) * 16 + 8 * (m / 2) + c); };
    for (int l = 0; l < 32; ++l) {
        for (int m = 0; m < 4; ++m) {
            wrong += h[(size_t)(l * 8 + m)] != bf16_pair(element(m, l / 4, 2 * (l % 4)), element(m, l / 4, 2 * (l % 4) + 1));
            wrong += h[(size_t)(l * 8 + 4 + m)] !=
                     bf16_pair(element(m, 2 * (l % 4), l / 4), element(m, 2 * (l % 4) + 1, l / 4));
        }
    }
    record(wrong == 0 && e == cudaSuccess, "ldmatrix x4 and x4.trans: the PTX fragment layouts", "%d of 256 wrong (%s)",
           wrong, cudaGetErrorString(e));
    ok &= wrong == 0 && e == cudaSuccess;
    RELORA_LAUNCH(ldmatrix_kernel, dim3(1), dim3(32), 16 * 24 * sizeof(__nv_bfloat16), nullptr)(dl, 1);
    cudaDeviceSynchronize();
    e = cudaGetLastError();
    const bool named = strstr(cudaGetErrorString(e), "not 16-byte aligned") != nullptr;
    record(e == cudaErrorLaunchFailure && named, "misaligned ldmatrix row reported", "%s", cudaGetErrorString(e));
    ok &= e == cudaErrorLaunchFailure && named;
    cudaDeviceReset();
    return ok;
}

// cp.async lands at the wait that retires its group (not before, whatever the schedule), zero-fills past
// src-size, and a thread that never waits fails the launch; the dynamic shared memory opt-in.
bool async_copy_checks() {
    const int threads = 4;
    std::vector<uint32_t> src((size_t)threads * 8);
    for (size_t i = 0; i < src.size(); ++i) src[i] = (uint32_t)(1000 + i);
    uint32_t *dsrc = nullptr, *dout = nullptr;
    cudaMalloc((void **)&dsrc, src.size() * sizeof(uint32_t));
    cudaMalloc((void **)&dout, (size_t)threads * 6 * sizeof(uint32_t));
    cudaMemcpy(dsrc, src.data(), src.size() * sizeof(uint32_t), cudaMemcpyHostToDevice);
    RELORA_LAUNCH(cp_async_kernel, dim3(1), dim3(threads), src.size() * sizeof(uint32_t), nullptr)(dsrc, dout);
    cudaError_t e = cudaGetLastError();
    const std::vector<uint32_t> h = download<uint32_t>(dout, (size_t)threads * 6);
    int wrong = 0;
    for (int t = 0; t < threads; ++t) {
        const uint32_t even = src[(size_t)(8 * t)], odd = t == 1 ? 0u : src[(size_t)(8 * t + 4)];
        const uint32_t want[6] = {0xFFFFFFFFu, 0xFFFFFFFFu, even, 0xFFFFFFFFu, even, odd};
        for (int k = 0; k < 6; ++k) wrong += h[(size_t)(t * 6 + k)] != want[k];
    }
    record(wrong == 0 && e == cudaSuccess, "cp.async lands at its wait_group, zero-fills past src-size",
           "%d of %d wrong (%s)", wrong, threads * 6, cudaGetErrorString(e));
    bool ok = wrong == 0 && e == cudaSuccess;
    RELORA_LAUNCH(cp_async_unwaited_kernel, dim3(1), dim3(threads), src.size() * sizeof(uint32_t), nullptr)(dsrc);
    cudaDeviceSynchronize();
    e = cudaGetLastError();
    const bool named = strstr(cudaGetErrorString(e), "never waited") != nullptr;
    record(e == cudaErrorLaunchFailure && named, "cp.async never waited for reported", "%s", cudaGetErrorString(e));
    ok &= e == cudaErrorLaunchFailure && named;
    cudaDeviceReset();  // clears the sticky error, frees dsrc and dout

    unsigned char *d = nullptr;
    cudaMalloc((void **)&d, 1);
    RELORA_LAUNCH(big_shared_kernel, dim3(1), dim3(32), 64 * 1024, nullptr)(d);
    const cudaError_t without = cudaGetLastError();
    const cudaError_t too_much = cudaFuncSetAttribute(big_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
    const cudaError_t opt_in = cudaFuncSetAttribute(big_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    RELORA_LAUNCH(big_shared_kernel, dim3(1), dim3(32), 64 * 1024, nullptr)(d);
    const cudaError_t with = cudaGetLastError();
    const bool shared_ok = without == cudaErrorInvalidConfiguration && too_much == cudaErrorInvalidValue &&
                           opt_in == cudaSuccess && with == cudaSuccess && download<unsigned char>(d, 1)[0] == 7;
    record(shared_ok, "dynamic shared memory above 48 KiB needs the opt-in (at most 99 KiB)",
           "without %d, 100 KiB opt-in %d, 64 KiB opt-in %d, then %d", (int)without, (int)too_much, (int)opt_in, (int)with);
    ok &= shared_ok;
    cudaFree(d);
    return ok;
}

// Streams and events are ordering constraints (cuda_emu.h). Two buffers x and y of n floats; `side` is a stream of
// the library (non-blocking, stream_create). Read after write: the default stream writes x, `side` copies x into
// y. Write after read: `side` copies x into y, the default stream then overwrites x. With the event between them
// (event_record + stream_wait_event) y is right in every order; without it the deferred orders give the stale
// value: read after write in both (the copy runs when `side` is synchronized, before the default stream's
// fill), write after read in `deferred` (a device synchronize runs the default stream first; `reverse` runs
// `side` first and is right by luck, which is why there are two orders). The eager order catches neither.
bool stream_checks() {
    const int initial = relora_emu_stream_order();
    const int n = 300;
    float *x = nullptr, *y = nullptr;
    cudaMalloc((void **)&x, n * sizeof(float));
    cudaMalloc((void **)&y, n * sizeof(float));
    void *side = nullptr, *event = nullptr;
    harness::api.stream_create(&side);
    harness::api.event_create(&event);
    cudaStream_t s = static_cast<cudaStream_t>(side);
    auto fill = [&](float *p, float v, cudaStream_t on) { RELORA_LAUNCH(fill_value_kernel, dim3(1), dim3(64), 0, on)(p, v, n); };
    auto copy = [&](cudaStream_t on) { RELORA_LAUNCH(copy_values_kernel, dim3(1), dim3(64), 0, on)(x, y, n); };
    // y's values after the scenario (all n equal, else NaN).
    auto result = [&]() {
        const std::vector<float> h = download<float>(y, n);
        for (float v : h) {
            if (v != h[0]) return NAN;
        }
        return h[0];
    };
    auto read_after_write = [&](bool with_event) {
        fill(x, 1.0f, nullptr);
        fill(y, 0.0f, nullptr);
        cudaDeviceSynchronize();
        fill(x, 2.0f, nullptr);
        if (with_event) {
            harness::api.event_record(event, nullptr);
            harness::api.stream_wait_event(side, event);
        }
        copy(s);
        harness::api.stream_synchronize(side);
        return result();  // 2 when ordered
    };
    auto write_after_read = [&](bool with_event) {
        fill(x, 1.0f, nullptr);
        fill(y, 0.0f, nullptr);
        cudaDeviceSynchronize();
        copy(s);
        if (with_event) {
            harness::api.event_record(event, side);
            harness::api.stream_wait_event(nullptr, event);
        }
        fill(x, 3.0f, nullptr);
        cudaDeviceSynchronize();
        return result();  // 1 when ordered
    };
    bool ok = true;
    const char *names[] = {"eager", "deferred", "reverse"};
    for (int order : {RELORA_EMU_STREAMS_DEFERRED, RELORA_EMU_STREAMS_REVERSE, RELORA_EMU_STREAMS_EAGER}) {
        relora_emu_set_stream_order(order);
        char name[128];
        const float raw = read_after_write(true), war = write_after_read(true);
        snprintf(name, sizeof name, "streams (%s): a consumer after stream_wait_event sees the producer's data", names[order]);
        record(raw == 2.0f && war == 1.0f, name, "read after write %g (want 2), write after read %g (want 1)", raw, war);
        ok &= raw == 2.0f && war == 1.0f;
        const float raw_missing = read_after_write(false), war_missing = write_after_read(false);
        if (order == RELORA_EMU_STREAMS_EAGER) {
            printf("note  streams (eager): without the event: read after write %g, write after read %g (not caught)\n",
                   raw_missing, war_missing);
            continue;
        }
        snprintf(name, sizeof name, "streams (%s): a missing stream_wait_event (read after write) gives stale data", names[order]);
        record(raw_missing == 1.0f, name, "the consumer read %g (stale: 1)", raw_missing);
        ok &= raw_missing == 1.0f;
        if (order == RELORA_EMU_STREAMS_DEFERRED) {
            snprintf(name, sizeof name, "streams (%s): a missing stream_wait_event (write after read) is a wrong read", names[order]);
            record(war_missing == 3.0f, name, "the consumer read %g (overwritten: 3)", war_missing);
            ok &= war_missing == 3.0f;
        }
    }

    // Deferred work really waits: queued until forced, and an event synchronize runs only what it covers.
    relora_emu_set_stream_order(RELORA_EMU_STREAMS_DEFERRED);
    fill(x, 4.0f, s);
    harness::api.event_record(event, side);
    fill(x, 5.0f, s);
    const uint64_t queued = relora_emu_pending_work();
    cudaEventSynchronize(static_cast<cudaEvent_t>(event));
    const uint64_t after_event = relora_emu_pending_work();
    const float at_event = download<float>(x, 1)[0];  // the default stream's copy does not wait for `side`
    harness::api.stream_synchronize(side);
    const float at_end = download<float>(x, 1)[0];
    const bool deferred_ok = queued == 2 && after_event == 1 && at_event == 4.0f && at_end == 5.0f;
    record(deferred_ok, "streams: work runs when forced, an event synchronize runs up to the event",
           "queued %llu, after the event %llu, x %g then %g", (unsigned long long)queued, (unsigned long long)after_event,
           at_event, at_end);
    ok &= deferred_ok;

    // The legacy default stream orders with blocking streams (cudaStreamCreate) without any event.
    cudaStream_t blocking = nullptr;
    cudaStreamCreate(&blocking);
    fill(x, 6.0f, nullptr);
    fill(y, 0.0f, blocking);
    copy(blocking);
    cudaStreamSynchronize(blocking);
    const float legacy = result();
    record(legacy == 6.0f, "streams: a blocking stream waits for the legacy default stream", "y %g (want 6)", legacy);
    ok &= legacy == 6.0f;
    cudaStreamDestroy(blocking);

    harness::api.event_destroy(event);
    harness::api.stream_destroy(side);
    cudaFree(x);
    cudaFree(y);
    relora_emu_set_stream_order(initial);
    return ok;
}

}  // namespace

bool run_emulation_checks() {
    bool ok = barrier_checks();
    ok &= warp_checks();
    ok &= dynamic_shared_checks();
    ok &= conversion_checks();
    ok &= error_checks();
    ok &= bounds_checks();
    ok &= memory_checks();
    ok &= host_counter_checks();
    ok &= matrix_checks();
    ok &= async_copy_checks();
    ok &= stream_checks();
    uint64_t launches = 0, blocks = 0, fibers = 0, switches = 0;
    relora_emu_counters(&launches, &blocks, &fibers, &switches);
    printf("emulation: %llu launches, %llu blocks, %llu threads run as fibers, %llu switches\n",
           (unsigned long long)launches, (unsigned long long)blocks, (unsigned long long)fibers,
           (unsigned long long)switches);
    return ok;
}
