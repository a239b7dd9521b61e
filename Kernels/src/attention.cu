// Causal grouped-query attention, forward and backward (Backend.attentionForward / attentionBackward).
//
// Layout: q, out, dq [batch * seq_len, heads * D]; k, v, dk, dv [batch * seq_len, kv_heads * D] (head h at
// columns h*D .. h*D + D of its row); lse f32 [batch, heads, seq_len]. Query head h reads kv head
// h / (heads / kv_heads). Scale 1/sqrt(D) in f32, as the CPU computes it. D <= kMaxHeadDim = 128 (each lane
// of a warp keeps up to 4 output columns d = lane + 32c in registers); a larger head_dim is
// RELORA_ERR_INVALID_ARGUMENT.
//
// Design (flash-attention style, fp32 math on CUDA cores, no tensor cores):
// - Forward: one block (4 warps) per (batch, head, tile of 16 queries), each warp owning 4 query rows. The
//   queries sit in shared memory; key/value tiles of 32 rows stream through shared memory (K rows padded to
//   D+1 floats: conflict-free when lane j reads key j). Per key tile, lane j computes the scaled scores of key
//   j for the warp's 4 rows (the causal mask gives -inf), the warp exchanges them through shared memory
//   (no shuffles), every lane takes the row max, lane j writes p_j = exp(s_j - m_new), and then each lane,
//   owning output columns d = lane + 32c, rescales its accumulators by exp(m_old - m_new) and adds
//   sum_j p_j v_j[d] (the row sum l accumulates in the same loop, the same order in every lane).
//   At the end out = o / l, lse = m + log(l). No [T, T] matrix exists anywhere.
// - Backward, without atomics (deterministic: every output element has one owner and a fixed order):
//   P is recomputed from lse, D_i = rowsum(dO_i * O_i) is recomputed by each kernel for the query rows it
//   loads (partial sums over a fixed split of the columns, summed in a fixed order), so no workspace.
//   * dQ kernel: one block per (batch, head, query tile of QT rows); key tiles stream through shared memory;
//     lane j computes p_ij, dp_ij = dO_i . v_j and ds_ij = p_ij (dp_ij - D_i) for the warp's rows; then each
//     lane accumulates dq_i[d] += sum_j ds_ij k_j[d]; finally dq = scale * dq.
//   * dK/dV kernel: one block per (batch, kv head, key tile of 32 keys), keys and values resident in shared
//     memory; it loops over the group's query heads in order and, for each, over the query tiles that can
//     see the keys (i >= first key) in order. Per query tile the block computes P and dS [QT, 32] into shared
//     memory (lane = key), then warp w accumulates keys 8w..8w+7 with lanes owning columns:
//     dv_j[d] += p_ij dO_i[d], dk_j[d] += ds_ij q_i[d]; finally dk = scale * dk.
//   QT = 16 query rows per tile for D <= 64, 8 above (the shared memory of a block stays under 48 KiB:
//   at D = 128 the forward uses 44.1 KiB, dQ 41.8 KiB, dK/dV 42.8 KiB).
// Known costs: scalar fp32 FMAs fed from shared memory (about one shared load per 1-2 FMAs), no tensor
// cores, so far below a tensor-core flash attention; D_i is recomputed once per key tile by the dK/dV
// kernel (an extra read of O); blocks along the causal diagonal do unequal work (the first key tiles see
// every query) and nothing balances them; fully masked lanes of a diagonal tile still compute.
#include <math.h>

#include "attention.cuh"

// Loops over the small per-thread arrays are unrolled so the arrays stay in registers (nvcc only; g++
// keeps them in registers or on its stack either way).
#if defined(__CUDACC__)
#define RELORA_UNROLL _Pragma("unroll")
#define RELORA_UNROLL_8 _Pragma("unroll 8")
#else
#define RELORA_UNROLL
#define RELORA_UNROLL_8
#endif

