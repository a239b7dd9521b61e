import Foundation
#if canImport(Glibc)
import Glibc
import ReLoRACore
#endif

// MARK: - Format
//
// A NumPy .npy file (numpy/lib/format.py), as used here for a 1-D array of token ids:
//
//   [0, 6)     magic "\x93NUMPY"
//   [6, 8)     major, minor version bytes; major 1, 2 or 3
//   v1:        [8, 10)  header length H, UInt16 little-endian; header at [10, 10+H)
//   v2, v3:    [8, 12)  header length H, UInt32 little-endian; header at [12, 12+H)
//   header     a Python dict literal, ASCII in practice (v3 allows UTF-8), padded with spaces and ending
//              in "\n" so the data starts on a 64-byte boundary:
//              {'descr': '<u2', 'fortran_order': False, 'shape': (12345,), }
//   data       count * dtype size bytes, nothing after it

/// The token id types a token file may hold, all little-endian.
public enum TokenDType: String, Sendable, CaseIterable {
    case uint16, uint32, int32, int64

    public var byteSize: Int {
        switch self {
        case .uint16: return 2
        case .uint32, .int32: return 4
        case .int64: return 8
        }
    }

    /// The NumPy dtype string ("descr") for this type.
    var npyDescr: String {
        switch self {
        case .uint16: return "<u2"
        case .uint32: return "<u4"
        case .int32: return "<i4"
        case .int64: return "<i8"
        }
    }

    var valueRange: ClosedRange<Int64> {
        switch self {
        case .uint16: return 0 ... Int64(UInt16.max)
        case .uint32: return 0 ... Int64(UInt32.max)
        case .int32: return Int64(Int32.min) ... Int64(Int32.max)
        case .int64: return Int64.min ... Int64.max
        }
    }
}

// MARK: - Reader

/// A 1-D .npy array of token ids, memory-mapped read-only and validated in `init` (format, dtype, shape,
/// and a data length that matches the shape exactly). Reads go straight to the map.
public final class TokenArray: Sendable {  // all lets; the map's own Sendable claim is the one unchecked
    public let path: String
    public let dtype: TokenDType
    public let count: Int
    private let mapping: MemoryMappedFile
    /// Byte offset of token 0 in the file.
    private let dataOffset: Int

    /// numpy's own default limit is 10,000 bytes; a 1-D header needs about 128. Anything near this is not
    /// a token file.
    static let maximumHeaderLength = 1 << 20

