import Foundation
import ReLoRACore
import ReLoRAFormats

/// What backward keeps from forward.
/// - `none`: every block's activations stay alive until backward (fastest, most memory).
/// - `block`: only each block's input is kept; backward recomputes the block's forward into one
///   shared set of buffers just before differentiating it (one extra block forward per block,
///   activation memory ~ 1/L). Both give bit-identical gradients: the recompute runs the same ops
///   on the same inputs in the same order.
public enum GradientCheckpointing: String, Sendable, CaseIterable {
    case none
    case block
}

/// The sum of the per-token losses and how many tokens had a target.
public struct LossSum: Sendable, Equatable {
    public var sum: Double
    public var tokens: Int
    public var mean: Double { tokens > 0 ? sum / Double(tokens) : .nan }
    public init(sum: Double, tokens: Int) { self.sum = sum; self.tokens = tokens }
}

/// `LossSum` whose sum the host reads later (`LlamaModel.enqueueForwardBackward`): `resolved` is the
/// `LossSum` `forwardBackward` returns, bit for bit.
public struct PendingLossSum: Sendable {
    public let sum: DeferredSum
    public let tokens: Int
    public var resolved: LossSum { LossSum(sum: sum.value, tokens: tokens) }
}

/// A trained tensor with its gradient, as the optimizer sees it.
public struct TrainableParameter {
    /// Hugging Face name (`model.layers.0.mlp.down_proj.weight`, `...q_proj.lora_A`).
    public let name: String
    public let value: Tensor
    public let grad: Tensor
    /// A LoRA factor or scale (ReLoRA's optimizer reset applies to these only).
    public let isLoRA: Bool
    /// Which LoRA tensor (nil for dense parameters); some optimizer resets treat A and B differently.
    public var loraFactor: LoRAFactor? = nil
}

/// A LLaMA decoder (pre-norm RMSNorm, rotary attention with grouped-query heads, SwiGLU MLP) with an
/// explicit backward pass, written once against `Backend`.
///
/// Shapes: a batch is `batch` sequences of `seqLen` tokens, flattened to `N = batch * seqLen` rows.
/// `C` hidden, `F` intermediate, `H`/`Hkv` query/key-value heads of `D` dims, `V` vocabulary.
public final class LlamaModel {
    public let config: LlamaConfig
    public let backend: Backend
    public let weights: LlamaParameters
    /// Gradients of the dense trained tensors, allocated by `enableGradients()` (the linears and
    /// adapters hold their own).
    public private(set) var gradients: DenseGradients?
    public var checkpointing: GradientCheckpointing {
        didSet { if oldValue != checkpointing { workspace = nil } }
    }
    /// Whether training keeps each block's dequantized weights from its recompute to its backward
    /// (`DequantizedBlock`): where it applies (`dequantizedCacheBytes` > 0), each quantized linear but the down
    /// projection is dequantized twice per micro-batch instead of three times, for the cache's memory. Same bits
    /// either way.
    public var reusesDequantizedWeights: Bool {
        didSet { if oldValue != reusesDequantizedWeights { workspace = nil } }
    }
    /// The LoRA settings, or nil for full-rank training. With adapters the block linears are frozen
    /// (tag `.frozenWeights`, no gradient, no optimizer state).
    public private(set) var loraConfig: LoRAConfig?
    /// ReLoRA merges done so far (the restart index of the next merge).
    public package(set) var merges = 0
    /// Seed and key of the LoRA dropout masks (the trainer sets the key for each micro-batch).
    public var dropoutSeed: UInt64 = 0
    public var dropoutKey = DropoutKey()
    /// Called by `forwardBackward` once the backward of block `layer` has been enqueued (layers from the
    /// last to 0): that block's gradients are final for this micro-batch, so a data-parallel run can start
    /// summing them while the blocks below compute. nil: nothing is called.
    public var afterBlockBackward: ((_ layer: Int) -> Void)?
    private(set) var workspace: Workspace?

    /// The storage format of the frozen base weights (nil = dense).
    public let quant: QuantFormat?

    /// `quant` stores the frozen block linears of a LoRA model in a block format (needs `lora`), with an
    /// f32 master copy each in host memory if `masterCopies` (merge policy `master`).
    public init(config: LlamaConfig, backend: Backend, checkpointing: GradientCheckpointing = .none,
                lora: LoRAConfig? = nil, quant: QuantFormat? = nil, masterCopies: Bool = false,
                reusesDequantizedWeights: Bool = true) {
        precondition(quant == nil || lora != nil, "quantized base weights are frozen: they need LoRA")
        precondition(!masterCopies || quant != nil, "master copies are for quantized base weights")
        self.config = config
        self.backend = backend
        self.checkpointing = checkpointing
        self.reusesDequantizedWeights = reusesDequantizedWeights
        self.loraConfig = lora
        self.quant = quant
        self.weights = LlamaParameters(config: config, lora: lora, quant: quant, masterCopies: masterCopies, backend: backend)
    }

    /// Whether the block linears get gradients (full-rank training) or are frozen (LoRA).
    public var linearsTrainable: Bool { loraConfig == nil }

    /// The bytes of the `DequantizedBlock` a training workspace holds (tag `.workspace`, in place of the shared
    /// dequantization scratch), or 0 where none is kept: it needs `reusesDequantizedWeights`, quantized weights,
    /// block checkpointing (without it nothing is recomputed) and a backend that dequantizes whole weights.
    public var dequantizedCacheBytes: Int {
        guard reusesDequantizedWeights, quant != nil, checkpointing == .block, backend.dequantizesWholeWeight else { return 0 }
        return DequantizedBlock.bytes(config, backend: backend)
    }

