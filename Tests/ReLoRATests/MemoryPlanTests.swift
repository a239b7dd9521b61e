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

/// The planning backend against real runs: what `relora memory` says is what the CPU allocates.
final class MemoryPlanTests: XCTestCase {
    func recipe(_ d: TrainerTests.ByteData, _ mode: TrainingMode, _ checkpointing: GradientCheckpointing, dropout: Double = 0,
                quant: FrozenStorage = .none, policy: MergePolicyKind? = nil) -> Recipe {
        TrainerTests.recipe(d, run: "plan-\(mode.rawValue)-\(checkpointing.rawValue)-\(dropout)-\(quant.rawValue)-\(policy?.rawValue ?? "default")") {
            $0.quant = quant
            $0.mergePolicy = policy
            $0.valData = nil  // evaluation would add its own workspace shape; the plan covers training
            $0.mode = mode
            $0.checkpointing = checkpointing
            $0.steps = 2; $0.warmupSteps = 0; $0.checkpointEvery = 100
            if mode != .full { $0.loraRank = 4; $0.loraAlpha = 8; $0.loraDropout = dropout }
            if mode == .relora { $0.reloraEvery = 1; $0.restartWarmup = 0 }
        }
    }

    /// The CPU plan of a finished run's recipe against its ledger: every tag's peak, the device total and the
    /// host total equal, to the byte. Returns both for further checks.
    @discardableResult
    static func assertPlanEqualsMeasured(_ trainer: Trainer, config: LlamaConfig, _ label: String) throws -> (plan: MemoryPlan, measured: MemoryReport) {
        let measured = trainer.model.backend.ledger.report()
        let plan = try MemoryPlanner.plan(trainer.recipe, config: config, device: .cpu)
        for tag in MemoryTag.allCases { XCTAssertEqual(plan.report.peak(tag), measured.peak(tag), "\(label): \(tag.rawValue)") }
        XCTAssertEqual(plan.report.peakTotal, measured.peakTotal, label)
        XCTAssertEqual(plan.report.hostPeakTotal, measured.hostPeakTotal, label)
        return (plan, measured)
    }