namespace relora {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kKeys = 32;  // keys per tile (one per lane)
constexpr int kMaxHeadDim = 128;
constexpr int kCols = kMaxHeadDim / 32;  // output columns per lane
constexpr int kForwardRows = 16;         // query rows per forward tile
// Blocks per SM the register allocation must allow (<= 170 registers a thread). Without a minimum, ptxas
// capped these kernels at 64-96 registers and spilled; with it they use 135-168 and spill nothing.
constexpr int kMinBlocks = 3;

using attention::Shape;

// Loads rows [first, first + rows) of one head (columns col0 .. col0 + D of a row of `stride` elements)
// into dst[r * pitch + d] as f32; rows at or past seq are zeros.
// Lane's kCols columns (d = lane + 32 c) of row `row` of a shared-memory tile with `pitch` floats per row;
// columns at or past D read as 0.
__device__ __forceinline__ void lane_columns(float (&x)[kCols], const float *tile, int row, int pitch, int D, int lane) {
    RELORA_UNROLL
    for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        x[c] = d < D ? tile[row * pitch + d] : 0.0f;
    }
}

// acc[r][c] += sum over the key tile's kKeys keys j, in order, of W[r * kKeys + j] * X[j][lane's column c]:
// the forward's P.V and dQ's dS.K (W: this warp's R rows of weights, X: the tile's V or K rows).
template <int R>
__device__ __forceinline__ void accumulate_keys(float (&acc)[R][kCols], const float *W, const float *X, int pitch, int D,
                                                int lane) {
    RELORA_UNROLL_8
    for (int j = 0; j < kKeys; ++j) {
        float xj[kCols];
        lane_columns(xj, X, j, pitch, D, lane);
        RELORA_UNROLL
        for (int r = 0; r < R; ++r) {
            const float w = W[r * kKeys + j];
            RELORA_UNROLL
            for (int c = 0; c < kCols; ++c) acc[r][c] += w * xj[c];
        }
    }
}

template <typename T>
__device__ __forceinline__ void load_tile(float *dst, int pitch, const T *src, int64_t stride, int64_t first,
                                          int rows, int64_t seq, int D) {
    for (int e = (int)threadIdx.x; e < rows * D; e += kThreads) {
        const int r = e / D, d = e - r * D;
        const int64_t i = first + r;
        dst[r * pitch + d] = i < seq ? to_float(src[i * stride + d]) : 0.0f;
    }
}

