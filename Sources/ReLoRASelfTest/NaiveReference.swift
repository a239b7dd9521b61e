import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain

/// Naive Double references of the Backend ops for the conformance suite: plain loops over the
/// definitions in `Backend.swift`, written for reading, not speed. Each returns, next to every value,
/// its magnitude: the sum of the absolute values of the terms it is computed from, which is what a
/// forward-error bound scales with (`ConformanceSuite.tolerance`).
enum NaiveReference {
    /// A reference result: values and their magnitudes, same layout.
    struct Result {
        var value: [Double]
        var magnitude: [Double]

        init(count: Int) {
            value = [Double](repeating: 0, count: count)
            magnitude = [Double](repeating: 0, count: count)
        }
    }

    // MARK: matmul

    /// `c = alpha * s * op(a) op(b) + beta * c0`; `c0` is not read when `beta == 0` (BLAS semantics).
    static func matmul(_ a: [Float], _ b: [Float], _ c0: [Float], m: Int, n: Int, k: Int, transA: Bool, transB: Bool,
                       alpha: Double, beta: Double, s: Double) -> Result {
        var r = Result(count: m * n)
        for i in 0..<m {
            for j in 0..<n {
                var sum = 0.0, abs = 0.0
                for p in 0..<k {
                    let av = Double(transA ? a[p * m + i] : a[i * k + p])
                    let bv = Double(transB ? b[j * k + p] : b[p * n + j])
                    sum += av * bv
                    abs += Swift.abs(av * bv)
                }
                let c = beta == 0 ? 0 : beta * Double(c0[i * n + j])
                r.value[i * n + j] = alpha * s * sum + c
                r.magnitude[i * n + j] = Swift.abs(alpha * s) * abs + Swift.abs(c)
            }
        }
        return r
    }

    // MARK: RMSNorm

    /// `out = x / sqrt(mean(x^2) + eps) * w` per row; `rstd[row]`.
    static func rmsnormForward(_ x: [Float], _ w: [Float], rows: Int, dim: Int, eps: Double) -> (out: Result, rstd: [Double]) {
        var out = Result(count: rows * dim)
        var rstd = [Double](repeating: 0, count: rows)
        for r in 0..<rows {
            var ss = 0.0
            for i in 0..<dim { ss += Double(x[r * dim + i]) * Double(x[r * dim + i]) }
            let s = 1 / (ss / Double(dim) + eps).squareRoot()
            rstd[r] = s
            for i in 0..<dim {
                let v = Double(x[r * dim + i]) * s * Double(w[i])
                out.value[r * dim + i] = v
                out.magnitude[r * dim + i] = Swift.abs(v)  // every term positive: relative error bound
            }
        }
        return (out, rstd)
    }

    /// Gradients of `sum(out * dy)` added to `dx0`, `dw0`: with s = rstd and g = w * dy,
    /// `dx_i = s g_i - s^3 x_i (sum_j g_j x_j) / dim`, `dw_i = sum_rows dy_i x_i s`.
    static func rmsnormBackward(_ dy: [Float], _ x: [Float], _ w: [Float], dx0: [Float], dw0: [Float], rows: Int, dim: Int,
                                eps: Double) -> (dx: Result, dw: Result) {
        var dx = Result(count: rows * dim), dw = Result(count: dim)
        for i in 0..<dim { dw.value[i] = Double(dw0[i]); dw.magnitude[i] = Swift.abs(Double(dw0[i])) }
        for r in 0..<rows {
            var ss = 0.0
            for i in 0..<dim { ss += Double(x[r * dim + i]) * Double(x[r * dim + i]) }
            let s = 1 / (ss / Double(dim) + eps).squareRoot()
            var dot = 0.0, dotAbs = 0.0
            for j in 0..<dim {
                let t = Double(w[j]) * Double(dy[r * dim + j]) * Double(x[r * dim + j])
                dot += t
                dotAbs += Swift.abs(t)
            }
            for i in 0..<dim {
                let g = Double(w[i]) * Double(dy[r * dim + i]), xi = Double(x[r * dim + i])
                let idx = r * dim + i
                dx.value[idx] = Double(dx0[idx]) + s * g - s * s * s * xi * dot / Double(dim)
                dx.magnitude[idx] = Swift.abs(Double(dx0[idx])) + s * Swift.abs(g) + s * s * s * Swift.abs(xi) * dotAbs / Double(dim)
                let t = Double(dy[idx]) * xi * s
                dw.value[i] += t
                dw.magnitude[i] += Swift.abs(t)
            }
        }
        return (dx, dw)
    }

