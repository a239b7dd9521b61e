import Foundation
import ReLoRACore
import ReLoRAFormats

/// Reading SentencePiece's `tokenizer.model`, a `ModelProto` protocol buffer (sentencepiece_model.proto).
/// The fields read (others are skipped, as protobuf readers do):
///
/// | message | field | use |
/// |---|---|---|
/// | ModelProto | 1 `pieces` (repeated SentencePiece) | the vocabulary, id = position |
/// | SentencePiece | 1 `piece` string, 2 `score` float, 3 `type` enum | NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6 (default NORMAL) |
/// | ModelProto | 2 `trainer_spec` | 3 `model_type` (UNIGRAM 1 default, BPE 2; WORD 3 and CHAR 4 refused), 35 `byte_fallback`, 24 `treat_whitespace_as_suffix` (refused when true), 42 `eos_id`, 41 `bos_id`, 43 `pad_id` (for a GGUF export), 44 `unk_surface` |
/// | ModelProto | 3 `normalizer_spec` | 1 `name`, 2 `precompiled_charsmap`, 3 `add_dummy_prefix` (default true), 4 `remove_extra_whitespaces` (default true), 5 `escape_whitespaces` (default true) |
/// | ModelProto | 5 `denormalizer_spec` | refused when it has a charsmap |
///
/// Checked as the library checks when loading: one UNKNOWN piece, no empty or repeated piece, BYTE
/// pieces spelled `<0xNN>` only with `byte_fallback`, and then all 256 of them. A field with the wrong wire
/// type, a truncated or overlong field, an out-of-range enum or invalid UTF-8 is one sentence, never a crash.
extension SentencePieceTokenizer {
    public convenience init(modelProto bytes: [UInt8], path: String) throws {
        func fail(_ reason: String) -> ReLoRAError { .invalidFile(path: path, reason: reason) }
        typealias Fields = [(field: Int, value: ProtobufReader.Value)]
        func fields(_ b: [UInt8], _ what: String) throws -> Fields {
            do { return try ProtobufReader.fields(b) } catch ReLoRAError.invalidData(let m) {
                throw fail("not a SentencePiece model: \(m) in the \(what)")
            }
        }
        func varint(_ v: ProtobufReader.Value, _ what: String) throws -> UInt64 {
            guard case .varint(let x) = v else { throw fail("not a SentencePiece model: \(what) has the wrong wire type") }
            return x
        }
        func bool(_ v: ProtobufReader.Value, _ what: String) throws -> Bool { try varint(v, what) != 0 }
        func int32(_ v: ProtobufReader.Value, _ what: String) throws -> Int32 { Int32(truncatingIfNeeded: try varint(v, what)) }
        func data(_ v: ProtobufReader.Value, _ what: String) throws -> [UInt8] {
            guard case .bytes(let b) = v else { throw fail("not a SentencePiece model: \(what) has the wrong wire type") }
            return b
        }
        func text(_ v: ProtobufReader.Value, _ what: String) throws -> String {
            let b = try data(v, what)
            guard let s = String(validating: b, as: UTF8.self) else { throw fail("\(what) is not valid UTF-8") }
            return s
        }

        guard !bytes.isEmpty else { throw fail("the file is empty, not a SentencePiece model") }
        var pieces: [String] = [], scores: [Double] = [], types: [PieceType] = []
        var modelType: UInt64 = 1, byteFallback = false, whitespaceSuffix = false
        var eosId: Int32 = 2, bosId: Int32 = 1, padId: Int32 = -1
        var unkSurface = " \u{2047} "
        var normalizerName = "", charsMap: [UInt8] = []
        var addDummyPrefix = true, removeExtra = true, escape = true
        for (field, value) in try fields(bytes, "ModelProto") {
            switch field {
            case 1:
                let k = pieces.count
                var piece: String? = nil, score: Float = 0, type: UInt64 = 1
                for (f, v) in try fields(try data(value, "piece \(k)"), "piece \(k)") {
                    switch f {
                    case 1: piece = try text(v, "piece \(k)")
                    case 2:
                        guard case .fixed32(let bits) = v else { throw fail("not a SentencePiece model: the score of piece \(k) has the wrong wire type") }
                        score = Float(bitPattern: bits)
                    case 3: type = try varint(v, "the type of piece \(k)")
                    default: continue
                    }
                }
                guard let piece, !piece.isEmpty else { throw fail("piece \(k) is empty") }
                guard score.isFinite else { throw fail("piece \(k) \(quoted(piece)) has a score that is not finite") }
                guard let t = PieceType(rawValue: Int(truncatingIfNeeded: type)), type <= 6 else {
                    throw fail("piece \(k) \(quoted(piece)) has type \(type), not one of NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6")
                }
                pieces.append(piece)
                scores.append(Double(score))
                types.append(t)
            case 2:
                for (f, v) in try fields(try data(value, "trainer_spec"), "trainer_spec") {
                    switch f {
                    case 3: modelType = try varint(v, "trainer_spec.model_type")
                    case 35: byteFallback = try bool(v, "trainer_spec.byte_fallback")
                    case 24: whitespaceSuffix = try bool(v, "trainer_spec.treat_whitespace_as_suffix")
                    case 41: bosId = try int32(v, "trainer_spec.bos_id")
                    case 42: eosId = try int32(v, "trainer_spec.eos_id")
                    case 43: padId = try int32(v, "trainer_spec.pad_id")
                    case 44: unkSurface = try text(v, "trainer_spec.unk_surface")
                    default: continue
                    }
                }
            case 3:
                for (f, v) in try fields(try data(value, "normalizer_spec"), "normalizer_spec") {
                    switch f {
                    case 1: normalizerName = try text(v, "normalizer_spec.name")
                    case 2: charsMap = try data(v, "normalizer_spec.precompiled_charsmap")
                    case 3: addDummyPrefix = try bool(v, "normalizer_spec.add_dummy_prefix")
                    case 4: removeExtra = try bool(v, "normalizer_spec.remove_extra_whitespaces")
                    case 5: escape = try bool(v, "normalizer_spec.escape_whitespaces")
                    default: continue
                    }
                }
            case 5:
                for (f, v) in try fields(try data(value, "denormalizer_spec"), "denormalizer_spec") where f == 2 {
                    if !(try data(v, "denormalizer_spec.precompiled_charsmap")).isEmpty {
                        throw fail("the model has a denormalizer (a charsmap applied when decoding), which relora does not implement")
                    }
                }
            default: continue
            }
        }
        guard !pieces.isEmpty else { throw fail("the model has no pieces; not a SentencePiece model") }
        let model: Model
        switch modelType {
        case 1: model = .unigram
        case 2: model = .bpeByScore
        case 3: throw fail("the SentencePiece model type is WORD, which relora does not implement (only UNIGRAM and BPE)")
        case 4: throw fail("the SentencePiece model type is CHAR, which relora does not implement (only UNIGRAM and BPE)")
        default: throw fail("trainer_spec.model_type \(modelType) is not a SentencePiece model type (UNIGRAM 1, BPE 2)")
        }
        guard !whitespaceSuffix else { throw fail("treat_whitespace_as_suffix is set, which relora does not implement") }
        var seen = Set<String>()
        var unkId: Int32? = nil
        var userDefined = PieceTrie()
        for (k, p) in pieces.enumerated() {
            guard seen.insert(p).inserted else { throw fail("piece \(quoted(p)) is defined twice") }
            switch types[k] {
            case .unknown:
                guard unkId == nil else { throw fail("the model defines two UNKNOWN pieces (\(unkId!) and \(k))") }
                unkId = Int32(k)
            case .byte:
                guard byteFallback else { throw fail("piece \(k) \(quoted(p)) is a BYTE piece but byte_fallback is off") }
                guard Self.byteValue(p) != nil else { throw fail("BYTE piece \(k) \(quoted(p)) is not spelled <0xNN>") }
            case .userDefined:
                userDefined.insert(Array(p.utf8), id: Int32(k))
            default: break
            }
        }
        guard unkId != nil else { throw fail("the model has no UNKNOWN piece; not a valid SentencePiece model") }
        var normalizer = SPMNormalizer(charsMap: nil, userDefined: userDefined, addDummyPrefix: addDummyPrefix,
                                       removeExtraWhitespaces: removeExtra, escapeWhitespaces: escape)
        if !charsMap.isEmpty {
            do { normalizer.charsMap = try CharsMap.parse(charsMap) } catch let e as CharsMap.Malformed {
                throw fail("normalizer '\(normalizerName)': \(e.reason)")
            }
        }
        func validId(_ id: Int32) -> Int32? { id >= 0 && Int(id) < pieces.count ? id : nil }
        var config = Config(rules: .sentencePiece, model: model, pieces: pieces, scores: scores, types: types,
                            byteFallback: byteFallback, unkId: unkId)
        config.normalizer = normalizer
        config.unkSurface = unkSurface
        config.eosId = validId(eosId)
        config.bosId = validId(bosId)
        config.padId = validId(padId)
        try self.init(config, path: path)
    }

