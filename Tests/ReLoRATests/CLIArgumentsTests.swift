import XCTest
@testable import ReLoRACore
@testable import ReLoRACommandLine

/// The one command-line parser of `relora` and `relora-bench` (`CommandSpec.parse`) as a unit: what it
/// accepts, and the one sentence it throws for each kind of mistake.
final class CLIArgumentsTests: XCTestCase {
    /// A command with every kind of option and one or two positionals.
    let spec = CommandSpec(
        name: "relora demo", summary: "a command for the tests",
        positionals: PositionalSpec("RUN_DIR", count: 1...2),
        options: [
            .value("model", "DIR", help: "the model", required: true),
            .value("seq-len", "N", help: "window length", default: "16"),
            .value("temperature", "T", help: "softmax temperature", default: "0.8"),
            .value("format", help: "the output format", default: "hf", choices: ["hf", "gguf"]),
            .value("budget", "SIZE", help: "a memory budget"),
            .value("labels", "a,b", help: "one label per run"),
            .repeated("set", "key=value", help: "override a recipe key"),
            .flag("json", help: "print JSON"),
        ],
        examples: ["relora demo runs/a --model m"])

    func parse(_ args: [String]) throws -> ParsedArguments {
        guard case .arguments(let a) = try spec.parse(args) else {
            XCTFail("\(args) asked for help")
            throw ReLoRAError.usage("help")
        }
        return a
    }

    /// The usage sentence `args` throws (nil and a failure if it parses).
    func problem(_ args: [String], file: StaticString = #filePath, line: UInt = #line) -> String? {
        do {
            _ = try spec.parse(args)
            XCTFail("\(args) parsed", file: file, line: line)
            return nil
        } catch ReLoRAError.usage(let message) {
            XCTAssertTrue(message.hasPrefix("relora demo: "), message, file: file, line: line)
            XCTAssertTrue(message.hasSuffix("; see `relora demo --help`"), message, file: file, line: line)
            XCTAssertFalse(message.contains("\n"), message, file: file, line: line)
            return message
        } catch {
            XCTFail("\(args): \(error) is not a usage error", file: file, line: line)
            return nil
        }
    }

    func assertProblem(_ args: [String], mentions fragments: String..., file: StaticString = #filePath, line: UInt = #line) {
        guard let message = problem(args, file: file, line: line) else { return }
        for fragment in fragments {
            XCTAssertTrue(message.contains(fragment), "\(args): '\(message)' should mention '\(fragment)'", file: file, line: line)
        }
    }

    func testValuesFlagsDefaultsAndPositionals() throws {
        let a = try parse(["runs/a", "--model", "m", "--seq-len=32", "--json", "runs/b"])
        XCTAssertEqual(a.positional, ["runs/a", "runs/b"])
        XCTAssertEqual(a.string("model"), "m")
        XCTAssertEqual(try a.int("seq-len"), 32)
        XCTAssertTrue(a.flag("json"))
        XCTAssertTrue(a.has("seq-len"))
        // Not given: the declared default, and `has` says it was not given.
        XCTAssertEqual(try a.double("temperature"), 0.8)
        XCTAssertFalse(a.has("temperature"))
        XCTAssertEqual(a.string("format"), "hf")
        XCTAssertNil(a.string("budget"))
        XCTAssertNil(try a.bytes("budget"))
        XCTAssertEqual(a.values("set"), [])
        let b = try parse(["runs/a", "--model", "m"])
        XCTAssertFalse(b.flag("json"))
        XCTAssertEqual(try b.int("seq-len"), 16)
    }

    func testValuesThatLookLikeOptionsOrNumbers() throws {
        // A negative number is a value; so is a word starting with dashes that is not one of the options,
        // and `--name=VALUE` passes anything.
        let a = try parse(["runs/a", "--model", "--weird-dir", "--temperature", "-1", "--labels=--x,y"])
        XCTAssertEqual(a.string("model"), "--weird-dir")
        XCTAssertEqual(a.string("temperature"), "-1")
        XCTAssertEqual(a.list("labels"), ["--x", "y"])
        // After `--` everything is positional.
        let b = try parse(["--model", "m", "--", "--json"])
        XCTAssertEqual(b.positional, ["--json"])
        XCTAssertFalse(b.flag("json"))
    }

