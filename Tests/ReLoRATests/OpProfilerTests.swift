import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAModel
@testable import ReLoRATrain

/// A clock whose marks are given times (seconds), for the profiler's arithmetic.
private final class ScriptedClock: ProfileClock {
    var times: [Double]
    private var next = 0
    private var stamps: [Double] = []
    init(_ times: [Double]) { self.times = times }
    func mark() -> Int {
        stamps.append(times[next])
        next += 1
        return stamps.count - 1
    }
    func drain() {}
    func seconds(from start: Int, to end: Int) -> Double { stamps[end] - stamps[start] }
    func reset() { stamps.removeAll() }
}

/// The per-op profile (`OpProfiler`, `relora train --profile N`, `relora-bench gpu`): the roofline arithmetic
/// on hand-computed examples, the aggregation (per op, nested ops once, GEMM roles, ops outside a step
/// ignored), and whole training steps on the CPU and on the emulated CUDA backend, whose category counts are
/// the model's and whose category times account for the step.
final class OpProfilerTests: XCTestCase {
    // MARK: Arithmetic

    func testPredictionArithmeticByHand() throws {
        let h100 = try XCTUnwrap(DevicePeaks.dataSheet(deviceName: "NVIDIA H100 80GB HBM3"))
        XCTAssertEqual(h100.name, "H100 SXM")
        // GEMM [4096 x 2048] x [2048 x 2048], bf16 in and out, beta 0: 2 * 4096 * 2048 * 2048 = 34,359,738,368
        // FLOPs; (4096*2048 + 2048*2048) * 2 + 4096*2048 * 2 = 41,943,040 bytes. Compute 34359738368 / 989e12
        // = 34.7419 us beats memory 41943040 / 3.35e12 = 12.520 us: compute-bound.
        let g = OpCost.gemm(m: 4096, n: 2048, k: 2048, abBytes: 2, cBytes: 2, accumulates: false)
        XCTAssertEqual(g.flops, 34_359_738_368)
        XCTAssertEqual(g.bytes, 41_943_040)
        XCTAssertTrue(g.tensorCores)
        XCTAssertEqual(h100.seconds(for: g) * 1e6, 34.7419, accuracy: 1e-4)
        // The same in f32, accumulating: the f32 units (67 TFLOP/s): 34359738368 / 67e12 = 512.832 us; bytes
        // (8,388,608 + 4,194,304) * 4 + 8,388,608 * 4 * 2 = 117,440,512.
        let f = OpCost.gemm(m: 4096, n: 2048, k: 2048, abBytes: 4, cBytes: 4, accumulates: true)
        XCTAssertFalse(f.tensorCores)
        XCTAssertEqual(f.bytes, 117_440_512)
        XCTAssertEqual(h100.seconds(for: f) * 1e6, 512.832, accuracy: 1e-3)
        // SwiGLU forward over 2^20 bf16 elements: 3 * 2 * 2^20 = 6,291,456 bytes / 3.35e12 = 1.87805 us beats
        // 5 * 2^20 FLOPs / 67e12 = 0.078 us: memory-bound.
        XCTAssertEqual(h100.seconds(for: .swiglu(forward: true, count: 1 << 20, elementBytes: 2)) * 1e6, 1.87805, accuracy: 1e-5)
        // 4 MiB down the host link (PCIe 5.0 x16, 64 GB/s): 4194304 / 64e9 = 65.536 us.
        XCTAssertEqual(h100.seconds(for: .transfer(bytes: 4 << 20)) * 1e6, 65.536, accuracy: 1e-9)
        // Causal attention, batch 1, seq 4, 2 query heads sharing 1 K/V head of dim 8, bf16: 2 * 4*5/2 = 20
        // (head, query, key) pairs. Forward: 4 * 20 * 8 = 640 FLOPs; 4 tokens * (2*16 + 2*8) * 2 bytes + the f32
        // lse 1*2*4*4 = 384 + 32 = 416 bytes. Backward: 10 * 20 * 8 = 1600 FLOPs; 4 * (4*16 + 4*8) * 2 + 32 = 800.
        let fwd = OpCost.attention(forward: true, batch: 1, seqLen: 4, heads: 2, kvHeads: 1, headDim: 8, elementBytes: 2)
        let bwd = OpCost.attention(forward: false, batch: 1, seqLen: 4, heads: 2, kvHeads: 1, headDim: 8, elementBytes: 2)
        XCTAssertEqual([fwd.flops, fwd.bytes, bwd.flops, bwd.bytes], [640, 416, 1600, 800])
        XCTAssertTrue(fwd.tensorCores)
        // RMSNorm forward [3, 4] f32: 4 * 12 FLOPs; x read + out written 2 * 12 * 4, weight 4 * 4, rstd 3 * 4.
        XCTAssertEqual(OpCost.rmsnorm(forward: true, rows: 3, dim: 4, elementBytes: 4), OpCost(flops: 48, bytes: 96 + 16 + 12))
        // AdamW over 1000 f32 parameters: 28,000 bytes / 3.35e12 = 8.358 ns.
        XCTAssertEqual(h100.seconds(for: .adamw(count: 1000)) * 1e9, 8.358, accuracy: 1e-3)
    }

