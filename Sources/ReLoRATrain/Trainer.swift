import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint

public struct TrainingSummary: Sendable {
    public var steps: Int
    public var skippedSteps: Int
    public var lastLoss: Double
    public var lastValLoss: Double?
    public var checkpoint: String?
    public var stoppedEarly: Bool
}

/// The training loop: micro-batches, gradient clipping, AdamW, the learning-rate schedule, ReLoRA
/// restarts, periodic evaluation and checkpoints. Deterministic: with the same recipe and backend, a run
/// resumed from a checkpoint produces bit-identical losses to an uninterrupted one.
///
/// Its parts, in the order a run meets them: `RunSetup` (RunSetup.swift) reads and checks everything
/// before anything is allocated or written; `TrainingModel.build` makes the model and optimizer (the memory
/// planner builds them the same way); `startingState` resumes, warm-starts (WarmStart.swift) or
/// initialises; `run` is the loop, `trainStep` one step; `MetricsLog` (MetricsLog.swift) writes
/// metrics.jsonl and the TensorBoard events.
public final class Trainer {
    /// The recipe as given, with `sampler` resolved (see `Recipe.sampler`).
    public let recipe: Recipe
    public let model: LlamaModel
    public let optimizer: AdamW
    public internal(set) var state: TrainingState
    let sampler: TrainingSampler
    let valTokens: TokenArray?
    let schedule: LRSchedule
    let log: (String) -> Void
    /// metrics.jsonl and the TensorBoard events; nil on ranks other than 0, which write nothing.
    let metrics: MetricsLog?
    /// The run's processes (`SingleProcess` unless data-parallel). Every rank trains the same model on its
    /// share of each step's micro-batches; rank 0 alone prints, writes metrics and saves checkpoints.
    public let communicator: Communicator
    /// Checked between steps; when it returns true the trainer saves a checkpoint and stops.
    public var shouldStop: () -> Bool = { false }
    /// Host<->device transfers of the latest `trainStep` (O(1): ids and targets up and the loss down per
    /// micro-batch, the gradient norm down once).
    public private(set) var lastStepTransfers = TransferCount()
    /// Every step's metrics of this process, in order (tests compare runs with it).
    public private(set) var history: [StepMetrics] = []
    /// The run's memory plan, for a run on a device (printed beside the measured figures after the first step).
    public let memoryPlan: MemoryPlan?
    /// The plan's peak of tensor bytes (the ledger's), for a run on a device.
    public var plannedPeak: Int? { memoryPlan?.report.peakTotal }

    /// How restarts merge: the recipe's `merge_policy` (default `exact` for dense weights, `rtn` for quantized ones).
    var mergePolicy: MergePolicy { recipe.effectiveMergePolicy.policy }

    /// FLOPs of one step, for MFU (`ModelFLOPs.perStep`).
    let stepFLOPs: Double
    /// The backend's peak FLOP/s, measured (CPU: sgemm, once per process) before the first step is timed.
    public private(set) lazy var peakFLOPs: Double? = PeakFLOPs.peak(for: model.backend)

    /// `relora train --profile N`: `run` profiles op by op the N steps after its first (TrainerProfile.swift).
    public var profileSteps = 0
    /// The profile being taken (`startProfile`), nil when none.
    var profiling: ProfileSession?
    /// The per-op profile of the latest `startProfile`, once its steps ran.
    public internal(set) var profile: StepProfile?

