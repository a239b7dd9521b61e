import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRAFormats
@testable import ReLoRATokenizer
@testable import ReLoRATrain

/// SentencePiece-style tokenizers against the reference libraries: `Tests/Fixtures/make_sentencepiece_fixture.py`
/// trained tokenizers with `sentencepiece` (.model: Unigram with a charsmap and byte fallback, BPE with byte
/// fallback, Unigram with <unk>) and with `tokenizers` (BPE + byte fallback in Llama 2's and newer Metaspace
/// layouts, Unigram with and without byte fallback, transformers' conversions of the .model files), wrote
/// one .model as llama.cpp GGUF metadata, and recorded the reference ids and decodes of 51 strings (and of 150 short random ones); the
/// same for `relora_unigram.json`, made by relora's own Unigram trainer and read by `tokenizers`. Every id
/// and every decode must be equal.
final class SentencePieceTests: XCTestCase {
    static let directory = fixturesDirectory() + "/sentencepiece"

    static let files: [String: String] = [
        "spm_unigram": "spm_unigram.model", "spm_bpe": "spm_bpe.model", "spm_bpe_edited": "spm_bpe_edited.model", "spm_unigram_nofallback": "spm_unigram_nofallback.model",
        "spm_bpe_gguf": "spm_bpe.gguf", "llama2_legacy": "llama2_legacy.json", "llama_metaspace": "llama_metaspace.json",
        "metaspace_split": "metaspace_split.json", "unigram": "unigram.json", "unigram_fallback": "unigram_fallback.json",
        "converted_unigram": "converted_unigram.json", "converted_bpe": "converted_bpe.json",
        "relora_unigram": "relora_unigram.json",
    ]

    func load(_ name: String) throws -> any TextTokenizer {
        let path = Self.directory + "/" + Self.files[name]!
        if path.hasSuffix(".gguf") { return try TokenizerLoader.load(gguf: try GGUFFile(path: path)) }
        return try TokenizerLoader.load(path)
    }

