// relora kernel ABI: the contract between the Swift code and libreloracuda.so (Kernels/).
//
// The Swift package never links CUDA. Kernels/ builds a shared library that exports the flat
// `extern "C"` functions declared here; Sources/CReLoRA/loader.c opens it with dlopen at run time
// and resolves them into a table. Every entry point takes device pointers, sizes, scalars and a
// stream, and returns a relora_status (0 = success). Bump RELORA_ABI_VERSION whenever a signature or
// a memory layout below changes: the loader refuses a library built against another version.
//
// The entry points are listed once, in RELORA_CUDA_FUNCTIONS below. That one list gives
//   - the loader's table (struct relora_cuda_api: one member per entry point, resolved by dlsym),
//   - the prototypes the kernel library compiles its definitions against (only when
//     RELORA_CUDA_LIBRARY is defined, i.e. inside Kernels/: the Swift side sees no unresolvable symbols),
// so a signature cannot drift between the two sides without a compile error in the library.
//
// Conventions of the entry points:
// - Sizes and counts are int64_t; a negative size or a null pointer with a non-zero size is
//   RELORA_ERR_INVALID_ARGUMENT. A zero-size call does nothing and succeeds.
// - `stream` is a cudaStream_t passed as void * (NULL = the default stream). Calls are asynchronous
//   with respect to the host: errors of a running kernel surface at the next stream_synchronize.
// - Storage dtypes are RELORA_DTYPE_*: bf16 storage with fp32 arithmetic inside every kernel, or f32.
// - Ops whose doc says "accumulates" add into their output; the others overwrite it. The semantics of
//   each op are those of the Backend method of the same name (Sources/ReLoRA/Backend/Backend.swift).
#ifndef RELORA_ABI_H
#define RELORA_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RELORA_ABI_VERSION 13

typedef enum relora_status {
    RELORA_OK = 0,
    RELORA_ERR_INVALID_ARGUMENT = 1,  // a size, pointer or enum value the kernel cannot accept
    RELORA_ERR_CUDA = 2,              // a CUDA runtime call failed (see relora_cuda_last_error)
    RELORA_ERR_CUBLAS = 3,            // a cuBLAS call failed
    RELORA_ERR_OUT_OF_MEMORY = 4,
    RELORA_ERR_NO_DEVICE = 5,
    RELORA_ERR_OUT_OF_BOUNDS = 6,     // a kernel touched memory outside its allocations: CUDA's illegal
                                      // address, or the emulation's guard bytes found overwritten
    RELORA_ERR_COMMUNICATION = 7,     // a collective failed: a peer died or left, the network failed, or the
                                      // communicator's timeout passed; the communicator is aborted
    RELORA_ERR_UNAVAILABLE = 8,       // NCCL cannot be loaded on this machine (libnccl.so.2 or RELORA_NCCL_LIB)
} relora_status;

// Storage dtypes of float tensors (the `dtype` arguments).
#define RELORA_DTYPE_F32 1
#define RELORA_DTYPE_BF16 2
#define RELORA_DTYPE_F16 3  // storage only: `convert` reads and writes it, no compute kernel takes it

// Quantized block formats (the `format` arguments); layouts in relora_quant.h.
#define RELORA_FORMAT_Q8_0 1
#define RELORA_FORMAT_Q4_0 2
#define RELORA_FORMAT_NF4 3

// Rounding of the quantizers (`quantize`'s rounding argument; QuantRounding on the Swift side).
#define RELORA_ROUND_NEAREST 0
#define RELORA_ROUND_STOCHASTIC 1

// memcpy directions (the values of cudaMemcpyKind).
#define RELORA_MEMCPY_HOST_TO_DEVICE 1
#define RELORA_MEMCPY_DEVICE_TO_HOST 2
#define RELORA_MEMCPY_DEVICE_TO_DEVICE 3
#define RELORA_MEMCPY_DEFAULT 4  // direction inferred from the pointers (unified addressing): copies that
                                 // involve pinned host memory from host_alloc

// Device scratch that sum_of_squares and dot_accumulate need (partial sums of at most 1024 blocks, in
// double). One workspace must not be shared by calls that may run concurrently (two streams).
#define RELORA_REDUCE_WORKSPACE_BYTES 8192

