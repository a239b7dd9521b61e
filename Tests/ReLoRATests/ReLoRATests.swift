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

/// LoRA wrapping, merges, optimizer resets and the ReLoRA training mode.
final class ReLoRATests: XCTestCase {
    static func config() throws -> LlamaConfig {
        try LlamaConfig(hiddenSize: 16, intermediateSize: 20, numHiddenLayers: 2, numAttentionHeads: 4,
                        numKeyValueHeads: 2, vocabSize: 13, maxPositionEmbeddings: 16)
    }
    func config() throws -> LlamaConfig { try Self.config() }

    /// A LoRA model whose base weights equal `makeBase`'s and whose adapters are random (B != 0).
    func loraModel(_ lora: LoRAConfig, checkpointing: GradientCheckpointing = .none, randomB: Bool = true) throws -> LlamaModel {
        try Self.loraModel(lora, checkpointing: checkpointing, randomB: randomB)
    }

    static func loraModel(_ lora: LoRAConfig, checkpointing: GradientCheckpointing = .none, randomB: Bool = true) throws -> LlamaModel {
        let model = LlamaModel(config: try config(), backend: CPUBackend(), checkpointing: checkpointing, lora: lora)
        try model.weights.initializeRandom(seed: 7, std: 0.3, backend: model.backend)
        model.initializeLoRA(seed: 9)
        if randomB {
            var rng = TestRNG(21)
            for p in model.loraTensors() where p.name.hasSuffix("lora_B") {
                p.value.copy(from: rng.floats(p.value.count, -0.3, 0.3))
            }
        }
        model.enableGradients()
        return model
    }

    let batch = 2, seqLen = 6
    func data() -> ([Int32], [Int32]) { Self.data() }
    /// Inputs and targets of `batch` x `seqLen` tokens.
    static func data() -> ([Int32], [Int32]) {
        var rng = TestRNG(3)
        return ((0..<12).map { _ in Int32(rng.int(13)) }, (0..<12).map { _ in Int32(rng.int(13)) })
    }

    func testWrappingDoesNotChangeOutputs() throws {
        let full = LlamaModel(config: try config(), backend: CPUBackend())
        try full.weights.initializeRandom(seed: 7, std: 0.3, backend: full.backend)
        let wrapped = try loraModel(LoRAConfig(rank: 4, alpha: 8), randomB: false)
        let (x, _) = data()
        XCTAssertEqual(try wrapped.logits(inputs: x, batch: batch, seqLen: seqLen),
                       try full.logits(inputs: x, batch: batch, seqLen: seqLen))
        // A ~ U(-1/sqrt(in), 1/sqrt(in)) and not zero (the reference code's A = B = 0 bug); B = 0.
        let ad = wrapped.adapter(0, .down)!
        let bound = 1 / Float(ad.inFeatures).squareRoot()
        XCTAssertTrue(ad.a.toArray().allSatisfy { abs($0) <= bound })
        XCTAssertGreaterThan(ad.a.toArray().map(abs).max()!, bound * 0.9)
        XCTAssertTrue(ad.b.toArray().allSatisfy { $0 == 0 })
    }

    func gradientCheck(_ lora: LoRAConfig, checkpointing: GradientCheckpointing) throws {
        let model = try loraModel(lora, checkpointing: checkpointing)
        let (x, y) = data()
        try model.forwardBackward(inputs: x, targets: y, batch: batch, seqLen: seqLen, gradScale: 1)
        let params = model.trainableParameters()
        XCTAssertFalse(params.contains { $0.name.hasSuffix("q_proj.weight") }, "frozen W must not be trained")
        for p in params {
            let analytic = p.grad.toArray()
            // With dropout the loss is the training-mode loss (same masks: same step).
            checkFiniteDifferences("\(p.name) [dropout \(lora.dropout), \(checkpointing)]", p.value, analytic: analytic, samples: 6) {
                // Gradients accumulate as a side effect (scale 0 adds nothing); only the loss is used.
                return try! model.forwardBackward(inputs: x, targets: y, batch: batch, seqLen: seqLen, gradScale: 0).sum
            }
        }
    }

    func testLoRAGradientsMatchFiniteDifferences() throws {
        try gradientCheck(LoRAConfig(rank: 3, alpha: 6), checkpointing: .none)
    }

    func testLoRAGradientsWithDropoutAndTrainableScale() throws {
        try gradientCheck(LoRAConfig(rank: 3, alpha: 6, dropout: 0.3, trainableScale: true), checkpointing: .block)
    }

