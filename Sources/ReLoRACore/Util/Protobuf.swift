/// The few pieces of the protocol buffers wire format that the TensorBoard event writer needs
/// (https://protobuf.dev/programming-guides/encoding/): a field key is `(number << 3) | wireType`, then
/// a varint (type 0), 8 little-endian bytes (type 1), a varint length and the bytes (type 2), or 4
/// little-endian bytes (type 5). No schema, no reflection: messages are built field by field.
public struct ProtobufWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public enum WireType: UInt8, Sendable { case varint = 0, fixed64 = 1, lengthDelimited = 2, fixed32 = 5 }

    mutating func key(_ field: Int, _ type: WireType) { varint(UInt64(field) << 3 | UInt64(type.rawValue)) }

    /// Base-128, least significant group first, high bit set on every byte but the last.
    public mutating func varint(_ value: UInt64) {
        var v = value
        while v >= 0x80 {
            bytes.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    /// `int64` field: negative values are sign-extended to 10 bytes, as protobuf does.
    public mutating func int64(_ field: Int, _ value: Int64) {
        key(field, .varint); varint(UInt64(bitPattern: value))
    }

    public mutating func double(_ field: Int, _ value: Double) {
        key(field, .fixed64)
        withUnsafeBytes(of: value.bitPattern.littleEndian) { bytes += $0 }
    }

    public mutating func float(_ field: Int, _ value: Float) {
        key(field, .fixed32)
        withUnsafeBytes(of: value.bitPattern.littleEndian) { bytes += $0 }
    }

    public mutating func data(_ field: Int, _ value: [UInt8]) {
        key(field, .lengthDelimited); varint(UInt64(value.count)); bytes += value
    }

    public mutating func string(_ field: Int, _ value: String) { data(field, Array(value.utf8)) }

    public mutating func message(_ field: Int, _ value: ProtobufWriter) { data(field, value.bytes) }
}

/// Reads the fields of one message back (tests, `TensorBoardEventFile`, SentencePiece's `tokenizer.model`).
/// Unknown wire types (groups, 6, 7), truncated fields, varints over 10 bytes and lengths past the end are
/// `ReLoRAError.invalidData` with one sentence; hostile input never traps.
public struct ProtobufReader {
    public enum Value: Equatable, Sendable {
        case varint(UInt64)
        case fixed64(UInt64)
        case bytes([UInt8])
        case fixed32(UInt32)

        public var double: Double? { if case .fixed64(let b) = self { return Double(bitPattern: b) }; return nil }
        public var float: Float? { if case .fixed32(let b) = self { return Float(bitPattern: b) }; return nil }
        public var int64: Int64? { if case .varint(let v) = self { return Int64(bitPattern: v) }; return nil }
        public var data: [UInt8]? { if case .bytes(let b) = self { return b }; return nil }
        public var string: String? { data.map { String(decoding: $0, as: UTF8.self) } }
    }

    /// Every (field number, value) of `bytes`, in order.
    public static func fields(_ bytes: [UInt8]) throws -> [(field: Int, value: Value)] {
        var out: [(Int, Value)] = []
        var i = 0
        func varint() throws -> UInt64 {
            var v: UInt64 = 0, shift: UInt64 = 0
            while true {
                guard i < bytes.count else { throw ReLoRAError.invalidData("truncated protobuf varint at byte \(i)") }
                guard shift < 64 else { throw ReLoRAError.invalidData("protobuf varint longer than 10 bytes at byte \(i)") }
                let b = bytes[i]; i += 1
                v |= UInt64(b & 0x7F) << shift
                if b & 0x80 == 0 { return v }
                shift += 7
            }
        }
        func fixed(_ n: Int) throws -> UInt64 {
            guard i + n <= bytes.count else { throw ReLoRAError.invalidData("truncated protobuf fixed\(n * 8) field") }
            var v: UInt64 = 0
            for k in 0..<n { v |= UInt64(bytes[i + k]) << (8 * UInt64(k)) }
            i += n
            return v
        }
        while i < bytes.count {
            let key = try varint()
            let field = Int(key >> 3)
            switch key & 7 {
            case 0: out.append((field, .varint(try varint())))
            case 1: out.append((field, .fixed64(try fixed(8))))
            case 2:
                let length = try varint()
                // Compared as UInt64 first: a hostile length near 2^64 must not trap in Int(_:) or overflow i + n.
                guard length <= UInt64(bytes.count - i) else {
                    throw ReLoRAError.invalidData("protobuf field \(field) claims \(length) bytes but only \(bytes.count - i) remain")
                }
                let n = Int(length)
                out.append((field, .bytes(Array(bytes[i..<(i + n)])))); i += n
            case 5: out.append((field, .fixed32(UInt32(try fixed(4)))))
            default: throw ReLoRAError.invalidData("unsupported protobuf wire type \(key & 7) (field \(field))")
            }
        }
        return out
    }
}
