import Foundation
#if canImport(Glibc)
import Glibc
import ReLoRACore
#endif

// Safetensors, NumPy and every buffer this package hands around are little-endian; the fast paths
// below copy raw bytes without swapping.
#if !_endian(little)
#error("relora reads and writes little-endian files by copying raw bytes; big-endian hosts are not supported")
#endif

// MARK: - Format
//
// A safetensors file (https://github.com/huggingface/safetensors):
//
//   [0, 8)          N: UInt64 little-endian, the header length in bytes
//   [8, 8+N)        header: a UTF-8 JSON object, padded with trailing spaces (writers pad N to a multiple of 8)
//   [8+N, EOF)      the data buffer
//
// Each header key other than "__metadata__" names a tensor:
//   "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
// where [begin, end) is relative to the start of the data buffer, little-endian, row-major.
// "__metadata__", if present, is an object of string -> string.

/// The element types this package reads. Others in the spec (U16..U64, F8 variants) are rejected by name.
public enum SafetensorsDType: String, Sendable, CaseIterable {
    case F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL

    public var byteSize: Int {
        switch self {
        case .F64, .I64: return 8
        case .F32, .I32: return 4
        case .F16, .BF16, .I16: return 2
        case .I8, .U8, .BOOL: return 1
        }
    }

    package var isFloatingPoint: Bool {
        switch self {
        case .F64, .F32, .F16, .BF16: return true
        case .I64, .I32, .I16, .I8, .U8, .BOOL: return false
        }
    }
}

/// Where one tensor lives in the file. `byteOffset` is absolute (from the start of the file), so a caller
/// can hand it to its own reader; `byteCount == shape.product * dtype.byteSize` is guaranteed.
public struct SafetensorsTensorInfo: Sendable, Equatable {
    public let name: String
    public let dtype: SafetensorsDType
    public let shape: [Int]
    public let byteOffset: Int
    public let byteCount: Int

    public var elementCount: Int { byteCount / dtype.byteSize }
}

// MARK: - Reader

/// A safetensors file, memory-mapped read-only and validated completely in `init`: after that, every
/// tensor's byte range is known to lie inside the data buffer, match its dtype and shape, and not overlap
/// another tensor. Reads copy out of the map; the map lives as long as this object.
///
/// Gaps between tensors and trailing bytes after the last one are tolerated (the reference reader is
/// stricter); they cannot make a read go out of bounds.
public final class SafetensorsFile: Sendable {  // all lets; the map's own Sendable claim is the one unchecked
    public let path: String
    public let metadata: [String: String]
    private let mapping: MemoryMappedFile
    private let tensors: [String: SafetensorsTensorInfo]

    /// Sorted, so iteration order does not depend on the header's key order.
    public let tensorNames: [String]

    /// The reference implementation's limit: a header this large is corruption or an attack, not a model.
    static let maximumHeaderLength = 100_000_000

    public init(path: String) throws {
        self.path = path
        mapping = try MemoryMappedFile(path: path)
        let bytes = mapping.bytes

        func invalid(_ reason: String) -> ReLoRAError { .invalidFile(path: path, reason: reason) }

        guard bytes.count >= 8 else {
            throw invalid("the file is \(bytes.count) bytes long, shorter than the 8-byte header length that starts every safetensors file; it is truncated or not a safetensors file")
        }
        let declaredHeaderLength = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        guard declaredHeaderLength > 0 else {
            throw invalid("the header length is 0, so there is no JSON header; the file is corrupt or not a safetensors file")
        }
        guard declaredHeaderLength <= UInt64(Self.maximumHeaderLength) else {
            throw invalid("the header length \(declaredHeaderLength) is absurd (over \(Self.maximumHeaderLength) bytes); the file is corrupt or not a safetensors file")
        }
        let headerLength = Int(declaredHeaderLength)
        guard headerLength <= bytes.count - 8 else {
            throw invalid("the header length \(headerLength) runs past the end of the file (\(bytes.count - 8) bytes follow the length); the file is truncated or not a safetensors file")
        }
        let headerBytes = UnsafeRawBufferPointer(rebasing: bytes[8 ..< 8 + headerLength])
        let dataStart = 8 + headerLength
        let dataLength = bytes.count - dataStart

        let header = try Self.parseHeader(headerBytes, invalid: invalid)
        metadata = try Self.parseMetadata(header["__metadata__"], invalid: invalid)

        var tensors: [String: SafetensorsTensorInfo] = [:]
        tensors.reserveCapacity(header.count)
        for (name, entry) in header where name != "__metadata__" {
            let (dtype, shape, begin, end) = try Self.parseEntry(name: name, entry, dataLength: dataLength, invalid: invalid)
            tensors[name] = SafetensorsTensorInfo(
                name: name, dtype: dtype, shape: shape, byteOffset: dataStart + begin, byteCount: end - begin)
        }
        try Self.checkNoOverlap(tensors.values, dataStart: dataStart, invalid: invalid)
        self.tensors = tensors
        tensorNames = tensors.keys.sorted()
    }

