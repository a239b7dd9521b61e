import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain

/// The layer ops (matmul, RMSNorm, RoPE, attention, SwiGLU, embedding, cross-entropy): forward and
/// backward against `NaiveReference` in each compute dtype, and every backward against finite differences
/// of its forward in f32. Sizes are odd or prime on purpose (no multiple of 8 or 16), so tails and
/// tiling edges are exercised; "overwrite" outputs start as NaN, "accumulate" outputs with values.
extension ConformanceSuite {
    // MARK: matmul

    func checkMatmul() {
        let m = 37, n = 29, k = 31
        for dtype in computeDTypes {
            for (transA, transB) in [(false, false), (false, true), (true, false), (true, true)] {
                let layout = "\(m)x\(n)x\(k) \(transA ? "T" : "N")\(transB ? "T" : "N")"
                let (a, av) = tensor([m * k], dtype, values(m * k, -1, 1))
                let (b, bv) = tensor([k * n], dtype, values(k * n, -1, 1))
                let (c, cv) = tensor([m * n], dtype, values(m * n, -1, 1))
                // k products summed, then alpha * s, the product, beta * c and the add: k + 4 roundings in
                // the f32 accumulator, one into the dtype. (A 1.001 scaling error is ~150x past it.)
                let tol = tolerance(acc: Double(k + 4), io: 1, dtype)
                backend.matmul(a, b, c, m: m, n: n, k: k, transA: transA, transB: transB, alpha: 0.75, beta: -0.5, alphaScale: nil)
                let ref = NaiveReference.matmul(av, bv, cv, m: m, n: n, k: k, transA: transA, transB: transB,
                                                alpha: 0.75, beta: -0.5, s: 1)
                expect("matmul", layout + " alpha 0.75 beta -0.5", dtype, got: backend.download(c), want: ref.value,
                       magnitude: ref.magnitude, tolerance: tol)
                // A device-side scale (f32, as LoRA's scale tensors), and beta = 0 over NaN: c is not read
                // (BLAS semantics; the model relies on it for outputs allocated without zeroing).
                let (s, sv) = tensor([1], .f32, [1.25])
                let c2 = output([m * n], dtype)
                backend.matmul(a, b, c2, m: m, n: n, k: k, transA: transA, transB: transB, alpha: -0.5, beta: 0, alphaScale: s)
                let ref2 = NaiveReference.matmul(av, bv, cv, m: m, n: n, k: k, transA: transA, transB: transB,
                                                 alpha: -0.5, beta: 0, s: Double(sv[0]))
                expect("matmul", layout + " alpha -0.5 alphaScale 1.25 beta 0 over NaN", dtype, got: backend.download(c2),
                       want: ref2.value, magnitude: ref2.magnitude, tolerance: tol)
                // alpha 1 (every LoRA GEMM of a step): the CUDA backend hands cuBLAS the scale and a device beta of 0
                // with no kernel and no clearing of c, so this is where a library reading c would show.
                let c3 = output([m * n], dtype)
                backend.matmul(a, b, c3, m: m, n: n, k: k, transA: transA, transB: transB, alpha: 1, beta: 0, alphaScale: s)
                let ref3 = NaiveReference.matmul(av, bv, cv, m: m, n: n, k: k, transA: transA, transB: transB,
                                                 alpha: 1, beta: 0, s: Double(sv[0]))
                expect("matmul", layout + " alphaScale 1.25 beta 0 over NaN", dtype, got: backend.download(c3),
                       want: ref3.value, magnitude: ref3.magnitude, tolerance: tol)
            }
        }
        checkLinearBackward()
    }

