import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAFormats
@testable import ReLoRAModel
@testable import ReLoRATrain

/// What a training step costs the device beyond its math, counted by the kernel emulation
/// (`CUDALibrary.emulationCounters`: launches, host synchronizations, cudaMalloc calls, memsets and copies) and
/// by the backend's pinned staging (`PinnedStaging`: host allocations, event waits), for two models that differ
/// only in their number of layers, hence of trained tensors, and for 2 and 4 micro-batches a step (G):
/// - the optimizer phase (`gradientNorm` with clipping on, then `step`) launches the same number of kernels
///   for both: 3 for the norm, 1 per kind of moments kept (f32, 8-bit), so at most 5;
/// - zeroing the gradients (`AdamW.zeroGradients`, the start of a step) is one launch and no memset for both;
/// - a whole step synchronizes once, whatever G: the norm's read-back. Its other transfers (per micro-batch the
///   ids and targets up and the losses down) are asynchronous copies through pinned staging; the losses are
///   read after the norm, when their copies have run, and no upload waits for a staging region (no event wait);
/// - its memsets do not grow with the trained tensors either (one a micro-batch: the residual's gradient);
/// - after the first step and the first restart (which meet every shape the run has), neither steps nor
///   restarts call cudaMalloc nor allocate pinned staging memory: the caching allocator, the ops' scratch and
///   the staging cover them.
/// Before: the per-tensor optimizer launched 2 (norm) + 1 (scale) + 1 (adamw) + 1 (bf16 copy) kernels per trained
/// tensor; a step synchronized 3 G + 1 times (each token upload and each loss read-back waited) and zeroed the
/// gradients with a memset per trained tensor (`LlamaModel.zeroGradients`), so the step's memsets grew with them.
final class CUDAStepBudgetTests: XCTestCase {
    struct Measured {
        var tensors = 0
        var optimizer = CUDALibrary.EmulationCounters()
        var zeroing = CUDALibrary.EmulationCounters()
        var step = CUDALibrary.EmulationCounters()
        var laterMallocs: UInt64 = 0
        var laterStagingAllocations = 0, stagingWaits = 0
    }

    func measure(library: CUDALibrary, layers: Int, mode: TrainingMode, states: OptimizerStates, hidden: Int,
                 gradAccum: Int = 2) throws -> Measured {
        let d = try TrainerTests.makeByteData(hidden: hidden, layers: layers)
        let r = TrainerTests.recipe(d, run: "budget-\(mode)-\(states)-\(layers)-\(gradAccum)") {
            $0.mode = mode; $0.optimizerStates = states; $0.device = "cuda"; $0.valData = nil
            $0.steps = 6; $0.warmupSteps = 0; $0.checkpointEvery = 100; $0.seqLen = 16; $0.microBatch = 2
            $0.gradAccum = gradAccum
            $0.gradClip = 1e-3  // every step clips: the device-side factor is exercised
            if mode != .full { $0.loraRank = 4; $0.loraAlpha = 8 }
            if mode == .relora { $0.reloraEvery = 3; $0.restartWarmup = 0 }
        }
        let backend = CUDABackend(library: library)
        let trainer = try Trainer(recipe: r, resume: false, backend: backend, log: { _ in })
        func counters() throws -> CUDALibrary.EmulationCounters { try XCTUnwrap(library.emulationCounters()) }
        var m = Measured(tensors: trainer.optimizer.parameters.count)
        _ = try trainer.trainStep()
        if mode == .relora { try trainer.restart() }
        let start = try counters()
        let (allocations, waits) = (backend.staging.hostAllocations, backend.staging.eventWaits)
        let metrics = try trainer.trainStep()
        m.step = try counters().since(start)
        XCTAssertFalse(metrics.skipped)
        XCTAssertGreaterThan(metrics.gradNorm, r.gradClip, "the step clips")
        var before = try counters()
        // The step's gradients again (as the step left them: clipped), clipped at half their norm.
        let norm = trainer.optimizer.gradientNorm(clip: r.gradClip / 2)
        trainer.optimizer.step(lr: 1e-4)
        m.optimizer = try counters().since(before)
        XCTAssertGreaterThan(norm, r.gradClip / 2, "the phase clips")
        before = try counters()
        trainer.optimizer.zeroGradients()
        m.zeroing = try counters().since(before)
        XCTAssertEqual(trainer.optimizer.gradientNorm(), 0, "every gradient zeroed")
        if mode == .relora { try trainer.restart() }
        _ = try trainer.trainStep()
        m.laterMallocs = try counters().since(start).mallocs
        m.laterStagingAllocations = backend.staging.hostAllocations - allocations
        m.stagingWaits = backend.staging.eventWaits - waits
        return m
    }