    /// The adapter of one linear (LoRA models).
    public func adapter(_ layer: Int, _ kind: LinearKind) -> LoRAAdapter? { weights.blocks[layer].linear(kind).adapter }

    /// Allocates zeroed gradient buffers (tag `.gradients`) if there are none yet. Frozen linears get none.
    public func enableGradients() {
        if gradients == nil { gradients = DenseGradients(config: config, backend: backend) }
        for block in weights.blocks {
            for linear in block.linears { linear.enableWeightGradient(backend) }
            for group in block.adapterGroups { group.enableGradients(backend) }
        }
    }

    /// Every trained tensor with its gradient, in `named_parameters()` order: the dense parameters (all
    /// of them in full-rank training; embeddings, norms and head under LoRA), then the LoRA factors.
    /// Call `enableGradients()` first.
    public func trainableParameters() -> [TrainableParameter] {
        guard let g = gradients else { preconditionFailure("trainableParameters() before enableGradients()") }
        var list = [TrainableParameter(name: "model.embed_tokens.weight", value: weights.embed, grad: g.embed, isLoRA: false)]
        for (i, block) in weights.blocks.enumerated() {
            let p = "model.layers.\(i)."
            func linear(_ kind: LinearKind) {
                let l = block.linear(kind)
                if let wg = l.weightGrad, let w = l.weight.dense {
                    list.append(TrainableParameter(name: l.namePrefix + "weight", value: w, grad: wg, isLoRA: false))
                }
            }
            list.append(TrainableParameter(name: p + "input_layernorm.weight", value: block.attnNorm, grad: g.attnNorm[i], isLoRA: false))
            [LinearKind.q, .k, .v, .o].forEach(linear)
            list.append(TrainableParameter(name: p + "post_attention_layernorm.weight", value: block.mlpNorm, grad: g.mlpNorm[i], isLoRA: false))
            [LinearKind.gate, .up, .down].forEach(linear)
        }
        list.append(TrainableParameter(name: "model.norm.weight", value: weights.norm, grad: g.norm, isLoRA: false))
        if let head = g.lmHead { list.append(TrainableParameter(name: "lm_head.weight", value: weights.lmHead, grad: head, isLoRA: false)) }
        for linear in weights.linears {
            for t in linear.adapter?.trainedTensors() ?? [] {
                list.append(TrainableParameter(name: linear.namePrefix + t.suffix, value: t.value, grad: t.grad, isLoRA: true,
                                               loraFactor: t.factor))
            }
        }
        return list
    }

    /// Every LoRA tensor with its checkpoint name: `...q_proj.lora_A` `[r, in]`, `lora_B` `[out, r]`,
    /// `lora_scale` `[1]` (written whether trained or not, so the file alone defines W + s B A).
    public func loraTensors() -> [(name: String, value: Tensor)] {
        weights.linears.flatMap { l -> [(name: String, value: Tensor)] in
            guard let ad = l.adapter else { return [] }
            return [(l.namePrefix + "lora_A", ad.a), (l.namePrefix + "lora_B", ad.b), (l.namePrefix + "lora_scale", ad.scale)]
        }
    }

    public func zeroGradients() {
        for p in (gradients == nil ? [] : trainableParameters()) { backend.zero(p.grad) }
    }

    // MARK: ReLoRA merge

    /// `W <- policy(W + s B A)` for every adapted linear, then (if `reinitialize`) each adapter starts
    /// the next cycle: A re-drawn (Kaiming-uniform, keyed by seed and restart index) and B = 0, so the
    /// model's function is unchanged up to what the policy loses, unless the policy sets the factors
    /// itself (`compensate`: s B A ~ what the rounding lost). Statistics are read back in one transfer.
    @discardableResult
    public func mergeAdapters(policy: MergePolicy = ExactMerge(), seed: UInt64, reinitialize: Bool = true) throws -> MergeReport {
        guard loraConfig != nil else { preconditionFailure("mergeAdapters on a model without LoRA") }
        let start = DispatchTime.now().uptimeNanoseconds
        let linears = weights.linears, backend = self.backend, cycle = merges + 1
        let stats = backend.makeTensor([MergeStats.width * linears.count], dtype: .f32, tag: .workspace, zeroed: true)
        var compensated = false
        for (slot, linear) in linears.enumerated() {
            let key = MergeKey(seed: seed, restart: merges, tensor: linear.layer * LinearKind.allCases.count + linear.kind.rawValue)
            let next: ((LoRAAdapter) -> Void)? = reinitialize
                ? { $0.reinitialize(seed: seed, stream: Self.loraStream(cycle: cycle, linear), backend: backend) } : nil
            if try linear.merge(policy: policy, key: key, stats: stats, slot: slot, reinitialize: next, backend: backend) {
                compensated = true
            }
        }
        let s = backend.download(stats)
        func total(_ index: Int) -> Double {
            (0..<linears.count).reduce(0.0) { $0 + Double(s[MergeStats.width * $1 + index]) }
        }
        let updateSq = total(MergeStats.update), weightSq = total(MergeStats.weight), lostSq = total(MergeStats.lost)
        let quantizedWeights = linears.reduce(0) { $0 + ($1.weight.quantized.map { $0.rows * $0.cols } ?? 0) }
        let report = MergeReport(restart: merges, policy: policy.name,
                                 seconds: Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9,
                                 relativeUpdate: weightSq > 0 ? (updateSq / weightSq).squareRoot() : 0,
                                 mergeError: updateSq > 0 ? (lostSq / updateSq).squareRoot() : 0,
                                 codesChanged: quantizedWeights > 0 ? total(MergeStats.changedCodes) / Double(quantizedWeights) : nil,
                                 residualRecovered: compensated
                                    ? (lostSq > 0 ? 1 - (total(MergeStats.uncompensated) / lostSq).squareRoot() : 1) : nil)
        merges += 1
        return report
    }

