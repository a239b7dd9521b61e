import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAFormats
@testable import ReLoRATokenizer
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain
@testable import ReLoRAAnalysis
@testable import ReLoRASelfTest

/// The library's backend conformance suite (`Conformance`, also `relora selftest`) on every backend
/// built here, one test per op group, and proof that its checks fail for broken ops.
final class ConformanceTests: XCTestCase {
    /// The backends under test and the dtypes each computes. Adding a backend is one line here.
    static let backends: [(make: @Sendable () -> Backend, computeDTypes: [DType])] = [
        ({ CPUBackend() }, [.f32]),
    ]

    /// Runs `groups` on every backend and fails listing every failed check.
    private func assertConforms(_ groups: [ConformanceGroup], file: StaticString = #filePath, line: UInt = #line) {
        for entry in Self.backends {
            let backend = entry.make()
            let checks = Conformance.run(on: backend, computeDTypes: entry.computeDTypes, groups: groups)
            XCTAssertFalse(checks.isEmpty, "no checks ran for \(groups)", file: file, line: line)
            let failed = checks.filter { !$0.passed }
            if !failed.isEmpty {
                XCTFail("\(backend.name): \(Conformance.summary(checks))\n" + Conformance.table(failed), file: file, line: line)
            }
        }
    }

    func testMemory() { assertConforms([.memory]) }
    func testTransfers() { assertConforms([.transfers]) }
    func testRandom() { assertConforms([.random]) }
    func testMatmul() { assertConforms([.matmul]) }
    func testRMSNorm() { assertConforms([.rmsnorm]) }
    func testRope() { assertConforms([.rope]) }
    func testAttention() { assertConforms([.attention]) }
    func testSwiGLU() { assertConforms([.swiglu]) }
    func testEmbedding() { assertConforms([.embedding]) }
    func testCrossEntropy() { assertConforms([.crossEntropy]) }
    func testDropout() { assertConforms([.dropout]) }
    func testReductions() { assertConforms([.reductions]) }
    func testElementwise() { assertConforms([.elementwise]) }
    func testAdamW() { assertConforms([.adamw]) }
    func testPrune() { assertConforms([.prune]) }
    func testQuantization() { assertConforms([.quantization]) }

    /// The whole suite in one run (what `relora selftest` does), covering every op of the protocol.
    func testWholeSuiteCoversEveryGroup() {
        let checks = Conformance.run(on: CPUBackend())
        // (`training` compares a device backend with the CPU: TrainingConformance, CUDABackendTests;
        // `collectives` checks a communicator: CollectiveConformance, MPITests)
        XCTAssertEqual(Set(checks.map(\.group)), Set(ConformanceGroup.allCases).subtracting([.training, .collectives]))
        let failed = checks.filter { !$0.passed }
        XCTAssertTrue(failed.isEmpty, Conformance.table(failed))
        XCTAssertGreaterThan(checks.filter { $0.op.hasSuffix("(finite differences)") }.count, 12)
        let table = Conformance.table(checks)
        XCTAssertEqual(table.split(separator: "\n").count, checks.count + 1)
        XCTAssertTrue(Conformance.summary(checks).hasSuffix(" 0 failed"))
    }

    /// The suite in bf16 and f16 as well as f32, on a backend that stores them and computes in f32: the
    /// per-dtype checks run, and the narrow dtypes' bounds hold (their outputs round once into the dtype).
    func testNarrowComputeDTypes() {
        let checks = Conformance.run(on: NarrowStorageBackend(), computeDTypes: [.f32, .bf16, .f16])
        XCTAssertTrue(checks.contains { $0.dtype == "bf16" && $0.op == "attentionBackward dq" })
        XCTAssertTrue(checks.contains { $0.dtype == "f16" && $0.op == "matmul" })
        let failed = checks.filter { !$0.passed }
        XCTAssertTrue(failed.isEmpty, Conformance.summary(checks) + "\n" + Conformance.table(failed))
    }

    /// A planning backend computes nothing: one failed check that says so, no crash.
    func testPlanningBackendIsReportedNotRun() {
        let checks = Conformance.run(on: PlanningBackend(target: .cpu))
        XCTAssertEqual(checks.count, 1)
        XCTAssertFalse(checks[0].passed)
        XCTAssertTrue(checks[0].note.contains("does not compute"))
    }

