import CReLoRA
import Foundation

/// One decoder block's parameters, Hugging Face layout (`[out, in]` for linears).
public struct BlockWeights: Sendable {
    public let attnNorm: Tensor  // [C]           input_layernorm
    public let q: Tensor         // [H*D, C]      self_attn.q_proj
    public let k: Tensor         // [Hkv*D, C]    self_attn.k_proj
    public let v: Tensor         // [Hkv*D, C]    self_attn.v_proj
    public let o: Tensor         // [C, H*D]      self_attn.o_proj
    public let mlpNorm: Tensor   // [C]           post_attention_layernorm
    public let gate: Tensor      // [F, C]        mlp.gate_proj
    public let up: Tensor        // [F, C]        mlp.up_proj
    public let down: Tensor      // [C, F]        mlp.down_proj

    /// `linearTag` tags the seven linears (`.frozenWeights` under LoRA); nil leaves them empty
    /// (0 elements: the gradient set of a model whose linears are frozen).
    init(_ config: LlamaConfig, _ backend: Backend, tag: MemoryTag, linearTag: MemoryTag?) {
        let c = config.hiddenSize, f = config.intermediateSize
        func t(_ shape: [Int]) -> Tensor { backend.makeTensor(shape, tag: tag) }
        func lin(_ shape: [Int]) -> Tensor { backend.makeTensor(linearTag == nil ? [0] : shape, tag: linearTag ?? tag) }
        attnNorm = t([c]); mlpNorm = t([c])
        q = lin([config.queryWidth, c]); k = lin([config.keyValueWidth, c]); v = lin([config.keyValueWidth, c])
        o = lin([c, config.queryWidth])
        gate = lin([f, c]); up = lin([f, c]); down = lin([c, f])
    }

    /// The weight of one linear.
    public func linear(_ kind: LinearKind) -> Tensor {
        switch kind {
        case .q: return q
        case .k: return k
        case .v: return v
        case .o: return o
        case .gate: return gate
        case .up: return up
        case .down: return down
        }
    }

    /// Tensors with their Hugging Face names under `model.layers.{layer}.` (empty linears left out).
    public func named(layer: Int) -> [(String, Tensor)] {
        let p = "model.layers.\(layer)."
        let all: [(String, Tensor)] = [
            (p + "input_layernorm.weight", attnNorm),
            (p + "self_attn.q_proj.weight", q), (p + "self_attn.k_proj.weight", k),
            (p + "self_attn.v_proj.weight", v), (p + "self_attn.o_proj.weight", o),
            (p + "post_attention_layernorm.weight", mlpNorm),
            (p + "mlp.gate_proj.weight", gate), (p + "mlp.up_proj.weight", up), (p + "mlp.down_proj.weight", down),
        ]
        return all.filter { $0.1.count > 0 }
    }
}

/// All parameters of a LLaMA model (or, with tag `.gradients`, their gradients).
public final class LlamaWeights: @unchecked Sendable {
    public let config: LlamaConfig
    public let embed: Tensor           // [V, C]  model.embed_tokens
    public let blocks: [BlockWeights]
    public let norm: Tensor            // [C]     model.norm
    private let untiedHead: Tensor?    // [V, C]  lm_head (nil when tied to the embedding)

    /// The output projection `[V, C]`: the embedding itself when `tie_word_embeddings`.
    public var lmHead: Tensor { untiedHead ?? embed }

    /// How the seven block linears are stored.
    public enum LinearStorage: Sendable {
        /// With the same tag as everything else (full-rank training).
        case same
        /// With their own tag (`.frozenWeights` under LoRA).
        case tagged(MemoryTag)
        /// Not at all (gradients of frozen linears).
        case absent
    }

    /// Zero-filled parameters.
    public init(config: LlamaConfig, backend: Backend, tag: MemoryTag, linears: LinearStorage = .same) {
        self.config = config
        embed = backend.makeTensor([config.vocabSize, config.hiddenSize], tag: tag)
        let lt: MemoryTag?
        switch linears {
        case .same: lt = tag
        case .tagged(let t): lt = t
        case .absent: lt = nil
        }
        blocks = (0..<config.numHiddenLayers).map { _ in BlockWeights(config, backend, tag: tag, linearTag: lt) }
        norm = backend.makeTensor([config.hiddenSize], tag: tag)
        untiedHead = config.tieWordEmbeddings ? nil : backend.makeTensor([config.vocabSize, config.hiddenSize], tag: tag)
    }

    /// Every distinct tensor with its Hugging Face name, in the order `named_parameters()` gives.
    public func named() -> [(String, Tensor)] {
        var list: [(String, Tensor)] = [("model.embed_tokens.weight", embed)]
        for (i, b) in blocks.enumerated() { list += b.named(layer: i) }
        list.append(("model.norm.weight", norm))
        if let head = untiedHead { list.append(("lm_head.weight", head)) }
        return list
    }

    /// Fresh weights as in LLaMA pretraining: linears and embeddings ~ N(0, std), norm gains 1.
    /// Values come from the counter-based RNG keyed by (seed, tensor index, element), so they do
    /// not depend on the backend or on thread layout.
    public func initializeRandom(seed: UInt64, std: Float = 0.02, backend: Backend) {
        for (index, (_, tensor)) in named().enumerated() {
            if tensor.shape.count == 1 {  // norm gains
                backend.upload([Float](repeating: 1, count: tensor.count), to: tensor)
            } else {
                backend.upload(gaussian(count: tensor.count, std: std, seed: seed, stream: UInt64(index)), to: tensor)
            }
        }
    }
}

/// `count` samples of N(0, std^2) by Box-Muller from the counter-based RNG.
func gaussian(count: Int, std: Float, seed: UInt64, stream: UInt64) -> [Float] {
    var out = [Float](repeating: 0, count: count)
    for i in 0..<count {
        let u1 = Double(relora_rng_u64(seed, stream, UInt64(2 * i)) >> 11) * 0x1p-53
        let u2 = Double(relora_rng_u64(seed, stream, UInt64(2 * i + 1)) >> 11) * 0x1p-53
        let r = (-2 * Foundation.log(1 - u1)).squareRoot()  // 1 - u1 in (0, 1]: log is finite
        out[i] = Float(r * Foundation.cos(2 * Double.pi * u2)) * std
    }
    return out
}
