// RoPE, causal GQA attention (forward and backward) and the fused cross-entropy against scalar references
// in double, through the ABI table (run_attention_suite, called by run_kernel_suite in test_kernels.cpp).
//
// Tolerances (derived at each check): f32 unit roundoff u = 2^-24 per operation, expf/logf within 2 ulp
// (CUDA's bound), a sequential f32 sum of n terms within (n - 1) u of the sum of the magnitudes; bf16
// storage adds one rounding ub = 2^-8 of the output. References read the stored (bf16-rounded) inputs.
// Derived bounds are first-order; each is doubled to cover second-order terms. The bf16 tensor-core kernels
// (head_dim 64 and 128) get their own error model (reference_forward's comment): 2u per f32 addition inside a
// tensor core, and ub times the magnitude of every product whose operand was rounded to bf16 (P, dS).
#include <stdlib.h>

#include <algorithm>

#include "harness.h"

using namespace harness;

namespace {

// ---- RoPE ------------------------------------------------------------------------------------------------
// The CPU's tables (CPUBackend.ropeTables: what the Swift backend uploads) and its f32 rotation, evaluated on the
// host with -ffp-contract=off: the kernel must match it bit for bit (bf16: the same f32 value rounded once).
std::vector<float> rope_table(int64_t seq, int64_t dim, float theta) {
    const int64_t half = dim / 2;
    std::vector<float> table((size_t)(2 * seq * half));
    for (int64_t pos = 0; pos < seq; ++pos) {
        for (int64_t i = 0; i < half; ++i) {
            const double inv_freq = 1.0 / pow((double)theta, (double)(2 * i) / (double)dim);
            const double angle = (double)pos * inv_freq;
            table[(size_t)(pos * half + i)] = (float)cos(angle);
            table[(size_t)((seq + pos) * half + i)] = (float)sin(angle);
        }
    }
    return table;
}

bool test_rope(int32_t dtype, int64_t batch, int64_t seq, int64_t heads, int64_t dim, float theta, bool inverse) {
    const int64_t n = batch * seq * heads * dim, half = dim / 2;
    const std::vector<float> x = stored(uniform((size_t)n, -3.0f, 3.0f, 100 + (uint64_t)dim), dtype);
    const std::vector<float> table = rope_table(seq, dim, theta);
    Tensor tx(dtype, n), ttable(RELORA_DTYPE_F32, (int64_t)table.size());
    tx.upload(x);
    ttable.upload(table);
    char name[128];
    snprintf(name, sizeof name, "rope%s %s [%lld x %lld, %lld x %lld]", inverse ? " inverse" : "", dtype_name(dtype),
             (long long)batch, (long long)seq, (long long)heads, (long long)dim);
    EXPECT_OK(name, api.rope(tx.buffer.ptr, (const float *)ttable.buffer.ptr, batch, seq, heads, dim, inverse ? 1 : 0,
                             dtype, nullptr));
    std::vector<float> want(x);
    const float sign = inverse ? -1.0f : 1.0f;
    for (int64_t r = 0; r < batch * seq; ++r) {
        const int64_t pos = r % seq;
        for (int64_t h = 0; h < heads; ++h) {
            float *v = want.data() + r * heads * dim + h * dim;
            for (int64_t i = 0; i < half; ++i) {
                const float c = table[(size_t)(pos * half + i)], s = sign * table[(size_t)((seq + pos) * half + i)];
                const float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
    return check_bits(name, tx.download(), stored(want, dtype));
}

// ---- Attention ----------------------------------------------------------------------------------------------
struct AttnShape {
    int64_t batch, seq, heads, kv_heads, dim;
};

struct AttnData {
    std::vector<float> q, k, v, dout;
};

// Forward reference in double with first-order f32 error bounds (see test_attention_case).
struct FwdRef {
    std::vector<double> out, out_bound, lse, lse_bound;
};

float attn_scale(int64_t dim) { return 1.0f / sqrtf((float)dim); }

// scores s_ij = scale * q_i . k_j for one (b, h): the double value and the magnitude sum_d |q k|.
void scores(const AttnShape &s, const AttnData &x, int64_t b, int64_t h, int64_t i, int64_t j, double *value,
            double *magnitude) {
    const int64_t D = s.dim, g = h / (s.heads / s.kv_heads);
    const float *qi = x.q.data() + (b * s.seq + i) * s.heads * D + h * D;
    const float *kj = x.k.data() + (b * s.seq + j) * s.kv_heads * D + g * D;
    double dot = 0, mag = 0;
    for (int64_t d = 0; d < D; ++d) {
        dot += (double)qi[d] * kj[d];
        mag += fabs((double)qi[d] * kj[d]);
    }
    const double scale = attn_scale(D);
    *value = scale * dot;
    *magnitude = scale * mag;
}

// Forward: o_i = sum_j p_ij v_j / l_i with p_ij = exp(s_ij - m_i). The kernel's f32 score has absolute error
// <= (D + 1) u scale sum|q k| (a D-term dot and the scale); s - m rounds by u |s - m| and expf adds 2 ulp, so
// each p_ij carries relative error e_ij <= (D + 1) u scale sum|q k| + u |s - m| + 3u (its m's error is common
// to the row and cancels in o). Perturbing p_j by p_j e_j moves o by sum_j P_ij e_ij |v_j - o_i|. The
// accumulations (T terms, plus one rescale per 32-key tile and the final division) add
// (T + T/16 + 4) u (sum_j P_ij |v_j| + |o_i|). lse = m + log(l): sum_j P_ij e_ij + (T + T/16 + 4) u
// + 2 ulp of log + u |lse|. bf16 adds ub |o| for the output rounding.
//
// Tensor cores (`tc`: bf16 with head_dim 64 or 128, attention_mma.cu). Products are exact (bf16 x bf16 fits
// f32) and accumulate in f32, but a tensor core's additions are not specified to round to nearest (some
// architectures truncate), so every f32 sum counts 2u per addition: scores 2 (D + 1) u scale sum|q k|, the
// accumulations 2 (T + T/16 + 4) u. The exponent is s c - m c with c = fl(scale log2 e) and m c rounded, then
// exp2f (2 ulp): e_ij = 2 (D + 1) u scale sum|q k| + 2u |s - m| + u |m| + 5u. P is rounded to bf16 for P.V
// while l sums the f32 p, which moves o by up to ub sum_j P_ij |v_j| more: a first-order term that is exact as
// a bound, added undoubled beside the output's ub |o| (times 1 + 4 ub for their product).
FwdRef reference_forward(const AttnShape &s, const AttnData &x, int32_t dtype, bool tc) {
    const int64_t T = s.seq, D = s.dim, H = s.heads, KV = s.kv_heads, g = H / KV;
    const double ub = dtype == RELORA_DTYPE_BF16 ? kUBF16 : 0, dot = tc ? 2.0 * (double)(D + 1) : (double)(D + 1);
    FwdRef r;
    const size_t n = (size_t)(s.batch * T * H * D);
    r.out.assign(n, 0);
    r.out_bound.assign(n, 0);
    r.lse.assign((size_t)(s.batch * H * T), 0);
    r.lse_bound.assign(r.lse.size(), 0);
    std::vector<double> sv((size_t)T), smag((size_t)T), p((size_t)T), err((size_t)T);
    for (int64_t b = 0; b < s.batch; ++b) {
        for (int64_t h = 0; h < H; ++h) {
            const int64_t kvh = h / g;
            for (int64_t i = 0; i < T; ++i) {
                double m = -INFINITY;
                for (int64_t j = 0; j <= i; ++j) {
                    scores(s, x, b, h, i, j, &sv[(size_t)j], &smag[(size_t)j]);
                    m = std::max(m, sv[(size_t)j]);
                }
                double l = 0;
                for (int64_t j = 0; j <= i; ++j) l += (p[(size_t)j] = exp(sv[(size_t)j] - m));
                const double lse = m + log(l);
                const double acc = (tc ? 2.0 : 1.0) * ((double)T + (double)T / 16 + 4) * kU32;
                double pe = 0;  // sum_j P_ij e_ij
                for (int64_t j = 0; j <= i; ++j) {
                    const double shift = fabs(sv[(size_t)j] - m);
                    err[(size_t)j] = dot * kU32 * smag[(size_t)j] +
                                     (tc ? 2 * kU32 * shift + kU32 * fabs(m) + 5 * kU32 : kU32 * shift + 3 * kU32);
                    pe += p[(size_t)j] / l * err[(size_t)j];
                }
                const size_t li = (size_t)((b * H + h) * T + i);
                r.lse[li] = lse;
                r.lse_bound[li] = 2 * (pe + acc + 2 * kU32 + kU32 * fabs(lse) + (tc ? kU32 * fabs(m) : 0)) + 1e-30;
                for (int64_t d = 0; d < D; ++d) {
                    double o = 0, pv = 0;
                    for (int64_t j = 0; j <= i; ++j) {
                        const double vj = x.v[(size_t)((b * T + j) * KV * D + kvh * D + d)];
                        o += p[(size_t)j] / l * vj;
                        pv += p[(size_t)j] / l * fabs(vj);
                    }
                    double moved = 0;
                    for (int64_t j = 0; j <= i; ++j) {
                        const double vj = x.v[(size_t)((b * T + j) * KV * D + kvh * D + d)];
                        moved += p[(size_t)j] / l * err[(size_t)j] * fabs(vj - o);
                    }
                    const size_t oi = (size_t)((b * T + i) * H * D + h * D + d);
                    r.out[oi] = o;
                    r.out_bound[oi] = 2 * (moved + acc * (pv + fabs(o))) +
                                      ub * (1 + 4 * ub) * ((tc ? pv : 0) + fabs(o)) + 1e-30;
                }
            }
        }
    }
    return r;
}

struct BwdRef {
    std::vector<double> dq, dq_bound, dk, dk_bound, dv, dv_bound;
};

// Backward reference from the kernel's own out and lse (the backward's inputs), in double:
//   P_ij = exp(s_ij - lse_i), dP_ij = dO_i . v_j, D_i = dO_i . O_i, dS = P (dP - D),
//   dQ_i = scale sum_j dS_ij k_j, dK_j = scale sum_{h in group, i >= j} dS_ij q_i, dV_j = sum P_ij dO_i.
// f32 errors: P_ij relative e_ij = (D + 1) u scale sum|q k| + u |s - lse| + 3u; dP within (D + 1) u sum|dO v|;
// D_i within (D + 2) u sum|dO O| (partial sums over a split of the columns, then the partials); so dS_ij
// within e_ij |dS_ij| + P_ij ((D + 1) u sum|dO v| + (D + 2) u sum|dO O| + u |dP - D|) =: f_ij.
// dQ_i: scale sum_j f_ij |k_j| + (T + 2) u scale sum_j |dS_ij k_j|; dK_j likewise over the group's n = G T
// query rows; dV_j: sum e_ij P_ij |dO_i| + (n + 2) u sum P_ij |dO_i|. bf16 adds ub |ref| on output.
// Tensor cores (`tc`, see reference_forward): the dots and the accumulations count 2u per addition; the
// exponent is s c - lse log2(e) (c = fl(scale log2 e), lse log2 e rounded with a rounded constant) through
// exp2f: e_ij = 2 (D + 1) u scale sum|q k| + u |s| + 2u |lse| + u |s - lse| + 5u; and P and dS are rounded to
// bf16 as the left operands of dV, dK and dQ: + ub sum P_ij |dO_i|, ub scale sum |dS_ij q_i|, ub scale
// sum |dS_ij k_j| (first order and exact as bounds: undoubled, times 1 + 4 ub for the output rounding's product).
BwdRef reference_backward(const AttnShape &s, const AttnData &x, const std::vector<float> &out,
                          const std::vector<float> &lse, int32_t dtype, bool tc) {
    const int64_t T = s.seq, D = s.dim, H = s.heads, KV = s.kv_heads, G = H / KV;
    const double scale = attn_scale(D), ub = dtype == RELORA_DTYPE_BF16 ? kUBF16 : 0;
    const double dot = tc ? 2.0 * (double)(D + 1) : (double)(D + 1), sums = tc ? 2.0 : 1.0;
    BwdRef r;
    const size_t nq = (size_t)(s.batch * T * H * D), nk = (size_t)(s.batch * T * KV * D);
    r.dq.assign(nq, 0);
    r.dq_bound.assign(nq, 0);
    r.dk.assign(nk, 0);
    r.dk_bound.assign(nk, 0);
    r.dv.assign(nk, 0);
    r.dv_bound.assign(nk, 0);
    std::vector<double> dqm(nq, 0), dkm(nk, 0), dvm(nk, 0);  // magnitude sums for the accumulation terms
    auto qa = [&](int64_t b, int64_t i, int64_t h) { return (size_t)((b * T + i) * H * D + h * D); };
    auto ka = [&](int64_t b, int64_t j, int64_t g) { return (size_t)((b * T + j) * KV * D + g * D); };
    for (int64_t b = 0; b < s.batch; ++b) {
        for (int64_t h = 0; h < H; ++h) {
            const int64_t g = h / G;
            for (int64_t i = 0; i < T; ++i) {
                const double L = lse[(size_t)((b * H + h) * T + i)];
                double Di = 0, Dmag = 0;
                for (int64_t d = 0; d < D; ++d) {
                    Di += (double)x.dout[qa(b, i, h) + d] * out[qa(b, i, h) + d];
                    Dmag += fabs((double)x.dout[qa(b, i, h) + d] * out[qa(b, i, h) + d]);
                }
                for (int64_t j = 0; j <= i; ++j) {
                    double sv, smag;
                    scores(s, x, b, h, i, j, &sv, &smag);
                    const double P = exp(sv - L);
                    double dP = 0, dPmag = 0;
                    for (int64_t d = 0; d < D; ++d) {
                        dP += (double)x.dout[qa(b, i, h) + d] * x.v[ka(b, j, g) + d];
                        dPmag += fabs((double)x.dout[qa(b, i, h) + d] * x.v[ka(b, j, g) + d]);
                    }
                    const double dS = P * (dP - Di);
                    const double e = dot * kU32 * smag + kU32 * fabs(sv - L) +
                                     (tc ? kU32 * fabs(sv) + 2 * kU32 * fabs(L) + 5 * kU32 : 3 * kU32);
                    const double f = e * fabs(dS) + P * (dot * kU32 * dPmag + (double)(D + 2) * kU32 * Dmag +
                                                         kU32 * fabs(dP - Di));
                    for (int64_t d = 0; d < D; ++d) {
                        const double kd = x.k[ka(b, j, g) + d], qd = x.q[qa(b, i, h) + d], dod = x.dout[qa(b, i, h) + d];
                        r.dq[qa(b, i, h) + d] += scale * dS * kd;
                        r.dq_bound[qa(b, i, h) + d] += scale * f * fabs(kd);
                        dqm[qa(b, i, h) + d] += scale * fabs(dS * kd);
                        r.dk[ka(b, j, g) + d] += scale * dS * qd;
                        r.dk_bound[ka(b, j, g) + d] += scale * f * fabs(qd);
                        dkm[ka(b, j, g) + d] += scale * fabs(dS * qd);
                        r.dv[ka(b, j, g) + d] += P * dod;
                        r.dv_bound[ka(b, j, g) + d] += e * P * fabs(dod);
                        dvm[ka(b, j, g) + d] += P * fabs(dod);
                    }
                }
            }
        }
    }
    const double n = (double)(G * T + 2), bf = ub * (1 + 4 * ub), operand = tc ? bf : 0;
    for (size_t i = 0; i < nq; ++i) {
        r.dq_bound[i] = 2 * (r.dq_bound[i] + sums * (double)(T + 2) * kU32 * dqm[i]) + operand * dqm[i] +
                        bf * fabs(r.dq[i]) + 1e-30;
    }
    for (size_t i = 0; i < nk; ++i) {
        r.dk_bound[i] = 2 * (r.dk_bound[i] + sums * n * kU32 * dkm[i]) + operand * dkm[i] + bf * fabs(r.dk[i]) + 1e-30;
        r.dv_bound[i] = 2 * (r.dv_bound[i] + sums * n * kU32 * dvm[i]) + operand * dvm[i] + bf * fabs(r.dv[i]) + 1e-30;
    }
    return r;
}

AttnData attention_inputs(const AttnShape &s, int32_t dtype, uint64_t seed) {
    const size_t nq = (size_t)(s.batch * s.seq * s.heads * s.dim), nk = (size_t)(s.batch * s.seq * s.kv_heads * s.dim);
    AttnData x;
    // q and k in [-2, 2): scores up to ~4 sqrt(D/3), so the softmax is far from uniform.
    x.q = stored(uniform(nq, -2.0f, 2.0f, seed), dtype);
    x.k = stored(uniform(nk, -2.0f, 2.0f, seed + 1), dtype);
    x.v = stored(uniform(nk, -1.0f, 1.0f, seed + 2), dtype);
    x.dout = stored(uniform(nq, -1.0f, 1.0f, seed + 3), dtype);
    return x;
}

std::string attn_label(const char *op, int32_t dtype, const AttnShape &s) {
    char buf[160];
    snprintf(buf, sizeof buf, "%s %s b%lld T%lld h%lld/%lld D%lld", op, dtype_name(dtype), (long long)s.batch,
             (long long)s.seq, (long long)s.heads, (long long)s.kv_heads, (long long)s.dim);
    return buf;
}

// The device tensors of one attention case, q, k, v and dout uploaded from `x`.
struct AttnTensors {
    Tensor q, k, v, out, dout, lse, dq, dk, dv;
    AttnTensors(int32_t dtype, const AttnShape &s, const AttnData &x)
        : q(dtype, s.batch * s.seq * s.heads * s.dim), k(dtype, s.batch * s.seq * s.kv_heads * s.dim), v(dtype, k.count),
          out(dtype, q.count), dout(dtype, q.count), lse(RELORA_DTYPE_F32, s.batch * s.heads * s.seq), dq(dtype, q.count),
          dk(dtype, k.count), dv(dtype, k.count) {
        q.upload(x.q);
        k.upload(x.k);
        v.upload(x.v);
        dout.upload(x.dout);
    }
};

// Which kernels ran: the emulation counts launches by kernel name (a GPU build cannot tell; the checks are
// skipped there).
#if defined(RELORA_NO_EMULATION_CHECKS)
constexpr bool kCountsLaunches = false;
uint64_t tensor_core_launches() { return 0; }
#else
}  // namespace
extern "C" uint64_t relora_emu_launches_named(const char *substring);
namespace {
constexpr bool kCountsLaunches = true;
uint64_t tensor_core_launches() { return relora_emu_launches_named("_mma_kernel"); }
#endif

// Whether a call goes to the tensor-core kernels (attention.cuh's mma_eligible: the tests' buffers are aligned).
bool uses_tensor_cores(int32_t dtype, const AttnShape &s) {
    const char *flag = getenv("RELORA_ATTENTION_TENSOR_CORES");
    return dtype == RELORA_DTYPE_BF16 && (s.dim == 64 || s.dim == 128) && !(flag && strcmp(flag, "0") == 0);
}

// RELORA_ATTENTION_TENSOR_CORES=0 for the lifetime of the guard (the escape hatch to the CUDA-core kernels).
struct CudaCoresOnly {
    bool active;
    explicit CudaCoresOnly(bool on) : active(on) {
        if (active) setenv("RELORA_ATTENTION_TENSOR_CORES", "0", 1);
    }
    ~CudaCoresOnly() {
        if (active) unsetenv("RELORA_ATTENTION_TENSOR_CORES");
    }
};

bool test_attention_case(int32_t dtype, const AttnShape &s, bool repeat_backward = false, bool cuda_cores = false) {
    const CudaCoresOnly guard(cuda_cores);
    const bool tc = uses_tensor_cores(dtype, s);
    const AttnData x = attention_inputs(s, dtype, 200 + (uint64_t)s.seq);
    AttnTensors a(dtype, s, x);
    const char *path = tc ? " (tensor cores)" : cuda_cores ? " (CUDA cores forced)" : "";
    const std::string fwd = attn_label("attention_forward", dtype, s) + path;
    const std::string bwd = attn_label("attention_backward", dtype, s) + path;
    const uint64_t launches = tensor_core_launches();
    EXPECT_OK(fwd.c_str(), api.attention_forward(a.q.buffer.ptr, a.k.buffer.ptr, a.v.buffer.ptr, a.out.buffer.ptr,
                                                 (float *)a.lse.buffer.ptr, s.batch, s.seq, s.heads, s.kv_heads, s.dim,
                                                 dtype, nullptr));
    const std::vector<float> out = a.out.download(), lse = a.lse.download();
    const FwdRef f = reference_forward(s, x, dtype, tc);
    bool ok = check_bounds(fwd + " out", out, f.out, f.out_bound);
    ok &= check_bounds(fwd + " lse", lse, f.lse, f.lse_bound);
    EXPECT_OK(bwd.c_str(), api.attention_backward(a.dout.buffer.ptr, a.q.buffer.ptr, a.k.buffer.ptr, a.v.buffer.ptr,
                                                  a.out.buffer.ptr, (const float *)a.lse.buffer.ptr, a.dq.buffer.ptr,
                                                  a.dk.buffer.ptr, a.dv.buffer.ptr, s.batch, s.seq, s.heads, s.kv_heads,
                                                  s.dim, dtype, nullptr));
    if (kCountsLaunches) {
        // forward, dQ and dK/dV: three tensor-core launches, or none
        const uint64_t ran = tensor_core_launches() - launches, want = tc ? 3 : 0;
        record(ran == want, (bwd + " kernels").c_str(), "%llu tensor-core launches, want %llu", (unsigned long long)ran,
               (unsigned long long)want);
        ok &= ran == want;
    }
    const BwdRef g = reference_backward(s, x, out, lse, dtype, tc);
    const std::vector<float> dq = a.dq.download(), dk = a.dk.download(), dv = a.dv.download();
    ok &= check_bounds(bwd + " dq", dq, g.dq, g.dq_bound);
    ok &= check_bounds(bwd + " dk", dk, g.dk, g.dk_bound);
    ok &= check_bounds(bwd + " dv", dv, g.dv, g.dv_bound);
    if (repeat_backward) {
        // No atomics: a second run gives the same bits.
        EXPECT_OK(bwd.c_str(), api.attention_backward(a.dout.buffer.ptr, a.q.buffer.ptr, a.k.buffer.ptr, a.v.buffer.ptr,
                                                      a.out.buffer.ptr, (const float *)a.lse.buffer.ptr, a.dq.buffer.ptr,
                                                      a.dk.buffer.ptr, a.dv.buffer.ptr, s.batch, s.seq, s.heads, s.kv_heads,
                                                      s.dim, dtype, nullptr));
        ok &= check_bits(bwd + " dq repeatable", a.dq.download(), dq);
        ok &= check_bits(bwd + " dk repeatable", a.dk.download(), dk);
        ok &= check_bits(bwd + " dv repeatable", a.dv.download(), dv);
    }
    return ok;
}

// The backward is the gradient of the forward: L = sum out * dout, differentiated by central differences of the
// double reference forward (step 1e-3: truncation error ~ h^2 |f'''| ~ 1e-6, rounding ~ 1e-16 / h), against
// the kernel. Bound: 1e-4 absolute + 1e-4 relative (the f32 kernel's error is ~1e-6 at these sizes); for the
// tensor-core kernels (bf16) also reference_backward's bound, plus how far the exact gradient lies from the
// reference built on the kernel's stored out and lse (out rounded to bf16 moves D_i = dO_i . O_i), both in double.
bool test_attention_gradient(int32_t dtype, const AttnShape &s) {
    const bool tc = uses_tensor_cores(dtype, s);
    AttnData x = attention_inputs(s, dtype, 300);
    AttnTensors a(dtype, s, x);
    const std::string label = attn_label("attention_backward finite differences", dtype, s) + (tc ? " (tensor cores)" : "");
    const char *name = label.c_str();
    EXPECT_OK(name, api.attention_forward(a.q.buffer.ptr, a.k.buffer.ptr, a.v.buffer.ptr, a.out.buffer.ptr,
                                          (float *)a.lse.buffer.ptr, s.batch, s.seq, s.heads, s.kv_heads, s.dim, dtype,
                                          nullptr));
    EXPECT_OK(name, api.attention_backward(a.dout.buffer.ptr, a.q.buffer.ptr, a.k.buffer.ptr, a.v.buffer.ptr,
                                           a.out.buffer.ptr, (const float *)a.lse.buffer.ptr, a.dq.buffer.ptr,
                                           a.dk.buffer.ptr, a.dv.buffer.ptr, s.batch, s.seq, s.heads, s.kv_heads, s.dim,
                                           dtype, nullptr));
    // The reference forward in double, evaluated on perturbed inputs held as doubles.
    struct Dbl {
        std::vector<double> q, k, v;
    } base{std::vector<double>(x.q.begin(), x.q.end()), std::vector<double>(x.k.begin(), x.k.end()),
           std::vector<double>(x.v.begin(), x.v.end())};
    const double scale = attn_scale(s.dim);
    auto loss = [&](const Dbl &in) {
        const int64_t T = s.seq, D = s.dim, H = s.heads, KV = s.kv_heads, G = H / KV;
        double total = 0;
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t i = 0; i < T; ++i) {
                std::vector<double> sv((size_t)(i + 1));
                double m = -INFINITY, l = 0;
                for (int64_t j = 0; j <= i; ++j) {
                    double dot = 0;
                    for (int64_t d = 0; d < D; ++d) dot += in.q[(size_t)(i * H * D + h * D + d)] * in.k[(size_t)(j * KV * D + h / G * D + d)];
                    sv[(size_t)j] = scale * dot;
                    m = std::max(m, sv[(size_t)j]);
                }
                for (int64_t j = 0; j <= i; ++j) l += exp(sv[(size_t)j] - m);
                for (int64_t d = 0; d < D; ++d) {
                    double o = 0;
                    for (int64_t j = 0; j <= i; ++j) o += exp(sv[(size_t)j] - m) / l * in.v[(size_t)(j * KV * D + h / G * D + d)];
                    total += o * x.dout[(size_t)(i * H * D + h * D + d)];
                }
            }
        }
        return total;
    };
    const double step = 1e-3;
    auto numeric = [&](std::vector<double> Dbl::*member) {
        std::vector<double> grad((base.*member).size());
        for (size_t e = 0; e < grad.size(); ++e) {
            Dbl plus = base, minus = base;
            (plus.*member)[e] += step;
            (minus.*member)[e] -= step;
            grad[e] = (loss(plus) - loss(minus)) / (2 * step);
        }
        return grad;
    };
    bool ok = true;
    // The kernel's bound around the reference on its own out and lse, and that reference's distance from the
    // reference on the exact out and lse (f32 kernels: covered by the fixed slack).
    const BwdRef kernel_ref = reference_backward(s, x, a.out.download(), a.lse.download(), dtype, tc);
    const FwdRef exact_fwd = reference_forward(s, x, dtype, tc);
    const BwdRef exact_ref = reference_backward(s, x, std::vector<float>(exact_fwd.out.begin(), exact_fwd.out.end()),
                                                std::vector<float>(exact_fwd.lse.begin(), exact_fwd.lse.end()), dtype, tc);
    const struct {
        const char *what;
        std::vector<double> Dbl::*input;
        const Tensor *grad;
        const std::vector<double> *ref, *ref_bound, *exact;
    } parts[] = {{"dq", &Dbl::q, &a.dq, &kernel_ref.dq, &kernel_ref.dq_bound, &exact_ref.dq},
                 {"dk", &Dbl::k, &a.dk, &kernel_ref.dk, &kernel_ref.dk_bound, &exact_ref.dk},
                 {"dv", &Dbl::v, &a.dv, &kernel_ref.dv, &kernel_ref.dv_bound, &exact_ref.dv}};
    for (const auto &part : parts) {
        const std::vector<double> fd = numeric(part.input);
        std::vector<double> bound(fd.size());
        for (size_t e = 0; e < fd.size(); ++e) {
            bound[e] = 1e-4 + 1e-4 * fabs(fd[e]);
            if (tc) bound[e] += (*part.ref_bound)[e] + fabs((*part.ref)[e] - (*part.exact)[e]);
        }
        ok &= check_bounds(label + " " + part.what, part.grad->download(), fd, bound);
    }
    return ok;
}

// ---- Cross-entropy ------------------------------------------------------------------------------------------------
// loss = m + log(sum_j exp(x_j - m)) - x_t. f32: x - m rounds by u |x - m|, expf adds 2 ulp, the sum of V terms
// (V/256 per thread in sequence, then a tree of depth 8) adds (V/256 + 8) u, so sum is within
// (V/256 + 11) u + u max|x - m| relative; logf adds 2 ulp of log(sum) and the two adds u each of their
// magnitudes: |err| <= (V/256 + 11) u + u max|x - m| + 4u (|m| + |log sum| + |x_t|).
// grad_j = exp(x_j - m) * (scale / sum) - scale [j = t]: relative to the softmax term
// (V/256 + 11) u + u |x_j - m| + u max|x - m| + 3u, plus u |grad_j| for the subtraction; bf16 adds ub |grad_j|.
// pad > 0: rows stored vocab + pad apart, the padding NaN (read, it would poison the row) and left as it was.
bool test_cross_entropy(int32_t dtype, int64_t rows, int64_t vocab, bool with_grad, int64_t pad = 0) {
    const float grad_scale = 0.25f;
    std::vector<float> logits = stored(uniform((size_t)(rows * vocab), -6.0f, 6.0f, 400 + (uint64_t)vocab), dtype);
    std::vector<int32_t> targets((size_t)rows);
    for (int64_t r = 0; r < rows; ++r) {
        targets[(size_t)r] = r % 3 == 1 ? -1 : (int32_t)((r * 7919 + 13) % vocab);
    }
    if (rows > 2) {  // one row with a large shift: the max subtraction matters
        for (int64_t j = 0; j < vocab; ++j) logits[(size_t)(2 * vocab + j)] += 1000.0f;
        logits = stored(logits, dtype);
    }
    const int64_t ld = vocab + pad;
    std::vector<float> stored_logits((size_t)(rows * ld), NAN);
    for (int64_t r = 0; r < rows; ++r) std::copy_n(logits.begin() + r * vocab, vocab, stored_logits.begin() + r * ld);
    Tensor tl(dtype, rows * ld), tloss(RELORA_DTYPE_F32, rows);
    Buffer tt(rows * 4);
    tl.upload(stored_logits);
    tt.upload(targets.data(), rows * 4);
    char name[128];
    snprintf(name, sizeof name, "cross_entropy%s %s [%lld, %lld]%s", with_grad ? "+grad" : "", dtype_name(dtype),
             (long long)rows, (long long)vocab, pad ? " padded rows" : "");
    EXPECT_OK(name, api.cross_entropy(tl.buffer.ptr, (const int32_t *)tt.ptr, (float *)tloss.buffer.ptr, rows, vocab,
                                      pad ? ld : 0, with_grad ? 1 : 0, grad_scale, dtype, nullptr));
    const std::vector<float> losses = tloss.download(), stored_grads = tl.download();
    std::vector<float> grads((size_t)(rows * vocab));
    bool pad_kept = true;
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < ld; ++j) {
            const float v = stored_grads[(size_t)(r * ld + j)];
            if (j < vocab) grads[(size_t)(r * vocab + j)] = v;
            else pad_kept &= std::isnan(v);
        }
    }
    if (pad) record(pad_kept, (std::string(name) + ": padding untouched").c_str(), "%s", pad_kept ? "" : "written");
    std::vector<double> rl((size_t)rows), bl((size_t)rows), rg(logits.size()), bg(logits.size());
    const double V = (double)vocab;
    for (int64_t r = 0; r < rows; ++r) {
        const float *x = logits.data() + r * vocab;
        const int32_t t = targets[(size_t)r];
        if (t < 0) {  // exact zeros
            rl[(size_t)r] = 0;
            bl[(size_t)r] = 0;
            for (int64_t j = 0; j < vocab; ++j) {
                rg[(size_t)(r * vocab + j)] = with_grad ? 0 : x[j];
                bg[(size_t)(r * vocab + j)] = 0;
            }
            continue;
        }
        double m = -INFINITY, spread = 0, sum = 0;
        for (int64_t j = 0; j < vocab; ++j) m = std::max(m, (double)x[j]);
        for (int64_t j = 0; j < vocab; ++j) {
            sum += exp(x[j] - m);
            spread = std::max(spread, m - x[j]);
        }
        const double ls = log(sum);
        rl[(size_t)r] = m + ls - x[t];
        bl[(size_t)r] = 2 * ((V / 256 + 11) * kU32 + kU32 * spread + 4 * kU32 * (fabs(m) + fabs(ls) + fabs((double)x[t])));
        for (int64_t j = 0; j < vocab; ++j) {
            const size_t e = (size_t)(r * vocab + j);
            if (!with_grad) {
                rg[e] = x[j];
                bg[e] = 0;
                continue;
            }
            const double soft = grad_scale * exp(x[j] - m) / sum;
            rg[e] = soft - (j == t ? grad_scale : 0.0);
            bg[e] = 2 * (((V / 256 + 14) * kU32 + kU32 * (m - x[j]) + kU32 * spread) * soft + kU32 * fabs(rg[e])) +
                    (dtype == RELORA_DTYPE_BF16 ? kUBF16 : 0) * fabs(rg[e]) + 1e-30;
        }
    }
    bool ok = check_bounds(std::string(name) + " loss", losses, rl, bl);
    ok &= check_bounds(std::string(name) + (with_grad ? " grad" : " logits kept"), grads, rg, bg);
    return ok && pad_kept;
}

