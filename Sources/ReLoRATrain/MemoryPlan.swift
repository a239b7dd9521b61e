import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRACUDA

/// What a run would allocate on a device, by tag, from running the training code path on a
/// `PlanningBackend` (nothing is allocated or computed). In a data-parallel run the plan of one rank: the
/// ranks differ only when the optimizer is sharded (`shard_optimizer`); then `ranks` summarises each, and
/// `report` is the plan of `rank`.
///
/// `report` holds the tensors' bytes by tag (on cpu, what a run allocates). On cuda a process needs more:
/// `cuda` adds the caching allocator's rounding and cache (modelled exactly) and the estimated CUDA context,
/// cuBLAS workspace and NCCL buffers, and `need`, the figure a budget is checked against, includes them.
public struct MemoryPlan: Sendable {
    public var device: Device
    public var report: MemoryReport
    /// On cuda: the allocator's blocks and the estimates (nil on cpu).
    public var cuda: CUDAFootprint?
    /// Bytes the plan must fit in, if the user gave a budget.
    public var budget: Int?
    /// Whether `budget` is device memory measured free after the backend started (the context and the
    /// backend's scratch are then already taken, so `need` leaves them out).
    public var budgetAfterStart = false
    /// What the process needs on the device: on cuda the allocator's reservation plus the estimates (less
    /// what the start already took, when `budgetAfterStart`); on cpu the tensors' peak.
    public var need: Int { cuda.map { budgetAfterStart ? $0.neededAfterStart : $0.total } ?? report.peakTotal }
    public var fits: Bool { budget.map { need <= $0 } ?? true }
    /// The run's ranks, and the rank `report` plans (with every rank alike, 0).
    public var worldSize = 1
    public var rank = 0
    /// Whether the ranks shard the optimizer state (`shard_optimizer` with more than one rank).
    public var sharded = false
    /// Every rank's plan, in rank order, when the ranks differ (sharded); else empty.
    public var ranks: [RankPlan] = []
    /// The cache of one block's dequantized weights the planned run keeps from a block's recompute to its
    /// backward (`LlamaModel.dequantizedCacheBytes`, in `workspace`, in place of the shared dequantization
    /// scratch), 0 for none.
    public var dequantizedCache = 0
    /// When `reuse_dequantized: auto` left that cache out because the plan with it did not fit `budget` and the
    /// plan without does: the cache's bytes (the run then goes without it); else 0.
    public var dequantizedCacheLeftOut = 0
    /// Whether the planned run keeps the dequantized weights: what a run of this plan builds its model with.
    public var reusesDequantizedWeights: Bool { dequantizedCache > 0 }

    /// One rank's part in a sharded plan.
    public struct RankPlan: Sendable {
        public var rank: Int
        /// Trained tensors whose optimizer state the rank keeps.
        public var tensors: Int
        public var report: MemoryReport
        public var cuda: CUDAFootprint?
        /// The rank's device total (`MemoryPlan.need` without a budget).
        public var need: Int { cuda?.total ?? report.peakTotal }
    }
}

public enum MemoryPlanner {
    /// Plans `recipe` (model from `config`) on `device`: builds the model, gradients and optimizer as
    /// the trainer does, runs one optimizer step (all `grad_accum` micro-batches through the recipe's
    /// checkpointing) and, for `relora`, one restart (merge with the recipe's policy, whose workspace and
    /// master copies it counts, + optimizer reset).
    ///
    /// `reuse_dequantized: auto` (the default) is settled here: the plan keeps the dequantized-weight cache
    /// where it applies, unless a `budget` is given that the plan fits only without it, and then it is the
    /// plan without (`dequantizedCacheLeftOut` says so). A run builds its model as its plan says.
    ///
    /// For rank `rank` of `worldSize` data-parallel ranks (each holds the whole model; with `shard_optimizer`
    /// only its share of the optimizer state; on cuda with more than one rank, the gradient sums' buffers
    /// too); rank nil: every rank is planned and the plan is that of the rank with the largest need (the lowest
    /// such rank), with every rank's in `ranks`.
    ///
    /// On cuda `gpu` sizes the estimates of the context and cuBLAS' workspace (a run passes its device's);
    /// `budgetAfterStart` says `budget` was measured free after the backend started (see `MemoryPlan`).
    public static func plan(_ recipe: Recipe, config: LlamaConfig, device: Device, budget: Int? = nil,
                            worldSize: Int = 1, rank: Int? = nil, gpu: GPUProfile = .planningDefault,
                            budgetAfterStart: Bool = false) throws -> MemoryPlan {
        precondition(worldSize >= 1 && (rank.map { (0..<worldSize).contains($0) } ?? true), "rank \(rank ?? -1) of \(worldSize)")
        let planned = try planAsGiven(recipe, config: config, device: device, budget: budget, worldSize: worldSize, rank: rank,
                                      gpu: gpu, budgetAfterStart: budgetAfterStart)
        guard !planned.fits, recipe.reuseDequantized == nil, planned.dequantizedCache > 0 else { return planned }
        var without = recipe
        without.reuseDequantized = false
        var lean = try planAsGiven(without, config: config, device: device, budget: budget, worldSize: worldSize, rank: rank,
                                   gpu: gpu, budgetAfterStart: budgetAfterStart)
        guard lean.fits else { return planned }
        lean.dequantizedCacheLeftOut = planned.dequantizedCache
        return lean
    }

