import Foundation
import ReLoRACore
import ReLoRAFormats

/// SentencePiece tokenizers as llama.cpp's `llama` GGUF tokenizer, in the layout llama.cpp's
/// `convert_hf_to_gguf.py` writes from a `tokenizer.model` (read back by `init(gguf:)`):
///
/// | key | value |
/// |---|---|
/// | `tokenizer.ggml.model`, `tokenizer.ggml.pre` | `"llama"`, `"default"` |
/// | `tokenizer.ggml.tokens` | the pieces by id, then `[PAD<id>]` up to the model's vocab_size |
/// | `tokenizer.ggml.scores` | f32 per id: the piece scores (BPE merges by them); -1000 for padding, as the converter |
/// | `tokenizer.ggml.token_type` | i32 per id: the SentencePiece piece type (normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6); padding unused |
/// | `tokenizer.ggml.bos/eos/unknown/padding_token_id` | u32, those the tokenizer has |
/// | `tokenizer.ggml.add_bos_token` | whether relora puts the BOS before a document (`prefixId`): false for a `tokenizer.model` (sentencepiece's `encode` adds none, so `relora tokenize` made the training data without one), the source's value for a GGUF tokenizer; llama.cpp then prompts the model as it was trained |
/// | `tokenizer.ggml.add_eos_token` | false |
/// | `tokenizer.ggml.add_space_prefix` | `add_dummy_prefix` |
/// | `tokenizer.ggml.remove_extra_whitespaces` | false |
///
/// llama.cpp tokenizes a `llama` vocabulary as SentencePiece BPE: no normalization charsmap, spaces
/// escaped as ▁, a dummy prefix if `add_space_prefix`, pairs merged by the merged piece's score, byte
/// fallback where BYTE pieces exist, user-defined pieces kept whole, and extra whitespace kept (it ignores
/// `remove_extra_whitespaces` for SPM). Only tokenizers with exactly those rules are written; every other
/// one is refused with one sentence, since its GGUF would tokenize differently from the training data.
extension SentencePieceTokenizer {
    public func ggufMetadata(vocabSize: Int) throws -> [(String, GGUFValue)] {
        try ggufMetadata(vocabSize: vocabSize, addBOS: prefixId != nil)
    }

    /// The metadata with `add_bos_token` given: a stand-in `tokenizer.model` writes the BOS use of the
    /// tokenizer.json it stands in for (`GGUFStandInTokenizer`).
    func ggufMetadata(vocabSize: Int, addBOS: Bool) throws -> [(String, GGUFValue)] {
        let unlike = "so llama.cpp's 'llama' tokenizer (SentencePiece BPE by piece score) would tokenize differently from the training data; export --format hf instead"
        guard rules == .sentencePiece else {
            throw ReLoRAError.unsupported("GGUF export writes SentencePiece tokenizers read from a tokenizer.model or a GGUF file, and this one is a tokenizer.json, whose model, normalizer and pre-tokenizer follow the tokenizers library's rules, \(unlike) (keep the model's tokenizer.model beside the tokenizer.json, as Hugging Face's Llama directories do, or name it as the recipe's tokenizer)")
        }
        guard case .bpeByScore = model else {
            throw ReLoRAError.unsupported("GGUF export writes SentencePiece BPE tokenizers, and this one is a Unigram model (segmented by Viterbi over piece scores), \(unlike)")
        }
        guard normalizer.charsMap == nil else {
            throw ReLoRAError.unsupported("this SentencePiece tokenizer normalizes text with a precompiled charsmap (e.g. nmt_nfkc), which a 'llama' GGUF tokenizer cannot hold, \(unlike)")
        }
        guard !normalizer.removeExtraWhitespaces else {
            throw ReLoRAError.unsupported("this SentencePiece tokenizer removes extra whitespace (remove_extra_whitespaces), which llama.cpp's 'llama' tokenizer does not do, \(unlike)")
        }
        guard normalizer.escapeWhitespaces else {
            throw ReLoRAError.unsupported("this SentencePiece tokenizer does not escape whitespace as ▁ (escape_whitespaces off), which llama.cpp's 'llama' tokenizer always does, \(unlike)")
        }
        guard vocabSize >= self.vocabSize else {
            throw ReLoRAError.invalidData("the tokenizer has \(self.vocabSize) tokens but the model only \(vocabSize); it cannot be the model's tokenizer")
        }
        var tokens: [String] = [], types: [Int32] = []
        tokens.reserveCapacity(vocabSize)
        types.reserveCapacity(vocabSize)
        var seen = Set<String>()
        for (id, piece) in pieces.enumerated() {
            guard seen.insert(piece).inserted else {
                throw ReLoRAError.invalidData("piece \(quoted(piece)) appears twice in the vocabulary (id \(id)); llama.cpp needs every token string once")
            }
            tokens.append(piece)
            types.append(Int32(self.types[id].rawValue))
        }
        padGGUFVocabulary(&tokens, &types, seen: &seen, to: vocabSize)
        let scores = scores.map { Float($0) } + [Float](repeating: -1000, count: tokens.count - pieces.count)
        var m: [(String, GGUFValue)] = [
            ("tokenizer.ggml.model", .string("llama")),
            ("tokenizer.ggml.pre", .string("default")),
            ("tokenizer.ggml.tokens", .array(.string, tokens.map { .string($0) })),
            ("tokenizer.ggml.scores", .array(.float32, scores.map { .float32($0) })),
            ("tokenizer.ggml.token_type", .array(.int32, types.map { .int32($0) })),
        ]
        for (key, id) in [("bos", beginOfTextId), ("eos", endOfTextId), ("unknown", unkId), ("padding", padId)] {
            if let id { m.append(("tokenizer.ggml.\(key)_token_id", .uint32(UInt32(id)))) }
        }
        m.append(("tokenizer.ggml.add_bos_token", .bool(addBOS)))
        m.append(("tokenizer.ggml.add_eos_token", .bool(false)))
        m.append(("tokenizer.ggml.add_space_prefix", .bool(normalizer.addDummyPrefix)))
        m.append(("tokenizer.ggml.remove_extra_whitespaces", .bool(false)))
        return m
    }
}

