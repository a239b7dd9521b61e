// Causal grouped-query attention on tensor cores: bf16 storage, head_dim 64 or 128 (attention.cu sends
// every other call to its f32 CUDA-core kernels). Layouts and contracts are the ABI entries' (attention.cu):
// q, out, dq [batch * seq, heads * D]; k, v, dk, dv [batch * seq, kv_heads * D]; lse f32 [batch, heads, seq].
//
// Design (FlashAttention-2's decomposition; warp-level mma.sync m16n8k16 bf16 -> f32 through relora_mma.cuh,
// which the CPU emulation implements with the PTX ISA's fragment layouts):
// - Every CTA has 4 warps, and every warp owns WM strips of 16 rows of the left operand (query rows in the
//   forward and dQ, key rows in dK/dV), so no reduction ever crosses warps; a B fragment loaded from shared
//   memory feeds the WM strips (WM = 2 halves the ldmatrix traffic per mma, at twice the accumulators).
//   Tiles of q, k, v, dO stream from global to shared memory with cp.async (16-byte chunks, rows past seq
//   zero-filled), double-buffered: the next tile loads while the current one is multiplied, one barrier per
//   tile. Shared rows are D + 8 bf16 long (a 16-byte skew per row), so the 8 row addresses of every ldmatrix
//   fall in distinct bank groups.
// - Products take bf16 operands and accumulate in f32. P (forward, dK/dV) and dS (dQ, dK/dV) are rounded to
//   bf16 for the second product of each pair, straight from the accumulators of the first (a_from_c): they
//   never touch shared memory. No [T, T] matrix exists; exponentials are exp2f of a pre-scaled score (one
//   fmaf: s * scale * log2(e) - m * scale * log2(e)).
// - Forward (attention_forward_mma_kernel<D, BC, WM>): CTA per (batch, head, 64 WM query rows); Q fragments
//   stay in registers; key tiles of BC keys; online softmax in the accumulator layout (each lane holds 2 rows
//   per strip, a row's 4 lanes combine maxima with two xor shuffles; the row sum l stays per lane until the
//   end); causal: key tiles past the last query are never loaded, and only tiles that cross the warp's
//   diagonal are masked. out = o / l rounded to bf16 (staged through shared memory for 16-byte stores),
//   lse = m scale + log l.
// - Backward, deterministic without atomics: every output element is owned by one lane of one CTA and summed
//   in a fixed order; D_i = dO_i . O_i is recomputed by each kernel from dO (shared) and O (global) with a
//   fixed butterfly (row_dots), so the call needs no workspace.
//   * dK/dV (attention_backward_dkv_mma_kernel<D, BR, WM>): CTA per (batch, kv head, 64 WM keys), K and V
//     tiles resident; the group's query heads in order and, for each, the query tiles of BR rows from the
//     diagonal on, in order. Per tile, warp w computes S^T = K_w Q^T and dP^T = V_w dO^T (its keys x BR
//     queries), P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - D), then dV_w += P^T dO and dK_w += dS^T Q.
//   * dQ (attention_backward_dq_mma_kernel<D, BC, WM>): CTA per (batch, head, 64 WM query rows), Q and dO
//     fragments in registers; per key tile S = Q K^T, dP = dO V^T, dS = P (dP - D), dQ += dS K.
//   S and dP are computed twice (once per kernel): 7 tile products instead of FlashAttention-2's 5, the
//   price of a deterministic dQ without atomics or a [T/BC, T, D] workspace.
// - Tiles (Kernels/README.md has ptxas' registers and a roofline estimate per kernel):
//     head_dim 64:  forward BC 64, WM 2 (128 query rows, 36 KiB shared); dQ BC 32, WM 2 (19 KiB);
//                   dK/dV BR 32, WM 2 (128 keys, 54.3 KiB, opted in with cudaFuncSetAttribute)
//     head_dim 128: forward BC 32, WM 1 (34 KiB); dQ BC 32, WM 1 (34.5 KiB); dK/dV BR 32, WM 1 (68.3 KiB,
//                   opted in); WM 2 would not fit the 255 registers of a thread beside the accumulators.
// Schedules: query tiles in reverse (the longest rows first) and key tiles in order (the keys that see the
// most queries first), so the causal triangle's long CTAs start in the first wave.
#include <stdlib.h>
#include <string.h>

#include "attention.cuh"
#include "relora_mma.cuh"