    /// `plan` with `reuse_dequantized: auto` taken as true.
    private static func planAsGiven(_ recipe: Recipe, config: LlamaConfig, device: Device, budget: Int?, worldSize: Int,
                                    rank: Int?, gpu: GPUProfile, budgetAfterStart: Bool) throws -> MemoryPlan {
        let sharded = recipe.shardOptimizer && worldSize > 1
        // The NCCL engine's device sums, with its chunk size (RELORA_COLLECTIVE_CHUNK_FLOATS, as a run reads it).
        let chunkFloats = try device == .cuda && worldSize > 1 ? NCCLCommunicator.chunkFloats(ProcessInfo.processInfo.environment) : 0
        var dequantizedCache = 0
        func planRank(_ r: Int) throws -> MemoryPlan.RankPlan {
            let backend = PlanningBackend(target: device)
            try LlamaModel.checkSupported(config, on: backend)  // a plan for a run the device cannot make is an error
            let collectives: Communicator = chunkFloats > 0 ? PlannedCollectives(worldSize: worldSize, chunkFloats: chunkFloats) : SingleProcess()
            var afterFirstStep: AllocatorStats?
            let (model, optimizer) = try run(recipe, config: config, on: backend, rank: r, worldSize: worldSize, communicator: collectives,
                                             afterFirstStep: { afterFirstStep = backend.allocator?.stats })
            dequantizedCache = model.dequantizedCacheBytes
            return MemoryPlan.RankPlan(rank: r, tensors: optimizer.parameters.indices.filter(optimizer.owns).count,
                                       report: backend.ledger.report(),
                                       cuda: backend.allocator.map {
                                           CUDAFootprint(allocator: $0.stats, afterFirstStep: afterFirstStep!, gpu: gpu, worldSize: worldSize)
                                       })
        }
        func made(_ one: MemoryPlan.RankPlan, ranks: [MemoryPlan.RankPlan] = []) -> MemoryPlan {
            var plan = MemoryPlan(device: device, report: one.report, cuda: one.cuda, budget: budget)
            plan.budgetAfterStart = budgetAfterStart
            plan.worldSize = worldSize
            plan.sharded = sharded
            plan.rank = one.rank
            plan.ranks = ranks
            plan.dequantizedCache = dequantizedCache
            return plan
        }
        guard sharded else { return made(try planRank(0)) }
        if let rank { return made(try planRank(rank)) }
        let ranks = try (0..<worldSize).map(planRank)
        let largest = ranks.max { a, b in a.need != b.need ? a.need < b.need : a.rank > b.rank }!
        return made(largest, ranks: ranks)
    }

    /// The plan for `recipe` on `device`, or one sentence with the first standard change that fits when its
    /// need exceeds `budget` (`what` names the budget: "the budget", "free device memory").
    /// `worldSize`, `rank`, `gpu` and `budgetAfterStart` as for `plan`.
    public static func requireFits(_ recipe: Recipe, config: LlamaConfig, device: Device, budget: Int,
                                   what: String = "the budget", worldSize: Int = 1, rank: Int? = nil,
                                   gpu: GPUProfile = .planningDefault, budgetAfterStart: Bool = false) throws -> MemoryPlan {
        let plan = try MemoryPlanner.plan(recipe, config: config, device: device, budget: budget, worldSize: worldSize, rank: rank,
                                          gpu: gpu, budgetAfterStart: budgetAfterStart)
        guard plan.fits else {
            let fix = suggestion(for: recipe, config: config, device: device, budget: budget, worldSize: worldSize, rank: rank,
                                 gpu: gpu, budgetAfterStart: budgetAfterStart)
                .map { "; this would fit: \($0)" } ?? "; no standard change (block checkpointing, micro-batch 1, smaller rank) fits it"
            let parts = plan.cuda == nil ? ""
                : ": \(formatBytes(plan.report.peakTotal)) of tensors, the rest the allocator's rounding and cache and the estimated CUDA overheads"
            throw ReLoRAError.invalidConfig(
                "the run needs \(formatBytes(plan.need)) on \(device.rawValue) (planned\(parts)), more than \(what) (\(formatBytes(budget)))\(fix)")
        }
        return plan
    }

