import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAFormats
@testable import ReLoRATokenizer
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain
@testable import ReLoRAAnalysis
@testable import ReLoRASelfTest

/// The optimizer-reset variants: `magnitude_joint` prunes m and v at the same positions (the smallest
/// Adam steps), `magnitude_reinit_a` clears A's moments and prunes B's like the paper, and a measurement
/// on a tiny ReLoRA run of how far A moves right after a restart under each.
final class OptimizerResetTests: XCTestCase {
    let backend = CPUBackend()

    /// An optimizer over one LoRA A `[8, 64]` and one B `[64, 8]` whose moments are independent draws
    /// (m in +-1e-3, sqrt(v) in [0, 1e-3)), so |m| and v rank the positions differently, at step 100.
    func optimizer() -> (AdamW, m: [[Float]], v: [[Float]]) {
        var rng = TestRNG(11)
        var params: [TrainableParameter] = []
        for (name, shape, factor) in [("q_proj.lora_A", [8, 64], LoRAFactor.a), ("q_proj.lora_B", [64, 8], .b)] {
            let n = shape.reduce(1, *)
            params.append(TrainableParameter(name: name, value: makeTensor(backend, shape, rng.floats(n)),
                                             grad: makeTensor(backend, shape, [Float](repeating: 0, count: n)),
                                             isLoRA: true, loraFactor: factor))
        }
        let opt = AdamW(parameters: params, backend: backend, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0)
        opt.stepCount = 100
        var ms: [[Float]] = [], vs: [[Float]] = []
        for i in 0..<params.count {
            let n = params[i].value.count
            ms.append(rng.floats(n, -1e-3, 1e-3))
            vs.append(rng.floats(n, 0, 1e-3).map { $0 * $0 })
            opt.m[i]!.copy(from: ms[i]); opt.v[i]!.copy(from: vs[i])
        }
        return (opt, ms, vs)
    }

    func zeros(_ x: [Float]) -> Set<Int> { Set(x.indices.filter { x[$0] == 0 }) }

    func testJointResetZeroesMAndVAtTheSamePositions() {
        let (opt, m0, v0) = optimizer()
        let (fm, fv) = opt.resetLoRAMoments(.magnitudeJoint, ratio: 0.9, seed: 0, restart: 0)
        // eps' = eps * sqrt(1 - beta2^t): the ranking of the bias-corrected step (see AdamW.resetLoRAMoments).
        let eps = Float(1e-8 * (1 - pow(0.999, 100.0)).squareRoot())
        for i in 0..<2 {
            let n = m0[i].count, k = Int((0.9 * Double(n)).rounded(.up))
            let m = opt.m[i]!.toArray(), v = opt.v[i]!.toArray()
            XCTAssertEqual(zeros(m), zeros(v), "tensor \(i): one mask for m and v")
            XCTAssertEqual(zeros(m).count, k)
            // The survivors are the k-th largest Adam steps and keep their values.
            let score = (0..<n).map { abs(m0[i][$0]) / (v0[i][$0].squareRoot() + eps) }
            let kept = Set(0..<n).subtracting(zeros(m))
            XCTAssertLessThan(zeros(m).map { score[$0] }.max()!, kept.map { score[$0] }.min()!)
            XCTAssertTrue(kept.allSatisfy { m[$0] == m0[i][$0] && v[$0] == v0[i][$0] })
        }
        XCTAssertEqual(fm, fv)
        XCTAssertEqual(fm, Double(2 * 461) / 1024)  // ceil(0.9 * 512) = 461 of each tensor's 512

        // The paper's reset on the same moments leaves positions with m but no v: the case the joint
        // reset exists to remove.
        let (paper, _, _) = optimizer()
        _ = paper.resetLoRAMoments(.magnitude, ratio: 0.9, seed: 0, restart: 0)
        let m = paper.m[0]!.toArray(), v = paper.v[0]!.toArray()
        XCTAssertGreaterThan(zeros(v).subtracting(zeros(m)).count, 20, "m kept where v was zeroed")
    }

    func testReinitAResetClearsAAndPrunesBByMagnitude() {
        let (opt, m0, v0) = optimizer()
        let (fm, fv) = opt.resetLoRAMoments(.magnitudeReinitA, ratio: 0.9, seed: 0, restart: 0)
        XCTAssertTrue(opt.m[0]!.toArray().allSatisfy { $0 == 0 }, "A's m")
        XCTAssertTrue(opt.v[0]!.toArray().allSatisfy { $0 == 0 }, "A's v")
        // B: each moment by its own magnitude (the paper's rule): the 461 smallest of 512 go.
        for (got, original) in [(opt.m[1]!.toArray(), m0[1]), (opt.v[1]!.toArray(), v0[1])] {
            XCTAssertEqual(zeros(got).count, 461)
            let kept = Set(0..<512).subtracting(zeros(got))
            XCTAssertLessThan(zeros(got).map { abs(original[$0]) }.max()!, kept.map { abs(original[$0]) }.min()!)
        }
        XCTAssertNotEqual(zeros(opt.m[1]!.toArray()), zeros(opt.v[1]!.toArray()), "separate masks for B, as in the paper")
        XCTAssertEqual(fm, Double(512 + 461) / 1024)
        XCTAssertEqual(fv, fm)
        XCTAssertEqual(OptimizerResetMode.magnitudeReinitA.reset(for: .scale, ratio: 0.5), .separately(.magnitude(ratio: 0.5)))
        XCTAssertEqual(OptimizerResetMode.magnitude.reset(for: .a, ratio: 0.5), .separately(.magnitude(ratio: 0.5)))
        XCTAssertEqual(OptimizerResetMode.none.reset(for: .a, ratio: 0.5), .keep)
    }

