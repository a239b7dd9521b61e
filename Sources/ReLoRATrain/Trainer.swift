import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// One line of training progress (also a line of `metrics.jsonl`).
public struct StepMetrics: Sendable {
    public var step: Int
    public var loss: Double
    public var lr: Double
    public var gradNorm: Double
    public var tokensPerSecond: Double
    public var milliseconds: Double
    public var memoryBytes: Int
    public var skipped: Bool
    /// Model FLOPs utilisation of the step (`ModelFLOPs` over `PeakFLOPs`); nil where the backend's peak is unknown.
    public var mfu: Double? = nil
}

public struct TrainingSummary: Sendable {
    public var steps: Int
    public var skippedSteps: Int
    public var lastLoss: Double
    public var lastValLoss: Double?
    public var checkpoint: String?
    public var stoppedEarly: Bool
}

/// Full-rank training: the recipe's loop of micro-batches, gradient clipping, AdamW, warmup + cosine
/// schedule, periodic evaluation and checkpoints. Deterministic: with the same recipe and backend, a run
/// resumed from a checkpoint produces bit-identical losses to an uninterrupted one.
public final class Trainer {
    /// The recipe as given, with `sampler` resolved (see `Recipe.sampler`).
    public let recipe: Recipe
    public let model: LlamaModel
    public let optimizer: AdamW
    public private(set) var state: TrainingState
    let sampler: TrainingSampler
    let valTokens: TokenArray?
    let schedule: LRSchedule
    let log: (String) -> Void
    /// Checked between steps; when it returns true the trainer saves a checkpoint and stops.
    public var shouldStop: () -> Bool = { false }
    /// Host<->device transfers of the latest `trainStep` (O(1): ids and targets up and the loss down per
    /// micro-batch, the gradient norm down once).
    public private(set) var lastStepTransfers = TransferCount()
    /// Every step's metrics of this process, in order (tests compare runs with it).
    public private(set) var history: [StepMetrics] = []
    /// The plan's device peak, for a run on a GPU (printed beside the measured peak after the first step).
    public private(set) var plannedPeak: Int?

    /// How restarts merge: the recipe's `merge_policy` (default `exact` for dense weights, `rtn` for quantized ones).
    var mergePolicy: MergePolicy { recipe.effectiveMergePolicy.policy }

    // Views of the run: TensorBoard events beside metrics.jsonl, and MFU (FLOPs of a step over the peak).
    var tensorBoard: TensorBoardWriter?
    let stepFLOPs: Double
    /// The backend's peak FLOP/s, measured (CPU: sgemm, once per process) before the first step is timed.
    public private(set) lazy var peakFLOPs: Double? = PeakFLOPs.peak(for: model.backend)