// How sum_of_squares splits a tensor of `count` elements (pass 1's blocks, each partial sum one double of
// the workspace): one block per RELORA_REDUCE_BLOCK_ELEMENTS elements, at least 1, at most 1024. A function of
// the count only, so the summation order is the same on every device; gradient_norm splits each of its
// tensors the same way (and the Swift side sizes gradient_norm's partials with it).
#define RELORA_REDUCE_BLOCK_ELEMENTS 4096
#define RELORA_REDUCE_MAX_BLOCKS (RELORA_REDUCE_WORKSPACE_BYTES / 8)
static inline int64_t relora_reduce_blocks(int64_t count) {
    const int64_t g = (count + RELORA_REDUCE_BLOCK_ELEMENTS - 1) / RELORA_REDUCE_BLOCK_ELEMENTS;
    return g < 1 ? 1 : (g > RELORA_REDUCE_MAX_BLOCKS ? RELORA_REDUCE_MAX_BLOCKS : g);
}

// Multi-tensor optimizer ops (gradient_norm, zero_multi, adamw_multi, adamw_8bit_multi): a table of these in device
// memory, one entry per tensor, which the caller uploads once and reuses every step (the pointers stay
// valid while the tensors live). Each op splits its tensors into work units, and `first_unit` is the number
// of units of the entries before (a prefix sum; the kernels find a unit's tensor by binary search over it):
// gradient_norm's and zero_multi's units are relora_reduce_blocks(count) per tensor, adamw_multi's RELORA_ADAM_CHUNK
// elements (the last one partial; none for count 0), adamw_8bit_multi's the 256-element absmax blocks.
#define RELORA_ADAM_CHUNK 4096
typedef struct relora_norm_entry {
    const void *x;        // [count] of dtype
    int64_t count;
    int64_t first_unit;   // sum of relora_reduce_blocks over the entries before
    int32_t dtype;        // RELORA_DTYPE_F32 | RELORA_DTYPE_BF16
    int32_t blocks;       // relora_reduce_blocks(count)
} relora_norm_entry;

typedef struct relora_adam_entry {
    float *param;         // f32 [count]: the values the update runs on (a master copy, or f32 working values)
    float *grad;          // f32 [count]; multiplied by the clip factor in place when that is not 1
    void *m, *v;          // f32 [count] (adamw_multi) or u8 codes [count] (adamw_8bit_multi: m signed, v unsigned)
    float *m_absmax;      // [relora_adam8_blocks(count)] (adamw_8bit_multi; NULL in adamw_multi)
    float *v_absmax;
    void *working;        // the narrower working copy written from param after the update, or NULL
    int64_t count;
    int64_t first_unit;
    int32_t working_dtype;  // RELORA_DTYPE_BF16 when working is set, else 0
    int32_t decay;          // 1: weight decay applies to this tensor
} relora_adam_entry;

// Device scratch that prune_magnitude, prune_moments and count_changed_codes need (histograms of the
// radix select, partial counts). Same rule: one workspace per stream.
#define RELORA_SELECT_WORKSPACE_BYTES (1 << 20)

// The quantizers' failure word (a device uint64_t): RELORA_QUANT_NO_FAILURE when every block was
// stored; otherwise (index << 2) | status for the first failing element in row-major order of the
// zero-padded matrix, where status is RELORA_QUANT_ERR_NONFINITE or RELORA_QUANT_ERR_SCALE_OVERFLOW
// (relora_quant.h) and index = row * padded_cols + col. Blocks after a failure may have been written.
#define RELORA_QUANT_NO_FAILURE UINT64_MAX

// The bytes of an NCCL unique id (ncclUniqueId, NCCL_UNIQUE_ID_BYTES).
#define RELORA_NCCL_ID_BYTES 128

// What the library was built as, for the loader's checks and the Swift side's layout test.
typedef struct relora_library_info {
    int32_t abi_version;        // RELORA_ABI_VERSION of the build
    int32_t emulated;           // 1: libreloracuda-emu.so (kernels on the CPU), 0: a CUDA build
    int32_t info_size;          // sizeof(relora_library_info) as the library sees it
    int32_t block_q8_0_size;    // sizeof(block_q8_0) etc. as the kernels' compiler lays them out
    int32_t block_q4_0_size;
    int32_t block_nf4_size;
    int32_t block_nf4_align;
    int32_t bf16_size;          // sizeof(__nv_bfloat16)
    int32_t device_properties_size;  // sizeof(relora_device_properties)
    int32_t norm_entry_size;    // sizeof(relora_norm_entry), sizeof(relora_adam_entry): the multi-tensor tables
    int32_t adam_entry_size;    // the Swift side writes and the kernels read
    char build[96];             // compiler and targets, e.g. "nvcc 13.0 sm_80,sm_86,sm_89,sm_90+PTX"
} relora_library_info;

