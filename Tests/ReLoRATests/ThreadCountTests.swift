import CReLoRA
import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain

/// The CPU backend computes the same bits with any number of threads (`RELORA_CPU_THREADS`,
/// `withCPUThreads`): data-parallel ranks split a node's cores between them and must agree with one
/// process. Each op whose work is combined across rows or elements, the matrix products, the eigensolver
/// the compensating merge uses, and a few training steps, run with 1, 2 and 3 threads (3 on a 2-core
/// machine still splits the work three ways); `relora train` too, as a launcher would start it.
final class ThreadCountTests: XCTestCase {
    static let threadCounts = [1, 2, 3]

    /// `body` under each thread count; every result must equal the first, bit for bit.
    func assertSameBits<T: Equatable>(_ what: String, file: StaticString = #filePath, line: UInt = #line,
                                      _ body: () throws -> T) rethrows {
        let results = try Self.threadCounts.map { n in try withCPUThreads(n) { try body() } }
        for (n, r) in zip(Self.threadCounts, results).dropFirst() where r != results[0] {
            XCTFail("\(what): \(n) threads differ from \(Self.threadCounts[0])", file: file, line: line)
        }
    }

    /// Bit patterns, so that NaNs and signed zeros compare too.
    func bits(_ values: [Float]) -> [UInt32] { values.map(\.bitPattern) }

    func testEnvironmentValue() {
        XCTAssertEqual(CPUThreads.parse(nil, cores: 8).threads, 8)
        XCTAssertNil(CPUThreads.parse(nil, cores: 8).warning)
        XCTAssertEqual(CPUThreads.parse("3", cores: 8).threads, 3)
        XCTAssertEqual(CPUThreads.parse(" 12 ", cores: 8).threads, 12)
        for bad in ["0", "-2", "two", "1.5", ""] {
            let (threads, warning) = CPUThreads.parse(bad, cores: 8)
            XCTAssertEqual(threads, 8, bad)
            XCTAssertEqual(warning, "RELORA_CPU_THREADS=\(bad) is not a positive integer; using 8 threads (one per core)")
        }
        XCTAssertEqual(withCPUThreads(3) { withCPUThreads(1) { cpuThreadCount } }, 1)
        XCTAssertEqual(withCPUThreads(3) { cpuThreadCount }, 3)
    }

    // MARK: Ops

    /// The weight gradient sums over rows; dx is per row.
    func testRMSNormBackward() {
        let b = CPUBackend()
        var rng = TestRNG(1)
        let rows = 1000, dim = 96
        let x = makeTensor(b, [rows, dim], rng.floats(rows * dim)), dy = makeTensor(b, [rows, dim], rng.floats(rows * dim))
        let w = makeTensor(b, [dim], rng.floats(dim)), out = b.makeTensor([rows, dim], tag: .workspace)
        let rstd = b.makeTensor([rows], tag: .workspace)
        b.rmsnormForward(x, weight: w, out: out, rstd: rstd, rows: rows, dim: dim, eps: 1e-5)
        assertSameBits("rmsnormBackward") { () -> [UInt32] in
            let dx = b.makeTensor([rows, dim], tag: .workspace, zeroed: true), dw = b.makeTensor([dim], tag: .workspace, zeroed: true)
            b.rmsnormBackward(dy, x: x, weight: w, rstd: rstd, dx: dx, dweight: dw, rows: rows, dim: dim)
            return bits(dx.toArray() + dw.toArray())
        }
    }