    /// The linear layer `y = x W^T` (x `[N, in]`, W `[out, in]`) and its backward through matmul as the
    /// model does it: `dx = dy W`, `dW += dy^T x`, checked by finite differences of `sum(y * r)`.
    func checkLinearBackward() {
        let tokens = 11, inDim = 13, outDim = 9
        let shape = "\(tokens)x\(inDim) -> \(outDim)"
        let (x, xv) = tensor([tokens, inDim], .f32, values(tokens * inDim, -1, 1))
        let (w, wv) = tensor([outDim, inDim], .f32, values(outDim * inDim, -1, 1))
        let r = values(tokens * outDim, -1, 1)
        let (dy, _) = tensor([tokens, outDim], .f32, r)
        let y = output([tokens, outDim], .f32)
        let dx = output([tokens, inDim], .f32)
        let dw = backend.makeTensor([outDim, inDim], dtype: .f32, tag: .workspace, zeroed: true)
        backend.matmul(dy, w, dx, m: tokens, n: inDim, k: outDim, transA: false, transB: false, alpha: 1, beta: 0, alphaScale: nil)
        backend.matmul(dy, x, dw, m: outDim, n: inDim, k: tokens, transA: true, transB: false, alpha: 1, beta: 1, alphaScale: nil)
        func loss() -> Double {
            backend.matmul(x, w, y, m: tokens, n: outDim, k: inDim, transA: false, transB: true, alpha: 1, beta: 0, alphaScale: nil)
            return Self.dot(backend.download(y), r)
        }
        func reference(_ x: [Float], _ w: [Float]) -> Double {
            Self.dot(NaiveReference.matmul(x, w, [], m: tokens, n: outDim, k: inDim, transA: false, transB: true,
                                           alpha: 1, beta: 0, s: 1).value, r)
        }
        finiteDifferences("linear backward dx", shape, x: xv, in: x, analytic: backend.download(dx), loss: loss,
                          reference: { reference($0, wv) })
        finiteDifferences("linear backward dW", shape, x: wv, in: w, analytic: backend.download(dw), loss: loss,
                          reference: { reference(xv, $0) })
    }

    // MARK: RMSNorm

    func checkRMSNorm() {
        let rows = 11, dim = 37, eps: Float = 1e-5
        let shape = "\(rows)x\(dim)"
        for dtype in computeDTypes {
            // Row 3 is all zeros (rstd = 1/sqrt(eps), out = 0), row 5 tiny (eps matters).
            var xs = values(rows * dim, -2, 2)
            for i in 0..<dim { xs[3 * dim + i] = 0; xs[5 * dim + i] *= 1e-3 }
            let (x, xv) = tensor([rows, dim], dtype, xs)
            let (w, wv) = tensor([dim], dtype, values(dim, -1.5, 1.5))
            // rstd and the weight's gradient are f32 in every compute dtype (as the model keeps them).
            let out = output([rows, dim], dtype), rstd = output([rows], .f32)
            backend.rmsnormForward(x, weight: w, out: out, rstd: rstd, rows: rows, dim: dim, eps: eps)
            let ref = NaiveReference.rmsnormForward(xv, wv, rows: rows, dim: dim, eps: Double(eps))
            // out = x * s * w: the sum of dim squares (dim roundings), / dim, + eps, sqrt, 1/, two products;
            // no cancellation (all terms positive), so relative to |out|; one rounding into the dtype.
            expect("rmsnormForward out", shape, dtype, got: backend.download(out), want: ref.out.value,
                   magnitude: ref.out.magnitude, tolerance: tolerance(acc: Double(dim + 6), io: 1, dtype))
            expect("rmsnormForward rstd", shape, dtype, got: backend.download(rstd), want: ref.rstd,
                   magnitude: ref.rstd, tolerance: tolerance(acc: Double(dim + 4), io: 1, dtype))

            // Backward accumulates into dx and dweight: start them from values.
            let dyv = values(rows * dim, -1, 1)
            let (dy, dyh) = tensor([rows, dim], dtype, dyv)
            let (dx, dx0) = tensor([rows, dim], dtype, values(rows * dim, -0.5, 0.5))
            let (dw, dw0) = tensor([dim], .f32, values(dim, -0.5, 0.5))
            backend.rmsnormBackward(dy, x: x, weight: w, rstd: rstd, dx: dx, dweight: dw, rows: rows, dim: dim)
            let bwd = NaiveReference.rmsnormBackward(dyh, xv, wv, dx0: dx0, dw0: dw0, rows: rows, dim: dim, eps: Double(eps))
            // dx: the row's dot (dim roundings) and the rest (~10); rstd enters cubed: 3 + 1 (output) + 1
            // (accumulate) roundings in the dtype. (The bounds of the f32 rstd and dweight keep the dtype's
            // roundings too: looser than their f32 storage needs, the same bounds in every compute dtype.)
            expect("rmsnormBackward dx (accumulates)", shape, dtype, got: backend.download(dx), want: bwd.dx.value,
                   magnitude: bwd.dx.magnitude, tolerance: tolerance(acc: Double(dim + 10), io: 5, dtype))
            // dw: a sum over rows of dy x s (rows + 2 roundings, + accumulate); rstd rounded once.
            expect("rmsnormBackward dweight (accumulates)", shape, dtype, got: backend.download(dw), want: bwd.dw.value,
                   magnitude: bwd.dw.magnitude, tolerance: tolerance(acc: Double(rows + 6), io: 3, dtype))
        }
        // Finite differences of sum(out * r) (inputs without the zero row: near x = 0 rstd varies on the
        // scale sqrt(eps * dim) < h, where the difference quotient stops approximating the derivative).
        let xs = values(rows * dim, -2, 2), ws = values(dim, -1.5, 1.5), r = values(rows * dim, -1, 1)
        let (x, _) = tensor([rows, dim], .f32, xs), (w, _) = tensor([dim], .f32, ws), (dy, _) = tensor([rows, dim], .f32, r)
        let out = output([rows, dim], .f32), rstd = output([rows], .f32)
        backend.rmsnormForward(x, weight: w, out: out, rstd: rstd, rows: rows, dim: dim, eps: eps)
        let dx = backend.makeTensor([rows, dim], dtype: .f32, tag: .workspace, zeroed: true)
        let dw = backend.makeTensor([dim], dtype: .f32, tag: .workspace, zeroed: true)
        backend.rmsnormBackward(dy, x: x, weight: w, rstd: rstd, dx: dx, dweight: dw, rows: rows, dim: dim)
        func loss() -> Double {
            backend.rmsnormForward(x, weight: w, out: out, rstd: rstd, rows: rows, dim: dim, eps: eps)
            return Self.dot(backend.download(out), r)
        }
        func reference(_ x: [Float], _ w: [Float]) -> Double {
            Self.dot(NaiveReference.rmsnormForward(x, w, rows: rows, dim: dim, eps: Double(eps)).out.value, r)
        }
        finiteDifferences("rmsnormBackward dx", shape, x: xs, in: x, analytic: backend.download(dx), loss: loss,
                          reference: { reference($0, ws) })
        finiteDifferences("rmsnormBackward dweight", shape, x: ws, in: w, analytic: backend.download(dw), samples: dim,
                          loss: loss, reference: { reference(xs, $0) })
    }