// ---- Forward ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    attention_forward_kernel(const T *q, const T *k, const T *v, T *out, float *lse, Shape sh) {
    constexpr int QT = kForwardRows, R = QT / kWarps;
    RELORA_DYNAMIC_SHARED(float, smem);
    const int D = sh.D, Dp = D + 1;
    float *Qs = smem;                 // [QT][D]
    float *Ks = Qs + QT * D;          // [kKeys][D + 1]
    float *Vs = Ks + kKeys * Dp;      // [kKeys][D]
    float *Ss = Vs + kKeys * D;       // [QT][kKeys] scores
    float *Ps = Ss + QT * kKeys;      // [QT][kKeys] probabilities (unnormalized)
    const int lane = (int)(threadIdx.x & 31u), warp = (int)(threadIdx.x >> 5);
    const int64_t T_ = sh.seq, qstride = sh.heads * D, kstride = sh.kv_heads * D;
    const int64_t q_tiles = (T_ + QT - 1) / QT;
    for (int64_t tile = blockIdx.x; tile < sh.batch * sh.heads * q_tiles; tile += gridDim.x) {
        const int64_t qt = tile % q_tiles, bh = tile / q_tiles, h = bh % sh.heads, b = bh / sh.heads;
        const int64_t kvh = h / sh.group, q0 = qt * QT;
        const T *qh = q + b * T_ * qstride + h * D;
        const T *kh = k + b * T_ * kstride + kvh * D;
        const T *vh = v + b * T_ * kstride + kvh * D;
        __syncthreads();  // the previous tile's readers are done with Qs
        load_tile(Qs, D, qh, qstride, q0, QT, T_, D);
        float m[R], l[R], o[R][kCols];
        RELORA_UNROLL
        for (int r = 0; r < R; ++r) {
            m[r] = -INFINITY;
            l[r] = 0.0f;
            RELORA_UNROLL
            for (int c = 0; c < kCols; ++c) o[r][c] = 0.0f;
        }
        const int64_t last = (q0 + QT < T_ ? q0 + QT : T_) - 1;  // the tile's last valid query
        // Every row (rows past the end are masked as row T-1) sees key k0 of every key tile visited: k0 is a
        // multiple of 32 <= last < q0 + 16, so k0 <= q0. Row maxima are therefore finite after each tile.
        for (int64_t k0 = 0; k0 <= last; k0 += kKeys) {
            __syncthreads();  // Qs written; the previous key tile's readers are done with Ks, Vs, Ps
            load_tile(Ks, Dp, kh, kstride, k0, kKeys, T_, D);
            load_tile(Vs, D, vh, kstride, k0, kKeys, T_, D);
            __syncthreads();
            const int64_t key = k0 + lane;
            float s[R];
            RELORA_UNROLL
            for (int r = 0; r < R; ++r) s[r] = 0.0f;
            const float *kr = Ks + lane * Dp;
            for (int d = 0; d < D; ++d) {
                const float kd = kr[d];
                RELORA_UNROLL
                for (int r = 0; r < R; ++r) s[r] += Qs[(warp * R + r) * D + d] * kd;
            }
            RELORA_UNROLL
            for (int r = 0; r < R; ++r) {
                const int64_t row = q0 + warp * R + r, i = row < T_ ? row : T_ - 1;
                Ss[(warp * R + r) * kKeys + lane] = key <= i ? sh.scale * s[r] : -INFINITY;
            }
            __syncwarp();
            float alpha[R];
            RELORA_UNROLL
            for (int r = 0; r < R; ++r) {
                const float *sr = Ss + (warp * R + r) * kKeys;
                float mt = m[r];
                RELORA_UNROLL_8
                for (int j = 0; j < kKeys; ++j) mt = fmaxf(mt, sr[j]);
                alpha[r] = expf(m[r] - mt);  // 0 on the first tile (m = -inf, mt finite)
                m[r] = mt;
                Ps[(warp * R + r) * kKeys + lane] = expf(sr[lane] - mt);  // 0 where masked
            }
            __syncwarp();
            RELORA_UNROLL
            for (int r = 0; r < R; ++r) {
                l[r] *= alpha[r];
                RELORA_UNROLL
                for (int c = 0; c < kCols; ++c) o[r][c] *= alpha[r];
            }
            RELORA_UNROLL
            for (int r = 0; r < R; ++r) {
                RELORA_UNROLL_8
                for (int j = 0; j < kKeys; ++j) l[r] += Ps[(warp * R + r) * kKeys + j];
            }
            accumulate_keys<R>(o, Ps + warp * R * kKeys, Vs, D, D, lane);
        }
        RELORA_UNROLL
        for (int r = 0; r < R; ++r) {
            const int64_t i = q0 + warp * R + r;
            if (i >= T_) continue;
            const float inv = 1.0f / l[r];
            T *orow = out + (b * T_ + i) * qstride + h * D;
            RELORA_UNROLL
            for (int c = 0; c < kCols; ++c) {
                const int d = lane + 32 * c;
                if (d < D) orow[d] = from_float<T>(o[r][c] * inv);
            }
            if (lane == 0) lse[(b * sh.heads + h) * T_ + i] = m[r] + logf(l[r]);
        }
    }
}

// ---- Backward -----------------------------------------------------------------------------------------------
// Loads QT query rows of q and dout into Qs, dOs ([QT][D]) and writes the partial sums of dO_i . O_i over
// the columns d = t, t + TPR, ... (t < TPR = kThreads / QT threads per row) into Dpart[QT][TPR].
template <typename T, int QT>
__device__ __forceinline__ void load_queries(float *Qs, float *dOs, float *Dpart, const T *qh, const T *doh,
                                             const T *oh, int64_t stride, int64_t q0, int64_t seq, int D) {
    constexpr int TPR = kThreads / QT;
    const int r = (int)threadIdx.x / TPR, t = (int)threadIdx.x % TPR;
    const int64_t i = q0 + r;
    float part = 0.0f;
    for (int d = t; d < D; d += TPR) {
        float qv = 0.0f, dov = 0.0f, ov = 0.0f;
        if (i < seq) {
            qv = to_float(qh[i * stride + d]);
            dov = to_float(doh[i * stride + d]);
            ov = to_float(oh[i * stride + d]);
        }
        Qs[r * D + d] = qv;
        dOs[r * D + d] = dov;
        part += dov * ov;
    }
    Dpart[r * TPR + t] = part;
}

