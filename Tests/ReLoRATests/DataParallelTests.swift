import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain

/// Data-parallel training on the in-process group (W ranks on threads, the reference for the engines):
/// the same tokens per step for any W, rank 0 alone writes, resumable at another W.
final class DataParallelTests: XCTestCase {
    /// ReLoRA over q4_0 with a restart after step 3, dropout and 8-bit moments, 6 micro-batches a step.
    static func recipe(_ d: TrainerTests.ByteData, run: String, steps: Int = 6, reloraEvery: Int = 3) -> Recipe {
        TrainerTests.recipe(d, run: run) {
            $0.mode = .relora; $0.loraRank = 4; $0.loraDropout = 0.1; $0.quant = .q4_0; $0.optimizerStates = .int8
            $0.reloraEvery = reloraEvery; $0.restartWarmup = 1; $0.warmupSteps = 1
            $0.microBatch = 1; $0.gradAccum = 6; $0.steps = steps; $0.checkpointEvery = 2; $0.evalEvery = 100; $0.valData = nil
        }
    }

    /// Trains `recipe` on `ranks` in-process ranks (each with its own backend, a CPU one unless `backend`
    /// makes another); returns rank 0's step losses and every rank's final weights hash.
    static func train(_ recipe: Recipe, ranks: Int, resume: Bool = false,
                      backend: @escaping @Sendable () throws -> Backend = { CPUBackend() }) throws -> (losses: [Double], hashes: [UInt64]) {
        let out = try InProcessGroup.run(ranks: ranks) { c -> ([Double], UInt64) in
            let t = try Trainer(recipe: recipe, resume: resume, backend: try backend(), communicator: c, log: { _ in })
            _ = try t.run()
            return (t.history.map(\.loss), t.weightsHash())
        }
        return (out[0].0, out.map(\.1))
    }

    func testRanksTrainTheSameTokensAsOneProcess() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let one = try Self.train(Self.recipe(d, run: "w1"), ranks: 1)
        for w in [2, 3] {
            let many = try Self.train(Self.recipe(d, run: "w\(w)"), ranks: w)
            XCTAssertEqual(Set(many.hashes).count, 1, "W \(w): the ranks' weights differ")
            // The first step's loss is the same bits (same weights, the same per-micro-batch losses summed in
            // micro-batch order); later ones differ by the order the ranks' gradients are summed in: f32
            // rounding of an ulp or so per gradient element (2^-24 relative), carried through Adam. The bound
            // is about 16 f32 ulps of the loss; measured: 3.6e-9 (W 2) and 2.7e-9 (W 3) at most.
            XCTAssertEqual(many.losses[0].bitPattern, one.losses[0].bitPattern, "W \(w)")
            for (a, b) in zip(many.losses, one.losses) {
                XCTAssertEqual(a, b, accuracy: 1e-6 * abs(b), "W \(w): \(many.losses) vs \(one.losses)")
            }
            // Rank 0 alone wrote the metrics: each step once.
            let lines = try String(contentsOfFile: d.dir + "/w\(w)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            XCTAssertEqual(lines.filter { $0.contains("\"loss\"") && $0.contains("\"comm_ms\"") }.count, 6)
        }
        // Reproducible: the same W gives the same bits.
        let again = try Self.train(Self.recipe(d, run: "w2-again"), ranks: 2)
        let first = try Self.train(Self.recipe(d, run: "w2-first"), ranks: 2)
        XCTAssertEqual(again.losses.map(\.bitPattern), first.losses.map(\.bitPattern))
        XCTAssertEqual(again.hashes, first.hashes)
    }

    /// A checkpoint of 2 ranks continues on 1 and on 3 (same micro_batch, same global grad_accum) across a
    /// restart: the next step's loss is the same bits as on 2 (the same weights and tokens), and a 1-rank
    /// checkpoint continues on 2 likewise.
    func testResumeAtAnotherWorldSize() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let straight = try Self.train(Self.recipe(d, run: "straight", steps: 4, reloraEvery: 2), ranks: 2)
        for (first, then) in [(2, 1), (2, 3), (1, 2)] {
            let run = "resume-\(first)-\(then)"
            _ = try Self.train(Self.recipe(d, run: run, steps: 2, reloraEvery: 2), ranks: first)
            let resumed = try Self.train(Self.recipe(d, run: run, steps: 4, reloraEvery: 2), ranks: then, resume: true)
            XCTAssertEqual(resumed.losses.count, 2)
            if first == 2 {
                XCTAssertEqual(resumed.losses[0].bitPattern, straight.losses[2].bitPattern, "\(first) -> \(then)")
            }
            XCTAssertEqual(resumed.losses[1], straight.losses[3], accuracy: 1e-6 * abs(straight.losses[3]), "\(first) -> \(then)")
        }
    }

    /// Any number of ranks may continue a run, but not with another batch (it would train on other tokens).
    func testResumeWithAnotherBatchIsRefused() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        _ = try Self.train(Self.recipe(d, run: "batch", steps: 2, reloraEvery: 2), ranks: 1)
        var other = Self.recipe(d, run: "batch", steps: 4, reloraEvery: 2)
        other.gradAccum = 4
        XCTAssertThrowsError(try Self.train(other, ranks: 2, resume: true)) {
            XCTAssertTrue("\($0)".contains("trained with grad_accum 6, the resume asks for 4"), "\($0)")
        }
    }

    func testGradAccumMustDivideAmongTheRanks() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        var r = Self.recipe(d, run: "odd")
        r.gradAccum = 3
        XCTAssertThrowsError(try Self.train(r, ranks: 2)) {
            XCTAssertTrue("\($0)".contains("grad_accum 3") && "\($0)".contains("divisible by the 2 ranks"), "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: r.runDir), "a refused run wrote its run directory")
    }

    /// Ranks whose weights drift apart are stopped at the next check, naming the ranks.
    func testDivergedRanksStopTheRun() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let r = Self.recipe(d, run: "diverged")
        XCTAssertThrowsError(try InProcessGroup.run(ranks: 3) { c -> Int in
            let t = try Trainer(recipe: r, resume: false, backend: CPUBackend(), communicator: c, log: { _ in })
            if c.rank == 2 {
                let norm = t.model.weights.norm
                t.model.backend.upload([Float](repeating: 0.5, count: norm.count), to: norm)
            }
            _ = try t.run()
            return 0
        }) {
            XCTAssertTrue("\($0)".contains("weights differ at the checkpoint of step 2 (ranks 0,1 vs ranks 2)"), "\($0)")
        }
    }
}
