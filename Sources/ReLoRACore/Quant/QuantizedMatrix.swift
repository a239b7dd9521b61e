import CReLoRA

/// A row-major `[rows, cols]` weight matrix stored in a quantized format, as raw host bytes.
///
/// Layout: each row is zero-padded to `format.blocksPerRow(cols:)` whole blocks and stored as that many
/// consecutive C blocks (`block_q8_0`, `block_q4_0` or `block_nf4` of `relora_quant.h`), rows one after
/// another: row `r` occupies `bytes[r * bytesPerRow ..< (r + 1) * bytesPerRow]`. A tile of rows is
/// therefore one contiguous byte range, and a row of a weight whose `cols` divides into blocks has exactly
/// the bytes GGUF (q8_0, q4_0) or bitsandbytes (nf4, absmax and codes interleaved per block) would store.
/// Padding (the 1b config's down_proj has 5461 inputs) is zeros, quantizes like any value and is dropped
/// by `dequantize()`; it never reaches a GEMM.
///
/// This is deliberately simple host storage (`[UInt8]`) with the scalar reference quantizer: the backends'
/// tagged storage (`QuantizedTensor`) and their fast paths (the CPU's tiles, the CUDA kernels) must match
/// these bytes and values bit for bit.
///
/// `quantize(dequantize(q)) == q` for every matrix this type produces, so merging a zero update into
/// frozen weights changes no code.
public struct QuantizedMatrix: Sendable, Equatable {
    public let format: QuantFormat
    public let rows: Int
    public let cols: Int
    /// `rows * bytesPerRow` bytes of blocks.
    public let bytes: [UInt8]

    public var blocksPerRow: Int { format.blocksPerRow(cols: cols) }
    public var bytesPerRow: Int { format.bytesPerRow(cols: cols) }
    /// `cols` rounded up to whole blocks: the stored row length.
    public var paddedCols: Int { blocksPerRow * format.blockSize }

    /// Wraps existing blocks (read from a checkpoint or a GGUF file); the byte count must match the shape.
    public init(format: QuantFormat, rows: Int, cols: Int, bytes: [UInt8]) throws {
        guard rows >= 0, cols >= 0 else {
            throw ReLoRAError.invalidData("a \(format.rawValue) matrix cannot have shape [\(rows), \(cols)]")
        }
        let expected = rows * format.bytesPerRow(cols: cols)
        guard bytes.count == expected else {
            throw ReLoRAError.invalidData("a \(format.rawValue) matrix of shape [\(rows), \(cols)] needs \(expected) bytes (\(format.blocksPerRow(cols: cols)) blocks of \(format.bytesPerBlock) bytes per row), got \(bytes.count)")
        }
        self.format = format
        self.rows = rows
        self.cols = cols
        self.bytes = bytes
    }

