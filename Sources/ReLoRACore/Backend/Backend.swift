/// The op set a LLaMA training step needs, forward and backward, plus the few host reads the trainer
/// needs as ops that return a scalar. The model and the trainer are written once against this protocol;
/// `CPUBackend` is the readable reference (the specification every CUDA kernel is tested against),
/// `PlanningBackend` runs the same code path without allocating or computing to plan memory.
///
/// Conventions:
/// - Tensors are row-major. Activations are `[N, C]` with `N = batch * seqLen` tokens, token
///   `n = b * seqLen + t`. Attention heads are interleaved in the feature dimension: q is
///   `[N, nHeads * headDim]`, head `h` at columns `h*headDim ..< (h+1)*headDim` (Hugging Face layout).
/// - Linear weights are `[out, in]` (Hugging Face layout): `y = x W^T`.
/// - Ops whose doc says "accumulates" add into their output (`+=`); the others overwrite it.
/// - Token ids and targets are `i32` tensors; a negative target means "no prediction at this position".
/// - Float ops read and write tensors of the backend's compute types (`precision`); the CPU backend
///   computes in f32 only and rejects other dtypes except in upload/download/copy.
/// - Host<->device traffic goes through `upload*`, `download` and the ops documented as returning a
///   value to the host; each counts one transfer in the ledger. A training step needs O(1) of them.
public protocol Backend: AnyObject, Sendable {
    /// `cpu`, `cuda`, `plan:cpu`, ...
    var name: String { get }
    var ledger: MemoryLedger { get }
    /// The dtypes the model allocates for each role on this backend.
    var precision: Precision { get }
    /// False for a planning backend: tensors have no storage and ops return placeholders.
    var computes: Bool { get }
    /// The largest attention `head_dim` the backend's kernels take, nil for any (the default).
    var maxAttentionHeadDim: Int? { get }
    /// How the model pads the rows of the activations its products read and write (`RowPadding`): none
    /// on the CPU, multiples of 16 elements on CUDA.
    var rowPadding: RowPadding { get }
    /// Where the ops report while a training step is profiled (`OpProfiler`; backends that can are
    /// `OpProfiling`), nil (the default) otherwise.
    var profiler: OpProfiler? { get }

    func makeTensor(_ shape: [Int], dtype: DType, tag: MemoryTag, zeroed: Bool) -> Tensor

    // MARK: Transfers and fills

    /// Host floats into a float tensor, converting to its dtype (bf16/f16: round to nearest even).
    func upload(_ values: [Float], to tensor: Tensor)
    /// Host int32 values into an i32 tensor.
    func upload(_ values: [Int32], to tensor: Tensor)
    /// Little-endian raw elements of float type `dtype` (f32, bf16 or f16; exactly `tensor.count` of
    /// them) into a float tensor, converting: how checkpoints stream tensors from a mapped file.
    func upload(raw: UnsafeRawBufferPointer, dtype: DType, to tensor: Tensor)
    /// A float tensor's values as f32 on the host.
    func download(_ tensor: Tensor) -> [Float]
    /// Same element count; converts between float dtypes (round to nearest even when narrowing).
    func copy(_ src: Tensor, to dst: Tensor)
    func zero(_ tensor: Tensor)
    func fill(_ tensor: Tensor, value: Float)
    /// `t[i] = (2 * uniform(seed, stream, i) - 1) * bound` (counter-based RNG, `relora_rng.h`).
    func fillUniform(_ tensor: Tensor, bound: Float, seed: UInt64, stream: UInt64)
    /// `t[i] ~ N(0, std^2)` by Box-Muller from counters `2i` and `2i + 1` of (seed, stream).
    func fillNormal(_ tensor: Tensor, std: Float, seed: UInt64, stream: UInt64)

    // MARK: Dense math

