import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAFormats
@testable import ReLoRATokenizer
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain
@testable import ReLoRAAnalysis
@testable import ReLoRASelfTest

/// Byte-level BPE against Hugging Face `tokenizers`: `Tests/Fixtures/make_tokenizer_fixture.py` trained two
/// small tokenizers (GPT-2 and LLaMA-3 pre-tokenization, vocab 500) and recorded HF's ids and decodings for
/// a list of tricky strings. Encodings must match id for id; there is no tolerance in tokenization.
final class TokenizerTests: XCTestCase {
    static let fixtureDirectory = fixturesDirectory() + "/tokenizer"

    struct Expected {
        var strings: [String]
        var splitStrings: [String]
        var ids: [String: [[Int32]]]
        var decoded: [String: [String]]
        var pieceLengths: [String: [[Int]]]
    }

    /// Parsed with Foundation's JSONSerialization, independently of the tokenizer's own JSON reader.
    func loadExpected() throws -> Expected {
        let data = try Data(contentsOf: URL(fileURLWithPath: Self.fixtureDirectory + "/expected.json"))
        let root = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let strings = try XCTUnwrap(root["strings"] as? [String])
        let splitStrings = try XCTUnwrap(root["split_strings"] as? [String])
        var expected = Expected(strings: strings, splitStrings: splitStrings, ids: [:], decoded: [:], pieceLengths: [:])
        for name in ["gpt2_style", "llama3_style", "gpt2_style_prefix_space"] {
            let entry = try XCTUnwrap(root[name] as? [String: Any], name)
            let ids = try XCTUnwrap(entry["ids"] as? [[Int]], name)
            expected.ids[name] = ids.map { $0.map { Int32($0) } }
            expected.decoded[name] = try XCTUnwrap(entry["decoded"] as? [String], name)
            expected.pieceLengths[name] = try XCTUnwrap(entry["piece_lengths"] as? [[Int]], name)
        }
        return expected
    }

    func fixture(_ name: String) throws -> BPETokenizer {
        try BPETokenizer(contentsOf: "\(Self.fixtureDirectory)/\(name).json")
    }

    func checkAgainstHF(_ tokenizer: BPETokenizer, _ name: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let expected = try loadExpected()
        let wantIds = try XCTUnwrap(expected.ids[name])
        let wantText = try XCTUnwrap(expected.decoded[name])
        XCTAssertGreaterThan(expected.strings.count, 30)
        // Pre-tokenization alone, on many more strings: the UTF-8 length of every piece.
        let wantLengths = try XCTUnwrap(expected.pieceLengths[name])
        XCTAssertGreaterThan(expected.splitStrings.count, 300)
        var splitMismatches = 0
        for (k, s) in expected.splitStrings.enumerated() {
            let lengths = tokenizer.preTokenize(s).map { $0.count }
            if lengths != wantLengths[k] {
                splitMismatches += 1
                XCTFail("\(name): pieces of \(s.debugDescription): \(lengths) vs HF \(wantLengths[k])", file: file, line: line)
                if splitMismatches > 5 { break }
            }
        }
        for (k, s) in expected.strings.enumerated() {
            let ids = tokenizer.encode(s)
            XCTAssertEqual(ids, wantIds[k], "\(name): ids of \(s.debugDescription)", file: file, line: line)
            XCTAssertEqual(tokenizer.decode(wantIds[k]), wantText[k], "\(name): decoding of \(s.debugDescription)", file: file, line: line)
            // The byte-buffer entry point agrees with the String one.
            var copy = s
            let viaBytes = try copy.withUTF8 { try tokenizer.encode(utf8: $0) }
            XCTAssertEqual(viaBytes, ids, file: file, line: line)
        }
    }

    // MARK: Hugging Face fixture

    func testGPT2StyleMatchesHuggingFace() throws {
        let tok = try fixture("gpt2_style")
        XCTAssertEqual(tok.vocabSize, 500)
        XCTAssertEqual(tok.endOfTextId, 0)  // HF's trainer puts special tokens first
        XCTAssertEqual(tok.id(of: "Ġt"), tok.encode(" t").first)
        try checkAgainstHF(tok, "gpt2_style")
    }

    func testLlama3StyleMatchesHuggingFace() throws {
        let tok = try fixture("llama3_style")
        XCTAssertEqual(tok.vocabSize, 500)
        XCTAssertTrue(tok.ignoreMerges)
        XCTAssertEqual(tok.steps, [.split(.llama3), .byteLevel(addPrefixSpace: false, useRegex: false)])
        try checkAgainstHF(tok, "llama3_style")
    }

