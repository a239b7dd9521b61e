import CReLoRA
import Foundation
import ReLoRACore
import ReLoRAFormats

/// The seven linears of a LLaMA block, in Hugging Face naming.
public enum LinearKind: Int, CaseIterable, Sendable {
    case q, k, v, o, gate, up, down

    /// `self_attn.q_proj`, ..., `mlp.down_proj`.
    public var hfPath: String {
        switch self {
        case .q: return "self_attn.q_proj"
        case .k: return "self_attn.k_proj"
        case .v: return "self_attn.v_proj"
        case .o: return "self_attn.o_proj"
        case .gate: return "mlp.gate_proj"
        case .up: return "mlp.up_proj"
        case .down: return "mlp.down_proj"
        }
    }

    /// `(out, in)` of this linear in a model of `config`.
    public func shape(_ c: LlamaConfig) -> (out: Int, in: Int) {
        switch self {
        case .q: return (c.queryWidth, c.hiddenSize)
        case .k, .v: return (c.keyValueWidth, c.hiddenSize)
        case .o: return (c.hiddenSize, c.queryWidth)
        case .gate, .up: return (c.intermediateSize, c.hiddenSize)
        case .down: return (c.hiddenSize, c.intermediateSize)
        }
    }
}

/// How the block linears are adapted: `y = x W^T + s * (drop(x) A^T) B^T` with W frozen.
public struct LoRAConfig: Sendable, Equatable {
    /// r, the inner dimension of A `[r, in]` and B `[out, r]`.
    public var rank: Int
    /// s = alpha / r.
    public var alpha: Double
    /// Dropout on the adapter's input (0 = none). Masks come from the counter-based RNG, so the
    /// backward (and a checkpointed recompute) regenerate exactly the forward's mask.
    public var dropout: Double = 0
    /// Make s a trained scalar per adapter (initialised to alpha / r).
    public var trainableScale = false

    public init(rank: Int, alpha: Double, dropout: Double = 0, trainableScale: Bool = false) {
        self.rank = rank; self.alpha = alpha; self.dropout = dropout; self.trainableScale = trainableScale
    }

    public var scale: Float { Float(alpha / Double(rank)) }

    /// Checks r against every adapted matrix of `model` (r must not exceed either side).
    public func validate(for model: LlamaConfig) throws {
        guard rank > 0 else { throw ReLoRAError.invalidConfig("'lora_r' must be a positive integer, got \(rank)") }
        guard alpha > 0, alpha.isFinite else { throw ReLoRAError.invalidConfig("'lora_alpha' must be positive, got \(alpha)") }
        guard dropout >= 0 && dropout < 1 else { throw ReLoRAError.invalidConfig("'lora_dropout' must be in [0, 1), got \(dropout)") }
        let smallest = min(model.hiddenSize, model.keyValueWidth, model.intermediateSize, model.queryWidth)
        guard rank <= smallest else {
            throw ReLoRAError.invalidConfig("lora_r \(rank) is larger than the smallest adapted dimension \(smallest) of the model; use r <= \(smallest)")
        }
    }
}

/// LoRA factors of one linear `[out, in]`: A `[r, in]`, B `[out, r]` (tag `.lora`, dtype
/// `precision.loraFactors`), the scale s as a `[1]` f32 tensor (so it can be trained and stays on the
/// device), and, once gradients are enabled, their gradients. A (and its gradient) is a view into its
/// `AdapterGroup`'s contiguous storage.
public final class LoRAAdapter {
    public let a: Tensor
    public let b: Tensor
    public let scale: Tensor
    public let rank: Int, inFeatures: Int, outFeatures: Int
    public let trainableScale: Bool
    public internal(set) var gradA: Tensor?
    public private(set) var gradB: Tensor?
    /// dL/ds, only with a trainable scale.
    public private(set) var gradScale: Tensor?

    /// `a`: the `[rank, inFeatures]` view its group gives it.
    init(a: Tensor, rank: Int, inFeatures: Int, outFeatures: Int, scale: Float, trainableScale: Bool, backend: Backend) {
        self.rank = rank; self.inFeatures = inFeatures; self.outFeatures = outFeatures
        self.trainableScale = trainableScale
        self.a = a
        b = backend.makeTensor([outFeatures, rank], dtype: backend.precision.loraFactors, tag: .lora)
        self.scale = backend.makeTensor([1], dtype: .f32, tag: .lora)
        backend.fill(self.scale, value: scale)
    }

    /// B's and the scale's gradients; `gradA` is the group's view.
    func enableGradients(gradA: Tensor, _ backend: Backend) {
        guard self.gradA == nil else { return }
        self.gradA = gradA
        gradB = backend.makeTensor([outFeatures, rank], dtype: backend.precision.gradients, tag: .gradients)
        if trainableScale { gradScale = backend.makeTensor([1], dtype: .f32, tag: .gradients) }
    }

    /// A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a = sqrt(5), as nn.Linear and the
    /// reference code), B = 0, so `s * B * A = 0` and wrapping or re-initialising does not change the
    /// model's function. Values come from the counter-based RNG keyed by (seed, stream).
    func reinitialize(seed: UInt64, stream: UInt64, backend: Backend) {
        backend.fillUniform(a, bound: 1 / Float(inFeatures).squareRoot(), seed: seed, stream: stream)
        backend.zero(b)
    }

    /// `(suffix, factor, value, grad)` of the trained factors: `lora_A`, `lora_B` and, if trained, `lora_scale`.
    func trainedTensors() -> [(suffix: String, factor: LoRAFactor, value: Tensor, grad: Tensor)] {
        guard let gradA, let gradB else { preconditionFailure("LoRA gradients requested before enableGradients()") }
        var list = [("lora_A", LoRAFactor.a, a, gradA), ("lora_B", .b, b, gradB)]
        if let gradScale { list.append(("lora_scale", .scale, scale, gradScale)) }
        return list
    }
}

/// The trained tensors of a LoRA adapter.
public enum LoRAFactor: String, Sendable {
    /// `[r, in]`, re-initialised at every restart.
    case a
    /// `[out, r]`, zeroed at every restart.
    case b
    /// The trainable scale `[1]`.
    case scale
}
