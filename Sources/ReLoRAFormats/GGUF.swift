import CReLoRA
import Foundation
import ReLoRACore

// MARK: - Format
//
// GGUF (ggml's model file; the references are ggml/src/gguf.cpp and gguf-py), version 3, little-endian:
//
//   "GGUF" magic (4 bytes) | version u32 | tensor_count u64 | kv_count u64
//   kv_count     x { key: string | value_type u32 | value }
//   tensor_count x { name: string | n_dims u32 | ne[n_dims] u64 | ggml_type u32 | offset u64 }
//   zero padding up to a multiple of `general.alignment` (u32 metadata, default 32)
//   tensor data: tensor i at data_start + offset_i; every offset is a multiple of the alignment
//
// string = u64 byte count + UTF-8 bytes (no terminator); array = element value_type u32 + u64 count +
// elements (arrays of arrays are not used by llama.cpp and rejected here).
// ne[0] is the contiguous dimension: a row-major `[rows, cols]` matrix has ne = [cols, rows], so a Hugging
// Face linear weight `[out, in]` is ne = [in, out] with the same bytes. Block types (q8_0, q4_0) pack
// ne[0] in blocks of 32, which must divide it; `QuantizedMatrix` holds exactly those bytes per row. The
// K-quants llama.cpp's quantizer writes (q4_K, q5_K, q6_K) pack it in super-blocks of 256; relora reads
// them by dequantizing (relora_quant.h) and never writes them. Every other type (q4_1, q5_0, the IQ
// types, ...) is refused when the file is opened, naming the type and the tensor.
// Version 2 has the same layout (3 only added big-endian files, which start with a byte-swapped
// version); both are read, version 3 is written.

/// The type of a GGUF metadata value (`gguf_type`).
public enum GGUFValueType: UInt32, Sendable, CaseIterable {
    case uint8 = 0, int8 = 1, uint16 = 2, int16 = 3, uint32 = 4, int32 = 5, float32 = 6, bool = 7
    case string = 8, array = 9, uint64 = 10, int64 = 11, float64 = 12

    /// Bytes of one value; nil for string and array (variable size).
    var fixedSize: Int? {
        switch self {
        case .uint8, .int8, .bool: return 1
        case .uint16, .int16: return 2
        case .uint32, .int32, .float32: return 4
        case .uint64, .int64, .float64: return 8
        case .string, .array: return nil
        }
    }
}

/// A GGUF metadata value. Arrays carry their element type (an empty array still has one).
public indirect enum GGUFValue: Sendable, Equatable {
    case uint8(UInt8), int8(Int8), uint16(UInt16), int16(Int16), uint32(UInt32), int32(Int32)
    case uint64(UInt64), int64(Int64), float32(Float), float64(Double), bool(Bool), string(String)
    case array(GGUFValueType, [GGUFValue])

    public var type: GGUFValueType {
        switch self {
        case .uint8: return .uint8
        case .int8: return .int8
        case .uint16: return .uint16
        case .int16: return .int16
        case .uint32: return .uint32
        case .int32: return .int32
        case .uint64: return .uint64
        case .int64: return .int64
        case .float32: return .float32
        case .float64: return .float64
        case .bool: return .bool
        case .string: return .string
        case .array: return .array
        }
    }

    /// The value of any integer type that fits an Int (nil for other types).
    public var integer: Int? {
        switch self {
        case .uint8(let v): return Int(v)
        case .int8(let v): return Int(v)
        case .uint16(let v): return Int(v)
        case .int16(let v): return Int(v)
        case .uint32(let v): return Int(v)
        case .int32(let v): return Int(v)
        case .uint64(let v): return Int(exactly: v)
        case .int64(let v): return Int(v)
        default: return nil
        }
    }

    /// A float32 or float64 value. A float32 is widened through its shortest decimal form, so the
    /// `1e-6` a config holds (stored as the nearest float, 9.99999997e-7) reads back as `1e-6`.
    public var double: Double? {
        switch self {
        case .float32(let v): return Double("\(v)") ?? Double(v)
        case .float64(let v): return v
        default: return nil
        }
    }

    public var string: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var bool: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    /// The elements of an array of strings.
    public var strings: [String]? {
        guard case .array(.string, let items) = self else { return nil }
        return items.map { $0.string! }
    }

    /// The elements of an array of integers.
    public var integers: [Int]? {
        guard case .array(let t, let items) = self, t != .string, t != .array, t != .bool,
              t != .float32, t != .float64 else { return nil }
        let values = items.compactMap(\.integer)
        return values.count == items.count ? values : nil
    }
}

