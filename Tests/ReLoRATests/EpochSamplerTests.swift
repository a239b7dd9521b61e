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

/// The epoch sampler: its permutation is a bijection, every window is visited exactly once per epoch,
/// orders differ by seed and epoch, the recipe's automatic choice, the warning and the epoch lines, and
/// a bit-exact resume that a different sampler cannot continue.
final class EpochSamplerTests: XCTestCase {
    func testPermutationIsABijectionForAnySize() {
        for n in [1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 100, 257, 1000, 4097] {
            for key: UInt64 in [0, 1, 0xDEAD_BEEF] {
                let p = WindowPermutation(count: n, key: key)
                XCTAssertEqual((0..<n).map { p($0) }.sorted(), Array(0..<n), "n \(n) key \(key)")
            }
        }
    }

    /// Orders differ by key, look shuffled (about one fixed point, as a random permutation has), and
    /// are the same for the same key.
    func testOrdersDependOnSeedAndEpoch() throws {
        let tokens = try positionTokens(count: 1000 * 4 + 1)
        let a = try EpochSampler(tokens: tokens, seqLen: 4, microBatch: 1, gradAccum: 1, seed: 1)
        let b = try EpochSampler(tokens: tokens, seqLen: 4, microBatch: 1, gradAccum: 1, seed: 2)
        let n = a.windowCount
        let orders = [(0..<n).map { a.window(global: $0).window },          // seed 1, epoch 0
                      (0..<n).map { a.window(global: n + $0).window },      // seed 1, epoch 1
                      (0..<n).map { b.window(global: $0).window }]          // seed 2, epoch 0
        for i in 0..<orders.count {
            XCTAssertEqual(orders[i].sorted(), Array(0..<n))
            XCTAssertLessThan((0..<n).filter { orders[i][$0] == $0 }.count, 8, "order \(i) has many fixed points")
            for j in 0..<i {
                let same = (0..<n).filter { orders[i][$0] == orders[j][$0] }.count
                XCTAssertLessThan(same, 8, "orders \(i) and \(j) agree at \(same) of \(n) positions")
            }
        }
        XCTAssertEqual((0..<n).map { a.window(global: $0).window }, orders[0], "a pure function of (seed, index)")
    }

    /// Token i is i, so a window's first input names its start. For window counts that are not powers
    /// of two, steps whose windows straddle epoch boundaries, and leftover tokens after the last window:
    /// each epoch visits every window once, targets are the inputs shifted by one, and every token
    /// after the first is a target exactly once per epoch.
    func testEachWindowIsVisitedOncePerEpoch() throws {
        for (windows, seqLen, microBatch, gradAccum) in [(37, 4, 3, 2), (64, 8, 4, 1), (100, 5, 7, 3), (1, 3, 1, 1), (6, 2, 2, 3)] {
            let tokens = try positionTokens(count: windows * seqLen + 1 + (seqLen - 1))
            let s = try EpochSampler(tokens: tokens, seqLen: seqLen, microBatch: microBatch, gradAccum: gradAccum, seed: 7)
            XCTAssertEqual(s.windowCount, windows)
            let perStep = microBatch * gradAccum, epochs = 3
            var starts: [Int] = [], targets: [[Int]] = Array(repeating: [], count: epochs + 1)
            for step in 0..<((epochs * windows + perStep - 1) / perStep) {
                for micro in 0..<gradAccum {
                    let (inputs, tgts) = s.batch(step: step, micro: micro, microBatch: microBatch)
                    XCTAssertEqual(inputs.count, microBatch * seqLen)
                    for row in 0..<microBatch {
                        let start = Int(inputs[row * seqLen])
                        let epoch = starts.count / windows
                        starts.append(start)
                        for t in 0..<seqLen {
                            XCTAssertEqual(Int(inputs[row * seqLen + t]), start + t)
                            XCTAssertEqual(Int(tgts[row * seqLen + t]), start + t + 1)
                            targets[min(epoch, epochs)].append(start + t + 1)
                        }
                    }
                }
            }
            let config = "\(windows) windows, seq_len \(seqLen), \(microBatch) x \(gradAccum)"
            XCTAssertTrue(starts.allSatisfy { $0 % seqLen == 0 }, config)
            for e in 0..<epochs {
                let epoch = starts[e * windows ..< (e + 1) * windows].map { $0 / seqLen }
                XCTAssertEqual(epoch.sorted(), Array(0..<windows), "epoch \(e): \(config)")
                XCTAssertEqual(targets[e].sorted(), Array(1...(windows * seqLen)), "targets of epoch \(e): \(config)")
                XCTAssertEqual(s.window(global: e * windows).epoch, e)
            }
            if windows >= 6 {
                XCTAssertNotEqual(starts[0..<windows], starts[windows..<2 * windows], "epochs 0 and 1 share an order: \(config)")
            }
        }
    }

