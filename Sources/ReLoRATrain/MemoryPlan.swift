import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// What a run would allocate on a device, by tag, from running the training code path on a
/// `PlanningBackend` (nothing is allocated or computed). In a data-parallel run the plan of one rank: the
/// ranks differ only when the optimizer is sharded (`shard_optimizer`); then `ranks` summarises each, and
/// `report` is the plan of `rank`.
public struct MemoryPlan: Sendable {
    public var device: Device
    public var report: MemoryReport
    /// Bytes the plan must fit in, if the user gave a budget.
    public var budget: Int?
    public var fits: Bool { budget.map { report.peakTotal <= $0 } ?? true }
    /// The run's ranks, and the rank `report` plans (with every rank alike, 0).
    public var worldSize = 1
    public var rank = 0
    /// Whether the ranks shard the optimizer state (`shard_optimizer` with more than one rank).
    public var sharded = false
    /// Every rank's plan, in rank order, when the ranks differ (sharded); else empty.
    public var ranks: [RankPlan] = []

    /// One rank's part in a sharded plan.
    public struct RankPlan: Sendable {
        public var rank: Int
        /// Trained tensors whose optimizer state the rank keeps.
        public var tensors: Int
        public var report: MemoryReport
    }
}

public enum MemoryPlanner {
    /// Plans `recipe` (model from `config`) on `device`: builds the model, gradients and optimizer as
    /// the trainer does, runs one optimizer step (all `grad_accum` micro-batches through the recipe's
    /// checkpointing) and, for `relora`, one restart (merge with the recipe's policy, whose workspace and
    /// master copies it counts, + optimizer reset).
    ///
    /// For rank `rank` of `worldSize` data-parallel ranks (each holds the whole model; with `shard_optimizer`
    /// only its share of the optimizer state); rank nil: every rank is planned and the plan is that of the
    /// rank with the largest peak (the lowest such rank), with every rank's in `ranks`.
    public static func plan(_ recipe: Recipe, config: LlamaConfig, device: Device, budget: Int? = nil,
                            worldSize: Int = 1, rank: Int? = nil) throws -> MemoryPlan {
        precondition(worldSize >= 1 && (rank.map { (0..<worldSize).contains($0) } ?? true), "rank \(rank ?? -1) of \(worldSize)")
        let sharded = recipe.shardOptimizer && worldSize > 1
        func planRank(_ r: Int) throws -> (report: MemoryReport, tensors: Int) {
            let backend = PlanningBackend(target: device)
            try LlamaModel.checkSupported(config, on: backend)  // a plan for a run the device cannot make is an error
            let optimizer = try run(recipe, config: config, on: backend, rank: r, worldSize: worldSize)
            return (backend.ledger.report(), optimizer.parameters.indices.filter(optimizer.owns).count)
        }
        func made(_ report: MemoryReport, rank: Int, ranks: [MemoryPlan.RankPlan] = []) -> MemoryPlan {
            var plan = MemoryPlan(device: device, report: report, budget: budget)
            plan.worldSize = worldSize
            plan.sharded = sharded
            plan.rank = rank
            plan.ranks = ranks
            return plan
        }
        guard sharded else { return made(try planRank(0).report, rank: 0) }
        if let rank { return made(try planRank(rank).report, rank: rank) }
        let ranks = try (0..<worldSize).map { r in
            let (report, tensors) = try planRank(r)
            return MemoryPlan.RankPlan(rank: r, tensors: tensors, report: report)
        }
        let largest = ranks.max { a, b in
            a.report.peakTotal != b.report.peakTotal ? a.report.peakTotal < b.report.peakTotal : a.rank > b.rank
        }!
        return made(largest.report, rank: largest.rank, ranks: ranks)
    }

    /// The plan for `recipe` on `device`, or one sentence with the first standard change that fits when its
    /// peak exceeds `budget` (`what` names the budget: "the budget", "free device memory").
    /// `worldSize` and `rank` as for `plan`.
    public static func requireFits(_ recipe: Recipe, config: LlamaConfig, device: Device, budget: Int,
                                   what: String = "the budget", worldSize: Int = 1, rank: Int? = nil) throws -> MemoryPlan {
        let plan = try MemoryPlanner.plan(recipe, config: config, device: device, budget: budget, worldSize: worldSize, rank: rank)
        guard plan.fits else {
            let fix = suggestion(for: recipe, config: config, device: device, budget: budget, worldSize: worldSize, rank: rank)
                .map { "; this would fit: \($0)" } ?? "; no standard change (block checkpointing, micro-batch 1, smaller rank) fits it"
            throw ReLoRAError.invalidConfig(
                "the run needs \(formatBytes(plan.report.peakTotal)) on \(device.rawValue) (planned), more than \(what) (\(formatBytes(budget)))\(fix)")
        }
        return plan
    }

