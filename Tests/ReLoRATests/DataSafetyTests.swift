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
        // Export, eval and warm starts find a run's checkpoint the same way, with the same advice (they said
        // "is neither a checkpoint directory nor a run directory with checkpoints").
        XCTAssertThrowsError(try TrainingCheckpoint.resolve(r.runDir)) {
            XCTAssertTrue("\($0)".contains("write 'step_00000004' into \(root)/latest"), "\($0)")
        }
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

    // MARK: Out of memory or disk in the middle of a run

    /// A run stopped by exhausted memory or disk: exit status `ResourceExhaustion.exitStatus` (not a
    /// trap), one line on stderr mentioning each of `mentions`.
    func assertStoppedCleanly(_ r: (status: Int32, reason: Process.TerminationReason, stdout: String, stderr: String),
                              mentions: [String], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(r.reason, .exit, "ended by a signal (a trap): \(r.stderr.prefix(600))", file: file, line: line)
        XCTAssertEqual(r.status, ResourceExhaustion.exitStatus, r.stderr, file: file, line: line)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "one sentence: \(r.stderr.prefix(600))", file: file, line: line)
        for m in mentions { XCTAssertTrue(r.stderr.contains(m), "'\(m)' missing: \(r.stderr)", file: file, line: line) }
    }

    /// Device memory running out in the middle of a run on the emulated device: a resumed run whose plan fits
    /// (the plan counts every block the allocator takes, so a memory cap that admits the plan admits the run)
    /// is denied its first step's last cudaMalloc (`RELORA_EMU_DEVICE_MALLOCS`, as when another process takes
    /// the memory after the run's check): it builds the model, loads the checkpoint and fails in its first
    /// step. It ends with one sentence and the documented exit status, and the checkpoint it resumed is
    /// untouched.
    func testDeviceOutOfMemoryMidRunEndsWithOneSentence() throws {
        try KernelEmulationTests.buildEmulation()
        let library = KernelEmulationTests.emulatedLibrary
        let data = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let runDir = data.dir + "/run"
        let recipe: [String: Any] = [
            "model": data.model, "train_data": data.train, "run_dir": runDir, "seq_len": 32, "micro_batch": 2,
            "steps": 2, "warmup_steps": 1, "eval_every": 100, "checkpoint_every": 2, "device": "cuda",
        ]
        try JSONSerialization.data(withJSONObject: recipe).write(to: URL(fileURLWithPath: data.dir + "/r.json"))
        var r = try runReloraProcess(["train", data.dir + "/r.json"], environment: ["RELORA_CUDA_LIB": library])
        XCTAssertEqual(r.status, 0, r.stderr)

        // The plan's cudaMalloc calls through the first step (the backend's own scratch included), less one.
        let resumed = try Recipe(contentsOf: data.dir + "/r.json", overrides: ["steps=4"])
        let gpu = CUDABackend(library: try CUDALibrary.load(path: library)).gpu
        let plan = try XCTUnwrap(try MemoryPlanner.plan(resumed, config: LlamaConfig(contentsOf: data.model), device: .cuda, gpu: gpu).cuda)
        let mallocs = plan.afterFirstStep.mallocCalls - 1
        let before = try snapshot(runDir + "/checkpoints")
        let metrics = try Data(contentsOf: URL(fileURLWithPath: runDir + "/metrics.jsonl"))
        r = try runReloraProcess(["train", "--resume", runDir, "--set", "steps=4"],
                                 environment: ["RELORA_CUDA_LIB": library, "RELORA_EMU_DEVICE_MALLOCS": "\(mallocs)"])
        XCTAssertTrue(r.stdout.contains("resumed from \(runDir)/checkpoints/step_00000002"), "fails after the plan check and the load: \(r.stdout)")
        XCTAssertFalse(r.stdout.contains("step 3/4"), r.stdout)
        assertStoppedCleanly(r, mentions: ["out of device memory", "relora memory --device cuda", "--resume"])
        XCTAssertEqual(try snapshot(runDir + "/checkpoints"), before, "the last checkpoint changed")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: runDir + "/metrics.jsonl")), metrics)

        // Without the denial the same run fits the memory its plan needs, to the byte: a cap of the backend's
        // own scratch plus the plan's need lets it resume, train, save and finish.
        let capped = try Recipe(contentsOf: data.dir + "/r.json", overrides: ["steps=3"])
        let need = try XCTUnwrap(try MemoryPlanner.plan(capped, config: LlamaConfig(contentsOf: data.model), device: .cuda, gpu: gpu).cuda)
        r = try runReloraProcess(["train", "--resume", runDir, "--set", "steps=3"],
                                 environment: ["RELORA_CUDA_LIB": library,
                                               "RELORA_DEVICE_MEMORY_LIMIT": "\(need.persistentScratch + need.neededAfterStart)"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("memory plan: needs \(formatBytes(need.neededAfterStart)) of \(formatBytes(need.neededAfterStart)) free"), r.stdout)
    }

    /// `master_copies: file` failing after its free-space check (here a file-size limit makes reserving the
    /// mapped file fail, as a quota or a full disk would): one sentence and the documented exit status, the
    /// checkpoint the run resumed untouched.
    func testMasterCopyFileFailureEndsWithOneSentence() throws {
        let data = try TrainerTests.makeByteData(hidden: 32, layers: 1)
        let runDir = data.dir + "/run"
        let recipe: [String: Any] = [
            "model": data.model, "train_data": data.train, "run_dir": runDir, "seq_len": 32, "micro_batch": 2,
            "steps": 2, "warmup_steps": 1, "eval_every": 100, "checkpoint_every": 2, "mode": "relora", "relora_every": 2,
            "restart_warmup": 1, "lora_r": 4, "quant": "q8_0", "merge_policy": "master", "master_copies": "file",
        ]
        try JSONSerialization.data(withJSONObject: recipe).write(to: URL(fileURLWithPath: data.dir + "/r.json"))
        var r = try runReloraProcess(["train", data.dir + "/r.json"], environment: [:])
        XCTAssertEqual(r.status, 0, r.stderr)
        let before = try snapshot(runDir)
        // 1 KiB at most per file (the copies are 4 KiB and more); SIGXFSZ ignored, so writes fail with EFBIG.
        r = try runReloraProcess(["train", "--resume", runDir, "--set", "steps=4"], environment: [:], shell: "ulimit -f 1; trap '' XFSZ")
        assertStoppedCleanly(r, mentions: ["master_copies", "ram", "--resume"])
        XCTAssertEqual(try snapshot(runDir), before, "the run directory changed")
    }

    // MARK: A model the CUDA kernels cannot run

    /// A model whose head_dim exceeds the CUDA attention kernels' 128 reached a failed kernel call, which
    /// traps (`CUDALibrary.fail`): on cuda the run is refused before anything is allocated, with one
    /// sentence, and a model built anyway refuses its forward pass the same way.
    func testHeadDimBeyondTheCUDAKernelsIsRefused() throws {
        try KernelEmulationTests.buildEmulation()
        let data = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let config: [String: Any] = [
            "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "vocab_size": 256, "max_position_embeddings": 64,
        ]
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: data.dir + "/wide.json"))
        let recipe: [String: Any] = [
            "model": data.dir + "/wide.json", "train_data": data.train, "run_dir": data.dir + "/run", "seq_len": 32,
            "micro_batch": 2, "steps": 2, "warmup_steps": 1, "eval_every": 100, "checkpoint_every": 2, "device": "cuda",
        ]
        try JSONSerialization.data(withJSONObject: recipe).write(to: URL(fileURLWithPath: data.dir + "/r.json"))
        // A plan for cuda says so too (it planned the run as if it could happen); one for the cpu is made.
        let plain = try Recipe(contentsOf: data.dir + "/r.json")
        let wide = try LlamaConfig(contentsOf: data.dir + "/wide.json")
        XCTAssertThrowsError(try MemoryPlanner.plan(plain, config: wide, device: .cuda)) {
            XCTAssertTrue("\($0)".contains("head_dim 256") && "\($0)".contains("--device cpu"), "\($0)")
        }
        XCTAssertNoThrow(try MemoryPlanner.plan(plain, config: wide, device: .cpu))
        let r = try runReloraProcess(["train", data.dir + "/r.json"], environment: ["RELORA_CUDA_LIB": KernelEmulationTests.emulatedLibrary])
        XCTAssertEqual(r.reason, .exit, "ended by a signal (a trap): \(r.stderr.prefix(600))")
        XCTAssertEqual(r.status, 2, r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("head_dim 256") && r.stderr.contains("--device cpu"), r.stderr)
        XCTAssertFalse(r.stdout.contains("step 1/2"), r.stdout)

        let backend = try CUDABackendTests.emulatedBackend()
        let model = LlamaModel(config: try LlamaConfig(contentsOf: data.dir + "/wide.json"), backend: backend)
        XCTAssertThrowsError(try model.logits(inputs: [1, 2, 3], batch: 1, seqLen: 3)) {
            XCTAssertTrue("\($0)".contains("head_dim 256"), "\($0)")
        }
    }
}
