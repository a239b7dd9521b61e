import COpenBLAS
import CReLoRA
import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain
import ReLoRACommandLine

// `relora-bench` without a subcommand: CPU throughput of the LLaMA forward+backward, reported as a
// fraction of the OpenBLAS sgemm rate measured in the same run (these machines are noisy; only same-run
// ratios mean much). Model FLOPs are `ModelFLOPs` (the trainer's MFU convention): in LoRA mode the FLOPs
// executed (frozen GEMMs forward and dX, no dW, plus the adapters), so the fraction of peak is comparable
// across modes.
let cpuBenchCommand = CommandSpec(
    name: "relora-bench",
    summary: "CPU throughput of the LLaMA forward+backward and training loop, against the same run's sgemm rate",
    discussion: """
        Times the forward and forward+backward of one batch of random tokens (median of --steps, after a
        warm-up step), the whole training loop (sampler, clipping, AdamW) on random tokens through the
        trainer, and OpenBLAS sgemm on a 2048^3 product and on the model's LM-head shape; prints the model's
        GFLOP/s as a fraction of the better sgemm rate, tokens/s and the memory by tag. --mode quant-linear
        instead times a frozen linear's forward and input gradient with W in q8_0, q4_0 and nf4 against a
        dense W (QuantLinearBench.swift). Exits 2 on an error (1 on an error in --mode quant-linear).
        """,
    options: [
        .value("config", "FILE", help: "the model config", default: "Configs/models/llama_20m.json"),
        .value("seq-len", "N", help: "tokens per sequence", default: "256"),
        .value("batch", "B", help: "sequences per step (--mode quant-linear: tokens = B x N)", default: "4"),
        .value("steps", "S", help: "timed steps (--mode quant-linear: repetitions)", default: "5"),
        .value("checkpointing", help: "activation checkpointing", default: "none",
               choices: GradientCheckpointing.allCases.map(\.rawValue)),
        .value("mode", help: "full-rank, LoRA (frozen W + rank-R adapters on the seven block linears), or the "
                   + "quantized linear alone", default: "full", choices: ["full", "lora", "quant-linear"]),
        .value("rank", "R", help: "the LoRA rank (--mode lora)", default: "128"),
        .value("alpha", "A", help: "the LoRA alpha (--mode lora)", default: "32"),
        .value("json", "OUT.json", help: "also write the figures to this JSON file"),
    ],
    examples: [
        "swift run -c release relora-bench --config Configs/models/llama_20m.json --seq-len 256 --batch 4 --steps 5",
        "relora-bench --mode lora --json /tmp/relora_lora.json",
    ],
    subcommands: [gpuBenchCommand, compressionBenchCommand, dataParallelBenchCommand, sampleBenchCommand])

struct CPUBenchOptions {
    var config: String
    var seqLen: Int
    var batch: Int
    var steps: Int
    var checkpointing: GradientCheckpointing
    var json: String?
    /// `full`, `lora` (frozen W + rank-`rank` adapters on the seven block linears) or `quant-linear`.
    var mode: String
    var rank: Int
    var alpha: Double

    init(_ a: ParsedArguments) throws {
        config = try a.required("config")
        seqLen = try a.int("seq-len", atLeast: 1)
        batch = try a.int("batch", atLeast: 1)
        steps = try a.int("steps", atLeast: 1)
        checkpointing = GradientCheckpointing(rawValue: try a.required("checkpointing"))!  // a declared choice
        json = a.string("json")
        mode = try a.required("mode")
        rank = try a.int("rank", atLeast: 1)
        alpha = try a.double("alpha", atLeast: 0, exclusive: true)
    }
}

func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

/// Best GFLOP/s of OpenBLAS sgemm over a few repetitions of an m x n x k product (the library's
/// `PeakFLOPs.sgemm`, which the trainer's MFU uses too).
func sgemmGFLOPs(m: Int, n: Int, k: Int, transB: Bool = false, reps: Int = 5) -> Double {
    PeakFLOPs.sgemm(m: m, n: n, k: k, transB: transB, reps: reps) / 1e9
}