    /// `c[m,n] = alpha * s * op(a)[m,k] * op(b)[k,n] + beta * c`, where `s = alphaScale[0]` if given
    /// (a scalar that stays on the device, e.g. a trained LoRA scale), else 1. `op(a) = a^T` when
    /// `transA` (then `a` is stored `[k, m]`), likewise for `b` (stored `[n, k]` when `transB`).
    /// `lda`, `ldb`, `ldc`: each operand's row stride as stored (elements from one stored row to the
    /// next, at least the stored row length), 0 for packed rows (`RowPadding`: padded activations).
    func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int,
                transA: Bool, transB: Bool, alpha: Float, beta: Float, alphaScale: Tensor?, lda: Int, ldb: Int, ldc: Int)

    /// `out = x / sqrt(mean(x^2) + eps) * weight` per row; saves `rstd[row] = 1/sqrt(mean(x^2)+eps)`.
    /// x, out: `[rows, dim]`; weight: `[dim]`; rstd: `[rows]`.
    func rmsnormForward(_ x: Tensor, weight: Tensor, out: Tensor, rstd: Tensor, rows: Int, dim: Int, eps: Float)
    /// Backward of `rmsnormForward`. Accumulates into `dx` and `dweight`.
    func rmsnormBackward(_ dout: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                         dx: Tensor, dweight: Tensor, rows: Int, dim: Int)

    /// Rotary embedding in place, Hugging Face's rotate-half convention: for pair `i < headDim/2`,
    /// angle `pos * theta^(-2i/headDim)`, `(x_i, x_{i+d/2}) -> (x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin)`.
    /// x: `[batch * seqLen, heads * headDim]`, position of token n is `n % seqLen`.
    /// `inverse` applies the transposed rotation, which is the backward (the rotation is orthogonal).
    func rope(_ x: Tensor, batch: Int, seqLen: Int, heads: Int, headDim: Int, theta: Float, inverse: Bool)

    /// Causal attention with grouped-query heads (query head h reads kv head `h / (heads/kvHeads)`),
    /// scale `1/sqrt(headDim)`. q, out: `[N, heads*headDim]`; k, v: `[N, kvHeads*headDim]`.
    /// Saves the softmax log-sum-exp `lse: [batch, heads, seqLen]` for the backward (flash-style:
    /// no `T x T` matrix is kept between forward and backward).
    func attentionForward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int)
    /// The forward rotation of `rope` for `rows` consecutive positions starting at `position`: row r of
    /// x `[rows, heads * headDim]` rotated as a token at position `position + r` (the decode step of a KV
    /// cache). Each row's result has the bits `rope` gives a row at that position.
    func ropeAt(_ x: Tensor, rows: Int, position: Int, heads: Int, headDim: Int, theta: Float)
    /// One query row at `position` attending to rows `0 ... position` of a KV cache (causal attention's row
    /// `position`; the new key and value already written at `position`): q, out `[heads * headDim]`; kCache,
    /// vCache `[capacity, kvHeads * headDim]`, capacity > position. Heads and scale as `attentionForward`.
    func attentionDecode(q: Tensor, kCache: Tensor, vCache: Tensor, out: Tensor, position: Int,
                         heads: Int, kvHeads: Int, headDim: Int)
    /// Backward of `attentionForward`. Overwrites dq, dk, dv.
    func attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           dq: Tensor, dk: Tensor, dv: Tensor,
                           batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int)

    /// `out = silu(gate) * up`, elementwise over `count` values.
    func swigluForward(gate: Tensor, up: Tensor, out: Tensor, count: Int)
    /// Backward of `swigluForward`; overwrites dgate and dup.
    func swigluBackward(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, count: Int)

    /// `out[n] = table[ids[n]]`. ids: i32 `[N]` (validated by the caller); table: `[vocab, dim]`; out: `[N, dim]`.
    func embeddingForward(ids: Tensor, table: Tensor, out: Tensor, dim: Int)
    /// Accumulates `dtable[ids[n]] += dout[n]` (in token order, so repeated ids sum deterministically).
    func embeddingBackward(ids: Tensor, dout: Tensor, dtable: Tensor, dim: Int)

    /// Fused softmax cross-entropy over rows of `logits: [rows, vocab]` with i32 `targets: [rows]`.
    /// Writes `losses[row]` (0 where the target is negative) and returns to the host the sum over rows
    /// with a target, in Double (one transfer). If `gradScale` is given, overwrites `logits` with
    /// `gradScale * (softmax - onehot)` (zero rows where the target is negative): the gradient of
    /// `gradScale * sum(losses)`.
    /// `ld`: the logits' row stride (0 = `vocab`); the padding columns are neither read nor written.
    func crossEntropy(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                      gradScale: Float?, ld: Int) -> Double
    /// `crossEntropy` whose sum (the same Double, bit for bit) the host reads later, through the returned
    /// `DeferredSum`: a training step's micro-batches then do not wait for one another's loss. One transfer,
    /// as `crossEntropy`. `losses` may be overwritten once this returns (the sum no longer depends on it).
    /// Every backend's default is `crossEntropy` itself, the value known at once; a device enqueues the
    /// losses' copy to the host and returns.
    func crossEntropyDeferred(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                              gradScale: Float?, ld: Int) -> DeferredSum

    /// Inverted dropout: `out[i] = x[i] / (1 - p)` where `uniform(seed, stream, i) >= p`, else 0, over
    /// the first `count` elements. The mask is a pure function of (seed, stream, i) (counter-based RNG,
    /// `relora_rng.h`), so a backward pass regenerates it instead of storing it. `out` may be `x`.
    /// `cols`/`ld` (0 = packed): the elements are rows of `cols` stored `ld` apart, element `i` at row
    /// `i / cols`, column `i % cols`, so a padded matrix draws the packed one's mask; padding is untouched.
    func dropout(_ x: Tensor, _ out: Tensor, count: Int, p: Float, seed: UInt64, stream: UInt64, cols: Int, ld: Int)

    /// Accumulates `out[0] += sum_i a[i] * b[i]` over the first `count` elements (sum in Double).
    func dotAccumulate(_ a: Tensor, _ b: Tensor, count: Int, into out: Tensor)
    /// `a[i] += alpha * b[i]` for i < count.
    func axpy(_ alpha: Float, _ b: Tensor, _ a: Tensor, count: Int)
    /// `x *= alpha`.
    func scale(_ x: Tensor, by alpha: Float)
    /// `out[index] = sum_i x[i]^2` (summed in Double, stored as f32): per-tensor squared norms that the
    /// caller downloads once for all tensors.
    func sumOfSquares(_ x: Tensor, into out: Tensor, at index: Int)

    /// One AdamW step (PyTorch semantics: decoupled weight decay `p -= lr*wd*p`, bias correction
    /// with the 1-based `step`). param, m, v: f32 (the master copy when the working copy is narrower).
    func adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, lr: Float, beta1: Float, beta2: Float,
               eps: Float, weightDecay: Float, step: Int)

    /// One AdamW step with blockwise 8-bit moments (`optimizer_states: int8`): per block of 256 entries,
    /// dequantize m and v, the update above in f32 (`relora_adamw8_block`), requantize with the block's new
    /// absmax. Every backend gives the host reference's bits. param, grad: f32; m signed, v unsigned.
    func adamw8bit(param: Tensor, grad: Tensor, m: BlockwiseMoments, v: BlockwiseMoments, lr: Float, beta1: Float,
                   beta2: Float, eps: Float, weightDecay: Float, step: Int)
    /// The global L2 norm of `group.gradients`, read back in one transfer: each tensor's squared norm summed in
    /// Double and rounded to f32 (`sumOfSquares(_:into:at:)`'s value), those added in Double in tensor order, the
    /// square root in Double. Also decides the clip factor the next `adamwStep` on `group` applies:
    /// `Float(clip / norm)` when `clip > 0` and `norm > clip`, else 1. The non-finite skip is the caller's (a
    /// skipped step calls no `adamwStep`). Every backend gives the bits of the per-tensor ops
    /// (`loopingGradientNorm`, the default); a device computes and keeps the factor on the device and reads back
    /// only the norm.
    func gradientNorm(_ group: OptimizerGroup, clip: Double) -> Double
    /// One AdamW step of every update of `group`: its gradient scaled by the factor the last `gradientNorm` on
    /// `group` decided (if one is pending, and unless it is 1; the scaled gradient is stored, as `scale` does),
    /// `adamw` or `adamw8bit` (weight decay `weightDecay` where the update's `decay`, else 0), then the working
    /// copy written from the f32 values (`copy`). The bits of those per-tensor ops in any order
    /// (`loopingAdamwStep`, the default); a device runs a fixed number of launches for all tensors.
    func adamwStep(_ group: OptimizerGroup, lr: Float, beta1: Float, beta2: Float, eps: Float, weightDecay: Float, step: Int)
    /// Zeroes every tensor of `group.gradients` (`zero`'s bits): the start of an optimizer step. The default is
    /// `zero` tensor by tensor (`loopingZeroGradients`); a device runs a fixed number of launches for all tensors.
    func zeroGradients(_ group: OptimizerGroup)

    /// `out` (f32, same count) = the values of 8-bit moments.
    func dequantizeMoments(_ moments: BlockwiseMoments, into out: Tensor)
    /// 8-bit moments = `x` (f32, same count) quantized blockwise (`relora_adam8_quantize_block`).
    func quantizeMoments(_ x: Tensor, into moments: BlockwiseMoments)

    /// Zeroes entries of `tensor` by `rule` and returns to the host how many it zeroed (one transfer).
    func prune(_ tensor: Tensor, _ rule: PruneRule, seed: UInt64, stream: UInt64) -> Int

    /// Prunes Adam's moments `m` and `v` (f32, same count n) with ONE mask: position i is zeroed in both
    /// where its update magnitude `score[i] = |m[i]| / (sqrt(v[i]) + eps)` is at or below the k-th smallest
    /// score, k = ceil(ratio * n) (ties at the threshold zeroed too, as in `PruneRule.magnitude`). The
    /// score is computed in f32 with IEEE operations (sqrt, add, divide, each correctly rounded, no
    /// fused or approximate forms), so the mask is exact and the same on every backend. Returns to the
    /// host the number of positions zeroed (one transfer). ReLoRA's `magnitude_joint` optimizer reset.
    func pruneMoments(m: Tensor, v: Tensor, ratio: Double, eps: Float) -> Int

    // MARK: Quantized weights (formats and layout: `relora_quant.h`, `QuantizedTensor`)

    /// The raw bytes of any tensor (u8 blocks of quantized weights for checkpoints), one transfer.
    func downloadRaw(_ tensor: Tensor) -> [UInt8]
    /// Quantizes f32 `source` `[q.rows, q.cols]` into `q` with the reference quantizer of `relora_quant.h`
    /// (rows zero-padded to whole blocks), rounding to nearest or stochastically (`QuantRounding`: the
    /// stochastic codes are a function of (seed, stream, element), so every backend writes the same
    /// bytes). Returns nil, or the first element in row-major order it cannot store, in which case `q` is
    /// unspecified. One transfer (the status).
    func quantize(_ source: Tensor, into q: QuantizedTensor, rounding: QuantRounding) -> QuantizationFailure?
    /// `out[index]` (f32) = how many element codes of `new` differ from those in `old`, a u8 tensor of
    /// `new`'s size holding blocks of the same format (a copy of `new.blocks` taken before a
    /// requantization). Codes are counted per weight, not per byte (q4_0 and nf4 bytes hold two), scales
    /// are not compared, and the padding of a row (zeros, whose code no scale changes) never differs.
    /// Exact below 2^24; stays on the device, so a merge reads every linear's count back at once.
    func countChangedCodes(old: Tensor, new: QuantizedTensor, into out: Tensor, at index: Int)
    /// Rows `firstRow ..< firstRow + rowCount` of `q`, dequantized exactly as the reference does, into the
    /// first `rowCount * q.cols` elements of f32 `out` (padding dropped).
    func dequantize(_ q: QuantizedTensor, firstRow: Int, rowCount: Int, into out: Tensor)
    /// The scratch a `quantizedLinear*` call on a `[rows, cols]` weight needs (what the model allocates
    /// once, tagged `.workspace`, for its largest linear): the CPU dequantizes bounded tiles of rows.
    func dequantizeScratchShape(rows: Int, cols: Int) -> [Int]
    /// Whether `quantizedLinear` and `quantizedLinearInput` dequantize the whole weight at once and leave it in
    /// `scratch`: on return (in stream order) the first `rows * cols` elements of `scratch` hold deq(W) `[rows,
    /// cols]` row-major, in `scratch`'s dtype, so a caller that keeps `scratch` untouched can run a later
    /// `matmul` against it instead of dequantizing again (the model's recompute-to-backward reuse,
    /// `LlamaModel.reusesDequantizedWeights`). Default false: the CPU backend dequantizes tiles of rows, so its
    /// scratch holds only the last tile.
    var dequantizesWholeWeight: Bool { get }
    /// `y = x deq(W)^T + beta * y` for `W = q` `[out, in]`, x `[n, in]`, y `[n, out]`, dequantizing
    /// through `scratch` (at least `dequantizeScratchShape` elements); the whole dense W never exists.
    /// `ldx`, `ldy`: row strides of x and y as `matmul`'s (0 = packed).
    func quantizedLinear(_ x: Tensor, _ q: QuantizedTensor, _ y: Tensor, tokens n: Int, beta: Float, scratch: Tensor,
                         ldx: Int, ldy: Int)
    /// `dx = dy deq(W) + beta * dx` (the input gradient through a frozen quantized W), dy `[n, out]`,
    /// dx `[n, in]`, through `scratch`; `lddy`, `lddx` as `matmul`'s strides.
    func quantizedLinearInput(_ dy: Tensor, _ q: QuantizedTensor, _ dx: Tensor, tokens n: Int, beta: Float, scratch: Tensor,
                              lddy: Int, lddx: Int)
}

