import ReLoRACore
import ReLoRAFormats
/// Reads the parts of a Hugging Face `tokenizer.json` that a byte-level BPE tokenizer needs, rejecting
/// everything this implementation would not reproduce exactly (with one sentence saying what and why).
struct TokenizerFileReader {
    let path: String

    struct Parts {
        var modelTokens: [String]
        var merges: [(Int32, Int32)]
        var addedTokens: [AddedToken]
        var steps: [PreTokenizerStep]
        var ignoreMerges: Bool
        var postProcessor: TJSON
    }

    func fail(_ reason: String) -> ReLoRAError { ReLoRAError.invalidFile(path: path, reason: reason) }

    func read(_ root: TJSON) throws -> Parts {
        guard case .object = root else { throw fail("a tokenizer.json must be a JSON object") }
        guard let model = root["model"], case .object = model else { throw fail("missing the 'model' object") }

        // Model: BPE only, byte-level only.
        let type = model["type"]?.stringValue
        if let type, type != "BPE" {
            throw fail("model type '\(type)' is not supported; only byte-level BPE is supported")
        }
        if type == nil && model["merges"] == nil {
            throw fail("model has no 'type' and no 'merges'; only byte-level BPE is supported")
        }
        if let bf = model["byte_fallback"], bf.boolValue == true {
            throw fail("BPE with byte_fallback (SentencePiece style) is not supported; only byte-level BPE is supported")
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if let v = model[key], !v.isNull, v.stringValue != "" {
                throw fail("model.\(key) \(v.summary) is not supported; only byte-level BPE is supported")
            }
        }
        if let d = model["dropout"], !d.isNull {
            let p: Double? = { if case .double(let x) = d { return x }; if case .int(let i) = d { return Double(i) }; return nil }()
            if p != 0 { throw fail("BPE dropout \(d.summary) is not supported (encoding must be deterministic)") }
        }
        var ignoreMerges = false
        if let v = model["ignore_merges"], !v.isNull {
            guard let b = v.boolValue else { throw fail("model.ignore_merges must be true or false") }
            ignoreMerges = b
        }

        // Vocab: key -> id, ids dense 0..<count.
        guard let vocabValue = model["vocab"], case .object(let vocab) = vocabValue else {
            throw fail("model.vocab must be an object mapping tokens to ids")
        }
        var modelTokens = [String?](repeating: nil, count: vocab.count)
        for (key, value) in vocab {
            guard let id = value.intValue else { throw fail("model.vocab[\(TJSON.string(key).summary)] must be an integer id, got \(value.summary)") }
            guard id >= 0, id < vocab.count else {
                throw fail("model.vocab ids must be dense 0..<\(vocab.count); \(TJSON.string(key).summary) has id \(id)")
            }
            guard modelTokens[id] == nil else {
                throw fail("model.vocab id \(id) is used by both \(TJSON.string(modelTokens[id]!).summary) and \(TJSON.string(key).summary)")
            }
            modelTokens[id] = key
        }
        let tokens = modelTokens.map { $0! }  // all filled: vocab.count distinct ids in 0..<vocab.count
        var idOf = [String: Int32](minimumCapacity: tokens.count)
        for (id, key) in tokens.enumerated() {
            if idOf.updateValue(Int32(id), forKey: key) != nil { throw fail("model.vocab has the token \(TJSON.string(key).summary) twice") }
        }

        // Merges: "a b" strings or ["a", "b"] pairs.
        guard let mergesValue = model["merges"], case .array(let mergeItems) = mergesValue else {
            throw fail("model.merges must be an array")
        }
        var merges = [(Int32, Int32)]()
        merges.reserveCapacity(mergeItems.count)
        for (rank, item) in mergeItems.enumerated() {
            let a: String, b: String
            switch item {
            case .string(let s):
                let parts = s.split(separator: " ", omittingEmptySubsequences: false)
                guard parts.count == 2 else { throw fail("merge \(rank) \(item.summary) is not two tokens separated by one space") }
                (a, b) = (String(parts[0]), String(parts[1]))
            case .array(let pair):
                guard pair.count == 2, let x = pair[0].stringValue, let y = pair[1].stringValue else {
                    throw fail("merge \(rank) must be a pair of strings")
                }
                (a, b) = (x, y)
            default:
                throw fail("merge \(rank) must be a string \"a b\" or a pair [\"a\", \"b\"], got \(item.summary)")
            }
            guard let ia = idOf[a], let ib = idOf[b] else {
                let missing = idOf[a] == nil ? a : b
                throw fail("merge \(rank) references \(TJSON.string(missing).summary), which is not in model.vocab")
            }
            merges.append((ia, ib))
        }

        // Added tokens.
        var added = [AddedToken]()
        if let list = root["added_tokens"], !list.isNull {
            guard case .array(let items) = list else { throw fail("added_tokens must be an array") }
            for (k, item) in items.enumerated() {
                guard case .object = item, let id = item["id"]?.intValue, let content = item["content"]?.stringValue else {
                    throw fail("added_tokens[\(k)] must be an object with an integer 'id' and a string 'content'")
                }
                guard id >= 0, id < Int(Int32.max) else { throw fail("added_tokens[\(k)] has an invalid id \(id)") }
                func flag(_ name: String, _ fallback: Bool) throws -> Bool {
                    guard let v = item[name], !v.isNull else { return fallback }
                    guard let b = v.boolValue else { throw fail("added_tokens[\(k)].\(name) must be true or false") }
                    return b
                }
                let special = try flag("special", false)
                added.append(AddedToken(id: Int32(id), content: content, singleWord: try flag("single_word", false),
                                        lstrip: try flag("lstrip", false), rstrip: try flag("rstrip", false),
                                        normalized: try flag("normalized", !special), special: special))
            }
        }

        // Normalizer: none.
        if let n = root["normalizer"], !n.isNull {
            let isEmptySequence = n["type"]?.stringValue == "Sequence" && n["normalizers"] == .array([])
            if !isEmptySequence {
                throw fail("normalizer '\(n["type"]?.stringValue ?? n.summary)' is not supported (only null)")
            }
        }

        // Pre-tokenizer: ByteLevel, or Sequence [Split(known pattern)..., ByteLevel].
        guard let pre = root["pre_tokenizer"], !pre.isNull else {
            throw fail("pre_tokenizer is null; only byte-level BPE (a ByteLevel pre-tokenizer) is supported")
        }
        var stepValues: [TJSON]
        if pre["type"]?.stringValue == "Sequence" {
            guard case .array(let list)? = pre["pretokenizers"] else { throw fail("pre_tokenizer Sequence needs a 'pretokenizers' array") }
            guard list.count <= 8 else { throw fail("pre_tokenizer Sequence has \(list.count) steps; at most 8 are supported") }
            stepValues = list
        } else {
            stepValues = [pre]
        }
        var steps = [PreTokenizerStep]()
        for (k, s) in stepValues.enumerated() {
            let stype = s["type"]?.stringValue ?? s.summary
            switch stype {
            case "ByteLevel":
                guard k == stepValues.count - 1 else { throw fail("the ByteLevel pre-tokenizer must be the last step") }
                let prefix = s["add_prefix_space"]?.boolValue ?? true
                let regex = s["use_regex"]?.boolValue ?? true
                steps.append(.byteLevel(addPrefixSpace: prefix, useRegex: regex))
            case "Split":
                guard let regex = s["pattern"]?["Regex"]?.stringValue else {
                    throw fail("unsupported pre-tokenizer pattern \(s["pattern"]?.summary ?? "null"): only the GPT-2 and LLaMA-3 regexes are supported")
                }
                guard let pattern = SplitPattern(regex: regex) else {
                    throw fail("unsupported pre-tokenizer pattern \(TJSON.string(regex).summary): only the GPT-2 and LLaMA-3 regexes are supported")
                }
                let behavior = s["behavior"]?.stringValue ?? "Isolated"
                guard behavior == "Isolated", s["invert"]?.boolValue != true else {
                    throw fail("Split pre-tokenizer with behavior '\(behavior)'\(s["invert"]?.boolValue == true ? " and invert" : "") is not supported (only Isolated)")
                }
                steps.append(.split(pattern))
            default:
                throw fail("pre-tokenizer '\(stype)' is not supported; only byte-level BPE (ByteLevel, optionally after a GPT-2 or LLaMA-3 Split) is supported")
            }
        }
        guard case .byteLevel? = steps.last else {
            throw fail("pre_tokenizer does not end with ByteLevel; only byte-level BPE is supported")
        }

        // Decoder: ByteLevel (or none).
        if let d = root["decoder"], !d.isNull, d["type"]?.stringValue != "ByteLevel" {
            throw fail("decoder '\(d["type"]?.stringValue ?? d.summary)' is not supported (only ByteLevel); only byte-level BPE is supported")
        }

        return Parts(modelTokens: tokens, merges: merges, addedTokens: added, steps: steps, ignoreMerges: ignoreMerges,
                     postProcessor: root["post_processor"] ?? .null)
    }
}
