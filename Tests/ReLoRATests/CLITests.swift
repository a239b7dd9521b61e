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

/// The `relora` executable end to end: exit codes and one-sentence errors on bad input.
final class CLITests: XCTestCase {
    func testEvalJSONMatchesFixture() throws {
        let f = fixturesDirectory()
        let r = try runRelora(["eval", "--model", "\(f)/tiny_llama", "--data", "\(f)/eval_tokens.npy", "--seq-len", "16", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let obj = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        XCTAssertEqual(obj["loss"] as! Double, 5.135004917780559, accuracy: 1e-5)
        XCTAssertEqual(obj["tokens"] as! Int, 180)
        XCTAssertEqual(obj["perplexity"] as! Double, 169.865155, accuracy: 1e-2)
    }

    /// `--out` into folders that do not exist yet (a fresh checkout's `data/mine/`) creates them.
    func testTokenizerOutputsCreateTheirFolders() throws {
        let dir = temporaryDirectory()
        try String(repeating: "To be, or not to be: that is the question.\n", count: 20).write(toFile: "\(dir)/t.txt", atomically: true, encoding: .utf8)
        var r = try runRelora(["tokenizer", "train", "--vocab-size", "280", "--in", "\(dir)/t.txt", "--out", "\(dir)/a/b/tok.json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        r = try runRelora(["tokenize", "--tokenizer", "\(dir)/a/b/tok.json", "--in", "\(dir)/t.txt", "--out", "\(dir)/c/d/t.npy"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertGreaterThan(try TokenArray(npyPath: "\(dir)/c/d/t.npy").count, 0)
    }

    /// `relora memory --world-size N` plans each rank: with shard_optimizer the plan of the largest rank
    /// and a line per rank, whose optimizer states are a share of the one process's; without it every rank
    /// plans the same as one process (on cpu line for line; on cuda with the gradient sums' two buffers in
    /// `workspace` and NCCL's estimated buffers besides).
    func testMemoryPlansEachRankOfAShardedRun() throws {
        let root = URL(fileURLWithPath: fixturesDirectory()).deletingLastPathComponent().deletingLastPathComponent().path
        let args = ["memory", root + "/Configs/recipes/plan_1024.json", "--device", "cuda",
                    "--set", "model=" + root + "/Configs/models/llama_350m.json"]
        let one = try runRelora(args)
        XCTAssertEqual(one.status, 0, one.stderr)
        XCTAssertFalse(one.stdout.contains("ranks"), one.stdout)
        let same = try runRelora(args + ["--world-size", "4"])
        XCTAssertTrue(same.stdout.contains(", 4 ranks (each the same: shard_optimizer is off)"), same.stdout)
        func lines(_ text: String, without prefixes: [String] = []) -> [Substring] {
            text.split(separator: "\n").dropFirst().filter { line in !prefixes.contains { line.hasPrefix("  " + $0) } }
        }
        let depends = ["workspace", "peak total", "+ allocator", "+ NCCL", "device total"]
        XCTAssertEqual(lines(same.stdout, without: depends), lines(one.stdout, without: depends))
        XCTAssertTrue(same.stdout.contains("  + NCCL ") && !one.stdout.contains("  + NCCL "), same.stdout)
        let cpu = ["--device", "cpu"]
        XCTAssertEqual(lines(try runRelora(args + cpu + ["--world-size", "4"]).stdout), lines(try runRelora(args + cpu).stdout))
        let sharded = try runRelora(args + ["--world-size", "2", "--set", "shard_optimizer=true"])
        XCTAssertEqual(sharded.status, 0, sharded.stderr)
        XCTAssertTrue(sharded.stdout.contains(", 2 ranks, optimizer state sharded (plan of rank "), sharded.stdout)
        let rows = sharded.stdout.split(separator: "\n").filter { $0.hasPrefix("    0 ") || $0.hasPrefix("    1 ") }
        XCTAssertEqual(rows.count, 2, sharded.stdout)
        func optimizer(_ text: String) -> String? {
            text.split(separator: "\n").first { $0.hasPrefix("  optimizer ") }.map { $0.split(separator: " ", maxSplits: 1)[1].trimmingCharacters(in: .whitespaces) }
        }
        XCTAssertNotEqual(optimizer(sharded.stdout), optimizer(one.stdout), "the rank's optimizer states are a share")
        let json = try runRelora(args + ["--world-size", "2", "--set", "shard_optimizer=true", "--json"])
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
        XCTAssertEqual(object["world_size"] as? Int, 2)
        XCTAssertEqual(object["shard_optimizer"] as? Bool, true)
        XCTAssertEqual((object["ranks"] as? [[String: Any]])?.compactMap { $0["rank"] as? Int }, [0, 1])
    }

    func testBadInputsExitNonZeroWithOneLine() throws {
        let f = fixturesDirectory()
        let dir = temporaryDirectory()
        let notNpy = "\(dir)/tokens.npy"
        try Data("hello".utf8).write(to: URL(fileURLWithPath: notNpy))
        let cases: [([String], String)] = [
            (["eval", "--model", "\(f)/tiny_llama", "--data", "\(f)/eval_tokens.npy", "--seq-len", "65"], "max_position_embeddings"),
            (["eval", "--model", "\(f)/tiny_llama", "--data", notNpy, "--seq-len", "4"], "tokens.npy"),
            (["eval", "--model", "\(dir)/missing", "--data", notNpy, "--seq-len", "4"], "no such file or directory; a model is"),
            (["eval", "--model", "\(f)/tiny_llama", "--seq-len", "4"], "--data"),
            (["eval", "--model", "\(f)/tiny_llama", "--data", notNpy, "--seq-len", "four"], "integer"),
            (["eval", "--modle", "x"], "unknown option --modle"),
            (["frobnicate"], "unknown command"),
        ]
        for (args, fragment) in cases {
            let r = try runRelora(args)
            XCTAssertNotEqual(r.status, 0, "\(args)")
            XCTAssertTrue(r.stderr.contains(fragment), "\(args): stderr '\(r.stderr)' should mention '\(fragment)'")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(args): expected one line, got '\(r.stderr)'")
            XCTAssertFalse(r.stderr.contains("Fatal error"), "\(args) crashed")
        }
    }
}

/// Ctrl-C on a real training process: the run saves a checkpoint, says where it stopped and exits 130.
final class CLIStopTests: XCTestCase {
    func testInterruptedTrainingSavesAndExits130() throws {
        let data = try TrainerTests.makeByteData()
        let runDir = data.dir + "/run"
        let recipe: [String: Any] = [
            "model": data.model, "train_data": data.train, "run_dir": runDir, "seq_len": 32, "micro_batch": 4,
            "steps": 100_000, "warmup_steps": 10, "eval_every": 100_000, "checkpoint_every": 100_000,
        ]
        try JSONSerialization.data(withJSONObject: recipe).write(to: URL(fileURLWithPath: data.dir + "/recipe.json"))

        let p = Process()
        p.executableURL = URL(fileURLWithPath: try requireReloraExecutable())
        p.arguments = ["train", data.dir + "/recipe.json"]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let watchdog = DispatchWorkItem { if p.isRunning { p.terminate() } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 120, execute: watchdog)
        defer { watchdog.cancel() }
        // Step lines come after the stop handler is installed; interrupt once two steps are done.
        var stdout = ""
        while !stdout.contains("step 2/100000 ") {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            stdout += String(decoding: chunk, as: UTF8.self)
        }
        XCTAssertTrue(stdout.contains("step 2/100000 "), "no step line before the process ended: \(stdout)")
        p.interrupt()  // SIGINT, as Ctrl-C sends
        stdout += String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()

        XCTAssertEqual(p.terminationReason, .exit, "killed by the signal instead of stopping: \(stderr)")
        XCTAssertEqual(p.terminationStatus, 130, stderr)
        XCTAssertFalse(stdout.contains("done:"), stdout)
        let last = try XCTUnwrap(stdout.split(separator: "\n").last.map(String.init))
        XCTAssertTrue(last.hasPrefix("stopped at step ") && last.contains(" of 100000, last loss "), last)
        // The checkpoint of the step it stopped at is saved and named in the last line.
        let checkpoint = try XCTUnwrap(TrainingCheckpoint.latest(runDir: runDir))
        let state = try TrainingCheckpoint.readState(checkpoint)
        XCTAssertGreaterThanOrEqual(state.step, 2)
        XCTAssertTrue(last.hasPrefix("stopped at step \(state.step) of 100000"), last)
        XCTAssertTrue(last.contains("checkpoint \(checkpoint)"), last)
    }
}

/// The whole user journey through the CLI on the committed Shakespeare slice: tokenizer, tokenize,
/// train, resume, export, eval, sample, and the errors a user can cause along the way.
final class CLIPipelineTests: XCTestCase {
    func testTrainExportEvalSamplePipeline() throws {
        let dir = temporaryDirectory()
        let f = fixturesDirectory() + "/shakespeare"

        var r = try runRelora(["tokenizer", "train", "--vocab-size", "400", "--in", "\(f)/train_slice.txt", "--out", "\(dir)/tok.json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        // Documents as JSONL and as a directory of text files.
        let jsonl = "{\"text\": \"To be, or not to be.\"}\n\n{\"text\": \"That is the question.\"}\n"
        try jsonl.write(toFile: "\(dir)/docs.jsonl", atomically: true, encoding: .utf8)
        r = try runRelora(["tokenize", "--tokenizer", "\(dir)/tok.json", "--in", "\(dir)/docs.jsonl", "--out", "\(dir)/docs.npy"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let docs = try TokenArray(npyPath: "\(dir)/docs.npy")
        let tokenizer = try BPETokenizer(contentsOf: "\(dir)/tok.json")
        let eot = try XCTUnwrap(tokenizer.endOfTextId)
        XCTAssertEqual((0..<docs.count).filter { docs[$0] == Int64(eot) }.count, 2, "one <|endoftext|> per document")
        XCTAssertEqual(tokenizer.decode(docs.window(0, docs.count)), "To be, or not to be.<|endoftext|>That is the question.<|endoftext|>")
        r = try runRelora(["tokenize", "--tokenizer", "\(dir)/tok.json", "--in", "\(f)/train_slice.txt", "--out", "\(dir)/train.npy"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("unigram entropy"), r.stdout)
        r = try runRelora(["tokenize", "--tokenizer", "\(dir)/tok.json", "--in", "\(f)/val_slice.txt", "--out", "\(dir)/val.npy"])
        XCTAssertEqual(r.status, 0, r.stderr)

        let config: [String: Any] = ["hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 400, "max_position_embeddings": 64]
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: "\(dir)/config.json"))
        let recipe: [String: Any] = [
            "model": "\(dir)/config.json", "train_data": "\(dir)/train.npy", "val_data": "\(dir)/val.npy",
            "tokenizer": "\(dir)/tok.json", "run_dir": "\(dir)/run", "seq_len": 32, "micro_batch": 4, "steps": 6,
            "warmup_steps": 1, "eval_every": 3, "eval_tokens": 256, "checkpoint_every": 3,
        ]
        try JSONSerialization.data(withJSONObject: recipe).write(to: URL(fileURLWithPath: "\(dir)/recipe.json"))
        r = try runRelora(["train", "\(dir)/recipe.json", "--set", "steps=3"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("step 3/3 | loss"), r.stdout)
        XCTAssertTrue(r.stdout.contains("eval step 3 | val loss"), r.stdout)
        // Starting again over the same run is refused; --resume continues it to 6 steps.
        r = try runRelora(["train", "\(dir)/recipe.json"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("--resume"), r.stderr)
        r = try runRelora(["train", "--resume", "\(dir)/run", "--set", "steps=6"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("resumed from"), r.stdout)
        XCTAssertTrue(r.stdout.contains("step 6/6 | loss"), r.stdout)

        r = try runRelora(["export", "\(dir)/run", "--format", "hf", "--out", "\(dir)/hf"])
        XCTAssertEqual(r.status, 0, r.stderr)
        for file in ["config.json", "model.safetensors", "tokenizer.json"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: "\(dir)/hf/\(file)"), file)
        }
        r = try runRelora(["eval", "--model", "\(dir)/hf", "--data", "\(dir)/val.npy", "--seq-len", "32", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        r = try runRelora(["sample", "--model", "\(dir)/hf", "--prompt", "KING LEAR.", "--max-tokens", "8", "--seed", "3"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.hasPrefix("KING LEAR."), r.stdout)
        let again = try runRelora(["sample", "--model", "\(dir)/run", "--prompt", "KING LEAR.", "--max-tokens", "8", "--seed", "3"])
        XCTAssertEqual(again.stdout, r.stdout, "same seed, same checkpoint: same text")

        // GGUF: an f32 export evaluates and samples exactly like the Hugging Face one (tokenizer from the
        // metadata); q8_0 and q4_0 export and evaluate.
        let hfEval = try runRelora(["eval", "--model", "\(dir)/hf", "--data", "\(dir)/val.npy", "--seq-len", "32", "--json"])
        for quant in ["f32", "q8_0", "q4_0"] {
            let g = try runRelora(["export", "\(dir)/run", "--format", "gguf", "--quant", quant, "--out", "\(dir)/m-\(quant).gguf"])
            XCTAssertEqual(g.status, 0, g.stderr)
            XCTAssertTrue(g.stdout.contains("m-\(quant).gguf (\(quant), 12 tensors"), g.stdout)
            let e = try runRelora(["eval", "--model", "\(dir)/m-\(quant).gguf", "--data", "\(dir)/val.npy", "--seq-len", "32", "--json"])
            XCTAssertEqual(e.status, 0, e.stderr)
            if quant == "f32" { XCTAssertEqual(e.stdout, hfEval.stdout, "f32 GGUF and HF exports hold the same weights") }
        }
        let gs = try runRelora(["sample", "--model", "\(dir)/m-f32.gguf", "--prompt", "KING LEAR.", "--max-tokens", "8", "--seed", "3"])
        XCTAssertEqual(gs.status, 0, gs.stderr)
        XCTAssertEqual(gs.stdout, r.stdout, "same model and tokenizer through GGUF: same text")
        let bad = try runRelora(["export", "\(dir)/run", "--format", "gguf", "--quant", "q5_1", "--out", "\(dir)/x.gguf"])
        XCTAssertTrue(bad.status != 0 && bad.stderr.contains("--quant q5_1 is not supported"), bad.stderr)

        // Errors: invalid UTF-8 names file and offset; bad --set key; a recipe with a typo.
        try Data([0x41, 0x42, 0xFF, 0x43]).write(to: URL(fileURLWithPath: "\(dir)/bad.txt"))
        r = try runRelora(["tokenize", "--tokenizer", "\(dir)/tok.json", "--in", "\(dir)/bad.txt", "--out", "\(dir)/bad.npy"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("bad.txt") && r.stderr.contains("byte offset 2"), r.stderr)
        r = try runRelora(["train", "\(dir)/recipe.json", "--set", "learning_rate=1"])
        XCTAssertTrue(r.status != 0 && r.stderr.contains("unknown recipe key 'learning_rate'"), r.stderr)
        try "{\"model\": 1}".write(toFile: "\(dir)/broken.json", atomically: true, encoding: .utf8)
        r = try runRelora(["train", "\(dir)/broken.json"])
        XCTAssertTrue(r.status != 0 && r.stderr.contains("'model' must be a string"), r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
    }
}

/// `--help` on every command of both executables, usage errors as one line with exit status 2, and
/// docs/cli.md naming exactly the options each command has.
final class CLIHelpTests: XCTestCase {
    /// The command words `relora --help` lists ("train", "tokenizer train", ...).
    func listedCommands() throws -> [String] {
        let r = try runRelora(["--help"])
        XCTAssertEqual(r.status, 0, r.stderr)
        guard let section = r.stdout.components(separatedBy: "Commands:\n").dropFirst().first else {
            XCTFail("no Commands: in \(r.stdout)")
            return []
        }
        return section.split(separator: "\n").prefix { $0.hasPrefix("  ") }.map {
            $0.trimmingCharacters(in: .whitespaces).components(separatedBy: "  ")[0]
        }
    }

    /// The option names (without dashes) the Options: section of a usage text lists, --help aside.
    func options(inUsage text: String) -> Set<String> {
        let section = text.components(separatedBy: "\nOptions:\n").dropFirst().first ?? ""
        return Set(section.split(separator: "\n").prefix { $0.hasPrefix(" ") }.compactMap { line -> String? in
            guard line.hasPrefix("  --") else { return nil }
            return String(line.dropFirst(4).prefix { $0.isLetter || $0.isNumber || $0 == "-" })
        })
    }

    func testTopLevelHelpListsEveryCommandAndPointsToTheDocs() throws {
        let help = try runRelora(["--help"])
        XCTAssertEqual(help.status, 0)
        XCTAssertTrue(help.stdout.contains("docs/cli.md"), help.stdout)
        XCTAssertEqual(try runRelora(["-h"]).stdout, help.stdout)
        let bare = try runRelora([])
        XCTAssertEqual(bare.status, 1, "relora without a command prints the usage and exits 1 (docs/cli.md)")
        XCTAssertEqual(bare.stdout, help.stdout)
        let commands = try listedCommands()
        for word in ["train", "export", "eval", "sample", "tokenizer train", "tokenize", "memory", "plot", "runs",
                     "analyze", "control", "selftest", "info"] {
            XCTAssertTrue(commands.contains(word), "relora --help does not list \(word): \(commands)")
        }
    }

    func testEveryCommandHasHelp() throws {
        let commands = try listedCommands()
        XCTAssertGreaterThanOrEqual(commands.count, 13)
        for words in commands + ["tokenizer"] {
            let args = words.split(separator: " ").map(String.init)
            for flag in ["--help", "-h"] {
                let r = try runRelora(args + [flag])
                XCTAssertEqual(r.status, 0, "relora \(words) \(flag): \(r.stderr)")
                XCTAssertEqual(r.stderr, "", "relora \(words) \(flag)")
                XCTAssertTrue(r.stdout.hasPrefix("relora \(words): "), "relora \(words) \(flag): \(r.stdout)")
                XCTAssertTrue(r.stdout.contains("\nUsage: relora \(words) "), "relora \(words) \(flag): \(r.stdout)")
                XCTAssertTrue(r.stdout.contains("\nOptions:\n"), "relora \(words) \(flag): \(r.stdout)")
                if words != "tokenizer" {
                    XCTAssertTrue(r.stdout.contains("\nExample:\n  relora \(words) ") || r.stdout.contains("\nExamples:\n  relora \(words) "),
                                  "relora \(words) \(flag) has no example: \(r.stdout)")
                }
            }
        }
        // train's help keeps the exit statuses a script needs.
        let train = try runRelora(["train", "--help"]).stdout
        XCTAssertTrue(train.contains("exits with status 3"), train)
        XCTAssertTrue(train.contains("exit status 130"), train)
    }

    func testUsageErrorsAreOneLineAndExit2() throws {
        let r = try runRelora(["train", "--bogus"])
        XCTAssertEqual(r.status, 2, r.stderr)
        XCTAssertEqual(r.stdout, "")
        XCTAssertEqual(r.stderr, "error: relora train: unknown option --bogus; see `relora train --help`\n")
        let cases: [([String], String)] = [
            (["train", "recipe.json", "--set"], "relora train: --set needs a value"),
            (["train", "a.json", "b.json"], "relora train: unexpected argument 'b.json'"),
            (["train", "a.json", "--budget", "lots"], "relora train: --budget lots is not a size"),
            (["eval", "--model", "m", "--data", "d", "--seq-len", "4", "stray"], "relora eval: unexpected argument 'stray'"),
            (["eval", "--model", "m", "--data", "d", "--seq-len", "4", "--seq-len", "8"], "relora eval: --seq-len is given twice"),
            (["sample", "--model", "m", "--prompt", "p", "--temperature", "hot"], "relora sample: --temperature must be a number >= 0"),
            (["export", "run", "--format", "onnx", "--out", "x"], "relora export: --format onnx is not supported; use hf or gguf"),
            (["tokenizer", "train", "--vocab-size", "400", "--out", "t.json"], "relora tokenizer train: missing required option --in"),
            (["tokenizer", "merge"], "relora tokenizer: unknown subcommand 'merge'"),
            (["plot", "run", "--smooth", "0"], "relora plot: --smooth must be an integer >= 1"),
            (["memory", "r.json", "--world-size", "0"], "relora memory: --world-size must be an integer >= 1, got '0'"),
            (["runs", "a", "b"], "relora runs: unexpected argument 'b'"),
            (["selftest", "--jsn"], "relora selftest: unknown option --jsn (did you mean --json?)"),
            (["info", "--blas"], "relora info: unknown option --blas"),
            (["--bogus"], "relora: unknown option --bogus"),
        ]
        try assertUsageErrors(cases) { try runRelora($0) }
    }

    func testBenchHelpAndUsageErrors() throws {
        for sub in [[], ["gpu"], ["compression"], ["data-parallel"]] {
            let name = (["relora-bench"] + sub).joined(separator: " ")
            let r = try runReloraBench(sub + ["--help"])
            XCTAssertEqual(r.status, 0, "\(name) --help: \(r.stderr)")
            XCTAssertTrue(r.stdout.hasPrefix("\(name): ") && r.stdout.contains("\nUsage: \(name)"), r.stdout)
            XCTAssertTrue(r.stdout.contains("Example"), r.stdout)
        }
        let benchHelp = try runReloraBench(["--help"]).stdout
        XCTAssertTrue(benchHelp.contains("\n  gpu ") && benchHelp.contains("\n  data-parallel "), "relora-bench --help lists its commands")
        let cases: [([String], String)] = [
            (["--bogus"], "relora-bench: unknown option --bogus"),
            (["--steps", "0"], "relora-bench: --steps must be an integer >= 1, got '0'"),
            (["--mode", "fast"], "relora-bench: --mode fast is not supported"),
            (["stray"], "relora-bench: unexpected argument 'stray'"),
            (["gpu", "--steps", "x"], "relora-bench gpu: --steps must be an integer >= 1, got 'x'"),
            (["compression", "ckpt", "--levels", "1,x"], "relora-bench compression: --levels takes zstd levels"),
        ]
        try assertUsageErrors(cases, run: runReloraBench)
    }

    /// Each command line ends with exit status 2 and one line on stderr that contains its fragment.
    func assertUsageErrors(_ cases: [([String], String)], run: ([String]) throws -> (status: Int32, stdout: String, stderr: String),
                           file: StaticString = #filePath, line: UInt = #line) throws {
        for (args, fragment) in cases {
            let r = try run(args)
            XCTAssertEqual(r.status, 2, "\(args): \(r.stderr)", file: file, line: line)
            XCTAssertTrue(r.stderr.contains(fragment), "\(args): stderr '\(r.stderr)' should mention '\(fragment)'", file: file, line: line)
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(args): expected one line, got '\(r.stderr)'", file: file, line: line)
        }
    }

    /// docs/cli.md's command block names each command's options exactly: none missing, none stale.
    func testDocsNameEveryOptionOfEveryCommand() throws {
        let docsPath = URL(fileURLWithPath: fixturesDirectory()).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("docs/cli.md").path
        let docs = try String(contentsOfFile: docsPath, encoding: .utf8).split(separator: "\n").map(String.init)
        /// The `--options` of the docs lines that start with `prefix` and then `next` (a word or a character),
        /// with their indented continuation lines.
        func documented(_ prefix: String, next: (Substring) -> Bool) -> Set<String> {
            var lines: [String] = []
            var continuing = false
            for line in docs {
                if line.hasPrefix(prefix + " ") && next(line.dropFirst(prefix.count + 1)) {
                    lines.append(line)
                    continuing = true
                } else if continuing && line.hasPrefix(" ") {
                    lines.append(line)
                } else {
                    continuing = false
                }
            }
            XCTAssertFalse(lines.isEmpty, "docs/cli.md has no line for \(prefix)")
            let words = lines.flatMap { $0.split(whereSeparator: { !($0.isLetter || $0.isNumber || $0 == "-") }) }
            return Set(words.filter { $0.hasPrefix("--") && $0.count > 2 }.map { String($0.dropFirst(2)) })
        }
        for words in try listedCommands() {
            let helped = options(inUsage: try runRelora(words.split(separator: " ").map(String.init) + ["--help"]).stdout)
            XCTAssertEqual(documented("relora \(words)") { _ in true }, helped, "docs/cli.md vs relora \(words) --help")
        }
        for sub in ["gpu", "compression", "data-parallel"] {
            let helped = options(inUsage: try runReloraBench([sub, "--help"]).stdout)
            XCTAssertEqual(documented("relora-bench \(sub)") { _ in true }, helped, "docs/cli.md vs relora-bench \(sub) --help")
        }
        let helped = options(inUsage: try runReloraBench(["--help"]).stdout)
        XCTAssertEqual(documented("relora-bench") { $0.hasPrefix("[") || $0.hasPrefix("-") }, helped, "docs/cli.md vs relora-bench --help")
    }
}
