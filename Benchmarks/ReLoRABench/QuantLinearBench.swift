import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain

/// `relora-bench --mode quant-linear [--tokens M]`: a frozen linear's training work (forward `y = x W^T`
/// and input gradient `dx = dy W`) with W in q8_0, q4_0 and nf4, dequantized tile by tile on the fly,
/// against the same two products with a dense f32 W (plain sgemm), on the 1b config's layer shapes and
/// one ragged shape, measured in the same run. The target: quantized within 15 % of dense.
func runQuantLinearBench(tokens m: Int, reps: Int, json: String?) throws {
    let backend = try BackendFactory.make(.cpu)
    // [out, in]: 1b attention (2048 x 2048), MLP up (5461 x 2048) and down (2048 x 5461, rows padded).
    let shapes: [(String, Int, Int)] = [("attn 2048x2048", 2048, 2048), ("mlp up 5461x2048", 5461, 2048),
                                        ("mlp down 2048x5461", 2048, 5461)]
    var rows: [[String: Any]] = []
    print("quantized linear, forward + input gradient, \(m) tokens, best of \(reps) (same run)")
    print("shape                 format  dense ms  quant ms  quant/dense  GFLOP/s")
    for (label, out, inF) in shapes {
        let x = backend.makeTensor([m, inF], tag: .activations)
        let dy = backend.makeTensor([m, out], tag: .activations)
        let y = backend.makeTensor([m, out], tag: .activations)
        let dx = backend.makeTensor([m, inF], tag: .activations)
        let w = backend.makeTensor([out, inF], tag: .frozenWeights)
        backend.fillNormal(x, std: 1, seed: 1, stream: 1)
        backend.fillNormal(dy, std: 1, seed: 1, stream: 2)
        backend.fillNormal(w, std: 0.02, seed: 1, stream: 3)
        func best(_ body: () -> Void) -> Double {
            body()  // warm-up
            var t = Double.infinity
            for _ in 0..<reps {
                let t0 = DispatchTime.now().uptimeNanoseconds
                body()
                t = min(t, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
            }
            return t
        }
        let dense = best {
            backend.matmul(x, w, y, m: m, n: out, k: inF, transB: true)
            backend.matmul(dy, w, dx, m: m, n: inF, k: out)
        }
        let flops = 4.0 * Double(m) * Double(out) * Double(inF)
        func pad(_ s: String, _ n: Int) -> String { s.padding(toLength: max(n, s.count), withPad: " ", startingAt: 0) }
        print(pad(label, 22) + pad("f32", 7) + String(format: "%9.1f  %8@  %11@  %7.1f", dense * 1000, "-", "-", flops / dense / 1e9))
        for format in QuantFormat.allCases {
            let q = QuantizedTensor(format: format, rows: out, cols: inF, backend: backend, tag: .frozenWeights)
            if let failure = backend.quantize(w, into: q) { throw failure.error(format: format, name: label) }
            let scratch = backend.makeTensor(backend.dequantizeScratchShape(rows: out, cols: inF), tag: .workspace)
            let quant = best {
                backend.quantizedLinear(x, q, y, tokens: m, beta: 0, scratch: scratch)
                backend.quantizedLinearInput(dy, q, dx, tokens: m, beta: 0, scratch: scratch)
            }
            print(pad(label, 22) + pad(format.rawValue, 7) + String(format: "%9@  %8.1f  %10.3fx  %7.1f", "", quant * 1000,
                                                                                   quant / dense, flops / quant / 1e9))
            rows.append(["shape": label, "format": format.rawValue, "tokens": m, "dense_seconds": dense,
                         "quant_seconds": quant, "ratio": quant / dense])
        }
    }
    if let json {
        try JSONSerialization.data(withJSONObject: rows, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: json))
    }
}