/// Which entries `Backend.prune` zeroes (ReLoRA's optimizer reset).
public enum PruneRule: Sendable, Equatable {
    /// Entries whose magnitude is at or below the `ratio`-quantile of the tensor's magnitudes: the
    /// k-th smallest |x| with k = ceil(ratio * n), exact; ties at the threshold are zeroed too.
    case magnitude(ratio: Double)
    /// Each entry with probability `p`, decided by `uniform(seed, stream, i) < p`.
    case random(probability: Double)
    /// Every entry.
    case all

    /// How many of `n` entries a magnitude rule with `ratio` selects at least: k = ceil(ratio * n), the rank of
    /// the threshold (every backend computes it here, so their masks agree).
    public static func magnitudeRank(ratio: Double, of n: Int) -> Int { Int((ratio * Double(n)).rounded(.up)) }
}

/// `Backend.pruneMomentsPrologue`'s answer: finished with this count, or select the k-th smallest score.
package enum MomentPruneStart {
    case done(Int)
    case select(k: Int)
}

/// The dtype of each role a tensor can play, per backend (the precision plan in docs/cuda.md).
public struct Precision: Sendable, Equatable, Codable {
    public var activations: DType
    public var loraFactors: DType
    /// Working copy of trained dense tensors (embeddings, norms, head; all weights in full-rank training).
    public var trainable: DType
    /// Dense frozen base weights (quantized formats come with their own storage).
    public var frozenWeights: DType
    public var gradients: DType
    public var optimizerStates: DType

