import Foundation

/// What an op of a training step is, for the per-op profile: the rows of the table `relora train --profile N`
/// and `relora-bench gpu` print. A backend files each op under one category; a GEMM's category is the role
/// its caller gave it (`OpProfiler.attributeGEMMs(to:)`: the model knows which matrix is the base W, a LoRA
/// factor or the LM head; the backend sees only shapes), `gemmOther` when none.
public enum OpCategory: Int, CaseIterable, Sendable {
    /// `x W^T` and `dy W` through a block linear's base weight (frozen, dequantized or dense; in full-rank
    /// training also the weight's gradient `dy^T x`).
    case gemmBase
    /// LoRA's input side: `x A^T` forward, `dA` and `dx += g A` backward (the rank-r "down" projection).
    case gemmLoRADown
    /// LoRA's output side: `u B^T` forward, `dB` and `g = dy B` backward (the "up" projection).
    case gemmLoRAUp
    /// The LM head: logits, its weight gradient and the gradient into the final norm.
    case gemmHead
    case gemmOther
    /// Quantized blocks -> bf16 (CUDA: the whole layer into the scratch; CPU: one tile of rows at a time).
    case dequantize
    case attentionForward
    case attentionBackward
    /// RMSNorm forward and backward.
    case norm
    /// SwiGLU, RoPE, dropout, axpy, scale, fills, device copies and conversions.
    case elementwise
    case crossEntropy
    case embedding
    /// AdamW (f32 or 8-bit moments) and the moments' conversions.
    case optimizer
    /// Sums of squares, dot products (gradient norm, trained LoRA scale) and collectives across ranks.
    case reduction
    /// Uploads and downloads between host and device.
    case transfer

    /// The table's row label.
    public var label: String {
        switch self {
        case .gemmBase: return "GEMM base W"
        case .gemmLoRADown: return "GEMM LoRA A (down)"
        case .gemmLoRAUp: return "GEMM LoRA B (up)"
        case .gemmHead: return "GEMM lm_head"
        case .gemmOther: return "GEMM other"
        case .dequantize: return "dequantize"
        case .attentionForward: return "attention forward"
        case .attentionBackward: return "attention backward"
        case .norm: return "norms"
        case .elementwise: return "elementwise"
        case .crossEntropy: return "cross-entropy"
        case .embedding: return "embedding"
        case .optimizer: return "optimizer"
        case .reduction: return "reductions/collectives"
        case .transfer: return "transfers"
        }
    }

    /// The key of the category in JSON output (`gemm_base`, `attention_forward`, ...).
    public var key: String {
        switch self {
        case .gemmBase: return "gemm_base"
        case .gemmLoRADown: return "gemm_lora_down"
        case .gemmLoRAUp: return "gemm_lora_up"
        case .gemmHead: return "gemm_head"
        case .gemmOther: return "gemm_other"
        case .dequantize: return "dequantize"
        case .attentionForward: return "attention_forward"
        case .attentionBackward: return "attention_backward"
        case .norm: return "norm"
        case .elementwise: return "elementwise"
        case .crossEntropy: return "cross_entropy"
        case .embedding: return "embedding"
        case .optimizer: return "optimizer"
        case .reduction: return "reduction"
        case .transfer: return "transfer"
        }
    }
}

/// Timestamps in the order the ops run, for `OpProfiler`. `mark()` stamps "now" in the op stream: on the
/// CPU the host clock at the call (ops run at the call); on a GPU an event recorded on the stream, whose
/// time is known once the stream has reached it. `seconds(from:to:)` is asked only after `drain()`.
public protocol ProfileClock: AnyObject {
    /// Stamps the current point of the op stream; returns its index for `seconds`.
    func mark() -> Int
    /// Waits until every op enqueued so far has run (a GPU's stream synchronize; nothing on the CPU).
    func drain()
    /// Seconds between two marks of the current step.
    func seconds(from start: Int, to end: Int) -> Double
    /// Forgets the marks (the next step starts at index 0); a pool of events is kept for reuse.
    func reset()
}

/// The host's monotonic clock: the CPU backend's ops run at the call, so the time between two calls is
/// the op's.
public final class HostProfileClock: ProfileClock {
    private var stamps: [UInt64] = []
    public init() {}
    public func mark() -> Int {
        stamps.append(DispatchTime.now().uptimeNanoseconds)
        return stamps.count - 1
    }
    public func drain() {}
    public func seconds(from start: Int, to end: Int) -> Double { Double(stamps[end] - stamps[start]) / 1e9 }
    public func reset() { stamps.removeAll(keepingCapacity: true) }
}