    func testAddPrefixSpaceMatchesHuggingFace() throws {
        // The script flips pre_tokenizer.add_prefix_space in gpt2_style.json; do the same to the text.
        var text = try String(contentsOfFile: "\(Self.fixtureDirectory)/gpt2_style.json", encoding: .utf8)
        let pre = try XCTUnwrap(text.range(of: "\"pre_tokenizer\""))
        let flag = try XCTUnwrap(text.range(of: "\"add_prefix_space\": false", range: pre.upperBound..<text.endIndex))
        text.replaceSubrange(flag, with: "\"add_prefix_space\": true")
        let tok = try BPETokenizer(jsonData: Data(text.utf8))
        XCTAssertEqual(tok.steps, [.byteLevel(addPrefixSpace: true, useRegex: true)])
        try checkAgainstHF(tok, "gpt2_style_prefix_space")
    }

    /// A loaded tokenizer written back by `jsonData()` (our layout: merges as strings, our key order)
    /// reads back to the same tokenizer.
    func testFixturesSurviveRewriting() throws {
        let expected = try loadExpected()
        for name in ["gpt2_style", "llama3_style"] {
            let tok = try fixture(name)
            let again = try BPETokenizer(jsonData: try tok.jsonData())
            XCTAssertEqual(again.vocabSize, tok.vocabSize)
            XCTAssertEqual(again.steps, tok.steps)
            XCTAssertEqual(again.ignoreMerges, tok.ignoreMerges)
            XCTAssertEqual(try again.jsonData(), try tok.jsonData())
            for s in expected.strings { XCTAssertEqual(again.encode(s), tok.encode(s), name) }
        }
    }

    // MARK: Round trips

    static let variedTexts: [String] = [
        "",
        " ",
        "Hello, world!",
        "ASCII letters and digits 0123456789 with punctuation: ;:,.!?'\"()[]{}<>/\\|@#$%^&*-_=+`~",
        "!!!???...---***^^^%%%$$$###@@@",
        "a  b   c    d     e",
        "trailing spaces     ",
        "    leading and trailing\t\t",
        "tabs\tand\t\tmore\t\t\ttabs",
        "windows\r\nline\r\n\r\nendings\r\n",
        "\n\n\n\n",
        " \n \n\t\r\n  \u{0B}\u{0C} ",
        "numbers 1 22 333 4444 55555 666666 7777777 3.14159 -2.5e-10 1,234,567",
        "中文：我能吞下玻璃而不伤身体。日本語のテキスト。한국어 문장.",
        "emoji 😀 👍🏽 ❤️ 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸🇯🇵 🤖🤖",
        "combining e\u{301} n\u{303} Z\u{324}\u{354}\u{367}\u{311}\u{313} a\u{308}",
        "RTL: مرحبا بالعالم שלום עולם, Devanagari नमस्ते, Thai สวัสดี",
        "controls \u{0}\u{1}\u{7F} nbsp\u{A0}x ideographic\u{3000}space line\u{2028}sep max\u{10FFFF}",
        "I'm sure you're right; we've seen they'll say he'd done it, it's JOHN'S 'twas ''quoted''",
        "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
            + "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;",
        "Text<|endoftext|>with special<|endoftext|><|endoftext|> tokens <|endof",
        String(repeating: "ab", count: 500),
        String(repeating: " ", count: 300) + "x",
        String(repeating: "长", count: 400),
    ]

    /// Random strings over ranges that exercise every class (ASCII, Latin-1, combining marks, CJK,
    /// Hangul, emoji, modifiers, ZWJ, whitespace of all kinds, supplementary planes).
    static func randomTexts(count: Int, seed: UInt64) -> [String] {
        let ranges: [ClosedRange<UInt32>] = [
            0x00...0x7F, 0x20...0x7E, 0x20...0x7E, 0x80...0xFF, 0x300...0x36F, 0x400...0x4FF, 0x600...0x6FF,
            0x900...0x97F, 0x2000...0x206F, 0x3000...0x303F, 0x4E00...0x4FFF, 0xAC00...0xAC40, 0xFE00...0xFE0F,
            0x1F300...0x1F64F, 0x1F3FB...0x1F3FF, 0x200D...0x200D, 0x10000...0x10FFFF,
        ]
        var rng = TestRNG(seed)
        return (0..<count).map { _ in
            var s = String.UnicodeScalarView()
            for _ in 0..<rng.int(40) {
                let r = ranges[rng.int(ranges.count)]
                let v = r.lowerBound + UInt32(rng.int(Int(r.upperBound - r.lowerBound) + 1))
                if let u = Unicode.Scalar(v) { s.append(u) }
            }
            return String(s)
        }
    }

