import Foundation

/// A training recipe: everything a run needs besides the data files' contents. Decoded from JSON with
/// snake_case keys; unknown keys and impossible values are errors before anything runs.
public enum TrainingMode: String, Sendable, CaseIterable {
    case full, lora, relora
}

public struct Recipe: Sendable, Equatable {
    /// Hugging Face `config.json` of the model to train (paths are relative to the working directory).
    public var model: String
    /// 1-D `.npy` token files.
    public var trainData: String
    public var valData: String?
    /// `tokenizer.json` used to make the data; copied into the run and into exports.
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
    /// A full-rank checkpoint (or run directory) whose weights, step count and dense optimizer state
    /// this run starts from.
    public var warmStart: String?

    public var tokensPerStep: Int { seqLen * microBatch * gradAccum }

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

extension Recipe {
    static let knownKeys: Set<String> = [
        "model", "train_data", "val_data", "tokenizer", "run_dir", "seq_len", "micro_batch", "grad_accum",
        "tokens_per_step", "steps", "token_budget", "lr", "warmup_steps", "min_lr_ratio", "adam_beta1",
        "adam_beta2", "adam_eps", "weight_decay", "grad_clip", "eval_every", "eval_tokens", "checkpoint_every",
        "keep_checkpoints", "log_every", "seed", "device", "checkpointing", "init_std", "max_skipped_fraction",
        "description", "mode", "lora_r", "lora_alpha", "lora_dropout", "lora_trainable_scale", "relora_every",
        "restart_warmup", "optimizer_reset", "optimizer_reset_ratio", "jagged_schedule", "warm_start",
    ]

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

    public init(keys values: [String: JSONValue]) throws {
        if let unknown = values.keys.filter({ !Self.knownKeys.contains($0) }).sorted().first {
            throw ReLoRAError.invalidConfig("unknown key '\(unknown)'")
        }
        let k = JSONKeys(values)
        func required(_ key: String) throws -> String {
            guard let s = try k.optionalString(key), !s.isEmpty else {
                throw ReLoRAError.invalidConfig("missing required key '\(key)'")
            }
            return s
        }
        self.init(model: try required("model"), trainData: try required("train_data"),
                  valData: try k.optionalString("val_data"), tokenizer: try k.optionalString("tokenizer"),
                  runDir: try required("run_dir"))
        seqLen = try k.optionalInt("seq_len") ?? seqLen
        microBatch = try k.optionalInt("micro_batch") ?? microBatch
        if k.has("grad_accum") && k.has("tokens_per_step") {
            throw ReLoRAError.invalidConfig("give either 'grad_accum' or 'tokens_per_step', not both")
        }
        gradAccum = try k.optionalInt("grad_accum") ?? gradAccum
        if let tps = try k.optionalInt("tokens_per_step") {
            let perMicro = seqLen * microBatch
            guard tps > 0, tps % perMicro == 0 else {
                throw ReLoRAError.invalidConfig(
                    "tokens_per_step \(tps) must be a positive multiple of seq_len * micro_batch = \(perMicro)")
            }
            gradAccum = tps / perMicro
        }
        if k.has("steps") && k.has("token_budget") {
            throw ReLoRAError.invalidConfig("give either 'steps' or 'token_budget', not both")
        }
        steps = try k.optionalInt("steps") ?? steps
        lr = try k.optionalDouble("lr") ?? lr
        warmupSteps = try k.optionalInt("warmup_steps") ?? warmupSteps
        minLRRatio = try k.optionalDouble("min_lr_ratio") ?? minLRRatio
        adamBeta1 = try k.optionalDouble("adam_beta1") ?? adamBeta1
        adamBeta2 = try k.optionalDouble("adam_beta2") ?? adamBeta2
        adamEps = try k.optionalDouble("adam_eps") ?? adamEps
        weightDecay = try k.optionalDouble("weight_decay") ?? weightDecay
        gradClip = try k.optionalDouble("grad_clip") ?? gradClip
        evalEvery = try k.optionalInt("eval_every") ?? evalEvery
        evalTokens = try k.optionalInt("eval_tokens") ?? evalTokens
        checkpointEvery = try k.optionalInt("checkpoint_every") ?? checkpointEvery
        keepCheckpoints = try k.optionalInt("keep_checkpoints") ?? keepCheckpoints
        logEvery = try k.optionalInt("log_every") ?? logEvery
        if let s = try k.optionalInt("seed") {
            guard s >= 0 else { throw ReLoRAError.invalidConfig("'seed' must be >= 0, got \(s)") }
            seed = UInt64(s)
        }
        device = try k.optionalString("device") ?? device
        if let c = try k.optionalString("checkpointing") {
            guard let v = GradientCheckpointing(rawValue: c) else {
                throw ReLoRAError.invalidConfig("'checkpointing' must be 'none' or 'block', got '\(c)'")
            }
            checkpointing = v
        }
        initStd = try k.optionalDouble("init_std") ?? initStd
        maxSkippedFraction = try k.optionalDouble("max_skipped_fraction") ?? maxSkippedFraction
        if let m = try k.optionalString("mode") {
            guard let v = TrainingMode(rawValue: m) else {
                throw ReLoRAError.invalidConfig("'mode' must be 'full', 'lora' or 'relora', got '\(m)'")
            }
            mode = v
        }
        loraRank = try k.optionalInt("lora_r") ?? loraRank
        loraAlpha = try k.optionalDouble("lora_alpha") ?? loraAlpha
        loraDropout = try k.optionalDouble("lora_dropout") ?? loraDropout
        loraTrainableScale = try k.optionalBool("lora_trainable_scale") ?? loraTrainableScale
        reloraEvery = try k.optionalInt("relora_every")
        restartWarmup = try k.optionalInt("restart_warmup") ?? restartWarmup
        if let r = try k.optionalString("optimizer_reset") {
            guard let v = OptimizerResetMode(rawValue: r) else {
                throw ReLoRAError.invalidConfig("'optimizer_reset' must be magnitude, random, full or none, got '\(r)'")
            }
            optimizerReset = v
        }
        optimizerResetRatio = try k.optionalDouble("optimizer_reset_ratio") ?? optimizerResetRatio
        jaggedSchedule = try k.optionalBool("jagged_schedule") ?? jaggedSchedule
        warmStart = try k.optionalString("warm_start")
        if let budget = try k.optionalInt("token_budget") {
            guard budget >= tokensPerStep else {
                throw ReLoRAError.invalidConfig("token_budget \(budget) is less than one step of \(tokensPerStep) tokens")
            }
            steps = budget / tokensPerStep
        }
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
        }
        _ = try Device(parsing: device)  // availability is the backend factory's to judge
    }

