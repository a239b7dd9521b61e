import Foundation

/// Where a run stands: enough, with the weights and optimizer moments, to continue bit for bit.
public struct TrainingState: Codable, Sendable, Equatable {
    public var formatVersion = 1
    /// Steps completed; the next step to run has this index.
    public var step: Int
    /// AdamW updates applied (steps minus skipped ones); bias correction continues from it.
    public var optimizerStep: Int
    public var skippedSteps: Int
    public var tokensSeen: Int
    /// The data position is the step itself (see `WindowSampler`); recorded for checking.
    public var sampler = "random-windows-v1"
    public var seed: UInt64
    /// File name -> `contentHash64` hex, checked on load.
    public var checksums: [String: String] = [:]
    /// ReLoRA merges done so far (nil in full-rank runs).
    public var loraMerges: Int?

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version", step, optimizerStep = "optimizer_step", skippedSteps = "skipped_steps"
        case tokensSeen = "tokens_seen", sampler, seed, checksums, loraMerges = "lora_merges"
    }
}

/// Training checkpoints: `RUN/checkpoints/step_00000100/` holding `config.json` (Hugging Face),
/// `model.safetensors` (fp32, Hugging Face tensor names; under LoRA the frozen base weights W: quantized
/// ones as their raw blocks `<name>.<format>`, plus `<name>.master` (f32) under merge policy `master`),
/// `lora.safetensors` (LoRA runs: `...q_proj.lora_A` / `lora_B` / `lora_scale`, not yet merged),
/// `optimizer.safetensors` (`m.<name>`, `v.<name>` for every trained tensor), `recipe.json` and
/// `state.json`; `RUN/checkpoints/latest` names the newest complete one.
///
/// Atomicity: a checkpoint is written into a hidden temporary directory, every file fsynced, then the
/// directory is renamed into place and `latest` replaced by rename. A crash at any point leaves the
/// previous checkpoint and `latest` intact; a half-written temporary directory is ignored and removed
/// by the next save.
public enum TrainingCheckpoint {
    public static func directory(runDir: String) -> String { runDir + "/checkpoints" }

    static func name(step: Int) -> String { String(format: "step_%08d", step) }

    /// Writes a checkpoint for `state.step` and prunes all but the newest `keep`. Returns its path.
    @discardableResult
    public static func save(runDir: String, state: TrainingState, model: LlamaModel, optimizer: AdamW,
                            recipe: Recipe, keep: Int) throws -> String {
        let fm = FileManager.default
        let root = directory(runDir: runDir)
        try Files.createDirectory(root)
        let final = root + "/" + name(step: state.step)
        let temp = root + "/.tmp-" + name(step: state.step) + "-\(getpid())"
        try? fm.removeItem(atPath: temp)
        try Files.createDirectory(temp)
        do {
            let backend = model.backend
            try SafetensorsWriter.write(model.weights.slots().flatMap { TensorIO.entries($0.0, $0.1, backend: backend) },
                                        metadata: ["format": "pt"], to: temp + "/model.safetensors")
            var files = ["model.safetensors", "optimizer.safetensors", "config.json", "recipe.json"]
            if let lora = model.loraConfig {
                try SafetensorsWriter.write(model.loraTensors().map { TensorIO.entry($0.name, $0.value, backend: backend) },
                                            metadata: ["rank": "\(lora.rank)", "alpha": "\(lora.alpha)"],
                                            to: temp + "/lora.safetensors")
                files.append("lora.safetensors")
            }
            var moments: [SafetensorsEntry] = []
            for (i, p) in optimizer.parameters.enumerated() {
                moments.append(TensorIO.entry("m." + p.name, optimizer.m[i], backend: backend))
                moments.append(TensorIO.entry("v." + p.name, optimizer.v[i], backend: backend))
            }
            try SafetensorsWriter.write(moments, to: temp + "/optimizer.safetensors")
            try Files.writeJSON(model.config.jsonObject(), to: temp + "/config.json")
            try Files.writeJSON(recipe.jsonObject(), to: temp + "/recipe.json")
            var withSums = state
            for f in files {
                withSums.checksums[f] = contentHashOfFile(temp + "/" + f)
            }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try writeFileAtomically(try encoder.encode(withSums), to: temp + "/state.json")
            try Files.syncDirectory(temp)
            try replaceDirectory(at: final, with: temp)
            try Files.syncDirectory(root)
            try writeFileAtomically(Data((name(step: state.step) + "\n").utf8), to: root + "/latest")
        } catch {
            try? fm.removeItem(atPath: temp)
            if let e = error as? ReLoRAError { throw e }
            throw ReLoRAError.invalidFile(path: final, reason: "writing the checkpoint failed (\(error.localizedDescription)); the previous checkpoint is intact")
        }
        prune(root: root, keep: keep)
        return final
    }

    /// Path of the newest complete checkpoint of a run, or nil if it has none.
    public static func latest(runDir: String) throws -> String? {
        let root = directory(runDir: runDir)
        guard let text = try? String(contentsOfFile: root + "/latest", encoding: .utf8) else { return nil }
        let name = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard name.hasPrefix("step_"), !name.contains("/") else {
            throw ReLoRAError.invalidFile(path: root + "/latest", reason: "does not name a checkpoint; delete it to resume from the newest step_* directory by hand")
        }
        return root + "/" + name
    }

