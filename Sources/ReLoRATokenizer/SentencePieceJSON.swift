import Foundation
import ReLoRACore

/// Reading a SentencePiece-style `tokenizer.json` (the files of Llama 2, Mistral, TinyLlama, T5 and
/// transformers' SentencePiece conversions). Supported, everything else refused with one sentence:
///
/// - model `BPE` (with or without `byte_fallback`, `fuse_unk`, `ignore_merges`; no dropout or subword
///   affixes) or `Unigram` (`unk_id`, `byte_fallback`; no sampling);
/// - normalizers `Sequence`, `Prepend`, `Replace` (a literal, or the regexes `\A +| +\z`, ` {2,}` and
///   `\A` + literal that transformers' converter writes), `Strip`, `Precompiled` (the charsmap, with the
///   `tokenizers` grapheme rule);
/// - pre-tokenizers `Sequence`, `Metaspace` (`prepend_scheme` always/first/never or the older
///   `add_prefix_space`, `split`), `WhitespaceSplit`, `Split` whose regex is an alternation of literals
///   (behavior Isolated);
/// - decoders `Sequence`, `Replace` (literal), `ByteFallback`, `Fuse`, `Strip`, `Metaspace`;
/// - any post-processor (ignored: `encode` adds no special tokens).
extension SentencePieceTokenizer {
    /// Reads a SentencePiece-style `tokenizer.json` (`TokenizerLoader` chooses between this and `BPETokenizer`).
    public convenience init(jsonData: Data, path: String = "tokenizer.json") throws {
        let root: TJSON
        do { root = try TJSONParser.parse(jsonData) } catch let e as TJSONError {
            throw ReLoRAError.invalidFile(path: path, reason: "not valid JSON: \(e.message)")
        }
        try self.init(tokenizerJSON: root, path: path)
    }

    convenience init(tokenizerJSON root: TJSON, path: String) throws {
        func fail(_ reason: String) -> ReLoRAError { .invalidFile(path: path, reason: reason) }
        guard case .object = root else { throw fail("a tokenizer.json must be a JSON object") }
        guard let model = root["model"], case .object = model else { throw fail("missing the 'model' object") }
        let type = model["type"]?.stringValue ?? (model["merges"] != nil ? "BPE" : nil)
        var config: Config
        switch type {
        case "BPE"?: config = try readSentencePieceBPE(model, fail)
        case "Unigram"?: config = try Self.readUnigram(model, fail)
        case let other:
            throw fail("model type \(other.map { "'\($0)'" } ?? "(none)") is not supported; relora reads BPE (byte-level or with byte fallback) and Unigram")
        }
        config.addedTokens = try Self.readAddedTokens(root["added_tokens"], fail)
        config.normalizers = try Self.readNormalizer(root["normalizer"], fail)
        config.preTokenizers = try Self.readPreTokenizer(root["pre_tokenizer"], fail)
        config.decoders = try Self.readDecoder(root["decoder"], fail)
        config.prefixToken = leadingSpecialToken(root["post_processor"] ?? .null)
        try self.init(config, path: path)
    }

    static func readUnigram(_ model: TJSON, _ fail: (String) -> ReLoRAError) throws -> Config {
        for key in ["alpha", "nbest_size"] {
            if let v = model[key], !v.isNull { throw fail("Unigram sampling (\(key) \(v.summary)) is not supported (encoding must be deterministic)") }
        }
        guard case .array(let items)? = model["vocab"], !items.isEmpty else { throw fail("model.vocab must be a non-empty array of [piece, score] pairs") }
        var pieces: [String] = [], scores: [Double] = []
        pieces.reserveCapacity(items.count)
        for (k, item) in items.enumerated() {
            guard case .array(let pair) = item, pair.count == 2, let piece = pair[0].stringValue else {
                throw fail("model.vocab[\(k)] must be a [piece, score] pair")
            }
            let score: Double
            switch pair[1] {
            case .double(let d): score = d
            case .int(let i): score = Double(i)
            default: throw fail("model.vocab[\(k)] has a score that is not a number")
            }
            guard score.isFinite else { throw fail("model.vocab[\(k)] has a score that is not finite") }
            pieces.append(piece)
            scores.append(score)
        }
        var unkId: Int32? = nil
        if let u = model["unk_id"], !u.isNull {
            guard let id = u.intValue, id >= 0, id < pieces.count else { throw fail("model.unk_id \(u.summary) is not an id in the vocabulary") }
            unkId = Int32(id)
        }
        var types = [PieceType](repeating: .normal, count: pieces.count)
        if let u = unkId { types[Int(u)] = .unknown }
        return Config(rules: .tokenizers, model: .unigram, pieces: pieces, scores: scores, types: types,
                      byteFallback: try flag(model, "byte_fallback", false, fail), unkId: unkId, fuseUnk: true)
    }

