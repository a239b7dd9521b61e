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
    private var workspace: Workspace?

    public init(config: LlamaConfig, backend: Backend, checkpointing: GradientCheckpointing = .none,
                weightTag: MemoryTag = .trainable) {
        self.config = config
        self.backend = backend
        self.checkpointing = checkpointing
        self.weights = LlamaWeights(config: config, backend: backend, tag: weightTag)
    }

    /// Allocates zeroed gradient buffers (tag `.gradients`) if there are none yet.
    public func enableGradients() {
        if gradients == nil { gradients = LlamaWeights(config: config, backend: backend, tag: .gradients) }
    }

    public func zeroGradients() {
        guard let g = gradients else { return }
        for (_, t) in g.named() { backend.zero(t) }
    }

    /// Drops the activation buffers (they are re-made on the next call).
    public func releaseWorkspace() { workspace = nil }

    // MARK: Public entry points

    /// Forward only: the summed next-token loss over positions whose target is >= 0.
    /// `inputs`, `targets`: `[batch * seqLen]` token ids, row-major by sequence.
    public func loss(inputs: [Int32], targets: [Int32], batch: Int, seqLen: Int) throws -> LossSum {
        try validate(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen)
        let ws = prepareWorkspace(batch: batch, seqLen: seqLen, training: false)
        forward(inputs, ws)
        let n = batch * seqLen
        backend.rmsnormForward(ws.xs[config.numHiddenLayers], weight: weights.norm, out: ws.lnf, rstd: ws.rstdf,
                               rows: n, dim: config.hiddenSize, eps: Float(config.rmsNormEps))
        backend.matmul(ws.lnf, weights.lmHead, ws.logits, m: n, n: config.vocabSize, k: config.hiddenSize, transB: true)
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
        let eps = Float(config.rmsNormEps)
        let last = ws.xs[config.numHiddenLayers]

        forward(inputs, ws)
        backend.rmsnormForward(last, weight: weights.norm, out: ws.lnf, rstd: ws.rstdf, rows: n, dim: c, eps: eps)
        backend.matmul(ws.lnf, weights.lmHead, ws.logits, m: n, n: vocab, k: c, transB: true)
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
        let n = batch * seqLen
        backend.rmsnormForward(ws.xs[config.numHiddenLayers], weight: weights.norm, out: ws.lnf, rstd: ws.rstdf,
                               rows: n, dim: config.hiddenSize, eps: Float(config.rmsNormEps))
        backend.matmul(ws.lnf, weights.lmHead, ws.logits, m: n, n: config.vocabSize, k: config.hiddenSize, transB: true)
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
        let n = ws.tokens, c = config.hiddenSize, f = config.intermediateSize
        let qw = config.queryWidth, kw = config.keyValueWidth
        let eps = Float(config.rmsNormEps), theta = Float(config.ropeTheta)
        backend.rmsnormForward(x, weight: w.attnNorm, out: a.ln1, rstd: a.rstd1, rows: n, dim: c, eps: eps)
        backend.matmul(a.ln1, w.q, a.q, m: n, n: qw, k: c, transB: true)
        backend.matmul(a.ln1, w.k, a.k, m: n, n: kw, k: c, transB: true)
        backend.matmul(a.ln1, w.v, a.v, m: n, n: kw, k: c, transB: true)
        backend.rope(a.q, batch: ws.batch, seqLen: ws.seqLen, heads: config.numAttentionHeads,
                     headDim: config.headDim, theta: theta, inverse: false)
        backend.rope(a.k, batch: ws.batch, seqLen: ws.seqLen, heads: config.numKeyValueHeads,
                     headDim: config.headDim, theta: theta, inverse: false)
        backend.attentionForward(q: a.q, k: a.k, v: a.v, out: a.attn, lse: a.lse, batch: ws.batch, seqLen: ws.seqLen,
                                 heads: config.numAttentionHeads, kvHeads: config.numKeyValueHeads, headDim: config.headDim)
        backend.copy(x, to: a.res2)
        backend.matmul(a.attn, w.o, a.res2, m: n, n: c, k: qw, transB: true, beta: 1)
        backend.rmsnormForward(a.res2, weight: w.mlpNorm, out: a.ln2, rstd: a.rstd2, rows: n, dim: c, eps: eps)
        backend.matmul(a.ln2, w.gate, a.gate, m: n, n: f, k: c, transB: true)
        backend.matmul(a.ln2, w.up, a.up, m: n, n: f, k: c, transB: true)
        backend.swigluForward(gate: a.gate, up: a.up, out: a.h, count: n * f)
        if let out = output {
            backend.copy(a.res2, to: out)
            backend.matmul(a.h, w.down, out, m: n, n: c, k: f, transB: true, beta: 1)
        }
    }

    // MARK: Backward

    /// On entry `ws.dres` holds dL/d(block output); on exit dL/d(block input). Parameter gradients
    /// accumulate into `grads`. Weight gradients are `dW[out,in] += dy^T x`, input gradients `dx = dy W`.
    private func blockBackward(_ layer: Int, input x: Tensor, _ a: BlockActivations, _ ws: Workspace,
                               _ grads: LlamaWeights) {
        let w = weights.blocks[layer], g = grads.blocks[layer]
        let n = ws.tokens, c = config.hiddenSize, f = config.intermediateSize
        let qw = config.queryWidth, kw = config.keyValueWidth
        let theta = Float(config.ropeTheta)
        let dres = ws.dres

        // MLP: out = res2 + down(h), h = silu(gate) * up.
        backend.matmul(dres, w.down, ws.dh, m: n, n: f, k: c)
        backend.matmul(dres, a.h, g.down, m: c, n: f, k: n, transA: true, beta: 1)
        backend.swigluBackward(dout: ws.dh, gate: a.gate, up: a.up, dgate: ws.dgate, dup: ws.dup, count: n * f)
        backend.matmul(ws.dgate, w.gate, ws.dln, m: n, n: c, k: f)
        backend.matmul(ws.dup, w.up, ws.dln, m: n, n: c, k: f, beta: 1)
        backend.matmul(ws.dgate, a.ln2, g.gate, m: f, n: c, k: n, transA: true, beta: 1)
        backend.matmul(ws.dup, a.ln2, g.up, m: f, n: c, k: n, transA: true, beta: 1)
        // dres becomes dL/d(res2): the residual path plus the MLP norm's input gradient.
        backend.rmsnormBackward(ws.dln, x: a.res2, weight: w.mlpNorm, rstd: a.rstd2, dx: dres, dweight: g.mlpNorm,
                                rows: n, dim: c)

        // Attention: res2 = x + o(attn).
        backend.matmul(dres, w.o, ws.dattn, m: n, n: qw, k: c)
        backend.matmul(dres, a.attn, g.o, m: c, n: qw, k: n, transA: true, beta: 1)
        backend.attentionBackward(dout: ws.dattn, q: a.q, k: a.k, v: a.v, out: a.attn, lse: a.lse,
                                  dq: ws.dq, dk: ws.dk, dv: ws.dv, batch: ws.batch, seqLen: ws.seqLen,
                                  heads: config.numAttentionHeads, kvHeads: config.numKeyValueHeads,
                                  headDim: config.headDim)
        backend.rope(ws.dq, batch: ws.batch, seqLen: ws.seqLen, heads: config.numAttentionHeads,
                     headDim: config.headDim, theta: theta, inverse: true)
        backend.rope(ws.dk, batch: ws.batch, seqLen: ws.seqLen, heads: config.numKeyValueHeads,
                     headDim: config.headDim, theta: theta, inverse: true)
        backend.matmul(ws.dq, w.q, ws.dln, m: n, n: c, k: qw)
        backend.matmul(ws.dk, w.k, ws.dln, m: n, n: c, k: kw, beta: 1)
        backend.matmul(ws.dv, w.v, ws.dln, m: n, n: c, k: kw, beta: 1)
        backend.matmul(ws.dq, a.ln1, g.q, m: qw, n: c, k: n, transA: true, beta: 1)
        backend.matmul(ws.dk, a.ln1, g.k, m: kw, n: c, k: n, transA: true, beta: 1)
        backend.matmul(ws.dv, a.ln1, g.v, m: kw, n: c, k: n, transA: true, beta: 1)
        backend.rmsnormBackward(ws.dln, x: x, weight: w.attnNorm, rstd: a.rstd1, dx: dres, dweight: g.attnNorm,
                                rows: n, dim: c)
    }

    // MARK: Buffers

    private func prepareWorkspace(batch: Int, seqLen: Int, training: Bool) -> Workspace {
        if let ws = workspace, ws.batch == batch, ws.seqLen == seqLen, ws.training || !training { return ws }
        workspace = nil  // free the old buffers before allocating the new ones
        let ws = Workspace(config: config, backend: backend, batch: batch, seqLen: seqLen, training: training,
                           savedBlocks: training && checkpointing == .none ? config.numHiddenLayers : 1)
        workspace = ws
        return ws
    }
}

