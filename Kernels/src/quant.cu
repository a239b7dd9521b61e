// Quantized weights: dequantize (to f32 or bf16) and quantize (round to nearest or stochastic rounding); a
// merge is dequantize -> add -> quantize through these. The arithmetic is relora_quant.h's, called as it is: one trait per format wraps that
// header's element dequantizer and block quantizer, one generic kernel per operation, one switch per
// entry point. Adding a format touches one trait and one case.
#include "relora_cuda.cuh"

namespace relora {
namespace {

// The format traits: the header's functions of one format under uniform names, so the kernels below are
// written once. RELORA_FORMAT_TRAIT(Trait, suffix, block size) wraps relora_*_<suffix> and block_<suffix>.
#define RELORA_FORMAT_TRAIT(Trait, suffix, size)                                                                 \
    struct Trait {                                                                                              \
        using Block = block_##suffix;                                                                           \
        static constexpr int kSize = size;                                                                      \
        static __device__ __forceinline__ float at(const Block *b, int j) {                                     \
            return relora_dequantize_##suffix##_at(b, j);                                                       \
        }                                                                                                       \
        static __device__ __forceinline__ int quantize(const float *x, Block *y, int *bad_j) {                  \
            return relora_quantize_block_##suffix(x, y, bad_j);                                                 \
        }                                                                                                       \
        static __device__ __forceinline__ int quantize_sr(const float *x, Block *y, uint64_t seed,              \
                                                          uint64_t stream, uint64_t counter0, int *bad_j) {     \
            return relora_quantize_block_##suffix##_sr(x, y, seed, stream, counter0, bad_j);                   \
        }                                                                                                       \
    };
RELORA_FORMAT_TRAIT(Q8_0, q8_0, RELORA_QK8_0)
RELORA_FORMAT_TRAIT(Q4_0, q4_0, RELORA_QK4_0)
RELORA_FORMAT_TRAIT(NF4, nf4, RELORA_QKNF4)
#undef RELORA_FORMAT_TRAIT

constexpr int kDequantThreads = 256;
constexpr int kChunk = 8;  // outputs per thread: 8 bf16 = one 16-byte store, 8 f32 = two

// 8 outputs as the bytes of one (bf16) or two (f32) 16-byte stores.
template <typename Out>
struct Chunk;
template <>
struct Chunk<__nv_bfloat16> {
    __device__ __forceinline__ static void store(__nv_bfloat16 *dst, const float (&v)[kChunk]) {
        Vec16 w;
        w.x = (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v[0])) | (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v[1])) << 16;
        w.y = (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v[2])) | (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v[3])) << 16;
        w.z = (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v[4])) | (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v[5])) << 16;
        w.w = (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v[6])) | (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v[7])) << 16;
        store_vec16(dst, w);
    }
};
template <>
struct Chunk<float> {
    __device__ __forceinline__ static void store(float *dst, const float (&v)[kChunk]) {
        Vec16 a, b;
        a.x = __float_as_uint(v[0]), a.y = __float_as_uint(v[1]), a.z = __float_as_uint(v[2]), a.w = __float_as_uint(v[3]);
        b.x = __float_as_uint(v[4]), b.y = __float_as_uint(v[5]), b.z = __float_as_uint(v[6]), b.w = __float_as_uint(v[7]);
        store_vec16(dst, a);
        store_vec16(dst + 4, b);
    }
};

// out[r, c] = element c of row r, 8 consecutive outputs per thread written with 16-byte stores. Each row of
// the output starts wherever r * cols puts it, so a row is cut into a head (the elements before its first
// 16-byte boundary, < 8), whole chunks of 8 from there, and a tail (< 8); chunk k of the row goes to thread k
// of the x-stride loop, and the extra index `chunks` writes the head and tail one element at a time. Every
// value is the header's element dequantizer (F::at), as before: bit-identical to relora_dequantize_row_*
// (then bf16's one rounding). Block sizes are powers of two, so c / kSize and c % kSize are shifts and masks.
// Grid: x strides over a row's chunks, y over rows; a warp stores 512 consecutive bytes (bf16).
template <typename F, typename Out>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_kernel(const unsigned char *blocks, int64_t rows, int64_t cols, int64_t row_bytes, Out *out) {
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const typename F::Block *row = reinterpret_cast<const typename F::Block *>(blocks + r * row_bytes);
        Out *orow = out + r * cols;
        // Elements before the first 16-byte boundary (out is aligned to its element size: checked by the entry).
        const int64_t misalign = (int64_t)((16u - (unsigned)(reinterpret_cast<uintptr_t>(orow) & 15u)) & 15u) / (int64_t)sizeof(Out);
        const int64_t head = misalign < cols ? misalign : cols;
        const int64_t chunks = (cols - head) / kChunk;
        for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k <= chunks; k += (int64_t)gridDim.x * blockDim.x) {
            if (k < chunks) {
                const int64_t c0 = head + k * kChunk;
                const int j0 = (int)(c0 % F::kSize);
                float v[kChunk];
                if (j0 + kChunk <= F::kSize) {  // inside one quantization block: its scale is loaded once
                    const typename F::Block *b = row + c0 / F::kSize;
                    for (int e = 0; e < kChunk; ++e) v[e] = F::at(b, j0 + e);
                } else {  // across two (a row that starts off a 16-byte boundary)
                    for (int e = 0; e < kChunk; ++e) {
                        const int64_t c = c0 + e;
                        v[e] = F::at(row + c / F::kSize, (int)(c % F::kSize));
                    }
                }
                Chunk<Out>::store(orow + c0, v);
            } else {
                for (int64_t c = 0; c < head; ++c) orow[c] = from_float<Out>(F::at(row + c / F::kSize, (int)(c % F::kSize)));
                for (int64_t c = head + chunks * kChunk; c < cols; ++c) {
                    orow[c] = from_float<Out>(F::at(row + c / F::kSize, (int)(c % F::kSize)));
                }
            }
        }
    }
}

