import Foundation
import ReLoRACore
import ReLoRAFormats

/// A GPT-2-style byte-level BPE tokenizer, read from and written to Hugging Face `tokenizer.json`.
///
/// Encoding, as in `tokenizers`: (1) added tokens (e.g. `<|endoftext|>`) found literally in the text become
/// their ids; (2) the text between them is split into pieces by the pre-tokenizer (GPT-2 or LLaMA-3
/// pattern); (3) each piece's UTF-8 bytes start as one symbol per byte and adjacent symbols are merged,
/// lowest merge rank first (leftmost first among equal ranks), until no merge applies. With
/// `ignore_merges` (LLaMA-3), a piece that is itself in the vocabulary becomes that token directly.
/// Decoding concatenates the tokens' bytes, so `decode(encode(t)) == t` for every string `t` (with
/// `add_prefix_space` off); byte sequences that are not valid UTF-8 (from arbitrary id lists) decode to U+FFFD.
///
/// Supported files: model `BPE` without `byte_fallback`, dropout or subword affixes; normalizer null;
/// pre-tokenizer `ByteLevel(use_regex: true)`, or a `Sequence` of `Split` steps with the GPT-2 or LLaMA-3
/// regex (behavior Isolated) ending in `ByteLevel`; decoder `ByteLevel` or null; any post-processor (kept
/// and written back, but `encode` never adds special tokens). Anything else is rejected with
/// `ReLoRAError.invalidFile` saying what is unsupported.
///
/// Speed: each `encode` call caches the ids of the pieces it has seen (natural text repeats pieces a lot),
/// so one call on a long text is faster than many calls on short ones (measured on 4.7 MB of Shakespeare
/// with an 8K vocab, release build: ~23 MB/s in one call, ~9 MB/s one paragraph per call).
///
/// Thread safety: every stored property is an immutable value, so `encode`/`decode` may run concurrently
/// on one instance; all per-call state (cache, work arrays) is local to the call.
public final class BPETokenizer: Sendable {
    /// `model.vocab` keys by id (`0..<modelTokens.count`), in the byte-level spelling.
    let modelTokens: [String]
    /// The bytes each id decodes to (`0..<vocabSize`): model tokens via the byte-level alphabet (or their
    /// raw UTF-8 when a key is not byte-level), added tokens' content.
    let tokenBytes: [[UInt8]]
    /// Model tokens by their bytes (keys spelled in the byte-level alphabet only).
    let bytesToId: [[UInt8]: Int32]
    let modelStringToId: [String: Int32]
    let addedContentToId: [String: Int32]
    /// id of each single byte.
    let byteIds: [Int32]
    /// (left << 32 | right) -> (rank << 32 | merged id).
    let mergeTable: [UInt64: UInt64]
    /// The merges in rank order, as loaded (for writing).
    let merges: [(Int32, Int32)]
    let ignoreMerges: Bool
    let steps: [PreTokenizerStep]
    let addedTokens: [AddedToken]
    /// HF extracts non-normalized added tokens from the raw text first, then normalized ones from what is left.
    let rawMatcher: AddedTokenMatcher
    let normalizedMatcher: AddedTokenMatcher
    /// Written back verbatim by `jsonData()`.
    let postProcessor: TJSON

    /// Number of ids, added tokens included (ids are dense: `0..<vocabSize`).
    public let vocabSize: Int

    /// The end-of-text token: `<|endoftext|>` if present, else the first present of `<|end_of_text|>`,
    /// `</s>`, `<|im_end|>`, `<eos>`, `<|eot_id|>`.
    public var endOfTextId: Int32? {
        for name in ["<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>", "<|eot_id|>"] {
            if let id = id(of: name) { return id }
        }
        return nil
    }

    /// The id of an added token's content, or of a vocabulary key as spelled in `tokenizer.json`
    /// (byte-level alphabet, e.g. `"Ġthe"` for " the").
    public func id(of token: String) -> Int32? {
        addedContentToId[token] ?? modelStringToId[token]
    }

    /// The vocabulary key (or added token content) of an id, as `tokenizer.json` spells it.
    public func token(of id: Int32) -> String? {
        guard id >= 0, Int(id) < vocabSize else { return nil }
        if let a = addedTokens.first(where: { $0.id == id }) { return a.content }
        return Int(id) < modelTokens.count ? modelTokens[Int(id)] : nil
    }

