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

/// The whole model's hand-written backward against finite differences, under both checkpointing settings.
class LlamaModelGradientTests: XCTestCase {
    /// Odd sizes, grouped-query heads (4 query heads share 2 kv heads), untied head.
    func tinyConfig(tied: Bool = false) throws -> LlamaConfig {
        try LlamaConfig(hiddenSize: 16, intermediateSize: 20, numHiddenLayers: 2, numAttentionHeads: 4,
                        numKeyValueHeads: 2, vocabSize: 13, maxPositionEmbeddings: 16, tieWordEmbeddings: tied)
    }

    func makeModel(_ config: LlamaConfig, checkpointing: GradientCheckpointing) -> LlamaModel {
        let model = LlamaModel(config: config, backend: CPUBackend(), checkpointing: checkpointing)
        // Larger-than-usual init so every path carries signal; norm gains away from 1.
        try! model.weights.initializeRandom(seed: 7, std: 0.3, backend: model.backend)
        var rng = TestRNG(11)
        for (name, t) in model.weights.named() where name.hasSuffix("norm.weight") {
            t.copy(from: (0..<t.count).map { _ in 1 + rng.uniform(-0.3, 0.3) })
        }
        model.enableGradients()
        return model
    }

    let batch = 2, seqLen = 6
    func batchData(vocab: Int) -> (inputs: [Int32], targets: [Int32]) {
        var rng = TestRNG(3)
        let inputs = (0..<(batch * seqLen)).map { _ in Int32(rng.int(vocab)) }
        var targets = (0..<(batch * seqLen)).map { _ in Int32(rng.int(vocab)) }
        targets[seqLen - 1] = -1  // an ignored position
        return (inputs, targets)
    }

    func gradientsMatchFiniteDifferences(tied: Bool, checkpointing: GradientCheckpointing) throws {
        let config = try tinyConfig(tied: tied)
        let model = makeModel(config, checkpointing: checkpointing)
        let (inputs, targets) = batchData(vocab: config.vocabSize)
        // Loss = sum over tokens (gradScale 1): FD and analytic agree in absolute terms.
        try model.forwardBackward(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen, gradScale: 1)
        let grads = Dictionary(uniqueKeysWithValues: model.namedGradients().map { ($0.0, $0.1.toArray()) })
        for (name, tensor) in model.weights.named() {
            checkFiniteDifferences("\(name) [\(checkpointing)]", tensor, analytic: grads[name]!, samples: 10) {
                try! model.loss(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen).sum
            }
        }
    }

    func testGradientsMatchFiniteDifferencesWithoutCheckpointing() throws {
        try gradientsMatchFiniteDifferences(tied: false, checkpointing: .none)
    }

    func testGradientsMatchFiniteDifferencesWithBlockCheckpointing() throws {
        try gradientsMatchFiniteDifferences(tied: false, checkpointing: .block)
    }

    func testTiedHeadGradientsMatchFiniteDifferences() throws {
        try gradientsMatchFiniteDifferences(tied: true, checkpointing: .none)
    }

    func testCheckpointingGivesBitIdenticalGradientsAndLoss() throws {
        let config = try tinyConfig()
        let (inputs, targets) = batchData(vocab: config.vocabSize)
        var results: [([Float], Double)] = []
        for setting in GradientCheckpointing.allCases {
            let model = makeModel(config, checkpointing: setting)
            let loss = try model.forwardBackward(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen,
                                                 gradScale: 1 / 11)
            results.append((model.namedGradients().flatMap { $0.1.toArray() }, loss.sum))
        }
        XCTAssertEqual(results[0].1, results[1].1)
        XCTAssertTrue(results[0].0 == results[1].0, "gradients differ between checkpointing none and block")
    }

    func testBlockCheckpointingKeepsLessActivationMemory() throws {
        let config = try LlamaConfig(hiddenSize: 32, intermediateSize: 64, numHiddenLayers: 6, numAttentionHeads: 4,
                                     vocabSize: 50, maxPositionEmbeddings: 64)
        var peaks: [GradientCheckpointing: Int] = [:]
        for setting in GradientCheckpointing.allCases {
            let model = LlamaModel(config: config, backend: CPUBackend(), checkpointing: setting)
            try model.weights.initializeRandom(seed: 1, backend: model.backend)
            model.enableGradients()
            let ids = [Int32](repeating: 3, count: 4 * 32)
            try model.forwardBackward(inputs: ids, targets: ids, batch: 4, seqLen: 32, gradScale: 1)
            peaks[setting] = model.backend.ledger.report().peak[.activations] ?? 0
        }
        // 6 saved blocks vs 1: the block activations dominate, so expect well under half.
        XCTAssertLessThan(Double(peaks[.block]!), 0.5 * Double(peaks[.none]!))
    }

    func testGradientsAccumulateAcrossCalls() throws {
        let config = try tinyConfig()
        let model = makeModel(config, checkpointing: .none)
        let (inputs, targets) = batchData(vocab: config.vocabSize)
        try model.forwardBackward(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen, gradScale: 1)
        let once = model.namedGradients().flatMap { $0.1.toArray() }
        try model.forwardBackward(inputs: inputs, targets: targets, batch: batch, seqLen: seqLen, gradScale: 1)
        let twice = model.namedGradients().flatMap { $0.1.toArray() }
        for (a, b) in zip(once, twice) { XCTAssertEqual(2 * a, b, accuracy: 1e-5 * max(1, abs(b))) }
        model.zeroGradients()
        XCTAssertTrue(model.namedGradients().allSatisfy { $0.1.toArray().allSatisfy { $0 == 0 } })
    }

    func testBadInputsAreClearErrors() throws {
        let config = try tinyConfig()
        let model = makeModel(config, checkpointing: .none)
        XCTAssertThrowsError(try model.loss(inputs: [1, 2, 13], targets: [2, 3, 4], batch: 1, seqLen: 3)) { error in
            XCTAssertTrue("\(error)".contains("outside the vocabulary"), "\(error)")
        }
        XCTAssertThrowsError(try model.loss(inputs: [Int32](repeating: 1, count: 17), targets: [Int32](repeating: 1, count: 17),
                                            batch: 1, seqLen: 17)) { error in
            XCTAssertTrue("\(error)".contains("max_position_embeddings"), "\(error)")
        }
        XCTAssertThrowsError(try model.loss(inputs: [1, 2], targets: [1, 2], batch: 1, seqLen: 3))
    }
}
