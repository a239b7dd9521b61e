import COpenBLAS
import CReLoRA
import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain

// First: restart on OpenBLAS's best kernels if it fell back to weak ones (see relora_blas_core.h).
relora_blas_ensure_best_core(CommandLine.unsafeArgv)

// relora-bench: CPU throughput of the LLaMA forward+backward, reported as a fraction of the OpenBLAS
// sgemm rate measured in the same run (these machines are noisy; only same-run ratios mean much).
//
//   swift run -c release relora-bench [--config Configs/models/llama_20m.json] [--seq-len 256]
//       [--batch 4] [--steps 5] [--checkpointing none|block] [--mode full|lora] [--rank 128] [--json OUT.json]
// Model FLOPs are `ModelFLOPs` (the trainer's MFU convention): in LoRA mode the FLOPs executed (frozen
// GEMMs forward and dX, no dW, plus the adapters), so the fraction of peak is comparable across modes.

// `relora-bench compression CHECKPOINT`: zstd level and filter measurements (CompressionBench.swift).
if CommandLine.arguments.count > 1, CommandLine.arguments[1] == "compression" {
    do { try CompressionBench.run(Array(CommandLine.arguments.dropFirst(2))) } catch {
        FileHandle.standardError.write(Data("error: \(error)\n".utf8)); exit(2)
    }
    exit(0)
}

// `relora-bench gpu [--config FILE] [--seq-len N] [--batch B] [--steps S] [--json OUT]`: the CUDA backend's
// figures (GPUBench.swift); the kernel library as `relora --device cuda` finds it (RELORA_CUDA_LIB, ...).
if CommandLine.arguments.count > 1, CommandLine.arguments[1] == "gpu" {
    var g = GPUBenchOptions()
    var args = Array(CommandLine.arguments.dropFirst(2))
    while !args.isEmpty {
        let key = args.removeFirst()
        guard !args.isEmpty else { FileHandle.standardError.write(Data("error: \(key) needs a value\n".utf8)); exit(2) }
        let value = args.removeFirst()
        switch key {
        case "--config": g.config = value
        case "--seq-len": g.seqLen = Int(value) ?? g.seqLen
        case "--batch": g.batch = Int(value) ?? g.batch
        case "--steps": g.steps = max(1, Int(value) ?? g.steps)
        case "--json": g.json = value
        default: FileHandle.standardError.write(Data("error: unknown option \(key) (--config --seq-len --batch --steps --json)\n".utf8)); exit(2)
        }
    }
    do { try runGPUBench(g) } catch {
        FileHandle.standardError.write(Data("error: \(error)\n".utf8)); exit(2)
    }
    exit(0)
}

struct Options {
    var config = "Configs/models/llama_20m.json"
    var seqLen = 256
    var batch = 4
    var steps = 5
    var checkpointing = GradientCheckpointing.none
    var json: String?
    /// `full` or `lora` (frozen W + rank-`rank` adapters on the seven block linears).
    var mode = "full"
    var rank = 128
    var alpha = 32.0
}

func parseOptions() -> Options {
    var o = Options()
    var args = Array(CommandLine.arguments.dropFirst())
    func fail(_ m: String) -> Never {
        FileHandle.standardError.write(Data("error: \(m)\n".utf8)); exit(2)
    }
    func positiveInt(_ s: String, _ key: String) -> Int {
        guard let v = Int(s), v > 0 else { fail("\(key) must be a positive integer, got '\(s)'") }
        return v
    }
    while !args.isEmpty {
        let key = args.removeFirst()
        if key == "--help" || key == "-h" {
            print("usage: relora-bench [--config FILE] [--seq-len N] [--batch B] [--steps S] [--checkpointing none|block] [--mode full|lora|quant-linear] [--rank R] [--alpha A] [--json OUT]")
            exit(0)
        }
        guard let value = args.first else { fail("\(key) needs a value") }
        args.removeFirst()
        switch key {
        case "--config": o.config = value
        case "--seq-len": o.seqLen = positiveInt(value, key)
        case "--batch": o.batch = positiveInt(value, key)
        case "--steps": o.steps = positiveInt(value, key)
        case "--checkpointing":
            guard let c = GradientCheckpointing(rawValue: value) else { fail("--checkpointing is none or block") }
            o.checkpointing = c
        case "--json": o.json = value
        case "--mode":
            guard ["full", "lora", "quant-linear"].contains(value) else { fail("--mode is full, lora or quant-linear") }
            o.mode = value
        case "--rank": o.rank = positiveInt(value, key)
        case "--alpha":
            guard let a = Double(value), a > 0 else { fail("--alpha must be a positive number") }
            o.alpha = a
        default: fail("unknown option \(key)")
        }
    }
    return o
}

func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

/// Best GFLOP/s of OpenBLAS sgemm over a few repetitions of an m x n x k product (the library's
/// `PeakFLOPs.sgemm`, which the trainer's MFU uses too).
func sgemmGFLOPs(m: Int, n: Int, k: Int, transB: Bool = false, reps: Int = 5) -> Double {
    PeakFLOPs.sgemm(m: m, n: n, k: k, transB: transB, reps: reps) / 1e9
}

let o = parseOptions()
if o.mode == "quant-linear" {
    do {
        try runQuantLinearBench(tokens: o.batch * o.seqLen, reps: o.steps, json: o.json)
        exit(0)
    } catch {
        FileHandle.standardError.write(Data("error: \(error)\n".utf8))
        exit(1)
    }
}
do {
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
} catch {
    FileHandle.standardError.write(Data("error: \(error)\n".utf8))
    exit(2)
}
