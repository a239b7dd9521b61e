import ReLoRACore
import ReLoRAFormats
/// GPT-2's byte-level alphabet: every byte value maps to one printable Unicode scalar, so a token (a byte
/// string) can be written as a JSON string in `tokenizer.json`. Printable Latin-1 bytes (`!`..`~`,
/// `¡`..`¬`, `®`..`ÿ`) map to themselves; the other 68 bytes map, in increasing byte order, to
/// U+0100, U+0101, ... (so the space 0x20 becomes `Ġ` U+0120 and the newline 0x0A becomes `Ċ` U+010A).
/// This is `bytes_to_unicode()` from GPT-2's `encoder.py`, which Hugging Face `tokenizers` also uses.
enum ByteLevel {
    /// byte -> scalar value.
    static let byteToScalar: [UInt32] = {
        var table = [UInt32](repeating: 0, count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            if printable {
                table[b] = UInt32(b)
            } else {
                table[b] = next
                next += 1
            }
        }
        return table
    }()

    /// scalar value -> byte, or -1; indexed by scalar values below `scalarToByte.count` (0x144).
    static let scalarToByte: [Int16] = {
        var table = [Int16](repeating: -1, count: 256 + 68)
        for (b, s) in byteToScalar.enumerated() { table[Int(s)] = Int16(b) }
        return table
    }()

    /// The byte-level spelling of a byte string (a vocabulary key).
    static func string(_ bytes: some Sequence<UInt8>) -> String {
        var s = String.UnicodeScalarView()
        for b in bytes { s.append(Unicode.Scalar(byteToScalar[Int(b)])!) }
        return String(s)
    }

    /// The bytes a byte-level string stands for, or nil when it holds a scalar outside the alphabet.
    static func bytes(_ string: String) -> [UInt8]? {
        var out = [UInt8]()
        out.reserveCapacity(string.unicodeScalars.count)
        for u in string.unicodeScalars {
            let v = Int(u.value)
            guard v < scalarToByte.count, scalarToByte[v] >= 0 else { return nil }
            out.append(UInt8(scalarToByte[v]))
        }
        return out
    }
}

/// UTF-8 decoding into scalar values, strict as Swift's `String(validating:)`: rejects overlong forms,
/// surrogates, values above U+10FFFF, stray continuation bytes and truncated sequences.
enum UTF8Scan {
    /// Decodes `bytes` into `scalars` (one value per scalar) and `starts` (the byte offset of each scalar,
    /// plus one final entry equal to `bytes.count`). Returns the byte offset of the first invalid sequence,
    /// or nil when the input is valid.
    static func decode(_ bytes: UnsafeBufferPointer<UInt8>, scalars: inout [UInt32], starts: inout [Int32]) -> Int? {
        scalars.removeAll(keepingCapacity: true)
        starts.removeAll(keepingCapacity: true)
        scalars.reserveCapacity(bytes.count)
        starts.reserveCapacity(bytes.count + 1)
        let n = bytes.count
        var i = 0
        while i < n {
            let b0 = bytes[i]
            if b0 < 0x80 {
                scalars.append(UInt32(b0))
                starts.append(Int32(truncatingIfNeeded: i))
                i += 1
                continue
            }
            guard let (value, length) = decodeMultibyte(bytes, at: i) else { return i }
            scalars.append(value)
            starts.append(Int32(truncatingIfNeeded: i))
            i += length
        }
        starts.append(Int32(truncatingIfNeeded: n))
        return nil
    }

    /// Offset of the first invalid sequence in `bytes`, or nil when all of it is valid UTF-8.
    static func firstInvalidOffset(_ bytes: UnsafeBufferPointer<UInt8>) -> Int? {
        var i = 0
        let n = bytes.count
        while i < n {
            if bytes[i] < 0x80 { i += 1; continue }
            guard let (_, length) = decodeMultibyte(bytes, at: i) else { return i }
            i += length
        }
        return nil
    }

    @inline(__always)
    static func decodeMultibyte(_ bytes: UnsafeBufferPointer<UInt8>, at i: Int) -> (UInt32, Int)? {
        let n = bytes.count
        let b0 = bytes[i]
        @inline(__always) func cont(_ k: Int) -> UInt32? {
            guard i + k < n else { return nil }
            let b = bytes[i + k]
            return b & 0xC0 == 0x80 ? UInt32(b & 0x3F) : nil
        }
        switch b0 {
        case 0xC2...0xDF:
            guard let c1 = cont(1) else { return nil }
            return ((UInt32(b0 & 0x1F) << 6) | c1, 2)
        case 0xE0...0xEF:
            guard let c1 = cont(1), let c2 = cont(2) else { return nil }
            let v = (UInt32(b0 & 0x0F) << 12) | (c1 << 6) | c2
            guard v >= 0x800, !(0xD800...0xDFFF).contains(v) else { return nil }
            return (v, 3)
        case 0xF0...0xF4:
            guard let c1 = cont(1), let c2 = cont(2), let c3 = cont(3) else { return nil }
            let v = (UInt32(b0 & 0x07) << 18) | (c1 << 12) | (c2 << 6) | c3
            guard v >= 0x10000, v <= 0x10FFFF else { return nil }
            return (v, 4)
        default:
            return nil
        }
    }
}