    public func info(_ name: String) -> SafetensorsTensorInfo? { tensors[name] }

    /// The tensor's values as Float, row-major. F32 is copied; BF16 is exact (its bits are the top half of
    /// an F32); F16 is exact, subnormals, infinities and NaNs included; F64 rounds to nearest.
    public func floats(_ name: String) throws -> [Float] {
        let info = try tensorInfo(name)
        guard info.dtype.isFloatingPoint else {
            throw ReLoRAError.invalidData("tensor '\(abbreviated(name))' in \(path) has dtype \(info.dtype.rawValue); floats(_:) reads only F64, F32, F16 and BF16, use integers(_:)")
        }
        return Self.decodeFloats(UnsafeRawBufferPointer(rebasing: mapping.bytes[info.byteOffset ..< info.byteOffset + info.byteCount]),
                                 dtype: info.dtype)
    }

    /// Float values of raw little-endian bytes of a floating-point dtype (see `floats(_:)`).
    static func decodeFloats(_ raw: UnsafeRawBufferPointer, dtype: SafetensorsDType) -> [Float] {
        let count = raw.count / dtype.byteSize
        let source = raw.baseAddress
        return [Float](unsafeUninitializedCapacity: count) { output, initialized in
            defer { initialized = count }
            guard count > 0, let source, let destination = output.baseAddress else { return }
            switch dtype {
            case .F32:
                UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: count * 4)
            case .BF16:
                for i in 0 ..< count {
                    output[i] = FloatBits.floatFromBFloat16(UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                }
            case .F16:
                for i in 0 ..< count {
                    output[i] = FloatBits.floatFromFloat16(UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                }
            case .F64:
                for i in 0 ..< count {
                    output[i] = Float(Double(bitPattern: UInt64(littleEndian: source.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))))
                }
            case .I64, .I32, .I16, .I8, .U8, .BOOL:
                preconditionFailure("decodeFloats reads floating-point dtypes only")
            }
        }
    }

    /// The tensor's values widened to Int64, row-major. BOOL reads as 0 or 1 (any non-zero byte is 1).
    public func integers(_ name: String) throws -> [Int64] {
        let info = try tensorInfo(name)
        guard !info.dtype.isFloatingPoint else {
            throw ReLoRAError.invalidData("tensor '\(abbreviated(name))' in \(path) has dtype \(info.dtype.rawValue); integers(_:) reads only I64, I32, I16, I8, U8 and BOOL, use floats(_:)")
        }
        let count = info.elementCount
        let source = mapping.bytes.baseAddress.map { UnsafeRawPointer($0 + info.byteOffset) }
        return [Int64](unsafeUninitializedCapacity: count) { output, initialized in
            defer { initialized = count }
            guard count > 0, let source else { return }
            func widen<T: FixedWidthInteger>(_: T.Type) {
                for i in 0 ..< count {
                    output[i] = Int64(T(littleEndian: source.loadUnaligned(fromByteOffset: i * MemoryLayout<T>.size, as: T.self)))
                }
            }
            switch info.dtype {
            case .I64: widen(Int64.self)
            case .I32: widen(Int32.self)
            case .I16: widen(Int16.self)
            case .I8: widen(Int8.self)
            case .U8: widen(UInt8.self)
            case .BOOL:
                for i in 0 ..< count { output[i] = source.load(fromByteOffset: i, as: UInt8.self) == 0 ? 0 : 1 }
            case .F64, .F32, .F16, .BF16:
                preconditionFailure("float dtypes are rejected above")
            }
        }
    }

