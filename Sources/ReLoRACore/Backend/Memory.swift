import Foundation

/// What an allocation is for. Every tensor carries one, so a run can report memory by role and the
/// ReLoRA savings (frozen weights without gradients or optimizer state) are visible, not claimed.
public enum MemoryTag: String, CaseIterable, Sendable, Codable {
    case frozenWeights = "frozen_weights"
    case lora
    case trainable
    /// fp32 master copies of trained tensors whose working copy is lower precision (bf16 on CUDA).
    case masterWeights = "master_weights"
    case optimizer
    case gradients
    case activations
    case workspace
    /// f32 master copies of quantized frozen weights (merge policy `master`), kept in host memory: counted
    /// per tag like the others but not in the device totals (`MemoryReport.peakTotal`), since a GPU run
    /// holds them in RAM (pinned, for the copies at each restart); `hostPeakTotal` reports them.
    case hostMaster = "host_master"

    /// Whether tensors of this tag live in host memory whatever the backend (so a plan's device peak
    /// leaves them out). On the CPU backend the device is the host too; the split still says where a GPU
    /// run would hold what.
    public var isHost: Bool { self == .hostMaster }
}

/// Counts live and peak bytes per tag, and host<->device transfers, for one backend. Thread-safe.
///
/// A backend calls `allocated` when it makes a tensor and `freed` when the tensor goes away, whether
/// or not it allocates real memory: the planning backend drives the same ledger without allocating,
/// which is how `relora memory` and a real run report from the same code.
public final class MemoryLedger: @unchecked Sendable {  // every var is read and written under `lock`
    private let lock = NSLock()
    private var live: [MemoryTag: Int] = [:]
    private var peakByTag: [MemoryTag: Int] = [:]
    private var liveTotal = 0
    private var peakTotal = 0
    private var hostLiveTotal = 0
    private var hostPeakTotal = 0
    private var transfers = TransferCount()

    public init() {}

    public func allocated(_ bytes: Int, _ tag: MemoryTag) {
        lock.lock(); defer { lock.unlock() }
        live[tag, default: 0] += bytes
        peakByTag[tag] = max(peakByTag[tag] ?? 0, live[tag]!)
        if tag.isHost {
            hostLiveTotal += bytes
            hostPeakTotal = max(hostPeakTotal, hostLiveTotal)
        } else {
            liveTotal += bytes
            peakTotal = max(peakTotal, liveTotal)
        }
    }

    public func freed(_ bytes: Int, _ tag: MemoryTag) {
        lock.lock(); defer { lock.unlock() }
        live[tag, default: 0] -= bytes
        if tag.isHost { hostLiveTotal -= bytes } else { liveTotal -= bytes }
    }

    /// One host -> device copy (upload) of `bytes`.
    public func uploaded(_ bytes: Int) {
        lock.lock(); defer { lock.unlock() }
        transfers.uploads += 1
        transfers.uploadBytes += bytes
    }

    /// One device -> host copy (download, or an op that returns a value to the host) of `bytes`.
    public func downloaded(_ bytes: Int) {
        lock.lock(); defer { lock.unlock() }
        transfers.downloads += 1
        transfers.downloadBytes += bytes
    }

    public var transferCount: TransferCount {
        lock.lock(); defer { lock.unlock() }
        return transfers
    }

    public func report() -> MemoryReport {
        lock.lock(); defer { lock.unlock() }
        return MemoryReport(live: live, peak: peakByTag, liveTotal: liveTotal, peakTotal: peakTotal, transfers: transfers,
                            hostLiveTotal: hostLiveTotal, hostPeakTotal: hostPeakTotal)
    }
}

/// Host<->device copies so far. On the CPU backend they are memcpys, counted all the same, so a test
/// on the CPU proves what a GPU step would need.
public struct TransferCount: Sendable, Codable, Equatable {
    public var uploads = 0, downloads = 0
    public var uploadBytes = 0, downloadBytes = 0
    public var total: Int { uploads + downloads }

    public init(uploads: Int = 0, downloads: Int = 0, uploadBytes: Int = 0, downloadBytes: Int = 0) {
        self.uploads = uploads; self.downloads = downloads; self.uploadBytes = uploadBytes; self.downloadBytes = downloadBytes
    }

    public static func - (a: TransferCount, b: TransferCount) -> TransferCount {
        TransferCount(uploads: a.uploads - b.uploads, downloads: a.downloads - b.downloads,
                      uploadBytes: a.uploadBytes - b.uploadBytes, downloadBytes: a.downloadBytes - b.downloadBytes)
    }
}

/// A snapshot of a ledger. `peak` is per tag (each tag's own maximum); `peakTotal` is the maximum
/// of the sum over the device tags, which is what has to fit in device memory; the host tags
/// (`MemoryTag.isHost`) are summed separately into `hostLiveTotal` and `hostPeakTotal`.
public struct MemoryReport: Sendable, Codable {
    public var live: [MemoryTag: Int]
    public var peak: [MemoryTag: Int]
    public var liveTotal: Int
    public var peakTotal: Int
    public var transfers = TransferCount()
    public var hostLiveTotal = 0
    public var hostPeakTotal = 0

    public func live(_ tag: MemoryTag) -> Int { live[tag] ?? 0 }
    public func peak(_ tag: MemoryTag) -> Int { peak[tag] ?? 0 }

    /// One line per tag: "frozen_weights  12.3 MiB (peak 12.3 MiB)".
    public func formatted() -> String {
        var lines: [String] = []
        for tag in MemoryTag.allCases where (peak[tag] ?? 0) > 0 && !tag.isHost {
            let name = tag.rawValue.padding(toLength: 15, withPad: " ", startingAt: 0)
            lines.append("\(name) \(formatBytes(live[tag] ?? 0)) (peak \(formatBytes(peak[tag] ?? 0)))")
        }
        lines.append("total           \(formatBytes(liveTotal)) (peak \(formatBytes(peakTotal)))")
        for tag in MemoryTag.allCases where (peak[tag] ?? 0) > 0 && tag.isHost {
            let name = tag.rawValue.padding(toLength: 15, withPad: " ", startingAt: 0)
            lines.append("\(name) \(formatBytes(live[tag] ?? 0)) (peak \(formatBytes(peak[tag] ?? 0))) in host memory, not in the total")
        }
        lines.append("transfers       \(transfers.uploads) up (\(formatBytes(transfers.uploadBytes))), "
                     + "\(transfers.downloads) down (\(formatBytes(transfers.downloadBytes))) so far")
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

/// "24GB", "24GiB", "1.5 TB", "800MB", or plain bytes. GB/MB/TB are powers of 10; GiB/MiB/TiB of 2.
/// (A "24 GB" consumer GPU has 24 GiB: say `--budget 24GiB` to plan against all of it.)
public func parseBytes(_ text: String) throws -> Int {
    let t = text.trimmingCharacters(in: .whitespaces).lowercased().replacingOccurrences(of: " ", with: "")
    let units: [(String, Double)] = [("tib", 0x1p40), ("gib", 0x1p30), ("mib", 0x1p20), ("kib", 0x1p10),
                                     ("tb", 1e12), ("gb", 1e9), ("mb", 1e6), ("kb", 1e3), ("b", 1)]
    for (suffix, scale) in units where t.hasSuffix(suffix) {
        if let v = Double(t.dropLast(suffix.count)), v > 0, v.isFinite { return Int(v * scale) }
        break
    }
    if let v = Int(t), v > 0 { return v }
    throw ReLoRAError.usage("cannot read '\(text)' as a memory size; write e.g. 24GiB, 24GB or 800MB")
}
