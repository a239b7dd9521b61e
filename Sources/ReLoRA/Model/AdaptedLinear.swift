/// The base weight W `[out, in]` of a block linear. Frozen under LoRA/ReLoRA (no gradient, no
/// optimizer state); in full-rank training a `.dense` weight is the trained parameter itself.
/// The next step adds quantized formats (`.quantized(...)`), dequantized on the fly by the backend.
public enum FrozenWeight: Sendable {
    case dense(Tensor)

    /// The dense tensor (every format today).
    public var dense: Tensor {
        switch self {
        case .dense(let t): return t
        }
    }
}

/// One of the seven linears of a block: `y = x W^T` plus, with an adapter,
/// `s * (drop(x) A^T) B^T` (LoRA; W frozen). Owns W, the adapter, their gradients, and the three
/// things done with them: forward, backward (dX through W; dW only when W is trained) and merge.
public final class AdaptedLinear: @unchecked Sendable {
    public let kind: LinearKind
    public let layer: Int
    public let outFeatures: Int, inFeatures: Int
    public private(set) var weight: FrozenWeight
    public private(set) var adapter: LoRAAdapter?
    /// dL/dW in full-rank training (nil when W is frozen or gradients are off).
    public private(set) var weightGrad: Tensor?

    /// W is trained iff there is no adapter.
    public var weightIsTrained: Bool { adapter == nil }

    init(kind: LinearKind, layer: Int, config: LlamaConfig, lora: LoRAConfig?, backend: Backend) {
        self.kind = kind
        self.layer = layer
        (outFeatures, inFeatures) = kind.shape(config)
        let p = backend.precision
        weight = .dense(lora == nil
            ? backend.makeTensor([outFeatures, inFeatures], dtype: p.trainable, tag: .trainable)
            : backend.makeTensor([outFeatures, inFeatures], dtype: p.frozenWeights, tag: .frozenWeights))
        adapter = lora.map {
            LoRAAdapter(rank: $0.rank, inFeatures: inFeatures, outFeatures: outFeatures, scale: $0.scale,
                        trainableScale: $0.trainableScale, backend: backend)
        }
    }

    func enableGradients(_ backend: Backend) {
        if let adapter {
            adapter.enableGradients(backend)
        } else if weightGrad == nil {
            weightGrad = backend.makeTensor([outFeatures, inFeatures], dtype: backend.precision.gradients, tag: .gradients)
        }
    }

    /// Hugging Face name prefix: `model.layers.{layer}.self_attn.q_proj.`.
    public var namePrefix: String { "model.layers.\(layer).\(kind.hfPath)." }

    // MARK: Forward and backward

    /// `y = x W^T + beta * y` (x: `[n, in]`, y: `[n, out]`), plus `s * u B^T` with the adapter, where
    /// `u = drop(x) A^T` `[n, r]` is written into `saved` for the backward.
    func forward(_ x: Tensor, _ y: Tensor, beta: Float, tokens n: Int, saved u: Tensor?, _ ctx: LinearContext) {
        let b = ctx.backend
        b.matmul(x, weight.dense, y, m: n, n: outFeatures, k: inFeatures, transB: true, beta: beta)
        guard let ad = adapter, let u else { return }
        project(x, into: u, tokens: n, ctx)
        b.matmul(u, ad.b, y, m: n, n: outFeatures, k: ad.rank, transB: true, beta: 1, alphaScale: ad.scale)
    }

    /// `u = drop(x) A^T` `[n, r]` (also what a checkpointed recompute needs without the output).
    func project(_ x: Tensor, into u: Tensor, tokens n: Int, _ ctx: LinearContext) {
        guard let ad = adapter else { return }
        ctx.backend.matmul(adapterInput(x, tokens: n, ctx), ad.a, u, m: n, n: ad.rank, k: inFeatures, transB: true)
    }

    /// The adapter's input: `x`, or its dropout (into `ctx.loraX`) while training with dropout.
    private func adapterInput(_ x: Tensor, tokens n: Int, _ ctx: LinearContext) -> Tensor {
        guard ctx.dropout > 0, let scratch = ctx.loraX else { return x }
        ctx.backend.dropout(x, scratch, count: n * inFeatures, p: ctx.dropout, seed: ctx.dropoutSeed,
                            stream: ctx.dropoutStream(layer, kind))
        return scratch
    }

