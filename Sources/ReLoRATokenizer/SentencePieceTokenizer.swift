import Foundation
import ReLoRACore
import ReLoRAFormats

/// SentencePiece-style tokenizers: pieces over text whose spaces are written "▁" (U+2581), a model that
/// is either Unigram (Viterbi over piece scores) or BPE, and byte fallback (`<0xNN>` pieces for what the
/// vocabulary cannot spell). Two sources with two sets of rules, each reproduced exactly:
///
/// - `.sentencePiece` rules, as the `sentencepiece` library applies them to a `tokenizer.model` (and as
///   llama.cpp to GGUF metadata of type `llama`): the whole text is normalized at once
///   (`SPMNormalizer`), Unigram scores are float32 with user-defined pieces favoured, BPE merges the pair
///   whose merged piece has the highest score, unknown runs fuse into one `<unk>` (or become bytes), and
///   decoding drops control pieces, writes unknown pieces as " ⁇ " and removes the dummy-prefix space.
/// - `.tokenizers` rules, as Hugging Face `tokenizers` applies a `tokenizer.json`: added tokens first,
///   then a normalizer chain, a pre-tokenizer chain, the model per piece (Unigram in float64, BPE by merge
///   rank), and a decoder chain.
///
/// A text is encoded at once (SentencePiece normalizes and segments a whole input; a Llama 2 `tokenizer.json`
/// has no pre-tokenizer, so a document is one BPE piece): the work arrays take ~20 bytes per input byte,
/// so give a huge corpus as many documents (files or JSONL lines), not one line-less text. Speed, debug
/// build, `relora tokenize` of 560 KB of Shakespeare, process start included: 0.6 s (`unigram.json`,
/// pieces cached), 0.85 s (`llama2_legacy.json`), 1.2 s (`spm_unigram.model`), 1.6 s (`spm_bpe.model`),
/// 1.7 s (`converted_unigram.json`, the grapheme-wise charsmap); the byte-level BPE takes 0.4 s.
///
/// Thread safety: every stored property is an immutable value.
public final class SentencePieceTokenizer: TextTokenizer {
    enum Rules: Sendable { case sentencePiece, tokenizers }
    enum Model: Sendable {
        case unigram
        /// SentencePiece BPE: merge the adjacent pair whose concatenation is a piece with the highest score.
        case bpeByScore
        /// `tokenizers` BPE: (left << 32 | right) -> (rank << 32 | merged id); `ignoreMerges` takes a
        /// whole piece that is in the vocabulary directly.
        case bpeByRank(merges: [UInt64: UInt64], ignoreMerges: Bool)
    }
    /// SentencePiece's `ModelProto.SentencePiece.Type` (also llama.cpp's GGUF token types).
    enum PieceType: Int, Sendable {
        case normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6
    }

    let rules: Rules
    let model: Model
    /// Pieces by id as the file spells them ("▁the", "<0x41>", "<s>").
    let pieces: [String]
    let pieceBytes: [[UInt8]]
    let scores: [Double]
    let types: [PieceType]
    let unkId: Int32?
    /// The id of each byte's `<0xNN>` piece when byte fallback is on (all 256 exist), else empty.
    let byteIds: [Int32]
    /// Every piece's bytes -> id (the first id when a file repeats one).
    let idOfBytes: [[UInt8]: Int32]
    /// The pieces the model may produce from text, by bytes: SentencePiece's normal, user-defined and
    /// unused pieces; every vocabulary entry for `tokenizers`.
    let trie: PieceTrie
    let fuseUnk: Bool
    /// Unigram constants, computed once: SentencePiece's min and max over NORMAL pieces (starting from
    /// FLT_MAX and FLT_MIN, as the C++), and `tokenizers`' min over the whole vocabulary.
    let minNormalScore: Float, maxNormalScore: Float, minScore: Double
    // SentencePiece rules.
    let normalizer: SPMNormalizer
    let unkSurface: [UInt8]
    // `tokenizers` rules.
    let addedTokens: [AddedToken]
    let rawMatcher: AddedTokenMatcher
    let normalizedMatcher: AddedTokenMatcher
    let normalizers: [NormalizerStep]
    let preTokenizers: [PreTokenizerStepSP]
    let decoders: [DecoderStep]?

