import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain

/// A run's `metrics.jsonl` (and the few `recipe.json` keys that give it a scale), read for plots and
/// listings. The file holds three kinds of lines, told apart by their keys: a training step (`loss`, `lr`,
/// ...), an evaluation (`val_loss`, ...) and a ReLoRA restart (`restart`, ...); each has `step`, the number
/// of steps done when it was written.
public struct RunMetrics: Sendable {
    public struct Step: Sendable, Equatable {
        public var step: Int
        /// nil for a skipped step (a non-finite loss is written as null).
        public var loss: Double?
        public var lr: Double?
        public var gradNorm: Double?
        public var tokensPerSecond: Double?
        public var mfu: Double?
    }

    public struct Eval: Sendable, Equatable {
        public var step: Int
        public var loss: Double
        public var perplexity: Double
        public var tokens: Int?
    }

    public struct Restart: Sendable, Equatable {
        public var step: Int
        /// 1 for the first restart.
        public var index: Int
        public var relativeUpdate: Double?
    }

    public var runDir: String
    public var label: String
    /// Tokens of one optimizer step (`seq_len x micro_batch x grad_accum`): step s has seen s x this many
    /// tokens (a warm-started run continues its source's step count, so runs line up on the token axis).
    public var tokensPerStep: Int
    /// The recipe's `steps` (the run's planned length).
    public var totalSteps: Int
    /// `full`, `lora` or `relora`.
    public var mode: String
    /// The recipe's `quant` key if present (quantized frozen weights), else "dense".
    public var quantization: String
    public var steps: [Step] = []
    public var evals: [Eval] = []
    public var restarts: [Restart] = []
    /// Lines that were not JSON objects with a numeric `step` (e.g. a line cut short by a crash); skipped.
    public var malformedLines = 0

    public func tokens(atStep step: Int) -> Double { Double(step) * Double(tokensPerStep) }

    /// The last step written (0 if none).
    public var stepsDone: Int { max(steps.last?.step ?? 0, evals.last?.step ?? 0) }

    /// Reads `runDir/metrics.jsonl` and `runDir/recipe.json`. A missing or unreadable recipe or metrics file,
    /// or one with no valid line, is an error naming the file; malformed lines are skipped and counted.
    /// A step written twice (possible only if a file was edited or concatenated) keeps its last line.
    public static func load(runDir: String, label: String? = nil) throws -> RunMetrics {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: runDir, isDirectory: &isDir), isDir.boolValue else {
            throw ReLoRAError.invalidFile(path: runDir, reason: "no such run directory")
        }
        let recipePath = runDir + "/recipe.json"
        guard let recipeData = FileManager.default.contents(atPath: recipePath) else {
            throw ReLoRAError.invalidFile(path: recipePath, reason: "cannot read the run's recipe; give a run directory (it holds recipe.json and metrics.jsonl)")
        }
        // Read keys loosely (not through `Recipe`): a listing or a plot should not fail on a key a newer
        // relora added, and defaults are `Recipe`'s.
        let keys: JSONKeys
        do { keys = try JSONKeys(data: recipeData, what: "the recipe") } catch ReLoRAError.invalidConfig(let m) {
            throw ReLoRAError.invalidFile(path: recipePath, reason: m)
        }
        let defaults = Recipe(model: "", trainData: "", runDir: "")
        func int(_ key: String, _ def: Int) -> Int { ((try? keys.optionalInt(key)) ?? nil) ?? def }
        func string(_ key: String, _ def: String) -> String { ((try? keys.optionalString(key)) ?? nil) ?? def }
        var run = RunMetrics(
            runDir: runDir, label: label ?? URL(fileURLWithPath: runDir).lastPathComponent,
            tokensPerStep: int("seq_len", defaults.seqLen) * int("micro_batch", defaults.microBatch) * int("grad_accum", defaults.gradAccum),
            totalSteps: int("steps", defaults.steps), mode: string("mode", defaults.mode.rawValue),
            quantization: string("quant", "dense"))

        let metricsPath = runDir + "/metrics.jsonl"
        guard let data = FileManager.default.contents(atPath: metricsPath) else {
            throw ReLoRAError.invalidFile(path: metricsPath, reason: "cannot read the run's metrics; has the run started?")
        }
        var steps: [Int: Step] = [:], evals: [Int: Eval] = [:], restarts: [Int: Restart] = [:]
        for line in data.split(separator: UInt8(ascii: "\n")) {
            if line.allSatisfy({ $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\r") }) { continue }
            guard let object = try? JSONDecoder().decode([String: JSONValue].self, from: Data(line)),
                  case .number(let s)? = object["step"], s >= 0, s == s.rounded() else {
                run.malformedLines += 1
                continue
            }
            func number(_ key: String) -> Double? { if case .number(let v)? = object[key] { return v }; return nil }
            let step = Int(s)
            if let index = number("restart") {
                restarts[step] = Restart(step: step, index: Int(index), relativeUpdate: number("relative_update"))
            } else if let loss = number("val_loss") {
                evals[step] = Eval(step: step, loss: loss, perplexity: number("val_perplexity") ?? exp(loss),
                                   tokens: number("val_tokens").map { Int($0) })
            } else if object["loss"] != nil {
                steps[step] = Step(step: step, loss: number("loss"), lr: number("lr"), gradNorm: number("grad_norm"),
                                   tokensPerSecond: number("tokens_per_second"), mfu: number("mfu"))
            } else {
                run.malformedLines += 1
            }
        }
        guard !(steps.isEmpty && evals.isEmpty && restarts.isEmpty) else {
            throw ReLoRAError.invalidFile(path: metricsPath, reason: run.malformedLines == 0
                ? "holds no metrics yet (the run has not finished a step)"
                : "holds no valid metrics line (\(run.malformedLines) malformed)")
        }
        run.steps = steps.values.sorted { $0.step < $1.step }
        run.evals = evals.values.sorted { $0.step < $1.step }
        run.restarts = restarts.values.sorted { $0.step < $1.step }
        return run
    }
}