// The backward's two dot products for one key row (kr, vr: this lane's key) against R query rows of the
// shared tiles (q, dout: [R, D]): s[r] = q_r . k (unscaled score), dp[r] = dO_r . v. Both backward
// kernels use it, so they recompute P and dP in the same order.
template <int R>
__device__ __forceinline__ void score_dots(const float *q, const float *dout, const float *kr, const float *vr, int D,
                                           float (&s)[R], float (&dp)[R]) {
    RELORA_UNROLL
    for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.0f;
    for (int d = 0; d < D; ++d) {
        const float kd = kr[d], vd = vr[d];
        RELORA_UNROLL
        for (int r = 0; r < R; ++r) {
            s[r] += q[r * D + d] * kd;
            dp[r] += dout[r * D + d] * vd;
        }
    }
}

template <int QT>
__device__ __forceinline__ float row_dot(const float *Dpart, int row) {
    constexpr int TPR = kThreads / QT;
    float s = 0.0f;
    RELORA_UNROLL
    for (int t = 0; t < TPR; ++t) s += Dpart[row * TPR + t];
    return s;
}

template <typename T, int QT>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    attention_backward_dq_kernel(const T *dout, const T *q, const T *k, const T *v, const T *out, const float *lse,
                                 T *dq, Shape sh) {
    constexpr int R = QT / kWarps;
    RELORA_DYNAMIC_SHARED(float, smem);
    const int D = sh.D, Dp = D + 1;
    float *Qs = smem;              // [QT][D]
    float *dOs = Qs + QT * D;      // [QT][D]
    float *Ks = dOs + QT * D;      // [kKeys][D + 1]
    float *Vs = Ks + kKeys * Dp;   // [kKeys][D + 1]
    float *DSs = Vs + kKeys * Dp;  // [QT][kKeys]
    float *Dpart = DSs + QT * kKeys;  // [QT][kThreads / QT]
    const int lane = (int)(threadIdx.x & 31u), warp = (int)(threadIdx.x >> 5);
    const int64_t T_ = sh.seq, qstride = sh.heads * D, kstride = sh.kv_heads * D;
    const int64_t q_tiles = (T_ + QT - 1) / QT;
    for (int64_t tile = blockIdx.x; tile < sh.batch * sh.heads * q_tiles; tile += gridDim.x) {
        const int64_t qt = tile % q_tiles, bh = tile / q_tiles, h = bh % sh.heads, b = bh / sh.heads;
        const int64_t kvh = h / sh.group, q0 = qt * QT;
        const int64_t qoff = b * T_ * qstride + h * D, koff = b * T_ * kstride + kvh * D;
        __syncthreads();  // the previous tile's readers are done with Qs, dOs, Dpart
        load_queries<T, QT>(Qs, dOs, Dpart, q + qoff, dout + qoff, out + qoff, qstride, q0, T_, D);
        __syncthreads();
        float Di[R], Li[R], acc[R][kCols];
        RELORA_UNROLL
        for (int r = 0; r < R; ++r) {
            const int64_t i = q0 + warp * R + r;
            Di[r] = row_dot<QT>(Dpart, warp * R + r);
            Li[r] = i < T_ ? lse[(b * sh.heads + h) * T_ + i] : 0.0f;
            RELORA_UNROLL
            for (int c = 0; c < kCols; ++c) acc[r][c] = 0.0f;
        }
        const int64_t last = (q0 + QT < T_ ? q0 + QT : T_) - 1;
        for (int64_t k0 = 0; k0 <= last; k0 += kKeys) {
            __syncthreads();  // the previous key tile's readers are done with Ks, Vs, DSs
            load_tile(Ks, Dp, k + koff, kstride, k0, kKeys, T_, D);
            load_tile(Vs, Dp, v + koff, kstride, k0, kKeys, T_, D);
            __syncthreads();
            const int64_t key = k0 + lane;
            float s[R], dp[R];
            score_dots<R>(Qs + warp * R * D, dOs + warp * R * D, Ks + lane * Dp, Vs + lane * Dp, D, s, dp);
            RELORA_UNROLL
            for (int r = 0; r < R; ++r) {
                const int64_t i = q0 + warp * R + r;
                const float p = (i < T_ && key <= i) ? expf(sh.scale * s[r] - Li[r]) : 0.0f;
                DSs[(warp * R + r) * kKeys + lane] = p * (dp[r] - Di[r]);
            }
            __syncwarp();
            accumulate_keys<R>(acc, DSs + warp * R * kKeys, Ks, Dp, D, lane);
        }
        RELORA_UNROLL
        for (int r = 0; r < R; ++r) {
            const int64_t i = q0 + warp * R + r;
            if (i >= T_) continue;
            T *row = dq + (b * T_ + i) * qstride + h * D;
            RELORA_UNROLL
            for (int c = 0; c < kCols; ++c) {
                const int d = lane + 32 * c;
                if (d < D) row[d] = from_float<T>(sh.scale * acc[r][c]);
            }
        }
    }
}