/// The tensor element types relora reads (`ggml_type` numbers). Blocks run along ne[0]. f32, f16, bf16,
/// q8_0 and q4_0 are also written; the K-quants are only read (dequantized).
public enum GGMLType: UInt32, Sendable, CaseIterable {
    case f32 = 0
    case f16 = 1
    case q4_0 = 2
    case q8_0 = 8
    case q4_K = 12
    case q5_K = 13
    case q6_K = 14
    case bf16 = 30

    /// Elements per block (1 for plain floats).
    public var blockSize: Int {
        switch self {
        case .f32, .f16, .bf16: return 1
        case .q4_0, .q8_0: return 32
        case .q4_K, .q5_K, .q6_K: return Int(RELORA_QK_K)
        }
    }

    /// Bytes per block: 4, 2, 2 for the floats; 18 (q4_0), 34 (q8_0), 144 (q4_K), 176 (q5_K) and 210
    /// (q6_K) as in ggml-common.h.
    public var bytesPerBlock: Int {
        switch self {
        case .f32: return 4
        case .f16, .bf16: return 2
        case .q4_0: return QuantFormat.q4_0.bytesPerBlock
        case .q8_0: return QuantFormat.q8_0.bytesPerBlock
        case .q4_K: return MemoryLayout<block_q4_K>.stride
        case .q5_K: return MemoryLayout<block_q5_K>.stride
        case .q6_K: return MemoryLayout<block_q6_K>.stride
        }
    }

    public var name: String {
        switch self {
        case .f32: return "f32"
        case .f16: return "f16"
        case .bf16: return "bf16"
        case .q4_0: return "q4_0"
        case .q8_0: return "q8_0"
        case .q4_K: return "q4_K"
        case .q5_K: return "q5_K"
        case .q6_K: return "q6_K"
        }
    }

    /// The relora block format of a quantized type (nil for floats and K-quants).
    public var quantFormat: QuantFormat? {
        switch self {
        case .q4_0: return .q4_0
        case .q8_0: return .q8_0
        case .f32, .f16, .bf16, .q4_K, .q5_K, .q6_K: return nil
        }
    }

    /// Whether relora writes the type (the K-quants are read only).
    public var isWritable: Bool {
        switch self {
        case .q4_K, .q5_K, .q6_K: return false
        case .f32, .f16, .bf16, .q8_0, .q4_0: return true
        }
    }

    /// The types relora reads, for error messages: "f32, f16, bf16, q8_0, q4_0, q4_K, q5_K and q6_K".
    public static var readableList: String {
        let names = [GGMLType.f32, .f16, .bf16, .q8_0, .q4_0, .q4_K, .q5_K, .q6_K].map(\.name)
        return names.dropLast().joined(separator: ", ") + " and " + names.last!
    }

    /// Names of other ggml types, for error messages only.
    static let otherNames: [UInt32: String] = [
        3: "q4_1", 6: "q5_0", 7: "q5_1", 9: "q8_1", 10: "q2_K", 11: "q3_K",
        15: "q8_K", 16: "iq2_xxs", 17: "iq2_xs", 18: "iq3_xxs", 19: "iq1_s", 20: "iq4_nl", 21: "iq3_s", 22: "iq2_s",
        23: "iq4_xs", 24: "i8", 25: "i16", 26: "i32", 27: "i64", 28: "f64", 29: "iq1_m", 34: "tq1_0", 35: "tq2_0",
        39: "mxfp4",
    ]
}

/// Where one tensor lives. `dimensions` are GGUF's ne (contiguous first); `shape` the row-major order
/// relora and PyTorch use. `byteOffset` is absolute; the range lies inside the file (checked on open).
public struct GGUFTensorInfo: Sendable, Equatable {
    public let name: String
    public let type: GGMLType
    public let dimensions: [Int]
    public let byteOffset: Int
    public let byteCount: Int

