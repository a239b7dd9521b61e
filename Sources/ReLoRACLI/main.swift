import CReLoRA
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

/// relora: ReLoRA pretraining. The CLI is thin: it parses arguments, calls the library and prints.

// Before anything else: restart on OpenBLAS's best kernels if it fell back to weak ones (see
// relora_blas_core.h); returns here when OpenBLAS's choice is already right or the user set one.
relora_blas_ensure_best_core(CommandLine.unsafeArgv)

let usage = """
    relora: pretrain LLaMA-style models with ReLoRA (high-rank training through low-rank updates).

    Usage: relora <command> [options]

    Commands:
      train     Train a model from a recipe (or --resume a run)
      export    Export a checkpoint as a Hugging Face model directory or a GGUF file
      eval      Mean next-token loss and perplexity of a model on a token file
      analyze   Singular-value spectra of learned updates (update rank), JSON + SVG
      plot      Loss curves of runs (train, validation, restarts, learning rate) as SVG
      runs      List the runs under a directory: mode, steps, tokens, losses
      control   Model config of the control baseline for a lora/relora recipe
      sample    Generate text from a model
      tokenizer train   Train a byte-level BPE tokenizer (tokenizer.json)
      tokenize  Encode text / JSONL files into a .npy token file
      memory    Plan a run's memory by tag (cpu or cuda) without allocating it
      info      Print a model config's sizes and parameter count, and the BLAS kernels in use
      selftest  Check every backend op against reference implementations (--device cpu|cuda)

    Run `relora <command> --help` for a command's options.
    """

let evalUsage = """
    Usage: relora eval --model DIR|FILE.gguf --data TOKENS.npy --seq-len N [--batch B] [--json] [--device cpu|cuda]

    Splits the 1-D token array into consecutive windows of exactly N tokens (the remainder is dropped)
    and reports the mean next-token cross-entropy over every predicted position of every window, its
    perplexity and the number of predicted tokens. Equals Hugging Face's
    LlamaForCausalLM(input_ids=window, labels=window).loss averaged over windows.

      --model PATH      Hugging Face model directory (config.json + model.safetensors or a sharded index), or a
                        LLaMA GGUF file (f32, f16, bf16, q8_0, q4_0 tensors; dequantized to f32)
      --data FILE       .npy file: 1-D little-endian uint16, uint32, int32 or int64 token ids
      --seq-len N       window length in tokens (at most the model's max_position_embeddings)
      --batch B         windows per forward pass (default 8)
      --json            print {"loss": ..., "perplexity": ..., "tokens": ...} only
      --device D        cpu (default) or cuda
    """

let infoUsage = """
    Usage: relora info [CONFIG.json | MODEL_DIR] [--blas-core]

    Prints the architecture and parameter count of a Hugging Face LLaMA config, then a line naming the
    OpenBLAS kernels (its "core") this process runs and the best ones the CPU supports. Without a config
    only that line is printed. relora restarts itself with OPENBLAS_CORETYPE set when OpenBLAS picked
    kernels weaker than the CPU supports, unless OPENBLAS_CORETYPE is already set.

      --blas-core   print only the core name relora runs OpenBLAS with, for other programs, e.g.
                    OPENBLAS_CORETYPE=$(.build/debug/relora info --blas-core) swift test --skip-build
    """

/// "blas: OpenBLAS 0.3.21 core SkylakeX (cpu supports SkylakeX)".
func blasLine() -> String {
    var buf = [CChar](repeating: 0, count: 256)
    return "blas: " + buf.withUnsafeMutableBufferPointer { String(cString: relora_blas_describe($0.baseAddress, $0.count)) }
}

func standardError(_ s: String) {
    FileHandle.standardError.write((s + "\n").data(using: .utf8)!)
}