    /// Starts a new run (`resume == false`: the run directory must not hold checkpoints yet) or continues
    /// the latest checkpoint of `recipe.runDir`. `backend` defaults to the recipe's `device`. Under a
    /// `communicator` of W ranks every rank makes its own Trainer with the same recipe; `log` is called on
    /// rank 0 only.
    public init(recipe: Recipe, resume: Bool, backend: Backend? = nil, communicator: Communicator = SingleProcess(),
                log: @escaping (String) -> Void) throws {
        let log = communicator.rank == 0 ? log : { _ in }
        let setup = try RunSetup(recipe: recipe, resume: resume, worldSize: communicator.worldSize)
        setup.notes.forEach(log)
        let recipe = setup.recipe
        let backend = try backend ?? BackendFactory.make(Device(parsing: recipe.device))
        self.recipe = recipe
        self.log = log
        self.communicator = communicator
        sampler = setup.sampler
        valTokens = setup.valTokens
        schedule = recipe.schedule
        memoryPlan = try setup.prepare(backend, rank: communicator.rank, log: log)
        var built = recipe  // with reuse_dequantized as the plan settled it (`MemoryPlanner.plan`)
        if let plan = memoryPlan { built.reuseDequantized = plan.reusesDequantizedWeights }
        (model, optimizer) = TrainingModel.build(built, config: setup.config, backend: backend, rank: communicator.rank,
                                                 worldSize: communicator.worldSize)
        stepFLOPs = ModelFLOPs.perStep(config: setup.config, recipe: recipe)
        state = try Self.startingState(setup, model: model, optimizer: optimizer, log: log)
        model.dropoutKey.keying = state.dropoutKeys
        if communicator.rank == 0 {
            if setup.resumePoint == nil { try setup.createRunDirectory() } else { try setup.writeRecipe() }
            metrics = try MetricsLog(runDir: recipe.runDir, resumeStep: setup.resumePoint == nil ? nil : state.step)
        } else {
            metrics = nil
        }
        if communicator.worldSize > 1 {
            log("data parallel: \(communicator.worldSize) ranks (\(communicator.engine)), each \(recipe.gradAccum / communicator.worldSize) of the step's \(recipe.gradAccum) micro-batches")
            if let shards = optimizer.shards { log(shards.summary) }
            try checkRanksAgree(at: "the start")
        } else if recipe.shardOptimizer {
            log("note: shard_optimizer has no effect in a run of one process (it shares the optimizer state among data-parallel ranks)")
        }
    }

    /// The state a run starts from, with the model's and optimizer's tensors set: the checkpoint a resume
    /// continues; else the recipe's warm start or a random initialisation, then fresh LoRA factors. The
    /// optimizer's f32 master copies come from the checkpoint where it holds them, else from the working values.
    static func startingState(_ setup: RunSetup, model: LlamaModel, optimizer: AdamW,
                              log: @escaping (String) -> Void) throws -> TrainingState {
        let recipe = setup.recipe
        if let path = setup.resumePoint {
            var restored = Set<String>()
            let state = try TrainingCheckpoint.load(path, into: model, moments: optimizer.checkpointMoments,
                                                    restoredMaster: { restored.insert($0) })
            optimizer.refreshMasterCopies { !restored.contains($0.name) }
            optimizer.stepCount = state.optimizerStep
            guard state.seed == recipe.seed else {
                throw ReLoRAError.invalidData("the checkpoint was made with seed \(state.seed) but the recipe says \(recipe.seed)")
            }
            if state.dropoutKeys != .current, (recipe.loraConfig?.dropout ?? 0) > 0 {
                log("note: this run keys its LoRA dropout masks per step (it began before masks were keyed per micro-batch), and keeps doing so to stay reproducible")
            }
            log("resumed from \(path) at step \(state.step)")
            return state
        }
        var state: TrainingState
        if let warm = recipe.warmStart {
            state = try warmStart(from: warm, model: model, optimizer: optimizer, seed: recipe.seed, log: log)
            log("warm start from \(warm) at step \(state.step)")
            guard state.step < recipe.steps else {
                throw ReLoRAError.invalidConfig("the warm start is at step \(state.step), but the recipe ends at step \(recipe.steps)")
            }
        } else {
            try model.weights.initializeRandom(seed: recipe.seed, std: Float(recipe.initStd), backend: model.backend)
            state = TrainingState(step: 0, optimizerStep: 0, skippedSteps: 0, tokensSeen: 0, seed: recipe.seed)
        }
        model.initializeLoRA(seed: recipe.seed)
        optimizer.refreshMasterCopies()
        if model.loraConfig != nil { state.loraMerges = 0 }
        state.sampler = recipe.sampler!.stateName
        return state
    }