    static func flag(_ object: TJSON, _ key: String, _ fallback: Bool, _ fail: (String) -> ReLoRAError) throws -> Bool {
        guard let v = object[key], !v.isNull else { return fallback }
        guard let b = v.boolValue else { throw fail("\(key) must be true or false") }
        return b
    }

    static func readAddedTokens(_ list: TJSON?, _ fail: (String) -> ReLoRAError) throws -> [AddedToken] {
        guard let list, !list.isNull else { return [] }
        guard case .array(let items) = list else { throw fail("added_tokens must be an array") }
        return try items.enumerated().map { (k: Int, item: TJSON) throws -> AddedToken in
            guard let id = item["id"]?.intValue, id >= 0, id < Int(Int32.max), let content = item["content"]?.stringValue else {
                throw fail("added_tokens[\(k)] must be an object with an integer 'id' and a string 'content'")
            }
            let special = try flag(item, "special", false, fail)
            return AddedToken(id: Int32(id), content: content, singleWord: try flag(item, "single_word", false, fail),
                              lstrip: try flag(item, "lstrip", false, fail), rstrip: try flag(item, "rstrip", false, fail),
                              normalized: try flag(item, "normalized", !special, fail), special: special)
        }
    }

    /// The steps of a component: its own, or those of a `Sequence` (nested sequences flattened).
    static func steps(_ v: TJSON, _ listKey: String, _ what: String, _ fail: (String) -> ReLoRAError) throws -> [TJSON] {
        guard v["type"]?.stringValue == "Sequence" else { return [v] }
        guard case .array(let items)? = v[listKey] else { throw fail("the \(what) Sequence needs a '\(listKey)' array") }
        return try items.flatMap { try steps($0, listKey, what, fail) }
    }

    static func stringField(_ v: TJSON, _ key: String, _ what: String, _ fail: (String) -> ReLoRAError) throws -> [UInt8] {
        guard let s = v[key]?.stringValue else { throw fail("the \(what) needs a string '\(key)'") }
        return Array(s.utf8)
    }

    static func readNormalizer(_ n: TJSON?, _ fail: (String) -> ReLoRAError) throws -> [NormalizerStep] {
        guard let n, !n.isNull else { return [] }
        return try steps(n, "normalizers", "normalizer", fail).map { (s: TJSON) throws -> NormalizerStep in
            let type = s["type"]?.stringValue ?? s.summary
            switch type {
            case "Prepend": return .prepend(try stringField(s, "prepend", "Prepend normalizer", fail))
            case "Strip":
                return .strip(left: try flag(s, "strip_left", true, fail), right: try flag(s, "strip_right", true, fail))
            case "Replace":
                let content = try stringField(s, "content", "Replace normalizer", fail)
                if let literal = s["pattern"]?["String"]?.stringValue { return .replace(Array(literal.utf8), content) }
                guard let regex = s["pattern"]?["Regex"]?.stringValue else { throw fail("the Replace normalizer needs a pattern") }
                switch regex {
                case #"\A +| +\z"#: return .replaceEdgeSpaces(content)
                case " {2,}": return .replaceSpaceRuns(content)
                default:
                    if regex.hasPrefix(#"\A"#), let literal = regexLiteral(String(regex.dropFirst(2))) {
                        return .replaceAtStart(literal, content)
                    }
                    throw fail("the Replace normalizer's regex \(quoted(regex)) is not supported (only literals and the regexes transformers' SentencePiece converter writes)")
                }
            case "Precompiled":
                guard let encoded = s["precompiled_charsmap"]?.stringValue else {
                    // transformers writes null when the SentencePiece model has no charsmap: the identity.
                    return .prepend([])
                }
                guard let blob = Data(base64Encoded: encoded) else { throw fail("the Precompiled normalizer's charsmap is not valid base64") }
                do { return .precompiled(try CharsMap.parse(Array(blob))) } catch let e as CharsMap.Malformed { throw fail(e.reason) }
            default:
                throw fail("normalizer '\(type)' is not supported; relora implements Sequence, Prepend, Replace, Strip and Precompiled")
            }
        }
    }