    /// Merges the current cycle exactly and removes the adapters: a plain model computing `x (W + s B A)^T`,
    /// for export, evaluation and sampling (no adapter GEMMs left). Not for training; needs dense W.
    public func foldAdapters() throws {
        guard loraConfig != nil else { return }
        precondition(weights.isDense, "foldAdapters needs dense base weights (load quantized ones dequantized)")
        try mergeAdapters(policy: ExactMerge(), seed: 0, reinitialize: false)
        for linear in weights.linears { linear.detachAdapter() }
        loraConfig = nil
        workspace = nil
    }

    /// Fresh adapters (A Kaiming-uniform, B = 0) for the current cycle without merging: the state right
    /// after wrapping (cycle 0) or after a restart. A's stream is distinct per (cycle, layer, kind).
    public func initializeLoRA(seed: UInt64) {
        for linear in weights.linears {
            linear.adapter?.reinitialize(seed: seed, stream: Self.loraStream(cycle: merges, linear), backend: backend)
        }
    }

    /// The stream of A's initialisation in cycle `cycle` (the number of merges before it).
    static func loraStream(cycle: Int, _ linear: AdaptedLinear) -> UInt64 {
        (UInt64(cycle) << 32) | (UInt64(linear.layer) << 8) | UInt64(linear.kind.rawValue)
    }

    // MARK: Public entry points

    /// Forward only: the summed next-token loss over positions whose target is >= 0.
    /// `inputs`, `targets`: `[batch * seqLen]` token ids, row-major by sequence.
    public func loss(inputs: [Int32], targets: [Int32], batch: Int, seqLen: Int) throws -> LossSum {
        try enqueueLoss(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen).resolved
    }

    /// `loss` whose sum the host reads later (`Backend.crossEntropyDeferred`): on a device nothing in it waits
    /// for the device, so an evaluation can queue its next batch before reading this one's loss.
    public func enqueueLoss(inputs: [Int32], targets: [Int32], batch: Int, seqLen: Int) throws -> PendingLossSum {
        try validate(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen)
        let ws = prepareWorkspace(batch: batch, seqLen: seqLen, training: false)
        backend.upload(inputs, to: ws.ids)
        backend.upload(targets, to: ws.targets)
        forward(ws)
        computeLogits(ws)
        let sum = backend.crossEntropyDeferred(logits: ws.logits, targets: ws.targets, losses: ws.losses, rows: ws.tokens,
                                               vocab: config.vocabSize, gradScale: nil, ld: ws.vocabStride)
        return PendingLossSum(sum: sum, tokens: targets.count { $0 >= 0 })
    }

    /// Forward and backward. Accumulates into the gradients the gradient of
    /// `gradScale * sum(per-token losses)`; `gradScale = 1 / tokens` gives the mean loss's gradient.
    /// Returns the loss sum of this batch. Call `enableGradients()` first. Host traffic: the ids and
    /// targets up, the loss sum down.
    @discardableResult
    public func forwardBackward(inputs: [Int32], targets: [Int32], batch: Int, seqLen: Int,
                                gradScale: Float) throws -> LossSum {
        try enqueueForwardBackward(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen, gradScale: gradScale).resolved
    }

    /// `forwardBackward` whose loss sum the host reads later (`Backend.crossEntropyDeferred`): on a device
    /// nothing in it waits for the device, so a step's micro-batches queue one after another and their losses
    /// come back with the step's one synchronization.
    public func enqueueForwardBackward(inputs: [Int32], targets: [Int32], batch: Int, seqLen: Int,
                                       gradScale: Float) throws -> PendingLossSum {
        guard let grads = gradients else { preconditionFailure("forwardBackward before enableGradients()") }
        try validate(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen)
        let ws = prepareWorkspace(batch: batch, seqLen: seqLen, training: true)
        let n = batch * seqLen, c = config.hiddenSize, vocab = config.vocabSize
        let last = ws.xs[config.numHiddenLayers]
        backend.upload(inputs, to: ws.ids)
        backend.upload(targets, to: ws.targets)

        forward(ws)
        computeLogits(ws)
        // Fused: logits become dL/dlogits in place.
        let sum = backend.crossEntropyDeferred(logits: ws.logits, targets: ws.targets, losses: ws.losses, rows: n, vocab: vocab,
                                               gradScale: gradScale, ld: ws.vocabStride)
        let dlogits = ws.logits

        // Head: dW_head[V,C] += dlogits^T lnf; dlnf[N,C] = dlogits W_head.
        let gemms = backend.profiler?.attributeGEMMs(to: .gemmHead)
        backend.matmul(dlogits, ws.lnf, grads.head, m: vocab, n: c, k: n, transA: true, beta: 1, lda: ws.vocabStride)
        backend.matmul(dlogits, weights.lmHead, ws.dln, m: n, n: c, k: vocab, lda: ws.vocabStride)
        gemms?.end()
        backend.zero(ws.dres)
        backend.rmsnormBackward(ws.dln, x: last, weight: weights.norm, rstd: ws.rstdf, dx: ws.dres,
                                dweight: grads.norm, rows: n, dim: c)

        for layer in stride(from: config.numHiddenLayers - 1, through: 0, by: -1) {
            let acts: BlockActivations
            if checkpointing == .block {
                acts = ws.blocks[0]
                ws.dequantCache?.keep(layer)  // the recompute's dequantized weights serve this block's backward
                blockForward(layer, input: ws.xs[layer], output: nil, acts, ws)
            } else {
                acts = ws.blocks[layer]
            }
            blockBackward(layer, input: ws.xs[layer], acts, ws, grads)
            ws.dequantCache?.forget()
            afterBlockBackward?(layer)
        }
        backend.embeddingBackward(ids: ws.ids, dout: ws.dres, dtable: grads.embed, dim: c)
        return PendingLossSum(sum: sum, tokens: targets.count { $0 >= 0 })
    }