// The calling thread's current device (set_device's; device 0 unless set), for the backend's probe, its log
// line and MFU.
typedef struct relora_device_properties {
    char name[96];              // cudaDeviceProp.name; the emulation: "relora CPU emulation"
    int64_t total_memory;       // bytes (the emulation: its configured limit)
    int32_t compute_major;      // compute capability
    int32_t compute_minor;
    int32_t multiprocessors;
    int32_t clock_khz;          // peak SM clock (0 when the runtime does not report it)
} relora_device_properties;

// X(return type, name without the relora_cuda_ prefix, parameter list)
#define RELORA_CUDA_FUNCTIONS(X)                                                                          \
    /* ---- Library and device ---- */                                                                    \
    /* must return RELORA_ABI_VERSION */                                                                  \
    X(int, abi_version, (void))                                                                           \
    /* number of usable devices (0 is not an error: *count = 0 and RELORA_OK); the emulation has one */   \
    X(int, device_count, (int *count))                                                                    \
    /* human-readable text of the calling thread's last failure */                                       \
    X(const char *, last_error, (void))                                                                   \
    X(relora_status, library_info, (relora_library_info *info))                                          \
    X(relora_status, device_properties, (relora_device_properties *props))                               \
    /* ---- Memory and streams (cudaMalloc & co.; the emulation guards every allocation) ---- */         \
    X(relora_status, malloc, (void **ptr, int64_t bytes))                                                 \
    X(relora_status, free, (void *ptr))                                                                   \
    /* pinned host memory the kernels can read and write through the same pointer (cudaHostAlloc, mapped */\
    /* and portable; unified addressing): the f32 master copies of the `master` merge policy */          \
    X(relora_status, host_alloc, (void **ptr, int64_t bytes))                                             \
    X(relora_status, host_free, (void *ptr))                                                              \
    /* kind: RELORA_MEMCPY_*; host memory must stay valid until the stream is synchronized */           \
    X(relora_status, memcpy, (void *dst, const void *src, int64_t bytes, int32_t kind, void *stream))     \
    X(relora_status, memset, (void *ptr, int32_t value, int64_t bytes, void *stream))                     \
    X(relora_status, mem_get_info, (int64_t *free_bytes, int64_t *total_bytes))                           \
    /* a stream that does not synchronize with the default (NULL) stream (cudaStreamNonBlocking): work */ \
    /* on it overlaps the default stream's, ordered only by events */                                    \
    X(relora_status, stream_create, (void **stream))                                                      \
    X(relora_status, stream_destroy, (void *stream))                                                      \
    X(relora_status, stream_synchronize, (void *stream))                                                  \
    /* an event that orders work between streams (cudaEventDisableTiming) */                              \
    X(relora_status, event_create, (void **event))                                                        \
    X(relora_status, event_destroy, (void *event))                                                        \
    /* the event completes when the work enqueued on `stream` so far has */                              \
    X(relora_status, event_record, (void *event, void *stream))                                           \
    /* work enqueued on `stream` after this call starts after `event` completed; the host does not wait */\
    X(relora_status, stream_wait_event, (void *stream, void *event))                                      \
    /* the host waits until `event` completed (cudaEventSynchronize; never recorded: returns at once); */   \
    /* kernel failure words are not read (the next stream_synchronize reports them) */                      \
    X(relora_status, event_synchronize, (void *event))                                                    \
    /* an event that keeps time (cudaEventDefault), for event_elapsed: the per-op profile's. Recorded and */\
    /* destroyed with event_record and event_destroy */                                                   \
    X(relora_status, event_create_timing, (void **event))                                                 \
    /* *milliseconds = time from `start` to `end`, two recorded timing events (cudaEventElapsedTime, ~0.5 */\
    /* us resolution), after waiting for `end` to complete. An event made by event_create (no timing) or */ \
    /* never recorded fails. The emulation: the host time between the two records (kernels run at the */   \
    /* call, so that is the work between them) */                                                           \
    X(relora_status, event_elapsed, (void *start, void *end, float *milliseconds))                        \
    /* cudaSetDevice(ordinal) for the calling process (a rank's GPU, chosen by its local rank); later  */ \
    /* device_properties describe it. The emulation has one device: ordinal 0 only */                  \
    X(relora_status, set_device, (int32_t ordinal))                                                       \
    /* ---- Quantized weights (relora_quant.h) ---- */                                                   \
    /* out[r, c] = element c of row r of `blocks` ([rows, cols], padding dropped), out_dtype F32|BF16; */ \
    /* blocks points at the first row to dequantize (rows are whole blocks, zero-padded). */             \
    X(relora_status, dequantize, (int32_t format, const void *blocks, int64_t rows, int64_t cols,         \
                                  void *out, int32_t out_dtype, void *stream))                            \
    /* blocks = quantize(src), src f32 [rows, cols], rows zero-padded; *failure as described above */   \
    /* rounding RELORA_ROUND_NEAREST: the reference quantizer; RELORA_ROUND_STOCHASTIC: */             \
    /* relora_quantize_row_*_sr, element (r, c) drawing counter r * padded_cols + c of (seed, stream_id) */\
    X(relora_status, quantize, (int32_t format, const float *src, int64_t rows, int64_t cols,             \
                                void *blocks, int32_t rounding, uint64_t seed, uint64_t stream_id,        \
                                uint64_t *failure, void *stream))                                         \
    /* out[index] (f32) = how many element codes differ between old and new blocks of one [rows, cols] */\
    /* matrix (scales not compared; padding never differs): Backend.countChangedCodes. Exact below 2^24 */\
    X(relora_status, count_changed_codes, (int32_t format, const void *old_blocks, const void *new_blocks,\
                                           int64_t rows, int64_t cols, float *out, int64_t index,         \
                                           void *workspace, void *stream))                                \
    /* ---- Fills, conversions, elementwise ---- */                                                     \
    /* dst = src for count elements, src_dtype and dst_dtype F32|BF16|F16 (narrowing: round to nearest */\
    /* even, as FloatBits on the host); equal dtypes copy the bytes */                                  \
    X(relora_status, convert, (const void *src, int32_t src_dtype, void *dst, int32_t dst_dtype,          \
                               int64_t count, void *stream))                                              \
    X(relora_status, fill, (void *x, float value, int64_t count, int32_t dtype, void *stream))            \
    /* x[i] = (2 * relora_rng_uniform(seed, stream_id, i) - 1) * bound, as CPUBackend.fillUniform */   \
    X(relora_status, fill_uniform, (void *x, int64_t count, float bound, uint64_t seed,                   \
                                    uint64_t stream_id, int32_t dtype, void *stream))                     \
    /* x[i] ~ N(0, std^2), Box-Muller from counters 2i and 2i+1, as CPUBackend.fillNormal */              \
    X(relora_status, fill_normal, (void *x, int64_t count, float std, uint64_t seed, uint64_t stream_id,   \
                                   int32_t dtype, void *stream))                                          \
    /* a[i] += alpha * b[i] for i < count; a and b each F32 or BF16 */                                   \
    X(relora_status, axpy, (float alpha, const void *b, int32_t b_dtype, void *a, int32_t a_dtype,        \
                            int64_t count, void *stream))                                                 \
    X(relora_status, scale, (void *x, float alpha, int64_t count, int32_t dtype, void *stream))           \
    /* ---- GEMM (cuBLAS cublasGemmEx, f32 compute; the emulation: OpenBLAS) ---- */                     \
    /* Row-major, as Backend.matmul: c[m,n] = alpha * s * op(a)[m,k] op(b)[k,n] + beta * c, with */      \
    /* s = *alpha_scale (a device f32 scalar) or 1 when NULL; op(a) = a^T when trans_a (a stored [k,m]),*/\
    /* op(b) = b^T when trans_b (b stored [n,k]). a and b: ab_dtype (F32: computed in f32, no TF32; */   \
    /* BF16: bf16 inputs, f32 accumulation); c: F32 or BF16 (rounded once). beta == 0 ignores c. */     \
    /* lda, ldb, ldc: each operand's row stride as stored (>= its stored row length; 0 = packed): the   */\
    /* model's padded activation rows (RowPadding), which keep cuBLAS on its aligned kernels.           */\
    X(relora_status, gemm, (int32_t trans_a, int32_t trans_b, int64_t m, int64_t n, int64_t k, float alpha,\
                            const float *alpha_scale, const void *a, const void *b, int32_t ab_dtype,     \
                            float beta, void *c, int32_t c_dtype, int64_t lda, int64_t ldb, int64_t ldc,  \
                            void *stream))                                                                \
    /* ---- Layers ---- */                                                                               \
    /* x, out, weight: dtype; rstd: f32 [rows] */                                                        \
    X(relora_status, rmsnorm_forward, (const void *x, const void *weight, void *out, float *rstd,         \
                                       int64_t rows, int64_t dim, float eps, int32_t dtype, void *stream))\
    /* accumulates dx (dtype) and dweight (f32); dout, x, weight: dtype */                               \
    X(relora_status, rmsnorm_backward, (const void *dout, const void *x, const void *weight,              \
                                        const float *rstd, void *dx, float *dweight, int64_t rows,        \
                                        int64_t dim, int32_t dtype, void *stream))                        \
    X(relora_status, swiglu_forward, (const void *gate, const void *up, void *out, int64_t count,         \
                                      int32_t dtype, void *stream))                                       \
    /* overwrites dgate and dup */                                                                        \
    X(relora_status, swiglu_backward, (const void *dout, const void *gate, const void *up, void *dgate,   \
                                       void *dup, int64_t count, int32_t dtype, void *stream))            \
    /* out[n] = table[ids[n]] (dtype); ids outside [0, vocab) give zero rows */                          \
    X(relora_status, embedding_forward, (const int32_t *ids, const void *table, void *out, int64_t tokens,\
                                         int64_t dim, int64_t vocab, int32_t dtype, void *stream))        \
    /* accumulates dtable[ids[n]] += dout[n] (dtable f32, dout dtype) in token order, the CPU's additions */\
    /* (a stable sort of the tokens by id, then one owner per id: deterministic, no atomics); ids outside */\
    /* [0, vocab) are skipped. workspace: embedding_backward_workspace_bytes(tokens) bytes of device */   \
    /* memory (one per stream) */                                                                         \
    X(relora_status, embedding_backward, (const int32_t *ids, const void *dout, float *dtable,            \
                                          int64_t tokens, int64_t dim, int64_t vocab, int32_t dtype,      \
                                          void *workspace, void *stream))                                 \
    /* the scratch embedding_backward needs for `tokens` ids (0 for none; grows linearly: ~20 bytes a */  \
    /* token) */                                                                                          \
    X(int64_t, embedding_backward_workspace_bytes, (int64_t tokens))                                      \
    /* Rotary embedding in place, Hugging Face's rotate-half convention (x: [batch * seq_len, heads *   */\
    /* head_dim]; inverse: the transposed rotation = the backward). table: f32 [2, seq_len, head_dim/2], */\
    /* device memory: the cos then the sin of every (position, pair) angle, CPUBackend.ropeTables' values */\
    /* (the caller builds it once per (seq_len, head_dim, theta): RoPETables in ReLoRACore) */         \
    X(relora_status, rope, (void *x, const float *table, int64_t batch, int64_t seq_len, int64_t heads,   \
                            int64_t head_dim, int32_t inverse, int32_t dtype, void *stream))              \
    /* The forward rotation of `rows` consecutive positions: row r of x [rows, heads * head_dim] at     */\
    /* position `position + r` (the decode step of a KV cache). table: the rope table of table_len        */\
    /* positions (f32 [2, table_len, head_dim/2]; position + rows <= table_len). Row r's result is bit    */\
    /* for bit the `rope` entry's result for a row at that position.                                      */\
    X(relora_status, rope_at, (void *x, const float *table, int64_t table_len, int64_t position,         \
                               int64_t rows, int64_t heads, int64_t head_dim, int32_t dtype, void *stream))\
    /* One query row at `position` over a KV cache: q, out [heads * head_dim]; k_cache, v_cache          */\
    /* [capacity, kv_heads * head_dim] (dtype), rows 0 ..= position read (the new key at `position`      */\
    /* already written). Grouped-query heads and scale as attention_forward; head_dim in [1, 128]. */   \
    X(relora_status, attention_decode, (const void *q, const void *k_cache, const void *v_cache, void *out,\
                                        int64_t position, int64_t heads, int64_t kv_heads, int64_t head_dim,\
                                        int32_t dtype, void *stream))                                       \
    /* Causal grouped-query attention, scale 1/sqrt(head_dim): q, out [N, heads*head_dim], k, v */       \
    /* [N, kv_heads*head_dim] (dtype); lse f32 [batch, heads, seq_len] saved for the backward; */        \
    /* head_dim in [1, 128] and heads % kv_heads == 0, else RELORA_ERR_INVALID_ARGUMENT */               \
    X(relora_status, attention_forward, (const void *q, const void *k, const void *v, void *out,          \
                                         float *lse, int64_t batch, int64_t seq_len, int64_t heads,       \
                                         int64_t kv_heads, int64_t head_dim, int32_t dtype, void *stream))\
    /* overwrites dq, dk, dv (dk, dv sum over the query heads of a group, in a fixed order) */           \
    X(relora_status, attention_backward, (const void *dout, const void *q, const void *k, const void *v,  \
                                          const void *out, const float *lse, void *dq, void *dk, void *dv,\
                                          int64_t batch, int64_t seq_len, int64_t heads, int64_t kv_heads,\
                                          int64_t head_dim, int32_t dtype, void *stream))                 \
    /* Fused softmax cross-entropy over logits [rows, vocab] (dtype), targets i32 [rows]: losses f32 */  \
    /* [rows] (0 where target < 0); with_grad: logits = grad_scale * (softmax - onehot) (zero rows */   \
    /* where target < 0). A target >= vocab is RELORA_ERR_INVALID_ARGUMENT at the next synchronize */    \
    /* (of any stream; reported once, naming the lowest such row), and that row's loss and gradient */    \
    /* row are NaN. ld: the row stride of logits (>= vocab, 0 = vocab); padding is not touched. */      \
    X(relora_status, cross_entropy, (void *logits, const int32_t *targets, float *losses, int64_t rows,   \
                                     int64_t vocab, int64_t ld, int32_t with_grad, float grad_scale,      \
                                     int32_t dtype, void *stream))                                        \
    /* inverted dropout, mask from relora_rng_uniform(seed, stream_id, i) >= p; out may equal x. The    */\
    /* count elements are rows of cols stored ld apart (0, 0: packed); element i (row i / cols, column  */\
    /* i % cols) draws counter i, so a padded matrix gets the packed one's mask; padding is untouched.  */\
    X(relora_status, dropout, (const void *x, void *out, int64_t count, int64_t cols, int64_t ld, float p,\
                               uint64_t seed, uint64_t stream_id, int32_t dtype, void *stream))           \
    /* ---- Optimizer and reductions ---- */                                                            \
    /* AdamW on f32 param/grad/m/v (PyTorch semantics, 1-based step); writes param_bf16 (NULL: none) */   \
    X(relora_status, adamw, (float *param, const float *grad, float *m, float *v, void *param_bf16,       \
                             int64_t count, float lr, float beta1, float beta2, float eps,                \
                             float weight_decay, int64_t step, void *stream))                             \
    /* AdamW with blockwise 8-bit moments (relora_adam8.h, relora_adamw8_block per block of 256): param, \
       grad f32 [count]; m_codes, v_codes [count]; m_absmax, v_absmax [ceil(count / 256)]; maps: the     \
       512 floats of relora_adam8_build_maps, on the device. Bit-exact with the host reference. */        \
    X(relora_status, adamw_8bit, (float *param, const float *grad, uint8_t *m_codes, float *m_absmax,     \
                                  uint8_t *v_codes, float *v_absmax, const float *maps, int64_t count,    \
                                  float lr, float beta1, float beta2, float eps, float weight_decay,      \
                                  int64_t step, void *stream))                                            \
    /* out[i] = map[codes[i]] * absmax[i / 256], map = maps (is_signed) or maps + 256 (f32 out) */       \
    X(relora_status, dequantize_8bit, (const uint8_t *codes, const float *absmax, const float *maps,      \
                                       int32_t is_signed, int64_t count, float *out, void *stream))       \
    /* relora_adam8_quantize_block for every block of the f32 x: codes [count], absmax [ceil(count/256)] */\
    X(relora_status, quantize_8bit, (const float *x, const float *maps, int32_t is_signed, int64_t count,  \
                                     uint8_t *codes, float *absmax, void *stream))                        \
    /* out[index] = sum x[i]^2 (f32 out, summed in double) */                                            \
    X(relora_status, sum_of_squares, (const void *x, int64_t count, int32_t dtype, float *out,            \
                                      int64_t index, void *workspace, void *stream))                      \
    /* out[0] += sum a[i] * b[i] (summed in double) */                                                   \
    X(relora_status, dot_accumulate, (const void *a, const void *b, int64_t count, int32_t dtype,         \
                                      float *out, void *workspace, void *stream))                         \
    /* ---- Multi-tensor optimizer ops: one call for every trained tensor (tables above, in device */     \
    /* memory). gradient_norm: squares[e] = sum of squares of entry e (f32, exactly sum_of_squares' */       \
    /* value: the same blocks, the same order); *norm = sqrt of the sum over e in entry order of */          \
    /* (double)squares[e] (double, the CPU's `sumOfSquares([Tensor])`); *clip_factor = (float)(clip / */     \
    /* norm) if clip > 0 and norm > clip, else 1. partials: total_units doubles; norm, clip_factor, */       \
    /* squares: device memory (the caller reads *norm back: one scalar a step). */                           \
    X(relora_status, gradient_norm, (const relora_norm_entry *entries, int64_t tensors, int64_t total_units,\
                                     double *partials, float *squares, double clip, double *norm,         \
                                     float *clip_factor, void *stream))                                   \
    /* zeroes every entry's x[count] (+0.0 in its dtype, memset's bits) in one launch: unit u of entry e */ \
    /* zeroes the elements gradient_norm's unit u reads (Backend.zeroGradients: every gradient of a group) */\
    X(relora_status, zero_multi, (const relora_norm_entry *entries, int64_t tensors, int64_t total_units,  \
                                  void *stream))                                                          \
    /* adamw on every entry (f32 moments): grad *= *clip_factor (stored; NULL or 1: untouched), then */     \
    /* the adamw update (weight decay where entry.decay), then working = bf16(param) where set. */           \
    /* Bit-exact with scale, adamw and convert per tensor. */                                                \
    X(relora_status, adamw_multi, (const relora_adam_entry *entries, int64_t tensors, int64_t total_units,  \
                                   const float *clip_factor, float lr, float beta1, float beta2, float eps,\
                                   float weight_decay, int64_t step, void *stream))                       \
    /* the same with 8-bit moments: adamw_8bit's update per absmax block (maps as there) */                 \
    X(relora_status, adamw_8bit_multi, (const relora_adam_entry *entries, int64_t tensors,                \
                                        int64_t total_units, const float *clip_factor, const float *maps, \
                                        float lr, float beta1, float beta2, float eps, float weight_decay,\
                                        int64_t step, void *stream))                                      \
    /* ---- Optimizer-state pruning (ReLoRA's reset; Backend.prune / pruneMoments). These synchronize */\
    /* `stream` and write the number of zeroed entries to the HOST int64 *zeroed. ---- */               \
    /* zeroes x[i] where |x[i]| <= the k-th smallest |x| (k >= 1, exact radix select over the bits) */   \
    X(relora_status, prune_magnitude, (void *x, int64_t count, int32_t dtype, int64_t k, void *workspace, \
                                       int64_t *zeroed, void *stream))                                    \
    /* zeroes x[i] where (double)relora_rng_uniform(seed, stream_id, i) < probability */                 \
    X(relora_status, prune_random, (void *x, int64_t count, int32_t dtype, double probability,            \
                                    uint64_t seed, uint64_t stream_id, int64_t *zeroed, void *stream))    \
    /* zeroes m[i] and v[i] where score |m|/(sqrt(v)+eps) (IEEE f32 ops) <= the k-th smallest score */   \
    X(relora_status, prune_moments, (float *m, float *v, int64_t count, int64_t k, float eps,             \
                                     void *workspace, int64_t *zeroed, void *stream))                     \
    /* ---- Collectives over NCCL (data-parallel training). NCCL is opened with dlopen on first use   */ \
    /* ($RELORA_NCCL_LIB, else libnccl.so.2): the library loads and every other entry works on a     */ \
    /* machine without NCCL, and these fail with RELORA_ERR_UNAVAILABLE and one sentence. The        */ \
    /* emulation implements them over TCP between the processes (loopback or the NCCL_COMM_ID host), */ \
    /* with NCCL's semantics for the id. `comm` is an opaque communicator; the data entries enqueue on */ \
    /* `stream` and return; nccl_wait waits for them. Buffers are device memory, counted in bytes. */    \
    /* Any failure (a peer that died, a timeout) aborts the communicator: later calls on it fail. ---- */\
    /* NCCL's version code (NCCL_VERSION_CODE of the loaded library, e.g. 22703) */                     \
    X(relora_status, nccl_version, (int32_t *version))                                                    \
    /* ncclGetUniqueId into id[RELORA_NCCL_ID_BYTES]: called by rank 0, sent to the others (over MPI). */ \
    /* With NCCL_COMM_ID=host:port set, every rank may call it and gets the same id (the address) */    \
    X(relora_status, nccl_unique_id, (uint8_t *id))                                                       \
    /* ncclCommInitRank on the current device. timeout_seconds (> 0) bounds the initialisation and   */ \
    /* every nccl_wait on this communicator */                                                           \
    X(relora_status, nccl_init, (void **comm, const uint8_t *id, int32_t nranks, int32_t rank,            \
                                 double timeout_seconds))                                                 \
    /* every rank's `bytes` bytes, in rank order, into receive (nranks * bytes) */                       \
    X(relora_status, nccl_all_gather, (void *comm, const void *send, void *receive, int64_t bytes,        \
                                       void *stream))                                                     \
    /* send: nranks blocks of block_bytes, block s for rank s; receive: block q from rank q (grouped */   \
    /* ncclSend/ncclRecv) */                                                                              \
    X(relora_status, nccl_all_to_all, (void *comm, const void *send, void *receive, int64_t block_bytes,  \
                                       void *stream))                                                     \
    /* root's bytes into buffer on every rank */                                                          \
    X(relora_status, nccl_broadcast, (void *comm, void *buffer, int64_t bytes, int32_t root, void *stream))\
    /* waits until `stream` has finished, polling NCCL's asynchronous error; on an error or after the */  \
    /* communicator's timeout: aborts it and returns RELORA_ERR_COMMUNICATION naming what happened */    \
    X(relora_status, nccl_wait, (void *comm, void *stream))                                               \
    /* ncclCommAbort: ends this rank's part at once (peers see their collectives fail); frees comm */     \
    X(relora_status, nccl_abort, (void *comm))                                                            \
    /* ncclCommDestroy after every rank's last collective (a normal end); frees comm */                   \
    X(relora_status, nccl_destroy, (void *comm))

