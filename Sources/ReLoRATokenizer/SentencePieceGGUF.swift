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
        let unlike = "so llama.cpp's 'llama' tokenizer (SentencePiece BPE by piece score) would tokenize differently from the training data; export --format hf instead"
        guard rules == .sentencePiece else {
            throw ReLoRAError.unsupported("GGUF export writes SentencePiece tokenizers read from a tokenizer.model or a GGUF file, and this one is a tokenizer.json, whose model, normalizer and pre-tokenizer follow the tokenizers library's rules, \(unlike) (or train with the model's tokenizer.model as the recipe's tokenizer)")
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
        m.append(("tokenizer.ggml.add_bos_token", .bool(prefixId != nil)))
        m.append(("tokenizer.ggml.add_eos_token", .bool(false)))
        m.append(("tokenizer.ggml.add_space_prefix", .bool(normalizer.addDummyPrefix)))
        m.append(("tokenizer.ggml.remove_extra_whitespaces", .bool(false)))
        return m
    }
}