    /// Starts a new run (`resume == false`: the run directory must not hold checkpoints yet) or continues
    /// the latest checkpoint of `recipe.runDir`. `backend` defaults to the recipe's `device`.
    public init(recipe: Recipe, resume: Bool, backend: Backend? = nil, log: @escaping (String) -> Void) throws {
        try recipe.validate()  // recipes built in code skip the decoder's checks
        let backend = try backend ?? BackendFactory.make(Device(parsing: recipe.device))
        var recipe = recipe
        self.log = log
        let config = try LlamaConfig(contentsOf: recipe.model)
        guard recipe.seqLen <= config.maxPositionEmbeddings else {
            throw ReLoRAError.invalidConfig("seq_len \(recipe.seqLen) exceeds the model's max_position_embeddings \(config.maxPositionEmbeddings)")
        }
        let train = try TokenArray(npyPath: recipe.trainData)
        try Self.checkVocabulary(train, config)
        // Before anything is allocated or written: a new run never goes where checkpoints are, a resume
        // only from the checkpoint `latest` names.
        let latest: String?
        if resume {
            guard let path = try TrainingCheckpoint.resumePoint(runDir: recipe.runDir) else {
                throw ReLoRAError.invalidData("\(recipe.runDir) has no checkpoint to resume from; start the run without --resume")
            }
            latest = path
        } else {
            try TrainingCheckpoint.requireNoCheckpoints(runDir: recipe.runDir)
            latest = nil
        }
        recipe.sampler = try Self.resolveSampler(recipe, train: train, resumingFrom: latest)
        self.recipe = recipe
        switch recipe.sampler! {
        case .random: sampler = .random(try WindowSampler(tokens: train, seqLen: recipe.seqLen, seed: recipe.seed))
        case .epoch:
            sampler = .epoch(try EpochSampler(tokens: train, seqLen: recipe.seqLen, microBatch: recipe.microBatch,
                                              gradAccum: recipe.gradAccum, seed: recipe.seed))
        }
        if let v = recipe.valData {
            let val = try TokenArray(npyPath: v)
            try Self.checkVocabulary(val, config)
            guard val.count >= recipe.seqLen else {
                throw ReLoRAError.invalidData("\(v) has \(val.count) tokens, fewer than one evaluation window of seq_len \(recipe.seqLen)")
            }
            valTokens = val
        } else {
            valTokens = nil
        }
        schedule = recipe.schedule
        try recipe.loraConfig?.validate(for: config)

        if recipe.masterCopies == .file {
            if recipe.keepsMasterCopies {
                try Self.mapMasterCopies(recipe, config: config, backend: backend)
            } else {
                log("note: master_copies 'file' has no effect: only merge_policy 'master' (with quantized weights) keeps master copies")
            }
        }
        try LlamaModel.checkSupported(config, on: backend)
        if let device = backend as? DeviceBackend {
            // Refuse before allocating a run whose plan does not fit what the device has free now.
            let free = device.deviceMemory().free
            let plan = try MemoryPlanner.requireFits(recipe, config: config, device: device.device, budget: free,
                                                     what: "the free memory of \(device.deviceName)")
            plannedPeak = plan.report.peakTotal
            log("memory plan: peak \(formatBytes(plan.report.peakTotal)) of \(formatBytes(free)) free on \(device.deviceName)")
        }
        model = LlamaModel(config: config, backend: backend, checkpointing: recipe.checkpointing, lora: recipe.loraConfig,
                           quant: recipe.quant.format, masterCopies: recipe.keepsMasterCopies)
        stepFLOPs = ModelFLOPs.perStep(config: config, recipe: recipe)
        model.dropoutSeed = recipe.seed
        model.enableGradients()
        optimizer = AdamW(model: model, beta1: Float(recipe.adamBeta1), beta2: Float(recipe.adamBeta2),
                          eps: Float(recipe.adamEps), weightDecay: Float(recipe.weightDecay), states: recipe.optimizerStates)
        if resume, let path = latest {
            state = try TrainingCheckpoint.load(path, into: model, moments: optimizer.checkpointMoments)
            optimizer.stepCount = state.optimizerStep
            optimizer.refreshMasterCopies()
            guard state.seed == recipe.seed else {
                throw ReLoRAError.invalidData("the checkpoint was made with seed \(state.seed) but the recipe says \(recipe.seed)")
            }
            log("resumed from \(path) at step \(state.step)")
            try truncateMetrics(after: state.step)
        } else {
            if let warm = recipe.warmStart {
                state = try Self.warmStart(from: warm, model: model, optimizer: optimizer, seed: recipe.seed, log: log)
                log("warm start from \(warm) at step \(state.step)")
                guard state.step < recipe.steps else {
                    throw ReLoRAError.invalidConfig("the warm start is at step \(state.step), but the recipe ends at step \(recipe.steps)")
                }
            } else {
                try model.weights.initializeRandom(seed: recipe.seed, std: Float(recipe.initStd), backend: backend)
                state = TrainingState(step: 0, optimizerStep: 0, skippedSteps: 0, tokensSeen: 0, seed: recipe.seed)
            }
            model.initializeLoRA(seed: recipe.seed)
            if model.loraConfig != nil { state.loraMerges = 0 }
            state.sampler = recipe.sampler!.stateName
            try Files.createDirectory(recipe.runDir)
            try Files.writeJSON(recipe.jsonObject(), to: recipe.runDir + "/recipe.json")
            try? FileManager.default.removeItem(atPath: metricsPath)
            TensorBoardWriter.removeEventFiles(runDir: recipe.runDir)
            if let tok = recipe.tokenizer {
                guard let data = FileManager.default.contents(atPath: tok) else {
                    throw ReLoRAError.invalidFile(path: tok, reason: "cannot read the tokenizer named by the recipe")
                }
                try writeFileAtomically(data, to: recipe.runDir + "/tokenizer.json")
            }
        }
        optimizer.refreshMasterCopies()
        // A resumed run writes a new event file that starts by discarding the old one's steps after the checkpoint.
        tensorBoard = try TensorBoardWriter(runDir: recipe.runDir, resumeStep: resume ? state.step + 1 : nil)
    }

