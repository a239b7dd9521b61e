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

let analyzeCommand = CommandSpec(
    name: "relora analyze",
    summary: "singular-value spectra of learned updates (update rank), JSON + SVG",
    discussion: """
        Singular values of each run's learned update (final weights, with the current LoRA cycle merged,
        minus the reference weights) for every attention and MLP matrix of every layer, and how many fall
        below the threshold (the ReLoRA paper's update-rank count). The reference is --against if given,
        else the run's warm_start checkpoint, else its seeded initialisation (regenerated from the recipe).
        Writes DIR/spectra.json (all numbers) and DIR/spectra.svg (histograms and sorted spectra of --kind
        for the runs side by side, the paper's Figures 3/4).
        """,
    positionals: .oneOrMore("RUN_DIR"),
    options: [
        .value("against", "MODEL", help: "the reference weights for every run: any model source (run or checkpoint directory, Hugging Face directory, GGUF file)"),
        .value("threshold", "X", help: "count the singular values below X", default: "0.1"),
        .value("kind", "KIND", help: "the matrices the SVG draws", default: "q_proj", choices: UpdateSpectrum.kindOrder),
        .value("out", "DIR", help: "where to write spectra.json and spectra.svg (default: the first run's directory)"),
        .value("labels", "a,b,...", help: "one label per run (default: the run directories' names)"),
        deviceOption,
    ],
    examples: ["relora analyze runs/full runs/relora --against runs/warm --out runs/analysis"],
    helpWhenEmpty: true)

func runAnalyze(_ args: [String]) throws {
    guard let a = try analyzeCommand.parseOrPrintHelp(args) else { return }
    let backend = try a.backend()
    let runs = a.positional
    let threshold = try a.double("threshold", atLeast: 0)
    let kind = try a.required("kind")
    let labels = a.string("labels")?.split(separator: ",").map(String.init)
    if let labels, labels.count != runs.count { throw analyzeCommand.usageError("--labels needs one label per run (\(runs.count))") }
    let out = a.string("out") ?? runs[0]

    // A shared --against reference is loaded once, not once per run.
    let against = try a.string("against").map { path -> (weights: WeightMatrices, source: String) in
        let w = try checkpointWeights(path, backend: backend)
        return (w.weights, w.checkpoint)
    }
    var reports: [UpdateSpectrumReport] = []
    for (i, run) in runs.enumerated() {
        let (final, checkpoint, history) = try checkpointWeights(run, backend: backend)
        // Without --against the reference comes from the run's recipe: only a run has one.
        guard against != nil || history != nil else {
            throw ReLoRAError.invalidFile(path: run, reason: "is not a run (a run directory or one of its checkpoints), so it has no recipe to take the reference weights from; give --against MODEL")
        }
        let runDir = history ?? run
        let reference = try against ?? defaultReference(runDir: runDir, backend: backend)
        let label = labels?[i] ?? URL(fileURLWithPath: runDir).lastPathComponent
        standardError("analyze: \(label): \(checkpoint) against \(reference.source)")
        let progress = ProgressReporter("analyze \(label)", total: UpdateSpectrum.matrixCount(in: final), unit: .count("matrices"))
        var done = 0
        let report = try UpdateSpectrum.analyze(label: label, final: final, reference: reference.weights,
                                                threshold: threshold) { matrix in
            progress.update(done, detail: matrix)  // called before each SVD: `done` matrices are finished
            done += 1
        }
        progress.finish(done: done, detail: "done")
        for k in report.kinds() {
            printLine("\(label) \(k): \(report.totalBelow(kind: k)) of \(report.totalValues(kind: k)) singular values below \(threshold)")
        }
        reports.append(report)
    }
    try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    try writeFileAtomically(try encoder.encode(reports), to: out + "/spectra.json")
    let svg = SpectrumPlot.render(reports: reports, kind: kind, title: "Singular values of the learned update (\(kind))")
    try writeFileAtomically(Data(svg.utf8), to: out + "/spectra.svg")
    printLine("wrote \(out)/spectra.json and \(out)/spectra.svg")
}

typealias WeightMatrices = [String: ([Int], [Float])]

/// HF name -> (shape, values) of every weight of any model source (`ModelSource`; a checkpoint's LoRA cycle
/// merged), what it resolved to, and its run directory (nil for a source that is not a run's).
func checkpointWeights(_ path: String, backend: Backend) throws -> (weights: WeightMatrices, checkpoint: String, runDir: String?) {
    let source = try openModel(path)
    return (weightMatrices(try source.loadModel(backend: backend, warn: warning)), source.checkpoint ?? path, source.runDirectory)
}

func weightMatrices(_ model: LlamaModel) -> WeightMatrices {
    Dictionary(uniqueKeysWithValues: model.weights.named().map { ($0.0, ($0.1.shape, model.backend.download($0.1))) })
}

/// What a run's update is measured against when no --against is given: its warm-start checkpoint, or
/// its seeded initialisation (reproducible from the recipe).
func defaultReference(runDir: String, backend: Backend) throws -> (weights: WeightMatrices, source: String) {
    let recipe = try Recipe(contentsOf: runDir + "/recipe.json")
    if let warm = recipe.warmStart {
        let w = try checkpointWeights(warm, backend: backend)
        return (w.weights, w.checkpoint)
    }
    let config = try recipe.modelConfig()
    let model = LlamaModel(config: config, backend: backend)
    try model.weights.initializeRandom(seed: recipe.seed, std: Float(recipe.initStd), backend: model.backend)
    return (weightMatrices(model), "its initialisation (seed \(recipe.seed))")
}