    /// The returned loss sums over rows (one ignored); the per-row losses and gradients are per row. A Double
    /// sum of Float losses is exact unless their sum needs over 53 bits, so the rows alternate between a loss
    /// of ~0.06 (the target logit 0, the others -7: a unit in the last place of 2^-28) and one of ~1e9 (the
    /// target logit -1e9): the order of the additions then shows.
    func testCrossEntropy() {
        let b = CPUBackend()
        var rng = TestRNG(2)
        let rows = 300, vocab = 64
        var logits = [Float](repeating: 0, count: rows * vocab)
        let targets = (0..<rows).map { $0 == 7 ? Int32(-1) : Int32(($0 * 13) % vocab) }
        for r in 0..<rows {
            for j in 0..<vocab { logits[r * vocab + j] = r % 2 == 0 ? -7 + 0.1 * rng.uniform() : rng.uniform() }
            if targets[r] >= 0 { logits[r * vocab + Int(targets[r])] = r % 2 == 0 ? 0 : -1e9 * (1 + rng.uniform(0, 1)) }
        }
        let t = b.makeTensor([rows], dtype: .i32, tag: .workspace)
        b.upload(targets, to: t)
        for gradScale in [nil, Float(1) / Float(rows)] {
            assertSameBits("crossEntropy gradScale \(String(describing: gradScale))") { () -> [UInt64] in
                let l = makeTensor(b, [rows, vocab], logits), losses = b.makeTensor([rows], tag: .workspace)
                let sum = b.crossEntropy(logits: l, targets: t, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale)
                return [sum.bitPattern] + (losses.toArray() + l.toArray()).map { UInt64($0.bitPattern) }
            }
        }
    }

    /// Several of the 2^16-element blocks and a ragged end; each run of 256 values scaled by 2^-20 ... 2^20,
    /// so the partial sums span 2^80 and how they are grouped shows in the Double sum (the op stores it as
    /// a Float, which hides most differences; the Double is what is combined).
    func testSumOfSquares() {
        let b = CPUBackend()
        var rng = TestRNG(3)
        let count = 5 * 65536 + 123
        var values = rng.floats(count)
        for i in 0..<count { values[i] *= Float(sign: .plus, exponent: (i / 256 * 7) % 41 - 20, significand: 1) }
        let x = makeTensor(b, [count], values)
        let out = b.makeTensor([2], tag: .workspace, zeroed: true)
        assertSameBits("sumOfSquares") { () -> [UInt64] in
            b.sumOfSquares(x, into: out, at: 1)
            return [CPUBackend.sumOfSquares(x.f32, count: count).bitPattern, UInt64(out.toArray()[1].bitPattern)]
        }
    }

    /// An integer count, exact whatever the grouping; checked so that it stays so.
    func testCountChangedCodes() {
        let b = CPUBackend()
        var rng = TestRNG(4)
        let rows = 700, cols = 64
        let q = QuantizedTensor(format: .q4_0, rows: rows, cols: cols, backend: b, tag: .workspace)
        XCTAssertNil(b.quantize(makeTensor(b, [rows, cols], rng.floats(rows * cols)), into: q, rounding: .nearest))
        let old = b.makeTensor([q.blocks.count], dtype: .u8, tag: .workspace)
        b.copy(q.blocks, to: old)
        XCTAssertNil(b.quantize(makeTensor(b, [rows, cols], rng.floats(rows * cols)), into: q, rounding: .nearest))
        let out = b.makeTensor([1], tag: .workspace, zeroed: true)
        assertSameBits("countChangedCodes") { () -> Float in
            b.countChangedCodes(old: old, new: q, into: out, at: 0)
            return out.toArray()[0]
        }
    }

