import CReLoRA
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// Random training windows from a token array, nanoGPT-style: each sequence is `seqLen + 1`
/// consecutive tokens starting at a uniformly random offset; inputs are the first `seqLen`, targets the
/// last `seqLen`. The offset of sequence `b` of micro-batch `micro` at step `step` is a pure function
/// of (seed, step, micro, b) through the counter-based RNG, so the data position of a run is just its
/// step number: resuming needs no sampler state and reproduces the same batches.
public struct WindowSampler: Sendable {
    public let tokens: TokenArray
    public let seqLen: Int
    public let seed: UInt64

    public init(tokens: TokenArray, seqLen: Int, seed: UInt64) throws {
        guard tokens.count > seqLen + 1 else {
            throw ReLoRAError.invalidData("\(tokens.path) has \(tokens.count) tokens; training windows need more than seq_len + 1 = \(seqLen + 1)")
        }
        self.tokens = tokens; self.seqLen = seqLen; self.seed = seed
    }

    /// `(inputs, targets)`, each `[microBatch * seqLen]`.
    public func batch(step: Int, micro: Int, microBatch: Int) -> (inputs: [Int32], targets: [Int32]) {
        let span = UInt64(tokens.count - seqLen)  // valid starts: 0 ..< count - seqLen
        var inputs = [Int32](), targets = [Int32]()
        inputs.reserveCapacity(microBatch * seqLen); targets.reserveCapacity(microBatch * seqLen)
        for b in 0..<microBatch {
            // Stream = step; counter = (micro, b). Modulo bias is < span / 2^64: negligible.
            let r = relora_rng_u64(seed, UInt64(step), UInt64(micro) << 32 | UInt64(b))
            let start = Int(r % span)
            let w = tokens.window(start, seqLen + 1)
            inputs += w.dropLast()
            targets += w.dropFirst()
        }
        return (inputs, targets)
    }
}
