@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAFormats
@testable import ReLoRATokenizer
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain
@testable import ReLoRAAnalysis
@testable import ReLoRASelfTest

/// A test backend that wraps a `CPUBackend`: every op forwards to `inner` unless the conforming type
/// implements it itself (the faulty and narrow-storage backends of `ConformanceTests` override only the
/// ops they change). A new Backend op gets its forward here, once.
protocol ForwardingToCPU: Backend {
    var inner: CPUBackend { get }
}

extension ForwardingToCPU {
    var ledger: MemoryLedger { inner.ledger }
    var precision: Precision { inner.precision }
    var computes: Bool { true }
    var rowPadding: RowPadding { inner.rowPadding }

    func makeTensor(_ shape: [Int], dtype: DType, tag: MemoryTag, zeroed: Bool) -> Tensor {
        inner.makeTensor(shape, dtype: dtype, tag: tag, zeroed: zeroed)
    }
    func upload(_ values: [Float], to tensor: Tensor) { inner.upload(values, to: tensor) }
    func upload(_ values: [Int32], to tensor: Tensor) { inner.upload(values, to: tensor) }
    func upload(raw: UnsafeRawBufferPointer, dtype: DType, to tensor: Tensor) { inner.upload(raw: raw, dtype: dtype, to: tensor) }
    func download(_ tensor: Tensor) -> [Float] { inner.download(tensor) }
    func copy(_ src: Tensor, to dst: Tensor) { inner.copy(src, to: dst) }
    func zero(_ tensor: Tensor) { inner.zero(tensor) }
    func fill(_ tensor: Tensor, value: Float) { inner.fill(tensor, value: value) }
    func fillUniform(_ tensor: Tensor, bound: Float, seed: UInt64, stream: UInt64) {
        inner.fillUniform(tensor, bound: bound, seed: seed, stream: stream)
    }
    func fillNormal(_ tensor: Tensor, std: Float, seed: UInt64, stream: UInt64) {
        inner.fillNormal(tensor, std: std, seed: seed, stream: stream)
    }
    func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int, transA: Bool, transB: Bool, alpha: Float,
                beta: Float, alphaScale: Tensor?, lda: Int, ldb: Int, ldc: Int) {
        inner.matmul(a, b, c, m: m, n: n, k: k, transA: transA, transB: transB, alpha: alpha, beta: beta, alphaScale: alphaScale,
                     lda: lda, ldb: ldb, ldc: ldc)
    }
    func rmsnormForward(_ x: Tensor, weight: Tensor, out: Tensor, rstd: Tensor, rows: Int, dim: Int, eps: Float) {
        inner.rmsnormForward(x, weight: weight, out: out, rstd: rstd, rows: rows, dim: dim, eps: eps)
    }
    func rmsnormBackward(_ dout: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dx: Tensor, dweight: Tensor, rows: Int, dim: Int) {
        inner.rmsnormBackward(dout, x: x, weight: weight, rstd: rstd, dx: dx, dweight: dweight, rows: rows, dim: dim)
    }
    func rope(_ x: Tensor, batch: Int, seqLen: Int, heads: Int, headDim: Int, theta: Float, inverse: Bool) {
        inner.rope(x, batch: batch, seqLen: seqLen, heads: heads, headDim: headDim, theta: theta, inverse: inverse)
    }
    func ropeAt(_ x: Tensor, rows: Int, position: Int, heads: Int, headDim: Int, theta: Float) {
        inner.ropeAt(x, rows: rows, position: position, heads: heads, headDim: headDim, theta: theta)
    }
    func attentionDecode(q: Tensor, kCache: Tensor, vCache: Tensor, out: Tensor, position: Int, heads: Int, kvHeads: Int,
                         headDim: Int) {
        inner.attentionDecode(q: q, kCache: kCache, vCache: vCache, out: out, position: position, heads: heads,
                              kvHeads: kvHeads, headDim: headDim)
    }
    func attentionForward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, batch: Int, seqLen: Int, heads: Int,
                          kvHeads: Int, headDim: Int) {
        inner.attentionForward(q: q, k: k, v: v, out: out, lse: lse, batch: batch, seqLen: seqLen, heads: heads,
                               kvHeads: kvHeads, headDim: headDim)
    }
    func attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dq: Tensor, dk: Tensor,
                           dv: Tensor, batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int) {
        inner.attentionBackward(dout: dout, q: q, k: k, v: v, out: out, lse: lse, dq: dq, dk: dk, dv: dv, batch: batch,
                                seqLen: seqLen, heads: heads, kvHeads: kvHeads, headDim: headDim)
    }
    func swigluForward(gate: Tensor, up: Tensor, out: Tensor, count: Int) {
        inner.swigluForward(gate: gate, up: up, out: out, count: count)
    }
    func swigluBackward(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, count: Int) {
        inner.swigluBackward(dout: dout, gate: gate, up: up, dgate: dgate, dup: dup, count: count)
    }
    func embeddingForward(ids: Tensor, table: Tensor, out: Tensor, dim: Int) {
        inner.embeddingForward(ids: ids, table: table, out: out, dim: dim)
    }
    func embeddingBackward(ids: Tensor, dout: Tensor, dtable: Tensor, dim: Int) {
        inner.embeddingBackward(ids: ids, dout: dout, dtable: dtable, dim: dim)
    }
    func crossEntropy(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int, gradScale: Float?, ld: Int) -> Double {
        inner.crossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale, ld: ld)
    }
    func dropout(_ x: Tensor, _ out: Tensor, count: Int, p: Float, seed: UInt64, stream: UInt64, cols: Int, ld: Int) {
        inner.dropout(x, out, count: count, p: p, seed: seed, stream: stream, cols: cols, ld: ld)
    }
    func dotAccumulate(_ a: Tensor, _ b: Tensor, count: Int, into out: Tensor) { inner.dotAccumulate(a, b, count: count, into: out) }
    func axpy(_ alpha: Float, _ b: Tensor, _ a: Tensor, count: Int) { inner.axpy(alpha, b, a, count: count) }
    func scale(_ x: Tensor, by alpha: Float) { inner.scale(x, by: alpha) }
    func sumOfSquares(_ x: Tensor, into out: Tensor, at index: Int) { inner.sumOfSquares(x, into: out, at: index) }
    func adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, lr: Float, beta1: Float, beta2: Float, eps: Float,
               weightDecay: Float, step: Int) {
        inner.adamw(param: param, grad: grad, m: m, v: v, lr: lr, beta1: beta1, beta2: beta2, eps: eps,
                    weightDecay: weightDecay, step: step)
    }
    func adamw8bit(param: Tensor, grad: Tensor, m: BlockwiseMoments, v: BlockwiseMoments, lr: Float, beta1: Float,
                   beta2: Float, eps: Float, weightDecay: Float, step: Int) {
        inner.adamw8bit(param: param, grad: grad, m: m, v: v, lr: lr, beta1: beta1, beta2: beta2, eps: eps,
                        weightDecay: weightDecay, step: step)
    }
    func dequantizeMoments(_ moments: BlockwiseMoments, into out: Tensor) { inner.dequantizeMoments(moments, into: out) }
    func quantizeMoments(_ x: Tensor, into moments: BlockwiseMoments) { inner.quantizeMoments(x, into: moments) }
    func prune(_ tensor: Tensor, _ rule: PruneRule, seed: UInt64, stream: UInt64) -> Int {
        inner.prune(tensor, rule, seed: seed, stream: stream)
    }
    func pruneMoments(m: Tensor, v: Tensor, ratio: Double, eps: Float) -> Int {
        inner.pruneMoments(m: m, v: v, ratio: ratio, eps: eps)
    }
    func downloadRaw(_ tensor: Tensor) -> [UInt8] { inner.downloadRaw(tensor) }
    func quantize(_ source: Tensor, into q: QuantizedTensor, rounding: QuantRounding) -> QuantizationFailure? {
        inner.quantize(source, into: q, rounding: rounding)
    }
    func countChangedCodes(old: Tensor, new: QuantizedTensor, into out: Tensor, at index: Int) {
        inner.countChangedCodes(old: old, new: new, into: out, at: index)
    }
    func dequantize(_ q: QuantizedTensor, firstRow: Int, rowCount: Int, into out: Tensor) {
        inner.dequantize(q, firstRow: firstRow, rowCount: rowCount, into: out)
    }
    func dequantizeScratchShape(rows: Int, cols: Int) -> [Int] { inner.dequantizeScratchShape(rows: rows, cols: cols) }
    var dequantizesWholeWeight: Bool { inner.dequantizesWholeWeight }
    func quantizedLinear(_ x: Tensor, _ q: QuantizedTensor, _ y: Tensor, tokens n: Int, beta: Float, scratch: Tensor, ldx: Int, ldy: Int) {
        inner.quantizedLinear(x, q, y, tokens: n, beta: beta, scratch: scratch, ldx: ldx, ldy: ldy)
    }
    func quantizedLinearInput(_ dy: Tensor, _ q: QuantizedTensor, _ dx: Tensor, tokens n: Int, beta: Float, scratch: Tensor,
                              lddy: Int, lddx: Int) {
        inner.quantizedLinearInput(dy, q, dx, tokens: n, beta: beta, scratch: scratch, lddy: lddy, lddx: lddx)
    }
}