namespace relora {
namespace attention {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16 * kWarps;  // left-operand rows per CTA (queries, or keys in dK/dV) per 16-row strip a warp owns
constexpr float kLog2e = 1.4426950408889634f;

// Shared tiles: D bf16 per row plus a 16-byte skew.
template <int D>
__host__ __device__ constexpr int pitch() { return D + 8; }

// Rows [first, first + ROWS) of one head (row r at src + r * stride, D contiguous bf16; src is row 0) into
// dst[ROWS][D + 8] with cp.async; rows at or past seq are zero-filled.
template <int ROWS, int D>
__device__ __forceinline__ void load_rows_async(bf16 *dst, const bf16 *src, int64_t stride, int64_t first, int64_t seq) {
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
    for (int c = (int)threadIdx.x; c < ROWS * kChunks; c += kThreads) {
        const int r = c / kChunks, part = c % kChunks;
        const bool valid = first + r < seq;
        cp_async_16(dst + r * pitch<D>() + part * 8, src + (valid ? (first + r) * stride : 0) + part * 8, valid);
    }
}

// The A fragments of rows row0 .. row0 + 15, all K columns, of a shared tile (ldmatrix x4: lanes 0-15 give
// rows 0-15 at column 0, lanes 16-31 the same rows at column 8, matching a[0..3]).
template <int K, int P>
__device__ __forceinline__ void load_a_strip(uint32_t (&a)[K / 16][4], const bf16 *tile, int row0, int lane) {
    RELORA_UNROLL
    for (int kk = 0; kk < K / 16; ++kk) ldmatrix_x4(a[kk], tile + (row0 + (lane & 15)) * P + kk * 16 + (lane >> 4) * 8);
}

// c[a] += A_a B^T for WM 16-row strips: A as fragments in registers (16 x K each), B^T's N rows of K columns a
// shared tile from row 0 (stored n-major: K of S = Q K^T, V of dP = dO V^T). One ldmatrix x4 gives the B
// fragments of two n-tiles (lanes 0-7 rows n 0-7 at k 0, 8-15 the same at k 8, 16-23 rows 8-15 at k 0, 24-31 at
// k 8), and each serves the WM strips.
template <int WM, int K, int N, int P>
__device__ __forceinline__ void mma_rbt(float (&c)[WM][N / 8][4], const uint32_t (&a)[WM][K / 16][4], const bf16 *b,
                                        int lane) {
    RELORA_UNROLL
    for (int kk = 0; kk < K / 16; ++kk) {
        RELORA_UNROLL
        for (int nn = 0; nn < N / 16; ++nn) {
            uint32_t f[4];
            ldmatrix_x4(f, b + (nn * 16 + (lane & 7) + (lane >> 4) * 8) * P + kk * 16 + ((lane >> 3) & 1) * 8);
            RELORA_UNROLL
            for (int m = 0; m < WM; ++m) {
                mma_bf16_m16n8k16(c[m][2 * nn], a[m][kk], f[0], f[1]);
                mma_bf16_m16n8k16(c[m][2 * nn + 1], a[m][kk], f[2], f[3]);
            }
        }
    }
}

// The same with A read from a shared tile (WM strips from row row0) one k slice at a time: S^T = K Q^T and
// dP^T = V dO^T in dK/dV, whose K and V strips would not fit in registers beside the dK, dV accumulators.
template <int WM, int K, int N, int P>
__device__ __forceinline__ void mma_sbt(float (&c)[WM][N / 8][4], const bf16 *a_tile, int row0, const bf16 *b, int lane) {
    RELORA_UNROLL
    for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t a[WM][4];
        RELORA_UNROLL
        for (int m = 0; m < WM; ++m) ldmatrix_x4(a[m], a_tile + (row0 + 16 * m + (lane & 15)) * P + kk * 16 + (lane >> 4) * 8);
        RELORA_UNROLL
        for (int nn = 0; nn < N / 16; ++nn) {
            uint32_t f[4];
            ldmatrix_x4(f, b + (nn * 16 + (lane & 7) + (lane >> 4) * 8) * P + kk * 16 + ((lane >> 3) & 1) * 8);
            RELORA_UNROLL
            for (int m = 0; m < WM; ++m) {
                mma_bf16_m16n8k16(c[m][2 * nn], a[m], f[0], f[1]);
                mma_bf16_m16n8k16(c[m][2 * nn + 1], a[m], f[2], f[3]);
            }
        }
    }
}

// c[a] += A_a B for WM 16-row strips: A as fragments in registers (16 x K: P or dS from a_from_c), B a shared
// tile of K rows and N columns stored k-major (V, K, dO, Q as they lie in memory), read transposed: ldmatrix
// x4 .trans with lanes 0-7 giving rows k 0-7 at n 0, 8-15 rows k 8-15 at n 0, 16-31 the same at n 8.
template <int WM, int K, int N, int P>
__device__ __forceinline__ void mma_rb(float (&c)[WM][N / 8][4], const uint32_t (&a)[WM][K / 16][4], const bf16 *b,
                                       int lane) {
    RELORA_UNROLL
    for (int kk = 0; kk < K / 16; ++kk) {
        RELORA_UNROLL
        for (int nn = 0; nn < N / 16; ++nn) {
            uint32_t f[4];
            ldmatrix_x4_trans(f, b + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * P + nn * 16 + (lane >> 4) * 8);
            RELORA_UNROLL
            for (int m = 0; m < WM; ++m) {
                mma_bf16_m16n8k16(c[m][2 * nn], a[m][kk], f[0], f[1]);
                mma_bf16_m16n8k16(c[m][2 * nn + 1], a[m][kk], f[2], f[3]);
            }
        }
    }
}

template <int N8>
__device__ __forceinline__ void zero(float (&c)[N8][4]) {
    RELORA_UNROLL
    for (int n = 0; n < N8; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
}

// Ds[r] = dO_r . O_r in f32 for the ROWS query rows from q0 (0 for rows at or past seq): dO from a shared tile,
// O from global memory. A row's D / 8 chunks of 8 columns lie on as many consecutive lanes; each lane sums its
// chunk in column order with __fmaf_rn, then a butterfly adds the lanes (every lane gets the same bits), so
// both backward kernels compute the same D_i.
template <int ROWS, int D>
__device__ __forceinline__ void row_dots(float *Ds, const bf16 *dOs, const bf16 *o, int64_t stride, int64_t q0,
                                         int64_t seq) {
    constexpr int kLanes = D / 8, kRowsPerPass = kThreads / kLanes;
    static_assert(32 % kLanes == 0 && ROWS % kRowsPerPass == 0, "a row's lanes lie in one warp; whole passes");
    const int part = (int)threadIdx.x % kLanes;
    for (int r0 = 0; r0 < ROWS; r0 += kRowsPerPass) {
        const int r = r0 + (int)threadIdx.x / kLanes;
        float sum = 0.0f;
        if (q0 + r < seq) {
            float a[8], b[8];
            load_bf16x8(a, dOs + r * pitch<D>() + part * 8);
            load_bf16x8(b, o + (q0 + r) * stride + part * 8);
            RELORA_UNROLL
            for (int i = 0; i < 8; ++i) sum = __fmaf_rn(a[i], b[i], sum);
        }
        RELORA_UNROLL
        for (int offset = kLanes / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (part == 0) Ds[r] = sum;
    }
}

// Writes a warp's 16 x D accumulator strip (rows row0 .. row0 + 15 of a shared tile), times `factor[r]` for
// the lane's rows g (r = 0) and g + 8 (r = 1), rounded to bf16.
template <int D>
__device__ __forceinline__ void stage_strip(bf16 *tile, int row0, const float (&acc)[D / 8][4], const float (&factor)[2],
                                            int lane) {
    const int g = lane >> 2, t = lane & 3;
    RELORA_UNROLL
    for (int n = 0; n < D / 8; ++n) {
        RELORA_UNROLL
        for (int r = 0; r < 2; ++r) {
            store_b32(tile + (row0 + g + 8 * r) * pitch<D>() + n * 8 + 2 * t,
                      pack_bf16x2(acc[n][2 * r] * factor[r], acc[n][2 * r + 1] * factor[r]));
        }
    }
}

// Copies rows [0, ROWS) of a shared tile to rows first .. of one head in global memory (16-byte stores), rows
// at or past seq skipped.
template <int ROWS, int D>
__device__ __forceinline__ void store_rows(bf16 *dst, int64_t stride, int64_t first, int64_t seq, const bf16 *tile) {
    constexpr int kChunks = D / 8;
    for (int c = (int)threadIdx.x; c < ROWS * kChunks; c += kThreads) {
        const int r = c / kChunks, part = c % kChunks;
        if (first + r < seq) copy16(dst + (first + r) * stride + part * 8, tile + r * pitch<D>() + part * 8);
    }
}

// ---- Forward ---------------------------------------------------------------------------------------------
// WM 16-row strips per warp (64 WM query rows per CTA): every B fragment a warp loads (K for S, V for P.V)
// serves WM mma's, so WM = 2 halves the shared-memory traffic per mma, at WM times the accumulators.
// Shared memory: two stages of [2 BC][D + 8] (key tile j: K in rows 0..BC-1 and V in rows BC..2BC-1 of stage
// j % 2). The query tile is staged once in stage 1 and the output in stage 0 (2 BC >= 64 WM rows).
template <int D, int BC>
constexpr size_t forward_smem() { return 2 * (size_t)(2 * BC) * pitch<D>() * sizeof(bf16); }

template <int D, int BC, int WM>
__global__ void __launch_bounds__(kThreads)
    attention_forward_mma_kernel(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, float *lse, Shape sh) {
    constexpr int P = pitch<D>(), N8 = BC / 8, D8 = D / 8, WR = 16 * WM, R = kWarps * WR;
    static_assert(2 * BC >= R && BC % 16 == 0 && D % 16 == 0, "tile shapes");
    RELORA_DYNAMIC_SHARED(bf16, smem);
    auto stage = [&](int s) { return smem + s * (2 * BC) * P; };
    const int lane = (int)(threadIdx.x & 31u), warp = (int)(threadIdx.x >> 5), g = lane >> 2, t = lane & 3;
    const float scale_log2 = sh.scale * kLog2e;
    const int64_t T_ = sh.seq, qstride = sh.heads * D, kstride = sh.kv_heads * D;
    const int64_t q_tiles = (T_ + R - 1) / R, heads = sh.batch * sh.heads;
    for (int64_t tile = blockIdx.x; tile < heads * q_tiles; tile += gridDim.x) {
        const int64_t qt = q_tiles - 1 - tile / heads, bh = tile % heads, h = bh % sh.heads, b = bh / sh.heads;
        const int64_t q0 = qt * R, w0 = q0 + warp * WR;  // the CTA's and this warp's first query
        const bf16 *qh = q + b * T_ * qstride + h * D;
        const bf16 *kh = k + b * T_ * kstride + h / sh.group * D, *vh = v + b * T_ * kstride + h / sh.group * D;
        // Key tiles up to the last valid query of the tile (rows past seq are computed on zeros and dropped).
        const int tiles = (int)(((q0 + R < T_ ? q0 + R : T_) - 1) / BC + 1);
        __syncthreads();  // the previous tile's output copy is done with stage 0
        load_rows_async<R, D>(stage(1), qh, qstride, q0, T_);
        load_rows_async<BC, D>(stage(0), kh, kstride, 0, T_);
        load_rows_async<BC, D>(stage(0) + BC * P, vh, kstride, 0, T_);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        uint32_t qf[WM][D / 16][4];
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) load_a_strip<D, P>(qf[a], stage(1), warp * WR + 16 * a, lane);
        float o[WM][D8][4], m[WM][2], l[WM][2];
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) {
            zero(o[a]);
            m[a][0] = m[a][1] = -INFINITY;
            l[a][0] = l[a][1] = 0.0f;
        }
        for (int j = 0; j < tiles; ++j) {
            if (j > 0) cp_async_wait<0>();
            __syncthreads();  // tile j landed for every thread; every warp is done with tile j - 1 (and Q)
            if (j + 1 < tiles) {
                bf16 *next = stage((j + 1) & 1);
                load_rows_async<BC, D>(next, kh, kstride, (int64_t)(j + 1) * BC, T_);
                load_rows_async<BC, D>(next + BC * P, vh, kstride, (int64_t)(j + 1) * BC, T_);
                cp_async_commit();
            }
            const bf16 *Ks = stage(j & 1), *Vs = Ks + BC * P;
            float s[WM][N8][4];
            RELORA_UNROLL
            for (int a = 0; a < WM; ++a) zero(s[a]);
            mma_rbt<WM, D, BC, P>(s, qf, Ks, lane);
            const int64_t k0 = (int64_t)j * BC;
            if (k0 + BC > w0) {  // the tile crosses this warp's diagonal: mask keys after the query
                RELORA_UNROLL
                for (int a = 0; a < WM; ++a) {
                    RELORA_UNROLL
                    for (int n = 0; n < N8; ++n) {
                        RELORA_UNROLL
                        for (int i = 0; i < 4; ++i) {
                            if (k0 + n * 8 + 2 * t + (i & 1) > w0 + 16 * a + g + 8 * (i >> 1)) s[a][n][i] = -INFINITY;
                        }
                    }
                }
            }
            // Online softmax. Every row sees key 0 in the first tile, so its maximum is finite from then on:
            // alpha = 0 on the first tile, and a later tile that masks the whole row (the diagonal's far side
            // when BC < 16 WM) leaves m and l as they were (alpha = 1, p = 0).
            RELORA_UNROLL
            for (int a = 0; a < WM; ++a) {
                RELORA_UNROLL
                for (int r = 0; r < 2; ++r) {
                    float mx = m[a][r];
                    RELORA_UNROLL
                    for (int n = 0; n < N8; ++n) mx = fmaxf(mx, fmaxf(s[a][n][2 * r], s[a][n][2 * r + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float alpha = exp2f((m[a][r] - mx) * scale_log2), shift = mx * scale_log2;
                    m[a][r] = mx;
                    float sum = 0.0f;
                    RELORA_UNROLL
                    for (int n = 0; n < N8; ++n) {
                        RELORA_UNROLL
                        for (int e = 0; e < 2; ++e) {
                            const float p = exp2f(fmaf(s[a][n][2 * r + e], scale_log2, -shift));  // 0 where masked
                            s[a][n][2 * r + e] = p;
                            sum += p;
                        }
                    }
                    l[a][r] = l[a][r] * alpha + sum;
                    RELORA_UNROLL
                    for (int n = 0; n < D8; ++n) {
                        o[a][n][2 * r] *= alpha;
                        o[a][n][2 * r + 1] *= alpha;
                    }
                }
            }
            uint32_t pf[WM][BC / 16][4];
            RELORA_UNROLL
            for (int a = 0; a < WM; ++a) a_from_c<N8>(pf[a], s[a]);
            mma_rb<WM, BC, D, P>(o, pf, Vs, lane);
        }
        __syncthreads();  // every warp is done with the last tile's stage
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) {
            float inv[2];
            RELORA_UNROLL
            for (int r = 0; r < 2; ++r) {
                l[a][r] += __shfl_xor_sync(0xffffffffu, l[a][r], 1);
                l[a][r] += __shfl_xor_sync(0xffffffffu, l[a][r], 2);
                inv[r] = 1.0f / l[a][r];
                const int64_t row = w0 + 16 * a + g + 8 * r;
                if (t == 0 && row < T_) lse[(b * sh.heads + h) * T_ + row] = m[a][r] * sh.scale + logf(l[a][r]);
            }
            stage_strip<D>(stage(0), warp * WR + 16 * a, o[a], inv, lane);
        }
        __syncthreads();
        store_rows<R, D>(out + b * T_ * qstride + h * D, qstride, q0, T_, stage(0));
    }
}

// ---- Backward: dQ ----------------------------------------------------------------------------------------
// WM 16-row strips per warp (64 WM query rows per CTA), as the forward. Shared memory: two stages of
// [2 BC][D + 8] (K and V of key tile j in stage j % 2; Q, then dO, staged once across both stages, and dQ's
// output in them at the end: 4 BC >= 64 WM rows), then lse * log2(e) and D_i of the CTA's query rows.
template <int D, int BC, int WM>
constexpr size_t dq_smem() { return forward_smem<D, BC>() + 2 * (size_t)(kRows * WM) * sizeof(float); }

template <int D, int BC, int WM>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dq_mma_kernel(const bf16 *dout, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *out,
                                     const float *lse, bf16 *dq, Shape sh) {
    constexpr int P = pitch<D>(), N8 = BC / 8, D8 = D / 8, WR = 16 * WM, R = kWarps * WR;
    static_assert(4 * BC >= R && BC % 16 == 0 && D % 16 == 0, "tile shapes");
    RELORA_DYNAMIC_SHARED(bf16, smem);
    auto stage = [&](int s) { return smem + s * (2 * BC) * P; };
    float *Ls = reinterpret_cast<float *>(smem + 2 * (2 * BC) * P), *Ds = Ls + R;
    const int lane = (int)(threadIdx.x & 31u), warp = (int)(threadIdx.x >> 5), g = lane >> 2, t = lane & 3;
    const float scale_log2 = sh.scale * kLog2e;
    const int64_t T_ = sh.seq, qstride = sh.heads * D, kstride = sh.kv_heads * D;
    const int64_t q_tiles = (T_ + R - 1) / R, heads = sh.batch * sh.heads;
    for (int64_t tile = blockIdx.x; tile < heads * q_tiles; tile += gridDim.x) {
        const int64_t qt = q_tiles - 1 - tile / heads, bh = tile % heads, h = bh % sh.heads, b = bh / sh.heads;
        const int64_t q0 = qt * R, w0 = q0 + warp * WR, qoff = b * T_ * qstride + h * D;
        const bf16 *kh = k + b * T_ * kstride + h / sh.group * D, *vh = v + b * T_ * kstride + h / sh.group * D;
        const int tiles = (int)(((q0 + R < T_ ? q0 + R : T_) - 1) / BC + 1);
        uint32_t qf[WM][D / 16][4], dof[WM][D / 16][4];
        __syncthreads();  // the previous tile's output copy is done with the stages
        load_rows_async<R, D>(stage(0), q + qoff, qstride, q0, T_);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) load_a_strip<D, P>(qf[a], stage(0), warp * WR + 16 * a, lane);
        __syncthreads();  // every warp has its Q fragments
        load_rows_async<R, D>(stage(0), dout + qoff, qstride, q0, T_);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        row_dots<R, D>(Ds, stage(0), out + qoff, qstride, q0, T_);
        for (int r = (int)threadIdx.x; r < R; r += kThreads) {
            Ls[r] = q0 + r < T_ ? lse[(b * sh.heads + h) * T_ + q0 + r] * kLog2e : 0.0f;
        }
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) load_a_strip<D, P>(dof[a], stage(0), warp * WR + 16 * a, lane);
        __syncthreads();  // Ls, Ds written; every warp has its dO fragments, so the stages are free
        float li[WM][2], di[WM][2];
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) {
            RELORA_UNROLL
            for (int r = 0; r < 2; ++r) {
                li[a][r] = Ls[warp * WR + 16 * a + g + 8 * r];
                di[a][r] = Ds[warp * WR + 16 * a + g + 8 * r];
            }
        }
        load_rows_async<BC, D>(stage(0), kh, kstride, 0, T_);
        load_rows_async<BC, D>(stage(0) + BC * P, vh, kstride, 0, T_);
        cp_async_commit();
        float acc[WM][D8][4];
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) zero(acc[a]);
        for (int j = 0; j < tiles; ++j) {
            cp_async_wait<0>();
            __syncthreads();  // tile j landed for every thread; every warp is done with tile j - 1
            if (j + 1 < tiles) {
                bf16 *next = stage((j + 1) & 1);
                load_rows_async<BC, D>(next, kh, kstride, (int64_t)(j + 1) * BC, T_);
                load_rows_async<BC, D>(next + BC * P, vh, kstride, (int64_t)(j + 1) * BC, T_);
                cp_async_commit();
            }
            const bf16 *Ks = stage(j & 1), *Vs = Ks + BC * P;
            float s[WM][N8][4], dp[WM][N8][4];
            RELORA_UNROLL
            for (int a = 0; a < WM; ++a) {
                zero(s[a]);
                zero(dp[a]);
            }
            mma_rbt<WM, D, BC, P>(s, qf, Ks, lane);
            mma_rbt<WM, D, BC, P>(dp, dof, Vs, lane);
            const int64_t k0 = (int64_t)j * BC;
            const bool diagonal = k0 + BC > w0;
            RELORA_UNROLL
            for (int a = 0; a < WM; ++a) {
                RELORA_UNROLL
                for (int n = 0; n < N8; ++n) {
                    RELORA_UNROLL
                    for (int i = 0; i < 4; ++i) {
                        const int r = i >> 1;
                        const bool masked = diagonal && k0 + n * 8 + 2 * t + (i & 1) > w0 + 16 * a + g + 8 * r;
                        const float p = masked ? 0.0f : exp2f(fmaf(s[a][n][i], scale_log2, -li[a][r]));
                        s[a][n][i] = p * (dp[a][n][i] - di[a][r]);  // dS
                    }
                }
            }
            uint32_t dsf[WM][BC / 16][4];
            RELORA_UNROLL
            for (int a = 0; a < WM; ++a) a_from_c<N8>(dsf[a], s[a]);
            mma_rb<WM, BC, D, P>(acc, dsf, Ks, lane);
        }
        __syncthreads();  // every warp is done with the last tile's stage
        const float factor[2] = {sh.scale, sh.scale};
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) stage_strip<D>(stage(0), warp * WR + 16 * a, acc[a], factor, lane);
        __syncthreads();
        store_rows<R, D>(dq + qoff, qstride, q0, T_, stage(0));
    }
}

