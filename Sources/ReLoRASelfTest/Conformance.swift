import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain

/// The op families of the conformance suite (one XCTest each; `relora selftest` runs them all).
public enum ConformanceGroup: String, CaseIterable, Sendable, Codable {
    /// makeTensor (zeroed, every dtype) and the memory ledger.
    case memory
    /// upload (f32, i32, raw f32/bf16/f16), download, copy with dtype conversion, zero, fill, transfer counts.
    case transfers
    /// fillUniform, fillNormal.
    case random
    /// matmul (four transpose combinations, alpha, beta, alphaScale) and the linear layer's backward.
    case matmul
    case rmsnorm, rope, attention, swiglu, embedding
    case crossEntropy = "cross_entropy"
    case dropout
    /// dotAccumulate, sumOfSquares (into a slot, and over a list of tensors).
    case reductions
    /// axpy, scale.
    case elementwise
    /// adamw, adamw8bit, the 8-bit moments' quantizer, and the multi-tensor step (`gradientNorm(_:clip:)`,
    /// `adamwStep`, `zeroGradients`) against the per-tensor ops.
    case adamw
    /// prune (magnitude, random, all) and pruneMoments (one mask for Adam's m and v).
    case prune
    /// quantize (round to nearest, stochastic: bytes, reproducibility, unbiasedness), dequantize and
    /// countChangedCodes, per quantized format.
    case quantization
    /// Training steps of a tiny model on a device backend against the CPU (`TrainingConformance`; run by
    /// `relora selftest` for a device other than the CPU, not by `Conformance.run`).
    case training
    /// The collectives of the process's communicator on every rank against sequential references
    /// (`CollectiveConformance`; run by `relora selftest`, under `mpirun` for the MPI engine, not by
    /// `Conformance.run`). Last, so that the other groups' input streams keep their numbers.
    case collectives
}

/// One conformance check: an op on one shape and dtype, its worst error against the suite's reference
/// and the bound that error must stay within.
public struct ConformanceCheck: Sendable, Codable, Equatable {
    public var group: ConformanceGroup
    /// What was checked, e.g. `attentionBackward dq` or `attentionBackward dq (finite differences)`.
    public var op: String
    /// Sizes and arguments, e.g. `2x7 heads 3/1 dim 6`.
    public var shape: String
    /// The dtype of the op's tensors, or of a conversion (`bf16->f16`).
    public var dtype: String
    /// The error of the element closest to its bound (or furthest past it, when the check fails) and that
    /// element's bound; `passed` means every element is within its own bound. Exact checks have bound 0;
    /// counts (transfers, pruned entries, ledger bytes) are compared as numbers.
    public var maxError: Double
    public var bound: Double
    public var passed: Bool
    /// Which element failed and how, or why the check could not run; empty when it passed.
    public var note: String

    public init(group: ConformanceGroup, op: String, shape: String, dtype: String, maxError: Double, bound: Double,
                passed: Bool, note: String = "") {
        self.group = group; self.op = op; self.shape = shape; self.dtype = dtype
        self.maxError = maxError; self.bound = bound; self.passed = passed; self.note = note
    }
}

/// The backend conformance suite: every op of `Backend` against naive Double references written in the
/// suite (plain loops), and every backward against finite differences of its forward, through the
/// backend's own upload/download (no host access to tensor memory), so the same suite checks the CPU
/// reference and a GPU backend. Each bound is derived for its op and dtype in a comment where it is set
/// (`ConformanceSuite.tolerance` gives the shared model); a wrong op is off by O(|value|), orders of
/// magnitude past them.
public enum Conformance {
    /// Runs `groups` on `backend`. Ops that compute are checked in each of `computeDTypes` (all float
    /// tensors of the op in that dtype; the CPU backend computes f32 only, a backend that also computes
    /// bf16 declares `[.f32, .bf16]`); transfers and copies cover f32/bf16/f16 regardless, AdamW runs in
    /// f32 (its contract), and finite differences run in f32 (they need its resolution).
    /// `progress` sees each check as it is recorded.
    public static func run(on backend: Backend, computeDTypes: [DType] = [.f32],
                           groups: [ConformanceGroup] = ConformanceGroup.allCases,
                           progress: ((ConformanceCheck) -> Void)? = nil) -> [ConformanceCheck] {
        let suite = ConformanceSuite(backend: backend, computeDTypes: computeDTypes, progress: progress)
        guard backend.computes else {
            suite.fail(.memory, "backend", "-", "-", note: "\(backend.name) does not compute (a planning backend)")
            return suite.checks
        }
        if let bad = computeDTypes.first(where: { !$0.isFloatingPoint }) {
            suite.fail(.memory, "computeDTypes", "-", bad.rawValue, note: "\(bad.rawValue) is not a float dtype")
            return suite.checks
        }
        for group in groups { suite.run(group) }
        return suite.checks
    }

    /// "N passed, M failed".
    public static func summary(_ checks: [ConformanceCheck]) -> String {
        let failed = checks.filter { !$0.passed }.count
        return "\(checks.count - failed) passed, \(failed) failed"
    }

    /// One line per check: op, shape, dtype, max error, bound, pass/FAIL (with the note of a failure).
    public static func table(_ checks: [ConformanceCheck]) -> String {
        let header = ["op", "shape", "dtype", "max error", "bound", "result"]
        let rows = checks.map { c in
            [c.op, c.shape, c.dtype, format(c.maxError), format(c.bound),
             c.passed ? "pass" : "FAIL" + (c.note.isEmpty ? "" : ": " + c.note)]
        }
        var widths = header.map(\.count)
        for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, cell in
                if i == cells.count - 1 { return cell }
                // Numbers right-aligned, text left-aligned.
                let pad = String(repeating: " ", count: widths[i] - cell.count)
                return (i == 3 || i == 4) ? pad + cell : cell + pad
            }.joined(separator: "  ")
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }

    /// `{"backend": ..., "passed": N, "failed": M, "checks": [...]}`; non-finite numbers as "inf"/"nan".
    public static func json(_ checks: [ConformanceCheck], backend: String) -> String {
        struct Report: Encodable {
            let backend: String
            let passed: Int
            let failed: Int
            let checks: [ConformanceCheck]
        }
        let failed = checks.filter { !$0.passed }.count
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        let data = (try? encoder.encode(Report(backend: backend, passed: checks.count - failed, failed: failed, checks: checks))) ?? Data()
        return String(decoding: data, as: UTF8.self)
    }

    /// Integers (counts) as integers, the rest in 3 significant digits.
    static func format(_ x: Double) -> String {
        if x.isNaN { return "nan" }
        if x.isInfinite { return x > 0 ? "inf" : "-inf" }
        if x == 0 { return "0" }
        if x == x.rounded(), abs(x) >= 1, abs(x) < 1e7 { return String(Int(x)) }
        return String(format: "%.2e", x)
    }
}