template <typename T, int QT>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    attention_backward_dkv_kernel(const T *dout, const T *q, const T *k, const T *v, const T *out, const float *lse,
                                  T *dk, T *dv, Shape sh) {
    constexpr int R = QT / kWarps, KW = kKeys / kWarps;
    RELORA_DYNAMIC_SHARED(float, smem);
    const int D = sh.D, Dp = D + 1;
    float *Ks = smem;                 // [kKeys][D + 1]
    float *Vs = Ks + kKeys * Dp;      // [kKeys][D + 1]
    float *Qs = Vs + kKeys * Dp;      // [QT][D]
    float *dOs = Qs + QT * D;         // [QT][D]
    float *Ps = dOs + QT * D;         // [QT][kKeys]
    float *DSs = Ps + QT * kKeys;     // [QT][kKeys]
    float *Dpart = DSs + QT * kKeys;  // [QT][kThreads / QT]
    const int lane = (int)(threadIdx.x & 31u), warp = (int)(threadIdx.x >> 5);
    const int64_t T_ = sh.seq, qstride = sh.heads * D, kstride = sh.kv_heads * D;
    const int64_t k_tiles = (T_ + kKeys - 1) / kKeys;
    for (int64_t tile = blockIdx.x; tile < sh.batch * sh.kv_heads * k_tiles; tile += gridDim.x) {
        const int64_t kt = tile % k_tiles, bg = tile / k_tiles, g = bg % sh.kv_heads, b = bg / sh.kv_heads;
        const int64_t k0 = kt * kKeys, koff = b * T_ * kstride + g * D;
        __syncthreads();  // the previous tile's readers are done with Ks, Vs
        load_tile(Ks, Dp, k + koff, kstride, k0, kKeys, T_, D);
        load_tile(Vs, Dp, v + koff, kstride, k0, kKeys, T_, D);
        float adk[KW][kCols], adv[KW][kCols];
        RELORA_UNROLL
        for (int jj = 0; jj < KW; ++jj) {
            RELORA_UNROLL
            for (int c = 0; c < kCols; ++c) adk[jj][c] = adv[jj][c] = 0.0f;
        }
        const int64_t key = k0 + lane;
        for (int64_t hh = 0; hh < sh.group; ++hh) {
            const int64_t h = g * sh.group + hh, qoff = b * T_ * qstride + h * D;
            const float *lrow = lse + (b * sh.heads + h) * T_;
            for (int64_t q0 = (k0 / QT) * QT; q0 < T_; q0 += QT) {
                __syncthreads();  // the previous query tile's readers are done with Qs, dOs, Ps, DSs, Dpart
                load_queries<T, QT>(Qs, dOs, Dpart, q + qoff, dout + qoff, out + qoff, qstride, q0, T_, D);
                __syncthreads();
                float s[R], dp[R];
                score_dots<R>(Qs + warp * R * D, dOs + warp * R * D, Ks + lane * Dp, Vs + lane * Dp, D, s, dp);
                RELORA_UNROLL
                for (int r = 0; r < R; ++r) {
                    const int row = warp * R + r;
                    const int64_t i = q0 + row;
                    float p = 0.0f, ds = 0.0f;
                    if (i < T_ && key <= i) {
                        p = expf(sh.scale * s[r] - lrow[i]);
                        ds = p * (dp[r] - row_dot<QT>(Dpart, row));
                    }
                    Ps[row * kKeys + lane] = p;
                    DSs[row * kKeys + lane] = ds;
                }
                __syncthreads();
                for (int i = 0; i < QT; ++i) {
                    float qd[kCols], dod[kCols];
                    lane_columns(qd, Qs, i, D, D, lane);
                    lane_columns(dod, dOs, i, D, D, lane);
                    RELORA_UNROLL
                    for (int jj = 0; jj < KW; ++jj) {
                        const float p = Ps[i * kKeys + warp * KW + jj], ds = DSs[i * kKeys + warp * KW + jj];
                        RELORA_UNROLL
                        for (int c = 0; c < kCols; ++c) {
                            adv[jj][c] += p * dod[c];
                            adk[jj][c] += ds * qd[c];
                        }
                    }
                }
            }
        }
        RELORA_UNROLL
        for (int jj = 0; jj < KW; ++jj) {
            const int64_t j = k0 + warp * KW + jj;
            if (j >= T_) continue;
            T *dkrow = dk + (b * T_ + j) * kstride + g * D, *dvrow = dv + (b * T_ + j) * kstride + g * D;
            RELORA_UNROLL
            for (int c = 0; c < kCols; ++c) {
                const int d = lane + 32 * c;
                if (d < D) {
                    dkrow[d] = from_float<T>(sh.scale * adk[jj][c]);
                    dvrow[d] = from_float<T>(adv[jj][c]);
                }
            }
        }
    }
}