    public let vocabSize: Int
    /// The end-of-sequence piece: SentencePiece's `eos_id`, GGUF's `eos_token_id`, or the first present of
    /// `</s>`, `<|endoftext|>`, `<eos>`, `<|end_of_text|>`, `<|im_end|>`.
    public let endOfTextId: Int32?
    /// The beginning-of-sequence piece, if the tokenizer has one (never added by `encode`).
    public let beginOfTextId: Int32?
    public let prefixId: Int32?
    /// The padding piece: SentencePiece's `pad_id` (default -1: none), GGUF's `padding_token_id`; kept for a GGUF export.
    public let padId: Int32?

    struct Config {
        var rules: Rules
        var model: Model
        var pieces: [String]
        var scores: [Double]
        var types: [PieceType]
        var byteFallback: Bool
        var unkId: Int32?
        var fuseUnk = true
        var normalizer = SPMNormalizer()
        var unkSurface = " \u{2047} "
        var addedTokens: [AddedToken] = []
        var normalizers: [NormalizerStep] = []
        var preTokenizers: [PreTokenizerStepSP] = []
        var decoders: [DecoderStep]? = nil
        var eosId: Int32? = nil
        var bosId: Int32? = nil
        var padId: Int32? = nil
        /// The content of the token put before a text (`TextTokenizer.prefixId`), if any.
        var prefixToken: String? = nil
        /// Or its id (GGUF).
        var prefixTokenId: Int32? = nil
    }

    init(_ c: Config, path: String) throws {
        func fail(_ reason: String) -> ReLoRAError { .invalidFile(path: path, reason: reason) }
        guard !c.pieces.isEmpty else { throw fail("the vocabulary is empty") }
        guard c.pieces.count < Int(Int32.max) else { throw fail("the vocabulary is too large") }
        precondition(c.scores.count == c.pieces.count && c.types.count == c.pieces.count)
        if let u = c.unkId { guard u >= 0, Int(u) < c.pieces.count else { throw fail("the unknown piece id \(u) is outside the vocabulary of \(c.pieces.count)") } }
        var idOfBytes = [[UInt8]: Int32](minimumCapacity: c.pieces.count)
        let pieceBytes = c.pieces.map { Array($0.utf8) }
        var trie = PieceTrie()
        for (id, b) in pieceBytes.enumerated() {
            if idOfBytes[b] == nil { idOfBytes[b] = Int32(id) }
            let inModel: Bool
            switch c.rules {
            case .sentencePiece: inModel = [.normal, .userDefined, .unused].contains(c.types[id])
            case .tokenizers: inModel = true
            }
            if inModel && !b.isEmpty { trie.insert(b, id: Int32(id)) }
        }
        var byteIds: [Int32] = []
        if c.byteFallback {
            byteIds = [Int32](repeating: -1, count: 256)
            for b in 0..<256 {
                guard let id = idOfBytes[Array(String(format: "<0x%02X>", b).utf8)] else {
                    throw fail("byte fallback is on but the vocabulary lacks the byte piece <0x\(String(format: "%02X", b))>; all 256 are needed")
                }
                byteIds[b] = id
            }
        }
        var addedContent = Set<String>()
        for t in c.addedTokens {
            guard !t.content.isEmpty, t.id >= 0 else { throw fail("an added token has empty content or a negative id") }
            guard addedContent.insert(t.content).inserted else { throw fail("added_tokens lists \(quoted(t.content)) twice") }
        }
        // Added tokens past the vocabulary must extend it densely (checked by counting, not by walking up
        // to a hostile id).
        let extraIds = Set(c.addedTokens.map(\.id).filter { Int($0) >= c.pieces.count })
        let total = c.pieces.count + extraIds.count
        if let high = extraIds.max(), Int(high) >= total {
            throw fail("ids are not dense: added token id \(high) leaves a gap after the \(c.pieces.count) pieces and \(extraIds.count) added tokens (expected ids 0..<\(total))")
        }
        rules = c.rules
        model = c.model
        pieces = c.pieces
        self.pieceBytes = pieceBytes
        scores = c.scores
        types = c.types
        unkId = c.unkId
        self.byteIds = byteIds
        self.idOfBytes = idOfBytes
        self.trie = trie
        fuseUnk = c.fuseUnk
        var lo = Float.greatestFiniteMagnitude, hi = Float.leastNormalMagnitude
        for (id, t) in c.types.enumerated() where t == .normal {
            lo = min(lo, Float(c.scores[id]))
            hi = max(hi, Float(c.scores[id]))
        }
        (minNormalScore, maxNormalScore, minScore) = (lo, hi, c.scores.min() ?? 0)
        normalizer = c.normalizer
        unkSurface = Array(c.unkSurface.utf8)
        addedTokens = c.addedTokens.sorted { $0.id < $1.id }
        rawMatcher = AddedTokenMatcher(addedTokens.filter { !$0.normalized })
        normalizedMatcher = AddedTokenMatcher(addedTokens.filter { $0.normalized })
        normalizers = c.normalizers
        preTokenizers = c.preTokenizers
        decoders = c.decoders
        vocabSize = total
        func named(_ names: [String]) -> Int32? {
            for n in names {
                if let t = c.addedTokens.first(where: { $0.content == n }) { return t.id }
                if let id = idOfBytes[Array(n.utf8)] { return id }
            }
            return nil
        }
        endOfTextId = c.eosId ?? named(["</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|im_end|>"])
        beginOfTextId = c.bosId ?? named(["<s>", "<bos>", "<|begin_of_text|>"])
        padId = c.padId
        if let t = c.prefixToken {
            guard let id = named([t]) else { throw fail("the post-processor puts \(quoted(t)) first, which is not a token") }
            prefixId = id
        } else {
            prefixId = c.prefixTokenId
        }
    }