func runEval(_ args: [String]) throws {
    if args.contains("--help") || args.contains("-h") { print(evalUsage); return }
    let a = try Arguments(args, flagNames: ["json"])
    try a.checkKnown(["model", "data", "seq-len", "batch", "json", "device"])
    let json = a.flag("json")
    let seqLen = try a.int("seq-len")
    let batch = try a.int("batch", default: 8)
    let modelDir = try a.required("model"), dataPath = try a.required("data")
    let model = try loadModel(modelDir, try a.backend())
    let tokens = try TokenArray(npyPath: dataPath)
    let start = Date()
    let progress = json ? nil : ProgressReporter("eval", total: tokens.count / max(1, seqLen), unit: .count("windows"))
    let result = try Evaluator.evaluate(model: model, tokens: tokens, seqLen: seqLen, batch: batch) { done, _ in
        progress?.update(done)
    }
    progress?.finish()
    if json {
        let obj: [String: Any] = ["loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens]
        let data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    } else {
        print(String(format: "loss %.6f  perplexity %.4f  tokens %d  windows %d  (%.1f s)", result.loss,
                     result.perplexity, result.tokens, result.windows, Date().timeIntervalSince(start)))
    }
}

/// A Hugging Face directory or a GGUF file (told apart by the file's magic).
func loadModel(_ path: String, _ backend: Backend) throws -> LlamaModel {
    if LlamaGGUF.isGGUF(path) {
        return try LlamaGGUF.loadModel(try GGUFFile(path: path), backend: backend, warn: { standardError("warning: \($0)") })
    }
    return try HFCheckpoint.load(directory: path, backend: backend, warn: { standardError("warning: \($0)") })
}

func runInfo(_ args: [String]) throws {
    if args.contains("--help") { print(infoUsage); return }
    if args.contains("--blas-core") {
        guard let core = relora_blas_core_name() else { throw ReLoRAError.usage("this relora runs without OpenBLAS") }
        print(String(cString: core))
        return
    }
    guard var path = args.first else { print(blasLine()); return }
    var isDir: ObjCBool = false
    if FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue {
        path = URL(fileURLWithPath: path).appendingPathComponent("config.json").path
    }
    let c = try LlamaConfig(contentsOf: path)
    print("""
        hidden \(c.hiddenSize)  intermediate \(c.intermediateSize)  layers \(c.numHiddenLayers)  \
        heads \(c.numAttentionHeads) (kv \(c.numKeyValueHeads), head_dim \(c.headDim))  vocab \(c.vocabSize)
        parameters \(c.parameterCount) (\(String(format: "%.1f", Double(c.parameterCount) / 1e6))M)\
        \(c.tieWordEmbeddings ? ", tied embeddings" : "")
        """)
    print(blasLine())
}

let argv = Array(CommandLine.arguments.dropFirst())
guard let command = argv.first, command != "--help", command != "-h", command != "help" else {
    print(usage)
    exit(argv.isEmpty ? 1 : 0)
}
do {
    switch command {
    case "train": try runTrain(Array(argv.dropFirst()))
    case "export": try runExport(Array(argv.dropFirst()))
    case "eval": try runEval(Array(argv.dropFirst()))
    case "analyze": try runAnalyze(Array(argv.dropFirst()))
    case "plot": try runPlot(Array(argv.dropFirst()))
    case "runs": try runRuns(Array(argv.dropFirst()))
    case "control": try runControl(Array(argv.dropFirst()))
    case "sample": try runSample(Array(argv.dropFirst()))
    case "tokenizer": try runTokenizer(Array(argv.dropFirst()))
    case "tokenize": try runTokenize(Array(argv.dropFirst()))
    case "info": try runInfo(Array(argv.dropFirst()))
    case "memory": try runMemory(Array(argv.dropFirst()))
    case "selftest": try runSelfTest(Array(argv.dropFirst()))
    default: throw ReLoRAError.usage("unknown command '\(command)'; run `relora --help`")
    }
} catch let error as ReLoRAError {
    standardError("error: \(error)")
    exit(2)
} catch {
    standardError("error: \(error)")
    exit(1)
}
