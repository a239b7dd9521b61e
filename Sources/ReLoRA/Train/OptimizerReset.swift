import CReLoRA

/// ReLoRA's partial optimizer reset at a restart: prune Adam's first and second moments of the LoRA
/// parameters (never the dense ones; the step counter is kept).
public enum OptimizerResetMode: String, Sendable, CaseIterable {
    /// Zero the entries whose magnitude is at or below the `ratio`-quantile of the tensor's magnitudes.
    case magnitude
    /// Zero each entry with probability `ratio` (counter-based RNG, reproducible).
    case random
    /// Zero everything.
    case full
    /// No reset (ablation).
    case none
}

public enum OptimizerReset {
    /// Prunes `tensor` in place and returns how many entries are zero afterwards because of it.
    ///
    /// Magnitude mode finds the exact k-th smallest |x| (k = ceil(ratio * n)) without sorting or copying:
    /// for non-negative IEEE floats the bit pattern orders like the value, so a two-pass radix select
    /// on the 32-bit patterns of |x| (a 65,536-bin histogram of the high 16 bits, then of the low 16 bits
    /// inside the chosen bin) gives the threshold in O(n) time and O(1) extra memory for any tensor size.
    /// Entries equal to the threshold are zeroed too, so ties (e.g. many exact zeros) can raise the
    /// fraction above `ratio`; for continuous values it is k/n.
    @discardableResult
    public static func apply(_ mode: OptimizerResetMode, ratio: Double, to tensor: Tensor, seed: UInt64, stream: UInt64) -> Int {
        let n = tensor.count
        guard n > 0 else { return 0 }
        let p = tensor.f32
        switch mode {
        case .none:
            return 0
        case .full:
            tensor.fill(0)
            return n
        case .random:
            var zeroed = 0
            for i in 0..<n where Double(relora_rng_uniform(seed, stream, UInt64(i))) < ratio {
                p[i] = 0
                zeroed += 1
            }
            return zeroed
        case .magnitude:
            let k = Int((ratio * Double(n)).rounded(.up))
            guard k > 0 else { return 0 }
            if k >= n { tensor.fill(0); return n }
            let threshold = kthSmallestMagnitudeBits(p, n, k)
            var zeroed = 0
            for i in 0..<n where p[i].bitPattern & 0x7FFF_FFFF <= threshold {
                p[i] = 0
                zeroed += 1
            }
            return zeroed
        }
    }

    /// Bit pattern of the k-th smallest |x| (1-based k) among p[0..<n]. NaNs sort above everything.
    static func kthSmallestMagnitudeBits(_ p: UnsafeMutablePointer<Float>, _ n: Int, _ k: Int) -> UInt32 {
        var hist = [Int](repeating: 0, count: 65536)
        for i in 0..<n { hist[Int((p[i].bitPattern & 0x7FFF_FFFF) >> 16)] += 1 }
        var remaining = k, high = 0
        while remaining > hist[high] { remaining -= hist[high]; high += 1 }
        hist = [Int](repeating: 0, count: 65536)
        for i in 0..<n {
            let bits = p[i].bitPattern & 0x7FFF_FFFF
            if Int(bits >> 16) == high { hist[Int(bits & 0xFFFF)] += 1 }
        }
        var low = 0
        while remaining > hist[low] { remaining -= hist[low]; low += 1 }
        return UInt32(high) << 16 | UInt32(low)
    }
}
