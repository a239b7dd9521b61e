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

let trainUsage = """
    Usage: relora train RECIPE.json [--set key=value ...] [--device cpu|cuda] [--budget SIZE]
           relora train --resume RUN_DIR [--set key=value ...]

    Trains a model as the recipe says (see Configs/recipes/ for examples and README for every key).
    Prints one line per step (step, loss, lr, grad norm, tokens/s, ms, memory, MFU, ETA); metrics also go
    to RUN_DIR/metrics.jsonl and to TensorBoard event files in RUN_DIR (`tensorboard --logdir`). Checkpoints are written atomically every checkpoint_every steps and at the end;
    Ctrl-C saves a checkpoint and stops with exit status 130 (press again to abort at once; SIGTERM: 143).
    Running out of device memory or disk mid-run prints one line and exits with status 3 (checkpoints stay intact).
    --resume continues the latest checkpoint of RUN_DIR with bit-identical results to an uninterrupted run.

      --set key=value   override a recipe key (value parsed as JSON, else taken as a string), repeatable
      --resume RUN_DIR  continue a run from its latest checkpoint (uses RUN_DIR/recipe.json)
      --device D        cpu or cuda (same as --set device=D). On cuda the run is planned first and refused,
                        before allocating, if the plan exceeds the device's free memory; after the first step
                        it prints the allocator's and the device's measured peaks beside the plan.
                        Kernel library: RELORA_CUDA_LIB, libreloracuda.so next to relora, or Kernels/build/;
                        RELORA_DEVICE_MEMORY_LIMIT=24GiB caps device memory (a smaller card on a bigger one)
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
            budget = try parseBytes(args[i + 1]); i += 2
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
           relora export CHECKPOINT|RUN_DIR --format gguf --out FILE.gguf [--quant f32|f16|bf16|q8_0|q4_0] [--device cpu|cuda]

    Exports the trained model (a LoRA run's current cycle merged in; quantized frozen weights dequantized).
    A RUN_DIR exports its latest checkpoint.

      --format hf     a Hugging Face directory (config.json, model.safetensors with LLaMA tensor names, the run's
                      tokenizer.json) that transformers' LlamaForCausalLM / AutoTokenizer.from_pretrained load
      --format gguf   one GGUF v3 file for llama.cpp (and transformers' GGUF loader): LLaMA metadata, llama.cpp
                      tensor names with q/k rows permuted to llama.cpp's rotary convention, and the tokenizer.
                      --quant (default f32): f16/bf16 store 2-D tensors in 16 bits; q8_0 quantizes every 2-D
                      tensor; q4_0 the block linears (embedding and head in q8_0). Norms stay f32; rows that are
                      not whole 32-weight blocks stay f16. A run whose frozen weights are in the same format has
                      its codes copied, not requantized, where the current cycle's update is zero.
    """

func runExport(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(exportUsage); return }
    let a = try Arguments(args, flagNames: [])
    try a.checkKnown(["format", "out", "dtype", "device", "quant"])
    guard a.positional.count == 1 else { throw ReLoRAError.usage("give one checkpoint or run directory") }
    let format = a.string("format") ?? "hf"
    let out = try a.required("out")
    let (checkpoint, runDir) = try TrainingCheckpoint.resolve(a.positional[0])
    switch format {
    case "hf":
        guard a.string("quant") == nil else { throw ReLoRAError.usage("--quant is for --format gguf; use --dtype with hf") }
        try exportHF(checkpoint: checkpoint, runDir: runDir, out: out, a)
    case "gguf":
        guard a.string("dtype") == nil else { throw ReLoRAError.usage("--dtype is for --format hf; use --quant f32|f16|bf16|q8_0|q4_0 with gguf") }
        try exportGGUF(checkpoint: checkpoint, runDir: runDir, out: out, a)
    default:
        throw ReLoRAError.usage("--format \(format) is not supported; use hf or gguf")
    }
}

func exportHF(checkpoint: String, runDir: String, out: String, _ a: Arguments) throws {
    let dtype = a.string("dtype") ?? "float32"
    guard dtype == "float32" || dtype == "bfloat16" else { throw ReLoRAError.usage("--dtype is float32 or bfloat16") }
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

func exportGGUF(checkpoint: String, runDir: String, out: String, _ a: Arguments) throws {
    let quantName = a.string("quant") ?? "f32"
    guard let weights = GGUFWeightType(rawValue: quantName) else {
        throw ReLoRAError.usage("--quant \(quantName) is not supported; use f32, f16, bf16, q8_0 or q4_0")
    }
    let tokenizerPath = runDir + "/tokenizer.json"
    var tokenizer: BPETokenizer?
    if FileManager.default.fileExists(atPath: tokenizerPath) {
        tokenizer = try BPETokenizer(contentsOf: tokenizerPath)
    } else {
        standardError("warning: \(runDir) has no tokenizer.json; the GGUF will have no tokenizer, which llama.cpp needs to load it")
    }
    let config = try LlamaConfig(contentsOf: checkpoint + "/config.json")
    let tensors = 2 + 9 * config.numHiddenLayers + (config.tieWordEmbeddings ? 0 : 1)
    let progress = ProgressReporter("export", total: tensors, unit: .count("tensors"))
    let name = URL(fileURLWithPath: runDir).lastPathComponent
    let summary = try LlamaGGUF.export(checkpoint: checkpoint, tokenizer: tokenizer, weights: weights, to: out,
                                       backend: try a.backend(), name: name) { done, _ in
        progress.update(done)
    }
    progress.finish()
    print("exported \(checkpoint) -> \(out) (\(summary.description))")
}