size_t forward_smem(int D) {
    return sizeof(float) * ((size_t)kForwardRows * D + (size_t)kKeys * (D + 1) + (size_t)kKeys * D +
                            2 * (size_t)kForwardRows * kKeys);
}
template <int QT>
size_t dq_smem(int D) {
    return sizeof(float) * (2 * (size_t)QT * D + 2 * (size_t)kKeys * (D + 1) + (size_t)QT * kKeys + kThreads);
}
template <int QT>
size_t dkv_smem(int D) {
    return sizeof(float) * (2 * (size_t)kKeys * (D + 1) + 2 * (size_t)QT * D + 2 * (size_t)QT * kKeys + kThreads);
}

template <typename T>
relora_status forward(const void *q, const void *k, const void *v, void *out, float *lse, const Shape &sh,
                      cudaStream_t stream) {
    const int64_t tiles = sh.batch * sh.heads * ((sh.seq + kForwardRows - 1) / kForwardRows);
    RELORA_LAUNCH(attention_forward_kernel<T>, dim3(grid_for(tiles, 1)), dim3(kThreads), forward_smem(sh.D), stream)
    (static_cast<const T *>(q), static_cast<const T *>(k), static_cast<const T *>(v), static_cast<T *>(out), lse, sh);
    return check_launch("attention_forward_kernel");
}

template <typename T, int QT>
relora_status backward(const void *dout, const void *q, const void *k, const void *v, const void *out, const float *lse,
                       void *dq, void *dk, void *dv, const Shape &sh, cudaStream_t stream) {
    const T *tdout = static_cast<const T *>(dout), *tq = static_cast<const T *>(q), *tk = static_cast<const T *>(k);
    const T *tv = static_cast<const T *>(v), *tout = static_cast<const T *>(out);
    const int64_t q_tiles = sh.batch * sh.heads * ((sh.seq + QT - 1) / QT);
    RELORA_LAUNCH((attention_backward_dq_kernel<T, QT>), dim3(grid_for(q_tiles, 1)), dim3(kThreads), dq_smem<QT>(sh.D),
                  stream)
    (tdout, tq, tk, tv, tout, lse, static_cast<T *>(dq), sh);
    RELORA_CHECK(check_launch("attention_backward_dq_kernel"));
    const int64_t k_tiles = sh.batch * sh.kv_heads * ((sh.seq + kKeys - 1) / kKeys);
    RELORA_LAUNCH((attention_backward_dkv_kernel<T, QT>), dim3(grid_for(k_tiles, 1)), dim3(kThreads),
                  dkv_smem<QT>(sh.D), stream)
    (tdout, tq, tk, tv, tout, lse, static_cast<T *>(dk), static_cast<T *>(dv), sh);
    return check_launch("attention_backward_dkv_kernel");
}

template <typename T>
relora_status backward_for(const void *dout, const void *q, const void *k, const void *v, const void *out,
                           const float *lse, void *dq, void *dk, void *dv, const Shape &sh, cudaStream_t stream) {
    if (sh.D <= 64) return backward<T, 16>(dout, q, k, v, out, lse, dq, dk, dv, sh, stream);
    return backward<T, 8>(dout, q, k, v, out, lse, dq, dk, dv, sh, stream);
}