    public init(activations: DType, loraFactors: DType, trainable: DType, frozenWeights: DType,
                gradients: DType, optimizerStates: DType) {
        self.activations = activations; self.loraFactors = loraFactors; self.trainable = trainable
        self.frozenWeights = frozenWeights; self.gradients = gradients; self.optimizerStates = optimizerStates
    }

    /// Whether a trained tensor of working dtype `dtype` needs an f32 master copy for the optimizer.
    public func needsMaster(_ dtype: DType) -> Bool { dtype != .f32 }

    /// The CPU reference: f32 everywhere.
    public static let fp32 = Precision(activations: .f32, loraFactors: .f32, trainable: .f32, frozenWeights: .f32,
                                       gradients: .f32, optimizerStates: .f32)
    /// CUDA: bf16 activations, LoRA factors, trained and frozen working copies; f32 gradients (micro-batch
    /// accumulation stays exact), f32 master copies and Adam states.
    public static let cudaMixed = Precision(activations: .bf16, loraFactors: .bf16, trainable: .bf16,
                                            frozenWeights: .bf16, gradients: .f32, optimizerStates: .f32)
}

extension Backend {
    public var maxAttentionHeadDim: Int? { nil }
    public var rowPadding: RowPadding { .none }
    public var dequantizesWholeWeight: Bool { false }

