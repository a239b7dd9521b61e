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

/// Training checkpoints in format 2 (zstd tensor files): what they hold, their size against bf16 in the
/// log, the old uncompressed format 1 still loading (and resuming bit for bit), and a damaged latest
/// checkpoint naming the earlier one that then resumes.
final class CheckpointFormatTests: XCTestCase {
    /// ReLoRA with restarts after steps 3 and 6 of 9 (`format`: dense or quantized frozen weights).
    func quantRecipe(_ d: TrainerTests.ByteData, _ run: String, _ format: FrozenStorage) -> Recipe {
        TrainerTests.recipe(d, run: run) {
            $0.mode = .relora; $0.quant = format; $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 9; $0.reloraEvery = 3
            $0.restartWarmup = 1; $0.warmupSteps = 1; $0.checkpointEvery = 100; $0.evalEvery = 100
        }
    }

    func weightsOf(_ t: Trainer) -> [Float] { t.model.weights.named().flatMap { $0.1.toArray() } }

    /// A q4_0 ReLoRA checkpoint: format 2, three zstd tensor files and no safetensors; every tensor reads
    /// back bit for bit (the quantized weights as their blocks, never as fp32); the footprint counts every
    /// parameter at 2 bytes and the log line shows it.
    func testCompressedCheckpointHoldsEveryTensorExactlyAndReportsItsSize() throws {
        let d = try TrainerTests.makeByteData(hidden: 48, layers: 2)
        for format in [FrozenStorage.none, .q4_0] {
            var lines: [String] = []
            let t = try Trainer(recipe: quantRecipe(d, "layout-\(format)", format), resume: false, log: { lines.append($0) })
            _ = try t.run()
            let ckpt = try XCTUnwrap(TrainingCheckpoint.latest(runDir: t.recipe.runDir))
            let state = try TrainingCheckpoint.readState(ckpt)
            XCTAssertEqual(state.formatVersion, 2)
            let files = ["config.json", "lora.tensors.zst", "model.tensors.zst", "optimizer.tensors.zst", "recipe.json"]
            XCTAssertEqual(state.checksums.keys.sorted(), files)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: ckpt).sorted(), files + ["state.json"])

            let backend = t.model.backend
            let model = try ZstdTensorFile(path: ckpt + "/model.tensors.zst")
            for (name, slot) in t.model.weights.slots() {
                switch slot {
                case .dense(let w):
                    XCTAssertEqual(try model.floats(name), backend.download(w), name)
                case .quantized(let q):
                    XCTAssertNil(model.header(name), "\(name) is stored dense")
                    XCTAssertEqual(model.header(name + ".q4_0"), TensorHeader(dtype: .U8, shape: [q.rows, q.bytesPerRow]))
                    XCTAssertEqual(try model.withRawBytes(name + ".q4_0") { Array($0) }, backend.downloadRaw(q.blocks), name)
                }
            }
            let moments = try ZstdTensorFile(path: ckpt + "/optimizer.tensors.zst")
            for (i, p) in t.optimizer.parameters.enumerated() {
                XCTAssertEqual(try moments.floats("m." + p.name), backend.download(t.optimizer.m[i]!), p.name)
                XCTAssertEqual(try moments.floats("v." + p.name), backend.download(t.optimizer.v[i]!), p.name)
            }

