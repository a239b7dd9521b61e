import Foundation
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

/// Frozen base weights stored in q8_0, q4_0 and nf4: the dequantize-on-the-fly linears against dense
/// ones holding the same (dequantized) values, merges through the quantized storage, checkpoints,
/// resume, export and plans.
final class QuantizedTrainingTests: XCTestCase {
    /// Hidden 48 and FFN 80 are not multiples of 32 or 64, so every format pads its rows; 3 query heads
    /// share one KV head.
    func config() throws -> LlamaConfig {
        try LlamaConfig(hiddenSize: 48, intermediateSize: 80, numHiddenLayers: 2, numAttentionHeads: 3,
                        numKeyValueHeads: 1, vocabSize: 37, maxPositionEmbeddings: 16)
    }

    /// A quantized LoRA model with random weights and random B, and a dense LoRA model holding exactly
    /// its dequantized weights and the same adapters.
    func twins(_ format: QuantFormat, dropout: Double = 0) throws -> (quantized: LlamaModel, dense: LlamaModel) {
        let lora = LoRAConfig(rank: 4, alpha: 8, dropout: dropout)
        let q = LlamaModel(config: try config(), backend: CPUBackend(), lora: lora, quant: format)
        let d = LlamaModel(config: try config(), backend: CPUBackend(), lora: lora)
        try q.weights.initializeRandom(seed: 3, std: 0.2, backend: q.backend)
        q.initializeLoRA(seed: 4)
        var rng = TestRNG(5)
        for (name, t) in q.loraTensors() where name.hasSuffix("lora_B") { t.copy(from: rng.floats(t.count, -0.2, 0.2)) }
        for ((_, qs), (_, ds)) in zip(q.weights.slots(), d.weights.slots()) {
            let values: [Float]
            switch qs {
            case .dense(let t): values = t.toArray()
            case .quantized(let w):
                values = try QuantizedMatrix(format: format, rows: w.rows, cols: w.cols, bytes: q.backend.downloadRaw(w.blocks)).dequantize()
            }
            ds.dense!.copy(from: values)
        }
        for ((_, a), (_, b)) in zip(q.loraTensors(), d.loraTensors()) { b.copy(from: a.toArray()) }
        q.enableGradients(); d.enableGradients()
        return (q, d)
    }

    func batch() -> ([Int32], [Int32]) {
        var rng = TestRNG(8)
        return ((0..<24).map { _ in Int32(rng.int(37)) }, (0..<24).map { _ in Int32(rng.int(37)) })
    }

    /// Tolerance: both models compute the same fp32 products, the quantized one in row tiles through
    /// sgemm with other leading dimensions; summation order may differ (k <= 80 terms of O(1) values):
    /// |diff| <~ k * 2^-24 * sum|terms| ~ 1e-5 per matmul, compounded over 2 blocks of ~10 matmuls.
    /// 1e-4 absolute + 1e-4 relative has a ~10x margin and is far below what a wrong tile (whole rows
    /// missing or shifted: O(0.1)) would give.
    func testQuantizedLinearsEqualDenseOnTheDequantizedWeights() throws {
        for format in QuantFormat.allCases {
            for dropout in [0.0, 0.2] {
                let (q, d) = try twins(format, dropout: dropout)
                let (x, y) = batch()
                let lq = try q.logits(inputs: x, batch: 2, seqLen: 12), ld = try d.logits(inputs: x, batch: 2, seqLen: 12)
                for (a, b) in zip(lq, ld) { XCTAssertEqual(a, b, accuracy: 1e-4 + 1e-4 * abs(b), "\(format) logits") }
                let sq = try q.forwardBackward(inputs: x, targets: y, batch: 2, seqLen: 12, gradScale: 1 / 24)
                let sd = try d.forwardBackward(inputs: x, targets: y, batch: 2, seqLen: 12, gradScale: 1 / 24)
                XCTAssertEqual(sq.sum, sd.sum, accuracy: 1e-4 * abs(sd.sum))
                let gq = q.trainableParameters(), gd = d.trainableParameters()
                XCTAssertEqual(gq.map(\.name), gd.map(\.name))
                for (a, b) in zip(gq, gd) {
                    let scale = b.grad.toArray().map(abs).max()! + 1e-6
                    let diff = zip(a.grad.toArray(), b.grad.toArray()).map { abs($0 - $1) }.max()!
                    XCTAssertLessThanOrEqual(diff, 1e-4 * scale + 1e-7, "\(format) dropout \(dropout): \(a.name)")
                }
            }
        }
    }

