import ReLoRACore
import ReLoRAFormats
/// The per-linear statistics of a merge, written by `AdaptedLinear.merge` into a stats tensor that the
/// model reads back once for all linears: `width` f32 slots per linear.
enum MergeStats {
    static let width = 5
    /// `||s B A||^2`, the update.
    static let update = 0
    /// `||W||^2` before the merge (W: dequantized codes, or the master copy).
    static let weight = 1
    /// `||W_new - (W + s B A)||^2`: what the store lost (the rounding residual R).
    static let lost = 2
    /// The number of codes that changed (quantized weights).
    static let changedCodes = 3
    /// `||R - s B' A'||^2` after a policy set the next factors from R (`compensate`).
    static let uncompensated = 4
}

/// One of the seven linears of a block: `y = x W^T` plus, with an adapter, `s * (drop(x) A^T) B^T`
/// (LoRA; W frozen). Owns W, the adapter, their gradients, and what is done with them: forward,
/// backward (dX through W; dW only when W is trained) and merge. The adapter's input side (A) is
/// handled by its `AdapterGroup`, which fuses the linears that read the same input.
///
/// The adapter's projection is kept transposed, `uT = A drop(x)^T` `[r, N]`, so the projections of a
/// group are contiguous rows of one `[g*r, N]` buffer and one GEMM computes them all.
public final class AdaptedLinear {
    public let kind: LinearKind
    public let layer: Int
    public let outFeatures: Int, inFeatures: Int
    public private(set) var weight: FrozenWeight
    public private(set) var adapter: LoRAAdapter?
    /// dL/dW in full-rank training (nil when W is frozen or gradients are off).
    public private(set) var weightGrad: Tensor?

    /// `adapterA`: the `[r, in]` view of the group's A, for a LoRA model. `quant`: the storage format of
    /// the frozen W (LoRA models only; nil = dense), with an f32 master copy if `masterCopy`.
    init(kind: LinearKind, layer: Int, config: LlamaConfig, lora: LoRAConfig?, quant: QuantFormat? = nil,
         masterCopy: Bool = false, adapterA: Tensor?, backend: Backend) {
        precondition(quant == nil || lora != nil, "quantized base weights are frozen: they need LoRA")
        self.kind = kind
        self.layer = layer
        (outFeatures, inFeatures) = kind.shape(config)
        let p = backend.precision
        if let quant {
            weight = .quantized(QuantizedTensor(format: quant, rows: outFeatures, cols: inFeatures, backend: backend, tag: .frozenWeights,
                                                master: masterCopy))
        } else {
            weight = .dense(lora == nil
                ? backend.makeTensor([outFeatures, inFeatures], dtype: p.trainable, tag: .trainable)
                : backend.makeTensor([outFeatures, inFeatures], dtype: p.frozenWeights, tag: .frozenWeights))
        }
        if let lora, let adapterA {
            adapter = LoRAAdapter(a: adapterA, rank: lora.rank, inFeatures: inFeatures, outFeatures: outFeatures,
                                  scale: lora.scale, trainableScale: lora.trainableScale, backend: backend)
        }
    }

    /// dW for a trained W (a LoRA model's adapters get theirs from their group).
    func enableWeightGradient(_ backend: Backend) {
        if adapter == nil, weightGrad == nil {
            weightGrad = backend.makeTensor([outFeatures, inFeatures], dtype: backend.precision.gradients, tag: .gradients)
        }
    }

    /// Hugging Face name prefix: `model.layers.{layer}.self_attn.q_proj.`.
    public var namePrefix: String { "model.layers.\(layer).\(kind.hfPath)." }

    // MARK: Forward and backward