            // bf16 equivalent: 2 bytes per parameter of the weights (quantized ones by the values their
            // blocks hold: hidden 48 and intermediate 104 pad to whole blocks of 32), the adapters and both
            // moments, plus the JSON files.
            let weights = t.model.weights.slots().reduce(0) { total, slot in
                switch slot.1 {
                case .dense(let w): return total + w.count
                case .quantized(let q): return total + q.rows * q.format.blocksPerRow(cols: q.cols) * q.format.blockSize
                }
            }
            let adapters = t.model.loraTensors().reduce(0) { $0 + $1.value.count }
            let trained = t.optimizer.parameters.reduce(0) { $0 + $1.value.count }
            let sizes = try FileManager.default.contentsOfDirectory(atPath: ckpt).map {
                (name: $0, bytes: try XCTUnwrap(FileManager.default.attributesOfItem(atPath: ckpt + "/" + $0)[.size] as? Int))
            }
            let json = sizes.filter { $0.name.hasSuffix(".json") }.reduce(0) { $0 + $1.bytes }
            let footprint = try TrainingCheckpoint.footprint(ckpt)
            XCTAssertEqual(footprint.bf16Bytes, 2 * (weights + adapters + 2 * trained) + json)
            XCTAssertEqual(footprint.bytes, sizes.reduce(0) { $0 + $1.bytes })
            XCTAssertLessThan(footprint.ratio, 1.9, "\(format)")  // uncompressed fp32 would be about 2
            let logged = try XCTUnwrap(lines.first { $0.hasPrefix("checkpoint ") }, "\(lines)")
            XCTAssertTrue(logged.contains(String(format: "%@ = %.2fx of bf16 %@)", formatBytes(footprint.bytes), footprint.ratio,
                                                 formatBytes(footprint.bf16Bytes))), logged)
        }
    }

    /// A run interrupted at a checkpoint written in the old uncompressed layout (format 1, as earlier
    /// builds wrote it) resumes bit for bit, dense and quantized, and writes format 2 from then on; the
    /// old checkpoint also exports and reports its footprint.
    func testUncompressedFormat1CheckpointsStillLoadAndResume() throws {
        let d = try TrainerTests.makeByteData(hidden: 48, layers: 2)
        for format in [FrozenStorage.none, .q4_0] {
            let straight = try Trainer(recipe: quantRecipe(d, "v1-straight-\(format)", format), resume: false, log: { _ in })
            _ = try straight.run()

            let first = try Trainer(recipe: quantRecipe(d, "v1-resumed-\(format)", format), resume: false, log: { _ in })
            first.shouldStop = { first.state.step >= 5 }
            _ = try first.run()
            let ckpt = try TrainingCheckpoint.save(runDir: first.recipe.runDir, state: first.state, model: first.model,
                                                   moments: first.optimizer.checkpointMoments,
                                                   recipe: first.recipe.jsonObject(), keep: 2, version: 1)
            XCTAssertEqual(try TrainingCheckpoint.readState(ckpt).formatVersion, 1)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: ckpt).sorted(),
                           ["config.json", "lora.safetensors", "model.safetensors", "optimizer.safetensors", "recipe.json", "state.json"])
            let footprint = try TrainingCheckpoint.footprint(ckpt)
            XCTAssertGreaterThan(footprint.ratio, 1.2, "uncompressed fp32 moments")
            let exported = try TrainingCheckpoint.loadModel(ckpt, backend: CPUBackend())
            XCTAssertTrue(exported.weights.isDense)

            let second = try Trainer(recipe: quantRecipe(d, "v1-resumed-\(format)", format), resume: true, log: { _ in })
            XCTAssertEqual(second.state.step, 5)
            _ = try second.run()
            XCTAssertEqual((first.history + second.history).map(\.loss), straight.history.map(\.loss), "\(format)")
            let weights = { (t: Trainer) in t.model.weights.slots().map { slot -> [UInt8] in
                switch slot.1 {
                case .dense(let w): return t.model.backend.download(w).withUnsafeBytes { Array($0) }
                case .quantized(let q): return t.model.backend.downloadRaw(q.blocks)
                }
            } }
            XCTAssertEqual(weights(second), weights(straight), "\(format)")
            let last = try XCTUnwrap(TrainingCheckpoint.latest(runDir: second.recipe.runDir))
            XCTAssertEqual(try TrainingCheckpoint.readState(last).formatVersion, 2)
        }
        // A format from the future is refused with one sentence.
        let t = try Trainer(recipe: quantRecipe(d, "v3", .none), resume: false, log: { _ in })
        let ckpt = try t.saveCheckpoint()
        var state = try TrainingCheckpoint.readState(ckpt)
        state.formatVersion = 3
        try JSONEncoder().encode(state).write(to: URL(fileURLWithPath: ckpt + "/state.json"))
        assertInvalidFile(try TrainingCheckpoint.readState(ckpt), mentions: "format version 3 is not supported")
    }

    /// The latest checkpoint damaged (a byte flipped inside a compressed frame, or the file cut short):
    /// resuming fails with one sentence naming the file and the intact earlier checkpoint; doing what it
    /// says resumes from that one and gives the uninterrupted run's losses and weights.
    func testDamagedLatestCheckpointNamesTheEarlierOneThatResumes() throws {
        let d = try TrainerTests.makeByteData()
        let straight = try Trainer(recipe: TrainerTests.recipe(d, run: "damage-straight"), resume: false, log: { _ in })
        _ = try straight.run()
        for damage in ["flip", "truncate", "remove"] {
            let r = TrainerTests.recipe(d, run: "damage-\(damage)")
            _ = try Trainer(recipe: r, resume: false, log: { _ in }).run()
            let root = TrainingCheckpoint.directory(runDir: r.runDir)
            let path = root + "/step_00000008/optimizer.tensors.zst"
            var bytes = try Data(contentsOf: URL(fileURLWithPath: path))
            switch damage {
            case "flip": bytes[bytes.count / 3] ^= 0x04
            case "truncate": bytes = bytes.prefix(bytes.count - 100)
            default: try FileManager.default.removeItem(atPath: path)
            }
            if damage != "remove" { try bytes.write(to: URL(fileURLWithPath: path)) }
            do {
                _ = try Trainer(recipe: r, resume: true, log: { _ in })
                XCTFail("resumed from a damaged checkpoint (\(damage))")
            } catch ReLoRAError.invalidFile(let file, let reason) {
                XCTAssertEqual(file, path)
                XCTAssertTrue(reason.contains(damage == "remove" ? "is missing" : "is corrupt"), reason)
                XCTAssertTrue(reason.contains("\(root)/step_00000004 is intact: to resume from it, write 'step_00000004' into \(root)/latest"), reason)
                XCTAssertFalse(reason.contains("\n"))
            }
            try Data("step_00000004\n".utf8).write(to: URL(fileURLWithPath: root + "/latest"))
            let resumed = try Trainer(recipe: r, resume: true, log: { _ in })
            XCTAssertEqual(resumed.state.step, 4)
            _ = try resumed.run()
            XCTAssertEqual(resumed.history.map(\.loss), Array(straight.history.map(\.loss)[4...]), damage)
            XCTAssertTrue(weightsOf(resumed) == weightsOf(straight), damage)
            // The re-trained step 8 replaced the damaged one.
            XCTAssertNoThrow(try TrainingCheckpoint.readState(root + "/step_00000008"))
        }
    }
}
