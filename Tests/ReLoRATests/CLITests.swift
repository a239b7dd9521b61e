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

    func testBadInputsExitNonZeroWithOneLine() throws {
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