// ---- Decode: one query row over a KV cache (Backend.attentionDecode) ----------------------------------------
// One block (kThreads threads) per query head (grid-stride), the `keys` = position + 1 cached rows of its kv head.
// Two passes over the keys, recomputing the scores rather than storing them (no scratch, any cache length):
// pass 1: thread t takes the keys t, t + kThreads, ... and keeps the largest scaled score, block_max gives m;
// pass 2: per tile of kThreads keys, thread t writes p = exp(s - m) of key tile + t to shared memory, then
// thread d (< D) adds p_j v_j[d] in key order, and every thread the row sum l in the same order; out = acc / l.
// Each score is the sequential f32 dot over d, times scale (the same expression in both passes). Not tuned:
// a thread reads its key's row alone (uncoalesced, served by L1/L2), which is small beside the GEMVs of a
// decode step (their weights are read once per token).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_decode_kernel(const T *q, const T *kc, const T *vc, T *out, int64_t keys, int64_t heads, int64_t group,
                            int64_t width, int D, float scale) {
    __shared__ float qs[kMaxHeadDim];
    __shared__ float p[kThreads];
    const int t = (int)threadIdx.x;
    for (int64_t h = blockIdx.x; h < heads; h += gridDim.x) {
        const int64_t col = (h / group) * D;  // the kv head's columns in a cache row
        __syncthreads();  // the previous head's readers of qs and p are done
        if (t < D) qs[t] = to_float(q[h * D + t]);
        __syncthreads();
        auto score = [&](int64_t j) {
            const T *kj = kc + j * width + col;
            float dot = 0.0f;
            for (int d = 0; d < D; ++d) dot = __fadd_rn(dot, __fmul_rn(qs[d], to_float(kj[d])));
            return __fmul_rn(scale, dot);
        };
        float m = -INFINITY;
        for (int64_t j = t; j < keys; j += kThreads) m = fmaxf(m, score(j));
        m = block_max(m);
        float acc = 0.0f, l = 0.0f;
        for (int64_t j0 = 0; j0 < keys; j0 += kThreads) {
            const int64_t j = j0 + t;
            p[t] = j < keys ? expf(__fsub_rn(score(j), m)) : 0.0f;
            __syncthreads();
            const int64_t n = keys - j0 < kThreads ? keys - j0 : kThreads;
            for (int64_t i = 0; i < n; ++i) {
                l = __fadd_rn(l, p[i]);
                if (t < D) acc = __fadd_rn(acc, __fmul_rn(p[i], to_float(vc[(j0 + i) * width + col + t])));
            }
            __syncthreads();
        }
        if (t < D) out[h * D + t] = from_float<T>(__fdiv_rn(acc, l));
    }
}

template <typename T>
relora_status decode(const void *q, const void *k_cache, const void *v_cache, void *out, const Shape &sh,
                     cudaStream_t stream) {
    RELORA_LAUNCH(attention_decode_kernel<T>, dim3(grid_for(sh.heads, 1)), dim3(kThreads), 0, stream)
    (static_cast<const T *>(q), static_cast<const T *>(k_cache), static_cast<const T *>(v_cache), static_cast<T *>(out),
     sh.seq, sh.heads, sh.group, sh.kv_heads * sh.D, sh.D, sh.scale);
    return check_launch("attention_decode_kernel");
}

// Shared argument checks; *empty when there is nothing to compute.
relora_status check_shape(const char *op, int64_t batch, int64_t seq_len, int64_t heads, int64_t kv_heads,
                          int64_t head_dim, Shape *sh, bool *empty) {
    if (batch < 0 || seq_len < 0 || heads < 0 || kv_heads < 0 || head_dim < 0) {
        return fail(RELORA_ERR_INVALID_ARGUMENT, "%s: negative shape", op);
    }
    *empty = batch == 0 || seq_len == 0 || heads == 0;
    if (*empty) return RELORA_OK;
    if (kv_heads < 1 || heads % kv_heads != 0) {
        return fail(RELORA_ERR_INVALID_ARGUMENT, "%s: heads %lld is not a multiple of kv_heads %lld", op, (long long)heads,
                    (long long)kv_heads);
    }
    if (head_dim < 1 || head_dim > kMaxHeadDim) {
        return fail(RELORA_ERR_INVALID_ARGUMENT, "%s: head_dim %lld outside [1, %d]", op, (long long)head_dim, kMaxHeadDim);
    }
    sh->batch = batch;
    sh->seq = seq_len;
    sh->heads = heads;
    sh->kv_heads = kv_heads;
    sh->group = heads / kv_heads;
    sh->D = (int)head_dim;
    sh->scale = 1.0f / sqrtf((float)head_dim);  // the CPU's 1 / Float(D).squareRoot()
    return RELORA_OK;
}

}  // namespace
}  // namespace relora

