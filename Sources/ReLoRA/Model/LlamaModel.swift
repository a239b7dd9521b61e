import Foundation

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

/// A LLaMA decoder (pre-norm RMSNorm, rotary attention with grouped-query heads, SwiGLU MLP) with an
/// explicit backward pass, written once against `Backend`.
///
/// Shapes: a batch is `batch` sequences of `seqLen` tokens, flattened to `N = batch * seqLen` rows.
/// `C` hidden, `F` intermediate, `H`/`Hkv` query/key-value heads of `D` dims, `V` vocabulary.
public final class LlamaModel: @unchecked Sendable {
    public let config: LlamaConfig
    public let backend: Backend
    public let weights: LlamaWeights
    /// Parameter gradients (same layout as `weights`), allocated by `enableGradients()`.
    public private(set) var gradients: LlamaWeights?
    public var checkpointing: GradientCheckpointing {
        didSet { if oldValue != checkpointing { workspace = nil } }
    }
    /// LoRA adapters on every block linear, or nil for full-rank training. With adapters the block
    /// linears are frozen (tag `.frozenWeights`, no gradient, no optimizer state).
    public let lora: LoRALayers?
    /// Seed and step that key the LoRA dropout masks (set by the trainer each step).
    public var dropoutSeed: UInt64 = 0
    public var dropoutStep = 0
    private var workspace: Workspace?

    public init(config: LlamaConfig, backend: Backend, checkpointing: GradientCheckpointing = .none,
                lora: LoRAConfig? = nil) {
        self.config = config
        self.backend = backend
        self.checkpointing = checkpointing
        self.weights = LlamaWeights(config: config, backend: backend, tag: .trainable,
                                    linears: lora == nil ? .same : .tagged(.frozenWeights))
        self.lora = lora.map { LoRALayers(config: $0, model: config, backend: backend) }
    }

    /// Whether the block linears get gradients (full-rank training) or are frozen (LoRA).
    public var linearsTrainable: Bool { lora == nil }

    /// Allocates zeroed gradient buffers (tag `.gradients`) if there are none yet. Frozen linears get none.
    public func enableGradients() {
        if gradients == nil {
            gradients = LlamaWeights(config: config, backend: backend, tag: .gradients,
                                     linears: linearsTrainable ? .same : .absent)
        }
    }

    /// Every trained tensor with its gradient: the dense parameters (all of them in full-rank
    /// training; embeddings, norms and head under LoRA) and the LoRA factors. `isLoRA` marks the
    /// ones ReLoRA's optimizer reset applies to. Call `enableGradients()` first.
    public func trainableParameters() -> [(name: String, value: Tensor, grad: Tensor, isLoRA: Bool)] {
        guard let grads = gradients else { preconditionFailure("trainableParameters() before enableGradients()") }
        let gradByName = Dictionary(uniqueKeysWithValues: grads.named())
        var list = weights.named().compactMap { name, t -> (String, Tensor, Tensor, Bool)? in
            gradByName[name].map { (name, t, $0, false) }
        }
        for p in lora?.named() ?? [] { list.append((p.name, p.value, p.grad, true)) }
        return list
    }

    public func zeroGradients() {
        guard let g = gradients else { return }
        for (_, t) in g.named() { backend.zero(t) }
        for p in lora?.named() ?? [] { backend.zero(p.grad) }
    }

    // MARK: ReLoRA merge

    /// What one merge did.
    public struct MergeReport: Sendable {
        /// Index of this merge (0 for the first).
        public var restart: Int
        public var seconds: Double
        /// ||s B A||_F / ||W||_F summed over all adapted matrices (how large the merged update was).
        public var relativeUpdate: Double
    }