    func checkRoundTrips(_ tok: BPETokenizer, _ name: String) {
        for s in Self.variedTexts + Self.randomTexts(count: 300, seed: 7) {
            let ids = tok.encode(s)
            XCTAssertTrue(ids.allSatisfy { $0 >= 0 && Int($0) < tok.vocabSize }, name)
            XCTAssertEqual(tok.decode(ids), s, "\(name): round trip of \(s.debugDescription)")
        }
        XCTAssertEqual(tok.encode(""), [])
    }

    func testRoundTripsWithFixtures() throws {
        checkRoundTrips(try fixture("gpt2_style"), "gpt2_style")
        checkRoundTrips(try fixture("llama3_style"), "llama3_style")
    }

    func testRoundTripsWithTrainedTokenizer() throws {
        let tok = try BPETrainer(vocabSize: 600).train(texts: Self.trainingCorpus())
        checkRoundTrips(tok, "trained")
        // Special tokens in text become their id; nothing else produces it.
        let eot = try XCTUnwrap(tok.endOfTextId)
        XCTAssertEqual(tok.encode("<|endoftext|>"), [eot])
        XCTAssertEqual(tok.encode("a<|endoftext|>b").count { $0 == eot }, 1)
        XCTAssertFalse(tok.encode("<|endof text|>").contains(eot))
    }

    func testDecodeIgnoresUnknownIdsAndReplacesBrokenUTF8() throws {
        let tok = try fixture("gpt2_style")
        let ids = tok.encode("é")  // two bytes: C3 A9
        XCTAssertEqual(tok.decode([-5, 1_000_000, Int32.max] + ids + [Int32.min]), "é")
        // A lone lead byte decodes to U+FFFD.
        let lead = try XCTUnwrap(tok.id(of: ByteLevel.string([0xC3])))
        XCTAssertEqual(tok.decode([lead]), "\u{FFFD}")
    }

    // MARK: Invalid UTF-8

    func testInvalidUTF8ReportsByteOffset() throws {
        let tok = try fixture("gpt2_style")
        let cases: [([UInt8], Int)] = [
            ([0x61, 0x62, 0xC3, 0x28], 2),  // bad continuation
            ([0x61, 0xE2, 0x82], 1),  // truncated at the end
            ([0xC0, 0x80], 0),  // overlong
            ([0x61, 0x62, 0x63, 0xED, 0xA0, 0x80], 3),  // surrogate
            ([0xF4, 0x90, 0x80, 0x80], 0),  // above U+10FFFF
            ([0x68, 0x69, 0x20, 0xFF], 3),
            (Array("<|endoftext|>ok".utf8) + [0x80], 15),  // stray continuation after a special token
        ]
        for (bytes, offset) in cases {
            XCTAssertThrowsError(try bytes.withUnsafeBufferPointer { try tok.encode(utf8: $0) }) { error in
                guard case ReLoRAError.invalidData(let message) = error else { return XCTFail("wrong error \(error)") }
                XCTAssertTrue(message.contains("byte offset \(offset)"), message)
            }
        }
        let valid = Array("fine ✓".utf8)
        XCTAssertEqual(try valid.withUnsafeBufferPointer { try tok.encode(utf8: $0) }, tok.encode("fine ✓"))
    }

    // MARK: Training

    /// ~40 KB of English-like text: fixed lines plus sentences drawn from a word list.
    static func trainingCorpus(sentences: Int = 600, seed: UInt64 = 11) -> [String] {
        let words = ("the of and to a in that is was he for it with as his on be at by I had not are but from or "
            + "have an they which one you were her all she there would their we him been has when who will more no "
            + "if out so said what up its about into than them can only other new some could time these two may "
            + "then do first any my now such like our over man me even most made after also did many before must "
            + "through back years where much your way well down should because each just those people Mr how too "
            + "little state good very make world still own see men work long get here between both life being under "
            + "never day same another know while last might us great old year off come since against go came right "
            + "used take three thee thou thy hath doth summer's lovely temperate winds buds darling").split(separator: " ")
        var rng = TestRNG(seed)
        var docs = variedTexts
        for _ in 0..<sentences {
            var s = ""
            let n = 4 + rng.int(14)
            for k in 0..<n {
                var w = String(words[rng.int(words.count)])
                if k == 0 { w = w.prefix(1).uppercased() + w.dropFirst() }
                s += (k == 0 ? "" : " ") + w
                if rng.int(12) == 0 { s += "," }
            }
            s += [".", ".", ".", "?", "!", ";", ":"][rng.int(7)]
            if rng.int(5) == 0 { s += " \(rng.int(2000))" }
            docs.append(s + (rng.int(3) == 0 ? "\n" : " "))
        }
        return docs
    }