    func testDataSheetsByDeviceName() throws {
        func peaks(_ name: String) -> DevicePeaks? { DevicePeaks.dataSheet(deviceName: name) }
        XCTAssertEqual(peaks("NVIDIA H200")?.memoryBandwidth, 4.8e12)
        XCTAssertEqual(peaks("NVIDIA H100 PCIe")?.bf16TensorFLOPs, 756e12)
        XCTAssertEqual(peaks("NVIDIA A100-SXM4-40GB")?.memoryBandwidth, 1.555e12)
        XCTAssertEqual(peaks("NVIDIA A100-SXM4-80GB")?.memoryBandwidth, 2.039e12)
        XCTAssertEqual(peaks("NVIDIA L40S")?.name, "L40S", "L40S is not the L4")
        XCTAssertEqual(peaks("NVIDIA L4")?.name, "L4")
        XCTAssertEqual(peaks("NVIDIA A10")?.name, "A10")
        XCTAssertEqual(peaks("NVIDIA GeForce RTX 4090")?.bf16TensorFLOPs, 165.2e12)
        XCTAssertEqual(peaks("NVIDIA GeForce RTX 4090")?.f32FLOPs, 82.6e12)
        XCTAssertNil(peaks("relora CPU emulation (fibers)"))
        XCTAssertEqual(PeakFLOPs.cudaBF16Peak(deviceName: "NVIDIA H200"), 989e12, "MFU reads the same table")
    }