    /// Each fault makes the checks of its op fail (and the wrapper without a fault passes), so the suite
    /// can fail: a 0.1% scale error in matmul, rope rotating the wrong way, attention's dv off by 0.1%,
    /// rmsnorm's backward overwriting instead of accumulating, cross-entropy's gradient off by 0.1%,
    /// fillNormal's std off by 0.1%, prune's magnitude threshold one entry short, dropout with the wrong
    /// stream, swiglu's dgate computed as silu instead of its derivative, pruneMoments with separate masks,
    /// stochastic rounding that rounds to nearest.
    func testBrokenOpsAreCaught() {
        let clean = Conformance.run(on: FaultyBackend(nil), groups: ConformanceGroup.allCases)
        XCTAssertTrue(clean.allSatisfy(\.passed), Conformance.table(clean.filter { !$0.passed }))
        let expectations: [(FaultyBackend.Fault, ConformanceGroup, String)] = [
            (.matmulScale, .matmul, "matmul"),
            (.ropeSign, .rope, "rope"),
            (.attentionDV, .attention, "attentionBackward dv"),
            (.rmsnormOverwrites, .rmsnorm, "rmsnormBackward dx (accumulates)"),
            (.crossEntropyGrad, .crossEntropy, "crossEntropy dlogits"),
            (.normalStd, .random, "fillNormal"),
            (.pruneThreshold, .prune, "prune magnitude"),
            (.dropoutStream, .dropout, "dropout mask"),
            (.swigluDerivative, .swiglu, "swigluBackward dgate"),
            (.pruneMomentsSeparately, .prune, "pruneMoments"),
            (.stochasticAsNearest, .quantization, "quantize stochastic"),
        ]
        for (fault, group, op) in expectations {
            let checks = Conformance.run(on: FaultyBackend(fault), groups: [group])
            let failed = checks.filter { !$0.passed }
            XCTAssertTrue(failed.contains { $0.op.hasPrefix(op) }, "\(fault): no failed \(op) check in\n\(Conformance.table(checks))")
        }
        // The finite differences catch a backward that is consistently wrong (the Double reference of
        // dgate would have to be wrong the same way to miss it).
        let fd = Conformance.run(on: FaultyBackend(.swigluDerivative), groups: [.swiglu]).filter { !$0.passed }
        XCTAssertTrue(fd.contains { $0.op == "swigluBackward dgate (finite differences)" }, Conformance.table(fd))
    }

    func testSelfTestCommand() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: reloraExecutable), "relora not built")
        let r = try runRelora(["selftest"])
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        XCTAssertTrue(r.stdout.contains(" 0 failed"), r.stdout)
        let j = try runRelora(["selftest", "--json"])
        XCTAssertEqual(j.status, 0, j.stderr)
        let obj = try JSONSerialization.jsonObject(with: Data(j.stdout.utf8)) as! [String: Any]
        XCTAssertEqual(obj["failed"] as? Int, 0)
        XCTAssertEqual(obj["backend"] as? String, "cpu")
        XCTAssertGreaterThan((obj["checks"] as? [Any])?.count ?? 0, 100)
        let help = try runRelora(["selftest", "--help"])
        XCTAssertEqual(help.status, 0)
        XCTAssertTrue(help.stdout.contains("--device"))
        let bad = try runRelora(["selftest", "--device", "tpu"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertEqual(bad.stderr.split(separator: "\n").count, 1, bad.stderr)
    }
}

/// A CPU backend with at most one deliberately broken op: forwards everything to `CPUBackend` and
/// corrupts the result of the op named by `fault` through other backend ops (no host access).
final class FaultyBackend: ForwardingToCPU, @unchecked Sendable {
    func quantize(_ source: Tensor, into q: QuantizedTensor, rounding: QuantRounding) -> QuantizationFailure? {
        inner.quantize(source, into: q, rounding: fault == .stochasticAsNearest ? .nearest : rounding)
    }
    enum Fault { case matmulScale, ropeSign, attentionDV, rmsnormOverwrites, crossEntropyGrad, normalStd, pruneThreshold,
                      dropoutStream, swigluDerivative, pruneMomentsSeparately, stochasticAsNearest }

