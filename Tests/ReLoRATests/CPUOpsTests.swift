import XCTest
@testable import ReLoRA

/// Every CPU op against a naive Double reference (forward) and finite differences (backward).
final class CPUOpsTests: XCTestCase {
    let backend = CPUBackend()

    func testMatmulAllTransposesMatchNaive() {
        var rng = TestRNG(1)
        let m = 5, n = 7, k = 3
        for transA in [false, true] {
            for transB in [false, true] {
                let a = rng.floats(m * k), b = rng.floats(k * n), c0 = rng.floats(m * n)
                let ta = makeTensor(backend, [m * k], a), tb = makeTensor(backend, [k * n], b)
                let tc = makeTensor(backend, [m * n], c0)
                backend.matmul(ta, tb, tc, m: m, n: n, k: k, transA: transA, transB: transB, alpha: 0.5, beta: 2)
                let got = tc.toArray()
                for i in 0..<m {
                    for j in 0..<n {
                        var s = 0.0
                        for p in 0..<k {
                            let av = transA ? a[p * m + i] : a[i * k + p]
                            let bv = transB ? b[j * k + p] : b[p * n + j]
                            s += Double(av) * Double(bv)
                        }
                        let want = 0.5 * s + 2 * Double(c0[i * n + j])
                        XCTAssertEqual(Double(got[i * n + j]), want, accuracy: 1e-5, "transA \(transA) transB \(transB)")
                    }
                }
            }
        }
    }

    func testRMSNormForwardAndGradients() {
        var rng = TestRNG(2)
        let rows = 4, dim = 6
        let x = makeTensor(backend, [rows, dim], rng.floats(rows * dim))
        let w = makeTensor(backend, [dim], rng.floats(dim, 0.5, 1.5))
        let r = rng.floats(rows * dim)
        let out = backend.makeTensor([rows, dim], tag: .workspace), rstd = backend.makeTensor([rows], tag: .workspace)
        func loss() -> Double {
            backend.rmsnormForward(x, weight: w, out: out, rstd: rstd, rows: rows, dim: dim, eps: 1e-6)
            return dotDouble(out.toArray(), r)
        }
        _ = loss()
        // Forward against the definition.
        let xs = x.toArray(), ws = w.toArray(), got = out.toArray()
        for i in 0..<rows {
            let ms = (0..<dim).map { Double(xs[i * dim + $0] * xs[i * dim + $0]) }.reduce(0, +) / Double(dim)
            for j in 0..<dim {
                XCTAssertEqual(Double(got[i * dim + j]), Double(xs[i * dim + j]) / (ms + 1e-6).squareRoot() * Double(ws[j]), accuracy: 1e-5)
            }
        }
        let dx = backend.makeTensor([rows, dim], tag: .workspace), dw = backend.makeTensor([dim], tag: .workspace)
        backend.rmsnormBackward(makeTensor(backend, [rows, dim], r), x: x, weight: w, rstd: rstd, dx: dx, dweight: dw,
                                rows: rows, dim: dim)
        checkFiniteDifferences("rmsnorm dx", x, analytic: dx.toArray(), samples: 24, loss: loss)
        checkFiniteDifferences("rmsnorm dw", w, analytic: dw.toArray(), loss: loss)
    }

    func testRMSNormBackwardAccumulates() {
        var rng = TestRNG(3)
        let x = makeTensor(backend, [2, 4], rng.floats(8)), w = makeTensor(backend, [4], rng.floats(4))
        let out = backend.makeTensor([2, 4], tag: .workspace), rstd = backend.makeTensor([2], tag: .workspace)
        backend.rmsnormForward(x, weight: w, out: out, rstd: rstd, rows: 2, dim: 4, eps: 1e-6)
        let dy = makeTensor(backend, [2, 4], rng.floats(8))
        let dx1 = backend.makeTensor([2, 4], tag: .workspace), dw1 = backend.makeTensor([4], tag: .workspace)
        backend.rmsnormBackward(dy, x: x, weight: w, rstd: rstd, dx: dx1, dweight: dw1, rows: 2, dim: 4)
        let dx2 = makeTensor(backend, [2, 4], [Float](repeating: 1, count: 8)), dw2 = makeTensor(backend, [4], [1, 1, 1, 1])
        backend.rmsnormBackward(dy, x: x, weight: w, rstd: rstd, dx: dx2, dweight: dw2, rows: 2, dim: 4)
        XCTAssertEqual(dx2.toArray(), dx1.toArray().map { $0 + 1 })
        XCTAssertEqual(dw2.toArray(), dw1.toArray().map { $0 + 1 })
    }