/// A backend that can time its ops for the per-op profile (the CPU backend with the host clock, the CUDA
/// backend with timing events). While `profiler` is nil an op pays one nil check: no clock is read, no
/// event recorded.
public protocol OpProfiling: Backend {
    /// The profiler every op reports to, nil when not profiling. Set between steps only.
    var profiler: OpProfiler? { get set }
    /// A clock that stamps this backend's op stream.
    func makeProfileClock() -> ProfileClock
}

extension Backend {
    /// The profiler the ops report to; nil (the default) for backends that cannot profile and whenever
    /// profiling is off.
    public var profiler: OpProfiler? { nil }
}

/// The per-op profile of training steps: the backend reports each op (`begin`, then `Span.end`), the
/// trainer brackets each profiled step (`beginStep`, `endStep`), and `result` gives per category the number
/// of ops, the measured time, the FLOPs and bytes of `OpCost` and, given a device's peaks, the roofline
/// prediction, all per step, beside the measured step time.
///
/// Only the outermost op is timed: an op that calls other ops (the data-parallel sums, whose host path
/// downloads and uploads the gradients) is one entry of its own category. Ops outside a step (restarts,
/// evaluations, checkpoints) are ignored.
/// On a GPU each op is two timing events around its launches on the stream, resolved after the step's
/// final synchronize (`endStep`), so the event records add a few microseconds of host time per op but no
/// synchronization inside the step. The step's time is the clock's too, from a mark on the drained stream at
/// `beginStep` to one on the drained stream at `endStep` (the wall time of the step: the stream is idle at
/// both); every op's interval lies between them and the ops of one stream do not overlap, so the categories
/// sum to at most the step, and the rest ("other": host work, launch gaps, an idle device) is reported.
///
/// One thread's ops: the trainer's (a data-parallel rank has its own backend and profiler).
public final class OpProfiler: @unchecked Sendable {
    public let clock: ProfileClock
    /// The device's peaks for the predictions, nil for none (the emulation, an unknown GPU).
    public let peaks: DevicePeaks?
    /// What the profile ran on, for the table's heading.
    public let deviceName: String

    private let lock = NSLock()
    private var gemmCategory = OpCategory.gemmOther
    private var depth = 0
    private var inStep = false
    private var stepStart = 0  // the clock's mark of the step's start
    private var pending: [(category: OpCategory, start: Int, end: Int)] = []
    private var totals = [StepProfile.Row](repeating: StepProfile.Row(), count: OpCategory.allCases.count)
    private var steps = 0
    private var stepSeconds = 0.0

    public init(clock: ProfileClock, peaks: DevicePeaks?, deviceName: String) {
        self.clock = clock
        self.peaks = peaks
        self.deviceName = deviceName
    }

    /// An op in flight; `end()` when its last launch was enqueued (a nested op's span records nothing).
    public struct Span {
        let profiler: OpProfiler
        let category: OpCategory
        let start: Int  // -1: nested in another op, or outside a step
        let cost: OpCost
        public func end() { profiler.end(self) }
    }

    /// Starts timing an op of `category` costing `cost`. Call it as `profiler?.begin(...)`: with no profiler
    /// the cost is never computed.
    public func begin(_ category: OpCategory, _ cost: OpCost) -> Span {
        lock.lock(); defer { lock.unlock() }
        depth += 1
        guard inStep, depth == 1 else { return Span(profiler: self, category: category, start: -1, cost: cost) }
        return Span(profiler: self, category: category, start: clock.mark(), cost: cost)
    }

    /// `begin` for a matrix product, filed under the role its caller set (`attributeGEMMs`).
    public func beginGEMM(_ cost: OpCost) -> Span {
        begin(lock.withLock { gemmCategory }, cost)
    }

    private func end(_ span: Span) {
        lock.lock(); defer { lock.unlock() }
        depth -= 1
        guard span.start >= 0 else { return }
        pending.append((span.category, span.start, clock.mark()))
        let i = span.category.rawValue
        totals[i].count += 1
        totals[i].flops += span.cost.flops
        totals[i].bytes += span.cost.bytes
        if let peaks { totals[i].predictedSeconds += peaks.seconds(for: span.cost) }
    }