    // MARK: Encoding

    public func encode(_ text: String) -> [Int32] {
        var text = text
        return text.withUTF8 { (try? encode(utf8: $0)) ?? [] }
    }

    public func encode(utf8 bytes: UnsafeBufferPointer<UInt8>) throws -> [Int32] {
        if let bad = UTF8Scan.firstInvalidOffset(bytes) { throw ReLoRAError.invalidData("invalid UTF-8 at byte offset \(bad)") }
        var out = [Int32]()
        out.reserveCapacity(bytes.count / 3 + 8)
        switch rules {
        case .sentencePiece:
            let normalized = normalizer.normalize(bytes)
            encodeModel(normalized, &out)
        case .tokenizers:
            encodeTokenizers(bytes, &out)
        }
        return out
    }

    /// `tokenizers`: added tokens (raw text), normalizers, added tokens (normalized), pre-tokenizers, model.
    /// Pieces' ids are cached per call (words repeat; bounded like `BPETokenizer`'s cache).
    private func encodeTokenizers(_ bytes: UnsafeBufferPointer<UInt8>, _ out: inout [Int32]) {
        var cache: [[UInt8]: [Int32]] = [:]
        forEachAddedSplit(rawMatcher, Array(bytes), text: { segment, originStart in
            let normalized = NormalizerStep.apply(normalizers, segment)
            forEachAddedSplit(normalizedMatcher, normalized, text: { sub, subStart in
                var pieces = [PieceSP(bytes: sub, atOrigin: originStart && subStart)]
                for step in preTokenizers { pieces = step.apply(pieces) }
                for p in pieces where !p.bytes.isEmpty {
                    if let hit = cache[p.bytes] { out += hit; continue }
                    let start = out.count
                    encodeModel(p.bytes, &out)
                    if p.bytes.count <= 64 && cache.count < EncodeState.maxCacheEntries { cache[p.bytes] = Array(out[start...]) }
                }
            }, token: { out.append($0) })
        }, token: { out.append($0) })
    }

    /// Splits `bytes` by the matcher's tokens: `text(segment, startsAtZero)` for the text between them.
    private func forEachAddedSplit(_ matcher: AddedTokenMatcher, _ bytes: [UInt8], text: ([UInt8], Bool) -> Void, token: (Int32) -> Void) {
        if matcher.isEmpty {
            if !bytes.isEmpty { text(bytes, true) }
            return
        }
        var scalars = [UInt32](), starts = [Int32]()
        bytes.withUnsafeBufferPointer { b in
            guard UTF8Scan.decode(b, scalars: &scalars, starts: &starts) == nil else { return }
            scalars.withUnsafeBufferPointer { s in
                starts.withUnsafeBufferPointer { st in
                    matcher.split(bytes: b, scalars: s, starts: st, lo: 0, hi: s.count, text: { lo, hi in
                        text(Array(b[Int(st[lo])..<Int(st[hi])]), lo == 0)
                    }, token: token)
                }
            }
        }
    }

