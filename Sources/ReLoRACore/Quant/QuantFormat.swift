import CReLoRA

/// A storage format for frozen weights. The block layouts, the arithmetic and every convention (rounding,
/// ties, nibble order, degenerate blocks) are specified once, in C, by `Sources/CReLoRA/include/relora_quant.h`;
/// this type only names the formats and their sizes.
///
/// | format | block | bytes/block | bits/weight | byte-compatible with |
/// |---|---|---|---|---|
/// | `q8_0` | 32 | 34 (fp16 scale + 32 int8) | 8.5 | ggml/GGUF Q8_0 |
/// | `q4_0` | 32 | 18 (fp16 scale + 16 nibble pairs) | 4.5 | ggml/GGUF Q4_0 |
/// | `nf4` | 64 | 36 (fp32 absmax + 32 nibble pairs) | 4.5 | bitsandbytes NF4, blocksize 64, no double quantization |
///
/// Blocks run along a row (the input dimension of a linear layer's `[out, in]` weight).
public enum QuantFormat: String, Sendable, CaseIterable, Codable {
    case q8_0
    case q4_0
    case nf4

    /// Consecutive weights of a row that share one scale.
    public var blockSize: Int {
        switch self {
        case .q8_0: return Int(RELORA_QK8_0)
        case .q4_0: return Int(RELORA_QK4_0)
        case .nf4: return Int(RELORA_QKNF4)
        }
    }

    /// Bytes of one block, as laid out by the C structs (scale included).
    public var bytesPerBlock: Int {
        switch self {
        case .q8_0: return MemoryLayout<block_q8_0>.stride
        case .q4_0: return MemoryLayout<block_q4_0>.stride
        case .nf4: return MemoryLayout<block_nf4>.stride
        }
    }

    /// Alignment the C block struct needs (its fp16 or fp32 scale): 2, 2, 4. Rows are whole blocks, so a
    /// buffer aligned to this keeps every block aligned.
    public var blockAlignment: Int {
        switch self {
        case .q8_0: return MemoryLayout<block_q8_0>.alignment
        case .q4_0: return MemoryLayout<block_q4_0>.alignment
        case .nf4: return MemoryLayout<block_nf4>.alignment
        }
    }

    /// Storage cost per weight, the scale included: 8.5 (q8_0), 4.5 (q4_0), 4 + 32/64 = 4.5 (nf4).
    public var bitsPerWeight: Double { Double(8 * bytesPerBlock) / Double(blockSize) }

    /// The smallest |x| this format cannot store: at and above it the block's fp16 scale overflows
    /// (q8_0: 127 * 65520, q4_0: 8 * 65520). nil for nf4, whose fp32 absmax holds any finite value.
    public var magnitudeLimit: Float? {
        switch self {
        case .q8_0: return 127 * 65520
        case .q4_0: return 8 * 65520
        case .nf4: return nil
        }
    }

    /// Blocks per row of `cols` weights: the row is zero-padded to a whole number of blocks.
    public func blocksPerRow(cols: Int) -> Int { (cols + blockSize - 1) / blockSize }

    /// Bytes per stored row of `cols` weights (padding included).
    public func bytesPerRow(cols: Int) -> Int { blocksPerRow(cols: cols) * bytesPerBlock }

    /// Quantizes a row-major `[rows, cols]` matrix with the reference quantizer; see `QuantizedMatrix`.
    /// Throws `ReLoRAError.invalidData` for an inf or NaN weight, or one at or above `magnitudeLimit`.
    /// `name` (a tensor name) only makes the error message more useful.
    public func quantize(_ values: [Float], rows: Int, cols: Int, name: String? = nil) throws -> QuantizedMatrix {
        try QuantizedMatrix(quantizing: values, rows: rows, cols: cols, format: self, name: name)
    }
}