// A target >= vocab: NaN loss for that row, and the next synchronize reports it once.
bool test_cross_entropy_bad_target() {
    const int64_t rows = 3, vocab = 5;
    const std::vector<float> logits = uniform((size_t)(rows * vocab), -1.0f, 1.0f, 450);
    const int32_t targets[3] = {1, 5, 0};
    Tensor tl(RELORA_DTYPE_F32, rows * vocab), tloss(RELORA_DTYPE_F32, rows);
    Buffer tt(rows * 4);
    tl.upload(logits);
    tt.upload(targets, sizeof targets);
    const char *name = "cross_entropy target >= vocab";
    EXPECT_OK(name, api.cross_entropy(tl.buffer.ptr, (const int32_t *)tt.ptr, (float *)tloss.buffer.ptr, rows, vocab, 0, 1,
                                      1.0f, RELORA_DTYPE_F32, nullptr));
    const relora_status first = api.stream_synchronize(nullptr);
    const std::string message = api.last_error();
    const relora_status second = api.stream_synchronize(nullptr);
    float losses[3];
    tloss.buffer.download(losses, sizeof losses);
    const bool ok = first == RELORA_ERR_INVALID_ARGUMENT && second == RELORA_OK && isnan(losses[1]) &&
                    !isnan(losses[0]) && !isnan(losses[2]) && message.find("row 1") != std::string::npos;
    record(ok, name, "sync %d then %d, losses %g %g %g (%s)", (int)first, (int)second, (double)losses[0],
           (double)losses[1], (double)losses[2], message.c_str());
    return ok;
}