    /// The model on one piece (SentencePiece: the whole normalized text), appending ids to `out`.
    func encodeModel(_ piece: [UInt8], _ out: inout [Int32]) {
        guard !piece.isEmpty else { return }
        switch model {
        case .unigram:
            switch rules {
            case .sentencePiece: emitSentencePiece(viterbiSentencePiece(piece), piece, &out)
            case .tokenizers: emitTokenizersUnigram(viterbiTokenizers(piece), piece, &out)
            }
        case .bpeByScore:
            emitSentencePiece(bpeByScore(piece), piece, &out)
        case .bpeByRank(let merges, let ignoreMerges):
            bpeByRank(piece, merges: merges, ignoreMerges: ignoreMerges, &out)
        }
    }

    /// UTF-8 length of the character starting with `b` (1 for a stray byte, which valid text never has).
    @inline(__always) static func charLength(_ b: UInt8) -> Int {
        b < 0x80 ? 1 : b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1
    }

    /// SentencePiece's unigram `EncodeOptimized`: Viterbi over the lattice of pieces, float32 path scores
    /// (the C++ source reads as if a candidate were summed in double, but the released library ties like
    /// float32 sums: "!!!???... ---===" splits "---" as "-" "--" there, which only float32 reproduces);
    /// a user-defined piece scores `length * max_score - 0.1`, an unknown character `min_score - 10`;
    /// equal scores keep the path found first (the earlier start). Returns (start, end, id) spans in order.
    func viterbiSentencePiece(_ s: [UInt8]) -> [(Int, Int, Int32)] {
        let maxScore = maxNormalScore
        return viterbi(s, unkScore: Float(minNormalScore - 10)) { id, length in
            let t = types[Int(id)]
            if t == .unused { return nil }
            return t == .userDefined ? Float(Double(Float(length) * maxScore) - 0.1) : Float(scores[Int(id)])
        }
    }

    /// `tokenizers`' `Unigram::encode_optimized`: the same lattice in float64 over every vocabulary entry,
    /// unknown characters `min_score - 10` with min over the whole vocabulary.
    func viterbiTokenizers(_ s: [UInt8]) -> [(Int, Int, Int32)] {
        viterbi(s, unkScore: minScore - 10) { id, _ in scores[Int(id)] }
    }

    /// The lattice both Viterbis walk, with path scores summed in `S`: each vocabulary prefix at a character
    /// start scores `score(id, byte length)` (nil: not a candidate); a character no candidate covers whole is
    /// one unknown piece of `unkScore`; equal scores keep the path found first (the earlier start).
    @inline(__always)
    private func viterbi<S: BinaryFloatingPoint>(_ s: [UInt8], unkScore: S, score: (Int32, Int) -> S?) -> [(Int, Int, Int32)] {
        let n = s.count
        var best = [S](repeating: 0, count: n + 1)
        var from = [Int](repeating: -1, count: n + 1)
        var ids = [Int32](repeating: -1, count: n + 1)
        var start = 0
        while start < n {
            let here = best[start]
            let mblen = min(Self.charLength(s[start]), n - start)
            var single = false
            trie.prefixes(s, from: start) { end, id in
                guard let score = score(id, end - start) else { return }
                let candidate = score + here
                if from[end] == -1 || candidate > best[end] {
                    best[end] = candidate
                    from[end] = start
                    ids[end] = id
                }
                if end - start == mblen { single = true }
            }
            if !single {
                let end = start + mblen
                let candidate = unkScore + here
                if from[end] == -1 || candidate > best[end] {
                    best[end] = candidate
                    from[end] = start
                    ids[end] = unkId ?? -1
                }
            }
            start += mblen
        }
        return backtrack(from, ids, n)
    }

    private func backtrack(_ from: [Int], _ ids: [Int32], _ n: Int) -> [(Int, Int, Int32)] {
        var spans: [(Int, Int, Int32)] = []
        var end = n
        while end > 0 {
            let start = from[end]
            guard start >= 0 else { return [] }  // unreachable: every character has an edge
            spans.append((start, end, ids[end]))
            end = start
        }
        return spans.reversed()
    }