    func testRecipeKey() throws {
        let base: [String: JSONValue] = ["model": .string("m.json"), "train_data": .string("t.npy"), "run_dir": .string("r")]
        XCTAssertNil(try Recipe(keys: base).sampler, "absent: chosen by the trainer")
        var keys = base
        keys["sampler"] = .string("epoch")
        let r = try Recipe(keys: keys)
        XCTAssertEqual(r.sampler, .epoch)
        XCTAssertEqual(r.jsonObject()["sampler"] as? String, "epoch")
        keys["sampler"] = .string("sequential")
        XCTAssertThrowsError(try Recipe(keys: keys)) {
            XCTAssertTrue("\($0)".contains("'sampler' must be 'random' or 'epoch', got 'sequential'"), "\($0)")
        }
    }

    /// Without a `sampler` key: `epoch` when the data holds the run's windows (and the run directory's
    /// recipe.json and state.json say so), `random` with a warning when it does not.
    func testAutomaticChoiceAndWarning() throws {
        let data = try TrainerTests.makeByteData()
        var lines: [String] = []
        let big = TrainerTests.recipe(data, run: "auto-big")  // 8 steps x 8 windows of ~1,870
        let trainer = try Trainer(recipe: big, resume: false, log: { lines.append($0) })
        XCTAssertEqual(trainer.recipe.sampler, .epoch)
        _ = try trainer.run()
        XCTAssertTrue(lines.contains { $0.hasPrefix("sampler epoch: ") && $0.contains("step 0 starts in epoch 0 at window 0") }, "\(lines)")
        XCTAssertFalse(lines.contains { $0.hasPrefix("warning:") }, "\(lines)")
        let recipeJSON = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: big.runDir + "/recipe.json"))) as! [String: Any]
        XCTAssertEqual(recipeJSON["sampler"] as? String, "epoch")
        let ckpt = try XCTUnwrap(TrainingCheckpoint.latest(runDir: big.runDir))
        XCTAssertEqual(try TrainingCheckpoint.readState(ckpt).sampler, "epoch-windows-v1")

        lines = []
        let small = try smallTrainData(data, windows: 20)
        let short = TrainerTests.recipe(data, run: "auto-small") { $0.trainData = small }
        let t2 = try Trainer(recipe: short, resume: false, log: { lines.append($0) })
        XCTAssertEqual(t2.recipe.sampler, .random)
        _ = try t2.run()
        XCTAssertTrue(lines.contains { $0.hasPrefix("sampler random: ") && $0.contains("the run's 64 windows are 3.2 epochs") }, "\(lines)")
        XCTAssertTrue(lines.contains { $0.hasPrefix("warning: the run's budget (64 windows, 2048 tokens) exceeds one epoch of the training data (20 windows)") }, "\(lines)")
    }

    /// An epoch-sampled run over 3.2 epochs, interrupted inside epoch 1 and resumed: the same losses and
    /// weights as without the interruption. The epoch lines name the steps where epochs begin, a resume
    /// asking for the random sampler is refused, and a resume without the key keeps the checkpoint's
    /// sampler (even where the automatic choice would now be `random`).
    func testResumeIsBitIdenticalWithTheEpochSampler() throws {
        let data = try TrainerTests.makeByteData()
        let small = try smallTrainData(data, windows: 20)  // 8 windows a step: epochs begin in steps 3, 6, 8
        func recipe(_ run: String, _ sampler: SamplerMode? = .epoch) -> Recipe {
            TrainerTests.recipe(data, run: run) { $0.trainData = small; $0.sampler = sampler }
        }
        var lines: [String] = []
        let straight = try Trainer(recipe: recipe("straight"), resume: false, log: { lines.append($0) })
        _ = try straight.run()
        let epochLines = lines.filter { $0.hasPrefix("epoch ") }
        XCTAssertEqual(epochLines.map { String($0.prefix(24)) },
                       ["epoch 1 begins in step 3", "epoch 2 begins in step 6", "epoch 3 begins in step 8"], "\(lines)")
        XCTAssertTrue(lines.contains { $0.hasPrefix("warning: ") && $0.contains("every window is seen again from epoch 1 on") }, "\(lines)")
        // The step line comes first, then the epoch line.
        let step3 = try XCTUnwrap(lines.firstIndex { $0.hasPrefix("step 3/8 ") })
        XCTAssertTrue(lines[step3 + 1].hasPrefix("epoch 1 begins in step 3"), "\(lines)")

        let first = try Trainer(recipe: recipe("resumed"), resume: false, log: { _ in })
        first.shouldStop = { first.state.step >= 4 }  // inside epoch 1, not at a checkpoint_every multiple
        _ = try first.run()
        var resumedLines: [String] = []
        let second = try Trainer(recipe: recipe("resumed"), resume: true, log: { resumedLines.append($0) })
        _ = try second.run()
        XCTAssertEqual((first.history + second.history).map(\.loss), straight.history.map(\.loss), "losses differ after resume")
        XCTAssertTrue(second.model.weights.named().flatMap { $0.1.toArray() } == straight.model.weights.named().flatMap { $0.1.toArray() })
        XCTAssertTrue(resumedLines.contains { $0.contains("step 4 starts in epoch 1 at window 12 of 20") }, "\(resumedLines)")

        XCTAssertThrowsError(try Trainer(recipe: recipe("resumed", .random), resume: true, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("the checkpoint was made with sampler 'epoch' but the recipe says 'random'"), "\($0)")
        }
        let keyless = try Trainer(recipe: recipe("resumed", nil), resume: true, log: { _ in })
        XCTAssertEqual(keyless.recipe.sampler, .epoch)
        // And the other way round: a random-sampled run cannot be continued with the epoch sampler.
        let randomRun = try Trainer(recipe: recipe("random", .random), resume: false, log: { _ in })
        randomRun.shouldStop = { randomRun.state.step >= 2 }
        _ = try randomRun.run()
        XCTAssertThrowsError(try Trainer(recipe: recipe("random", .epoch), resume: true, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("sampler 'random' but the recipe says 'epoch'"), "\($0)")
        }
    }

    // MARK: Helpers

    /// A .npy of `count` tokens whose values are their positions.
    func positionTokens(count: Int) throws -> TokenArray {
        let path = temporaryDirectory() + "/positions.npy"
        try NpyWriter.write(tokens: (0..<count).map { Int64($0) }, dtype: .uint32, to: path)
        return try TokenArray(npyPath: path)
    }

    /// The first `windows * 32 + 1` bytes of the training slice (exactly `windows` windows at seq_len 32).
    func smallTrainData(_ data: TrainerTests.ByteData, windows: Int) throws -> String {
        let all = try TokenArray(npyPath: data.train)
        let path = data.dir + "/small-\(windows).npy"
        try NpyWriter.write(tokens: (0..<(windows * 32 + 1)).map { all[$0] }, dtype: .uint16, to: path)
        return path
    }
}