    /// The planned code path on any backend (tests run it on the CPU and the emulated CUDA device to prove
    /// plan = measured), as rank `rank` of `worldSize` builds it (its share of a sharded optimizer's state):
    /// a new run's start (the model and optimizer built, the weights and LoRA factors initialised, whose
    /// quantized weights pass through f32 temporaries), one optimizer step, then `afterFirstStep`, then a
    /// restart for relora. Returns the model and the optimizer. The step's collectives go through `communicator`: on cuda
    /// `PlannedCollectives` (the NCCL engine's device buffers); host collectives allocate nothing on the device.
    @discardableResult
    static func run(_ recipe: Recipe, config: LlamaConfig, on backend: Backend, rank: Int = 0, worldSize: Int = 1,
                    communicator: Communicator = SingleProcess(), afterFirstStep: () -> Void = {}) throws -> (model: LlamaModel, optimizer: AdamW) {
        try recipe.loraConfig?.validate(for: config)
        let (model, optimizer) = TrainingModel.build(recipe, config: config, backend: backend, rank: rank, worldSize: worldSize)
        try model.weights.initializeRandom(seed: recipe.seed, std: Float(recipe.initStd), backend: backend)  // as Trainer.startingState
        model.initializeLoRA(seed: recipe.seed)
        optimizer.refreshMasterCopies()
        let n = recipe.microBatch * recipe.seqLen
        let ids = [Int32](repeating: 0, count: n)
        _ = try Trainer.optimizerStep(model: model, optimizer: optimizer, recipe: recipe, step: 0, lr: recipe.lr,
                                      communicator: communicator) { _ in (ids, ids) }
        afterFirstStep()
        if recipe.mode == .relora {
            try model.mergeAdapters(policy: recipe.effectiveMergePolicy.policy, seed: recipe.seed)
            _ = try Trainer.resetAfterMerge(optimizer, recipe: recipe, restart: 0)
        }
        return (model, optimizer)
    }

    /// The first of a few standard changes whose plan fits `budget`, as `--set` overrides with the planned
    /// need; nil if none does. In order: those that leave the arithmetic alone (`reuse_dequantized` false where
    /// the recipe asks for true, block checkpointing, smaller
    /// micro-batches at the same tokens per step), then those that store something in fewer bits (8-bit
    /// Adam moments; q8_0, then q4_0 frozen weights), then a smaller LoRA rank. `worldSize`, `rank`, `gpu`
    /// and `budgetAfterStart` as for `plan`.
    public static func suggestion(for recipe: Recipe, config: LlamaConfig, device: Device, budget: Int,
                                  worldSize: Int = 1, rank: Int? = nil, gpu: GPUProfile = .planningDefault,
                                  budgetAfterStart: Bool = false) -> String? {
        var candidates: [Recipe] = []
        func add(_ edit: (inout Recipe) -> Void) {
            var r = recipe
            edit(&r)
            candidates.append(r)
        }
        if recipe.reuseDequantized == true { add { $0.reuseDequantized = false } }  // (auto drops the cache itself)
        add { $0.checkpointing = .block }
        var mb = recipe.microBatch / 2
        while mb >= 1 {
            let m = mb, accum = recipe.gradAccum * recipe.microBatch / mb
            if recipe.microBatch % mb == 0 {
                add { $0.microBatch = m; $0.gradAccum = accum }
                add { $0.checkpointing = .block; $0.microBatch = m; $0.gradAccum = accum }
            }
            mb /= 2
        }
        func lean(_ r: inout Recipe) { r.checkpointing = .block; r.microBatch = 1; r.gradAccum = recipe.tokensPerStep / recipe.seqLen }
        if recipe.optimizerStates == .f32 {
            add { $0.optimizerStates = .int8 }
            add { lean(&$0); $0.optimizerStates = .int8 }
        }
        if recipe.mode != .full, recipe.quant == .none {
            for q in [FrozenStorage.q8_0, .q4_0] {
                add { $0.quant = q }
                add { lean(&$0); $0.quant = q; $0.optimizerStates = .int8 }
            }
        }
        if recipe.mode != .full {
            var r = recipe.loraRank / 2
            while r >= 8 {
                let rank = r
                add { lean(&$0); $0.loraRank = rank }
                r /= 2
            }
        }
        var tried = Set<String>()
        for r in candidates {
            // Only what the candidate changes; a change the recipe already has is no candidate.
            let text = overrides(from: recipe, to: r)
            guard !text.isEmpty, tried.insert(text).inserted else { continue }
            if let plan = try? plan(r, config: config, device: device, budget: budget, worldSize: worldSize, rank: rank, gpu: gpu,
                                    budgetAfterStart: budgetAfterStart), plan.fits {
                return "\(text) (planned peak \(formatBytes(plan.need)))"
            }
        }
        return nil
    }

