import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// A training recipe: everything a run needs besides the data files' contents. Decoded from JSON with
/// snake_case keys; unknown keys and impossible values are errors before anything runs.
public enum TrainingMode: String, Sendable, CaseIterable {
    case full, lora, relora
}

/// Where the `master` merge policy keeps its f32 master copies on the CPU (`master_copies`).
public enum MasterCopyStorage: String, Sendable, CaseIterable {
    /// In RAM.
    case ram
    /// In memory-mapped files in the run directory (deleted as soon as they are mapped, so nothing is left
    /// behind, even after a crash): the page cache holds what fits and the rest goes to disk, for weights
    /// whose f32 copy does not fit in RAM. Same values, same results; restarts read the copy once.
    case file
}

/// Storage of Adam's moments (`optimizer_states`).
public enum OptimizerStates: String, Sendable, CaseIterable {
    /// f32 m and v: 8 bytes per trained parameter.
    case f32
    /// Blockwise 8-bit m and v (`BlockwiseMoments`, `relora_adam8.h`; bitsandbytes' 8-bit Adam scheme) for
    /// every trained tensor of at least 4096 entries: about 2.03 bytes per parameter. Smaller tensors keep f32.
    case int8
}

/// How a `lora`/`relora` run stores its frozen base weights: dense (the backend's precision) or a block format.
public enum FrozenStorage: String, Sendable, CaseIterable {
    case none, q8_0, q4_0, nf4

    /// The block format, or nil for dense.
    public var format: QuantFormat? { QuantFormat(rawValue: rawValue) }
}

public struct Recipe: Sendable, Equatable {
    /// Hugging Face `config.json` of the model to train, or a LLaMA GGUF file whose metadata is the config
    /// (the `warm_start` file itself, typically). Paths are relative to the working directory.
    public var model: String
    /// 1-D `.npy` token files.
    public var trainData: String
    public var valData: String?
    /// The tokenizer used to make the data: a `tokenizer.json`, a SentencePiece `tokenizer.model`, a
    /// directory with either, or a GGUF model (its metadata's tokenizer); kept in the run (under its own name;
    /// a GGUF's as a vocabulary-only `tokenizer.gguf`) and written into exports. Absent, a new run takes its
    /// `warm_start`'s tokenizer, if that has one (resolved into the run's `recipe.json`).
    public var tokenizer: String?
    /// Where checkpoints and `metrics.jsonl` go.
    public var runDir: String

    public var seqLen: Int = 128
    /// Sequences per forward/backward pass.
    public var microBatch: Int = 8
    /// Micro-batches per optimizer step (tokens per step = seq_len * micro_batch * grad_accum).
    public var gradAccum: Int = 1
    /// Optimizer steps (a `token_budget` key is converted to steps at decode time).
    public var steps: Int = 1000

    public var lr: Double = 1e-3
    public var warmupSteps: Int = 100
    /// The cosine decays from lr to lr * min_lr_ratio at the last step.
    public var minLRRatio: Double = 0.1
    /// Adam's moments in f32 (default) or blockwise 8-bit (`int8`).
    public var optimizerStates: OptimizerStates = .f32
    public var adamBeta1: Double = 0.9
    public var adamBeta2: Double = 0.999
    public var adamEps: Double = 1e-8
    /// Decoupled weight decay, applied to matrices only (not to norm gains).
    public var weightDecay: Double = 0
    /// Clip the global gradient norm to this value (0 disables).
    public var gradClip: Double = 1.0

    public var evalEvery: Int = 100
    /// Validation tokens per evaluation (consecutive windows from the start of val_data).
    public var evalTokens: Int = 65536
    public var checkpointEvery: Int = 500
    /// Completed checkpoints to keep (older ones are deleted after a successful save).
    public var keepCheckpoints: Int = 2
    public var logEvery: Int = 1

    public var seed: UInt64 = 0
    public var device: String = "cpu"
    public var checkpointing: GradientCheckpointing = .none
    /// Std of the normal init of linears and embeddings.
    public var initStd: Double = 0.02
    /// Stop when more than this fraction of steps had a non-finite loss or gradient.
    public var maxSkippedFraction: Double = 0.05

