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
        // The sharded run resumed from step 4 (each rank restores its own tensors' moments and master copies
        // from the checkpoint that rank 0 wrote) trains steps 5 and 6 with the uninterrupted run's bits.
        let checkpoints = d.dir + "/emu-true/checkpoints"
        try FileManager.default.removeItem(atPath: checkpoints + "/" + TrainingCheckpoint.name(step: 6))
        try Data((TrainingCheckpoint.name(step: 4) + "\n").utf8).write(to: URL(fileURLWithPath: checkpoints + "/latest"))
        let resumed = try InProcessGroup.run(ranks: 2) { c -> ([Double], UInt64) in
            let t = try Trainer(recipe: ShardedOptimizerTests.recipe(d, run: "emu-true", sharded: true), resume: true,
                                backend: CUDABackend(library: library), communicator: c, log: { _ in })
            _ = try t.run()
            return (t.history.map(\.loss), t.weightsHash())
        }
        XCTAssertEqual(resumed[0].0.map(\.bitPattern), sharded.losses.suffix(2).map(\.bitPattern), "sharded bf16 resume")
        XCTAssertEqual(resumed.map(\.1), sharded.hashes, "sharded bf16 resume")
        XCTAssertEqual(ShardedOptimizerTests.checkpointTensors(d.dir + "/emu-true", step: 6),
                       ShardedOptimizerTests.checkpointTensors(d.dir + "/emu-false", step: 6), "step 6 after the resume")
    }

    /// The allocator's stream events (`recordStream`, what the data-parallel sums declare for the gradients): a
    /// block that another stream still reads when its tensor is released is handed out again at once, and its
    /// next owner's work on the default stream waits for that read. On the emulation's deferred stream order
    /// the side stream's copy runs only when that stream is synchronized, after the default stream has run the
    /// new owner's upload: without the declared use the copy reads the new owner's values (the hazard is real
    /// in the emulation, so the first check can fail).
    func testAReleasedBlockWaitsForAnotherStreamsUse() throws {
        let library = try Self.emulatedBackend().library
        let api = library.api
        var side: UnsafeMutableRawPointer?
        library.check(api.stream_create!(&side), "stream_create")
        defer { library.check(api.stream_destroy!(side), "stream_destroy") }
        let n = 1000
        func copied(declared: Bool) -> Set<Float> {
            let backend = CUDABackend(library: library)
            let out = backend.makeTensor([n], dtype: .f32, tag: .workspace, zeroed: true)
            var gradient: Tensor? = backend.makeTensor([n], dtype: .f32, tag: .gradients, zeroed: false)
            backend.upload([Float](repeating: 1, count: n), to: gradient!)
            backend.synchronize()
            let block = gradient!.storage
            library.check(api.memcpy!(out.storage, block, Int64(n * 4), RELORA_MEMCPY_DEVICE_TO_DEVICE, side), "memcpy")
            if declared { backend.recordStream(gradient!, stream: side!) }
            gradient = nil
            let next = backend.makeTensor([n], dtype: .f32, tag: .gradients, zeroed: false)
            XCTAssertEqual(next.storage, block, "the released block is reused at once")
            backend.upload([Float](repeating: 2, count: n), to: next)
            _ = backend.download(next)  // runs the default stream's queue
            library.check(api.stream_synchronize!(side), "stream_synchronize")
            return Set(backend.download(out))
        }
        XCTAssertEqual(copied(declared: true), [1])
        if ProcessInfo.processInfo.environment["RELORA_EMU_STREAM_ORDER"] != "eager" {
            XCTAssertEqual(copied(declared: false), [2], "the emulation's deferred order no longer exposes a missing stream event")
        }
    }

    /// A plan's model of the caching allocator is the allocator, to the byte: the planned code path (a new
    /// run's start, one optimizer step of two micro-batches, a restart for relora) on the emulated device
    /// measures the in-use and reserved peaks, cudaMalloc calls, cache hits and blocks per tag at the in-use
    /// peak that the plan for cuda predicts, for full-rank and ReLoRA runs, dense and q4_0 weights, either
    /// checkpointing setting, f32 and 8-bit moments, and with quantized weights under block checkpointing with
    /// the dequantized-block cache (`reuse_dequantized` auto, as the Trainer's run below) and without it (false).
    /// The rounding shows: the allocator holds more than the
    /// tensors' bytes. A Trainer measures after its first step what the plan says after the first step, and
    /// after its first restart the whole plan's peaks; its log prints both.
    func testPlannedAllocatorEqualsTheAllocator() throws {
        let library = try Self.emulatedBackend().library
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 2)
        let config = try LlamaConfig(contentsOf: d.model)
        func recipe(_ mode: TrainingMode, _ quant: FrozenStorage, _ checkpointing: GradientCheckpointing,
                    _ states: OptimizerStates, reuse: Bool? = nil) -> Recipe {
            TrainerTests.recipe(d, run: "alloc-\(mode)-\(quant)-\(checkpointing)-\(states)-\(reuse.map { "\($0)" } ?? "auto")") {
                $0.mode = mode; $0.quant = quant; $0.checkpointing = checkpointing; $0.optimizerStates = states
                $0.reuseDequantized = reuse
                $0.valData = nil; $0.device = "cuda"; $0.steps = 2; $0.warmupSteps = 0; $0.checkpointEvery = 100
                if mode != .full { $0.loraRank = 4; $0.loraAlpha = 8 }
                if mode == .relora { $0.reloraEvery = 1; $0.restartWarmup = 0 }
            }
        }
        let cases: [(TrainingMode, FrozenStorage, GradientCheckpointing, OptimizerStates, Bool?)] = [
            (.full, .none, .none, .f32, nil), (.full, .none, .block, .int8, nil), (.relora, .none, .block, .f32, nil),
            (.relora, .q4_0, .none, .int8, nil), (.lora, .q8_0, .block, .int8, nil), (.lora, .q8_0, .block, .int8, false),
        ]
        for (mode, quant, checkpointing, states, reuse) in cases {
            let label = "\(mode) \(quant) \(checkpointing) \(states) reuse \(reuse.map { "\($0)" } ?? "auto")"
            let r = recipe(mode, quant, checkpointing, states, reuse: reuse)
            let backend = CUDABackend(library: library)
            try MemoryPlanner.run(r, config: config, on: backend)
            let plan = try MemoryPlanner.plan(r, config: config, device: .cuda, gpu: backend.gpu)
            let cuda = try XCTUnwrap(plan.cuda, label)
            // All but the bytes in use now, after the run (the plan reads them with the model alive).
            func ended(_ s: AllocatorStats) -> AllocatorStats { var s = s; s.inUse = 0; return s }
            XCTAssertEqual(ended(cuda.allocator), ended(backend.allocatorStats), label)
            XCTAssertGreaterThan(cuda.allocator.peakInUse, plan.report.peakTotal + CachingAllocatorModel.persistentScratchBytes, label)
            XCTAssertEqual(cuda.estimated, 0, "\(label): the emulation has no context, cuBLAS workspace or NCCL buffers")
            // The cache: one block's seven weights in bf16 (rows padded as the device's scratch), where the plan keeps it.
            let block = LinearKind.allCases.reduce(0) { $0 + $1.shape(config).out * RowPadding.cuda.stride($1.shape(config).in) } * 2
            XCTAssertEqual(plan.dequantizedCache, quant != .none && checkpointing == .block && reuse != false ? block : 0, label)
        }

        let r = recipe(.relora, .q4_0, .block, .f32)
        let backend = CUDABackend(library: library)
        var lines: [String] = []
        let trainer = try Trainer(recipe: r, resume: false, backend: backend, log: { lines.append($0) })
        let planned = try XCTUnwrap(trainer.memoryPlan?.cuda)
        XCTAssertGreaterThan(trainer.model.dequantizedCacheBytes, 0, "auto keeps the cache where it fits")
        _ = try trainer.trainStep()
        XCTAssertEqual(backend.allocatorStats, planned.afterFirstStep, "after the first step")
        _ = try trainer.trainStep()
        try trainer.restart()
        let measured = backend.allocatorStats
        XCTAssertEqual(measured.peakInUse, planned.allocator.peakInUse)
        XCTAssertEqual(measured.peakReserved, planned.allocator.peakReserved)
        XCTAssertEqual(measured.mallocCalls, planned.allocator.mallocCalls)
        XCTAssertEqual(measured.inUseAtPeakByTag, planned.allocator.inUseAtPeakByTag)
        XCTAssertTrue(lines.contains { $0.hasPrefix("memory plan: needs \(formatBytes(planned.neededAfterStart)) of ") }, "\(lines)")

        // The log after the first step: the measured allocator line, then the planned one with the same figures.
        var logged: [String] = []
        let runner = try Trainer(recipe: recipe(.full, .none, .block, .f32), resume: false, backend: CUDABackend(library: library),
                                 log: { logged.append($0) })
        _ = try runner.run()
        let text = try XCTUnwrap(logged.first { $0.hasPrefix("memory by tag after the first step") })
        let first = try XCTUnwrap(runner.memoryPlan?.cuda?.afterFirstStep)
        XCTAssertTrue(text.contains("allocator peak \(formatBytes(first.peakInUse)) in use"), text)
        XCTAssertTrue(text.contains("planned: allocator peak \(formatBytes(first.peakInUse)) in use, \(formatBytes(first.peakReserved)) reserved"), text)
    }

    /// A cudaMalloc the cap refuses returns the cache to the device and retries: the allocator's counters (its
    /// `CachingAllocatorModel`) drop the freed blocks from the reservation, and the model trimmed the same way
    /// gives the same counters.
    func testAnAllocationOverTheCapTrimsTheCacheAndCountsIt() throws {
        let library = try Self.emulatedBackend().library
        let mib = 1 << 20
        let allocator = DeviceAllocator(library: library, limit: 4 * mib)
        let model = CachingAllocatorModel()
        let small = allocator.allocate(2 * mib, tag: .activations); model.allocate(2 * mib, tag: .activations)
        allocator.release(small); model.release(2 * mib, tag: .activations)
        XCTAssertEqual(allocator.stats.reserved, 2 * mib, "the released block stays cached")
        // 3 MiB rounds to 4 MiB: 2 + 4 over the 4 MiB cap, so the cached 2 MiB go back first.
        let large = allocator.allocate(3 * mib, tag: .gradients)
        model.emptyCache(); model.allocate(3 * mib, tag: .gradients)
        XCTAssertEqual(allocator.stats.reserved, 4 * mib)
        XCTAssertEqual(allocator.stats.peakReserved, 4 * mib)
        XCTAssertEqual(allocator.stats.mallocCalls, 2)
        XCTAssertEqual(allocator.stats.cacheHits, 0)
        XCTAssertEqual(allocator.stats, model.stats)
        allocator.release(large)
        allocator.emptyCache()
        XCTAssertEqual(allocator.stats.reserved, 0)
    }

    /// `reuse_dequantized: auto` on a device whose free memory (capped with RELORA_DEVICE_MEMORY_LIMIT) fits the
    /// plan without the dequantized-block cache but not the plan with it: the run builds its model without the
    /// cache, says so, and trains within the cap (the allocator's reservation is the leaner plan's).
    func testAutoLeavesTheCacheOutWhenOnlyThatFitsTheDevice() throws {
        try KernelEmulationTests.buildEmulation()
        let library = try CUDALibrary.load(path: KernelEmulationTests.emulatedLibrary)
        let d = try TrainerTests.makeByteData(hidden: 64, layers: 2)
        let config = try LlamaConfig(contentsOf: d.model)
        let r = TrainerTests.recipe(d, run: "auto-cap") {
            $0.mode = .lora; $0.quant = .q4_0; $0.checkpointing = .block; $0.loraRank = 4; $0.loraAlpha = 8
            $0.device = "cuda"; $0.valData = nil; $0.steps = 2; $0.warmupSteps = 0; $0.checkpointEvery = 100
        }
        var off = r
        off.reuseDequantized = false
        let gpu = CUDABackend(library: library).gpu
        let kept = try XCTUnwrap(MemoryPlanner.plan(r, config: config, device: .cuda, gpu: gpu).cuda)
        let plain = try XCTUnwrap(MemoryPlanner.plan(off, config: config, device: .cuda, gpu: gpu).cuda)
        XCTAssertGreaterThan(kept.total, plain.total)
        setenv("RELORA_DEVICE_MEMORY_LIMIT", "\(plain.total + (kept.total - plain.total) / 2)", 1)
        defer { unsetenv("RELORA_DEVICE_MEMORY_LIMIT") }
        let backend = CUDABackend(library: library)
        var lines: [String] = []
        let trainer = try Trainer(recipe: r, resume: false, backend: backend, log: { lines.append($0) })
        // (A model with the cache would exceed the cap in its step, which ends the process: stop here instead.)
        guard trainer.model.dequantizedCacheBytes == 0 else { return XCTFail("the run kept the cache the device cannot hold") }
        XCTAssertEqual(trainer.memoryPlan?.dequantizedCacheLeftOut, DequantizedBlock.bytes(config, backend: backend))
        XCTAssertTrue(lines.contains { $0.hasPrefix("reuse_dequantized auto: off") }, "\(lines)")
        _ = try trainer.trainStep()
        _ = try trainer.trainStep()
        XCTAssertEqual(backend.allocatorStats.peakReserved, plain.allocator.peakReserved)
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
