import Foundation
import ReLoRACore
import ReLoRAFormats

/// Trains a GPT-2-style byte-level BPE tokenizer.
///
/// Layout of the result: ids 0...255 are the single bytes in byte order (id == byte value), then one id per
/// new merged token in the order learned, then `specialTokens` (added tokens, `special: true`) at the end,
/// so `vocabSize` = 256 + new tokens + specials. Pre-tokenizer: `ByteLevel(add_prefix_space: false,
/// use_regex: true)` (the GPT-2 pattern); no normalizer; ByteLevel decoder and post-processor
/// (`trim_offsets: false`). Special tokens that occur literally in the training text are cut out of it
/// before counting, so no merge is learned across or inside them.
///
/// Algorithm (the standard one, as in `tokenizers`): count pre-token ("word") frequencies, keep each
/// distinct word as a list of symbol ids, count adjacent pairs weighted by word frequency, and remember
/// which words contain each pair. Each step takes the most frequent pair, appends the merge, and rewrites
/// only the words that contain that pair, updating pair counts for those words. A max-heap with lazy
/// deletion finds the best pair: a popped entry whose count is stale is pushed back with its current
/// count. A pair's count only decreases after it is pushed, except when it grows in a step, and then it is
/// pushed again; so every pair has an entry at or above its current count and the first fresh top is the
/// true best.
///
/// Ties are broken deterministically: highest count first, then the lexicographically smallest pair in
/// byte order (compare the left tokens' bytes, then the right tokens' bytes; a proper prefix sorts first).
/// The result does not depend on dictionary iteration order, so the same input and settings always give
/// byte-identical `tokenizer.json`s.
///
/// Training stops when the vocabulary reaches `vocabSize` or when the best pair occurs fewer than
/// `minFrequency` times (the vocabulary is then smaller; `progress` says so).
public struct BPETrainer: Sendable {
    public var vocabSize: Int
    public var specialTokens: [String]
    public var minFrequency: Int

    public init(vocabSize: Int, specialTokens: [String] = ["<|endoftext|>"], minFrequency: Int = 2) {
        self.vocabSize = vocabSize
        self.specialTokens = specialTokens
        self.minFrequency = minFrequency
    }

    /// Trains on in-memory documents.
    public func train(texts: [String], progress: ((String) -> Void)? = nil) throws -> BPETokenizer {
        try validate()
        var counter = WordCounter(specials: specialTokens)
        for var text in texts {
            _ = text.withUTF8 { counter.add($0) }  // a String is valid UTF-8: never fails
        }
        return try train(counter: counter, progress: progress)
    }

    /// Trains on UTF-8 text files (each file is one document). Invalid UTF-8 throws `ReLoRAError.invalidFile`
    /// naming the file and the byte offset. Files are read memory-mapped and counted in chunks of about
    /// 16 MB (see `PreTokenizer.chunkEnd`: the cuts do not change the pieces).
    public func train(files: [String], progress: ((String) -> Void)? = nil) throws -> BPETokenizer {
        try validate()
        var counter = WordCounter(specials: specialTokens)
        for path in files {
            let data: Data
            do {
                data = try Data(contentsOf: URL(fileURLWithPath: path), options: .mappedIfSafe)
            } catch {
                throw ReLoRAError.invalidFile(path: path, reason: "cannot read the training text (\(error.localizedDescription))")
            }
            try data.withUnsafeBytes { raw in
                if let bad = counter.add(raw.bindMemory(to: UInt8.self)) {
                    throw ReLoRAError.invalidFile(path: path, reason: "invalid UTF-8 at byte offset \(bad)")
                }
            }
            progress?("read \(path) (\(data.count) bytes)")
        }
        return try train(counter: counter, progress: progress)
    }

    /// The smallest `vocabSize` training accepts: the 256 byte tokens and the special tokens.
    public var minimumVocabSize: Int { 256 + specialTokens.count }

    func validate() throws {
        let minimum = minimumVocabSize
        guard vocabSize >= minimum else {
            let specials = specialTokens.count == 1 ? "1 special token" : "\(specialTokens.count) special tokens"
            throw ReLoRAError.invalidConfig(
                "tokenizer vocab size \(vocabSize) is too small: the minimum is \(minimum) (256 byte tokens + \(specials)); ask for \(minimum) or more")
        }
        guard vocabSize < Int(Int32.max) else { throw ReLoRAError.invalidConfig("tokenizer vocab size \(vocabSize) is too large") }
        guard minFrequency >= 1 else { throw ReLoRAError.invalidConfig("min frequency must be at least 1, got \(minFrequency)") }
        guard Set(specialTokens).count == specialTokens.count, !specialTokens.contains("") else {
            throw ReLoRAError.invalidConfig("special tokens must be distinct and non-empty")
        }
    }