    func testRopeMatchesRotateHalfAndInverseIsBackward() {
        var rng = TestRNG(4)
        let batch = 2, seqLen = 5, heads = 3, d = 8
        let values = rng.floats(batch * seqLen * heads * d)
        let x = makeTensor(backend, [batch * seqLen, heads * d], values)
        backend.rope(x, batch: batch, seqLen: seqLen, heads: heads, headDim: d, theta: 10000, inverse: false)
        let got = x.toArray()
        // Reference: q*cos + rotate_half(q)*sin with rotate_half(q) = cat(-q2, q1).
        for n in 0..<(batch * seqLen) {
            let pos = Double(n % seqLen)
            for h in 0..<heads {
                let base = n * heads * d + h * d
                for i in 0..<d {
                    let freq = 1 / pow(10000.0, Double(2 * (i % (d / 2))) / Double(d))
                    let rot = i < d / 2 ? -Double(values[base + i + d / 2]) : Double(values[base + i - d / 2])
                    let want = Double(values[base + i]) * cos(pos * freq) + rot * sin(pos * freq)
                    XCTAssertEqual(Double(got[base + i]), want, accuracy: 1e-5)
                }
            }
        }
        // The inverse undoes it (orthogonal rotation), so it is also the backward.
        backend.rope(x, batch: batch, seqLen: seqLen, heads: heads, headDim: d, theta: 10000, inverse: true)
        for (a, b) in zip(x.toArray(), values) { XCTAssertEqual(a, b, accuracy: 1e-6) }
        let r = rng.floats(values.count)
        let xin = makeTensor(backend, [batch * seqLen, heads * d], values)
        let work = backend.makeTensor([batch * seqLen, heads * d], tag: .workspace)
        func loss() -> Double {
            backend.copy(xin, to: work)
            backend.rope(work, batch: batch, seqLen: seqLen, heads: heads, headDim: d, theta: 10000, inverse: false)
            return dotDouble(work.toArray(), r)
        }
        let grad = makeTensor(backend, [batch * seqLen, heads * d], r)
        backend.rope(grad, batch: batch, seqLen: seqLen, heads: heads, headDim: d, theta: 10000, inverse: true)
        checkFiniteDifferences("rope dx", xin, analytic: grad.toArray(), samples: 40, loss: loss)
    }

    /// Naive causal GQA attention in Double: the reference for the forward.
    private func naiveAttention(q: [Float], k: [Float], v: [Float], batch: Int, seqLen t: Int, heads: Int,
                                kvHeads: Int, d: Int) -> [Double] {
        var out = [Double](repeating: 0, count: batch * t * heads * d)
        let group = heads / kvHeads
        for b in 0..<batch {
            for h in 0..<heads {
                let kvh = h / group
                for i in 0..<t {
                    var s = [Double](repeating: 0, count: i + 1)
                    for j in 0...i {
                        var dot = 0.0
                        for e in 0..<d {
                            dot += Double(q[(b * t + i) * heads * d + h * d + e]) * Double(k[(b * t + j) * kvHeads * d + kvh * d + e])
                        }
                        s[j] = dot / Double(d).squareRoot()
                    }
                    let mx = s.max()!
                    let ex = s.map { exp($0 - mx) }
                    let z = ex.reduce(0, +)
                    for e in 0..<d {
                        var acc = 0.0
                        for j in 0...i { acc += ex[j] / z * Double(v[(b * t + j) * kvHeads * d + kvh * d + e]) }
                        out[(b * t + i) * heads * d + h * d + e] = acc
                    }
                }
            }
        }
        return out
    }

