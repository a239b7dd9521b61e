import ReLoRACore
/// Moving tensors between tensor files (safetensors, zstd tensor files) and a backend, one tensor at a
/// time: a load streams the mapped file's bytes (or one tensor's decompressed bytes) into the backend's
/// upload (converting F32/BF16/F16 to the tensor's dtype), so importing a model never holds more than one
/// tensor beyond the model itself; a save makes each tensor's bytes only when the writer reaches it.
package enum TensorIO {
    /// The name under which a checkpoint stores a quantized weight: `<name>.<format>` (U8, `[rows, bytesPerRow]`).
    package static func quantizedName(_ name: String, _ format: QuantFormat) -> String { name + "." + format.rawValue }

    /// The name under which a checkpoint stores a quantized weight's f32 master copy (merge policy
    /// `master`): `<name>.master` (F32, `[rows, cols]`), beside its blocks.
    static func masterName(_ name: String) -> String { name + ".master" }

    /// Fills `tensor` from tensor `name` of `file`, checking presence and shape. If the file holds the
    /// weight quantized instead (`<name>.<format>`, a quantized run's checkpoint), it is dequantized on the
    /// host and uploaded: how a quantized run is exported or evaluated densely.
    package static func load(_ tensor: Tensor, from file: any TensorFile, _ name: String, backend: Backend) throws {
        guard let info = file.header(name) else {
            for format in QuantFormat.allCases where file.header(quantizedName(name, format)) != nil {
                guard tensor.shape.count == 2 else { break }
                let q = try readQuantized(file, name, format, rows: tensor.shape[0], cols: tensor.shape[1])
                backend.upload(q.dequantize(), to: tensor)
                return
            }
            throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' is missing")
        }
        guard info.shape == tensor.shape else {
            throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' has shape \(info.shape), expected \(tensor.shape)")
        }
        switch info.dtype {
        case .F32, .BF16, .F16:
            let dtype: DType = info.dtype == .F32 ? .f32 : info.dtype == .BF16 ? .bf16 : .f16
            try file.withRawBytes(name) { backend.upload(raw: $0, dtype: dtype, to: tensor) }
        case .F64:
            backend.upload(try file.floats(name), to: tensor)
        case .I64, .I32, .I16, .I8, .U8, .BOOL:
            throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' has dtype \(info.dtype.rawValue), expected a float type (F32, BF16, F16)")
        }
    }

    /// The host copy of a quantized weight stored as `<name>.<format>`, its byte shape checked.
    package static func readQuantized(_ file: any TensorFile, _ name: String, _ format: QuantFormat, rows: Int, cols: Int) throws -> QuantizedMatrix {
        try checkQuantized(file, name, format, rows: rows, cols: cols)
        return try QuantizedMatrix(format: format, rows: rows, cols: cols, bytes: file.withRawBytes(quantizedName(name, format)) { Array($0) })
    }

    /// Checks that `<name>.<format>` is U8 of the byte shape of a [rows, cols] weight in that format.
    static func checkQuantized(_ file: any TensorFile, _ name: String, _ format: QuantFormat, rows: Int, cols: Int) throws {
        let qname = quantizedName(name, format)
        guard let info = file.header(qname), info.dtype == .U8, info.shape == [rows, format.bytesPerRow(cols: cols)] else {
            throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(qname)' is not U8 of shape [\(rows), \(format.bytesPerRow(cols: cols))] (a \(format.rawValue) weight [\(rows), \(cols)])")
        }
    }

    /// Fills one weight slot. A dense slot: `load`. A quantized slot: the file's blocks in the same format
    /// are uploaded as they are (resume: bit-exact); dense values (a dense checkpoint or a Hugging Face
    /// model) are uploaded into an f32 workspace and quantized on the backend. A slot with a master copy
    /// loads it from `<name>.master` (with the blocks: resume) or from the dense values (which it then
    /// quantizes); blocks without a master are an error, since the master cannot be recovered from them.
    /// Returns, for a weight quantized here, its relative quantization error `||deq(q) - w|| / ||w||`
    /// (else nil).
    @discardableResult
    package static func load(_ slot: FrozenWeight, from file: any TensorFile, _ name: String, backend: Backend) throws -> Double? {
        switch slot {
        case .dense(let t):
            try load(t, from: file, name, backend: backend)
            return nil
        case .quantized(let q):
            let hasBlocks = file.header(quantizedName(name, q.format)) != nil
            if let master = q.master {
                if file.header(masterName(name)) != nil {
                    try load(master, from: file, masterName(name), backend: backend)
                } else if hasBlocks {
                    throw ReLoRAError.invalidFile(path: file.path, reason: "holds '\(name)' quantized without its f32 master copy '\(masterName(name))', which merge policy 'master' needs; resume with the merge_policy the run was made with")
                } else {
                    try load(master, from: file, name, backend: backend)
                }
            }
            if hasBlocks {
                try checkQuantized(file, name, q.format, rows: q.rows, cols: q.cols)
                try file.withRawBytes(quantizedName(name, q.format)) { backend.upload(raw: $0, dtype: .u8, to: q.blocks) }
                return nil
            }
            let dense = q.master ?? backend.makeTensor([q.rows, q.cols], dtype: .f32, tag: .workspace, zeroed: false)
            if q.master == nil { try load(dense, from: file, name, backend: backend) }
            return try quantize(dense, into: q, name: name, backend: backend)
        }
    }

    /// Quantizes `dense` (f32 `[rows, cols]`: the weight's values, which under merge policy `master` is
    /// `q.master` itself) into `q` on the backend, round to nearest, and returns the relative error
    /// `||deq(q) - w|| / ||w||` (0 for an all-zero weight). A weight the format cannot hold (inf, NaN,
    /// or beyond its fp16 scale) is the one-sentence `QuantizationFailure` error naming `name`.
    package static func quantize(_ dense: Tensor, into q: QuantizedTensor, name: String, backend: Backend) throws -> Double {
        if let failure = backend.quantize(dense, into: q) { throw failure.error(format: q.format, name: name) }
        let roundTrip = backend.makeTensor([q.rows, q.cols], dtype: .f32, tag: .workspace, zeroed: false)
        backend.dequantize(q, firstRow: 0, rowCount: q.rows, into: roundTrip)
        let norm = backend.sumOfSquares([dense])
        backend.axpy(-1, dense, roundTrip)
        let error = backend.sumOfSquares([roundTrip])
        return norm > 0 ? (error / norm).squareRoot() : 0
    }

    /// The safetensors entries of a weight slot: `entry`, and a quantized weight's master copy
    /// (`<name>.master`, F32) if it has one.
    package static func entries(_ name: String, _ slot: FrozenWeight, backend: Backend) -> [SafetensorsEntry] {
        guard let master = slot.quantized?.master else { return [entry(name, slot, backend: backend)] }
        return [entry(name, slot, backend: backend), entry(masterName(name), master, backend: backend)]
    }

    /// A safetensors entry for a weight slot: dense as F32, quantized as its raw blocks (`<name>.<format>`, U8).
    package static func entry(_ name: String, _ slot: FrozenWeight, backend: Backend) -> SafetensorsEntry {
        switch slot {
        case .dense(let t):
            return entry(name, t, backend: backend)
        case .quantized(let q):
            return SafetensorsEntry(name: quantizedName(name, q.format), dtype: .U8, shape: [q.rows, q.bytesPerRow]) {
                backend.downloadRaw(q.blocks)
            }
        }
    }

    /// A safetensors entry that downloads `tensor` when written, as F32 or rounded to BF16.
    package static func entry(_ name: String, _ tensor: Tensor, backend: Backend, bfloat16: Bool = false) -> SafetensorsEntry {
        if bfloat16 {
            return SafetensorsEntry(name: name, dtype: .BF16, shape: tensor.shape) {
                SafetensorsEntry.bf16(name, shape: tensor.shape, backend.download(tensor)).bytes
            }
        }
        return SafetensorsEntry(name: name, dtype: .F32, shape: tensor.shape) {
            backend.download(tensor).withUnsafeBytes { Array($0) }
        }
    }
}