    var metricsPath: String { recipe.runDir + "/metrics.jsonl" }

    /// The sampler of a run: on a resume the checkpoint's (a recipe naming another one is an error: the
    /// data position of a run is its step under the sampler it started with); else the recipe's, or
    /// `SamplerMode.automatic` for the training data and the run's budget.
    static func resolveSampler(_ recipe: Recipe, train: TokenArray, resumingFrom checkpoint: String?) throws -> SamplerMode {
        if let checkpoint {
            let saved = try TrainingCheckpoint.readState(checkpoint).sampler
            guard let mode = SamplerMode(stateName: saved) else {
                throw ReLoRAError.invalidData("\(checkpoint)/state.json names sampler '\(saved)', which this version does not know")
            }
            if let asked = recipe.sampler, asked != mode {
                throw ReLoRAError.invalidData(
                    "the checkpoint was made with sampler '\(mode.rawValue)' but the recipe says '\(asked.rawValue)'; a run cannot change samplers (its data position is its step under the sampler it started with): resume with sampler '\(mode.rawValue)' or start a new run")
            }
            return mode
        }
        return recipe.sampler ?? .automatic(windows: (train.count - 1) / recipe.seqLen, needed: recipe.steps * recipe.microBatch * recipe.gradAccum)
    }

    /// One line on the data and the sampler, and a warning when the run needs more than one epoch.
    func logSampler() {
        let windows: Int
        switch sampler {
        case .random(let s): windows = (s.tokens.count - 1) / recipe.seqLen
        case .epoch(let s): windows = s.windowCount
        }
        let perStep = recipe.microBatch * recipe.gradAccum
        let needed = recipe.steps * perStep
        let epochs = Double(needed) / Double(windows)
        switch sampler {
        case .random(let s):
            log(String(format: "sampler random: %d tokens, windows of %d at random offsets (with replacement); the run's %d windows are %.4g epochs",
                       s.tokens.count, recipe.seqLen + 1, needed, epochs))
        case .epoch(let s):
            let position = state.step * perStep
            log(String(format: "sampler epoch: %d tokens = %d windows of %d (stride %d), each once per epoch; the run's %d windows are %.4g epochs; step %d starts in epoch %d at window %d of %d",
                       s.tokens.count, windows, recipe.seqLen + 1, recipe.seqLen, needed, epochs, state.step,
                       position / windows, position % windows, windows))
        }
        if needed > windows {
            let consequence = sampler.mode == .epoch
                ? "every window is seen again from epoch 1 on, each epoch in a new order"
                : "windows repeat; a larger corpus or a smaller token budget avoids it"
            log("warning: the run's budget (\(needed) windows, \(needed * recipe.seqLen) tokens) exceeds one epoch of the training data (\(windows) windows): \(consequence)")
        }
    }

    /// After `step` (0-based) ran: a line for each epoch after the first that began in it (epochs are
    /// numbered from 0; `logSampler` names the one a run starts in).
    func logEpochs(ofStep step: Int) {
        guard case .epoch(let s) = sampler, step > 0 else { return }
        let first = step * s.windowsPerStep, last = first + s.windowsPerStep - 1
        let before = (first - 1) / s.windowCount, after = last / s.windowCount
        guard after > before else { return }
        for epoch in (before + 1)...after {
            log("epoch \(epoch) begins in step \(step + 1) (window \(epoch * s.windowCount) of the run, \(s.windowCount) windows an epoch)")
        }
    }

