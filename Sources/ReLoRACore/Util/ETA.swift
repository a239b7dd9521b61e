import Foundation

/// The rate of recent progress and the time left at that rate: the mean over the last `window` updates,
/// so a slow start (allocation, page faults, a first evaluation) stops weighing on the estimate once it is
/// out of the window.
public struct ETAEstimator: Sendable {
    public let total: Int
    public let window: Int
    var marks: [(done: Int, seconds: Double)] = []

    public init(total: Int, window: Int = 20) {
        self.total = total
        self.window = max(1, window)
    }

    /// Records that `done` units were complete at time `seconds` (any clock that only moves forward).
    public mutating func record(done: Int, at seconds: Double) {
        marks.append((done, seconds))
        if marks.count > window + 1 { marks.removeFirst(marks.count - window - 1) }
    }

    /// Units per second over the window; nil until two marks with progress between them.
    public var rate: Double? {
        guard let first = marks.first, let last = marks.last, last.done > first.done, last.seconds > first.seconds else { return nil }
        return Double(last.done - first.done) / (last.seconds - first.seconds)
    }

    /// Seconds until `total` at the recent rate (0 when done; nil without a rate).
    public var secondsRemaining: Double? {
        guard let last = marks.last else { return nil }
        if last.done >= total { return 0 }
        guard let rate else { return nil }
        return Double(total - last.done) / rate
    }
}

/// `h:mm:ss` (hours unbounded: "27:03:09"); "-:--:--" for an unknown or infinite duration.
public func formatDuration(_ seconds: Double?) -> String {
    guard let seconds, seconds.isFinite, seconds >= 0 else { return "-:--:--" }
    let s = Int(seconds.rounded())
    return String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60)
}

/// Monotonic seconds (for rates and ETAs).
public func monotonicSeconds() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

/// A count with three significant digits and a unit: 999 -> "999", 1234 -> "1.23k", 4_500_000 -> "4.50M",
/// 2.1e9 -> "2.10B" (tokens seen, amounts in progress lines).
public func formatCount(_ n: Int) -> String {
    let v = Double(n)
    for (unit, suffix) in [(1e9, "B"), (1e6, "M"), (1e3, "k")] where v >= unit {
        return String(format: v / unit >= 100 ? "%.0f" : v / unit >= 10 ? "%.1f" : "%.2f", v / unit) + suffix
    }
    return "\(n)"
}