constexpr int kQuantThreads = 128;  // quantization blocks per CUDA block, one per thread

// One thread quantizes one block with the header's block quantizer, so the codes are the reference's
// by construction. The block's inputs are first staged through shared memory with coalesced loads
// (consecutive threads read consecutive floats of a row); each thread's row of the tile is padded to
// kSize + 1 floats so that the 32 lanes reading element j of their blocks hit 32 different banks.
// kMode: kQuantize: x = src, padding 0, the round-to-nearest block quantizer; kStochastic: x = src, padding 0,
// the header's stochastic-rounding block quantizer, element (r, c) drawing counter r * padded_cols + c of
// (seed, stream_id) (block b of row r starts at counter r * padded_cols + b * B), as the CPU's row loop does. A failure is folded into *failure with atomicMin, so the first failing
// element in row-major order wins whatever the launch order (see RELORA_QUANT_NO_FAILURE).
// Throughput is not the point here (a merge runs once per restart): the staging loop pays a 64-bit
// division per element.
enum QuantMode { kQuantize = 0, kStochastic = 2 };  // 1 was the rtn merge (requantize_rtn, gone in ABI 7)

template <typename F, int kMode>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_kernel(const float *src, unsigned char *out_blocks, int64_t rows, int64_t cols, int64_t blocks_per_row,
                    uint64_t seed, uint64_t stream_id, unsigned long long *failure) {
    constexpr int B = F::kSize, kStride = B + 1;
    __shared__ float tile[kQuantThreads * kStride];
    const int64_t total = rows * blocks_per_row;
    const int64_t row_bytes = blocks_per_row * (int64_t)sizeof(typename F::Block);
    for (int64_t first = (int64_t)blockIdx.x * kQuantThreads; first < total; first += (int64_t)gridDim.x * kQuantThreads) {
        for (int e = (int)threadIdx.x; e < kQuantThreads * B; e += kQuantThreads) {
            const int64_t g = first + e / B;
            float v = 0.0f;
            if (g < total) {
                const int64_t r = g / blocks_per_row;
                const int64_t c = (g - r * blocks_per_row) * B + e % B;
                if (c < cols) v = src[r * cols + c];
            }
            tile[(e / B) * kStride + e % B] = v;
        }
        __syncthreads();
        const int64_t g = first + threadIdx.x;
        if (g < total) {
            float *x = tile + threadIdx.x * kStride;
            const int64_t r = g / blocks_per_row, b = g - r * blocks_per_row;
            typename F::Block *dst = reinterpret_cast<typename F::Block *>(out_blocks + r * row_bytes) + b;
            int bad = relora_first_nonfinite(x, B);
            int status = RELORA_QUANT_ERR_NONFINITE;
            if (bad < 0) {
                status = kMode == kStochastic
                             ? F::quantize_sr(x, dst, seed, stream_id, (uint64_t)(r * blocks_per_row * B + b * B), &bad)
                             : F::quantize(x, dst, &bad);
            }
            if (status != RELORA_QUANT_OK) {
                const unsigned long long index = (unsigned long long)(r * blocks_per_row * B + b * B + bad);
                atomicMin(failure, (index << 2) | (unsigned long long)status);
            }
        }
        __syncthreads();  // the next iteration rewrites the tile
    }
}

template <typename F, typename Out>
relora_status launch_dequantize(const void *blocks, int64_t rows, int64_t cols, Out *out, cudaStream_t stream) {
    const int64_t row_bytes = (cols + F::kSize - 1) / F::kSize * (int64_t)sizeof(typename F::Block);
    const dim3 grid(grid_for(cols / kChunk + 1, kDequantThreads), grid_for(rows, 1, kMaxGridY));
    RELORA_LAUNCH((dequantize_kernel<F, Out>), grid, dim3(kDequantThreads), 0, stream)
    (static_cast<const unsigned char *>(blocks), rows, cols, row_bytes, out);
    return check_launch("dequantize_kernel");
}