    /// The `--set` overrides that turn `recipe` into `changed`, over the keys a suggestion edits.
    static func overrides(from recipe: Recipe, to changed: Recipe) -> String {
        var sets: [String] = []
        if changed.reuseDequantized != recipe.reuseDequantized { sets.append("reuse_dequantized=\(changed.reuseDequantized.map { "\($0)" } ?? "auto")") }
        if changed.checkpointing != recipe.checkpointing { sets.append("checkpointing=\(changed.checkpointing.rawValue)") }
        if changed.microBatch != recipe.microBatch { sets.append("micro_batch=\(changed.microBatch)") }
        if changed.gradAccum != recipe.gradAccum { sets.append("grad_accum=\(changed.gradAccum)") }
        if changed.optimizerStates != recipe.optimizerStates { sets.append("optimizer_states=\(changed.optimizerStates.rawValue)") }
        if changed.quant != recipe.quant { sets.append("quant=\(changed.quant.rawValue)") }
        if changed.loraRank != recipe.loraRank { sets.append("lora_r=\(changed.loraRank)") }
        return sets.map { "--set \($0)" }.joined(separator: " ")
    }
}

extension MemoryPlan {
    /// A table: one line per tag with its planned peak, then the tensors' total; on cuda a line per part the
    /// device holds besides (the allocator's rounding and cache, and the estimates) and the device total;
    /// then the budget and the verdict.
    public func formatted(title: String) -> String {
        func line(_ name: String, _ bytes: Int, _ note: String = "") -> String {
            let amount = formatBytes(bytes)
            return "  " + name.padding(toLength: 16, withPad: " ", startingAt: 0)
                + (note.isEmpty ? amount : amount.padding(toLength: 12, withPad: " ", startingAt: 0) + note)
        }
        var lines = [title]
        for tag in MemoryTag.allCases where report.peak(tag) > 0 && !tag.isHost {
            lines.append(line(tag.rawValue, report.peak(tag)))
            guard tag == .workspace else { continue }
            if dequantizedCache > 0 {
                lines.append(line("  of which", dequantizedCache, "one block's dequantized weights, kept from its recompute to its backward (reuse_dequantized)"))
            } else if dequantizedCacheLeftOut > 0 {
                lines.append("  (reuse_dequantized auto: off, its \(formatBytes(dequantizedCacheLeftOut)) cache of one block's dequantized weights does not fit the budget)")
            }
        }
        lines.append(line("peak total", report.peakTotal, cuda == nil ? "" : "the tensors"))
        if let cuda {
            let a = cuda.allocator
            lines.append(line("+ allocator", a.peakReserved - report.peakTotal,
                              "blocks of 512 B / 2 MiB, 2 MiB of scratch and the cache: \(formatBytes(a.peakInUse)) in use at peak, \(formatBytes(a.peakReserved)) reserved"))
            let g = cuda.gpu
            let estimateFor = "estimate for \(g.name)"
            if g.emulated {
                lines.append("  (the CPU emulation: no CUDA context, cuBLAS workspace or NCCL buffers on its device)")
            } else {
                lines.append(line("+ CUDA context", cuda.context,
                                  "\(estimateFor): \(formatBytes(g.localMemoryBytes)) of thread stacks (\(g.multiprocessors) SMs) + \(formatBytes(GPUProfile.contextBaseBytes)) driver and kernels"))
                lines.append(line("+ cuBLAS", cuda.cublasWorkspace, "\(estimateFor): the default stream's workspace (sm_\(g.computeMajor)\(g.computeMinor))"))
                if cuda.nccl > 0 { lines.append(line("+ NCCL", cuda.nccl, "\(estimateFor): its buffers for \(worldSize) ranks")) }
            }
            lines.append(line("device total", cuda.total))
        }
        for tag in MemoryTag.allCases where report.peak(tag) > 0 && tag.isHost {
            lines.append(line(tag.rawValue, report.peak(tag), "(host memory, not in the device total)"))
        }
        if let budget {
            let against = budgetAfterStart && cuda != nil ? " (needs \(formatBytes(need)) once started)" : ""
            lines.append("  " + "budget".padding(toLength: 16, withPad: " ", startingAt: 0) + formatBytes(budget)
                         + (fits ? "  -> fits" : "  -> does NOT fit") + against)
        }
        if !ranks.isEmpty {
            lines.append("  per rank (each keeps the optimizer state of its tensors only):")
            func row(_ cells: [String]) -> String {
                let text = zip(cells, [6, 9, 16, 16, 16, 0]).map { $0.padding(toLength: max($1, $0.count), withPad: " ", startingAt: 0) }
                return "    " + text.joined()
            }
            let device = cuda != nil
            lines.append(row(["rank", "tensors", MemoryTag.optimizer.rawValue, MemoryTag.masterWeights.rawValue, "peak total"]
                             + (device ? ["device total"] : [])))
            for r in ranks {
                lines.append(row(["\(r.rank)", "\(r.tensors)", formatBytes(r.report.peak(.optimizer)),
                                  formatBytes(r.report.peak(.masterWeights)), formatBytes(r.report.peakTotal)]
                                 + (device ? [formatBytes(r.need)] : [])))
            }
        }
        return lines.joined(separator: "\n")
    }