    /// The quantized model's own gradients against finite differences (LoRA factors and a dense
    /// norm): the backward through a frozen quantized W is the exact adjoint of its forward.
    func testLoRAGradientsWithQuantizedWeightsMatchFiniteDifferences() throws {
        let (q, _) = try twins(.q4_0)
        let (x, y) = batch()
        q.zeroGradients()
        try q.forwardBackward(inputs: x, targets: y, batch: 2, seqLen: 12, gradScale: 1)
        for p in q.trainableParameters() where p.name.contains("layers.1.mlp.down_proj.lora") || p.name == "model.norm.weight" {
            checkFiniteDifferences(p.name, p.value, analytic: p.grad.toArray(), samples: 8) {
                (try? q.loss(inputs: x, targets: y, batch: 2, seqLen: 12).sum) ?? .nan
            }
        }
    }

    /// Merging a zero update (B = 0) changes no code, restart after restart; a real update moves some
    /// codes and the merge report says how much of it the rounding lost.
    func testZeroUpdateMergeKeepsEveryCode() throws {
        for format in QuantFormat.allCases {
            let (q, _) = try twins(format)
            for (_, t) in q.loraTensors() where t.shape.count == 2 && t.shape[1] == 4 { q.backend.zero(t) }  // every B
            let before = q.weights.linears.map { q.backend.downloadRaw($0.weight.storage) }
            for _ in 0..<3 {
                let report = try q.mergeAdapters(policy: RoundToNearestMerge(), seed: 1)
                XCTAssertEqual(report.relativeUpdate, 0)
            }
            XCTAssertEqual(q.weights.linears.map { q.backend.downloadRaw($0.weight.storage) }, before, "\(format)")
            // B != 0: W moves, the rounding loses part of the update (0 < error < 1).
            var rng = TestRNG(9)
            for (name, t) in q.loraTensors() where name.hasSuffix("lora_B") { t.copy(from: rng.floats(t.count, -2, 2)) }
            let report = try q.mergeAdapters(policy: RoundToNearestMerge(), seed: 1)
            XCTAssertGreaterThan(report.mergeError, 0, "\(format)")
            XCTAssertLessThan(report.mergeError, 1, "\(format)")
            XCTAssertNotEqual(q.weights.linears.map { q.backend.downloadRaw($0.weight.storage) }, before, "\(format)")
        }
    }

    func recipe(_ d: TrainerTests.ByteData, _ run: String, _ format: FrozenStorage, policy: MergePolicyKind? = nil) -> Recipe {
        TrainerTests.recipe(d, run: run) {
            $0.mode = .relora; $0.quant = format; $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 9; $0.reloraEvery = 3
            $0.restartWarmup = 1; $0.warmupSteps = 1; $0.checkpointEvery = 100; $0.evalEvery = 100; $0.mergePolicy = policy
        }
    }