    /// What every backend's `pruneMoments` does before its select: counts the returned count's transfer,
    /// checks the shapes and settles the cases that need no select (nothing to zero: 0; every position:
    /// both zeroed, n). Returns `.done(zeroed)` for those, else `.select(k)` with the rank of the threshold.
    package func pruneMomentsPrologue(m: Tensor, v: Tensor, ratio: Double) -> MomentPruneStart {
        precondition(m.count == v.count, "pruneMoments: m has \(m.count) entries, v \(v.count)")
        ledger.downloaded(MemoryLayout<Int>.size)  // the returned count
        let n = m.count
        let k = n > 0 ? PruneRule.magnitudeRank(ratio: ratio, of: n) : 0
        if k <= 0 { return .done(0) }
        if k >= n { zero(m); zero(v); return .done(n) }
        return .select(k: k)
    }

    /// The shape checks of the 8-bit moment ops: every tensor holds `count` entries of its dtype.
    package func checkMoments(_ op: String, count: Int, _ moments: BlockwiseMoments..., f32: Tensor...) {
        for t in f32 { precondition(t.dtype == .f32 && t.count == count, "\(op): expected f32 [\(count)], got \(t.dtype) [\(t.count)]") }
        for q in moments {
            precondition(q.codes.dtype == .u8 && q.codes.count == count && q.absmax.dtype == .f32
                         && q.absmax.count == BlockwiseMoments.blocks(count), "\(op): 8-bit moments do not hold \(count) entries")
        }
    }