    /// `full` (every weight trained), `lora` (frozen W + LoRA, no restarts), `relora` (+ restarts).
    public var mode: TrainingMode = .full
    public var loraRank = 128
    public var loraAlpha = 32.0
    public var loraDropout = 0.0
    public var loraTrainableScale = false
    /// ReLoRA restart interval R in steps (merge + re-init + optimizer reset after the step t with t % R == 0).
    public var reloraEvery: Int?
    /// Steps of the linear LR ramp after each restart (jagged schedule).
    public var restartWarmup = 50
    public var optimizerReset: OptimizerResetMode = .magnitude
    /// Fraction for `magnitude` (quantile) and `random` (probability) resets.
    public var optimizerResetRatio = 0.99
    /// The jagged cosine (LR 0 at each restart, linear ramp back); false = plain cosine (ablation).
    public var jaggedSchedule = true
    /// `random` (windows at random offsets, with replacement) or `epoch` (non-overlapping windows, each
    /// once per epoch); nil: the trainer picks `epoch` when the training data holds at least the run's
    /// `steps * micro_batch * grad_accum` windows, else `random` (`SamplerMode.automatic`), and on a
    /// resume the sampler of the checkpoint. The trainer's own recipe (and the run's `recipe.json`)
    /// holds the resolved value.
    public var sampler: SamplerMode?
    /// Storage of the frozen block linears in `lora`/`relora` runs: `none` (dense) or q8_0, q4_0, nf4,
    /// dequantized on the fly. Embeddings, head and norms stay dense and trained.
    public var quant: FrozenStorage = .none
    /// How `relora` restarts merge into the frozen weights (`MergePolicyKind`); nil: the default, `exact`
    /// for dense weights and `rtn` for quantized ones (`effectiveMergePolicy`).
    public var mergePolicy: MergePolicyKind?
    /// Whether training with quantized weights under block checkpointing keeps each block's dequantized weights
    /// from its recompute to its backward (`reuse_dequantized`: true, false, or "auto", the default, as nil):
    /// one dequantization fewer per micro-batch for six of a block's seven linears, for a cache of one block's
    /// weights in the compute dtype (`DequantizedBlock`; 75 MiB more than the shared scratch for the 1b config
    /// in bf16). Only where the backend dequantizes whole weights (cuda); the results are the same bits either
    /// way. Auto keeps them unless the memory plan fits its budget only without (`MemoryPlanner.plan`), as the
    /// memory-for-speed choice it is; true keeps them whatever the plan says.
    public var reuseDequantized: Bool?
    /// Where `merge_policy: master` keeps its f32 copies on the CPU: `ram` (default) or `file` (memory-mapped).
    /// Other policies keep no copies and ignore it (the trainer says so in its log).
    public var masterCopies: MasterCopyStorage = .ram
    /// A full-rank checkpoint (or run directory) whose weights, step count and dense optimizer state
    /// this run starts from.
    public var warmStart: String?
    /// In a data-parallel run, keep each trained tensor's Adam moments (and master copy) on one rank only
    /// (`OptimizerShards`); the results are the same bits as without. No effect in a run of one process.
    public var shardOptimizer = false

    public var tokensPerStep: Int { seqLen * microBatch * gradAccum }

    /// The merge policy restarts use: the recipe's, or the default for its storage.
    public var effectiveMergePolicy: MergePolicyKind { mergePolicy ?? .defaultPolicy(quantized: quant != .none) }

    /// Whether the quantized weights carry f32 master copies (merge policy `master`).
    public var keepsMasterCopies: Bool { quant != .none && mode == .relora && effectiveMergePolicy.keepsMasterCopy }

    /// The LoRA settings of `lora` and `relora` runs.
    public var loraConfig: LoRAConfig? {
        mode == .full ? nil : LoRAConfig(rank: loraRank, alpha: loraAlpha, dropout: loraDropout, trainableScale: loraTrainableScale)
    }