// rope_at: rows at positions position + r of a table of table_len positions must be the bits the CPU's rotation
// gives at those positions (the `rope` entry's, whose table has the same values at every position).
bool test_rope_at(int32_t dtype, int64_t table_len, int64_t position, int64_t rows, int64_t heads, int64_t dim) {
    const int64_t n = rows * heads * dim, half = dim / 2;
    const std::vector<float> x = stored(uniform((size_t)n, -3.0f, 3.0f, 400 + (uint64_t)position), dtype);
    const std::vector<float> table = rope_table(table_len, dim, 10000.0f);
    Tensor tx(dtype, n), ttable(RELORA_DTYPE_F32, (int64_t)table.size());
    tx.upload(x);
    ttable.upload(table);
    char name[128];
    snprintf(name, sizeof name, "rope_at %s [table %lld, positions %lld + %lld rows, %lld x %lld]", dtype_name(dtype),
             (long long)table_len, (long long)position, (long long)rows, (long long)heads, (long long)dim);
    EXPECT_OK(name, api.rope_at(tx.buffer.ptr, (const float *)ttable.buffer.ptr, table_len, position, rows, heads, dim,
                                dtype, nullptr));
    std::vector<float> want(x);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t pos = position + r;
        for (int64_t h = 0; h < heads; ++h) {
            float *v = want.data() + r * heads * dim + h * dim;
            for (int64_t i = 0; i < half; ++i) {
                const float c = table[(size_t)(pos * half + i)], sn = table[(size_t)((table_len + pos) * half + i)];
                const float a = v[i], b = v[i + half];
                v[i] = a * c - b * sn;
                v[i + half] = b * c + a * sn;
            }
        }
    }
    return check_bits(name, tx.download(), stored(want, dtype));
}

