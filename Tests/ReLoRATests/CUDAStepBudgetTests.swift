import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAModel
@testable import ReLoRATrain

/// What a training step costs the device beyond its math, counted by the kernel emulation
/// (`CUDALibrary.emulationCounters`: launches, host synchronizations, cudaMalloc calls), for two models that
/// differ only in their number of layers, hence of trained tensors:
/// - the optimizer phase (`gradientNorm` with clipping on, then `step`) launches the same number of kernels
///   for both: 3 for the norm, 1 per kind of moments kept (f32, 8-bit), so at most 5;
/// - it synchronizes once (the norm read back), and a whole step of G micro-batches 3 G + 1 times: per
///   micro-batch the two token uploads and the loss read back (`LlamaModel.forwardBackward`), then the norm;
/// - after the first step and the first restart (which meet every shape the run has), neither steps nor
///   restarts call cudaMalloc: the caching allocator and the ops' scratch cover them.
/// The per-tensor optimizer (before the multi-tensor kernels) failed the first bound: it launched
/// 2 (norm) + 1 (scale) + 1 (adamw) + 1 (bf16 copy) kernels per trained tensor.
final class CUDAStepBudgetTests: XCTestCase {
    struct Measured {
        var tensors = 0
        var optimizer = CUDALibrary.EmulationCounters()
        var step = CUDALibrary.EmulationCounters()
        var laterMallocs: UInt64 = 0
    }

    func measure(library: CUDALibrary, layers: Int, mode: TrainingMode, states: OptimizerStates, hidden: Int) throws -> Measured {
        let d = try TrainerTests.makeByteData(hidden: hidden, layers: layers)
        let r = TrainerTests.recipe(d, run: "budget-\(mode)-\(states)-\(layers)") {
            $0.mode = mode; $0.optimizerStates = states; $0.device = "cuda"; $0.valData = nil
            $0.steps = 6; $0.warmupSteps = 0; $0.checkpointEvery = 100
            $0.gradClip = 1e-3  // every step clips: the device-side factor is exercised
            if mode != .full { $0.loraRank = 4; $0.loraAlpha = 8 }
            if mode == .relora { $0.reloraEvery = 3; $0.restartWarmup = 0 }
        }
        let trainer = try Trainer(recipe: r, resume: false, backend: CUDABackend(library: library), log: { _ in })
        func counters() throws -> CUDALibrary.EmulationCounters { try XCTUnwrap(library.emulationCounters()) }
        var m = Measured(tensors: trainer.optimizer.parameters.count)
        _ = try trainer.trainStep()
        if mode == .relora { try trainer.restart() }
        let start = try counters()
        let metrics = try trainer.trainStep()
        m.step = try counters().since(start)
        XCTAssertFalse(metrics.skipped)
        XCTAssertGreaterThan(metrics.gradNorm, r.gradClip, "the step clips")
        let before = try counters()
        // The step's gradients again (as the step left them: clipped), clipped at half their norm.
        let norm = trainer.optimizer.gradientNorm(clip: r.gradClip / 2)
        trainer.optimizer.step(lr: 1e-4)
        m.optimizer = try counters().since(before)
        XCTAssertGreaterThan(norm, r.gradClip / 2, "the phase clips")
        if mode == .relora { try trainer.restart() }
        _ = try trainer.trainStep()
        m.laterMallocs = try counters().since(start).mallocs
        return m
    }

    func testOptimizerLaunchesAndSynchronizationsDoNotGrowWithTheTrainedTensors() throws {
        let library = try CUDABackendTests.emulatedBackend().library
        XCTAssertNotNil(library.emulationCounters(), "the emulation exports its counters")
        let cases: [(TrainingMode, OptimizerStates, Int, UInt64)] = [(.relora, .f32, 32, 4), (.full, .int8, 64, 5)]
        for (mode, states, hidden, launches) in cases {
            let label = "\(mode) \(states)"
            let small = try measure(library: library, layers: 2, mode: mode, states: states, hidden: hidden)
            let large = try measure(library: library, layers: 4, mode: mode, states: states, hidden: hidden)
            XCTAssertLessThan(small.tensors, large.tensors, label)
            XCTAssertEqual(small.optimizer.launches, large.optimizer.launches, label)
            for m in [small, large] {
                XCTAssertEqual(m.optimizer.launches, launches, "\(label), \(m.tensors) tensors: 3 norm kernels + 1 per kind of moments")
                XCTAssertEqual(m.optimizer.synchronizations, 1, "\(label): the norm is the one value read back")
                XCTAssertEqual(m.optimizer.mallocs, 0, label)
                XCTAssertEqual(m.step.synchronizations, 3 * 2 + 1, "\(label): 2 micro-batches of 2 uploads and a loss, then the norm")
                XCTAssertEqual(m.step.mallocs, 0, label)
                XCTAssertEqual(m.laterMallocs, 0, "\(label): steps and restarts after the first allocate nothing")
            }
        }
    }
}