    public var shape: [Int] { dimensions.reversed() }
    public var elementCount: Int { dimensions.reduce(1, *) }
}

// MARK: - Reader

/// A GGUF file, memory-mapped and validated completely in `init`: every count, string length and offset
/// is checked against the file's size before it is used, so a truncated, hostile or foreign file is one
/// `ReLoRAError.invalidFile` sentence, never a crash or a huge allocation. After `init`, each tensor's
/// bytes are known to lie inside the file, at an aligned offset, without overlapping another tensor.
public final class GGUFFile: Sendable {  // all lets; the map is read-only
    public let path: String
    public let version: UInt32
    public let alignment: Int
    /// Metadata in file order.
    public let metadataKeys: [String]
    public let metadata: [String: GGUFValue]
    /// Tensors in file order.
    public let tensors: [GGUFTensorInfo]
    private let tensorIndex: [String: Int]
    private let mapping: MemoryMappedFile

    package static let magic: [UInt8] = Array("GGUF".utf8)
    /// ggml's limit on dimensions (GGML_MAX_DIMS).
    static let maximumDimensions = 4

    public init(path: String) throws {
        self.path = path
        mapping = try MemoryMappedFile(path: path)
        let bytes = mapping.bytes
        func invalid(_ reason: String) -> ReLoRAError { .invalidFile(path: path, reason: reason) }

        guard bytes.count >= 4, Array(bytes[0 ..< 4]) == Self.magic else {
            throw invalid(bytes.count < 4
                ? "the file is \(bytes.count) bytes long, too short for the 'GGUF' magic; it is truncated or not a GGUF file"
                : "it does not start with the 'GGUF' magic; it is not a GGUF file")
        }
        var reader = ByteReader(bytes: bytes, position: 4, invalid: invalid)
        let version = try reader.u32("the version")
        switch version {
        case 2, 3: break
        case 1: throw invalid("GGUF version 1 (files from before September 2023) is not supported; convert the model again with a current llama.cpp")
        case _ where version.byteSwapped == 2 || version.byteSwapped == 3:
            throw invalid("it is a big-endian GGUF file; relora reads little-endian files only")
        default: throw invalid("GGUF version \(version) is not supported (relora reads versions 2 and 3)")
        }
        self.version = version
        let tensorCount = try reader.u64("the tensor count")
        let keyCount = try reader.u64("the metadata count")
        // Each metadata pair takes at least 13 bytes (key length, type, a 1-byte value) and each tensor
        // entry at least 32 (name length, n_dims, one dimension, type, offset): larger counts cannot fit.
        guard keyCount <= UInt64(reader.remaining / 13) else {
            throw invalid("the metadata count \(keyCount) is absurd for a \(bytes.count)-byte file; the file is corrupt")
        }
        guard tensorCount <= UInt64(reader.remaining / 32) else {
            throw invalid("the tensor count \(tensorCount) is absurd for a \(bytes.count)-byte file; the file is corrupt")
        }

        var keys: [String] = []
        var metadata: [String: GGUFValue] = [:]
        for k in 0 ..< Int(keyCount) {
            let key = try reader.string("the key of metadata entry \(k)")
            guard !key.isEmpty else { throw invalid("metadata entry \(k) has an empty key") }
            let rawType = try reader.u32("the type of '\(abbreviated(key))'")
            guard let type = GGUFValueType(rawValue: rawType) else {
                throw invalid("metadata '\(abbreviated(key))' has unknown value type \(rawType)")
            }
            let value = try reader.value(type, key: key)
            guard metadata.updateValue(value, forKey: key) == nil else {
                throw invalid("metadata key '\(abbreviated(key))' appears twice")
            }
            keys.append(key)
        }
        metadataKeys = keys
        self.metadata = metadata

        var alignment = 32
        if let value = metadata["general.alignment"] {
            guard case .uint32(let a) = value, a > 0, a.nonzeroBitCount == 1 else {
                throw invalid("general.alignment must be a u32 power of two, got \(value)")
            }
            alignment = Int(a)
        }
        self.alignment = alignment

        var entries: [(name: String, type: GGMLType, dims: [Int], offset: UInt64, size: Int)] = []
        var index: [String: Int] = [:]
        for t in 0 ..< Int(tensorCount) {
            let name = try reader.string("the name of tensor \(t)")
            let quoted = "'\(abbreviated(name))'"
            let dimensionCount = try reader.u32("the dimension count of tensor \(quoted)")
            guard (1 ... UInt32(Self.maximumDimensions)).contains(dimensionCount) else {
                throw invalid("tensor \(quoted) has \(dimensionCount) dimensions; GGUF tensors have 1 to \(Self.maximumDimensions)")
            }
            var dims: [Int] = []
            var elements = 1
            for _ in 0 ..< Int(dimensionCount) {
                let d = try reader.u64("the dimensions of tensor \(quoted)")
                guard let size = Int(exactly: d) else { throw invalid("tensor \(quoted) has an absurd dimension \(d)") }
                let (product, overflow) = elements.multipliedReportingOverflow(by: size)
                guard !overflow else { throw invalid("tensor \(quoted) has dimensions whose product overflows") }
                dims.append(size)
                elements = product
            }
            let rawType = try reader.u32("the type of tensor \(quoted)")
            guard let type = GGMLType(rawValue: rawType) else {
                let known = GGMLType.otherNames[rawType].map { "\($0) (ggml type \(rawType))" } ?? "ggml type \(rawType)"
                throw invalid("tensor \(quoted) is stored as \(known), which relora cannot read (it reads \(GGMLType.readableList)); quantize the model again with one of those types")
            }
            guard dims[0] % type.blockSize == 0 else {
                throw invalid("tensor \(quoted) is \(type.name) but its first dimension \(dims[0]) is not a multiple of the block size \(type.blockSize)")
            }
            let (size, overflow) = (elements / type.blockSize).multipliedReportingOverflow(by: type.bytesPerBlock)
            guard !overflow else { throw invalid("tensor \(quoted) has a byte size that overflows") }
            let offset = try reader.u64("the data offset of tensor \(quoted)")
            guard index.updateValue(entries.count, forKey: name) == nil else {
                throw invalid("tensor name \(quoted) appears twice")
            }
            entries.append((name, type, dims, offset, size))
        }

        // The data section starts at the next multiple of the alignment (the padding may end the file
        // when every tensor is empty).
        let dataStart = (reader.position + alignment - 1) / alignment * alignment
        let dataLength = bytes.count - min(dataStart, bytes.count)
        var infos: [GGUFTensorInfo] = []
        infos.reserveCapacity(entries.count)
        for e in entries {
            let quoted = "'\(abbreviated(e.name))'"
            guard e.offset % UInt64(alignment) == 0 else {
                throw invalid("tensor \(quoted) starts at data offset \(e.offset), not a multiple of the alignment \(alignment)")
            }
            guard e.offset <= UInt64(dataLength), UInt64(e.size) <= UInt64(dataLength) - e.offset else {
                throw invalid("tensor \(quoted) needs \(e.size) bytes at data offset \(e.offset) of a \(dataLength)-byte data section; the file is truncated or corrupt")
            }
            infos.append(GGUFTensorInfo(name: e.name, type: e.type, dimensions: e.dims,
                                        byteOffset: dataStart + Int(e.offset), byteCount: e.size))
        }
        let ranges = infos.filter { $0.byteCount > 0 }.sorted { $0.byteOffset < $1.byteOffset }
        for (a, b) in zip(ranges, ranges.dropFirst()) where a.byteOffset + a.byteCount > b.byteOffset {
            throw invalid("tensors '\(abbreviated(a.name))' and '\(abbreviated(b.name))' overlap in the data section; the file is corrupt")
        }
        tensors = infos
        tensorIndex = index
    }

