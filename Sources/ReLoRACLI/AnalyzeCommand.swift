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

let analyzeUsage = """
    Usage: relora analyze RUN_DIR [RUN_DIR ...] [--against CHECKPOINT|RUN_DIR] [--threshold 0.1]
                          [--kind q_proj] [--out DIR] [--labels a,b,c]

    Singular values of each run's learned update (final weights, with the current LoRA cycle merged,
    minus the reference weights) for every attention and MLP matrix of every layer, and how many fall
    below the threshold (the ReLoRA paper's update-rank count). The reference is --against if given,
    else the run's warm_start checkpoint, else its seeded initialisation (regenerated from the recipe).
    Writes DIR/spectra.json (all numbers) and DIR/spectra.svg (histograms and sorted spectra of --kind
    for the runs side by side, the paper's Figures 3/4). Default --out: the first run's directory.
    """

func runAnalyze(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(analyzeUsage); return }
    let a = try Arguments(args, flagNames: [])
    try a.checkKnown(["against", "threshold", "kind", "out", "labels", "device"])
    let backend = try a.backend()
    let runs = a.positional
    guard !runs.isEmpty else { throw ReLoRAError.usage("give at least one run directory") }
    var threshold = 0.1
    if let t = a.string("threshold") {
        guard let v = Double(t), v >= 0 else { throw ReLoRAError.usage("--threshold must be a number >= 0") }
        threshold = v
    }
    let kind = a.string("kind") ?? "q_proj"
    guard UpdateSpectrum.kindOrder.contains(kind) else {
        throw ReLoRAError.usage("--kind must be one of \(UpdateSpectrum.kindOrder.joined(separator: ", "))")
    }
    let labels = a.string("labels")?.split(separator: ",").map(String.init)
    if let labels, labels.count != runs.count { throw ReLoRAError.usage("--labels needs one label per run (\(runs.count))") }
    let out = a.string("out") ?? runs[0]

    // A shared --against reference is loaded once, not once per run.
    let against = try a.string("against").map { path -> (weights: WeightMatrices, source: String) in
        let w = try checkpointWeights(path, backend: backend)
        return (w.weights, w.checkpoint)
    }
    var reports: [UpdateSpectrumReport] = []
    for (i, run) in runs.enumerated() {
        let (final, checkpoint, runDir) = try checkpointWeights(run, backend: backend)
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

/// HF name -> (shape, values) of every weight of a checkpoint (or a run's latest), LoRA cycle merged.
/// A Hugging Face model directory counts as its own checkpoint and run directory.
func checkpointWeights(_ path: String, backend: Backend) throws -> (weights: WeightMatrices, checkpoint: String, runDir: String) {
    if HFCheckpoint.isModelDirectory(path) {
        return (weightMatrices(try HFCheckpoint.load(directory: path, backend: backend)), path, path)
    }
    let (checkpoint, runDir) = try TrainingCheckpoint.resolve(path)
    return (weightMatrices(try TrainingCheckpoint.loadModel(checkpoint, backend: backend)), checkpoint, runDir)
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
    let config = try LlamaConfig(contentsOf: recipe.model)
    let model = LlamaModel(config: config, backend: backend)
    try model.weights.initializeRandom(seed: recipe.seed, std: Float(recipe.initStd), backend: model.backend)
    return (weightMatrices(model), "its initialisation (seed \(recipe.seed))")
}

let controlUsage = """
    Usage: relora control RECIPE.json --out CONFIG.json

    Writes the control baseline's model config for a lora/relora recipe: a full-rank model of the same
    depth and vocabulary, narrowed so that its parameter count matches the number of parameters the
    recipe's run trains (embeddings, head, norms and LoRA factors).
    """

func runControl(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(controlUsage); return }
    let a = try Arguments(args, flagNames: [])
    try a.checkKnown(["out"])
    guard a.positional.count == 1 else { throw ReLoRAError.usage("give one recipe") }
    let recipe = try Recipe(contentsOf: a.positional[0])
    guard recipe.mode != .full else { throw ReLoRAError.usage("the recipe trains full-rank; a control baseline is for lora/relora recipes") }
    let base = try LlamaConfig(contentsOf: recipe.model)
    let target = ControlBaseline.trainableCount(model: base, rank: recipe.loraRank, trainableScale: recipe.loraTrainableScale)
    let control = try ControlBaseline.config(matching: target, like: base)
    let out = try a.required("out")
    try writeFileAtomically(try JSONSerialization.data(withJSONObject: control.jsonObject(), options: [.prettyPrinted, .sortedKeys]), to: out)
    printLine("\(recipe.mode.rawValue) run trains \(target) parameters; control: hidden \(control.hiddenSize), intermediate \(control.intermediateSize), heads \(control.numAttentionHeads) -> \(control.parameterCount) parameters; wrote \(out)")
}
