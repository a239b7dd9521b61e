/// How `Backend.quantize` rounds each weight to one of its block's codes. Both use the block scale of the
/// format's reference quantizer (`relora_quant.h`); they differ only in the choice between the two codes
/// around a value.
public enum QuantRounding: Sendable, Equatable {
    /// The nearest code (the formats' reference quantizers, byte-compatible with ggml and bitsandbytes).
    case nearest
    /// Down or up with probability proportional to the distance to the other code, so the dequantized
    /// value equals the input in expectation (`relora_quantize_row_*_sr`). Element `(r, c)` of a
    /// `[rows, cols]` matrix draws counter `r * paddedCols + c` of `(seed, stream)`: the codes are a pure
    /// function of (seed, stream, element), the same on every backend and in any thread layout.
    case stochastic(seed: UInt64, stream: UInt64)
}