    /// SentencePiece's output step (`PopulateSentencePieceText`): an unknown span becomes its bytes' pieces
    /// with byte fallback, else consecutive unknown spans give one `<unk>`.
    private func emitSentencePiece(_ spans: [(Int, Int, Int32)], _ s: [UInt8], _ out: inout [Int32]) {
        var previousUnknown = false
        for (start, end, id) in spans {
            let unknown = id < 0 || types[Int(id)] == .unknown
            if unknown && !byteIds.isEmpty {
                for k in start..<end { out.append(byteIds[Int(s[k])]) }
            } else if !(unknown && previousUnknown) {
                if id >= 0 { out.append(id) }
            }
            previousUnknown = unknown
        }
    }

    /// `tokenizers`' Unigram output: unknown spans fused (backwards, as its backtrack does: the same
    /// runs), then each span's id; a span that is no vocabulary entry becomes byte pieces with byte
    /// fallback, else `<unk>`.
    private func emitTokenizersUnigram(_ spans: [(Int, Int, Int32)], _ s: [UInt8], _ out: inout [Int32]) {
        var k = 0
        while k < spans.count {
            let (start, first, id) = spans[k]
            var end = first
            k += 1
            if fuseUnk, let u = unkId, id == u {
                while k < spans.count && spans[k].2 == u { end = spans[k].1; k += 1 }
            }
            if id != unkId, id >= 0 {
                out.append(id)
                continue
            }
            let text = Array(s[start..<end])
            if let known = idOfBytes[text] { out.append(known); continue }
            if !byteIds.isEmpty {
                for b in text { out.append(byteIds[Int(b)]) }
            } else if let u = unkId {
                out.append(u)
            }
        }
    }

    /// SentencePiece's BPE (`bpe_model.cc`): symbols are characters (a user-defined piece is one frozen
    /// symbol); repeatedly merge the adjacent pair whose concatenation is a piece with the highest score
    /// (leftmost on ties); pieces of type unused are split back into the pair they were made of.
    func bpeByScore(_ s: [UInt8]) -> [(Int, Int, Int32)] {
        struct Symbol { var start: Int; var length: Int; var prev: Int; var next: Int; var frozen: Bool }
        var symbols: [Symbol] = []
        var i = 0
        let userDefined = normalizer.userDefined
        symbols.reserveCapacity(s.count)
        while i < s.count {
            var length = min(Self.charLength(s[i]), s.count - i)
            var frozen = false
            if !userDefined.isEmpty, let m = userDefined.longestMatch(s, from: i) { length = m; frozen = true }
            symbols.append(Symbol(start: i, length: length, prev: symbols.count - 1, next: i + length < s.count ? symbols.count + 1 : -1, frozen: frozen))
            i += length
        }
        // Max-heap of (score, -left) with the pair's expected merged length to detect stale entries.
        var heap = ScoreHeap()
        var reverseMerge: [[UInt8]: (Int, Int, Int, Int)] = [:]  // unused piece -> (leftStart, leftLen, rightStart, rightLen)
        func consider(_ left: Int, _ right: Int) {
            guard left >= 0, right >= 0, !symbols[left].frozen, !symbols[right].frozen else { return }
            let start = symbols[left].start, length = symbols[left].length + symbols[right].length
            guard let id = trie.exact(s, from: start, to: start + length) else { return }
            heap.push(score: Float(scores[Int(id)]), left: left, right: right, size: length)
            if types[Int(id)] == .unused {
                reverseMerge[Array(s[start..<(start + length)])] = (start, symbols[left].length, symbols[right].start, symbols[right].length)
            }
        }
        for k in 1..<max(1, symbols.count) { consider(k - 1, k) }
        while let top = heap.pop() {
            let (l, r) = (top.left, top.right)
            guard symbols[l].length > 0, symbols[r].length > 0, symbols[l].length + symbols[r].length == top.size else { continue }
            symbols[l].length += symbols[r].length
            symbols[l].next = symbols[r].next
            if symbols[r].next >= 0 { symbols[symbols[r].next].prev = l }
            symbols[r].length = 0
            consider(symbols[l].prev, l)
            consider(l, symbols[l].next)
        }
        var spans: [(Int, Int, Int32)] = []
        func resegment(_ start: Int, _ length: Int) {
            let key = Array(s[start..<(start + length)])
            let id = idOfBytes[key]
            if let id, types[Int(id)] == .unused, let (ls, ll, rs, rl) = reverseMerge[key] {
                resegment(ls, ll)
                resegment(rs, rl)
                return
            }
            // PieceToId: any piece, else unknown.
            spans.append((start, start + length, id ?? unkId ?? -1))
        }
        var k = symbols.isEmpty ? -1 : 0
        while k >= 0 {
            resegment(symbols[k].start, symbols[k].length)
            k = symbols[k].next
        }
        return spans
    }