    /// Starts from a full-rank relora checkpoint (or run directory) or a Hugging Face LLaMA directory
    /// (single or sharded safetensors: continued pretraining of an existing model).
    ///
    /// From a relora checkpoint: its weights (the LoRA run's frozen W), its step count (the schedule
    /// continues, as in the reference), and Adam's moments and step counter for the dense tensors that
    /// stay trainable (embeddings, norms, head). From a Hugging Face directory: its weights only; the
    /// run starts at step 0 with fresh optimizer state. LoRA factors start fresh with zero moments.
    static func warmStart(from path: String, model: LlamaModel, optimizer: AdamW, seed: UInt64,
                          log: @escaping (String) -> Void) throws -> TrainingState {
        // A training checkpoint (it has state.json) also holds config.json and, in format 1 or when a tensor
        // file is stored uncompressed, model.safetensors: check for it first, or its step, optimizer state
        // and data position would be dropped as if it were a Hugging Face export.
        let isTrainingCheckpoint = FileManager.default.fileExists(atPath: path + "/state.json")
        if !isTrainingCheckpoint && HFCheckpoint.isModelDirectory(path) {
            let config = try HFCheckpoint.readConfig(directory: path)
            try checkSameArchitecture(config, model.config, source: path)
            try HFCheckpoint.loadWeights(directory: path, into: model, warn: { log("warning: \($0)") },
                                         quantized: quantizationLog(model, log))
            return TrainingState(step: 0, optimizerStep: 0, skippedSteps: 0, tokensSeen: 0, seed: seed)
        }
        let checkpoint = try TrainingCheckpoint.resolve(path).checkpoint
        let warmState = try TrainingCheckpoint.readState(checkpoint)
        let config = try LlamaConfig(contentsOf: checkpoint + "/config.json")
        try checkSameArchitecture(config, model.config, source: checkpoint)
        guard !TrainingCheckpoint.hasLoRA(checkpoint, version: warmState.formatVersion) else {
            throw ReLoRAError.invalidConfig("warm_start must be a full-rank checkpoint or a Hugging Face model directory; \(checkpoint) holds LoRA factors (continue it with --resume, or export it with `relora export --format hf` and warm-start from the export)")
        }
        let weights = try TrainingCheckpoint.openTensors(checkpoint, "model", version: warmState.formatVersion)
        let report = quantizationLog(model, log)
        for (name, slot) in model.weights.slots() {
            if let error = try TensorIO.load(slot, from: weights, name, backend: model.backend) { report(name, error) }
        }
        let moments = try TrainingCheckpoint.openTensors(checkpoint, "optimizer", version: warmState.formatVersion)
        let stored = optimizer.checkpointMoments.entries
        for (i, p) in optimizer.parameters.enumerated() where !p.isLoRA {
            try TrainingCheckpoint.loadMoments(stored[i], from: moments, backend: model.backend)
        }
        optimizer.stepCount = warmState.optimizerStep
        return TrainingState(step: warmState.step, optimizerStep: warmState.optimizerStep, skippedSteps: 0,
                             tokensSeen: warmState.tokensSeen, seed: seed)
    }

    /// Logs each warm-start weight quantized on load with its relative error `||deq(q) - w|| / ||w||`.
    static func quantizationLog(_ model: LlamaModel, _ log: @escaping (String) -> Void) -> (String, Double) -> Void {
        let format = model.quant?.rawValue ?? "dense"
        return { name, error in log(String(format: "quantized %@ to %@: relative error %.3e", name, format, error)) }
    }

    static func checkSameArchitecture(_ source: LlamaConfig, _ model: LlamaConfig, source path: String) throws {
        guard source == model else {
            throw ReLoRAError.invalidConfig(
                "the warm start \(path) has another architecture (hidden \(source.hiddenSize), layers \(source.numHiddenLayers), vocab \(source.vocabSize)) than the recipe's model (hidden \(model.hiddenSize), layers \(model.numHiddenLayers), vocab \(model.vocabSize)); point 'model' at the warm start's config.json")
        }
    }

