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

/// The MFU numerator (model FLOPs of a step) counted by hand for the tiny test model, the ETA, and the
/// step line / metrics line carrying them.
final class ModelFLOPsTests: XCTestCase {
    /// hidden 32, intermediate 72, 2 layers, 4 heads (head_dim 8) with 2 kv heads, vocab 256, seq 32.
    func tinyConfig() throws -> LlamaConfig {
        try LlamaConfig(hiddenSize: 32, intermediateSize: 72, numHiddenLayers: 2, numAttentionHeads: 4,
                        numKeyValueHeads: 2, vocabSize: 256, maxPositionEmbeddings: 128)
    }

    func testFullRankFLOPsByHand() throws {
        // Per layer: q 32x32 = 1024, k 32x16 = 512, v 512, o 1024, gate/up/down 32x72 = 2304 each: 9984.
        // Two layers 19968, LM head 256x32 = 8192: 6 x 28160 = 168960 per token.
        // Attention: 12 x 2 layers x 32 positions x 32 (4 heads x 8) = 24576 per token.
        let perToken = ModelFLOPs.perToken(config: try tinyConfig(), seqLen: 32, lora: nil)
        XCTAssertEqual(perToken, 168_960 + 24_576)
    }

    func testLoRAFLOPsByHand() throws {
        // Frozen block linears: 4 x 19968 = 79872 (forward and dX, no dW). LM head trained: 6 x 8192 = 49152.
        // Adapters r = 4: sum over a layer of (in + out) = 64 + 48 + 48 + 64 + 104 + 104 + 104 = 536,
        // x 2 layers = 1072, x 6 x 4 = 25728. Attention 24576 as in full-rank.
        let perToken = ModelFLOPs.perToken(config: try tinyConfig(), seqLen: 32, lora: LoRAConfig(rank: 4, alpha: 8))
        XCTAssertEqual(perToken, 79_872 + 49_152 + 25_728 + 24_576)
    }

    func testPerStepCountsEveryMicroBatch() throws {
        let data = try TrainerTests.makeByteData()
        let r = TrainerTests.recipe(data, run: "flops")  // seq 32 x micro 4 x accum 2 = 256 tokens
        let config = try LlamaConfig(contentsOf: r.model)
        XCTAssertEqual(ModelFLOPs.perStep(config: config, recipe: r), 256 * (168_960 + 24_576))
    }

    func testSgemmPeakIsPlausible() {
        let peak = PeakFLOPs.sgemm(m: 256, n: 256, k: 256, reps: 2)
        XCTAssertGreaterThan(peak, 1e8)   // any CPU of this century
        XCTAssertLessThan(peak, 1e14)     // no CPU of this decade
        XCTAssertNil(PeakFLOPs.peak(for: PlanningBackend(target: .cpu)))
    }

    func testETAAndDuration() {
        XCTAssertEqual(formatDuration(0), "0:00:00")
        XCTAssertEqual(formatDuration(3 * 3600 + 25 * 60 + 7.4), "3:25:07")
        XCTAssertEqual(formatDuration(100 * 3600), "100:00:00")
        XCTAssertEqual(formatDuration(nil), "-:--:--")
        XCTAssertEqual(formatDuration(.infinity), "-:--:--")
        var eta = ETAEstimator(total: 100, window: 4)
        XCTAssertNil(eta.secondsRemaining)
        eta.record(done: 0, at: 0)
        eta.record(done: 1, at: 50)  // a slow first step, soon out of the window
        for s in 2...10 { eta.record(done: s, at: 50 + Double(s - 1) * 2) }
        XCTAssertEqual(eta.rate!, 0.5, accuracy: 1e-12)           // the last 4 steps took 2 s each
        XCTAssertEqual(eta.secondsRemaining!, 180, accuracy: 1e-9)  // 90 steps left
        eta.record(done: 100, at: 300)
        XCTAssertEqual(eta.secondsRemaining, 0)
    }

    /// The console line has MFU and an ETA; metrics.jsonl lines have `mfu` (CPU: over the sgemm peak).
    func testStepLineAndMetricsCarryMFU() throws {
        let data = try TrainerTests.makeByteData()
        let r = TrainerTests.recipe(data, run: "mfu") { $0.steps = 3; $0.warmupSteps = 1 }
        var lines: [String] = []
        let trainer = try Trainer(recipe: r, resume: false, log: { lines.append($0) })
        _ = try trainer.run()
        let steps = lines.filter { $0.hasPrefix("step ") }
        XCTAssertEqual(steps.count, 3, "\(lines)")
        for line in steps {
            XCTAssertNotNil(line.range(of: #"\| mfu \d+\.\d% \| eta \d+:\d\d:\d\d$"#, options: .regularExpression), line)
        }
        XCTAssertTrue(steps.last!.hasSuffix("eta 0:00:00"), steps.last!)
        let peak = try XCTUnwrap(trainer.peakFLOPs)
        for m in trainer.history {
            let mfu = try XCTUnwrap(m.mfu)
            XCTAssertEqual(mfu, trainer.stepFLOPs / (m.milliseconds / 1000) / peak, accuracy: 1e-9 * mfu)
        }
        let text = try String(contentsOfFile: r.runDir + "/metrics.jsonl", encoding: .utf8)
        let mfus = text.split(separator: "\n").compactMap { line -> Double? in
            guard let d = try? JSONDecoder().decode([String: JSONValue].self, from: Data(line.utf8)),
                  case .number(let v)? = d["mfu"] else { return nil }
            return v
        }
        XCTAssertEqual(mfus.count, 3)
        XCTAssertTrue(mfus.allSatisfy { $0 > 0 && $0 < 1.5 }, "\(mfus)")
    }
}