    /// The GEMMs issued until `end()` are filed under `category` (the previous role comes back after).
    public struct GEMMRole {
        let profiler: OpProfiler
        let previous: OpCategory
        public func end() { profiler.lock.withLock { profiler.gemmCategory = previous } }
    }

    /// Files the GEMMs that follow under `category` until the returned role's `end()`. Call it as
    /// `backend.profiler?.attributeGEMMs(to: ...)`.
    public func attributeGEMMs(to category: OpCategory) -> GEMMRole {
        lock.lock(); defer { lock.unlock() }
        let previous = gemmCategory
        gemmCategory = category
        return GEMMRole(profiler: self, previous: previous)
    }

    /// Opens a profiled step: waits for the stream to drain (so the step's time is its own) and marks its start.
    public func beginStep() {
        clock.drain()
        lock.lock(); defer { lock.unlock() }
        precondition(!inStep, "OpProfiler.beginStep inside a step")
        clock.reset()
        pending.removeAll(keepingCapacity: true)
        inStep = true
        stepStart = clock.mark()
    }

    /// Closes the step: drains the stream, marks the step's end (on an idle stream: now), reads the step's time
    /// and every op's, and adds them to the totals.
    public func endStep() {
        clock.drain()
        lock.lock(); defer { lock.unlock() }
        precondition(inStep, "OpProfiler.endStep without beginStep")
        stepSeconds += clock.seconds(from: stepStart, to: clock.mark())
        for op in pending { totals[op.category.rawValue].seconds += clock.seconds(from: op.start, to: op.end) }
        pending.removeAll(keepingCapacity: true)
        inStep = false
        steps += 1
    }

    /// The totals of the steps profiled so far, per step.
    public var result: StepProfile {
        lock.lock(); defer { lock.unlock() }
        let n = Double(max(steps, 1))
        let rows = OpCategory.allCases.compactMap { c -> StepProfile.Row? in
            var row = totals[c.rawValue]
            guard row.count > 0 else { return nil }
            row.category = c
            row.count /= n; row.seconds /= n; row.flops /= n; row.bytes /= n; row.predictedSeconds /= n
            return row
        }
        return StepProfile(steps: steps, stepSeconds: stepSeconds / n, rows: rows, deviceName: deviceName, peaks: peaks)
    }
}

/// Per-op profile of training steps (`OpProfiler.result`): every figure is per step, averaged over `steps`.
public struct StepProfile: Sendable {
    public struct Row: Sendable {
        public var category = OpCategory.gemmOther
        /// Ops of the category a step ran (a whole number when every profiled step ran the same ops).
        public var count = 0.0
        public var seconds = 0.0
        public var flops = 0.0
        public var bytes = 0.0
        /// The roofline time of the category's ops (`DevicePeaks.seconds(for:)`, summed op by op); 0 without peaks.
        public var predictedSeconds = 0.0
    }

    public var steps: Int
    /// The host's wall time of a step, from the drained stream to the drained stream.
    public var stepSeconds: Double
    /// The categories the steps ran, in `OpCategory` order.
    public var rows: [Row]
    public var deviceName: String
    public var peaks: DevicePeaks?

    public func row(_ category: OpCategory) -> Row? { rows.first { $0.category == category } }
    /// The time of the step no op accounts for: host work between ops, launch gaps, an idle device.
    public var otherSeconds: Double { stepSeconds - rows.reduce(0) { $0 + $1.seconds } }
    public var predictedSeconds: Double { rows.reduce(0) { $0 + $1.predictedSeconds } }