    /// Merge, re-initialise and reset the LoRA optimizer state (ReLoRA restart), with a log line and a
    /// metrics line (keys in the README: `relative_update`, `merge_error`, `codes_changed` for quantized
    /// weights, `residual_recovered` under `compensate`, `merge_seconds`, `zeroed_m`, `zeroed_v`).
    func restart() throws {
        let merge = try model.mergeAdapters(policy: mergePolicy, seed: recipe.seed)
        state.loraMerges = model.merges
        let reset = Self.resetAfterMerge(optimizer, recipe: recipe, restart: merge.restart)
        var mergeLine = String(format: "merge %@ in %.3f s: |sBA|/|W| %.4f, merge error %.2e", merge.policy, merge.seconds,
                               merge.relativeUpdate, merge.mergeError)
        var extraJSON = ""
        if let changed = merge.codesChanged {
            mergeLine += String(format: ", codes changed %.4f", changed)
            extraJSON += String(format: ",\"codes_changed\":%.6g", changed)
        }
        if let recovered = merge.residualRecovered {
            mergeLine += String(format: ", residual recovered %.3f", recovered)
            extraJSON += String(format: ",\"residual_recovered\":%.6g", recovered)
        }
        log(String(format: "restart %d after step %d | %@ | optimizer reset %@: zeroed %.4f of m, %.4f of v",
                   merge.restart + 1, state.step, mergeLine, reset.description, reset.m, reset.v))
        try appendMetrics(String(format: "{\"step\":%d,\"restart\":%d,\"merge_policy\":\"%@\",\"merge_seconds\":%.4f,\"relative_update\":%.6g,\"merge_error\":%.6g%@,\"zeroed_m\":%.6f,\"zeroed_v\":%.6f}",
                                 state.step, merge.restart + 1, merge.policy, merge.seconds, merge.relativeUpdate, merge.mergeError,
                                 extraJSON, reset.m, reset.v))
        lastResetFractions = (reset.m, reset.v)
    }

    /// ReLoRA's optimizer reset after merge `restart`: the recipe's `optimizer_reset`, except under merge
    /// policy `compensate`, whose new A and B are unrelated to the old moments: theirs are zeroed (a
    /// trained scale's follow the recipe). Returns what was done and the fractions of LoRA moments zeroed.
    static func resetAfterMerge(_ optimizer: AdamW, recipe: Recipe, restart: Int) -> (description: String, m: Double, v: Double) {
        let mode = recipe.optimizerReset, ratio = recipe.optimizerResetRatio
        if recipe.effectiveMergePolicy == .compensate {
            let (m, v) = optimizer.resetLoRAMoments(seed: recipe.seed, restart: restart) { p in
                p.loraFactor == .scale ? mode.reset(for: .scale, ratio: ratio) : .zero
            }
            return ("full for A and B (compensate)", m, v)
        }
        let (m, v) = optimizer.resetLoRAMoments(mode, ratio: ratio, seed: recipe.seed, restart: restart)
        return (String(format: "%@ %.2f", mode.rawValue, ratio), m, v)
    }

    /// Fractions of the LoRA moments zeroed by the latest restart (tests check them against the ratio).
    public private(set) var lastResetFractions: (m: Double, v: Double)?

    static func checkVocabulary(_ tokens: TokenArray, _ config: LlamaConfig) throws {
        guard tokens.count > 0 else { throw ReLoRAError.invalidData("\(tokens.path) holds no tokens") }
        let lo = tokens.minValue(), hi = tokens.maxValue()
        if lo < 0 || hi >= Int64(config.vocabSize) {
            throw ReLoRAError.invalidData(
                "\(tokens.path) holds token ids in [\(lo), \(hi)] but the model's vocabulary is [0, \(config.vocabSize)); tokenize with the matching tokenizer or fix vocab_size")
        }
    }

