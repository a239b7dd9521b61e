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

/// The model against Hugging Face transformers: `Tests/Fixtures/make_llama_fixture.py` saved a tiny
/// random LlamaForCausalLM (hidden 48, 3 heads sharing 1 kv head, FFN 80, vocab 97, 2 layers), an
/// input batch [2, 11], its logits, loss and every parameter gradient, all in fp32.
///
/// Tolerances: both sides compute in fp32 but sum in different orders (OpenBLAS vs MKL/oneDNN
/// GEMMs, fused vs unfused softmax), so each value carries a few ulp of independent rounding per op.
/// Through ~20 ops of depth with O(1) activations that is ~1e-6 relative; we allow
/// `atol + rtol*|ref|` with atol 2e-5 and rtol 1e-4 for logits and loss, and atol 1e-5 relative to
/// each gradient tensor's max magnitude (gradients of a mean loss are O(1e-2..1e-3)), which a wrong
/// formula would exceed by orders of magnitude.
final class HuggingFaceGoldenTests: XCTestCase {
    func runGolden(model directory: String, golden: String, checkpointing: GradientCheckpointing) throws {
        let fixtures = fixturesDirectory()
        let model = try HFCheckpoint.load(directory: "\(fixtures)/\(directory)", backend: CPUBackend(),
                                          checkpointing: checkpointing)
        let ref = try SafetensorsFile(path: "\(fixtures)/\(golden)")
        let ids = try ref.integers("input_ids").map { Int32($0) }
        let shape = ref.info("input_ids")!.shape
        let (batch, seqLen) = (shape[0], shape[1])

        // Logits for every position.
        let logits = try model.logits(inputs: ids, batch: batch, seqLen: seqLen)
        let refLogits = try ref.floats("logits")
        XCTAssertEqual(logits.count, refLogits.count)
        for (a, b) in zip(logits, refLogits) { XCTAssertEqual(a, b, accuracy: 2e-5 + 1e-4 * abs(b)) }

        // HF shifts labels inside: position t predicts input t+1; the last position predicts nothing.
        var targets = [Int32](repeating: -1, count: ids.count)
        for b in 0..<batch { for t in 0..<(seqLen - 1) { targets[b * seqLen + t] = ids[b * seqLen + t + 1] } }
        let count = targets.count { $0 >= 0 }
        model.enableGradients()
        let loss = try model.forwardBackward(inputs: ids, targets: targets, batch: batch, seqLen: seqLen,
                                             gradScale: 1 / Float(count))
        let refLoss = Double(try ref.floats("loss")[0])
        XCTAssertEqual(loss.mean, refLoss, accuracy: 2e-5 + 1e-4 * refLoss)

        for (name, grad) in model.namedGradients() {
            let want = try ref.floats("grad.\(name)")
            let got = grad.toArray()
            XCTAssertEqual(got.count, want.count, name)
            let scale = want.map { abs($0) }.max() ?? 0
            XCTAssertGreaterThan(scale, 0, "\(name): reference gradient is all zero, the fixture has no signal")
            var worst: Float = 0
            for (a, b) in zip(got, want) { worst = max(worst, abs(a - b)) }
            XCTAssertLessThanOrEqual(worst, 1e-5 * max(scale, 1e-2) + 1e-7, "\(name): max |diff| \(worst), max |ref| \(scale)")
        }
    }

    func testUntiedModelMatchesTransformers() throws {
        try runGolden(model: "tiny_llama", golden: "tiny_llama_golden.safetensors", checkpointing: .none)
    }

    func testUntiedModelMatchesTransformersWithBlockCheckpointing() throws {
        try runGolden(model: "tiny_llama", golden: "tiny_llama_golden.safetensors", checkpointing: .block)
    }

    func testTiedModelMatchesTransformers() throws {
        try runGolden(model: "tiny_llama_tied", golden: "tiny_llama_tied_golden.safetensors", checkpointing: .none)
    }

    func testEvalMatchesTransformersWindowLosses() throws {
        let fixtures = fixturesDirectory()
        let expected = try JSONKeys(data: Data(contentsOf: URL(fileURLWithPath: "\(fixtures)/eval_expected.json")), what: "fixture")
        let model = try HFCheckpoint.load(directory: "\(fixtures)/tiny_llama", backend: CPUBackend())
        let tokens = try TokenArray(npyPath: "\(fixtures)/eval_tokens.npy")
        let r16 = try Evaluator.evaluate(model: model, tokens: tokens, seqLen: 16, batch: 5)
        XCTAssertEqual(r16.loss, try expected.optionalDouble("loss")!, accuracy: 1e-5)
        XCTAssertEqual(r16.tokens, try expected.int("tokens"))
        XCTAssertEqual(r16.windows, 12)
        guard case .object(let seven)? = expected.values["seq_len_7"] else { return XCTFail("fixture lacks seq_len_7") }
        let r7 = try Evaluator.evaluate(model: model, tokens: tokens, seqLen: 7, batch: 29)
        XCTAssertEqual(r7.loss, try JSONKeys(seven).optionalDouble("loss")!, accuracy: 1e-5)
        XCTAssertEqual(r7.tokens, 29 * 6)
    }
}
