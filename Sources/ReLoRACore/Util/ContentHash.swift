import Foundation

/// A fast 64-bit content checksum for detecting corrupted or truncated checkpoint files (not a
/// cryptographic hash). Mixes 8-byte little-endian words with a multiply-rotate step and the length;
/// any single changed, missing or extra byte changes it with overwhelming probability.
public func contentHash64(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
    var h: UInt64 = 0x9E3779B97F4A7C15 ^ UInt64(bytes.count)
    let words = bytes.count / 8
    for i in 0..<words {
        let w = bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)
        h = (h ^ (w &* 0xBF58476D1CE4E5B9)).rotatedLeft(by: 27) &* 0x94D049BB133111EB
    }
    var tail: UInt64 = 0
    for i in (words * 8)..<bytes.count { tail = tail << 8 | UInt64(bytes[i]) }
    h = (h ^ (tail &* 0xBF58476D1CE4E5B9)).rotatedLeft(by: 27) &* 0x94D049BB133111EB
    h ^= h >> 31
    return h
}

extension UInt64 {
    @inline(__always) func rotatedLeft(by k: UInt64) -> UInt64 { (self << k) | (self >> (64 - k)) }
}

/// Hex form of `contentHash64` of a file's bytes, or nil if it cannot be read.
public func contentHashOfFile(_ path: String) -> String? {
    guard let data = try? Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped) else { return nil }
    let h = data.withUnsafeBytes { contentHash64($0) }
    return String(h, radix: 16)
}
