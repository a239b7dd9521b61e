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

/// Long commands report progress on stderr; when stderr is not a terminal (here: a pipe) as plain lines,
/// without carriage returns, ending with the final count and rate.
final class ProgressOutputTests: XCTestCase {
    func testEvalProgressIsPlainLinesOffATerminal() throws {
        let f = fixturesDirectory()
        let r = try runRelora(["eval", "--model", "\(f)/tiny_llama", "--data", "\(f)/eval_tokens.npy", "--seq-len", "16", "--batch", "2"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertFalse(r.stderr.contains("\r"), r.stderr)
        let last = try XCTUnwrap(r.stderr.split(separator: "\n").last.map(String.init))
        XCTAssertNotNil(last.range(of: #"^eval: 12/12 windows \(100%\) \| [0-9.]+ windows/s$"#, options: .regularExpression), last)
        // --json keeps stderr quiet.
        let json = try runRelora(["eval", "--model", "\(f)/tiny_llama", "--data", "\(f)/eval_tokens.npy", "--seq-len", "16", "--json"])
        XCTAssertEqual(json.stderr, "")
    }
}