    /// Reads a `tokenizer.model` file.
    public convenience init(modelFile path: String) throws {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot read the tokenizer model (\(error.localizedDescription))")
        }
        try self.init(modelProto: Array(data), path: path)
    }

    /// SentencePiece tokenizers in GGUF metadata (`tokenizer.ggml.model = "llama"`), as llama.cpp's
    /// converter writes them from a `tokenizer.model`: `tokens`, `scores` (f32) and `token_type`
    /// (SentencePiece's type numbers), `bos/eos/unknown/padding_token_id`, `add_bos_token` (default true: the
    /// BOS is `prefixId`) and `add_space_prefix` (default true). llama.cpp tokenizes these as SentencePiece BPE
    /// (merge by score, byte fallback when BYTE tokens exist, no charsmap), whatever model the original was;
    /// so does relora. `tokenizer.ggml.remove_extra_whitespaces` is ignored, as llama.cpp's SPM tokenizer
    /// ignores it (it reads the key for T5's Unigram only): llama-cpp-python 0.3.36 gives the same ids for
    /// "  hello   world  " with the key true and false (`Tests/Fixtures/make_sentencepiece_gguf_export.py`
    /// records them, `SentencePieceGGUFExportTests` checks relora against them).
    public convenience init(gguf file: GGUFFile) throws {
        func fail(_ reason: String) -> ReLoRAError { .invalidFile(path: file.path, reason: reason) }
        let m = file.metadata
        guard m["tokenizer.ggml.model"]?.string == "llama" else {
            throw fail("the tokenizer is \(m["tokenizer.ggml.model"]?.string.map { "'\($0)'" } ?? "missing") (tokenizer.ggml.model); a SentencePiece tokenizer is 'llama'")
        }
        guard let tokens = m["tokenizer.ggml.tokens"]?.strings, !tokens.isEmpty else {
            throw fail("tokenizer.ggml.tokens is missing or not an array of strings")
        }
        var scores = [Double](repeating: 0, count: tokens.count)
        if let value = m["tokenizer.ggml.scores"] {
            guard case .array(_, let items) = value, items.count == tokens.count else {
                throw fail("tokenizer.ggml.scores must be \(tokens.count) numbers, one per token")
            }
            for (k, item) in items.enumerated() {
                guard let d = item.double ?? item.integer.map(Double.init), d.isFinite else { throw fail("tokenizer.ggml.scores[\(k)] is not a finite number") }
                if case .float32(let f) = item { scores[k] = Double(f) } else { scores[k] = Double(Float(d)) }
            }
        }
        var types = [PieceType](repeating: .normal, count: tokens.count)
        if let value = m["tokenizer.ggml.token_type"] {
            guard let t = value.integers, t.count == tokens.count else { throw fail("tokenizer.ggml.token_type must be \(tokens.count) integers, one per token") }
            for (k, v) in t.enumerated() {
                guard let type = PieceType(rawValue: v) else { throw fail("tokenizer.ggml.token_type[\(k)] is \(v), not a token type 1...6") }
                types[k] = type
            }
        }
        func id(_ key: String) throws -> Int32? {
            guard let v = m[key] else { return nil }
            guard let i = v.integer, i >= 0, i < tokens.count else { throw fail("\(key) is not a token id below \(tokens.count)") }
            return Int32(i)
        }
        var unkId = try id("tokenizer.ggml.unknown_token_id")
        if unkId == nil { unkId = types.firstIndex(of: .unknown).map { Int32($0) } }
        var userDefined = PieceTrie()
        for (k, t) in types.enumerated() where t == .userDefined { userDefined.insert(Array(tokens[k].utf8), id: Int32(k)) }
        let byteFallback = types.contains(.byte)
        var config = Config(rules: .sentencePiece, model: .bpeByScore, pieces: tokens, scores: scores, types: types,
                            byteFallback: byteFallback, unkId: unkId)
        config.normalizer = SPMNormalizer(charsMap: nil, userDefined: userDefined,
                                          addDummyPrefix: m["tokenizer.ggml.add_space_prefix"]?.bool ?? true,
                                          removeExtraWhitespaces: false,
                                          escapeWhitespaces: true)
        config.eosId = try id("tokenizer.ggml.eos_token_id")
        config.bosId = try id("tokenizer.ggml.bos_token_id")
        config.padId = try id("tokenizer.ggml.padding_token_id")
        if m["tokenizer.ggml.add_bos_token"]?.bool ?? true { config.prefixTokenId = config.bosId }
        try self.init(config, path: file.path)
    }
}

