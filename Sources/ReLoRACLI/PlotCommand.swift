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
import ReLoRACommandLine

let plotCommand = CommandSpec(
    name: "relora plot",
    summary: "loss curves of runs (train, validation, restarts, learning rate) as SVG",
    discussion: """
        Draws the loss curves of one or more runs from their metrics.jsonl (the ReLoRA paper's loss figure) as
        a self-contained SVG: training loss (smoothed) and validation loss (dots) against tokens seen, one
        colour per run, each ReLoRA restart as a dashed vertical line, and the learning rate in a second panel.
        Tokens seen = step x tokens per step (seq_len x micro_batch x grad_accum, from the run's recipe.json).
        Malformed lines in metrics.jsonl (e.g. one cut short by a crash) are skipped with a warning.
        """,
    positionals: .oneOrMore("RUN_DIR"),
    options: [
        .value("out", "FILE.svg", help: "the SVG to write (default: RUN_DIR/loss.svg of the first run)"),
        .value("smooth", "N", help: """
            training loss as the mean of the last N logged steps (default: 1% of the longest run's steps, at \
            least 1; 1 = the raw per-step loss)
            """),
        .value("labels", "a,b,...", help: "one legend label per run (default: the run directories' names)"),
        .value("title", "TEXT", help: "the figure's title", default: "Training and validation loss"),
    ],
    examples: ["relora plot runs/full runs/relora --labels full-rank,ReLoRA --out loss.svg"],
    helpWhenEmpty: true)

func runPlot(_ args: [String]) throws {
    guard let a = try plotCommand.parseOrPrintHelp(args) else { return }
    let dirs = a.positional
    let labels = a.list("labels")
    if let labels, labels.count != dirs.count { throw plotCommand.usageError("--labels needs one label per run (\(dirs.count))") }
    let smooth = a.has("smooth") ? try a.int("smooth", atLeast: 1) : nil
    let runs = try dirs.enumerated().map { i, dir -> RunMetrics in
        let run = try RunMetrics.load(runDir: dir, label: labels?[i])
        if run.malformedLines > 0 {
            standardError("warning: \(dir)/metrics.jsonl: skipped \(run.malformedLines) malformed line\(run.malformedLines == 1 ? "" : "s")")
        }
        return run
    }
    let window = smooth ?? LossPlot.defaultSmoothing(runs)
    let svg = LossPlot.render(runs: runs, smoothing: window, title: try a.required("title"))
    let out = a.string("out") ?? dirs[0] + "/loss.svg"
    try writeFileAtomically(Data(svg.utf8), to: out)
    for run in runs {
        var line = "\(run.label): \(run.steps.count) steps (\(formatCount(run.tokensPerStep * run.stepsDone)) tokens)"
        if let last = run.evals.last { line += String(format: ", final val loss %.4f", last.loss) }
        if !run.restarts.isEmpty { line += ", \(run.restarts.count) restarts" }
        printLine(line)
    }
    printLine("wrote \(out) (training loss smoothed over \(window) step\(window == 1 ? "" : "s"))")
}
