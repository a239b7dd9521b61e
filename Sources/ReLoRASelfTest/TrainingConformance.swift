import CReLoRA
import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain

/// A few full training steps of a tiny LLaMA on a device backend against the same steps on the CPU
/// reference: `relora selftest --device cuda`'s end-to-end check, and how CI shows that the kernels,
/// composed by the real model and trainer (GQA attention, LoRA groups, quantized frozen weights, a ReLoRA
/// restart with its merge and optimizer reset), train like the reference.
///
/// Two precisions, two kinds of bound:
/// - **f32** (the device backend computing in f32, `Precision.fp32`): the only differences from the CPU are
///   the order of additions inside GEMMs and reductions, ~`k * 2^-24` relative per op. Through 6 steps
///   of a 2-layer model (each loss a sum of ~10^3 terms of ~10^-3 relative sensitivity to the weights) the
///   losses agree to `1e-5` relative (the emulation measured 3e-8: its GEMM is OpenBLAS, as on the CPU; a
///   GPU's cuBLAS sums in another order); a wrong kernel is off by 10^-2 or more from the first step on.
/// - **bf16** (`Precision.cudaMixed`, what GPU runs use): activations, LoRA factors and working copies are
///   rounded to 8 significant bits at every op, a relative error of `2^-8 = 0.4 %` per rounding that does
///   not cancel in a loss that averages over tokens of a model this small; the loss is checked to within
///   `3 %` relative (about 8 such roundings compounding; the emulation measured 0.3 %), and it must fall
///   as the CPU's does.
public enum TrainingConformance {
    public struct Case: Sendable {
        public var name: String
        public var mode: TrainingMode
        public var quant: FrozenStorage
        public var mergePolicy: MergePolicyKind?
        public var optimizerStates: OptimizerStates = .f32
        public var checkpointing: GradientCheckpointing = .none
    }

    /// full-rank; relora over q4_0 with a restart (rtn merge, magnitude reset) after step 3; relora over
    /// nf4 with stochastic merges and LoRA dropout under block checkpointing (on a device, its backward reuses
    /// the recompute's dequantized weights: `reuse_dequantized`); relora over q8_0 merging into f32 master copies (pinned
    /// host memory on a GPU); full-rank with 8-bit Adam moments (every matrix of this model has >= 4096
    /// entries, so the block linears and the embeddings take the 8-bit update).
    public static let cases: [Case] = [
        Case(name: "full", mode: .full, quant: .none, mergePolicy: nil),
        Case(name: "relora q4_0 rtn", mode: .relora, quant: .q4_0, mergePolicy: .rtn),
        Case(name: "relora nf4 stochastic block", mode: .relora, quant: .nf4, mergePolicy: .stochastic, checkpointing: .block),
        Case(name: "relora q8_0 master", mode: .relora, quant: .q8_0, mergePolicy: .master),
        Case(name: "full int8 moments", mode: .full, quant: .none, mergePolicy: nil, optimizerStates: .int8),
    ]

    public static let steps = 6

    /// Runs every case on `makeDevice(precision)` (fp32 and cudaMixed) and on the CPU; one check per case and precision.
    public static func run(makeDevice: (Precision) -> Backend, progress: ((ConformanceCheck) -> Void)? = nil) throws -> [ConformanceCheck] {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("relora-selftest-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let data = try writeData(dir)
        var checks: [ConformanceCheck] = []
        for c in cases {
            let reference = try losses(recipe(c, data, run: "\(dir)/cpu-\(checks.count)"), backend: CPUBackend())
            for (precision, label, bound) in [(Precision.fp32, "f32", 1e-5), (Precision.cudaMixed, "bf16", 3e-2)] {
                let device = makeDevice(precision)
                let got = try losses(recipe(c, data, run: "\(dir)/dev-\(checks.count)"), backend: device)
                var worst = 0.0
                for (g, r) in zip(got, reference) { worst = max(worst, abs(g - r) / abs(r)) }
                if got.count != reference.count || got.contains(where: { !$0.isFinite }) { worst = .infinity }
                let fell = (got.last ?? .nan) < (got.first ?? .nan)
                var problems: [String] = []
                if worst > bound { problems.append("losses \(format(got)) vs cpu \(format(reference))") }
                if !fell { problems.append("the loss did not fall") }
                let check = ConformanceCheck(
                    group: .training, op: "train \(c.name)", shape: "\(steps) steps", dtype: label, maxError: worst, bound: bound,
                    passed: problems.isEmpty, note: problems.joined(separator: "; "))
                progress?(check)
                checks.append(check)
            }
        }
        return checks
    }

    static func format(_ xs: [Double]) -> String { xs.map { String(format: "%.5f", $0) }.joined(separator: " ") }

    static func losses(_ r: Recipe, backend: Backend) throws -> [Double] {
        let trainer = try Trainer(recipe: r, resume: false, backend: backend, log: { _ in })
        return try (0..<steps).map { _ in try trainer.trainStep().loss }
    }

    struct Data { var config: String, train: String }

    /// A 2-layer GQA model (4 query heads over 2 kv heads) on a learnable synthetic stream: each token is
    /// a fixed function of the previous one, with 20 % random tokens, over a vocabulary of 96.
    static func writeData(_ dir: String) throws -> Data {
        let vocab = 96
        var tokens: [Int64] = [1]
        for i in 1..<16384 {
            let u = relora_rng_uniform(11, 0, UInt64(i))
            let next = u < 0.2 ? Int64(relora_rng_u64(11, 1, UInt64(i)) % UInt64(vocab)) : (tokens[i - 1] * 7 + 3) % Int64(vocab)
            tokens.append(next)
        }
        try NpyWriter.write(tokens: tokens, dtype: .uint16, to: "\(dir)/train.npy")
        let config: [String: Any] = [
            "hidden_size": 64, "intermediate_size": 136, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 64,
        ]
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: "\(dir)/config.json"))
        return Data(config: "\(dir)/config.json", train: "\(dir)/train.npy")
    }

    static func recipe(_ c: Case, _ d: Data, run: String) -> Recipe {
        var r = Recipe(model: d.config, trainData: d.train, valData: nil, runDir: run)
        r.seqLen = 48; r.microBatch = 2; r.gradAccum = 2; r.steps = steps; r.warmupSteps = 0; r.lr = 1e-2
        r.checkpointEvery = 1000; r.evalEvery = 1000; r.seed = 3; r.initStd = 0.05; r.logEvery = 1000
        r.mode = c.mode
        r.quant = c.quant
        r.mergePolicy = c.mergePolicy
        r.optimizerStates = c.optimizerStates
        r.checkpointing = c.checkpointing
        if c.mode != .full {
            r.loraRank = 8; r.loraAlpha = 16; r.loraDropout = c.mergePolicy == .stochastic ? 0.1 : 0
        }
        if c.mode == .relora { r.reloraEvery = 3; r.restartWarmup = 1 }
        return r
    }
}
