import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel

/// Where a run stands: enough, with the weights and optimizer moments, to continue bit for bit.
public struct TrainingState: Codable, Sendable, Equatable {
    /// The checkpoint layout (`TrainingCheckpoint`): 1 plain safetensors, 2 zstd tensor files.
    public var formatVersion = TrainingCheckpoint.formatVersion
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
    /// How the run keys its LoRA dropout masks; nil in checkpoints written before masks were keyed per
    /// micro-batch (`dropoutKeys` reads that as the old keying, with which such runs resume).
    public var dropoutKeying: DropoutKey.Keying? = DropoutKey.Keying.current
    public var dropoutKeys: DropoutKey.Keying { dropoutKeying ?? .perStep }

    public init(step: Int, optimizerStep: Int, skippedSteps: Int, tokensSeen: Int, seed: UInt64, loraMerges: Int? = nil) {
        self.step = step; self.optimizerStep = optimizerStep; self.skippedSteps = skippedSteps
        self.tokensSeen = tokensSeen; self.seed = seed; self.loraMerges = loraMerges
    }

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version", step, optimizerStep = "optimizer_step", skippedSteps = "skipped_steps"
        case tokensSeen = "tokens_seen", sampler, seed, checksums, loraMerges = "lora_merges", dropoutKeying = "dropout_keying"
    }
}

/// Optimizer moments as a checkpoint stores them: for every trained tensor, in the optimizer's order, its
/// name and its first and second moments, either f32 tensors of the parameter's shape (`m`, `v`) or
/// blockwise 8-bit moments (`eightBit`, when the optimizer keeps them so; `m` and `v` are then unused).
/// The trainer's optimizer hands these over to `save` and receives them in `load`: the checkpoint layer
/// knows what it stores, not the optimizer that uses it.
///
/// A sharded optimizer holds only some tensors' moments in each process. A load fills the entries it is
/// given (a subset is fine: the others are not read); a save takes every tensor, in the optimizer's order,
/// each either held here or `remote`: tensor-file entries (`TrainingCheckpoint.momentLayout`) whose bytes
/// the writer asks for when it reaches them, so the file is the same whoever held the moments.
public struct CheckpointMoments {
    public struct Entry {
        public let name: String
        public let m: Tensor
        public let v: Tensor
        public let eightBit: (m: BlockwiseMoments, v: BlockwiseMoments)?
        /// The f32 master copy the update runs on when the working tensor is narrower (bf16 training), else
        /// nil. The model file holds the working values, so without it a resume would continue from the
        /// master rounded to bf16.
        public let master: Tensor?
        public init(name: String, m: Tensor, v: Tensor, eightBit: (m: BlockwiseMoments, v: BlockwiseMoments)?,
                    master: Tensor? = nil) {
            self.name = name; self.m = m; self.v = v; self.eightBit = eightBit; self.master = master
        }
    }

    /// One trained tensor's moments in a save.
    public enum Item {
        /// In this process's tensors.
        case held(Entry)
        /// Elsewhere: the entries `momentEntries` would make for them, with deferred bytes.
        case remote([SafetensorsEntry])
    }

    public let items: [Item]
    /// The moments this process holds, in order (what a load fills).
    public var entries: [Entry] {
        items.compactMap { if case .held(let e) = $0 { e } else { nil } }
    }
    public init(_ entries: [Entry]) { items = entries.map { .held($0) } }
    public init(items: [Item]) { self.items = items }
}

