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
/// `model.safetensors` (fp32, Hugging Face tensor names; under LoRA the frozen base weights W),
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
        try createDirectory(root)
        let final = root + "/" + name(step: state.step)
        let temp = root + "/.tmp-" + name(step: state.step) + "-\(getpid())"
        try? fm.removeItem(atPath: temp)
        try createDirectory(temp)
        do {
            let backend = model.backend
            try SafetensorsWriter.write(
                model.weights.named().map { .f32($0.0, shape: $0.1.shape, backend.download($0.1)) },
                metadata: ["format": "pt"], to: temp + "/model.safetensors")
            var files = ["model.safetensors", "optimizer.safetensors", "config.json", "recipe.json"]
            if let lora = model.lora {
                // Every adapter's scale is written (trained or not), so the file alone defines W + s*B*A.
                var entries = lora.named().map { SafetensorsEntry.f32($0.name, shape: $0.value.shape, backend.download($0.value)) }
                if !lora.config.trainableScale {
                    for (layer, row) in lora.adapters.enumerated() {
                        for kind in LinearKind.allCases {
                            entries.append(.f32("model.layers.\(layer).\(kind.hfPath).lora_scale", shape: [1],
                                                backend.download(row[kind.rawValue].scale)))
                        }
                    }
                }
                try SafetensorsWriter.write(entries, metadata: ["rank": "\(lora.config.rank)", "alpha": "\(lora.config.alpha)"],
                                            to: temp + "/lora.safetensors")
                files.append("lora.safetensors")
            }
            var moments: [SafetensorsEntry] = []
            for (i, p) in optimizer.parameters.enumerated() {
                moments.append(.f32("m." + p.name, shape: p.value.shape, backend.download(optimizer.m[i])))
                moments.append(.f32("v." + p.name, shape: p.value.shape, backend.download(optimizer.v[i])))
            }
            try SafetensorsWriter.write(moments, to: temp + "/optimizer.safetensors")
            try writeJSON(model.config.jsonObject(), to: temp + "/config.json")
            try writeJSON(recipe.jsonObject(), to: temp + "/recipe.json")
            var withSums = state
            for f in files {
                withSums.checksums[f] = contentHashOfFile(temp + "/" + f)
            }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try writeData(try encoder.encode(withSums), to: temp + "/state.json")
            try syncDirectory(temp)
            try replaceDirectory(at: final, with: temp)
            try syncDirectory(root)
            try writeData(Data((name(step: state.step) + "\n").utf8), to: root + "/latest")
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
        let weights = try SafetensorsFile(path: path + "/model.safetensors")
        for (name, t) in model.weights.named() { try fill(t, from: weights, name, backend: model.backend) }
        if let lora = model.lora {
            let file = try SafetensorsFile(path: path + "/lora.safetensors")
            for p in lora.named() { try fill(p.value, from: file, p.name, backend: model.backend) }
            lora.merges = state.loraMerges ?? 0
        }
        if let opt = optimizer {
            let moments = try SafetensorsFile(path: path + "/optimizer.safetensors")
            for (i, p) in opt.parameters.enumerated() {
                try fill(opt.m[i], from: moments, "m." + p.name, backend: model.backend)
                try fill(opt.v[i], from: moments, "v." + p.name, backend: model.backend)
            }
            opt.stepCount = state.optimizerStep
        }
        return state
    }

    /// A plain (full-rank) model holding a checkpoint's weights, for export, sampling and evaluation.
    /// A LoRA checkpoint's current cycle is merged first: W + s * B * A. (The reference ReLoRA code
    /// exported W without the last cycle, so its users could not load what they had trained.)
    public static func loadModel(_ path: String, backend: Backend) throws -> LlamaModel {
        _ = try readState(path)
        let config = try LlamaConfig(contentsOf: path + "/config.json")
        let model = LlamaModel(config: config, backend: backend)
        let weights = try SafetensorsFile(path: path + "/model.safetensors")
        for (name, t) in model.weights.named() { try fill(t, from: weights, name, backend: backend) }
        if FileManager.default.fileExists(atPath: path + "/lora.safetensors") {
            let lora = try SafetensorsFile(path: path + "/lora.safetensors")
            for layer in 0..<config.numHiddenLayers {
                for kind in LinearKind.allCases {
                    let p = "model.layers.\(layer).\(kind.hfPath)."
                    let w = model.weights.blocks[layer].linear(kind)
                    let (out, inF) = LoRALayers.shape(kind, config)
                    guard let ai = lora.info(p + "lora_A"), ai.shape.count == 2, ai.shape[1] == inF,
                          let bi = lora.info(p + "lora_B"), bi.shape == [out, ai.shape[0]] else {
                        throw ReLoRAError.invalidFile(path: lora.path, reason: "LoRA factors of \(p)weight are missing or have wrong shapes")
                    }
                    let a = backend.makeTensor(ai.shape, tag: .workspace), b = backend.makeTensor(bi.shape, tag: .workspace)
                    backend.upload(try lora.floats(p + "lora_A"), to: a)
                    backend.upload(try lora.floats(p + "lora_B"), to: b)
                    guard lora.info(p + "lora_scale")?.shape == [1] else {
                        throw ReLoRAError.invalidFile(path: lora.path, reason: "the LoRA scale of \(p)weight is missing")
                    }
                    let s = try lora.floats(p + "lora_scale")[0]
                    backend.matmul(b, a, w, m: out, n: inF, k: ai.shape[0], transA: false, transB: false, alpha: s, beta: 1)
                }
            }
        }
        return model
    }

    static func fill(_ t: Tensor, from file: SafetensorsFile, _ name: String, backend: Backend) throws {
        guard let info = file.info(name) else {
            throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' is missing")
        }
        guard info.shape == t.shape else {
            throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' has shape \(info.shape), expected \(t.shape)")
        }
        backend.upload(try file.floats(name), to: t)
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

    static func createDirectory(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot create the directory (\(error.localizedDescription))")
        }
    }

    static func writeJSON(_ object: [String: Any], to path: String) throws {
        try writeData(try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]), to: path)
    }

    /// Atomic, fsynced file write.
    static func writeData(_ data: Data, to path: String) throws {
        try writeFileAtomically(data, to: path)
    }

    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw ReLoRAError.invalidFile(path: path, reason: "cannot open the directory to sync it") }
        defer { close(fd) }
        _ = fsync(fd)
    }
}