    public func tensor(_ name: String) -> GGUFTensorInfo? { tensorIndex[name].map { tensors[$0] } }

    /// The tensor's raw bytes (valid only inside `body`; not necessarily aligned beyond the file's alignment).
    public func withBytes<R>(_ info: GGUFTensorInfo, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(rebasing: mapping.bytes[info.byteOffset ..< info.byteOffset + info.byteCount]))
    }

    /// The tensor's values as f32 in row-major order (ne[0] fastest): f32 copied, f16 and bf16 widened
    /// exactly, q8_0 and q4_0 dequantized by the reference dequantizer (`code * scale` in f32, as ggml),
    /// q4_K, q5_K and q6_K by relora_quant.h's dequantizers (bit for bit ggml's and gguf-py's).
    public func floats(_ info: GGUFTensorInfo) throws -> [Float] {
        let count = info.elementCount
        switch info.type {
        case .f32:
            return withBytes(info) { raw in (0 ..< count).map { raw.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self) } }
        case .f16:
            return withBytes(info) { raw in
                (0 ..< count).map { FloatBits.floatFromFloat16(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * $0, as: UInt16.self))) }
            }
        case .bf16:
            return withBytes(info) { raw in
                (0 ..< count).map { FloatBits.floatFromBFloat16(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * $0, as: UInt16.self))) }
            }
        case .q8_0, .q4_0:
            return try quantized(info).dequantize()
        case .q4_K, .q5_K, .q6_K:
            // Copied first: the C dequantizers need 2-byte aligned blocks, which a file aligned to 1 would not give.
            let blocks = withBytes(info) { Array($0) }
            var out = [Float](repeating: 0, count: count)
            let status = blocks.withUnsafeBytes { raw in
                out.withUnsafeMutableBufferPointer { y -> Int32 in
                    guard let x = raw.baseAddress, let y = y.baseAddress else { return RELORA_QUANT_OK }
                    switch info.type {
                    case .q4_K: return relora_dequantize_row_q4_K(x.assumingMemoryBound(to: block_q4_K.self), y, Int64(count))
                    case .q5_K: return relora_dequantize_row_q5_K(x.assumingMemoryBound(to: block_q5_K.self), y, Int64(count))
                    default: return relora_dequantize_row_q6_K(x.assumingMemoryBound(to: block_q6_K.self), y, Int64(count))
                    }
                }
            }
            precondition(status == RELORA_QUANT_OK, "a K-quant tensor is whole blocks (checked on open)")
            return out
        }
    }

    /// A q8_0 or q4_0 tensor's blocks as a `[rows, ne[0]]` matrix (rows = the other dimensions' product).
    public func quantized(_ info: GGUFTensorInfo) throws -> QuantizedMatrix {
        guard let format = info.type.quantFormat else {
            throw ReLoRAError.invalidData("tensor '\(abbreviated(info.name))' in \(path) is \(info.type.name), not a block format")
        }
        let cols = info.dimensions[0]
        let rows = cols == 0 ? 0 : info.elementCount / cols
        return try QuantizedMatrix(format: format, rows: rows, cols: cols, bytes: withBytes(info) { Array($0) })
    }
}