    /// `tokenizers`' BPE `merge_word`: characters become their ids (or their byte pieces with byte
    /// fallback, or `<unk>`, consecutive ones fused with `fuse_unk`), then merges apply lowest rank first.
    private func bpeByRank(_ s: [UInt8], merges: [UInt64: UInt64], ignoreMerges: Bool, _ out: inout [Int32]) {
        if ignoreMerges, let id = idOfBytes[s] { out.append(id); return }
        var ids: [Int32] = []
        var pendingUnk = false
        var i = 0
        while i < s.count {
            let length = min(Self.charLength(s[i]), s.count - i)
            if let id = trie.exact(s, from: i, to: i + length) {  // the trie holds every vocabulary entry here
                if pendingUnk, let u = unkId { ids.append(u); pendingUnk = false }
                ids.append(id)
            } else if !byteIds.isEmpty {
                for b in s[i..<(i + length)] { ids.append(byteIds[Int(b)]) }
            } else if let u = unkId {
                if pendingUnk && !fuseUnk { ids.append(u) }
                pendingUnk = true
            }
            i += length
        }
        if pendingUnk, let u = unkId { ids.append(u) }
        // Merge by rank, lowest first and leftmost among equal ranks (`Word::merge_all`), over a linked
        // list with a heap of rank << 32 | position: O(n log n), which matters because a Llama 2 file has no
        // pre-tokenizer and a whole document is one piece.
        let n = ids.count
        guard n > 1 else { out += ids; return }
        var scratch = BPEScratch()
        scratch.reset(n)
        for k in 0..<n {
            scratch.ids[k] = ids[k]
            scratch.prev[k] = Int32(k - 1)
            scratch.next[k] = k + 1 < n ? Int32(k + 1) : -1
        }
        @inline(__always) func lookup(_ a: Int32, _ b: Int32) -> UInt64? {
            merges[UInt64(UInt32(bitPattern: a)) << 32 | UInt64(UInt32(bitPattern: b))]
        }
        for k in 0..<(n - 1) {
            if let m = lookup(scratch.ids[k], scratch.ids[k + 1]) { scratch.push((m >> 32) << 32 | UInt64(k)) }
        }
        while let top = scratch.pop() {
            let rank = top >> 32, pos = Int(top & 0xFFFF_FFFF)
            guard scratch.alive[pos] else { continue }
            let next = Int(scratch.next[pos])
            guard next >= 0, let m = lookup(scratch.ids[pos], scratch.ids[next]), m >> 32 == rank else { continue }
            scratch.ids[pos] = Int32(truncatingIfNeeded: m & 0xFFFF_FFFF)
            scratch.alive[next] = false
            let after = scratch.next[next]
            scratch.next[pos] = after
            if after >= 0 { scratch.prev[Int(after)] = Int32(pos) }
            let before = scratch.prev[pos]
            if before >= 0, let m2 = lookup(scratch.ids[Int(before)], scratch.ids[pos]) { scratch.push((m2 >> 32) << 32 | UInt64(before)) }
            if after >= 0, let m2 = lookup(scratch.ids[pos], scratch.ids[Int(after)]) { scratch.push((m2 >> 32) << 32 | UInt64(pos)) }
        }
        var k = 0
        while k >= 0 {
            out.append(scratch.ids[k])
            k = Int(scratch.next[k])
        }
    }

    // MARK: Decoding

    public func decode(_ ids: [Int32]) -> String {
        switch rules {
        case .sentencePiece: return String(decoding: decodeSentencePiece(ids), as: UTF8.self)
        case .tokenizers: return decodeTokenizers(ids)
        }
    }

