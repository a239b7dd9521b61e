import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAModel

/// The model's padded activation rows (`RowPadding`, what the CUDA backend uses) run here on the CPU
/// backend asked for the CUDA layout, against the same model with packed rows: the products read and write
/// the same logical elements in the same order (OpenBLAS tiles depend on m, n, k only, never on the row
/// strides), so losses, logits and gradients must agree bit for bit, and the padding must stay zero.
final class RowPaddingTests: XCTestCase {
    /// F = 20 and V = 13 are padded to 32 and 16; hidden 16 and the heads' widths are not.
    func config() throws -> LlamaConfig {
        try LlamaConfig(hiddenSize: 16, intermediateSize: 20, numHiddenLayers: 2, numAttentionHeads: 4,
                        numKeyValueHeads: 2, vocabSize: 13, maxPositionEmbeddings: 16)
    }

    func model(_ padding: RowPadding, lora: LoRAConfig?, quant: QuantFormat?, checkpointing: GradientCheckpointing) throws -> LlamaModel {
        try model(CPUBackend(rowPadding: padding), lora: lora, quant: quant, checkpointing: checkpointing)
    }

    func model(_ backend: Backend, lora: LoRAConfig?, quant: QuantFormat?, checkpointing: GradientCheckpointing) throws -> LlamaModel {
        let m = LlamaModel(config: try config(), backend: backend, checkpointing: checkpointing, lora: lora, quant: quant)
        try m.weights.initializeRandom(seed: 7, std: 0.3, backend: m.backend)
        if lora != nil {
            m.initializeLoRA(seed: 9)
            var rng = TestRNG(21)
            for p in m.loraTensors() where p.name.hasSuffix("lora_B") { backend.upload(rng.floats(p.value.count, -0.3, 0.3), to: p.value) }
        }
        m.enableGradients()
        return m
    }

    /// Two micro-batches of training (gradients accumulate, LoRA dropout keyed per micro-batch), then an
    /// evaluation loss, all logits, and decoding with a KV cache: every value equal, bit for bit.
    func assertPaddedEqualsPacked(lora: LoRAConfig?, quant: QuantFormat? = nil, checkpointing: GradientCheckpointing = .none,
                                  file: StaticString = #filePath, line: UInt = #line) throws {
        let label = "lora \(lora.map { "r\($0.rank) dropout \($0.dropout)" } ?? "none"), \(quant?.rawValue ?? "dense"), \(checkpointing)"
        let packed = try model(.none, lora: lora, quant: quant, checkpointing: checkpointing)
        let padded = try model(.cuda, lora: lora, quant: quant, checkpointing: checkpointing)
        var rng = TestRNG(3)
        let batches = (0..<2).map { _ in
            ((0..<12).map { _ in Int32(rng.int(13)) }, (0..<12).map { i in i == 5 ? -1 : Int32(rng.int(13)) })
        }
        for (micro, (x, y)) in batches.enumerated() {
            var sums: [Double] = []
            for m in [packed, padded] {
                m.dropoutKey = DropoutKey(step: 0, microBatch: micro)
                sums.append(try m.forwardBackward(inputs: x, targets: y, batch: 2, seqLen: 6, gradScale: 1 / 11).sum)
            }
            XCTAssertEqual(sums[0].bitPattern, sums[1].bitPattern, "\(label): loss of micro-batch \(micro)", file: file, line: line)
        }
        for ((name, a), (_, b)) in zip(packed.namedGradients(), padded.namedGradients()) {
            XCTAssertTrue(a.toArray().map(\.bitPattern) == b.toArray().map(\.bitPattern), "\(label): gradient of \(name)",
                          file: file, line: line)
        }
        XCTAssertNotNil(padded.workspace, file: file, line: line)
        if let ws = padded.workspace {
            XCTAssertEqual(ws.mlpStride, 32, file: file, line: line)
            XCTAssertEqual(ws.vocabStride, 16, file: file, line: line)
            // The padding of the MLP's activations and gradients is still zero after the backward.
            let mlp: [Tensor] = ws.blocks.flatMap { [$0.gate, $0.up, $0.h] } + [ws.dh!, ws.dgate!, ws.dup!]
            for t in mlp {
                let v: [Float] = t.toArray()
                var pads: [Float] = []
                for r in 0..<ws.tokens { pads += v[r * 32 + 20 ..< r * 32 + 32] }
                XCTAssertTrue(pads.allSatisfy { $0.bitPattern == 0 }, "\(label): a padding column is not +0", file: file, line: line)
            }
        }
        let (x, y) = batches[0]
        XCTAssertEqual(try packed.loss(inputs: x, targets: y, batch: 2, seqLen: 6).sum.bitPattern,
                       try padded.loss(inputs: x, targets: y, batch: 2, seqLen: 6).sum.bitPattern, label, file: file, line: line)
        let logits = try padded.logits(inputs: x, batch: 2, seqLen: 6)
        XCTAssertEqual(logits.count, 12 * 13, file: file, line: line)
        XCTAssertTrue(try packed.logits(inputs: x, batch: 2, seqLen: 6).map(\.bitPattern) == logits.map(\.bitPattern),
                      "\(label): logits", file: file, line: line)
        let caches = [KVCache(model: packed), KVCache(model: padded)]
        for step in 0..<3 {
            let tokens: [Int32] = step == 0 ? Array(x[0..<4]) : [x[3 + step]]
            let a = try packed.logits(appending: tokens, to: caches[0]), b = try padded.logits(appending: tokens, to: caches[1])
            XCTAssertEqual(b.count, 13, file: file, line: line)
            XCTAssertTrue(a.map(\.bitPattern) == b.map(\.bitPattern), "\(label): decode step \(step)", file: file, line: line)
        }
    }

