import ReLoRACore

/// SentencePiece's precompiled normalization map (`NormalizerSpec.precompiled_charsmap`, and the
/// `Precompiled` normalizer of a `tokenizer.json`): a darts-clone double-array trie over UTF-8 byte
/// strings whose values are offsets into a blob of NUL-terminated replacement strings.
///
/// Blob layout: `trie_size` (u32 little-endian, bytes) | trie units (`trie_size / 4` u32) | replacements.
/// A unit packs (darts-clone `DoubleArrayUnit`): bit 8 = has a leaf, bits 0-7 plus bit 31 = the label,
/// bits 10... = the offset to the children (shifted left by 8 more when bit 9 is set), and for a leaf
/// unit bits 0-30 = the value.
///
/// Every index is bounds-checked: a malformed trie (a fuzzed file) gives no match, never a crash.
struct CharsMap: Sendable {
    let units: [UInt32]
    let replacements: [UInt8]

    struct Malformed: Error { let reason: String }

    /// Throws `Malformed` with a reason when the blob is too short for its own trie size.
    static func parse(_ blob: [UInt8]) throws -> CharsMap {
        guard blob.count >= 4 else { throw Malformed(reason: "the precompiled charsmap has \(blob.count) bytes, fewer than its 4-byte header") }
        let size = Int(UInt32(blob[0]) | UInt32(blob[1]) << 8 | UInt32(blob[2]) << 16 | UInt32(blob[3]) << 24)
        guard size % 4 == 0, size <= blob.count - 4 else {
            throw Malformed(reason: "the precompiled charsmap's trie size \(size) does not fit its \(blob.count - 4) bytes (or is not a multiple of 4)")
        }
        var units = [UInt32](repeating: 0, count: size / 4)
        for k in 0..<units.count {
            let o = 4 + 4 * k
            units[k] = UInt32(blob[o]) | UInt32(blob[o + 1]) << 8 | UInt32(blob[o + 2]) << 16 | UInt32(blob[o + 3]) << 24
        }
        return CharsMap(units: units, replacements: Array(blob[(4 + size)...]))
    }

    /// Calls `body(length, value)` for every key in the trie that is a prefix of `key[from..<to]`, shortest first.
    func prefixMatches(_ key: UnsafeBufferPointer<UInt8>, from: Int, to: Int, _ body: (Int, Int) -> Void) {
        guard !units.isEmpty else { return }
        @inline(__always) func offset(_ u: UInt32) -> Int { Int((u >> 10) << ((u & (1 << 9)) >> 6)) }
        var node = offset(units[0])
        var i = from
        while i < to {
            let b = key[i]
            node ^= Int(b)
            guard node >= 0, node < units.count else { return }
            let unit = units[node]
            guard unit & (0x8000_0000 | 0xFF) == UInt32(b) else { return }
            node ^= offset(unit)
            guard node >= 0, node < units.count else { return }
            if (unit >> 8) & 1 == 1 { body(i + 1 - from, Int(units[node] & 0x7FFF_FFFF)) }
            i += 1
        }
    }

    /// The NUL-terminated replacement at `value` (to the end of the blob when unterminated), nil when out of range.
    func replacement(_ value: Int) -> ArraySlice<UInt8>? {
        guard value >= 0, value < replacements.count else { return nil }
        var end = value
        while end < replacements.count && replacements[end] != 0 { end += 1 }
        return replacements[value..<end]
    }

    /// SentencePiece's rule (`Normalizer::NormalizePrefix`): the longest key that prefixes the text.
    func longest(_ key: UnsafeBufferPointer<UInt8>, from: Int, to: Int) -> (length: Int, replacement: ArraySlice<UInt8>)? {
        var best: (Int, Int)? = nil
        prefixMatches(key, from: from, to: to) { length, value in
            if best == nil || length > best!.0 { best = (length, value) }
        }
        guard let (length, value) = best, let r = replacement(value) else { return nil }
        return (length, r)
    }

    /// `tokenizers`' `Precompiled` normalizer (spm_precompiled `normalize_string`), which differs from
    /// SentencePiece's: per grapheme cluster, a cluster of under 6 bytes with any key prefixing it is
    /// replaced whole by the *shortest* such key's replacement; otherwise each scalar of the cluster is
    /// replaced by the shortest key prefixing that scalar, or kept.
    func normalizeLikeTokenizers(_ bytes: [UInt8]) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(bytes.count)
        let text = String(decoding: bytes, as: UTF8.self)
        func firstMatch(_ part: [UInt8]) -> ArraySlice<UInt8>? {
            var value: Int? = nil
            part.withUnsafeBufferPointer { p in
                prefixMatches(p, from: 0, to: p.count) { _, v in if value == nil { value = v } }
            }
            return value.flatMap { replacement($0) }
        }
        for grapheme in text {
            let g = Array(grapheme.utf8)
            if g.count < 6, let r = firstMatch(g) {
                out += r
                continue
            }
            for scalar in grapheme.unicodeScalars {
                let part = Array(String(scalar).utf8)
                if let r = firstMatch(part) { out += r } else { out += part }
            }
        }
        return out
    }
}