    /// The planned code path on any backend (tests run it on the CPU to prove plan = measured), as rank
    /// `rank` of `worldSize` builds it (its share of a sharded optimizer's state); returns the optimizer.
    /// The collectives of a data-parallel step move host memory only and are left out.
    @discardableResult
    static func run(_ recipe: Recipe, config: LlamaConfig, on backend: Backend, rank: Int = 0, worldSize: Int = 1) throws -> AdamW {
        try recipe.loraConfig?.validate(for: config)
        let (model, optimizer) = TrainingModel.build(recipe, config: config, backend: backend, rank: rank, worldSize: worldSize)
        optimizer.refreshMasterCopies()
        let n = recipe.microBatch * recipe.seqLen
        let ids = [Int32](repeating: 0, count: n)
        _ = try Trainer.optimizerStep(model: model, optimizer: optimizer, recipe: recipe, step: 0, lr: recipe.lr) { _ in (ids, ids) }
        if recipe.mode == .relora {
            try model.mergeAdapters(policy: recipe.effectiveMergePolicy.policy, seed: recipe.seed)
            _ = try Trainer.resetAfterMerge(optimizer, recipe: recipe, restart: 0)
        }
        return optimizer
    }

    /// The first of a few standard changes whose plan fits `budget`, as `--set` overrides with the planned
    /// peak; nil if none does. In order: those that leave the arithmetic alone (block checkpointing, smaller
    /// micro-batches at the same tokens per step), then those that store something in fewer bits (8-bit
    /// Adam moments; q8_0, then q4_0 frozen weights), then a smaller LoRA rank. `worldSize` and `rank` as
    /// for `plan`.
    public static func suggestion(for recipe: Recipe, config: LlamaConfig, device: Device, budget: Int,
                                  worldSize: Int = 1, rank: Int? = nil) -> String? {
        var candidates: [Recipe] = []
        func add(_ edit: (inout Recipe) -> Void) {
            var r = recipe
            edit(&r)
            candidates.append(r)
        }
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
            if let plan = try? plan(r, config: config, device: device, budget: budget, worldSize: worldSize, rank: rank), plan.fits {
                return "\(text) (planned peak \(formatBytes(plan.report.peakTotal)))"
            }
        }
        return nil
    }

    /// The `--set` overrides that turn `recipe` into `changed`, over the keys a suggestion edits.
    static func overrides(from recipe: Recipe, to changed: Recipe) -> String {
        var sets: [String] = []
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
    /// A table: one line per tag with its planned peak, then the total, the budget and the verdict.
    public func formatted(title: String) -> String {
        var lines = [title]
        for tag in MemoryTag.allCases where report.peak(tag) > 0 && !tag.isHost {
            lines.append("  " + tag.rawValue.padding(toLength: 16, withPad: " ", startingAt: 0) + formatBytes(report.peak(tag)))
        }
        lines.append("  " + "peak total".padding(toLength: 16, withPad: " ", startingAt: 0) + formatBytes(report.peakTotal))
        for tag in MemoryTag.allCases where report.peak(tag) > 0 && tag.isHost {
            lines.append("  " + tag.rawValue.padding(toLength: 16, withPad: " ", startingAt: 0) + formatBytes(report.peak(tag))
                         + "  (host memory, not in the device total)")
        }
        if let budget {
            lines.append("  " + "budget".padding(toLength: 16, withPad: " ", startingAt: 0) + formatBytes(budget)
                         + (fits ? "  -> fits" : "  -> does NOT fit"))
        }
        if !ranks.isEmpty {
            lines.append("  per rank (each keeps the optimizer state of its tensors only):")
            func row(_ cells: [String]) -> String {
                let text = zip(cells, [6, 9, 16, 16, 0]).map { $0.padding(toLength: max($1, $0.count), withPad: " ", startingAt: 0) }
                return "    " + text.joined()
            }
            lines.append(row(["rank", "tensors", MemoryTag.optimizer.rawValue, MemoryTag.masterWeights.rawValue, "peak total"]))
            for r in ranks {
                lines.append(row(["\(r.rank)", "\(r.tensors)", formatBytes(r.report.peak(.optimizer)),
                                  formatBytes(r.report.peak(.masterWeights)), formatBytes(r.report.peakTotal)]))
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
        var o: [String: Any] = ["device": device.rawValue, "peak_bytes_by_tag": peaks(report), "peak_total_bytes": report.peakTotal,
                                "host_peak_total_bytes": report.hostPeakTotal, "world_size": worldSize, "rank": rank,
                                "shard_optimizer": sharded]
        if let budget { o["budget_bytes"] = budget; o["fits"] = fits }
        if !ranks.isEmpty {
            o["ranks"] = ranks.map { ["rank": $0.rank, "tensors": $0.tensors, "peak_bytes_by_tag": peaks($0.report),
                                      "peak_total_bytes": $0.report.peakTotal] as [String: Any] }
        }
        return o
    }
}