    func testRepeatableOptionKeepsEveryValueInOrder() throws {
        let a = try parse(["runs/a", "--model", "m", "--set", "lr=3e-4", "--set=steps=10", "--set", "val_data=null"])
        XCTAssertEqual(a.values("set"), ["lr=3e-4", "steps=10", "val_data=null"])
    }

    func testSingleOptionOrFlagGivenTwiceIsAnError() {
        assertProblem(["runs/a", "--model", "m", "--seq-len", "16", "--seq-len", "32"], mentions: "--seq-len is given twice ('16', then '32')", "give it once")
        assertProblem(["runs/a", "--model", "m", "--json", "--json"], mentions: "--json is given twice")
    }

    func testUnknownOptionNamesItAndSuggestsTheNearest() {
        assertProblem(["runs/a", "--model", "m", "--lr-max", "3"], mentions: "unknown option --lr-max")
        assertProblem(["runs/a", "--modle", "m"], mentions: "unknown option --modle (did you mean --model?)")
        assertProblem(["runs/a", "--model", "m", "-x"], mentions: "unknown option -x")
        assertProblem(["runs/a", "--model", "m", "--bogus=1"], mentions: "unknown option --bogus;")
        // Nothing near: no suggestion.
        XCTAssertFalse(problem(["runs/a", "--model", "m", "--frobnicate"])?.contains("did you mean") ?? true)
    }

    func testMissingValue() {
        assertProblem(["runs/a", "--model"], mentions: "--model needs a value: --model DIR")
        // The next word is one of the command's options: the value is missing, not "--json".
        assertProblem(["runs/a", "--model", "m", "--seq-len", "--json"], mentions: "--seq-len needs a value: --seq-len N")
        assertProblem(["runs/a", "--model", "m", "--set"], mentions: "--set needs a value: --set key=value")
    }

    func testFlagTakesNoValue() {
        assertProblem(["runs/a", "--model", "m", "--json=yes"], mentions: "--json is a flag and takes no value")
    }

    func testMalformedNumbersAreNamedWhenRead() throws {
        let a = try parse(["runs/a", "--model", "m", "--seq-len", "four", "--temperature", "hot", "--budget", "lots"])
        XCTAssertThrowsError(try a.int("seq-len")) {
            XCTAssertEqual("\($0)", "relora demo: --seq-len must be an integer, got 'four'; see `relora demo --help`")
        }
        XCTAssertThrowsError(try a.double("temperature")) { XCTAssertTrue("\($0)".contains("--temperature must be a number, got 'hot'"), "\($0)") }
        XCTAssertThrowsError(try a.bytes("budget")) { XCTAssertTrue("\($0)".contains("--budget lots is not a size"), "\($0)") }
        let b = try parse(["runs/a", "--model", "m", "--seq-len", "0", "--temperature", "-0.5", "--budget", "24GiB"])
        XCTAssertThrowsError(try b.int("seq-len", atLeast: 1)) { XCTAssertTrue("\($0)".contains("--seq-len must be an integer >= 1, got '0'"), "\($0)") }
        XCTAssertEqual(try b.int("seq-len", atLeast: 0), 0)
        XCTAssertThrowsError(try b.double("temperature", atLeast: 0)) { XCTAssertTrue("\($0)".contains("a number >= 0, got '-0.5'"), "\($0)") }
        XCTAssertThrowsError(try b.double("temperature", atLeast: 0, exclusive: true))
        XCTAssertEqual(try b.bytes("budget"), 24 << 30)
    }

    func testChoices() throws {
        XCTAssertEqual(try parse(["runs/a", "--model", "m", "--format", "gguf"]).string("format"), "gguf")
        assertProblem(["runs/a", "--model", "m", "--format", "onnx"], mentions: "--format onnx is not supported; use hf or gguf")
    }