    /// The learning-rate schedule this recipe asks for.
    public var schedule: LRSchedule {
        LRSchedule(totalSteps: steps, warmupSteps: warmupSteps, minRatio: minLRRatio,
                   restartEvery: mode == .relora && jaggedSchedule ? reloraEvery : nil, restartWarmup: restartWarmup)
    }

    public init(model: String, trainData: String, valData: String? = nil, tokenizer: String? = nil, runDir: String) {
        self.model = model; self.trainData = trainData; self.valData = valData; self.tokenizer = tokenizer
        self.runDir = runDir
    }
}

/// One recipe key, declared once: its JSON name, how it is read into a `Recipe`, and how it is written
/// back to `recipe.json`. `Recipe.keyTable` lists every key; the set of known keys, the decoder
/// (`init(keys:)`) and the encoder (`jsonObject()`) are all derived from it.
struct RecipeKey: Sendable {
    /// The snake_case JSON name.
    let name: String
    /// Reads the key, when present and not null, into the recipe (absent: the field keeps its default).
    /// Keys are read in table order, so a key may use the ones above it (`tokens_per_step` needs
    /// `seq_len` and `micro_batch`).
    let decode: @Sendable (JSONKeys, inout Recipe) throws -> Void
    /// The value `recipe.json` stores, or nil where the key is not written: keys of modes the recipe is
    /// not in, unset optional values, and input-only keys that decode into another field.
    let encode: @Sendable (Recipe) -> Any?

    /// A key stored in one field. `read` returns nil when the key is absent; `applies` says for which
    /// recipes the key is written (all by default).
    static func field<V>(_ name: String, _ path: WritableKeyPath<Recipe, V> & Sendable,
                         read: @escaping @Sendable (JSONKeys, String) throws -> V?,
                         write: @escaping @Sendable (V) -> Any = { $0 },
                         when applies: @escaping @Sendable (Recipe) -> Bool = { _ in true }) -> RecipeKey {
        RecipeKey(name: name,
                  decode: { keys, recipe in if let v = try read(keys, name) { recipe[keyPath: path] = v } },
                  encode: { applies($0) ? write($0[keyPath: path]) : nil })
    }

    /// A key stored in an optional field (default nil), written only when set.
    static func optional<V>(_ name: String, _ path: WritableKeyPath<Recipe, V?> & Sendable,
                            read: @escaping @Sendable (JSONKeys, String) throws -> V?,
                            when applies: @escaping @Sendable (Recipe) -> Bool = { _ in true }) -> RecipeKey {
        RecipeKey(name: name,
                  decode: { keys, recipe in if let v = try read(keys, name) { recipe[keyPath: path] = v } },
                  encode: { recipe in applies(recipe) ? recipe[keyPath: path] : nil })
    }

    static func int(_ name: String, _ path: WritableKeyPath<Recipe, Int> & Sendable,
                    when applies: @escaping @Sendable (Recipe) -> Bool = { _ in true }) -> RecipeKey {
        field(name, path, read: { try $0.optionalInt($1) }, when: applies)
    }

    static func double(_ name: String, _ path: WritableKeyPath<Recipe, Double> & Sendable,
                       when applies: @escaping @Sendable (Recipe) -> Bool = { _ in true }) -> RecipeKey {
        field(name, path, read: { try $0.optionalDouble($1) }, when: applies)
    }

    static func bool(_ name: String, _ path: WritableKeyPath<Recipe, Bool> & Sendable,
                     when applies: @escaping @Sendable (Recipe) -> Bool = { _ in true }) -> RecipeKey {
        field(name, path, read: { try $0.optionalBool($1) }, when: applies)
    }

    /// A non-empty string the recipe cannot do without.
    static func required(_ name: String, _ path: WritableKeyPath<Recipe, String> & Sendable) -> RecipeKey {
        field(name, path, read: { keys, name in
            guard let s = try keys.optionalString(name), !s.isEmpty else {
                throw ReLoRAError.invalidConfig("missing required key '\(name)'")
            }
            return s
        })
    }