    /// Logits `[batch * seqLen, V]` for every position (tests, sampling).
    public func logits(inputs: [Int32], batch: Int, seqLen: Int) throws -> [Float] {
        let none = [Int32](repeating: -1, count: inputs.count)
        try validate(inputs: inputs, targets: none, batch: batch, seqLen: seqLen)
        let ws = prepareWorkspace(batch: batch, seqLen: seqLen, training: false)
        backend.upload(inputs, to: ws.ids)
        forward(ws)
        computeLogits(ws)
        return downloadLogits(ws, rows: 0..<ws.tokens)
    }

    /// Rows `rows` of the logits as host floats `[rows.count, V]` (one download; the padding dropped).
    private func downloadLogits(_ ws: Workspace, rows: Range<Int>) -> [Float] {
        let v = config.vocabSize, stride = ws.vocabStride
        let stored = backend.download(ws.logits.view(offset: rows.lowerBound * stride, shape: [rows.count * stride]))
        guard stride != v else { return stored }
        return (0..<rows.count).flatMap { stored[$0 * stride ..< $0 * stride + v] }
    }

    // MARK: Decoding with a KV cache

    /// Feeds `tokens` after what `cache` holds and returns the logits `[V]` of the last of them (host
    /// floats, one download). An empty cache runs the ordinary forward over the tokens (batch 1) and keeps
    /// every layer's rotated keys and values; a non-empty one decodes the tokens one at a time, each a
    /// one-row forward whose attention reads the cache (`Backend.ropeAt`, `attentionDecode`). The logits
    /// equal `logits(inputs: all tokens so far)`'s last row up to the products' summation order
    /// (docs/checkpoints-and-export.md, "Sampling with a KV cache").
    public func logits(appending tokens: [Int32], to cache: KVCache) throws -> [Float] {
        guard !tokens.isEmpty else { throw ReLoRAError.invalidData("no tokens to append to the KV cache") }
        guard cache.count + tokens.count <= cache.capacity else {
            throw ReLoRAError.invalidData(
                "the KV cache holds \(cache.count) of \(cache.capacity) positions; \(tokens.count) more do not fit")
        }
        let none = [Int32](repeating: -1, count: tokens.count)
        if cache.count == 0 {
            try validate(inputs: tokens, targets: none, batch: 1, seqLen: tokens.count)
            let ws = prepareWorkspace(batch: 1, seqLen: tokens.count, training: false)
            backend.upload(tokens, to: ws.ids)
            forward(ws, attention: .fill(cache))
            cache.count = tokens.count
            computeLogits(ws)
            return downloadLogits(ws, rows: tokens.count - 1 ..< tokens.count)
        }
        try validate(inputs: tokens, targets: none, batch: 1, seqLen: 1)
        let ws = prepareWorkspace(batch: 1, seqLen: 1, training: false)
        for token in tokens {
            backend.upload([token], to: ws.ids)
            forward(ws, attention: .decode(cache, position: cache.count))
            cache.count += 1
        }
        computeLogits(ws)
        return downloadLogits(ws, rows: 0..<1)
    }

    // MARK: Validation

    /// Refuses a model `backend`'s kernels cannot run (a head_dim past the CUDA attention kernels'), before
    /// anything is allocated or a kernel call fails.
    public static func checkSupported(_ config: LlamaConfig, on backend: Backend) throws {
        if let limit = backend.maxAttentionHeadDim, config.headDim > limit {
            throw ReLoRAError.unsupported(
                "the model's head_dim \(config.headDim) exceeds \(limit), the most the \(backend.name) attention kernels take; use --device cpu")
        }
    }

    private func validate(inputs: [Int32], targets: [Int32], batch: Int, seqLen: Int) throws {
        try Self.checkSupported(config, on: backend)
        guard batch > 0, seqLen > 0 else {
            throw ReLoRAError.invalidData("batch size and sequence length must be positive, got \(batch) x \(seqLen)")
        }
        guard seqLen <= config.maxPositionEmbeddings else {
            throw ReLoRAError.invalidData(
                "sequence length \(seqLen) exceeds the model's max_position_embeddings \(config.maxPositionEmbeddings); use a shorter --seq-len")
        }
        guard inputs.count == batch * seqLen, targets.count == inputs.count else {
            throw ReLoRAError.invalidData(
                "expected \(batch * seqLen) input ids and targets for \(batch) x \(seqLen), got \(inputs.count) and \(targets.count)")
        }
        let vocab = Int32(config.vocabSize)
        if let bad = inputs.firstIndex(where: { $0 < 0 || $0 >= vocab }) {
            throw ReLoRAError.invalidData(
                "token id \(inputs[bad]) at position \(bad) is outside the vocabulary [0, \(vocab)); the data was tokenized for another model")
        }
        if let bad = targets.firstIndex(where: { $0 >= vocab }) {
            throw ReLoRAError.invalidData(
                "target id \(targets[bad]) at position \(bad) is outside the vocabulary [0, \(vocab))")
        }
    }

