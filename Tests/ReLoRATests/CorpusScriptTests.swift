import Foundation
import XCTest

/// `scripts/fetch_corpus.py`: its split and dedup logic (doctests and a synthetic corpus, no network),
/// and, where the corpus has been built, that its train, val and ood sets share no file path and no
/// content hash (from the corpus's own `files.tsv`).
final class CorpusScriptTests: XCTestCase {
    var repoRoot: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    }

    /// Runs `python3 scripts/fetch_corpus.py ARGS`; skips when there is no python3.
    func runScript(_ args: [String]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", repoRoot + "/scripts/fetch_corpus.py"] + args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        do { try p.run() } catch { throw XCTSkip("cannot run python3: \(error)") }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        if p.terminationStatus == 127 { throw XCTSkip("python3 is not installed") }
        return (p.terminationStatus, text)
    }

    func testSplitAndDedupSelfTest() throws {
        let r = try runScript(["--self-test"])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("splits disjoint by path and content"), r.output)
    }

    func testBuiltCorpusSplitsAreDisjoint() throws {
        let manifest = repoRoot + "/data/corpus/manifest.json"
        try XCTSkipUnless(FileManager.default.fileExists(atPath: manifest), "no corpus built (python3 scripts/fetch_corpus.py)")
        let r = try runScript(["--check"])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("no shared path, no shared content hash"), r.output)
    }
}
