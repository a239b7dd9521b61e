import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain
import ReLoRAAnalysis
import ReLoRASelfTest

/// Progress of a long command on stderr (stdout stays for results): amount done of the total, the rate over
/// the recent updates and the ETA at that rate, e.g.
///
///     eval: 1,536/4,096 windows (38%) | 52.1 windows/s | eta 0:00:49
///
/// On a terminal (isatty(2)) one line is rewritten in place with a carriage return, at most 5 times a
/// second; otherwise (a log file, a pipe, CI) a plain line at most every 5 seconds. `finish()` prints the
/// final state (ending the terminal line).
final class ProgressReporter {
    enum Unit {
        /// Counted things, named ("windows", "tensors", "matrices").
        case count(String)
        /// Bytes, printed in KiB/MiB/GiB.
        case bytes
    }

    let label: String
    let total: Int
    let unit: Unit
    let isTerminal = isatty(2) != 0
    let interval: Double
    var eta: ETAEstimator
    /// The first line waits one interval, so a rate is measured before it is shown (and a command shorter
    /// than that prints only its final line).
    var lastPrint: Double
    var lastLineLength = 0
    var done = 0
    var detail: String?

    init(_ label: String, total: Int, unit: Unit) {
        self.label = label
        self.total = total
        self.unit = unit
        interval = isatty(2) != 0 ? 0.2 : 5
        eta = ETAEstimator(total: total)
        lastPrint = monotonicSeconds()
        eta.record(done: 0, at: lastPrint)
    }

    /// `done` units of `total` complete; `detail` (e.g. the current file) ends the line.
    func update(_ done: Int, detail: String? = nil) {
        self.done = done
        self.detail = detail
        let now = monotonicSeconds()
        eta.record(done: done, at: now)
        guard now - lastPrint >= interval else { return }
        lastPrint = now
        emit(final: false)
    }

    /// Prints the final state (`done` if given, else the last update's).
    func finish(done: Int? = nil, detail: String? = nil) {
        if let done { self.done = done }
        if let detail { self.detail = detail }
        eta.record(done: self.done, at: monotonicSeconds())
        emit(final: true)
    }

    func emit(final: Bool) {
        let percent = total > 0 ? String(format: " (%.0f%%)", 100 * Double(done) / Double(total)) : ""
        var line = "\(label): \(amount(done))/\(amount(total))\(unitName)\(percent)"
        if let rate = eta.rate { line += " | " + rateText(rate) }
        if !final || done < total { line += " | eta " + formatDuration(eta.secondsRemaining) }
        if let detail { line += " | " + detail }
        if isTerminal {
            // Pad over the previous, possibly longer, line instead of relying on terminal escape codes.
            let pad = String(repeating: " ", count: max(0, lastLineLength - line.count))
            lastLineLength = line.count
            FileHandle.standardError.write(Data(("\r" + line + pad + (final ? "\n" : "")).utf8))
        } else {
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
    }

    var unitName: String {
        switch unit {
        case .count(let name): return " " + name
        case .bytes: return ""
        }
    }

    func amount(_ n: Int) -> String {
        switch unit {
        case .count:
            // Thousands separated by commas: 1,536.
            var digits = String(n.magnitude), out = ""
            while digits.count > 3 { out = "," + digits.suffix(3) + out; digits.removeLast(3) }
            return (n < 0 ? "-" : "") + digits + out
        case .bytes: return formatBytes(n)
        }
    }

    func rateText(_ perSecond: Double) -> String {
        switch unit {
        case .count(let name): return String(format: perSecond >= 100 ? "%.0f" : "%.1f", perSecond) + " \(name)/s"
        case .bytes: return formatBytes(Int(perSecond)) + "/s"
        }
    }
}
