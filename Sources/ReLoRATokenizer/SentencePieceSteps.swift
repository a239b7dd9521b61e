import ReLoRACore

/// SentencePiece's normalizer (`normalizer.cc`, `Normalizer::Normalize`) on a whole text, as UTF-8 bytes:
/// at each position the longest user-defined piece is kept as is, else the longest charsmap key is
/// replaced (no charsmap: the identity rule), else one character is kept; with
/// `remove_extra_whitespaces`, leading spaces are skipped, a replacement's leading spaces are dropped
/// after a space, and trailing spaces are removed; `add_dummy_prefix` puts one space first;
/// `escape_whitespaces` writes every space as "▁". (Only U+0020 counts as a space here: tabs and newlines
/// are spaces only when the charsmap maps them to one.)
struct SPMNormalizer: Sendable {
    var charsMap: CharsMap? = nil
    var userDefined = PieceTrie()
    var addDummyPrefix = true
    var removeExtraWhitespaces = true
    var escapeWhitespaces = true

    /// The replacement of the text's prefix at `i` and how many bytes it consumes.
    func prefix(_ s: [UInt8], _ i: Int) -> (ArraySlice<UInt8>, Int) {
        if !userDefined.isEmpty, let m = userDefined.longestMatch(s, from: i) { return (s[i..<(i + m)], m) }
        if let cm = charsMap {
            let hit = s.withUnsafeBufferPointer { cm.longest($0, from: i, to: $0.count) }
            if let (length, r) = hit { return (r, length) }
        }
        let length = min(SentencePieceTokenizer.charLength(s[i]), s.count - i)
        return (s[i..<(i + length)], length)
    }

    func normalize(_ input: UnsafeBufferPointer<UInt8>) -> [UInt8] {
        let s = Array(input)
        let n = s.count
        var out = [UInt8]()
        out.reserveCapacity(n + n / 4 + 3)
        let space = escapeWhitespaces ? SentencePieceTokenizer.space : [0x20]
        var i = 0
        if removeExtraWhitespaces {
            while i < n {
                let (r, length) = prefix(s, i)
                guard r.count == 1 && r.first == 0x20 else { break }
                i += length
            }
        }
        guard i < n else { return [] }
        if addDummyPrefix { out += space }
        var previousSpace = removeExtraWhitespaces
        while i < n {
            let (r, length) = prefix(s, i)
            var sp = r
            while previousSpace && sp.first == 0x20 { sp = sp.dropFirst() }
            if !sp.isEmpty {
                for b in sp {
                    if escapeWhitespaces && b == 0x20 { out += space } else { out.append(b) }
                }
                previousSpace = sp.last == 0x20
            }
            i += length
            if !removeExtraWhitespaces { previousSpace = false }
        }
        if removeExtraWhitespaces {
            while out.count >= space.count && out[(out.count - space.count)...].elementsEqual(space) {
                out.removeLast(space.count)
            }
        }
        return out
    }
}

/// A normalizer of a `tokenizer.json`, applied to each text segment between added tokens.
enum NormalizerStep: Sendable {
    /// `Precompiled` (see `CharsMap.normalizeLikeTokenizers`).
    case precompiled(CharsMap)
    /// `Prepend`: the string before a non-empty text.
    case prepend([UInt8])
    /// `Replace` with a literal pattern.
    case replace([UInt8], [UInt8])
    /// `Replace` with the regex `\A +| +\z` (transformers' SentencePiece converter): spaces at either end.
    case replaceEdgeSpaces([UInt8])
    /// `Replace` with the regex ` {2,}`: each run of two or more spaces.
    case replaceSpaceRuns([UInt8])
    /// `Replace` with the regex `\A` followed by a literal: that literal at the start only.
    case replaceAtStart([UInt8], [UInt8])
    /// `Strip`: White_Space characters at the start and/or the end.
    case strip(left: Bool, right: Bool)

    static func apply(_ steps: [NormalizerStep], _ text: [UInt8]) -> [UInt8] {
        var t = text
        for step in steps { t = step.apply(t) }
        return t
    }