    /// Matrix products in the shapes where OpenBLAS's own threading changed bits: partitions of M and N (its
    /// Haswell and SSE3 kernels), K between one and two of its K blocks (split one way single-threaded and
    /// another way threaded), skinny products; one and several tiles, ragged ones; every transpose; with
    /// beta = 1 as the backward accumulates.
    func testMatmul() {
        let b = CPUBackend()
        var rng = TestRNG(5)
        let shapes = [(256, 104, 48), (300, 72, 700), (96, 8, 1100), (520, 600, 64), (1, 300, 64)]
        for (m, n, k) in shapes {
            let a = makeTensor(b, [m * k], rng.floats(m * k)), bm = makeTensor(b, [k * n], rng.floats(k * n))
            let c0 = rng.floats(m * n)
            for (transA, transB) in [(false, false), (false, true), (true, false), (true, true)] {
                assertSameBits("matmul \(m)x\(n)x\(k) transA \(transA) transB \(transB)") { () -> [UInt32] in
                    let c = makeTensor(b, [m * n], c0)
                    b.matmul(a, bm, c, m: m, n: n, k: k, transA: transA, transB: transB, alpha: 0.7, beta: 1, alphaScale: nil)
                    return bits(c.toArray())
                }
            }
        }
    }

    /// Attention runs (batch, kv head) pairs in parallel; dK and dV sum over the query heads of a group.
    func testAttention() {
        let b = CPUBackend()
        var rng = TestRNG(7)
        let (batch, T, heads, kvHeads, D) = (3, 40, 4, 2, 16)
        let q = makeTensor(b, [batch * T, heads * D], rng.floats(batch * T * heads * D))
        let k = makeTensor(b, [batch * T, kvHeads * D], rng.floats(batch * T * kvHeads * D))
        let v = makeTensor(b, [batch * T, kvHeads * D], rng.floats(batch * T * kvHeads * D))
        let dout = makeTensor(b, [batch * T, heads * D], rng.floats(batch * T * heads * D))
        assertSameBits("attention") { () -> [UInt32] in
            let out = b.makeTensor([batch * T, heads * D], tag: .workspace), lse = b.makeTensor([batch * heads * T], tag: .workspace)
            let dq = b.makeTensor(q.shape, tag: .workspace), dk = b.makeTensor(k.shape, tag: .workspace)
            let dv = b.makeTensor(v.shape, tag: .workspace)
            b.attentionForward(q: q, k: k, v: v, out: out, lse: lse, batch: batch, seqLen: T, heads: heads, kvHeads: kvHeads, headDim: D)
            b.attentionBackward(dout: dout, q: q, k: k, v: v, out: out, lse: lse, dq: dq, dk: dk, dv: dv,
                                batch: batch, seqLen: T, heads: heads, kvHeads: kvHeads, headDim: D)
            return bits(out.toArray() + lse.toArray() + dq.toArray() + dk.toArray() + dv.toArray())
        }
    }

    /// The eigensolver of the compensating merge (LAPACK through OpenBLAS, in Double).
    func testSymmetricEigen() throws {
        var rng = TestRNG(6)
        for n in [4, 16, 64] {
            var a = [Double](repeating: 0, count: n * n)
            for i in 0..<n { for j in 0...i { let v = Double(rng.uniform()); a[i * n + j] = v; a[j * n + i] = v } }
            try assertSameBits("symmetricEigen n \(n)") { () -> [UInt64] in
                let (values, vectors) = try LAPACK.symmetricEigen(n: n, a)
                return (values + vectors).map(\.bitPattern)
            }
        }
    }

    // MARK: Training