    /// The table: per category the ops a step ran, the measured ms a step and its share of the step, the
    /// roofline's ms from the peaks and measured / predicted, and the achieved TFLOP/s and GB/s; then "other"
    /// and the step.
    public func formatted() -> String {
        let heading = "per-op profile: \(steps) step\(steps == 1 ? "" : "s") on \(deviceName), "
            + (peaks.map { p in
                "predictions from the peaks of \(p.name) (\(Self.figure(p.bf16TensorFLOPs / 1e12)) TFLOP/s bf16 matrix, "
                    + "\(Self.figure(p.f32FLOPs / 1e12)) TFLOP/s f32, \(Self.figure(p.memoryBandwidth / 1e9)) GB/s memory, "
                    + "\(Self.figure(p.hostLinkBandwidth / 1e9)) GB/s host link)"
            } ?? "no peaks for this device: no predictions")
        var lines = [heading]
        lines.append(Self.pad("category", 24) + Self.pad("ops/step", 10, right: true) + Self.pad("ms/step", 11, right: true)
                     + Self.pad("of step", 9, right: true) + Self.pad("predicted", 11, right: true)
                     + Self.pad("meas/pred", 11, right: true) + Self.pad("TFLOP/s", 10, right: true) + Self.pad("GB/s", 9, right: true))
        func ms(_ s: Double) -> String { String(format: "%.3f", s * 1e3) }
        func share(_ s: Double) -> String { stepSeconds > 0 ? String(format: "%.1f%%", 100 * s / stepSeconds) : "-" }
        for r in rows {
            let count = r.count == r.count.rounded() ? String(Int(r.count)) : String(format: "%.1f", r.count)
            let predicted = peaks == nil ? "-" : ms(r.predictedSeconds)
            let ratio = peaks != nil && r.predictedSeconds > 0 ? String(format: "%.2fx", r.seconds / r.predictedSeconds) : "-"
            let tflops = r.seconds > 0 && r.flops > 0 ? Self.figure(r.flops / r.seconds / 1e12) : "-"
            let gbs = r.seconds > 0 && r.bytes > 0 ? Self.figure(r.bytes / r.seconds / 1e9) : "-"
            lines.append(Self.pad(r.category.label, 24) + Self.pad(count, 10, right: true) + Self.pad(ms(r.seconds), 11, right: true)
                         + Self.pad(share(r.seconds), 9, right: true) + Self.pad(predicted, 11, right: true)
                         + Self.pad(ratio, 11, right: true) + Self.pad(tflops, 10, right: true) + Self.pad(gbs, 9, right: true))
        }
        lines.append(Self.pad("other (host, gaps)", 24) + Self.pad("", 10) + Self.pad(ms(otherSeconds), 11, right: true)
                     + Self.pad(share(otherSeconds), 9, right: true))
        let stepPredicted = peaks == nil ? "-" : ms(predictedSeconds)
        let stepRatio = peaks != nil && predictedSeconds > 0 ? String(format: "%.2fx", stepSeconds / predictedSeconds) : "-"
        lines.append(Self.pad("step", 24) + Self.pad(String(format: "%.0f", rows.reduce(0) { $0 + $1.count }), 10, right: true)
                     + Self.pad(ms(stepSeconds), 11, right: true) + Self.pad("100.0%", 9, right: true)
                     + Self.pad(stepPredicted, 11, right: true) + Self.pad(stepRatio, 11, right: true))
        return lines.joined(separator: "\n")
    }

    /// The figures as JSON-ready values (seconds, FLOPs and bytes per step), for `relora-bench gpu --json`.
    public var dictionary: [String: Any] {
        var categories: [String: Any] = [:]
        for r in rows {
            var entry: [String: Any] = ["ops_per_step": r.count, "seconds": r.seconds, "flops": r.flops, "bytes": r.bytes]
            if peaks != nil { entry["predicted_seconds"] = r.predictedSeconds }
            categories[r.category.key] = entry
        }
        var out: [String: Any] = ["steps": steps, "step_seconds": stepSeconds, "other_seconds": otherSeconds,
                                  "device": deviceName, "categories": categories]
        if let peaks {
            out["predicted_seconds"] = predictedSeconds
            out["peaks"] = ["name": peaks.name, "bf16_tensor_flops": peaks.bf16TensorFLOPs, "f32_flops": peaks.f32FLOPs,
                            "memory_bandwidth": peaks.memoryBandwidth, "host_link_bandwidth": peaks.hostLinkBandwidth]
        }
        return out
    }

    /// A rate with three significant digits and no exponent: 612, 45.2, 1.53, 0.0321.
    static func figure(_ x: Double) -> String {
        x >= 100 ? String(format: "%.0f", x) : x >= 10 ? String(format: "%.1f", x) : x >= 1 ? String(format: "%.2f", x)
            : String(format: "%.3g", x)
    }

    private static func pad(_ s: String, _ width: Int, right: Bool = false) -> String {
        guard s.count < width else { return right ? " " + s : s + " " }
        let fill = String(repeating: " ", count: width - s.count)
        return right ? fill + s : s + fill
    }
}