    // MARK: Forward

    /// Final norm and LM head over the last residual: `ws.logits = rmsnorm(xs[L]) W_head^T`, `[N, V]`.
    private func computeLogits(_ ws: Workspace) {
        backend.rmsnormForward(ws.xs[config.numHiddenLayers], weight: weights.norm, out: ws.lnf, rstd: ws.rstdf,
                               rows: ws.tokens, dim: config.hiddenSize, eps: Float(config.rmsNormEps))
        let gemms = backend.profiler?.attributeGEMMs(to: .gemmHead); defer { gemms?.end() }
        backend.matmul(ws.lnf, weights.lmHead, ws.logits, m: ws.tokens, n: config.vocabSize, k: config.hiddenSize, transB: true,
                       ldc: ws.vocabStride)
    }

    /// How a forward's attention sees the sequence: causal over the workspace's tokens (training,
    /// evaluation), the same while keeping every layer's keys and values in a cache (the first call of a
    /// decode), or one token at `position` reading the cache (`ws` of one token).
    enum AttentionMode {
        case causal
        case fill(KVCache)
        case decode(KVCache, position: Int)
    }

    private func forward(_ ws: Workspace, attention: AttentionMode = .causal) {
        backend.embeddingForward(ids: ws.ids, table: weights.embed, out: ws.xs[0], dim: config.hiddenSize)
        for layer in 0..<config.numHiddenLayers {
            let acts = checkpointing == .block || !ws.training ? ws.blocks[0] : ws.blocks[layer]
            blockForward(layer, input: ws.xs[layer], output: ws.xs[layer + 1], acts, ws, attention: attention)
        }
    }

    /// One pre-norm block: `res2 = x + o(attn(rope(q(ln1 x)), rope(k(ln1 x)), v(ln1 x)))`,
    /// `out = res2 + down(silu(gate(ln2 res2)) * up(ln2 res2))`. `output == nil` recomputes the
    /// saved activations only (checkpointed backward).
    private func blockForward(_ layer: Int, input x: Tensor, output: Tensor?, _ a: BlockActivations, _ ws: Workspace,
                              attention: AttentionMode = .causal) {
        let w = weights.blocks[layer]
        let n = ws.tokens, c = config.hiddenSize
        let eps = Float(config.rmsNormEps), theta = Float(config.ropeTheta)
        let heads = config.numAttentionHeads, kvHeads = config.numKeyValueHeads, d = config.headDim
        backend.rmsnormForward(x, weight: w.attnNorm, out: a.ln1, rstd: a.rstd1, rows: n, dim: c, eps: eps)
        groupForward(layer, [.q, .k, .v], x: a.ln1, outputs: [a.q, a.k, a.v], beta: 0, a, ws)
        switch attention {
        case .causal, .fill:
            backend.rope(a.q, batch: ws.batch, seqLen: ws.seqLen, heads: heads, headDim: d, theta: theta, inverse: false)
            backend.rope(a.k, batch: ws.batch, seqLen: ws.seqLen, heads: kvHeads, headDim: d, theta: theta, inverse: false)
            if case .fill(let cache) = attention {
                let width = config.keyValueWidth
                backend.copy(a.k, to: cache.keys[layer].view(offset: 0, shape: [n, width]))
                backend.copy(a.v, to: cache.values[layer].view(offset: 0, shape: [n, width]))
            }
            backend.attentionForward(q: a.q, k: a.k, v: a.v, out: a.attn, lse: a.lse, batch: ws.batch, seqLen: ws.seqLen,
                                     heads: heads, kvHeads: kvHeads, headDim: d)
        case .decode(let cache, let position):
            backend.ropeAt(a.q, rows: 1, position: position, heads: heads, headDim: d, theta: theta)
            backend.ropeAt(a.k, rows: 1, position: position, heads: kvHeads, headDim: d, theta: theta)
            let width = config.keyValueWidth
            backend.copy(a.k, to: cache.keys[layer].view(offset: position * width, shape: [1, width]))
            backend.copy(a.v, to: cache.values[layer].view(offset: position * width, shape: [1, width]))
            backend.attentionDecode(q: a.q, kCache: cache.keys[layer], vCache: cache.values[layer], out: a.attn,
                                    position: position, heads: heads, kvHeads: kvHeads, headDim: d)
        }
        backend.copy(x, to: a.res2)
        groupForward(layer, [.o], x: a.attn, outputs: [a.res2], beta: 1, a, ws)
        backend.rmsnormForward(a.res2, weight: w.mlpNorm, out: a.ln2, rstd: a.rstd2, rows: n, dim: c, eps: eps)
        let fs = ws.mlpStride
        groupForward(layer, [.gate, .up], x: a.ln2, outputs: [a.gate, a.up], beta: 0, a, ws, ldOut: fs)
        // Whole padded rows: the padding columns are zeros in and zeros out (`Workspace.mlpStride`).
        backend.swigluForward(gate: a.gate, up: a.up, out: a.h, count: n * fs)
        if let out = output {
            backend.copy(a.res2, to: out)
            groupForward(layer, [.down], x: a.h, outputs: [out], beta: 1, a, ws, ldIn: fs)
        } else if let group = w.group(.down), let uT = a.loraUT {
            // Checkpointed recompute: the block output is not needed, but the down adapter's projection is.
            group.project(a.h, into: a.groupRows(uT, first: .down, size: 1, tokens: n), tokens: n, ldx: fs, context(ws))
        }
    }