    // MARK: RoPE

    func checkRope() {
        let batch = 2, seqLen = 13, heads = 3, headDim = 6, theta: Float = 10000
        let shape = "\(batch)x\(seqLen) heads \(heads) dim \(headDim)"
        let count = batch * seqLen * heads * headDim
        for dtype in computeDTypes {
            let xs = values(count, -1, 1)
            for inverse in [false, true] {
                let (x, xv) = tensor([batch * seqLen, heads * headDim], dtype, xs)
                backend.rope(x, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim, theta: theta, inverse: inverse)
                let (ref, maxAngle) = NaiveReference.rope(xv, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim,
                                                          theta: Double(theta), inverse: inverse)
                // a cos - b sin: cos and sin rounded (2), two products and a sum (3), relative to |a| + |b|; an
                // implementation that computes the angle pos * theta^(-2i/d) in f32 (as Hugging Face does)
                // is off by ~2u * angle radians, which moves the result by that times |a| + |b|.
                expect(inverse ? "rope inverse" : "rope", shape + " theta 1e4", dtype, got: backend.download(x),
                       want: ref.value, magnitude: ref.magnitude, tolerance: tolerance(acc: 6 + 2 * maxAngle, io: 1, dtype))
            }
            // ropeAt (the KV-cache decode step): rows p ..< p + r of one sequence, rotated at their positions,
            // are the forward's rows (same reference, same bound).
            let (seqRef, seqAngle) = NaiveReference.rope(Array(xs.prefix(seqLen * heads * headDim)), batch: 1, seqLen: seqLen,
                                                         heads: heads, headDim: headDim, theta: Double(theta), inverse: false)
            let width = heads * headDim
            for (p, r) in [(0, 1), (seqLen - 1, 1), (4, 3)] {
                let (x, _) = tensor([r, width], dtype, Array(xs[(p * width)..<((p + r) * width)]))
                backend.ropeAt(x, rows: r, position: p, heads: heads, headDim: headDim, theta: theta)
                expect("ropeAt", "\(r) rows at \(p), heads \(heads) dim \(headDim)", dtype, got: backend.download(x),
                       want: Array(seqRef.value[(p * width)..<((p + r) * width)]),
                       magnitude: Array(seqRef.magnitude[(p * width)..<((p + r) * width)]),
                       tolerance: tolerance(acc: 6 + 2 * seqAngle, io: 1, dtype))
            }
            // The inverse undoes the forward (the rotation is orthogonal): twice the bound above.
            let (x, xv) = tensor([batch * seqLen, heads * headDim], dtype, xs)
            backend.rope(x, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim, theta: theta, inverse: false)
            backend.rope(x, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim, theta: theta, inverse: true)
            let maxAngle = Double(seqLen - 1)
            let pairMagnitude = (0..<count).map { i -> Double in
                let inHead = i % headDim, partner = inHead < headDim / 2 ? i + headDim / 2 : i - headDim / 2
                return Double(abs(xv[i]) + abs(xv[partner]))
            }
            expect("rope then inverse", shape + " theta 1e4", dtype, got: backend.download(x), want: xv.map(Double.init),
                   magnitude: pairMagnitude, tolerance: 2 * tolerance(acc: 6 + 2 * maxAngle, io: 1, dtype))
        }
        // The backward of rope is rope inverse: d sum(rope(x) * r) / dx = rope^T r.
        let xs = values(count, -1, 1), r = values(count, -1, 1)
        let (x, _) = tensor([batch * seqLen, heads * headDim], .f32, xs)
        let (grad, _) = tensor([batch * seqLen, heads * headDim], .f32, r)
        backend.rope(grad, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim, theta: theta, inverse: true)
        let work = output([batch * seqLen, heads * headDim], .f32)
        finiteDifferences("rope inverse (backward)", shape, x: xs, in: x, analytic: backend.download(grad), samples: 40,
                          loss: {
                              backend.copy(x, to: work)
                              backend.rope(work, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim, theta: theta,
                                           inverse: false)
                              return Self.dot(backend.download(work), r)
                          },
                          reference: {
                              Self.dot(NaiveReference.rope($0, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim,
                                                           theta: Double(theta), inverse: false).result.value, r)
                          })
    }