    /// SentencePiece's `Decode`: control pieces vanish, unknown pieces read " ⁇ ", runs of byte pieces
    /// become their bytes (invalid UTF-8 -> one U+FFFD per bad byte), "▁" becomes " ", and the first
    /// piece with text loses one leading "▁" when the model adds a dummy prefix.
    func decodeSentencePiece(_ ids: [Int32]) -> [UInt8] {
        var out = [UInt8]()
        var pendingBytes = [UInt8]()
        // `is_bos_ws` and `bos_ws_seen` of `SentencePieceProcessor::Decode`: before each non-byte piece,
        // stop expecting the dummy-prefix space once one was consumed or any text was written.
        var expectSpace = true, spaceSeen = false
        let strips = normalizer.addDummyPrefix || normalizer.removeExtraWhitespaces
        for id in ids where id >= 0 && Int(id) < pieces.count {
            let t = types[Int(id)]
            if t == .byte {
                if let b = Self.byteValue(pieces[Int(id)]) { pendingBytes.append(b) }
                continue
            }
            out += Self.decodeBytesLikeSentencePiece(pendingBytes)
            pendingBytes.removeAll()
            if spaceSeen || !out.isEmpty { expectSpace = false }
            spaceSeen = false
            switch t {
            case .control: continue
            case .unknown: out += unkSurface
            default:
                var p = pieceBytes[Int(id)][...]
                if expectSpace && strips && p.starts(with: Self.space) {
                    p = p.dropFirst(Self.space.count)
                    spaceSeen = !normalizer.removeExtraWhitespaces  // with it, every leading space goes
                }
                out += Self.replace(Array(p), Self.space, with: [0x20])
            }
        }
        out += Self.decodeBytesLikeSentencePiece(pendingBytes)
        return out
    }

    /// Byte pieces' text: each valid UTF-8 character as is, each byte that starts no valid character as
    /// U+FFFD (one per byte, as SentencePiece; Swift's decoder would replace maximal subparts instead).
    static func decodeBytesLikeSentencePiece(_ bytes: [UInt8]) -> [UInt8] {
        guard !bytes.isEmpty else { return [] }
        var out = [UInt8]()
        bytes.withUnsafeBufferPointer { b in
            var i = 0
            while i < b.count {
                if b[i] < 0x80 { out.append(b[i]); i += 1; continue }
                if let (_, length) = UTF8Scan.decodeMultibyte(b, at: i) {
                    out += b[i..<(i + length)]
                    i += length
                } else {
                    out += [0xEF, 0xBF, 0xBD]
                    i += 1
                }
            }
        }
        return out
    }

    private func decodeTokenizers(_ ids: [Int32]) -> String {
        var tokens: [[UInt8]] = []
        for id in ids {
            guard let t = tokenText(id) else { continue }
            tokens.append(t)
        }
        guard let decoders else {
            // No decoder: `tokenizers` joins the tokens with spaces.
            return tokens.map { String(decoding: $0, as: UTF8.self) }.joined(separator: " ")
        }
        for step in decoders { tokens = step.apply(tokens) }
        return String(decoding: tokens.joined(), as: UTF8.self)
    }

    /// The vocabulary entry (or added token content) of an id.
    func tokenText(_ id: Int32) -> [UInt8]? {
        guard id >= 0, Int(id) < vocabSize else { return nil }
        if let a = addedTokens.first(where: { $0.id == id }) { return Array(a.content.utf8) }
        return Int(id) < pieces.count ? pieceBytes[Int(id)] : nil
    }

    public func bytes(of id: Int32) -> [UInt8]? {
        guard let text = tokenText(id) else { return nil }
        if Int(id) < types.count {
            switch types[Int(id)] {
            case .control: return []
            case .byte: return Self.byteValue(pieces[Int(id)]).map { [$0] } ?? text
            case .unknown where rules == .sentencePiece: return unkSurface
            default: break
            }
        }
        if addedTokens.contains(where: { $0.id == id && $0.special }) { return [] }
        if let b = Self.byteValue(String(decoding: text, as: UTF8.self)), !byteIds.isEmpty { return [b] }
        return Self.replace(text, Self.space, with: [0x20])
    }

    /// The id of a piece as the file spells it (added tokens by content).
    public func id(of piece: String) -> Int32? {
        addedTokens.first(where: { $0.content == piece })?.id ?? idOfBytes[Array(piece.utf8)]
    }

    /// The piece of an id as the file spells it.
    public func token(of id: Int32) -> String? { tokenText(id).map { String(decoding: $0, as: UTF8.self) } }

    static let space: [UInt8] = Array("\u{2581}".utf8)

    /// The byte of a `<0xNN>` piece (two hex digits, either case), else nil.
    static func byteValue(_ piece: String) -> UInt8? {
        let u = Array(piece.utf8)
        guard u.count == 6, u[0] == UInt8(ascii: "<"), u[1] == UInt8(ascii: "0"), u[2] == UInt8(ascii: "x"), u[5] == UInt8(ascii: ">") else { return nil }
        return UInt8(String(decoding: u[3...4], as: UTF8.self), radix: 16)
    }