// attention_decode: the query row i over cache rows 0 ..= i is row i of causal attention, so the forward's
// double reference and its bounds apply (the decode kernel's error terms are a subset of the forward's: the
// same D-term dots, exp and sequential T-term sums, no tile rescales). k and v of the case are the cache.
bool test_attention_decode(int32_t dtype, const AttnShape &s) {
    const AttnData x = attention_inputs(s, dtype, 500 + (uint64_t)s.seq);
    const FwdRef f = reference_forward(s, x, dtype, false);
    const int64_t width = s.heads * s.dim;
    Tensor k(dtype, s.seq * s.kv_heads * s.dim), v(dtype, k.count), q(dtype, width), out(dtype, width);
    k.upload(x.k);
    v.upload(x.v);
    bool ok = true;
    for (int64_t i : {(int64_t)0, s.seq / 2, s.seq - 1}) {
        const std::string name = attn_label("attention_decode", dtype, s) + " position " + std::to_string(i);
        q.upload(std::vector<float>(x.q.begin() + i * width, x.q.begin() + (i + 1) * width));
        EXPECT_OK(name.c_str(), api.attention_decode(q.buffer.ptr, k.buffer.ptr, v.buffer.ptr, out.buffer.ptr, i,
                                                     s.heads, s.kv_heads, s.dim, dtype, nullptr));
        ok &= check_bounds(name, out.download(), std::vector<double>(f.out.begin() + i * width, f.out.begin() + (i + 1) * width),
                           std::vector<double>(f.out_bound.begin() + i * width, f.out_bound.begin() + (i + 1) * width));
    }
    return ok;
}