extension SentencePieceTokenizer {
    /// This tokenizer as a SentencePiece `tokenizer.model` (`ModelProto`), for a Hugging Face export of a model
    /// whose tokenizer came from GGUF metadata (a GGUF file, a run's `tokenizer.gguf`): the pieces with their
    /// scores and types; `trainer_spec` with `model_type` (BPE 2 or UNIGRAM 1), `byte_fallback`, the
    /// unk/bos/eos/pad ids (-1 for none) and `unk_surface`; `normalizer_spec` named `identity` with
    /// `add_dummy_prefix`, `remove_extra_whitespaces` and `escape_whitespaces`. `init(modelProto:)` and
    /// `sentencepiece` read it back into the same segmentation (`make_sentencepiece_gguf_export.py`,
    /// `SentencePieceGGUFExportTests`). A tokenizer.json's rules and a charsmap have no such form: one sentence.
    public func modelProto() throws -> [UInt8] {
        guard rules == .sentencePiece else {
            throw ReLoRAError.unsupported("a SentencePiece-style tokenizer.json has no tokenizer.model form (its rules are the tokenizers library's)")
        }
        guard normalizer.charsMap == nil else {
            throw ReLoRAError.unsupported("this tokenizer's normalization charsmap is not kept in a form a tokenizer.model can hold")
        }
        var proto = ProtobufWriter()
        for (id, piece) in pieces.enumerated() {
            var p = ProtobufWriter()
            p.string(1, piece)
            p.float(2, Float(scores[id]))
            p.int64(3, Int64(types[id].rawValue))
            proto.message(1, p)
        }
        var trainer = ProtobufWriter()
        switch model {
        case .unigram: trainer.int64(3, 1)
        case .bpeByScore: trainer.int64(3, 2)
        case .bpeByRank: throw ReLoRAError.unsupported("a BPE merged by rank has no tokenizer.model form")  // only with tokenizers' rules
        }
        trainer.int64(35, byteIds.isEmpty ? 0 : 1)
        for (field, id) in [(40, unkId), (41, beginOfTextId), (42, endOfTextId), (43, padId)] { trainer.int64(field, Int64(id ?? -1)) }
        trainer.string(44, String(decoding: unkSurface, as: UTF8.self))
        proto.message(2, trainer)
        var spec = ProtobufWriter()
        spec.string(1, "identity")
        spec.int64(3, normalizer.addDummyPrefix ? 1 : 0)
        spec.int64(4, normalizer.removeExtraWhitespaces ? 1 : 0)
        spec.int64(5, normalizer.escapeWhitespaces ? 1 : 0)
        proto.message(3, spec)
        return proto.bytes
    }
}