    // MARK: RoPE

    /// Hugging Face rotate-half RoPE: pair (i, i + d/2) of each head rotated by `pos * theta^(-2i/d)`
    /// (`-angle` when `inverse`). Also returns the largest angle, which the tolerance scales with.
    static func rope(_ x: [Float], batch: Int, seqLen: Int, heads: Int, headDim d: Int, theta: Double,
                     inverse: Bool) -> (result: Result, maxAngle: Double) {
        var r = Result(count: x.count)
        var maxAngle = 0.0
        let half = d / 2, width = heads * d
        for n in 0..<(batch * seqLen) {
            let pos = Double(n % seqLen)
            for h in 0..<heads {
                for i in 0..<half {
                    let angle = pos * Foundation.pow(theta, -Double(2 * i) / Double(d))
                    maxAngle = max(maxAngle, angle)
                    let c = Foundation.cos(angle), s = (inverse ? -1 : 1) * Foundation.sin(angle)
                    let ia = n * width + h * d + i, ib = ia + half
                    let a = Double(x[ia]), b = Double(x[ib])
                    r.value[ia] = a * c - b * s
                    r.value[ib] = b * c + a * s
                    r.magnitude[ia] = Swift.abs(a) + Swift.abs(b)
                    r.magnitude[ib] = Swift.abs(a) + Swift.abs(b)
                }
            }
        }
        return (r, maxAngle)
    }

    // MARK: Attention

    /// Sizes of an attention problem; q/out rows are `heads * headDim` wide, k/v rows `kvHeads * headDim`.
    struct AttentionShape {
        var batch, seqLen, heads, kvHeads, headDim: Int
        var group: Int { heads / kvHeads }
        var scale: Double { 1 / Double(headDim).squareRoot() }
        func q(_ b: Int, _ t: Int, _ h: Int, _ e: Int) -> Int { (b * seqLen + t) * heads * headDim + h * headDim + e }
        func kv(_ b: Int, _ t: Int, _ h: Int, _ e: Int) -> Int { (b * seqLen + t) * kvHeads * headDim + h * headDim + e }
        func lse(_ b: Int, _ h: Int, _ t: Int) -> Int { (b * heads + h) * seqLen + t }
        var description: String { "\(batch)x\(seqLen) heads \(heads)/\(kvHeads) dim \(headDim)" }
    }

    /// Causal softmax probabilities of query row `i` of head `h`: `P[j]` for `j <= i`, the log-sum-exp,
    /// and the row's score magnitude `max_j scale * sum_e |q_e k_je|` (exp turns an absolute score
    /// error into a relative error of P, so the tolerances scale with it).
    static func attentionProbabilities(_ q: [Float], _ k: [Float], _ s: AttentionShape, b: Int, h: Int,
                                       i: Int) -> (p: [Double], lse: Double, scoreMagnitude: Double) {
        let kvh = h / s.group
        var scores = [Double](repeating: 0, count: i + 1)
        var magnitude = 0.0
        for j in 0...i {
            var dot = 0.0, abs = 0.0
            for e in 0..<s.headDim {
                let t = Double(q[s.q(b, i, h, e)]) * Double(k[s.kv(b, j, kvh, e)])
                dot += t
                abs += Swift.abs(t)
            }
            scores[j] = dot * s.scale
            magnitude = max(magnitude, abs * s.scale)
        }
        let mx = scores.max()!
        let z = scores.reduce(0.0) { $0 + Foundation.exp($1 - mx) }
        return (scores.map { Foundation.exp($0 - mx) / z }, mx + Foundation.log(z), magnitude)
    }

