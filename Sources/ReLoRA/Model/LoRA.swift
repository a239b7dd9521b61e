import CReLoRA
import Foundation

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

/// LoRA factors of one linear `[out, in]`: A `[r, in]` (tag `.lora`), B `[out, r]`, their gradients,
/// and the scale (a `[1]` tensor so it can be trained).
public final class LoRAAdapter: @unchecked Sendable {
    public let a: Tensor
    public let b: Tensor
    public let scale: Tensor
    public let gradA: Tensor
    public let gradB: Tensor
    public let gradScale: Tensor
    public let rank: Int, inFeatures: Int, outFeatures: Int

    init(rank: Int, inFeatures: Int, outFeatures: Int, scale: Float, trainableScale: Bool, backend: Backend) {
        self.rank = rank; self.inFeatures = inFeatures; self.outFeatures = outFeatures
        a = backend.makeTensor([rank, inFeatures], tag: .lora)
        b = backend.makeTensor([outFeatures, rank], tag: .lora)
        self.scale = backend.makeTensor([1], tag: .lora)
        backend.upload([scale], to: self.scale)
        gradA = backend.makeTensor([rank, inFeatures], tag: .gradients)
        gradB = backend.makeTensor([outFeatures, rank], tag: .gradients)
        gradScale = backend.makeTensor(trainableScale ? [1] : [0], tag: .gradients)
    }

    /// A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a = sqrt(5), as nn.Linear and the
    /// reference code), B = 0, so `s * B * A = 0` and wrapping or re-initialising does not change the
    /// model's function. Values come from the counter-based RNG keyed by (seed, stream).
    func reinitialize(seed: UInt64, stream: UInt64, backend: Backend) {
        let bound = 1 / Float(inFeatures).squareRoot()
        var values = [Float](repeating: 0, count: a.count)
        for i in 0..<values.count {
            values[i] = (2 * relora_rng_uniform(seed, stream, UInt64(i)) - 1) * bound
        }
        backend.upload(values, to: a)
        backend.zero(b)
    }
}

/// All adapters of a model: `adapters[layer][kind.rawValue]`.
public final class LoRALayers: @unchecked Sendable {
    public let config: LoRAConfig
    public let adapters: [[LoRAAdapter]]
    /// Merges done so far (the restart index of the next merge).
    public internal(set) var merges = 0

    init(config: LoRAConfig, model: LlamaConfig, backend: Backend) {
        self.config = config
        adapters = (0..<model.numHiddenLayers).map { _ in
            LinearKind.allCases.map { kind in
                let (out, inF) = LoRALayers.shape(kind, model)
                return LoRAAdapter(rank: config.rank, inFeatures: inF, outFeatures: out, scale: config.scale,
                                   trainableScale: config.trainableScale, backend: backend)
            }
        }
    }

    /// `[out, in]` of a block linear.
    static func shape(_ kind: LinearKind, _ c: LlamaConfig) -> (Int, Int) {
        switch kind {
        case .q: return (c.queryWidth, c.hiddenSize)
        case .k, .v: return (c.keyValueWidth, c.hiddenSize)
        case .o: return (c.hiddenSize, c.queryWidth)
        case .gate, .up: return (c.intermediateSize, c.hiddenSize)
        case .down: return (c.hiddenSize, c.intermediateSize)
        }
    }

    /// `(name, value, grad)` of every LoRA parameter; names like `model.layers.0.self_attn.q_proj.lora_A`.
    public func named() -> [(name: String, value: Tensor, grad: Tensor)] {
        var list: [(String, Tensor, Tensor)] = []
        for (layer, row) in adapters.enumerated() {
            for kind in LinearKind.allCases {
                let ad = row[kind.rawValue]
                let p = "model.layers.\(layer).\(kind.hfPath)."
                list.append((p + "lora_A", ad.a, ad.gradA))
                list.append((p + "lora_B", ad.b, ad.gradB))
                if config.trainableScale { list.append((p + "lora_scale", ad.scale, ad.gradScale)) }
            }
        }
        return list
    }

    /// Stream id of an adapter for the counter RNG: distinct per (restart, layer, kind).
    func stream(restart: Int, layer: Int, kind: LinearKind) -> UInt64 {
        (UInt64(restart) << 32) | (UInt64(layer) << 8) | UInt64(kind.rawValue)
    }

    func reinitializeAll(seed: UInt64, backend: Backend) {
        for (layer, row) in adapters.enumerated() {
            for kind in LinearKind.allCases {
                row[kind.rawValue].reinitialize(seed: seed, stream: stream(restart: merges, layer: layer, kind: kind), backend: backend)
            }
        }
    }
}