    /// `y = x W^T + beta * y` (x: `[n, in]` rows `ldx` apart, y: `[n, out]` rows `ldy` apart; 0 = packed);
    /// a quantized W is dequantized through the context's scratch (or whole into its slot of the context's
    /// `DequantizedBlock`).
    func forwardBase(_ x: Tensor, _ y: Tensor, beta: Float, tokens n: Int, ldx: Int = 0, ldy: Int = 0, _ ctx: LinearContext) {
        let gemms = ctx.backend.profiler?.attributeGEMMs(to: .gemmBase); defer { gemms?.end() }
        switch weight {
        case .dense(let w):
            ctx.backend.matmul(x, w, y, m: n, n: outFeatures, k: inFeatures, transB: true, beta: beta, lda: ldx, ldc: ldy)
        case .quantized(let q):
            if let cache = ctx.dequantCache {
                ctx.backend.quantizedLinear(x, q, y, tokens: n, beta: beta, scratch: cache.slot(kind), ldx: ldx, ldy: ldy)
                cache.wrote(layer: layer, kind)
            } else {
                ctx.backend.quantizedLinear(x, q, y, tokens: n, beta: beta, scratch: ctx.dequantScratch!, ldx: ldx, ldy: ldy)
            }
        }
    }

    /// `y += s uT^T B^T` with the adapter's projection `uT` `[r, n]` (y's rows `ldy` apart).
    func addAdapterOutput(_ uT: Tensor, _ y: Tensor, tokens n: Int, ldy: Int = 0, _ b: Backend) {
        guard let ad = adapter else { return }
        let gemms = b.profiler?.attributeGEMMs(to: .gemmLoRAUp); defer { gemms?.end() }
        b.matmul(uT, ad.b, y, m: n, n: outFeatures, k: ad.rank, transA: true, transB: true, beta: 1, alphaScale: ad.scale, ldc: ldy)
    }

    /// `dx = dy W + dxBeta * dx`, and `dW += dy^T x` when W is trained (never for a quantized W). `ldIn`:
    /// the row stride of x and dx, `ldOut` of dy (0 = packed).
    func backwardBase(dy: Tensor, x: Tensor, dx: Tensor, dxBeta: Float, tokens n: Int, ldIn: Int = 0, ldOut: Int = 0,
                      _ ctx: LinearContext) {
        let b = ctx.backend
        let gemms = b.profiler?.attributeGEMMs(to: .gemmBase); defer { gemms?.end() }
        switch weight {
        case .dense(let w):
            b.matmul(dy, w, dx, m: n, n: inFeatures, k: outFeatures, beta: dxBeta, lda: ldOut, ldc: ldIn)
        case .quantized(let q):
            if let cache = ctx.dequantCache, cache.holds(layer: layer, kind) {
                // deq(W) is in the slot since this block's recompute: the GEMM `quantizedLinearInput` runs after
                // dequantizing, on the same values (`Backend.dequantizesWholeWeight`), rows as the backend's scratch.
                let w = cache.slot(kind)
                b.matmul(dy, w, dx, m: n, n: inFeatures, k: outFeatures, beta: dxBeta, lda: ldOut, ldb: w.shape[1], ldc: ldIn)
            } else {
                b.quantizedLinearInput(dy, q, dx, tokens: n, beta: dxBeta, scratch: ctx.dequantCache?.slot(kind) ?? ctx.dequantScratch!,
                                       lddy: ldOut, lddx: ldIn)
            }
        }
        if let weightGrad {
            b.matmul(dy, x, weightGrad, m: outFeatures, n: inFeatures, k: n, transA: true, beta: 1, lda: ldOut, ldb: ldIn)
        }
    }

    /// The adapter's output side of the backward: `gT = B^T dy^T` `[r, n]` (what the group's input side
    /// needs), `dB += s dy^T uT^T`, and `ds += sum(gT * uT)` for a trained scale (dy's rows `lddy` apart).
    func adapterOutputBackward(dy: Tensor, uT: Tensor, gT: Tensor, tokens n: Int, lddy: Int = 0, _ b: Backend) {
        guard let ad = adapter, let gradB = ad.gradB else { return }
        let gemms = b.profiler?.attributeGEMMs(to: .gemmLoRAUp); defer { gemms?.end() }
        b.matmul(ad.b, dy, gT, m: ad.rank, n: n, k: outFeatures, transA: true, transB: true, ldb: lddy)
        b.matmul(dy, uT, gradB, m: outFeatures, n: ad.rank, k: n, transA: true, transB: true, beta: 1, alphaScale: ad.scale,
                 lda: lddy)
        if let gradScale = ad.gradScale { b.dotAccumulate(gT, uT, count: ad.rank * n, into: gradScale) }
    }

    // MARK: Merge