    /// A checkpoint directory itself (it has `state.json`), or a run directory's latest checkpoint;
    /// returns the checkpoint and its run directory.
    public static func resolve(_ path: String) throws -> (checkpoint: String, runDir: String) {
        if FileManager.default.fileExists(atPath: path + "/state.json") {
            let run = URL(fileURLWithPath: path).deletingLastPathComponent().deletingLastPathComponent().path
            return (path, run)
        }
        if let latest = try latest(runDir: path) { return (latest, path) }
        throw ReLoRAError.invalidFile(path: path, reason: "is neither a checkpoint directory nor a run directory with checkpoints")
    }

    /// Verifies checksums and reads the state of the checkpoint at `path`.
    public static func readState(_ path: String) throws -> TrainingState {
        guard let data = FileManager.default.contents(atPath: path + "/state.json") else {
            throw ReLoRAError.invalidFile(path: path, reason: "not a complete checkpoint (no state.json)")
        }
        let state: TrainingState
        do {
            state = try JSONDecoder().decode(TrainingState.self, from: data)
        } catch {
            throw ReLoRAError.invalidFile(path: path + "/state.json", reason: "is corrupt (not a valid training state)")
        }
        guard state.formatVersion == 1 else {
            throw ReLoRAError.invalidFile(path: path, reason: "checkpoint format version \(state.formatVersion) is not supported by this build")
        }
        for (file, sum) in state.checksums.sorted(by: { $0.key < $1.key }) {
            guard let actual = contentHashOfFile(path + "/" + file) else {
                throw ReLoRAError.invalidFile(path: path, reason: "checkpoint file \(file) is missing")
            }
            guard actual == sum else {
                throw ReLoRAError.invalidFile(path: path, reason: "checkpoint file \(file) is corrupt (checksum mismatch); resume from an earlier checkpoint")
            }
        }
        return state
    }

    /// Loads weights (and, if given, optimizer moments) of a verified checkpoint into existing tensors.
    public static func load(_ path: String, into model: LlamaModel, optimizer: AdamW?) throws -> TrainingState {
        let state = try readState(path)
        let config = try LlamaConfig(contentsOf: path + "/config.json")
        guard config == model.config else {
            throw ReLoRAError.invalidFile(path: path, reason: "the checkpoint's model config differs from the recipe's model")
        }
        try loadTensors(path, into: model)
        model.merges = state.loraMerges ?? 0
        if let opt = optimizer {
            let moments = try SafetensorsFile(path: path + "/optimizer.safetensors")
            for (i, p) in opt.parameters.enumerated() {
                try TensorIO.load(opt.m[i], from: moments, "m." + p.name, backend: model.backend)
                try TensorIO.load(opt.v[i], from: moments, "v." + p.name, backend: model.backend)
            }
            opt.stepCount = state.optimizerStep
            opt.refreshMasterCopies()
        }
        return state
    }

    /// `model.safetensors` (and `lora.safetensors` for a model with adapters) into the model's tensors.
    static func loadTensors(_ path: String, into model: LlamaModel) throws {
        let weights = try SafetensorsFile(path: path + "/model.safetensors")
        for (name, slot) in model.weights.slots() { try TensorIO.load(slot, from: weights, name, backend: model.backend) }
        if model.loraConfig != nil {
            let file = try SafetensorsFile(path: path + "/lora.safetensors")
            for (name, t) in model.loraTensors() { try TensorIO.load(t, from: file, name, backend: model.backend) }
        }
    }

    /// A plain (full-rank, dense) model holding a checkpoint's weights, for export, sampling and evaluation.
    /// Quantized base weights are dequantized; a LoRA checkpoint's current cycle is merged
    /// (`LlamaModel.foldAdapters`: deq(W) + s * B * A, exact in f32).
    /// (The reference ReLoRA code exported W without the last cycle, so its users could not load what
    /// they had trained.)
    public static func loadModel(_ path: String, backend: Backend) throws -> LlamaModel {
        _ = try readState(path)
        let config = try LlamaConfig(contentsOf: path + "/config.json")
        let loraPath = path + "/lora.safetensors"
        var lora: LoRAConfig?
        if FileManager.default.fileExists(atPath: loraPath) {
            let file = try SafetensorsFile(path: loraPath)
            let name = "model.layers.0.\(LinearKind.q.hfPath).lora_A"
            guard let rankText = file.metadata["rank"], let rank = Int(rankText), rank > 0,
                  let a = file.info(name), a.shape.count == 2, a.shape[0] == rank else {
                throw ReLoRAError.invalidFile(path: loraPath, reason: "has no valid LoRA rank (metadata 'rank' and \(name)); the checkpoint is damaged")
            }
            // The scale comes from each adapter's `lora_scale` tensor; alpha here only fills it before the load.
            lora = LoRAConfig(rank: rank, alpha: Double(rank))
        }
        let model = LlamaModel(config: config, backend: backend, lora: lora)
        try loadTensors(path, into: model)
        if lora != nil { try model.foldAdapters() }
        return model
    }

    static func prune(root: String, keep: Int) {
        let fm = FileManager.default
        guard let entries = try? fm.contentsOfDirectory(atPath: root) else { return }
        let complete = entries.filter { $0.hasPrefix("step_") && !$0.contains(".old-") }.sorted()
        for name in complete.dropLast(keep) { try? fm.removeItem(atPath: root + "/" + name) }
        // Leftovers of interrupted saves by processes that are gone.
        for name in entries where name.hasPrefix(".tmp-") && !name.hasSuffix("-\(getpid())") {
            try? fm.removeItem(atPath: root + "/" + name)
        }
    }
}