    /// The bytes of a regex that matches one literal string (escapes allowed, no metacharacters), else nil.
    static func regexLiteral(_ regex: String) -> [UInt8]? {
        var out = String.UnicodeScalarView()
        var escaped = false
        for u in regex.unicodeScalars {
            if escaped {
                guard !("A"..."Z").contains(u) && !("a"..."z").contains(u) && !("0"..."9").contains(u) else { return nil }  // \s, \d, \1 ...
                out.append(u)
                escaped = false
            } else if u == "\\" {
                escaped = true
            } else if "|()[]{}.*+?^$".unicodeScalars.contains(u) {
                return nil
            } else {
                out.append(u)
            }
        }
        return escaped || out.isEmpty ? nil : Array(String(out).utf8)
    }

    static func readPreTokenizer(_ p: TJSON?, _ fail: (String) -> ReLoRAError) throws -> [PreTokenizerStepSP] {
        guard let p, !p.isNull else { return [] }
        return try steps(p, "pretokenizers", "pre_tokenizer", fail).map { (s: TJSON) throws -> PreTokenizerStepSP in
            let type = s["type"]?.stringValue ?? s.summary
            switch type {
            case "Metaspace":
                let replacement = try stringField(s, "replacement", "Metaspace pre-tokenizer", fail)
                return .metaspace(replacement: replacement, scheme: try prependScheme(s, fail), split: try flag(s, "split", true, fail))
            case "WhitespaceSplit":
                return .whitespaceSplit
            case "Split":
                let behavior = s["behavior"]?.stringValue ?? "Isolated"
                guard behavior == "Isolated", s["invert"]?.boolValue != true else {
                    throw fail("the Split pre-tokenizer with behavior '\(behavior)'\(s["invert"]?.boolValue == true ? " and invert" : "") is not supported (only Isolated)")
                }
                if let literal = s["pattern"]?["String"]?.stringValue, !literal.isEmpty { return .splitLiterals([Array(literal.utf8)]) }
                guard let regex = s["pattern"]?["Regex"]?.stringValue else { throw fail("the Split pre-tokenizer needs a pattern") }
                var literals: [[UInt8]] = []
                for part in regex.split(separator: "|", omittingEmptySubsequences: false) {
                    guard let l = regexLiteral(String(part)) else {
                        throw fail("the Split pre-tokenizer's regex \(quoted(regex)) is not supported in a SentencePiece-style tokenizer (only an alternation of literals)")
                    }
                    literals.append(l)
                }
                return .splitLiterals(literals)
            default:
                throw fail("pre-tokenizer '\(type)' is not supported in a SentencePiece-style tokenizer; relora implements Sequence, Metaspace, WhitespaceSplit and a Split on literals")
            }
        }
    }

    static func prependScheme(_ s: TJSON, _ fail: (String) -> ReLoRAError) throws -> PrependScheme {
        if let v = s["prepend_scheme"], !v.isNull {
            guard let name = v.stringValue, let scheme = PrependScheme(rawValue: name) else {
                throw fail("Metaspace prepend_scheme \(v.summary) is not one of always, first, never")
            }
            return scheme
        }
        return try flag(s, "add_prefix_space", true, fail) ? .always : .never
    }

    static func readDecoder(_ d: TJSON?, _ fail: (String) -> ReLoRAError) throws -> [DecoderStep]? {
        guard let d, !d.isNull else { return nil }
        return try steps(d, "decoders", "decoder", fail).map { (s: TJSON) throws -> DecoderStep in
            let type = s["type"]?.stringValue ?? s.summary
            switch type {
            case "Replace":
                guard let literal = s["pattern"]?["String"]?.stringValue else {
                    throw fail("the Replace decoder's pattern \(s["pattern"]?.summary ?? "null") is not supported (only a literal string)")
                }
                return .replace(Array(literal.utf8), try stringField(s, "content", "Replace decoder", fail))
            case "ByteFallback": return .byteFallback
            case "Fuse": return .fuse
            case "Strip":
                guard let c = s["content"]?.stringValue, c.unicodeScalars.count == 1,
                      let start = s["start"]?.intValue, let stop = s["stop"]?.intValue, start >= 0, stop >= 0 else {
                    throw fail("the Strip decoder needs a one-character 'content' and non-negative 'start' and 'stop'")
                }
                return .strip(content: c.unicodeScalars.first!, start: start, stop: stop)
            case "Metaspace":
                guard let r = s["replacement"]?.stringValue, r.unicodeScalars.count == 1 else {
                    throw fail("the Metaspace decoder needs a one-character 'replacement'")
                }
                return .metaspace(replacement: r.unicodeScalars.first!, dropInFirst: try prependScheme(s, fail) != .never)
            default:
                throw fail("decoder '\(type)' is not supported in a SentencePiece-style tokenizer; relora implements Sequence, Replace, ByteFallback, Fuse, Strip and Metaspace")
            }
        }
    }
}