    func testTrainingIsDeterministic() throws {
        let corpus = Self.trainingCorpus()
        let a = try BPETrainer(vocabSize: 500).train(texts: corpus)
        let b = try BPETrainer(vocabSize: 500).train(texts: corpus)
        XCTAssertEqual(try a.jsonData(), try b.jsonData())
        // Document order does not change the counts, so not the result either.
        let c = try BPETrainer(vocabSize: 500).train(texts: corpus.reversed())
        XCTAssertEqual(try a.jsonData(), try c.jsonData())
    }

    func testTrainedVocabularyHasRequestedSizeAndReloads() throws {
        let corpus = Self.trainingCorpus()
        var messages = [String]()
        let tok = try BPETrainer(vocabSize: 700, specialTokens: ["<|endoftext|>", "<|pad|>"])
            .train(texts: corpus, progress: { messages.append($0) })
        XCTAssertEqual(tok.vocabSize, 700)
        XCTAssertEqual(tok.endOfTextId, 698)  // specials last, in the order given
        XCTAssertEqual(tok.id(of: "<|pad|>"), 699)
        XCTAssertEqual(tok.id(of: "a"), 97)  // id == byte value for the 256 byte tokens
        XCTAssertEqual(tok.id(of: "Ġ"), 32)
        XCTAssertEqual(tok.merges.count, 700 - 256 - 2)
        XCTAssertFalse(messages.isEmpty)
        // Merges learn common words of the corpus.
        XCTAssertEqual(tok.encode(" the").count, 1)
        XCTAssertLessThan(tok.encode(corpus.joined()).count, corpus.joined().utf8.count / 2)

        let dir = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/tokenizer.json"
        try tok.save(to: path)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["tokenizer.json"])  // no temp file left
        let loaded = try BPETokenizer(contentsOf: path)
        XCTAssertEqual(loaded.vocabSize, 700)
        XCTAssertEqual(loaded.endOfTextId, 698)
        XCTAssertEqual(try loaded.jsonData(), try tok.jsonData())
        for s in corpus + Self.randomTexts(count: 100, seed: 3) { XCTAssertEqual(loaded.encode(s), tok.encode(s)) }

