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

let plotUsage = """
    Usage: relora plot RUN_DIR [RUN_DIR ...] [--out FILE.svg] [--smooth N] [--labels a,b,...] [--title TEXT]

    Draws the loss curves of one or more runs from their metrics.jsonl (the ReLoRA paper's loss figure) as
    a self-contained SVG: training loss (smoothed) and validation loss (dots) against tokens seen, one
    colour per run, each ReLoRA restart as a dashed vertical line, and the learning rate in a second panel.
    Tokens seen = step x tokens per step (seq_len x micro_batch x grad_accum, from the run's recipe.json).
    Malformed lines in metrics.jsonl (e.g. one cut short by a crash) are skipped with a warning.

      --out FILE      the SVG to write (default: RUN_DIR/loss.svg of the first run)
      --smooth N      training loss as the mean of the last N logged steps (default: 1% of the longest
                      run's steps, at least 1; 1 = the raw per-step loss)
      --labels a,b    one legend label per run (default: the run directories' names)
      --title TEXT    the figure's title
    """

func runPlot(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(plotUsage); return }
    let a = try Arguments(args, flagNames: [])
    try a.checkKnown(["out", "smooth", "labels", "title"])
    let dirs = a.positional
    guard !dirs.isEmpty else { throw ReLoRAError.usage("give at least one run directory") }
    let labels = a.string("labels")?.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
    if let labels, labels.count != dirs.count { throw ReLoRAError.usage("--labels needs one label per run (\(dirs.count))") }
    var smooth: Int?
    if a.string("smooth") != nil {
        smooth = try a.int("smooth")
        guard smooth! >= 1 else { throw ReLoRAError.usage("--smooth must be at least 1 (1 = no smoothing)") }
    }
    let runs = try dirs.enumerated().map { i, dir -> RunMetrics in
        let run = try RunMetrics.load(runDir: dir, label: labels?[i])
        if run.malformedLines > 0 {
            standardError("warning: \(dir)/metrics.jsonl: skipped \(run.malformedLines) malformed line\(run.malformedLines == 1 ? "" : "s")")
        }
        return run
    }
    let window = smooth ?? LossPlot.defaultSmoothing(runs)
    let svg = LossPlot.render(runs: runs, smoothing: window, title: a.string("title") ?? "Training and validation loss")
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