    func expected() throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Self.directory + "/expected.json"))
        return try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    func testEveryFixtureMatchesItsReferenceLibrary() throws {
        let root = try expected()
        let strings = try XCTUnwrap(root["strings"] as? [String])
        XCTAssertGreaterThan(strings.count, 40)
        try check(root, strings, names: Self.files.keys.sorted(), label: "")
        // 150 short random strings dense in whitespace, "▁", charsmap keys and unknown characters.
        let random = try XCTUnwrap(root["random"] as? [String: Any])
        let randomStrings = try XCTUnwrap(random["strings"] as? [String])
        XCTAssertEqual(randomStrings.count, 150)
        try check(random, randomStrings, names: random.keys.filter { $0 != "strings" }.sorted(), label: " (random)")
    }

    /// Opt-in (the nmt_nfkc charsmap is ~240 KiB, not committed): `make_sentencepiece_fixture.py --nmt-nfkc DIR`
    /// writes a T5-like Unigram with sentencepiece's default nmt_nfkc normalizer and transformers' conversion;
    /// with RELORA_NMT_NFKC_DIR=DIR this checks both (SentencePiece's longest-match charsmap, `tokenizers`'
    /// grapheme rule) on 204 strings. Run by hand on 2026-12-03: 0 id and 0 decode mismatches for both.
    func testNmtNfkcCharsmap() throws {
        guard let dir = ProcessInfo.processInfo.environment["RELORA_NMT_NFKC_DIR"] else {
            throw XCTSkip("set RELORA_NMT_NFKC_DIR to a directory made by make_sentencepiece_fixture.py --nmt-nfkc")
        }
        let data = try Data(contentsOf: URL(fileURLWithPath: dir + "/expected.json"))
        let root = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let strings = try XCTUnwrap(root["strings"] as? [String])
        try check(root, strings, names: ["t5_model", "t5_converted"], label: " (nmt_nfkc)") { name in
            try TokenizerLoader.load(dir + (name == "t5_model" ? "/t5.model" : "/t5_converted.json"))
        }
    }

    func check(_ table: [String: Any], _ strings: [String], names: [String], label: String,
               loader: ((String) throws -> any TextTokenizer)? = nil) throws {
        XCTAssertFalse(names.isEmpty)
        var report: [String] = []
        for name in names {
            let entry = try XCTUnwrap(table[name] as? [String: Any], name)
            let ids = try XCTUnwrap(entry["ids"] as? [[Int]], name).map { $0.map { Int32($0) } }
            // null: the decode equals the input string.
            let decoded = try XCTUnwrap(entry["decoded"] as? [Any], name).enumerated().map { k, d in d as? String ?? strings[k] }
            let tok = try loader?(name) ?? load(name)
            var idMismatches = 0, decodeMismatches = 0, tokens = 0
            for (k, s) in strings.enumerated() {
                let got = tok.encode(s)
                tokens += got.count
                if got != ids[k] {
                    idMismatches += 1
                    if idMismatches <= 3 { print("\(name)\(label) ids differ on \(s.debugDescription.prefix(60)):\n  want \(ids[k].prefix(30))\n  got  \(got.prefix(30))") }
                }
                let text = tok.decode(ids[k])
                if text != decoded[k] {
                    decodeMismatches += 1
                    if decodeMismatches <= 3 { print("\(name)\(label) decode differs on \(s.debugDescription.prefix(60)):\n  want \(decoded[k].debugDescription.prefix(80))\n  got  \(text.debugDescription.prefix(80))") }
                }
            }
            report.append("\(name)\(label): \(strings.count) strings, \(tokens) tokens, \(idMismatches) id mismatches, \(decodeMismatches) decode mismatches")
            XCTAssertEqual(idMismatches, 0, name + label)
            XCTAssertEqual(decodeMismatches, 0, name + label)
        }
        print(report.joined(separator: "\n"))
    }

    // MARK: What each reader refuses

    /// A fixture's tokenizer.json with `edit` applied to its JSON object.
    func edited(_ name: String, _ edit: (inout [String: Any]) -> Void) throws -> Data {
        let data = try Data(contentsOf: URL(fileURLWithPath: Self.directory + "/" + name))
        var root = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        edit(&root)
        return try JSONSerialization.data(withJSONObject: root)
    }

    func loadJSON(_ data: Data) throws -> any TextTokenizer {
        let path = temporaryDirectory() + "/tokenizer.json"
        try data.write(to: URL(fileURLWithPath: path))
        return try TokenizerLoader.load(path)
    }

    func testUnsupportedKindsAreRefusedWithOneSentenceNamingThem() throws {
        let wordPiece = #"{"model": {"type": "WordPiece", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}}"#
        assertInvalidFile(try loadJSON(Data(wordPiece.utf8)), mentions: "model type 'WordPiece' is not supported")
        let nfkc = try edited("llama2_legacy.json") { $0["normalizer"] = ["type": "NFKC"] }
        assertInvalidFile(try loadJSON(nfkc), mentions: "normalizer 'NFKC' is not supported")
        let lower = try edited("unigram.json") { $0["normalizer"] = ["type": "Sequence", "normalizers": [["type": "Lowercase"]]] }
        assertInvalidFile(try loadJSON(lower), mentions: "normalizer 'Lowercase' is not supported")
        let regex = try edited("llama2_legacy.json") {
            $0["normalizer"] = ["type": "Replace", "pattern": ["Regex": "\\s+"], "content": " "]
        }
        assertInvalidFile(try loadJSON(regex), mentions: "regex")
        let whitespace = try edited("unigram.json") { $0["pre_tokenizer"] = ["type": "Whitespace"] }
        assertInvalidFile(try loadJSON(whitespace), mentions: "pre-tokenizer 'Whitespace' is not supported")
        let wpDecoder = try edited("unigram.json") { $0["decoder"] = ["type": "WordPiece", "prefix": "##"] }
        assertInvalidFile(try loadJSON(wpDecoder), mentions: "decoder 'WordPiece' is not supported")
        let dropout = try edited("llama2_legacy.json") {
            var m = $0["model"] as! [String: Any]; m["dropout"] = 0.1; $0["model"] = m
        }
        assertInvalidFile(try loadJSON(dropout), mentions: "dropout")
        let noDropout = try edited("llama2_legacy.json") {
            var m = $0["model"] as! [String: Any]; m["dropout"] = 0.0; $0["model"] = m
        }
        XCTAssertNoThrow(try loadJSON(noDropout), "a dropout of 0 is deterministic")
        let sampling = try edited("unigram.json") {
            var m = $0["model"] as! [String: Any]; m["alpha"] = 0.1; $0["model"] = m
        }
        assertInvalidFile(try loadJSON(sampling), mentions: "sampling")
        let missingBytes = try edited("unigram.json") {
            var m = $0["model"] as! [String: Any]; m["byte_fallback"] = true; $0["model"] = m
        }
        assertInvalidFile(try loadJSON(missingBytes), mentions: "lacks the byte piece <0x00>")
        // Byte-level BPE still goes to BPETokenizer.
        XCTAssertTrue(try TokenizerLoader.load(fixturesDirectory() + "/tokenizer/gpt2_style.json") is BPETokenizer)
        XCTAssertTrue(try TokenizerLoader.load(Self.directory + "/llama2_legacy.json") is SentencePieceTokenizer)

        // tokenizer.model: model types, options and broken invariants.
        let proto = try Array(Data(contentsOf: URL(fileURLWithPath: Self.directory + "/spm_unigram_nofallback.model")))
        func withTrainerField(_ field: Int, _ value: UInt64) -> [UInt8] {
            var spec = ProtobufWriter()
            spec.int64(field, Int64(value))
            var outer = ProtobufWriter()
            outer.message(2, spec)
            return proto + outer.bytes  // a repeated message field merges: the later value wins
        }
        assertInvalidFile(try SentencePieceTokenizer(modelProto: withTrainerField(3, 3), path: "m"), mentions: "WORD")
        assertInvalidFile(try SentencePieceTokenizer(modelProto: withTrainerField(3, 4), path: "m"), mentions: "CHAR")
        assertInvalidFile(try SentencePieceTokenizer(modelProto: withTrainerField(24, 1), path: "m"), mentions: "treat_whitespace_as_suffix")
        var denormalizer = ProtobufWriter(), spec = ProtobufWriter()
        spec.data(2, [1, 2, 3, 4, 5])
        denormalizer.message(5, spec)
        assertInvalidFile(try SentencePieceTokenizer(modelProto: proto + denormalizer.bytes, path: "m"), mentions: "denormalizer")
        var piece = ProtobufWriter(), entry = ProtobufWriter()
        entry.string(1, "<0x41>"); entry.int64(3, 6)
        piece.message(1, entry)
        assertInvalidFile(try SentencePieceTokenizer(modelProto: proto + piece.bytes, path: "m"), mentions: "byte_fallback is off")
        var again = ProtobufWriter(), dup = ProtobufWriter()
        dup.string(1, "<unk>"); dup.int64(3, 2)
        again.message(1, dup)
        assertInvalidFile(try SentencePieceTokenizer(modelProto: proto + again.bytes, path: "m"), mentions: "defined twice")
        assertInvalidFile(try SentencePieceTokenizer(modelProto: [], path: "m"), mentions: "empty")
        assertInvalidFile(try TokenizerLoader.load(temporaryDirectory()), mentions: "neither a tokenizer.json nor a SentencePiece tokenizer.model")
    }

    /// Kinds relora does not implement, in files the reference libraries wrote (`Tests/Fixtures/make_refused_fixture.py`:
    /// `tokenizers` for the tokenizer.json files, `gguf` for T5's GGUF tokenizer): the loader refuses each with one
    /// sentence naming the kind, and `relora tokenize` exits with status 2 (relora's error, not a crash) with that sentence.
    func testReferenceWrittenKindsAreRefused() throws {
        let dir = fixturesDirectory() + "/refused"
        let cases: [(file: String, names: String)] = [
            ("wordlevel.json", "model type 'WordLevel' is not supported"),
            ("bert_normalizer.json", "normalizer 'BertNormalizer' is not supported"),
            ("digits_metaspace.json", "pre-tokenizer 'Digits' is not supported"),   // read as SentencePiece style
            ("digits_bytelevel.json", "pre-tokenizer 'Digits' is not supported"),   // read as byte-level BPE
            ("t5.gguf", "the tokenizer is 't5' (tokenizer.ggml.model)"),
        ]
        let work = temporaryDirectory()
        try "Hello world 2024.".write(toFile: work + "/in.txt", atomically: true, encoding: .utf8)
        for (file, names) in cases {
            assertInvalidFile(try TokenizerLoader.load(dir + "/" + file), mentions: names, file)
            let r = try runReloraProcess(["tokenize", "--tokenizer", dir + "/" + file, "--in", work + "/in.txt", "--out", work + "/out.npy"])
            XCTAssertEqual(r.reason, .exit, "\(file): relora must exit, not crash")
            XCTAssertEqual(r.status, 2, "\(file): exit status 2 is relora's for a refused input: \(r.stderr)")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, "\(file): one sentence, got \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("error: ") && r.stderr.contains(names), "\(file): \(r.stderr)")
            XCTAssertFalse(FileManager.default.fileExists(atPath: work + "/out.npy"), "\(file): no output after a refusal")
        }
        // The files are what the libraries write: with the unsupported part taken out, each loads and encodes.
        let root = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/bert_normalizer.json"))) as? [String: Any])
        var plain = root
        plain["normalizer"] = NSNull()
        XCTAssertFalse(try loadJSON(try JSONSerialization.data(withJSONObject: plain)).encode("hello world").isEmpty)
    }

    // MARK: Hostile tokenizer.model files

    /// Mutated `tokenizer.model` protobufs are refused with one sentence or load into a tokenizer that
    /// encodes and decodes: every prefix (truncations), random byte changes, and targeted damage (a varint
    /// longer than 10 bytes, a length near 2^64, each wire type in place of another). Prints the counts.
    func testFuzzedModelProtosAreRefusedOrWorkNeverCrash() throws {
        var rejected = 0, loaded = 0
        var reasons = Set<String>()
        func attempt(_ bytes: [UInt8], _ what: String) {
            do {
                let t = try SentencePieceTokenizer(modelProto: bytes, path: "fuzz.model")
                let ids = t.encode("Hello, wörld  \t 123 🦜")
                XCTAssertTrue(ids.allSatisfy { $0 >= 0 && Int($0) < t.vocabSize }, what)
                _ = t.decode(ids + [-1, 0, Int32(t.vocabSize), Int32.max])
                loaded += 1
            } catch ReLoRAError.invalidFile(_, let reason) {
                XCTAssertFalse(reason.contains("\n"), "\(what): \(reason)")
                reasons.insert(String(reason.prefix(40)))
                rejected += 1
            } catch {
                XCTFail("\(what): unexpected \(error)")
            }
        }
        var rng = TestRNG(0x5EED_7011)
        for name in ["spm_unigram", "spm_bpe", "spm_unigram_nofallback"] {
            let valid = try Array(Data(contentsOf: URL(fileURLWithPath: Self.directory + "/\(name).model")))
            // Truncations: every prefix of the smallest file, every 7th of the others.
            let stride = name == "spm_unigram_nofallback" ? 1 : 7
            for length in Swift.stride(from: 0, to: valid.count, by: stride) { attempt(Array(valid[..<length]), "\(name) prefix \(length)") }
            // Random damage: 1 to 4 bytes replaced.
            for trial in 0..<400 {
                var b = valid
                for _ in 0...rng.int(4) { b[rng.int(b.count)] = UInt8(truncatingIfNeeded: rng.next()) }
                attempt(b, "\(name) trial \(trial)")
            }
            // Targeted: at field keys of the top-level message, a bad varint, a huge length, other wire types.
            var keys: [Int] = []
            var i = 0
            while i < valid.count, keys.count < 40 {
                keys.append(i)
                guard let fields = try? ProtobufReader.fields(Array(valid[i...])), let first = fields.first else { break }
                // Skip over the first field: key byte(s) + payload.
                var w = ProtobufWriter()
                switch first.value {
                case .bytes(let d): w.data(first.field, d)
                case .varint(let v): w.int64(first.field, Int64(bitPattern: v))
                case .fixed32(let v): w.float(first.field, Float(bitPattern: v))
                case .fixed64(let v): w.double(first.field, Double(bitPattern: v))
                }
                i += w.bytes.count
            }
            for k in keys {
                attempt(Array(valid[..<k]) + [UInt8](repeating: 0xFF, count: 11), "\(name) overlong varint at \(k)")
                attempt(Array(valid[..<k]) + [0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01] + Array(valid[k...]), "\(name) huge length at \(k)")
                for wire in [0, 1, 2, 3, 4, 5, 6, 7] as [UInt8] {
                    var b = valid
                    b[k] = (b[k] & 0xF8) | wire
                    attempt(b, "\(name) wire type \(wire) at \(k)")
                }
            }
        }
        print("tokenizer.model fuzz: \(rejected + loaded) mutated files, \(rejected) refused with one sentence (\(reasons.count) distinct openings), \(loaded) loaded and encoded")
        XCTAssertGreaterThan(rejected, 1000)
        XCTAssertGreaterThan(loaded, 10)
    }

    /// Damaged SentencePiece-style tokenizer.json files: refused with one sentence or loaded into a tokenizer
    /// that encodes in range; never a crash or a hang (a hostile added-token id is not walked up to).
    func testDamagedTokenizerJSONIsRefusedOrWorks() throws {
        var rejected = 0, loaded = 0
        var rng = TestRNG(0x7E57)
        func attempt(_ data: Data, _ what: String) {
            do {
                let t = try SentencePieceTokenizer(jsonData: data, path: "fuzz.json")
                let ids = t.encode("Hello, wörld  \t 123 🦜 <s>")
                XCTAssertTrue(ids.allSatisfy { $0 >= 0 && Int($0) < t.vocabSize }, what)
                _ = t.decode(ids + [-1, Int32(t.vocabSize)])
                loaded += 1
            } catch ReLoRAError.invalidFile(_, let reason) {
                XCTAssertFalse(reason.contains("\n"), "\(what): \(reason)")
                rejected += 1
            } catch {
                XCTFail("\(what): unexpected \(error)")
            }
        }
        for name in ["llama2_legacy.json", "unigram_fallback.json", "converted_unigram.json"] {
            let valid = try Array(Data(contentsOf: URL(fileURLWithPath: Self.directory + "/" + name)))
            for trial in 0..<150 {
                var b = valid
                // Digits and punctuation, where a change keeps the JSON valid more often.
                let alphabet = Array("0123456789-.,:\"[]{} ".utf8)
                for _ in 0...rng.int(3) { b[rng.int(b.count)] = alphabet[rng.int(alphabet.count)] }
                attempt(Data(b), "\(name) trial \(trial)")
            }
        }
        let far = try edited("unigram.json") {
            $0["added_tokens"] = [["id": 2_147_483_000, "content": "<far>", "special": true]]
        }
        assertInvalidFile(try SentencePieceTokenizer(jsonData: far), mentions: "not dense")
        print("tokenizer.json damage: \(rejected + loaded) files, \(rejected) refused with one sentence, \(loaded) loaded and encoded")
        XCTAssertGreaterThan(rejected, 100)
    }

    func testSampleReadsTheTokenizerModelOfAHuggingFaceDirectory() throws {
        let dir = temporaryDirectory() + "/hf"
        try FileManager.default.copyItem(atPath: fixturesDirectory() + "/tiny_llama", toPath: dir)
        try FileManager.default.copyItem(atPath: Self.directory + "/spm_bpe.model", toPath: dir + "/tokenizer.model")
        // The tiny model has 97 ids, fewer than the tokenizer: the prompt's first id, spm_bpe's "▁" (320),
        // is refused by the model, which shows sample encoded it with the tokenizer.model.
        let r = try runRelora(["sample", "--model", dir, "--prompt", "Hello", "--max-tokens", "2"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("token id 320 at position 0"), r.stderr)
    }

    // MARK: relora's Unigram trainer

    func testUnigramTrainerIsDeterministicAndRoundTrips() throws {
        // Trained on the smaller slice (the test's time), checked on the other.
        let text = try String(contentsOfFile: fixturesDirectory() + "/shakespeare/val_slice.txt", encoding: .utf8)
        let trainer = UnigramTrainer(vocabSize: 420)
        let (tok, json) = try trainer.train(texts: [text])
        let (_, again) = try trainer.train(texts: [text])
        XCTAssertEqual(json, again, "the same input gives the same file")
        XCTAssertEqual(tok.vocabSize, 420)
        XCTAssertEqual(tok.id(of: "<unk>"), 0)
        XCTAssertEqual(tok.endOfTextId, 2)
        XCTAssertEqual(tok.id(of: "<0x0A>"), 3 + 0x0A)
        // Loads back from its own file the same.
        let loaded = try SentencePieceTokenizer(jsonData: json)
        let validation = try String(contentsOfFile: fixturesDirectory() + "/shakespeare/train_slice.txt", encoding: .utf8)
        let strings = validation.split(separator: "\n").map(String.init) + ["unknown ꙮ 𓀀 🦜 日本語", "digits 0 12 345", "tabs\t\tand  runs   "]
        var tokens = 0, bytes = 0
        for s in strings where !s.hasPrefix(" ") {
            let ids = tok.encode(s)
            XCTAssertEqual(loaded.encode(s), ids)
            XCTAssertEqual(tok.decode(ids), s)
            tokens += ids.count
            bytes += s.utf8.count
        }
        let whole = tok.encode(validation)
        XCTAssertEqual(tok.decode(whole), validation)
        print("Unigram 420 (trained on val_slice) on train_slice: \(String(format: "%.2f", Double(bytes) / Double(tokens))) bytes/token per line, \(validation.utf8.count) bytes -> \(whole.count) tokens whole")
        // Characters alone would give under 1 byte per token (each "▁" is a token too); with 420 ids, 259 of
        // them specials and bytes, tokenizers' own UnigramTrainer reaches 1.37 (161 pieces) to 1.51 (241).
        XCTAssertGreaterThan(Double(bytes) / Double(tokens), 1.3, "the learned pieces are used")
        XCTAssertThrowsError(try UnigramTrainer(vocabSize: 259).train(texts: [text]))
        XCTAssertThrowsError(try UnigramTrainer(vocabSize: 300).train(texts: [""]))
        // The smallest vocabulary: one learned piece, the most frequent character; every text still encodes.
        let (tiny, _) = try UnigramTrainer(vocabSize: 260).train(texts: [text])
        XCTAssertEqual(tiny.vocabSize, 260)
        XCTAssertEqual(tiny.decode(tiny.encode("Macbeth, 1606")), "Macbeth, 1606")
    }

    // MARK: Commands

    func testTokenizeAcceptsADirectoryWithOnlyTokenizerModel() throws {
        let dir = temporaryDirectory()
        try FileManager.default.createDirectory(atPath: dir + "/tok", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: Self.directory + "/spm_bpe.model", toPath: dir + "/tok/tokenizer.model")
        let text = "Hello, world!  Unknown ꙮ and digits 2024."
        try text.write(toFile: dir + "/in.txt", atomically: true, encoding: .utf8)
        let r = try runRelora(["tokenize", "--tokenizer", dir + "/tok", "--in", dir + "/in.txt", "--out", dir + "/out.npy"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let tokens = try TokenArray(npyPath: dir + "/out.npy")
        let direct = try TokenizerLoader.load(Self.directory + "/spm_bpe.model")
        XCTAssertEqual((0..<tokens.count).map { Int32(tokens[$0]) }, direct.encode(text) + [2], "the ids, then </s>")
        XCTAssertEqual(direct.decode(direct.encode(text)), text)
        let bad = try runRelora(["tokenize", "--tokenizer", dir, "--in", dir + "/in.txt", "--out", dir + "/x.npy"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("neither a tokenizer.json nor a SentencePiece tokenizer.model"), bad.stderr)
    }

    /// The BOS the reference puts before a text: Llama's post-processor, GGUF's add_bos_token; none for a
    /// tokenizer.model (sentencepiece's encode adds none) or a tokenizer without a template.
    func testPrefixTokenIsWhatTheReferenceAdds() throws {
        XCTAssertEqual(try load("llama2_legacy").prefixId, 1)
        XCTAssertEqual(try load("spm_bpe_gguf").prefixId, 1)
        XCTAssertNil(try load("spm_bpe").prefixId)
        XCTAssertNil(try load("unigram").prefixId)
        XCTAssertNil(try TokenizerLoader.load(fixturesDirectory() + "/tokenizer/gpt2_style.json").prefixId)
        let dir = temporaryDirectory()
        try FileManager.default.copyItem(atPath: Self.directory + "/llama2_legacy.json", toPath: dir + "/tokenizer.json")
        try "Hello world".write(toFile: dir + "/in.txt", atomically: true, encoding: .utf8)
        let r = try runRelora(["tokenize", "--tokenizer", dir, "--in", dir + "/in.txt", "--out", dir + "/out.npy"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let tokens = try TokenArray(npyPath: dir + "/out.npy")
        let tok = try load("llama2_legacy")
        XCTAssertEqual((0..<tokens.count).map { Int32(tokens[$0]) }, [1] + tok.encode("Hello world") + [2], "<s>, the ids, </s>")
    }

    /// A recipe's `tokenizer` may name a directory; a SentencePiece model goes into the run as tokenizer.model.
    func testRunDirectoryKeepsATokenizerModel() throws {
        let dir = temporaryDirectory()
        try FileManager.default.createDirectory(atPath: dir + "/hf", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: Self.directory + "/spm_bpe.model", toPath: dir + "/hf/tokenizer.model")
        let config: [String: Any] = ["hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 400, "max_position_embeddings": 64]
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: dir + "/config.json"))
        try NpyWriter.write(tokens: (0..<300).map { Int64($0 % 400) }, dtype: .uint16, to: dir + "/train.npy")
        var recipe = Recipe(model: dir + "/config.json", trainData: dir + "/train.npy", tokenizer: dir + "/hf", runDir: dir + "/run")
        recipe.seqLen = 16
        try RunSetup(recipe: recipe, resume: false).createRunDirectory()
        XCTAssertEqual(FileManager.default.contents(atPath: dir + "/run/tokenizer.model"), FileManager.default.contents(atPath: dir + "/hf/tokenizer.model"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/run/tokenizer.json"))
        XCTAssertTrue(try TokenizerLoader.load(dir + "/run") is SentencePieceTokenizer)
        recipe.tokenizer = dir
        recipe.runDir = dir + "/run2"
        assertInvalidFile(try RunSetup(recipe: recipe, resume: false).createRunDirectory(), mentions: "neither a tokenizer.json nor a tokenizer.model")
        // A GGUF file's tokenizer: the run keeps its tokenizer metadata as a tensor-free tokenizer.gguf, which
        // reads back into the same tokenizer (every id of the fixture strings, the BOS and EOS).
        recipe.tokenizer = Self.directory + "/spm_bpe.gguf"
        recipe.runDir = dir + "/run3"
        try RunSetup(recipe: recipe, resume: false).createRunDirectory()
        let kept = try GGUFFile(path: dir + "/run3/tokenizer.gguf")
        XCTAssertTrue(kept.tensors.isEmpty)
        let source = try GGUFFile(path: Self.directory + "/spm_bpe.gguf")
        XCTAssertEqual(kept.metadataKeys, source.metadataKeys.filter { $0 == "general.architecture" || $0.hasPrefix("tokenizer.") })
        for key in kept.metadataKeys { XCTAssertEqual(kept.metadata[key], source.metadata[key], key) }
        let fromRun = try TokenizerLoader.load(dir + "/run3"), direct = try load("spm_bpe_gguf")
        let strings = try XCTUnwrap(try expected()["strings"] as? [String])
        let want = try XCTUnwrap((try expected()["spm_bpe_gguf"] as? [String: Any])?["ids"] as? [[Int]])
        XCTAssertEqual(strings.map { fromRun.encode($0).map(Int.init) }, want, "the run's tokenizer gives sentencepiece's ids")
        XCTAssertEqual(strings.map { fromRun.encode($0) }, strings.map { direct.encode($0) })
        XCTAssertEqual(fromRun.prefixId, 1)
        XCTAssertEqual(fromRun.endOfTextId, 2)
        // A GGUF file without a tokenizer, or with one relora does not read, is refused when the run is set up.
        recipe.tokenizer = fixturesDirectory() + "/refused/t5.gguf"
        recipe.runDir = dir + "/run4"
        assertInvalidFile(try RunSetup(recipe: recipe, resume: false).createRunDirectory(), mentions: "'t5'")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/run4/tokenizer.gguf"))
        try GGUFWriter.write(metadata: [("general.architecture", .string("llama"))], tensors: [], to: dir + "/bare.gguf")
        recipe.tokenizer = dir + "/bare.gguf"
        recipe.runDir = dir + "/run5"
        assertInvalidFile(try RunSetup(recipe: recipe, resume: false).createRunDirectory(), mentions: "has no tokenizer in its metadata")
    }

    /// A recipe that names no tokenizer takes its warm start's: a Hugging Face directory's tokenizer.model
    /// here (a GGUF file's in `GGUFImportTests.testCommandsOnARunWarmStartedFromGGUF`), resolved into the
    /// recipe and kept in the run; one that names a tokenizer keeps it, and a warm start without one leaves none.
    func testWarmStartTokenizerIsTheRunsWhenTheRecipeNamesNone() throws {
        let dir = temporaryDirectory()
        let hf = dir + "/hf"
        try FileManager.default.copyItem(atPath: fixturesDirectory() + "/tiny_llama", toPath: hf)
        try NpyWriter.write(tokens: (0..<300).map { Int64($0 % 64) }, dtype: .uint16, to: dir + "/train.npy")
        var recipe = Recipe(model: hf + "/config.json", trainData: dir + "/train.npy", runDir: dir + "/run0")
        recipe.seqLen = 16
        recipe.warmStart = hf
        XCTAssertNil(try RunSetup(recipe: recipe, resume: false).recipe.tokenizer, "the fixture has no tokenizer")
        try FileManager.default.copyItem(atPath: Self.directory + "/spm_bpe.model", toPath: hf + "/tokenizer.model")
        recipe.runDir = dir + "/run1"
        let setup = try RunSetup(recipe: recipe, resume: false)
        XCTAssertEqual(setup.recipe.tokenizer, hf + "/tokenizer.model")
        XCTAssertEqual(setup.notes, ["tokenizer: the warm start's (\(hf)/tokenizer.model), kept in the run"])
        try setup.createRunDirectory()
        XCTAssertEqual(FileManager.default.contents(atPath: dir + "/run1/tokenizer.model"), FileManager.default.contents(atPath: hf + "/tokenizer.model"))
        // A warm start's tokenizer relora cannot read is not kept, with a warning; the run is not refused for it.
        try FileManager.default.copyItem(atPath: fixturesDirectory() + "/refused/wordlevel.json", toPath: hf + "/tokenizer.json")
        recipe.runDir = dir + "/run3"
        let unreadable = try RunSetup(recipe: recipe, resume: false)
        XCTAssertNil(unreadable.recipe.tokenizer)
        XCTAssertEqual(unreadable.notes.count, 1)
        XCTAssertTrue(unreadable.notes[0].hasPrefix("warning: the run does not keep the warm start's tokenizer") && unreadable.notes[0].contains("WordLevel"), unreadable.notes[0])
        try unreadable.createRunDirectory()
        XCTAssertNil(TokenizerLoader.file(in: dir + "/run3"))
        recipe.tokenizer = Self.directory + "/llama2_legacy.json"
        recipe.runDir = dir + "/run2"
        XCTAssertEqual(try RunSetup(recipe: recipe, resume: false).recipe.tokenizer, Self.directory + "/llama2_legacy.json")
    }

    func testTokenizerTrainUnigramCommand() throws {
        let dir = temporaryDirectory()
        let r = try runRelora(["tokenizer", "train", "--model", "unigram", "--vocab-size", "300", "--in",
                               fixturesDirectory() + "/shakespeare/val_slice.txt", "--out", dir + "/tokenizer.json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let tok = try TokenizerLoader.load(dir + "/tokenizer.json")
        XCTAssertTrue(tok is SentencePieceTokenizer)
        XCTAssertEqual(tok.vocabSize, 300)
        let small = try runRelora(["tokenizer", "train", "--model", "unigram", "--vocab-size", "100", "--in",
                                   fixturesDirectory() + "/shakespeare/val_slice.txt", "--out", dir + "/t2.json"])
        XCTAssertNotEqual(small.status, 0)
        XCTAssertTrue(small.stderr.contains("minimum is 260"), small.stderr)
    }

    /// Hostile `llama` tokenizer metadata: each inconsistency is one sentence naming the key.
    func testHostileGGUFLlamaMetadataIsRefused() throws {
        let dir = temporaryDirectory()
        let tokens: [GGUFValue] = ["<unk>", "<s>", "</s>", "\u{2581}a", "a", "\u{2581}"].map { .string($0) }
        func file(_ edit: (inout [(String, GGUFValue)]) -> Void) throws -> GGUFFile {
            var m: [(String, GGUFValue)] = [
                ("general.architecture", .string("llama")), ("tokenizer.ggml.model", .string("llama")),
                ("tokenizer.ggml.tokens", .array(.string, tokens)),
                ("tokenizer.ggml.scores", .array(.float32, (0..<6).map { .float32(-Float($0)) })),
                ("tokenizer.ggml.token_type", .array(.int32, [2, 3, 3, 1, 1, 1].map { .int32($0) })),
            ]
            edit(&m)
            let path = dir + "/t\(UInt32.random(in: 0...UInt32.max)).gguf"
            try GGUFWriter.write(metadata: m, tensors: [], to: path)
            return try GGUFFile(path: path)
        }
        let fine = try SentencePieceTokenizer(gguf: try file { _ in })
        XCTAssertEqual(fine.encode("a a"), [3, 3])
        XCTAssertEqual(fine.decode([1, 3, 3, 2]), "a a")
        func replace(_ key: String, _ value: GGUFValue) -> (inout [(String, GGUFValue)]) -> Void {
            { m in m = m.map { $0.0 == key ? (key, value) : $0 } }
        }
        assertInvalidFile(try SentencePieceTokenizer(gguf: try file(replace("tokenizer.ggml.scores", .array(.float32, [.float32(0)])))), mentions: "tokenizer.ggml.scores")
        assertInvalidFile(try SentencePieceTokenizer(gguf: try file(replace("tokenizer.ggml.scores", .array(.float32, (0..<6).map { _ in .float32(.nan) })))), mentions: "not a finite number")
        assertInvalidFile(try SentencePieceTokenizer(gguf: try file(replace("tokenizer.ggml.token_type", .array(.int32, [2, 3, 3, 1, 1, 9].map { .int32($0) })))), mentions: "token_type[5] is 9")
        assertInvalidFile(try SentencePieceTokenizer(gguf: try file(replace("tokenizer.ggml.token_type", .array(.int32, [2, 3, 3, 1, 6, 1].map { .int32($0) })))), mentions: "byte piece <0x00>")
        assertInvalidFile(try SentencePieceTokenizer(gguf: try file(replace("tokenizer.ggml.tokens", .array(.string, [])))), mentions: "tokenizer.ggml.tokens")
        assertInvalidFile(try SentencePieceTokenizer(gguf: try file { $0.append(("tokenizer.ggml.eos_token_id", .uint32(99))) }), mentions: "eos_token_id")
        assertInvalidFile(try SentencePieceTokenizer(gguf: try file { $0.append(("tokenizer.ggml.unknown_token_id", .int32(-1))) }), mentions: "unknown_token_id")
    }

    func testGGUFDispatchesOnTheTokenizerModel() throws {
        let path = temporaryDirectory() + "/t.gguf"
        try GGUFWriter.write(metadata: [("general.architecture", .string("llama")), ("tokenizer.ggml.model", .string("bert"))],
                             tensors: [], to: path)
        assertInvalidFile(try TokenizerLoader.load(gguf: try GGUFFile(path: path)), mentions: "'bert'")
        let llama = try TokenizerLoader.load(gguf: try GGUFFile(path: Self.directory + "/spm_bpe.gguf"))
        XCTAssertTrue(try TokenizerLoader.load(Self.directory + "/spm_bpe.gguf") is SentencePieceTokenizer, "a GGUF path is read as one")
        XCTAssertEqual(llama.endOfTextId, 2)
        XCTAssertEqual(String(decoding: llama.bytes(of: try XCTUnwrap((llama as? SentencePieceTokenizer)?.id(of: "\u{2581}the"))) ?? [], as: UTF8.self), " the")
    }
}