    /// Forward: `out`, `lse`, and per query row (lse layout) the score magnitude.
    static func attentionForward(_ q: [Float], _ k: [Float], _ v: [Float], _ s: AttentionShape)
        -> (out: Result, lse: [Double], scoreMagnitude: [Double]) {
        var out = Result(count: q.count)
        var lse = [Double](repeating: 0, count: s.batch * s.heads * s.seqLen), mags = lse
        for b in 0..<s.batch {
            for h in 0..<s.heads {
                let kvh = h / s.group
                for i in 0..<s.seqLen {
                    let (p, l, a) = attentionProbabilities(q, k, s, b: b, h: h, i: i)
                    lse[s.lse(b, h, i)] = l
                    mags[s.lse(b, h, i)] = a
                    for e in 0..<s.headDim {
                        var acc = 0.0, abs = 0.0
                        for j in 0...i {
                            acc += p[j] * Double(v[s.kv(b, j, kvh, e)])
                            abs += p[j] * Swift.abs(Double(v[s.kv(b, j, kvh, e)]))
                        }
                        out.value[s.q(b, i, h, e)] = acc
                        out.magnitude[s.q(b, i, h, e)] = abs
                    }
                }
            }
        }
        return (out, lse, mags)
    }

    /// Backward of `sum(out * dout)`: with P the causal softmax, O = P V, D_i = dO_i . O_i,
    /// `dV_j = sum_i P_ij dO_i`, `dS_ij = P_ij (dO_i . v_j - D_i)`, `dQ_i = scale sum_j dS_ij k_j`,
    /// `dK_j = scale sum_i dS_ij q_i`; dK, dV sum over the query heads of a kv head's group.
    /// Magnitudes use `P_ij (sum_e |dO_ie v_je| + sum_e |dO_ie O_ie|)` for |dS_ij| (dS cancels).
    static func attentionBackward(_ dout: [Float], _ q: [Float], _ k: [Float], _ v: [Float], _ s: AttentionShape)
        -> (dq: Result, dk: Result, dv: Result) {
        var dq = Result(count: q.count), dk = Result(count: k.count), dv = Result(count: v.count)
        let d = s.headDim
        for b in 0..<s.batch {
            for h in 0..<s.heads {
                let kvh = h / s.group
                for i in 0..<s.seqLen {
                    let p = attentionProbabilities(q, k, s, b: b, h: h, i: i).p
                    // O_i and D_i = dO_i . O_i (with its magnitude).
                    var o = [Double](repeating: 0, count: d)
                    for e in 0..<d { for j in 0...i { o[e] += p[j] * Double(v[s.kv(b, j, kvh, e)]) } }
                    var dD = 0.0, dDAbs = 0.0
                    for e in 0..<d {
                        dD += Double(dout[s.q(b, i, h, e)]) * o[e]
                        dDAbs += Swift.abs(Double(dout[s.q(b, i, h, e)]) * o[e])
                    }
                    for j in 0...i {
                        var dP = 0.0, dPAbs = 0.0
                        for e in 0..<d {
                            let t = Double(dout[s.q(b, i, h, e)]) * Double(v[s.kv(b, j, kvh, e)])
                            dP += t
                            dPAbs += Swift.abs(t)
                        }
                        let dS = p[j] * (dP - dD), dSAbs = p[j] * (dPAbs + dDAbs)
                        for e in 0..<d {
                            let qi = Double(q[s.q(b, i, h, e)]), kj = Double(k[s.kv(b, j, kvh, e)])
                            let doi = Double(dout[s.q(b, i, h, e)])
                            dq.value[s.q(b, i, h, e)] += s.scale * dS * kj
                            dq.magnitude[s.q(b, i, h, e)] += s.scale * dSAbs * Swift.abs(kj)
                            dk.value[s.kv(b, j, kvh, e)] += s.scale * dS * qi
                            dk.magnitude[s.kv(b, j, kvh, e)] += s.scale * dSAbs * Swift.abs(qi)
                            dv.value[s.kv(b, j, kvh, e)] += p[j] * doi
                            dv.magnitude[s.kv(b, j, kvh, e)] += p[j] * Swift.abs(doi)
                        }
                    }
                }
            }
        }
        return (dq, dk, dv)
    }

    // MARK: SwiGLU

