import Foundation
import CReLoRA
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel

/// bitsandbytes 4-bit weights in a Hugging Face directory, as transformers' `save_pretrained` writes a model
/// loaded with `BitsAndBytesConfig(load_in_4bit=True)` (bitsandbytes' `QuantState.as_dict(packed=True)`),
/// for a weight `<w>` of logical shape `[out, in]`, n = out * in, blocks = ceil(n / blocksize):
///
/// | tensor | dtype, shape | contents |
/// |---|---|---|
/// | `<w>` | U8 `[ceil(n/2), 1]` | 4-bit codes, element 2i in the high nibble, over the row-major flattened tensor |
/// | `<w>.absmax` | F32 `[blocks]` (U8 with double quantization) | each block's scale |
/// | `<w>.quant_map` | F32 `[16]` | the code table: bitsandbytes' NF4 or FP4 values |
/// | `<w>.nested_absmax` | F32 `[ceil(blocks / nested_blocksize)]` | double quantization only |
/// | `<w>.nested_quant_map` | F32 `[256]` | double quantization only: the 8-bit table of the absmax codes |
/// | `<w>.quant_state.bitsandbytes__<nf4\|fp4>` | U8 `[bytes]` | UTF-8 JSON: `quant_type`, `blocksize`, `dtype`, `shape`, and with double quantization `nested_blocksize`, `nested_dtype`, `nested_offset` |
///
/// What the tensors mean, as bitsandbytes' `functional.dequantize_4bit` computes it (its CUDA kernel and its
/// default-backend op; every operation one f32 rounding, none fused):
///
///     absmax[b] = (nested_quant_map[q[b]] * nested_absmax[b / nested_blocksize]) + nested_offset   (double quant.)
///     w[i]      = quant_map[code i] * absmax[i / blocksize]                       (i: the flat index out * in)
///
/// The blocks run over the flattened tensor, so a row that is not whole blocks shares blocks with its
/// neighbours. (bitsandbytes 0.50.2's CPU kernel indexes absmax per row instead, `row * (in / blocksize) + col
/// / blocksize`, which is wrong for such rows; `Tests/Fixtures/make_bnb_fixture.py` shows it.)
///
/// On import (`load`), a weight whose codes are relora's nf4 blocks as they stand (nf4, blocksize 64, rows of
/// whole blocks) keeps its codes byte for byte, each block's absmax de-nested to f32; any other weight is
/// dequantized exactly and requantized to the model's format with its relative error reported; a dense
/// model gets the dequantized f32 values. Export (`entries`) writes nf4, blocksize 64, without double
/// quantization.
public enum BitsAndBytes4bit {
    public enum QuantType: String, Sendable, CaseIterable {
        case nf4, fp4

        /// bitsandbytes' code table (`functional.get_4bit_type`) in f32: NF4 is relora's nf4 codebook; FP4
        /// is [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3] / 12, each an f32 quotient
        /// (bitsandbytes' list says `-0`, a Python integer, so code 8 is +0).
        public var table: [Float] {
            switch self {
            case .nf4: return (0 ..< 16).map { relora_nf4_value(Int32($0)) }
            case .fp4:
                let raw: [Float] = [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]
                return raw.map { $0 / 12 }
            }
        }
    }

