// Token embedding forward (a gather) and backward (a scatter-add).
//
// The backward is deterministic and sort-based, with the CPU's additions: CPUBackend.embeddingBackward adds
// the rows of dout into dtable in token order, so dtable[v] = ((dtable[v] + dout[t1]) + dout[t2]) + ... over
// the tokens t1 < t2 < ... whose id is v. Here:
//   1. a stable LSD radix sort of the token indices by id (8-bit digits, ceil(bits(vocab) / 8) passes: 2 for a
//      32000-token vocabulary), each pass three kernels: per-tile digit counts (tiles of 256 tokens, shared
//      memory integer atomics), one block's exclusive scan of the counts in (digit, tile) order, and a stable
//      scatter in which thread d of a tile's block walks the tile in order and places the tokens of digit d.
//      Ids outside [0, vocab) get the key `vocab`, which sorts after every valid id and is skipped;
//   2. one pass over the sorted tokens: the first position of each run of equal ids owns that id's row, and its
//      threads (one column each, columns over grid y) add the run's dout rows in sorted = token order into
//      registers that start from dtable's row, then store the row once.
// Every dtable element has one writer and the CPU's order of additions (_rn intrinsics: f32 dout gives the CPU's
// bits), no float atomics, and the same bits on every run and launch shape. Cost: 3 launches per pass + 1,
// integer work on 8 (keys, values) bytes per token per pass, then the dout rows read once and each distinct
// id's row read and written once. A very frequent id is one thread per column walking its whole run: the
// serial part the CPU's order imposes (loads are independent of the running sum, so they pipeline).
// Scratch: a caller's workspace of relora_cuda_embedding_backward_workspace_bytes(tokens) bytes.
#include "relora_cuda.cuh"

namespace relora {
namespace {

constexpr int kThreads = 256;

// out[t] = table[ids[t]]; an id outside [0, vocab) gives a zero row instead of a stray read.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    embedding_forward_kernel(const int32_t *ids, const T *table, T *out, int64_t tokens, int64_t dim, int64_t vocab) {
    for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        const int64_t id = ids[t];
        const bool valid = id >= 0 && id < vocab;
        const T *src = table + (valid ? id : 0) * dim;
        T *dst = out + t * dim;
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = valid ? src[c] : from_float<T>(0.0f);
    }
}

// ---- The sort ------------------------------------------------------------------------------------------
constexpr int kSortThreads = 256;  // a tile's tokens, and one thread per digit value
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kScanThreads = 1024;
static_assert(kSortThreads == kBins, "thread d of a scatter block places the tile's tokens of digit d");

// The workspace: keys and values twice (the passes ping-pong), then the counts [kBins][tiles]; each region
// starts on a 256-byte boundary.
inline int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }
inline int64_t sort_tiles(int64_t tokens) { return (tokens + kSortThreads - 1) / kSortThreads; }
inline int64_t workspace_bytes(int64_t tokens) {
    return 4 * align256(tokens * 4) + align256(kBins * sort_tiles(tokens) * 4);
}

// The key of token i on the first pass: its id, or vocab for an id outside [0, vocab) (sorted last, skipped).
__device__ __forceinline__ int32_t first_key(const int32_t *ids, int64_t i, int32_t vocab) {
    const int32_t id = ids[i];
    return id >= 0 && id < vocab ? id : vocab;
}

// counts[d * tiles + tile] = how many of the tile's tokens have digit d (integer atomics: exact in any order).
// in_keys null: the first pass, keys from ids.
__global__ void __launch_bounds__(kSortThreads)
    sort_count_kernel(const int32_t *ids, const int32_t *in_keys, int32_t vocab, int64_t tokens, int shift,
                      int32_t *counts, int64_t tiles) {
    __shared__ int32_t hist[kBins];
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        hist[threadIdx.x] = 0;
        __syncthreads();
        const int64_t i = tile * kSortThreads + threadIdx.x;
        if (i < tokens) {
            const int32_t key = in_keys ? in_keys[i] : first_key(ids, i, vocab);
            atomicAdd(&hist[(key >> shift) & (kBins - 1)], 1);
        }
        __syncthreads();
        counts[(int64_t)threadIdx.x * tiles + tile] = hist[threadIdx.x];
        __syncthreads();  // the next tile clears hist
    }
}