    func testLoRACheckpointingIsBitIdentical() throws {
        var grads: [[Float]] = []
        for setting in GradientCheckpointing.allCases {
            let model = try loraModel(LoRAConfig(rank: 3, alpha: 6, dropout: 0.2, trainableScale: true), checkpointing: setting)
            let (x, y) = data()
            try model.forwardBackward(inputs: x, targets: y, batch: batch, seqLen: seqLen, gradScale: 0.1)
            grads.append(model.trainableParameters().flatMap { $0.grad.toArray() })
        }
        XCTAssertTrue(grads[0] == grads[1])
    }

    func testMergePreservesOutputsAndResetsFactors() throws {
        let model = try loraModel(LoRAConfig(rank: 4, alpha: 8))
        let (x, _) = data()
        let before = try model.logits(inputs: x, batch: batch, seqLen: seqLen)
        let w0 = model.weights.blocks[1].gate.toArray()
        let report = try model.mergeAdapters(seed: 1)
        XCTAssertEqual(report.restart, 0)
        XCTAssertGreaterThan(report.relativeUpdate, 0)
        let after = try model.logits(inputs: x, batch: batch, seqLen: seqLen)
        // fp32: the merged W + s B A rounds once per weight instead of per activation (measured: largest
        // difference 4.1e-6 = 20 u max|logit|); see `mergeTolerance`.
        let tolerance = mergeTolerance(before)
        for (a, b) in zip(after, before) { XCTAssertEqual(a, b, accuracy: tolerance) }
        XCTAssertNotEqual(model.weights.blocks[1].gate.toArray(), w0)
        XCTAssertTrue(model.adapter(1, .gate)!.b.toArray().allSatisfy { $0 == 0 })
        XCTAssertEqual(model.merges, 1)
        XCTAssertEqual(report.mergeError, 0, "an exact f32 merge stores W + sBA itself")
    }

    /// How far the logits of a merged model (W + s B A in one fp32 matrix) may be from the unmerged LoRA
    /// model's (x W^T + s (x A^T) B^T): both equal the exact result up to rounding. Each of the D ~ 25
    /// rounded stages on the way to the logits (2 layers of norm, q/k/v, scores, softmax, A V, o, residual,
    /// norm, gate/up, SwiGLU, down, residual; final norm, head) adds a relative error of about sqrt(n) u,
    /// with dot products of n <= 20 terms and u = 2^-24, to a value no larger in scale than max|logit|
    /// (RMSNorm resets the scale between stages). Random errors give ~sqrt(D) sqrt(n) u max|logit|
    /// = 22 u max|logit| per path; the bound takes every stage aligned: D sqrt(n) u ~ 112 u, rounded up to
    /// 128 u max|logit|. (The old bound, 1e-4 + 1e-4 |logit|, was ~25x the largest error measured.)
    func mergeTolerance(_ reference: [Float]) -> Float {
        128 * 0x1p-24 * reference.map(abs).max()!
    }

    func testOptimizerResetFractions() {
        let backend = CPUBackend()
        var rng = TestRNG(5)
        let n = 10_007
        for ratio in [0.5, 0.9, 0.99] {
            let original = rng.floats(n)
            let t = makeTensor(backend, [n], original)
            let zeroed = backend.prune(t, OptimizerResetMode.magnitude.rule(ratio: ratio)!, seed: 0, stream: 0)
            let k = Int((ratio * Double(n)).rounded(.up))
            XCTAssertEqual(zeroed, k, "magnitude \(ratio)")
            XCTAssertEqual(t.toArray().filter { $0 == 0 }.count, k)
            // The pruned entries are exactly the k smallest magnitudes; survivors keep their values.
            let after = t.toArray()
            let prunedMax = (0..<n).filter { after[$0] == 0 }.map { abs(original[$0]) }.max()!
            let keptMin = (0..<n).filter { after[$0] != 0 }.map { abs(original[$0]) }.min()!
            XCTAssertLessThan(prunedMax, keptMin, "magnitude \(ratio)")
            XCTAssertEqual(prunedMax, original.map(abs).sorted()[k - 1])
            XCTAssertTrue((0..<n).allSatisfy { after[$0] == 0 || after[$0] == original[$0] })
        }
        // Random: Binomial(n, p); 5 sigma bound.
        let t = makeTensor(backend, [n], rng.floats(n))
        let zeroed = backend.prune(t, OptimizerResetMode.random.rule(ratio: 0.9)!, seed: 1, stream: 2)
        XCTAssertEqual(Double(zeroed) / Double(n), 0.9, accuracy: 5 * (0.9 * 0.1 / Double(n)).squareRoot())
        XCTAssertEqual(backend.prune(t, OptimizerResetMode.full.rule(ratio: 0)!, seed: 0, stream: 0), n)
        XCTAssertNil(OptimizerResetMode.none.rule(ratio: 0.99), "mode none prunes nothing")
    }