func runCPUBench(_ args: [String]) throws {
    guard let a = try cpuBenchCommand.parseOrPrintHelp(args) else { return }
    let o = try CPUBenchOptions(a)
    if o.mode == "quant-linear" {
        do {
            try runQuantLinearBench(tokens: o.batch * o.seqLen, reps: o.steps, json: o.json)
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            exit(1)
        }
        return
    }
    let config = try LlamaConfig(contentsOf: o.config)
    let tokens = o.batch * o.seqLen
    let lora = o.mode == "lora" ? LoRAConfig(rank: o.rank, alpha: o.alpha) : nil
    // Model FLOPs of one training step (forward + backward, the PaLM/MFU convention; see `ModelFLOPs`).
    let stepFlops = ModelFLOPs.perToken(config: config, seqLen: o.seqLen, lora: lora) * Double(tokens)

    // Same-run baseline: OpenBLAS sgemm on the model's own largest GEMM (the LM head, N x V x C) and on
    // a square 2048^3 product; the better of the two is the peak we compare against.
    let peakSquare = sgemmGFLOPs(m: 2048, n: 2048, k: 2048)
    let peakHead = sgemmGFLOPs(m: tokens, n: config.vocabSize, k: config.hiddenSize, transB: true, reps: 3)
    let peak = max(peakSquare, peakHead)

    let backend = try! BackendFactory.make(.cpu)
    try lora?.validate(for: config)
    let model = LlamaModel(config: config, backend: backend, checkpointing: o.checkpointing, lora: lora)
    try! model.weights.initializeRandom(seed: 1, backend: backend)
    model.initializeLoRA(seed: 1)
    model.enableGradients()
    var rng = SystemRandomNumberGenerator()
    let inputs = (0..<tokens).map { _ in Int32.random(in: 0..<Int32(config.vocabSize), using: &rng) }
    let targets = (0..<tokens).map { _ in Int32.random(in: 0..<Int32(config.vocabSize), using: &rng) }
    // Warm-up step: allocates the workspace and faults in pages.
    try model.forwardBackward(inputs: inputs, targets: targets, batch: o.batch, seqLen: o.seqLen, gradScale: 1 / Float(tokens))
    var times: [Double] = []
    var fwdTimes: [Double] = []
    for _ in 0..<o.steps {
        let t0 = now()
        _ = try model.loss(inputs: inputs, targets: targets, batch: o.batch, seqLen: o.seqLen)
        fwdTimes.append(now() - t0)
        let t1 = now()
        try model.forwardBackward(inputs: inputs, targets: targets, batch: o.batch, seqLen: o.seqLen, gradScale: 1 / Float(tokens))
        times.append(now() - t1)
    }
    let median = times.sorted()[times.count / 2]
    let fwdMedian = fwdTimes.sorted()[fwdTimes.count / 2]
    let achieved = stepFlops / median / 1e9
    let mem = backend.ledger.report()
    let trainedParams = model.trainableParameters().reduce(0) { $0 + $1.value.count }
    print(String(format: "config %@  mode %@%@  %d x %d tokens  checkpointing %@  threads %d  trained parameters %d",
                 o.config, o.mode, lora.map { " (r \($0.rank), alpha \($0.alpha))" } ?? "", o.batch, o.seqLen,
                 o.checkpointing.rawValue, cpuThreadCount, trainedParams))
    var blasBuffer = [CChar](repeating: 0, count: 256)
    print("blas: " + blasBuffer.withUnsafeMutableBufferPointer { String(cString: relora_blas_describe($0.baseAddress, $0.count)) })
    print(String(format: "sgemm peak (same run): %.1f GFLOP/s (2048^3: %.1f, LM-head shape: %.1f)", peak, peakSquare, peakHead))
    print(String(format: "forward+backward: %.3f s/step (median of %d), %.0f tokens/s, %.1f GFLOP/s model = %.1f%% of sgemm peak",
                 median, o.steps, Double(tokens) / median, achieved, 100 * achieved / peak))
    print(String(format: "forward only: %.3f s (%.0f%% of the step)", fwdMedian, 100 * fwdMedian / median))
    print("memory:\n" + mem.formatted())

    // The whole training loop (sampler, forward+backward, grad norm, clipping, AdamW, logging) on random
    // tokens written to a temporary .npy, through the same Trainer the CLI uses.
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("relora-bench-\(getpid())").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let randomTokens = (0..<200_000).map { _ in Int64.random(in: 0..<Int64(config.vocabSize), using: &rng) }
    try NpyWriter.write(tokens: randomTokens, dtype: .uint32, to: dir + "/train.npy")
    var recipe = Recipe(model: o.config, trainData: dir + "/train.npy", runDir: dir + "/run")
    recipe.seqLen = o.seqLen; recipe.microBatch = o.batch; recipe.steps = o.steps + 1; recipe.warmupSteps = 0
    recipe.checkpointing = o.checkpointing; recipe.evalEvery = 1_000_000; recipe.checkpointEvery = 1_000_000
    if lora != nil { recipe.mode = .lora; recipe.loraRank = o.rank; recipe.loraAlpha = o.alpha }
    let trainer = try Trainer(recipe: recipe, resume: false, log: { _ in })
    while trainer.state.step < recipe.steps { _ = try trainer.trainStep() }
    let loopTimes = trainer.history.dropFirst().map { $0.milliseconds / 1000 }.sorted()
    let loopMedian = loopTimes[loopTimes.count / 2]
    print(String(format: "training loop: %.3f s/step, %.0f tokens/s = %.1f%% of the forward+backward rate (loop overhead %.1f%%)",
                 loopMedian, Double(tokens) / loopMedian, 100 * median / loopMedian, 100 * (loopMedian - median) / median))
    if let path = o.json {
        let obj: [String: Any] = [
            "config": o.config, "mode": o.mode, "rank": o.rank, "trained_parameters": trainedParams, "batch": o.batch, "seq_len": o.seqLen, "checkpointing": o.checkpointing.rawValue,
            "threads": cpuThreadCount, "blas_core": relora_blas_core_name().map { String(cString: $0) } ?? "none", "step_seconds": median, "tokens_per_second": Double(tokens) / median,
            "model_gflops": achieved, "sgemm_peak_gflops": peak, "fraction_of_sgemm_peak": achieved / peak,
            "forward_seconds": fwdMedian, "peak_bytes": mem.peakTotal, "train_step_seconds": loopMedian,
            "train_tokens_per_second": Double(tokens) / loopMedian,
        ]
        try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys])
            .write(to: URL(fileURLWithPath: path))
    }
}