    func testAttentionForwardAndGradientsWithGroupedQueryHeads() {
        var rng = TestRNG(5)
        let batch = 2, t = 5, heads = 4, kvHeads = 2, d = 4
        let n = batch * t
        let q = makeTensor(backend, [n, heads * d], rng.floats(n * heads * d, -1.5, 1.5))
        let k = makeTensor(backend, [n, kvHeads * d], rng.floats(n * kvHeads * d, -1.5, 1.5))
        let v = makeTensor(backend, [n, kvHeads * d], rng.floats(n * kvHeads * d))
        let out = backend.makeTensor([n, heads * d], tag: .workspace)
        let lse = backend.makeTensor([batch, heads, t], tag: .workspace)
        let r = rng.floats(n * heads * d)
        func loss() -> Double {
            backend.attentionForward(q: q, k: k, v: v, out: out, lse: lse, batch: batch, seqLen: t, heads: heads,
                                     kvHeads: kvHeads, headDim: d)
            return dotDouble(out.toArray(), r)
        }
        _ = loss()
        let want = naiveAttention(q: q.toArray(), k: k.toArray(), v: v.toArray(), batch: batch, seqLen: t,
                                  heads: heads, kvHeads: kvHeads, d: d)
        for (a, b) in zip(out.toArray(), want) { XCTAssertEqual(Double(a), b, accuracy: 1e-5) }
        let dq = backend.makeTensor([n, heads * d], tag: .workspace)
        let dk = backend.makeTensor([n, kvHeads * d], tag: .workspace), dv = backend.makeTensor([n, kvHeads * d], tag: .workspace)
        backend.attentionBackward(dout: makeTensor(backend, [n, heads * d], r), q: q, k: k, v: v, out: out, lse: lse,
                                  dq: dq, dk: dk, dv: dv, batch: batch, seqLen: t, heads: heads, kvHeads: kvHeads, headDim: d)
        checkFiniteDifferences("attention dq", q, analytic: dq.toArray(), samples: 40, loss: loss)
        checkFiniteDifferences("attention dk", k, analytic: dk.toArray(), samples: 40, loss: loss)
        checkFiniteDifferences("attention dv", v, analytic: dv.toArray(), samples: 40, loss: loss)
        // Causality: the first token's output depends only on the first key/value.
        let firstRow = Array(out.toArray()[0..<d])
        k.f32[kvHeads * d * 3] += 5
        v.f32[kvHeads * d * 3] += 5
        _ = loss()
        XCTAssertEqual(Array(out.toArray()[0..<d]), firstRow)
    }

    func testSwiGLUGradients() {
        var rng = TestRNG(6)
        let count = 50
        let gate = makeTensor(backend, [count], rng.floats(count, -4, 4)), up = makeTensor(backend, [count], rng.floats(count))
        let out = backend.makeTensor([count], tag: .workspace)
        let r = rng.floats(count)
        func loss() -> Double {
            backend.swigluForward(gate: gate, up: up, out: out, count: count)
            return dotDouble(out.toArray(), r)
        }
        _ = loss()
        for i in 0..<count {
            let g = Double(gate.f32[i])
            XCTAssertEqual(Double(out.f32[i]), g / (1 + exp(-g)) * Double(up.f32[i]), accuracy: 1e-6)
        }
        let dg = backend.makeTensor([count], tag: .workspace), du = backend.makeTensor([count], tag: .workspace)
        backend.swigluBackward(dout: makeTensor(backend, [count], r), gate: gate, up: up, dgate: dg, dup: du, count: count)
        checkFiniteDifferences("swiglu dgate", gate, analytic: dg.toArray(), samples: 50, loss: loss)
        checkFiniteDifferences("swiglu dup", up, analytic: du.toArray(), samples: 50, loss: loss)
    }

    func testEmbeddingLookupAndScatterWithRepeatedIds() {
        let dim = 3
        let table = makeTensor(backend, [4, dim], (0..<12).map { Float($0) })  // row r holds 3r, 3r+1, 3r+2
        let ids: [Int32] = [2, 0, 2, 3]
        let out = backend.makeTensor([4, dim], tag: .workspace)
        backend.embeddingForward(ids: ids, table: table, out: out, dim: dim)
        XCTAssertEqual(out.toArray(), [6, 7, 8, 0, 1, 2, 6, 7, 8, 9, 10, 11])
        let dout = makeTensor(backend, [4, dim], (0..<12).map { Float($0) * 0.5 })
        let dtable = makeTensor(backend, [4, dim], [Float](repeating: 1, count: 12))
        backend.embeddingBackward(ids: ids, dout: dout, dtable: dtable, dim: dim)
        // Row 2 gets dout rows 0 and 2, row 0 gets row 1, row 3 gets row 3, row 1 nothing; all on top of 1.
        let expected: [Float] = [2.5, 3, 3.5, 1, 1, 1, 4, 5, 6, 5.5, 6, 6.5]
        XCTAssertEqual(dtable.toArray(), expected)
    }