    /// `y_i = x W_i^T + beta * y_i` for the linears `kinds` (one adapter group: they read the same x),
    /// then, with adapters, the group's projection `uT = A drop(x)^T` (saved) and `y_i += s uT_i^T B_i^T`.
    /// `ldIn`, `ldOut`: the row strides of x and of the y_i (0 = packed; `Workspace.mlpStride`).
    private func groupForward(_ layer: Int, _ kinds: [LinearKind], x: Tensor, outputs: [Tensor], beta: Float,
                              _ a: BlockActivations, _ ws: Workspace, ldIn: Int = 0, ldOut: Int = 0) {
        let block = weights.blocks[layer], n = ws.tokens
        let ctx = context(ws)
        for (kind, y) in zip(kinds, outputs) {
            block.linear(kind).forwardBase(x, y, beta: beta, tokens: n, ldx: ldIn, ldy: ldOut, ctx)
        }
        guard let group = block.group(kinds[0]), let uTAll = a.loraUT else { return }
        let uT = a.groupRows(uTAll, first: kinds[0], size: kinds.count, tokens: n)
        group.project(x, into: uT, tokens: n, ldx: ldIn, ctx)
        for (i, (kind, y)) in zip(kinds, outputs).enumerated() {
            block.linear(kind).addAdapterOutput(group.member(uT, i, n), y, tokens: n, ldy: ldOut, backend)
        }
    }

    /// Backward of `groupForward`: `dx = sum_i dy_i W_i + dxBeta * dx` (and dW_i when trained), then the
    /// adapters: each member's `gT_i = B_i^T dy_i^T`, dB_i, ds_i, and the group's dA and input gradient.
    /// `ldIn`: the row stride of x and dx, `ldOut` of the dy_i (as `groupForward`'s).
    private func groupBackward(_ layer: Int, _ kinds: [LinearKind], dys: [Tensor], x: Tensor, dx: Tensor, dxBeta: Float,
                               _ a: BlockActivations, _ ws: Workspace, ldIn: Int = 0, ldOut: Int = 0) {
        let block = weights.blocks[layer], n = ws.tokens, ctx = context(ws)
        for (i, (kind, dy)) in zip(kinds, dys).enumerated() {
            block.linear(kind).backwardBase(dy: dy, x: x, dx: dx, dxBeta: i == 0 ? dxBeta : 1, tokens: n, ldIn: ldIn, ldOut: ldOut, ctx)
        }
        guard let group = block.group(kinds[0]), let uTAll = a.loraUT, let gTAll = ws.gT else { return }
        let uT = a.groupRows(uTAll, first: kinds[0], size: kinds.count, tokens: n)
        let gT = gTAll.view(offset: 0, shape: [kinds.count * group.rank, n])
        for (i, (kind, dy)) in zip(kinds, dys).enumerated() {
            block.linear(kind).adapterOutputBackward(dy: dy, uT: group.member(uT, i, n), gT: group.member(gT, i, n), tokens: n,
                                                     lddy: ldOut, backend)
        }
        group.inputBackward(x: x, gT: gT, dx: dx, tokens: n, ldx: ldIn, ctx)
    }

    private func context(_ ws: Workspace) -> LinearContext {
        LinearContext(backend: backend, dropout: ws.training ? Float(loraConfig?.dropout ?? 0) : 0,
                      dropoutSeed: dropoutSeed, dropoutKey: dropoutKey, gT: ws.gT, dequantScratch: ws.dequantScratch,
                      dequantCache: ws.dequantCache, loraX: ws.loraX)
    }

    // MARK: Backward

