import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel

/// Hugging Face LLaMA checkpoints: a directory with `config.json` and either `model.safetensors` or
/// a sharded `model.safetensors.index.json` (whose `weight_map` names each tensor's shard file).
/// Tensor names are those of `LlamaForCausalLM` (`model.layers.{i}.self_attn.q_proj.weight`, ...).
public enum HFCheckpoint {
    /// Reads the config and every weight into a new model on `backend`. F32, F16 and BF16 tensors are
    /// converted to the backend's dtypes tensor by tensor. Missing tensors, wrong shapes and unreadable
    /// files are clear errors; tensors the model does not use (e.g. old `rotary_emb.inv_freq` buffers)
    /// are reported on `warn` and skipped.
    public static func load(directory: String, backend: Backend,
                            checkpointing: GradientCheckpointing = .none,
                            warn: (String) -> Void = { _ in }) throws -> LlamaModel {
        let config = try readConfig(directory: directory)
        let model = LlamaModel(config: config, backend: backend, checkpointing: checkpointing)
        try loadWeights(directory: directory, into: model, warn: warn)
        return model
    }

    /// The `config.json` of a Hugging Face LLaMA directory (biases rejected).
    public static func readConfig(directory: String) throws -> LlamaConfig {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDir), isDir.boolValue else {
            throw ReLoRAError.invalidFile(path: directory, reason: "not a directory; pass a Hugging Face model directory with config.json and model.safetensors")
        }
        let configPath = URL(fileURLWithPath: directory).appendingPathComponent("config.json").path
        guard FileManager.default.fileExists(atPath: configPath) else {
            throw ReLoRAError.invalidFile(path: directory, reason: "no config.json in the model directory")
        }
        let configKeys = try readJSONObject(configPath)
        for key in ["attention_bias", "mlp_bias"] {
            if case .bool(true)? = configKeys.values[key] {
                throw ReLoRAError.invalidFile(path: configPath, reason: "'\(key)': true is not supported (LLaMA has no biases)")
            }
        }
        return try LlamaConfig(contentsOf: configPath)
    }

    /// Whether `directory` looks like a Hugging Face model directory (config.json + safetensors weights).
    public static func isModelDirectory(_ directory: String) -> Bool {
        let fm = FileManager.default
        return fm.fileExists(atPath: directory + "/config.json")
            && (fm.fileExists(atPath: directory + "/model.safetensors") || fm.fileExists(atPath: directory + "/model.safetensors.index.json"))
    }

    /// Streams every weight of `model.weights` from the directory's (possibly sharded) safetensors files,
    /// one tensor at a time. Into a model with quantized base weights, each linear is quantized as it
    /// is read, and `quantized(name, relativeError)` reports its quantization error.
    public static func loadWeights(directory: String, into model: LlamaModel, warn: (String) -> Void = { _ in },
                                   quantized: (String, Double) -> Void = { _, _ in }) throws {
        let shards = try openShards(URL(fileURLWithPath: directory))
        var used = Set<String>()
        for (name, slot) in model.weights.slots() {
            guard let file = shards[name] else {
                throw ReLoRAError.invalidFile(path: directory, reason: "tensor '\(name)' is missing from the checkpoint")
            }
            let info = file.info(name)!
            if info.shape != slot.shape {
                throw ReLoRAError.invalidFile(
                    path: file.path,
                    reason: "tensor '\(name)' has shape \(info.shape) but config.json implies \(slot.shape)")
            }
            if let error = try TensorIO.load(slot, from: file, name, backend: model.backend) { quantized(name, error) }
            used.insert(name)
        }
        let unused = shards.keys.filter { !used.contains($0) }.sorted()
        if model.config.tieWordEmbeddings, unused.contains("lm_head.weight") {
            warn("lm_head.weight is ignored: tie_word_embeddings is true, so the head is the embedding")
        }
        let unknown = unused.filter { $0 != "lm_head.weight" && !$0.hasSuffix("rotary_emb.inv_freq") }
        if !unknown.isEmpty {
            warn("ignored \(unknown.count) tensor(s) a LLaMA model does not use: \(unknown.prefix(5).joined(separator: ", "))")
        }
    }

    /// Tensor name -> the opened file that holds it.
    static func openShards(_ dir: URL) throws -> [String: SafetensorsFile] {
        let single = dir.appendingPathComponent("model.safetensors").path
        let indexPath = dir.appendingPathComponent("model.safetensors.index.json").path
        var byName: [String: SafetensorsFile] = [:]
        if FileManager.default.fileExists(atPath: single) {
            let file = try SafetensorsFile(path: single)
            for name in file.tensorNames { byName[name] = file }
            return byName
        }
        guard FileManager.default.fileExists(atPath: indexPath) else {
            throw ReLoRAError.invalidFile(path: dir.path, reason: "no model.safetensors or model.safetensors.index.json in the model directory")
        }
        let index = try readJSONObject(indexPath)
        guard case .object(let weightMap)? = index.values["weight_map"] else {
            throw ReLoRAError.invalidFile(path: indexPath, reason: "no 'weight_map' object in the shard index")
        }
        var files: [String: SafetensorsFile] = [:]
        for (name, value) in weightMap {
            guard case .string(let shard) = value, !shard.isEmpty, !shard.contains("/"), shard != "..", shard != "." else {
                throw ReLoRAError.invalidFile(path: indexPath, reason: "weight_map entry for '\(name)' must be a file name in the same directory")
            }
            if files[shard] == nil { files[shard] = try SafetensorsFile(path: dir.appendingPathComponent(shard).path) }
            guard files[shard]!.info(name) != nil else {
                throw ReLoRAError.invalidFile(path: dir.appendingPathComponent(shard).path,
                                              reason: "the shard index places '\(name)' in this file, but it is not there")
            }
            byName[name] = files[shard]
        }
        return byName
    }

    /// Writes a Hugging Face directory (`config.json`, `model.safetensors` with HF tensor names and,
    /// if given, `tokenizer.json`) that `LlamaForCausalLM.from_pretrained` and
    /// `AutoTokenizer.from_pretrained` load. `bfloat16` halves the size; `float32` is exact.
    /// Written into a temporary directory and renamed into place; an existing `out` is replaced only
    /// after the new export is complete. `progress(tensorsDone, tensorsTotal)` is called as each tensor is
    /// read from the backend and converted (the bulk of the work before the one file write).
    public static func save(model: LlamaModel, to out: String, bfloat16: Bool = false, tokenizerJSON: Data? = nil,
                            progress: ((Int, Int) -> Void)? = nil) throws {
        guard model.weights.isDense else {
            throw ReLoRAError.invalidData("a Hugging Face export needs dense weights; export a checkpoint (`relora export RUN`), which dequantizes")
        }
        let fm = FileManager.default
        let temp = out + ".tmp-\(getpid())"
        try? fm.removeItem(atPath: temp)
        try Files.createDirectory(temp)
        do {
            var config = model.config.jsonObject()
            config["torch_dtype"] = bfloat16 ? "bfloat16" : "float32"
            config["bos_token_id"] = NSNull()
            config["eos_token_id"] = NSNull()
            try Files.writeJSON(config, to: temp + "/config.json")
            let named = model.weights.named()
            let entries = named.enumerated().map { i, t in
                defer { progress?(i + 1, named.count) }
                return TensorIO.entry(t.0, t.1, backend: model.backend, bfloat16: bfloat16)
            }
            try SafetensorsWriter.write(entries, metadata: ["format": "pt"], to: temp + "/model.safetensors")
            if let tok = tokenizerJSON { try writeFileAtomically(tok, to: temp + "/tokenizer.json") }
            try replaceDirectory(at: out, with: temp)
        } catch {
            try? fm.removeItem(atPath: temp)
            if let e = error as? ReLoRAError { throw e }
            throw ReLoRAError.invalidFile(path: out, reason: "export failed (\(error.localizedDescription))")
        }
    }

    static func readJSONObject(_ path: String) throws -> JSONKeys {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot read the file")
        }
        do {
            return try JSONKeys(data: data, what: "the file")
        } catch ReLoRAError.invalidConfig(let message) {
            throw ReLoRAError.invalidFile(path: path, reason: message)
        }
    }
}
