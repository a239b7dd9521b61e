import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain
import ReLoRACommandLine

// `relora-bench gpu`: the CUDA backend's figures, each against a baseline measured
// in the same run on the same device.
//   1. quantized linear (dequantize into the bf16 scratch + cuBLAS) vs plain cuBLAS bf16 on the same shapes:
//      1b and 7b layer shapes, M = 4096, 8192, 16384 tokens, forward and input gradient; then the 1b products
//      whose leading dimension is 5461 or 32100 with packed rows vs the model's padded rows (`RowPadding`);
//   2. dequantize and quantize (the merge's requantization) bandwidth vs a device-to-device copy;
//   3. whole training steps of a config (default llama_1b): full bf16, relora dense, relora q8_0, relora
//      q4_0: tokens/s, MFU (the trainer's model FLOPs over the device's bf16 peak), memory by tag and the
//      allocator's peak beside the plan, then the per-op profile of --profile more steps (timing events per
//      op category beside the roofline prediction from the device's data-sheet peaks);
//   4. which configs fit 24 GiB by plan (relora q4_0, block checkpointing).
// On the CPU emulation of the kernels every shape is shrunk (the fibers run ~10^6 threads/s): that checks
// the code path only, its numbers mean nothing.
let gpuBenchCommand = CommandSpec(
    name: "relora-bench gpu",
    summary: "the CUDA backend's figures, each against a baseline measured in the same run",
    discussion: """
        Quantized linear (dequantize + cuBLAS) against plain cuBLAS bf16 on 1b and 7b layer shapes; the 1b
        products with 5461- or 32100-wide rows, packed against the model's padded rows;
        dequantize and quantize bandwidth against a device-to-device copy; whole training steps of --config
        (full bf16, relora dense, q8_0, q4_0: tokens/s, MFU, memory by tag and the allocator's peak beside the
        plan), each followed by a per-op profile of --profile more steps (time per op category beside its
        roofline prediction from the device's data-sheet peaks; docs/cuda.md says how to read it); which configs
        fit 24 GiB by plan. The kernel library is found as `relora --device cuda` finds it
        (RELORA_CUDA_LIB, libreloracuda.so next to the executable, Kernels/build/); on its CPU emulation
        (libreloracuda-emu.so) the shapes are shrunk and the numbers mean nothing (a code-path check).
        """,
    options: [
        .value("config", "FILE", help: "the model config of the training steps", default: "Configs/models/llama_1b.json"),
        .value("seq-len", "N", help: "tokens per sequence", default: "1024"),
        .value("batch", "B", help: "sequences per step", default: "4"),
        .value("steps", "S", help: "timed training steps per variant", default: "3"),
        .value("profile", "N", help: "profiled steps per variant after the timed ones (0: no profile)", default: "2"),
        .value("json", "OUT.json", help: "also write the figures to this JSON file"),
    ],
    examples: ["RELORA_CUDA_LIB=Kernels/build/libreloracuda.so relora-bench gpu --json bench.json"])

struct GPUBenchOptions {
    var config: String
    var seqLen: Int
    var batch: Int
    var steps: Int
    var profile: Int
    var json: String?

    init(_ a: ParsedArguments) throws {
        config = try a.required("config")
        seqLen = try a.int("seq-len", atLeast: 1)
        batch = try a.int("batch", atLeast: 1)
        steps = try a.int("steps", atLeast: 1)
        profile = try a.int("profile", atLeast: 0)
        json = a.string("json")
    }
}

func runGPUBench(_ args: [String]) throws {
    guard let a = try gpuBenchCommand.parseOrPrintHelp(args) else { return }
    try runGPUBench(GPUBenchOptions(a))
}