    /// A few steps of full-rank training, and of ReLoRA on q4_0 base weights with 8-bit moments and the
    /// compensating merge (a restart after step 2): the same losses and the same final state, bit for bit.
    func testTrainingIsBitIdentical() throws {
        let data = try TrainerTests.makeByteData()
        let runs: [(String, (inout Recipe) -> Void)] = [
            ("full", { $0.steps = 2; $0.warmupSteps = 1 }),
            ("relora", {
                $0.mode = .relora; $0.quant = .q4_0; $0.optimizerStates = .int8; $0.mergePolicy = .compensate
                $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 4; $0.reloraEvery = 2; $0.restartWarmup = 1; $0.warmupSteps = 1
            }),
        ]
        for (name, edit) in runs {
            var count = 0
            try assertSameBits("\(name) training") { () -> [[UInt8]] in
                count += 1
                let recipe = TrainerTests.recipe(data, run: "\(name)-\(count)") {
                    $0.microBatch = 2; $0.gradAccum = 1; $0.evalEvery = 100; $0.checkpointEvery = 100; edit(&$0)
                }
                let t = try Trainer(recipe: recipe, resume: false, log: { _ in })
                _ = try t.run()
                let bk = t.model.backend
                let losses = t.history.map(\.loss).flatMap { withUnsafeBytes(of: $0.bitPattern, Array.init) }
                return [losses] + t.model.weights.slots().map { bk.downloadRaw($0.1.storage) }
                    + t.model.loraTensors().map { bk.downloadRaw($0.value) }
                    + t.optimizer.m.map { bk.downloadRaw($0!) } + t.optimizer.v.map { bk.downloadRaw($0!) }
                    + t.optimizer.eightBit.compactMap { $0 }.flatMap { [bk.downloadRaw($0.m.absmax), bk.downloadRaw($0.v.absmax)] }
            }
        }
    }

    /// `relora train` with `RELORA_CPU_THREADS` and `OPENBLAS_NUM_THREADS` set to 1, 2 and 3, as a launcher
    /// dividing a node's cores would, on OpenBLAS's Haswell kernels where the CPU has AVX2 (their bits
    /// depend most on how the work is partitioned): the same losses and the same checkpoint, byte for byte.
    /// A value that is not a positive integer is one warning line and the run goes on.
    func testTrainCommandIsBitIdentical() throws {
        let data = try TrainerTests.makeByteData()
        let recipe: [String: Any] = [
            "model": data.model, "train_data": data.train, "seq_len": 32, "micro_batch": 2, "steps": 2, "warmup_steps": 1,
            "eval_every": 100, "checkpoint_every": 100,
        ]
        let cpu = relora_cpu_features_detect()
        let core: String? = cpu.avx2 != 0 && cpu.fma != 0 && cpu.os_ymm != 0 ? "Haswell" : nil
        var outputs: [[Data]] = []
        for threads in ["1", "2", "3", "three"] {
            var r = recipe
            r["run_dir"] = data.dir + "/run-\(threads)"
            let path = data.dir + "/recipe-\(threads).json"
            try JSONSerialization.data(withJSONObject: r).write(to: URL(fileURLWithPath: path))
            let run = try runRelora(["train", path], environment: [
                "RELORA_CPU_THREADS": threads, "OPENBLAS_NUM_THREADS": Int(threads).map(String.init) ?? "2",
                "OPENBLAS_CORETYPE": core ?? ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"],
            ])
            XCTAssertEqual(run.status, 0, run.stderr)
            let warning = "relora: warning: RELORA_CPU_THREADS=three is not a positive integer; using"
            XCTAssertEqual(run.stderr.contains(warning), threads == "three", run.stderr)
            let metrics = try String(contentsOfFile: data.dir + "/run-\(threads)/metrics.jsonl", encoding: .utf8)
            struct Line: Decodable { let loss: Double? }
            let losses = try metrics.split(separator: "\n").compactMap { try JSONDecoder().decode(Line.self, from: Data($0.utf8)).loss }
            XCTAssertEqual(losses.count, 2)
            let checkpoint = try XCTUnwrap(TrainingCheckpoint.latest(runDir: data.dir + "/run-\(threads)"))
            outputs.append([Data(losses.flatMap { withUnsafeBytes(of: $0.bitPattern, Array.init) })] + (try ["model.tensors.zst", "optimizer.tensors.zst"].map {
                try Data(contentsOf: URL(fileURLWithPath: checkpoint + "/" + $0))
            }))
        }
        for (threads, output) in zip(["2", "3", "three"], outputs.dropFirst()) {
            XCTAssertTrue(output == outputs[0], "RELORA_CPU_THREADS=\(threads) differs from 1 (OpenBLAS core \(core ?? "default"))")
        }
    }
}