    /// Per-op predictions (the sum of each op's max, not the max of the sums), nested ops counted once under the
    /// outer one, GEMMs filed under their caller's role (restored after), ops outside a step ignored (they read
    /// no clock), figures averaged per step, and "other" = step - categories.
    func testAggregationPerOpAndPerStep() throws {
        let h100 = try XCTUnwrap(DevicePeaks.dataSheet(deviceName: "NVIDIA H100"))
        // The marks, in order: step 1 from 0 to 0.100 s, step 2 from 1.000 to 1.050 s.
        let clock = ScriptedClock([0, 0.010, 0.020, 0.025, 0.030, 0.031, 0.040, 0.041, 0.050, 0.052, 0.060, 0.100,
                                   1.000, 1.002, 1.006, 1.050])
        let p = OpProfiler(clock: clock, peaks: h100, deviceName: "test")
        let gemm = OpCost.gemm(m: 4096, n: 2048, k: 2048, abBytes: 2, cBytes: 2, accumulates: false)  // 34.7419 us
        let memoryBound = OpCost.swiglu(forward: true, count: 1 << 20, elementBytes: 2)               // 1.87805 us
        let computeBound = OpCost(flops: 67e6, bytes: 0)                                               // 1 us
        p.begin(.elementwise, memoryBound).end()          // before any step: ignored
        p.beginStep()                                     // 0
        let role = p.attributeGEMMs(to: .gemmLoRAUp)
        p.beginGEMM(gemm).end()                           // 0.010 .. 0.020: LoRA up, 10 ms
        role.end()
        let ce = p.begin(.crossEntropy, .crossEntropy(rows: 1, vocab: 4, elementBytes: 2, withGradient: true))  // 0.025
        p.begin(.transfer, .transfer(bytes: 8)).end()     // nested: not a row, no marks
        ce.end()                                          // 0.030: 5 ms
        p.beginGEMM(gemm).end()                           // 0.031 .. 0.040: the role is back to "other", 9 ms
        p.begin(.elementwise, memoryBound).end()          // 0.041 .. 0.050: 9 ms
        p.begin(.elementwise, computeBound).end()         // 0.052 .. 0.060: 8 ms
        p.endStep()                                       // 0.100
        p.beginStep()                                     // 1.000
        p.begin(.elementwise, memoryBound).end()          // 1.002 .. 1.006: 4 ms
        p.endStep()                                       // 1.050
        p.begin(.elementwise, memoryBound).end()          // after: ignored

        let r = p.result
        XCTAssertEqual(r.steps, 2)
        XCTAssertEqual(r.rows.map(\.category), [.gemmLoRAUp, .gemmOther, .elementwise, .crossEntropy])
        XCTAssertEqual(r.stepSeconds, 0.075, accuracy: 1e-12)
        let up = try XCTUnwrap(r.row(.gemmLoRAUp)), other = try XCTUnwrap(r.row(.gemmOther))
        let ew = try XCTUnwrap(r.row(.elementwise)), loss = try XCTUnwrap(r.row(.crossEntropy))
        XCTAssertEqual([up.count, other.count, ew.count, loss.count], [0.5, 0.5, 1.5, 0.5])
        XCTAssertEqual(up.seconds, 0.005, accuracy: 1e-12)
        XCTAssertEqual(other.seconds, 0.0045, accuracy: 1e-12)
        XCTAssertEqual(ew.seconds, 0.0105, accuracy: 1e-12)
        XCTAssertEqual(loss.seconds, 0.0025, accuracy: 1e-12)
        XCTAssertEqual(r.otherSeconds, 0.075 - 0.0225, accuracy: 1e-12)
        XCTAssertEqual(up.predictedSeconds * 1e6, 34.7419 / 2, accuracy: 1e-4)
        // Per op: (2 * 1.87805 + 1) / 2 = 2.37805 us; the max of the summed FLOPs and bytes would be 1.87805.
        XCTAssertEqual(ew.predictedSeconds * 1e6, 2.37805, accuracy: 1e-5)
        XCTAssertEqual(ew.flops, (2 * 5 * 1_048_576 + 67e6) / 2)
        XCTAssertEqual(ew.bytes, 6_291_456)

        let table = r.formatted()
        for label in ["GEMM LoRA B (up)", "GEMM other", "elementwise", "cross-entropy", "other (host, gaps)", "step", "H100 SXM"] {
            XCTAssertTrue(table.contains(label), "\(label) missing from\n\(table)")
        }
        XCTAssertFalse(table.contains("transfers"), table)
        XCTAssertTrue(table.contains("52.500"), "other: 52.5 ms\n\(table)")
    }

    // MARK: Training steps