    func testRequiredOptionsAndPositionalCounts() {
        assertProblem(["runs/a"], mentions: "missing required option --model DIR")
        assertProblem(["--model", "m"], mentions: "missing RUN_DIR: give 1 to 2 RUN_DIR")
        assertProblem(["a", "b", "c", "--model", "m"], mentions: "unexpected argument 'c'")
        let none = CommandSpec(name: "relora demo", summary: "no positionals", options: [.flag("json", help: "JSON")])
        XCTAssertThrowsError(try none.parse(["stray"])) {
            XCTAssertTrue("\($0)".contains("relora demo: unexpected argument 'stray': it takes no positional arguments"), "\($0)")
        }
    }

    func testHelpWinsOverEverythingElse() throws {
        for args in [["--help"], ["-h"], ["runs/a", "--bogus", "--help"], ["--seq-len", "-h"], ["--model", "m", "--format", "onnx", "-h"]] {
            guard case .help = try spec.parse(args) else { return XCTFail("\(args) should ask for help") }
        }
        // Without arguments: help only where the spec says so.
        XCTAssertThrowsError(try spec.parse([]))
        let helpful = CommandSpec(name: "relora demo", summary: "s", positionals: .one("X"), helpWhenEmpty: true)
        guard case .help = try helpful.parse([]) else { return XCTFail("no arguments should ask for help") }
    }

    func testUsageTextComesFromTheSpec() {
        let text = spec.usage
        XCTAssertTrue(text.hasPrefix("relora demo: a command for the tests\n\nUsage: relora demo RUN_DIR [RUN_DIR ...] --model DIR"), text)
        XCTAssertTrue(text.contains("[--format hf|gguf]"), text)
        XCTAssertTrue(text.contains("[--set key=value ...]"), text)
        XCTAssertTrue(text.contains("--seq-len N"), text)
        XCTAssertTrue(text.contains("window length (default: 16)"), text)
        XCTAssertTrue(text.contains("override a recipe key (repeatable)"), text)
        XCTAssertTrue(text.contains("-h, --help"), text)
        XCTAssertTrue(text.hasSuffix("Example:\n  relora demo runs/a --model m"), text)
        for option in spec.options { XCTAssertTrue(text.contains("--\(option.name)"), option.name) }
        for line in text.split(separator: "\n") { XCTAssertLessThanOrEqual(line.count, CommandSpec.textWidth, String(line)) }
    }

    func testCommandTableListsSubcommandsOneLineEach() {
        let train = CommandSpec(name: "relora tokenizer train", summary: "train a tokenizer")
        let group = CommandSpec(name: "relora tokenizer", summary: "tokenizers", subcommands: [train])
        let eval = CommandSpec(name: "relora eval", summary: "loss and perplexity")
        let table = CommandSpec.commandTable([eval, group], under: "relora")
        XCTAssertEqual(table, "  eval             loss and perplexity\n  tokenizer train  train a tokenizer")
    }

    func testWrapKeepsShortLinesAndIndentsContinuations() {
        XCTAssertEqual(CommandSpec.wrap("short  line\nkept", indent: 4), "short  line\nkept")
        let long = Array(repeating: "word", count: 40).joined(separator: " ")
        let wrapped = CommandSpec.wrap(long, indent: 4).split(separator: "\n")
        XCTAssertGreaterThan(wrapped.count, 1)
        XCTAssertTrue(wrapped.dropFirst().allSatisfy { $0.hasPrefix("    word") })
        XCTAssertTrue(wrapped.allSatisfy { $0.count <= CommandSpec.textWidth })
    }

    func testEditDistance() {
        XCTAssertEqual(CommandSpec.editDistance("modle", "model"), 2)
        XCTAssertEqual(CommandSpec.editDistance("", "abc"), 3)
        XCTAssertEqual(CommandSpec.editDistance("seq-len", "seq-len"), 0)
        XCTAssertEqual(CommandSpec.editDistance("kitten", "sitting"), 3)
    }
}
