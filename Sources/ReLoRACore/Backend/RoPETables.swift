import Foundation

/// The rotary embedding's cos/sin tables, `[seqLen, headDim / 2]` each: the angle of pair `i` at position `p` is
/// `p * invFreq_i` with `invFreq_i = 1 / theta^(2i / headDim)`, computed in Double and rounded to Float once.
/// One function for every backend: `CPUBackend.rope` reads these arrays, and the CUDA backend uploads the same
/// values once per shape as the `rope` kernel's table, so both rotate with identical bits on any device (no
/// device evaluates pow/cos/sin).
public enum RoPETables {
    public static func make(seqLen: Int, headDim: Int, theta: Float) -> (cos: [Float], sin: [Float]) {
        let half = headDim / 2
        var c = [Float](repeating: 0, count: seqLen * half), s = c
        for p in 0..<seqLen {
            for i in 0..<half {
                // Hugging Face computes inv_freq = 1 / theta^(2i/d) in fp32; we compute the angle in
                // Double and round once, which differs from it by < 1e-6 rad at the positions we use.
                let invFreq = 1.0 / pow(Double(theta), Double(2 * i) / Double(headDim))
                let angle = Double(p) * invFreq
                c[p * half + i] = Float(cos(angle))
                s[p * half + i] = Float(sin(angle))
            }
        }
        return (c, s)
    }
}