    /// Block sizes bitsandbytes' quantize_4bit accepts.
    static let blockSizes: Set<Int> = [32, 64, 128, 256, 512, 1024, 2048, 4096]
    /// Keys `QuantState.from_dict` accepts in the JSON blob (the tensors' keys are the other valid ones).
    static let stateKeys: Set<String> = ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]

    /// One 4-bit weight as read from a checkpoint, checked, with its absmax de-nested.
    public struct Weight: Sendable {
        public let name: String
        public let quantType: QuantType
        public let blocksize: Int
        public let rows: Int
        public let cols: Int
        /// `ceil(rows * cols / 2)` bytes, element 2i in the high nibble of byte i.
        public let codes: [UInt8]
        /// `ceil(rows * cols / blocksize)` f32 scales, de-nested when `doubleQuantized`.
        public let absmax: [Float]
        public let doubleQuantized: Bool

        /// The `[rows, cols]` weight, row-major: `table[code] * absmax[i / blocksize]` over the flat index i.
        public func dequantize() -> [Float] {
            let table = quantType.table
            let n = rows * cols
            let blocksize = blocksize
            return [Float](unsafeUninitializedCapacity: n) { out, initialized in
                codes.withUnsafeBufferPointer { codes in
                    for (b, scale) in absmax.enumerated() {
                        for i in b * blocksize ..< min(n, (b + 1) * blocksize) {
                            let byte = codes[i >> 1]
                            out[i] = table[Int(i & 1 == 0 ? byte >> 4 : byte & 15)] * scale
                        }
                    }
                }
                initialized = n
            }
        }

        /// Why the codes cannot be kept as relora nf4 blocks for a model quantized to nf4 (nil: they can).
        public var whyNotNF4Blocks: String? {
            if quantType != .nf4 { return "its codes are \(quantType.rawValue)" }
            if blocksize != Int(RELORA_QKNF4) { return "its blocks are \(blocksize) weights, not 64" }
            if cols % blocksize != 0 { return "its \(cols)-weight rows are not whole 64-weight blocks, so blocks straddle rows" }
            return nil
        }

        /// relora nf4 blocks (`block_nf4`: f32 absmax, then 32 code bytes) holding exactly these codes and
        /// scales, `rows * bytesPerRow` bytes. Only when `whyNotNF4Blocks` is nil.
        public func nf4Blocks() -> [UInt8] {
            precondition(whyNotNF4Blocks == nil, "nf4Blocks: \(name) is not in relora's nf4 layout")
            let codeBytes = blocksize / 2
            var out = [UInt8]()
            out.reserveCapacity(absmax.count * (4 + codeBytes))
            for (b, scale) in absmax.enumerated() {
                withUnsafeBytes(of: scale.bitPattern.littleEndian) { out.append(contentsOf: $0) }
                out.append(contentsOf: codes[b * codeBytes ..< (b + 1) * codeBytes])
            }
            return out
        }
    }

    /// How `load` filled a weight slot.
    public enum Outcome: Sendable, Equatable {
        /// nf4 codes kept byte for byte as the frozen weight's blocks.
        case kept
        /// Dequantized and requantized to the model's format: the relative error `||deq(q) - w|| / ||w||`
        /// against the checkpoint's weights, and why the codes could not be kept.
        case converted(relativeError: Double, reason: String)
        /// Dequantized into a dense weight (exact).
        case dequantized
    }

    // MARK: - Config

    /// Checks config.json's `quantization_config`, if any: bitsandbytes 4-bit is read; another method or
    /// bitsandbytes 8-bit is refused with one sentence. Returns whether the directory is bitsandbytes 4-bit.
    @discardableResult
    public static func checkQuantizationConfig(_ config: JSONKeys, path: String) throws -> Bool {
        guard let value = config.values["quantization_config"], value != .null else { return false }
        guard case .object(let q) = value else {
            throw ReLoRAError.invalidFile(path: path, reason: "'quantization_config' must be an object")
        }
        guard case .string(let method)? = q["quant_method"] else {
            throw ReLoRAError.invalidFile(path: path, reason: "'quantization_config' has no 'quant_method'; relora reads bitsandbytes 4-bit checkpoints only")
        }
        guard method == "bitsandbytes" else {
            throw ReLoRAError.invalidFile(path: path, reason: "quantization method '\(method)' is not supported; relora reads bitsandbytes 4-bit checkpoints (load_in_4bit) and dense f32/f16/bf16 ones")
        }
        if case .bool(true)? = q["load_in_8bit"] {
            throw ReLoRAError.invalidFile(path: path, reason: "bitsandbytes 8-bit checkpoints (load_in_8bit) are not supported; save the model with load_in_4bit or unquantized")
        }
        if case .string(let storage)? = q["bnb_4bit_quant_storage"], storage != "uint8" {
            throw ReLoRAError.invalidFile(path: path, reason: "bnb_4bit_quant_storage '\(storage)' is not supported; relora reads 4-bit codes stored as uint8 (the default)")
        }
        return true
    }

    /// The `quantization_config` transformers writes for `BitsAndBytesConfig(load_in_4bit=True,
    /// bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False)`, with `lm_head` left dense, less
    /// `llm_int8_threshold` (8-bit only; transformers insists on a JSON float there, and JSONSerialization
    /// writes 6.0 as 6: its default is the same 6.0).
    public static func quantizationConfig(computeDType: String) -> [String: Any] {
        [
            "quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": false,
            "_load_in_4bit": true, "_load_in_8bit": false,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": false,
            "bnb_4bit_compute_dtype": computeDType, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"],
            "llm_int8_has_fp16_weight": false, "llm_int8_enable_fp32_cpu_offload": false,
        ]
    }

    // MARK: - Reading

    /// The name of `weight`'s packed quant state in `shards` (`<weight>.quant_state.bitsandbytes__nf4` or
    /// `__fp4`), nil if the weight is not a bitsandbytes 4-bit one. Any other `<weight>.quant_state.*` name,
    /// or two of them, is refused.
    static func stateName(_ weight: String, in shards: [String: SafetensorsFile]) throws -> (name: String, type: QuantType)? {
        let prefix = weight + ".quant_state."
        let found = shards.keys.filter { $0.hasPrefix(prefix) }.sorted()
        guard let first = found.first else { return nil }
        let path = shards[first]!.path
        guard found.count == 1 else {
            throw ReLoRAError.invalidFile(path: path, reason: "weight '\(weight)' has \(found.count) quant_state tensors; a bitsandbytes 4-bit weight has exactly one")
        }
        let suffix = String(first.dropFirst(prefix.count))
        guard suffix.hasPrefix("bitsandbytes__"), let type = QuantType(rawValue: String(suffix.dropFirst("bitsandbytes__".count))) else {
            throw ReLoRAError.invalidFile(path: path, reason: "weight '\(weight)' has quant state '\(suffix)'; relora reads bitsandbytes__nf4 and bitsandbytes__fp4")
        }
        return (first, type)
    }

    /// The names of `weight`'s companion tensors present in `names` (absmax, quant_map, ...; not the weight).
    static func companions(_ weight: String, in names: some Collection<String>) -> [String] {
        let suffixes = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"]
        return names.filter { name in
            name.hasPrefix(weight + ".quant_state.") || suffixes.contains { name == weight + "." + $0 }
        }
    }

    /// Reads and checks the 4-bit weight `weight` of logical shape `shape` ([out, in]) from `shards`
    /// (tensor name -> file), de-nesting its absmax. Nil if the weight is not stored in 4 bits. Every
    /// inconsistency (a missing or mis-sized tensor, a malformed quant state, a table that is not
    /// bitsandbytes') is one sentence naming the file and tensor.
    public static func read(_ weight: String, shape: [Int], from shards: [String: SafetensorsFile]) throws -> Weight? {
        guard let (stateTensor, suffixType) = try stateName(weight, in: shards) else { return nil }
        let stateFile = shards[stateTensor]!
        func invalid(_ file: SafetensorsFile, _ reason: String) -> ReLoRAError { .invalidFile(path: file.path, reason: reason) }
        func tensor(_ suffix: String) throws -> (SafetensorsFile, SafetensorsTensorInfo) {
            let name = suffix.isEmpty ? weight : weight + "." + suffix
            guard let file = shards[name], let info = file.info(name) else {
                throw invalid(stateFile, "the bitsandbytes 4-bit weight '\(weight)' has no tensor '\(name)'")
            }
            return (file, info)
        }

        // The JSON blob.
        let (_, stateInfo) = try tensor("quant_state.bitsandbytes__" + suffixType.rawValue)
        guard stateInfo.dtype == .U8 else {
            throw invalid(stateFile, "tensor '\(stateTensor)' is \(stateInfo.dtype.rawValue); a bitsandbytes quant state is U8 bytes of JSON")
        }
        let blob = try stateFile.withRawBytes(stateTensor) { Data($0) }
        let state: JSONKeys
        do {
            state = try JSONKeys(data: blob, what: "it")
        } catch {
            throw invalid(stateFile, "tensor '\(stateTensor)' is not a JSON object (a bitsandbytes quant state holds UTF-8 JSON)")
        }
        func bad(_ what: String) -> ReLoRAError { invalid(stateFile, "the quant state '\(stateTensor)' \(what)") }
        if let unknown = state.values.keys.sorted().first(where: { !stateKeys.contains($0) }) {
            throw bad("has the unknown key '\(unknown)'")
        }
        func integer(_ key: String) throws -> Int {
            guard case .number(let d)? = state.values[key], let i = Int(exactly: d) else {
                throw bad("has no integer '\(key)'")
            }
            return i
        }
        guard case .string(let typeName)? = state.values["quant_type"] else { throw bad("has no string 'quant_type'") }
        guard typeName == suffixType.rawValue else {
            throw bad("says quant_type '\(typeName)' but its name says '\(suffixType.rawValue)'")
        }
        let blocksize = try integer("blocksize")
        guard blockSizes.contains(blocksize) else {
            throw bad("has blocksize \(blocksize); bitsandbytes writes 32, 64, 128, 256, 512, 1024, 2048 or 4096")
        }
        guard case .string(let dtype)? = state.values["dtype"], ["float32", "bfloat16", "float16"].contains(dtype) else {
            throw bad("has no 'dtype' of float32, bfloat16 or float16")
        }
        guard case .array(let dims)? = state.values["shape"],
              let stateShape = Optional(dims.compactMap { v -> Int? in if case .number(let d) = v { return Int(exactly: d) } else { return nil } }),
              stateShape.count == dims.count else {
            throw bad("has no integer array 'shape'")
        }
        guard stateShape == shape else {
            throw invalid(stateFile, "tensor '\(weight)' is a bitsandbytes 4-bit weight of shape \(stateShape) but config.json implies \(shape)")
        }
        let count = shape.reduce(1, *)
        let blocks = (count + blocksize - 1) / blocksize

        // The codes.
        let (codeFile, codeInfo) = try tensor("")
        guard codeInfo.dtype == .U8 else {
            throw invalid(codeFile, "the 4-bit codes '\(weight)' are stored as \(codeInfo.dtype.rawValue); relora reads bnb_4bit_quant_storage uint8 only")
        }
        guard codeInfo.elementCount == (count + 1) / 2 else {
            throw invalid(codeFile, "the 4-bit codes '\(weight)' are \(codeInfo.elementCount) bytes but shape \(shape) needs \((count + 1) / 2)")
        }
        let codes = try codeFile.withRawBytes(weight) { Array($0) }

        // The code table must be bitsandbytes' (its kernels use their built-in tables, not this tensor).
        let (mapFile, mapInfo) = try tensor("quant_map")
        guard mapInfo.dtype == .F32, mapInfo.elementCount == 16 else {
            throw invalid(mapFile, "tensor '\(weight).quant_map' must be F32 with 16 values")
        }
        let table = try mapFile.floats(weight + ".quant_map")
        guard table.map(\.bitPattern) == suffixType.table.map(\.bitPattern) else {
            throw invalid(mapFile, "tensor '\(weight).quant_map' is not bitsandbytes' \(suffixType.rawValue) table")
        }

        // The absmax, de-nested.
        let (absFile, absInfo) = try tensor("absmax")
        let nested = state.values["nested_offset"] != nil
        var absmax: [Float]
        if nested {
            let nestedBlocksize = try integer("nested_blocksize")
            guard blockSizes.contains(nestedBlocksize) else {
                throw bad("has nested_blocksize \(nestedBlocksize); bitsandbytes writes 256 (one of 32 ... 4096)")
            }
            guard case .string("float32")? = state.values["nested_dtype"] else { throw bad("has no nested_dtype float32") }
            guard case .number(let offsetValue)? = state.values["nested_offset"], offsetValue.isFinite else {
                throw bad("has no finite number 'nested_offset'")
            }
            // bitsandbytes writes the f32 offset as a Python float (its exact double), read back as f32.
            let offset = Float(offsetValue)
            guard absInfo.dtype == .U8, absInfo.elementCount == blocks else {
                throw invalid(absFile, "tensor '\(weight).absmax' must be U8 with \(blocks) codes (double quantization, \(blocks) blocks of \(blocksize))")
            }
            let (nestedFile, nestedInfo) = try tensor("nested_absmax")
            let nestedBlocks = (blocks + nestedBlocksize - 1) / nestedBlocksize
            guard nestedInfo.dtype == .F32, nestedInfo.elementCount == nestedBlocks else {
                throw invalid(nestedFile, "tensor '\(weight).nested_absmax' must be F32 with \(nestedBlocks) values")
            }
            let (nestedMapFile, nestedMapInfo) = try tensor("nested_quant_map")
            guard nestedMapInfo.dtype == .F32, nestedMapInfo.elementCount == 256 else {
                throw invalid(nestedMapFile, "tensor '\(weight).nested_quant_map' must be F32 with 256 values")
            }
            absmax = denest(codes: try absFile.withRawBytes(weight + ".absmax") { Array($0) },
                            table: try nestedMapFile.floats(weight + ".nested_quant_map"),
                            scales: try nestedFile.floats(weight + ".nested_absmax"),
                            blocksize: nestedBlocksize, offset: offset)
        } else {
            guard absInfo.dtype == .F32, absInfo.elementCount == blocks else {
                throw invalid(absFile, "tensor '\(weight).absmax' must be F32 with \(blocks) values (\(blocks) blocks of \(blocksize))")
            }
            for key in ["nested_absmax", "nested_quant_map"] where shards[weight + "." + key] != nil {
                throw bad("has no nested_offset, yet '\(weight).\(key)' is present")
            }
            absmax = try absFile.floats(weight + ".absmax")
        }
        if let b = absmax.firstIndex(where: { !$0.isFinite }) {
            throw invalid(absFile, "block \(b) of '\(weight)' has a non-finite absmax")
        }
        return Weight(name: weight, quantType: suffixType, blocksize: blocksize, rows: shape[0], cols: shape.count > 1 ? shape[1] : 1,
                      codes: codes, absmax: absmax, doubleQuantized: nested)
    }

    /// De-nested absmax, as bitsandbytes' `dequantize_blockwise(absmax, state2) + offset` computes it in f32:
    /// `(table[codes[b]] * scales[b / blocksize]) + offset`, two roundings (its CPU kernel's product, then
    /// torch's in-place add of the f32 offset).
    public static func denest(codes: [UInt8], table: [Float], scales: [Float], blocksize: Int, offset: Float) -> [Float] {
        codes.enumerated().map { b, code in
            let product = table[Int(code)] * scales[b / blocksize]
            return product + offset
        }
    }

    // MARK: - Loading

    /// Fills a weight slot from `weight`: a quantized nf4 slot keeps the codes byte for byte when they are
    /// relora's nf4 blocks as they stand (`Weight.whyNotNF4Blocks` nil; a master copy, if any, gets the
    /// dequantized values, whose requantization is these blocks); another quantized slot is requantized from
    /// the dequantized weight (`.converted` with its error); a dense slot gets the dequantized weight.
    public static func load(_ weight: Weight, into slot: FrozenWeight, backend: Backend) throws -> Outcome {
        switch slot {
        case .dense(let t):
            backend.upload(weight.dequantize(), to: t)
            return .dequantized
        case .quantized(let q):
            precondition(q.rows == weight.rows && q.cols == weight.cols, "load: shape checked by read")
            if q.format == .nf4, weight.whyNotNF4Blocks == nil {
                weight.nf4Blocks().withUnsafeBytes { backend.upload(raw: $0, dtype: .u8, to: q.blocks) }
                if let master = q.master { backend.upload(weight.dequantize(), to: master) }
                return .kept
            }
            let reason = q.format != .nf4 ? "the model's weights are \(q.format.rawValue)" : weight.whyNotNF4Blocks!
            let dense = q.master ?? backend.makeTensor([q.rows, q.cols], dtype: .f32, tag: .workspace, zeroed: false)
            backend.upload(weight.dequantize(), to: dense)
            let error = try TensorIO.quantize(dense, into: q, name: weight.name, backend: backend)
            return .converted(relativeError: error, reason: reason)
        }
    }

    /// One line for a log: what `load` did with a weight.
    public static func describe(_ weight: Weight, _ outcome: Outcome, format: String) -> String {
        let source = "bitsandbytes \(weight.quantType.rawValue)\(weight.doubleQuantized ? " (double-quantized absmax)" : "")"
        switch outcome {
        case .kept:
            return "kept \(weight.name) from \(source): nf4 codes byte for byte"
        case .converted(let error, let reason):
            return String(format: "converted %@ from %@ to %@ (%@): relative error %.3e", weight.name, source, format, reason, error)
        case .dequantized:
            return "dequantized \(weight.name) from \(source)"
        }
    }

    // MARK: - Writing

    /// The safetensors entries of a `[rows, cols]` f32 weight in bitsandbytes' nf4 layout (blocksize 64, no
    /// double quantization): codes, absmax, quant_map and the quant state, whose `dtype` is `dtype`
    /// (float32 or bfloat16: what bitsandbytes dequantizes to). The blocks run over the flattened tensor,
    /// as bitsandbytes' do; each is relora's nf4 reference quantizer's block (bitsandbytes' codes for the same
    /// block, see relora_quant.h), the last one zero-padded. `values` is called once, when the writer
    /// reaches the codes, and its quantization is held until the absmax entry is written. A weight nf4
    /// cannot hold (inf or NaN) makes the entries produce no bytes, which fails the write, and its sentence
    /// is recorded in `failure` for the caller to throw instead.
    public static func entries(_ name: String, rows: Int, cols: Int, dtype: String, failure: FirstError,
                               values: @escaping @Sendable () -> [Float]) -> [SafetensorsEntry] {
        let n = rows * cols
        let blocks = (n + Int(RELORA_QKNF4) - 1) / Int(RELORA_QKNF4)
        let once = QuantizeOnce(name: name, n: n, cols: cols, failure: failure, values: values)
        let state = "{\"quant_type\": \"nf4\", \"blocksize\": \(RELORA_QKNF4), \"dtype\": \"\(dtype)\", \"shape\": [\(rows), \(cols)]}"
        return [
            SafetensorsEntry(name: name, dtype: .U8, shape: [(n + 1) / 2, 1]) { once.take().codes },
            SafetensorsEntry(name: name + ".absmax", dtype: .F32, shape: [blocks]) { once.take(last: true).absmax },
            SafetensorsEntry.f32(name + ".quant_map", shape: [16], QuantType.nf4.table),
            SafetensorsEntry(name: name + ".quant_state.bitsandbytes__nf4", dtype: .U8, shape: [state.utf8.count], bytes: Array(state.utf8)),
        ]
    }

    /// Splits relora nf4 blocks of one flattened row of `n` weights into bitsandbytes' arrays: the first
    /// `ceil(n/2)` code bytes and each block's absmax (f32 little-endian bytes).
    static func split(_ m: QuantizedMatrix, n: Int) -> (codes: [UInt8], absmax: [UInt8]) {
        let blockBytes = m.format.bytesPerBlock
        let blocks = m.blocksPerRow
        var codes = [UInt8]()
        var absmax = [UInt8]()
        codes.reserveCapacity(blocks * (blockBytes - 4))
        absmax.reserveCapacity(4 * blocks)
        for b in 0 ..< blocks {
            absmax.append(contentsOf: m.bytes[b * blockBytes ..< b * blockBytes + 4])
            codes.append(contentsOf: m.bytes[b * blockBytes + 4 ..< (b + 1) * blockBytes])
        }
        return (Array(codes.prefix((n + 1) / 2)), absmax)
    }

    /// The flattened nf4 quantization of one weight, made on first use and dropped after the last.
    final class QuantizeOnce: @unchecked Sendable {  // the lock guards `result`
        private let lock = NSLock()
        private let name: String
        private let n: Int
        private let cols: Int
        private let failure: FirstError
        private let values: @Sendable () -> [Float]
        private var result: (codes: [UInt8], absmax: [UInt8])?

        init(name: String, n: Int, cols: Int, failure: FirstError, values: @escaping @Sendable () -> [Float]) {
            self.name = name
            self.n = n
            self.cols = cols
            self.failure = failure
            self.values = values
        }

        func take(last: Bool = false) -> (codes: [UInt8], absmax: [UInt8]) {
            lock.lock()
            defer { lock.unlock() }
            if result == nil {
                let w = values()
                if let i = w.firstIndex(where: { !$0.isFinite }) {
                    // nf4's only failure (its fp32 absmax holds any finite value), named by [row, col].
                    failure.record(QuantizationFailure(reason: .nonFinite, row: i / cols, col: i % cols, value: w[i])
                        .error(format: .nf4, name: name))
                    result = ([], [])
                } else {
                    // Cannot throw: every value is finite.
                    result = BitsAndBytes4bit.split(try! QuantFormat.nf4.quantize(w, rows: 1, cols: n, name: name), n: n)
                }
            }
            let r = result!
            if last { result = nil }
            return r
        }
    }

    /// The first error recorded by deferred work that cannot throw (a safetensors entry's bytes).
    public final class FirstError: @unchecked Sendable {  // the lock guards `error`
        private let lock = NSLock()
        private var first: Error?

        public init() {}

        public var error: Error? {
            lock.lock()
            defer { lock.unlock() }
            return first
        }

        func record(_ error: Error) {
            lock.lock()
            defer { lock.unlock() }
            if first == nil { first = error }
        }
    }
}