/// Training checkpoints: `RUN/checkpoints/step_00000100/` holding `config.json` (Hugging Face),
/// `model.tensors.zst` (Hugging Face tensor names, fp32; under LoRA the frozen base weights W, quantized
/// ones as their blocks `<name>.<format>`, plus `<name>.master` (f32) under merge policy `master`), `lora.tensors.zst` (LoRA runs: `...q_proj.lora_A` / `lora_B` /
/// `lora_scale`, not yet merged), `optimizer.tensors.zst` (`m.<name>`, `v.<name>` for every trained
/// tensor), `recipe.json` and `state.json`; `RUN/checkpoints/latest` names the newest complete one.
///
/// Format versions (`state.json`'s `format_version`): 2 (written) stores the three tensor files as zstd
/// tensor files (`ZstdTensorFile`: one zstd frame per tensor, fp32 byte-shuffled, level `zstdLevel`, an
/// index with per-tensor checksums); 1 (still read) stored them as plain `*.safetensors`. Everything
/// else is the same in both.
///
/// Atomicity: a checkpoint is written into a hidden temporary directory, every file fsynced, then the
/// directory is renamed into place and `latest` replaced by rename. A crash at any point leaves the
/// previous checkpoint and `latest` intact; a half-written temporary directory is ignored and removed
/// by the next save.
public enum TrainingCheckpoint {
    /// The layout `save` writes.
    public static let formatVersion = 2
    /// The layouts `load` reads.
    public static let readableFormatVersions = 1 ... 2

    /// zstd level of the tensor files, chosen by measurement on 20m checkpoints (`relora-bench compression`,
    /// README "Checkpoints"): with fp32 byte-shuffled, level 1 compresses whole checkpoints as well as
    /// level 3 (within 0.3 %) and faster; level 9 saves at most 1.0 % more at 6-11x the time, level 19 at
    /// most 2.3 % at 200-370x.
    public static let zstdLevel = 1

    public static func directory(runDir: String) -> String { runDir + "/checkpoints" }

    package static func name(step: Int) -> String { String(format: "step_%08d", step) }

    /// The tensor file `stem` ("model", "lora", "optimizer") of a checkpoint of format `version`.
    package static func tensorFileName(_ stem: String, version: Int) -> String {
        version >= 2 ? stem + ".tensors.zst" : stem + ".safetensors"
    }

    /// Opens tensor file `stem` of the checkpoint at `path` (format `version`).
    package static func openTensors(_ path: String, _ stem: String, version: Int) throws -> any TensorFile {
        let file = path + "/" + tensorFileName(stem, version: version)
        return version >= 2 ? try ZstdTensorFile(path: file) : try SafetensorsFile(path: file)
    }

    /// Tensor file `stem` of the checkpoint at `path` in whichever layout it was written (a compressed
    /// `.tensors.zst` if present, else a format-1 `.safetensors`), or nil if it has none.
    public static func openTensors(_ path: String, _ stem: String) throws -> (any TensorFile)? {
        for version in [formatVersion, 1] where FileManager.default.fileExists(atPath: path + "/" + tensorFileName(stem, version: version)) {
            return try openTensors(path, stem, version: version)
        }
        return nil
    }

    /// Whether the checkpoint at `path` holds LoRA factors (a `lora` tensor file).
    package static func hasLoRA(_ path: String, version: Int) -> Bool {
        FileManager.default.fileExists(atPath: path + "/" + tensorFileName("lora", version: version))
    }

    /// Byte-shuffle width of a checkpoint tensor: the element size of float tensors (fp32: 4), where it
    /// pays (measured: fp32 weights 0.922 -> 0.842 of their size, Adam moments 0.70 -> 0.62); 1 (none)
    /// for quantized blocks (shuffling a block's bytes by position gains nothing at level 1: 0.957 either
    /// way) and integers.
    package static func shuffleWidth(_ entry: SafetensorsEntry) -> Int {
        entry.dtype.isFloatingPoint ? entry.dtype.byteSize : 1
    }

    /// Writes a checkpoint for `state.step` and prunes all but the newest `keep`. Returns its path.
    @discardableResult
    /// `recipe` is the run's recipe as its JSON object (written as `recipe.json`).
    public static func save(runDir: String, state: TrainingState, model: LlamaModel, moments: CheckpointMoments,
                            recipe: [String: Any], keep: Int) throws -> String {
        try save(runDir: runDir, state: state, model: model, moments: moments, recipe: recipe, keep: keep,
                 version: formatVersion)
    }

