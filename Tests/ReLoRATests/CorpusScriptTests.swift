import Foundation
import XCTest

/// `scripts/fetch_corpus.py`: its split and dedup logic (doctests and a synthetic corpus, no network). A
/// built corpus is checked by the script itself (`fetch_corpus.py --check`, docs/data.md), not here: the
/// tests never download it, so such a test would always skip.
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
}
