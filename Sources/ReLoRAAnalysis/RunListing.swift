import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain

/// `relora runs DIR`: one row per run found under a directory.
public struct RunRow: Sendable, Equatable, Encodable {
    /// The run directory, relative to the listed directory ("." for the directory itself).
    public var run: String
    public var mode: String
    public var quantization: String
    public var stepsDone: Int
    public var stepsTotal: Int
    public var tokensSeen: Int
    /// Training loss of the last step with a finite loss.
    public var finalTrainLoss: Double?
    public var finalValLoss: Double?
    public var finalValPerplexity: Double?
    public var bestValLoss: Double?
    public var bestValPerplexity: Double?
    /// The step of the best validation loss.
    public var bestValStep: Int?
    /// Why the row has no numbers (e.g. an empty metrics file), else nil.
    public var note: String?

    enum CodingKeys: String, CodingKey {
        case run, mode, quantization, note
        case stepsDone = "steps_done", stepsTotal = "steps_total", tokensSeen = "tokens_seen"
        case finalTrainLoss = "final_train_loss", finalValLoss = "final_val_loss", finalValPerplexity = "final_val_perplexity"
        case bestValLoss = "best_val_loss", bestValPerplexity = "best_val_perplexity", bestValStep = "best_val_step"
    }

    /// Encodes absent values as JSON null (a listing's columns are the same in every row).
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(run, forKey: .run); try c.encode(mode, forKey: .mode); try c.encode(quantization, forKey: .quantization)
        try c.encode(stepsDone, forKey: .stepsDone); try c.encode(stepsTotal, forKey: .stepsTotal); try c.encode(tokensSeen, forKey: .tokensSeen)
        try c.encode(finalTrainLoss, forKey: .finalTrainLoss); try c.encode(finalValLoss, forKey: .finalValLoss)
        try c.encode(finalValPerplexity, forKey: .finalValPerplexity); try c.encode(bestValLoss, forKey: .bestValLoss)
        try c.encode(bestValPerplexity, forKey: .bestValPerplexity); try c.encode(bestValStep, forKey: .bestValStep)
        try c.encode(note, forKey: .note)
    }
}

public enum RunListing {
    /// Run directories (holding both recipe.json and metrics.jsonl) at `directory` itself or one or two levels
    /// below it (`runs/arm` and `runs/experiment/arm`), sorted by path. Hidden directories and a run's own
    /// `checkpoints` are not searched.
    public static func find(under directory: String) -> [String] {
        let fm = FileManager.default
        func isRun(_ d: String) -> Bool {
            fm.fileExists(atPath: d + "/recipe.json") && fm.fileExists(atPath: d + "/metrics.jsonl")
        }
        func subdirectories(_ d: String) -> [String] {
            ((try? fm.contentsOfDirectory(atPath: d)) ?? []).filter { !$0.hasPrefix(".") && $0 != "checkpoints" }.sorted().compactMap { name in
                var isDir: ObjCBool = false
                let path = d + "/" + name
                return fm.fileExists(atPath: path, isDirectory: &isDir) && isDir.boolValue ? path : nil
            }
        }
        var found: [String] = []
        if isRun(directory) { found.append(directory) }
        for child in subdirectories(directory) {
            if isRun(child) { found.append(child); continue }
            found += subdirectories(child).filter(isRun)
        }
        return found
    }

    /// One row per run under `directory`. A run whose metrics cannot be read gets a row with a note.
    /// `warn` receives one line per run with malformed metrics lines.
    public static func rows(under directory: String, warn: (String) -> Void = { _ in }) throws -> [RunRow] {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDir), isDir.boolValue else {
            throw ReLoRAError.invalidFile(path: directory, reason: "is not a directory; give the directory that holds the runs")
        }
        let base = directory.hasSuffix("/") ? String(directory.dropLast()) : directory
        return find(under: base).map { dir in
            let name = dir == base ? "." : String(dir.dropFirst(base.count + 1))
            do {
                let metrics = try RunMetrics.load(runDir: dir, label: name)
                if metrics.malformedLines > 0 { warn("\(dir)/metrics.jsonl: skipped \(metrics.malformedLines) malformed line\(metrics.malformedLines == 1 ? "" : "s")") }
                return row(metrics)
            } catch {
                let reason: String
                if case ReLoRAError.invalidFile(_, let r) = error { reason = r } else { reason = "\(error)" }
                return RunRow(run: name, mode: "?", quantization: "?", stepsDone: 0, stepsTotal: 0, tokensSeen: 0, note: reason)
            }
        }
    }

    public static func row(_ m: RunMetrics) -> RunRow {
        let finite = m.evals.filter { $0.loss.isFinite }
        let best = finite.min { $0.loss < $1.loss }
        return RunRow(run: m.label, mode: m.mode, quantization: m.quantization, stepsDone: m.stepsDone, stepsTotal: m.totalSteps,
                      tokensSeen: m.stepsDone * m.tokensPerStep,
                      finalTrainLoss: m.steps.last { $0.loss?.isFinite == true }?.loss,
                      finalValLoss: m.evals.last?.loss, finalValPerplexity: m.evals.last?.perplexity,
                      bestValLoss: best?.loss, bestValPerplexity: best?.perplexity, bestValStep: best?.step)
    }

    /// Aligned columns: text left-aligned, numbers right-aligned; "-" for a missing value.
    public static func table(_ rows: [RunRow]) -> String {
        let header = ["run", "mode", "quant", "steps", "tokens", "train loss", "val loss", "val ppl", "best val", "best ppl", "best @"]
        let numeric = Set(3..<header.count)
        func num(_ v: Double?, _ format: String) -> String { v.map { String(format: format, $0) } ?? "-" }
        var cells = [header]
        for r in rows {
            cells.append([r.run, r.mode, r.quantization, "\(r.stepsDone)/\(r.stepsTotal)", formatCount(r.tokensSeen),
                          num(r.finalTrainLoss, "%.4f"), num(r.finalValLoss, "%.4f"), num(r.finalValPerplexity, "%.2f"),
                          num(r.bestValLoss, "%.4f"), num(r.bestValPerplexity, "%.2f"), r.bestValStep.map(String.init) ?? "-"])
        }
        let widths = header.indices.map { c in cells.map { $0[c].count }.max() ?? 0 }
        let lines = cells.map { row in
            row.enumerated().map { c, text in
                let pad = String(repeating: " ", count: widths[c] - text.count)
                return numeric.contains(c) ? pad + text : text + pad
            }.joined(separator: "  ")
        }
        // A run without numbers says why at the end of its line.
        let notes = [nil] + rows.map(\.note)
        return zip(lines, notes).map { line, note in note.map { line + "  (" + $0 + ")" } ?? line }.joined(separator: "\n")
    }
}
