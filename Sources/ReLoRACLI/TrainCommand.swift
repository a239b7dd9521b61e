import Foundation
import ReLoRA

let trainUsage = """
    Usage: relora train RECIPE.json [--set key=value ...] [--device cpu|cuda] [--budget SIZE]
           relora train --resume RUN_DIR [--set key=value ...]

    Trains a model as the recipe says (see Configs/recipes/ for examples and README for every key).
    Prints one line per step (step, loss, lr, grad norm, tokens/s, ms, memory, MFU, ETA); metrics also go
    to RUN_DIR/metrics.jsonl and to TensorBoard event files in RUN_DIR (`tensorboard --logdir`). Checkpoints are written atomically every checkpoint_every steps and at the end;
    Ctrl-C saves a checkpoint and stops with exit status 130 (press again to abort at once; SIGTERM: 143).
    --resume continues the latest checkpoint of RUN_DIR with bit-identical results to an uninterrupted run.

      --set key=value   override a recipe key (value parsed as JSON, else taken as a string), repeatable
      --resume RUN_DIR  continue a run from its latest checkpoint (uses RUN_DIR/recipe.json)
      --device D        cpu or cuda (same as --set device=D)
      --budget SIZE     refuse to start, before allocating, if the memory plan exceeds SIZE (e.g. 24GiB)
    """

/// The signal (SIGINT or SIGTERM) that asked the run to stop, 0 if none; the trainer checks it between steps.
nonisolated(unsafe) var stopRequested: sig_atomic_t = 0

func installStopHandler() {
    let handler: @convention(c) (Int32) -> Void = { sig in
        stopRequested = sig
        signal(sig, SIG_DFL)  // a second signal ends the process at once
    }
    signal(SIGINT, handler)
    signal(SIGTERM, handler)
}

func runTrain(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(trainUsage); return }
    var overrides: [String] = []
    var resumeDir: String?
    var recipePath: String?
    var budget: Int?
    var i = 0
    while i < args.count {
        switch args[i] {
        case "--set":
            guard i + 1 < args.count else { throw ReLoRAError.usage("--set needs key=value") }
            overrides.append(args[i + 1]); i += 2
        case "--budget":
            guard i + 1 < args.count else { throw ReLoRAError.usage("--budget needs a size, e.g. 24GiB") }
            budget = try MemoryPlanner.parseBytes(args[i + 1]); i += 2
        case "--device":
            guard i + 1 < args.count else { throw ReLoRAError.usage("--device needs cpu or cuda") }
            overrides.append("device=\(jsonQuoted(args[i + 1]))"); i += 2
        case "--resume":
            guard i + 1 < args.count else { throw ReLoRAError.usage("--resume needs a run directory") }
            resumeDir = args[i + 1]; i += 2
        case let a where a.hasPrefix("--"):
            throw ReLoRAError.usage("unknown option \(a); see `relora train --help`")
        default:
            guard recipePath == nil else { throw ReLoRAError.usage("give one recipe file, got '\(recipePath!)' and '\(args[i])'") }
            recipePath = args[i]; i += 1
        }
    }
    let recipe: Recipe
    switch (recipePath, resumeDir) {
    case (let path?, nil):
        recipe = try Recipe(contentsOf: path, overrides: overrides)
    case (nil, let dir?):
        recipe = try Recipe(contentsOf: dir + "/recipe.json", overrides: overrides + ["run_dir=\(jsonQuoted(dir))"])
    case (_?, _?):
        throw ReLoRAError.usage("give either a recipe or --resume RUN_DIR, not both")
    case (nil, nil):
        throw ReLoRAError.usage("missing the recipe file; see `relora train --help`")
    }
    if let budget { try checkBudget(recipe, budget: budget) }
    installStopHandler()
    let trainer = try Trainer(recipe: recipe, resume: resumeDir != nil, log: { printLine($0) })
    trainer.shouldStop = { stopRequested != 0 }
    let summary = try trainer.run()
    var line = summary.stoppedEarly
        ? String(format: "stopped at step %d of %d, last loss %.4f", summary.steps, recipe.steps, summary.lastLoss)
        : String(format: "done: %d steps, last loss %.4f", summary.steps, summary.lastLoss)
    if let v = summary.lastValLoss { line += String(format: ", val loss %.4f (ppl %.2f)", v, exp(v)) }
    if summary.skippedSteps > 0 { line += ", \(summary.skippedSteps) skipped" }
    if let c = summary.checkpoint { line += "; checkpoint \(c)" }
    print(line)
    let status = trainExitStatus(summary, signal: stopRequested)
    if status != 0 { exit(status) }  // exit() flushes stdout
}

/// 0 for a run that reached its last step; a run stopped by a signal exits as shells report a process
/// ended by it, 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), so scripts can tell it was cut short.
/// The checkpoint is saved either way.
func trainExitStatus(_ summary: TrainingSummary, signal: Int32) -> Int32 {
    guard summary.stoppedEarly else { return 0 }
    return 128 + (signal > 0 ? signal : SIGINT)
}

func jsonQuoted(_ s: String) -> String {
    let data = try! JSONSerialization.data(withJSONObject: [s])
    return String(String(decoding: data, as: UTF8.self).dropFirst().dropLast())
}

let exportUsage = """
    Usage: relora export CHECKPOINT|RUN_DIR --format hf --out DIR [--dtype float32|bfloat16] [--device cpu|cuda]

    Writes a Hugging Face directory (config.json, model.safetensors with LLaMA tensor names, and the run's
    tokenizer.json) that transformers' LlamaForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load.
    A RUN_DIR exports its latest checkpoint.
    """

func runExport(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(exportUsage); return }
    let a = try Arguments(args, flagNames: [])
    try a.checkKnown(["format", "out", "dtype", "device"])
    guard a.positional.count == 1 else { throw ReLoRAError.usage("give one checkpoint or run directory") }
    let format = a.string("format") ?? "hf"
    guard format == "hf" else { throw ReLoRAError.usage("--format \(format) is not supported; use hf") }
    let dtype = a.string("dtype") ?? "float32"
    guard dtype == "float32" || dtype == "bfloat16" else { throw ReLoRAError.usage("--dtype is float32 or bfloat16") }
    let out = try a.required("out")
    let (checkpoint, runDir) = try TrainingCheckpoint.resolve(a.positional[0])
    let model = try TrainingCheckpoint.loadModel(checkpoint, backend: try a.backend())
    let tokenizer = FileManager.default.contents(atPath: runDir + "/tokenizer.json")
    if tokenizer == nil { standardError("warning: \(runDir) has no tokenizer.json; the export will not include one") }
    let progress = ProgressReporter("export", total: model.weights.named().count, unit: .count("tensors"))
    try HFCheckpoint.save(model: model, to: out, bfloat16: dtype == "bfloat16", tokenizerJSON: tokenizer) { done, _ in
        progress.update(done)
    }
    progress.finish()
    print("exported \(checkpoint) -> \(out) (\(dtype))")
}