    /// Folds `s B A` into W through `policy`: `target = W + s B A` in f32 (a workspace `[out, in]`; W
    /// dequantized if quantized, or its master copy), then the policy stores `target` as the new W.
    /// Writes the `MergeStats` of this linear into `stats[MergeStats.width * slot ..< +width]`, which the
    /// caller reads back once for all linears. With `reinitialize`, the adapter then starts the next
    /// cycle: `reinitialize` re-draws it the standard way (A random, B = 0) and the policy may replace
    /// that from the residual `R = target - W_new` (returns whether it did); without, the adapter is left
    /// as it was.
    @discardableResult
    func merge(policy: MergePolicy, key: MergeKey, stats: Tensor, slot: Int, reinitialize: ((LoRAAdapter) -> Void)? = nil,
               backend b: Backend) throws -> Bool {
        guard let ad = adapter else { preconditionFailure("merge on a linear without an adapter") }
        let base = MergeStats.width * slot
        let target = b.makeTensor([outFeatures, inFeatures], dtype: .f32, tag: .workspace, zeroed: false)
        // W as f32: a dense f32 W is read in place; others (bf16, quantized) through a workspace copy.
        let inPlace = weight.dense.flatMap { $0.dtype == .f32 ? $0 : nil }
        let w = inPlace ?? b.makeTensor([outFeatures, inFeatures], dtype: .f32, tag: .workspace, zeroed: false)
        b.matmul(ad.b, ad.a, target, m: outFeatures, n: inFeatures, k: ad.rank, alphaScale: ad.scale)
        b.sumOfSquares(target, into: stats, at: base + MergeStats.update)
        if inPlace == nil { weight.read(into: w, b) }
        b.sumOfSquares(w, into: stats, at: base + MergeStats.weight)
        b.axpy(1, w, target)
        do {
            // The codes before the store, to count how many it changed.
            let old = weight.quantized.map { q in
                let copy = b.makeTensor(q.blocks.shape, dtype: .u8, tag: .workspace, zeroed: false)
                b.copy(q.blocks, to: copy)
                return copy
            }
            try policy.store(target, into: weight, key: key, backend: b)
            if let old, let q = weight.quantized { b.countChangedCodes(old: old, new: q, into: stats, at: base + MergeStats.changedCodes) }
        }
        if inPlace == nil { weight.read(into: w, b) }
        b.axpy(-1, w, target)
        b.sumOfSquares(target, into: stats, at: base + MergeStats.lost)
        guard let reinitialize else { return false }
        reinitialize(ad)
        guard try policy.initializeFactors(ad, residual: target, key: key, backend: b) else { return false }
        b.matmul(ad.b, ad.a, target, m: outFeatures, n: inFeatures, k: ad.rank, alpha: -1, beta: 1, alphaScale: ad.scale)
        b.sumOfSquares(target, into: stats, at: base + MergeStats.uncompensated)
        return true
    }

    /// Drops the adapter (after its update was merged): the linear becomes a plain `x W^T`.
    func detachAdapter() { adapter = nil }
}

/// The adapters of the linears of a block that read the same input (q, k, v; o; gate, up; down), with
/// their A factors (and A's gradients) stored as one contiguous `[g*r, in]` tensor. Without dropout and
/// with a fixed scale, the group's input projection `uT = A x^T`, A's gradient `dA += s gT x` and the
/// input gradient `dx += s gT^T A` are one GEMM each instead of one per linear: fewer, larger GEMMs for
/// the skinny adapter shapes, where OpenBLAS spends much of its time packing.
final class AdapterGroup {
    let linears: [AdaptedLinear]
    /// A of every member, stacked: `[g*r, in]`.
    let a: Tensor
    private(set) var gradA: Tensor?
    let rank: Int, inFeatures: Int

    /// Makes the group's A storage and the members (whose adapters view it); `quant` is their W's format
    /// (with f32 master copies if `masterCopies`).
    init(kinds: [LinearKind], layer: Int, config: LlamaConfig, lora: LoRAConfig, quant: QuantFormat?, masterCopies: Bool,
         backend: Backend) {
        let rank = lora.rank, inFeatures = kinds[0].shape(config).in
        precondition(kinds.allSatisfy { $0.shape(config).in == inFeatures }, "an adapter group shares one input")
        let a = backend.makeTensor([kinds.count * rank, inFeatures], dtype: backend.precision.loraFactors, tag: .lora)
        self.rank = rank
        self.inFeatures = inFeatures
        self.a = a
        linears = kinds.enumerated().map { i, kind in
            AdaptedLinear(kind: kind, layer: layer, config: config, lora: lora, quant: quant, masterCopy: masterCopies,
                          adapterA: a.view(offset: i * rank * inFeatures, shape: [rank, inFeatures]), backend: backend)
        }
    }

