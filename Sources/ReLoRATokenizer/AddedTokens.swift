import ReLoRACore
import ReLoRAFormats
/// An entry of `tokenizer.json`'s `added_tokens`: a string matched literally in the input before
/// pre-tokenization (special tokens such as `<|endoftext|>` are added tokens with `special: true`).
struct AddedToken: Sendable, Equatable {
    var id: Int32
    var content: String
    var singleWord = false
    var lstrip = false
    var rstrip = false
    var normalized = false
    var special = true
}

/// Finds added tokens in text the way Hugging Face `tokenizers` does: scanning left to right, at each
/// position the longest token that starts there wins (Aho-Corasick leftmost-longest); `lstrip`/`rstrip`
/// also swallow the whitespace before/after the match; a `single_word` token whose match touches a
/// letter or digit on either side is dropped (that text then stays ordinary text).
struct AddedTokenMatcher: Sendable {
    let tokens: [AddedToken]
    let contents: [[UInt8]]
    /// Indices into `tokens` by first byte, longest content first.
    let byFirstByte: [[Int]]

    init(_ tokens: [AddedToken]) {
        self.tokens = tokens
        let contents = tokens.map { Array($0.content.utf8) }
        var table = [[Int]](repeating: [], count: 256)
        for (k, c) in contents.enumerated() where !c.isEmpty { table[Int(c[0])].append(k) }
        for b in 0..<256 { table[b].sort { contents[$0].count > contents[$1].count || (contents[$0].count == contents[$1].count && $0 < $1) } }
        self.contents = contents
        byFirstByte = table
    }

    var isEmpty: Bool { tokens.isEmpty }

    /// Splits the scalar range `lo..<hi` of a decoded text (`starts[i]` = byte offset of scalar `i`) into
    /// text ranges (`text(lo, hi)`, never empty) and matched tokens (`token(id)`), in order.
    func split(bytes: UnsafeBufferPointer<UInt8>, scalars: UnsafeBufferPointer<UInt32>, starts: UnsafeBufferPointer<Int32>,
               lo: Int, hi: Int, text: (Int, Int) -> Void, token: (Int32) -> Void) {
        if tokens.isEmpty {
            if lo < hi { text(lo, hi) }
            return
        }
        let endByte = Int(starts[hi])
        var segmentStart = lo  // start of the pending text
        var i = lo
        while i < hi {
            let b = Int(starts[i])
            let candidates = byFirstByte[Int(bytes[b])]
            var matched = -1
            if !candidates.isEmpty {
                for k in candidates {
                    let c = contents[k]
                    if b + c.count > endByte { continue }
                    var equal = true
                    for t in 1..<c.count where bytes[b + t] != c[t] { equal = false; break }
                    if equal { matched = k; break }
                }
            }
            if matched < 0 { i += 1; continue }
            // Scalar index just past the match.
            let matchEndByte = b + contents[matched].count
            var j = i + 1
            while j < hi && Int(starts[j]) < matchEndByte { j += 1 }
            let t = tokens[matched]
            if t.singleWord {
                let before = i > lo && isWordScalar(scalars[i - 1])
                let after = j < hi && isWordScalar(scalars[j])
                if before || after { i = j; continue }
            }
            var start = i
            var stop = j
            if t.lstrip { while start > segmentStart && isSpaceScalar(scalars[start - 1]) { start -= 1 } }
            if t.rstrip { while stop < hi && isSpaceScalar(scalars[stop]) { stop += 1 } }
            if segmentStart < start { text(segmentStart, start) }
            token(t.id)
            segmentStart = stop
            i = stop
        }
        if segmentStart < hi { text(segmentStart, hi) }
    }

    private func isWordScalar(_ v: UInt32) -> Bool {
        let c = PreTokenizer.bmpClasses.withUnsafeBufferPointer { PreTokenizer.cls(v, $0) }
        return c == PreTokenizer.letter || c == PreTokenizer.number
    }

    private func isSpaceScalar(_ v: UInt32) -> Bool {
        PreTokenizer.bmpClasses.withUnsafeBufferPointer { PreTokenizer.cls(v, $0) } == PreTokenizer.space
    }
}
