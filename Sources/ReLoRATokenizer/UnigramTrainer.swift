import Foundation
import ReLoRACore

/// Trains a Unigram tokenizer (the T5 / paper kind) and writes it as a `tokenizer.json` that Hugging Face
/// `tokenizers` loads: model `Unigram` with byte fallback, pre-tokenizer `Metaspace` (replacement "▁",
/// prepend_scheme always, split), decoder `Replace("▁", " ")`, `ByteFallback`, `Fuse`, `Strip(" ", 1, 0)`,
/// ids `<unk>` 0, `<s>` 1, `</s>` 2 (special added tokens), the 256 byte pieces `<0x00>`..`<0xFF>` 3...258,
/// then the learned pieces by descending score. Every text encodes (unknown characters fall back to
/// bytes) and decodes back to itself, except that one leading space is lost (the decoder strips the
/// prefix space the pre-tokenizer adds) and added-token spellings in the text become those tokens.
///
/// The algorithm is SentencePiece's (`unigram_model_trainer.cc`), simplified where noted:
/// 1. Words: each document is split as the pre-tokenizer does (spaces become "▁", a word starts at each
///    "▁", "▁" is prepended); words are counted.
/// 2. Required characters: the most frequent characters covering `characterCoverage` of all character
///    occurrences (SentencePiece's rule); words with other characters are left out of training (those
///    characters are encoded as bytes).
/// 3. Seed pieces: every substring of 2 to `maxPieceLength` characters occurring at least twice, the
///    `seedSize` best by frequency x length (SentencePiece uses a suffix array over whole sentences; this
///    enumerates the substrings of each distinct word, which gives the same candidates within words), plus
///    the required characters; initial score log(frequency / total).
/// 4. EM: two rounds of expected counts by forward-backward over each word's lattice, then
///    score = digamma(count) - digamma(total count), dropping pieces with expected count < 0.5.
/// 5. Pruning, while more than 1.1 x the target remain: each piece's loss is how much the corpus
///    likelihood drops when its Viterbi occurrences are replaced by the Viterbi segmentation of the piece
///    without it; the `shrinkingFactor` best are kept (required characters always).
/// 6. The final vocabulary: the required characters and the best-scoring pieces up to the size.
///
/// Deterministic: ties are broken by the pieces' bytes, so the same input gives the same file.
public struct UnigramTrainer: Sendable {
    public var vocabSize: Int
    public var characterCoverage = 0.9995
    public var maxPieceLength = 16
    public var seedSize = 100_000
    public var shrinkingFactor = 0.75
    public static let specials = ["<unk>", "<s>", "</s>"]
    /// The smallest vocabulary: the 3 special tokens, 256 byte pieces and at least one character.
    public static let minimumVocabSize = 3 + 256 + 1

    public init(vocabSize: Int) { self.vocabSize = vocabSize }

    /// A piece being trained: its UTF-8 bytes, its score, and whether it is a required character.
    struct Piece { var bytes: [UInt8]; var score: Double; var required: Bool }

    public func train(files: [String], progress: ((String) -> Void)? = nil) throws -> (tokenizer: SentencePieceTokenizer, json: Data) {
        var texts: [Data] = []
        for path in files {
            let data: Data
            do { data = try Data(contentsOf: URL(fileURLWithPath: path), options: .mappedIfSafe) } catch {
                throw ReLoRAError.invalidFile(path: path, reason: "cannot read the training text (\(error.localizedDescription))")
            }
            if let bad = data.withUnsafeBytes({ UTF8Scan.firstInvalidOffset($0.bindMemory(to: UInt8.self)) }) {
                throw ReLoRAError.invalidFile(path: path, reason: "invalid UTF-8 at byte offset \(bad)")
            }
            texts.append(data)
        }
        return try train(texts: texts.map { String(decoding: $0, as: UTF8.self) }, progress: progress)
    }