    /// Runs until `recipe.steps` (or a stop request). Returns a summary.
    /// `master_copies: file`: the CPU backend maps the master copies from files in the run directory, after
    /// checking that its file system has room for them (one sentence if not, before anything is allocated).
    static func mapMasterCopies(_ recipe: Recipe, config: LlamaConfig, backend: Backend) throws {
        guard let host = backend as? HostFileBacking else {
            throw ReLoRAError.invalidConfig("'master_copies' 'file' is for the cpu device; on \(backend.name) the master copies live in pinned host memory: drop the key or set it to 'ram'")
        }
        try Files.createDirectory(recipe.runDir)
        let needed = try MemoryPlanner.plan(recipe, config: config, device: .cpu).report.hostPeakTotal
        var fs = statvfs()
        if statvfs(recipe.runDir, &fs) == 0 {
            let free = Int(fs.f_bavail) * Int(fs.f_frsize)
            guard free >= needed else {
                throw ReLoRAError.invalidConfig("'master_copies' 'file' needs \(formatBytes(needed)) in \(recipe.runDir), which has \(formatBytes(free)) free; free space there, choose another run_dir, or use 'ram'")
            }
        }
        host.hostFileDirectory = recipe.runDir
    }

    public func run() throws -> TrainingSummary {
        let r = recipe
        let trainable = optimizer.parameters.reduce(0) { $0 + $1.value.count }
        log("model \(r.model): \(model.config.parameterCount) parameters, \(trainable) trained (mode \(r.mode.rawValue)); \(r.tokensPerStep) tokens/step "
            + "(\(r.microBatch) x \(r.seqLen) x \(r.gradAccum)); steps \(state.step)..<\(r.steps)")
        if r.optimizerStates == .int8 {
            let eight = optimizer.parameters.indices.filter { optimizer.eightBit[$0] != nil }
            let entries = eight.reduce(0) { $0 + optimizer.parameters[$1].value.count }
            log("Adam moments: 8-bit (blockwise) for \(eight.count) of \(optimizer.parameters.count) tensors (\(entries) of \(trainable) "
                + "parameters), f32 for the tensors under \(BlockwiseMoments.minimumCount) entries")
        }
        logSampler()
        var lastLoss = Double.nan, lastVal: Double? = nil, lastCheckpoint: String? = nil
        var stoppedEarly = false
        var eta = ETAEstimator(total: r.steps)  // wall time per step, evaluations and checkpoints included
        eta.record(done: state.step, at: monotonicSeconds())
        while state.step < r.steps {
            let metrics = try trainStep()
            eta.record(done: state.step, at: monotonicSeconds())
            lastLoss = metrics.loss
            if history.count == 1 {
                var text = "memory by tag after the first step:\n" + model.backend.ledger.report().formatted()
                    + "\nhost<->device transfers in that step: \(lastStepTransfers.uploads) up, \(lastStepTransfers.downloads) down"
                if let device = model.backend as? DeviceBackend {
                    text += "\n" + device.memorySummary() + (plannedPeak.map { "; planned peak \(formatBytes($0))" } ?? "")
                }
                log(text)
            }
            if (state.step) % r.logEvery == 0 || state.step == r.steps || metrics.skipped {
                log(format(metrics, secondsLeft: eta.secondsRemaining))
            }
            try appendMetrics(metricsJSON(metrics))
            logEpochs(ofStep: state.step - 1)
            // Restart right after the step t = k*R (k >= 1), whose learning rate the jagged schedule made 0;
            // its console and metrics lines follow that step's.
            if recipe.mode == .relora, let r = recipe.reloraEvery, state.step - 1 >= r, (state.step - 1) % r == 0 {
                try restart()
            }
            if metrics.skipped {
                let allowed = max(2.0, r.maxSkippedFraction * Double(state.step))
                if Double(state.skippedSteps) > allowed {
                    lastCheckpoint = try saveCheckpoint()
                    throw ReLoRAError.invalidData(
                        "\(state.skippedSteps) of \(state.step) steps had a non-finite loss or gradient (allowed: \(Int(allowed))); lower lr or check the data. Last good state saved at \(lastCheckpoint!)")
                }
            }
            if state.step % r.evalEvery == 0 || state.step == r.steps, valTokens != nil {
                lastVal = try evaluate()
            }
            if state.step % r.checkpointEvery == 0 || state.step == r.steps {
                lastCheckpoint = try saveCheckpoint()
            }
            if shouldStop() && state.step < r.steps {
                if lastCheckpoint?.hasSuffix(TrainingCheckpoint.name(step: state.step)) != true {
                    lastCheckpoint = try saveCheckpoint()
                }
                log("interrupted: checkpoint saved; continue with `relora train --resume \(r.runDir)`")
                stoppedEarly = true
                break
            }
        }
        return TrainingSummary(steps: state.step, skippedSteps: state.skippedSteps, lastLoss: lastLoss,
                               lastValLoss: lastVal, checkpoint: lastCheckpoint, stoppedEarly: stoppedEarly)
    }