        // The written layout is what HF expects.
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
        let model = try XCTUnwrap(json["model"] as? [String: Any])
        XCTAssertEqual(model["type"] as? String, "BPE")
        XCTAssertEqual((model["vocab"] as? [String: Any])?.count, 698)
        XCTAssertEqual((model["merges"] as? [String])?.first?.split(separator: " ").count, 2)
        let pre = try XCTUnwrap(json["pre_tokenizer"] as? [String: Any])
        XCTAssertEqual(pre["type"] as? String, "ByteLevel")
        XCTAssertEqual(pre["add_prefix_space"] as? Bool, false)
        XCTAssertEqual(pre["use_regex"] as? Bool, true)
        XCTAssertEqual((json["post_processor"] as? [String: Any])?["trim_offsets"] as? Bool, false)
        XCTAssertEqual((json["decoder"] as? [String: Any])?["type"] as? String, "ByteLevel")
        XCTAssertTrue(json["normalizer"] is NSNull)
        let added = try XCTUnwrap(json["added_tokens"] as? [[String: Any]])
        XCTAssertEqual(added.map { $0["content"] as? String }, ["<|endoftext|>", "<|pad|>"])
        XCTAssertEqual(added.map { $0["special"] as? Bool }, [true, true])
    }

    func testTrainingStopsWhenDataRunsOut() throws {
        var messages = [String]()
        let tok = try BPETrainer(vocabSize: 5000).train(texts: ["abab abab cdcd"], progress: { messages.append($0) })
        XCTAssertLessThan(tok.vocabSize, 5000)
        XCTAssertTrue(messages.contains { $0.contains("vocabulary stops at") }, "\(messages)")
        XCTAssertEqual(tok.decode(tok.encode("abab cdcd x")), "abab cdcd x")
        // The error names the minimum: 256 byte tokens + the special tokens.
        for (vocab, specials, minimum) in [(100, ["<|endoftext|>"], 257), (256, ["<|endoftext|>"], 257), (257, ["<|endoftext|>", "<|pad|>"], 258)] {
            XCTAssertThrowsError(try BPETrainer(vocabSize: vocab, specialTokens: specials).train(texts: ["x"])) {
                XCTAssertTrue("\($0)".contains("vocab size \(vocab) is too small: the minimum is \(minimum)"), "\($0)")
            }
        }
        XCTAssertEqual(try BPETrainer(vocabSize: 257).train(texts: ["x"]).vocabSize, 257)
        XCTAssertThrowsError(try BPETrainer(vocabSize: 300, specialTokens: ["a", "a"]).train(texts: ["x"]))
    }

    /// Every shipped model config can be paired with a tokenizer from `relora tokenizer train`: its
    /// vocabulary holds at least the trainer's minimum (a 256-token config could not), and a tokenizer
    /// trained to the smallest config's size gives ids inside it.
    func testShippedModelConfigsFitTheTokenizerTrainer() throws {
        let configs = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Configs/models")
        let files = try FileManager.default.contentsOfDirectory(atPath: configs.path).filter { $0.hasSuffix(".json") }.sorted()
        XCTAssertTrue(files.contains("llama_tiny.json"), "\(files)")
        let trainer = BPETrainer(vocabSize: 0)
        var smallest = Int.max
        for file in files {
            let config = try LlamaConfig(contentsOf: configs.appendingPathComponent(file).path)
            XCTAssertGreaterThanOrEqual(config.vocabSize, trainer.minimumVocabSize, file)
            smallest = min(smallest, config.vocabSize)
        }
        let fixtures = fixturesDirectory() + "/shakespeare"
        let tok = try BPETrainer(vocabSize: smallest).train(files: ["\(fixtures)/train_slice.txt"])
        XCTAssertLessThanOrEqual(tok.vocabSize, smallest)
        let text = try String(contentsOfFile: "\(fixtures)/val_slice.txt", encoding: .utf8)
        XCTAssertLessThan(Int(try XCTUnwrap(tok.encode(text).max())), smallest)
    }

    func testTrainingFromFiles() throws {
        let dir = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let corpus = Self.trainingCorpus()
        let half = corpus.count / 2
        try Data(corpus[..<half].joined().utf8).write(to: URL(fileURLWithPath: dir + "/a.txt"))
        try Data(corpus[half...].joined().utf8).write(to: URL(fileURLWithPath: dir + "/b.txt"))
        let fromFiles = try BPETrainer(vocabSize: 500).train(files: [dir + "/a.txt", dir + "/b.txt"])
        XCTAssertEqual(fromFiles.vocabSize, 500)
        for s in Self.variedTexts { XCTAssertEqual(fromFiles.decode(fromFiles.encode(s)), s) }

        var bad = Array("valid text, then ".utf8)
        let offset = bad.count
        bad += [0xE2, 0x28, 0xA1] + Array(" more".utf8)
        try Data(bad).write(to: URL(fileURLWithPath: dir + "/bad.txt"))
        XCTAssertThrowsError(try BPETrainer(vocabSize: 500).train(files: [dir + "/a.txt", dir + "/bad.txt"])) { error in
            guard case ReLoRAError.invalidFile(let path, let reason) = error else { return XCTFail("wrong error \(error)") }
            XCTAssertTrue(path.hasSuffix("bad.txt"), path)
            XCTAssertTrue(reason.contains("byte offset \(offset)"), reason)
        }
        XCTAssertThrowsError(try BPETrainer(vocabSize: 500).train(files: [dir + "/missing.txt"]))
    }

    /// Long inputs are processed in chunks cut after a newline between printable ASCII characters; the
    /// cuts must not change the pieces (training counts) or the ids (encoding), for both patterns.
    func testChunkedProcessingMatchesWholeText() throws {
        let text = Array("word.\nNext line  \n\nthird\nx".utf8)
        text.withUnsafeBufferPointer { b in
            XCTAssertEqual(PreTokenizer.chunkEnd(b, from: 0, target: 1, limit: 1000), 6)
            XCTAssertEqual(PreTokenizer.chunkEnd(b, from: 0, target: 100, limit: 1000), b.count)
            XCTAssertEqual(PreTokenizer.chunkEnd(b, from: 6, target: 1, limit: 2), 8)  // hard cut, no newline in reach
        }
        let expected = try loadExpected()
        let corpus = (Self.trainingCorpus(sentences: 200) + expected.strings + expected.splitStrings).joined(separator: "\n")
        let bytes = Array(corpus.utf8)
        try bytes.withUnsafeBufferPointer { b in
            var whole = WordCounter(specials: ["<|endoftext|>"]), chunked = WordCounter(specials: ["<|endoftext|>"])
            XCTAssertNil(whole.add(b))
            XCTAssertNil(chunked.add(b, chunkTarget: 50))
            XCTAssertEqual(whole.counts, chunked.counts)
            for name in ["gpt2_style", "llama3_style"] {
                let tok = try fixture(name)
                XCTAssertEqual(try tok.encodeBytes(b, chunkTarget: 50, chunkLimit: 1 << 20), tok.encode(corpus), name)
            }
        }
        // Offsets of invalid UTF-8 are global, not per chunk.
        let bad = Array("line one.\nline two.\nline three".utf8) + [0xFF]
        let tok = try fixture("gpt2_style")
        XCTAssertThrowsError(try bad.withUnsafeBufferPointer { try tok.encodeBytes($0, chunkTarget: 4, chunkLimit: 100) }) { error in
            XCTAssertEqual(error as? ReLoRAError, .invalidData("invalid UTF-8 at byte offset \(bad.count - 1)"))
        }
        var counter = WordCounter(specials: [])
        XCTAssertEqual(bad.withUnsafeBufferPointer { counter.add($0, chunkTarget: 4) }, bad.count - 1)
    }

    // MARK: Malformed files

    func assertRejects(_ data: Data, _ needle: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try BPETokenizer(jsonData: data, path: "bad.json"), file: file, line: line) { error in
            guard case ReLoRAError.invalidFile(let path, let reason) = error else {
                return XCTFail("wrong error \(error)", file: file, line: line)
            }
            XCTAssertEqual(path, "bad.json", file: file, line: line)
            XCTAssertTrue(reason.contains(needle), "'\(reason)' should mention '\(needle)'", file: file, line: line)
        }
    }

    /// The GPT-2 fixture as a mutable dictionary.
    func fixtureObject() throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: "\(Self.fixtureDirectory)/gpt2_style.json"))
        return try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    func mutated(_ change: (inout [String: Any]) -> Void) throws -> Data {
        var root = try fixtureObject()
        change(&root)
        return try JSONSerialization.data(withJSONObject: root)
    }

    func model(_ root: inout [String: Any], _ change: (inout [String: Any]) -> Void) {
        var m = root["model"] as! [String: Any]
        change(&m)
        root["model"] = m
    }

    func testMalformedTokenizerFilesAreRejected() throws {
        assertRejects(Data("not json".utf8), "not valid JSON")
        assertRejects(Data(), "not valid JSON")
        assertRejects(Data("[1, 2]".utf8), "JSON object")
        assertRejects(Data("{\"model\": 3}".utf8), "model")
        assertRejects(Data([0x7B, 0x22, 0xFF, 0x22, 0x3A, 0x31, 0x7D]), "invalid UTF-8")
        assertRejects(Data("{\"a\": \"\\ud800\"}".utf8), "surrogate")
        assertRejects(Data((String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)).utf8), "nested")
        let full = try Data(contentsOf: URL(fileURLWithPath: "\(Self.fixtureDirectory)/gpt2_style.json"))
        assertRejects(full.prefix(full.count / 2), "not valid JSON")

        assertRejects(try mutated { r in model(&r) { $0["type"] = "WordPiece" } }, "only byte-level BPE")
        assertRejects(try mutated { r in model(&r) { $0["type"] = "Unigram" } }, "only byte-level BPE")
        assertRejects(try mutated { r in model(&r) { $0["byte_fallback"] = true } }, "only byte-level BPE")
        assertRejects(try mutated { r in model(&r) { $0["continuing_subword_prefix"] = "##" } }, "only byte-level BPE")
        assertRejects(try mutated { r in model(&r) { $0["dropout"] = 0.1 } }, "dropout")
        assertRejects(try mutated { r in
            r["pre_tokenizer"] = ["type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true]
        }, "only byte-level BPE")
        assertRejects(try mutated { r in r["pre_tokenizer"] = NSNull() }, "only byte-level BPE")
        assertRejects(try mutated { r in
            r["pre_tokenizer"] = ["type": "Sequence", "pretokenizers": [
                ["type": "Split", "pattern": ["Regex": "\\w+|\\s+"], "behavior": "Isolated", "invert": false],
                ["type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false],
            ]]
        }, "unsupported pre-tokenizer pattern")
        assertRejects(try mutated { r in
            r["pre_tokenizer"] = ["type": "Sequence", "pretokenizers": [
                ["type": "Split", "pattern": ["Regex": SplitPattern.llama3.regex], "behavior": "Isolated", "invert": false],
            ]]
        }, "only byte-level BPE")
        assertRejects(try mutated { r in r["normalizer"] = ["type": "NFC"] }, "normalizer")
        assertRejects(try mutated { r in r["decoder"] = ["type": "Metaspace"] }, "decoder")

        // Merges that reference unknown tokens, or produce one.
        assertRejects(try mutated { r in model(&r) { m in
            var merges = m["merges"] as! [Any]
            merges.append(["Ġt", "no-such-token"])
            m["merges"] = merges
        } }, "not in model.vocab")
        assertRejects(try mutated { r in model(&r) { m in
            var merges = m["merges"] as! [Any]
            merges.append("Ġ Ġ Ġ")
            m["merges"] = merges
        } }, "two tokens")
        assertRejects(try mutated { r in model(&r) { m in
            var merges = m["merges"] as! [Any]
            merges.append(["q", "z"])  // both bytes exist, "qz" does not
            m["merges"] = merges
        } }, "not in model.vocab")
        assertRejects(try mutated { r in model(&r) { $0["merges"] = 5 } }, "merges")

        // Vocab ids: duplicated, not dense, not integers; missing byte tokens.
        assertRejects(try mutated { r in model(&r) { m in
            var v = m["vocab"] as! [String: Any]
            v["!"] = v["\""]
            m["vocab"] = v
        } }, "used by both")
        assertRejects(try mutated { r in model(&r) { m in
            var v = m["vocab"] as! [String: Any]
            v["zzzzzz"] = 100_000
            m["vocab"] = v
        } }, "dense")
        assertRejects(try mutated { r in model(&r) { m in
            var v = m["vocab"] as! [String: Any]
            v["!"] = -1
            m["vocab"] = v
        } }, "dense")
        assertRejects(try mutated { r in model(&r) { m in
            var v = m["vocab"] as! [String: Any]
            v["!"] = "one"
            m["vocab"] = v
        } }, "integer")
        assertRejects(try mutated { r in model(&r) { m in
            m["vocab"] = ["a": 0, "b": 1, "ab": 2]
            m["merges"] = ["a b"]
        } }, "byte-level")

        // Added tokens: gaps and duplicates.
        assertRejects(try mutated { r in
            r["added_tokens"] = [["id": 700, "content": "<x>", "special": true]]
        }, "not dense")
        assertRejects(try mutated { r in
            var a = r["added_tokens"] as! [[String: Any]]
            a.append(a[0])
            r["added_tokens"] = a
        }, "twice")
        assertRejects(try mutated { r in r["added_tokens"] = [["id": 500]] }, "added_tokens[0]")
        assertRejects(try mutated { r in r["added_tokens"] = [["id": 300, "content": "<|endoftext|>", "special": true]] }, "model.vocab gives to")

        XCTAssertThrowsError(try BPETokenizer(contentsOf: "/nonexistent/tokenizer.json")) { error in
            guard case ReLoRAError.invalidFile(_, let reason) = error else { return XCTFail("wrong error \(error)") }
            XCTAssertTrue(reason.contains("cannot read"), reason)
        }
    }

    /// Random byte mutations of a real file never crash the reader (they either load or throw).
    /// Byte-level corruption: each mutant is either rejected with a `ReLoRAError` or loads as a tokenizer
    /// that still round-trips text. Three kinds, 1-4 changes each, in turn:
    ///  - any byte to a random byte (mostly invalid UTF-8 or JSON: rejected);
    ///  - a letter or digit to another letter or digit (changed names, ids, merges, regexes: either);
    ///  - whitespace between JSON tokens to other whitespace (the same JSON: always loads).
    /// So both outcomes must occur; the seed is fixed, so the counts are too.
    func testCorruptedFilesAreRejectedOrRoundTrip() throws {
        let full = [UInt8](try Data(contentsOf: URL(fileURLWithPath: "\(Self.fixtureDirectory)/llama3_style.json")))
        // Offsets of whitespace outside JSON strings.
        var between: [Int] = []
        var inString = false, escaped = false
        for (i, b) in full.enumerated() {
            if inString {
                if escaped { escaped = false } else if b == UInt8(ascii: "\\") { escaped = true } else if b == UInt8(ascii: "\"") { inString = false }
            } else if b == UInt8(ascii: "\"") {
                inString = true
            } else if b == 0x20 || b == 0x0A {
                between.append(i)
            }
        }
        let letters = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ".utf8), digits = Array("0123456789".utf8)
        let alphanumeric = full.indices.filter { letters.contains(full[$0]) || digits.contains(full[$0]) }
        let whitespace: [UInt8] = [0x20, 0x0A, 0x09, 0x0D]
        let texts = ["Hello world <|endoftext|> 123"] + Self.variedTexts.prefix(6)

        var rng = TestRNG(99)
        var loaded = [0, 0, 0], rejected = [0, 0, 0]
        for trial in 0..<300 {
            let kind = trial % 3
            var bytes = full
            var changes: [(offset: Int, byte: UInt8)] = []
            for _ in 0..<(1 + rng.int(4)) {
                let at: Int
                switch kind {
                case 0:
                    at = rng.int(bytes.count)
                    bytes[at] = UInt8(rng.int(256))
                case 1:
                    at = alphanumeric[rng.int(alphanumeric.count)]
                    let pool = digits.contains(full[at]) ? digits : letters
                    bytes[at] = pool[rng.int(pool.count)]
                default:
                    at = between[rng.int(between.count)]
                    bytes[at] = whitespace[rng.int(whitespace.count)]
                }
                changes.append((at, bytes[at]))
            }
            do {
                let tok = try BPETokenizer(jsonData: Data(bytes))
                loaded[kind] += 1
                for text in texts {
                    XCTAssertEqual(tok.decode(tok.encode(text)), text, "mutant \(trial) \(changes) loads but does not round-trip")
                }
            } catch is ReLoRAError {
                rejected[kind] += 1
            } catch {
                XCTFail("mutant \(trial) \(changes): \(error) is not a ReLoRAError")
            }
        }
        print("corrupted tokenizer files (random, alphanumeric, whitespace): loaded \(loaded), rejected \(rejected)")
        XCTAssertEqual(loaded[2], 100, "whitespace between tokens changes nothing")
        XCTAssertGreaterThan(rejected[0], 50, "a random byte in ASCII JSON is mostly invalid UTF-8 or JSON")
        XCTAssertGreaterThan(rejected[1], 0)
    }

    /// Structural mutations that keep the JSON valid (reordered or dropped merges, changed ids and flags):
    /// each file either is rejected or loads into a tokenizer that still round-trips text.
    func testMutatedTokenizersLoadOrFailCleanly() throws {
        var rng = TestRNG(2024)
        var loaded = 0, rejected = 0
        for trial in 0..<60 {
            let data = try mutated { r in
                model(&r) { m in
                    var merges = m["merges"] as! [Any]
                    var vocab = m["vocab"] as! [String: Any]
                    switch trial % 6 {
                    case 0: merges.swapAt(rng.int(merges.count), rng.int(merges.count))
                    case 1: merges.remove(at: rng.int(merges.count))
                    case 2: vocab[Array(vocab.keys)[rng.int(vocab.count)]] = rng.int(600)
                    case 3: m["ignore_merges"] = rng.int(2) == 0
                    case 4: for k in stride(from: merges.count - 1, to: 0, by: -1) { merges.swapAt(k, rng.int(k + 1)) }
                    default: merges.append(merges[rng.int(merges.count)])  // a repeated merge keeps its last rank
                    }
                    m["merges"] = merges
                    m["vocab"] = vocab
                }
                if trial % 7 == 0 { r["added_tokens"] = [["id": 495 + rng.int(10), "content": "<|endoftext|>", "special": true]] }
            }
            do {
                let tok = try BPETokenizer(jsonData: data)
                loaded += 1
                for s in Self.variedTexts.prefix(12) { XCTAssertEqual(tok.decode(tok.encode(s)), s) }
            } catch {
                XCTAssertNotNil(error as? ReLoRAError)
                rejected += 1
            }
        }
        XCTAssertGreaterThan(loaded, 10)
        XCTAssertGreaterThan(rejected, 5)
    }

    // MARK: Export for the HF check, and speed

    /// With `RELORA_TOKENIZER_EXPORT=/some/dir`, trains a tokenizer and writes it with our encodings of the
    /// fixture strings and the corpus, for `make_tokenizer_fixture.py --check /some/dir/tokenizer.json`.
    func testExportForHuggingFaceCheck() throws {
        guard let dir = ProcessInfo.processInfo.environment["RELORA_TOKENIZER_EXPORT"] else { return }
        let corpus = Self.trainingCorpus(sentences: 3000)
        let tok = try BPETrainer(vocabSize: 1000).train(texts: corpus)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try tok.save(to: dir + "/tokenizer.json")
        let strings = try loadExpected().strings + Self.variedTexts + Self.randomTexts(count: 200, seed: 5) + corpus
        let object: [String: Any] = ["strings": strings, "ids": strings.map { tok.encode($0).map { Int($0) } }]
        try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: dir + "/tokenizer.json.expected.json"))
        print("wrote \(dir)/tokenizer.json and its expected encodings (\(strings.count) strings)")
    }

    /// Prints encode and training throughput (no assertion: timings depend on the machine and build mode).
    func testSpeedIsReported() throws {
        let corpus = Self.trainingCorpus(sentences: 4000, seed: 21)
        var text = corpus.joined()
        while text.utf8.count < 1 << 20 { text += corpus.joined() }
        let mb = Double(text.utf8.count) / 1e6
        var start = Date()
        let tok = try BPETrainer(vocabSize: 2000).train(texts: [text])
        let trainSeconds = Date().timeIntervalSince(start)
        start = Date()
        let ids = tok.encode(text)
        let encodeSeconds = Date().timeIntervalSince(start)
        XCTAssertEqual(tok.decode(ids), text)
        print(String(format: "tokenizer speed: trained vocab 2000 on %.2f MB in %.2f s; encoded %.2f MB in %.2f s (%.2f MB/s, %d tokens)",
                     mb, trainSeconds, mb, encodeSeconds, mb / encodeSeconds, ids.count))
    }
}