using namespace relora;

relora_status relora_cuda_attention_forward(const void *q, const void *k, const void *v, void *out, float *lse,
                                            int64_t batch, int64_t seq_len, int64_t heads, int64_t kv_heads,
                                            int64_t head_dim, int32_t dtype, void *stream) {
    Shape sh{};  // value-initialised: g++ cannot see that check_shape fills it on every path that returns OK
    bool empty = false;
    RELORA_CHECK(check_shape("attention_forward", batch, seq_len, heads, kv_heads, head_dim, &sh, &empty));
    if (empty) return RELORA_OK;
    RELORA_REQUIRE(q && k && v && out && lse, "attention_forward", "null pointer");
    const void *pointers[] = {q, k, v, out};
    if (attention::mma_eligible(sh, dtype, pointers, 4)) return attention::forward_mma(q, k, v, out, lse, sh, as_stream(stream));
    switch (dtype) {
    case RELORA_DTYPE_F32: return forward<float>(q, k, v, out, lse, sh, as_stream(stream));
    case RELORA_DTYPE_BF16: return forward<__nv_bfloat16>(q, k, v, out, lse, sh, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "attention_forward: unknown dtype %d", (int)dtype);
    }
}

relora_status relora_cuda_attention_backward(const void *dout, const void *q, const void *k, const void *v,
                                             const void *out, const float *lse, void *dq, void *dk, void *dv,
                                             int64_t batch, int64_t seq_len, int64_t heads, int64_t kv_heads,
                                             int64_t head_dim, int32_t dtype, void *stream) {
    Shape sh{};  // value-initialised: g++ cannot see that check_shape fills it on every path that returns OK
    bool empty = false;
    RELORA_CHECK(check_shape("attention_backward", batch, seq_len, heads, kv_heads, head_dim, &sh, &empty));
    if (empty) return RELORA_OK;
    RELORA_REQUIRE(dout && q && k && v && out && lse && dq && dk && dv, "attention_backward", "null pointer");
    const void *pointers[] = {dout, q, k, v, out, dq, dk, dv};
    if (attention::mma_eligible(sh, dtype, pointers, 8)) {
        return attention::backward_mma(dout, q, k, v, out, lse, dq, dk, dv, sh, as_stream(stream));
    }
    switch (dtype) {
    case RELORA_DTYPE_F32: return backward_for<float>(dout, q, k, v, out, lse, dq, dk, dv, sh, as_stream(stream));
    case RELORA_DTYPE_BF16:
        return backward_for<__nv_bfloat16>(dout, q, k, v, out, lse, dq, dk, dv, sh, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "attention_backward: unknown dtype %d", (int)dtype);
    }
}

relora_status relora_cuda_attention_decode(const void *q, const void *k_cache, const void *v_cache, void *out,
                                           int64_t position, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                           int32_t dtype, void *stream) {
    RELORA_REQUIRE(position >= 0, "attention_decode", "negative position %lld", (long long)position);
    Shape sh{};  // value-initialised: g++ cannot see that check_shape fills it on every path that returns OK
    bool empty = false;
    // The cache's rows 0 ..= position are the keys: a batch of one sequence of position + 1.
    RELORA_CHECK(check_shape("attention_decode", 1, position + 1, heads, kv_heads, head_dim, &sh, &empty));
    if (empty) return RELORA_OK;
    RELORA_REQUIRE(q && k_cache && v_cache && out, "attention_decode", "null pointer");
    switch (dtype) {
    case RELORA_DTYPE_F32: return decode<float>(q, k_cache, v_cache, out, sh, as_stream(stream));
    case RELORA_DTYPE_BF16: return decode<__nv_bfloat16>(q, k_cache, v_cache, out, sh, as_stream(stream));
    default: return fail(RELORA_ERR_INVALID_ARGUMENT, "attention_decode: unknown dtype %d", (int)dtype);
    }
}
