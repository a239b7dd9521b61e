/// The op set a LLaMA training step needs, forward and backward. The model and the trainer are
/// written once against this protocol; `CPUBackend` is the readable reference (the specification
/// every CUDA kernel is tested against).
///
/// Conventions:
/// - Tensors are row-major. Activations are `[N, C]` with `N = batch * seqLen` tokens, token
///   `n = b * seqLen + t`. Attention heads are interleaved in the feature dimension: q is
///   `[N, nHeads * headDim]`, head `h` at columns `h*headDim ..< (h+1)*headDim` (Hugging Face layout).
/// - Linear weights are `[out, in]` (Hugging Face layout): `y = x W^T`.
/// - Ops whose doc says "accumulates" add into their output (`+=`); the others overwrite it.
/// - Token ids and targets are `Int32`; a negative target means "no prediction at this position".
public protocol Backend: AnyObject, Sendable {
    var name: String { get }
    var ledger: MemoryLedger { get }

    func makeTensor(_ shape: [Int], tag: MemoryTag, zeroed: Bool) -> Tensor
    func upload(_ values: [Float], to tensor: Tensor)
    func download(_ tensor: Tensor) -> [Float]
    func copy(_ src: Tensor, to dst: Tensor)
    func zero(_ tensor: Tensor)

    /// `c[m,n] = alpha * op(a)[m,k] * op(b)[k,n] + beta * c`. `op(a) = a^T` when `transA`
    /// (then `a` is stored `[k, m]`), likewise for `b` (stored `[n, k]` when `transB`).
    func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int,
                transA: Bool, transB: Bool, alpha: Float, beta: Float)

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
    /// no `T x T` matrix is kept).
    func attentionForward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int)
    /// Backward of `attentionForward`. Overwrites dq, dk, dv.
    func attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           dq: Tensor, dk: Tensor, dv: Tensor,
                           batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int)

    /// `out = silu(gate) * up`, elementwise over `count` values.
    func swigluForward(gate: Tensor, up: Tensor, out: Tensor, count: Int)
    /// Backward of `swigluForward`; overwrites dgate and dup.
    func swigluBackward(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, count: Int)

    /// `out[n] = table[ids[n]]`. table: `[vocab, dim]`; out: `[ids.count, dim]`. Ids are validated by the caller.
    func embeddingForward(ids: [Int32], table: Tensor, out: Tensor, dim: Int)
    /// Accumulates `dtable[ids[n]] += dout[n]`.
    func embeddingBackward(ids: [Int32], dout: Tensor, dtable: Tensor, dim: Int)

    /// Fused softmax cross-entropy over rows of `logits: [rows, vocab]`. Writes `losses[row]`
    /// (0 where the target is negative) and returns the sum over rows with a target, in Double.
    /// If `gradScale` is given, overwrites `logits` with `gradScale * (softmax - onehot)` (zero rows
    /// where the target is negative): the gradient of `gradScale * sum(losses)`.
    func crossEntropy(logits: Tensor, targets: [Int32], losses: Tensor, rows: Int, vocab: Int,
                      gradScale: Float?) -> Double

    /// Inverted dropout: `out[i] = x[i] / (1 - p)` where `uniform(seed, stream, i) >= p`, else 0, over
    /// the first `count` elements. The mask is a pure function of (seed, stream, i) (counter-based RNG,
    /// `relora_rng.h`), so a backward pass regenerates it instead of storing it. `out` may be `x`.
    func dropout(_ x: Tensor, _ out: Tensor, count: Int, p: Float, seed: UInt64, stream: UInt64)

    /// `sum_i a[i] * b[i]` over the first `count` elements, in Double.
    func dot(_ a: Tensor, _ b: Tensor, count: Int) -> Double

    /// `a[i] += alpha * b[i]` for i < count.
    func axpy(_ alpha: Float, _ b: Tensor, _ a: Tensor, count: Int)
    /// `out = a + b` over all elements.
    func add(_ a: Tensor, _ b: Tensor, _ out: Tensor)
    /// `x *= alpha`.
    func scale(_ x: Tensor, by alpha: Float)
    /// Sum of squares in Double (gradient norms).
    func sumOfSquares(_ x: Tensor) -> Double

    /// One AdamW step (PyTorch semantics: decoupled weight decay `p -= lr*wd*p`, bias correction
    /// with the 1-based `step`). m, v: first and second moments, updated in place.
    func adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, lr: Float, beta1: Float, beta2: Float,
               eps: Float, weightDecay: Float, step: Int)
}

extension Backend {
    public func makeTensor(_ shape: [Int], tag: MemoryTag) -> Tensor { makeTensor(shape, tag: tag, zeroed: true) }

    /// `a += alpha * b` over all elements (same sizes).
    public func axpy(_ alpha: Float, _ b: Tensor, _ a: Tensor) {
        precondition(a.count == b.count, "axpy: \(b.count) into \(a.count)")
        axpy(alpha, b, a, count: a.count)
    }

    public func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int,
                       transA: Bool = false, transB: Bool = false, beta: Float = 0) {
        matmul(a, b, c, m: m, n: n, k: k, transA: transA, transB: transB, alpha: 1, beta: beta)
    }
}
