import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRAFormats
@testable import ReLoRATokenizer

/// SentencePiece-style tokenizers against the reference libraries: `Tests/Fixtures/make_sentencepiece_fixture.py`
/// trained tokenizers with `sentencepiece` (.model: Unigram with a charsmap and byte fallback, BPE with byte
/// fallback, Unigram with <unk>) and with `tokenizers` (BPE + byte fallback in Llama 2's and newer Metaspace
/// layouts, Unigram with and without byte fallback, transformers' conversions of the .model files), wrote
/// one .model as llama.cpp GGUF metadata, and recorded the reference ids and decodes of 49 strings. Every
/// id and every decode must be equal.
final class SentencePieceTests: XCTestCase {
    static let directory = fixturesDirectory() + "/sentencepiece"

    static let files: [String: String] = [
        "spm_unigram": "spm_unigram.model", "spm_bpe": "spm_bpe.model", "spm_unigram_nofallback": "spm_unigram_nofallback.model",
        "spm_bpe_gguf": "spm_bpe.gguf", "llama2_legacy": "llama2_legacy.json", "llama_metaspace": "llama_metaspace.json",
        "metaspace_split": "metaspace_split.json", "unigram": "unigram.json", "unigram_fallback": "unigram_fallback.json",
        "converted_unigram": "converted_unigram.json", "converted_bpe": "converted_bpe.json",
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
        var report: [String] = []
        for name in Self.files.keys.sorted() {
            let entry = try XCTUnwrap(root[name] as? [String: Any], name)
            let ids = try XCTUnwrap(entry["ids"] as? [[Int]], name).map { $0.map { Int32($0) } }
            let decoded = try XCTUnwrap(entry["decoded"] as? [String], name)
            let tok = try load(name)
            var idMismatches = 0, decodeMismatches = 0, tokens = 0
            for (k, s) in strings.enumerated() {
                let got = tok.encode(s)
                tokens += got.count
                if got != ids[k] {
                    idMismatches += 1
                    if idMismatches <= 3 { print("\(name) ids differ on \(s.debugDescription.prefix(60)):\n  want \(ids[k].prefix(30))\n  got  \(got.prefix(30))") }
                }
                let text = tok.decode(ids[k])
                if text != decoded[k] {
                    decodeMismatches += 1
                    if decodeMismatches <= 3 { print("\(name) decode differs on \(s.debugDescription.prefix(60)):\n  want \(decoded[k].debugDescription.prefix(80))\n  got  \(text.debugDescription.prefix(80))") }
                }
            }
            report.append("\(name): \(strings.count) strings, \(tokens) tokens, \(idMismatches) id mismatches, \(decodeMismatches) decode mismatches")
            XCTAssertEqual(idMismatches, 0, name)
            XCTAssertEqual(decodeMismatches, 0, name)
        }
        print(report.joined(separator: "\n"))
    }
}