    /// The tensor's raw little-endian bytes, without a copy: for quantized codes and other payloads that
    /// should not be widened. The buffer is valid only inside `body`, and is not necessarily aligned to the
    /// element size (tensors are packed in the writer's order), so read it with `loadUnaligned`.
    public func withRawBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let info = try tensorInfo(name)
        return try body(UnsafeRawBufferPointer(rebasing: mapping.bytes[info.byteOffset ..< info.byteOffset + info.byteCount]))
    }

    private func tensorInfo(_ name: String) throws -> SafetensorsTensorInfo {
        guard let info = tensors[name] else {
            throw ReLoRAError.invalidData("\(path) has no tensor named '\(abbreviated(name))'; it has \(tensors.count) tensors")
        }
        return info
    }

    // MARK: Header validation

    static func parseHeader(
        _ headerBytes: UnsafeRawBufferPointer, invalid: (String) -> ReLoRAError
    ) throws -> [String: Any] {
        // Checked separately so a mis-encoded header is not reported as a JSON syntax error.
        guard String(validating: headerBytes, as: UTF8.self) != nil else {
            throw invalid("the header is not valid UTF-8; the file is corrupt or not a safetensors file")
        }
        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: Data(headerBytes), options: [.fragmentsAllowed])
        } catch {
            throw invalid("the header is not valid JSON; the file is corrupt or not a safetensors file")
        }
        guard let object = json as? [String: Any] else {
            throw invalid("the header is JSON but not an object of tensor entries; the file is corrupt or not a safetensors file")
        }
        return object
    }

    static func parseMetadata(_ value: Any?, invalid: (String) -> ReLoRAError) throws -> [String: String] {
        guard let value else { return [:] }
        guard let object = value as? [String: Any] else {
            throw invalid("__metadata__ is not a JSON object of string to string")
        }
        var metadata: [String: String] = [:]
        for (key, entry) in object {
            guard let string = entry as? String else {
                throw invalid("__metadata__ key '\(abbreviated(key))' has a non-string value; metadata must map strings to strings")
            }
            metadata[key] = string
        }
        return metadata
    }

    private static func parseEntry(
        name: String, _ value: Any, dataLength: Int, invalid: (String) -> ReLoRAError
    ) throws -> (SafetensorsDType, [Int], begin: Int, end: Int) {
        let quotedName = "'\(abbreviated(name))'"
        guard let entry = value as? [String: Any] else {
            throw invalid("tensor \(quotedName) is not a JSON object with dtype, shape and data_offsets")
        }
        for key in ["dtype", "shape", "data_offsets"] where entry[key] == nil {
            throw invalid("tensor \(quotedName) is missing '\(key)'")
        }

        guard let dtypeName = entry["dtype"] as? String else {
            throw invalid("tensor \(quotedName) has a dtype that is not a string")
        }
        guard let dtype = SafetensorsDType(rawValue: dtypeName) else {
            let supported = SafetensorsDType.allCases.map(\.rawValue).joined(separator: ", ")
            throw invalid("tensor \(quotedName) has unknown dtype '\(abbreviated(dtypeName))'; supported dtypes are \(supported)")
        }

        guard let dimensions = entry["shape"] as? [Any] else {
            throw invalid("tensor \(quotedName) has a shape that is not a JSON array of dimensions")
        }
        var shape: [Int] = []
        shape.reserveCapacity(dimensions.count)
        var elementCount = 1
        var elementCountOverflowed = false
        for (axis, dimension) in dimensions.enumerated() {
            guard let size = exactInteger(dimension), size >= 0 else {
                throw invalid("tensor \(quotedName) has an invalid shape: dimension \(axis) is not a non-negative integer")
            }
            shape.append(size)
            let (product, overflow) = elementCount.multipliedReportingOverflow(by: size)
            elementCountOverflowed = elementCountOverflowed || overflow
            elementCount = product
        }
        // A zero dimension makes the true product 0 even if an earlier partial product overflowed.
        if shape.contains(0) { elementCount = 0; elementCountOverflowed = false }
        let (expectedByteCount, byteCountOverflowed) = elementCount.multipliedReportingOverflow(by: dtype.byteSize)
        guard !elementCountOverflowed, !byteCountOverflowed else {
            throw invalid("tensor \(quotedName) has shape \(shape) whose size overflows a 64-bit byte count")
        }

        guard let offsets = entry["data_offsets"] as? [Any], offsets.count == 2,
              let begin = exactInteger(offsets[0]), let end = exactInteger(offsets[1]),
              begin >= 0, end >= 0
        else {
            throw invalid("tensor \(quotedName) has data_offsets that are not two non-negative integers [begin, end]")
        }
        guard begin <= end else {
            throw invalid("tensor \(quotedName) has data_offsets [\(begin), \(end)] with begin after end")
        }
        guard end <= dataLength else {
            throw invalid("tensor \(quotedName) has data_offsets end \(end) beyond the \(dataLength)-byte data buffer; the file is truncated or corrupt")
        }
        guard end - begin == expectedByteCount else {
            throw invalid("tensor \(quotedName) occupies \(end - begin) bytes but dtype \(dtype.rawValue) with shape \(shape) needs \(expectedByteCount)")
        }
        return (dtype, shape, begin, end)
    }

    private static func checkNoOverlap(
        _ tensors: some Collection<SafetensorsTensorInfo>, dataStart: Int, invalid: (String) -> ReLoRAError
    ) throws {
        // Empty ranges hold no bytes and cannot overlap anything.
        let ranges = tensors.filter { $0.byteCount > 0 }.sorted { $0.byteOffset < $1.byteOffset }
        for (previous, next) in zip(ranges, ranges.dropFirst()) where previous.byteOffset + previous.byteCount > next.byteOffset {
            let previousRange = "[\(previous.byteOffset - dataStart), \(previous.byteOffset - dataStart + previous.byteCount))"
            let nextRange = "[\(next.byteOffset - dataStart), \(next.byteOffset - dataStart + next.byteCount))"
            throw invalid("tensors '\(abbreviated(previous.name))' \(previousRange) and '\(abbreviated(next.name))' \(nextRange) have overlapping data_offsets")
        }
    }

    /// JSONSerialization hands numbers back as NSNumber (and booleans as an NSNumber subclass). Accept only
    /// values that are exactly an Int: 3 and 3.0 yes; true, 1.5, 1e30 and 2^64 no.
    static func exactInteger(_ value: Any) -> Int? {
        guard let number = value as? NSNumber, type(of: number) != booleanNumberClass else { return nil }
        return Int(exactly: number)
    }

    private static let booleanNumberClass: AnyClass = type(of: NSNumber(value: true))
}