    // MARK: Attention

    func checkAttention() {
        // 3 query heads on 1 kv head (every head shares it), and 4 on 2 (a head-to-group mapping of
        // h % kvHeads instead of h / group shows); odd head dims, non-power-of-two lengths.
        let shapes = [NaiveReference.AttentionShape(batch: 2, seqLen: 7, heads: 3, kvHeads: 1, headDim: 6),
                      NaiveReference.AttentionShape(batch: 1, seqLen: 9, heads: 4, kvHeads: 2, headDim: 5)]
        for s in shapes {
            for dtype in computeDTypes { checkAttention(s, dtype) }
            checkAttentionGradients(s)
        }
        // head_dim 64, longer than one 64-row tile: the CUDA backend's tensor-core kernels in bf16 (P and dS
        // rounded to bf16 as matrix operands: the `io` terms of the tolerances), its f32 kernels in f32.
        let wide = NaiveReference.AttentionShape(batch: 1, seqLen: 70, heads: 2, kvHeads: 1, headDim: 64)
        for dtype in computeDTypes { checkAttention(wide, dtype) }
    }

    /// Tolerance constants of attention for a problem whose largest score magnitude is `a` and largest |lse| `l`.
    ///
    /// Forward: a score is a D-term dot (D + 2 roundings, relative to the score magnitude A); exp turns its
    /// absolute error into a relative error of P, twice (numerator and normalizer): 2 (D + 2) A u; the
    /// normalizer sums T terms and exp rounds (T + 6); `out = sum_j P_ij v_j` adds T roundings relative to
    /// sum P|v|. In the dtype: P and out may be stored (2) plus one spare. lse: score error + the log of a
    /// T-term sum + |lse| u.
    /// Backward: dS_ij = P_ij (dP_ij - D_i) has the errors of P (above, plus the stored lse's |l| u), of the
    /// two D-term dots, and of the stored O; dQ, dK, dV add sums over T (times the group) terms; all
    /// relative to the magnitudes of `NaiveReference.attentionBackward`. In the dtype: the stored out and
    /// lse, dS, and the output, with margin: 6.
    func attentionTolerances(_ s: NaiveReference.AttentionShape, a: Double, l: Double, _ dtype: DType)
        -> (out: Double, lse: Double, backward: Double) {
        let t = Double(s.seqLen), d = Double(s.headDim), g = Double(s.group)
        return (tolerance(acc: 2 * t + 8 + 2 * (d + 2) * a, io: 3, dtype),
                tolerance(acc: t + d + 8, io: 1, dtype),
                tolerance(acc: 2 * t * g + 2 * d + 16 + 4 * (d + 2) * a + l, io: 6, dtype))
    }