bool test_attention_arguments() {
    void *p = (void *)16;
    const relora_status a = api.attention_forward(p, p, p, p, (float *)p, 1, 4, 2, 1, 129, RELORA_DTYPE_F32, nullptr);
    const relora_status b = api.attention_forward(p, p, p, p, (float *)p, 1, 4, 3, 2, 8, RELORA_DTYPE_F32, nullptr);
    const relora_status c = api.attention_backward(p, p, p, p, p, (const float *)p, p, p, p, 1, 4, 2, 0, 8,
                                                   RELORA_DTYPE_F32, nullptr);
    const relora_status d = api.rope(p, (const float *)p, 1, 4, 2, 7, 0, RELORA_DTYPE_F32, nullptr);
    const relora_status e = api.cross_entropy(p, (const int32_t *)p, (float *)p, 2, 8, 0, 0, 1.0f, 7, nullptr);
    const relora_status e2 = api.cross_entropy(p, (const int32_t *)p, (float *)p, 2, 8, 7, 0, 1.0f, RELORA_DTYPE_F32, nullptr);
    const relora_status z = api.attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, 2, 1, 8,
                                                  RELORA_DTYPE_F32, nullptr);
    const relora_status f = api.rope_at(p, (const float *)p, 8, 7, 2, 2, 8, RELORA_DTYPE_F32, nullptr);
    const relora_status g = api.attention_decode(p, p, p, p, -1, 2, 1, 8, RELORA_DTYPE_F32, nullptr);
    const relora_status h = api.attention_decode(p, p, p, p, 3, 3, 2, 8, RELORA_DTYPE_F32, nullptr);
    const bool ok = a == RELORA_ERR_INVALID_ARGUMENT && b == RELORA_ERR_INVALID_ARGUMENT &&
                    c == RELORA_ERR_INVALID_ARGUMENT && d == RELORA_ERR_INVALID_ARGUMENT &&
                    e == RELORA_ERR_INVALID_ARGUMENT && e2 == RELORA_ERR_INVALID_ARGUMENT && z == RELORA_OK && f == RELORA_ERR_INVALID_ARGUMENT &&
                    g == RELORA_ERR_INVALID_ARGUMENT && h == RELORA_ERR_INVALID_ARGUMENT;
    record(ok, "attention/rope/cross_entropy arguments", "head_dim 129 %d, heads 3/2 %d, kv_heads 0 %d, odd rope dim %d, "
           "dtype 7 %d, empty batch %d, rope_at past the table %d, decode position -1 %d, decode heads 3/2 %d", a, b, c, d,
           e, z, f, g, h);
    return ok;
}

}  // namespace