    public convenience init(contentsOf path: String) throws {
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path), options: .mappedIfSafe)
        } catch {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot read the tokenizer file (\(error.localizedDescription))")
        }
        try self.init(jsonData: data, path: path)
    }

    public convenience init(jsonData: Data, path: String = "tokenizer.json") throws {
        let root: TJSON
        do {
            root = try TJSONParser.parse(jsonData)
        } catch let e as TJSONError {
            throw ReLoRAError.invalidFile(path: path, reason: "not valid JSON: \(e.message)")
        }
        let parts = try TokenizerFileReader(path: path).read(root)
        try self.init(modelTokens: parts.modelTokens, merges: parts.merges, addedTokens: parts.addedTokens,
                      steps: parts.steps, ignoreMerges: parts.ignoreMerges, postProcessor: parts.postProcessor,
                      path: path)
    }

    /// Builds and validates a tokenizer. `merges` are pairs of model ids in rank order; each pair's
    /// concatenated key must be a model token. Added token ids must fill `modelTokens.count..<vocabSize`
    /// densely, or reuse the model id of the same token.
    init(modelTokens: [String], merges: [(Int32, Int32)], addedTokens: [AddedToken], steps: [PreTokenizerStep],
         ignoreMerges: Bool, postProcessor: TJSON, path: String) throws {
        func fail(_ reason: String) -> ReLoRAError { ReLoRAError.invalidFile(path: path, reason: reason) }
        let modelCount = modelTokens.count
        guard modelCount < Int(Int32.max) else { throw fail("the vocabulary is too large") }

        var modelStringToId = [String: Int32](minimumCapacity: modelCount)
        var bytesToId = [[UInt8]: Int32](minimumCapacity: modelCount)
        var tokenBytes = [[UInt8]]()
        tokenBytes.reserveCapacity(modelCount + addedTokens.count)
        for (id, key) in modelTokens.enumerated() {
            if modelStringToId.updateValue(Int32(id), forKey: key) != nil {
                throw fail("model.vocab has the token \(TJSON.string(key).summary) twice")
            }
            if let b = ByteLevel.bytes(key) {
                bytesToId[b] = Int32(id)
                tokenBytes.append(b)
            } else {
                tokenBytes.append(Array(key.utf8))  // not byte-level: decoded as its own UTF-8, like HF
            }
        }
        var byteIds = [Int32](repeating: -1, count: 256)
        for b in 0..<256 {
            guard let id = bytesToId[[UInt8(b)]] else {
                throw fail("model.vocab lacks the byte-level token for byte 0x\(String(b, radix: 16)) "
                    + "(\(TJSON.string(ByteLevel.string([UInt8(b)])).summary)); only byte-level BPE with all 256 byte tokens is supported")
            }
            byteIds[b] = id
        }

        var table = [UInt64: UInt64](minimumCapacity: merges.count)
        for (rank, (a, b)) in merges.enumerated() {
            guard a >= 0, b >= 0, Int(a) < modelCount, Int(b) < modelCount else {
                throw fail("merge \(rank) references an id outside the vocabulary")
            }
            let joined = modelTokens[Int(a)] + modelTokens[Int(b)]
            guard let merged = modelStringToId[joined] else {
                throw fail("merge \(rank) (\(TJSON.string(modelTokens[Int(a)]).summary) + \(TJSON.string(modelTokens[Int(b)]).summary)) "
                    + "produces \(TJSON.string(joined).summary), which is not in model.vocab")
            }
            // Like HF, a repeated pair keeps its last rank.
            table[UInt64(UInt32(a)) << 32 | UInt64(UInt32(b))] = UInt64(rank) << 32 | UInt64(UInt32(merged))
        }

        // Added tokens: ids either reuse a model id or extend the vocabulary densely.
        var addedContentToId = [String: Int32]()
        var extra = [Int32: AddedToken]()
        for t in addedTokens {
            guard !t.content.isEmpty else { throw fail("added token \(t.id) has empty content") }
            guard t.id >= 0 else { throw fail("added token \(TJSON.string(t.content).summary) has a negative id") }
            if addedContentToId.updateValue(t.id, forKey: t.content) != nil {
                throw fail("added_tokens lists \(TJSON.string(t.content).summary) twice")
            }
            if Int(t.id) >= modelCount {
                if extra.updateValue(t, forKey: t.id) != nil { throw fail("added_tokens uses id \(t.id) twice") }
            } else {
                // Reusing a model id is fine only for the same token (GPT-2 lists <|endoftext|> in both).
                let key = modelTokens[Int(t.id)]
                guard key == t.content || key == ByteLevel.string(t.content.utf8) else {
                    throw fail("added token \(TJSON.string(t.content).summary) has id \(t.id), which model.vocab gives to \(TJSON.string(key).summary)")
                }
            }
        }
        let total = modelCount + extra.count
        for id in extra.keys where Int(id) >= total {
            throw fail("ids are not dense: added token id \(id) leaves a gap after the \(modelCount) model tokens "
                + "and \(extra.count) added tokens (expected ids 0..<\(total))")
        }
        for id in modelCount..<total { tokenBytes.append(Array(extra[Int32(id)]!.content.utf8)) }
        // An added token that reuses a model id decodes to its content.
        for t in addedTokens where Int(t.id) < modelCount { tokenBytes[Int(t.id)] = Array(t.content.utf8) }

        guard steps.contains(where: { if case .byteLevel = $0 { return true }; return false }) else {
            throw fail("pre_tokenizer has no ByteLevel step; only byte-level BPE is supported")
        }

        self.modelTokens = modelTokens
        self.tokenBytes = tokenBytes
        self.bytesToId = bytesToId
        self.modelStringToId = modelStringToId
        self.addedContentToId = addedContentToId
        self.byteIds = byteIds
        self.mergeTable = table
        self.merges = merges
        self.ignoreMerges = ignoreMerges
        self.steps = steps
        self.addedTokens = addedTokens.sorted { $0.id < $1.id }
        self.rawMatcher = AddedTokenMatcher(self.addedTokens.filter { !$0.normalized })
        self.normalizedMatcher = AddedTokenMatcher(self.addedTokens.filter { $0.normalized })
        self.postProcessor = postProcessor
        self.vocabSize = total
    }

    // MARK: Encoding

    /// Token ids of `text`; no special tokens are added, but added tokens that occur literally are matched.
    /// (Returns [] only for a text over 1 GiB with `add_prefix_space`, which `encode(utf8:)` rejects.)
    public func encode(_ text: String) -> [Int32] {
        var text = text
        return text.withUTF8 { (try? encodeBytes($0)) ?? [] }  // a String is valid UTF-8
    }

    /// Token ids of UTF-8 bytes; invalid UTF-8 throws `ReLoRAError.invalidData` with the byte offset.
    public func encode(utf8 bytes: UnsafeBufferPointer<UInt8>) throws -> [Int32] {
        try encodeBytes(bytes)
    }

    /// Encodes in chunks of at most ~`chunkLimit` bytes (1 GiB: the per-scalar byte offsets are Int32), cut
    /// where the pieces do not change (`PreTokenizer.chunkEnd`). With `add_prefix_space`, which would add a
    /// space per chunk, the text is one chunk and longer texts are rejected.
    func encodeBytes(_ bytes: UnsafeBufferPointer<UInt8>, chunkTarget: Int = 1 << 29, chunkLimit: Int = 1 << 30) throws -> [Int32] {
        var state = EncodeState()
        var out = [Int32]()
        out.reserveCapacity(bytes.count / 3 + 8)
        let prefixSpace = steps.contains { if case .byteLevel(true, _) = $0 { return true }; return false }
        if prefixSpace && bytes.count > chunkLimit {
            throw ReLoRAError.invalidData("text of \(bytes.count) bytes is too long to encode at once with add_prefix_space; split it into documents")
        }
        var start = 0
        while start < bytes.count {
            let end = prefixSpace ? bytes.count : PreTokenizer.chunkEnd(bytes, from: start, target: chunkTarget, limit: chunkLimit)
            if let bad = encodeChunk(UnsafeBufferPointer(rebasing: bytes[start..<end]), &state, &out) {
                throw ReLoRAError.invalidData("invalid UTF-8 at byte offset \(start + bad)")
            }
            start = end
        }
        return out
    }

    /// Encodes one chunk (< 2 GiB) onto `out`; returns the offset of invalid UTF-8 (nothing appended) or nil.
    private func encodeChunk(_ bytes: UnsafeBufferPointer<UInt8>, _ state: inout EncodeState, _ out: inout [Int32]) -> Int? {
        if let bad = UTF8Scan.decode(bytes, scalars: &state.scalars, starts: &state.starts) { return bad }
        let scalars = state.scalars, starts = state.starts
        scalars.withUnsafeBufferPointer { s in
            starts.withUnsafeBufferPointer { st in
                let text = DecodedText(bytes: bytes, scalars: s, starts: st)
                rawMatcher.split(bytes: bytes, scalars: s, starts: st, lo: 0, hi: s.count, text: { lo, hi in
                    normalizedMatcher.split(bytes: bytes, scalars: s, starts: st, lo: lo, hi: hi, text: { lo2, hi2 in
                        pretokenize(text, lo2, hi2, step: 0) { encodePiece($0, &state, &out) }
                    }, token: { out.append($0) })
                }, token: { out.append($0) })
            }
        }
        return nil
    }

    /// Runs pre-tokenizer steps `step...` on `text[lo..<hi]`, calling `emit` with the UTF-8 bytes of each
    /// resulting piece in order.
    func pretokenize(_ text: DecodedText, _ lo: Int, _ hi: Int, step: Int, _ emit: (UnsafeBufferPointer<UInt8>) -> Void) {
        guard lo < hi else { return }
        guard step < steps.count else {
            emit(text.byteSlice(lo, hi))
            return
        }
        switch steps[step] {
        case .split(let pattern):
            pattern.split(text.scalars, lo, hi) { a, b in pretokenize(text, a, b, step: step + 1, emit) }
        case .byteLevel(let addPrefixSpace, let useRegex):
            if addPrefixSpace && text.scalars[lo] != 0x20 {
                // Re-run this step on " " + piece (small copies; only with add_prefix_space).
                var bytes: [UInt8] = [0x20]
                bytes.append(contentsOf: text.byteSlice(lo, hi))
                var scalars: [UInt32] = [0x20]
                scalars.append(contentsOf: text.scalars[lo..<hi])
                var starts: [Int32] = [0]
                for k in lo...hi { starts.append(text.starts[k] - text.starts[lo] + 1) }
                bytes.withUnsafeBufferPointer { b in
                    scalars.withUnsafeBufferPointer { s in
                        starts.withUnsafeBufferPointer { st in
                            let t = DecodedText(bytes: b, scalars: s, starts: st)
                            byteLevelStep(t, 0, s.count, useRegex: useRegex, step: step, emit)
                        }
                    }
                }
            } else {
                byteLevelStep(text, lo, hi, useRegex: useRegex, step: step, emit)
            }
        }
    }

    private func byteLevelStep(_ text: DecodedText, _ lo: Int, _ hi: Int, useRegex: Bool, step: Int,
                               _ emit: (UnsafeBufferPointer<UInt8>) -> Void) {
        if useRegex {
            SplitPattern.gpt2.split(text.scalars, lo, hi) { a, b in pretokenize(text, a, b, step: step + 1, emit) }
        } else {
            pretokenize(text, lo, hi, step: step + 1, emit)
        }
    }

    /// The pre-tokenizer's pieces of `text` as UTF-8 bytes (no added-token matching), like HF's
    /// `pre_tokenizer.pre_tokenize_str`. For tests and inspection.
    func preTokenize(_ text: String) -> [[UInt8]] {
        var scalars = [UInt32]()
        var starts = [Int32]()
        var pieces = [[UInt8]]()
        var text = text
        text.withUTF8 { bytes in
            guard UTF8Scan.decode(bytes, scalars: &scalars, starts: &starts) == nil else { return }
            scalars.withUnsafeBufferPointer { s in
                starts.withUnsafeBufferPointer { st in
                    pretokenize(DecodedText(bytes: bytes, scalars: s, starts: st), 0, s.count, step: 0) { pieces.append(Array($0)) }
                }
            }
        }
        return pieces
    }

    /// BPE of one piece, through the per-call cache (pieces repeat a lot in natural text).
    func encodePiece(_ piece: UnsafeBufferPointer<UInt8>, _ state: inout EncodeState, _ out: inout [Int32]) {
        if piece.count == 1 {
            out.append(byteIds[Int(piece[0])])
            return
        }
        let key = Array(piece)
        if let cached = state.cache[key] {
            out.append(contentsOf: cached)
            return
        }
        let start = out.count
        bpe(piece, &state.scratch, &out)
        if state.cache.count < EncodeState.maxCacheEntries {
            state.cache[key] = Array(out[start...])
        }
    }

    /// Merges the bytes of `piece` by rank, appending the resulting ids to `out`.
    ///
    /// Symbols form a doubly linked list over the piece's bytes; a min-heap holds candidate pairs keyed by
    /// `rank << 32 | position` (lowest rank first, leftmost first among equal ranks, as HF). A popped pair is
    /// stale when its left symbol died or the pair at that position no longer has that rank. O(n log n).
    func bpe(_ piece: UnsafeBufferPointer<UInt8>, _ s: inout BPEScratch, _ out: inout [Int32]) {
        if ignoreMerges, let id = bytesToId[Array(piece)] {
            out.append(id)
            return
        }
        let n = piece.count
        s.reset(n)
        for k in 0..<n {
            s.ids[k] = byteIds[Int(piece[k])]
            s.prev[k] = Int32(k - 1)
            s.next[k] = k + 1 < n ? Int32(k + 1) : -1
        }
        @inline(__always) func lookup(_ a: Int32, _ b: Int32) -> UInt64? {
            mergeTable[UInt64(UInt32(a)) << 32 | UInt64(UInt32(b))]
        }
        for k in 0..<(n - 1) {
            if let m = lookup(s.ids[k], s.ids[k + 1]) { s.push((m >> 32) << 32 | UInt64(k)) }
        }
        while let top = s.pop() {
            let rank = top >> 32
            let pos = Int(top & 0xFFFF_FFFF)
            guard s.alive[pos] else { continue }
            let nxt = Int(s.next[pos])
            guard nxt >= 0, let m = lookup(s.ids[pos], s.ids[nxt]), m >> 32 == rank else { continue }
            // Merge pos and nxt into pos.
            s.ids[pos] = Int32(truncatingIfNeeded: m & 0xFFFF_FFFF)
            s.alive[nxt] = false
            let after = s.next[nxt]
            s.next[pos] = after
            if after >= 0 { s.prev[Int(after)] = Int32(pos) }
            let before = s.prev[pos]
            if before >= 0, let m2 = lookup(s.ids[Int(before)], s.ids[pos]) {
                s.push((m2 >> 32) << 32 | UInt64(before))
            }
            if after >= 0, let m2 = lookup(s.ids[pos], s.ids[Int(after)]) {
                s.push((m2 >> 32) << 32 | UInt64(pos))
            }
        }
        var k = 0
        while k >= 0 && k < n {
            out.append(s.ids[k])
            k = Int(s.next[k])
        }
    }

    // MARK: Decoding

    /// The text of `ids`: the tokens' bytes concatenated, invalid UTF-8 replaced by U+FFFD; ids outside
    /// `0..<vocabSize` are skipped (as HF does).
    public func decode(_ ids: [Int32]) -> String {
        var bytes = [UInt8]()
        bytes.reserveCapacity(ids.count * 4)
        for id in ids where id >= 0 && Int(id) < tokenBytes.count { bytes.append(contentsOf: tokenBytes[Int(id)]) }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The bytes of one token (added tokens: their content).
    public func bytes(of id: Int32) -> [UInt8]? {
        guard id >= 0, Int(id) < tokenBytes.count else { return nil }
        return tokenBytes[Int(id)]
    }

    // MARK: Writing

    /// A `tokenizer.json` (HF layout, pretty-printed, deterministic bytes) that `tokenizers` and
    /// `transformers` load. Merges are written as `"a b"` strings (readable by every `tokenizers` version;
    /// byte-level keys never contain a space), or as `["a", "b"]` pairs if some key does.
    public func jsonData() throws -> Data {
        TJSONWriter.write(jsonValue())
    }

    /// Writes `jsonData()` to `path` atomically: a temporary file in the same directory, then rename.
    public func save(to path: String) throws {
        let data = try jsonData()
        let url = URL(fileURLWithPath: path)
        let tmp = url.deletingLastPathComponent()
            .appendingPathComponent(".\(url.lastPathComponent).tmp-\(ProcessInfo.processInfo.processIdentifier)-\(UInt32.random(in: 0...UInt32.max))")
        do {
            try data.write(to: tmp)
        } catch {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot write the tokenizer (\(error.localizedDescription))")
        }
        if rename(tmp.path, url.path) != 0 {
            let reason = String(cString: strerror(errno))
            try? FileManager.default.removeItem(at: tmp)
            throw ReLoRAError.invalidFile(path: path, reason: "cannot move the tokenizer into place (\(reason))")
        }
    }

    func jsonValue() -> TJSON {
        func byteLevel(addPrefixSpace: Bool, trimOffsets: Bool, useRegex: Bool) -> TJSON {
            .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(addPrefixSpace)),
                     ("trim_offsets", .bool(trimOffsets)), ("use_regex", .bool(useRegex))])
        }
        let added: [TJSON] = addedTokens.map { t in
            .object([("id", .int(Int(t.id))), ("content", .string(t.content)), ("single_word", .bool(t.singleWord)),
                     ("lstrip", .bool(t.lstrip)), ("rstrip", .bool(t.rstrip)), ("normalized", .bool(t.normalized)),
                     ("special", .bool(t.special))])
        }
        let stepValues: [TJSON] = steps.map { step in
            switch step {
            case .split(let p):
                return .object([("type", .string("Split")), ("pattern", .object([("Regex", .string(p.regex))])),
                                ("behavior", .string("Isolated")), ("invert", .bool(false))])
            case .byteLevel(let prefix, let regex):
                return byteLevel(addPrefixSpace: prefix, trimOffsets: true, useRegex: regex)
            }
        }
        let preTokenizer: TJSON = stepValues.count == 1
            ? stepValues[0] : .object([("type", .string("Sequence")), ("pretokenizers", .array(stepValues))])
        var vocab = [(String, TJSON)]()
        vocab.reserveCapacity(modelTokens.count)
        for (id, key) in modelTokens.enumerated() { vocab.append((key, .int(id))) }
        let spaced = merges.contains { modelTokens[Int($0.0)].contains(" ") || modelTokens[Int($0.1)].contains(" ") }
        let mergeValues: [TJSON] = merges.map { a, b in
            let (x, y) = (modelTokens[Int(a)], modelTokens[Int(b)])
            return spaced ? .array([.string(x), .string(y)]) : .string(x + " " + y)
        }
        let model: TJSON = .object([
            ("type", .string("BPE")), ("dropout", .null), ("unk_token", .null), ("continuing_subword_prefix", .null),
            ("end_of_word_suffix", .null), ("fuse_unk", .bool(false)), ("byte_fallback", .bool(false)),
            ("ignore_merges", .bool(ignoreMerges)), ("vocab", .object(vocab)), ("merges", .array(mergeValues)),
        ])
        return .object([
            ("version", .string("1.0")), ("truncation", .null), ("padding", .null), ("added_tokens", .array(added)),
            ("normalizer", .null), ("pre_tokenizer", preTokenizer), ("post_processor", postProcessor),
            ("decoder", byteLevel(addPrefixSpace: true, trimOffsets: true, useRegex: true)), ("model", model),
        ])
    }
}

