import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRAFormats
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATokenizer
@testable import ReLoRATrain

/// GGUF export of SentencePiece tokenizers (`llama` tokenizer metadata), against the references:
/// `Tests/Fixtures/make_sentencepiece_gguf_export.py` exported a model with `sentencepiece/spm_bpe.model`
/// through `relora export --format gguf`, checked the metadata with the `gguf` package, loaded the file in
/// llama.cpp (llama-cpp-python) and recorded in `sentencepiece/gguf_export_expected.json` the strings whose
/// llama.cpp ids on the export equal sentencepiece's (all 50), and llama.cpp's ids of a whitespace run with
/// `remove_extra_whitespaces` true and false. `spm_bpe.gguf` is the same .model in the layout llama.cpp's
/// converter writes.
final class SentencePieceGGUFExportTests: XCTestCase {
    static let directory = fixturesDirectory() + "/sentencepiece"

    func fixture() throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Self.directory + "/gguf_export_expected.json"))
        return try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    /// The fixture's 50 strings and the ids llama.cpp gives them.
    func fixtureIDs() throws -> (strings: [String], ids: [[Int]]) {
        let f = try fixture()
        return (try XCTUnwrap(f["strings"] as? [String]), try XCTUnwrap(f["ids"] as? [[Int]]))
    }

    /// A Hugging Face directory `dir/hf` holding a random model of the fixture's vocabulary (416) and the given
    /// fixture files under the given names (`[fixture name: name in the directory]`).
    func makeHFDirectory(_ dir: String, tokenizerFiles: [String: String]) throws {
        let config = try LlamaConfig(hiddenSize: 32, intermediateSize: 64, numHiddenLayers: 1, numAttentionHeads: 2,
                                     numKeyValueHeads: 2, vocabSize: 416, rmsNormEps: 1e-6, ropeTheta: 10000,
                                     maxPositionEmbeddings: 64, tieWordEmbeddings: false)
        let model = LlamaModel(config: config, backend: CPUBackend())
        try model.weights.initializeRandom(seed: 3, std: 0.1, backend: model.backend)
        try HFCheckpoint.save(model: model, to: dir + "/hf")
        for (fixture, name) in tokenizerFiles {
            try FileManager.default.copyItem(atPath: Self.directory + "/" + fixture, toPath: dir + "/hf/" + name)
        }
    }

    func metadata(_ entries: [(String, GGUFValue)]) -> [String: GGUFValue] {
        Dictionary(entries, uniquingKeysWith: { a, _ in a })
    }

    /// The metadata has the converter's layout (`spm_bpe.gguf`: tokens, scores, token types, ids), padded as
    /// the converter pads, with add_bos_token false: relora's data from a tokenizer.model has no BOS.
    func testMetadataHasTheConvertersLayout() throws {
        let tok = try TokenizerLoader.load(Self.directory + "/spm_bpe.model")
        let m = metadata(try tok.ggufMetadata(vocabSize: 416))
        let converter = try GGUFFile(path: Self.directory + "/spm_bpe.gguf").metadata
        for key in ["tokens", "scores", "token_type"] {
            guard case .array(let type, let items)? = m["tokenizer.ggml.\(key)"], case .array(let want, let ref)? = converter["tokenizer.ggml.\(key)"] else {
                return XCTFail("tokenizer.ggml.\(key) is not an array")
            }
            XCTAssertEqual(type, want, key)
            XCTAssertEqual(items.count, 416, key)
            XCTAssertEqual(Array(items[..<400]), ref, key)
        }
        XCTAssertEqual(m["tokenizer.ggml.tokens"]?.strings?[400...].map { $0 }, (400 ..< 416).map { "[PAD\($0)]" })
        XCTAssertEqual(m["tokenizer.ggml.token_type"]?.integers?[400...].map { $0 }, [Int](repeating: 5, count: 16))
        guard case .array(_, let scores)? = m["tokenizer.ggml.scores"] else { return XCTFail("scores") }
        XCTAssertEqual(Array(scores[400...]), [GGUFValue](repeating: .float32(-1000), count: 16))
        for key in ["model", "bos_token_id", "eos_token_id", "unknown_token_id", "add_space_prefix", "remove_extra_whitespaces"] {
            XCTAssertEqual(m["tokenizer.ggml.\(key)"]?.integer ?? -1, converter["tokenizer.ggml.\(key)"]?.integer ?? -1, key)
            XCTAssertEqual(m["tokenizer.ggml.\(key)"]?.string, converter["tokenizer.ggml.\(key)"]?.string, key)
            XCTAssertEqual(m["tokenizer.ggml.\(key)"]?.bool, converter["tokenizer.ggml.\(key)"]?.bool, key)
        }
        let recorded = try XCTUnwrap(try fixture()["metadata"] as? [String: Any])
        XCTAssertEqual(m["tokenizer.ggml.add_bos_token"], .bool(try XCTUnwrap(recorded["add_bos_token"] as? Bool)))
        XCTAssertEqual(m["tokenizer.ggml.add_bos_token"], .bool(false))
        XCTAssertNil(m["tokenizer.ggml.padding_token_id"], "spm_bpe.model has no pad piece (pad_id -1)")
        assertInvalidData(try tok.ggufMetadata(vocabSize: 399), mentions: "the model only 399")
        // A tokenizer read from a GGUF file keeps its add_bos_token (true in the converter's file).
        let fromGGUF = metadata(try TokenizerLoader.load(Self.directory + "/spm_bpe.gguf").ggufMetadata(vocabSize: 400))
        XCTAssertEqual(fromGGUF["tokenizer.ggml.add_bos_token"], .bool(true))
    }

    /// `relora export --format gguf` of a Hugging Face directory whose tokenizer is spm_bpe.model: relora's
    /// GGUF tokenizer loader reads the export back into the ids llama.cpp gives on the same export, which are
    /// sentencepiece's (50 strings: whitespace runs, digits, byte fallback, unknown scripts, `▁`, `<s>` as text).
    func testExportedTokenizerGivesLlamaCppsIds() throws {
        let dir = temporaryDirectory()
        try makeHFDirectory(dir, tokenizerFiles: ["spm_bpe.model": "tokenizer.model"])
        let r = try runRelora(["export", dir + "/hf", "--format", "gguf", "--quant", "f32", "--out", dir + "/m.gguf"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let file = try GGUFFile(path: dir + "/m.gguf")
        XCTAssertEqual(file.metadata["tokenizer.ggml.model"], .string("llama"))
        let tok = try TokenizerLoader.load(gguf: file)
        XCTAssertTrue(tok is SentencePieceTokenizer)
        XCTAssertEqual(tok.vocabSize, 416)
        XCTAssertNil(tok.prefixId, "add_bos_token false")
        XCTAssertEqual(tok.endOfTextId, 2)
        let (strings, ids) = try fixtureIDs()
        XCTAssertEqual(strings.count, 50)
        XCTAssertEqual(strings.map { tok.encode($0).map(Int.init) }, ids)
        let direct = try TokenizerLoader.load(Self.directory + "/spm_bpe.model")
        XCTAssertEqual(strings.map { tok.decode(tok.encode($0)) }, strings.map { direct.decode(direct.encode($0)) })

        // Back to Hugging Face: the GGUF's tokenizer becomes a tokenizer.model (sentencepiece reads it into the
        // same ids, per the script) with the pieces, scores and types of the original.
        let back = try runRelora(["export", dir + "/m.gguf", "--format", "hf", "--out", dir + "/back"])
        XCTAssertEqual(back.status, 0, back.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/back/tokenizer.json"))
        let exported = try XCTUnwrap(try TokenizerLoader.load(dir + "/back") as? SentencePieceTokenizer)
        let original = try XCTUnwrap(direct as? SentencePieceTokenizer)
        XCTAssertEqual(Array(exported.pieces[..<400]), original.pieces)
        XCTAssertEqual(Array(exported.scores[..<400]), original.scores)
        XCTAssertEqual(Array(exported.types[..<400]), original.types)
        XCTAssertEqual([exported.unkId, exported.beginOfTextId, exported.endOfTextId], [original.unkId, original.beginOfTextId, original.endOfTextId])
        XCTAssertEqual(strings.map { exported.encode($0).map(Int.init) }, ids)
        XCTAssertEqual(strings.map { exported.decode(exported.encode($0)) }, strings.map { direct.decode(direct.encode($0)) })
    }

    /// llama.cpp's SPM tokenizer ignores `remove_extra_whitespaces`; so does relora's reader.
    func testRemoveExtraWhitespacesIsIgnoredAsLlamaCppIgnoresIt() throws {
        let ws = try XCTUnwrap(try fixture()["whitespace"] as? [String: Any])
        let text = try XCTUnwrap(ws["text"] as? String)
        let source = try GGUFFile(path: Self.directory + "/spm_bpe.gguf")
        for flag in [false, true] {
            let path = temporaryDirectory() + "/t.gguf"
            let entries = source.metadataKeys.map { key in (key, key == "tokenizer.ggml.remove_extra_whitespaces" ? GGUFValue.bool(flag) : source.metadata[key]!) }
            try GGUFWriter.write(metadata: entries, tensors: [], to: path)
            let tok = try TokenizerLoader.load(path)
            XCTAssertEqual(tok.encode(text).map(Int.init), try XCTUnwrap(ws["llama_cpp_remove_extra_\(flag)"] as? [Int]), "remove_extra_whitespaces \(flag)")
        }
    }

    /// What llama.cpp's `llama` tokenizer would read differently is refused, one sentence naming it: a
    /// tokenizer.json (tokenizers' rules), a Unigram model, a charsmap, remove_extra_whitespaces, unescaped
    /// whitespace. `relora export` exits with status 2 and that sentence before writing anything.
    func testOtherSentencePieceTokenizersAreRefused() throws {
        func refuses(_ tok: any TextTokenizer, _ keyword: String, line: UInt = #line) {
            do {
                _ = try tok.ggufMetadata(vocabSize: 100_000)
                XCTFail("expected a refusal mentioning \(keyword)", line: line)
            } catch ReLoRAError.unsupported(let m) {
                XCTAssertTrue(m.contains(keyword) && m.contains("export --format hf instead"), m, line: line)
                XCTAssertFalse(m.contains("\n"), line: line)
            } catch {
                XCTFail("unexpected \(error)", line: line)
            }
        }
        refuses(try TokenizerLoader.load(Self.directory + "/llama2_legacy.json"), "tokenizer.json")
        refuses(try TokenizerLoader.load(Self.directory + "/spm_unigram.model"), "Unigram")
        let bpe = try Array(Data(contentsOf: URL(fileURLWithPath: Self.directory + "/spm_bpe.model")))
        func withNormalizer(_ edit: (inout ProtobufWriter) -> Void) throws -> SentencePieceTokenizer {
            var spec = ProtobufWriter(), outer = ProtobufWriter()
            edit(&spec)
            outer.message(3, spec)
            return try SentencePieceTokenizer(modelProto: bpe + outer.bytes, path: "m")  // a repeated message merges
        }
        refuses(try withNormalizer { $0.int64(4, 1) }, "remove_extra_whitespaces")
        refuses(try withNormalizer { $0.int64(5, 0) }, "escape_whitespaces")
        // spm_unigram.model's charsmap on the BPE model.
        let unigram = try Array(Data(contentsOf: URL(fileURLWithPath: Self.directory + "/spm_unigram.model")))
        var charsMap: [UInt8] = []
        for (field, value) in try ProtobufReader.fields(unigram) where field == 3 {
            guard case .bytes(let spec) = value else { continue }
            for (f, v) in try ProtobufReader.fields(spec) where f == 2 { if case .bytes(let b) = v { charsMap = b } }
        }
        XCTAssertFalse(charsMap.isEmpty)
        refuses(try withNormalizer { $0.data(2, charsMap) }, "charsmap")

        let dir = temporaryDirectory()
        try FileManager.default.copyItem(atPath: fixturesDirectory() + "/tiny_llama", toPath: dir + "/hf")
        try FileManager.default.copyItem(atPath: Self.directory + "/spm_unigram.model", toPath: dir + "/hf/tokenizer.model")
        let r = try runReloraProcess(["export", dir + "/hf", "--format", "gguf", "--quant", "f32", "--out", dir + "/m.gguf"])
        XCTAssertEqual(r.reason, .exit)
        XCTAssertEqual(r.status, 2, r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("Unigram"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/m.gguf"))
    }

    /// A Hugging Face directory with both a SentencePiece-style tokenizer.json (`converted_bpe.json`:
    /// transformers' converter of spm_bpe.model) and its `tokenizer.model`, as Llama 2's: a run warm-started
    /// from it keeps both (training reads tokenizer.json), and `relora export --format gguf` of the run writes
    /// the .model's pieces, whose ids read back are sentencepiece's (the 50 fixture strings, as llama.cpp's).
    func testWarmStartKeepsTheTokenizerModelBesideTheJSONAndGGUFExportWritesIt() throws {
        let dir = temporaryDirectory()
        try makeHFDirectory(dir, tokenizerFiles: ["converted_bpe.json": "tokenizer.json", "spm_bpe.model": "tokenizer.model"])
        try NpyWriter.write(tokens: (0..<600).map { Int64($0 % 400) }, dtype: .uint16, to: dir + "/train.npy")
        var recipe = Recipe(model: dir + "/hf/config.json", trainData: dir + "/train.npy", runDir: dir + "/run")
        recipe.warmStart = dir + "/hf"
        recipe.seqLen = 16
        recipe.steps = 2
        recipe.warmupSteps = 1
        try Files.writeJSON(recipe.jsonObject(), to: dir + "/recipe.json")
        let train = try runRelora(["train", dir + "/recipe.json"])
        XCTAssertEqual(train.status, 0, train.stderr)
        for name in ["tokenizer.json", "tokenizer.model"] {
            XCTAssertEqual(FileManager.default.contents(atPath: dir + "/run/" + name), FileManager.default.contents(atPath: dir + "/hf/" + name), name)
        }
        let runTokenizer = try TokenizerLoader.load(dir + "/run")
        XCTAssertFalse(try XCTUnwrap(runTokenizer as? SentencePieceTokenizer).rules == .sentencePiece, "training reads the tokenizer.json")

        let r = try runRelora(["export", dir + "/run", "--format", "gguf", "--quant", "f32", "--out", dir + "/m.gguf"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let file = try GGUFFile(path: dir + "/m.gguf")
        XCTAssertEqual(file.metadata["tokenizer.ggml.model"], .string("llama"))
        let tok = try TokenizerLoader.load(gguf: file)
        XCTAssertEqual(tok.vocabSize, 416)
        XCTAssertNil(tok.prefixId, "converted_bpe.json puts no BOS first, so add_bos_token false")
        let (strings, ids) = try fixtureIDs()
        XCTAssertEqual(strings.map { tok.encode($0).map(Int.init) }, ids)
        XCTAssertEqual(strings.map { runTokenizer.encode($0).map(Int.init) }, ids, "the training tokenizer gives the same ids")
        // A recipe `tokenizer` naming the directory brings both files too.
        var named = Recipe(model: dir + "/hf/config.json", trainData: dir + "/train.npy", tokenizer: dir + "/hf", runDir: dir + "/run2")
        named.seqLen = 16
        try RunSetup(recipe: named, resume: false).createRunDirectory()
        XCTAssertEqual(FileManager.default.contents(atPath: dir + "/run2/tokenizer.model"), FileManager.default.contents(atPath: dir + "/hf/tokenizer.model"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/run2/tokenizer.json"))
    }

    /// A tokenizer.model that tokenizes otherwise than the tokenizer.json beside it (spm_bpe_edited.model,
    /// whose pieces' scores differ, or spm_unigram.model with other pieces) makes the GGUF export refuse with
    /// one sentence, before writing anything; the tokenizer.json's BOS must be the model's too.
    func testATokenizerModelThatDisagreesWithTheJSONIsRefused() throws {
        let json = try XCTUnwrap(try TokenizerLoader.load(Self.directory + "/converted_bpe.json") as? SentencePieceTokenizer)
        for name in ["spm_bpe_edited.model", "spm_unigram.model"] {
            let path = Self.directory + "/" + name
            XCTAssertThrowsError(try GGUFStandInTokenizer(json: json, model: try SentencePieceTokenizer(modelFile: path), modelPath: path), name) { error in
                guard case ReLoRAError.invalidData(let m) = error else { return XCTFail("unexpected \(error)") }
                XCTAssertTrue(m.contains("would tokenize differently from the training data"), m)
                XCTAssertFalse(m.contains("\n"), m)
            }
        }
        // The matching pair is accepted, and its metadata is the .model's.
        let model = try SentencePieceTokenizer(modelFile: Self.directory + "/spm_bpe.model")
        let standIn = try GGUFStandInTokenizer(json: json, model: model, modelPath: "m")
        XCTAssertEqual(metadata(try standIn.ggufMetadata(vocabSize: 416)), metadata(try model.ggufMetadata(vocabSize: 416)))
        // A tokenizer.json whose post-processor puts <s> first (Llama 2's): the training data has the BOS before
        // each document, so the GGUF says add_bos_token, with the .model's pieces otherwise.
        var root = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Self.directory + "/converted_bpe.json"))) as? [String: Any])
        root["post_processor"] = ["type": "TemplateProcessing",
                                  "single": [["SpecialToken": ["id": "<s>", "type_id": 0]], ["Sequence": ["id": "A", "type_id": 0]]],
                                  "pair": [["Sequence": ["id": "A", "type_id": 0]]],
                                  "special_tokens": ["<s>": ["id": "<s>", "ids": [1], "tokens": ["<s>"]]]] as [String: Any]
        let bosPath = temporaryDirectory() + "/tokenizer.json"
        try JSONSerialization.data(withJSONObject: root).write(to: URL(fileURLWithPath: bosPath))
        let withBOS = try XCTUnwrap(try TokenizerLoader.load(bosPath) as? SentencePieceTokenizer)
        XCTAssertEqual(withBOS.prefixId, 1)
        let bosMetadata = metadata(try GGUFStandInTokenizer(json: withBOS, model: model, modelPath: "m").ggufMetadata(vocabSize: 416))
        XCTAssertEqual(bosMetadata["tokenizer.ggml.add_bos_token"], .bool(true))
        XCTAssertEqual(bosMetadata["tokenizer.ggml.tokens"], metadata(try model.ggufMetadata(vocabSize: 416))["tokenizer.ggml.tokens"])

        let dir = temporaryDirectory()
        try makeHFDirectory(dir, tokenizerFiles: ["converted_bpe.json": "tokenizer.json", "spm_bpe_edited.model": "tokenizer.model"])
        let r = try runReloraProcess(["export", dir + "/hf", "--format", "gguf", "--quant", "f32", "--out", dir + "/m.gguf"])
        XCTAssertEqual(r.reason, .exit)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("tokenize differently from the training data"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/m.gguf"))
    }
}
