// Token embedding forward (a gather) and backward (a scatter-add).
//
// Determinism of the backward without sorting or atomics: per-column ownership. Thread c owns column c
// of the whole table and walks the tokens in order, adding dout[t, c] into dtable[ids[t], c]. Repeated
// ids are therefore summed in token order, exactly the additions (and order) of the CPU reference, so
// an f32 dout gives the CPU's bits whatever the launch shape. The price is parallelism: `dim` threads,
// each making `tokens` loads and read-modify-writes down its own column (the 32 consecutive threads of a
// warp touch 32 consecutive elements of one row at a time, so the accesses are coalesced). Enough for
// dim >= 2048 on a GPU to be bandwidth-bound; a token-chunked variant with a fixed-order second pass is
// the step up if a benchmark says so.
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

template <typename T>
__global__ void __launch_bounds__(kThreads)
    embedding_backward_kernel(const int32_t *ids, const T *dout, float *dtable, int64_t tokens, int64_t dim, int64_t vocab) {
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < dim; c += (int64_t)gridDim.x * blockDim.x) {
        for (int64_t t = 0; t < tokens; ++t) {
            const int64_t id = ids[t];
            if (id >= 0 && id < vocab) dtable[id * dim + c] += to_float(dout[t * dim + c]);
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
                       cudaStream_t stream) {
    RELORA_LAUNCH(embedding_backward_kernel<T>, dim3(grid_for(dim, kThreads)), dim3(kThreads), 0, stream)
    (ids, static_cast<const T *>(dout), dtable, tokens, dim, vocab);
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

relora_status relora_cuda_embedding_backward(const int32_t *ids, const void *dout, float *dtable, int64_t tokens,
                                             int64_t dim, int64_t vocab, int32_t dtype, void *stream) {
    RELORA_REQUIRE(tokens >= 0 && dim >= 0 && vocab >= 0, "embedding_backward", "negative size");
    if (tokens == 0 || dim == 0) return RELORA_OK;
    RELORA_REQUIRE(ids && dout && dtable, "embedding_backward", "null pointer");
    switch (dtype) {
    case RELORA_DTYPE_F32: return backward<float>(ids, dout, dtable, tokens, dim, vocab, as_stream(stream));
    case RELORA_DTYPE_BF16: return backward<__nv_bfloat16>(ids, dout, dtable, tokens, dim, vocab, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "embedding_backward: unknown dtype %d", (int)dtype);
    }
}