    /// Quantizes row-major `values` (`rows * cols` of them) with the reference quantizer of `relora_quant.h`,
    /// rounding to nearest or stochastically (`QuantRounding`).
    public init(quantizing values: [Float], rows: Int, cols: Int, format: QuantFormat, name: String? = nil,
                rounding: QuantRounding = .nearest) throws {
        precondition(rows >= 0 && cols >= 0 && values.count == rows * cols,
                     "quantize: \(values.count) values for shape [\(rows), \(cols)]")
        let bytesPerRow = format.bytesPerRow(cols: cols)
        let paddedCols = format.blocksPerRow(cols: cols) * format.blockSize
        var failure: (status: Int32, row: Int, col: Int)?
        let bytes = [UInt8](unsafeUninitializedCapacity: rows * bytesPerRow) { buffer, initialized in
            // Zero-filled first so that an early error leaves no uninitialized memory behind.
            if let base = buffer.baseAddress { base.initialize(repeating: 0, count: rows * bytesPerRow) }
            initialized = rows * bytesPerRow
            guard rows > 0, cols > 0, let out = buffer.baseAddress else { return }
            var padded = [Float](repeating: 0, count: paddedCols)
            values.withUnsafeBufferPointer { input in
                padded.withUnsafeMutableBufferPointer { scratch in
                    for r in 0 ..< rows {
                        let row = UnsafeBufferPointer(rebasing: input[r * cols ..< (r + 1) * cols])
                        let source: UnsafePointer<Float>
                        if paddedCols == cols {
                            source = row.baseAddress!
                        } else {
                            // The padding stays zero: only the first `cols` entries are ever written.
                            _ = UnsafeMutableBufferPointer(rebasing: scratch[0 ..< cols]).update(fromContentsOf: row)
                            source = UnsafePointer(scratch.baseAddress!)
                        }
                        var badIndex: Int64 = -1
                        let status = Self.quantizeRow(format, source, UnsafeMutableRawPointer(out + r * bytesPerRow),
                                                      Int64(paddedCols), &badIndex, rounding: rounding,
                                                      counter0: UInt64(r * paddedCols))
                        if status != RELORA_QUANT_OK {
                            failure = (status, r, Int(badIndex))
                            return
                        }
                    }
                }
            }
        }
        if let failure {
            throw Self.quantizationError(failure.status, format: format, name: name, row: failure.row,
                                         col: failure.col, value: values[failure.row * cols + failure.col])
        }
        self.format = format
        self.rows = rows
        self.cols = cols
        self.bytes = bytes
    }

    /// The `rows * cols` weights the blocks stand for, row-major (padding dropped), by the reference
    /// dequantizer: `code * scale` in fp32, exactly as ggml and bitsandbytes compute it.
    public func dequantize() -> [Float] {
        let (rows, cols, paddedCols, bytesPerRow, format) = (rows, cols, paddedCols, bytesPerRow, format)
        return [Float](unsafeUninitializedCapacity: rows * cols) { output, initialized in
            defer { initialized = rows * cols }
            guard rows > 0, cols > 0 else { return }
            var padded = [Float](repeating: 0, count: paddedCols)
            bytes.withUnsafeBytes { raw in
                padded.withUnsafeMutableBufferPointer { scratch in
                    for r in 0 ..< rows {
                        let blocks = raw.baseAddress! + r * bytesPerRow
                        let row = UnsafeMutableBufferPointer(rebasing: output[r * cols ..< (r + 1) * cols])
                        if paddedCols == cols {
                            Self.dequantizeRow(format, blocks, row.baseAddress!, Int64(cols))
                        } else {
                            Self.dequantizeRow(format, blocks, scratch.baseAddress!, Int64(paddedCols))
                            _ = row.initialize(fromContentsOf: UnsafeBufferPointer(rebasing: scratch[0 ..< cols]))
                        }
                    }
                }
            }
        }
    }

    // MARK: - C reference calls

    // Swift array storage is 16-byte aligned and every row starts at a multiple of the block size, so each
    // block is aligned for its C struct (2 bytes for q8_0/q4_0, 4 for nf4's float absmax).
    static func quantizeRow(_ format: QuantFormat, _ x: UnsafePointer<Float>, _ blocks: UnsafeMutableRawPointer,
                                    _ n: Int64, _ badIndex: inout Int64) -> Int32 {
        assert(Int(bitPattern: blocks) % format.blockAlignment == 0, "quantize: misaligned blocks")
        switch format {
        case .q8_0: return relora_quantize_row_q8_0(x, UnsafeMutablePointer(OpaquePointer(blocks)), n, &badIndex)
        case .q4_0: return relora_quantize_row_q4_0(x, UnsafeMutablePointer(OpaquePointer(blocks)), n, &badIndex)
        case .nf4: return relora_quantize_row_nf4(x, UnsafeMutablePointer(OpaquePointer(blocks)), n, &badIndex)
        }
    }