    /// `bytes` with every non-overlapping occurrence of `pattern` (left to right) replaced.
    static func replace(_ bytes: [UInt8], _ pattern: [UInt8], with content: [UInt8]) -> [UInt8] {
        guard !pattern.isEmpty, bytes.count >= pattern.count else { return bytes }
        var out = [UInt8]()
        out.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            if bytes[i] == pattern[0], i + pattern.count <= bytes.count, bytes[i..<(i + pattern.count)].elementsEqual(pattern) {
                out += content
                i += pattern.count
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return out
    }
}

/// A byte trie over piece spellings: (node << 8 | byte) -> child node, and the piece id at each node.
struct PieceTrie: Sendable {
    var children: [UInt64: Int32] = [:]
    var ids: [Int32] = [-1]

    /// Adds a piece; a spelling already present keeps its first id.
    mutating func insert(_ bytes: [UInt8], id: Int32) {
        var node: Int32 = 0
        for b in bytes {
            let key = UInt64(node) << 8 | UInt64(b)
            if let next = children[key] {
                node = next
            } else {
                let next = Int32(ids.count)
                ids.append(-1)
                children[key] = next
                node = next
            }
        }
        if ids[Int(node)] < 0 { ids[Int(node)] = id }
    }

    var isEmpty: Bool { ids.count == 1 }

    /// Calls `body(end, id)` for each piece that starts at `s[from]`, shortest first.
    func prefixes(_ s: [UInt8], from: Int, _ body: (Int, Int32) -> Void) {
        var node: Int32 = 0
        var i = from
        while i < s.count, let next = children[UInt64(node) << 8 | UInt64(s[i])] {
            node = next
            i += 1
            if ids[Int(node)] >= 0 { body(i, ids[Int(node)]) }
        }
    }

    func exact(_ s: [UInt8], from: Int, to: Int) -> Int32? {
        var node: Int32 = 0
        for i in from..<to {
            guard let next = children[UInt64(node) << 8 | UInt64(s[i])] else { return nil }
            node = next
        }
        return ids[Int(node)] >= 0 ? ids[Int(node)] : nil
    }

    /// Length of the longest piece that starts at `s[from]`, nil if none.
    func longestMatch(_ s: [UInt8], from: Int) -> Int? {
        var best: Int? = nil
        prefixes(s, from: from) { end, _ in best = end - from }
        return best
    }
}

/// Max-heap of candidate merges for `bpeByScore`: highest score first, then the smallest left index.
struct ScoreHeap {
    struct Entry { var score: Float; var left: Int; var right: Int; var size: Int }
    private var heap = BinaryHeap<Entry>()

    @inline(__always) static func before(_ a: Entry, _ b: Entry) -> Bool {
        a.score > b.score || (a.score == b.score && a.left < b.left)
    }

    mutating func push(score: Float, left: Int, right: Int, size: Int) {
        heap.push(Entry(score: score, left: left, right: right, size: size), before: Self.before)
    }

    mutating func pop() -> Entry? { heap.pop(before: Self.before) }
}

/// A binary heap whose top is the element `before` puts first. `before` is passed to each call, so an order may
/// read state outside the elements (the BPE trainer's token bytes); it must be the same order for every call.
struct BinaryHeap<Element> {
    private(set) var items: [Element] = []

    /// Empties the heap, keeping its storage for the next use.
    mutating func removeAll() { items.removeAll(keepingCapacity: true) }

    mutating func push(_ v: Element, before: (Element, Element) -> Bool) {
        items.append(v)
        var k = items.count - 1
        while k > 0 {
            let parent = (k - 1) / 2
            if !before(v, items[parent]) { break }
            items[k] = items[parent]
            k = parent
        }
        items[k] = v
    }

    mutating func pop(before: (Element, Element) -> Bool) -> Element? {
        guard let last = items.popLast() else { return nil }
        guard !items.isEmpty else { return last }
        let top = items[0]
        let n = items.count
        var k = 0
        while true {
            let l = 2 * k + 1
            if l >= n { break }
            let r = l + 1
            let c = r < n && before(items[r], items[l]) ? r : l
            if !before(items[c], last) { break }
            items[k] = items[c]
            k = c
        }
        items[k] = last
        return top
    }
}