    /// `W += s * B * A` for every adapted linear (exact in fp32 for dense W), then A re-drawn
    /// (Kaiming-uniform, keyed by seed and restart index) and B = 0, so the model's function is unchanged.
    @discardableResult
    public func mergeLoRA(seed: UInt64) -> MergeReport {
        guard let lora else { preconditionFailure("mergeLoRA on a model without LoRA") }
        let start = DispatchTime.now().uptimeNanoseconds
        var updateSq = 0.0, weightSq = 0.0
        for (layer, row) in lora.adapters.enumerated() {
            for kind in LinearKind.allCases {
                let ad = row[kind.rawValue]
                let w = weights.blocks[layer].linear(kind)
                let s = backend.download(ad.scale)[0]
                let before = backend.sumOfSquares(w)
                // Accumulate ||sBA||^2 via a scratch product (small relative to the merge itself).
                let delta = backend.makeTensor(w.shape, tag: .workspace, zeroed: false)
                backend.matmul(ad.b, ad.a, delta, m: ad.outFeatures, n: ad.inFeatures, k: ad.rank,
                               transA: false, transB: false, alpha: s, beta: 0)
                updateSq += backend.sumOfSquares(delta)
                weightSq += before
                backend.axpy(1, delta, w)
            }
        }
        let report = MergeReport(restart: lora.merges,
                                 seconds: Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9,
                                 relativeUpdate: weightSq > 0 ? (updateSq / weightSq).squareRoot() : 0)
        lora.merges += 1
        lora.reinitializeAll(seed: seed, backend: backend)
        return report
    }

    /// Fresh adapters (A Kaiming-uniform, B = 0) without merging: the state right after wrapping.
    public func initializeLoRA(seed: UInt64) {
        lora?.reinitializeAll(seed: seed, backend: backend)
    }

    // MARK: Public entry points

    /// Forward only: the summed next-token loss over positions whose target is >= 0.
    /// `inputs`, `targets`: `[batch * seqLen]` token ids, row-major by sequence.
    public func loss(inputs: [Int32], targets: [Int32], batch: Int, seqLen: Int) throws -> LossSum {
        try validate(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen)
        let ws = prepareWorkspace(batch: batch, seqLen: seqLen, training: false)
        forward(inputs, ws)
        computeLogits(ws)
        let n = batch * seqLen
        let sum = backend.crossEntropy(logits: ws.logits, targets: targets, losses: ws.losses, rows: n,
                                       vocab: config.vocabSize, gradScale: nil)
        return LossSum(sum: sum, tokens: targets.count { $0 >= 0 })
    }

    /// Forward and backward. Accumulates into `gradients` the gradient of
    /// `gradScale * sum(per-token losses)`; `gradScale = 1 / tokens` gives the mean loss's gradient.
    /// Returns the loss sum of this batch. Call `enableGradients()` first.
    @discardableResult
    public func forwardBackward(inputs: [Int32], targets: [Int32], batch: Int, seqLen: Int,
                                gradScale: Float) throws -> LossSum {
        guard let grads = gradients else { preconditionFailure("forwardBackward before enableGradients()") }
        try validate(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen)
        let ws = prepareWorkspace(batch: batch, seqLen: seqLen, training: true)
        let n = batch * seqLen, c = config.hiddenSize, vocab = config.vocabSize
        let last = ws.xs[config.numHiddenLayers]

        forward(inputs, ws)
        computeLogits(ws)
        // Fused: logits become dL/dlogits in place.
        let sum = backend.crossEntropy(logits: ws.logits, targets: targets, losses: ws.losses, rows: n, vocab: vocab,
                                       gradScale: gradScale)
        let dlogits = ws.logits

        // Head: dW_head[V,C] += dlogits^T lnf; dlnf[N,C] = dlogits W_head.
        backend.matmul(dlogits, ws.lnf, grads.lmHead, m: vocab, n: c, k: n, transA: true, beta: 1)
        backend.matmul(dlogits, weights.lmHead, ws.dln, m: n, n: c, k: vocab)
        backend.zero(ws.dres)
        backend.rmsnormBackward(ws.dln, x: last, weight: weights.norm, rstd: ws.rstdf, dx: ws.dres,
                                dweight: grads.norm, rows: n, dim: c)

        for layer in stride(from: config.numHiddenLayers - 1, through: 0, by: -1) {
            let acts: BlockActivations
            if checkpointing == .block {
                acts = ws.blocks[0]
                blockForward(layer, input: ws.xs[layer], output: nil, acts, ws)
            } else {
                acts = ws.blocks[layer]
            }
            blockBackward(layer, input: ws.xs[layer], acts, ws, grads)
        }
        backend.embeddingBackward(ids: inputs, dout: ws.dres, dtable: grads.embed, dim: c)
        return LossSum(sum: sum, tokens: targets.count { $0 >= 0 })
    }