    /// For full, lora and relora under both checkpointing settings: the planned peak of every tag equals
    /// the peak the CPU ledger measured over a real run (two steps, and for relora a restart after the
    /// second, under each merge policy: its workspace, e.g. compensate's sketch, and master copies
    /// included), to the byte, and so does the total (device tags) and the host total (master copies).
    func testPlanEqualsMeasuredPerTag() throws {
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 2)
        let config = try LlamaConfig(contentsOf: d.model)
        for mode in TrainingMode.allCases {
            for checkpointing in GradientCheckpointing.allCases {
                var cases: [(Double, FrozenStorage, MergePolicyKind?)] = [(0.0, .none, nil)]
                if mode != .full { cases += [(0.1, .none, nil), (0.0, .q4_0, nil), (0.1, .nf4, nil)] }
                if mode == .relora { cases += [(0.0, .q8_0, .compensate), (0.1, .q4_0, .master), (0.0, .nf4, .stochastic)] }
                for (dropout, quant, policy) in cases {
                    let r = recipe(d, mode, checkpointing, dropout: dropout, quant: quant, policy: policy)
                    var lines: [String] = []
                    let trainer = try Trainer(recipe: r, resume: false, log: { lines.append($0) })
                    _ = try trainer.run()
                    if mode == .relora { XCTAssertTrue(lines.contains { $0.hasPrefix("restart 1") }, "the run must include a restart") }
                    let label = "\(mode) \(checkpointing) dropout \(dropout) quant \(quant) policy \(r.effectiveMergePolicy)"
                    let (plan, measured) = try Self.assertPlanEqualsMeasured(trainer, config: config, label)
                    // Master copies: f32 of every frozen linear, in host memory, outside the device total.
                    let linears = LinearKind.allCases.reduce(0) { $0 + $1.shape(config).out * $1.shape(config).in } * config.numHiddenLayers
                    XCTAssertEqual(plan.report.peak(.hostMaster), policy == .master ? 4 * linears : 0, label)
                    XCTAssertEqual(plan.report.hostPeakTotal, plan.report.peak(.hostMaster), label)
                    if policy == .master {
                        XCTAssertTrue(plan.formatted(title: "plan").contains("host_master"), label)
                        XCTAssertTrue(measured.formatted().contains("in host memory, not in the total"), label)
                    }
                    XCTAssertGreaterThan(plan.report.peak(.activations), 0, label)
                }
            }
        }
    }

    /// Each rank of a sharded run (2 in-process ranks, relora with a restart and a checkpoint, f32 and 8-bit
    /// moments) measures what its plan says, per tag, to the byte: rank 0, which writes the checkpoint
    /// while rank 1 sends it its moments, needs no device memory for them. A rank's optimizer peak is its
    /// share: smaller than the unsharded one, and the shares add up to it. On cuda the master copies shrink
    /// the same way.
    func testPlanEqualsMeasuredOnEachRankOfAShardedRun() throws {
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 2)
        let config = try LlamaConfig(contentsOf: d.model)
        for states in OptimizerStates.allCases {
            var r = recipe(d, .relora, .block)
            r.runDir += "-sharded-\(states)"
            r.shardOptimizer = true
            r.optimizerStates = states
            let measured = try InProcessGroup.run(ranks: 2) { c -> MemoryReport in
                let trainer = try Trainer(recipe: r, resume: false, backend: CPUBackend(), communicator: c, log: { _ in })
                _ = try trainer.run()
                XCTAssertNotNil(trainer.optimizer.shards)
                return trainer.model.backend.ledger.report()
            }
            XCTAssertNotNil(try TrainingCheckpoint.latest(runDir: r.runDir))
            let all = try MemoryPlanner.plan(r, config: config, device: .cpu, worldSize: 2)
            XCTAssertEqual(all.ranks.count, 2)
            let unsharded = try MemoryPlanner.plan(r, config: config, device: .cpu)
            for rank in 0..<2 {
                let label = "\(states) rank \(rank)"
                let plan = try MemoryPlanner.plan(r, config: config, device: .cpu, worldSize: 2, rank: rank)
                for tag in MemoryTag.allCases {
                    XCTAssertEqual(plan.report.peak(tag), measured[rank].peak(tag), "\(label): \(tag.rawValue)")
                    XCTAssertEqual(all.ranks[rank].report.peak(tag), measured[rank].peak(tag), "\(label): \(tag.rawValue)")
                }
                XCTAssertEqual(plan.report.peakTotal, measured[rank].peakTotal, label)
                XCTAssertLessThan(plan.report.peak(.optimizer), unsharded.report.peak(.optimizer), label)
            }
            XCTAssertEqual(all.ranks.map { $0.report.peak(.optimizer) }.reduce(0, +), unsharded.report.peak(.optimizer), "\(states)")
            XCTAssertEqual(all.report.peakTotal, all.ranks.map(\.report.peakTotal).max(), "the plan of the largest rank")
            // The per-rank table and the JSON name every rank.
            let text = all.formatted(title: "plan")
            XCTAssertTrue(text.contains("per rank") && text.contains("    1     "), text)
            XCTAssertEqual((all.jsonObject()["ranks"] as? [[String: Any]])?.count, 2)

            let cuda = try MemoryPlanner.plan(r, config: config, device: .cuda, worldSize: 2)
            let cudaWhole = try MemoryPlanner.plan(r, config: config, device: .cuda)
            XCTAssertGreaterThan(cudaWhole.report.peak(.masterWeights), 0)
            XCTAssertEqual(cuda.ranks.map { $0.report.peak(.masterWeights) }.reduce(0, +), cudaWhole.report.peak(.masterWeights))
            XCTAssertTrue(cuda.ranks.allSatisfy { $0.report.peak(.masterWeights) < cudaWhole.report.peak(.masterWeights) })
        }
        // Without the option every rank plans the whole optimizer.
        let plain = try MemoryPlanner.plan(recipe(d, .relora, .block), config: config, device: .cpu, worldSize: 4)
        XCTAssertTrue(plain.ranks.isEmpty)
        XCTAssertEqual(plain.report.peakTotal, try MemoryPlanner.plan(recipe(d, .relora, .block), config: config, device: .cpu).report.peakTotal)
    }

    /// The plan is real information: checkpointing shrinks activations, LoRA removes the linears'
    /// gradients and optimizer states, and CUDA's bf16 plan halves the activations of the f32 one.
    func testPlansRespondToTheRecipe() throws {
        let d = try TrainerTests.makeByteData(hidden: 64, layers: 4)
        let config = try LlamaConfig(contentsOf: d.model)
        func plan(_ mode: TrainingMode, _ c: GradientCheckpointing, _ device: Device = .cpu) throws -> MemoryReport {
            try MemoryPlanner.plan(recipe(d, mode, c), config: config, device: device).report
        }
        XCTAssertLessThan(try plan(.full, .block).peak(.activations), try plan(.full, .none).peak(.activations))
        XCTAssertLessThan(try plan(.lora, .none).peak(.optimizer), try plan(.full, .none).peak(.optimizer))
        XCTAssertEqual(try plan(.full, .none).peak(.frozenWeights), 0)
        let linears = LinearKind.allCases.reduce(0) { acc, k in acc + k.shape(config).out * k.shape(config).in } * config.numHiddenLayers
        XCTAssertEqual(try plan(.lora, .none).peak(.frozenWeights), linears * 4)
        XCTAssertEqual(try plan(.lora, .none, .cuda).peak(.frozenWeights), linears * 2, "bf16 frozen weights on CUDA")
        // Activations halve except what stays 32-bit: the i32 ids and targets (2 x N x 4 bytes) and the f32
        // per-row statistics (each block's two rstd [N] and lse [N x heads]; the final rstd and the losses [N]),
        // and CUDA's row padding (`RowPadding`: each block's gate, up and h [N, F], and the logits [N, V]).
        let n = 4 * 32
        let idsBytes = 2 * n * 4
        let statsBytes = (config.numHiddenLayers * (2 + config.numAttentionHeads) + 2) * n * 4
        let f = config.intermediateSize, v = config.vocabSize, pad = RowPadding.cuda
        let paddingBytes = (3 * config.numHiddenLayers * (pad.stride(f) - f) + (pad.stride(v) - v)) * n * 2
        XCTAssertGreaterThan(paddingBytes, 0, "the test config's F or V is padded")
        XCTAssertEqual(try plan(.full, .none, .cuda).peak(.activations) * 2 - idsBytes - statsBytes - 2 * paddingBytes,
                       try plan(.full, .none).peak(.activations))
        XCTAssertGreaterThan(try plan(.full, .none, .cuda).peak(.masterWeights), 0)
        XCTAssertEqual(try plan(.full, .none).peak(.masterWeights), 0)
    }

    /// A budget that the recipe misses but a standard change meets gets that change named.
    func testSuggestionFitsTheBudget() throws {
        let d = try TrainerTests.makeByteData(hidden: 64, layers: 4)
        let config = try LlamaConfig(contentsOf: d.model)
        let r = recipe(d, .full, .none)
        let full = try MemoryPlanner.plan(r, config: config, device: .cpu).report.peakTotal
        var blockRecipe = r
        blockRecipe.checkpointing = .block
        let block = try MemoryPlanner.plan(blockRecipe, config: config, device: .cpu).report.peakTotal
        XCTAssertLessThan(block, full)
        let budget = (block + full) / 2
        XCTAssertFalse(try MemoryPlanner.plan(r, config: config, device: .cpu, budget: budget).fits)
        let s = try XCTUnwrap(MemoryPlanner.suggestion(for: r, config: config, device: .cpu, budget: budget))
        XCTAssertTrue(s.hasPrefix("--set checkpointing=block"), s)
        XCTAssertNil(MemoryPlanner.suggestion(for: r, config: config, device: .cpu, budget: 1000))

        // Already lean (block checkpointing, one sequence per micro-batch): the next lever is 8-bit Adam.
        var lean = r
        lean.checkpointing = .block; lean.microBatch = 1; lean.gradAccum = r.microBatch * r.gradAccum
        var lean8 = lean
        lean8.optimizerStates = .int8
        let leanPeak = try MemoryPlanner.plan(lean, config: config, device: .cpu).report.peakTotal
        let lean8Peak = try MemoryPlanner.plan(lean8, config: config, device: .cpu).report.peakTotal
        XCTAssertLessThan(lean8Peak, leanPeak)
        let s8 = try XCTUnwrap(MemoryPlanner.suggestion(for: lean, config: config, device: .cpu, budget: (lean8Peak + leanPeak) / 2))
        XCTAssertTrue(s8.hasPrefix("--set optimizer_states=int8 (planned peak"), s8)

        // Block checkpointing already set: the suggestion names only what it changes (it repeated
        // --set checkpointing=block before).
        XCTAssertGreaterThan(r.microBatch, 1)
        var halfBatch = blockRecipe
        halfBatch.microBatch = r.microBatch / 2; halfBatch.gradAccum = r.gradAccum * 2
        let halfPeak = try MemoryPlanner.plan(halfBatch, config: config, device: .cpu).report.peakTotal
        XCTAssertLessThan(halfPeak, block)
        let sb = try XCTUnwrap(MemoryPlanner.suggestion(for: blockRecipe, config: config, device: .cpu, budget: (halfPeak + block) / 2))
        XCTAssertTrue(sb.hasPrefix("--set micro_batch=\(halfBatch.microBatch) --set grad_accum=\(halfBatch.gradAccum) (planned peak"), sb)
    }

    func testParseBytes() throws {
        XCTAssertEqual(try parseBytes("24GiB"), 24 << 30)
        XCTAssertEqual(try parseBytes("24 GB"), 24_000_000_000)
        XCTAssertEqual(try parseBytes("1.5gib"), 3 << 29)
        XCTAssertEqual(try parseBytes("4096"), 4096)
        for bad in ["", "GB", "-1GB", "lots", "1e400GB"] {
            XCTAssertThrowsError(try parseBytes(bad), bad)
        }
    }

    /// Host<->device traffic of a training step does not grow with depth: per micro-batch the ids and
    /// targets go up and the loss sum comes down; the gradient norm comes down once.
    func testTransfersPerStepAreIndependentOfDepth() throws {
        var counts: [TransferCount] = []
        for layers in [1, 4] {
            let d = try TrainerTests.makeByteData(hidden: 32, layers: layers)
            let r = recipe(d, .lora, .block)
            let trainer = try Trainer(recipe: r, resume: false, log: { _ in })
            _ = try trainer.trainStep()
            counts.append(trainer.lastStepTransfers)
        }
        XCTAssertEqual(counts[0].uploads, counts[1].uploads)
        XCTAssertEqual(counts[0].downloads, counts[1].downloads)  // (bytes grow: one norm per tensor)
        XCTAssertEqual(counts[0].uploads, 2 * 2, "ids and targets for each of grad_accum = 2 micro-batches")
        XCTAssertEqual(counts[0].downloads, 2 + 1, "a loss sum per micro-batch and one gradient-norm vector")
    }

    /// A cuda plan's device total is the allocator's reservation plus the GPU's estimates, each by its formula:
    /// the context's thread stacks (1 KiB x SMs x resident threads per SM) + 192 MiB, cuBLAS' workspace of the default stream
    /// (32 MiB from sm_90 on), NCCL's buffers with more than one rank; a budget measured after the start
    /// leaves out the context and the backend's scratch; the emulation estimates nothing; cpu plans have none.
    func testCUDAPlansAddTheAllocatorAndTheEstimates() throws {
        let h100 = try GPUProfile(key: "h100"), rtx4090 = try GPUProfile(key: "RTX4090")
        XCTAssertEqual(h100.localMemoryBytes, 264 << 20)
        XCTAssertEqual(h100.contextBytes, 456 << 20)
        XCTAssertEqual(rtx4090.contextBytes, 384 << 20)
        XCTAssertEqual(try GPUProfile(key: "a100").localMemoryBytes, 216 << 20)
        XCTAssertEqual(h100.cublasWorkspaceBytes, 32 << 20)
        XCTAssertEqual(rtx4090.cublasWorkspaceBytes, 8 << 20 | 128 << 10)
        XCTAssertEqual(h100.ncclBytes(worldSize: 1), 0)
        XCTAssertEqual(h100.ncclBytes(worldSize: 4), (512 + 3 * 448) << 20)
        XCTAssertThrowsError(try GPUProfile(key: "v100")) { XCTAssertTrue("\($0)".contains("one of: h200, h100"), "\($0)") }
        var emulated = h100
        emulated.emulated = true
        XCTAssertEqual(emulated.contextBytes + emulated.cublasWorkspaceBytes + emulated.ncclBytes(worldSize: 4), 0)

        let d = try TrainerTests.makeByteData(hidden: 32, layers: 2)
        let config = try LlamaConfig(contentsOf: d.model)
        let r = recipe(d, .relora, .block)
        XCTAssertNil(try MemoryPlanner.plan(r, config: config, device: .cpu).cuda)
        for (gpu, world) in [(h100, 1), (rtx4090, 2)] {
            let plan = try MemoryPlanner.plan(r, config: config, device: .cuda, budget: 1 << 40, worldSize: world, gpu: gpu)
            let cuda = try XCTUnwrap(plan.cuda)
            XCTAssertEqual(cuda.total, cuda.allocator.peakReserved + gpu.contextBytes + gpu.cublasWorkspaceBytes + gpu.ncclBytes(worldSize: world))
            XCTAssertEqual(plan.need, cuda.total)
            XCTAssertGreaterThanOrEqual(cuda.allocator.peakReserved, cuda.allocator.peakInUse)
            XCTAssertGreaterThan(cuda.allocator.peakInUse, plan.report.peakTotal)
            XCTAssertEqual(plan.jsonObject()["device_total_bytes"] as? Int, cuda.total)
            let started = try MemoryPlanner.plan(r, config: config, device: .cuda, budget: 1 << 40, worldSize: world, gpu: gpu, budgetAfterStart: true)
            XCTAssertEqual(started.need, cuda.total - gpu.contextBytes - CachingAllocatorModel.persistentScratchBytes)
            // A budget between the two: fits once started, not on a fresh card.
            let between = cuda.total - gpu.contextBytes / 2
            XCTAssertFalse(try MemoryPlanner.plan(r, config: config, device: .cuda, budget: between, worldSize: world, gpu: gpu).fits)
            XCTAssertTrue(try MemoryPlanner.plan(r, config: config, device: .cuda, budget: between, worldSize: world, gpu: gpu,
                                                 budgetAfterStart: true).fits)
        }
        // Two ranks on cuda sum their gradients through two device buffers: more workspace than one process.
        let one = try MemoryPlanner.plan(r, config: config, device: .cuda), two = try MemoryPlanner.plan(r, config: config, device: .cuda, worldSize: 2)
        XCTAssertGreaterThan(two.report.peak(.workspace), one.report.peak(.workspace))
    }

    /// The dequantized-block cache in a cuda plan (`reuse_dequantized`): one block's seven weights in bf16 (in
    /// the device's padded rows, `RowPadding`), in
    /// `workspace` in place of the shared scratch of the largest linear; none on cpu (whose scratch is a tile), nor
    /// without quantized weights or block checkpointing. `auto` keeps it unless only the plan without it fits the
    /// budget, and then plans without (and says so); `true` keeps it and the suggestion names `false`.
    func testCUDAPlansCountTheDequantizedBlockCache() throws {
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 2)
        let config = try LlamaConfig(contentsOf: d.model)
        let weights = LinearKind.allCases.map { $0.shape(config).out * RowPadding.cuda.stride($0.shape(config).in) }
        let q = recipe(d, .relora, .block, quant: .q4_0)
        XCTAssertNil(q.reuseDequantized, "auto is the default")
        let kept = try MemoryPlanner.plan(q, config: config, device: .cuda)
        XCTAssertEqual(kept.dequantizedCache, 2 * weights.reduce(0, +))
        XCTAssertTrue(kept.formatted(title: "plan").contains("of which"), kept.formatted(title: "plan"))
        XCTAssertEqual(kept.jsonObject()["dequantized_cache_bytes"] as? Int, kept.dequantizedCache)
        var off = q
        off.reuseDequantized = false
        let plain = try MemoryPlanner.plan(off, config: config, device: .cuda)
        XCTAssertEqual(plain.dequantizedCache, 0)
        // The tensors: the cache in place of the scratch of the largest linear, all through the run.
        XCTAssertEqual(kept.report.peakTotal - plain.report.peakTotal, kept.dequantizedCache - 2 * weights.max()!)
        XCTAssertGreaterThan(kept.need, plain.need)
        for r in [q, recipe(d, .relora, .none, quant: .q4_0), recipe(d, .relora, .block)] where r != q {
            XCTAssertEqual(try MemoryPlanner.plan(r, config: config, device: .cuda).dequantizedCache, 0, "\(r.quant) \(r.checkpointing)")
        }
        XCTAssertEqual(try MemoryPlanner.plan(q, config: config, device: .cpu).dequantizedCache, 0, "the CPU dequantizes tiles")

        // A budget only the plan without the cache fits: auto goes without, true does not fit and names false.
        let between = plain.need + (kept.need - plain.need) / 2
        let auto = try MemoryPlanner.plan(q, config: config, device: .cuda, budget: between)
        XCTAssertTrue(auto.fits)
        XCTAssertFalse(auto.reusesDequantizedWeights)
        XCTAssertEqual(auto.dequantizedCacheLeftOut, kept.dequantizedCache)
        XCTAssertEqual(auto.need, plain.need)
        XCTAssertTrue(auto.formatted(title: "plan").contains("reuse_dequantized auto: off"), auto.formatted(title: "plan"))
        var on = q
        on.reuseDequantized = true
        XCTAssertFalse(try MemoryPlanner.plan(on, config: config, device: .cuda, budget: between).fits)
        let fix = MemoryPlanner.suggestion(for: on, config: config, device: .cuda, budget: between)
        XCTAssertEqual(fix, "--set reuse_dequantized=false (planned peak \(formatBytes(plain.need)))")
        // A budget neither fits: auto keeps the cache in the plan it refuses.
        let tight = try MemoryPlanner.plan(q, config: config, device: .cuda, budget: plain.need - 1)
        XCTAssertFalse(tight.fits)
        XCTAssertEqual(tight.dequantizedCache, kept.dequantizedCache)

        // On the CPU a forced true changes nothing, and the log says so.
        var lines: [String] = []
        let trainer = try Trainer(recipe: on, resume: false, log: { lines.append($0) })
        XCTAssertEqual(trainer.model.dequantizedCacheBytes, 0)
        XCTAssertTrue(lines.contains { $0.hasPrefix("note: reuse_dequantized has no effect") }, "\(lines)")
    }

    func testCUDAIsRefusedWithOneSentence() throws {
        let d = try TrainerTests.makeByteData()
        var r = recipe(d, .full, .none)
        r.device = "cuda"
        XCTAssertThrowsError(try Trainer(recipe: r, resume: false, log: { _ in })) { error in
            XCTAssertTrue("\(error)".contains("device 'cuda' is not available"), "\(error)")
        }
        XCTAssertThrowsError(try BackendFactory.make(.cuda))
        XCTAssertThrowsError(try Device(parsing: "gpu"))
    }
}