// Exclusive prefix sum over the threads of the block (blockDim.x a multiple of 32); *total gets the sum.
__device__ int32_t block_exclusive_scan(int32_t v, int32_t *total) {
    __shared__ int32_t warp_sums[32];
    const int lane = (int)(threadIdx.x & 31u), warp = (int)(threadIdx.x >> 5), warps = (int)(blockDim.x >> 5);
    int32_t inclusive = v;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int32_t y = __shfl_up_sync(0xffffffffu, inclusive, (unsigned)offset);
        if (lane >= offset) inclusive += y;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const int32_t w = lane < warps ? warp_sums[lane] : 0;
        int32_t scanned = w;
        for (int offset = 1; offset < 32; offset <<= 1) {
            const int32_t y = __shfl_up_sync(0xffffffffu, scanned, (unsigned)offset);
            if (lane >= offset) scanned += y;
        }
        warp_sums[lane] = scanned - w;  // exclusive prefix of the warp totals
        if (lane == 31) *total = scanned;
    }
    __syncthreads();
    return warp_sums[warp] + inclusive - v;
}

// counts = their exclusive prefix sums in (digit, tile) order, in place: where each tile's tokens of each digit
// start in the pass's output. One block; thread t owns a contiguous run of entries.
__global__ void __launch_bounds__(kScanThreads) sort_scan_kernel(int32_t *counts, int64_t entries) {
    __shared__ int32_t total;
    const int64_t per = (entries + kScanThreads - 1) / kScanThreads;
    const int64_t first = (int64_t)threadIdx.x * per;
    const int64_t end = first + per < entries ? first + per : entries;
    int32_t own = 0;
    for (int64_t e = first; e < end; ++e) own += counts[e];
    int32_t run = block_exclusive_scan(own, &total);
    for (int64_t e = first; e < end; ++e) {
        const int32_t c = counts[e];
        counts[e] = run;
        run += c;
    }
}

// The stable scatter of one pass: the tile's (key, value) pairs go to shared memory, then thread d walks them in
// order and writes those of digit d to consecutive places from offsets[d * tiles + tile]. in_keys null: the first
// pass (keys from ids, values the token indices).
__global__ void __launch_bounds__(kSortThreads)
    sort_scatter_kernel(const int32_t *ids, const int32_t *in_keys, const int32_t *in_values, int32_t vocab,
                        int64_t tokens, int shift, const int32_t *offsets, int64_t tiles, int32_t *out_keys,
                        int32_t *out_values) {
    __shared__ int32_t keys[kSortThreads], values[kSortThreads];
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int64_t first = tile * kSortThreads;
        const int n = (int)(tokens - first < kSortThreads ? tokens - first : kSortThreads);
        if ((int)threadIdx.x < n) {
            const int64_t i = first + threadIdx.x;
            keys[threadIdx.x] = in_keys ? in_keys[i] : first_key(ids, i, vocab);
            values[threadIdx.x] = in_values ? in_values[i] : (int32_t)i;
        }
        __syncthreads();
        const int digit = (int)threadIdx.x;
        int32_t place = offsets[(int64_t)digit * tiles + tile];
        for (int j = 0; j < n; ++j) {
            const int32_t key = keys[j];
            if (((key >> shift) & (kBins - 1)) == digit) {
                out_keys[place] = key;
                out_values[place] = values[j];
                ++place;
            }
        }
        __syncthreads();  // the next tile rewrites keys and values
    }
}

// ---- The sums ----------------------------------------------------------------------------------------------
// Position p of the sorted tokens starts a run when its key differs from p - 1's; that run's block (grid x
// strides over positions, y over column chunks of kThreads) adds the run's dout rows to dtable[key] in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    embedding_backward_kernel(const int32_t *keys, const int32_t *tokens_sorted, const T *dout, float *dtable,
                              int64_t tokens, int64_t dim, int32_t vocab) {
    for (int64_t p = blockIdx.x; p < tokens; p += gridDim.x) {
        const int32_t key = keys[p];
        if (key >= vocab || (p > 0 && keys[p - 1] == key)) continue;  // an invalid id, or not a run's start
        int64_t end = p + 1;
        while (end < tokens && keys[end] == key) ++end;
        float *row = dtable + (int64_t)key * dim;
        for (int64_t c = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; c < dim; c += (int64_t)gridDim.y * blockDim.x) {
            float acc = row[c];
            RELORA_UNROLL_BY(8)
            for (int64_t q = p; q < end; ++q) acc = __fadd_rn(acc, to_float(dout[(int64_t)tokens_sorted[q] * dim + c]));
            row[c] = acc;
        }
    }
}

template <typename T>
relora_status forward(const int32_t *ids, const void *table, void *out, int64_t tokens, int64_t dim, int64_t vocab,
                      cudaStream_t stream) {
    RELORA_LAUNCH(embedding_forward_kernel<T>, dim3(grid_for(tokens, 1)), dim3(kThreads), 0, stream)
    (ids, static_cast<const T *>(table), static_cast<T *>(out), tokens, dim, vocab);
    return check_launch("embedding_forward_kernel");
}