    public init(npyPath path: String) throws {
        self.path = path
        mapping = try MemoryMappedFile(path: path)
        let bytes = mapping.bytes

        func invalid(_ reason: String) -> ReLoRAError { .invalidFile(path: path, reason: reason) }

        let magic: [UInt8] = [0x93] + Array("NUMPY".utf8)
        guard bytes.count >= 6, bytes.prefix(6).elementsEqual(magic) else {
            throw invalid("bad magic: the file does not start with \"\\x93NUMPY\", so it is not a .npy file")
        }
        guard bytes.count >= 8 else {
            throw invalid("truncated header: the file ends inside the version field")
        }
        let major = bytes[6], minor = bytes[7]
        let lengthFieldSize: Int
        switch major {
        case 1: lengthFieldSize = 2
        case 2, 3: lengthFieldSize = 4
        default:
            throw invalid("unsupported .npy format version \(major).\(minor); versions 1, 2 and 3 are supported")
        }
        let headerStart = 8 + lengthFieldSize
        guard bytes.count >= headerStart else {
            throw invalid("truncated header: the file ends inside the header length field")
        }
        let headerLength = lengthFieldSize == 2
            ? Int(UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt16.self)))
            : Int(UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
        guard headerLength <= Self.maximumHeaderLength else {
            throw invalid("the header length \(headerLength) is absurd for a 1-D array (over \(Self.maximumHeaderLength) bytes); the file is corrupt")
        }
        guard headerLength <= bytes.count - headerStart else {
            throw invalid("truncated header: it declares \(headerLength) bytes but only \(bytes.count - headerStart) follow")
        }
        let header = try NpyHeader(
            parsing: UnsafeRawBufferPointer(rebasing: bytes[headerStart ..< headerStart + headerLength]), invalid: invalid)

        guard let dtype = header.tokenDType else {
            let accepted = "token files must hold uint16, uint32, int32 or int64, little-endian"
            if header.descr.hasPrefix(">") {
                throw invalid("dtype '\(abbreviated(header.descr))' is big-endian; \(accepted) (convert with arr.astype(arr.dtype.newbyteorder('<')))")
            }
            throw invalid("unsupported dtype '\(abbreviated(header.descr))'; \(accepted)")
        }
        let shapeText = "(" + header.shape.map(String.init).joined(separator: ", ") + (header.shape.count == 1 ? ",)" : ")")
        if header.fortranOrder && header.shape.count > 1 {
            throw invalid("the array is Fortran-ordered with shape \(shapeText); expected a 1-D array of token ids (save arr.ravel())")
        }
        guard header.shape.count == 1 else {
            throw invalid("expected a 1-D array of token ids, got shape \(shapeText)")
        }
        let count = header.shape[0]

        let dataOffset = headerStart + headerLength
        let available = bytes.count - dataOffset
        let (needed, overflow) = count.multipliedReportingOverflow(by: dtype.byteSize)
        guard !overflow, needed <= available else {
            throw invalid("truncated data: shape \(shapeText) of \(dtype.rawValue) needs \(overflow ? "more than Int.max" : String(needed)) bytes but only \(available) follow the header")
        }
        guard needed == available else {
            throw invalid("the file has \(available - needed) bytes after the \(count) tokens its header declares; it is corrupt or was appended to")
        }
        self.dtype = dtype
        self.count = count
        self.dataOffset = dataOffset
    }

    private var tokens: UnsafeRawPointer {
        // A valid file has at least a magic and header, so the map is never empty here.
        guard let base = mapping.bytes.baseAddress else { preconditionFailure("a validated .npy file is never empty") }
        return base + dataOffset
    }

    public subscript(i: Int) -> Int64 {
        precondition(i >= 0 && i < count, "token index \(i) out of range 0..<\(count)")
        return Self.load(tokens, index: i, dtype: dtype)
    }

    /// Tokens [start, start+length) as Int32. Values outside Int32 (possible for uint32 and int64 files) wrap:
    /// validate ids against the vocabulary with `minValue()`/`maxValue()` once, before training. The caller
    /// validates the range; it is checked only by a precondition.
    public func window(_ start: Int, _ length: Int) -> [Int32] {
        precondition(start >= 0 && length >= 0 && start <= count - length,
                     "token window \(start)..<\(start + length) out of range 0..<\(count)")
        let source = tokens
        return [Int32](unsafeUninitializedCapacity: length) { output, initialized in
            func convert<T: FixedWidthInteger>(_: T.Type) {
                for i in 0 ..< length {
                    output[i] = Int32(truncatingIfNeeded: T(littleEndian: source.loadUnaligned(
                        fromByteOffset: (start + i) * MemoryLayout<T>.size, as: T.self)))
                }
            }
            switch dtype {
            case .uint16: convert(UInt16.self)
            case .uint32: convert(UInt32.self)
            case .int32: convert(Int32.self)
            case .int64: convert(Int64.self)
            }
            initialized = length
        }
    }

    /// The largest token id, in one pass over the file; 0 for an empty array (so it passes `< vocabSize`).
    public func maxValue() -> Int64 { reduce(initial: Int64.min) { max($0, $1) } }

    /// The smallest token id, in one pass over the file; 0 for an empty array (so it passes `>= 0`).
    public func minValue() -> Int64 { reduce(initial: Int64.max) { min($0, $1) } }

    private func reduce(initial: Int64, _ combine: (Int64, Int64) -> Int64) -> Int64 {
        guard count > 0 else { return 0 }
        let source = tokens, count = count
        func fold<T: FixedWidthInteger>(_: T.Type) -> Int64 {
            var result = initial
            for i in 0 ..< count {
                result = combine(result, Int64(T(littleEndian: source.loadUnaligned(
                    fromByteOffset: i * MemoryLayout<T>.size, as: T.self))))
            }
            return result
        }
        switch dtype {
        case .uint16: return fold(UInt16.self)
        case .uint32: return fold(UInt32.self)
        case .int32: return fold(Int32.self)
        case .int64: return fold(Int64.self)
        }
    }

    @inline(__always)
    private static func load(_ source: UnsafeRawPointer, index: Int, dtype: TokenDType) -> Int64 {
        switch dtype {
        case .uint16: return Int64(UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self)))
        case .uint32: return Int64(UInt32(littleEndian: source.loadUnaligned(fromByteOffset: 4 * index, as: UInt32.self)))
        case .int32: return Int64(Int32(littleEndian: source.loadUnaligned(fromByteOffset: 4 * index, as: Int32.self)))
        case .int64: return Int64(littleEndian: source.loadUnaligned(fromByteOffset: 8 * index, as: Int64.self))
        }
    }
}