    func apply(_ t: [UInt8]) -> [UInt8] {
        switch self {
        case .precompiled(let map):
            return map.normalizeLikeTokenizers(t)
        case .prepend(let p):
            return t.isEmpty ? t : p + t
        case .replace(let pattern, let content):
            return SentencePieceTokenizer.replace(t, pattern, with: content)
        case .replaceEdgeSpaces(let content):
            guard !t.isEmpty else { return t }
            var lo = 0, hi = t.count
            while lo < hi && t[lo] == 0x20 { lo += 1 }
            if lo == hi { return content }  // all spaces: one match
            while hi > lo && t[hi - 1] == 0x20 { hi -= 1 }
            return (lo > 0 ? content : []) + t[lo..<hi] + (hi < t.count ? content : [])
        case .replaceSpaceRuns(let content):
            var out = [UInt8]()
            out.reserveCapacity(t.count)
            var i = 0
            while i < t.count {
                if t[i] == 0x20 {
                    var j = i
                    while j < t.count && t[j] == 0x20 { j += 1 }
                    if j - i >= 2 { out += content } else { out.append(0x20) }
                    i = j
                } else {
                    out.append(t[i])
                    i += 1
                }
            }
            return out
        case .replaceAtStart(let literal, let content):
            return t.starts(with: literal) ? content + t[literal.count...] : t
        case .strip(let left, let right):
            let scalars = Array(String(decoding: t, as: UTF8.self).unicodeScalars)
            var lo = 0, hi = scalars.count
            if left { while lo < hi && scalars[lo].properties.isWhitespace { lo += 1 } }
            if right { while hi > lo && scalars[hi - 1].properties.isWhitespace { hi -= 1 } }
            var view = String.UnicodeScalarView()
            view.append(contentsOf: scalars[lo..<hi])
            return Array(String(view).utf8)
        }
    }
}

/// A piece of pre-tokenization: its bytes and whether it starts at offset 0 of the original text (what
/// Metaspace's `prepend_scheme: first` asks).
struct PieceSP {
    var bytes: [UInt8]
    var atOrigin: Bool
}

enum PrependScheme: String, Sendable { case always, first, never }

/// A pre-tokenizer of a `tokenizer.json` (the steps of a `Sequence` run in order on every piece).
enum PreTokenizerStepSP: Sendable {
    /// `Metaspace`: spaces become the replacement; the replacement is prepended (to every piece, to the
    /// one at the text's start, or never) unless the piece starts with it; with `split`, a new piece
    /// starts at every replacement (the replacement goes with what follows).
    case metaspace(replacement: [UInt8], scheme: PrependScheme, split: Bool)
    /// `WhitespaceSplit`: pieces are the runs of non-White_Space characters.
    case whitespaceSplit
    /// `Split` with a regex that is an alternation of literals, behavior Isolated: each match is a piece
    /// (the first alternative that matches at a position wins, as in the regex).
    case splitLiterals([[UInt8]])

    func apply(_ pieces: [PieceSP]) -> [PieceSP] {
        var out: [PieceSP] = []
        for p in pieces { apply(p, &out) }
        return out
    }

