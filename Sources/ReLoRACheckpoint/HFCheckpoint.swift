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
        try BitsAndBytes4bit.checkQuantizationConfig(configKeys, path: configPath)
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
    ///
    /// A bitsandbytes 4-bit weight (`BitsAndBytes4bit`; a directory whose config has `quantization_config`
    /// with `quant_method: bitsandbytes`) is read with its quant state: into an nf4 model its codes are kept
    /// byte for byte where its rows are whole 64-blocks, otherwise it is dequantized exactly and requantized
    /// (or, into a dense model, dequantized); `log` gets one line per such weight saying which.
    public static func loadWeights(directory: String, into model: LlamaModel, warn: (String) -> Void = { _ in },
                                   quantized: (String, Double) -> Void = { _, _ in },
                                   log: (String) -> Void = { _ in }) throws {
        let shards = try openShards(URL(fileURLWithPath: directory))
        var used = Set<String>()
        let format = model.quant?.rawValue ?? "dense"
        for (name, slot) in model.weights.slots() {
            if let weight = try BitsAndBytes4bit.read(name, shape: slot.shape, from: shards) {
                let outcome = try BitsAndBytes4bit.load(weight, into: slot, backend: model.backend)
                log(BitsAndBytes4bit.describe(weight, outcome, format: format))
                used.insert(name)
                used.formUnion(BitsAndBytes4bit.companions(name, in: shards.keys))
                continue
            }
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
    ///
    /// `bitsandbytesNF4`: the seven block linears of every layer are written in bitsandbytes' 4-bit layout
    /// (nf4, blocksize 64, no double quantization; `BitsAndBytes4bit.entries`) and config.json gets the
    /// `quantization_config` transformers writes for it, so `from_pretrained` loads a bitsandbytes 4-bit
    /// model; embedding, norms and head stay dense in the chosen dtype.
    public static func save(model: LlamaModel, to out: String, bfloat16: Bool = false, bitsandbytesNF4: Bool = false,
                            tokenizerJSON: Data? = nil, progress: ((Int, Int) -> Void)? = nil) throws {
        guard model.weights.isDense else {
            throw ReLoRAError.invalidData("a Hugging Face export needs dense weights; export a checkpoint (`relora export RUN`), which dequantizes")
        }
        let fm = FileManager.default
        let temp = out + ".tmp-\(getpid())"
        try? fm.removeItem(atPath: temp)
        try Files.createDirectory(temp)
        do {
            var config = model.config.jsonObject()
            let dtype = bfloat16 ? "bfloat16" : "float32"
            config["torch_dtype"] = dtype
            config["bos_token_id"] = NSNull()
            config["eos_token_id"] = NSNull()
            if bitsandbytesNF4 { config["quantization_config"] = BitsAndBytes4bit.quantizationConfig(computeDType: dtype) }
            try Files.writeJSON(config, to: temp + "/config.json")
            let named = model.weights.named()
            let linears = Set(model.weights.linears.map { $0.namePrefix + "weight" })
            let failure = BitsAndBytes4bit.FirstError()
            let backend = model.backend
            let entries = named.enumerated().flatMap { i, t -> [SafetensorsEntry] in
                defer { progress?(i + 1, named.count) }
                let (name, tensor) = t
                guard bitsandbytesNF4, linears.contains(name) else {
                    return [TensorIO.entry(name, tensor, backend: backend, bfloat16: bfloat16)]
                }
                return BitsAndBytes4bit.entries(name, rows: tensor.shape[0], cols: tensor.shape[1], dtype: dtype,
                                                failure: failure) { backend.download(tensor) }
            }
            do {
                try SafetensorsWriter.write(entries, metadata: ["format": "pt"], to: temp + "/model.safetensors")
            } catch {
                throw failure.error ?? error
            }
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