    func checkAttention(_ s: NaiveReference.AttentionShape, _ dtype: DType) {
        let n = s.batch * s.seqLen, qw = s.heads * s.headDim, kw = s.kvHeads * s.headDim
        let qs = values(n * qw, -1.5, 1.5), ks = values(n * kw, -1.5, 1.5), vs = values(n * kw, -1, 1)
        let (q, qv) = tensor([n, qw], dtype, qs), (k, kv) = tensor([n, kw], dtype, ks), (v, vv) = tensor([n, kw], dtype, vs)
        // lse is f32 in every compute dtype (as the model keeps it).
        let out = output([n, qw], dtype), lse = output([s.batch, s.heads, s.seqLen], .f32)
        backend.attentionForward(q: q, k: k, v: v, out: out, lse: lse, batch: s.batch, seqLen: s.seqLen, heads: s.heads,
                                 kvHeads: s.kvHeads, headDim: s.headDim)
        let ref = NaiveReference.attentionForward(qv, kv, vv, s)
        let a = ref.scoreMagnitude.max() ?? 0, l = ref.lse.map(abs).max() ?? 0
        let tol = attentionTolerances(s, a: a, l: l, dtype)
        let gotOut = backend.download(out), gotLse = backend.download(lse)
        expect("attentionForward out", s.description + " causal", dtype, got: gotOut, want: ref.out.value,
               magnitude: ref.out.magnitude, tolerance: tol.out)
        expect("attentionForward lse", s.description + " causal", dtype, got: gotLse, want: ref.lse,
               magnitude: zip(ref.scoreMagnitude, ref.lse).map { 1 + $0 + abs($1) }, tolerance: tol.lse)

        // attentionDecode (the KV-cache decode step): query row i of the first sequence over rows 0 ... i of
        // its k and v (the cache) is the forward's row i, within the forward's bound.
        for i in Set([0, s.seqLen / 2, s.seqLen - 1]).sorted() {
            let (qi, _) = tensor([1, qw], dtype, Array(qs[(i * qw)..<((i + 1) * qw)]))
            let (kc, _) = tensor([s.seqLen, kw], dtype, Array(ks.prefix(s.seqLen * kw)))
            let (vc, _) = tensor([s.seqLen, kw], dtype, Array(vs.prefix(s.seqLen * kw)))
            let oi = output([1, qw], dtype)
            backend.attentionDecode(q: qi, kCache: kc, vCache: vc, out: oi, position: i, heads: s.heads, kvHeads: s.kvHeads,
                                    headDim: s.headDim)
            expect("attentionDecode out", s.description + " position \(i)", dtype, got: backend.download(oi),
                   want: Array(ref.out.value[(i * qw)..<((i + 1) * qw)]),
                   magnitude: Array(ref.out.magnitude[(i * qw)..<((i + 1) * qw)]), tolerance: tol.out)
        }

        // Causality: changing the last position's keys and values must leave every earlier row's output
        // and lse bit-identical, and change the last row (else the check proves nothing).
        var ks2 = ks, vs2 = vs
        for b in 0..<s.batch { for c in 0..<kw { ks2[(b * s.seqLen + s.seqLen - 1) * kw + c] += 0.5; vs2[(b * s.seqLen + s.seqLen - 1) * kw + c] -= 0.75 } }
        let (k2, _) = tensor([n, kw], dtype, ks2), (v2, _) = tensor([n, kw], dtype, vs2)
        let out2 = output([n, qw], dtype), lse2 = output([s.batch, s.heads, s.seqLen], .f32)
        backend.attentionForward(q: q, k: k2, v: v2, out: out2, lse: lse2, batch: s.batch, seqLen: s.seqLen, heads: s.heads,
                                 kvHeads: s.kvHeads, headDim: s.headDim)
        let gotOut2 = backend.download(out2), gotLse2 = backend.download(lse2)
        guard [gotOut.count, gotOut2.count, gotLse.count, gotLse2.count] == [n * qw, n * qw, lse.count, lse.count] else {
            record("attentionForward causal (future k, v changed)", s.description, dtype.rawValue, maxError: .infinity,
                   bound: 0, passed: false, note: "download returned the wrong number of values")
            return
        }
        var earlier: [Int] = [], earlierLse: [Int] = [], lastChanged = false
        for b in 0..<s.batch {
            for t in 0..<s.seqLen {
                for c in 0..<qw {
                    let i = (b * s.seqLen + t) * qw + c
                    if t < s.seqLen - 1 { earlier.append(i) } else if gotOut2[i] != gotOut[i] { lastChanged = true }
                }
                for h in 0..<s.heads where t < s.seqLen - 1 { earlierLse.append(s.lse(b, h, t)) }
            }
        }
        if lastChanged {
            expectBits("attentionForward causal (future k, v changed)", s.description, dtype.rawValue,
                       got: earlier.map { gotOut2[$0] } + earlierLse.map { gotLse2[$0] },
                       want: earlier.map { gotOut[$0] } + earlierLse.map { gotLse[$0] })
        } else {
            record("attentionForward causal (future k, v changed)", s.description, dtype.rawValue, maxError: .infinity,
                   bound: 0, passed: false, note: "changing the last key and value did not change the last output row")
        }

        // Backward (overwrites dq, dk, dv: they start as NaN).
        let dos = values(n * qw, -1, 1)
        let (dout, dov) = tensor([n, qw], dtype, dos)
        let dq = output([n, qw], dtype), dk = output([n, kw], dtype), dv = output([n, kw], dtype)
        backend.attentionBackward(dout: dout, q: q, k: k, v: v, out: out, lse: lse, dq: dq, dk: dk, dv: dv, batch: s.batch,
                                  seqLen: s.seqLen, heads: s.heads, kvHeads: s.kvHeads, headDim: s.headDim)
        let bwd = NaiveReference.attentionBackward(dov, qv, kv, vv, s)
        for (name, t, r) in [("dq", dq, bwd.dq), ("dk", dk, bwd.dk), ("dv", dv, bwd.dv)] {
            expect("attentionBackward \(name)", s.description + " causal", dtype, got: backend.download(t), want: r.value,
                   magnitude: r.magnitude, tolerance: tol.backward)
        }
    }

