/// A `[rows, cols]` weight stored on a backend in a block format: `blocks` is a u8 tensor of
/// `rows * format.bytesPerRow(cols:)` bytes, laid out exactly as `QuantizedMatrix` describes (each row
/// zero-padded to whole blocks, rows one after another), so a tile of rows is one contiguous range and
/// host bytes (a checkpoint, a GGUF file) upload as they are.
public struct QuantizedTensor: Sendable {
    public let format: QuantFormat
    public let rows: Int
    public let cols: Int
    /// u8 `[rows * bytesPerRow]`.
    public let blocks: Tensor
    /// Under the `master` merge policy: the weight in f32 `[rows, cols]` (tag `.hostMaster`), which merges
    /// add to exactly and `blocks` are requantized from (round to nearest), so `blocks == quantize(master)`
    /// after every initialisation, load and merge. nil otherwise.
    public let master: Tensor?

    /// Allocates the blocks (zeroed) on `backend` with `tag`, and an f32 master copy if `master`.
    public init(format: QuantFormat, rows: Int, cols: Int, backend: Backend, tag: MemoryTag, master: Bool = false) {
        self.format = format
        self.rows = rows
        self.cols = cols
        blocks = backend.makeTensor([rows * format.bytesPerRow(cols: cols)], dtype: .u8, tag: tag, zeroed: true)
        self.master = master ? backend.makeTensor([rows, cols], dtype: .f32, tag: .hostMaster, zeroed: true) : nil
    }

    public var bytesPerRow: Int { format.bytesPerRow(cols: cols) }
    public var paddedCols: Int { format.blocksPerRow(cols: cols) * format.blockSize }
}

/// Why `Backend.quantize` could not store a matrix: the first element it cannot represent.
public struct QuantizationFailure: Error, Sendable, Equatable {
    public enum Reason: Sendable, Equatable {
        /// inf or NaN.
        case nonFinite
        /// |x| at or above the format's `magnitudeLimit` (its fp16 block scale would overflow).
        case scaleOverflow
    }
    public var reason: Reason
    public var row: Int
    public var col: Int
    public var value: Float

    package init(reason: Reason, row: Int, col: Int, value: Float) {
        self.reason = reason; self.row = row; self.col = col; self.value = value
    }

    /// One sentence for the user, naming the tensor if known.
    public func error(format: QuantFormat, name: String?) -> ReLoRAError {
        let what = name.map { "tensor '\($0)'" } ?? "the weights"
        let fmt = format.rawValue
        switch reason {
        case .nonFinite:
            return .invalidData("cannot quantize \(what) to \(fmt): element [\(row), \(col)] is \(value.isNaN ? "NaN" : "\(value)"); quantized formats hold finite weights only, so check the weights for a diverged run or a corrupt file")
        case .scaleOverflow:
            return .invalidData("cannot quantize \(what) to \(fmt): element [\(row), \(col)] = \(value) is too large for its fp16 block scale (\(fmt) needs |x| < \(format.magnitudeLimit.map { "\(Int($0))" } ?? "inf")); keep this tensor dense or use nf4")
        }
    }
}
