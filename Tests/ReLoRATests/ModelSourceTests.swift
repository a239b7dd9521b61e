import Foundation
import Glibc
import XCTest
@testable import ReLoRACore
@testable import ReLoRAFormats
@testable import ReLoRATokenizer
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain

/// The one model opener (`ModelSource`): every command that takes a model opens every kind of source, and
/// refuses what is not a model with the same sentence; loading streams tensors.
final class ModelSourceTests: XCTestCase {
    /// One trained run and every source made from it: the run directory, its checkpoint, its Hugging Face
    /// export (single file, and split into two shards with an index), its f32 GGUF export (relora's own),
    /// all holding the same weights and tokenizer; and the tiny_llama fixture (a Hugging Face directory
    /// without a tokenizer).
    struct Sources {
        let dir: String
        let val: String
        /// Label -> path.
        let models: [(String, String)]
        let noTokenizer: String
    }

    static func makeSources() throws -> Sources {
        let dir = temporaryDirectory("model-sources")
        let f = fixturesDirectory() + "/shakespeare"
        func ok(_ args: [String]) throws {
            let r = try runRelora(args)
            XCTAssertEqual(r.status, 0, "relora \(args.joined(separator: " ")): \(r.stderr)")
        }
        try ok(["tokenizer", "train", "--vocab-size", "300", "--in", "\(f)/train_slice.txt", "--out", "\(dir)/tok.json"])
        try ok(["tokenize", "--tokenizer", "\(dir)/tok.json", "--in", "\(f)/train_slice.txt", "--out", "\(dir)/train.npy"])
        try ok(["tokenize", "--tokenizer", "\(dir)/tok.json", "--in", "\(f)/val_slice.txt", "--out", "\(dir)/val.npy"])
        let config: [String: Any] = ["hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                                     "max_position_embeddings": 64]
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: "\(dir)/config.json"))
        let recipe: [String: Any] = [
            "model": "\(dir)/config.json", "train_data": "\(dir)/train.npy", "val_data": "\(dir)/val.npy",
            "tokenizer": "\(dir)/tok.json", "run_dir": "\(dir)/run", "seq_len": 32, "micro_batch": 4, "steps": 2,
            "warmup_steps": 1, "eval_every": 2, "eval_tokens": 128, "checkpoint_every": 2,
        ]
        try JSONSerialization.data(withJSONObject: recipe).write(to: URL(fileURLWithPath: "\(dir)/recipe.json"))
        try ok(["train", "\(dir)/recipe.json"])
        try ok(["export", "\(dir)/run", "--format", "hf", "--out", "\(dir)/hf"])
        try ok(["export", "\(dir)/run", "--format", "gguf", "--out", "\(dir)/model.gguf"])
        try shard(hf: "\(dir)/hf", into: "\(dir)/hf-sharded")
        return Sources(dir: dir, val: "\(dir)/val.npy", models: [
            ("run directory", "\(dir)/run"), ("checkpoint", "\(dir)/run/checkpoints/step_00000002"),
            ("Hugging Face", "\(dir)/hf"), ("Hugging Face sharded", "\(dir)/hf-sharded"), ("GGUF", "\(dir)/model.gguf"),
        ], noTokenizer: fixturesDirectory() + "/tiny_llama")
    }

    /// The Hugging Face directory `hf` as two safetensors shards and `model.safetensors.index.json`.
    static func shard(hf: String, into out: String) throws {
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        for file in ["config.json", "tokenizer.json"] {
            try FileManager.default.copyItem(atPath: "\(hf)/\(file)", toPath: "\(out)/\(file)")
        }
        let file = try SafetensorsFile(path: "\(hf)/model.safetensors")
        let names = file.tensorNames
        var weightMap: [String: String] = [:]
        for (i, part) in [names.prefix(names.count / 2), names.dropFirst(names.count / 2)].enumerated() {
            let shardName = "model-0000\(i + 1)-of-00002.safetensors"
            let entries = try part.map { SafetensorsEntry.f32($0, shape: file.info($0)!.shape, try file.floats($0)) }
            try SafetensorsWriter.write(entries, to: "\(out)/\(shardName)")
            for name in part { weightMap[name] = shardName }
        }
        let index: [String: Any] = ["metadata": [:] as [String: Any], "weight_map": weightMap]
        try JSONSerialization.data(withJSONObject: index).write(to: URL(fileURLWithPath: "\(out)/model.safetensors.index.json"))
    }

    /// Every command on every kind of source: eval and sample give the same loss and text from each (the
    /// same weights and tokenizer), export (hf and gguf), info and a warm start succeed; a source without a
    /// tokenizer is refused by sample alone, with one sentence.
    func testEveryCommandOpensEverySource() throws {
        let s = try Self.makeSources()
        var losses: [String: String] = [:], texts: [String: String] = [:]
        for (n, (label, path)) in s.models.enumerated() {
            var r = try runRelora(["eval", "--model", path, "--data", s.val, "--seq-len", "32", "--json"])
            XCTAssertEqual(r.status, 0, "eval \(label): \(r.stderr)")
            losses[label] = r.stdout
            r = try runRelora(["sample", "--model", path, "--prompt", "KING LEAR.", "--max-tokens", "6", "--seed", "2"])
            XCTAssertEqual(r.status, 0, "sample \(label): \(r.stderr)")
            XCTAssertTrue(r.stdout.hasPrefix("KING LEAR."), "sample \(label): \(r.stdout)")
            texts[label] = r.stdout
            for (format, out) in [("hf", "\(s.dir)/out-\(n)"), ("gguf", "\(s.dir)/out-\(n).gguf")] {
                r = try runRelora(["export", path, "--format", format, "--out", out])
                XCTAssertEqual(r.status, 0, "export \(format) \(label): \(r.stderr)")
                XCTAssertFalse(r.stderr.contains("no tokenizer"), "export \(format) \(label) carries the tokenizer: \(r.stderr)")
            }
            r = try runRelora(["info", path])
            XCTAssertEqual(r.status, 0, "info \(label): \(r.stderr)")
            XCTAssertTrue(r.stdout.contains("hidden 32  intermediate 64  layers 1  heads 4 (kv 2, head_dim 8)  vocab 300"),
                          "info \(label): \(r.stdout)")
            r = try runRelora(["train", "\(s.dir)/recipe.json", "--set", "warm_start=\(path)",
                               "--set", "run_dir=\(s.dir)/warm-\(n)", "--set", "steps=3"])
            XCTAssertEqual(r.status, 0, "warm_start \(label): \(r.stderr)")
            r = try runRelora(["analyze", path, "--against", s.models[0].1, "--out", "\(s.dir)/analyze-\(n)"])
            XCTAssertEqual(r.status, 0, "analyze --against \(label): \(r.stderr)")
        }
        XCTAssertEqual(Set(losses.values).count, 1, "one loss from every source: \(losses)")
        XCTAssertEqual(Set(texts.values).count, 1, "one text from every source: \(texts)")

        // analyze needs a run's recipe without --against: the other kinds say so.
        for path in ["\(s.dir)/hf", "\(s.dir)/model.gguf"] {
            let r = try runRelora(["analyze", path])
            XCTAssertNotEqual(r.status, 0)
            XCTAssertTrue(r.stderr.contains("\(path): is not a run (a run directory or one of its checkpoints), so it has no recipe"),
                          r.stderr)
        }
        // A source without a tokenizer: everything but sample.
        let r = try runRelora(["sample", "--model", s.noTokenizer, "--prompt", "x"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertEqual(r.stderr, "error: \(s.noTokenizer): has no tokenizer.json or tokenizer.model to encode the prompt with\n")
        XCTAssertEqual(try runRelora(["info", s.noTokenizer]).status, 0)
    }

    /// What is not a model gets the same sentence from every command, naming what is accepted.
    func testEveryCommandRefusesWhatIsNotAModel() throws {
        let dir = temporaryDirectory("not-models")
        try "not a model".write(toFile: "\(dir)/notes.txt", atomically: true, encoding: .utf8)
        try FileManager.default.createDirectory(atPath: "\(dir)/empty", withIntermediateDirectories: true)
        let accepted = ModelSourceKind.accepted
        let cases = [("\(dir)/missing", "no such file or directory; a model is \(accepted)"),
                     ("\(dir)/notes.txt", "is a file but not a GGUF file (no GGUF magic); a model is \(accepted)"),
                     ("\(dir)/empty", "is a directory but not a model; a model is \(accepted)")]
        let data = fixturesDirectory() + "/eval_tokens.npy"
        for (path, reason) in cases {
            let sentence = "\(path): \(reason)"
            let commands: [[String]] = [
                ["eval", "--model", path, "--data", data, "--seq-len", "8"],
                ["sample", "--model", path, "--prompt", "x"],
                ["export", path, "--format", "hf", "--out", "\(dir)/o"],
                ["export", path, "--format", "gguf", "--out", "\(dir)/o.gguf"],
                ["info", path],
                ["analyze", "\(dir)/empty", "--against", path],
            ]
            for args in commands {
                let r = try runRelora(args)
                XCTAssertNotEqual(r.status, 0, args.joined(separator: " "))
                XCTAssertEqual(r.stderr, "error: \(sentence)\n", args.joined(separator: " "))
            }
            // warm_start, in the library: the same sentence.
            XCTAssertThrowsError(try ModelSource.open(path)) { XCTAssertEqual("\($0)", sentence) }
        }
    }

    /// A bitsandbytes 4-bit Hugging Face directory (`BitsAndBytes4bit`) is a Hugging Face source: eval, export
    /// (to hf and gguf, whose evaluations give the same loss: the dequantized nf4 weights exactly) and info open
    /// it; sample refuses it for its missing tokenizer, with the one sentence.
    func testBitsAndBytesDirectoryIsAHuggingFaceSource() throws {
        let bnb = fixturesDirectory() + "/bnb/nf4"
        XCTAssertEqual(try ModelSourceKind.detect(bnb), .huggingFace)
        let dir = temporaryDirectory("bnb-source")
        try NpyWriter.write(tokens: (0..<96).map { Int64(($0 * 5) % 64) }, dtype: .uint16, to: dir + "/t.npy")
        func eval(_ model: String) throws -> String {
            let r = try runRelora(["eval", "--model", model, "--data", dir + "/t.npy", "--seq-len", "16", "--json"])
            XCTAssertEqual(r.status, 0, "eval \(model): \(r.stderr)")
            return r.stdout
        }
        let loss = try eval(bnb)
        for (format, out) in [("hf", dir + "/hf"), ("gguf", dir + "/m.gguf")] {
            let r = try runRelora(["export", bnb, "--format", format, "--out", out])
            XCTAssertEqual(r.status, 0, "export \(format): \(r.stderr)")
            XCTAssertEqual(try eval(out), loss, "export \(format)")
        }
        XCTAssertEqual(try runRelora(["info", bnb]).status, 0)
        let r = try runRelora(["sample", "--model", bnb, "--prompt", "x"])
        XCTAssertEqual(r.stderr, "error: \(bnb): has no tokenizer.json or tokenizer.model to encode the prompt with\n")
    }

    /// The kinds are told apart by their files; a run directory resolves to its latest checkpoint.
    func testDetectsKinds() throws {
        let f = fixturesDirectory()
        XCTAssertEqual(try ModelSourceKind.detect(f + "/tiny_llama"), .huggingFace)
        let source = try ModelSource.open(f + "/tiny_llama")
        XCTAssertNil(source.checkpoint)
        XCTAssertNil(try source.tokenizer())
        XCTAssertEqual(source.config.vocabSize, 97)
        XCTAssertEqual(try source.tensors().tensorNames.count, 21)
    }

    // MARK: Streaming

    /// A warm start's load streams: the peak of the process's anonymous memory while `ModelSource.loadWeights`
    /// fills a model (what `warm_start` calls) stays within the memory the model holds after the load (its
    /// ledger: weights, and for a quantized model its blocks) plus the largest tensor plus 8 MiB. Measured by
    /// `AnonymousMemorySampler` (RssAnon of /proc/self/status every 0.2 ms: a whole-model host copy, ~80 MB
    /// here, or a second copy of a tensor, cannot pass unseen; a spike shorter than 0.2 ms could). File-backed
    /// pages of the mapped safetensors are page cache, not counted (RssFile).
    func testWarmStartLoadStreams() throws {
        let dir = temporaryDirectory("streaming")
        // ~20M parameters (80 MB in f32), the largest tensors the embedding and head (32000 x 256, 32.8 MB).
        let config = try LlamaConfig(hiddenSize: 256, intermediateSize: 688, numHiddenLayers: 4, numAttentionHeads: 4,
                                     numKeyValueHeads: 2, vocabSize: 32000, maxPositionEmbeddings: 256)
        do {
            let model = LlamaModel(config: config, backend: CPUBackend())
            try model.weights.initializeRandom(seed: 3, backend: model.backend)
            try HFCheckpoint.save(model: model, to: "\(dir)/hf")
            try LlamaGGUF.write(model: model, tokenizer: nil, weights: .f32, to: "\(dir)/model.gguf")
        }
        let largest = 32000 * 256 * 4
        for path in ["\(dir)/hf", "\(dir)/model.gguf"] {
            for quant in [nil, QuantFormat.q8_0] {
                let source = try ModelSource.open(path)
                let backend = CPUBackend()
                let sampler = AnonymousMemorySampler()
                var model: LlamaModel?
                try sampler.measure {
                    let m = LlamaModel(config: config, backend: backend, lora: quant.map { _ in LoRAConfig(rank: 8, alpha: 16) },
                                       quant: quant)
                    try source.loadWeights(into: m)
                    model = m
                }
                let held = backend.ledger.report().liveTotal
                let label = "\(source.kind.rawValue), \(quant?.rawValue ?? "dense")"
                print(String(format: "%@: peak anonymous growth %.1f MB, model %.1f MB, largest tensor %.1f MB",
                             label, Double(sampler.peakGrowth) / 1e6, Double(held) / 1e6, Double(largest) / 1e6))
                XCTAssertLessThanOrEqual(sampler.peakGrowth, held + largest + (8 << 20), label)
                XCTAssertGreaterThan(sampler.peakGrowth, held / 2, "\(label): the sampler sees the model itself")
                withExtendedLifetime(model) {}
            }
        }
    }
}

/// The peak of the process's RssAnon (/proc/self/status) above its level before `measure`'s body, sampled
/// by a thread every 0.2 ms while the body runs. The baseline is taken after `malloc_trim(0)`, so memory the
/// body gets from glibc's free lists counts as growth when it becomes resident again.
final class AnonymousMemorySampler: @unchecked Sendable {  // `peak` and `running` are read and written under `lock`
    private let lock = NSLock()
    private var running = false
    private var peak = 0
    private(set) var peakGrowth = 0

    /// glibc's `malloc_trim` (not in the Glibc module's headers): returns free heap pages to the system.
    static let mallocTrim: (@convention(c) (Int) -> Int32)? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "malloc_trim") else { return nil }
        return unsafeBitCast(symbol, to: (@convention(c) (Int) -> Int32).self)
    }()

    /// RssAnon in bytes, read without allocating (a stack buffer and a byte scan).
    static func rssAnon() -> Int {
        let fd = open("/proc/self/status", O_RDONLY)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 8192) { buf -> Int in
            let n = read(fd, buf.baseAddress, 8192)
            guard n > 0 else { return 0 }
            let key = Array("RssAnon:".utf8)
            var i = 0
            while i + key.count < n {
                if buf[i] == key[0], (0..<key.count).allSatisfy({ buf[i + $0] == key[$0] }) {
                    var j = i + key.count, kb = 0
                    while j < n, buf[j] == 32 || buf[j] == 9 { j += 1 }
                    while j < n, buf[j] >= 48, buf[j] <= 57 { kb = kb * 10 + Int(buf[j] - 48); j += 1 }
                    return kb * 1024
                }
                i += 1
            }
            return 0
        }
    }

    func measure(_ body: () throws -> Void) rethrows {
        // Free heap memory glibc still holds resident (a freed model's pages) would be reused unseen: release it.
        Self.mallocTrim?(0)
        let baseline = Self.rssAnon()
        lock.lock(); running = true; peak = baseline; lock.unlock()
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread { [self] in
            while true {
                let v = Self.rssAnon()
                lock.lock()
                peak = max(peak, v)
                let go = running
                lock.unlock()
                if !go { break }
                usleep(200)
            }
            done.signal()
        }
        defer {
            lock.lock(); running = false; lock.unlock()
            done.wait()
            lock.lock(); peakGrowth = max(peak, Self.rssAnon()) - baseline; lock.unlock()
        }
        try body()
    }
}