    func train(counter: WordCounter, progress: ((String) -> Void)?) throws -> BPETokenizer {
        // Distinct words in byte order (deterministic indices).
        let sortedWords = counter.counts.sorted { $0.key.lexicographicallyPrecedes($1.key) }
        progress?("counted \(counter.totalWords) words, \(sortedWords.count) distinct, from \(counter.totalBytes) bytes")

        var words = [[Int32]]()
        var freqs = [Int]()
        words.reserveCapacity(sortedWords.count)
        freqs.reserveCapacity(sortedWords.count)
        for (w, c) in sortedWords where w.count >= 2 {  // single-byte words have no pairs
            words.append(w.map { Int32($0) })
            freqs.append(c)
        }

        var tokenBytes: [[UInt8]] = (0..<256).map { [UInt8($0)] }
        var bytesToId = [[UInt8]: Int32]()
        for b in 0..<256 { bytesToId[[UInt8(b)]] = Int32(b) }
        let targetModelSize = vocabSize - specialTokens.count

        @inline(__always) func key(_ a: Int32, _ b: Int32) -> UInt64 { UInt64(UInt32(a)) << 32 | UInt64(UInt32(b)) }

        var pairCounts = [UInt64: Int]()
        var pairWords = [UInt64: [Int32]]()
        for (w, symbols) in words.enumerated() {
            let f = freqs[w]
            for k in 0..<(symbols.count - 1) {
                let p = key(symbols[k], symbols[k + 1])
                pairCounts[p, default: 0] += f
                if pairWords[p]?.last != Int32(w) { pairWords[p, default: []].append(Int32(w)) }
            }
        }

        var heap = PairHeap()
        // Deterministic heap contents regardless of dictionary order (the pop order is determined anyway).
        for (p, c) in pairCounts.sorted(by: { $0.key < $1.key }) { heap.push(count: c, pair: p, tokenBytes) }

        var merges = [(Int32, Int32)]()
        var grown = [UInt64]()
        var oldSymbols = [Int32]()
        while tokenBytes.count < targetModelSize {
            guard let (count, p) = heap.pop(tokenBytes) else {
                progress?("no pairs left to merge: vocabulary stops at \(tokenBytes.count + specialTokens.count) < \(vocabSize)")
                break
            }
            let current = pairCounts[p] ?? 0
            if current != count {
                if current > 0 { heap.push(count: current, pair: p, tokenBytes) }
                continue
            }
            if count < minFrequency {
                progress?("best pair occurs \(count) < \(minFrequency) times: vocabulary stops at \(tokenBytes.count + specialTokens.count) < \(vocabSize)")
                break
            }
            let a = Int32(truncatingIfNeeded: p >> 32), b = Int32(truncatingIfNeeded: p & 0xFFFF_FFFF)
            let merged = tokenBytes[Int(a)] + tokenBytes[Int(b)]
            let newId: Int32
            if let existing = bytesToId[merged] {
                newId = existing  // the same bytes were already made from another pair
            } else {
                newId = Int32(tokenBytes.count)
                tokenBytes.append(merged)
                bytesToId[merged] = newId
            }
            merges.append((a, b))

            // Rewrite the words that contain (a, b): remove their old pairs' counts, merge, add the new ones.
            grown.removeAll(keepingCapacity: true)
            let affected = pairWords.removeValue(forKey: p) ?? []
            for w32 in affected {
                let w = Int(w32)
                let symbols = words[w]
                var found = false
                for k in 0..<(symbols.count - 1) where symbols[k] == a && symbols[k + 1] == b { found = true; break }
                if !found { continue }
                let f = freqs[w]
                oldSymbols = symbols
                var rewritten = [Int32]()
                rewritten.reserveCapacity(symbols.count)
                var k = 0
                while k < symbols.count {
                    if k + 1 < symbols.count && symbols[k] == a && symbols[k + 1] == b {
                        rewritten.append(newId)
                        k += 2
                    } else {
                        rewritten.append(symbols[k])
                        k += 1
                    }
                }
                for k in 0..<(oldSymbols.count - 1) { pairCounts[key(oldSymbols[k], oldSymbols[k + 1])]! -= f }
                for k in 0..<max(0, rewritten.count - 1) {
                    let q = key(rewritten[k], rewritten[k + 1])
                    pairCounts[q, default: 0] += f
                    if rewritten[k] == newId || rewritten[k + 1] == newId {
                        grown.append(q)
                        if pairWords[q]?.last != w32 { pairWords[q, default: []].append(w32) }
                    }
                }
                words[w] = rewritten
            }
            pairCounts[p] = 0
            // Pairs with the new token grew in this step (normally they are new; if the merged bytes already
            // existed as a token, older pairs with it grew too): push each once with its current count. Any
            // older heap entry for such a pair is now too low and is dropped or refreshed when popped.
            grown.sort()
            var previous: UInt64? = nil
            for q in grown where q != previous {
                previous = q
                if let c = pairCounts[q], c > 0 { heap.push(count: c, pair: q, tokenBytes) }
            }
            if let progress, merges.count % 1000 == 0 {
                progress("merge \(merges.count): \(TJSON.string(ByteLevel.string(merged)).summary) (count \(count)), vocabulary \(tokenBytes.count + specialTokens.count)/\(vocabSize)")
            }
        }

        let modelTokens = tokenBytes.map { ByteLevel.string($0) }
        let added = specialTokens.enumerated().map { k, s in
            AddedToken(id: Int32(modelTokens.count + k), content: s, singleWord: false, lstrip: false, rstrip: false,
                       normalized: false, special: true)
        }
        let post: TJSON = .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(false)),
                                   ("trim_offsets", .bool(false)), ("use_regex", .bool(true))])
        let tokenizer = try BPETokenizer(modelTokens: modelTokens, merges: merges, addedTokens: added,
                                         steps: [.byteLevel(addPrefixSpace: false, useRegex: true)],
                                         ignoreMerges: false, postProcessor: post, path: "trained tokenizer")
        progress?("trained \(merges.count) merges, vocabulary \(tokenizer.vocabSize)")
        return tokenizer
    }
}