    /// A string naming one case of `E`; anything else is an error listing the allowed values.
    static func choice<E>(_ name: String, _ path: WritableKeyPath<Recipe, E> & Sendable,
                          when applies: @escaping @Sendable (Recipe) -> Bool = { _ in true }) -> RecipeKey
    where E: RawRepresentable & CaseIterable & Sendable, E.RawValue == String {
        let cases = Dictionary(uniqueKeysWithValues: E.allCases.map { ($0.rawValue, $0) })
        let allowed = alternatives(E.allCases.map(\.rawValue))
        return field(name, path, read: { keys, name in
            guard let raw = try keys.optionalString(name) else { return nil }
            guard let value = cases[raw] else {
                throw ReLoRAError.invalidConfig("'\(name)' must be \(allowed), got '\(raw)'")
            }
            return value
        }, write: { $0.rawValue }, when: applies)
    }

    /// An optional string naming one case of `E` (default nil), written only when set (and `applies`).
    static func optionalChoice<E>(_ name: String, _ path: WritableKeyPath<Recipe, E?> & Sendable,
                                  when applies: @escaping @Sendable (Recipe) -> Bool = { _ in true }) -> RecipeKey
    where E: RawRepresentable & CaseIterable & Sendable, E.RawValue == String {
        let cases = Dictionary(uniqueKeysWithValues: E.allCases.map { ($0.rawValue, $0) })
        let allowed = alternatives(E.allCases.map(\.rawValue))
        return RecipeKey(name: name, decode: { keys, recipe in
            guard let raw = try keys.optionalString(name) else { return }
            guard let value = cases[raw] else {
                throw ReLoRAError.invalidConfig("'\(name)' must be \(allowed), got '\(raw)'")
            }
            recipe[keyPath: path] = value
        }, encode: { applies($0) ? $0[keyPath: path]?.rawValue : nil })
    }

    /// A key that is read into other fields and never written (`recipe.json` stores its result).
    static func inputOnly(_ name: String, decode: @escaping @Sendable (JSONKeys, inout Recipe) throws -> Void) -> RecipeKey {
        RecipeKey(name: name, decode: decode, encode: { _ in nil })
    }

    /// "'a'", "'a' or 'b'", "'a', 'b' or 'c'".
    static func alternatives(_ values: [String]) -> String {
        let quoted = values.map { "'\($0)'" }
        return quoted.count < 2 ? quoted.joined() : quoted.dropLast().joined(separator: ", ") + " or " + quoted.last!
    }
}

extension Recipe {
    static let loraModes: @Sendable (Recipe) -> Bool = { $0.mode != .full }
    static let reloraMode: @Sendable (Recipe) -> Bool = { $0.mode == .relora }