    /// An evaluation keeps one batch in flight (`Evaluator`, `LlamaModel.enqueueLoss`): its K batches wait for
    /// the device once each, at the previous batch's loss, and never for a token upload; the mean is the one
    /// the batches' immediate losses give, bit for bit.
    func testEvaluationWaitsOnceABatchAndKeepsTheLossBits() throws {
        let library = try CUDABackendTests.emulatedBackend().library
        let config = try LlamaConfig(hiddenSize: 32, intermediateSize: 72, numHiddenLayers: 2, numAttentionHeads: 4,
                                     numKeyValueHeads: 2, vocabSize: 256, maxPositionEmbeddings: 64)
        let model = LlamaModel(config: config, backend: CUDABackend(library: library))
        try model.weights.initializeRandom(seed: 3, std: 0.05, backend: model.backend)
        let seqLen = 16, batch = 2, windows = 9  // 5 batches, the last of one window
        var rng = TestRNG(17)
        let values = (0..<(windows * seqLen)).map { _ in Int64(rng.int(config.vocabSize)) }
        let path = temporaryDirectory() + "/eval.npy"
        try NpyWriter.write(tokens: values, dtype: .uint16, to: path)
        let tokens = try TokenArray(npyPath: path)
        _ = try Evaluator.evaluate(model: model, tokens: tokens, seqLen: seqLen, batch: batch)  // sizes the staging and the cache
        let before = try XCTUnwrap(library.emulationCounters())
        let result = try Evaluator.evaluate(model: model, tokens: tokens, seqLen: seqLen, batch: batch)
        let counted = try XCTUnwrap(library.emulationCounters()).since(before)
        XCTAssertLessThanOrEqual(counted.synchronizations, 5, "one wait a batch at most")
        XCTAssertEqual(counted.mallocs, 0)
        var total = 0.0, predicted = 0
        for start in stride(from: 0, to: windows, by: batch) {
            let b = min(batch, windows - start)
            var inputs: [Int32] = [], targets: [Int32] = []
            for w in start..<(start + b) {
                let window = tokens.window(w * seqLen, seqLen)
                inputs += window; targets += window.dropFirst(); targets.append(-1)
            }
            let l = try model.loss(inputs: inputs, targets: targets, batch: b, seqLen: seqLen)
            total += l.sum; predicted += l.tokens
        }
        XCTAssertEqual(result.tokens, predicted)
        XCTAssertEqual(result.loss.bitPattern, (total / Double(predicted)).bitPattern)
    }