/// A string as an error message quotes it: at most 40 characters, control characters escaped (a hostile
/// file's piece may hold a newline, and an error is one line).
func quoted(_ s: String) -> String {
    (s.count > 40 ? String(s.prefix(40)) + "..." : s).debugDescription
}

/// The `BPE` model of a SentencePiece-style tokenizer.json (outside the class: the compiler reports a
/// circular reference for this function inside the extension).
func readSentencePieceBPE(_ model: TJSON, _ fail: (String) -> ReLoRAError) throws -> SentencePieceTokenizer.Config {
    let zero: Bool = { if case .double(let x)? = model["dropout"] { return x == 0 }; return model["dropout"]?.intValue == 0 }()
    if let d = model["dropout"], !d.isNull, !zero {
        throw fail("BPE dropout \(d.summary) is not supported (encoding must be deterministic)")
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if let v = model[key], !v.isNull, v.stringValue != "" { throw fail("model.\(key) \(v.summary) is not supported") }
    }
    guard let vocabValue = model["vocab"], case .object(let vocab) = vocabValue else { throw fail("model.vocab must be an object mapping tokens to ids") }
    let count: Int = vocab.count
    var names: [String?] = Array(repeating: nil, count: count)
    var idOf: [String: Int32] = [:]
    for pair in vocab {
        let key: String = pair.0, value: TJSON = pair.1
        guard let id = value.intValue, id >= 0, id < vocab.count else {
            throw fail("model.vocab[\(quoted(key))] must be an id in 0..<\(vocab.count), got \(value.summary)")
        }
        guard names[id] == nil else { throw fail("model.vocab id \(id) is used twice") }
        names[id] = key
        idOf[key] = Int32(id)
    }
    let pieces = names.map { $0! }
    guard case .array(let items)? = model["merges"] else { throw fail("model.merges must be an array") }
    var merges = [UInt64: UInt64](minimumCapacity: items.count)
    for (rank, item) in items.enumerated() {
        let a: String, b: String
        switch item {
        case .string(let s):
            let parts = s.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2 else { throw fail("merge \(rank) \(item.summary) is not two tokens separated by a space") }
            (a, b) = (String(parts[0]), String(parts[1]))
        case .array(let pair):
            guard pair.count == 2, let x = pair[0].stringValue, let y = pair[1].stringValue else { throw fail("merge \(rank) must be a pair of strings") }
            (a, b) = (x, y)
        default:
            throw fail("merge \(rank) must be a string \"a b\" or a pair [\"a\", \"b\"], got \(item.summary)")
        }
        guard let ia = idOf[a], let ib = idOf[b] else { throw fail("merge \(rank) names a token that is not in model.vocab") }
        guard let merged = idOf[a + b] else { throw fail("merge \(rank) produces \(quoted(a + b)), which is not in model.vocab") }
        merges[UInt64(UInt32(ia)) << 32 | UInt64(UInt32(ib))] = UInt64(rank) << 32 | UInt64(UInt32(merged))
    }
    var unkId: Int32? = nil
    if let u = model["unk_token"], !u.isNull {
        guard let name = u.stringValue, let id = idOf[name] else { throw fail("model.unk_token \(u.summary) is not in model.vocab") }
        unkId = id
    }
    let byteFallback = try SentencePieceTokenizer.flag(model, "byte_fallback", false, fail)
    let ignoreMerges = try SentencePieceTokenizer.flag(model, "ignore_merges", false, fail)
    let fuseUnk = try SentencePieceTokenizer.flag(model, "fuse_unk", false, fail)
    let bpe = SentencePieceTokenizer.Model.bpeByRank(merges: merges, ignoreMerges: ignoreMerges)
    let scores = [Double](repeating: 0, count: pieces.count)
    let types = [SentencePieceTokenizer.PieceType](repeating: .normal, count: pieces.count)
    return SentencePieceTokenizer.Config(rules: .tokenizers, model: bpe, pieces: pieces, scores: scores, types: types,
                  byteFallback: byteFallback, unkId: unkId, fuseUnk: fuseUnk)
}