// MARK: - Header

/// The three keys numpy writes, parsed from the header's Python dict literal. The grammar accepted is the
/// subset `repr` produces for them: single- or double-quoted strings without escapes, True/False/None,
/// decimal integers, and (possibly nested) tuples and lists, with an optional trailing comma anywhere
/// Python allows one. A shape of `(N)` (really just N in Python) or a bare N reads as the 1-tuple `(N,)`.
fileprivate struct NpyHeader {
    var descr: String
    var fortranOrder: Bool
    var shape: [Int]

    var tokenDType: TokenDType? { TokenDType.allCases.first { $0.npyDescr == descr } }

    init(parsing bytes: UnsafeRawBufferPointer, invalid: (String) -> ReLoRAError) throws {
        func unparsable(_ detail: String) -> ReLoRAError {
            invalid("unparsable header: \(detail); expected a dict like {'descr': '<u2', 'fortran_order': False, 'shape': (N,)}")
        }
        var parser = PythonLiteralParser(bytes: Array(bytes))
        let dictionary: [(String, PythonLiteral)]
        do {
            dictionary = try parser.parseHeaderDictionary()
        } catch {
            throw unparsable(error.detail)
        }

        var descr: String?, fortranOrder: Bool?, shape: [Int]?
        for (key, value) in dictionary {
            switch (key, value) {
            case ("descr", .string(let text)): descr = text
            case ("descr", _):
                throw invalid("unsupported dtype: descr is not a simple dtype string (structured arrays are not token files); token files must hold uint16, uint32, int32 or int64, little-endian")
            case ("fortran_order", .bool(let flag)): fortranOrder = flag
            case ("shape", .tuple(let dimensions)):
                shape = try dimensions.map {
                    guard case .integer(let size) = $0, size >= 0 else {
                        throw unparsable("shape must be a tuple of non-negative integers")
                    }
                    return size
                }
            case ("shape", .integer(let size)) where size >= 0:
                shape = [size]  // the `(N)` spelling parses as a parenthesised integer
            case ("fortran_order", _), ("shape", _):
                throw unparsable("'\(key)' has the wrong type")
            default:
                throw unparsable("unexpected key '\(abbreviated(key))'")
            }
        }
        guard let descr, let fortranOrder, let shape else {
            throw unparsable("it must have the keys 'descr', 'fortran_order' and 'shape'")
        }
        self.descr = descr
        self.fortranOrder = fortranOrder
        self.shape = shape
    }

    /// The header numpy's `np.save` writes for a 1-D array, byte for byte (numpy >= 1.23 keeps 21 characters
    /// of room after the dict so the length can grow in place, then pads so the data is 64-byte aligned).
    static func encoded(dtype: TokenDType, count: Int) -> [UInt8] {
        let dictionary = "{'descr': '\(dtype.npyDescr)', 'fortran_order': False, 'shape': (\(count),), }"
        let growthRoom = String(repeating: " ", count: max(0, 21 - String(count).count))
        var header = Array((dictionary + growthRoom).utf8)
        let prefixLength = 6 + 2 + 2  // magic, version, UInt16 length
        let paddingLength = 64 - (prefixLength + header.count + 1) % 64
        header += Array(repeating: UInt8(ascii: " "), count: paddingLength) + [UInt8(ascii: "\n")]
        let length = UInt16(header.count)
        return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(length & 0xFF), UInt8(length >> 8)] + header
    }
}