// ---- Prototypes, for the kernel library only ------------------------------------------------------
#if defined(RELORA_CUDA_LIBRARY)
#define RELORA_CUDA_DECLARE(ret, name, params) __attribute__((visibility("default"))) ret relora_cuda_##name params;
RELORA_CUDA_FUNCTIONS(RELORA_CUDA_DECLARE)
#undef RELORA_CUDA_DECLARE
#endif

// ---- Loader (implemented in loader.c, always available, CUDA or not) ---------------------------
#define RELORA_CUDA_MEMBER(ret, name, params) ret (*name) params;
typedef struct relora_cuda_api {
    void *handle;  // dlopen handle
    RELORA_CUDA_FUNCTIONS(RELORA_CUDA_MEMBER)
} relora_cuda_api;
#undef RELORA_CUDA_MEMBER

// Opens `path` with dlopen and resolves every entry point above into *api.
// Returns 0 on success; otherwise writes one sentence into errbuf (if non-NULL) and returns non-zero:
// 1 = the file could not be opened, 2 = a symbol is missing, 3 = ABI version mismatch.
int relora_cuda_load(const char *path, relora_cuda_api *api, char *errbuf, size_t errbuf_len);
void relora_cuda_unload(relora_cuda_api *api);

#ifdef __cplusplus
}
#endif
#endif  // RELORA_ABI_H