    /// Every recipe key, in decoding order. The meaning of each is documented on its field above and in
    /// the README's recipe tables.
    static let keyTable: [RecipeKey] = [
        .required("model", \.model),
        .required("train_data", \.trainData),
        .optional("val_data", \.valData, read: { try $0.optionalString($1) }),
        .optional("tokenizer", \.tokenizer, read: { try $0.optionalString($1) }),
        .required("run_dir", \.runDir),
        .int("seq_len", \.seqLen),
        .int("micro_batch", \.microBatch),
        .int("grad_accum", \.gradAccum),
        // The step size in tokens instead of micro-batches (needs seq_len and micro_batch above).
        .inputOnly("tokens_per_step") { keys, recipe in
            guard keys.has("tokens_per_step") else { return }
            if keys.has("grad_accum") {
                throw ReLoRAError.invalidConfig("give either 'grad_accum' or 'tokens_per_step', not both")
            }
            let tps = try keys.int("tokens_per_step"), perMicro = recipe.seqLen * recipe.microBatch
            guard tps > 0, tps % perMicro == 0 else {
                throw ReLoRAError.invalidConfig(
                    "tokens_per_step \(tps) must be a positive multiple of seq_len * micro_batch = \(perMicro)")
            }
            recipe.gradAccum = tps / perMicro
        },
        .int("steps", \.steps),
        // The run length in tokens instead of steps (needs the step size above); rounds down to whole steps.
        .inputOnly("token_budget") { keys, recipe in
            guard keys.has("token_budget") else { return }
            if keys.has("steps") { throw ReLoRAError.invalidConfig("give either 'steps' or 'token_budget', not both") }
            let budget = try keys.int("token_budget")
            guard budget >= recipe.tokensPerStep else {
                throw ReLoRAError.invalidConfig("token_budget \(budget) is less than one step of \(recipe.tokensPerStep) tokens")
            }
            recipe.steps = budget / recipe.tokensPerStep
        },
        .double("lr", \.lr),
        .int("warmup_steps", \.warmupSteps),
        .double("min_lr_ratio", \.minLRRatio),
        .choice("optimizer_states", \.optimizerStates),
        .double("adam_beta1", \.adamBeta1),
        .double("adam_beta2", \.adamBeta2),
        .double("adam_eps", \.adamEps),
        .double("weight_decay", \.weightDecay),
        .double("grad_clip", \.gradClip),
        .int("eval_every", \.evalEvery),
        .int("eval_tokens", \.evalTokens),
        .int("checkpoint_every", \.checkpointEvery),
        .int("keep_checkpoints", \.keepCheckpoints),
        .int("log_every", \.logEvery),
        .field("seed", \.seed, read: { keys, name in
            try keys.optionalInt(name).map { s in
                guard s >= 0 else { throw ReLoRAError.invalidConfig("'seed' must be >= 0, got \(s)") }
                return UInt64(s)
            }
        }, write: { Int($0) }),
        // 'cpu' or 'cuda' (validate()); whether this build has it is the backend factory's to say.
        .field("device", \.device, read: { try $0.optionalString($1) }),
        .choice("checkpointing", \.checkpointing),
        .optionalChoice("sampler", \.sampler),
        .double("init_std", \.initStd),
        .double("max_skipped_fraction", \.maxSkippedFraction),
        // Free text for people; not stored in the run.
        .inputOnly("description") { _, _ in },
        .choice("mode", \.mode),
        .int("lora_r", \.loraRank, when: loraModes),
        .double("lora_alpha", \.loraAlpha, when: loraModes),
        .double("lora_dropout", \.loraDropout, when: loraModes),
        .bool("lora_trainable_scale", \.loraTrainableScale, when: loraModes),
        .choice("quant", \.quant, when: loraModes),
        .optionalChoice("merge_policy", \.mergePolicy, when: reloraMode),
        .choice("master_copies", \.masterCopies, when: reloraMode),
        // true, false or "auto" (or null: auto, the default); written only when set.
        RecipeKey(name: "reuse_dequantized", decode: { keys, recipe in
            switch keys.values["reuse_dequantized"] {
            case nil, .null?, .string("auto")?: recipe.reuseDequantized = nil
            case .bool(let b)?: recipe.reuseDequantized = b
            case let other?: throw ReLoRAError.invalidConfig("'reuse_dequantized' must be true, false or \"auto\", got \(other.summary)")
            }
        }, encode: { loraModes($0) ? $0.reuseDequantized : nil }),
        .optional("relora_every", \.reloraEvery, read: { try $0.optionalInt($1) }, when: reloraMode),
        .int("restart_warmup", \.restartWarmup, when: reloraMode),
        .choice("optimizer_reset", \.optimizerReset, when: reloraMode),
        .double("optimizer_reset_ratio", \.optimizerResetRatio, when: reloraMode),
        .bool("jagged_schedule", \.jaggedSchedule, when: reloraMode),
        .optional("warm_start", \.warmStart, read: { try $0.optionalString($1) }),
        // Written only when set: the recipes of runs without it stay as they were.
        .bool("shard_optimizer", \.shardOptimizer, when: { $0.shardOptimizer }),
    ]

    static let knownKeys: Set<String> = Set(keyTable.map(\.name))