/// Bounds-checked little-endian reads over the mapped header; every failure names what was being read.
private struct ByteReader {
    let bytes: UnsafeRawBufferPointer
    var position: Int
    let invalid: (String) -> ReLoRAError

    var remaining: Int { bytes.count - position }

    mutating func take(_ n: Int, _ what: @autoclosure () -> String) throws -> Int {
        guard n >= 0, n <= remaining else {
            throw invalid("the file ends inside \(what()) (at byte \(position) of \(bytes.count)); it is truncated or corrupt")
        }
        defer { position += n }
        return position
    }

    mutating func load<T: FixedWidthInteger>(_: T.Type, _ what: @autoclosure () -> String) throws -> T {
        let at = try take(MemoryLayout<T>.size, what())
        return T(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: T.self))
    }

    mutating func u32(_ what: @autoclosure () -> String) throws -> UInt32 { try load(UInt32.self, what()) }
    mutating func u64(_ what: @autoclosure () -> String) throws -> UInt64 { try load(UInt64.self, what()) }

    mutating func string(_ what: @autoclosure () -> String) throws -> String {
        let length = try u64(what())
        guard length <= UInt64(remaining) else {
            throw invalid("\(what()) claims \(length) bytes but only \(remaining) remain; the file is truncated or corrupt")
        }
        let at = try take(Int(length), what())
        guard let s = String(validating: UnsafeRawBufferPointer(rebasing: bytes[at ..< at + Int(length)]), as: UTF8.self) else {
            throw invalid("\(what()) is not valid UTF-8; the file is corrupt")
        }
        return s
    }

    mutating func value(_ type: GGUFValueType, key: String, inArray: Bool = false) throws -> GGUFValue {
        let what = "the value of '\(abbreviated(key))'"
        switch type {
        case .uint8: return .uint8(try load(UInt8.self, what))
        case .int8: return .int8(try load(Int8.self, what))
        case .uint16: return .uint16(try load(UInt16.self, what))
        case .int16: return .int16(try load(Int16.self, what))
        case .uint32: return .uint32(try load(UInt32.self, what))
        case .int32: return .int32(try load(Int32.self, what))
        case .uint64: return .uint64(try load(UInt64.self, what))
        case .int64: return .int64(try load(Int64.self, what))
        case .float32: return .float32(Float(bitPattern: try load(UInt32.self, what)))
        case .float64: return .float64(Double(bitPattern: try load(UInt64.self, what)))
        case .bool:
            let b = try load(UInt8.self, what)
            guard b <= 1 else { throw invalid("metadata '\(abbreviated(key))' has a bool byte \(b), not 0 or 1") }
            return .bool(b == 1)
        case .string: return .string(try string(what))
        case .array:
            guard !inArray else { throw invalid("metadata '\(abbreviated(key))' is an array of arrays, which GGUF readers do not support") }
            let rawType = try u32("the element type of '\(abbreviated(key))'")
            guard let element = GGUFValueType(rawValue: rawType) else {
                throw invalid("metadata '\(abbreviated(key))' is an array of unknown value type \(rawType)")
            }
            guard element != .array else {
                throw invalid("metadata '\(abbreviated(key))' is an array of arrays, which GGUF readers do not support")
            }
            let count = try u64("the length of '\(abbreviated(key))'")
            // Strings take at least their 8-byte length each.
            let minimum = UInt64(element.fixedSize ?? 8)
            guard count <= UInt64(remaining) / minimum else {
                throw invalid("metadata '\(abbreviated(key))' claims \(count) elements, more than the \(remaining) remaining bytes can hold; the file is truncated or corrupt")
            }
            var items: [GGUFValue] = []
            items.reserveCapacity(Int(count))
            for _ in 0 ..< Int(count) { items.append(try value(element, key: key, inArray: true)) }
            return .array(element, items)
        }
    }
}