    // MARK: Training modes

    func byteData() throws -> TrainerTests.ByteData { try TrainerTests.makeByteData(hidden: 32, layers: 2) }

    func recipe(_ d: TrainerTests.ByteData, run: String, _ edit: (inout Recipe) -> Void) -> Recipe {
        TrainerTests.recipe(d, run: run, edit)
    }

    func testLoRAModeNeverChangesFrozenWeightsAndHasNoStateForThem() throws {
        let d = try byteData()
        let r = recipe(d, run: "lora") { $0.mode = .lora; $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 4 }
        let trainer = try Trainer(recipe: r, resume: false, log: { _ in })
        let w0 = trainer.model.weights.linears.flatMap { $0.weight.dense!.toArray() }
        let emb0 = trainer.model.weights.embed.toArray()
        _ = try trainer.run()
        let w1 = trainer.model.weights.linears.flatMap { $0.weight.dense!.toArray() }
        XCTAssertTrue(w0 == w1, "mode lora changed a frozen weight")
        XCTAssertNotEqual(trainer.model.weights.embed.toArray(), emb0, "embeddings are trained")
        // Memory: frozen weights have no gradient and no optimizer state.
        let report = trainer.model.backend.ledger.report()
        let trained = trainer.optimizer.parameters.reduce(0) { $0 + $1.value.count } * 4
        let frozen = trainer.model.weights.linears.reduce(0) { $0 + $1.weight.dense!.byteCount }
        XCTAssertEqual(report.live(.frozenWeights), frozen)
        XCTAssertEqual(report.live(.gradients), trained)
        XCTAssertEqual(report.live(.optimizer), 2 * trained)
    }

    func testReLoRARestartsMergeResetAndResumeBitExactly() throws {
        let d = try byteData()
        func relora(_ run: String) -> Recipe {
            recipe(d, run: run) {
                $0.mode = .relora; $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 9; $0.reloraEvery = 3
                $0.restartWarmup = 1; $0.warmupSteps = 1; $0.optimizerResetRatio = 0.9; $0.checkpointEvery = 100
                $0.evalEvery = 100
            }
        }
        var lines: [String] = []
        let straight = try Trainer(recipe: relora("straight"), resume: false, log: { lines.append($0) })
        let w0 = straight.model.weights.blocks[0].q.toArray()
        _ = try straight.run()
        // Restarts after the zero-LR steps t = 3 and t = 6 (0-based), i.e. after steps 4 and 7.
        let restarts = lines.filter { $0.hasPrefix("restart ") }
        XCTAssertEqual(restarts.count, 2, "\(lines)")
        XCTAssertTrue(restarts[0].contains("after step 4"), restarts[0])
        XCTAssertEqual(straight.history[3].lr, 0)
        XCTAssertEqual(straight.history[6].lr, 0)
        XCTAssertEqual(straight.model.merges, 2)
        XCTAssertNotEqual(straight.model.weights.blocks[0].q.toArray(), w0, "merges change W")
        // The reset zeroed (at least) the asked fraction of the LoRA moments; dense moments untouched.
        let (fm, fv) = try XCTUnwrap(straight.lastResetFractions)
        XCTAssertGreaterThanOrEqual(fm, 0.9); XCTAssertLessThan(fm, 0.92)
        XCTAssertGreaterThanOrEqual(fv, 0.9); XCTAssertLessThan(fv, 0.92)
        // Dense moments are never pruned: the final norm's gain gets a gradient every step, so none of its
        // moments is zero.
        let normIndex = straight.optimizer.parameters.firstIndex { $0.name == "model.norm.weight" }!
        XCTAssertFalse(straight.optimizer.m[normIndex]!.toArray().contains(0))
        XCTAssertFalse(straight.optimizer.v[normIndex]!.toArray().contains(0))
        XCTAssertEqual(straight.optimizer.stepCount, 9, "Adam's step counter is not reset")

        // Interrupted after step 5 (between the restarts) and resumed: identical losses and weights.
        let first = try Trainer(recipe: relora("resumed"), resume: false, log: { _ in })
        first.shouldStop = { first.state.step >= 5 }
        _ = try first.run()
        let saved = try XCTUnwrap(TrainingCheckpoint.latest(runDir: relora("resumed").runDir))
        XCTAssertEqual(try TrainingCheckpoint.readState(saved).formatVersion, 2, "resumes from a compressed checkpoint")
        let second = try Trainer(recipe: relora("resumed"), resume: true, log: { _ in })
        _ = try second.run()
        XCTAssertEqual((first.history + second.history).map(\.loss), straight.history.map(\.loss))
        XCTAssertTrue(second.model.weights.blocks[1].down.toArray() == straight.model.weights.blocks[1].down.toArray())

        // Export merges the current cycle: the HF model computes what the LoRA model computes.
        let ckpt = try XCTUnwrap(TrainingCheckpoint.latest(runDir: relora("straight").runDir))
        let exported = try TrainingCheckpoint.loadModel(ckpt, backend: CPUBackend())
        let ids: [Int32] = Array("What's in a name".utf8).map { Int32($0) }
        let want = try straight.model.logits(inputs: ids, batch: 1, seqLen: ids.count)
        let got = try exported.logits(inputs: ids, batch: 1, seqLen: ids.count)
        // Measured: largest difference 3.0e-7 = 4 u max|logit|.
        let tolerance = mergeTolerance(want)
        for (a, b) in zip(got, want) { XCTAssertEqual(a, b, accuracy: tolerance) }
    }