/// A decoded text: UTF-8 bytes, their scalar values, and each scalar's byte offset (`starts` has
/// `scalars.count + 1` entries).
struct DecodedText {
    let bytes: UnsafeBufferPointer<UInt8>
    let scalars: UnsafeBufferPointer<UInt32>
    let starts: UnsafeBufferPointer<Int32>

    @inline(__always)
    func byteSlice(_ lo: Int, _ hi: Int) -> UnsafeBufferPointer<UInt8> {
        UnsafeBufferPointer(rebasing: bytes[Int(starts[lo])..<Int(starts[hi])])
    }
}

/// Per-call encoding state: the piece cache (bounded, so a huge input of unique pieces stays bounded in
/// memory) and the BPE work arrays.
struct EncodeState {
    static let maxCacheEntries = 1 << 18
    var cache: [[UInt8]: [Int32]] = [:]
    var scratch = BPEScratch()
    var scalars: [UInt32] = []
    var starts: [Int32] = []
}

/// Work arrays for `BPETokenizer.bpe`, reused across pieces.
struct BPEScratch {
    var ids: [Int32] = []
    var prev: [Int32] = []
    var next: [Int32] = []
    var alive: [Bool] = []
    var heap = BinaryHeap<UInt64>()

    mutating func reset(_ n: Int) {
        if ids.count < n {
            ids = [Int32](repeating: 0, count: n)
            prev = ids
            next = ids
            alive = [Bool](repeating: true, count: n)
        } else {
            for k in 0..<n { alive[k] = true }
        }
        heap.removeAll()
    }

    mutating func push(_ v: UInt64) { heap.push(v, before: <) }

    mutating func pop() -> UInt64? { heap.pop(before: <) }
}