    func testRecipeAcceptsTheVariants() throws {
        var keys: [String: JSONValue] = ["model": .string("m.json"), "train_data": .string("t.npy"), "run_dir": .string("r"),
                                         "mode": .string("relora"), "relora_every": .number(100), "steps": .number(1000)]
        for name in ["magnitude", "magnitude_joint", "magnitude_reinit_a"] {
            keys["optimizer_reset"] = .string(name)
            let r = try Recipe(keys: keys)
            XCTAssertEqual(r.optimizerReset.rawValue, name)
            XCTAssertEqual(r.jsonObject()["optimizer_reset"] as? String, name)
        }
        XCTAssertEqual(Recipe(model: "", trainData: "", runDir: "").optimizerReset, .magnitude, "the paper's reset stays the default")
    }

    /// The measurement behind the variants: a tiny ReLoRA run (hidden 64, so A starts in +-0.125; lr 3e-3,
    /// eps 1e-8, ratio 0.9, restart after 20 steps) continued for 5 steps after its first restart, with
    /// each reset and with and without the restart warmup. Prints the largest change of an A entry in the
    /// first step after the restart and over the 5 steps, the largest |A| then, and the loss.
    func testAJumpAfterARestartPerResetVariant() throws {
        let data = try TrainerTests.makeByteData(hidden: 64, layers: 2)
        var rows: [(mode: OptimizerResetMode, warmup: Int, first: Float, most: Float, maxA: Float, lossBefore: Double, lossAfter: Double)] = []
        for warmup in [0, 10] {
            for mode in [OptimizerResetMode.magnitude, .magnitudeJoint, .magnitudeReinitA] {
                let r = TrainerTests.recipe(data, run: "jump-\(mode.rawValue)-\(warmup)") {
                    $0.mode = .relora; $0.loraRank = 8; $0.loraAlpha = 32; $0.steps = 40; $0.reloraEvery = 20
                    $0.restartWarmup = warmup; $0.warmupSteps = 2; $0.optimizerReset = mode; $0.optimizerResetRatio = 0.9
                    $0.checkpointEvery = 1000; $0.evalEvery = 1000
                }
                let t = try Trainer(recipe: r, resume: false, log: { _ in })
                func aValues() -> [Float] { t.model.loraTensors().filter { $0.name.hasSuffix("lora_A") }.flatMap { $0.value.toArray() } }
                while t.state.step <= 20 {  // through step t = 20 (lr 0), then the restart
                    _ = try t.trainStep()
                    if t.state.step - 1 == 20 { try t.restart() }
                }
                let lossBefore = t.history.last!.loss
                var previous = aValues()
                var first: Float = 0, most: Float = 0, maxA: Float = 0, lossAfter = 0.0
                for k in 0..<5 {
                    let m = try t.trainStep()
                    lossAfter = max(lossAfter, m.loss)
                    let now = aValues()
                    let jump = zip(now, previous).map { abs($0 - $1) }.max()!
                    if k == 0 { first = jump }
                    most = max(most, jump)
                    maxA = max(maxA, now.map(abs).max()!)
                    previous = now
                }
                rows.append((mode, warmup, first, most, maxA, lossBefore, lossAfter))
            }
        }
        print("A right after restart 1 (ratio 0.9, lr 3e-3, eps 1e-8, A's initial bound 0.125):")
        print("reset               restart_warmup  |dA| step 1  max |dA| steps 1-5  max |A|  loss before -> max loss after")
        for r in rows {
            print(r.mode.rawValue.padding(toLength: 19, withPad: " ", startingAt: 0)
                  + String(format: " %14d  %11.3g  %18.3g  %7.3g  %.3f -> %.3f", r.warmup, r.first, r.most, r.maxA,
                           r.lossBefore, r.lossAfter))
        }
        for warmup in [0, 10] {
            let paper = rows.first { $0.mode == .magnitude && $0.warmup == warmup }!
            let joint = rows.first { $0.mode == .magnitudeJoint && $0.warmup == warmup }!
            let reinit = rows.first { $0.mode == .magnitudeReinitA && $0.warmup == warmup }!
            // B = 0 after the restart, so A's gradient is 0 in the first step: with no moments A cannot move.
            XCTAssertEqual(reinit.first, 0, "reinit_a: A does not move in the step after the restart")
            // The paper's separate masks give steps of about lr * m / eps, far beyond an Adam step (~lr);
            // the joint mask keeps A's steps at Adam's usual size.
            XCTAssertGreaterThan(paper.first, 100 * 3e-3, "restart_warmup \(warmup)")
            XCTAssertLessThan(joint.most, 10 * 3e-3, "restart_warmup \(warmup)")
            XCTAssertLessThan(reinit.most, 10 * 3e-3, "restart_warmup \(warmup)")
        }
    }
}