// ---- Backward: dK, dV ------------------------------------------------------------------------------------
// WM 16-key strips per warp (BC = 64 WM keys per CTA): every Q and dO fragment a warp loads serves WM strips.
// Shared memory: K and V of the CTA's keys ([BC][D + 8] each; dK and dV staged there at the end), two stages
// of [2 BR][D + 8] (query tile i: Q in rows 0..BR-1, dO in rows BR..2BR-1 of stage i % 2), then lse * log2(e)
// and D_i of the current query tile.
template <int D, int BR, int WM>
constexpr size_t dkv_smem() {
    return (2 * (size_t)(kRows * WM) + 2 * (size_t)(2 * BR)) * pitch<D>() * sizeof(bf16) + 2 * BR * sizeof(float);
}

template <int D, int BR, int WM>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dkv_mma_kernel(const bf16 *dout, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *out,
                                      const float *lse, bf16 *dk, bf16 *dv, Shape sh) {
    constexpr int P = pitch<D>(), N8 = BR / 8, D8 = D / 8, WR = 16 * WM, BC = kWarps * WR;
    static_assert(BR % 16 == 0 && BC % BR == 0 && D % 16 == 0, "tile shapes");
    RELORA_DYNAMIC_SHARED(bf16, smem);
    bf16 *Ks = smem, *Vs = smem + BC * P;
    auto stage = [&](int s) { return smem + 2 * BC * P + s * (2 * BR) * P; };
    float *Ls = reinterpret_cast<float *>(smem + 2 * BC * P + 2 * (2 * BR) * P), *Ds = Ls + BR;
    const int lane = (int)(threadIdx.x & 31u), warp = (int)(threadIdx.x >> 5), g = lane >> 2, t = lane & 3;
    const float scale_log2 = sh.scale * kLog2e;
    const int64_t T_ = sh.seq, qstride = sh.heads * D, kstride = sh.kv_heads * D;
    const int64_t k_tiles = (T_ + BC - 1) / BC, groups = sh.batch * sh.kv_heads;
    for (int64_t tile = blockIdx.x; tile < groups * k_tiles; tile += gridDim.x) {
        const int64_t kt = tile / groups, bg = tile % groups, kvh = bg % sh.kv_heads, b = bg / sh.kv_heads;
        const int64_t k0 = kt * BC, w0 = k0 + warp * WR, koff = b * T_ * kstride + kvh * D;
        // Query tiles from the one holding key k0 (BR divides BC) to the end, for each head of the group.
        const int64_t q_first = k0, per_head = (T_ - q_first + BR - 1) / BR;
        const int64_t items = sh.group * per_head;
        auto load_item = [&](int64_t it, int s) {
            const int64_t h = kvh * sh.group + it / per_head, q0 = q_first + it % per_head * BR;
            const int64_t qoff = b * T_ * qstride + h * D;
            load_rows_async<BR, D>(stage(s), q + qoff, qstride, q0, T_);
            load_rows_async<BR, D>(stage(s) + BR * P, dout + qoff, qstride, q0, T_);
        };
        __syncthreads();  // the previous tile's output copy is done with Ks, Vs
        load_rows_async<BC, D>(Ks, k + koff, kstride, k0, T_);
        load_rows_async<BC, D>(Vs, v + koff, kstride, k0, T_);
        load_item(0, 0);
        cp_async_commit();
        float dka[WM][D8][4], dva[WM][D8][4];
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) {
            zero(dka[a]);
            zero(dva[a]);
        }
        for (int64_t it = 0; it < items; ++it) {
            cp_async_wait<0>();
            __syncthreads();  // item it landed for every thread; every warp is done with item it - 1, Ls and Ds
            if (it + 1 < items) {
                load_item(it + 1, (int)((it + 1) & 1));
                cp_async_commit();
            }
            const int64_t h = kvh * sh.group + it / per_head, q0 = q_first + it % per_head * BR;
            const int64_t qoff = b * T_ * qstride + h * D;
            const bf16 *Qs = stage((int)(it & 1)), *dOs = Qs + BR * P;
            row_dots<BR, D>(Ds, dOs, out + qoff, qstride, q0, T_);
            for (int r = (int)threadIdx.x; r < BR; r += kThreads) {
                // Rows past seq: lse = +inf makes P = 0 there (their Q and dO are zeros, D_i = 0).
                Ls[r] = q0 + r < T_ ? lse[(b * sh.heads + h) * T_ + q0 + r] * kLog2e : INFINITY;
            }
            __syncthreads();
            float s[WM][N8][4], dp[WM][N8][4];
            RELORA_UNROLL
            for (int a = 0; a < WM; ++a) {
                zero(s[a]);
                zero(dp[a]);
            }
            mma_sbt<WM, D, BR, P>(s, Ks, warp * WR, Qs, lane);
            mma_sbt<WM, D, BR, P>(dp, Vs, warp * WR, dOs, lane);
            const bool diagonal = q0 < w0 + WR;  // some query of the tile precedes some key of the warp
            RELORA_UNROLL
            for (int a = 0; a < WM; ++a) {
                RELORA_UNROLL
                for (int n = 0; n < N8; ++n) {
                    RELORA_UNROLL
                    for (int i = 0; i < 4; ++i) {
                        const int c = n * 8 + 2 * t + (i & 1);
                        const bool masked = diagonal && w0 + 16 * a + g + 8 * (i >> 1) > q0 + c;
                        const float p = masked ? 0.0f : exp2f(fmaf(s[a][n][i], scale_log2, -Ls[c]));
                        s[a][n][i] = p;                         // P^T
                        dp[a][n][i] = p * (dp[a][n][i] - Ds[c]);  // dS^T
                    }
                }
            }
            uint32_t pf[WM][BR / 16][4], dsf[WM][BR / 16][4];
            RELORA_UNROLL
            for (int a = 0; a < WM; ++a) {
                a_from_c<N8>(pf[a], s[a]);
                a_from_c<N8>(dsf[a], dp[a]);
            }
            mma_rb<WM, BR, D, P>(dva, pf, dOs, lane);
            mma_rb<WM, BR, D, P>(dka, dsf, Qs, lane);
        }
        cp_async_wait<0>();  // nothing is in flight (items >= 1 waited every group); keeps the rule visible
        __syncthreads();     // every warp is done with Ks and Vs
        const float one[2] = {1.0f, 1.0f}, scale[2] = {sh.scale, sh.scale};
        RELORA_UNROLL
        for (int a = 0; a < WM; ++a) {
            stage_strip<D>(Ks, warp * WR + 16 * a, dka[a], scale, lane);
            stage_strip<D>(Vs, warp * WR + 16 * a, dva[a], one, lane);
        }
        __syncthreads();
        store_rows<BC, D>(dk + koff, kstride, k0, T_, Ks);
        store_rows<BC, D>(dv + koff, kstride, k0, T_, Vs);
    }
}