    /// The counts a step of `micro` micro-batches of the byte model (`layers` blocks; q, k, v / o / gate, up /
    /// down adapter groups, fused: no dropout, fixed scale) runs, with `recompute` = 1 under block
    /// checkpointing (the block forward again, less its down projection, whose output is not needed) and 0
    /// without; a full-rank model's base GEMMs include the weights' gradients. With `reusesDequantized` (cuda under
    /// block checkpointing, `DequantizedBlock`) the input gradients of the six recomputed linears GEMM on what the
    /// recompute dequantized: 6 dequantizations fewer per block and micro-batch.
    static func expectedCounts(layers L: Int, micro µ: Int, recompute: Int, lora: Bool, quantized: Bool,
                               reusesDequantized: Bool = false) -> [OpCategory: Int] {
        let perLayer = 7 + 6 * recompute + 7 + (lora ? 0 : 7)  // base W: forward, recompute, input gradient, dW if trained
        var counts: [OpCategory: Int] = [
            .attentionForward: L * µ * (1 + recompute), .attentionBackward: L * µ,
            .gemmBase: L * µ * perLayer, .gemmHead: 3 * µ,  // logits, dW_head, dx of the final norm
            .crossEntropy: µ, .embedding: 2 * µ,
            .norm: µ * (L * 2 * (2 + recompute) + 2),  // ln1, ln2: forward, recompute, backward; the final norm
        ]
        if lora {
            counts[.gemmLoRADown] = L * µ * (4 * (1 + recompute) + 2 * 4)  // x A^T per group (recomputed too); dA, dx
            counts[.gemmLoRAUp] = L * µ * (7 + 6 * recompute + 2 * 7)      // u B^T; g = dy B and dB per linear
        }
        if quantized {  // one tile of rows per linear at these sizes
            counts[.dequantize] = counts[.gemmBase]! - (reusesDequantized ? L * µ * 6 * recompute : 0)
        }
        return counts
    }

    /// Checks a profile against the model: each category `expected` names with exactly its count a step; the
    /// optimizer, the gradient norm's reductions, transfers and elementwise ops present (their numbers are the
    /// optimizer's and the backend's choice, not the model's); nothing else (no unattributed GEMM); times that
    /// account for the step.
    func check(_ profile: StepProfile, _ expected: [OpCategory: Int], _ label: String) {
        for (category, count) in expected {
            XCTAssertEqual(profile.row(category)?.count, Double(count), "\(label): \(category.label)")
        }
        for category in [OpCategory.optimizer, .reduction, .transfer, .elementwise] {
            XCTAssertGreaterThan(profile.row(category)?.count ?? 0, 0, "\(label): \(category.label)")
        }
        let allowed = Set(expected.keys).union([.optimizer, .reduction, .transfer, .elementwise])
        XCTAssertEqual(Set(profile.rows.map(\.category)).subtracting(allowed), [], "\(label): unexpected categories")
        for row in profile.rows {
            XCTAssertEqual(row.count, row.count.rounded(), "\(label): \(row.category.label) runs the same ops every step")
            XCTAssertGreaterThanOrEqual(row.seconds, 0, "\(label): \(row.category.label)")
            XCTAssertGreaterThan(row.bytes, 0, "\(label): \(row.category.label) moves bytes")
        }
        let categories = profile.rows.reduce(0) { $0 + $1.seconds }
        XCTAssertGreaterThan(profile.row(.attentionForward)?.seconds ?? 0, 0, label)
        XCTAssertLessThanOrEqual(categories, profile.stepSeconds, "\(label): the categories account for at most the step")
        XCTAssertGreaterThanOrEqual(profile.otherSeconds, 0, label)
        let table = profile.formatted()
        for row in profile.rows { XCTAssertTrue(table.contains(row.category.label), "\(label): \(table)") }
        XCTAssertTrue(table.contains("other (host, gaps)"), table)
    }

