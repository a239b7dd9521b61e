import ReLoRACore
import ReLoRAFormats
/// Pre-tokenization: the regex splits of GPT-2 and LLaMA-3, written out by hand (a regex engine is far
/// slower) and checked against Hugging Face `tokenizers` (Oniguruma) by the fixture tests.
///
/// Both patterns are alternations tried in order at the current position; every scalar is matched by
/// some alternative, so the pieces tile the input. Classes follow Oniguruma's Unicode definitions:
/// `\p{L}` = General_Category L*, `\p{N}` = N*, `\s` = White_Space (Swift's `properties.isWhitespace`).
enum SplitPattern: Sendable, Equatable {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    case gpt2
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    case llama3

    /// The regex exactly as `tokenizer.json` spells it (after JSON unescaping).
    var regex: String {
        switch self {
        case .gpt2:
            return #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
        case .llama3:
            return #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
        }
    }

    init?(regex: String) {
        if regex == SplitPattern.gpt2.regex { self = .gpt2 }
        else if regex == SplitPattern.llama3.regex { self = .llama3 }
        else { return nil }
    }

    /// Calls `emit(start, end)` for each piece of `s[lo..<hi]`, in order; the pieces tile the range.
    /// The range is matched as a whole string of its own (lookaheads stop at `hi`).
    func split(_ s: UnsafeBufferPointer<UInt32>, _ lo: Int, _ hi: Int, _ emit: (Int, Int) -> Void) {
        switch self {
        case .gpt2: PreTokenizer.splitGPT2(s, lo, hi, emit)
        case .llama3: PreTokenizer.splitLlama3(s, lo, hi, emit)
        }
    }
}

/// One step of a pre-tokenizer pipeline, as in `tokenizer.json`: a `Split` by a known pattern
/// (behavior Isolated) or the final `ByteLevel` step. HF applies `ByteLevel`'s `add_prefix_space` to every
/// piece it receives (prepending " " to each piece that does not start with one), then, with `use_regex`,
/// splits each piece by the GPT-2 pattern.
enum PreTokenizerStep: Sendable, Equatable {
    case split(SplitPattern)
    case byteLevel(addPrefixSpace: Bool, useRegex: Bool)
}

enum PreTokenizer {
    // Character classes of `\p{L}`, `\p{N}`, `\s`; everything else is "other" ([^\s\p{L}\p{N}]).
    static let other: UInt8 = 0, letter: UInt8 = 1, number: UInt8 = 2, space: UInt8 = 3

    /// Classes of the Basic Multilingual Plane, computed once (65,536 property lookups, a few ms);
    /// scalars above it are classified on the fly.
    static let bmpClasses: [UInt8] = {
        var table = [UInt8](repeating: 0, count: 0x10000)
        for v in 0..<0x10000 {
            guard let u = Unicode.Scalar(UInt32(v)) else { continue }  // surrogates: never decoded
            table[v] = computeClass(u)
        }
        return table
    }()

