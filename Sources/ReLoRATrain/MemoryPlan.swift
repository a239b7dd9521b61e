import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// What a run would allocate on a device, by tag, from running the training code path on a
/// `PlanningBackend` (nothing is allocated or computed).
public struct MemoryPlan: Sendable {
    public var device: Device
    public var report: MemoryReport
    /// Bytes the plan must fit in, if the user gave a budget.
    public var budget: Int?
    public var fits: Bool { budget.map { report.peakTotal <= $0 } ?? true }
}

public enum MemoryPlanner {
    /// Plans `recipe` (model from `config`) on `device`: builds the model, gradients and optimizer as
    /// the trainer does, runs one optimizer step (all `grad_accum` micro-batches through the recipe's
    /// checkpointing) and, for `relora`, one restart (merge with the recipe's policy, whose workspace and
    /// master copies it counts, + optimizer reset).
    public static func plan(_ recipe: Recipe, config: LlamaConfig, device: Device, budget: Int? = nil) throws -> MemoryPlan {
        let backend = PlanningBackend(target: device)
        try LlamaModel.checkSupported(config, on: backend)  // a plan for a run the device cannot make is an error
        try run(recipe, config: config, on: backend)
        return MemoryPlan(device: device, report: backend.ledger.report(), budget: budget)
    }

    /// The plan for `recipe` on `device`, or one sentence with the first standard change that fits when its
    /// peak exceeds `budget` (`what` names the budget: "the budget", "free device memory").
    public static func requireFits(_ recipe: Recipe, config: LlamaConfig, device: Device, budget: Int,
                                   what: String = "the budget") throws -> MemoryPlan {
        let plan = try MemoryPlanner.plan(recipe, config: config, device: device, budget: budget)
        guard plan.fits else {
            let fix = suggestion(for: recipe, config: config, device: device, budget: budget)
                .map { "; this would fit: \($0)" } ?? "; no standard change (block checkpointing, micro-batch 1, smaller rank) fits it"
            throw ReLoRAError.invalidConfig(
                "the run needs \(formatBytes(plan.report.peakTotal)) on \(device.rawValue) (planned), more than \(what) (\(formatBytes(budget)))\(fix)")
        }
        return plan
    }

    /// The planned code path on any backend (tests run it on the CPU to prove plan = measured).
    static func run(_ recipe: Recipe, config: LlamaConfig, on backend: Backend) throws {
        try recipe.loraConfig?.validate(for: config)
        let (model, optimizer) = TrainingModel.build(recipe, config: config, backend: backend)
        optimizer.refreshMasterCopies()
        let n = recipe.microBatch * recipe.seqLen
        let ids = [Int32](repeating: 0, count: n)
        _ = try Trainer.optimizerStep(model: model, optimizer: optimizer, recipe: recipe, step: 0, lr: recipe.lr) { _ in (ids, ids) }
        if recipe.mode == .relora {
            try model.mergeAdapters(policy: recipe.effectiveMergePolicy.policy, seed: recipe.seed)
            _ = Trainer.resetAfterMerge(optimizer, recipe: recipe, restart: 0)
        }
    }

    /// The first of a few standard changes whose plan fits `budget`, as `--set` overrides with the planned
    /// peak; nil if none does. In order: those that leave the arithmetic alone (block checkpointing, smaller
    /// micro-batches at the same tokens per step), then those that store something in fewer bits (8-bit
    /// Adam moments; q8_0, then q4_0 frozen weights), then a smaller LoRA rank.
    public static func suggestion(for recipe: Recipe, config: LlamaConfig, device: Device, budget: Int) -> String? {
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
            if let plan = try? plan(r, config: config, device: device, budget: budget), plan.fits {
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
        return lines.joined(separator: "\n")
    }

    public func jsonObject() -> [String: Any] {
        var peak: [String: Int] = [:]
        for tag in MemoryTag.allCases { peak[tag.rawValue] = report.peak(tag) }
        var o: [String: Any] = ["device": device.rawValue, "peak_bytes_by_tag": peak, "peak_total_bytes": report.peakTotal,
                                "host_peak_total_bytes": report.hostPeakTotal]
        if let budget { o["budget_bytes"] = budget; o["fits"] = fits }
        return o
    }
}