/// Shortens untrusted names before they go into an error message.
private func abbreviated(_ text: String, limit: Int = 80) -> String {
    text.count <= limit ? text : String(text.prefix(limit)) + "..."
}

// MARK: - Writer

/// One tensor to write: its GGUF name, type, row-major shape (written reversed, as ne) and a function
/// that makes its bytes when the writer reaches it (so an export holds one tensor's bytes at a time).
public struct GGUFTensorEntry {
    public var name: String
    public var type: GGMLType
    public var shape: [Int]
    let produce: () throws -> [UInt8]

    public init(name: String, type: GGMLType, shape: [Int], bytes produce: @escaping () throws -> [UInt8]) {
        self.name = name
        self.type = type
        self.shape = shape
        self.produce = produce
    }

    /// Bytes the shape needs in this type (the last dimension in whole blocks), or nil if it does not divide.
    public var byteCount: Int? {
        guard let cols = shape.last, !shape.isEmpty, cols % type.blockSize == 0 else { return nil }
        return shape.reduce(1, *) / type.blockSize * type.bytesPerBlock
    }
}

public enum GGUFWriter {
    /// Writes a GGUF v3 file: `metadata` in the given order, then the tensor table, then the tensors at
    /// `alignment`-aligned offsets (zero padding). Atomic: a temporary file in the same directory renamed
    /// into place, so the file is complete or absent and a previous file survives any failure.
    /// `metadata` must hold `general.alignment` when `alignment` is not GGUF's default 32.
    public static func write(metadata: [(String, GGUFValue)], tensors: [GGUFTensorEntry], alignment: Int = 32,
                             to path: String) throws {
        func fail(_ reason: String) -> ReLoRAError { .invalidData("cannot write \(path): \(reason)") }
        guard alignment > 0, alignment.nonzeroBitCount == 1 else { throw fail("the alignment \(alignment) is not a power of two") }
        var keys = Set<String>()
        for (key, value) in metadata {
            guard !key.isEmpty, keys.insert(key).inserted else { throw fail("metadata key '\(key)' is empty or repeated") }
            if case .array(let t, let items) = value {
                guard t != .array, items.allSatisfy({ $0.type == t }) else { throw fail("metadata '\(key)' is not an array of one scalar type") }
            }
        }
        let declared = metadata.first { $0.0 == "general.alignment" }?.1
        guard declared == nil ? alignment == 32 : declared == .uint32(UInt32(alignment)) else {
            throw fail("general.alignment must be present as u32 \(alignment) (or absent for 32)")
        }
        var names = Set<String>()
        var offsets: [Int] = []
        var offset = 0
        for t in tensors {
            guard names.insert(t.name).inserted else { throw fail("tensor name '\(t.name)' appears twice") }
            guard t.type.isWritable else { throw fail("tensor '\(t.name)': relora does not write \(t.type.name)") }
            guard (1 ... GGUFFile.maximumDimensions).contains(t.shape.count), t.shape.allSatisfy({ $0 >= 0 }),
                  let size = t.byteCount else {
                throw fail("tensor '\(t.name)' of shape \(t.shape) cannot be stored as \(t.type.name)")
            }
            offsets.append(offset)
            offset += (size + alignment - 1) / alignment * alignment
        }

        var header = Header()
        header.bytes += GGUFFile.magic
        header.u32(3)
        header.u64(UInt64(tensors.count))
        header.u64(UInt64(metadata.count))
        for (key, value) in metadata {
            header.string(key)
            header.u32(value.type.rawValue)
            header.value(value)
        }
        for (t, o) in zip(tensors, offsets) {
            header.string(t.name)
            header.u32(UInt32(t.shape.count))
            for d in t.shape.reversed() { header.u64(UInt64(d)) }
            header.u32(t.type.rawValue)
            header.u64(UInt64(o))
        }
        header.bytes += [UInt8](repeating: 0, count: (alignment - header.bytes.count % alignment) % alignment)

        try AtomicFileWriter.write(to: path) { sink in
            try header.bytes.withUnsafeBytes { try sink.write($0) }
            for t in tensors {
                let bytes = try t.produce()
                guard bytes.count == t.byteCount else {
                    throw fail("tensor '\(t.name)' produced \(bytes.count) bytes, expected \(t.byteCount!)")
                }
                try bytes.withUnsafeBytes { try sink.write($0) }
                let pad = (alignment - bytes.count % alignment) % alignment
                if pad > 0 { try [UInt8](repeating: 0, count: pad).withUnsafeBytes { try sink.write($0) } }
            }
        }
    }

    private struct Header {
        var bytes: [UInt8] = []

        mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        mutating func string(_ s: String) {
            u64(UInt64(s.utf8.count))
            bytes += s.utf8
        }

        mutating func value(_ v: GGUFValue) {
            switch v {
            case .uint8(let x): bytes.append(x)
            case .int8(let x): bytes.append(UInt8(bitPattern: x))
            case .uint16(let x): withUnsafeBytes(of: x.littleEndian) { bytes += $0 }
            case .int16(let x): withUnsafeBytes(of: x.littleEndian) { bytes += $0 }
            case .uint32(let x): u32(x)
            case .int32(let x): u32(UInt32(bitPattern: x))
            case .uint64(let x): u64(x)
            case .int64(let x): u64(UInt64(bitPattern: x))
            case .float32(let x): u32(x.bitPattern)
            case .float64(let x): u64(x.bitPattern)
            case .bool(let x): bytes.append(x ? 1 : 0)
            case .string(let s): string(s)
            case .array(let t, let items):
                u32(t.rawValue)
                u64(UInt64(items.count))
                for item in items { value(item) }
            }
        }
    }
}