    let inner = CPUBackend()
    let fault: Fault?
    init(_ fault: Fault?) { self.fault = fault }

    var name: String { "faulty-cpu" }
    func fillNormal(_ tensor: Tensor, std: Float, seed: UInt64, stream: UInt64) {
        inner.fillNormal(tensor, std: fault == .normalStd ? std * 1.001 : std, seed: seed, stream: stream)
    }
    func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int, transA: Bool, transB: Bool, alpha: Float,
                beta: Float, alphaScale: Tensor?, lda: Int, ldb: Int, ldc: Int) {
        inner.matmul(a, b, c, m: m, n: n, k: k, transA: transA, transB: transB,
                     alpha: fault == .matmulScale ? alpha * 1.001 : alpha, beta: beta, alphaScale: alphaScale, lda: lda, ldb: ldb, ldc: ldc)
    }
    func rmsnormBackward(_ dout: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dx: Tensor, dweight: Tensor, rows: Int, dim: Int) {
        if fault == .rmsnormOverwrites { inner.zero(dx) }
        inner.rmsnormBackward(dout, x: x, weight: weight, rstd: rstd, dx: dx, dweight: dweight, rows: rows, dim: dim)
    }
    func rope(_ x: Tensor, batch: Int, seqLen: Int, heads: Int, headDim: Int, theta: Float, inverse: Bool) {
        inner.rope(x, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim, theta: theta,
                   inverse: fault == .ropeSign ? !inverse : inverse)
    }
    func attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dq: Tensor, dk: Tensor,
                           dv: Tensor, batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int) {
        inner.attentionBackward(dout: dout, q: q, k: k, v: v, out: out, lse: lse, dq: dq, dk: dk, dv: dv, batch: batch,
                                seqLen: seqLen, heads: heads, kvHeads: kvHeads, headDim: headDim)
        if fault == .attentionDV { inner.scale(dv, by: 1.001) }
    }
    func swigluBackward(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, count: Int) {
        inner.swigluBackward(dout: dout, gate: gate, up: up, dgate: dgate, dup: dup, count: count)
        // dgate := dup = dout * silu(g): silu' replaced by silu and the up factor dropped.
        if fault == .swigluDerivative { inner.copy(dup, to: dgate) }
    }
    func crossEntropy(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int, gradScale: Float?, ld: Int) -> Double {
        let sum = inner.crossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale, ld: ld)
        if fault == .crossEntropyGrad, gradScale != nil { inner.scale(logits, by: 1.001) }
        return sum
    }
    func dropout(_ x: Tensor, _ out: Tensor, count: Int, p: Float, seed: UInt64, stream: UInt64, cols: Int, ld: Int) {
        inner.dropout(x, out, count: count, p: p, seed: seed, stream: fault == .dropoutStream ? stream + 1 : stream, cols: cols, ld: ld)
    }
    func prune(_ tensor: Tensor, _ rule: PruneRule, seed: UInt64, stream: UInt64) -> Int {
        if fault == .pruneThreshold, case .magnitude(let ratio) = rule, ratio > 0, ratio < 1 {
            // One entry short of ceil(ratio * n).
            let k = (ratio * Double(tensor.count)).rounded(.up)
            return inner.prune(tensor, .magnitude(ratio: (k - 1.5) / Double(tensor.count)), seed: seed, stream: stream)
        }
        return inner.prune(tensor, rule, seed: seed, stream: stream)
    }
    func pruneMoments(m: Tensor, v: Tensor, ratio: Double, eps: Float) -> Int {
        if fault == .pruneMomentsSeparately {
            // The paper's reset: each moment by its own magnitude, two masks.
            let zeroed = inner.prune(m, .magnitude(ratio: ratio), seed: 0, stream: 0)
            _ = inner.prune(v, .magnitude(ratio: ratio), seed: 0, stream: 0)
            return zeroed
        }
        return inner.pruneMoments(m: m, v: v, ratio: ratio, eps: eps)
    }
}