    private func apply(_ p: PieceSP, _ out: inout [PieceSP]) {
        switch self {
        case .metaspace(let replacement, let scheme, let split):
            var t = SentencePieceTokenizer.replace(p.bytes, [0x20], with: replacement)
            let prepend = scheme == .always || (scheme == .first && p.atOrigin)
            if prepend && !t.isEmpty && !t.starts(with: replacement) { t = replacement + t }  // as NormalizedString.prepend: not to ""
            guard split, !replacement.isEmpty else {
                out.append(PieceSP(bytes: t, atOrigin: p.atOrigin))
                return
            }
            var start = 0
            var i = 1
            while i < t.count {
                if t[i] == replacement[0], i + replacement.count <= t.count, t[i..<(i + replacement.count)].elementsEqual(replacement) {
                    out.append(PieceSP(bytes: Array(t[start..<i]), atOrigin: p.atOrigin && start == 0))
                    start = i
                    i += replacement.count
                } else {
                    i += 1
                }
            }
            if start < t.count { out.append(PieceSP(bytes: Array(t[start...]), atOrigin: p.atOrigin && start == 0)) }
        case .whitespaceSplit:
            let text = String(decoding: p.bytes, as: UTF8.self)
            var current = [UInt8]()
            var offset = 0, currentStart = 0
            for u in text.unicodeScalars {
                let length = String(u).utf8.count
                if u.properties.isWhitespace {
                    if !current.isEmpty { out.append(PieceSP(bytes: current, atOrigin: p.atOrigin && currentStart == 0)) }
                    current = []
                    currentStart = offset + length
                } else {
                    current += String(u).utf8
                }
                offset += length
            }
            if !current.isEmpty { out.append(PieceSP(bytes: current, atOrigin: p.atOrigin && currentStart == 0)) }
        case .splitLiterals(let literals):
            let t = p.bytes
            var start = 0, i = 0
            while i < t.count {
                if let hit = literals.first(where: { !$0.isEmpty && i + $0.count <= t.count && t[i..<(i + $0.count)].elementsEqual($0) }) {
                    if start < i { out.append(PieceSP(bytes: Array(t[start..<i]), atOrigin: p.atOrigin && start == 0)) }
                    out.append(PieceSP(bytes: hit, atOrigin: p.atOrigin && i == 0))
                    i += hit.count
                    start = i
                } else {
                    i += SentencePieceTokenizer.charLength(t[i])
                }
            }
            if start < t.count { out.append(PieceSP(bytes: Array(t[start...]), atOrigin: p.atOrigin && start == 0)) }
        }
    }
}

/// A decoder of a `tokenizer.json`: each maps the list of token strings to a new list.
enum DecoderStep: Sendable {
    /// `Replace` with a literal pattern, in each token.
    case replace([UInt8], [UInt8])
    /// `ByteFallback`: each run of `<0xNN>` tokens becomes one token of its bytes, or, when they are not
    /// valid UTF-8, one U+FFFD per byte.
    case byteFallback
    /// `Fuse`: all tokens into one.
    case fuse
    /// `Strip`: up to `start` leading and `stop` trailing characters equal to `content`, in each token.
    case strip(content: Unicode.Scalar, start: Int, stop: Int)
    /// `Metaspace`: the replacement becomes a space, except in the first token when a prefix was
    /// prepended (`prepend_scheme` not `never`), where it is removed.
    case metaspace(replacement: Unicode.Scalar, dropInFirst: Bool)

    func apply(_ tokens: [[UInt8]]) -> [[UInt8]] {
        switch self {
        case .replace(let pattern, let content):
            return tokens.map { SentencePieceTokenizer.replace($0, pattern, with: content) }
        case .byteFallback:
            var out: [[UInt8]] = []
            var pending: [UInt8] = []
            func flush() {
                guard !pending.isEmpty else { return }
                if String(validating: pending, as: UTF8.self) != nil {
                    out.append(pending)
                } else {
                    for _ in pending { out.append(Array("\u{FFFD}".utf8)) }
                }
                pending.removeAll()
            }
            for t in tokens {
                if let b = SentencePieceTokenizer.byteValue(String(decoding: t, as: UTF8.self)) {
                    pending.append(b)
                } else {
                    flush()
                    out.append(t)
                }
            }
            flush()
            return out
        case .fuse:
            return [tokens.flatMap { $0 }]
        case .strip(let content, let start, let stop):
            return tokens.map { t in
                let scalars = Array(String(decoding: t, as: UTF8.self).unicodeScalars)
                var lo = 0
                while lo < min(start, scalars.count) && scalars[lo] == content { lo += 1 }
                var hi = scalars.count
                var k = 0
                while k < stop && hi > lo && scalars[hi - 1] == content { hi -= 1; k += 1 }
                var view = String.UnicodeScalarView()
                view.append(contentsOf: scalars[lo..<hi])
                return Array(String(view).utf8)
            }
        case .metaspace(let replacement, let dropInFirst):
            return tokens.enumerated().map { i, t in
                var view = String.UnicodeScalarView()
                for u in String(decoding: t, as: UTF8.self).unicodeScalars {
                    if u == replacement {
                        if !(i == 0 && dropInFirst) { view.append(" ") }
                    } else {
                        view.append(u)
                    }
                }
                return Array(String(view).utf8)
            }
        }
    }
}
