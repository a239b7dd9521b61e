import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAFormats
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain

/// Paths that could lose a run's data or end it in a trap: a run directory whose `checkpoints/latest` is
/// gone, pruning, and running out of memory or disk in the middle of a run.
final class DataSafetyTests: XCTestCase {
    /// Every file under `dir` (relative path -> contents), to show that a refused command changed nothing.
    func snapshot(_ dir: String) throws -> [String: Data] {
        var files: [String: Data] = [:]
        let fm = FileManager.default
        guard let walker = fm.enumerator(atPath: dir) else { return files }
        for case let relative as String in walker {
            var isDir: ObjCBool = false
            if fm.fileExists(atPath: dir + "/" + relative, isDirectory: &isDir), !isDir.boolValue {
                files[relative] = try Data(contentsOf: URL(fileURLWithPath: dir + "/" + relative))
            }
        }
        return files
    }

    /// A 6-step run with checkpoints at steps 2, 4 and 6 (the last two kept), then `latest` deleted.
    func runWithoutLatest(_ data: TrainerTests.ByteData) throws -> Recipe {
        let r = TrainerTests.recipe(data, run: "run") { $0.steps = 6; $0.checkpointEvery = 2; $0.evalEvery = 3 }
        _ = try Trainer(recipe: r, resume: false, log: { _ in }).run()
        try FileManager.default.removeItem(atPath: TrainingCheckpoint.directory(runDir: r.runDir) + "/latest")
        return r
    }

    // MARK: A run directory without `latest`

    /// A new run into a directory that holds checkpoints but no `latest` (which the advice for a damaged
    /// `latest` tells the user to delete) is refused with one sentence, and nothing on disk changes.
    func testNewRunIntoRunWithoutLatestIsRefused() throws {
        let data = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let r = try runWithoutLatest(data)
        let before = try snapshot(r.runDir)
        XCTAssertNotNil(before["metrics.jsonl"])
        XCTAssertNotNil(before["checkpoints/step_00000006/state.json"])
        XCTAssertThrowsError(try Trainer(recipe: r, resume: false, log: { _ in })) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("step_00000006"), "names the newest checkpoint: \(text)")
            XCTAssertTrue(text.contains("--resume"), text)
            XCTAssertTrue(text.contains("another run_dir"), text)
            XCTAssertFalse(text.contains("\n"), "one sentence: \(text)")
        }
        XCTAssertEqual(try snapshot(r.runDir), before, "a refused run changed the run directory")
    }

    /// The user's journey through the CLI: the same `relora train r.json` again exits non-zero with one
    /// line and leaves metrics.jsonl and the checkpoints byte-identical.
    func testCLITrainAgainWithoutLatestChangesNothing() throws {
        let data = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let runDir = data.dir + "/run"
        let recipe: [String: Any] = [
            "model": data.model, "train_data": data.train, "run_dir": runDir, "seq_len": 32, "micro_batch": 2,
            "steps": 6, "warmup_steps": 1, "eval_every": 100, "checkpoint_every": 2,
        ]
        try JSONSerialization.data(withJSONObject: recipe).write(to: URL(fileURLWithPath: data.dir + "/r.json"))
        var r = try runRelora(["train", data.dir + "/r.json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        try FileManager.default.removeItem(atPath: runDir + "/checkpoints/latest")
        let before = try snapshot(runDir)
        r = try runRelora(["train", data.dir + "/r.json"])
        XCTAssertNotEqual(r.status, 0, "a second run over the old one was accepted: \(r.stdout)")
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("step_00000006"), r.stderr)
        XCTAssertEqual(try snapshot(runDir), before, "the refused run changed the run directory")
    }

    /// `--resume` without `latest` names the newest intact checkpoint to write into `latest` (as the advice
    /// for a damaged one does) and changes nothing; following the advice resumes from it.
    func testResumeWithoutLatestNamesNewestIntactCheckpoint() throws {
        let data = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let r = try runWithoutLatest(data)
        let root = TrainingCheckpoint.directory(runDir: r.runDir)
        // The newest checkpoint is damaged: the advice skips it.
        let damaged = root + "/step_00000006/model.tensors.zst"
        var bytes = try Data(contentsOf: URL(fileURLWithPath: damaged))
        bytes[bytes.count / 2] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: damaged))
        let before = try snapshot(r.runDir)
        XCTAssertThrowsError(try Trainer(recipe: r, resume: true, log: { _ in })) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("write 'step_00000004' into \(root)/latest"), text)
            XCTAssertFalse(text.contains("start the run without --resume"), "advice that would overwrite the run: \(text)")
            XCTAssertFalse(text.contains("\n"), text)
        }
        XCTAssertEqual(try snapshot(r.runDir), before)
        try "step_00000004\n".write(toFile: root + "/latest", atomically: true, encoding: .utf8)
        let resumed = try Trainer(recipe: r, resume: true, log: { _ in })
        XCTAssertEqual(resumed.state.step, 4)
    }

    /// `prune` keeps the checkpoint `latest` names even when older-numbered than the others (a run
    /// directory holding step_ directories of another run).
    func testPruneNeverDeletesTheCheckpointLatestNames() throws {
        let root = temporaryDirectory() + "/checkpoints"
        for step in [3, 10, 12] {
            try FileManager.default.createDirectory(atPath: root + "/" + TrainingCheckpoint.name(step: step),
                                                    withIntermediateDirectories: true)
        }
        try "step_00000003\n".write(toFile: root + "/latest", atomically: true, encoding: .utf8)
        TrainingCheckpoint.prune(root: root, keep: 1)
        let left = try FileManager.default.contentsOfDirectory(atPath: root).filter { $0.hasPrefix("step_") }.sorted()
        XCTAssertEqual(left, ["step_00000003", "step_00000012"])
    }
}