bool run_attention_suite() {
    bool ok = true;
    for (int32_t dtype : {RELORA_DTYPE_F32, RELORA_DTYPE_BF16}) {
        ok &= test_rope(dtype, 2, 7, 3, 16, 10000.0f, false);
        ok &= test_rope(dtype, 1, 33, 2, 64, 500000.0f, true);
        ok &= test_rope(dtype, 1, 3, 1, 2, 10000.0f, false);
        ok &= test_rope_at(dtype, 64, 0, 1, 3, 16);
        ok &= test_rope_at(dtype, 64, 37, 1, 2, 64);
        ok &= test_rope_at(dtype, 64, 60, 4, 2, 8);
    }
    const int32_t f32 = RELORA_DTYPE_F32, bf16 = RELORA_DTYPE_BF16;
    ok &= test_attention_case(f32, {2, 1, 4, 2, 8});
    ok &= test_attention_case(f32, {1, 7, 4, 4, 16}, true);
    ok &= test_attention_case(f32, {2, 33, 4, 2, 16});
    ok &= test_attention_case(f32, {1, 70, 2, 1, 64});
    ok &= test_attention_case(f32, {1, 40, 2, 1, 128});  // the 8-row backward tiles
    ok &= test_attention_case(f32, {1, 9, 2, 2, 24});
    ok &= test_attention_case(bf16, {1, 70, 4, 2, 16});
    // The tensor-core kernels (bf16, head_dim 64 and 128): 64-row query tiles, 64-key (D 64) or 32-key (D 128)
    // tiles, 32-row query tiles in dK/dV; lengths 1, below, at, just past and well past the tiles; GQA 4/1, 4/2,
    // 2/1 and plain multi-head; batch 2; bit-identical backward reruns.
    ok &= test_attention_case(bf16, {1, 1, 2, 1, 64});
    ok &= test_attention_case(bf16, {2, 33, 4, 2, 64});
    ok &= test_attention_case(bf16, {1, 64, 2, 2, 64});
    ok &= test_attention_case(bf16, {1, 65, 4, 1, 64}, true);
    ok &= test_attention_case(bf16, {1, 150, 2, 1, 64});
    ok &= test_attention_case(bf16, {1, 17, 2, 1, 128}, true);
    ok &= test_attention_case(bf16, {2, 32, 2, 1, 128});
    ok &= test_attention_case(bf16, {1, 97, 3, 3, 128});
    // The escape hatch: RELORA_ATTENTION_TENSOR_CORES=0 sends the same shapes to the CUDA-core kernels.
    ok &= test_attention_case(bf16, {1, 70, 4, 2, 64}, false, true);
    // Decode over a KV cache: lengths below, at and past a 128-key tile; GQA 4/2, 4/1, MHA; head_dim 16 to 128.
    ok &= test_attention_decode(f32, {1, 9, 4, 2, 16});
    ok &= test_attention_decode(f32, {1, 200, 4, 1, 64});
    ok &= test_attention_decode(f32, {1, 129, 2, 2, 128});
    ok &= test_attention_decode(bf16, {1, 70, 4, 2, 64});
    ok &= test_attention_gradient(f32, {1, 5, 2, 1, 8});
    ok &= test_attention_gradient(bf16, {1, 6, 2, 1, 64});
    ok &= test_attention_gradient(bf16, {1, 5, 2, 1, 128});
    for (int32_t dtype : {f32, bf16}) {
        ok &= test_cross_entropy(dtype, 1, 1, true);
        ok &= test_cross_entropy(dtype, 5, 37, true);
        ok &= test_cross_entropy(dtype, 4, 1000, true);
        ok &= test_cross_entropy(dtype, 4, 1000, false);
        ok &= test_cross_entropy(dtype, 5, 37, true, 11);
        ok &= test_cross_entropy(dtype, 4, 1000, false, 8);
    }
    ok &= test_cross_entropy_bad_target();
    ok &= test_attention_arguments();
    return ok;
}
