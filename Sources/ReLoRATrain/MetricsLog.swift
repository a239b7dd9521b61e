import Foundation
import ReLoRACore
import ReLoRAModel

/// One line of training progress (also a line of `metrics.jsonl`).
public struct StepMetrics: Sendable, Encodable {
    public var step: Int
    public var loss: Double
    public var lr: Double
    public var gradNorm: Double
    public var tokensPerSecond: Double
    public var milliseconds: Double
    public var memoryBytes: Int
    public var skipped: Bool
    /// Model FLOPs utilisation of the step (`ModelFLOPs` over `PeakFLOPs`); nil where the backend's peak is unknown.
    public var mfu: Double? = nil
    /// Data parallel: the step's time in collectives (gathering the losses, summing the gradients: host
    /// copies, waiting for the slowest rank and the transfers); nil in one process.
    public var communicationMilliseconds: Double? = nil

    enum CodingKeys: String, CodingKey {
        case step, loss, lr, skipped, mfu, communicationMilliseconds = "comm_ms"
        case gradNorm = "grad_norm", tokensPerSecond = "tokens_per_second", milliseconds = "ms", memoryBytes = "memory_bytes"
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(step, forKey: .step)
        try c.encodeFinite(loss, forKey: .loss)
        try c.encodeFinite(lr, forKey: .lr)
        try c.encodeFinite(gradNorm, forKey: .gradNorm)
        try c.encodeFinite(tokensPerSecond, forKey: .tokensPerSecond)
        try c.encodeFinite(milliseconds, forKey: .milliseconds)
        try c.encode(memoryBytes, forKey: .memoryBytes)
        try c.encode(skipped, forKey: .skipped)
        if let mfu { try c.encodeFinite(mfu, forKey: .mfu) }
        if let communicationMilliseconds { try c.encodeFinite(communicationMilliseconds, forKey: .communicationMilliseconds) }
    }
}

/// The `metrics.jsonl` line of an evaluation.
struct EvalMetrics: Encodable {
    var step: Int
    var valLoss: Double
    var valPerplexity: Double
    var valTokens: Int

    enum CodingKeys: String, CodingKey {
        case step, valLoss = "val_loss", valPerplexity = "val_perplexity", valTokens = "val_tokens"
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(step, forKey: .step)
        try c.encodeFinite(valLoss, forKey: .valLoss)
        try c.encodeFinite(valPerplexity, forKey: .valPerplexity)
        try c.encode(valTokens, forKey: .valTokens)
    }
}

/// The `metrics.jsonl` line of a ReLoRA restart (keys documented in docs/recipes-and-relora.md).
struct RestartMetrics: Encodable {
    var step: Int
    var restart: Int
    var merge: MergeReport
    var zeroedM: Double
    var zeroedV: Double

    enum CodingKeys: String, CodingKey {
        case step, restart, mergePolicy = "merge_policy", mergeSeconds = "merge_seconds", relativeUpdate = "relative_update"
        case mergeError = "merge_error", codesChanged = "codes_changed", residualRecovered = "residual_recovered"
        case zeroedM = "zeroed_m", zeroedV = "zeroed_v"
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(step, forKey: .step)
        try c.encode(restart, forKey: .restart)
        try c.encode(merge.policy, forKey: .mergePolicy)
        try c.encodeFinite(merge.seconds, forKey: .mergeSeconds)
        try c.encodeFinite(merge.relativeUpdate, forKey: .relativeUpdate)
        try c.encodeFinite(merge.mergeError, forKey: .mergeError)
        if let changed = merge.codesChanged { try c.encodeFinite(changed, forKey: .codesChanged) }
        if let recovered = merge.residualRecovered { try c.encodeFinite(recovered, forKey: .residualRecovered) }
        try c.encodeFinite(zeroedM, forKey: .zeroedM)
        try c.encodeFinite(zeroedV, forKey: .zeroedV)
    }
}

extension KeyedEncodingContainer {
    /// JSON has no NaN or infinity: a non-finite number is written as null. Finite doubles are written in
    /// their shortest round-trip form, so a loss read back is bit-identical to the one computed.
    mutating func encodeFinite(_ x: Double, forKey key: Key) throws {
        if x.isFinite { try encode(x, forKey: key) } else { try encodeNil(forKey: key) }
    }
}

/// The files a run writes as it goes: `metrics.jsonl` (one JSON object per line: steps, evaluations,
/// restarts; keys sorted) and the TensorBoard event file beside it, which gets every line's numbers.
final class MetricsLog {
    let path: String
    let tensorBoard: TensorBoardWriter
    private let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return e
    }()

    /// Opens the run's log. A new run (`resumeStep == nil`) starts both files empty; a resumed run drops
    /// the metrics lines after `resumeStep` (steps that will be redone) and starts a new event file whose
    /// first record discards the old file's steps after it.
    init(runDir: String, resumeStep: Int?) throws {
        path = runDir + "/metrics.jsonl"
        if let step = resumeStep {
            try Self.truncate(path, after: step)
        } else {
            try? FileManager.default.removeItem(atPath: path)
            TensorBoardWriter.removeEventFiles(runDir: runDir)
        }
        tensorBoard = try TensorBoardWriter(runDir: runDir, resumeStep: resumeStep.map { $0 + 1 })
    }

    func append<Record: Encodable>(_ record: Record) throws {
        try append(line: String(decoding: try encoder.encode(record), as: UTF8.self))
    }

    func append(line: String) throws {
        let data = Data((line + "\n").utf8)
        if let handle = FileHandle(forWritingAtPath: path) {
            defer { try? handle.close() }
            try handle.seekToEnd()
            try handle.write(contentsOf: data)
        } else {
            guard FileManager.default.createFile(atPath: path, contents: data) else {
                throw ReLoRAError.invalidFile(path: path, reason: "cannot write the metrics file")
            }
        }
        try tensorBoard.write(metricsLine: line)
    }

    /// Keeps the lines of steps up to `step` (atomically: a crash leaves the old file or the new one).
    static func truncate(_ path: String, after step: Int) throws {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return }
        let kept = text.split(separator: "\n").filter { line in
            guard let d = try? JSONDecoder().decode([String: JSONValue].self, from: Data(line.utf8)),
                  case .number(let s)? = d["step"] else { return false }
            return Int(s) <= step
        }
        try writeFileAtomically(Data((kept.joined(separator: "\n") + (kept.isEmpty ? "" : "\n")).utf8), to: path)
    }
}