    /// ReLoRA with quantized weights: restarts requantize; a run interrupted between the restarts and
    /// resumed gives the same losses and the same codes, bit for bit; checkpoints hold the blocks, not
    /// fp32 (smaller than a dense checkpoint); the export is the dense equivalent of the model.
    func testReLoRAWithQuantizedWeightsResumesBitExactlyAndExports() throws {
        let d = try TrainerTests.makeByteData(hidden: 48, layers: 2)
        for format in [FrozenStorage.q8_0, .q4_0, .nf4] {
            var lines: [String] = []
            let straight = try Trainer(recipe: recipe(d, "q-straight-\(format)", format), resume: false, log: { lines.append($0) })
            _ = try straight.run()
            XCTAssertEqual(straight.model.merges, 2)
            XCTAssertTrue(lines.contains { $0.hasPrefix("restart 1") && $0.contains("merge rtn") }, "\(lines)")
            XCTAssertTrue(straight.history.allSatisfy { $0.loss.isFinite })

            let first = try Trainer(recipe: recipe(d, "q-resumed-\(format)", format), resume: false, log: { _ in })
            first.shouldStop = { first.state.step >= 5 }
            _ = try first.run()
            let saved = try XCTUnwrap(TrainingCheckpoint.latest(runDir: first.recipe.runDir))
            XCTAssertEqual(try TrainingCheckpoint.readState(saved).formatVersion, 2, "resumes from a compressed checkpoint")
            let second = try Trainer(recipe: recipe(d, "q-resumed-\(format)", format), resume: true, log: { _ in })
            _ = try second.run()
            XCTAssertEqual((first.history + second.history).map(\.loss), straight.history.map(\.loss), "\(format)")
            let codes = { (t: Trainer) in t.model.weights.linears.map { t.model.backend.downloadRaw($0.weight.storage) } }
            XCTAssertEqual(codes(second), codes(straight), "\(format)")

            // The checkpoint stores blocks (`<name>.<format>`, U8), no dense copy of the linears.
            let ckpt = try XCTUnwrap(TrainingCheckpoint.latest(runDir: straight.recipe.runDir))
            let file = try ZstdTensorFile(path: ckpt + "/model.tensors.zst")
            XCTAssertEqual(file.header("model.layers.0.mlp.down_proj.weight.\(format.rawValue)")?.dtype, .U8)
            XCTAssertNil(file.header("model.layers.0.mlp.down_proj.weight"))

            // Export: the checkpoint loaded densely (dequantized, current cycle folded in) computes what the
            // training model computes.
            let exported = try TrainingCheckpoint.loadModel(ckpt, backend: CPUBackend())
            XCTAssertTrue(exported.weights.isDense)
            let ids = (0..<16).map { Int32(($0 * 11) % 256) }
            let want = try straight.model.logits(inputs: ids, batch: 1, seqLen: 16)
            let got = try exported.logits(inputs: ids, batch: 1, seqLen: 16)
            for (a, b) in zip(got, want) { XCTAssertEqual(a, b, accuracy: 1e-4 + 1e-4 * abs(b), "\(format) export") }
        }
    }

