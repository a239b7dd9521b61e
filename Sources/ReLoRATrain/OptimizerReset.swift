import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
/// ReLoRA's partial optimizer reset at a restart: prune Adam's first and second moments of the LoRA
/// parameters (never the dense ones; the step counter is kept). The pruning itself is a backend op
/// (`Backend.prune`, `Backend.pruneMoments`), so it runs where the moments live.
///
/// Why the variants: right after a restart B = 0, so A's gradient is 0 and A moves by Adam's update
/// `m / (sqrt(v) + eps)` alone. The paper's `magnitude` reset prunes m and v with separate masks (as the
/// reference code does), so an entry can keep its m and lose its v; it then moves by about `lr * m / eps`,
/// far more than any normal step (the README's measurement: A entries of initial bound 0.125 jumping by
/// tens). `magnitude_joint` removes that case by pruning both moments with one mask; `magnitude_reinit_a`
/// also drops A's moments entirely, since they were accumulated for the previous A, which was just
/// merged and replaced by a fresh random one.
public enum OptimizerResetMode: String, Sendable, CaseIterable {
    /// The paper's reset: zero the entries whose magnitude is at or below the `ratio`-quantile of the
    /// tensor's magnitudes, m and v each with its own mask.
    case magnitude
    /// Zero each entry with probability `ratio` (counter-based RNG, reproducible).
    case random
    /// Zero everything.
    case full
    /// No reset (ablation).
    case none
    /// One mask for m and v: rank the positions of each tensor by the size of the step Adam would take
    /// there, `|m^| / (sqrt(v^) + eps)` (bias-corrected), and zero both moments where it is at or below
    /// its `ratio`-quantile. Kept positions keep a consistent (m, v) pair, so no entry is left with m but
    /// no v, and the kept steps are the largest ordinary Adam steps, bounded like any Adam step.
    case magnitudeJoint = "magnitude_joint"
    /// A's moments zeroed entirely (A is re-initialised at the restart; its old moments belong to the
    /// previous A), B's (and a trained scale's) pruned like `magnitude`, m and v separately.
    case magnitudeReinitA = "magnitude_reinit_a"

    /// The per-tensor rule of the modes that prune every moment tensor the same way, each separately:
    /// `magnitude`, `random`, `full`; nil for `none` and for the variants that treat a tensor's moments
    /// jointly or by factor. For every mode, `reset(for:ratio:)` says what happens to each factor's moments.
    public func rule(ratio: Double) -> PruneRule? {
        switch self {
        case .magnitude: return .magnitude(ratio: ratio)
        case .random: return .random(probability: ratio)
        case .full: return .all
        case .none, .magnitudeJoint, .magnitudeReinitA: return nil
        }
    }

    /// What this mode does to the moments of one LoRA factor.
    public func reset(for factor: LoRAFactor, ratio: Double) -> MomentReset {
        switch self {
        case .magnitude, .random, .full, .none:
            return rule(ratio: ratio).map { .separately($0) } ?? .keep
        case .magnitudeJoint:
            return .jointly(ratio: ratio)
        case .magnitudeReinitA:
            return factor == .a ? .zero : .separately(.magnitude(ratio: ratio))
        }
    }
}

/// What a reset does to one parameter's pair of moments (m, v).
public enum MomentReset: Sendable, Equatable {
    /// Each of m and v pruned by the rule, with its own mask.
    case separately(PruneRule)
    /// m and v pruned with one mask by the Adam update magnitude (`Backend.pruneMoments`).
    case jointly(ratio: Double)
    /// Both zeroed.
    case zero
    /// Left as they are.
    case keep
}