    func checkAttentionGradients(_ s: NaiveReference.AttentionShape) {
        let n = s.batch * s.seqLen, qw = s.heads * s.headDim, kw = s.kvHeads * s.headDim
        let qs = values(n * qw, -1.5, 1.5), ks = values(n * kw, -1.5, 1.5), vs = values(n * kw, -1, 1), r = values(n * qw, -1, 1)
        let (q, _) = tensor([n, qw], .f32, qs), (k, _) = tensor([n, kw], .f32, ks), (v, _) = tensor([n, kw], .f32, vs)
        let (dout, _) = tensor([n, qw], .f32, r)
        let out = output([n, qw], .f32), lse = output([s.batch, s.heads, s.seqLen], .f32)
        let dq = output([n, qw], .f32), dk = output([n, kw], .f32), dv = output([n, kw], .f32)
        func forward() {
            backend.attentionForward(q: q, k: k, v: v, out: out, lse: lse, batch: s.batch, seqLen: s.seqLen, heads: s.heads,
                                     kvHeads: s.kvHeads, headDim: s.headDim)
        }
        forward()
        backend.attentionBackward(dout: dout, q: q, k: k, v: v, out: out, lse: lse, dq: dq, dk: dk, dv: dv, batch: s.batch,
                                  seqLen: s.seqLen, heads: s.heads, kvHeads: s.kvHeads, headDim: s.headDim)
        func loss() -> Double { forward(); return Self.dot(backend.download(out), r) }
        func reference(_ q: [Float], _ k: [Float], _ v: [Float]) -> Double {
            Self.dot(NaiveReference.attentionForward(q, k, v, s).out.value, r)
        }
        let shape = s.description + " causal"
        finiteDifferences("attentionBackward dq", shape, x: qs, in: q, analytic: backend.download(dq), samples: 40,
                          loss: loss, reference: { reference($0, ks, vs) })
        finiteDifferences("attentionBackward dk", shape, x: ks, in: k, analytic: backend.download(dk), samples: 40,
                          loss: loss, reference: { reference(qs, $0, vs) })
        finiteDifferences("attentionBackward dv", shape, x: vs, in: v, analytic: backend.download(dv), samples: 40,
                          loss: loss, reference: { reference(qs, ks, $0) })
    }

    // MARK: SwiGLU