/// Shortens untrusted names before they go into an error message (a hostile header can hold megabytes).
private func abbreviated(_ text: String, limit: Int = 80) -> String {
    text.count <= limit ? text : String(text.prefix(limit)) + "..."
}

// MARK: - Writer

/// One tensor to write: raw little-endian bytes plus the dtype and shape that describe them.
public struct SafetensorsEntry: Sendable {
    public var name: String
    public var dtype: SafetensorsDType
    public var shape: [Int]
    /// The bytes, or a function that makes them when the writer reaches this entry: a checkpoint of a
    /// large model then holds one tensor's bytes on the host at a time, not the whole file.
    private let produce: @Sendable () -> [UInt8]
    private let byteCount: Int

    /// `bytes.count` must equal `shape.product * dtype.byteSize`; the writer checks.
    public init(name: String, dtype: SafetensorsDType, shape: [Int], bytes: [UInt8]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.byteCount = bytes.count
        self.produce = { bytes }
    }

    /// An entry whose bytes are made when written; `produce` must return exactly
    /// `shape.product * dtype.byteSize` bytes (the writer checks and fails the whole write otherwise).
    public init(name: String, dtype: SafetensorsDType, shape: [Int], deferred produce: @escaping @Sendable () -> [UInt8]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.byteCount = shape.reduce(1, *) * dtype.byteSize
        self.produce = produce
    }

    public var bytes: [UInt8] { produce() }
    var declaredByteCount: Int { byteCount }

    public static func f32(_ name: String, shape: [Int], _ values: [Float]) -> SafetensorsEntry {
        SafetensorsEntry(name: name, dtype: .F32, shape: shape, bytes: values.withUnsafeBytes { Array($0) })
    }

    /// Rounds each value to bfloat16, to nearest with ties to even.
    public static func bf16(_ name: String, shape: [Int], _ values: [Float]) -> SafetensorsEntry {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(2 * values.count)
        for value in values {
            let bits = FloatBits.bfloat16(value)
            bytes.append(UInt8(truncatingIfNeeded: bits))
            bytes.append(UInt8(truncatingIfNeeded: bits >> 8))
        }
        return SafetensorsEntry(name: name, dtype: .BF16, shape: shape, bytes: bytes)
    }

    public static func i64(_ name: String, shape: [Int], _ values: [Int64]) -> SafetensorsEntry {
        SafetensorsEntry(name: name, dtype: .I64, shape: shape, bytes: values.withUnsafeBytes { Array($0) })
    }
}

