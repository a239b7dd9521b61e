import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// Learning-rate multiplier per optimizer step: linear warmup, cosine decay to `minRatio` at the last
/// step, and (for ReLoRA) the jagged variant that drops to 0 at every restart and ramps linearly back
/// to the cosine curve over `restartWarmup` steps. This is the reference implementation's formula
/// (the ReLoRA paper's recipe; docs/recipes-and-relora.md), with N total steps, W0 warmup, R restart interval, w restart warmup,
/// m min ratio and t the 0-based step about to be taken:
///
///     t < W0:                 t / W0
///     s = t % R, k = t / R
///     s < w and t >= R:       (s / w) * cos_curve(k*R + w)      (jagged ramp; 0 at the restart step)
///     otherwise:              cos_curve(t),  cos_curve(x) = m + (1-m) * 0.5 * (1 + cos(pi * (x - W0) / (N - W0)))
///
/// Contract: W0 <= R. The initial warmup takes precedence, so with W0 > R the first restart step t = R
/// would get R / W0 instead of 0, and the steps after the optimizer reset would get no ramp. As in the
/// reference code (which asserts it), `Recipe.validate()` rejects jagged recipes with warmup_steps >
/// relora_every rather than bending the formula; W0 = R is fine (t = R is past the warmup and gets 0).
public struct LRSchedule: Sendable, Equatable {
    public var totalSteps: Int
    public var warmupSteps: Int
    public var minRatio: Double
    /// Restart interval R (nil: plain warmup + cosine).
    public var restartEvery: Int?
    public var restartWarmup: Int

    public init(totalSteps: Int, warmupSteps: Int, minRatio: Double, restartEvery: Int? = nil, restartWarmup: Int = 0) {
        self.totalSteps = totalSteps; self.warmupSteps = warmupSteps; self.minRatio = minRatio
        self.restartEvery = restartEvery; self.restartWarmup = restartWarmup
    }

    func cosine(_ t: Int) -> Double {
        let span = Double(max(1, totalSteps - warmupSteps))
        let progress = min(1, max(0, Double(t - warmupSteps) / span))
        return minRatio + (1 - minRatio) * 0.5 * (1 + cos(Double.pi * progress))
    }

    public func multiplier(step t: Int) -> Double {
        if t < warmupSteps { return Double(t) / Double(warmupSteps) }
        if let r = restartEvery, r > 0, restartWarmup > 0, t >= r {
            let k = t / r, s = t % r
            if s < restartWarmup { return Double(s) / Double(restartWarmup) * cosine(k * r + restartWarmup) }
        }
        return cosine(t)
    }
}