    public func train(texts: [String], progress: ((String) -> Void)? = nil) throws -> (tokenizer: SentencePieceTokenizer, json: Data) {
        guard vocabSize >= Self.minimumVocabSize, vocabSize < Int(Int32.max) else {
            throw ReLoRAError.invalidConfig("Unigram vocab size \(vocabSize) is too small: the minimum is \(Self.minimumVocabSize) (3 special tokens + 256 byte pieces + 1 character)")
        }
        let target = vocabSize - 3 - 256

        // 1. Words.
        var wordCounts: [[UInt8]: Int] = [:]
        let space = SentencePieceTokenizer.space
        for text in texts {
            let pieces = PreTokenizerStepSP.metaspace(replacement: space, scheme: .always, split: true)
                .apply([PieceSP(bytes: Array(text.utf8), atOrigin: true)])
            for p in pieces where !p.bytes.isEmpty { wordCounts[p.bytes, default: 0] += 1 }
        }
        var words = wordCounts.sorted { $0.key.lexicographicallyPrecedes($1.key) }.map { (bytes: $0.key, count: $0.value) }
        guard !words.isEmpty else { throw ReLoRAError.invalidData("the training text is empty") }

        // 2. Required characters by coverage.
        var charCounts: [[UInt8]: Int] = [:]
        for w in words { forEachChar(w.bytes) { charCounts[Array(w.bytes[$0..<$1]), default: 0] += w.count } }
        let charsByCount = charCounts.sorted { $0.value > $1.value || ($0.value == $1.value && $0.key.lexicographicallyPrecedes($1.key)) }
        let totalChars = charsByCount.reduce(0) { $0 + $1.value }
        var required: [[UInt8]] = []
        var covered = 0
        for (c, n) in charsByCount {
            if required.count >= target || (Double(covered) >= characterCoverage * Double(totalChars) && !required.isEmpty) { break }
            required.append(c)
            covered += n
        }
        let requiredSet = Set(required)
        words = words.filter { w in
            var ok = true
            forEachChar(w.bytes) { if !requiredSet.contains(Array(w.bytes[$0..<$1])) { ok = false } }
            return ok
        }
        progress?("\(wordCounts.count) distinct words, \(charCounts.count) characters, \(required.count) required (coverage \(characterCoverage))")

        // 3. Seed pieces.
        var substringCounts: [[UInt8]: Int] = [:]
        for w in words {
            var bounds: [Int] = []
            forEachChar(w.bytes) { a, _ in bounds.append(a) }
            bounds.append(w.bytes.count)
            for i in 0..<(bounds.count - 1) {
                var j = i + 2
                while j < bounds.count && j - i <= maxPieceLength {
                    substringCounts[Array(w.bytes[bounds[i]..<bounds[j]]), default: 0] += w.count
                    j += 1
                }
            }
        }
        let seeds = substringCounts.filter { $0.value >= 2 }
            .sorted { a, b in
                let x = a.value * a.key.count, y = b.value * b.key.count
                return x > y || (x == y && a.key.lexicographicallyPrecedes(b.key))
            }
            .prefix(seedSize)
        var pieces: [Piece] = required.map { Piece(bytes: $0, score: Double(charCounts[$0]!), required: true) }
        for (bytes, count) in seeds { pieces.append(Piece(bytes: bytes, score: Double(count), required: false)) }
        let seedTotal = pieces.reduce(0.0) { $0 + $1.score }
        for k in pieces.indices { pieces[k].score = log(pieces[k].score) - log(seedTotal) }
        progress?("\(pieces.count) seed pieces")

        // 4-5. EM and pruning.
        let desired = Int((Double(target) * 1.1).rounded(.down))
        var round = 0
        while true {
            for _ in 0..<2 {
                let (expected, objective, tokens) = eStep(pieces, words)
                pieces = mStep(pieces, expected)
                progress?("round \(round): \(pieces.count) pieces, objective \(String(format: "%.4f", objective)), \(tokens) tokens per pass")
            }
            if pieces.count <= desired { break }
            pieces = prune(pieces, words, keep: max(desired, Int(shrinkingFactor * Double(pieces.count))))
            round += 1
        }

        // 6. Final vocabulary.
        var final = pieces.filter(\.required)
        let requiredBytes = Set(final.map(\.bytes))
        let others = pieces.filter { !$0.required && !requiredBytes.contains($0.bytes) }
            .sorted { $0.score > $1.score || ($0.score == $1.score && $0.bytes.lexicographicallyPrecedes($1.bytes)) }
        final += others.prefix(max(0, target - final.count))
        final.sort { $0.score > $1.score || ($0.score == $1.score && $0.bytes.lexicographicallyPrecedes($1.bytes)) }
        let minScore = final.map(\.score).min() ?? 0
        let json = Self.tokenizerJSON(final.map { (String(decoding: $0.bytes, as: UTF8.self), $0.score) }, byteScore: minScore)
        let tokenizer = try SentencePieceTokenizer(tokenizerJSON: json, path: "trained tokenizer")
        progress?("trained \(final.count) pieces, vocabulary \(tokenizer.vocabSize)")
        return (tokenizer, TJSONWriter.write(json))
    }