    /// On entry `ws.dres` holds dL/d(block output); on exit dL/d(block input). Parameter gradients
    /// accumulate into `grads` (and the adapters). Input gradients are `dx = dy W`; weight gradients
    /// `dW[out,in] += dy^T x` only when the linears are trainable.
    private func blockBackward(_ layer: Int, input x: Tensor, _ a: BlockActivations, _ ws: Workspace,
                               _ grads: DenseGradients) {
        let w = weights.blocks[layer]
        let n = ws.tokens, c = config.hiddenSize, fs = ws.mlpStride
        let theta = Float(config.ropeTheta)
        let dres: Tensor = ws.dres

        // MLP: out = res2 + down(h), h = silu(gate) * up (rows of stride fs; the padding stays zero).
        groupBackward(layer, [.down], dys: [dres], x: a.h, dx: ws.dh, dxBeta: 0, a, ws, ldIn: fs)
        backend.swigluBackward(dout: ws.dh, gate: a.gate, up: a.up, dgate: ws.dgate, dup: ws.dup, count: n * fs)
        groupBackward(layer, [.gate, .up], dys: [ws.dgate, ws.dup], x: a.ln2, dx: ws.dln, dxBeta: 0, a, ws, ldOut: fs)
        // dres becomes dL/d(res2): the residual path plus the MLP norm's input gradient.
        backend.rmsnormBackward(ws.dln, x: a.res2, weight: w.mlpNorm, rstd: a.rstd2, dx: dres, dweight: grads.mlpNorm[layer],
                                rows: n, dim: c)

        // Attention: res2 = x + o(attn).
        groupBackward(layer, [.o], dys: [dres], x: a.attn, dx: ws.dattn, dxBeta: 0, a, ws)
        backend.attentionBackward(dout: ws.dattn, q: a.q, k: a.k, v: a.v, out: a.attn, lse: a.lse,
                                  dq: ws.dq, dk: ws.dk, dv: ws.dv, batch: ws.batch, seqLen: ws.seqLen,
                                  heads: config.numAttentionHeads, kvHeads: config.numKeyValueHeads,
                                  headDim: config.headDim)
        backend.rope(ws.dq, batch: ws.batch, seqLen: ws.seqLen, heads: config.numAttentionHeads,
                     headDim: config.headDim, theta: theta, inverse: true)
        backend.rope(ws.dk, batch: ws.batch, seqLen: ws.seqLen, heads: config.numKeyValueHeads,
                     headDim: config.headDim, theta: theta, inverse: true)
        groupBackward(layer, [.q, .k, .v], dys: [ws.dq, ws.dk, ws.dv], x: a.ln1, dx: ws.dln, dxBeta: 0, a, ws)
        backend.rmsnormBackward(ws.dln, x: x, weight: w.attnNorm, rstd: a.rstd1, dx: dres, dweight: grads.attnNorm[layer],
                                rows: n, dim: c)
    }

    // MARK: Buffers

    private func prepareWorkspace(batch: Int, seqLen: Int, training: Bool) -> Workspace {
        if let ws = workspace, ws.batch == batch, ws.seqLen == seqLen, ws.training || !training { return ws }
        workspace = nil  // free the old buffers before allocating the new ones
        let ws = Workspace(config: config, backend: backend, batch: batch, seqLen: seqLen, training: training,
                           savedBlocks: training && checkpointing == .none ? config.numHiddenLayers : 1,
                           lora: loraConfig, quant: quant, dequantizedBlock: training && dequantizedCacheBytes > 0)
        workspace = ws
        return ws
    }
}

/// The rotated keys and values of every layer for the positions decoded so far (`LlamaModel.logits(appending:to:)`).
/// Each layer holds `[capacity, kvHeads * headDim]` keys and values in the activation dtype (tag `.activations`):
/// `2 * L * capacity * kvHeads * headDim` elements in all.
public final class KVCache {
    public let capacity: Int
    /// Positions filled (the next token's position).
    public internal(set) var count = 0
    let keys: [Tensor], values: [Tensor]

    /// A cache for `capacity` positions (default and most: the model's `max_position_embeddings`).
    public init(model: LlamaModel, capacity: Int? = nil) {
        let cfg = model.config
        let rows = min(capacity ?? cfg.maxPositionEmbeddings, cfg.maxPositionEmbeddings)
        self.capacity = rows
        let dtype = model.backend.precision.activations
        func make() -> [Tensor] {
            (0..<cfg.numHiddenLayers).map { _ in
                model.backend.makeTensor([rows, cfg.keyValueWidth], dtype: dtype, tag: .activations, zeroed: false)
            }
        }
        keys = make()
        values = make()
    }

    /// Forgets every position (the tensors stay allocated).
    public func reset() { count = 0 }
}

/// One block's forward values that its backward reads. Rows are tokens.
final class BlockActivations {
    let ln1, rstd1, q, k, v, attn, lse, res2, ln2, rstd2, gate, up, h: Tensor
    /// The adapters' projections `uT = A drop(x)^T`, `[7r, N]`: rows `kind.rawValue * r ..< +r` per
    /// linear, so each adapter group's rows are contiguous (nil without LoRA).
    let loraUT: Tensor?
    let loraRank: Int

    /// `mlpStride`: the row stride of gate, up and h (`Workspace.mlpStride`; zeroed when it pads).
    init(_ cfg: LlamaConfig, _ backend: Backend, batch: Int, seqLen: Int, loraRank: Int?, mlpStride: Int) {
        let n = batch * seqLen, c = cfg.hiddenSize, fs = mlpStride
        let dtype = backend.precision.activations
        func t(_ shape: [Int]) -> Tensor { backend.makeTensor(shape, dtype: dtype, tag: .activations, zeroed: false) }
        func padded(_ shape: [Int]) -> Tensor {
            backend.makeTensor(shape, dtype: dtype, tag: .activations, zeroed: fs != cfg.intermediateSize)
        }
        // Per-row statistics the backward reads (RMSNorm's 1/rms, attention's log-sum-exp) stay f32 on
        // every backend: they are small, and a bf16 rstd or lse would cost the backward 8 bits.
        func stat(_ shape: [Int]) -> Tensor { backend.makeTensor(shape, dtype: .f32, tag: .activations, zeroed: false) }
        ln1 = t([n, c]); rstd1 = stat([n])
        q = t([n, cfg.queryWidth]); k = t([n, cfg.keyValueWidth]); v = t([n, cfg.keyValueWidth])
        attn = t([n, cfg.queryWidth]); lse = stat([batch, cfg.numAttentionHeads, seqLen])
        res2 = t([n, c]); ln2 = t([n, c]); rstd2 = stat([n])
        gate = padded([n, fs]); up = padded([n, fs]); h = padded([n, fs])
        loraUT = loraRank.map { t([LinearKind.allCases.count * $0, n]) }
        self.loraRank = loraRank ?? 0
    }