// ---- Launchers -----------------------------------------------------------------------------------------------
// Kernels above 48 KiB of dynamic shared memory opt in first (every call: cheap, and right on any device).
template <typename Kernel>
relora_status allow_smem(Kernel kernel, size_t bytes, const char *name) {
    if (bytes <= 48 * 1024) return RELORA_OK;
    return check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), name);
}

template <int D, int BC, int WM>
relora_status forward_for(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, float *lse, const Shape &sh,
                          cudaStream_t stream) {
    const int64_t tiles = sh.batch * sh.heads * ((sh.seq + kRows * WM - 1) / (kRows * WM));
    constexpr size_t smem = forward_smem<D, BC>();
    RELORA_CHECK(allow_smem(attention_forward_mma_kernel<D, BC, WM>, smem, "attention_forward_mma_kernel"));
    RELORA_LAUNCH((attention_forward_mma_kernel<D, BC, WM>), dim3(grid_for(tiles, 1)), dim3(kThreads), smem, stream)
    (q, k, v, out, lse, sh);
    return check_launch("attention_forward_mma_kernel");
}

template <int D, int BC, int WM, int BR, int WK>
relora_status backward_for(const bf16 *dout, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *out,
                           const float *lse, bf16 *dq, bf16 *dk, bf16 *dv, const Shape &sh, cudaStream_t stream) {
    const int64_t q_tiles = sh.batch * sh.heads * ((sh.seq + kRows * WM - 1) / (kRows * WM));
    constexpr size_t dq_bytes = dq_smem<D, BC, WM>();
    RELORA_CHECK(allow_smem(attention_backward_dq_mma_kernel<D, BC, WM>, dq_bytes, "attention_backward_dq_mma_kernel"));
    RELORA_LAUNCH((attention_backward_dq_mma_kernel<D, BC, WM>), dim3(grid_for(q_tiles, 1)), dim3(kThreads), dq_bytes,
                  stream)
    (dout, q, k, v, out, lse, dq, sh);
    RELORA_CHECK(check_launch("attention_backward_dq_mma_kernel"));
    const int64_t k_tiles = sh.batch * sh.kv_heads * ((sh.seq + kRows * WK - 1) / (kRows * WK));
    constexpr size_t dkv_bytes = dkv_smem<D, BR, WK>();
    RELORA_CHECK(allow_smem(attention_backward_dkv_mma_kernel<D, BR, WK>, dkv_bytes, "attention_backward_dkv_mma_kernel"));
    RELORA_LAUNCH((attention_backward_dkv_mma_kernel<D, BR, WK>), dim3(grid_for(k_tiles, 1)), dim3(kThreads), dkv_bytes,
                  stream)
    (dout, q, k, v, out, lse, dk, dv, sh);
    return check_launch("attention_backward_dkv_mma_kernel");
}

}  // namespace