    /// One optimizer step over `grad_accum` micro-batches (no logging, evaluation or checkpoint).
    public func trainStep() throws -> StepMetrics {
        let r = recipe
        let peak = peakFLOPs
        let start = DispatchTime.now().uptimeNanoseconds
        let transfersBefore = model.backend.ledger.transferCount
        defer { lastStepTransfers = model.backend.ledger.transferCount - transfersBefore }
        let tokensInStep = r.tokensPerStep
        let lr = r.lr * schedule.multiplier(step: state.step)
        let step = state.step
        let (loss, norm, skipped) = try Self.optimizerStep(model: model, optimizer: optimizer, recipe: r, step: step, lr: lr) { micro in
            sampler.batch(step: step, micro: micro, microBatch: r.microBatch)
        }
        if skipped {
            state.skippedSteps += 1
        } else {
            state.optimizerStep = optimizer.stepCount
        }
        state.step += 1
        state.tokensSeen += tokensInStep
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        let metrics = StepMetrics(step: state.step, loss: loss, lr: lr, gradNorm: norm,
                                  tokensPerSecond: Double(tokensInStep) / seconds, milliseconds: seconds * 1000,
                                  memoryBytes: model.backend.ledger.report().liveTotal, skipped: skipped,
                                  mfu: peak.map { stepFLOPs / seconds / $0 })
        history.append(metrics)
        return metrics
    }

    /// The backend work of one optimizer step, shared by the trainer and the memory planner: zero the
    /// gradients, forward+backward over `recipe.gradAccum` micro-batches (`batch(micro)` gives each
    /// one's inputs and targets), the global gradient norm, clipping and the AdamW update (skipped when
    /// the loss or the norm is not finite). Returns the mean loss, the norm and whether it was skipped.
    static func optimizerStep(model: LlamaModel, optimizer: AdamW, recipe r: Recipe, step: Int, lr: Double,
                              batch: (Int) -> ([Int32], [Int32])) throws -> (loss: Double, norm: Double, skipped: Bool) {
        model.zeroGradients()
        model.dropoutStep = step
        let tokensInStep = r.tokensPerStep
        var lossSum = 0.0
        for micro in 0..<r.gradAccum {
            let (inputs, targets) = batch(micro)
            let l = try model.forwardBackward(inputs: inputs, targets: targets, batch: r.microBatch, seqLen: r.seqLen,
                                              gradScale: 1 / Float(tokensInStep))
            lossSum += l.sum
        }
        let loss = lossSum / Double(tokensInStep)
        let norm = optimizer.gradientNorm()
        let skipped = !loss.isFinite || !norm.isFinite
        if !skipped {
            if r.gradClip > 0 && norm > r.gradClip { optimizer.scaleGradients(by: Float(r.gradClip / norm)) }
            optimizer.step(lr: Float(lr))
        }
        return (loss, norm, skipped)
    }

