import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain

/// LoRA dropout masks are keyed by the micro-batch's index in the run, so the micro-batches of one
/// optimizer step draw different masks (they shared one when masks were keyed by step), and a run whose
/// checkpoints predate the change resumes with the keying it began with.
final class DropoutKeyTests: XCTestCase {
    /// The same inputs through two micro-batches of one step: different masks, different losses. Under the
    /// old keying the two were the same mask and the same loss.
    func testEveryMicroBatchOfAStepGetsItsOwnMask() throws {
        let model = try ReLoRATests.loraModel(LoRAConfig(rank: 3, alpha: 6, dropout: 0.3))
        let (x, y) = ReLoRATests.data()
        func loss(_ key: DropoutKey) throws -> Double {
            model.dropoutKey = key
            model.zeroGradients()
            return try model.forwardBackward(inputs: x, targets: y, batch: 2, seqLen: 6, gradScale: 1).sum
        }
        let first = try loss(DropoutKey(step: 3, microBatch: 6)), second = try loss(DropoutKey(step: 3, microBatch: 7))
        XCTAssertNotEqual(first, second)
        XCTAssertEqual(try loss(DropoutKey(step: 3, microBatch: 6)), first)  // a mask is a function of its key
        let old0 = try loss(DropoutKey(keying: .perStep, step: 3, microBatch: 6))
        let old1 = try loss(DropoutKey(keying: .perStep, step: 3, microBatch: 7))
        XCTAssertEqual(old0, old1)
    }

    /// Mask streams never coincide with one another (for different micro-batches, layers, kinds) or with
    /// the streams of LoRA initialisations and merges; under the old keying, step 256's masks were cycle 1's
    /// initialisation stream.
    func testMaskStreamsAreTheirOwn() throws {
        var streams = Set<UInt64>()
        for micro in [0, 1, 2, 255, 256, 1 << 20] {
            for layer in [0, 1, 31] {
                for kind in LinearKind.allCases {
                    XCTAssertTrue(streams.insert(DropoutKey(microBatch: micro).stream(layer: layer, kind: kind)).inserted)
                }
            }
        }
        let model = try ReLoRATests.loraModel(LoRAConfig(rank: 2, alpha: 4))
        for cycle in 0..<3 {
            for linear in model.weights.linears {
                XCTAssertFalse(streams.contains(LlamaModel.loraStream(cycle: cycle, linear)))
            }
        }
        for restart in 0..<3 {
            XCTAssertFalse(streams.contains(MergeKey(seed: 1, restart: restart, tensor: 5).stream))
        }
        let linear = model.weights.linears[0]
        XCTAssertEqual(DropoutKey(keying: .perStep, step: 256).stream(layer: linear.layer, kind: linear.kind),
                       LlamaModel.loraStream(cycle: 1, linear))
    }

    /// A checkpoint without `dropout_keying` (written before it existed) reads as the old keying, and a run
    /// that began with it resumes with it bit for bit; new runs record the new keying.
    func testCheckpointsBeforeTheChangeResumeWithTheOldKeying() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        func recipe(_ run: String) -> Recipe {
            TrainerTests.recipe(d, run: run) {
                $0.mode = .lora; $0.loraRank = 4; $0.loraDropout = 0.2; $0.steps = 4; $0.checkpointEvery = 2; $0.valData = nil
            }
        }
        let fresh = try Trainer(recipe: recipe("new"), resume: false, log: { _ in })
        _ = try fresh.run()
        let newState = try TrainingCheckpoint.readState(try XCTUnwrap(TrainingCheckpoint.latest(runDir: fresh.recipe.runDir)))
        XCTAssertEqual(newState.dropoutKeying, .perMicroBatch)

        // A run that began under the old keying, as an older relora would have made it.
        let old = try Trainer(recipe: recipe("old"), resume: false, log: { _ in })
        old.state.dropoutKeying = .perStep
        old.model.dropoutKey.keying = .perStep
        _ = try old.run()
        XCTAssertNotEqual(old.history.map(\.loss), fresh.history.map(\.loss))
        let root = TrainingCheckpoint.directory(runDir: old.recipe.runDir)
        let statePath = root + "/step_00000002/state.json"
        var object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: statePath))) as? [String: Any])
        XCTAssertEqual(object.removeValue(forKey: "dropout_keying") as? Int, 1)
        try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: statePath))
        try "step_00000002\n".write(toFile: root + "/latest", atomically: true, encoding: .utf8)
        var notes: [String] = []
        let resumed = try Trainer(recipe: recipe("old"), resume: true, log: { notes.append($0) })
        XCTAssertEqual(resumed.model.dropoutKey.keying, .perStep)
        XCTAssertTrue(notes.contains { $0.contains("keys its LoRA dropout masks per step") }, "\(notes)")
        _ = try resumed.run()
        XCTAssertEqual(resumed.history.map(\.loss), Array(old.history.map(\.loss)[2...]))
    }
}
