/// ReLoRA's partial optimizer reset at a restart: prune Adam's first and second moments of the LoRA
/// parameters (never the dense ones; the step counter is kept). The pruning itself is a backend op
/// (`Backend.prune`), so it runs where the moments live.
public enum OptimizerResetMode: String, Sendable, CaseIterable {
    /// Zero the entries whose magnitude is at or below the `ratio`-quantile of the tensor's magnitudes.
    case magnitude
    /// Zero each entry with probability `ratio` (counter-based RNG, reproducible).
    case random
    /// Zero everything.
    case full
    /// No reset (ablation).
    case none

    /// The backend rule for this mode at `ratio`, or nil for `none`.
    public func rule(ratio: Double) -> PruneRule? {
        switch self {
        case .magnitude: return .magnitude(ratio: ratio)
        case .random: return .random(probability: ratio)
        case .full: return .all
        case .none: return nil
        }
    }
}