    /// `save` in layout `version` (1: plain safetensors, as earlier builds wrote; kept so tests can make one).
    package static func save(runDir: String, state: TrainingState, model: LlamaModel, moments: CheckpointMoments,
                             recipe: [String: Any], keep: Int, version: Int) throws -> String {
        precondition(readableFormatVersions.contains(version))
        let fm = FileManager.default
        let root = directory(runDir: runDir)
        try Files.createDirectory(root)
        let final = root + "/" + name(step: state.step)
        let temp = root + "/.tmp-" + name(step: state.step) + "-\(getpid())"
        try? fm.removeItem(atPath: temp)
        try Files.createDirectory(temp)
        do {
            let backend = model.backend
            var files = ["config.json", "recipe.json"]
            func write(_ stem: String, _ entries: [SafetensorsEntry], metadata: [String: String] = [:]) throws {
                let file = tensorFileName(stem, version: version)
                if version >= 2 {
                    try ZstdTensorWriter.write(entries, metadata: metadata, level: zstdLevel, shuffleWidth: shuffleWidth,
                                               to: temp + "/" + file)
                } else {
                    try SafetensorsWriter.write(entries, metadata: metadata, to: temp + "/" + file)
                }
                files.append(file)
            }
            try write("model", model.weights.slots().flatMap { TensorIO.entries($0.0, $0.1, backend: backend) },
                      metadata: ["format": "pt"])
            if let lora = model.loraConfig {
                try write("lora", model.loraTensors().map { TensorIO.entry($0.name, $0.value, backend: backend) },
                          metadata: ["rank": "\(lora.rank)", "alpha": "\(lora.alpha)"])
            }
            try write("optimizer", moments.items.flatMap { item -> [SafetensorsEntry] in
                switch item {
                case .held(let entry): return momentEntries(entry, backend: backend)
                case .remote(let entries): return entries
                }
            })
            try Files.writeJSON(model.config.jsonObject(), to: temp + "/config.json")
            try Files.writeJSON(recipe, to: temp + "/recipe.json")
            var withSums = state
            withSums.formatVersion = version
            withSums.checksums = [:]
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

    /// A checkpoint directory itself (it has `state.json`), or a run directory's latest checkpoint (a run
    /// whose `latest` is missing is the error `resumePoint` gives, naming the checkpoint to write into it);
    /// returns the checkpoint and its run directory.
    public static func resolve(_ path: String) throws -> (checkpoint: String, runDir: String) {
        if FileManager.default.fileExists(atPath: path + "/state.json") {
            let run = URL(fileURLWithPath: path).deletingLastPathComponent().deletingLastPathComponent().path
            return (path, run)
        }
        if let latest = try resumePoint(runDir: path) { return (latest, path) }
        throw ReLoRAError.invalidFile(path: path, reason: "is neither a checkpoint directory nor a run directory with checkpoints")
    }

    /// The state of the checkpoint at `path`, its format version checked but not its files' checksums.
    package static func decodeState(_ path: String) throws -> TrainingState {
        guard let data = FileManager.default.contents(atPath: path + "/state.json") else {
            throw ReLoRAError.invalidFile(path: path, reason: "not a complete checkpoint (no state.json)")
        }
        let state: TrainingState
        do {
            state = try JSONDecoder().decode(TrainingState.self, from: data)
        } catch {
            throw ReLoRAError.invalidFile(path: path + "/state.json", reason: "is corrupt (not a valid training state)")
        }
        guard readableFormatVersions.contains(state.formatVersion) else {
            throw ReLoRAError.invalidFile(path: path, reason: "checkpoint format version \(state.formatVersion) is not supported by this build (it reads versions \(readableFormatVersions.lowerBound) to \(readableFormatVersions.upperBound)); use a newer relora")
        }
        return state
    }

    /// Verifies checksums and reads the state of the checkpoint at `path`. A missing or corrupt file is
    /// one error naming it and the newest earlier checkpoint of the run that verifies, with how to
    /// resume from that one.
    public static func readState(_ path: String) throws -> TrainingState {
        let state = try decodeState(path)
        if let (file, problem) = damagedFile(path, state) {
            throw ReLoRAError.invalidFile(path: path + "/" + file, reason: "this checkpoint file \(problem); " + earlierCheckpointAdvice(path))
        }
        return state
    }

    /// The first file of the checkpoint that is missing or fails its checksum, with what is wrong.
    package static func damagedFile(_ path: String, _ state: TrainingState) -> (file: String, problem: String)? {
        for (file, sum) in state.checksums.sorted(by: { $0.key < $1.key }) {
            guard let actual = contentHashOfFile(path + "/" + file) else { return (file, "is missing") }
            guard actual == sum else { return (file, "is corrupt (its checksum differs from the one in state.json)") }
        }
        return nil
    }

    /// What to do when the checkpoint at `path` is damaged: the newest earlier complete checkpoint in the
    /// same directory whose files verify, and how to make `--resume` use it.
    package static func earlierCheckpointAdvice(_ path: String) -> String {
        let url = URL(fileURLWithPath: path)
        let root = url.deletingLastPathComponent().path
        guard let candidate = newestIntact(root: root, before: url.lastPathComponent) else {
            return "the run has no intact earlier checkpoint; start the run again (or warm-start from another run)"
        }
        return "the earlier checkpoint \(root)/\(candidate) is intact: to resume from it, write '\(candidate)' into \(root)/latest" + redone
    }

    private static let redone = " (the steps after it are trained again, with the same results)"

    /// The checkpoint directories (`step_*`, complete or not, without the `.old-` leftovers of a replaced
    /// one) in the checkpoint directory `root`, oldest first.
    package static func checkpointNames(root: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [])
            .filter { $0.hasPrefix("step_") && !$0.contains(".old-") }.sorted()
    }

    /// The newest checkpoint in `root` (before `name`, if given) whose state and files verify.
    package static func newestIntact(root: String, before name: String? = nil) -> String? {
        checkpointNames(root: root).reversed().first { candidate in
            guard name.map({ candidate < $0 }) ?? true, let state = try? decodeState(root + "/" + candidate) else { return false }
            return damagedFile(root + "/" + candidate, state) == nil
        }
    }

    /// Refuses to start a new run in `runDir` when it holds checkpoints: a `latest`, or any `step_*` directory
    /// (a `latest` deleted by hand, as the advice for a damaged one says, must not let a new run overwrite
    /// the old one's checkpoints and metrics). Nothing is written.
    public static func requireNoCheckpoints(runDir: String) throws {
        let root = directory(runDir: runDir)
        let hasLatest = FileManager.default.fileExists(atPath: root + "/latest")
        let names = checkpointNames(root: root)
        guard hasLatest || !names.isEmpty else { return }
        if hasLatest {
            throw ReLoRAError.invalidData(
                "\(runDir) already holds checkpoints; continue it with `relora train --resume \(runDir)` or choose another run_dir")
        }
        let resume = newestIntact(root: root).map {
            "to continue the run, write '\($0)' (its newest intact checkpoint) into \(root)/latest and use `relora train --resume \(runDir)`, or"
        } ?? "none of them is intact;"
        throw ReLoRAError.invalidData(
            "\(runDir) already holds checkpoints (\(names.joined(separator: ", "))) but no checkpoints/latest: \(resume) choose another run_dir")
    }

    /// The checkpoint `--resume` continues: the one `latest` names, or nil when the run has no checkpoints.
    /// A run whose `step_*` directories are there without `latest` is an error naming the newest intact one
    /// to write into `latest`, as for a damaged checkpoint (resuming by itself from another step than the
    /// user chose could redo or skip what they meant to keep).
    public static func resumePoint(runDir: String) throws -> String? {
        if let path = try latest(runDir: runDir) { return path }
        let root = directory(runDir: runDir)
        let names = checkpointNames(root: root)
        guard !names.isEmpty else { return nil }
        guard let intact = newestIntact(root: root) else {
            throw ReLoRAError.invalidData(
                "\(root)/latest is missing and none of the run's checkpoints (\(names.joined(separator: ", "))) is intact; start the run again in another run_dir (or warm-start from another run)")
        }
        throw ReLoRAError.invalidData(
            "\(root)/latest is missing, but the run holds checkpoints: the newest intact one is \(root)/\(intact); to resume from it, write '\(intact)' into \(root)/latest"
            + (intact == names.last ? "" : redone))
    }

    /// Loads weights (and, if given, optimizer moments) of a verified checkpoint into existing tensors.
    /// The caller continues its optimizer's step count from the returned state's `optimizerStep`.
    /// `restoredMaster` is called with the name of every tensor whose f32 master copy the checkpoint held
    /// (checkpoints written before master copies were stored hold none: the caller derives those from the
    /// working values, as before).
    public static func load(_ path: String, into model: LlamaModel, moments: CheckpointMoments?,
                            restoredMaster: (String) -> Void = { _ in }) throws -> TrainingState {
        let state = try readState(path)
        let config = try LlamaConfig(contentsOf: path + "/config.json")
        guard config == model.config else {
            throw ReLoRAError.invalidFile(path: path, reason: "the checkpoint's model config differs from the recipe's model")
        }
        try loadTensors(path, version: state.formatVersion, into: model)
        model.merges = state.loraMerges ?? 0
        if let moments {
            let file = try openTensors(path, "optimizer", version: state.formatVersion)
            for entry in moments.entries where try loadMoments(entry, from: file, backend: model.backend) {
                restoredMaster(entry.name)
            }
        }
        return state
    }

    /// One tensor's moments as `optimizer` tensor-file entries: `m.<name>` and `v.<name>`, F32 with the
    /// parameter's shape; 8-bit moments as their codes (U8, the parameter's shape) with the block scales
    /// beside them (`m.<name>.absmax`, F32 `[ceil(n / 256)]`), never expanded.
    package static func momentEntries(_ entry: CheckpointMoments.Entry, backend: Backend) -> [SafetensorsEntry] {
        let tensors = (entry.eightBit.map { [$0.m.codes, $0.m.absmax, $0.v.codes, $0.v.absmax] } ?? [entry.m, entry.v])
            + (entry.master.map { [$0] } ?? [])
        let layout = momentLayout(name: entry.name, shape: entry.m.shape, eightBit: entry.eightBit != nil,
                                  master: entry.master != nil)
        return zip(layout, tensors).map { part, tensor in
            part.dtype == .U8 ? SafetensorsEntry(name: part.name, dtype: .U8, shape: part.shape) { backend.downloadRaw(tensor) }
                : TensorIO.entry(part.name, tensor, backend: backend)
        }
    }

    /// The `optimizer` tensor-file entries of one tensor's moments (`momentEntries`), without their bytes:
    /// f32 moments `m.<name>`, `v.<name>` (F32, `shape`); 8-bit ones `m.<name>` (U8, `shape`),
    /// `m.<name>.absmax` (F32 `[ceil(n / 256)]`), then the same for v; then, with `master`, the f32 master
    /// copy `master.<name>` (F32, `shape`). A process that does not hold a tensor's moments (a sharded
    /// optimizer) names them with it.
    public static func momentLayout(name: String, shape: [Int], eightBit: Bool,
                                    master: Bool = false) -> [(name: String, dtype: SafetensorsDType, shape: [Int])] {
        let blocks = [BlockwiseMoments.blocks(shape.reduce(1, *))]
        let moments: [(name: String, dtype: SafetensorsDType, shape: [Int])] = eightBit
            ? ["m.", "v."].flatMap { prefix in [(prefix + name, .U8, shape), (prefix + name + ".absmax", .F32, blocks)] }
            : [("m." + name, .F32, shape), ("v." + name, .F32, shape)]
        return moments + (master ? [("master." + name, .F32, shape)] : [])
    }

    /// Loads one tensor's moments from an `optimizer` tensor file, converting where the file and the
    /// optimizer store them differently (a run resumed or warm-started with another `optimizer_states`):
    /// 8-bit moments are dequantized into f32 ones, f32 moments quantized into 8-bit ones (on the host).
    /// Returns whether the entry's master copy was restored (the file holds `master.<name>`).
    @discardableResult
    public static func loadMoments(_ entry: CheckpointMoments.Entry, from file: any TensorFile, backend: Backend) throws -> Bool {
        let name = entry.name
        var restored = false
        if let master = entry.master, file.header("master." + name) != nil {
            try TensorIO.load(master, from: file, "master." + name, backend: backend)
            restored = true
        }
        for (prefix, isSigned) in [("m.", true), ("v.", false)] {
            let key = prefix + name, stored8 = file.header(key)?.dtype == .U8
            let target = isSigned ? entry.m : entry.v
            let moments = entry.eightBit.map { isSigned ? $0.m : $0.v }
            if !stored8, moments == nil {
                try TensorIO.load(target, from: file, key, backend: backend)
                continue
            }
            var codes: [UInt8] = [], absmax: [Float] = []
            if stored8 {
                guard let header = file.header(key), header.shape == target.shape else {
                    throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(key)' has shape \(file.header(key)?.shape ?? []), expected \(target.shape)")
                }
                guard let scales = file.header(key + ".absmax"), scales.dtype == .F32,
                      scales.shape == [BlockwiseMoments.blocks(target.count)] else {
                    throw ReLoRAError.invalidFile(path: file.path, reason: "8-bit moments '\(key)' lack their block scales '\(key).absmax' (F32 [\(BlockwiseMoments.blocks(target.count))])")
                }
                if let q = moments {  // stored as they are kept: straight from the file's bytes
                    try file.withRawBytes(key) { backend.upload(raw: $0, dtype: .u8, to: q.codes) }
                    try TensorIO.load(q.absmax, from: file, key + ".absmax", backend: backend)
                    continue
                }
                codes = try file.withRawBytes(key) { Array($0) }
                absmax = try file.floats(key + ".absmax")
            } else {
                let values = try file.floats(key)
                guard values.count == target.count else {
                    throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(key)' has \(values.count) values, expected \(target.count)")
                }
                (codes, absmax) = BlockwiseMoments.quantize(values, isSigned: isSigned)
            }
            if let q = moments {
                codes.withUnsafeBytes { backend.upload(raw: $0, dtype: .u8, to: q.codes) }
                backend.upload(absmax, to: q.absmax)
            } else {
                backend.upload(BlockwiseMoments.dequantize(codes: codes, absmax: absmax, isSigned: isSigned), to: target)
            }
        }
        return restored
    }

    /// The `model` tensor file (and `lora` for a model with adapters) into the model's tensors.
    package static func loadTensors(_ path: String, version: Int, into model: LlamaModel) throws {
        let weights = try openTensors(path, "model", version: version)
        for (name, slot) in model.weights.slots() { try TensorIO.load(slot, from: weights, name, backend: model.backend) }
        if model.loraConfig != nil {
            let file = try openTensors(path, "lora", version: version)
            for (name, t) in model.loraTensors() { try TensorIO.load(t, from: file, name, backend: model.backend) }
        }
    }

    /// A plain (full-rank, dense) model holding a checkpoint's weights, for export, sampling and evaluation.
    /// Quantized base weights are dequantized; a LoRA checkpoint's current cycle is merged
    /// (`LlamaModel.foldAdapters`: deq(W) + s * B * A, exact in f32).
    /// (The reference ReLoRA code exported W without the last cycle, so its users could not load what
    /// they had trained.)
    public static func loadModel(_ path: String, backend: Backend) throws -> LlamaModel {
        let version = try readState(path).formatVersion
        let config = try LlamaConfig(contentsOf: path + "/config.json")
        var lora: LoRAConfig?
        if hasLoRA(path, version: version) {
            let file = try openTensors(path, "lora", version: version)
            let name = "model.layers.0.\(LinearKind.q.hfPath).lora_A"
            guard let rankText = file.metadata["rank"], let rank = Int(rankText), rank > 0,
                  let a = file.header(name), a.shape.count == 2, a.shape[0] == rank else {
                throw ReLoRAError.invalidFile(path: file.path, reason: "has no valid LoRA rank (metadata 'rank' and \(name)); the checkpoint is damaged")
            }
            // The scale comes from each adapter's `lora_scale` tensor; alpha here only fills it before the load.
            lora = LoRAConfig(rank: rank, alpha: Double(rank))
        }
        let model = LlamaModel(config: config, backend: backend, lora: lora)
        try loadTensors(path, version: version, into: model)
        if lora != nil { try model.foldAdapters() }
        return model
    }

    /// A checkpoint's size on disk against the same checkpoint uncompressed in bf16.
    public struct Footprint: Sendable, Equatable {
        /// Bytes of every file in the checkpoint directory.
        public var bytes: Int
        /// The "bf16 equivalent": every stored tensor (weights, LoRA factors, optimizer moments) at 2 bytes
        /// per value, uncompressed. A quantized weight counts the values its blocks hold (rows x blocks per
        /// row x block size: its parameters, plus the zero padding of a last partial block when the input
        /// size is not a multiple of the block size), and so do 8-bit Adam moments (their codes; their block
        /// scales are not counted); tensors of other dtypes count as stored, and the JSON files as they are.
        public var bf16Bytes: Int
        public var ratio: Double { bf16Bytes > 0 ? Double(bytes) / Double(bf16Bytes) : 0 }
    }

    /// The footprint of the checkpoint at `path` (read from its files' headers and indexes; no tensor is
    /// decompressed).
    public static func footprint(_ path: String) throws -> Footprint {
        let version = try decodeState(path).formatVersion
        let fm = FileManager.default
        var result = Footprint(bytes: 0, bf16Bytes: 0)
        let tensorFiles = ["model", "lora", "optimizer"].map { tensorFileName($0, version: version) }
        for file in try fm.contentsOfDirectory(atPath: path).sorted() {
            let size = (try? fm.attributesOfItem(atPath: path + "/" + file)[.size] as? Int) ?? 0
            result.bytes += size
            guard tensorFiles.contains(file) else {
                result.bf16Bytes += size
                continue
            }
            let tensors = try openTensors(path, String(file.prefix { $0 != "." }), version: version)
            for name in tensors.tensorNames {
                guard let header = tensors.header(name) else { continue }
                let eightBitMoments = file.hasPrefix("optimizer") && (name.hasPrefix("m.") || name.hasPrefix("v."))
                if eightBitMoments, name.hasSuffix(".absmax") {
                    continue  // the scales of 8-bit moments, counted with their values below
                } else if eightBitMoments, header.dtype == .U8 {
                    result.bf16Bytes += 2 * header.elementCount  // one code per moment value
                } else if header.dtype.isFloatingPoint {
                    result.bf16Bytes += 2 * header.elementCount
                } else if header.dtype == .U8, let format = QuantFormat(rawValue: String(name.split(separator: ".").last ?? "")),
                          header.shape.count == 2, header.shape[1] % format.bytesPerBlock == 0 {
                    result.bf16Bytes += 2 * header.shape[0] * header.shape[1] / format.bytesPerBlock * format.blockSize
                } else {
                    result.bf16Bytes += header.byteCount
                }
            }
        }
        return result
    }

    package static func prune(root: String, keep: Int) {
        let fm = FileManager.default
        guard let entries = try? fm.contentsOfDirectory(atPath: root) else { return }
        // Never the checkpoint `latest` names, even when others sort after it (step_ directories of another run).
        let current = (try? String(contentsOfFile: root + "/latest", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        for name in checkpointNames(root: root).dropLast(keep) where name != current {
            try? fm.removeItem(atPath: root + "/" + name)
        }
        // Leftovers of interrupted saves by processes that are gone.
        for name in entries where name.hasPrefix(".tmp-") && !name.hasSuffix("-\(getpid())") {
            try? fm.removeItem(atPath: root + "/" + name)
        }
    }
}