/// Pre-token frequencies of training text: GPT-2 split, special tokens cut out first.
struct WordCounter {
    var counts = [[UInt8]: Int]()
    var totalWords = 0
    var totalBytes = 0
    let specials: AddedTokenMatcher
    var scalars = [UInt32]()
    var starts = [Int32]()

    init(specials: [String]) {
        self.specials = AddedTokenMatcher(specials.enumerated().map { AddedToken(id: Int32($0.offset), content: $0.element) })
    }

    /// Counts the words of `bytes` (processed in chunks of about 16 MB to bound memory); returns the byte
    /// offset of the first invalid UTF-8 (the chunks before it are counted) or nil.
    @discardableResult
    mutating func add(_ bytes: UnsafeBufferPointer<UInt8>, chunkTarget: Int = 16 << 20) -> Int? {
        var start = 0
        while start < bytes.count {
            let end = PreTokenizer.chunkEnd(bytes, from: start, target: chunkTarget, limit: 1 << 30)
            if let bad = addChunk(UnsafeBufferPointer(rebasing: bytes[start..<end])) { return start + bad }
            start = end
        }
        return nil
    }

    private mutating func addChunk(_ bytes: UnsafeBufferPointer<UInt8>) -> Int? {
        if let bad = UTF8Scan.decode(bytes, scalars: &scalars, starts: &starts) { return bad }
        totalBytes += bytes.count
        var counts = self.counts
        self.counts = [:]  // keep `counts` uniquely referenced while the closures mutate it
        var words = 0
        scalars.withUnsafeBufferPointer { s in
            starts.withUnsafeBufferPointer { st in
                specials.split(bytes: bytes, scalars: s, starts: st, lo: 0, hi: s.count, text: { lo, hi in
                    SplitPattern.gpt2.split(s, lo, hi) { a, b in
                        let piece = Array(UnsafeBufferPointer(rebasing: bytes[Int(st[a])..<Int(st[b])]))
                        counts[piece, default: 0] += 1
                        words += 1
                    }
                }, token: { _ in })
            }
        }
        self.counts = counts
        totalWords += words
        return nil
    }
}

/// Max-heap of (count, pair) ordered by count, then by the pair's bytes ascending (the trainer's tie-break).
struct PairHeap {
    private var heap = BinaryHeap<(count: Int, pair: UInt64)>()

    @inline(__always)
    static func before(_ x: (count: Int, pair: UInt64), _ y: (count: Int, pair: UInt64), _ tokens: [[UInt8]]) -> Bool {
        if x.count != y.count { return x.count > y.count }
        let xa = Int(x.pair >> 32), ya = Int(y.pair >> 32)
        if xa != ya { return tokens[xa].lexicographicallyPrecedes(tokens[ya]) }
        let xb = Int(x.pair & 0xFFFF_FFFF), yb = Int(y.pair & 0xFFFF_FFFF)
        return xb != yb && tokens[xb].lexicographicallyPrecedes(tokens[yb])
    }

    mutating func push(count: Int, pair: UInt64, _ tokens: [[UInt8]]) {
        heap.push((count: count, pair: pair)) { PairHeap.before($0, $1, tokens) }
    }

    mutating func pop(_ tokens: [[UInt8]]) -> (Int, UInt64)? {
        heap.pop { PairHeap.before($0, $1, tokens) }.map { ($0.count, $0.pair) }
    }
}
