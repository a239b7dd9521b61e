import Foundation
import XCTest

/// The `relora` executable end to end: exit codes and one-sentence errors on bad input.
final class CLITests: XCTestCase {
    /// `relora` sits next to the test runner (`.build/<config>/reloraPackageTests.xctest`) in the build directory.
    var executable: String {
        let candidates = [
            URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent(),
            Bundle(for: CLITests.self).bundleURL.deletingLastPathComponent(),
            Bundle.main.bundleURL,
        ].map { $0.appendingPathComponent("relora").path }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
    }

    func run(_ args: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
    }

    func testEvalJSONMatchesFixture() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "relora not built")
        let f = fixturesDirectory()
        let r = try run(["eval", "--model", "\(f)/tiny_llama", "--data", "\(f)/eval_tokens.npy", "--seq-len", "16", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let obj = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        XCTAssertEqual(obj["loss"] as! Double, 5.135004917780559, accuracy: 1e-5)
        XCTAssertEqual(obj["tokens"] as! Int, 180)
        XCTAssertEqual(obj["perplexity"] as! Double, 169.865155, accuracy: 1e-2)
    }

    func testBadInputsExitNonZeroWithOneLine() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: executable), "relora not built")
        let f = fixturesDirectory()
        let dir = temporaryDirectory()
        let notNpy = "\(dir)/tokens.npy"
        try Data("hello".utf8).write(to: URL(fileURLWithPath: notNpy))
        let cases: [([String], String)] = [
            (["eval", "--model", "\(f)/tiny_llama", "--data", "\(f)/eval_tokens.npy", "--seq-len", "65"], "max_position_embeddings"),
            (["eval", "--model", "\(f)/tiny_llama", "--data", notNpy, "--seq-len", "4"], "tokens.npy"),
            (["eval", "--model", "\(dir)/missing", "--data", notNpy, "--seq-len", "4"], "not a directory"),
            (["eval", "--model", "\(f)/tiny_llama", "--seq-len", "4"], "--data"),
            (["eval", "--model", "\(f)/tiny_llama", "--data", notNpy, "--seq-len", "four"], "integer"),
            (["eval", "--modle", "x"], "unknown option --modle"),
            (["frobnicate"], "unknown command"),
        ]
        for (args, fragment) in cases {
            let r = try run(args)
            XCTAssertNotEqual(r.status, 0, "\(args)")
            XCTAssertTrue(r.stderr.contains(fragment), "\(args): stderr '\(r.stderr)' should mention '\(fragment)'")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(args): expected one line, got '\(r.stderr)'")
            XCTAssertFalse(r.stderr.contains("Fatal error"), "\(args) crashed")
        }
    }
}
