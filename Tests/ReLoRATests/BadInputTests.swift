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

/// Every user-causable input error is a clear `ReLoRAError`, never a crash.
final class BadInputTests: XCTestCase {
    let validConfig: [String: Any] = [
        "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 3,
        "num_key_value_heads": 1, "vocab_size": 97, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "some_unknown_key": "ignored",
    ]

    func config(_ edit: (inout [String: Any]) -> Void) throws -> LlamaConfig {
        var c = validConfig
        edit(&c)
        return try LlamaConfig(json: JSONSerialization.data(withJSONObject: c))
    }

    func assertConfigError(_ fragment: String, _ edit: (inout [String: Any]) -> Void, line: UInt = #line) {
        XCTAssertThrowsError(try config(edit), line: line) { error in
            XCTAssertTrue("\(error)".contains(fragment), "'\(error)' should mention '\(fragment)'", line: line)
        }
    }

    func testValidConfigDecodesWithDefaults() throws {
        let c = try config { $0["num_key_value_heads"] = nil; $0["rms_norm_eps"] = nil }
        XCTAssertEqual(c.numKeyValueHeads, 3)
        XCTAssertEqual(c.headDim, 16)
        XCTAssertEqual(c.rmsNormEps, 1e-6)
        XCTAssertEqual(c.ropeTheta, 10000)
        XCTAssertFalse(c.tieWordEmbeddings)
        // transformers 5 nests rope_theta.
        let nested = try config { $0["rope_parameters"] = ["rope_theta": 500000.0, "rope_type": "default"] }
        XCTAssertEqual(nested.ropeTheta, 500000)
    }

    func testConfigErrors() {
        assertConfigError("missing required key 'hidden_size'") { $0["hidden_size"] = nil }
        assertConfigError("'intermediate_size' must be a positive integer") { $0["intermediate_size"] = -5 }
        assertConfigError("'vocab_size' must be a positive integer") { $0["vocab_size"] = 0 }
        assertConfigError("not divisible by num_attention_heads") { $0["num_attention_heads"] = 5; $0["num_key_value_heads"] = 5 }
        assertConfigError("not a multiple of num_key_value_heads") { $0["num_key_value_heads"] = 2 }
        assertConfigError("'hidden_size' must be an integer") { $0["hidden_size"] = "48" }
        assertConfigError("'hidden_size' must be an integer") { $0["hidden_size"] = 48.5 }
        assertConfigError("'tie_word_embeddings' must be true or false") { $0["tie_word_embeddings"] = 1 }
        assertConfigError("rope_scaling is not supported") { $0["rope_scaling"] = ["type": "linear", "factor": 2.0] }
        assertConfigError("hidden_act 'gelu' is not supported") { $0["hidden_act"] = "gelu" }
        assertConfigError("rms_norm_eps") { $0["rms_norm_eps"] = -1.0 }
        XCTAssertThrowsError(try LlamaConfig(json: Data("{\"hidden_size\": 4".utf8))) { error in
            XCTAssertTrue("\(error)".contains("not valid JSON"), "\(error)")
        }
        XCTAssertThrowsError(try LlamaConfig(json: Data("[1, 2]".utf8))) { error in
            XCTAssertTrue("\(error)".contains("JSON object"), "\(error)")
        }
    }

    // MARK: Hugging Face directories

    /// A copy of the tiny fixture model whose files a test can then damage.
    func copyOfTinyModel() throws -> String {
        let dir = temporaryDirectory()
        let src = "\(fixturesDirectory())/tiny_llama"
        for f in ["config.json", "model.safetensors"] {
            try FileManager.default.copyItem(atPath: "\(src)/\(f)", toPath: "\(dir)/\(f)")
        }
        return dir
    }

    func assertLoadError(_ dir: String, _ fragment: String, line: UInt = #line) {
        XCTAssertThrowsError(try HFCheckpoint.load(directory: dir, backend: CPUBackend()), line: line) { error in
            XCTAssertTrue("\(error)".contains(fragment), "'\(error)' should mention '\(fragment)'", line: line)
        }
    }

    /// Rewrites the model's safetensors with `edit` applied to the (name, shape, values) list.
    func rewriteWeights(_ dir: String, _ edit: (inout [SafetensorsEntry]) -> Void) throws {
        let file = try SafetensorsFile(path: "\(dir)/model.safetensors")
        var entries = try file.tensorNames.map { name in
            SafetensorsEntry.f32(name, shape: file.info(name)!.shape, try file.floats(name))
        }
        edit(&entries)
        try SafetensorsWriter.write(entries, to: "\(dir)/model.safetensors")
    }