/// A CPU backend that computes on bf16 and f16 tensors the way a narrow-storage, f32-compute kernel does:
/// every op widens its float operands to f32, runs the CPU op and rounds its outputs back. Running the
/// suite with `computeDTypes: [.f32, .bf16, .f16]` on it exercises the suite's per-dtype structure and
/// shows the bf16/f16 bounds hold for such an implementation (a CUDA backend declares its dtypes the same way).
final class NarrowStorageBackend: ForwardingToCPU, @unchecked Sendable {
    let inner = CPUBackend()

    var name: String { "narrow-storage-cpu" }
    /// An f32 working copy of a bf16/f16 tensor (the tensor itself otherwise).
    private func wide(_ t: Tensor) -> Tensor {
        guard t.dtype == .bf16 || t.dtype == .f16 else { return t }
        let w = inner.makeTensor(t.shape, dtype: .f32, tag: .workspace, zeroed: false)
        inner.copy(t, to: w)
        return w
    }

    /// Rounds a working copy back into its tensor.
    private func narrow(_ w: Tensor, into t: Tensor) { if w !== t { inner.copy(w, to: t) } }

    func fill(_ tensor: Tensor, value: Float) {
        let w = wide(tensor); inner.fill(w, value: value); narrow(w, into: tensor)
    }
    func fillUniform(_ tensor: Tensor, bound: Float, seed: UInt64, stream: UInt64) {
        let w = wide(tensor); inner.fillUniform(w, bound: bound, seed: seed, stream: stream); narrow(w, into: tensor)
    }
    func fillNormal(_ tensor: Tensor, std: Float, seed: UInt64, stream: UInt64) {
        let w = wide(tensor); inner.fillNormal(w, std: std, seed: seed, stream: stream); narrow(w, into: tensor)
    }
    func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int, transA: Bool, transB: Bool, alpha: Float,
                beta: Float, alphaScale: Tensor?, lda: Int, ldb: Int, ldc: Int) {
        let wc = wide(c)
        inner.matmul(wide(a), wide(b), wc, m: m, n: n, k: k, transA: transA, transB: transB, alpha: alpha, beta: beta,
                     alphaScale: alphaScale.map(wide), lda: lda, ldb: ldb, ldc: ldc)
        narrow(wc, into: c)
    }
    func rmsnormForward(_ x: Tensor, weight: Tensor, out: Tensor, rstd: Tensor, rows: Int, dim: Int, eps: Float) {
        let wo = wide(out), wr = wide(rstd)
        inner.rmsnormForward(wide(x), weight: wide(weight), out: wo, rstd: wr, rows: rows, dim: dim, eps: eps)
        narrow(wo, into: out); narrow(wr, into: rstd)
    }
    func rmsnormBackward(_ dout: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dx: Tensor, dweight: Tensor, rows: Int, dim: Int) {
        let wdx = wide(dx), wdw = wide(dweight)
        inner.rmsnormBackward(wide(dout), x: wide(x), weight: wide(weight), rstd: wide(rstd), dx: wdx, dweight: wdw,
                              rows: rows, dim: dim)
        narrow(wdx, into: dx); narrow(wdw, into: dweight)
    }
    func rope(_ x: Tensor, batch: Int, seqLen: Int, heads: Int, headDim: Int, theta: Float, inverse: Bool) {
        let w = wide(x)
        inner.rope(w, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim, theta: theta, inverse: inverse)
        narrow(w, into: x)
    }
    func ropeAt(_ x: Tensor, rows: Int, position: Int, heads: Int, headDim: Int, theta: Float) {
        let w = wide(x)
        inner.ropeAt(w, rows: rows, position: position, heads: heads, headDim: headDim, theta: theta)
        narrow(w, into: x)
    }
    func attentionDecode(q: Tensor, kCache: Tensor, vCache: Tensor, out: Tensor, position: Int, heads: Int, kvHeads: Int,
                         headDim: Int) {
        let wo = wide(out)
        inner.attentionDecode(q: wide(q), kCache: wide(kCache), vCache: wide(vCache), out: wo, position: position,
                              heads: heads, kvHeads: kvHeads, headDim: headDim)
        narrow(wo, into: out)
    }
    func attentionForward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, batch: Int, seqLen: Int, heads: Int,
                          kvHeads: Int, headDim: Int) {
        let wo = wide(out), wl = wide(lse)
        inner.attentionForward(q: wide(q), k: wide(k), v: wide(v), out: wo, lse: wl, batch: batch, seqLen: seqLen,
                               heads: heads, kvHeads: kvHeads, headDim: headDim)
        narrow(wo, into: out); narrow(wl, into: lse)
    }
    func attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dq: Tensor, dk: Tensor,
                           dv: Tensor, batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int) {
        let wq = wide(dq), wk = wide(dk), wv = wide(dv)
        inner.attentionBackward(dout: wide(dout), q: wide(q), k: wide(k), v: wide(v), out: wide(out), lse: wide(lse),
                                dq: wq, dk: wk, dv: wv, batch: batch, seqLen: seqLen, heads: heads, kvHeads: kvHeads,
                                headDim: headDim)
        narrow(wq, into: dq); narrow(wk, into: dk); narrow(wv, into: dv)
    }
    func swigluForward(gate: Tensor, up: Tensor, out: Tensor, count: Int) {
        let wo = wide(out)
        inner.swigluForward(gate: wide(gate), up: wide(up), out: wo, count: count)
        narrow(wo, into: out)
    }
    func swigluBackward(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, count: Int) {
        let wg = wide(dgate), wu = wide(dup)
        inner.swigluBackward(dout: wide(dout), gate: wide(gate), up: wide(up), dgate: wg, dup: wu, count: count)
        narrow(wg, into: dgate); narrow(wu, into: dup)
    }
    func embeddingForward(ids: Tensor, table: Tensor, out: Tensor, dim: Int) {
        let wo = wide(out)
        inner.embeddingForward(ids: ids, table: wide(table), out: wo, dim: dim)
        narrow(wo, into: out)
    }
    func embeddingBackward(ids: Tensor, dout: Tensor, dtable: Tensor, dim: Int) {
        let wt = wide(dtable)
        inner.embeddingBackward(ids: ids, dout: wide(dout), dtable: wt, dim: dim)
        narrow(wt, into: dtable)
    }
    func crossEntropy(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int, gradScale: Float?, ld: Int) -> Double {
        let wl = wide(logits), wloss = wide(losses)
        let sum = inner.crossEntropy(logits: wl, targets: targets, losses: wloss, rows: rows, vocab: vocab, gradScale: gradScale, ld: ld)
        narrow(wl, into: logits); narrow(wloss, into: losses)
        return sum
    }
    func dropout(_ x: Tensor, _ out: Tensor, count: Int, p: Float, seed: UInt64, stream: UInt64, cols: Int, ld: Int) {
        let wx = wide(x), wo = out === x ? wx : wide(out)
        inner.dropout(wx, wo, count: count, p: p, seed: seed, stream: stream, cols: cols, ld: ld)
        narrow(wo, into: out)
    }
    func dotAccumulate(_ a: Tensor, _ b: Tensor, count: Int, into out: Tensor) {
        let wo = wide(out)
        inner.dotAccumulate(wide(a), wide(b), count: count, into: wo)
        narrow(wo, into: out)
    }
    func axpy(_ alpha: Float, _ b: Tensor, _ a: Tensor, count: Int) {
        let wa = wide(a)
        inner.axpy(alpha, wide(b), wa, count: count)
        narrow(wa, into: a)
    }
    func scale(_ x: Tensor, by alpha: Float) {
        let w = wide(x); inner.scale(w, by: alpha); narrow(w, into: x)
    }
    func sumOfSquares(_ x: Tensor, into out: Tensor, at index: Int) {
        let wo = wide(out)
        inner.sumOfSquares(wide(x), into: wo, at: index)
        narrow(wo, into: out)
    }
    func prune(_ tensor: Tensor, _ rule: PruneRule, seed: UInt64, stream: UInt64) -> Int {
        let w = wide(tensor)
        let zeroed = inner.prune(w, rule, seed: seed, stream: stream)
        narrow(w, into: tensor)
        return zeroed
    }
    func pruneMoments(m: Tensor, v: Tensor, ratio: Double, eps: Float) -> Int {
        let wm = wide(m), wv = wide(v)
        let zeroed = inner.pruneMoments(m: wm, v: wv, ratio: ratio, eps: eps)
        narrow(wm, into: m)
        narrow(wv, into: v)
        return zeroed
    }
}