    /// Calls `body(start, end)` for each UTF-8 character of valid UTF-8 `bytes`.
    func forEachChar(_ bytes: [UInt8], _ body: (Int, Int) -> Void) {
        var i = 0
        while i < bytes.count {
            let n = min(SentencePieceTokenizer.charLength(bytes[i]), bytes.count - i)
            body(i, i + n)
            i += n
        }
    }

    /// The lattice edges (start, end, piece) of a word, in increasing start order.
    func edges(_ word: [UInt8], _ trie: PieceTrie) -> [(Int, Int, Int32)] {
        var out: [(Int, Int, Int32)] = []
        forEachChar(word) { start, _ in trie.prefixes(word, from: start) { end, id in out.append((start, end, id)) } }
        return out
    }

    static func trie(_ pieces: [Piece]) -> PieceTrie {
        var t = PieceTrie()
        for (k, p) in pieces.enumerated() { t.insert(p.bytes, id: Int32(k)) }
        return t
    }

    @inline(__always) static func logAdd(_ a: Double, _ b: Double) -> Double {
        if a == -.infinity { return b }
        if b == -.infinity { return a }
        return max(a, b) + log1p(exp(-abs(a - b)))
    }

    /// Expected piece counts over all words (forward-backward), the mean negative log-likelihood per word
    /// occurrence, and the number of Viterbi tokens.
    func eStep(_ pieces: [Piece], _ words: [(bytes: [UInt8], count: Int)]) -> ([Double], Double, Int) {
        let trie = Self.trie(pieces)
        var expected = [Double](repeating: 0, count: pieces.count)
        var objective = 0.0, occurrences = 0, tokens = 0
        for w in words {
            let e = edges(w.bytes, trie)
            let n = w.bytes.count
            var alpha = [Double](repeating: -.infinity, count: n + 1)
            alpha[0] = 0
            for (s, t, id) in e where alpha[s] > -.infinity { alpha[t] = Self.logAdd(alpha[t], alpha[s] + pieces[Int(id)].score) }
            guard alpha[n] > -.infinity else { continue }
            var beta = [Double](repeating: -.infinity, count: n + 1)
            beta[n] = 0
            for (s, t, id) in e.reversed() where beta[t] > -.infinity { beta[s] = Self.logAdd(beta[s], pieces[Int(id)].score + beta[t]) }
            let z = alpha[n]
            for (s, t, id) in e where alpha[s] > -.infinity && beta[t] > -.infinity {
                expected[Int(id)] += Double(w.count) * exp(alpha[s] + pieces[Int(id)].score + beta[t] - z)
            }
            objective -= Double(w.count) * z
            occurrences += w.count
            tokens += w.count * viterbi(w.bytes, e, pieces).count
        }
        return (expected, objective / Double(max(1, occurrences)), tokens)
    }

    /// SentencePiece's M-step: pieces with expected count < 0.5 go (required characters stay, with their
    /// count floored at 0.5); score = digamma(count) - digamma(sum of counts).
    func mStep(_ pieces: [Piece], _ expected: [Double]) -> [Piece] {
        var kept: [(Piece, Double)] = []
        for (k, p) in pieces.enumerated() {
            if expected[k] < 0.5 && !p.required { continue }
            kept.append((p, max(expected[k], 0.5)))
        }
        let total = Self.digamma(kept.reduce(0.0) { $0 + $1.1 })
        return kept.map { p, c in Piece(bytes: p.bytes, score: Self.digamma(c) - total, required: p.required) }
    }

    /// The best segmentation of a word from its edges: piece indices.
    func viterbi(_ word: [UInt8], _ e: [(Int, Int, Int32)], _ pieces: [Piece], excluding: Int32 = -1) -> [Int32] {
        let n = word.count
        var best = [Double](repeating: -.infinity, count: n + 1)
        var back = [(Int, Int32)](repeating: (-1, -1), count: n + 1)
        best[0] = 0
        for (s, t, id) in e where id != excluding && best[s] > -.infinity {
            let c = best[s] + pieces[Int(id)].score
            if c > best[t] { best[t] = c; back[t] = (s, id) }
        }
        guard best[n] > -.infinity else { return [] }
        var out: [Int32] = []
        var t = n
        while t > 0 { out.append(back[t].1); t = back[t].0 }
        return out.reversed()
    }

