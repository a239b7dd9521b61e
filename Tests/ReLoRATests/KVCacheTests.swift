import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAModel

/// Sampling with a KV cache against the full forward over the window for every token (`Generator`'s
/// `useCache: false`), on the CPU and on the CUDA backend over the kernels' CPU emulation.
///
/// What "equal" means (docs/checkpoints-and-export.md, "Sampling with a KV cache"): the cached step runs
/// the same ops on one row that the full forward runs on the whole window, and the CPU's products differ in
/// shape (a one-row product is a GEMV, the window's a GEMM; `P V` with k = position + 1 against k = T), which
/// sum in other orders. So the logits agree to f32 rounding, not necessarily bit for bit: the test asserts
/// a relative difference below 1e-5 of the logits' largest magnitude (measured: at most 3.6e-6 through these
/// two layers), and equal sampled tokens.
final class KVCacheTests: XCTestCase {
    /// GQA (4 query heads over 2 kv heads), head_dim 16, rope theta 10^4; max positions `positions`.
    static func model(_ backend: Backend, positions: Int = 64) throws -> LlamaModel {
        let config = try LlamaConfig(hiddenSize: 64, intermediateSize: 96, numHiddenLayers: 2, numAttentionHeads: 4,
                                     numKeyValueHeads: 2, vocabSize: 97, maxPositionEmbeddings: positions)
        let model = LlamaModel(config: config, backend: backend)
        // A large init std so attention is far from uniform and the logits spread over the vocabulary.
        try model.weights.initializeRandom(seed: 7, std: 0.3, backend: backend)
        return model
    }

    /// The next-token logits of each step and the sampled ids, with and without the cache.
    static func compare(_ model: LlamaModel, prompt: [Int32], steps: Int, temperature: Double)
        throws -> (worst: Double, cached: [Int32], full: [Int32], identical: Bool)
    {
        var options = Generator.Options()
        options.maxTokens = steps
        options.temperature = temperature
        options.seed = 3
        var cachedLogits: [[Float]] = [], fullLogits: [[Float]] = []
        let cached = try Generator.generate(model: model, prompt: prompt, options: options, onLogits: { cachedLogits.append($0) })
        options.useCache = false
        let full = try Generator.generate(model: model, prompt: prompt, options: options, onLogits: { fullLogits.append($0) })
        var worst = 0.0, identical = cachedLogits.count == fullLogits.count
        for (a, b) in zip(cachedLogits, fullLogits) {
            let scale = b.map { abs(Double($0)) }.max() ?? 1
            let diff = zip(a, b).map { abs(Double($0) - Double($1)) }.max() ?? 0
            worst = max(worst, diff / scale)
            identical = identical && a.map(\.bitPattern) == b.map(\.bitPattern)
        }
        return (worst, cached, full, identical)
    }

    func check(_ backend: Backend, tolerance: Double, label: String) throws {
        // Prompts of one token and of several; greedy and sampled; 12 steps through a window of 8 positions
        // crosses two window restarts (a re-prefill of the last 4 tokens).
        for (positions, prompt, steps) in [(64, [Int32(5)], 10), (64, [Int32](arrayLiteral: 1, 20, 33, 4, 50, 61, 7), 10),
                                           (8, [Int32](arrayLiteral: 9, 8, 7), 12)] {
            let model = try Self.model(backend, positions: positions)
            for temperature in [0.0, 1.0] {
                let r = try Self.compare(model, prompt: prompt, steps: steps, temperature: temperature)
                let what = "\(label): prompt of \(prompt.count), \(steps) steps, window \(positions), temperature \(temperature)"
                print("\(what): worst |cached - full| / max|logit| = \(r.worst)\(r.identical ? " (bit-identical)" : "")")
                XCTAssertEqual(r.cached.count, steps, what)
                XCTAssertLessThanOrEqual(r.worst, tolerance, what)
                XCTAssertEqual(r.cached, r.full, what)
            }
        }
    }

    func testCachedLogitsEqualFullForwardOnCPU() throws {
        try check(CPUBackend(), tolerance: 1e-5, label: "cpu")
    }

    /// The emulated CUDA backend in f32 (the kernels' own arithmetic, same tolerance as the CPU) and in its
    /// mixed precision (bf16 activations and cache: both paths round k, v and every activation to bf16 at the
    /// same points, but a value one side rounds up and the other down differs by a bf16 ulp, 2^-8 relative, and
    /// moves what follows: tolerance 2^-5 of the largest logit, tokens still equal at these steps).
    func testCachedLogitsEqualFullForwardOnEmulatedCUDA() throws {
        try check(try CUDABackendTests.emulatedBackend(precision: .fp32), tolerance: 1e-5, label: "cuda-emu f32")
        try check(try CUDABackendTests.emulatedBackend(), tolerance: 1.0 / 32, label: "cuda-emu bf16")
    }

    /// `ropeAt` rotates each row as `rope` does at that position, bit for bit, on both backends.
    func testRopeAtMatchesRope() throws {
        for backend in [CPUBackend() as Backend, try CUDABackendTests.emulatedBackend(precision: .fp32)] {
            let seq = 70, heads = 3, d = 16
            var rng = TestRNG(11)
            let values = rng.floats(seq * heads * d, -2, 2)
            let full = backend.makeTensor([seq, heads * d], tag: .workspace)
            backend.upload(values, to: full)
            backend.rope(full, batch: 1, seqLen: seq, heads: heads, headDim: d, theta: 10000, inverse: false)
            let want = backend.download(full)
            for (position, rows) in [(0, 1), (37, 1), (65, 5)] {
                let x = backend.makeTensor([rows, heads * d], tag: .workspace)
                backend.upload(Array(values[(position * heads * d)..<((position + rows) * heads * d)]), to: x)
                backend.ropeAt(x, rows: rows, position: position, heads: heads, headDim: d, theta: 10000)
                XCTAssertEqual(backend.download(x).map(\.bitPattern),
                               want[(position * heads * d)..<((position + rows) * heads * d)].map(\.bitPattern),
                               "\(backend.name) position \(position)")
            }
        }
    }

    func testFullCacheIsRefused() throws {
        let model = try Self.model(CPUBackend(), positions: 8)
        let cache = KVCache(model: model)
        _ = try model.logits(appending: [1, 2, 3, 4, 5, 6, 7], to: cache)
        _ = try model.logits(appending: [8], to: cache)
        XCTAssertThrowsError(try model.logits(appending: [9], to: cache)) { error in
            XCTAssertEqual("\(error)", "invalid data: the KV cache holds 8 of 8 positions; 1 more do not fit")
        }
    }
}
