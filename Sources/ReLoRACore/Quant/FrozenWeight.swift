/// The base weight W `[out, in]` of a block linear. Frozen under LoRA/ReLoRA (no gradient, no
/// optimizer state); in full-rank training a `.dense` weight is the trained parameter itself. A
/// `.quantized` weight (q8_0, q4_0, nf4; LoRA modes only) is dequantized on the fly by the backend.
/// (`LlamaParameters.slots()` also uses `.dense` for the model's other, dense, tensors.)
public enum FrozenWeight: Sendable {
    case dense(Tensor)
    case quantized(QuantizedTensor)

    /// The dense tensor, or nil for a quantized weight.
    public var dense: Tensor? {
        if case .dense(let t) = self { return t }
        return nil
    }

    /// The quantized storage, or nil for a dense weight.
    public var quantized: QuantizedTensor? {
        if case .quantized(let q) = self { return q }
        return nil
    }

    /// The tensor holding the weight's bytes (the u8 blocks of a quantized weight).
    public var storage: Tensor {
        switch self {
        case .dense(let t): return t
        case .quantized(let q): return q.blocks
        }
    }

    /// `[out, in]` (the logical shape, padding excluded).
    public var shape: [Int] {
        switch self {
        case .dense(let t): return t.shape
        case .quantized(let q): return [q.rows, q.cols]
        }
    }

    /// W as f32 `[out, in]` in `out`: a copy of a dense weight; a quantized one's master copy if it has
    /// one (the weight merges add to), else its dequantized values.
    package func read(into out: Tensor, _ b: Backend) {
        switch self {
        case .dense(let t): b.copy(t, to: out)
        case .quantized(let q):
            if let master = q.master { b.copy(master, to: out) } else { b.dequantize(q, firstRow: 0, rowCount: q.rows, into: out) }
        }
    }
}