    func testFullRankTraining() throws {
        try assertPaddedEqualsPacked(lora: nil)
        try assertPaddedEqualsPacked(lora: nil, checkpointing: .block)
    }

    func testLoRATrainingWithAndWithoutDropout() throws {
        try assertPaddedEqualsPacked(lora: LoRAConfig(rank: 3, alpha: 6))
        try assertPaddedEqualsPacked(lora: LoRAConfig(rank: 3, alpha: 6, dropout: 0.3), checkpointing: .block)
        try assertPaddedEqualsPacked(lora: LoRAConfig(rank: 3, alpha: 6, dropout: 0.2, trainableScale: true))
    }

    func testQuantizedLoRATraining() throws {
        try assertPaddedEqualsPacked(lora: LoRAConfig(rank: 3, alpha: 6), quant: .q4_0, checkpointing: .block)
        try assertPaddedEqualsPacked(lora: LoRAConfig(rank: 2, alpha: 4, dropout: 0.2), quant: .nf4)
    }

    func testStrides() {
        XCTAssertEqual(RowPadding.cuda.stride(5461), 5472)
        XCTAssertEqual(RowPadding.cuda.stride(32100), 32112)
        XCTAssertEqual(RowPadding.cuda.stride(2048), 2048)
        XCTAssertEqual(RowPadding.none.stride(5461), 5461)
        XCTAssertEqual(RowPadding.cuda.stride(0), 0)
    }

    /// The CUDA backend pads by itself (F 20 -> 32, V 13 -> 16): on the kernels' emulation in f32, a
    /// training micro-batch, the evaluation loss and the logits agree with the CPU's packed rows up to the
    /// products' summation order (cuBLAS' emulation widens and sums in another order than the CPU's tiles:
    /// relative 1e-5 is ~100x the f32 rounding of these 16- to 32-term sums, far below a misplaced row).
    func testTheEmulatedCUDABackendPadsAndAgreesWithTheCPU() throws {
        let cuda = try CUDABackendTests.emulatedBackend(precision: .fp32)
        XCTAssertEqual(cuda.rowPadding, .cuda)
        for (lora, quant) in [(nil, nil), (LoRAConfig(rank: 3, alpha: 6, dropout: 0.2), QuantFormat.q4_0)] as [(LoRAConfig?, QuantFormat?)] {
            let cpu = try model(CPUBackend(), lora: lora, quant: quant, checkpointing: .block)
            let gpu = try model(cuda, lora: lora, quant: quant, checkpointing: .block)
            var rng = TestRNG(3)
            let x = (0..<12).map { _ in Int32(rng.int(13)) }, y = (0..<12).map { _ in Int32(rng.int(13)) }
            let a = try cpu.forwardBackward(inputs: x, targets: y, batch: 2, seqLen: 6, gradScale: 1 / 12).sum
            let b = try gpu.forwardBackward(inputs: x, targets: y, batch: 2, seqLen: 6, gradScale: 1 / 12).sum
            XCTAssertEqual(a, b, accuracy: 1e-5 * abs(a))
            XCTAssertEqual(gpu.workspace?.mlpStride, 32)
            XCTAssertEqual(gpu.workspace?.vocabStride, 16)
            for ((name, g), (_, h)) in zip(cpu.namedGradients(), gpu.namedGradients()) {
                let want = g.toArray(), got = cuda.download(h)
                let scale = want.map { abs($0) }.max() ?? 0
                for (u, v) in zip(want, got) { XCTAssertEqual(u, v, accuracy: 1e-5 * scale + 1e-12, name) }
            }
            let la = try cpu.loss(inputs: x, targets: y, batch: 2, seqLen: 6).sum, lb = try gpu.loss(inputs: x, targets: y, batch: 2, seqLen: 6).sum
            XCTAssertEqual(la, lb, accuracy: 1e-5 * abs(la))
            let za = try cpu.logits(inputs: x, batch: 2, seqLen: 6), zb = try gpu.logits(inputs: x, batch: 2, seqLen: 6)
            XCTAssertEqual(zb.count, za.count)
            for (u, v) in zip(za, zb) { XCTAssertEqual(u, v, accuracy: 1e-5 * max(1, abs(u))) }
        }
    }
}