    func evaluate() throws -> Double {
        guard let val = valTokens else { return .nan }
        let start = Date()
        let windows = max(1, recipe.evalTokens / recipe.seqLen)
        let result = try Evaluator.evaluate(model: model, tokens: val, seqLen: recipe.seqLen, batch: recipe.microBatch,
                                            maxWindows: windows)
        log(String(format: "eval step %d | val loss %.4f | val ppl %.2f | %d tokens | %.1f s", state.step, result.loss,
                   result.perplexity, result.tokens, Date().timeIntervalSince(start)))
        try appendMetrics(String(format: "{\"step\":%d,\"val_loss\":%.6f,\"val_perplexity\":%.4f,\"val_tokens\":%d}",
                                 state.step, result.loss, result.perplexity, result.tokens))
        return result.loss
    }

    func saveCheckpoint() throws -> String {
        let start = Date()
        let path = try TrainingCheckpoint.save(runDir: recipe.runDir, state: state, model: model,
                                               moments: optimizer.checkpointMoments, recipe: recipe.jsonObject(),
                                               keep: recipe.keepCheckpoints)
        let seconds = Date().timeIntervalSince(start)
        if let size = try? TrainingCheckpoint.footprint(path) {
            log(String(format: "checkpoint %@ (%.1f s, %@ = %.2fx of bf16 %@)", path, seconds, formatBytes(size.bytes),
                       size.ratio, formatBytes(size.bf16Bytes)))
        } else {
            log(String(format: "checkpoint %@ (%.1f s)", path, seconds))
        }
        return path
    }

    /// The console line of a step; `secondsLeft` (the ETA) is printed as h:mm:ss.
    func format(_ m: StepMetrics, secondsLeft: Double? = nil) -> String {
        if m.skipped {
            return String(format: "step %d/%d | SKIPPED: non-finite loss %.4g or grad norm %.4g (%d skipped so far)",
                          m.step, recipe.steps, m.loss, m.gradNorm, state.skippedSteps)
        }
        return String(format: "step %d/%d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | %.0f ms | mem %@", m.step,
                      recipe.steps, m.loss, m.lr, m.gradNorm, m.tokensPerSecond, m.milliseconds, formatBytes(m.memoryBytes))
            + (m.mfu.map { String(format: " | mfu %.1f%%", 100 * $0) } ?? "") + " | eta " + formatDuration(secondsLeft)
    }

    func metricsJSON(_ m: StepMetrics) -> String {
        // Non-finite numbers are not JSON: write them as null.
        func num(_ x: Double) -> String { x.isFinite ? String(format: "%.6g", x) : "null" }
        // The loss is written with all 17 significant digits so runs can be compared bit for bit.
        let loss = m.loss.isFinite ? String(format: "%.17g", m.loss) : "null"
        return "{\"step\":\(m.step),\"loss\":\(loss),\"lr\":\(num(m.lr)),\"grad_norm\":\(num(m.gradNorm)),"
            + "\"tokens_per_second\":\(num(m.tokensPerSecond)),\"ms\":\(num(m.milliseconds)),"
            + "\"memory_bytes\":\(m.memoryBytes),\"skipped\":\(m.skipped)"
            + (m.mfu.map { ",\"mfu\":\(num($0))" } ?? "") + "}"
    }

    func appendMetrics(_ line: String) throws {
        let data = Data((line + "\n").utf8)
        if let handle = FileHandle(forWritingAtPath: metricsPath) {
            defer { try? handle.close() }
            try handle.seekToEnd()
            try handle.write(contentsOf: data)
        } else {
            guard FileManager.default.createFile(atPath: metricsPath, contents: data) else {
                throw ReLoRAError.invalidFile(path: metricsPath, reason: "cannot write the metrics file")
            }
        }
        try tensorBoard?.write(metricsLine: line)
    }

    /// After a resume, drop metric lines of steps that will be redone.
    func truncateMetrics(after step: Int) throws {
        guard let text = try? String(contentsOfFile: metricsPath, encoding: .utf8) else { return }
        let kept = text.split(separator: "\n").filter { line in
            guard let d = try? JSONDecoder().decode([String: JSONValue].self, from: Data(line.utf8)),
                  case .number(let s)? = d["step"] else { return false }
            return Int(s) <= step
        }
        try writeFileAtomically(Data((kept.joined(separator: "\n") + (kept.isEmpty ? "" : "\n")).utf8), to: metricsPath)
    }
}