template <typename T>
relora_status backward(const int32_t *ids, const void *dout, float *dtable, int64_t tokens, int64_t dim, int64_t vocab,
                       void *workspace, cudaStream_t stream) {
    const int64_t tiles = sort_tiles(tokens), region = align256(tokens * 4);
    unsigned char *w = static_cast<unsigned char *>(workspace);
    int32_t *keys[2] = {reinterpret_cast<int32_t *>(w), reinterpret_cast<int32_t *>(w + region)};
    int32_t *values[2] = {reinterpret_cast<int32_t *>(w + 2 * region), reinterpret_cast<int32_t *>(w + 3 * region)};
    int32_t *counts = reinterpret_cast<int32_t *>(w + 4 * region);
    // Digits of the largest key (vocab, the invalid ids' key): at least one pass, which also moves the tokens.
    int bits = 0;
    while (bits < 31 && (vocab >> bits) != 0) ++bits;
    const int passes = bits > 0 ? (bits + kDigitBits - 1) / kDigitBits : 1;
    const unsigned int grid = grid_for(tiles, 1);
    for (int pass = 0; pass < passes; ++pass) {
        const int shift = pass * kDigitBits;
        const int32_t *in_keys = pass == 0 ? nullptr : keys[(pass - 1) & 1];
        const int32_t *in_values = pass == 0 ? nullptr : values[(pass - 1) & 1];
        RELORA_LAUNCH(sort_count_kernel, dim3(grid), dim3(kSortThreads), 0, stream)
        (ids, in_keys, (int32_t)vocab, tokens, shift, counts, tiles);
        RELORA_CHECK(check_launch("sort_count_kernel"));
        RELORA_LAUNCH(sort_scan_kernel, dim3(1), dim3(kScanThreads), 0, stream)(counts, kBins * tiles);
        RELORA_CHECK(check_launch("sort_scan_kernel"));
        RELORA_LAUNCH(sort_scatter_kernel, dim3(grid), dim3(kSortThreads), 0, stream)
        (ids, in_keys, in_values, (int32_t)vocab, tokens, shift, counts, tiles, keys[pass & 1], values[pass & 1]);
        RELORA_CHECK(check_launch("sort_scatter_kernel"));
    }
    const int last = (passes - 1) & 1;
    // 4 positions per block: most positions start no run, and a block that only checks one still takes a slot.
    const dim3 sums(grid_for(tokens, 4), grid_for(dim, kThreads, kMaxGridY));
    RELORA_LAUNCH(embedding_backward_kernel<T>, sums, dim3(kThreads), 0, stream)
    (keys[last], values[last], static_cast<const T *>(dout), dtable, tokens, dim, (int32_t)vocab);
    return check_launch("embedding_backward_kernel");
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_embedding_forward(const int32_t *ids, const void *table, void *out, int64_t tokens,
                                            int64_t dim, int64_t vocab, int32_t dtype, void *stream) {
    RELORA_REQUIRE(tokens >= 0 && dim >= 0 && vocab >= 0, "embedding_forward", "negative size");
    if (tokens == 0 || dim == 0) return RELORA_OK;
    RELORA_REQUIRE(ids && table && out, "embedding_forward", "null pointer");
    switch (dtype) {
    case RELORA_DTYPE_F32: return forward<float>(ids, table, out, tokens, dim, vocab, as_stream(stream));
    case RELORA_DTYPE_BF16: return forward<__nv_bfloat16>(ids, table, out, tokens, dim, vocab, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "embedding_forward: unknown dtype %d", (int)dtype);
    }
}

int64_t relora_cuda_embedding_backward_workspace_bytes(int64_t tokens) { return tokens > 0 ? workspace_bytes(tokens) : 0; }

relora_status relora_cuda_embedding_backward(const int32_t *ids, const void *dout, float *dtable, int64_t tokens,
                                             int64_t dim, int64_t vocab, int32_t dtype, void *workspace, void *stream) {
    RELORA_REQUIRE(tokens >= 0 && dim >= 0 && vocab >= 0, "embedding_backward", "negative size");
    // Sorted positions and ids are int32, and vocab itself is the invalid ids' key.
    RELORA_REQUIRE(tokens <= INT32_MAX && vocab <= INT32_MAX, "embedding_backward",
                   "%lld tokens, vocabulary %lld: at most 2^31 - 1 of each", (long long)tokens, (long long)vocab);
    if (tokens == 0 || dim == 0 || vocab == 0) return RELORA_OK;
    RELORA_REQUIRE(ids && dout && dtable && workspace, "embedding_backward", "null pointer");
    switch (dtype) {
    case RELORA_DTYPE_F32: return backward<float>(ids, dout, dtable, tokens, dim, vocab, workspace, as_stream(stream));
    case RELORA_DTYPE_BF16:
        return backward<__nv_bfloat16>(ids, dout, dtable, tokens, dim, vocab, workspace, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "embedding_backward: unknown dtype %d", (int)dtype);
    }
}