    var size: Int { linears.count }

    func enableGradients(_ backend: Backend) {
        guard gradA == nil else { return }
        let g = backend.makeTensor(a.shape, dtype: backend.precision.gradients, tag: .gradients)
        gradA = g
        for (i, l) in linears.enumerated() {
            l.adapter?.enableGradients(gradA: g.view(offset: i * rank * inFeatures, shape: [rank, inFeatures]), backend)
        }
    }

    /// The fused path needs the same input for every member (no dropout: masks differ per linear) and
    /// one scale value (a trained scale differs per linear).
    private func fused(_ ctx: LinearContext) -> Bool {
        ctx.dropout == 0 && !(linears.first?.adapter?.trainableScale ?? true)
    }

    /// `uT_i = A_i drop_i(x)^T` for every member, into `uT` `[g*r, n]` (member i's rows `i*r ..< (i+1)*r`);
    /// x's rows `ldx` apart (0 = packed).
    func project(_ x: Tensor, into uT: Tensor, tokens n: Int, ldx: Int = 0, _ ctx: LinearContext) {
        let b = ctx.backend
        let gemms = b.profiler?.attributeGEMMs(to: .gemmLoRADown); defer { gemms?.end() }
        if fused(ctx) {
            b.matmul(a, x, uT, m: size * rank, n: n, k: inFeatures, transB: true, ldb: ldx)
            return
        }
        for (i, l) in linears.enumerated() {
            guard let ad = l.adapter else { continue }
            b.matmul(ad.a, ctx.adapterInput(x, l, tokens: n, ld: ldx), member(uT, i, n), m: rank, n: n, k: inFeatures,
                     transB: true, ldb: ldx)
        }
    }

    /// Rows of member `i` of a `[g*r, n]` buffer.
    func member(_ t: Tensor, _ i: Int, _ n: Int) -> Tensor { t.view(offset: i * rank * n, shape: [rank, n]) }

    /// The input side of the adapters' backward, given `gT` `[g*r, n]` (each member's `B^T dy^T`):
    /// `dA_i += s gT_i drop_i(x)`, `dx += drop_i'(s gT_i^T A_i)` summed over members. x and dx have rows
    /// `ldx` apart (0 = packed).
    func inputBackward(x: Tensor, gT: Tensor, dx: Tensor, tokens n: Int, ldx: Int = 0, _ ctx: LinearContext) {
        let b = ctx.backend
        guard let gradA else { return }
        let gemms = b.profiler?.attributeGEMMs(to: .gemmLoRADown); defer { gemms?.end() }
        if fused(ctx), let s = linears.first?.adapter?.scale {
            b.matmul(gT, x, gradA, m: size * rank, n: inFeatures, k: n, beta: 1, alphaScale: s, ldb: ldx)
            b.matmul(gT, a, dx, m: n, n: inFeatures, k: size * rank, transA: true, beta: 1, alphaScale: s, ldc: ldx)
            return
        }
        let stride = ldx == 0 ? inFeatures : ldx
        for (i, l) in linears.enumerated() {
            guard let ad = l.adapter, let dA = ad.gradA else { continue }
            let gi = member(gT, i, n)
            b.matmul(gi, ctx.adapterInput(x, l, tokens: n, ld: ldx), dA, m: rank, n: inFeatures, k: n, beta: 1,
                     alphaScale: ad.scale, ldb: ldx)
            if ctx.dropout > 0, let scratch = ctx.loraX {
                // The adapter saw drop(x): its input gradient goes through the same mask, then joins dx over
                // whole rows. Padded rows: the scratch's padding (written by other linears' packed uses) is
                // zeroed first, so that dx's stays zero.
                let rows = scratch.view(offset: 0, shape: [n * stride])
                if stride != inFeatures { b.zero(rows) }
                b.matmul(gi, ad.a, rows, m: n, n: inFeatures, k: rank, transA: true, alphaScale: ad.scale, ldc: ldx)
                b.dropout(rows, rows, count: n * inFeatures, p: ctx.dropout, seed: ctx.dropoutSeed,
                          stream: ctx.dropoutStream(l.layer, l.kind), cols: inFeatures, ld: ldx)
                b.axpy(1, rows, dx, count: n * stride)
            } else {
                b.matmul(gi, ad.a, dx, m: n, n: inFeatures, k: rank, transA: true, beta: 1, alphaScale: ad.scale, ldc: ldx)
            }
        }
    }
}