    /// The rows of the group that starts at `first` and has `size` members: `[size * r, n]`.
    func groupRows(_ uT: Tensor, first: LinearKind, size: Int, tokens n: Int) -> Tensor {
        uT.view(offset: first.rawValue * loraRank * n, shape: [size * loraRank, n])
    }
}

/// Every buffer one forward (and backward) over a `[batch, seqLen]` batch needs.
final class Workspace {
    let batch: Int, seqLen: Int, tokens: Int
    let training: Bool
    /// Residual stream: `xs[l]` is block l's input `[N, C]`; `xs[L]` the last block's output.
    let xs: [Tensor]
    /// L sets without checkpointing while training, else one set reused by every block.
    let blocks: [BlockActivations]
    /// i32 token ids and targets `[N]`, uploaded once per batch.
    let ids, targets: Tensor
    /// Where quantized base weights are dequantized (models with quantized weights): large enough for
    /// the backend's scratch of the largest linear (`Backend.dequantizeScratchShape`). nil when
    /// `dequantCache` takes its place.
    let dequantScratch: Tensor?
    /// Row strides of the `[N, F]` MLP activations (gate, up, h and their gradients) and of the `[N, V]`
    /// logits: `Backend.rowPadding`'s (F and V themselves on the CPU). Padded MLP rows are allocated zeroed
    /// and only their logical columns are ever written (products through row strides; SwiGLU maps the
    /// zero padding to zero), so the padding stays zero and SwiGLU can run over whole rows. The logits'
    /// padding is never read.
    let mlpStride: Int, vocabStride: Int
    /// A slot per linear of one block (`DequantizedBlock`), kept from a block's recompute to its backward
    /// (training workspaces of `LlamaModel.dequantizedCacheBytes` > 0).
    let dequantCache: DequantizedBlock?
    let lnf, rstdf, logits, losses: Tensor
    // Backward scratch (allocated only for training).
    let dres, dln, dq, dk, dv, dattn, dh, dgate, dup: Tensor!
    /// LoRA scratch (training): a group's `gT = B^T dy^T` `[3r, N]`, and the adapter's dropped-out input /
    /// input gradient `[N, max(C, F)]` (only with dropout).
    let gT, loraX: Tensor?

    init(config cfg: LlamaConfig, backend: Backend, batch: Int, seqLen: Int, training: Bool, savedBlocks: Int,
         lora: LoRAConfig?, quant: QuantFormat?, dequantizedBlock: Bool) {
        self.batch = batch; self.seqLen = seqLen; self.training = training
        let n = batch * seqLen, c = cfg.hiddenSize
        tokens = n
        mlpStride = backend.rowPadding.stride(cfg.intermediateSize)
        vocabStride = backend.rowPadding.stride(cfg.vocabSize)
        let fs = mlpStride, pads = mlpStride != cfg.intermediateSize
        let dtype = backend.precision.activations
        func act(_ shape: [Int]) -> Tensor { backend.makeTensor(shape, dtype: dtype, tag: .activations, zeroed: false) }
        func scratch(_ shape: [Int], zeroed: Bool = false) -> Tensor {
            backend.makeTensor(shape, dtype: dtype, tag: .workspace, zeroed: zeroed)
        }
        xs = (0...cfg.numHiddenLayers).map { _ in act([n, c]) }
        blocks = (0..<savedBlocks).map { _ in
            BlockActivations(cfg, backend, batch: batch, seqLen: seqLen, loraRank: lora?.rank, mlpStride: fs)
        }
        let cache = quant != nil && dequantizedBlock ? DequantizedBlock(cfg, backend: backend) : nil
        dequantCache = cache
        dequantScratch = quant.flatMap { _ in
            guard cache == nil else { return nil }
            let elements = LinearKind.allCases.map { kind -> Int in
                let (out, inF) = kind.shape(cfg)
                return backend.dequantizeScratchShape(rows: out, cols: inF).reduce(1, *)
            }.max()!
            return backend.makeTensor([elements], dtype: backend.precision.frozenWeights, tag: .workspace, zeroed: false)
        }
        ids = backend.makeTensor([n], dtype: .i32, tag: .activations, zeroed: false)
        targets = backend.makeTensor([n], dtype: .i32, tag: .activations, zeroed: false)
        // rstd and per-token losses in f32 (see BlockActivations); logits in the activation dtype.
        lnf = act([n, c]); rstdf = backend.makeTensor([n], dtype: .f32, tag: .activations, zeroed: false)
        logits = act([n, vocabStride]); losses = backend.makeTensor([n], dtype: .f32, tag: .activations, zeroed: false)
        if training {
            dres = scratch([n, c]); dln = scratch([n, c])
            dq = scratch([n, cfg.queryWidth]); dk = scratch([n, cfg.keyValueWidth]); dv = scratch([n, cfg.keyValueWidth])
            dattn = scratch([n, cfg.queryWidth])
            dh = scratch([n, fs], zeroed: pads); dgate = scratch([n, fs], zeroed: pads); dup = scratch([n, fs], zeroed: pads)
            gT = lora.map { scratch([3 * $0.rank, n]) }
            loraX = lora.flatMap { $0.dropout > 0 ? scratch([n, max(c, fs, cfg.queryWidth)]) : nil }
        } else {
            dres = nil; dln = nil; dq = nil; dk = nil; dv = nil; dattn = nil; dh = nil; dgate = nil; dup = nil
            gT = nil; loraX = nil
        }
    }
}
