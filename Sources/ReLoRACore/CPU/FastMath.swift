/// Vectorized fp32 exp for the CPU backend's hot loops (softmax in cross-entropy and attention).
///
/// Cephes' `expf` algorithm: `x = n*ln2 + r` with `|r| <= ln2/2` (ln2 split in two constants so the
/// reduction is exact to fp32), a degree-6 polynomial for `e^r`, and `2^n` built in the exponent
/// bits. Relative error <= 2 ulp over the clamped range [-87.3, 88.7]; below it the result is the
/// smallest normal range (~1e-38) instead of a denormal or 0, which no softmax can tell apart from 0
/// after normalisation. Tests compare the ops using it against Double references.
@inline(__always)
func simdExp(_ x: SIMD8<Float>) -> SIMD8<Float> {
    // Compare-and-blend rather than `clamped`: the generic SIMD min/max were not inlined in -O builds
    // (profiled: 4 % of a training step in `pointwiseMax`/`pointwiseMin` calls).
    let lo = SIMD8<Float>(repeating: -87.3), hi = SIMD8<Float>(repeating: 88.7)
    let x = x.replacing(with: lo, where: x .< lo).replacing(with: hi, where: x .> hi)
    // Round x*log2(e) to the nearest integer with the 1.5*2^23 trick: adding it pushes the fraction
    // out of the mantissa, whose low bits then hold n (no float->int conversion, which Swift's
    // generic SIMD code would do lane by lane).
    let magic = SIMD8<Float>(repeating: 12582912)
    let t = x * 1.44269504088896341 + magic
    let n = t - magic
    var r = x - n * 0.693359375
    r = r - n * -2.12194440e-4
    var p = SIMD8<Float>(repeating: 1.9875691500e-4)
    p = p * r + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    let y = p * (r * r) + r + 1
    let ni = unsafeBitCast(t, to: SIMD8<Int32>.self) &- unsafeBitCast(magic, to: SIMD8<Int32>.self)
    let bits = (ni &+ 127) &<< 23
    return y * unsafeBitCast(bits, to: SIMD8<Float>.self)
}

@inline(__always)
func loadSIMD8(_ p: UnsafePointer<Float>) -> SIMD8<Float> {
    UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self)
}

@inline(__always)
func storeSIMD8(_ v: SIMD8<Float>, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD8<Float>.self)
}

/// Maximum of `count` floats.
@inline(__always)
func rowMax(_ p: UnsafePointer<Float>, _ count: Int) -> Float {
    var m8 = SIMD8<Float>(repeating: -.infinity)
    var j = 0
    while j + 8 <= count { let v = loadSIMD8(p + j); m8.replace(with: v, where: v .> m8); j += 8 }
    var m = m8.max()
    while j < count { m = max(m, p[j]); j += 1 }
    return m
}

/// `out[j] = exp(p[j] - shift)` for j < count (out may equal p); returns the sum (fp32 lanes).
@inline(__always)
func expShiftedSum(_ p: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>?, _ count: Int, shift: Float) -> Float {
    var s8 = SIMD8<Float>()
    let shift8 = SIMD8<Float>(repeating: shift)
    var j = 0
    while j + 8 <= count {
        let e = simdExp(loadSIMD8(p + j) - shift8)
        if let o = out { storeSIMD8(e, o + j) }
        s8 += e
        j += 8
    }
    var s = s8.sum()
    while j < count {
        let e = simdExp(SIMD8(repeating: p[j] - shift))[0]
        out?[j] = e
        s += e
        j += 1
    }
    return s
}
