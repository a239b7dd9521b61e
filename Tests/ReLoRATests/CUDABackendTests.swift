import CReLoRA
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

/// The Swift CUDA backend without a GPU: `CUDABackend` over the CPU emulation of the kernels
/// (`Kernels/build/libreloracuda-emu.so`, built by `make -C Kernels emu`; `KernelEmulationTests` covers the
/// library itself). What `relora selftest --device cuda` runs, as tests:
/// - the conformance suite, unchanged, in f32 and bf16: every op against naive Double references;
/// - training steps of a tiny model (full-rank, ReLoRA over q4_0 and nf4 with a restart) against the CPU;
/// - the paths without a library or without a device, and the run refused before allocating when its plan
///   exceeds the device's memory.
final class CUDABackendTests: XCTestCase {
    static func emulatedBackend(precision: Precision = .cudaMixed) throws -> CUDABackend {
        try KernelEmulationTests.buildEmulation()
        return CUDABackend(library: try CUDALibrary.load(path: KernelEmulationTests.emulatedLibrary), precision: precision)
    }

    func testConformanceSuitePassesOnTheEmulatedDevice() throws {
        let backend = try Self.emulatedBackend()
        XCTAssertTrue(backend.library.emulated)
        let checks = Conformance.run(on: backend, computeDTypes: [.f32, .bf16])
        let failed = checks.filter { !$0.passed }
        XCTAssertGreaterThan(checks.count, 250)
        XCTAssertTrue(failed.isEmpty, Conformance.table(failed))
        XCTAssertTrue(checks.contains { $0.dtype == "bf16" && $0.op.hasPrefix("attentionForward") })
    }

    func testTrainingStepsMatchTheCPU() throws {
        let library = try Self.emulatedBackend().library
        let checks = try TrainingConformance.run(makeDevice: { CUDABackend(library: library, precision: $0) })
        XCTAssertEqual(checks.count, 2 * TrainingConformance.cases.count)
        for c in checks { XCTAssertTrue(c.passed, "\(c.op) \(c.dtype): max relative error \(c.maxError) > \(c.bound); \(c.note)") }
    }

    /// On the device trained tensors have bf16 working copies and f32 master copies, which the update runs
    /// on. A restart re-initialises A and B: their master copies must follow, or the next update would run
    /// on the old factors and write them back over the new ones. A sharded optimizer keeps the master
    /// copies of its own tensors only, and trains the same bits as an unsharded one (2 ranks, each its own
    /// emulated device; the checkpoints' bytes too).
    func testMasterCopiesFollowRestartsAndShardLikeTheMoments() throws {
        let library = try Self.emulatedBackend().library
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let single = try Trainer(recipe: ShardedOptimizerTests.recipe(d, run: "emu-restart", sharded: false), resume: false,
                                 backend: CUDABackend(library: library), log: { _ in })
        for _ in 0..<3 { _ = try single.trainStep() }
        try single.restart()
        let b = single.model.backend
        let factors = single.optimizer.parameters.filter { $0.loraFactor == .a || $0.loraFactor == .b }
        XCTAssertFalse(factors.isEmpty)
        for p in factors {
            let master = try XCTUnwrap(p.master, "\(p.name): a bf16 factor has a master copy")
            XCTAssertEqual(b.download(master), b.download(p.value), "\(p.name): the master copy follows the restart")
        }

        var runs: [(losses: [Double], hashes: [UInt64], masters: [Int])] = []
        for sharded in [false, true] {
            let recipe = ShardedOptimizerTests.recipe(d, run: "emu-\(sharded)", sharded: sharded)
            let out = try InProcessGroup.run(ranks: 2) { c -> ([Double], UInt64, Int) in
                let t = try Trainer(recipe: recipe, resume: false, backend: CUDABackend(library: library), communicator: c, log: { _ in })
                _ = try t.run()
                return (t.history.map(\.loss), t.weightsHash(), t.optimizer.parameters.filter { $0.master != nil }.count)
            }
            runs.append((out[0].0, out.map(\.1), out.map(\.2)))
        }
        let (plain, sharded) = (runs[0], runs[1])
        XCTAssertEqual(plain.masters[0], plain.masters[1])
        XCTAssertEqual(sharded.masters.reduce(0, +), plain.masters[0], "each master copy on one rank")
        XCTAssertTrue(sharded.masters.allSatisfy { $0 > 0 }, "\(sharded.masters)")
        XCTAssertEqual(sharded.losses.map(\.bitPattern), plain.losses.map(\.bitPattern))
        XCTAssertEqual(sharded.hashes, plain.hashes)
        XCTAssertEqual(Set(sharded.hashes).count, 1)
        for step in [2, 4, 6] {
            XCTAssertEqual(ShardedOptimizerTests.checkpointTensors(d.dir + "/emu-true", step: step),
                           ShardedOptimizerTests.checkpointTensors(d.dir + "/emu-false", step: step), "step \(step)")
        }
    }

    func testNoLibraryIsOneSentence() {
        XCTAssertThrowsError(try CUDALibrary.load(path: "/nonexistent/libreloracuda.so")) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("no CUDA kernel library found"), text)
            XCTAssertTrue(text.contains("--device cpu"), text)
        }
        XCTAssertEqual(CUDALibrary.candidatePaths(environment: ["RELORA_CUDA_LIB": "/x/lib.so"]), ["/x/lib.so"])
        XCTAssertTrue(CUDALibrary.candidatePaths(environment: [:]).allSatisfy { $0.hasSuffix("/libreloracuda.so") })
    }

    /// The real CUDA build on a machine without a GPU (CI builds it with the pinned wheels) loads and
    /// reports no device in one sentence.
    func testNoDeviceIsOneSentence() throws {
        let real = KernelEmulationTests.kernelsDirectory + "/build/libreloracuda.so"
        guard FileManager.default.fileExists(atPath: real) else { throw XCTSkip("no CUDA build (Kernels/ci.sh makes one)") }
        do {
            let library = try CUDALibrary.load(path: real)
            throw XCTSkip("this machine has a CUDA device: \(library.deviceName)")
        } catch let error as ReLoRAError {
            if "\(error)".contains("was built for kernel ABI version") { throw XCTSkip("a stale CUDA build: \(error)") }
            XCTAssertTrue("\(error)".contains("sees no CUDA device"), "\(error)")
        }
    }

    /// A run whose plan exceeds the device (here capped at 8 MiB with RELORA_DEVICE_MEMORY_LIMIT) is refused
    /// before the model is allocated, with the first standard change that fits.
    func testRunIsRefusedWhenThePlanExceedsTheDevice() throws {
        try KernelEmulationTests.buildEmulation()
        let library = try CUDALibrary.load(path: KernelEmulationTests.emulatedLibrary)
        setenv("RELORA_DEVICE_MEMORY_LIMIT", "8MiB", 1)
        defer { unsetenv("RELORA_DEVICE_MEMORY_LIMIT") }
        let backend = CUDABackend(library: library)
        XCTAssertEqual(backend.deviceMemory().total, 8 << 20)
        let d = try TrainerTests.makeByteData(hidden: 64, layers: 2)
        let r = TrainerTests.recipe(d, run: "cap") { $0.microBatch = 16; $0.seqLen = 128 }
        XCTAssertThrowsError(try Trainer(recipe: r, resume: false, backend: backend, log: { _ in })) { error in
            XCTAssertTrue("\(error)".contains("more than the free memory of relora CPU emulation"), "\(error)")
        }
        XCTAssertEqual(backend.ledger.report().liveTotal, 0, "nothing was allocated")
    }
}