    /// One padded row of `n` values with `rounding`; under stochastic rounding element i draws counter
    /// `counter0 + i` (the matrix element's padded index, see `QuantRounding.stochastic`).
    static func quantizeRow(_ format: QuantFormat, _ x: UnsafePointer<Float>, _ blocks: UnsafeMutableRawPointer,
                            _ n: Int64, _ badIndex: inout Int64, rounding: QuantRounding, counter0: UInt64) -> Int32 {
        guard case .stochastic(let seed, let stream) = rounding else { return quantizeRow(format, x, blocks, n, &badIndex) }
        assert(Int(bitPattern: blocks) % format.blockAlignment == 0, "quantize: misaligned blocks")
        switch format {
        case .q8_0:
            return relora_quantize_row_q8_0_sr(x, UnsafeMutablePointer(OpaquePointer(blocks)), n, seed, stream, counter0, &badIndex)
        case .q4_0:
            return relora_quantize_row_q4_0_sr(x, UnsafeMutablePointer(OpaquePointer(blocks)), n, seed, stream, counter0, &badIndex)
        case .nf4:
            return relora_quantize_row_nf4_sr(x, UnsafeMutablePointer(OpaquePointer(blocks)), n, seed, stream, counter0, &badIndex)
        }
    }

    /// How many element codes differ between two rows of `blocks` blocks each (scales not compared).
    static func changedCodes(_ format: QuantFormat, _ a: UnsafeRawPointer, _ b: UnsafeRawPointer, blocks: Int) -> Int {
        switch format {
        case .q8_0: return Int(relora_changed_codes_q8_0(UnsafePointer(OpaquePointer(a)), UnsafePointer(OpaquePointer(b)), Int64(blocks)))
        case .q4_0: return Int(relora_changed_codes_q4_0(UnsafePointer(OpaquePointer(a)), UnsafePointer(OpaquePointer(b)), Int64(blocks)))
        case .nf4: return Int(relora_changed_codes_nf4(UnsafePointer(OpaquePointer(a)), UnsafePointer(OpaquePointer(b)), Int64(blocks)))
        }
    }

    static func dequantizeRow(_ format: QuantFormat, _ blocks: UnsafeRawPointer, _ y: UnsafeMutablePointer<Float>,
                                      _ n: Int64) {
        assert(Int(bitPattern: blocks) % format.blockAlignment == 0, "dequantize: misaligned blocks")
        let status: Int32
        switch format {
        case .q8_0: status = relora_dequantize_row_q8_0(UnsafePointer(OpaquePointer(blocks)), y, n)
        case .q4_0: status = relora_dequantize_row_q4_0(UnsafePointer(OpaquePointer(blocks)), y, n)
        case .nf4: status = relora_dequantize_row_nf4(UnsafePointer(OpaquePointer(blocks)), y, n)
        }
        precondition(status == RELORA_QUANT_OK, "dequantize: row length \(n) is not whole \(format.rawValue) blocks")
    }

    static func quantizationError(_ status: Int32, format: QuantFormat, name: String?, row: Int, col: Int,
                                          value: Float) -> ReLoRAError {
        let what = name.map { "tensor '\($0)'" } ?? "the weights"
        let fmt = format.rawValue
        switch status {
        case RELORA_QUANT_ERR_NONFINITE:
            return .invalidData("cannot quantize \(what) to \(fmt): element [\(row), \(col)] is \(value.isNaN ? "NaN" : "\(value)"); quantized formats hold finite weights only, so check the weights for a diverged run or a corrupt file")
        case RELORA_QUANT_ERR_SCALE_OVERFLOW:
            return .invalidData("cannot quantize \(what) to \(fmt): element [\(row), \(col)] = \(value) is too large for its fp16 block scale (\(fmt) needs |x| < \(format.magnitudeLimit.map { "\(Int($0))" } ?? "inf")); keep this tensor dense or use nf4")
        default:
            preconditionFailure("quantize: unexpected status \(status) from the \(fmt) reference")
        }
    }
}