    func checkSwiGLU() {
        let count = 101, shape = "101"
        for dtype in computeDTypes {
            let (gate, gv) = tensor([count], dtype, values(count, -6, 6))
            let (up, uv) = tensor([count], dtype, values(count, -1.5, 1.5))
            let (dy, dyv) = tensor([count], dtype, values(count, -1, 1))
            let out = output([count], dtype), dgate = output([count], dtype), dup = output([count], dtype)
            backend.swigluForward(gate: gate, up: up, out: out, count: count)
            backend.swigluBackward(dout: dy, gate: gate, up: up, dgate: dgate, dup: dup, count: count)
            let ref = NaiveReference.swiglu(gv, uv, dyv)
            // exp (~2 ulp, 4 allowed), 1 +, division, two products: 8; dgate's (1 + g (1 - sig)) adds 4 more,
            // with 1 - sig's cancellation in the magnitude.
            expect("swigluForward", shape, dtype, got: backend.download(out), want: ref.out.value, magnitude: ref.out.magnitude,
                   tolerance: tolerance(acc: 8, io: 1, dtype))
            expect("swigluBackward dup", shape, dtype, got: backend.download(dup), want: ref.dup.value,
                   magnitude: ref.dup.magnitude, tolerance: tolerance(acc: 8, io: 1, dtype))
            expect("swigluBackward dgate", shape, dtype, got: backend.download(dgate), want: ref.dgate.value,
                   magnitude: ref.dgate.magnitude, tolerance: tolerance(acc: 12, io: 1, dtype))
        }
        let gs = values(count, -6, 6), us = values(count, -1.5, 1.5), r = values(count, -1, 1)
        let (gate, _) = tensor([count], .f32, gs), (up, _) = tensor([count], .f32, us), (dy, _) = tensor([count], .f32, r)
        let out = output([count], .f32), dgate = output([count], .f32), dup = output([count], .f32)
        backend.swigluBackward(dout: dy, gate: gate, up: up, dgate: dgate, dup: dup, count: count)
        func loss() -> Double {
            backend.swigluForward(gate: gate, up: up, out: out, count: count)
            return Self.dot(backend.download(out), r)
        }
        func reference(_ g: [Float], _ u: [Float]) -> Double { Self.dot(NaiveReference.swiglu(g, u, r).out.value, r) }
        finiteDifferences("swigluBackward dgate", shape, x: gs, in: gate, analytic: backend.download(dgate), samples: 50,
                          loss: loss, reference: { reference($0, us) })
        finiteDifferences("swigluBackward dup", shape, x: us, in: up, analytic: backend.download(dup), samples: 50,
                          loss: loss, reference: { reference(gs, $0) })
    }

    // MARK: Embedding

    func checkEmbedding() {
        let vocab = 97, dim = 13
        // 14 tokens (2 x 7): id 5 three times, 96 (the last row) twice, 0 once.
        let idValues: [Int32] = [5, 0, 96, 5, 17, 42, 5, 96, 3, 88, 61, 29, 1, 70]
        let n = idValues.count, shape = "\(n) ids, vocab \(vocab) dim \(dim)"
        let idTensor = ids(idValues)
        for dtype in computeDTypes {
            let (table, tv) = tensor([vocab, dim], dtype, values(vocab * dim, -1, 1))
            let out = output([n, dim], dtype)
            backend.embeddingForward(ids: idTensor, table: table, out: out, dim: dim)
            expectBits("embeddingForward", shape, dtype.rawValue, got: backend.download(out),
                       want: idValues.flatMap { tv[Int($0) * dim..<(Int($0) + 1) * dim] })
            // Backward accumulates into dtable (f32, from values), repeated ids summing in token order: a row
            // hit c times rounds c times, each relative to the running |sum| (the bound allows the dtype's).
            let (dout, dov) = tensor([n, dim], dtype, values(n * dim, -1, 1))
            let (dtable, dt0) = tensor([vocab, dim], .f32, values(vocab * dim, -0.5, 0.5))  // f32, as the model's
            backend.embeddingBackward(ids: idTensor, dout: dout, dtable: dtable, dim: dim)
            let ref = NaiveReference.embeddingBackward(ids: idValues, dout: dov, dtable0: dt0, dim: dim)
            let hits = Double(idValues.reduce(into: [Int32: Int]()) { $0[$1, default: 0] += 1 }.values.max() ?? 1)
            expect("embeddingBackward (accumulates, repeated ids)", shape, dtype, got: backend.download(dtable),
                   want: ref.value, magnitude: ref.magnitude, tolerance: tolerance(acc: hits, io: hits, dtype))
        }
        let tvs = values(vocab * dim, -1, 1), r = values(n * dim, -1, 1)
        let (table, _) = tensor([vocab, dim], .f32, tvs), (dout, _) = tensor([n, dim], .f32, r)
        let dtable = backend.makeTensor([vocab, dim], dtype: .f32, tag: .workspace, zeroed: true)
        backend.embeddingBackward(ids: idTensor, dout: dout, dtable: dtable, dim: dim)
        let out = output([n, dim], .f32)
        finiteDifferences("embeddingBackward", shape, x: tvs, in: table, analytic: backend.download(dtable), samples: 97,
                          loss: {
                              backend.embeddingForward(ids: idTensor, table: table, out: out, dim: dim)
                              return Self.dot(backend.download(out), r)
                          },
                          reference: { t in Self.dot(idValues.flatMap { t[Int($0) * dim..<(Int($0) + 1) * dim] }, r) })
    }

    // MARK: Cross-entropy