func runGPUBench(_ o: GPUBenchOptions) throws {
    let backend = try CUDABackend.open()
    let lib = backend.library
    let emulated = lib.emulated
    print("device: \(lib.deviceName) (\(lib.buildDescription)); library \(lib.path)")
    if emulated { print("NOTE: the CPU emulation of the kernels: shapes shrunk, numbers meaningless (a code-path check)") }
    var results: [String: Any] = ["device": lib.deviceName, "library": lib.buildDescription, "emulated": emulated]

    func time(_ reps: Int, _ body: () -> Void) -> Double {
        body()
        backend.synchronize()
        var best = Double.infinity
        for _ in 0..<reps {
            let t0 = DispatchTime.now().uptimeNanoseconds
            body()
            backend.synchronize()
            best = min(best, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
        }
        return best
    }
    let reps = emulated ? 1 : 5

    // 1. Quantized linear vs plain cuBLAS bf16.
    let shapes: [(String, Int, Int)] = emulated
        ? [("tiny", 96, 64)]
        : [("1b attn [2048,2048]", 2048, 2048), ("1b up [5461,2048]", 5461, 2048), ("1b down [2048,5461]", 2048, 5461),
           ("7b attn [4096,4096]", 4096, 4096), ("7b up [11008,4096]", 11008, 4096), ("7b down [4096,11008]", 4096, 11008)]
    let tokenCounts = emulated ? [64] : [4096, 8192, 16384]
    var gemmRows: [[String: Any]] = []
    print("\n1. quantized linear (dequantize + cuBLAS bf16) vs plain cuBLAS bf16, TFLOP/s (ratio to plain)")
    print("shape                     M       plain fwd  q8_0 fwd        q4_0 fwd        nf4 fwd         plain dX  q4_0 dX")
    for (label, out, inF) in shapes {
        let w = backend.makeTensor([out, inF], dtype: .bf16, tag: .frozenWeights, zeroed: false)
        backend.fillUniform(w, bound: 0.05, seed: 1, stream: 1)
        let master = backend.makeTensor([out, inF], dtype: .f32, tag: .workspace, zeroed: false)
        backend.fillUniform(master, bound: 0.05, seed: 1, stream: 1)
        let scratch = backend.makeTensor(backend.dequantizeScratchShape(rows: out, cols: inF), dtype: .bf16, tag: .workspace, zeroed: false)
        var quantized: [(QuantFormat, QuantizedTensor)] = []
        for f in [QuantFormat.q8_0, .q4_0, .nf4] {
            let q = QuantizedTensor(format: f, rows: out, cols: inF, backend: backend, tag: .frozenWeights)
            if let failure = backend.quantize(master, into: q) { throw failure.error(format: f, name: label) }
            quantized.append((f, q))
        }
        for m in tokenCounts {
            let x = backend.makeTensor([m, inF], dtype: .bf16, tag: .activations, zeroed: false)
            backend.fillUniform(x, bound: 1, seed: 2, stream: 2)
            let y = backend.makeTensor([m, out], dtype: .bf16, tag: .activations, zeroed: false)
            let dx = backend.makeTensor([m, inF], dtype: .bf16, tag: .activations, zeroed: false)
            let flops = 2.0 * Double(m) * Double(out) * Double(inF)
            let plain = time(reps) { backend.matmul(x, w, y, m: m, n: out, k: inF, transB: true) }
            let plainDX = time(reps) { backend.matmul(y, w, dx, m: m, n: inF, k: out) }
            var row: [String: Any] = ["shape": label, "out": out, "in": inF, "tokens": m,
                                      "plain_fwd_tflops": flops / plain / 1e12, "plain_dx_tflops": flops / plainDX / 1e12]
            var line = String(format: "%-24@ %6d  %6.1f", label as NSString, m, flops / plain / 1e12)
            for (f, q) in quantized {
                let t = time(reps) { backend.quantizedLinear(x, q, y, tokens: m, beta: 0, scratch: scratch) }
                row["\(f.rawValue)_fwd_tflops"] = flops / t / 1e12
                row["\(f.rawValue)_fwd_ratio"] = plain / t
                line += String(format: "    %6.1f (%4.2f)", flops / t / 1e12, plain / t)
            }
            let q4 = quantized[1].1
            let tdx = time(reps) { backend.quantizedLinearInput(y, q4, dx, tokens: m, beta: 0, scratch: scratch) }
            row["q4_0_dx_ratio"] = plainDX / tdx
            line += String(format: "   %6.1f  %6.1f (%4.2f)", flops / plainDX / 1e12, flops / tdx / 1e12, plainDX / tdx)
            print(line)
            gemmRows.append(row)
        }
    }
    results["quantized_linear"] = gemmRows

    // 1b. The same bf16 GEMMs with the model's padded rows (`RowPadding`) against packed ones: the products
    // whose leading dimension is the 1b config's intermediate size (5461) or vocabulary (32100).
    print("\n1b. bf16 GEMMs with packed rows vs the model's padded rows (RowPadding), TFLOP/s (padded / packed)")
    let padding = backend.rowPadding
    let m = emulated ? 64 : 8192
    // (label, m, n, k, transB, a's stored columns, b's, c's): a row-major product as Backend.matmul takes it.
    let padCases: [(String, Int, Int, Int, Bool, Int, Int, Int)] = emulated
        ? [("tiny up fwd y[M,90]", m, 90, 64, true, 64, 64, 90), ("tiny down fwd x[M,90]", m, 64, 90, true, 90, 90, 64)]
        : [("1b up fwd y[M,5461]", m, 5461, 2048, true, 2048, 2048, 5461),
           ("1b down fwd x[M,5461] W[2048,5461]", m, 2048, 5461, true, 5461, 5461, 2048),
           ("1b down dX dX[M,5461]", m, 5461, 2048, false, 2048, 5461, 5461),
           ("1b up dX dY[M,5461]", m, 2048, 5461, false, 5461, 2048, 2048),
           ("1b lm_head logits[M,32100]", m, 32100, 2048, true, 2048, 2048, 32100),
           ("1b lm_head dX dlogits[M,32100]", m, 2048, 32100, false, 32100, 2048, 2048)]
    var padRows: [[String: Any]] = []
    for (label, m, n, k, transB, aCols, bCols, cCols) in padCases {
        let aRows = m, bRows = transB ? n : k
        func operands(_ stride: (Int) -> Int) -> (Tensor, Tensor, Tensor, Int, Int, Int) {
            let (la, lb, lc) = (stride(aCols), stride(bCols), stride(cCols))
            let a = backend.makeTensor([aRows, la], dtype: .bf16, tag: .activations, zeroed: true)
            let b = backend.makeTensor([bRows, lb], dtype: .bf16, tag: .frozenWeights, zeroed: true)
            let c = backend.makeTensor([m, lc], dtype: .bf16, tag: .activations, zeroed: false)
            backend.fillUniform(a, bound: 1, seed: 5, stream: 1)
            backend.fillUniform(b, bound: 0.05, seed: 5, stream: 2)
            return (a, b, c, la, lb, lc)
        }
        let flops = 2.0 * Double(m) * Double(n) * Double(k)
        let packed = operands { $0 }, padded = operands { padding.stride($0) }
        let tPacked = time(reps) {
            backend.matmul(packed.0, packed.1, packed.2, m: m, n: n, k: k, transB: transB, lda: packed.3, ldb: packed.4, ldc: packed.5)
        }
        let tPadded = time(reps) {
            backend.matmul(padded.0, padded.1, padded.2, m: m, n: n, k: k, transB: transB, lda: padded.3, ldb: padded.4, ldc: padded.5)
        }
        print(String(format: "%-36@ M %5d  packed %6.1f  padded %6.1f  (%4.2fx)", label as NSString, m, flops / tPacked / 1e12,
                     flops / tPadded / 1e12, tPacked / tPadded))
        padRows.append(["shape": label, "m": m, "n": n, "k": k, "packed_tflops": flops / tPacked / 1e12,
                        "padded_tflops": flops / tPadded / 1e12, "speedup": tPacked / tPadded])
    }
    results["padded_rows"] = padRows

    // 2. Dequantize / quantize bandwidth vs a device-to-device copy of the bf16 weight.
    print("\n2. dequantize and quantize (merge) bandwidth, GB/s (ratio to a bf16 device copy of the same weight)")
    var bandwidthRows: [[String: Any]] = []
    do {  // its tensors go before the cache is released below
        let (bwOut, bwIn) = emulated ? (96, 64) : (11008, 4096)
        let src = backend.makeTensor([bwOut, bwIn], dtype: .f32, tag: .workspace, zeroed: false)
        backend.fillUniform(src, bound: 0.05, seed: 3, stream: 3)
        let bf = backend.makeTensor([bwOut, bwIn], dtype: .bf16, tag: .workspace, zeroed: false)
        let bf2 = backend.makeTensor([bwOut, bwIn], dtype: .bf16, tag: .workspace, zeroed: false)
        let copySeconds = time(reps) { backend.copy(bf, to: bf2) }
        let copyGBs = Double(2 * bf.byteCount) / copySeconds / 1e9
        print(String(format: "copy bf16 [%d,%d]: %.0f GB/s (read + write)", bwOut, bwIn, copyGBs))
        for f in [QuantFormat.q8_0, .q4_0, .nf4] {
            let q = QuantizedTensor(format: f, rows: bwOut, cols: bwIn, backend: backend, tag: .frozenWeights)
            let tq = time(reps) { _ = backend.quantize(src, into: q) }
            let td = time(reps) { backend.dequantize(q, firstRow: 0, rowCount: bwOut, into: bf) }
            let deqGBs = Double(q.blocks.byteCount + bf.byteCount) / td / 1e9
            let quantGBs = Double(src.byteCount + q.blocks.byteCount) / tq / 1e9
            print(String(format: "%@: dequantize -> bf16 %.0f GB/s (%.2f of copy), quantize f32 -> blocks %.0f GB/s (%.2f of copy)",
                         f.rawValue, deqGBs, deqGBs / copyGBs, quantGBs, quantGBs / copyGBs))
            bandwidthRows.append(["format": f.rawValue, "dequantize_gbs": deqGBs, "quantize_gbs": quantGBs, "copy_gbs": copyGBs])
        }
    }
    results["bandwidth"] = bandwidthRows

    // 2b. One AdamW step over n parameters: f32 moments vs blockwise 8-bit ones (bytes a step moves: f32
    // param read + write, grad read, m and v read + write; 8-bit: codes instead of the moments, plus scales).
    do {
        let n = emulated ? 4096 + 77 : 64 << 20
        let p = backend.makeTensor([n], dtype: .f32, tag: .masterWeights, zeroed: false)
        let g = backend.makeTensor([n], dtype: .f32, tag: .gradients, zeroed: false)
        backend.fillUniform(p, bound: 0.05, seed: 4, stream: 1)
        backend.fillUniform(g, bound: 1e-3, seed: 4, stream: 2)
        let m = backend.makeTensor([n], dtype: .f32, tag: .optimizer), v = backend.makeTensor([n], dtype: .f32, tag: .optimizer)
        let m8 = BlockwiseMoments(backend: backend, shape: [n], isSigned: true, tag: .optimizer)
        let v8 = BlockwiseMoments(backend: backend, shape: [n], isSigned: false, tag: .optimizer)
        var step = 0
        let t32 = time(reps) { step += 1; backend.adamw(param: p, grad: g, m: m, v: v, lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step: step) }
        step = 0
        let t8 = time(reps) { step += 1; backend.adamw8bit(param: p, grad: g, m: m8, v: v8, lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step: step) }
        let bytes32 = Double(n) * 28, bytes8 = Double(n) * 16 + Double(4 * 4 * BlockwiseMoments.blocks(n))
        print(String(format: "\nAdamW step over %d parameters: f32 moments %.2f ms (%.0f GB/s), 8-bit moments %.2f ms (%.0f GB/s), time ratio %.2f",
                     n, 1e3 * t32, bytes32 / t32 / 1e9, 1e3 * t8, bytes8 / t8 / 1e9, t8 / t32))
        results["adamw"] = ["parameters": n, "f32_seconds": t32, "int8_seconds": t8, "f32_gbs": bytes32 / t32 / 1e9, "int8_gbs": bytes8 / t8 / 1e9]
    }
    // The training steps below run on their own backends (one ledger each): hand this one's cache back so
    // their cudaMemGetInfo figures are theirs.
    backend.releaseCachedMemory()

    // 3. Whole training steps.
    let configPath = emulated ? "Configs/models/llama_tiny.json" : o.config
    let config = try LlamaConfig(contentsOf: configPath)
    let seqLen = emulated ? 32 : o.seqLen, batch = emulated ? 2 : o.batch
    print("\n3. training steps: \(configPath), \(batch) x \(seqLen) tokens, median of \(o.steps) steps after a warm-up")
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("relora-gpu-bench-\(getpid())").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    var rng = SystemRandomNumberGenerator()
    let tokens = (0..<max(200_000, 4 * batch * seqLen * (o.steps + 2))).map { _ in Int64.random(in: 0..<Int64(config.vocabSize), using: &rng) }
    try NpyWriter.write(tokens: tokens, dtype: .uint32, to: dir + "/train.npy")
    var stepRows: [[String: Any]] = []
    let variants: [(String, TrainingMode, FrozenStorage, OptimizerStates)] = [
        ("full bf16", .full, .none, .f32), ("relora dense", .relora, .none, .f32), ("relora q8_0", .relora, .q8_0, .f32),
        ("relora q4_0", .relora, .q4_0, .f32), ("relora q4_0 a8", .relora, .q4_0, .int8),
    ]
    for (label, mode, quant, states) in variants {
        var r = Recipe(model: configPath, trainData: dir + "/train.npy", runDir: dir + "/run-\(stepRows.count)")
        r.seqLen = seqLen; r.microBatch = batch; r.steps = o.steps + 1 + o.profile; r.warmupSteps = 0
        r.evalEvery = 1_000_000; r.checkpointEvery = 1_000_000; r.logEvery = 1_000_000
        r.checkpointing = .block; r.mode = mode; r.quant = quant; r.optimizerStates = states
        if mode != .full { r.loraRank = emulated ? 8 : 128; r.loraAlpha = 32; r.reloraEvery = r.steps; r.restartWarmup = 0 }  // one restart, after the timed steps
        let stepBackend = try CUDABackend.open()
        let trainer = try Trainer(recipe: r, resume: false, backend: stepBackend, log: { _ in })
        while trainer.state.step < o.steps + 1 { _ = try trainer.trainStep() }
        let times = trainer.history.dropFirst().map { $0.milliseconds / 1000 }.sorted()
        let median = times[times.count / 2]
        let mfu = trainer.history.last?.mfu
        var profile: StepProfile?
        if o.profile > 0 {
            try trainer.startProfile(steps: o.profile)
            while trainer.state.step < r.steps { _ = try trainer.trainStep() }
            profile = trainer.profile
        }
        let report = stepBackend.ledger.report()
        let line = String(format: "%-14@ %8.0f tokens/s  MFU %@  ledger peak %@ (plan %@)", label as NSString,
                          Double(r.tokensPerStep) / median, mfu.map { String(format: "%.1f%%", 100 * $0) } ?? "n/a",
                          formatBytes(report.peakTotal), trainer.plannedPeak.map(formatBytes) ?? "n/a")
        print(line)
        print("    " + stepBackend.memorySummary())
        if let profile { print(profile.formatted().split(separator: "\n").map { "    " + $0 }.joined(separator: "\n")) }
        // Planned vs measured device memory: the allocator's peaks after the first step (exact by construction)
        // and the device total with the estimated context and cuBLAS workspace against cudaMemGetInfo's used.
        let planned = trainer.memoryPlan?.cuda, measured = stepBackend.allocatorStats
        let (freeBytes, totalBytes) = stepBackend.deviceMemory()
        stepRows.append(["variant": label, "tokens_per_second": Double(r.tokensPerStep) / median, "mfu": mfu ?? NSNull(),
                         "ledger_peak_bytes": report.peakTotal, "planned_peak_bytes": trainer.plannedPeak ?? NSNull(),
                         "planned_allocator_reserved_after_first_step_bytes": planned?.afterFirstStep.peakReserved ?? NSNull(),
                         "planned_allocator_reserved_bytes": planned?.allocator.peakReserved ?? NSNull(),
                         "planned_device_total_bytes": planned?.total ?? NSNull(),
                         "planned_context_bytes": planned?.context ?? NSNull(),
                         "planned_cublas_workspace_bytes": planned?.cublasWorkspace ?? NSNull(),
                         "allocator_in_use_peak_bytes": measured.peakInUse, "allocator_reserved_peak_bytes": measured.peakReserved,
                         "mem_get_info_used_bytes": totalBytes - freeBytes, "profile": profile?.dictionary ?? NSNull(),
                         "peak_by_tag": Dictionary(uniqueKeysWithValues: report.peak.map { ($0.key.rawValue, $0.value) })])
    }
    results["training_steps"] = stepRows

    // 4. What fits 24 GiB by plan.
    print("\n4. planned peak on cuda, relora q4_0, block checkpointing, seq 1024, micro-batch 4 (24 GiB card), f32 / 8-bit Adam moments")
    var fitRows: [[String: Any]] = []
    for name in ["llama_1b", "llama_7b", "llama_13b"] {
        for states in OptimizerStates.allCases {
            let path = "Configs/models/\(name).json"
            var r = Recipe(model: path, trainData: dir + "/train.npy", runDir: dir + "/plan")
            r.seqLen = 1024; r.microBatch = 4; r.mode = .relora; r.quant = .q4_0; r.checkpointing = .block
            r.loraRank = 128; r.reloraEvery = 1000; r.optimizerStates = states
            let plan = try MemoryPlanner.plan(r, config: try LlamaConfig(contentsOf: path), device: .cuda, budget: 24 << 30,
                                              gpu: try GPUProfile(key: "rtx4090"))
            print("\(name) (\(states.rawValue) moments): tensors \(formatBytes(plan.report.peakTotal)), device \(formatBytes(plan.need)) \(plan.fits ? "fits" : "does not fit")")
            fitRows.append(["config": name, "optimizer_states": states.rawValue, "planned_peak_bytes": plan.report.peakTotal,
                            "planned_device_total_bytes": plan.need, "fits_24gib": plan.fits])
        }
    }
    results["fits_24gib"] = fitRows

    if let path = o.json {
        try JSONSerialization.data(withJSONObject: results, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: path))
        print("\nwrote \(path)")
    }
}