template <typename F>
relora_status launch_quantize(const float *src, int64_t rows, int64_t cols, void *out_blocks, uint64_t *failure, int mode,
                              uint64_t seed, uint64_t stream_id, cudaStream_t stream) {
    static_assert(sizeof(unsigned long long) == sizeof(uint64_t), "the failure word is 64 bits");
    RELORA_CHECK(check(cudaMemsetAsync(failure, 0xFF, sizeof(uint64_t), stream), "quantize: resetting the failure word"));
    const int64_t blocks_per_row = (cols + F::kSize - 1) / F::kSize;
    const unsigned int grid = grid_for(rows * blocks_per_row, kQuantThreads);
    unsigned long long *word = reinterpret_cast<unsigned long long *>(failure);
    unsigned char *out = static_cast<unsigned char *>(out_blocks);
    if (mode == kStochastic) {
        RELORA_LAUNCH((quantize_kernel<F, kStochastic>), dim3(grid), dim3(kQuantThreads), 0, stream)
        (src, out, rows, cols, blocks_per_row, seed, stream_id, word);
    } else {
        RELORA_LAUNCH((quantize_kernel<F, kQuantize>), dim3(grid), dim3(kQuantThreads), 0, stream)
        (src, out, rows, cols, blocks_per_row, seed, stream_id, word);
    }
    return check_launch("quantize_kernel");
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_dequantize(int32_t format, const void *blocks, int64_t rows, int64_t cols, void *out,
                                     int32_t out_dtype, void *stream) {
    RELORA_REQUIRE(rows >= 0 && cols >= 0, "dequantize", "negative shape [%lld, %lld]", (long long)rows, (long long)cols);
    if (rows == 0 || cols == 0) return RELORA_OK;
    RELORA_REQUIRE(blocks && out, "dequantize", "null pointer");
    RELORA_REQUIRE(reinterpret_cast<uintptr_t>(out) % (out_dtype == RELORA_DTYPE_F32 ? 4u : 2u) == 0, "dequantize",
                   "output %p is not aligned to its element size", out);
    const cudaStream_t s = as_stream(stream);
#define RELORA_DEQUANT_CASE(F)                                                                                \
    switch (out_dtype) {                                                                                      \
    case RELORA_DTYPE_F32: return launch_dequantize<F>(blocks, rows, cols, static_cast<float *>(out), s);   \
    case RELORA_DTYPE_BF16: return launch_dequantize<F>(blocks, rows, cols, static_cast<__nv_bfloat16 *>(out), s); \
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "dequantize: unknown output dtype %d", (int)out_dtype); \
    }
    switch (format) {
    case RELORA_FORMAT_Q8_0: RELORA_DEQUANT_CASE(Q8_0)
    case RELORA_FORMAT_Q4_0: RELORA_DEQUANT_CASE(Q4_0)
    case RELORA_FORMAT_NF4: RELORA_DEQUANT_CASE(NF4)
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "dequantize: unknown format %d", (int)format);
    }
#undef RELORA_DEQUANT_CASE
}

static relora_status quantize_any(const char *op, int32_t format, const float *src, int64_t rows, int64_t cols,
                                  void *out_blocks, uint64_t *failure, int mode, uint64_t seed, uint64_t stream_id,
                                  void *stream) {
    if (rows < 0 || cols < 0) {
        return fail(RELORA_ERR_INVALID_ARGUMENT, "%s: negative shape [%lld, %lld]", op, (long long)rows, (long long)cols);
    }
    if (!failure) return fail(RELORA_ERR_INVALID_ARGUMENT, "%s: null failure word", op);
    if (rows == 0 || cols == 0) {
        return check(cudaMemsetAsync(failure, 0xFF, sizeof(uint64_t), as_stream(stream)), op);
    }
    if (!out_blocks || !src) return fail(RELORA_ERR_INVALID_ARGUMENT, "%s: null pointer", op);
    const cudaStream_t s = as_stream(stream);
    switch (format) {
    case RELORA_FORMAT_Q8_0: return launch_quantize<Q8_0>(src, rows, cols, out_blocks, failure, mode, seed, stream_id, s);
    case RELORA_FORMAT_Q4_0: return launch_quantize<Q4_0>(src, rows, cols, out_blocks, failure, mode, seed, stream_id, s);
    case RELORA_FORMAT_NF4: return launch_quantize<NF4>(src, rows, cols, out_blocks, failure, mode, seed, stream_id, s);
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "%s: unknown format %d", op, (int)format);
    }
}

relora_status relora_cuda_quantize(int32_t format, const float *src, int64_t rows, int64_t cols, void *blocks,
                                   int32_t rounding, uint64_t seed, uint64_t stream_id, uint64_t *failure,
                                   void *stream) {
    RELORA_REQUIRE(rounding == RELORA_ROUND_NEAREST || rounding == RELORA_ROUND_STOCHASTIC, "quantize",
                   "unknown rounding %d", (int)rounding);
    return quantize_any("quantize", format, src, rows, cols, blocks, failure,
                        rounding == RELORA_ROUND_STOCHASTIC ? kStochastic : kQuantize, seed, stream_id, stream);
}