    /// SentencePiece's `PruneSentencePieces`: keeps the `keep` pieces whose removal would cost the most.
    func prune(_ pieces: [Piece], _ words: [(bytes: [UInt8], count: Int)], keep: Int) -> [Piece] {
        let trie = Self.trie(pieces)
        // Each piece's alternative: its own best segmentation without itself.
        var alternatives: [[Int32]] = []
        for (k, p) in pieces.enumerated() {
            alternatives.append(p.required ? [] : viterbi(p.bytes, edges(p.bytes, trie), pieces, excluding: Int32(k)))
        }
        // Viterbi frequencies over the corpus.
        var freq = [Double](repeating: 0, count: pieces.count)
        for w in words {
            for id in viterbi(w.bytes, edges(w.bytes, trie), pieces) { freq[Int(id)] += Double(w.count) }
        }
        let sum = freq.reduce(0, +)
        let logSum = log(sum)
        var candidates: [(Int, Double)] = []
        var always: [Int] = []
        for (k, p) in pieces.enumerated() {
            if p.required { always.append(k); continue }
            if freq[k] == 0 { continue }  // never on a best path: removed
            if alternatives[k].isEmpty { always.append(k); continue }
            let newSum = sum + freq[k] * Double(alternatives[k].count - 1)
            let logAlt = log(newSum)
            let logProb = log(freq[k]) - logSum
            var logProbAlt = 0.0
            for a in alternatives[k] { logProbAlt += log(freq[Int(a)] + freq[k]) - logAlt }
            candidates.append((k, freq[k] * (logProb - logProbAlt)))
        }
        candidates.sort { $0.1 > $1.1 || ($0.1 == $1.1 && pieces[$0.0].bytes.lexicographicallyPrecedes(pieces[$1.0].bytes)) }
        var keepSet = Set(always)
        for (k, _) in candidates where keepSet.count < keep { keepSet.insert(k) }
        return pieces.indices.filter { keepSet.contains($0) }.map { pieces[$0] }
    }

    /// The digamma function (asymptotic series after shifting the argument above 5), as SentencePiece's.
    static func digamma(_ x0: Double) -> Double {
        var x = x0, result = 0.0
        while x < 5 { result -= 1 / x; x += 1 }
        let xx = 1 / x, xx2 = xx * xx, xx4 = xx2 * xx2
        result += log(x) + (1.0 / 24.0) * xx2 + (7.0 / 960.0) * xx4 + (31.0 / 8064.0) * xx4 * xx2 - (127.0 / 30720.0) * xx4 * xx4
        return result
    }

    /// The `tokenizer.json` of a trained vocabulary (`pieces` by id order after the specials and bytes).
    static func tokenizerJSON(_ pieces: [(String, Double)], byteScore: Double) -> TJSON {
        var vocab: [TJSON] = specials.map { .array([.string($0), .double(0)]) }
        for b in 0..<256 { vocab.append(.array([.string(String(format: "<0x%02X>", b)), .double(byteScore)])) }
        for (p, s) in pieces { vocab.append(.array([.string(p), .double(s)])) }
        let added: [TJSON] = specials.enumerated().map { k, s in
            .object([("id", .int(k)), ("content", .string(s)), ("single_word", .bool(false)), ("lstrip", .bool(false)),
                     ("rstrip", .bool(false)), ("normalized", .bool(false)), ("special", .bool(true))])
        }
        let metaspace: TJSON = .object([("type", .string("Metaspace")), ("replacement", .string("\u{2581}")),
                                        ("prepend_scheme", .string("always")), ("split", .bool(true))])
        let decoder: TJSON = .object([("type", .string("Sequence")), ("decoders", .array([
            .object([("type", .string("Replace")), ("pattern", .object([("String", .string("\u{2581}"))])), ("content", .string(" "))]),
            .object([("type", .string("ByteFallback"))]),
            .object([("type", .string("Fuse"))]),
            .object([("type", .string("Strip")), ("content", .string(" ")), ("start", .int(1)), ("stop", .int(0))]),
        ]))])
        return .object([
            ("version", .string("1.0")), ("truncation", .null), ("padding", .null), ("added_tokens", .array(added)),
            ("normalizer", .null), ("pre_tokenizer", metaspace), ("post_processor", .null), ("decoder", decoder),
            ("model", .object([("type", .string("Unigram")), ("unk_id", .int(0)), ("vocab", .array(vocab)),
                               ("byte_fallback", .bool(true))])),
        ])
    }
}
