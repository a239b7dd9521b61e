/// The work of one op as a roofline sees it: arithmetic and memory traffic, derived from the op's shapes and
/// storage dtypes alone (never from how a kernel does it), so the per-op profile can say what each op
/// should take on a device (`DevicePeaks.seconds(for:)`).
///
/// Conventions: a multiply-add is 2 FLOPs; `bytes` counts what an ideal kernel must move once: every
/// input read once, every output written once, an accumulated (`+=`) output read and written; scratch that
/// stays on chip is free. Transcendentals count as one FLOP each, which is generous to the bandwidth-bound
/// ops where they appear (all of them at these sizes).
public struct OpCost: Sendable, Equatable {
    public var flops: Double
    public var bytes: Double
    /// A bf16 matrix product: its FLOPs run at the tensor cores' rate (f32 products run on the f32 units).
    public var tensorCores: Bool
    /// The bytes cross the host link (uploads and downloads) rather than device memory.
    public var overHostLink: Bool

    public init(flops: Double, bytes: Double, tensorCores: Bool = false, overHostLink: Bool = false) {
        self.flops = flops
        self.bytes = bytes
        self.tensorCores = tensorCores
        self.overHostLink = overHostLink
    }

    /// `C[m, n] = op(A)[m, k] op(B)[k, n] (+ beta C)`: 2mnk FLOPs; A and B read once (`abBytes` per element),
    /// C written (`cBytes`), and read too when `accumulates` (beta != 0). bf16 operands run on tensor cores.
    public static func gemm(m: Int, n: Int, k: Int, abBytes: Int, cBytes: Int, accumulates: Bool) -> OpCost {
        let (m, n, k) = (Double(m), Double(n), Double(k))
        return OpCost(flops: 2 * m * n * k,
                      bytes: (m * k + k * n) * Double(abBytes) + m * n * Double(cBytes) * (accumulates ? 2 : 1),
                      tensorCores: abBytes == 2)
    }

    /// Causal attention over `batch` sequences of `seqLen` (`heads` query heads sharing `kvHeads` K/V heads,
    /// `headDim` wide, elements of `elementBytes`), counting only the causal half of the score matrix (the
    /// `seqLen (seqLen + 1) / 2` pairs a kernel that skips masked blocks computes): the forward's two
    /// products (`Q K^T`, `P V`) are `4 d` FLOPs a pair, the backward's five (`S` again, `dP = dO V^T`,
    /// `dV = P^T dO`, `dQ = dS K`, `dK = dS^T Q`) `10 d`, FlashAttention-2's 2.5x. Bytes: q, k, v (and the
    /// backward's dout, out, dq, dk, dv) once each, and the f32 log-sum-exp `[batch, heads, seqLen]`; no
    /// `T x T` matrix in memory.
    public static func attention(forward: Bool, batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int,
                                 elementBytes: Int) -> OpCost {
        let pairs = Double(batch * heads) * Double(seqLen) * Double(seqLen + 1) / 2
        let tokens = Double(batch * seqLen), e = Double(elementBytes)
        let qWidth = Double(heads * headDim), kvWidth = Double(kvHeads * headDim)
        let lse = Double(batch * heads * seqLen) * 4
        let flops = (forward ? 4 : 10) * pairs * Double(headDim)
        // forward: read q, k, v, write out; backward: read dout, q, k, v, out, write dq, dk, dv.
        let elements = forward ? tokens * (2 * qWidth + 2 * kvWidth) : tokens * (4 * qWidth + 4 * kvWidth)
        return OpCost(flops: flops, bytes: elements * e + lse, tensorCores: elementBytes == 2)
    }

    /// A pass over `count` elements doing `flopsPerElement` FLOPs and moving `bytesPerElement` bytes (all
    /// operands together) for each: the elementwise ops, conversions, fills, reductions and the optimizer.
    public static func streaming(count: Int, flopsPerElement: Double, bytesPerElement: Double) -> OpCost {
        OpCost(flops: Double(count) * flopsPerElement, bytes: Double(count) * bytesPerElement)
    }

    /// A device copy or conversion of `src` into `dst` (read one, write the other).
    public static func copy(_ src: Tensor, _ dst: Tensor) -> OpCost {
        OpCost(flops: 0, bytes: Double(src.byteCount + dst.byteCount))
    }

    /// Writing every byte of `tensor` (zero, fill; the random fills with the RNG's FLOPs an element).
    public static func fill(_ tensor: Tensor, flopsPerElement: Double = 0) -> OpCost {
        OpCost(flops: Double(tensor.count) * flopsPerElement, bytes: Double(tensor.byteCount))
    }

    /// `x *= alpha`: read and write.
    public static func scale(_ x: Tensor) -> OpCost { OpCost(flops: Double(x.count), bytes: 2 * Double(x.byteCount)) }

    /// `a += alpha b` over `count` elements: read b, read and write a.
    public static func axpy(count: Int, bBytes: Int, aBytes: Int) -> OpCost {
        streaming(count: count, flopsPerElement: 2, bytesPerElement: Double(bBytes + 2 * aBytes))
    }

    /// `sum x^2` of a tensor (read once).
    public static func sumOfSquares(_ x: Tensor) -> OpCost { OpCost(flops: 2 * Double(x.count), bytes: Double(x.byteCount)) }