    func checkCrossEntropy() {
        let rows = 14, vocab = 97, gradScale: Float = 0.37
        // Negative targets (-1 and -100, PyTorch's ignore index) at rows 2 and 9; the first and last class.
        let targetValues: [Int32] = [3, 0, -1, 96, 50, 7, 7, 12, 80, -100, 1, 95, 44, 21]
        let shape = "\(rows)x\(vocab), 2 ignored"
        let targets = ids(targetValues)
        var logitValues = values(rows * vocab, -4, 4)
        logitValues[4 * vocab + 50] = 30   // a dominant logit: the max shift must keep exp finite
        logitValues[6 * vocab + 2] = 25
        for dtype in computeDTypes {
            let (logits, lv) = tensor([rows, vocab], dtype, logitValues)
            let losses = output([rows], .f32)  // per-row losses are f32 in every compute dtype, as the model's
            let sum = backend.crossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: nil)
            let ref = NaiveReference.crossEntropy(lv, targets: targetValues, rows: rows, vocab: vocab, gradScale: Double(gradScale))
            // A vocab-term sum of exps (V roundings, + exp's) becomes an absolute error of its log; max, the
            // target logit and lse add u each (in the magnitude). Ignored rows are exactly 0 (magnitude 0).
            let lossTol = tolerance(acc: Double(vocab + 8), io: 1, dtype)
            expect("crossEntropy losses", shape, dtype, got: backend.download(losses), want: ref.loss.value,
                   magnitude: ref.loss.magnitude, tolerance: lossTol)
            let sumBound = ref.loss.magnitude.reduce(0) { $0 + lossTol * $1 }
            let want = ref.loss.value.reduce(0, +)
            expectScalar("crossEntropy returned sum", shape, dtype.rawValue, got: sum, want: want, bound: sumBound)

            // The gradient path: same sum, logits overwritten by gradScale (softmax - onehot), ignored rows 0.
            let (glogits, _) = tensor([rows, vocab], dtype, logitValues)
            let losses2 = output([rows], .f32)
            let sum2 = backend.crossEntropy(logits: glogits, targets: targets, losses: losses2, rows: rows, vocab: vocab,
                                            gradScale: gradScale)
            expectScalar("crossEntropy returned sum (gradScale path)", shape, dtype.rawValue, got: sum2, want: want, bound: sumBound)
            expect("crossEntropy losses (gradScale path)", shape, dtype, got: backend.download(losses2), want: ref.loss.value,
                   magnitude: ref.loss.magnitude, tolerance: lossTol)
            // softmax: exp and the normalizer as above, the scale, the - 1 of the target class: V + 10.
            expect("crossEntropy dlogits (gradScale 0.37)", shape, dtype, got: backend.download(glogits), want: ref.grad.value,
                   magnitude: ref.grad.magnitude, tolerance: tolerance(acc: Double(vocab + 10), io: 2, dtype))
            // The deferred sum (a training step's, read after the step's synchronize): the same bits and gradient.
            let (dlogits, _) = tensor([rows, vocab], dtype, logitValues)
            let deferred = backend.crossEntropyDeferred(logits: dlogits, targets: targets, losses: output([rows], .f32), rows: rows,
                                                        vocab: vocab, gradScale: gradScale)
            let deferredSum = deferred.value
            record("crossEntropyDeferred sum bits", shape, dtype.rawValue, maxError: deferredSum.bitPattern == sum2.bitPattern ? 0 : .infinity,
                   bound: 0, passed: deferredSum.bitPattern == sum2.bitPattern, note: "\(deferredSum) vs \(sum2)")
            expectBytes("crossEntropyDeferred dlogits", shape, dtype.rawValue, got: backend.downloadRaw(dlogits),
                        want: backend.downloadRaw(glogits))
        }
        // Finite differences of gradScale * sum(losses): fresh logits for every evaluation.
        let (x, _) = tensor([rows, vocab], .f32, logitValues)
        let (grad, _) = tensor([rows, vocab], .f32, logitValues)
        let losses = output([rows], .f32)
        _ = backend.crossEntropy(logits: grad, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale)
        let work = output([rows, vocab], .f32)
        finiteDifferences("crossEntropy dlogits", shape, x: logitValues, in: x, analytic: backend.download(grad), samples: 60,
                          loss: {
                              backend.copy(x, to: work)
                              return Double(gradScale) * backend.crossEntropy(logits: work, targets: targets, losses: losses,
                                                                              rows: rows, vocab: vocab, gradScale: nil)
                          },
                          reference: {
                              Double(gradScale) * NaiveReference.crossEntropy($0, targets: targetValues, rows: rows, vocab: vocab,
                                                                              gradScale: 1).loss.value.reduce(0, +)
                          })
    }
}