    /// Logits `[batch * seqLen, V]` for every position (tests, sampling).
    public func logits(inputs: [Int32], batch: Int, seqLen: Int) throws -> [Float] {
        let none = [Int32](repeating: -1, count: inputs.count)
        try validate(inputs: inputs, targets: none, batch: batch, seqLen: seqLen)
        let ws = prepareWorkspace(batch: batch, seqLen: seqLen, training: false)
        forward(inputs, ws)
        computeLogits(ws)
        return backend.download(ws.logits)
    }

    // MARK: Validation

    private func validate(inputs: [Int32], targets: [Int32], batch: Int, seqLen: Int) throws {
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
        backend.matmul(ws.lnf, weights.lmHead, ws.logits, m: ws.tokens, n: config.vocabSize, k: config.hiddenSize, transB: true)
    }

    private func forward(_ inputs: [Int32], _ ws: Workspace) {
        backend.embeddingForward(ids: inputs, table: weights.embed, out: ws.xs[0], dim: config.hiddenSize)
        for layer in 0..<config.numHiddenLayers {
            let acts = checkpointing == .block || !ws.training ? ws.blocks[0] : ws.blocks[layer]
            blockForward(layer, input: ws.xs[layer], output: ws.xs[layer + 1], acts, ws)
        }
    }

    /// One pre-norm block: `res2 = x + o(attn(rope(q(ln1 x)), rope(k(ln1 x)), v(ln1 x)))`,
    /// `out = res2 + down(silu(gate(ln2 res2)) * up(ln2 res2))`. `output == nil` recomputes the
    /// saved activations only (checkpointed backward).
    private func blockForward(_ layer: Int, input x: Tensor, output: Tensor?, _ a: BlockActivations, _ ws: Workspace) {
        let w = weights.blocks[layer]
        let n = ws.tokens, c = config.hiddenSize
        let eps = Float(config.rmsNormEps), theta = Float(config.ropeTheta)
        backend.rmsnormForward(x, weight: w.attnNorm, out: a.ln1, rstd: a.rstd1, rows: n, dim: c, eps: eps)
        linearForward(layer, .q, a.ln1, a.q, beta: 0, a, ws)
        linearForward(layer, .k, a.ln1, a.k, beta: 0, a, ws)
        linearForward(layer, .v, a.ln1, a.v, beta: 0, a, ws)
        backend.rope(a.q, batch: ws.batch, seqLen: ws.seqLen, heads: config.numAttentionHeads,
                     headDim: config.headDim, theta: theta, inverse: false)
        backend.rope(a.k, batch: ws.batch, seqLen: ws.seqLen, heads: config.numKeyValueHeads,
                     headDim: config.headDim, theta: theta, inverse: false)
        backend.attentionForward(q: a.q, k: a.k, v: a.v, out: a.attn, lse: a.lse, batch: ws.batch, seqLen: ws.seqLen,
                                 heads: config.numAttentionHeads, kvHeads: config.numKeyValueHeads, headDim: config.headDim)
        backend.copy(x, to: a.res2)
        linearForward(layer, .o, a.attn, a.res2, beta: 1, a, ws)
        backend.rmsnormForward(a.res2, weight: w.mlpNorm, out: a.ln2, rstd: a.rstd2, rows: n, dim: c, eps: eps)
        linearForward(layer, .gate, a.ln2, a.gate, beta: 0, a, ws)
        linearForward(layer, .up, a.ln2, a.up, beta: 0, a, ws)
        backend.swigluForward(gate: a.gate, up: a.up, out: a.h, count: n * config.intermediateSize)
        if let out = output {
            backend.copy(a.res2, to: out)
            linearForward(layer, .down, a.h, out, beta: 1, a, ws)
        } else if lora != nil {
            // Checkpointed recompute: the block output is not needed, but the down adapter's u is.
            loraProject(layer, .down, a.h, a, ws)
        }
    }