    static func computeClass(_ u: Unicode.Scalar) -> UInt8 {
        let p = u.properties
        if p.isWhitespace { return space }
        switch p.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return letter
        case .decimalNumber, .letterNumber, .otherNumber: return number
        default: return other
        }
    }

    @inline(__always)
    static func cls(_ v: UInt32, _ table: UnsafeBufferPointer<UInt8>) -> UInt8 {
        if v < 0x10000 { return table[Int(v)] }
        guard let u = Unicode.Scalar(v) else { return other }
        return computeClass(u)
    }

    @inline(__always) static func isCRLF(_ v: UInt32) -> Bool { v == 0x0A || v == 0x0D }

    /// End of a chunk of UTF-8 text that starts at `from`, for processing long texts piecewise: just after
    /// the first "\n" at or after `from + target` whose neighbours are printable ASCII (0x21...0x7E), or
    /// the end of the buffer. Both patterns end a piece at such a newline and start a new one after it (no
    /// alternative crosses "\n" followed by a non-space), so splitting there gives the same pieces as not
    /// splitting (barring added tokens that contain a newline, and `add_prefix_space`, which applies per
    /// chunk). Only when no such newline exists within `limit` bytes, the chunk ends at the first scalar
    /// boundary after `from + limit` (which may split a piece differently; inputs without line breaks for
    /// a gigabyte are not text this is tuned for).
    static func chunkEnd(_ bytes: UnsafeBufferPointer<UInt8>, from: Int, target: Int, limit: Int) -> Int {
        let n = bytes.count
        if n - from <= target { return n }
        var p = max(from + target, from + 1)
        let stop = min(n - 1, from + limit)
        while p < stop {
            if bytes[p] == 0x0A && (0x21...0x7E).contains(bytes[p - 1]) && (0x21...0x7E).contains(bytes[p + 1]) {
                return p + 1
            }
            p += 1
        }
        if n - from <= limit { return n }
        p = from + limit
        while p < n && bytes[p] & 0xC0 == 0x80 { p += 1 }
        return p
    }

    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    static func splitGPT2(_ s: UnsafeBufferPointer<UInt32>, _ lo: Int, _ hi: Int, _ emit: (Int, Int) -> Void) {
        bmpClasses.withUnsafeBufferPointer { table in
            var i = lo
            while i < hi {
                let start = i
                let c = s[i]
                // 's|'t|'re|'ve|'m|'ll|'d (case-sensitive)
                if c == 0x27, let len = contraction(s, i, hi, caseInsensitive: false) {
                    i += len
                    emit(start, i)
                    continue
                }
                var k = cls(c, table)
                var j = i
                // The optional leading space of ` ?\p{L}+`, ` ?\p{N}+` and ` ?[^\s\p{L}\p{N}]+`.
                if c == 0x20, i + 1 < hi {
                    let next = cls(s[i + 1], table)
                    if next != space { k = next; j = i + 1 }
                }
                if k != space {
                    // A run of one class: letters, numbers, or "other".
                    j += 1
                    while j < hi && cls(s[j], table) == k { j += 1 }
                    i = j
                    emit(start, i)
                    continue
                }
                // Whitespace run s[i..<j].
                j = i + 1
                while j < hi && cls(s[j], table) == space { j += 1 }
                if j == hi || j - i == 1 {
                    // `\s+(?!\S)` takes the whole run at the end; a single whitespace before \S falls to `\s+`.
                    i = j
                } else {
                    // `\s+(?!\S)` backtracks by one so the last whitespace can prefix the next word.
                    i = j - 1
                }
                emit(start, i)
            }
        }
    }

    /// LLaMA-3 (cl100k-like): `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    static func splitLlama3(_ s: UnsafeBufferPointer<UInt32>, _ lo: Int, _ hi: Int, _ emit: (Int, Int) -> Void) {
        bmpClasses.withUnsafeBufferPointer { table in
            var i = lo
            while i < hi {
                let start = i
                let c = s[i]
                if c == 0x27, let len = contraction(s, i, hi, caseInsensitive: true) {
                    i += len
                    emit(start, i)
                    continue
                }
                let k = cls(c, table)
                // [^\r\n\p{L}\p{N}]?\p{L}+
                if k == letter || (k != number && !isCRLF(c) && i + 1 < hi && cls(s[i + 1], table) == letter) {
                    var j = k == letter ? i + 1 : i + 2
                    while j < hi && cls(s[j], table) == letter { j += 1 }
                    i = j
                    emit(start, i)
                    continue
                }
                // \p{N}{1,3}
                if k == number {
                    var j = i + 1
                    while j < hi && j < i + 3 && cls(s[j], table) == number { j += 1 }
                    i = j
                    emit(start, i)
                    continue
                }
                //  ?[^\s\p{L}\p{N}]+[\r\n]*
                if k == other || (c == 0x20 && i + 1 < hi && cls(s[i + 1], table) == other) {
                    var j = k == other ? i + 1 : i + 2
                    while j < hi && cls(s[j], table) == other { j += 1 }
                    while j < hi && isCRLF(s[j]) { j += 1 }
                    i = j
                    emit(start, i)
                    continue
                }
                // Whitespace run s[i..<j].
                var j = i + 1
                var lastCRLF = isCRLF(c) ? i : -1
                while j < hi && cls(s[j], table) == space {
                    if isCRLF(s[j]) { lastCRLF = j }
                    j += 1
                }
                if lastCRLF >= 0 {
                    // \s*[\r\n]+ : greedy \s* backtracks to the last \r or \n of the run.
                    i = lastCRLF + 1
                } else if j == hi || j - i == 1 {
                    // \s+(?!\S) to the end, or \s+ for a single whitespace before \S.
                    i = j
                } else {
                    // \s+(?!\S) leaves the last whitespace to prefix what follows.
                    i = j - 1
                }
                emit(start, i)
            }
        }
    }

    /// Length (2 or 3) of a contraction `'s|'t|'re|'ve|'m|'ll|'d` starting at the apostrophe `s[i]`, or nil.
    /// Case-insensitively (LLaMA-3's `(?i:...)`), Oniguruma also folds U+017F LATIN SMALL LETTER LONG S
    /// to `s`; that one scalar is the only non-ASCII fold that can occur here (checked against HF).
    @inline(__always)
    static func contraction(_ s: UnsafeBufferPointer<UInt32>, _ i: Int, _ hi: Int, caseInsensitive: Bool) -> Int? {
        guard i + 1 < hi else { return nil }
        @inline(__always) func fold(_ v: UInt32) -> UInt32 {
            guard caseInsensitive else { return v }
            if v >= 0x41 && v <= 0x5A { return v + 0x20 }
            if v == 0x17F { return 0x73 }
            return v
        }
        let a = fold(s[i + 1])
        switch a {
        case 0x73, 0x74, 0x6D, 0x64: return 2  // s t m d
        case 0x72, 0x76:  // r v -> 're 've
            return i + 2 < hi && fold(s[i + 2]) == 0x65 ? 3 : nil
        case 0x6C:  // l -> 'll
            return i + 2 < hi && fold(s[i + 2]) == 0x6C ? 3 : nil
        default: return nil
        }
    }
}
