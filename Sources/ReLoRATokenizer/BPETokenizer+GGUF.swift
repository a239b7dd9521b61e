import Foundation
import ReLoRACore
import ReLoRAFormats

/// Extends a GGUF vocabulary to a model's `vocabSize` ids (an embedding padded past the tokenizer, e.g. to a
/// multiple of 64): `[PAD<id>]` tokens of type unused (5), as llama.cpp's converter pads; a name already in
/// `seen` (the vocabulary) is bracketed again until it is new, since llama.cpp needs every token string once.
func padGGUFVocabulary(_ tokens: inout [String], _ types: inout [Int32], seen: inout Set<String>, to vocabSize: Int) {
    for id in tokens.count ..< max(vocabSize, tokens.count) {
        var pad = "[PAD\(id)]"
        while seen.contains(pad) { pad = "[" + pad + "]" }
        seen.insert(pad)
        tokens.append(pad)
        types.append(BPETokenizer.tokenUnused)
    }
}

/// Byte-level BPE tokenizers in GGUF metadata, as llama.cpp reads them (`tokenizer.ggml.model = "gpt2"`).
///
/// | key | value |
/// |---|---|
/// | `tokenizer.ggml.model` | `"gpt2"` (byte-level BPE) |
/// | `tokenizer.ggml.pre` | the pre-tokenizer: `"gpt-2"` or `"llama-bpe"`, see `ggufPreTokenizer` |
/// | `tokenizer.ggml.tokens` | one string per id, the model's whole vocabulary: vocabulary keys in the byte-level alphabet (`"Ġthe"`), added tokens by content, and `[PAD<id>]` for ids past the tokenizer up to the model's vocab_size |
/// | `tokenizer.ggml.token_type` | i32 per id: 1 normal, 3 control (special added token), 4 user-defined (other added token), 5 unused (padding) |
/// | `tokenizer.ggml.merges` | `"a b"` per merge, in rank order |
/// | `tokenizer.ggml.bos_token_id`, `eos_token_id` | the end-of-text token (GPT-2's convention: one token separates documents), if the tokenizer has one; the BOS is the token relora puts before each document instead, if it puts one (`prefixId`) |
/// | `tokenizer.ggml.add_bos_token`, `add_eos_token` | whether relora puts a BOS before each document (false for its own tokenizers, which train without one, true for a LLaMA 3 `tokenizer.json` or a GGUF tokenizer that adds one; llama.cpp's `llama-bpe` would otherwise add one), and false |
extension BPETokenizer {
    static let tokenNormal: Int32 = 1, tokenControl: Int32 = 3, tokenUserDefined: Int32 = 4, tokenUnused: Int32 = 5
    static let tokenUnknown: Int32 = 2, tokenByte: Int32 = 6

    /// llama.cpp's `tokenizer.ggml.pre` name for this tokenizer's pre-tokenization and merge rule:
    /// `gpt-2` for the GPT-2 regex (relora's trained tokenizers), `llama-bpe` for the LLaMA-3 regex with
    /// `ignore_merges` (llama.cpp's LLAMA3 type always ignores merges for whole-vocabulary pieces).
    /// Anything else has no llama.cpp equivalent and is an error rather than a file that tokenizes
    /// differently: llama.cpp builds of 2024-2025 refuse a name they do not know ("unknown pre-tokenizer
    /// type"), and newer ones, like a file without the key, warn and use their `default` pre-tokenizer,
    /// whose regexes (punctuation runs and digit groups split first) are not GPT-2's.
    public func ggufPreTokenizer() throws -> String {
        let gpt2: [[PreTokenizerStep]] = [[.byteLevel(addPrefixSpace: false, useRegex: true)],
                                          [.split(.gpt2), .byteLevel(addPrefixSpace: false, useRegex: false)]]
        let llama3: [PreTokenizerStep] = [.split(.llama3), .byteLevel(addPrefixSpace: false, useRegex: false)]
        if !ignoreMerges && gpt2.contains(steps) { return "gpt-2" }
        if ignoreMerges && steps == llama3 { return "llama-bpe" }
        throw ReLoRAError.unsupported("this tokenizer's pre-tokenization (\(steps), ignore_merges \(ignoreMerges)) has no llama.cpp equivalent; GGUF export supports the GPT-2 pattern (relora's own tokenizers) and the LLaMA-3 pattern with ignore_merges, both without add_prefix_space")
    }