public enum SafetensorsWriter {
    /// Writes `entries` in the given order, contiguous in the data buffer, with a header padded with spaces
    /// to a multiple of 8 bytes. Atomic: the file appears complete at `path` or not at all, and a previous
    /// file there survives any failure. Entries are validated (unique non-empty names, byte counts that
    /// match dtype and shape) before anything touches the disk; those errors are `.invalidData`.
    public static func write(_ entries: [SafetensorsEntry], metadata: [String: String] = [:], to path: String) throws {
        try validate(entries, path: path)
        var header = "{"
        var fields: [String] = []
        if !metadata.isEmpty {
            let pairs = metadata.sorted { $0.key < $1.key }.map { "\(jsonString($0.key)):\(jsonString($0.value))" }
            fields.append("\"__metadata__\":{\(pairs.joined(separator: ","))}")
        }
        var offset = 0
        for entry in entries {
            let shape = entry.shape.map(String.init).joined(separator: ",")
            fields.append("\(jsonString(entry.name)):{\"dtype\":\"\(entry.dtype.rawValue)\",\"shape\":[\(shape)],\"data_offsets\":[\(offset),\(offset + entry.declaredByteCount)]}")
            offset += entry.declaredByteCount
        }
        header += fields.joined(separator: ",") + "}"
        var headerBytes = Array(header.utf8)
        // Padding keeps the data buffer 8-byte aligned in the file, so a mapped F64/I64 tensor is aligned.
        headerBytes += Array(repeating: UInt8(ascii: " "), count: (8 - headerBytes.count % 8) % 8)

        try AtomicFileWriter.write(to: path) { sink in
            var lengthPrefix = UInt64(headerBytes.count).littleEndian
            try withUnsafeBytes(of: &lengthPrefix) { try sink.write($0) }
            try headerBytes.withUnsafeBytes { try sink.write($0) }
            for entry in entries {
                let bytes = entry.bytes
                guard bytes.count == entry.declaredByteCount else {
                    throw ReLoRAError.invalidData("cannot write \(path): tensor '\(abbreviated(entry.name))' produced \(bytes.count) bytes, expected \(entry.declaredByteCount)")
                }
                try bytes.withUnsafeBytes { try sink.write($0) }
            }
        }
    }

    /// Unique non-empty names, non-negative shapes, byte counts that match dtype and shape; `.invalidData`.
    static func validate(_ entries: [SafetensorsEntry], path: String) throws {
        var names = Set<String>()
        for entry in entries {
            guard !entry.name.isEmpty, entry.name != "__metadata__" else {
                throw ReLoRAError.invalidData("cannot write tensor name '\(entry.name)' to \(path): names must be non-empty and not '__metadata__'")
            }
            guard names.insert(entry.name).inserted else {
                throw ReLoRAError.invalidData("cannot write \(path): tensor name '\(abbreviated(entry.name))' appears twice")
            }
            guard entry.shape.allSatisfy({ $0 >= 0 }) else {
                throw ReLoRAError.invalidData("cannot write \(path): tensor '\(abbreviated(entry.name))' has negative dimensions in shape \(entry.shape)")
            }
            var expectedByteCount: Int? = entry.dtype.byteSize
            for dimension in entry.shape {
                expectedByteCount = expectedByteCount.flatMap {
                    let (product, overflow) = $0.multipliedReportingOverflow(by: dimension)
                    return overflow ? nil : product
                }
            }
            if entry.shape.contains(0) { expectedByteCount = 0 }
            guard expectedByteCount == entry.declaredByteCount else {
                throw ReLoRAError.invalidData("cannot write \(path): tensor '\(abbreviated(entry.name))' has \(entry.declaredByteCount) bytes but dtype \(entry.dtype.rawValue) with shape \(entry.shape) needs \(expectedByteCount.map(String.init) ?? "more than Int.max")")
            }
        }
    }

    /// A JSON string literal. Escapes quote, backslash and control characters; other Unicode passes as UTF-8.
    static func jsonString(_ text: String) -> String {
        var escaped = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": escaped += "\\\""
            case "\\": escaped += "\\\\"
            case "\n": escaped += "\\n"
            case "\r": escaped += "\\r"
            case "\t": escaped += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                escaped += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: escaped.unicodeScalars.append(scalar)
            }
        }
        return escaped + "\""
    }
}