    /// The recipe as JSON (what the run directory stores; decoding it gives back an equal recipe).
    public func jsonObject() -> [String: Any] {
        var o: [String: Any] = [
            "model": model, "train_data": trainData, "run_dir": runDir, "seq_len": seqLen, "micro_batch": microBatch,
            "grad_accum": gradAccum, "steps": steps, "lr": lr, "warmup_steps": warmupSteps, "min_lr_ratio": minLRRatio,
            "adam_beta1": adamBeta1, "adam_beta2": adamBeta2, "adam_eps": adamEps, "weight_decay": weightDecay,
            "grad_clip": gradClip, "eval_every": evalEvery, "eval_tokens": evalTokens, "checkpoint_every": checkpointEvery,
            "keep_checkpoints": keepCheckpoints, "log_every": logEvery, "seed": Int(seed), "device": device,
            "checkpointing": checkpointing.rawValue, "init_std": initStd, "max_skipped_fraction": maxSkippedFraction,
        ]
        o["mode"] = mode.rawValue
        if mode != .full {
            o["lora_r"] = loraRank; o["lora_alpha"] = loraAlpha; o["lora_dropout"] = loraDropout
            o["lora_trainable_scale"] = loraTrainableScale
        }
        if mode == .relora {
            o["relora_every"] = reloraEvery; o["restart_warmup"] = restartWarmup
            o["optimizer_reset"] = optimizerReset.rawValue; o["optimizer_reset_ratio"] = optimizerResetRatio
            o["jagged_schedule"] = jaggedSchedule
        }
        if let w = warmStart { o["warm_start"] = w }
        if let v = valData { o["val_data"] = v }
        if let t = tokenizer { o["tokenizer"] = t }
        return o
    }
}
