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

/// The training loop: schedule, recipe validation, learning on real text, bit-exact resume,
/// checkpoint integrity and atomicity, non-finite steps, and the Hugging Face export.
final class TrainerTests: XCTestCase {
    /// A small byte-level setup: the committed Shakespeare slices as raw bytes (vocab 256), so no
    /// tokenizer is involved.
    struct ByteData {
        let dir: String
        let model: String
        let train: String
        let val: String
    }

    func makeByteData(hidden: Int = 32, layers: Int = 2) throws -> ByteData { try Self.makeByteData(hidden: hidden, layers: layers) }

    static func makeByteData(hidden: Int = 32, layers: Int = 2) throws -> ByteData {
        let dir = temporaryDirectory()
        let fixtures = fixturesDirectory() + "/shakespeare"
        for (name, out) in [("train_slice.txt", "train.npy"), ("val_slice.txt", "val.npy")] {
            let bytes = try Data(contentsOf: URL(fileURLWithPath: "\(fixtures)/\(name)"))
            try NpyWriter.write(tokens: bytes.map { Int64($0) }, dtype: .uint16, to: "\(dir)/\(out)")
        }
        let config: [String: Any] = [
            "hidden_size": hidden, "intermediate_size": hidden * 2 + 8, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
        ]
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: "\(dir)/config.json"))
        return ByteData(dir: dir, model: "\(dir)/config.json", train: "\(dir)/train.npy", val: "\(dir)/val.npy")
    }

    func recipe(_ data: ByteData, run: String, _ edit: (inout Recipe) -> Void = { _ in }) -> Recipe { Self.recipe(data, run: run, edit) }

    static func recipe(_ data: ByteData, run: String, _ edit: (inout Recipe) -> Void = { _ in }) -> Recipe {
        var r = Recipe(model: data.model, trainData: data.train, valData: data.val, runDir: "\(data.dir)/\(run)")
        r.seqLen = 32; r.microBatch = 4; r.gradAccum = 2; r.steps = 8; r.warmupSteps = 2; r.lr = 3e-3
        r.evalEvery = 4; r.evalTokens = 512; r.checkpointEvery = 4; r.seed = 5; r.initStd = 0.05
        edit(&r)
        return r
    }

    // MARK: Schedule

    func testCosineScheduleValues() {
        let s = LRSchedule(totalSteps: 1100, warmupSteps: 100, minRatio: 0.1)
        XCTAssertEqual(s.multiplier(step: 0), 0)
        XCTAssertEqual(s.multiplier(step: 50), 0.5)
        XCTAssertEqual(s.multiplier(step: 100), 1)
        XCTAssertEqual(s.multiplier(step: 600), 0.55, accuracy: 1e-12)  // halfway down the cosine
        XCTAssertEqual(s.multiplier(step: 1100), 0.1, accuracy: 1e-12)
    }

    /// The worked points of the jagged schedule (ReLoRA issue): N=15000, W0=500, R=5000, w=100, m=0.1.
    func testJaggedScheduleWorkedPoints() {
        let s = LRSchedule(totalSteps: 15000, warmupSteps: 500, minRatio: 0.1, restartEvery: 5000, restartWarmup: 100)
        XCTAssertEqual(s.multiplier(step: 0), 0)
        XCTAssertEqual(s.multiplier(step: 250), 0.5)
        XCTAssertEqual(s.multiplier(step: 500), 1.0)
        XCTAssertEqual(s.multiplier(step: 2500), 0.958, accuracy: 5e-4)
        XCTAssertEqual(s.multiplier(step: 5000), 0)
        XCTAssertEqual(s.multiplier(step: 10000), 0)
        XCTAssertEqual(s.multiplier(step: 5050), 0.397, accuracy: 5e-4)
        XCTAssertEqual(s.multiplier(step: 14999), 0.1, accuracy: 1e-6)
    }

    // MARK: Recipe

    func testRecipeValidation() throws {
        let base: [String: JSONValue] = ["model": .string("m.json"), "train_data": .string("t.npy"), "run_dir": .string("r")]
        func check(_ edit: [String: JSONValue], _ fragment: String, line: UInt = #line) {
            var keys = base
            for (k, v) in edit { keys[k] = v }
            XCTAssertThrowsError(try Recipe(keys: keys), line: line) { error in
                XCTAssertTrue("\(error)".contains(fragment), "'\(error)' should mention '\(fragment)'", line: line)
            }
        }
        check(["lerning_rate": .number(1)], "unknown key 'lerning_rate'")
        check(["seq_len": .number(0)], "'seq_len' must be a positive integer")
        check(["lr": .number(-1)], "'lr' must be a positive number")
        check(["warmup_steps": .number(2000)], "'warmup_steps' must be in [0, steps)")
        check(["adam_beta2": .number(1)], "'adam_beta2' must be in [0, 1)")
        check(["checkpointing": .string("layer")], "'checkpointing' must be 'none' or 'block'")
        check(["tokens_per_step": .number(1000)], "multiple of seq_len * micro_batch")
        check(["steps": .number(5), "token_budget": .number(100000)], "either 'steps' or 'token_budget'")
        check(["device": .string("tpu")], "device must be 'cpu' or 'cuda'")
        check(["seq_len": .string("long")], "'seq_len' must be an integer")
        var keys = base
        keys["token_budget"] = .number(1_024_000)
        keys["warmup_steps"] = .number(10)
        XCTAssertEqual(try Recipe(keys: keys).steps, 1000)  // 1,024,000 / (128 * 8 * 1)
        var k2 = base
        try Recipe.apply(overrides: ["lr=3e-4", "val_data=null", "checkpointing=block"], to: &k2)
        let r = try Recipe(keys: k2)
        XCTAssertEqual(r.lr, 3e-4)
        XCTAssertNil(r.valData)
        XCTAssertEqual(r.checkpointing, .block)
        XCTAssertThrowsError(try Recipe.apply(overrides: ["nope=1"], to: &k2))
        // Round trip through the run directory's recipe.json.
        let data = try JSONSerialization.data(withJSONObject: r.jsonObject())
        XCTAssertEqual(try Recipe(keys: JSONKeys(data: data, what: "recipe").values), r)
    }

    // MARK: Training

    func testValidationLossFallsOnShakespeareBytes() throws {
        let data = try makeByteData(hidden: 64, layers: 2)
        let r = recipe(data, run: "learn") {
            $0.steps = 300; $0.gradAccum = 1; $0.microBatch = 8; $0.seqLen = 64; $0.warmupSteps = 20; $0.lr = 5e-3
            $0.evalEvery = 300; $0.evalTokens = 4096; $0.checkpointEvery = 300
        }
        let trainer = try Trainer(recipe: r, resume: false, log: { _ in })
        let before = try trainer.evaluate()
        let summary = try trainer.run()
        let after = try XCTUnwrap(summary.lastValLoss)
        // Start: ~ln(256) = 5.55 nats/byte. The unigram entropy of these bytes is ~3.3 nats (measured
        // below); a model that learned anything beyond byte frequencies must go under it.
        let unigram = try unigramEntropy(TokenArray(npyPath: data.train))
        print("byte-level Shakespeare: val loss \(before) -> \(after) nats/byte; unigram entropy \(unigram)")
        XCTAssertGreaterThan(before, 5.0)
        XCTAssertLessThan(after, unigram - 0.3, "val loss \(after) vs unigram entropy \(unigram)")
        XCTAssertLessThan(after, before - 2.0)
    }

    func unigramEntropy(_ tokens: TokenArray) -> Double {
        var counts = [Int](repeating: 0, count: 65536)
        for i in 0..<tokens.count { counts[Int(tokens[i])] += 1 }
        let n = Double(tokens.count)
        return counts.filter { $0 > 0 }.reduce(0.0) { $0 - Double($1) / n * log(Double($1) / n) }
    }

    func weightsOf(_ trainer: Trainer) -> [Float] { trainer.model.weights.named().flatMap { $0.1.toArray() } }

    func testResumeIsBitIdentical() throws {
        let data = try makeByteData()
        for checkpointing in GradientCheckpointing.allCases {
            let straight = try Trainer(recipe: recipe(data, run: "straight-\(checkpointing)") { $0.checkpointing = checkpointing },
                                       resume: false, log: { _ in })
            _ = try straight.run()

            let runB = recipe(data, run: "resumed-\(checkpointing)") { $0.checkpointing = checkpointing }
            let first = try Trainer(recipe: runB, resume: false, log: { _ in })
            first.shouldStop = { first.state.step >= 3 }  // stops after step 3 (not a checkpoint_every multiple)
            let partial = try first.run()
            XCTAssertTrue(partial.stoppedEarly)
            XCTAssertEqual(partial.steps, 3)
            let saved = try XCTUnwrap(TrainingCheckpoint.latest(runDir: runB.runDir))
            XCTAssertEqual(try TrainingCheckpoint.readState(saved).formatVersion, 2, "resumes from a compressed checkpoint")
            let second = try Trainer(recipe: runB, resume: true, log: { _ in })
            XCTAssertEqual(second.state.step, 3)
            _ = try second.run()

            let resumedLosses = (first.history + second.history).map(\.loss)
            XCTAssertEqual(resumedLosses, straight.history.map(\.loss), "losses differ after resume (\(checkpointing))")
            XCTAssertTrue(weightsOf(second) == weightsOf(straight), "final weights differ after resume (\(checkpointing))")
            // The metrics file of the resumed run holds each step once, with the same losses.
            let lines = try String(contentsOfFile: runB.runDir + "/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            let steps = lines.compactMap { line -> Int? in
                guard let d = try? JSONDecoder().decode([String: JSONValue].self, from: Data(line.utf8)),
                      d["loss"] != nil, case .number(let s)? = d["step"] else { return nil }
                return Int(s)
            }
            XCTAssertEqual(steps, Array(1...8))
        }
    }

    func testCorruptCheckpointIsDetected() throws {
        let data = try makeByteData()
        let r = recipe(data, run: "corrupt") { $0.steps = 4 }
        _ = try Trainer(recipe: r, resume: false, log: { _ in }).run()
        let ckpt = try XCTUnwrap(TrainingCheckpoint.latest(runDir: r.runDir))
        // Flip one byte in the middle of the weights.
        let path = ckpt + "/model.tensors.zst"
        var bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        bytes[bytes.count / 2] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try Trainer(recipe: r, resume: true, log: { _ in })) { error in
            XCTAssertTrue("\(error)".contains("model.tensors.zst: this checkpoint file is corrupt"), "\(error)")
            XCTAssertTrue("\(error)".contains("no intact earlier checkpoint"), "\(error)")
        }
        // A truncated state file.
        try Data("{\"step\": 4, ".utf8).write(to: URL(fileURLWithPath: ckpt + "/state.json"))
        XCTAssertThrowsError(try Trainer(recipe: r, resume: true, log: { _ in })) { error in
            XCTAssertTrue("\(error)".contains("state.json"), "\(error)")
        }
        // Starting fresh over a run that has checkpoints is refused, not silently overwritten.
        XCTAssertThrowsError(try Trainer(recipe: r, resume: false, log: { _ in })) { error in
            XCTAssertTrue("\(error)".contains("already holds checkpoints"), "\(error)")
        }
    }

    /// A save that dies half way (here: the file-size limit stands in for a full disk) leaves the
    /// previous checkpoint and `latest` usable; a leftover temporary directory is ignored.
    func testInterruptedSaveLeavesPreviousCheckpointUsable() throws {
        let data = try makeByteData()
        let r = recipe(data, run: "interrupted") { $0.steps = 8 }
        let trainer = try Trainer(recipe: r, resume: false, log: { _ in })
        trainer.shouldStop = { trainer.state.step >= 4 }
        _ = try trainer.run()
        let good = try XCTUnwrap(TrainingCheckpoint.latest(runDir: r.runDir))
        XCTAssertTrue(good.hasSuffix("step_00000004"))

        // Continue two more steps in memory, then fail the save of step 6.
        _ = try trainer.trainStep(); _ = try trainer.trainStep()
        var old = rlimit()
        getrlimit(Int32(RLIMIT_FSIZE.rawValue), &old)
        signal(SIGXFSZ, SIG_IGN)
        var small = old
        small.rlim_cur = 4096
        setrlimit(Int32(RLIMIT_FSIZE.rawValue), &small)
        XCTAssertThrowsError(try trainer.saveCheckpoint())
        setrlimit(Int32(RLIMIT_FSIZE.rawValue), &old)

        XCTAssertEqual(try TrainingCheckpoint.latest(runDir: r.runDir), good)
        XCTAssertNoThrow(try TrainingCheckpoint.readState(good))
        // A stale temporary directory from a killed process does not confuse resume.
        try FileManager.default.createDirectory(atPath: TrainingCheckpoint.directory(runDir: r.runDir) + "/.tmp-step_00000006-99999",
                                                withIntermediateDirectories: true)
        let resumed = try Trainer(recipe: r, resume: true, log: { _ in })
        XCTAssertEqual(resumed.state.step, 4)
        _ = try resumed.run()
        XCTAssertEqual(resumed.state.step, 8)
    }

    func testNonFiniteStepsAreSkippedThenStop() throws {
        let data = try makeByteData()
        let r = recipe(data, run: "nan") { $0.steps = 8; $0.maxSkippedFraction = 0.1 }
        var lines: [String] = []
        let trainer = try Trainer(recipe: r, resume: false, log: { lines.append($0) })
        trainer.model.weights.norm.f32[0] = .nan  // every forward is now NaN
        XCTAssertThrowsError(try trainer.run()) { error in
            XCTAssertTrue("\(error)".contains("non-finite loss or gradient"), "\(error)")
        }
        XCTAssertEqual(trainer.state.skippedSteps, 3)  // stops when more than max(2, 10%) were skipped
        XCTAssertEqual(trainer.optimizer.stepCount, 0)  // no update was applied
        XCTAssertTrue(lines.contains { $0.contains("SKIPPED") })
    }

    func testBadDataIsRefusedBeforeTraining() throws {
        let data = try makeByteData()
        // Token ids beyond the model's vocabulary.
        try NpyWriter.write(tokens: [1, 2, 300, 4, 5], dtype: .uint16, to: data.dir + "/big.npy")
        XCTAssertThrowsError(try Trainer(recipe: recipe(data, run: "x") { $0.trainData = data.dir + "/big.npy" }, resume: false, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("vocabulary"), "\($0)")
        }
        XCTAssertThrowsError(try Trainer(recipe: recipe(data, run: "y") { $0.seqLen = 256 }, resume: false, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("max_position_embeddings"), "\($0)")
        }
        XCTAssertThrowsError(try Trainer(recipe: recipe(data, run: "z"), resume: true, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("no checkpoint to resume"), "\($0)")
        }
    }

    func testHuggingFaceExportReloadsWithIdenticalLogits() throws {
        let data = try makeByteData()
        let r = recipe(data, run: "export") { $0.steps = 4 }
        let trainer = try Trainer(recipe: r, resume: false, log: { _ in })
        _ = try trainer.run()
        let ids: [Int32] = Array("To be, or not".utf8).map { Int32($0) }
        let want = try trainer.model.logits(inputs: ids, batch: 1, seqLen: ids.count)
        let out = data.dir + "/hf"
        let ckpt = try XCTUnwrap(TrainingCheckpoint.latest(runDir: r.runDir))
        try HFCheckpoint.save(model: TrainingCheckpoint.loadModel(ckpt, backend: CPUBackend()), to: out)
        let reloaded = try HFCheckpoint.load(directory: out, backend: CPUBackend())
        XCTAssertEqual(try reloaded.logits(inputs: ids, batch: 1, seqLen: ids.count), want)
        // bf16 export: close, not equal. bf16 keeps 8 significant bits, so rounding to nearest changes each
        // weight by a relative delta with |delta| <= u = 2^-8 and E[delta^2] <= u^2/3 (uniform error within
        // half a spacing). A linear output y_i = sum_j W_ij x_j then moves by sum_j W_ij x_j delta_ij, of mean
        // square <= (u^2/3) sum_j W_ij^2 x_j^2 ~ (u^2/3) y_i^2 for unstructured weights (these are 4 steps from
        // a random init): each rounded tensor adds at most ~u^2/3 to the normalized mean square error (NMSE)
        // of what it computes. To first order the errors of the K tensors on the way to the logits add, each
        // at most at full strength: embedding, per layer 2 norms + 7 linears, final norm, head, so K = 21 for
        // these 2 layers and NMSE(logits) <= 21 u^2/3 = 1.07e-4. For ~Gaussian errors the largest of the 3328
        // logits stays under 5 sigma = 5 sqrt(21 u^2/3) rms(logits). Measured: NMSE 1.2e-5 (about the
        // embedding's and head's share: the two thin blocks add little to the residual stream), largest
        // error 0.0037 against a bound of 0.016 (rms(logits) 0.30).
        try HFCheckpoint.save(model: trainer.model, to: out, bfloat16: true)
        let half = try HFCheckpoint.load(directory: out, backend: CPUBackend())
        let got = try half.logits(inputs: ids, batch: 1, seqLen: ids.count)
        let u = 0x1p-8, tensors = Double(1 + 9 * trainer.model.config.numHiddenLayers + 2)
        let squaredError = zip(got, want).reduce(0.0) { $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1) }
        let squaredRef = want.reduce(0.0) { $0 + Double($1) * Double($1) }
        let nmse = squaredError / squaredRef, nmseBound = tensors * u * u / 3
        let maxDiff = Double(zip(got, want).map { abs($0 - $1) }.max()!)
        let maxBound = 5 * nmseBound.squareRoot() * (squaredRef / Double(want.count)).squareRoot()
        XCTAssertGreaterThan(maxDiff, 0)
        XCTAssertLessThan(nmse, nmseBound)
        XCTAssertLessThan(maxDiff, maxBound)
    }
}