/// One block's forward values that its backward reads. Rows are tokens.
final class BlockActivations {
    let ln1, rstd1, q, k, v, attn, lse, res2, ln2, rstd2, gate, up, h: Tensor

    init(_ cfg: LlamaConfig, _ backend: Backend, batch: Int, seqLen: Int) {
        let n = batch * seqLen, c = cfg.hiddenSize, f = cfg.intermediateSize
        func t(_ shape: [Int]) -> Tensor { backend.makeTensor(shape, tag: .activations, zeroed: false) }
        ln1 = t([n, c]); rstd1 = t([n])
        q = t([n, cfg.queryWidth]); k = t([n, cfg.keyValueWidth]); v = t([n, cfg.keyValueWidth])
        attn = t([n, cfg.queryWidth]); lse = t([batch, cfg.numAttentionHeads, seqLen])
        res2 = t([n, c]); ln2 = t([n, c]); rstd2 = t([n])
        gate = t([n, f]); up = t([n, f]); h = t([n, f])
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

    init(config cfg: LlamaConfig, backend: Backend, batch: Int, seqLen: Int, training: Bool, savedBlocks: Int) {
        self.batch = batch; self.seqLen = seqLen; self.training = training
        let n = batch * seqLen, c = cfg.hiddenSize, f = cfg.intermediateSize
        tokens = n
        func act(_ shape: [Int]) -> Tensor { backend.makeTensor(shape, tag: .activations, zeroed: false) }
        func scratch(_ shape: [Int]) -> Tensor {
            backend.makeTensor(training ? shape : [0], tag: .workspace, zeroed: false)
        }
        xs = (0...cfg.numHiddenLayers).map { _ in act([n, c]) }
        blocks = (0..<savedBlocks).map { _ in BlockActivations(cfg, backend, batch: batch, seqLen: seqLen) }
        lnf = act([n, c]); rstdf = act([n]); logits = act([n, cfg.vocabSize]); losses = act([n])
        dres = scratch([n, c]); dln = scratch([n, c])
        dq = scratch([n, cfg.queryWidth]); dk = scratch([n, cfg.keyValueWidth]); dv = scratch([n, cfg.keyValueWidth])
        dattn = scratch([n, cfg.queryWidth])
        dh = scratch([n, f]); dgate = scratch([n, f]); dup = scratch([n, f])
    }
}