    /// `y = x W^T + beta * y`, plus `s * (drop(x) A^T) B^T` when the linear has an adapter
    /// (saving `u = drop(x) A^T`, `[N, r]`, for the backward).
    private func linearForward(_ layer: Int, _ kind: LinearKind, _ x: Tensor, _ y: Tensor, beta: Float,
                               _ acts: BlockActivations, _ ws: Workspace) {
        let w = weights.blocks[layer].linear(kind)
        let (out, inF) = LoRALayers.shape(kind, config)
        let n = ws.tokens
        backend.matmul(x, w, y, m: n, n: out, k: inF, transA: false, transB: true, alpha: 1, beta: beta)
        guard let lora else { return }
        let ad = lora.adapters[layer][kind.rawValue]
        let u = loraProject(layer, kind, x, acts, ws)
        backend.matmul(u, ad.b, y, m: n, n: out, k: ad.rank, transA: false, transB: true,
                       alpha: backend.download(ad.scale)[0], beta: 1)
    }

    /// `u = drop(x) A^T` `[N, r]` into the block's saved activations.
    @discardableResult
    private func loraProject(_ layer: Int, _ kind: LinearKind, _ x: Tensor, _ acts: BlockActivations, _ ws: Workspace) -> Tensor {
        let ad = lora!.adapters[layer][kind.rawValue]
        let u = acts.loraU[kind.rawValue]
        let xin = loraInput(layer, kind, x, count: ws.tokens * ad.inFeatures, ws)
        backend.matmul(xin, ad.a, u, m: ws.tokens, n: ad.rank, k: ad.inFeatures, transA: false, transB: true, alpha: 1, beta: 0)
        return u
    }

    /// The adapter's input: `x`, or its dropout (into `ws.loraX`) while training with dropout.
    private func loraInput(_ layer: Int, _ kind: LinearKind, _ x: Tensor, count: Int, _ ws: Workspace) -> Tensor {
        guard let lora, lora.config.dropout > 0, ws.training else { return x }
        backend.dropout(x, ws.loraX, count: count, p: Float(lora.config.dropout), seed: dropoutSeed,
                        stream: dropoutStream(layer, kind))
        return ws.loraX
    }

    private func dropoutStream(_ layer: Int, _ kind: LinearKind) -> UInt64 {
        (UInt64(dropoutStep) << 24) | (UInt64(layer) << 8) | UInt64(kind.rawValue)
    }

    // MARK: Backward