    func testMissingTensorIsNamed() throws {
        let dir = try copyOfTinyModel()
        try rewriteWeights(dir) { $0.removeAll { $0.name == "model.layers.1.mlp.up_proj.weight" } }
        assertLoadError(dir, "tensor 'model.layers.1.mlp.up_proj.weight' is missing")
    }

    func testShapeMismatchIsNamed() throws {
        let dir = try copyOfTinyModel()
        try rewriteWeights(dir) { entries in
            let i = entries.firstIndex { $0.name == "model.norm.weight" }!
            entries[i] = .f32("model.norm.weight", shape: [47], [Float](repeating: 1, count: 47))
        }
        assertLoadError(dir, "'model.norm.weight' has shape [47] but config.json implies [48]")
    }

    func testTruncatedWeightsFile() throws {
        let dir = try copyOfTinyModel()
        let path = "\(dir)/model.safetensors"
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try HFCheckpoint.load(directory: dir, backend: CPUBackend())) { error in
            guard case ReLoRAError.invalidFile = error else { return XCTFail("expected invalidFile, got \(error)") }
        }
    }

    func testMissingConfigAndWeights() throws {
        let dir = temporaryDirectory()
        assertLoadError(dir, "no config.json")
        try FileManager.default.copyItem(atPath: "\(fixturesDirectory())/tiny_llama/config.json", toPath: "\(dir)/config.json")
        assertLoadError(dir, "no model.safetensors")
        assertLoadError("\(dir)/nope", "not a directory")
    }

    func testShardedCheckpointLoadsLikeSingleFile() throws {
        let fixtures = fixturesDirectory()
        let single = try HFCheckpoint.load(directory: "\(fixtures)/tiny_llama", backend: CPUBackend())
        let dir = temporaryDirectory()
        try FileManager.default.copyItem(atPath: "\(fixtures)/tiny_llama/config.json", toPath: "\(dir)/config.json")
        let file = try SafetensorsFile(path: "\(fixtures)/tiny_llama/model.safetensors")
        var shards: [[SafetensorsEntry]] = [[], []]
        var weightMap: [String: String] = [:]
        for (i, name) in file.tensorNames.enumerated() {
            shards[i % 2].append(.bf16(name, shape: file.info(name)!.shape, try file.floats(name)))
            weightMap[name] = "model-0000\(i % 2 + 1)-of-00002.safetensors"
        }
        for (i, entries) in shards.enumerated() {
            try SafetensorsWriter.write(entries, to: "\(dir)/model-0000\(i + 1)-of-00002.safetensors")
        }
        let index = try JSONSerialization.data(withJSONObject: ["metadata": [:], "weight_map": weightMap])
        try index.write(to: URL(fileURLWithPath: "\(dir)/model.safetensors.index.json"))
        let sharded = try HFCheckpoint.load(directory: dir, backend: CPUBackend())
        // Stored as BF16: each weight equals the fp32 original rounded to 8 bits of mantissa.
        for ((name, a), (_, b)) in zip(single.weights.named(), sharded.weights.named()) {
            for (x, y) in zip(a.toArray(), b.toArray()) {
                XCTAssertEqual(x, y, accuracy: abs(x) / 256 + 1e-30, name)
            }
        }
        // A shard the index points to that lacks the tensor, and a path-escaping shard name.
        var bad = weightMap
        bad["model.norm.weight"] = "../evil.safetensors"
        try JSONSerialization.data(withJSONObject: ["weight_map": bad]).write(to: URL(fileURLWithPath: "\(dir)/model.safetensors.index.json"))
        assertLoadError(dir, "must be a file name in the same directory")
    }

    func testEvalRejectsTokensOutsideVocabulary() throws {
        let model = try HFCheckpoint.load(directory: "\(fixturesDirectory())/tiny_llama", backend: CPUBackend())
        let path = "\(temporaryDirectory())/tokens.npy"
        try NpyWriter.write(tokens: [1, 2, 3, 97, 4, 5], dtype: .uint16, to: path)
        XCTAssertThrowsError(try Evaluator.evaluate(model: model, tokens: TokenArray(npyPath: path), seqLen: 3, batch: 1)) { error in
            XCTAssertTrue("\(error)".contains("outside the vocabulary"), "\(error)")
        }
        XCTAssertThrowsError(try Evaluator.evaluate(model: model, tokens: TokenArray(npyPath: path), seqLen: 7, batch: 1)) { error in
            XCTAssertTrue("\(error)".contains("fewer than one window"), "\(error)")
        }
        XCTAssertThrowsError(try Evaluator.evaluate(model: model, tokens: TokenArray(npyPath: path), seqLen: 65, batch: 1)) { error in
            XCTAssertTrue("\(error)".contains("max_position_embeddings"), "\(error)")
        }
    }
}