fileprivate enum PythonLiteral {
    case string(String)
    case bool(Bool)
    case none
    case integer(Int)
    case tuple([PythonLiteral])
    case list([PythonLiteral])
}

/// A recursive-descent parser for the Python literal subset in .npy headers. Nesting is capped so a
/// hostile header cannot exhaust the stack.
fileprivate struct PythonLiteralParser {
    struct Failure: Error { var detail: String }

    private let bytes: [UInt8]
    private var position = 0
    private static let maximumDepth = 32

    init(bytes: [UInt8]) { self.bytes = bytes }

    /// `{key: value, ...}` followed only by whitespace (numpy's space padding and final newline).
    mutating func parseHeaderDictionary() throws(Failure) -> [(String, PythonLiteral)] {
        skipWhitespace()
        try expect(UInt8(ascii: "{"))
        var entries: [(String, PythonLiteral)] = []
        while true {
            skipWhitespace()
            if consume(UInt8(ascii: "}")) { break }
            guard case .string(let key) = try parseValue(depth: 1) else {
                throw Failure(detail: "dict keys must be strings")
            }
            skipWhitespace()
            try expect(UInt8(ascii: ":"))
            let value = try parseValue(depth: 1)
            if entries.contains(where: { $0.0 == key }) { throw Failure(detail: "key '\(abbreviated(key))' appears twice") }
            entries.append((key, value))
            skipWhitespace()
            if consume(UInt8(ascii: ",")) { continue }
            try expect(UInt8(ascii: "}"))
            break
        }
        skipWhitespace()
        guard position == bytes.count else { throw Failure(detail: "unexpected characters after the closing '}'") }
        return entries
    }

    private mutating func parseValue(depth: Int) throws(Failure) -> PythonLiteral {
        guard depth <= Self.maximumDepth else { throw Failure(detail: "values nested too deeply") }
        skipWhitespace()
        guard position < bytes.count else { throw Failure(detail: "the header ends early") }
        switch bytes[position] {
        case UInt8(ascii: "'"), UInt8(ascii: "\""):
            return .string(try parseString())
        case UInt8(ascii: "("):
            position += 1
            let (items, endsWithComma) = try parseSequence(closing: UInt8(ascii: ")"), depth: depth)
            // `(x)` without a comma is just x in Python; the caller decides whether to accept it.
            return items.count == 1 && !endsWithComma ? items[0] : .tuple(items)
        case UInt8(ascii: "["):
            position += 1
            return .list(try parseSequence(closing: UInt8(ascii: "]"), depth: depth).items)
        case UInt8(ascii: "-"), UInt8(ascii: "0") ... UInt8(ascii: "9"):
            return .integer(try parseInteger())
        default:
            for (word, literal) in [("True", PythonLiteral.bool(true)), ("False", .bool(false)), ("None", .none)]
            where bytes[position...].starts(with: word.utf8) {
                position += word.utf8.count
                return literal
            }
            throw Failure(detail: "unexpected character '\(Character(Unicode.Scalar(bytes[position])))' at offset \(position)")
        }
    }

    /// Items up to and including `closing`, comma-separated, trailing comma allowed.
    private mutating func parseSequence(
        closing: UInt8, depth: Int
    ) throws(Failure) -> (items: [PythonLiteral], endsWithComma: Bool) {
        var items: [PythonLiteral] = []
        var endsWithComma = false
        while true {
            skipWhitespace()
            if consume(closing) { return (items, endsWithComma) }
            items.append(try parseValue(depth: depth + 1))
            skipWhitespace()
            endsWithComma = consume(UInt8(ascii: ","))
            if endsWithComma { continue }
            try expect(closing)
            return (items, false)
        }
    }

    private mutating func parseString() throws(Failure) -> String {
        let quote = bytes[position]
        position += 1
        let start = position
        while position < bytes.count, bytes[position] != quote {
            guard bytes[position] != UInt8(ascii: "\\"), bytes[position] != UInt8(ascii: "\n") else {
                throw Failure(detail: "escapes and line breaks in strings are not supported")
            }
            position += 1
        }
        guard position < bytes.count else { throw Failure(detail: "a string is not closed") }
        let text = String(decoding: bytes[start ..< position], as: UTF8.self)
        position += 1
        return text
    }

    private mutating func parseInteger() throws(Failure) -> Int {
        let negative = consume(UInt8(ascii: "-"))
        let start = position
        var value = 0
        while position < bytes.count, case let digit = bytes[position], digit >= UInt8(ascii: "0"), digit <= UInt8(ascii: "9") {
            let (shifted, overflow1) = value.multipliedReportingOverflow(by: 10)
            let (sum, overflow2) = shifted.addingReportingOverflow(Int(digit - UInt8(ascii: "0")))
            guard !overflow1, !overflow2 else { throw Failure(detail: "an integer is too large") }
            value = sum
            position += 1
        }
        guard position > start else { throw Failure(detail: "'-' is not followed by digits") }
        return negative ? -value : value
    }

    private mutating func skipWhitespace() {
        while position < bytes.count, [UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\n"), UInt8(ascii: "\r")].contains(bytes[position]) {
            position += 1
        }
    }

    private mutating func consume(_ byte: UInt8) -> Bool {
        guard position < bytes.count, bytes[position] == byte else { return false }
        position += 1
        return true
    }

    private mutating func expect(_ byte: UInt8) throws(Failure) {
        guard consume(byte) else {
            let found = position < bytes.count ? "'\(Character(Unicode.Scalar(bytes[position])))'" : "the end of the header"
            throw Failure(detail: "expected '\(Character(Unicode.Scalar(byte)))' at offset \(position), found \(found)")
        }
    }
}