    /// On entry `ws.dres` holds dL/d(block output); on exit dL/d(block input). Parameter gradients
    /// accumulate into `grads` (and the adapters). Input gradients are `dx = dy W`; weight gradients
    /// `dW[out,in] += dy^T x` only when the linears are trainable.
    private func blockBackward(_ layer: Int, input x: Tensor, _ a: BlockActivations, _ ws: Workspace,
                               _ grads: LlamaWeights) {
        let w = weights.blocks[layer], g = grads.blocks[layer]
        let n = ws.tokens, c = config.hiddenSize, f = config.intermediateSize
        let theta = Float(config.ropeTheta)
        let dres = ws.dres

        // MLP: out = res2 + down(h), h = silu(gate) * up.
        linearBackward(layer, .down, dy: dres, x: a.h, dx: ws.dh, dxBeta: 0, a, ws, g)
        backend.swigluBackward(dout: ws.dh, gate: a.gate, up: a.up, dgate: ws.dgate, dup: ws.dup, count: n * f)
        linearBackward(layer, .gate, dy: ws.dgate, x: a.ln2, dx: ws.dln, dxBeta: 0, a, ws, g)
        linearBackward(layer, .up, dy: ws.dup, x: a.ln2, dx: ws.dln, dxBeta: 1, a, ws, g)
        // dres becomes dL/d(res2): the residual path plus the MLP norm's input gradient.
        backend.rmsnormBackward(ws.dln, x: a.res2, weight: w.mlpNorm, rstd: a.rstd2, dx: dres, dweight: g.mlpNorm,
                                rows: n, dim: c)

        // Attention: res2 = x + o(attn).
        linearBackward(layer, .o, dy: dres, x: a.attn, dx: ws.dattn, dxBeta: 0, a, ws, g)
        backend.attentionBackward(dout: ws.dattn, q: a.q, k: a.k, v: a.v, out: a.attn, lse: a.lse,
                                  dq: ws.dq, dk: ws.dk, dv: ws.dv, batch: ws.batch, seqLen: ws.seqLen,
                                  heads: config.numAttentionHeads, kvHeads: config.numKeyValueHeads,
                                  headDim: config.headDim)
        backend.rope(ws.dq, batch: ws.batch, seqLen: ws.seqLen, heads: config.numAttentionHeads,
                     headDim: config.headDim, theta: theta, inverse: true)
        backend.rope(ws.dk, batch: ws.batch, seqLen: ws.seqLen, heads: config.numKeyValueHeads,
                     headDim: config.headDim, theta: theta, inverse: true)
        linearBackward(layer, .q, dy: ws.dq, x: a.ln1, dx: ws.dln, dxBeta: 0, a, ws, g)
        linearBackward(layer, .k, dy: ws.dk, x: a.ln1, dx: ws.dln, dxBeta: 1, a, ws, g)
        linearBackward(layer, .v, dy: ws.dv, x: a.ln1, dx: ws.dln, dxBeta: 1, a, ws, g)
        backend.rmsnormBackward(ws.dln, x: x, weight: w.attnNorm, rstd: a.rstd1, dx: dres, dweight: g.attnNorm,
                                rows: n, dim: c)
    }

    /// Backward of `linearForward`. `dx = dy W + dxBeta * dx` (+ the adapter path); with an adapter
    /// (`xd` = the adapter's input, `u = xd A^T`, `g = dy B`):
    /// `dB += s dy^T u`, `dA += s g^T xd`, `ds += sum(g * u)`, `dx += drop'(s g A)`.
    private func linearBackward(_ layer: Int, _ kind: LinearKind, dy: Tensor, x: Tensor, dx: Tensor, dxBeta: Float,
                                _ acts: BlockActivations, _ ws: Workspace, _ g: BlockWeights) {
        let w = weights.blocks[layer].linear(kind)
        let (out, inF) = LoRALayers.shape(kind, config)
        let n = ws.tokens
        backend.matmul(dy, w, dx, m: n, n: inF, k: out, transA: false, transB: false, alpha: 1, beta: dxBeta)
        if linearsTrainable {
            backend.matmul(dy, x, g.linear(kind), m: out, n: inF, k: n, transA: true, transB: false, alpha: 1, beta: 1)
        }
        guard let lora else { return }
        let ad = lora.adapters[layer][kind.rawValue], r = ad.rank
        let s = backend.download(ad.scale)[0]
        let u = acts.loraU[kind.rawValue]
        backend.matmul(dy, ad.b, ws.dyB, m: n, n: r, k: out, transA: false, transB: false, alpha: 1, beta: 0)
        backend.matmul(dy, u, ad.gradB, m: out, n: r, k: n, transA: true, transB: false, alpha: s, beta: 1)
        if lora.config.trainableScale {
            let ds = backend.dot(ws.dyB, u, count: n * r)
            backend.upload([backend.download(ad.gradScale)[0] + Float(ds)], to: ad.gradScale)
        }
        let xin = loraInput(layer, kind, x, count: n * inF, ws)
        backend.matmul(ws.dyB, xin, ad.gradA, m: r, n: inF, k: n, transA: true, transB: false, alpha: s, beta: 1)
        if lora.config.dropout > 0 {
            // The adapter saw drop(x): its input gradient goes through the same mask.
            backend.matmul(ws.dyB, ad.a, ws.loraX, m: n, n: inF, k: r, transA: false, transB: false, alpha: s, beta: 0)
            backend.dropout(ws.loraX, ws.loraX, count: n * inF, p: Float(lora.config.dropout), seed: dropoutSeed,
                            stream: dropoutStream(layer, kind))
            backend.axpy(1, ws.loraX, dx, count: n * inF)
        } else {
            backend.matmul(ws.dyB, ad.a, dx, m: n, n: inF, k: r, transA: false, transB: false, alpha: s, beta: 1)
        }
    }