    /// `out = silu(g) * u`, and the backward: `dup = dy silu(g)`, `dgate = dy u sig(g) (1 + g (1 - sig(g)))`.
    /// The dgate magnitude `|dy u sig| (1 + |g|)` covers the cancellation in `1 - sig` for large g.
    static func swiglu(_ gate: [Float], _ up: [Float], _ dy: [Float]) -> (out: Result, dgate: Result, dup: Result) {
        var out = Result(count: gate.count), dg = out, du = out
        for i in 0..<gate.count {
            let g = Double(gate[i]), u = Double(up[i]), d = Double(dy[i])
            let sig = 1 / (1 + Foundation.exp(-g))
            out.value[i] = g * sig * u
            out.magnitude[i] = Swift.abs(out.value[i])
            du.value[i] = d * g * sig
            du.magnitude[i] = Swift.abs(du.value[i])
            dg.value[i] = d * u * sig * (1 + g * (1 - sig))
            dg.magnitude[i] = Swift.abs(d * u * sig) * (1 + Swift.abs(g))
        }
        return (out, dg, du)
    }

    // MARK: Embedding

    /// `dtable0` plus `dout[n]` added to row `ids[n]`, in token order.
    static func embeddingBackward(ids: [Int32], dout: [Float], dtable0: [Float], dim: Int) -> Result {
        var r = Result(count: dtable0.count)
        for i in 0..<dtable0.count { r.value[i] = Double(dtable0[i]); r.magnitude[i] = Swift.abs(Double(dtable0[i])) }
        for (n, id) in ids.enumerated() {
            for c in 0..<dim {
                r.value[Int(id) * dim + c] += Double(dout[n * dim + c])
                r.magnitude[Int(id) * dim + c] += Swift.abs(Double(dout[n * dim + c]))
            }
        }
        return r
    }

    // MARK: Cross-entropy

    /// Per-row loss `logsumexp(row) - row[target]` (0 where the target is negative; magnitude
    /// `1 + |max| + |lse| + |row[target]|`: the sum of exps' relative error becomes an absolute error of
    /// the log) and the gradient of `gradScale * sum(losses)`: `gradScale (softmax - onehot)` (magnitude
    /// `|gradScale| (p (1 + |x| + |max|) + onehot)`: exp's argument error is relative to |x - max|).
    static func crossEntropy(_ logits: [Float], targets: [Int32], rows: Int, vocab: Int, gradScale: Double)
        -> (loss: Result, grad: Result) {
        var loss = Result(count: rows), grad = Result(count: rows * vocab)
        for r in 0..<rows {
            let target = Int(targets[r])
            guard target >= 0 else { continue }
            let row = (0..<vocab).map { Double(logits[r * vocab + $0]) }
            let mx = row.max()!
            let z = row.reduce(0.0) { $0 + Foundation.exp($1 - mx) }
            let lse = mx + Foundation.log(z)
            loss.value[r] = lse - row[target]
            loss.magnitude[r] = 1 + Swift.abs(mx) + Swift.abs(lse) + Swift.abs(row[target])
            for j in 0..<vocab {
                let p = Foundation.exp(row[j] - mx) / z
                let onehot: Double = j == target ? 1 : 0
                grad.value[r * vocab + j] = gradScale * (p - onehot)
                grad.magnitude[r * vocab + j] = Swift.abs(gradScale) * (p * (1 + Swift.abs(row[j]) + Swift.abs(mx)) + onehot)
            }
        }
        return (loss, grad)
    }

    // MARK: AdamW

