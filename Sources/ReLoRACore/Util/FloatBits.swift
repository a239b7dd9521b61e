/// Bit-exact conversions between binary32 and the 16-bit float formats, written out so they are the
/// same on every platform and serve as the spec the CUDA conversions are checked against.
public enum FloatBits {
    /// bfloat16 is the upper half of a binary32, so widening is exact.
    @inline(__always)
    public static func floatFromBFloat16(_ bits: UInt16) -> Float {
        Float(bitPattern: UInt32(bits) << 16)
    }

    /// binary32 -> bfloat16, round to nearest, ties to even (what PyTorch's `.to(torch.bfloat16)` does).
    /// Values past the largest bfloat16 round to infinity; NaNs stay NaN with their sign, quieted.
    @inline(__always)
    public static func bfloat16(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        if value.isNaN { return UInt16(truncatingIfNeeded: bits >> 16) | 0x0040 }
        let roundingBias: UInt32 = 0x7FFF + ((bits >> 16) & 1)
        return UInt16(truncatingIfNeeded: (bits &+ roundingBias) >> 16)
    }

    /// IEEE binary16 -> binary32, exact. Layout: sign 1 | exponent 5 (bias 15) | mantissa 10.
    /// Written out rather than via `Float16` so it is the same on every platform and serves as the spec.
    @inline(__always)
    public static func floatFromFloat16(_ bits: UInt16) -> Float {
        let sign = UInt32(bits & 0x8000) << 16
        let exponent = UInt32(bits >> 10) & 0x1F
        let mantissa = UInt32(bits & 0x03FF)
        switch exponent {
        case 0:
            // Zero or subnormal: mantissa * 2^-24, exactly representable in binary32.
            let magnitude = Float(mantissa) * 0x1p-24
            return sign == 0 ? magnitude : -magnitude
        case 0x1F:
            // Infinity (mantissa 0) or NaN (payload kept in the top mantissa bits).
            return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
        default:
            // Rebias the exponent from 15 to 127.
            return Float(bitPattern: sign | ((exponent + 112) << 23) | (mantissa << 13))
        }
    }

    /// binary32 -> IEEE binary16, round to nearest, ties to even (Swift's `Float16` conversion, which
    /// handles overflow to infinity and subnormals as IEEE 754 says).
    @inline(__always)
    public static func float16(_ value: Float) -> UInt16 {
        Float16(value).bitPattern
    }
}