    /// A zeroed tensor of `dtype` (default f32).
    public func makeTensor(_ shape: [Int], dtype: DType = .f32, tag: MemoryTag) -> Tensor {
        makeTensor(shape, dtype: dtype, tag: tag, zeroed: true)
    }

    public func makeTensor(_ shape: [Int], tag: MemoryTag, zeroed: Bool) -> Tensor {
        makeTensor(shape, dtype: .f32, tag: tag, zeroed: zeroed)
    }

    /// `a += alpha * b` over all elements (same sizes).
    public func axpy(_ alpha: Float, _ b: Tensor, _ a: Tensor) {
        precondition(a.count == b.count, "axpy: \(b.count) into \(a.count)")
        axpy(alpha, b, a, count: a.count)
    }

    public func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int,
                       transA: Bool = false, transB: Bool = false, alpha: Float = 1, beta: Float = 0,
                       alphaScale: Tensor? = nil, lda: Int = 0, ldb: Int = 0, ldc: Int = 0) {
        matmul(a, b, c, m: m, n: n, k: k, transA: transA, transB: transB, alpha: alpha, beta: beta, alphaScale: alphaScale,
               lda: lda, ldb: ldb, ldc: ldc)
    }

    public func crossEntropy(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                             gradScale: Float?) -> Double {
        crossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale, ld: 0)
    }

    public func dropout(_ x: Tensor, _ out: Tensor, count: Int, p: Float, seed: UInt64, stream: UInt64) {
        dropout(x, out, count: count, p: p, seed: seed, stream: stream, cols: 0, ld: 0)
    }

    public func quantizedLinear(_ x: Tensor, _ q: QuantizedTensor, _ y: Tensor, tokens n: Int, beta: Float, scratch: Tensor) {
        quantizedLinear(x, q, y, tokens: n, beta: beta, scratch: scratch, ldx: 0, ldy: 0)
    }

    public func quantizedLinearInput(_ dy: Tensor, _ q: QuantizedTensor, _ dx: Tensor, tokens n: Int, beta: Float, scratch: Tensor) {
        quantizedLinearInput(dy, q, dx, tokens: n, beta: beta, scratch: scratch, lddy: 0, lddx: 0)
    }

    /// Squared L2 norms of `tensors`, computed on the backend and read back in one transfer; summed in Double.
    public func sumOfSquares(_ tensors: [Tensor]) -> Double {
        guard !tensors.isEmpty else { return 0 }
        let out = makeTensor([tensors.count], dtype: .f32, tag: .workspace, zeroed: false)
        for (i, t) in tensors.enumerated() { sumOfSquares(t, into: out, at: i) }
        return download(out).reduce(0.0) { $0 + Double($1) }
    }

    public func crossEntropyDeferred(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                                     gradScale: Float?, ld: Int) -> DeferredSum {
        DeferredSum(crossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale, ld: ld))
    }

    public func crossEntropyDeferred(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                                     gradScale: Float?) -> DeferredSum {
        crossEntropyDeferred(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale, ld: 0)
    }

    /// Round-to-nearest quantization (the formats' reference quantizers).
    public func quantize(_ source: Tensor, into q: QuantizedTensor) -> QuantizationFailure? {
        quantize(source, into: q, rounding: .nearest)
    }

    /// A scalar of a one-element tensor (one transfer).
    public func scalar(_ tensor: Tensor) -> Float { download(tensor)[0] }
}