// MARK: - Writer

public enum NpyWriter {
    /// Writes a 1-D .npy file exactly as `np.save(path, np.array(tokens, dtype=...))` would (format 1.0).
    /// Atomic like `SafetensorsWriter.write`. Throws `.invalidData`, before touching the disk, if a value
    /// does not fit `dtype`.
    public static func write(tokens: [Int64], dtype: TokenDType, to path: String) throws {
        let range = dtype.valueRange
        if let index = tokens.firstIndex(where: { !range.contains($0) }) {
            throw ReLoRAError.invalidData("token \(tokens[index]) at index \(index) does not fit \(dtype.rawValue) (\(range.lowerBound)...\(range.upperBound)); choose a wider dtype for \(path)")
        }
        let header = NpyHeader.encoded(dtype: dtype, count: tokens.count)
        var data = [UInt8](repeating: 0, count: tokens.count * dtype.byteSize)
        data.withUnsafeMutableBytes { destination in
            func store<T: FixedWidthInteger>(_: T.Type) {
                for (i, token) in tokens.enumerated() {
                    destination.storeBytes(of: T(truncatingIfNeeded: token).littleEndian, toByteOffset: i * MemoryLayout<T>.size, as: T.self)
                }
            }
            switch dtype {
            case .uint16: store(UInt16.self)
            case .uint32: store(UInt32.self)
            case .int32: store(Int32.self)
            case .int64: store(Int64.self)
            }
        }
        try AtomicFileWriter.write(to: path) { sink in
            try header.withUnsafeBytes { try sink.write($0) }
            try data.withUnsafeBytes { try sink.write($0) }
        }
    }
}

/// Shortens untrusted text before it goes into an error message.
private func abbreviated(_ text: String, limit: Int = 40) -> String {
    text.count <= limit ? text : String(text.prefix(limit)) + "..."
}