    /// Runs until `recipe.steps` (or a stop request). Returns a summary.
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
        try checkProfileFits()
        while state.step < r.steps {
            if history.count == 1 && profileSteps > 0 { try startProfile(steps: profileSteps) }  // after a warm-up step
            let metrics = try trainStep()
            eta.record(done: state.step, at: monotonicSeconds())
            lastLoss = metrics.loss
            if history.count == 1 {
                var text = "memory by tag after the first step:\n" + model.backend.ledger.report().formatted()
                    + "\nhost<->device transfers in that step: \(lastStepTransfers.uploads) up, \(lastStepTransfers.downloads) down"
                if let device = model.backend as? DeviceBackend {
                    text += "\n" + device.memorySummary() + (memoryPlan.map { "\n" + Self.plannedMemoryLine($0) } ?? "")
                }
                log(text)
            }
            if (state.step) % r.logEvery == 0 || state.step == r.steps || metrics.skipped {
                log(format(metrics, secondsLeft: eta.secondsRemaining))
            }
            try self.metrics?.append(metrics)
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
            if state.step % r.evalEvery == 0 || state.step == r.steps, valTokens != nil, communicator.rank == 0 {
                lastVal = try evaluate()
            }
            if state.step % r.checkpointEvery == 0 || state.step == r.steps {
                lastCheckpoint = try saveCheckpoint()
            }
            if try stopRequested() && state.step < r.steps {
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

    /// The plan's figures to read beside `DeviceBackend.memorySummary()` after the first step: the allocator's
    /// in-use and reserved peaks at that point (the same policy over the same allocations, so equal to the
    /// measured ones), then over the whole plan (a restart included), and the device total with the
    /// estimated CUDA context, cuBLAS workspace and NCCL buffers (about what `cudaMemGetInfo` shows used with
    /// the device to itself).
    static func plannedMemoryLine(_ plan: MemoryPlan) -> String {
        guard let cuda = plan.cuda else { return "planned peak \(formatBytes(plan.report.peakTotal))" }
        let first = cuda.afterFirstStep, all = cuda.allocator
        let estimates = cuda.gpu.emulated ? " (the emulation has no CUDA context, cuBLAS workspace or NCCL buffers)"
            : " with the estimated CUDA context (\(formatBytes(cuda.context))) and cuBLAS workspace (\(formatBytes(cuda.cublasWorkspace)))"
                + (cuda.nccl > 0 ? " and NCCL buffers (\(formatBytes(cuda.nccl)))" : "")
        return "planned: allocator peak \(formatBytes(first.peakInUse)) in use, \(formatBytes(first.peakReserved)) reserved "
            + "(\(first.mallocCalls) cudaMalloc) after the first step; with a restart \(formatBytes(all.peakReserved)) reserved; "
            + "device total \(formatBytes(cuda.total))" + estimates
    }

    /// One optimizer step over `grad_accum` micro-batches (no logging, evaluation or checkpoint).
    public func trainStep() throws -> StepMetrics {
        let r = recipe
        let peak = peakFLOPs
        let profiler = beginProfiledStep()
        let start = DispatchTime.now().uptimeNanoseconds
        let transfersBefore = model.backend.ledger.transferCount
        defer { lastStepTransfers = model.backend.ledger.transferCount - transfersBefore }
        let tokensInStep = r.tokensPerStep
        let lr = r.lr * schedule.multiplier(step: state.step)
        let step = state.step
        let (loss, norm, skipped, communication) = try Self.optimizerStep(model: model, optimizer: optimizer, recipe: r, step: step,
                                                                          lr: lr, communicator: communicator) { micro in
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
        if let profiler { endProfiledStep(profiler) }
        let metrics = StepMetrics(step: state.step, loss: loss, lr: lr, gradNorm: norm,
                                  tokensPerSecond: Double(tokensInStep) / seconds, milliseconds: seconds * 1000,
                                  memoryBytes: model.backend.ledger.report().liveTotal, skipped: skipped,
                                  mfu: peak.map { stepFLOPs / Double(communicator.worldSize) / seconds / $0 },
                                  communicationMilliseconds: communicator.worldSize > 1 ? communication * 1000 : nil)
        history.append(metrics)
        return metrics
    }

    /// The backend work of one optimizer step, shared by the trainer and the memory planner: zero the
    /// gradients, forward+backward over this rank's micro-batches of the step (`batch(micro)` gives the
    /// inputs and targets of global micro-batch `micro`), the sum of the trained gradients over the ranks,
    /// the global gradient norm, clipping and the AdamW update (skipped when the loss or the norm is not
    /// finite). Returns the mean loss, the norm, whether it was skipped and the seconds spent in collectives.
    /// A sharded optimizer (`shard_optimizer`) updates this rank's tensors, then `shareUpdatedValues` gives
    /// every rank all the updated working copies; every rank has every summed gradient, so all compute the
    /// same norm and clip alike.
    ///
    /// Rank r of W runs micro-batches r, r + W, r + 2W, ... of the step's `grad_accum` (W divides it), each
    /// scaled by the step's global token count, so the summed gradients are the mean over the step's tokens
    /// for any W. The loss is the sum of the per-micro-batch losses in micro-batch order, gathered from the
    /// ranks: the same bits for any W.
    ///
    /// Host waits on a device (single process): none until the gradient norm, whose read-back is the step's one
    /// synchronization; the micro-batches' token uploads and losses travel through pinned staging memory
    /// (`enqueueForwardBackward`), and their losses are read after the norm, when their copies have run.
    static func optimizerStep(model: LlamaModel, optimizer: AdamW, recipe r: Recipe, step: Int, lr: Double,
                              communicator: Communicator = SingleProcess(),
                              batch: (Int) -> ([Int32], [Int32])) throws
        -> (loss: Double, norm: Double, skipped: Bool, communicationSeconds: Double) {
        optimizer.zeroGradients()  // the model's trained gradients, in one launch on a device
        let tokensInStep = r.tokensPerStep
        let w = communicator.worldSize, mine = Array(stride(from: communicator.rank, to: r.gradAccum, by: w))
        // On a device engine each block's gradients start their sum as soon as the block's backward of this
        // rank's last micro-batch is enqueued, overlapping the backward of the blocks below.
        let device = w > 1 ? deviceCollectives(communicator, optimizer.backend) : nil
        let groups = device.map { _ in GradientGroups(optimizer.parameters, layers: model.config.numHiddenLayers) }
        var overlapFailure: Error?
        defer { model.afterBlockBackward = nil }
        var losses: [DeferredSum] = []
        for (i, micro) in mine.enumerated() {
            let (inputs, targets) = batch(micro)
            model.dropoutKey.step = step
            model.dropoutKey.microBatch = step * r.gradAccum + micro
            if let device, let groups, i == mine.count - 1 {
                model.afterBlockBackward = { layer in
                    guard overlapFailure == nil else { return }
                    do { try device.startSum(groups.blocks[layer], on: optimizer.backend) } catch { overlapFailure = error }
                }
            }
            let l = try model.enqueueForwardBackward(inputs: inputs, targets: targets, batch: r.microBatch, seqLen: r.seqLen,
                                                     gradScale: 1 / Float(tokensInStep))
            losses.append(l.sum)
        }
        model.afterBlockBackward = nil
        var lossSum = 0.0, communication = 0.0
        if w > 1 {
            // What the backward did not hide: the rest of the sums, then the losses (the sums waited for the backward,
            // hence for the losses' copies enqueued before it).
            let start = monotonicSeconds()
            let span = optimizer.backend.profiler?.begin(.reduction, OpCost(flops: 0, bytes: 0))  // no link peaks: no prediction
            defer { span?.end() }
            if let device, let groups {
                if let overlapFailure { throw overlapFailure }
                try device.startSum(groups.rest, on: optimizer.backend)
                try device.finishSums()
            } else {
                try sumGradients(optimizer, communicator)
            }
            let all = try communicator.allGather(losses.map(\.value))  // all[q][i] is micro-batch q + i W
            for micro in 0..<r.gradAccum { lossSum += all[micro % w][micro / w] }
            communication = monotonicSeconds() - start
        }
        let norm = optimizer.gradientNorm(clip: r.gradClip)  // the clip factor stays with the optimizer (on the device)
        if w == 1 {  // after the norm's read-back, the step's one wait: the losses' copies, enqueued before it, have run
            for l in losses { lossSum += l.value }
        }
        let loss = lossSum / Double(tokensInStep)
        let skipped = !loss.isFinite || !norm.isFinite
        if !skipped {
            optimizer.step(lr: Float(lr))
            if optimizer.shards != nil && w > 1 {  // each rank updated its own tensors: all get every update
                let start = monotonicSeconds()
                let span = optimizer.backend.profiler?.begin(.reduction, OpCost(flops: 0, bytes: 0))
                defer { span?.end() }
                try shareUpdatedValues(optimizer, communicator)
                communication += monotonicSeconds() - start
            }
        }
        return (loss, norm, skipped, communication)
    }

    /// The communicator's device collectives when they serve `backend`, else nil (sums through the host).
    static func deviceCollectives(_ communicator: Communicator, _ backend: Backend) -> DeviceCollectives? {
        (communicator as? DeviceCollectives).flatMap { $0.serves(backend) ? $0 : nil }
    }

    /// The trained gradients by the block whose backward finishes them (`model.layers.N.` in the name), and
    /// the rest (embedding, final norm, head), which the backward finishes last.
    struct GradientGroups {
        var blocks: [[Tensor]]
        var rest: [Tensor] = []
        init(_ parameters: [AdamW.Parameter], layers: Int) {
            blocks = Array(repeating: [], count: layers)
            for p in parameters {
                if p.name.hasPrefix("model.layers."), let layer = Int(p.name.dropFirst("model.layers.".count).prefix { $0 != "." }),
                   layer < layers {
                    blocks[layer].append(p.grad)
                } else {
                    rest.append(p.grad)
                }
            }
        }
    }

    /// The largest gradient bucket summed through the host at once (floats): 4 Mi floats, 16 MiB.
    static let gradientBucket = 1 << 22

    /// Sums every trained gradient over the ranks in rank order: on the device when the communicator serves
    /// the backend (NCCL on CUDA), else through host copies (`Communicator.sumInRankOrder`) in buckets of
    /// whole tensors (a tensor larger than a bucket goes alone). Both give the same bits.
    static func sumGradients(_ optimizer: AdamW, _ communicator: Communicator) throws {
        let backend = optimizer.backend
        if let device = deviceCollectives(communicator, backend) {
            try device.startSum(optimizer.parameters.map(\.grad), on: backend)
            try device.finishSums()
            return
        }
        var bucket: [Float] = [], members: [Tensor] = []
        func flush() throws {
            guard !members.isEmpty else { return }
            try communicator.sumInRankOrder(&bucket)
            var offset = 0
            for g in members {
                backend.upload(Array(bucket[offset ..< offset + g.count]), to: g)
                offset += g.count
            }
            bucket.removeAll(keepingCapacity: true)
            members.removeAll()
        }
        for p in optimizer.parameters {
            if !members.isEmpty && bucket.count + p.grad.count > gradientBucket { try flush() }
            bucket += backend.download(p.grad)
            members.append(p.grad)
        }
        try flush()
    }

    func evaluate() throws -> Double {
        guard let val = valTokens else { return .nan }
        let start = Date()
        let windows = max(1, recipe.evalTokens / recipe.seqLen)
        let result = try Evaluator.evaluate(model: model, tokens: val, seqLen: recipe.seqLen, batch: recipe.microBatch,
                                            maxWindows: windows)
        log(String(format: "eval step %d | val loss %.4f | val ppl %.2f | %d tokens | %.1f s", state.step, result.loss,
                   result.perplexity, result.tokens, Date().timeIntervalSince(start)))
        try metrics?.append(EvalMetrics(step: state.step, valLoss: result.loss, valPerplexity: result.perplexity,
                                       valTokens: result.tokens))
        return result.loss
    }

    /// Saves a checkpoint (rank 0; every rank first checks that all hold the same weights) and returns its path.
    /// With a sharded optimizer the other ranks send rank 0 their tensors' moments while it writes them
    /// (`momentsForSave`, `serveMoments`): the checkpoint is the same whoever held them.
    func saveCheckpoint() throws -> String {
        if communicator.worldSize > 1 { try checkRanksAgree(at: "the checkpoint of step \(state.step)") }
        guard communicator.rank == 0 else {
            try Self.serveMoments(optimizer, communicator)
            return TrainingCheckpoint.directory(runDir: recipe.runDir) + "/" + TrainingCheckpoint.name(step: state.step)
        }
        let start = Date()
        let (moments, fetch) = Self.momentsForSave(optimizer, communicator)
        let path: String
        do {
            path = try TrainingCheckpoint.save(runDir: recipe.runDir, state: state, model: model, moments: moments,
                                               recipe: recipe.jsonObject(), keep: recipe.keepCheckpoints)
        } catch {
            throw fetch.error ?? error  // a failed collective is the cause of the short entry the writer refused
        }
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
        let communication = m.communicationMilliseconds.map { String(format: " (comm %.0f)", $0) } ?? ""
        return String(format: "step %d/%d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | %.0f ms%@ | mem %@", m.step,
                      recipe.steps, m.loss, m.lr, m.gradNorm, m.tokensPerSecond, m.milliseconds, communication,
                      formatBytes(m.memoryBytes))
            + (m.mfu.map { String(format: " | mfu %.1f%%", 100 * $0) } ?? "") + " | eta " + formatDuration(secondsLeft)
    }

    /// Merge, re-initialise and reset the LoRA optimizer state (ReLoRA restart), with a log line and a
    /// metrics line (keys in the README: `relative_update`, `merge_error`, `codes_changed` for quantized
    /// weights, `residual_recovered` under `compensate`, `merge_seconds`, `zeroed_m`, `zeroed_v`).
    func restart() throws {
        let merge = try model.mergeAdapters(policy: mergePolicy, seed: recipe.seed)
        state.loraMerges = model.merges
        let reset = try Self.resetAfterMerge(optimizer, recipe: recipe, restart: merge.restart, communicator: communicator)
        var mergeLine = String(format: "merge %@ in %.3f s: |sBA|/|W| %.4f, merge error %.2e", merge.policy, merge.seconds,
                               merge.relativeUpdate, merge.mergeError)
        if let changed = merge.codesChanged {
            mergeLine += String(format: ", codes changed %.4f", changed)
        }
        if let recovered = merge.residualRecovered {
            mergeLine += String(format: ", residual recovered %.3f", recovered)
        }
        log(String(format: "restart %d after step %d | %@ | optimizer reset %@: zeroed %.4f of m, %.4f of v",
                   merge.restart + 1, state.step, mergeLine, reset.description, reset.m, reset.v))
        try metrics?.append(RestartMetrics(step: state.step, restart: merge.restart + 1, merge: merge, zeroedM: reset.m, zeroedV: reset.v))
        lastResetFractions = (reset.m, reset.v)
        if communicator.worldSize > 1 { try checkRanksAgree(at: "restart \(merge.restart + 1)") }
    }

    /// Whether to stop after this step: `shouldStop` on any rank stops every rank (a signal may reach the
    /// ranks between different steps; they must still leave the loop after the same one).
    func stopRequested() throws -> Bool {
        guard communicator.worldSize > 1 else { return shouldStop() }
        return try communicator.allGather([UInt8(shouldStop() ? 1 : 0)]).contains { $0[0] != 0 }
    }

    /// A hash of every weight the run holds (frozen or quantized base weights and their master copies,
    /// dense trained tensors, LoRA factors), from this rank's device.
    func weightsHash() -> UInt64 {
        let b = model.backend
        var tensors: [Tensor] = []
        for (_, slot) in model.weights.slots() {
            tensors.append(slot.storage)
            if let master = slot.quantized?.master { tensors.append(master) }
        }
        tensors += model.loraTensors().map(\.value)
        let hashes: [UInt64] = tensors.map { t in b.downloadRaw(t).withUnsafeBytes { contentHash64($0) } }
        return hashes.withUnsafeBytes { contentHash64($0) }
    }

    /// Every rank must hold the same weights (the same updates from the same summed gradients, the same
    /// merges from the same counter-based RNG): compared by hash at the start, every restart and every
    /// checkpoint. A difference stops the run naming the ranks.
    func checkRanksAgree(at moment: String) throws {
        let hashes = try communicator.allGather([weightsHash()]).map { $0[0] }
        guard Set(hashes).count > 1 else { return }
        let groups = Dictionary(grouping: hashes.indices, by: { hashes[$0] }).values.sorted { $0[0] < $1[0] }
        let text = groups.map { "ranks \($0.map(String.init).joined(separator: ","))" }.joined(separator: " vs ")
        throw ReLoRAError.invalidData(
            "the ranks' weights differ at \(moment) (\(text)); the run stops rather than train diverging copies: resume from the last checkpoint, and report it if it happens again")
    }

    /// ReLoRA's optimizer reset after merge `restart`: the recipe's `optimizer_reset`, except under merge
    /// policy `compensate`, whose new A and B are unrelated to the old moments: theirs are zeroed (a
    /// trained scale's follow the recipe). Returns what was done and the fractions of LoRA moments zeroed
    /// (over all ranks' tensors when the optimizer is sharded: each rank resets its own).
    ///
    /// The merge gave A and B new working values: their master copies (bf16 working copies on CUDA) are
    /// refreshed from them, or the next update would run on the old factors and write them back.
    static func resetAfterMerge(_ optimizer: AdamW, recipe: Recipe, restart: Int,
                                communicator: Communicator = SingleProcess()) throws -> (description: String, m: Double, v: Double) {
        optimizer.refreshMasterCopies { $0.loraFactor == .a || $0.loraFactor == .b }
        let mode = recipe.optimizerReset, ratio = recipe.optimizerResetRatio
        let description: String, counts: AdamW.ResetCounts
        if recipe.effectiveMergePolicy == .compensate {
            counts = optimizer.resetLoRAMomentCounts(seed: recipe.seed, restart: restart) { p in
                p.loraFactor == .scale ? mode.reset(for: .scale, ratio: ratio) : .zero
            }
            description = "full for A and B (compensate)"
        } else {
            counts = optimizer.resetLoRAMomentCounts(seed: recipe.seed, restart: restart) { mode.reset(for: $0.loraFactor ?? .b, ratio: ratio) }
            description = String(format: "%@ %.2f", mode.rawValue, ratio)
        }
        let (m, v) = try sumOverRanks(counts, optimizer, communicator).fractions
        return (description, m, v)
    }

    /// Fractions of the LoRA moments zeroed by the latest restart (tests check them against the ratio).
    public private(set) var lastResetFractions: (m: Double, v: Double)?

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
}