    /// What the plan is of, for its title: "" for one process; else the ranks and whether they shard.
    public var ranksDescription: String {
        guard worldSize > 1 else { return "" }
        return sharded ? ", \(worldSize) ranks, optimizer state sharded (plan of rank \(rank)\(ranks.isEmpty ? "" : ", the largest"))"
            : ", \(worldSize) ranks (each the same: shard_optimizer is off)"
    }

    public func jsonObject() -> [String: Any] {
        func peaks(_ report: MemoryReport) -> [String: Int] {
            var peak: [String: Int] = [:]
            for tag in MemoryTag.allCases { peak[tag.rawValue] = report.peak(tag) }
            return peak
        }
        func footprint(_ c: CUDAFootprint) -> [String: Any] {
            ["allocator_in_use_peak_bytes": c.allocator.peakInUse, "allocator_reserved_peak_bytes": c.allocator.peakReserved,
             "allocator_in_use_at_peak_by_tag": Dictionary(uniqueKeysWithValues: c.allocator.inUseAtPeakByTag.map { ($0.key.rawValue, $0.value) }),
             "persistent_scratch_bytes": c.persistentScratch, "context_bytes": c.context, "cublas_workspace_bytes": c.cublasWorkspace,
             "nccl_bytes": c.nccl, "total_bytes": c.total, "gpu": c.gpu.name, "emulated": c.gpu.emulated]
        }
        // device_total_bytes: what a budget is checked against (on cpu the tensors' peak).
        var o: [String: Any] = ["device": device.rawValue, "peak_bytes_by_tag": peaks(report), "peak_total_bytes": report.peakTotal,
                                "device_total_bytes": cuda?.total ?? report.peakTotal,
                                "host_peak_total_bytes": report.hostPeakTotal, "world_size": worldSize, "rank": rank,
                                "shard_optimizer": sharded, "dequantized_cache_bytes": dequantizedCache]
        if dequantizedCacheLeftOut > 0 { o["dequantized_cache_left_out_bytes"] = dequantizedCacheLeftOut }
        if let cuda { o["cuda"] = footprint(cuda) }
        if let budget { o["budget_bytes"] = budget; o["fits"] = fits; o["need_bytes"] = need }
        if !ranks.isEmpty {
            o["ranks"] = ranks.map {
                var r: [String: Any] = ["rank": $0.rank, "tensors": $0.tensors, "peak_bytes_by_tag": peaks($0.report),
                                        "peak_total_bytes": $0.report.peakTotal, "device_total_bytes": $0.need]
                if let c = $0.cuda { r["cuda"] = footprint(c) }
                return r
            }
        }
        return o
    }
}