    /// The `tokenizer.ggml.*` entries for a model with `vocabSize` ids (at least the tokenizer's).
    public func ggufMetadata(vocabSize: Int) throws -> [(String, GGUFValue)] {
        guard vocabSize >= self.vocabSize else {
            throw ReLoRAError.invalidData("the tokenizer has \(self.vocabSize) tokens but the model only \(vocabSize); it cannot be the model's tokenizer")
        }
        let pre = try ggufPreTokenizer()
        let addedById = Dictionary(addedTokens.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        var tokens: [String] = []
        var types: [Int32] = []
        tokens.reserveCapacity(vocabSize)
        var seen = Set<String>()
        for id in 0 ..< self.vocabSize {
            let token: String, type: Int32
            if let added = addedById[Int32(id)] {
                (token, type) = (added.content, added.special ? Self.tokenControl : Self.tokenUserDefined)
            } else {
                (token, type) = (modelTokens[id], Self.tokenNormal)
            }
            // llama.cpp maps text -> id and asserts the map is as large as the list.
            guard seen.insert(token).inserted else {
                throw ReLoRAError.invalidData("token \(TJSON.string(token).summary) appears twice in the vocabulary (id \(id)); llama.cpp needs every token string once")
            }
            tokens.append(token)
            types.append(type)
        }
        padGGUFVocabulary(&tokens, &types, seen: &seen, to: vocabSize)
        var merged: [String] = []
        merged.reserveCapacity(merges.count)
        for (a, b) in merges {
            let (x, y) = (modelTokens[Int(a)], modelTokens[Int(b)])
            guard !x.contains(" "), !y.contains(" ") else {
                throw ReLoRAError.invalidData("merge \(TJSON.string(x).summary) + \(TJSON.string(y).summary) contains a space, which GGUF's \"a b\" merge strings cannot hold")
            }
            merged.append(x + " " + y)
        }
        var m: [(String, GGUFValue)] = [
            ("tokenizer.ggml.model", .string("gpt2")),
            ("tokenizer.ggml.pre", .string(pre)),
            ("tokenizer.ggml.tokens", .array(.string, tokens.map { .string($0) })),
            ("tokenizer.ggml.token_type", .array(.int32, types.map { .int32($0) })),
            ("tokenizer.ggml.merges", .array(.string, merged.map { .string($0) })),
        ]
        // The BOS is the token relora put before each document (`prefixId`: LLaMA 3's <|begin_of_text|>, a
        // GGUF's own BOS), and then llama.cpp adds it too; else the end-of-text token, not added.
        if let bos = prefixId ?? endOfTextId { m.append(("tokenizer.ggml.bos_token_id", .uint32(UInt32(bos)))) }
        if let eot = endOfTextId { m.append(("tokenizer.ggml.eos_token_id", .uint32(UInt32(eot)))) }
        m.append(("tokenizer.ggml.add_bos_token", .bool(prefixId != nil)))
        m.append(("tokenizer.ggml.add_eos_token", .bool(false)))
        return m
    }

    /// The tokenizer of a GGUF file's `tokenizer.ggml.*` metadata (byte-level BPE, `gpt2` model, with
    /// the `gpt-2` or a LLaMA-3 pre-tokenizer). Ids: the model vocabulary runs up to the last normal
    /// token; control and user-defined tokens become added tokens (special and not); unused tokens after
    /// the last real one (the padding an export adds) are dropped.
    public convenience init(gguf file: GGUFFile) throws {
        func fail(_ reason: String) -> ReLoRAError { .invalidFile(path: file.path, reason: reason) }
        let model = file.metadata["tokenizer.ggml.model"]?.string
        guard model == "gpt2" else {
            throw fail("the tokenizer is \(model.map { "'\($0)'" } ?? "missing") (tokenizer.ggml.model); relora reads byte-level BPE ('gpt2') tokenizers only")
        }
        let steps: [PreTokenizerStep], ignoreMerges: Bool
        switch file.metadata["tokenizer.ggml.pre"]?.string {
        case "gpt-2"?:
            (steps, ignoreMerges) = ([.byteLevel(addPrefixSpace: false, useRegex: true)], false)
        case "llama-bpe"?, "llama3"?, "llama-v3"?:
            (steps, ignoreMerges) = ([.split(.llama3), .byteLevel(addPrefixSpace: false, useRegex: false)], true)
        case let other:
            throw fail("pre-tokenizer \(other.map { "'\($0)'" } ?? "missing") (tokenizer.ggml.pre) is not supported; relora reads 'gpt-2' and 'llama-bpe'")
        }
        guard let tokens = file.metadata["tokenizer.ggml.tokens"]?.strings else {
            throw fail("tokenizer.ggml.tokens is missing or not an array of strings")
        }
        var types = [Int](repeating: Int(Self.tokenNormal), count: tokens.count)
        if let value = file.metadata["tokenizer.ggml.token_type"] {
            guard let t = value.integers, t.count == tokens.count else {
                throw fail("tokenizer.ggml.token_type must be \(tokens.count) integers, one per token")
            }
            types = t
        }
        let addedTypes = [Int(Self.tokenControl), Int(Self.tokenUserDefined)]
        let realEnd = (types.lastIndex { $0 != Int(Self.tokenUnused) } ?? -1) + 1
        let modelEnd = (types.lastIndex { !addedTypes.contains($0) && $0 != Int(Self.tokenUnused) } ?? -1) + 1
        let modelTokens = Array(tokens[0 ..< modelEnd])
        var added: [AddedToken] = []
        for id in 0 ..< realEnd where addedTypes.contains(types[id]) {
            let special = types[id] == Int(Self.tokenControl)
            added.append(AddedToken(id: Int32(id), content: tokens[id], normalized: !special, special: special))
        }
        guard let mergeStrings = file.metadata["tokenizer.ggml.merges"]?.strings else {
            throw fail("tokenizer.ggml.merges is missing or not an array of strings; a byte-level BPE tokenizer needs its merges")
        }
        var idOf = [String: Int32](minimumCapacity: modelTokens.count)
        for (id, t) in modelTokens.enumerated() where idOf[t] == nil { idOf[t] = Int32(id) }
        var merges: [(Int32, Int32)] = []
        merges.reserveCapacity(mergeStrings.count)
        for (rank, s) in mergeStrings.enumerated() {
            // As llama.cpp: split at the first space after the first character.
            guard let space = s.dropFirst().firstIndex(of: " ") else { throw fail("merge \(rank) \(TJSON.string(s).summary) is not two tokens separated by a space") }
            let a = String(s[..<space]), b = String(s[s.index(after: space)...])
            guard let ia = idOf[a], let ib = idOf[b] else {
                throw fail("merge \(rank) \(TJSON.string(s).summary) names a token that is not in the vocabulary")
            }
            merges.append((ia, ib))
        }
        // A file that asks for a BOS (LLaMA 3's, made by llama.cpp) gets it as the post-processor's leading
        // token (`prefixId`); relora's own exports write add_bos_token as their prefixId says.
        var post: TJSON = .null
        if file.metadata["tokenizer.ggml.add_bos_token"]?.bool == true, let bos = file.metadata["tokenizer.ggml.bos_token_id"]?.integer,
           bos >= 0, bos < tokens.count {
            post = .object([("type", .string("TemplateProcessing")), ("single", .array([
                .object([("SpecialToken", .object([("id", .string(tokens[bos])), ("type_id", .int(0))]))]),
                .object([("Sequence", .object([("id", .string("A")), ("type_id", .int(0))]))]),
            ]))])
        }
        try self.init(modelTokens: modelTokens, merges: merges, addedTokens: added, steps: steps,
                      ignoreMerges: ignoreMerges, postProcessor: post, path: file.path)
    }
}
