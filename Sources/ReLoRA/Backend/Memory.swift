import Foundation

/// What an allocation is for. Every tensor carries one, so a run can report memory by role and the
/// ReLoRA savings (frozen weights without gradients or optimizer state) are visible, not claimed.
public enum MemoryTag: String, CaseIterable, Sendable, Codable {
    case frozenWeights = "frozen_weights"
    case lora
    case trainable
    case optimizer
    case gradients
    case activations
    case workspace
}

/// Counts live and peak bytes per tag for one backend. Thread-safe.
public final class MemoryLedger: @unchecked Sendable {
    private let lock = NSLock()
    private var live: [MemoryTag: Int] = [:]
    private var peakByTag: [MemoryTag: Int] = [:]
    private var liveTotal = 0
    private var peakTotal = 0

    public init() {}

    func allocated(_ bytes: Int, _ tag: MemoryTag) {
        lock.lock(); defer { lock.unlock() }
        live[tag, default: 0] += bytes
        peakByTag[tag] = max(peakByTag[tag] ?? 0, live[tag]!)
        liveTotal += bytes
        peakTotal = max(peakTotal, liveTotal)
    }

    func freed(_ bytes: Int, _ tag: MemoryTag) {
        lock.lock(); defer { lock.unlock() }
        live[tag, default: 0] -= bytes
        liveTotal -= bytes
    }

    public func report() -> MemoryReport {
        lock.lock(); defer { lock.unlock() }
        return MemoryReport(live: live, peak: peakByTag, liveTotal: liveTotal, peakTotal: peakTotal)
    }
}

/// A snapshot of a ledger. `peak` is per tag (each tag's own maximum); `peakTotal` is the maximum
/// of the sum, which is what has to fit in memory.
public struct MemoryReport: Sendable, Codable {
    public var live: [MemoryTag: Int]
    public var peak: [MemoryTag: Int]
    public var liveTotal: Int
    public var peakTotal: Int

    public func live(_ tag: MemoryTag) -> Int { live[tag] ?? 0 }

    /// One line per tag: "frozen_weights  12.3 MiB (peak 12.3 MiB)".
    public func formatted() -> String {
        var lines: [String] = []
        for tag in MemoryTag.allCases where (peak[tag] ?? 0) > 0 {
            let name = tag.rawValue.padding(toLength: 15, withPad: " ", startingAt: 0)
            lines.append("\(name) \(formatBytes(live[tag] ?? 0)) (peak \(formatBytes(peak[tag] ?? 0)))")
        }
        lines.append("total           \(formatBytes(liveTotal)) (peak \(formatBytes(peakTotal)))")
        return lines.joined(separator: "\n")
    }
}

public func formatBytes(_ bytes: Int) -> String {
    let b = Double(bytes)
    if b >= 1_073_741_824 { return String(format: "%.2f GiB", b / 1_073_741_824) }
    if b >= 1_048_576 { return String(format: "%.1f MiB", b / 1_048_576) }
    if b >= 1024 { return String(format: "%.1f KiB", b / 1024) }
    return "\(bytes) B"
}