/// What a linear's forward/backward needs besides its own tensors: the backend, dropout settings and
/// the model workspace's shared scratch.
struct LinearContext {
    let backend: Backend
    /// Adapter dropout probability (0 = off, and always off outside training).
    let dropout: Float
    let dropoutSeed: UInt64
    let dropoutKey: DropoutKey
    /// `gT = B^T dy^T` of a group, `[3r, N]` (training with adapters).
    let gT: Tensor?
    /// Where quantized weights are dequantized, tile by tile (models with quantized weights), unless
    /// `dequantCache` is set.
    let dequantScratch: Tensor?
    /// A slot per linear instead of the shared scratch, which keeps a block's weights from its recompute to its
    /// backward (training with block checkpointing, `LlamaModel.reusesDequantizedWeights`); nil otherwise.
    let dequantCache: DequantizedBlock?
    /// The dropped-out adapter input / its gradient `[N, max(in)]` (training with dropout).
    let loraX: Tensor?

    func dropoutStream(_ layer: Int, _ kind: LinearKind) -> UInt64 { dropoutKey.stream(layer: layer, kind: kind) }

    /// The adapter's input: `x`, or its dropout for `linear` (into `loraX`, rows `ld` apart as x's) while
    /// training with dropout.
    func adapterInput(_ x: Tensor, _ linear: AdaptedLinear, tokens n: Int, ld: Int = 0) -> Tensor {
        guard dropout > 0, let scratch = loraX else { return x }
        backend.dropout(x, scratch, count: n * linear.inFeatures, p: dropout, seed: dropoutSeed,
                        stream: dropoutStream(linear.layer, linear.kind), cols: linear.inFeatures, ld: ld)
        return scratch
    }
}

/// What keys a LoRA dropout mask: the counter-based RNG's stream for one linear in one micro-batch (with the
/// recipe's seed). Masks depend on nothing else, so a resumed run and a run on any number of processes draw
/// the same ones.
public struct DropoutKey: Sendable, Equatable {
    /// How a run's checkpoints key their masks (`state.json`'s `dropout_keying`).
    public enum Keying: Int, Sendable, Codable {
        /// Before format 2 of the keying: by (step, layer, kind), so every micro-batch of a step shared its
        /// mask, and the stream could coincide with a LoRA initialisation's. Kept so older runs resume.
        case perStep = 1
        /// By (global micro-batch, layer, kind) in a stream space of its own (top byte 0x44).
        case perMicroBatch = 2

        /// What new runs use.
        public static let current = Keying.perMicroBatch
    }

    public var keying: Keying
    /// The optimizer step (0-based).
    public var step: Int
    /// The micro-batch's index in the run: `step * grad_accum + micro`, the same for any number of ranks.
    public var microBatch: Int

    public init(keying: Keying = .current, step: Int = 0, microBatch: Int = 0) {
        self.keying = keying; self.step = step; self.microBatch = microBatch
    }

    /// perMicroBatch: `0x44 << 56 | microBatch << 16 | layer << 4 | kind` (40 bits of micro-batch index, 12 of
    /// layer); perStep: `step << 24 | layer << 8 | kind`, as before.
    public func stream(layer: Int, kind: LinearKind) -> UInt64 {
        switch keying {
        case .perStep:
            return (UInt64(step) << 24) | (UInt64(layer) << 8) | UInt64(kind.rawValue)
        case .perMicroBatch:
            precondition(layer < 1 << 12 && microBatch < 1 << 40, "dropout key out of range: layer \(layer), micro-batch \(microBatch)")
            return (0x44 << 56) | (UInt64(microBatch) << 16) | (UInt64(layer) << 4) | UInt64(kind.rawValue)
        }
    }
}