    /// A restart happens after its step, so the console and metrics.jsonl show the step first.
    func testRestartIsLoggedAfterItsStep() throws {
        let d = try byteData()
        let r = recipe(d, run: "order") {
            $0.mode = .relora; $0.loraRank = 2; $0.loraAlpha = 4; $0.steps = 4; $0.reloraEvery = 2; $0.restartWarmup = 1
            $0.warmupSteps = 1; $0.checkpointEvery = 100; $0.evalEvery = 100
        }
        var lines: [String] = []
        _ = try Trainer(recipe: r, resume: false, log: { lines.append($0) }).run()
        // The restart follows the zero-LR step t = 2 (0-based), printed as step 3.
        let step = try XCTUnwrap(lines.firstIndex { $0.hasPrefix("step 3/4 ") }, "\(lines)")
        let restart = try XCTUnwrap(lines.firstIndex { $0.hasPrefix("restart 1 after step 3 ") }, "\(lines)")
        XCTAssertEqual(restart, step + 1, "\(lines)")
        let metrics = try String(contentsOfFile: r.runDir + "/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .map { try JSONDecoder().decode([String: JSONValue].self, from: Data($0.utf8)) }
        let kinds = metrics.map { m -> String in
            guard case .number(let s)? = m["step"] else { return "?" }
            return (m["restart"] != nil ? "restart@" : m["val_loss"] != nil ? "eval@" : m["loss"] != nil ? "step" : "?") + "\(Int(s))"
        }
        XCTAssertEqual(kinds, ["step1", "step2", "step3", "restart@3", "step4", "eval@4"])  // the last step always evaluates
    }

    func testWarmStartContinuesStepsAndChecksArchitecture() throws {
        let d = try byteData()
        let warm = recipe(d, run: "warm") { $0.steps = 4 }
        _ = try Trainer(recipe: warm, resume: false, log: { _ in }).run()
        let r = recipe(d, run: "relora-warm") {
            $0.mode = .relora; $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 8; $0.reloraEvery = 2; $0.restartWarmup = 1
            $0.warmStart = warm.runDir
        }
        let t = try Trainer(recipe: r, resume: false, log: { _ in })
        XCTAssertEqual(t.state.step, 4)
        XCTAssertEqual(t.optimizer.stepCount, 4)
        let warmModel = try TrainingCheckpoint.loadModel(try XCTUnwrap(TrainingCheckpoint.latest(runDir: warm.runDir)), backend: CPUBackend())
        XCTAssertEqual(t.model.weights.blocks[0].v.toArray(), warmModel.weights.blocks[0].v.toArray())
        _ = try t.run()
        XCTAssertEqual(t.history.count, 4)

        // A checkpoint directory named directly is a training checkpoint even when it also looks like a
        // Hugging Face directory (format-1 checkpoints hold config.json + model.safetensors): step 4, not 0.
        let checkpoint = try XCTUnwrap(TrainingCheckpoint.latest(runDir: warm.runDir))
        FileManager.default.createFile(atPath: checkpoint + "/model.safetensors", contents: Data())
        XCTAssertTrue(HFCheckpoint.isModelDirectory(checkpoint))
        let direct = recipe(d, run: "relora-warm-direct") {
            $0.mode = .relora; $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 8; $0.reloraEvery = 2; $0.restartWarmup = 1
            $0.warmStart = checkpoint
        }
        let t2 = try Trainer(recipe: direct, resume: false, log: { _ in })
        XCTAssertEqual(t2.state.step, 4)
        XCTAssertEqual(t2.optimizer.stepCount, 4)

        // Another architecture is a clear error.
        let other = try makeOtherConfig(d)
        let bad = recipe(d, run: "relora-bad") { $0.mode = .lora; $0.loraRank = 4; $0.model = other; $0.warmStart = warm.runDir }
        XCTAssertThrowsError(try Trainer(recipe: bad, resume: false, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("another architecture"), "\($0)")
        }
    }

    /// Continued pretraining of an existing model: warm_start names a Hugging Face directory; the run
    /// starts at step 0 with exactly its weights (the loader is `HFCheckpoint.loadWeights`, whose sharded
    /// path BadInputTests covers) and trains.
    func testWarmStartFromHuggingFaceDirectory() throws {
        let fixtures = fixturesDirectory()
        let hf = "\(fixtures)/tiny_llama"
        let d = try byteData()
        // The fixture model has vocab 97: keep the byte data's ids below it.
        let ids = (0..<600).map { Int64(($0 * 7) % 97) }
        try NpyWriter.write(tokens: ids, dtype: .uint16, to: d.dir + "/small.npy")
        let r = recipe(d, run: "hf-warm") {
            $0.model = hf + "/config.json"; $0.trainData = d.dir + "/small.npy"; $0.valData = nil
            $0.mode = .relora; $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 4; $0.reloraEvery = 2; $0.restartWarmup = 1
            $0.warmupSteps = 1; $0.seqLen = 16; $0.warmStart = hf
        }
        let t = try Trainer(recipe: r, resume: false, log: { _ in })
        XCTAssertEqual(t.state.step, 0)
        let reference = try HFCheckpoint.load(directory: hf, backend: CPUBackend())
        for ((name, a), (_, b)) in zip(t.model.weights.named(), reference.weights.named()) {
            XCTAssertEqual(a.toArray(), b.toArray(), name)
        }
        let first = try t.trainStep()
        XCTAssertTrue(first.loss.isFinite)
        // A directory that is no model is the opener's one sentence (ModelSourceTests: the same from every command).
        var bad = r
        bad.warmStart = d.dir
        bad.runDir = d.dir + "/hf-warm-bad"
        XCTAssertThrowsError(try Trainer(recipe: bad, resume: false, log: { _ in })) {
            XCTAssertEqual("\($0)", "\(d.dir): is a directory but not a model; a model is \(ModelSourceKind.accepted)")
        }
    }

    func makeOtherConfig(_ d: TrainerTests.ByteData) throws -> String {
        let c: [String: Any] = ["hidden_size": 48, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "vocab_size": 256, "max_position_embeddings": 128]
        let path = d.dir + "/other.json"
        try JSONSerialization.data(withJSONObject: c).write(to: URL(fileURLWithPath: path))
        return path
    }

    func testReLoRARecipeErrors() throws {
        let d = try byteData()
        func fails(_ fragment: String, _ edit: (inout Recipe) -> Void, line: UInt = #line) {
            var r = recipe(d, run: "bad") { _ in }
            edit(&r)
            XCTAssertThrowsError(try { try r.validate(); _ = try Trainer(recipe: r, resume: false, log: { _ in }) }(), line: line) {
                XCTAssertTrue("\($0)".contains(fragment), "'\($0)' should mention '\(fragment)'", line: line)
            }
        }
        fails("lora_r 64 is larger than the smallest adapted dimension") { $0.mode = .lora; $0.loraRank = 64 }
        fails("must divide 'steps'") { $0.mode = .relora; $0.loraRank = 4; $0.reloraEvery = 3; $0.steps = 8 }
        fails("needs 'relora_every'") { $0.mode = .relora; $0.loraRank = 4 }
        fails("'restart_warmup' must be in [0, relora_every)") { $0.mode = .relora; $0.loraRank = 4; $0.reloraEvery = 4; $0.restartWarmup = 4 }
        fails("needs mode 'relora'") { $0.reloraEvery = 4 }
    }

    /// The point of ReLoRA: the sum of several rank-r updates has rank above r. A rank-1 LoRA on a
    /// tiny model, trained with restarts, accumulates an update of rank > 1 in every matrix.
    func testAccumulatedUpdateRankExceedsR() throws {
        let d = try byteData()
        let r = recipe(d, run: "rank") {
            $0.mode = .relora; $0.loraRank = 1; $0.loraAlpha = 2; $0.steps = 24; $0.reloraEvery = 4; $0.restartWarmup = 1
            $0.warmupSteps = 1; $0.lr = 1e-2; $0.checkpointEvery = 100; $0.evalEvery = 100
        }
        let t = try Trainer(recipe: r, resume: false, log: { _ in })
        let before = t.model.weights.blocks[0].q.toArray()
        _ = try t.run()
        let after = t.model.weights.blocks[0].q.toArray()
        let delta = zip(after, before).map { Double($0 - $1) }
        let shape = t.model.weights.blocks[0].q.shape
        let rank = numericalRank(delta, rows: shape[0], cols: shape[1])
        XCTAssertGreaterThan(rank, 1, "5 merges of rank-1 updates should exceed rank 1")
        XCTAssertLessThanOrEqual(rank, 6)  // at most one per merge (5) plus the current cycle (1)
    }
}

/// Rank by Gaussian elimination with full pivoting. Pivots below `relativeTolerance` times the largest
/// entry count as zero: the update W_after - W_before of fp32 weights carries rounding noise of
/// ~2^-24 |W| per element from every merge, full rank but tiny (~1e-8 here vs updates of ~1e-3).
func numericalRank(_ values: [Double], rows: Int, cols: Int, relativeTolerance: Double = 1e-4) -> Int {
    var m = values
    let tol = relativeTolerance * (values.map(abs).max() ?? 0)
    var rank = 0
    var usedRows = Set<Int>(), usedCols = Set<Int>()
    while true {
        var best = 0.0, bi = -1, bj = -1
        for i in 0..<rows where !usedRows.contains(i) {
            for j in 0..<cols where !usedCols.contains(j) && abs(m[i * cols + j]) > best {
                best = abs(m[i * cols + j]); bi = i; bj = j
            }
        }
        if bi < 0 || best <= tol { return rank }
        rank += 1
        usedRows.insert(bi); usedCols.insert(bj)
        for i in 0..<rows where !usedRows.contains(i) {
            let f = m[i * cols + bj] / m[bi * cols + bj]
            for j in 0..<cols { m[i * cols + j] -= f * m[bi * cols + j] }
        }
    }
}

final class ControlBaselineTests: XCTestCase {
    func testTrainableCountMatchesWhatTheTrainerTrains() throws {
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 2)
        let r = TrainerTests.recipe(d, run: "count") { $0.mode = .lora; $0.loraRank = 4; $0.loraTrainableScale = true }
        let t = try Trainer(recipe: r, resume: false, log: { _ in })
        let trained = t.optimizer.parameters.reduce(0) { $0 + $1.value.count }
        let config = try LlamaConfig(contentsOf: d.model)
        XCTAssertEqual(ControlBaseline.trainableCount(model: config, rank: 4, trainableScale: true), trained)
    }

    func testControlConfigIsTheClosestNarrowerModel() throws {
        let base = try LlamaConfig(hiddenSize: 256, intermediateSize: 688, numHiddenLayers: 4, numAttentionHeads: 4,
                                   vocabSize: 4096, maxPositionEmbeddings: 256)
        let target = ControlBaseline.trainableCount(model: base, rank: 32)
        let control = try ControlBaseline.config(matching: target, like: base)
        XCTAssertEqual(control.headDim, 64)
        XCTAssertEqual(control.numHiddenLayers, 4)
        XCTAssertEqual(control.vocabSize, 4096)
        XCTAssertLessThan(control.hiddenSize, 256)
        // No other width on the head grid is closer.
        for heads in 1...4 where heads * 64 != control.hiddenSize {
            let other = try LlamaConfig(hiddenSize: heads * 64, intermediateSize: Int((688.0 / 256 * Double(heads * 64)).rounded()),
                                        numHiddenLayers: 4, numAttentionHeads: heads, vocabSize: 4096, maxPositionEmbeddings: 256)
            XCTAssertGreaterThanOrEqual(abs(other.parameterCount - target), abs(control.parameterCount - target))
        }
    }
}