    /// Backward of `forward`: `dx = dy W + dxBeta * dx`, and `dW += dy^T x` when W is trained. With an
    /// adapter (`xd` = the adapter's input, `u = xd A^T`, `g = dy B`):
    /// `dB += s dy^T u`, `dA += s g^T xd`, `ds += sum(g * u)`, `dx += drop'(s g A)`.
    func backward(dy: Tensor, x: Tensor, dx: Tensor, dxBeta: Float, tokens n: Int, saved u: Tensor?, _ ctx: LinearContext) {
        let b = ctx.backend
        b.matmul(dy, weight.dense, dx, m: n, n: inFeatures, k: outFeatures, beta: dxBeta)
        if let weightGrad {
            b.matmul(dy, x, weightGrad, m: outFeatures, n: inFeatures, k: n, transA: true, beta: 1)
        }
        guard let ad = adapter, let u, let gradA = ad.gradA, let gradB = ad.gradB, let dyB = ctx.dyB else { return }
        let r = ad.rank
        b.matmul(dy, ad.b, dyB, m: n, n: r, k: outFeatures)
        b.matmul(dy, u, gradB, m: outFeatures, n: r, k: n, transA: true, beta: 1, alphaScale: ad.scale)
        if let gradScale = ad.gradScale { b.dotAccumulate(dyB, u, count: n * r, into: gradScale) }
        let xin = adapterInput(x, tokens: n, ctx)
        b.matmul(dyB, xin, gradA, m: r, n: inFeatures, k: n, transA: true, beta: 1, alphaScale: ad.scale)
        if ctx.dropout > 0, let scratch = ctx.loraX {
            // The adapter saw drop(x): its input gradient goes through the same mask.
            b.matmul(dyB, ad.a, scratch, m: n, n: inFeatures, k: r, alphaScale: ad.scale)
            b.dropout(scratch, scratch, count: n * inFeatures, p: ctx.dropout, seed: ctx.dropoutSeed,
                      stream: ctx.dropoutStream(layer, kind))
            b.axpy(1, scratch, dx, count: n * inFeatures)
        } else {
            b.matmul(dyB, ad.a, dx, m: n, n: inFeatures, k: r, beta: 1, alphaScale: ad.scale)
        }
    }

    // MARK: Merge

    /// Folds `s B A` into W through `policy`: `target = W + s B A` in f32 (a workspace `[out, in]`), then
    /// the policy stores `target` as the new W. Writes `||s B A||^2`, `||W||^2` (before) and
    /// `||W_new - target||^2` (what the policy lost) into `stats[3 * slot ..< 3 * slot + 3]`, which the
    /// caller reads back once for all linears. Leaves the adapter as it was.
    func merge(policy: MergePolicy, key: MergeKey, stats: Tensor, slot: Int, backend b: Backend) {
        guard let ad = adapter else { preconditionFailure("merge on a linear without an adapter") }
        let w = weight.dense
        let target = b.makeTensor([outFeatures, inFeatures], dtype: .f32, tag: .workspace, zeroed: false)
        b.matmul(ad.b, ad.a, target, m: outFeatures, n: inFeatures, k: ad.rank, alphaScale: ad.scale)
        b.sumOfSquares(target, into: stats, at: 3 * slot)
        b.sumOfSquares(w, into: stats, at: 3 * slot + 1)
        b.axpy(1, w, target)
        policy.store(target, into: weight, key: key, backend: b)
        b.axpy(-1, w, target)
        b.sumOfSquares(target, into: stats, at: 3 * slot + 2)
    }

    /// Drops the adapter (after its update was merged): the linear becomes a plain `x W^T`.
    func detachAdapter() { adapter = nil }
}

/// What a linear's forward/backward needs besides its own tensors: the backend, dropout settings and
/// the model workspace's shared scratch.
struct LinearContext {
    let backend: Backend
    /// Adapter dropout probability (0 = off, and always off outside training).
    let dropout: Float
    let dropoutSeed: UInt64
    let dropoutStep: Int
    /// `dy B` `[N, r]` (training with adapters).
    let dyB: Tensor?
    /// The dropped-out adapter input / its gradient `[N, max(in)]` (training with dropout).
    let loraX: Tensor?

    /// Dropout mask stream of one linear at this step: distinct per (step, layer, kind).
    func dropoutStream(_ layer: Int, _ kind: LinearKind) -> UInt64 {
        (UInt64(dropoutStep) << 24) | (UInt64(layer) << 8) | UInt64(kind.rawValue)
    }
}