    /// `sum a b` over `count` elements of two tensors.
    public static func dot(count: Int, elementBytes: Int) -> OpCost {
        streaming(count: count, flopsPerElement: 2, bytesPerElement: Double(2 * elementBytes))
    }

    /// SwiGLU over `count` elements: forward reads gate and up and writes out (silu and a product, ~5 FLOPs);
    /// backward reads dout, gate and up and writes dgate and dup (~10 FLOPs).
    public static func swiglu(forward: Bool, count: Int, elementBytes: Int) -> OpCost {
        streaming(count: count, flopsPerElement: forward ? 5 : 10, bytesPerElement: Double((forward ? 3 : 5) * elementBytes))
    }

    /// RoPE in place over `count` elements (read and write; two products and a sum an element; the cos/sin
    /// table stays in cache).
    public static func rope(count: Int, elementBytes: Int) -> OpCost {
        streaming(count: count, flopsPerElement: 3, bytesPerElement: Double(2 * elementBytes))
    }

    /// Dropout over `count` elements (read, write; the mask's counter-based draw ~2 FLOPs).
    public static func dropout(count: Int, elementBytes: Int) -> OpCost {
        streaming(count: count, flopsPerElement: 2, bytesPerElement: Double(2 * elementBytes))
    }

    /// 8-bit moments <-> f32 (`dequantizeMoments`, `quantizeMoments`): a code byte and an f32 an entry; the
    /// map search of the quantizer ~10 FLOPs.
    public static func convertMoments(count: Int) -> OpCost {
        streaming(count: count, flopsPerElement: 10, bytesPerElement: 5)
    }

    /// RMSNorm over `[rows, dim]` (`elementBytes` for x, out, dout, dx and the weight; rstd and the weight's
    /// gradient f32). Forward: square, sum, scale, weight (4 FLOPs an element); reads x, writes out and
    /// rstd. Backward: ~8 FLOPs an element; reads dout, x, rstd and the weight, accumulates dx (read +
    /// write) and the f32 weight gradient.
    public static func rmsnorm(forward: Bool, rows: Int, dim: Int, elementBytes: Int) -> OpCost {
        let n = Double(rows * dim), e = Double(elementBytes), r = Double(rows), d = Double(dim)
        if forward { return OpCost(flops: 4 * n, bytes: 2 * n * e + d * e + 4 * r) }
        return OpCost(flops: 8 * n, bytes: 4 * n * e + d * e + 4 * r + 8 * d)
    }

    /// Softmax cross-entropy over `[rows, vocab]` logits: max, exp, sum, log (4 FLOPs a logit) and, with the
    /// gradient, `softmax - onehot` scaled in place (2 more). The logits are read once and, with the
    /// gradient, written once; targets and losses are 8 bytes a row.
    public static func crossEntropy(rows: Int, vocab: Int, elementBytes: Int, withGradient: Bool) -> OpCost {
        let n = Double(rows * vocab)
        return OpCost(flops: (withGradient ? 6 : 4) * n,
                      bytes: n * Double(elementBytes) * (withGradient ? 2 : 1) + 8 * Double(rows))
    }

    /// The embedding: forward gathers `tokens` rows of `dim` (read and write each, plus the ids); backward
    /// adds `tokens` rows of dout into the f32 table's rows (read dout, read + write the f32 row).
    public static func embedding(forward: Bool, tokens: Int, dim: Int, elementBytes: Int) -> OpCost {
        let n = Double(tokens * dim), ids = 4 * Double(tokens)
        if forward { return OpCost(flops: 0, bytes: 2 * n * Double(elementBytes) + ids) }
        return OpCost(flops: n, bytes: n * (Double(elementBytes) + 8) + ids)
    }

    /// Dequantizing `[rows, cols]` stored in `blockBytes` bytes of blocks into `outBytes`-byte elements
    /// (one multiply an element).
    public static func dequantize(rows: Int, cols: Int, blockBytes: Int, outBytes: Int) -> OpCost {
        let n = Double(rows * cols)
        return OpCost(flops: n, bytes: Double(blockBytes) + n * Double(outBytes))
    }

    /// AdamW with f32 moments over `count` parameters: reads the gradient, reads and writes the f32
    /// parameter, m and v (28 bytes a parameter); ~12 FLOPs a parameter (moments, bias corrections, sqrt,
    /// division, decay).
    public static func adamw(count: Int) -> OpCost { streaming(count: count, flopsPerElement: 12, bytesPerElement: 28) }

    /// AdamW with blockwise 8-bit moments: the f32 parameter (read + write) and gradient, the two moments'
    /// codes (read + write) and their per-256 absmax (16 bytes a parameter and 16 a block); dequantizing and
    /// requantizing the moments (a search of the 256-entry map) is ~30 FLOPs a parameter.
    public static func adamw8bit(count: Int) -> OpCost {
        streaming(count: count, flopsPerElement: 30, bytesPerElement: 16 + 16.0 / 256)
    }

    /// `bytes` across the host link (an upload or a download).
    public static func transfer(bytes: Int) -> OpCost {
        OpCost(flops: 0, bytes: Double(bytes), overHostLink: true)
    }
}
