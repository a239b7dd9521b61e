import ReLoRACore
import ReLoRAFormats
/// One decoder block's parameters, Hugging Face layout (`[out, in]` for linears).
public final class BlockParameters {
    public let attnNorm: Tensor           // [C]   input_layernorm
    public let mlpNorm: Tensor            // [C]   post_attention_layernorm
    /// q, k, v, o, gate, up, down, indexed by `LinearKind.rawValue`.
    public let linears: [AdaptedLinear]
    /// Under LoRA: the linears grouped by shared input (q k v | o | gate up | down), each group's A
    /// factors contiguous. Empty in full-rank training.
    let adapterGroups: [AdapterGroup]

    /// The groups of linears that read the same input, in `LinearKind` order.
    static let groupKinds: [[LinearKind]] = [[.q, .k, .v], [.o], [.gate, .up], [.down]]

    init(layer: Int, config: LlamaConfig, lora: LoRAConfig?, quant: QuantFormat?, masterCopies: Bool = false, backend: Backend) {
        let dtype = backend.precision.trainable
        attnNorm = backend.makeTensor([config.hiddenSize], dtype: dtype, tag: .trainable)
        mlpNorm = backend.makeTensor([config.hiddenSize], dtype: dtype, tag: .trainable)
        if let lora {
            adapterGroups = Self.groupKinds.map {
                AdapterGroup(kinds: $0, layer: layer, config: config, lora: lora, quant: quant, masterCopies: masterCopies, backend: backend)
            }
            linears = adapterGroups.flatMap(\.linears)
        } else {
            adapterGroups = []
            linears = LinearKind.allCases.map {
                AdaptedLinear(kind: $0, layer: layer, config: config, lora: nil, adapterA: nil, backend: backend)
            }
        }
        precondition(linears.map(\.kind) == LinearKind.allCases)
    }

    /// The group holding `kind` (LoRA models).
    func group(_ kind: LinearKind) -> AdapterGroup? { adapterGroups.first { $0.linears.contains { $0.kind == kind } } }

    public func linear(_ kind: LinearKind) -> AdaptedLinear { linears[kind.rawValue] }
}

/// All parameters of a LLaMA model: embeddings, blocks (norms + adapted linears), final norm, head.
public final class LlamaParameters {
    public let config: LlamaConfig
    public let embed: Tensor           // [V, C]  model.embed_tokens
    public let blocks: [BlockParameters]
    public let norm: Tensor            // [C]     model.norm
    private let untiedHead: Tensor?    // [V, C]  lm_head (nil when tied to the embedding)

    /// The output projection `[V, C]`: the embedding itself when `tie_word_embeddings`.
    public var lmHead: Tensor { untiedHead ?? embed }

    /// Zero-filled parameters; with `lora` the block linears are frozen and adapted, and stored in
    /// `quant` if given, with f32 master copies (`QuantizedTensor.master`) if `masterCopies`.
    init(config: LlamaConfig, lora: LoRAConfig?, quant: QuantFormat? = nil, masterCopies: Bool = false, backend: Backend) {
        self.config = config
        let dtype = backend.precision.trainable
        embed = backend.makeTensor([config.vocabSize, config.hiddenSize], dtype: dtype, tag: .trainable)
        blocks = (0..<config.numHiddenLayers).map {
            BlockParameters(layer: $0, config: config, lora: lora, quant: quant, masterCopies: masterCopies, backend: backend)
        }
        norm = backend.makeTensor([config.hiddenSize], dtype: dtype, tag: .trainable)
        untiedHead = config.tieWordEmbeddings ? nil
            : backend.makeTensor([config.vocabSize, config.hiddenSize], dtype: dtype, tag: .trainable)
    }

    /// Every linear of every block, layer-major.
    public var linears: [AdaptedLinear] { blocks.flatMap(\.linears) }

    /// Every distinct weight with its Hugging Face name, in the order `named_parameters()` gives: what a
    /// checkpoint's `model.safetensors` holds. Dense tensors are `.dense`; quantized base weights of the
    /// linears `.quantized`.
    public func slots() -> [(String, FrozenWeight)] {
        var list: [(String, FrozenWeight)] = [("model.embed_tokens.weight", .dense(embed))]
        for (i, b) in blocks.enumerated() {
            let p = "model.layers.\(i)."
            list.append((p + "input_layernorm.weight", .dense(b.attnNorm)))
            for kind in [LinearKind.q, .k, .v, .o] { list.append((b.linear(kind).namePrefix + "weight", b.linear(kind).weight)) }
            list.append((p + "post_attention_layernorm.weight", .dense(b.mlpNorm)))
            for kind in [LinearKind.gate, .up, .down] { list.append((b.linear(kind).namePrefix + "weight", b.linear(kind).weight)) }
        }
        list.append(("model.norm.weight", .dense(norm)))
        if let head = untiedHead { list.append(("lm_head.weight", .dense(head))) }
        return list
    }

    /// The dense tensors of `slots()` (all of them unless base weights are quantized).
    public func named() -> [(String, Tensor)] {
        slots().compactMap { name, w in w.dense.map { (name, $0) } }
    }

    /// Whether every weight is dense (exports need that).
    public var isDense: Bool { linears.allSatisfy { $0.weight.dense != nil } }

    /// Fresh weights as in LLaMA pretraining: linears and embeddings ~ N(0, std), norm gains 1.
    /// Values come from the counter-based RNG keyed by (seed, tensor index in `slots()`, element), so
    /// they do not depend on the backend, the mode, the storage format or thread layout. A quantized
    /// weight is drawn into an f32 workspace (its master copy, if it has one) and quantized (round to nearest).
    public func initializeRandom(seed: UInt64, std: Float = 0.02, backend: Backend) throws {
        for (index, (name, slot)) in slots().enumerated() {
            switch slot {
            case .dense(let tensor):
                if tensor.shape.count == 1 {
                    backend.fill(tensor, value: 1)
                } else {
                    backend.fillNormal(tensor, std: std, seed: seed, stream: UInt64(index))
                }
            case .quantized(let q):
                let dense = q.master ?? backend.makeTensor([q.rows, q.cols], dtype: .f32, tag: .workspace, zeroed: false)
                backend.fillNormal(dense, std: std, seed: seed, stream: UInt64(index))
                if let failure = backend.quantize(dense, into: q) { throw failure.error(format: q.format, name: name) }
            }
        }
    }
}

/// Gradients of the dense trained tensors (embeddings, norms, head). Block linears keep theirs
/// (`AdaptedLinear.weightGrad` in full-rank training, the adapter's under LoRA).
public final class DenseGradients {
    public let embed: Tensor
    public let attnNorm: [Tensor]
    public let mlpNorm: [Tensor]
    public let norm: Tensor
    /// nil when the head is tied to the embedding.
    public let lmHead: Tensor?

    init(config: LlamaConfig, backend: Backend) {
        let dtype = backend.precision.gradients
        func t(_ shape: [Int]) -> Tensor { backend.makeTensor(shape, dtype: dtype, tag: .gradients) }
        embed = t([config.vocabSize, config.hiddenSize])
        attnNorm = (0..<config.numHiddenLayers).map { _ in t([config.hiddenSize]) }
        mlpNorm = (0..<config.numHiddenLayers).map { _ in t([config.hiddenSize]) }
        norm = t([config.hiddenSize])
        lmHead = config.tieWordEmbeddings ? nil : t([config.vocabSize, config.hiddenSize])
    }

    /// The gradient of the head: the embedding's own when tied.
    var head: Tensor { lmHead ?? embed }
}