    /// Reads a recipe file and applies `--set key=value` overrides (values parsed as JSON, else as strings).
    public init(contentsOf path: String, overrides: [String] = []) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot read the recipe; check the path")
        }
        do {
            var keys = try JSONKeys(data: data, what: "the recipe").values
            try Self.apply(overrides: overrides, to: &keys)
            try self.init(keys: keys)
        } catch ReLoRAError.invalidConfig(let message) {
            throw ReLoRAError.invalidFile(path: path, reason: "invalid recipe: \(message)")
        }
    }

    /// `key=value` strings; the value is JSON if it parses (`lr=3e-4`, `val_data=null`), else a string.
    public static func apply(overrides: [String], to keys: inout [String: JSONValue]) throws {
        for item in overrides {
            guard let eq = item.firstIndex(of: "="), eq != item.startIndex else {
                throw ReLoRAError.usage("--set takes key=value, got '\(item)'")
            }
            let key = String(item[..<eq]), raw = String(item[item.index(after: eq)...])
            guard knownKeys.contains(key) else {
                throw ReLoRAError.usage("--set: unknown recipe key '\(key)'")
            }
            if let v = try? JSONDecoder().decode(JSONValue.self, from: Data(raw.utf8)) {
                keys[key] = v
            } else {
                keys[key] = .string(raw)
            }
        }
    }

    /// Decodes every key of `keyTable` (unknown keys are an error), then validates the result.
    public init(keys values: [String: JSONValue]) throws {
        if let unknown = values.keys.filter({ !Self.knownKeys.contains($0) }).sorted().first {
            throw ReLoRAError.invalidConfig("unknown key '\(unknown)'")
        }
        self.init(model: "", trainData: "", runDir: "")  // the required keys are read first
        let keys = JSONKeys(values)
        for key in Self.keyTable { try key.decode(keys, &self) }
        try validate()
    }

    func validate() throws {
        func positive(_ key: String, _ v: Int) throws {
            if v <= 0 { throw ReLoRAError.invalidConfig("'\(key)' must be a positive integer, got \(v)") }
        }
        try positive("seq_len", seqLen); try positive("micro_batch", microBatch); try positive("grad_accum", gradAccum)
        try positive("steps", steps); try positive("eval_every", evalEvery); try positive("eval_tokens", evalTokens)
        try positive("checkpoint_every", checkpointEvery); try positive("keep_checkpoints", keepCheckpoints)
        try positive("log_every", logEvery)
        if seqLen < 2 { throw ReLoRAError.invalidConfig("'seq_len' must be at least 2") }
        if warmupSteps < 0 || warmupSteps >= steps {
            throw ReLoRAError.invalidConfig("'warmup_steps' must be in [0, steps), got \(warmupSteps) for \(steps) steps")
        }
        if !(lr > 0 && lr.isFinite) { throw ReLoRAError.invalidConfig("'lr' must be a positive number, got \(lr)") }
        if !(minLRRatio >= 0 && minLRRatio <= 1) { throw ReLoRAError.invalidConfig("'min_lr_ratio' must be in [0, 1], got \(minLRRatio)") }
        for (key, b) in [("adam_beta1", adamBeta1), ("adam_beta2", adamBeta2)] where !(b >= 0 && b < 1) {
            throw ReLoRAError.invalidConfig("'\(key)' must be in [0, 1), got \(b)")
        }
        if !(adamEps > 0) { throw ReLoRAError.invalidConfig("'adam_eps' must be positive, got \(adamEps)") }
        if !(weightDecay >= 0 && weightDecay.isFinite) { throw ReLoRAError.invalidConfig("'weight_decay' must be >= 0, got \(weightDecay)") }
        if !(gradClip >= 0 && gradClip.isFinite) { throw ReLoRAError.invalidConfig("'grad_clip' must be >= 0 (0 disables), got \(gradClip)") }
        if !(initStd > 0 && initStd.isFinite) { throw ReLoRAError.invalidConfig("'init_std' must be positive, got \(initStd)") }
        if !(maxSkippedFraction >= 0 && maxSkippedFraction <= 1) {
            throw ReLoRAError.invalidConfig("'max_skipped_fraction' must be in [0, 1], got \(maxSkippedFraction)")
        }
        switch mode {
        case .full:
            if reloraEvery != nil { throw ReLoRAError.invalidConfig("'relora_every' needs mode 'relora'") }
        case .lora:
            if reloraEvery != nil { throw ReLoRAError.invalidConfig("'relora_every' needs mode 'relora' (mode 'lora' never restarts)") }
        case .relora:
            guard let r = reloraEvery else { throw ReLoRAError.invalidConfig("mode 'relora' needs 'relora_every' (steps between restarts)") }
            guard r > 0 else { throw ReLoRAError.invalidConfig("'relora_every' must be positive, got \(r)") }
            guard steps % r == 0 else {
                throw ReLoRAError.invalidConfig(
                    "'relora_every' \(r) must divide 'steps' \(steps) so the run ends on a complete cycle (the jagged schedule restarts at multiples of it)")
            }
            // The first restart comes after step t = R; it needs the jagged schedule's lr 0 there, which a
            // still-running initial warmup (t < W0) would override with t / W0 (and no ramp after the reset).
            if jaggedSchedule && warmupSteps > r {
                throw ReLoRAError.invalidConfig(
                    "'warmup_steps' (\(warmupSteps)) must be at most 'relora_every' (\(r)): the jagged schedule needs lr 0 at the first restart")
            }
            guard restartWarmup >= 0, restartWarmup < r else {
                throw ReLoRAError.invalidConfig("'restart_warmup' must be in [0, relora_every), got \(restartWarmup)")
            }
            guard optimizerResetRatio >= 0, optimizerResetRatio <= 1 else {
                throw ReLoRAError.invalidConfig("'optimizer_reset_ratio' must be in [0, 1], got \(optimizerResetRatio)")
            }
        }
        if mode != .full {
            if loraRank <= 0 { throw ReLoRAError.invalidConfig("'lora_r' must be a positive integer, got \(loraRank)") }
            if !(loraAlpha > 0) { throw ReLoRAError.invalidConfig("'lora_alpha' must be positive, got \(loraAlpha)") }
            if !(loraDropout >= 0 && loraDropout < 1) { throw ReLoRAError.invalidConfig("'lora_dropout' must be in [0, 1), got \(loraDropout)") }
        } else if quant != .none {
            throw ReLoRAError.invalidConfig("'quant' \(quant.rawValue) needs mode 'lora' or 'relora' (full-rank training trains the base weights, which quantized storage freezes)")
        }
        if let policy = mergePolicy {
            guard mode == .relora else {
                throw ReLoRAError.invalidConfig("'merge_policy' needs mode 'relora' (only restarts merge into the frozen weights)")
            }
            if quant == .none && policy != .exact {
                throw ReLoRAError.invalidConfig("'merge_policy' '\(policy.rawValue)' is for quantized frozen weights; dense ones merge exactly ('exact'): set 'quant' to q8_0, q4_0 or nf4, or drop 'merge_policy'")
            }
            if quant != .none && policy == .exact {
                throw ReLoRAError.invalidConfig("'merge_policy' 'exact' is for dense frozen weights; \(quant.rawValue) weights are requantized at every merge: use 'rtn', 'stochastic', 'compensate' or 'master'")
            }
        }
        _ = try Device(parsing: device)  // availability is the backend factory's to judge
    }

    /// The recipe as JSON (what the run directory stores; decoding it gives back an equal recipe). Keys of
    /// other modes are left out: a `full` recipe has no `lora_*` keys, only `relora` writes the restart keys.
    public func jsonObject() -> [String: Any] {
        var object: [String: Any] = [:]
        for key in Self.keyTable { if let value = key.encode(self) { object[key.name] = value } }
        return object
    }
}

extension Recipe {
    /// The model's architecture: `model`'s config.json, or a GGUF file's `llama.*` metadata.
    public func modelConfig() throws -> LlamaConfig {
        LlamaGGUF.isGGUF(model) ? try LlamaGGUF.config(GGUFFile(path: model)) : try LlamaConfig(contentsOf: model)
    }
}