    /// CPU: one warm-up step, then two profiled ones, for full-rank and ReLoRA q8_0 models under both
    /// checkpointing settings: the counts are the model's (attention forward = layers x micro-batches x
    /// (1 + recompute), ...), every category the step runs appears, the categories sum to at most the step,
    /// the predictions come from the CPU's measured peaks, and after the profile the backend is unprofiled.
    func testProfiledStepsOnTheCPUMatchTheModel() throws {
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 2)
        let cases: [(TrainingMode, FrozenStorage, GradientCheckpointing)] = [
            (.full, .none, .none), (.relora, .q8_0, .block), (.relora, .none, .none),
        ]
        for (mode, quant, checkpointing) in cases {
            let label = "\(mode) \(quant) \(checkpointing)"
            let r = TrainerTests.recipe(d, run: "profile-\(mode)-\(quant)-\(checkpointing)") {
                $0.mode = mode; $0.quant = quant; $0.checkpointing = checkpointing
                $0.valData = nil; $0.steps = 3; $0.warmupSteps = 0; $0.checkpointEvery = 100
                if mode != .full { $0.loraRank = 4; $0.loraAlpha = 8; $0.reloraEvery = 3; $0.restartWarmup = 0 }
            }
            let backend = CPUBackend()
            var lines: [String] = []
            let trainer = try Trainer(recipe: r, resume: false, backend: backend, log: { lines.append($0) })
            _ = try trainer.trainStep()
            try trainer.startProfile(steps: 2)
            _ = try trainer.trainStep()
            XCTAssertNil(trainer.profile, "\(label): not before its last step")
            XCTAssertNil(backend.profiler, "\(label): attached during a step only")
            _ = try trainer.trainStep()
            XCTAssertNil(backend.profiler, label)
            let profile = try XCTUnwrap(trainer.profile, label)
            XCTAssertEqual(profile.steps, 2, label)
            check(profile, Self.expectedCounts(layers: 2, micro: r.gradAccum, recompute: checkpointing == .block ? 1 : 0,
                                               lora: mode != .full, quantized: quant != .none), label)
            XCTAssertEqual(profile.peaks, PeakFLOPs.cpuPeaks, label)
            XCTAssertGreaterThan(profile.row(.gemmBase)?.predictedSeconds ?? 0, 0, label)
            XCTAssertTrue(lines.contains { $0.hasPrefix("per-op profile: 2 steps on the CPU") }, "\(label): \(lines)")
        }
    }

    /// Data parallel (two in-process ranks summing through the host): a rank's profile is the one-process
    /// profile of the same micro-batch plus one reduction op, the sums across ranks; the host copies inside
    /// them are part of that op, not transfers of their own.
    func testCollectivesAreOneReductionOp() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        func recipe(_ accumulation: Int, _ run: String) -> Recipe {
            TrainerTests.recipe(d, run: run) {
                $0.valData = nil; $0.steps = 2; $0.warmupSteps = 0; $0.checkpointEvery = 100; $0.gradAccum = accumulation
            }
        }
        func profiles(_ r: Recipe, ranks: Int) throws -> [StepProfile] {
            try InProcessGroup.run(ranks: ranks) { c -> StepProfile in
                let t = try Trainer(recipe: r, resume: false, backend: CPUBackend(), communicator: c, log: { _ in })
                t.profileSteps = 1
                _ = try t.run()
                return try XCTUnwrap(t.profile)
            }
        }
        let one = try XCTUnwrap(profiles(recipe(1, "dp1"), ranks: 1).first)  // one micro-batch a step
        for (rank, p) in try profiles(recipe(2, "dp2"), ranks: 2).enumerated() {  // one micro-batch a rank
            var expected = Dictionary(uniqueKeysWithValues: one.rows.map { ($0.category, $0.count) })
            expected[.reduction, default: 0] += 1
            XCTAssertEqual(Dictionary(uniqueKeysWithValues: p.rows.map { ($0.category, $0.count) }), expected, "rank \(rank)")
            XCTAssertLessThanOrEqual(p.rows.reduce(0) { $0 + $1.seconds }, p.stepSeconds, "rank \(rank)")
        }
    }

    /// `run` with `profileSteps`: the steps after the first are profiled, the table logged; a run too short
    /// for them is refused in one sentence before its first step (and by the command before anything is
    /// written).
    func testRunProfilesAfterAWarmUpOrRefuses() throws {
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 1)
        let r = TrainerTests.recipe(d, run: "profile-run") {
            $0.valData = nil; $0.steps = 3; $0.warmupSteps = 0; $0.checkpointEvery = 100
        }
        var lines: [String] = []
        let trainer = try Trainer(recipe: r, resume: false, backend: CPUBackend(), log: { lines.append($0) })
        trainer.profileSteps = 2
        _ = try trainer.run()
        XCTAssertEqual(trainer.profile?.steps, 2)
        XCTAssertEqual(trainer.profile?.row(.attentionForward)?.count, Double(r.gradAccum))
        XCTAssertEqual(lines.filter { $0.hasPrefix("per-op profile:") }.count, 1, "\(lines)")

        let short = try Trainer(recipe: TrainerTests.recipe(d, run: "profile-short") { $0.valData = nil; $0.steps = 2; $0.warmupSteps = 0 },
                                resume: false, backend: CPUBackend(), log: { _ in })
        short.profileSteps = 2
        XCTAssertThrowsError(try short.run()) { error in
            XCTAssertTrue("\(error)".contains("--profile 2 needs 3 steps (one warm-up, then 2 profiled) but the run has 2 left"), "\(error)")
        }
        XCTAssertEqual(short.state.step, 0, "refused before the first step")

        let recipePath = d.dir + "/short.json"
        var json = TrainerTests.recipe(d, run: "profile-cli") { $0.valData = nil; $0.steps = 2; $0.warmupSteps = 0 }.jsonObject()
        json["run_dir"] = d.dir + "/profile-cli"
        try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: recipePath))
        let cli = try runRelora(["train", recipePath, "--profile", "4"])
        XCTAssertEqual(cli.status, 2, cli.stderr)
        XCTAssertTrue(cli.stderr.contains("--profile 4 needs 5 steps"), cli.stderr)
        XCTAssertEqual(cli.stderr.split(separator: "\n").count, 1, cli.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: d.dir + "/profile-cli"), "nothing written")
        XCTAssertTrue(try runRelora(["train", "--help"]).stdout.contains("--profile N"))
    }

    /// The emulated CUDA backend: timing events around every op (a code-path check: the times are the
    /// emulation's host times). A step without the profiler records no event; a profiled one two per op plus
    /// the step's two, and its counts are the model's (a quantized linear is a dequantize and a GEMM).
    func testProfiledStepOnTheEmulatedDevice() throws {
        let library = try CUDABackendTests.emulatedBackend().library
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 2)
        let r = TrainerTests.recipe(d, run: "profile-cuda") {
            $0.mode = .relora; $0.quant = .q4_0; $0.checkpointing = .block; $0.device = "cuda"
            $0.valData = nil; $0.steps = 2; $0.warmupSteps = 0; $0.checkpointEvery = 100
            $0.loraRank = 4; $0.loraAlpha = 8; $0.reloraEvery = 2; $0.restartWarmup = 0
        }
        let backend = CUDABackend(library: library)
        let trainer = try Trainer(recipe: r, resume: false, backend: backend, log: { _ in })
        let before = CUDAEventClock.records
        _ = try trainer.trainStep()
        XCTAssertEqual(CUDAEventClock.records, before, "profiling off: no event recorded")
        try trainer.startProfile(steps: 1)
        _ = try trainer.trainStep()
        let profile = try XCTUnwrap(trainer.profile)
        let ops = Int(profile.rows.reduce(0) { $0 + $1.count })
        XCTAssertEqual(CUDAEventClock.records - before, 2 * ops + 2)
        XCTAssertNil(profile.peaks, "no data sheet for the emulation")
        XCTAssertTrue(profile.deviceName.contains("emulated"), profile.deviceName)
        XCTAssertGreaterThan(trainer.model.dequantizedCacheBytes, 0)
        check(profile, Self.expectedCounts(layers: 2, micro: r.gradAccum, recompute: 1, lora: true, quantized: true, reusesDequantized: true),
              "cuda")
        XCTAssertTrue(profile.formatted().contains("no peaks for this device: no predictions"))
    }
}