    func testCrossEntropyLossAndGradientWithIgnoredTargets() {
        var rng = TestRNG(7)
        let rows = 5, vocab = 9
        let values = rng.floats(rows * vocab, -3, 3)
        let targets: [Int32] = [3, -1, 0, 8, 4]
        let logits = makeTensor(backend, [rows, vocab], values)
        let losses = backend.makeTensor([rows], tag: .workspace)
        let sum = backend.crossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: nil)
        var want = 0.0
        for r in 0..<rows where targets[r] >= 0 {
            let row = values[(r * vocab)..<((r + 1) * vocab)].map(Double.init)
            let lse = log(row.map { exp($0) }.reduce(0, +))
            want += lse - row[Int(targets[r])]
        }
        XCTAssertEqual(sum, want, accuracy: 1e-5)
        XCTAssertEqual(losses.f32[1], 0)
        // Gradient of 0.7 * sum(losses) by finite differences on a fresh copy of the logits.
        let x = makeTensor(backend, [rows, vocab], values)
        let grad = makeTensor(backend, [rows, vocab], values)
        _ = backend.crossEntropy(logits: grad, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: 0.7)
        let work = backend.makeTensor([rows, vocab], tag: .workspace)
        func loss() -> Double {
            backend.copy(x, to: work)
            return 0.7 * backend.crossEntropy(logits: work, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: nil)
        }
        checkFiniteDifferences("cross-entropy dlogits", x, analytic: grad.toArray(), samples: 45, loss: loss)
        XCTAssertEqual(Array(grad.toArray()[vocab..<(2 * vocab)]), [Float](repeating: 0, count: vocab))
    }

    func testAdamWMatchesHandComputedSteps() {
        // Two steps of PyTorch's AdamW on p = [1, -2] with grads g1 = [0.5, 0.1], g2 = [-0.3, 0.2],
        // lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01, written out in Double.
        let p = makeTensor(backend, [2], [1, -2]), m = backend.makeTensor([2], tag: .optimizer), v = backend.makeTensor([2], tag: .optimizer)
        let lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01
        var want: [Double] = [1, -2], mw: [Double] = [0, 0], vw: [Double] = [0, 0]
        for (step, g) in [[0.5, 0.1], [-0.3, 0.2]].enumerated() {
            let t = Double(step + 1)
            for i in 0..<2 {
                want[i] *= 1 - lr * wd
                mw[i] = b1 * mw[i] + (1 - b1) * g[i]
                vw[i] = b2 * vw[i] + (1 - b2) * g[i] * g[i]
                let mhat = mw[i] / (1 - pow(b1, t)), vhat = vw[i] / (1 - pow(b2, t))
                want[i] -= lr * mhat / (vhat.squareRoot() + eps)
            }
            backend.adamw(param: p, grad: makeTensor(backend, [2], g.map(Float.init)), m: m, v: v, lr: Float(lr),
                          beta1: Float(b1), beta2: Float(b2), eps: Float(eps), weightDecay: Float(wd), step: step + 1)
        }
        XCTAssertEqual(Double(p.f32[0]), want[0], accuracy: 1e-6)
        XCTAssertEqual(Double(p.f32[1]), want[1], accuracy: 1e-6)
        XCTAssertEqual(Double(m.f32[1]), mw[1], accuracy: 1e-7)
        XCTAssertEqual(Double(v.f32[0]), vw[0], accuracy: vw[0] * 3e-5)  // fp32 beta2 = 0.99900001: (1 - beta2) is off by 1.3e-5 relative
    }

    func testMemoryLedgerCountsByTagAndFrees() {
        let b = CPUBackend()
        do {
            let w = b.makeTensor([10, 10], tag: .trainable)
            let g = b.makeTensor([5], tag: .gradients)
            let r = b.ledger.report()
            XCTAssertEqual(r.live(.trainable), 400)
            XCTAssertEqual(r.live(.gradients), 20)
            XCTAssertEqual(r.liveTotal, 420)
            _ = (w, g)
        }
        let after = b.ledger.report()
        XCTAssertEqual(after.liveTotal, 0)
        XCTAssertEqual(after.peakTotal, 420)
        XCTAssertEqual(after.peak[.trainable], 400)
    }
}

final class FastMathTests: XCTestCase {
    /// simdExp against Double exp: relative error within 2 ulp (2 * 2^-23 ~ 2.4e-7) on [-87, 88].
    func testSIMDExpAccuracy() {
        var worst = 0.0
        var x: Float = -87
        while x < 88 {
            let lanes = SIMD8<Float>((0..<8).map { x + Float($0) * 0.0123 })
            let got = simdExp(lanes)
            for i in 0..<8 {
                let want = exp(Double(lanes[i]))
                worst = max(worst, abs(Double(got[i]) - want) / want)
            }
            x += 0.0987
        }
        XCTAssertLessThan(worst, 2.4e-7)
        XCTAssertEqual(simdExp(SIMD8(repeating: 0))[0], 1)
        XCTAssertLessThan(simdExp(SIMD8(repeating: -1000))[0], 1e-37)  // clamped, not NaN
    }
}