    // MARK: Buffers

    private func prepareWorkspace(batch: Int, seqLen: Int, training: Bool) -> Workspace {
        if let ws = workspace, ws.batch == batch, ws.seqLen == seqLen, ws.training || !training { return ws }
        workspace = nil  // free the old buffers before allocating the new ones
        let ws = Workspace(config: config, backend: backend, batch: batch, seqLen: seqLen, training: training,
                           savedBlocks: training && checkpointing == .none ? config.numHiddenLayers : 1,
                           lora: lora?.config)
        workspace = ws
        return ws
    }
}

/// One block's forward values that its backward reads. Rows are tokens.
final class BlockActivations {
    let ln1, rstd1, q, k, v, attn, lse, res2, ln2, rstd2, gate, up, h: Tensor
    /// `u = drop(x) A^T`, `[N, r]`, per linear kind (empty without LoRA).
    let loraU: [Tensor]

    init(_ cfg: LlamaConfig, _ backend: Backend, batch: Int, seqLen: Int, loraRank: Int?) {
        let n = batch * seqLen, c = cfg.hiddenSize, f = cfg.intermediateSize
        func t(_ shape: [Int]) -> Tensor { backend.makeTensor(shape, tag: .activations, zeroed: false) }
        ln1 = t([n, c]); rstd1 = t([n])
        q = t([n, cfg.queryWidth]); k = t([n, cfg.keyValueWidth]); v = t([n, cfg.keyValueWidth])
        attn = t([n, cfg.queryWidth]); lse = t([batch, cfg.numAttentionHeads, seqLen])
        res2 = t([n, c]); ln2 = t([n, c]); rstd2 = t([n])
        gate = t([n, f]); up = t([n, f]); h = t([n, f])
        loraU = loraRank.map { r in LinearKind.allCases.map { _ in t([n, r]) } } ?? []
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
    let lnf, rstdf, logits, losses: Tensor
    // Backward scratch (allocated only for training).
    let dres, dln, dq, dk, dv, dattn, dh, dgate, dup: Tensor
    /// LoRA scratch: `dy B` `[N, r]`, and the adapter's dropped-out input / input gradient `[N, max(C, F)]`.
    let dyB, loraX: Tensor

    init(config cfg: LlamaConfig, backend: Backend, batch: Int, seqLen: Int, training: Bool, savedBlocks: Int,
         lora: LoRAConfig?) {
        self.batch = batch; self.seqLen = seqLen; self.training = training
        let n = batch * seqLen, c = cfg.hiddenSize, f = cfg.intermediateSize
        tokens = n
        func act(_ shape: [Int]) -> Tensor { backend.makeTensor(shape, tag: .activations, zeroed: false) }
        func scratch(_ shape: [Int]) -> Tensor {
            backend.makeTensor(training ? shape : [0], tag: .workspace, zeroed: false)
        }
        xs = (0...cfg.numHiddenLayers).map { _ in act([n, c]) }
        blocks = (0..<savedBlocks).map { _ in BlockActivations(cfg, backend, batch: batch, seqLen: seqLen, loraRank: lora?.rank) }
        lnf = act([n, c]); rstdf = act([n]); logits = act([n, cfg.vocabSize]); losses = act([n])
        dres = scratch([n, c]); dln = scratch([n, c])
        dq = scratch([n, cfg.queryWidth]); dk = scratch([n, cfg.keyValueWidth]); dv = scratch([n, cfg.keyValueWidth])
        dattn = scratch([n, cfg.queryWidth])
        dh = scratch([n, f]); dgate = scratch([n, f]); dup = scratch([n, f])
        dyB = scratch(lora.map { [n, $0.rank] } ?? [0])
        loraX = scratch(lora.map { $0.dropout > 0 ? [n, max(c, f, cfg.queryWidth)] : [0] } ?? [0])
    }
}