    /// Every merge policy (rtn: the test above) across restarts: a run interrupted between the restarts
    /// and resumed gives the same losses, codes, LoRA factors (compensate's come from the residual) and
    /// master copies as an uninterrupted one, bit for bit. Each restart's log and metrics line carries the
    /// policy, the update's size, the merge error, the fraction of codes changed (and what compensation
    /// recovered); `master` checkpoints hold the f32 masters beside the blocks.
    func testEveryMergePolicyResumesBitExactlyAcrossRestarts() throws {
        let d = try TrainerTests.makeByteData(hidden: 48, layers: 2)
        for policy in [MergePolicyKind.stochastic, .compensate, .master] {
            for format in [FrozenStorage.q8_0, .q4_0, .nf4] {
                let label = "\(policy) \(format)"
                var lines: [String] = []
                let straight = try Trainer(recipe: recipe(d, "p-straight-\(policy)-\(format)", format, policy: policy), resume: false,
                                           log: { lines.append($0) })
                _ = try straight.run()
                XCTAssertEqual(straight.model.merges, 2, label)
                let restarts = lines.filter { $0.hasPrefix("restart ") }
                XCTAssertEqual(restarts.count, 2, label)
                for line in restarts {
                    XCTAssertTrue(line.contains("merge \(policy.rawValue) in ") && line.contains("codes changed"), line)
                    XCTAssertEqual(line.contains("residual recovered"), policy == .compensate, line)
                    XCTAssertEqual(line.contains("optimizer reset full for A and B (compensate)"), policy == .compensate, line)
                }
                let metrics = try String(contentsOfFile: straight.recipe.runDir + "/metrics.jsonl", encoding: .utf8)
                    .split(separator: "\n").filter { $0.contains("\"restart\"") }
                XCTAssertEqual(metrics.count, 2, label)
                for line in metrics {
                    let keys = try JSONSerialization.jsonObject(with: Data(line.utf8)) as! [String: Any]
                    XCTAssertEqual(keys["merge_policy"] as? String, policy.rawValue, label)
                    for key in ["merge_seconds", "relative_update", "merge_error", "codes_changed"] {
                        XCTAssertNotNil(keys[key] as? Double, "\(label): \(key) in \(line)")
                    }
                    XCTAssertEqual(keys["residual_recovered"] != nil, policy == .compensate, "\(label): \(line)")
                    let changed = try XCTUnwrap(keys["codes_changed"] as? Double)
                    XCTAssertTrue(changed > 0 && changed < 1, "\(label): codes changed \(changed)")
                    if policy == .master { XCTAssertEqual(keys["merge_error"] as? Double, 0, label) }
                }

                let first = try Trainer(recipe: recipe(d, "p-resumed-\(policy)-\(format)", format, policy: policy), resume: false, log: { _ in })
                first.shouldStop = { first.state.step >= 5 }
                _ = try first.run()
                let second = try Trainer(recipe: recipe(d, "p-resumed-\(policy)-\(format)", format, policy: policy), resume: true, log: { _ in })
                _ = try second.run()
                XCTAssertEqual((first.history + second.history).map(\.loss), straight.history.map(\.loss), label)
                func state(_ t: Trainer) -> [[UInt8]] {
                    let b = t.model.backend
                    return t.model.weights.linears.map { b.downloadRaw($0.weight.storage) }
                        + t.model.loraTensors().map { b.downloadRaw($0.value) }
                        + t.model.weights.linears.compactMap { $0.weight.quantized?.master.map(b.downloadRaw) }
                }
                XCTAssertEqual(state(second), state(straight), label)
                XCTAssertEqual(straight.model.weights.linears.allSatisfy { $0.weight.quantized?.master != nil }, policy == .master, label)

                let ckpt = try XCTUnwrap(TrainingCheckpoint.latest(runDir: straight.recipe.runDir))
                let file = try XCTUnwrap(TrainingCheckpoint.openTensors(ckpt, "model"))
                let master = file.header("model.layers.1.mlp.down_proj.weight.master")
                XCTAssertEqual(master?.dtype, policy == .master ? .F32 : nil, label)
                if policy == .master { XCTAssertEqual(master?.shape, [48, 104], label) }
            }
        }
        // A `master` run cannot resume from a checkpoint without master copies (its blocks alone cannot give them back).
        let rtn = try Trainer(recipe: recipe(d, "p-rtn-then-master", .q8_0), resume: false, log: { _ in })
        rtn.shouldStop = { rtn.state.step >= 2 }
        _ = try rtn.run()
        XCTAssertThrowsError(try Trainer(recipe: recipe(d, "p-rtn-then-master", .q8_0, policy: .master), resume: true, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("without its f32 master copy"), "\($0)")
        }
    }

    /// A warm start from a dense checkpoint (here a Hugging Face directory) quantizes each linear as
    /// it is read and logs its quantization error.
    func testWarmStartQuantizesAndLogsTheError() throws {
        let fixtures = fixturesDirectory()
        let d = try TrainerTests.makeByteData()
        try NpyWriter.write(tokens: (0..<600).map { Int64(($0 * 7) % 97) }, dtype: .uint16, to: d.dir + "/small.npy")
        var r = TrainerTests.recipe(d, run: "q-warm") {
            $0.model = fixtures + "/tiny_llama/config.json"; $0.trainData = d.dir + "/small.npy"; $0.valData = nil
            $0.mode = .lora; $0.quant = .q8_0; $0.loraRank = 4; $0.steps = 2; $0.warmupSteps = 0; $0.seqLen = 16
            $0.warmStart = fixtures + "/tiny_llama"
        }
        var lines: [String] = []
        let t = try Trainer(recipe: r, resume: false, log: { lines.append($0) })
        let logged = lines.filter { $0.hasPrefix("quantized model.layers.") && $0.contains("to q8_0: relative error") }
        XCTAssertEqual(logged.count, 7 * 2, "\(lines)")
        // q8_0 keeps ~7 bits of each block's range: a relative error of about 2^-8 on Gaussian-like weights.
        for line in logged {
            let value = try XCTUnwrap(Double(line.split(separator: " ").last!))
            XCTAssertGreaterThan(value, 1e-4, line)
            XCTAssertLessThan(value, 2e-2, line)
        }
        _ = try t.trainStep()
        // Full-rank with quant is refused with one sentence.
        r.mode = .full; r.runDir += "-full"
        XCTAssertThrowsError(try Trainer(recipe: r, resume: false, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("'quant' q8_0 needs mode 'lora' or 'relora'"), "\($0)")
        }
    }
}