bool mma_eligible(const Shape &sh, int32_t dtype, const void *const *pointers, int count) {
    if (dtype != RELORA_DTYPE_BF16 || (sh.D != 64 && sh.D != 128)) return false;
    for (int i = 0; i < count; ++i) {
        if ((uintptr_t)pointers[i] % 16 != 0) return false;
    }
    const char *flag = getenv("RELORA_ATTENTION_TENSOR_CORES");
    return !(flag && strcmp(flag, "0") == 0);
}

relora_status forward_mma(const void *q, const void *k, const void *v, void *out, float *lse, const Shape &sh,
                          cudaStream_t stream) {
    const bf16 *tq = static_cast<const bf16 *>(q), *tk = static_cast<const bf16 *>(k), *tv = static_cast<const bf16 *>(v);
    bf16 *to = static_cast<bf16 *>(out);
    if (sh.D == 64) return forward_for<64, 64, 2>(tq, tk, tv, to, lse, sh, stream);
    return forward_for<128, 32, 1>(tq, tk, tv, to, lse, sh, stream);
}

relora_status backward_mma(const void *dout, const void *q, const void *k, const void *v, const void *out,
                           const float *lse, void *dq, void *dk, void *dv, const Shape &sh, cudaStream_t stream) {
    const bf16 *tdo = static_cast<const bf16 *>(dout), *tq = static_cast<const bf16 *>(q);
    const bf16 *tk = static_cast<const bf16 *>(k), *tv = static_cast<const bf16 *>(v), *to = static_cast<const bf16 *>(out);
    bf16 *tdq = static_cast<bf16 *>(dq), *tdk = static_cast<bf16 *>(dk), *tdv = static_cast<bf16 *>(dv);
    if (sh.D == 64) return backward_for<64, 32, 2, 32, 2>(tdo, tq, tk, tv, to, lse, tdq, tdk, tdv, sh, stream);
    return backward_for<128, 32, 1, 32, 1>(tdo, tq, tk, tv, to, lse, tdq, tdk, tdv, sh, stream);
}

}  // namespace attention
}  // namespace relora