    /// PyTorch's AdamW for `grads.count` steps from `p0, m0, v0`, step numbers starting at `firstStep`:
    /// `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    /// p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)`.
    /// The magnitudes are first-order absolute error bounds in units of u (propagated through the steps:
    /// each rounding adds u times its operands, earlier errors are carried by the same recursions), so
    /// the suite's tolerance multiplies them by 2u only.
    static func adamw(p0: [Float], m0: [Float], v0: [Float], grads: [[Float]], lr: Double, beta1: Double, beta2: Double,
                      eps: Double, weightDecay: Double, firstStep: Int) -> (p: Result, m: Result, v: Result) {
        var p = Result(count: p0.count), m = p, v = p
        for i in 0..<p0.count {
            var pv = Double(p0[i]), mv = Double(m0[i]), vv = Double(v0[i])
            var ep = 0.0, em = 0.0, ev = 0.0  // error bounds / u
            for (t, g32) in grads.enumerated() {
                let step = Double(firstStep + t), g = Double(g32[i])
                let bc1 = 1 - Foundation.pow(beta1, step), bc2 = 1 - Foundation.pow(beta2, step)
                let decay = 1 - lr * weightDecay
                // m, v: two products and a sum (3 roundings); carried error scales by beta.
                em = beta1 * em + 3 * (Swift.abs(beta1 * mv) + Swift.abs((1 - beta1) * g))
                ev = beta2 * ev + 4 * (Swift.abs(beta2 * vv) + Swift.abs((1 - beta2) * g * g))
                mv = beta1 * mv + (1 - beta1) * g
                vv = beta2 * vv + (1 - beta2) * g * g
                let root = (vv / bc2).squareRoot()
                let denom = root + eps
                // sqrt halves v's relative error; the divisions, sqrt, bias corrections and + eps round ~6 times.
                let eDenom = (root > 0 ? ev / bc2 / (2 * root) : (ev / bc2).squareRoot()) + 6 * denom
                let update = lr / bc1 * mv / denom
                let eUpdate = lr / bc1 * (em / denom + Swift.abs(mv) * eDenom / (denom * denom)) + 4 * Swift.abs(update)
                ep = decay * ep + 3 * (Swift.abs(pv) + Swift.abs(update)) + eUpdate
                pv = pv * decay - update
            }
            p.value[i] = pv; p.magnitude[i] = ep
            m.value[i] = mv; m.magnitude[i] = em
            v.value[i] = vv; v.magnitude[i] = ev
        }
        return (p, m, v)
    }

    // MARK: Prune

    /// The tensor after `rule` and the number of entries zeroed. Magnitude: k = ceil(ratio * n); the k-th
    /// smallest |x| is the threshold; every |x| <= threshold is zeroed (ties included). Random: entry i
    /// is zeroed where `uniform(i) < p`, `uniform` given by the caller.
    /// m and v after `Backend.pruneMoments`, and the positions zeroed: the score `|m| / (sqrt(v) + eps)`
    /// in f32 (the op's contract: each operation correctly rounded), k = ceil(ratio * n), every position
    /// whose score is <= the k-th smallest score zeroed in both (found by sorting).
    static func pruneMoments(m: [Float], v: [Float], ratio: Double, eps: Float) -> (m: [Float], v: [Float], zeroed: Int) {
        let n = m.count
        let k = Int((ratio * Double(n)).rounded(.up))
        guard k > 0 else { return (m, v, 0) }
        guard k < n else { return ([Float](repeating: 0, count: n), [Float](repeating: 0, count: n), n) }
        let scores = (0..<n).map { Swift.abs(m[$0]) / (v[$0].squareRoot() + eps) }
        let threshold = scores.sorted()[k - 1]
        var outM = m, outV = v, zeroed = 0
        for i in 0..<n where scores[i] <= threshold { outM[i] = 0; outV[i] = 0; zeroed += 1 }
        return (outM, outV, zeroed)
    }

    static func prune(_ x: [Float], _ rule: PruneRule, uniform: (Int) -> Float) -> (values: [Float], zeroed: Int) {
        var out = x, zeroed = 0
        switch rule {
        case .all:
            return ([Float](repeating: 0, count: x.count), x.count)
        case .random(let probability):
            for i in 0..<x.count where Double(uniform(i)) < probability { out[i] = 0; zeroed += 1 }
        case .magnitude(let ratio):
            let k = Int((ratio * Double(x.count)).rounded(.up))
            guard k > 0 else { return (x, 0) }
            guard k < x.count else { return ([Float](repeating: 0, count: x.count), x.count) }
            let threshold = x.map { Swift.abs($0) }.sorted()[k - 1]
            for i in 0..<x.count where Swift.abs(x[i]) <= threshold { out[i] = 0; zeroed += 1 }
        }
        return (out, zeroed)
    }
}