/// A SentencePiece-style tokenizer.json (the tokenizer a run trained with: every id and text is its) whose GGUF
/// tokenizer is written from the `tokenizer.model` beside it (a Hugging Face Llama directory ships both),
/// since llama.cpp's `llama` tokenizer has the `tokenizer.model`'s rules, not the tokenizers library's. Made
/// only by `init(json:model:modelPath:)`, which first checks that the two tokenize alike.
public final class GGUFStandInTokenizer: TextTokenizer {
    public let json: SentencePieceTokenizer
    public let model: SentencePieceTokenizer

    /// Strings both must tokenize to the same ids (besides every piece's own text): whitespace runs and
    /// leading, trailing and lone spaces, digits, punctuation, accents, scripts a small vocabulary lacks
    /// (byte fallback or unknown), emoji, the "▁" character and special tokens' spellings as text.
    static let probeStrings = [
        "Hello world", " Hello world", "Hello  world", "   leading and trailing   ", " ", "  ", "a", "\n", "line one\nline two\n\n",
        "\ttab\tseparated", "The year 2024 had 366 days.", "3.14159 + 2,718 = 5.86", "don't stop; \"quote\" (paren) [x] {y}",
        "café naïve résumé Ærøskøbing", "Привет, мир", "日本語のテキスト", "한국어", "مرحبا", "emoji 🙂🚀 end", "▁already▁escaped",
        "<s> and </s> and <unk> as text", "ALL CAPS and MiXeD", "under_score-dash/slash\\back", "x".padding(toLength: 64, withPad: "y", startingAt: 0),
    ]

    /// `json` and `model` (read from `modelPath`) if they give the same ids for the probe strings and for every
    /// normal or user-defined piece's text, have the same pieces, and the tokenizer.json's BOS (if it puts one
    /// first) is the model's; else one sentence naming the first difference.
    public init(json: SentencePieceTokenizer, model: SentencePieceTokenizer, modelPath: String) throws {
        func differ(_ what: String) -> ReLoRAError {
            .invalidData("the tokenizer.model beside the run's tokenizer.json (\(modelPath)) \(what), so a GGUF tokenizer written from it would tokenize differently from the training data; remove it, or replace it with the model's own tokenizer.model")
        }
        guard json.vocabSize == model.vocabSize else {
            throw differ("has \(model.vocabSize) ids where the tokenizer.json has \(json.vocabSize)")
        }
        if let id = (0..<min(json.pieces.count, model.pieces.count)).first(where: { json.pieces[$0] != model.pieces[$0] }) {
            throw differ("has piece \(quoted(model.pieces[id])) at id \(id) where the tokenizer.json has \(quoted(json.pieces[id]))")
        }
        if let bos = json.prefixId, bos != model.beginOfTextId {
            throw differ("does not have the tokenizer.json's BOS (id \(bos)) as its BOS")
        }
        let pieceTexts = model.pieces.indices.filter { [.normal, .userDefined].contains(model.types[$0]) }
            .map { model.pieces[$0].replacingOccurrences(of: "\u{2581}", with: " ") }
        for text in Self.probeStrings + pieceTexts {
            let a = json.encode(text), b = model.encode(text)
            guard a == b else { throw differ("tokenizes \(quoted(text)) as \(b) where the tokenizer.json gives \(a)") }
        }
        self.json = json
        self.model = model
    }

    /// What a GGUF export writes for `tokenizer`: a stand-in when it is a SentencePiece-style tokenizer.json
    /// and `modelPath` names the tokenizer.model beside it (checked as `init` does), else `tokenizer` itself.
    public static func forGGUF(_ tokenizer: any TextTokenizer, tokenizerModel modelPath: String?) throws -> any TextTokenizer {
        guard let json = tokenizer as? SentencePieceTokenizer, json.rules == .tokenizers, let modelPath else { return tokenizer }
        let model = try SentencePieceTokenizer(modelFile: modelPath)
        return try GGUFStandInTokenizer(json: json, model: model, modelPath: modelPath)
    }

    public var vocabSize: Int { json.vocabSize }
    public var endOfTextId: Int32? { json.endOfTextId }
    public var prefixId: Int32? { json.prefixId }
    public func encode(_ text: String) -> [Int32] { json.encode(text) }
    public func encode(utf8 bytes: UnsafeBufferPointer<UInt8>) throws -> [Int32] { try json.encode(utf8: bytes) }
    public func decode(_ ids: [Int32]) -> String { json.decode(ids) }
    public func bytes(of id: Int32) -> [UInt8]? { json.bytes(of: id) }
    /// The `tokenizer.model`'s metadata, with the tokenizer.json's BOS use (training data made with it has
    /// the BOS before each document when its post-processor puts one first).
    public func ggufMetadata(vocabSize: Int) throws -> [(String, GGUFValue)] {
        try model.ggufMetadata(vocabSize: vocabSize, addBOS: json.prefixId != nil)
    }
}