    /// The order behind the one wait a batch: a batch's loss is read only after the next batch's forward was
    /// queued (a backend that records when each deferred loss is made and read).
    func testEvaluationQueuesTheNextBatchBeforeReadingALoss() throws {
        final class Recording: ForwardingToCPU, @unchecked Sendable {
            let inner = CPUBackend()
            var name: String { "recording-cpu" }
            var events: [String] = []
            func crossEntropyDeferred(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                                      gradScale: Float?, ld: Int) -> DeferredSum {
                let sum = inner.crossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab,
                                             gradScale: gradScale, ld: ld)
                let index = events.count { $0.hasPrefix("queued") }
                events.append("queued \(index)")
                return DeferredSum(reading: { [self] in events.append("read \(index)"); return sum })
            }
        }
        let backend = Recording()
        let config = try LlamaConfig(hiddenSize: 16, intermediateSize: 24, numHiddenLayers: 1, numAttentionHeads: 2,
                                     numKeyValueHeads: 1, vocabSize: 64, maxPositionEmbeddings: 16)
        let model = LlamaModel(config: config, backend: backend)
        try model.weights.initializeRandom(seed: 3, std: 0.05, backend: backend)
        let path = temporaryDirectory() + "/eval.npy"
        try NpyWriter.write(tokens: (0..<(5 * 8)).map { Int64($0 % 64) }, dtype: .uint16, to: path)
        _ = try Evaluator.evaluate(model: model, tokens: try TokenArray(npyPath: path), seqLen: 8, batch: 2)
        XCTAssertEqual(backend.events, ["queued 0", "queued 1", "read 0", "queued 2", "read 1", "read 2"])
    }

    func testOptimizerLaunchesAndSynchronizationsDoNotGrowWithTheTrainedTensors() throws {
        let library = try CUDABackendTests.emulatedBackend().library
        XCTAssertNotNil(library.emulationCounters(), "the emulation exports its counters")
        // Full-rank with 8-bit moments at hidden 32: the embedding and the head (256 x 32) keep 8-bit moments.
        let cases: [(TrainingMode, OptimizerStates, Int, UInt64)] = [(.relora, .f32, 32, 4), (.full, .int8, 32, 5)]
        for (mode, states, hidden, launches) in cases {
            let label = "\(mode) \(states)"
            let small = try measure(library: library, layers: 2, mode: mode, states: states, hidden: hidden)
            let large = try measure(library: library, layers: 4, mode: mode, states: states, hidden: hidden)
            XCTAssertLessThan(small.tensors, large.tensors, label)
            XCTAssertEqual(small.optimizer.launches, large.optimizer.launches, label)
            XCTAssertEqual(small.zeroing, large.zeroing, label)
            for m in [small, large] {
                print("step budget, \(label), \(m.tensors) tensors: step \(m.step); zeroing \(m.zeroing); optimizer \(m.optimizer)")
                XCTAssertEqual(m.optimizer.launches, launches, "\(label), \(m.tensors) tensors: 3 norm kernels + 1 per kind of moments")
                XCTAssertEqual(m.optimizer.synchronizations, 1, "\(label): the norm is the one value read back")
                XCTAssertEqual(m.optimizer.mallocs, 0, label)
                XCTAssertEqual(m.zeroing.launches, 1, "\(label), \(m.tensors) tensors: one zero_multi for every gradient")
                XCTAssertEqual(m.zeroing.memsets + m.zeroing.synchronizations + m.zeroing.copies, 0, label)
                XCTAssertEqual(m.step.synchronizations, 1, "\(label): 2 micro-batches, the norm the step's one host wait")
                XCTAssertEqual(m.step.memsets, 2, "\(label): the step's only memsets zero the residual's gradient, one a micro-batch")
                XCTAssertEqual(m.step.mallocs, 0, label)
                XCTAssertEqual(m.laterMallocs, 0, "\(label): steps and restarts after the first allocate nothing")
                XCTAssertEqual(m.laterStagingAllocations, 0, "\(label): the first step sized the pinned staging")
                XCTAssertEqual(m.stagingWaits, 0, "\(label): no upload waited for a staging region, no loss for its copy")
            }
            XCTAssertEqual(small.step.memsets, large.step.memsets, "\(label): no memset per trained tensor")
        }
        // G = 4 micro-batches: still one host wait a step.
        let four = try measure(library: library, layers: 2, mode: .relora, states: .f32, hidden: 32, gradAccum: 4)
        print("step budget, relora f32, G = 4: step \(four.step)")
        XCTAssertEqual(four.step.synchronizations, 1, "4 micro-batches, the norm the step's one host wait")
        XCTAssertEqual(four.step.memsets, 4)
        XCTAssertEqual(four.laterStagingAllocations + four.stagingWaits, 0)
    }

    /// Keeping each block's dequantized weights from its recompute to its backward (`reuse_dequantized`,
    /// `DequantizedBlock`) saves dequantize launches and nothing else, and changes no bit. Per micro-batch and
    /// block, without it: 7 in the forward, 6 in the recompute (which skips down's base GEMM: the block output is
    /// not needed), 7 in the backward, 20 in all; with it the backward dequantizes down only: 14. So a step of
    /// G micro-batches over L layers launches 6 L G fewer `dequantize_kernel`s (not 7 L G: down was already
    /// dequantized twice only), and every other launch is the same (the backward's GEMM runs either way). Losses,
    /// gradient norms, LoRA factors and quantized weights are the same bits over steps around a ReLoRA restart
    /// (which requantizes every weight: the slots are filled anew by each block's recompute, so nothing stale is
    /// read), for q4_0 and nf4. The measured step (after the restart) calls no cudaMalloc.
    func testReusedDequantizedWeightsSaveLaunchesAndChangeNoBit() throws {
        let library = try CUDABackendTests.emulatedBackend().library
        let layers = 2, micro = 2
        let d = try TrainerTests.makeByteData(hidden: 32, layers: layers)
        for quant in [FrozenStorage.q4_0, .nf4] {
            func train(reuse: Bool) throws -> (trainer: Trainer, dequantizes: UInt64, launches: UInt64) {
                let r = TrainerTests.recipe(d, run: "reuse-\(quant)-\(reuse)") {
                    $0.mode = .relora; $0.quant = quant; $0.checkpointing = .block; $0.reuseDequantized = reuse
                    $0.device = "cuda"; $0.valData = nil; $0.steps = 4; $0.warmupSteps = 0; $0.checkpointEvery = 100
                    $0.seqLen = 16; $0.microBatch = 2; $0.gradAccum = micro
                    $0.loraRank = 4; $0.loraAlpha = 8; $0.reloraEvery = 2; $0.restartWarmup = 0
                }
                var lines: [String] = []
                let trainer = try Trainer(recipe: r, resume: false, backend: CUDABackend(library: library), log: { lines.append($0) })
                XCTAssertEqual(trainer.model.dequantizedCacheBytes > 0, reuse, "\(quant)")
                XCTAssertEqual(lines.contains { $0.hasPrefix("reuse_dequantized: each block's dequantized weights are kept") }, reuse, "\(lines)")
                XCTAssertEqual(trainer.memoryPlan?.reusesDequantizedWeights, reuse, "\(quant)")
                _ = try trainer.trainStep()
                try trainer.restart()
                let dequantizes = try XCTUnwrap(library.emulatedLaunches(named: "dequantize_kernel"))
                let start = try XCTUnwrap(library.emulationCounters())
                _ = try trainer.trainStep()
                let since = try XCTUnwrap(library.emulationCounters()).since(start)
                let counted = (try XCTUnwrap(library.emulatedLaunches(named: "dequantize_kernel")) - dequantizes, since.launches)
                XCTAssertEqual(since.mallocs, 0, "\(quant) reuse \(reuse): the cache was allocated by the first step")
                _ = try trainer.trainStep()
                return (trainer, counted.0, counted.1)
            }
            let kept = try train(reuse: true), plain = try train(reuse: false)
            let perStep = UInt64(layers * micro)
            XCTAssertEqual(plain.dequantizes, 20 * perStep, "\(quant): forward 7, recompute 6, backward 7 per block and micro-batch")
            XCTAssertEqual(kept.dequantizes, 14 * perStep, "\(quant): the backward dequantizes down only")
            XCTAssertEqual(plain.launches - kept.launches, 6 * perStep, "\(quant): only dequantizations are saved")
            XCTAssertEqual(kept.trainer.history.map(\.loss.bitPattern), plain.trainer.history.map(\.loss.bitPattern), "\(quant)")
            XCTAssertEqual(kept.trainer.history.map(\.gradNorm.bitPattern), plain.trainer.history.map(\.gradNorm.bitPattern), "\(quant)")
            XCTAssertEqual(kept.trainer.history.count, 3)
            XCTAssertEqual(kept.trainer.weightsHash(), plain.trainer.weightsHash(), "\(quant): quantized weights and LoRA factors")
        }
    }

    /// The multi-tensor ops give the per-tensor ops' bits on the emulated device: the norm (Double), the clipped
    /// gradients, parameters, f32 and 8-bit moments and bf16 working copies, over three steps (clipping, not
    /// clipping, clipping), for a group mixing f32 and 8-bit moments, master copies or none, decay or none, a
    /// tensor of several chunks and one of one element, and a gradient no update reads (another rank's, sharded)
    /// of many reduction blocks. A NaN gradient gives a NaN norm on both paths.
    func testMultiTensorOpsGiveThePerTensorBits() throws {
        let backend = try CUDABackendTests.emulatedBackend()
        let sizes = [5000, 300, 9000, 1]  // 8-bit moments for the first (>= 4096 entries), f32 for the others
        func group() -> OptimizerGroup {
            var grads: [Tensor] = []
            let updates = sizes.enumerated().map { i, n -> OptimizerGroup.Update in
                let param = backend.makeTensor([n], tag: .masterWeights)
                backend.fillUniform(param, bound: 1, seed: 7, stream: UInt64(i))
                let grad = backend.makeTensor([n], tag: .gradients)
                grads.append(grad)
                let moments: OptimizerGroup.Moments = i == 0
                    ? .eightBit(m: BlockwiseMoments(backend: backend, shape: [n], isSigned: true, tag: .optimizer),
                                v: BlockwiseMoments(backend: backend, shape: [n], isSigned: false, tag: .optimizer))
                    : .f32(m: backend.makeTensor([n], tag: .optimizer), v: backend.makeTensor([n], tag: .optimizer))
                let working = i == 1 ? nil : backend.makeTensor([n], dtype: .bf16, tag: .trainable)
                return OptimizerGroup.Update(param: param, grad: grad, moments: moments, working: working, decay: i != 3)
            }
            let other = backend.makeTensor([70000], tag: .gradients)
            backend.fillUniform(other, bound: 0.01, seed: 8, stream: 99)
            return OptimizerGroup(gradients: [grads[0], other] + grads.dropFirst(), updates: updates)
        }
        let multi = group(), looping = group()
        func state(_ g: OptimizerGroup) -> [[UInt8]] {
            g.updates.flatMap { $0.tensors.map { backend.downloadRaw($0) } }
        }
        for (step, clip) in [(1, 0.05), (2, 0.0), (3, 0.02)] {
            for (i, u) in multi.updates.enumerated() {
                backend.fillUniform(u.grad, bound: 0.1, seed: UInt64(step), stream: UInt64(i))
                backend.fillUniform(looping.updates[i].grad, bound: 0.1, seed: UInt64(step), stream: UInt64(i))
            }
            let a = backend.gradientNorm(multi, clip: clip), b = backend.loopingGradientNorm(looping, clip: clip)
            XCTAssertEqual(a.bitPattern, b.bitPattern, "step \(step): norm \(a) vs \(b)")
            if clip > 0 { XCTAssertGreaterThan(a, clip, "step \(step) clips") }
            backend.adamwStep(multi, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1, step: step)
            backend.loopingAdamwStep(looping, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1, step: step)
            for (k, (x, y)) in zip(state(multi), state(looping)).enumerated() {
                XCTAssertTrue(x == y, "step \(step), array \(k): first differing byte \(x.indices.first { $0 >= y.count || x[$0] != y[$0] } ?? -1)")
            }
        }
        backend.fill(multi.updates[2].grad.view(offset: 17, shape: [1]), value: .nan)
        XCTAssertTrue(backend.gradientNorm(multi, clip: 1).isNaN)
        backend.fill(looping.updates[2].grad.view(offset: 17, shape: [1]), value: .nan)
        XCTAssertTrue(backend.loopingGradientNorm(looping, clip: 1).isNaN)
    }

    /// A run on the emulated device that stops after a checkpoint and resumes (a new optimizer, hence new device
    /// tables) ends with the straight run's losses, gradient norms, weights and moments bit for bit: ReLoRA with
    /// a restart, clipping on every step, f32 and 8-bit moments. In `precision: fp32` (the selftest's): with
    /// `cudaMixed` a resume is not bit-exact, before the multi-tensor ops as after, because checkpoints keep the
    /// bf16 working copies and not the optimizer's f32 master copies (`refreshMasterCopies` rounds them).
    /// f32, and bf16 with its f32 master copies (kept in the checkpoint's optimizer file: before they were,
    /// a bf16 resume continued from masters rounded to bf16 and its losses differed from the straight run's).
    func testResumeOnTheDeviceIsBitExact() throws {
        for precision in [Precision.fp32, .cudaMixed] { try checkResumeIsBitExact(precision) }
    }

    private func checkResumeIsBitExact(_ precision: Precision) throws {
        let library = try CUDABackendTests.emulatedBackend().library
        let d = try TrainerTests.makeByteData(hidden: 32, layers: 1)  // the embedding and head keep 8-bit moments
        func recipe(_ run: String) -> Recipe {
            TrainerTests.recipe(d, run: run + (precision == .fp32 ? "-fp32" : "-mixed")) {
                $0.seqLen = 16; $0.microBatch = 2
                $0.mode = .relora; $0.loraRank = 4; $0.loraAlpha = 8; $0.reloraEvery = 3; $0.restartWarmup = 1
                $0.steps = 6; $0.checkpointEvery = 2; $0.valData = nil; $0.device = "cuda"; $0.gradClip = 1e-3
                $0.optimizerStates = .int8
            }
        }
        func backend() -> CUDABackend { CUDABackend(library: library, precision: precision) }
        let straight = try Trainer(recipe: recipe("straight"), resume: false, backend: backend(), log: { _ in })
        _ = try straight.run()
        XCTAssertTrue(straight.optimizer.eightBit.contains { $0 != nil } && straight.optimizer.eightBit.contains { $0 == nil })
        let first = try Trainer(recipe: recipe("resumed"), resume: false, backend: backend(), log: { _ in })
        first.shouldStop = { first.state.step >= 4 }
        _ = try first.run()
        let second = try Trainer(recipe: recipe("resumed"), resume: true, backend: backend(), log: { _ in })
        _ = try second.run()
        let history = first.history + second.history
        XCTAssertEqual(history.map(\.loss.bitPattern), straight.history.map(\.loss.bitPattern), "\(precision): \(history.map(\.loss)) vs \(straight.history.map(\.loss))")
        XCTAssertEqual(history.map(\.gradNorm.bitPattern), straight.history.map(\.gradNorm.bitPattern))
        XCTAssertTrue(straight.history.allSatisfy { $0.gradNorm > 1e-3 }, "every step clips")
        func state(_ t: Trainer) -> [[UInt8]] {
            let b = t.model.backend
            return t.model.loraTensors().map { b.downloadRaw($0.value) } + t.optimizer.m.map { b.downloadRaw($0!) }
                + t.optimizer.v.map { b.downloadRaw($0!) }
                + t.optimizer.eightBit.compactMap { $0 }.flatMap { [b.downloadRaw($0.m.absmax), b.downloadRaw($0.v.absmax)] }
        }
        XCTAssertEqual(state(second), state(straight))
        XCTAssertEqual(second.weightsHash(), straight.weightsHash())
    }
}

