import CReLoRA
import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain

/// The conformance suite's driver: input generation, tensors made through the backend, comparisons that
/// record a `ConformanceCheck`, the tolerance model and the finite-difference check. The op checks live
/// in the `ConformanceSuite+*.swift` files, one per op family; the Double references in
/// `NaiveReference.swift`.
///
/// Everything goes through `Backend` ops: inputs are uploaded, results downloaded. Nothing here reads
/// tensor memory, so the suite checks any backend, and it checks upload/download themselves first
/// (group `transfers`) against the bit-exact conversions of `FloatBits`.
final class ConformanceSuite {
    let backend: Backend
    let computeDTypes: [DType]
    private let progress: ((ConformanceCheck) -> Void)?
    private(set) var checks: [ConformanceCheck] = []
    private(set) var group = ConformanceGroup.memory
    private var nextStream: UInt64 = 0

    /// The float storage types every backend converts between.
    static let floatTypes: [DType] = [.f32, .bf16, .f16]
    /// Seed of the inputs the suite generates (with `relora_rng`, so they are the same on every platform).
    static let inputSeed: UInt64 = 0x5E1F_7E57

    init(backend: Backend, computeDTypes: [DType], progress: ((ConformanceCheck) -> Void)?) {
        self.backend = backend
        self.computeDTypes = computeDTypes
        self.progress = progress
    }

    func run(_ group: ConformanceGroup) {
        self.group = group
        // Each group draws its inputs from streams of its own, so a group's inputs do not depend on
        // which groups ran before it (XCTest runs them one at a time).
        nextStream = UInt64(ConformanceGroup.allCases.firstIndex(of: group)!) << 24
        switch group {
        case .memory: checkMemory()
        case .transfers: checkTransfers()
        case .random: checkRandom()
        case .matmul: checkMatmul()
        case .rmsnorm: checkRMSNorm()
        case .rope: checkRope()
        case .attention: checkAttention()
        case .swiglu: checkSwiGLU()
        case .embedding: checkEmbedding()
        case .crossEntropy: checkCrossEntropy()
        case .dropout: checkDropout()
        case .reductions: checkReductions()
        case .elementwise: checkElementwise()
        case .adamw: checkAdamW(); checkAdamW8bit(); checkOptimizerStep()
        case .prune: checkPrune()
        case .quantization: checkQuantization()
        case .training: break  // TrainingConformance, which needs a second backend
        case .collectives: break  // CollectiveConformance, which needs a communicator
        }
    }

    // MARK: Tolerance model

    /// Unit roundoff `u = 2^-p` of a float dtype with a p-bit significand: round to nearest gives
    /// `|fl(x) - x| <= u |x|`. f32: 2^-24, bf16: 2^-8, f16: 2^-11.
    static func unitRoundoff(_ dtype: DType) -> Double {
        switch dtype {
        case .f32: return 0x1p-24
        case .bf16: return 0x1p-8
        case .f16: return 0x1p-11
        case .i8, .u8, .i32: return 0
        }
    }

    /// Relative tolerance of a result that rounds `acc` times in f32 and `io` times in `dtype`:
    /// `2 * (acc * u_f32 + io * u_dtype)`; a check's bound is this times the result's magnitude (the sum
    /// of the absolute values of the terms it is computed from, so cancellation is covered).
    ///
    /// The first-order forward-error bound of a computation with `n` roundings in precision `u` is
    /// `n * u * magnitude` (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3): `acc`
    /// counts the roundings of f32 arithmetic (accumulators, which the precision plan keeps in f32 for
    /// every compute dtype, and transcendental functions at ~2 ulp each), `io` those into the op's dtype
    /// (the stored output, and intermediates a kernel may keep in it, e.g. attention probabilities in bf16).
    /// Inputs carry no error: the references read the values the tensors hold. The factor 2 covers the
    /// second-order terms and the few roundings implementations legitimately differ in (FMA or not,
    /// `alpha * s` premultiplied or not, reduction order); a wrong op is off by O(|value|), which in f32 is
    /// ~10^4 times past these bounds even for the longest reductions here.
    func tolerance(acc: Double, io: Double, _ dtype: DType) -> Double {
        2 * (acc * Self.unitRoundoff(.f32) + io * Self.unitRoundoff(dtype))
    }

    /// `x` rounded to `dtype`, round to nearest even: the conversion `FloatBits` specifies.
    static func round(_ x: Float, to dtype: DType) -> Float {
        switch dtype {
        case .bf16: return FloatBits.floatFromBFloat16(FloatBits.bfloat16(x))
        case .f16: return FloatBits.floatFromFloat16(FloatBits.float16(x))
        default: return x
        }
    }

    // MARK: Inputs

    /// A fresh RNG stream for the next input array.
    func stream() -> UInt64 { nextStream += 1; return nextStream }

    /// `count` values uniform in `[lo, hi)` on the grid of 2^-16 (the finite differences' steps, multiples
    /// of 2^-5, are then exact in f32 for |x| < 128), from the counter RNG, so they are the same on
    /// every platform and in every run.
    func values(_ count: Int, _ lo: Double, _ hi: Double) -> [Float] {
        let s = stream()
        return (0..<count).map { i in
            let u = Double(relora_rng_uniform(Self.inputSeed, s, UInt64(i)))
            return Float(((lo + (hi - lo) * u) * 65536).rounded(.down) / 65536)
        }
    }

    /// A uniform integer in `0..<bound` for each of `count` draws.
    func integers(_ count: Int, below bound: Int) -> [Int] {
        let s = stream()
        return (0..<count).map { i in Int(relora_rng_u64(Self.inputSeed, s, UInt64(i)) % UInt64(bound)) }
    }

    /// A tensor of `dtype` holding `values` rounded to it, and the values it holds (computed on the host
    /// with `FloatBits`, independently of the backend's download).
    func tensor(_ shape: [Int], _ dtype: DType, _ values: [Float], tag: MemoryTag = .workspace) -> (Tensor, [Float]) {
        let t = backend.makeTensor(shape, dtype: dtype, tag: tag, zeroed: false)
        backend.upload(values, to: t)
        return (t, values.map { Self.round($0, to: dtype) })
    }

    /// An output tensor filled with NaN, so an element the op should write but does not shows as a failure.
    func output(_ shape: [Int], _ dtype: DType) -> Tensor {
        let t = backend.makeTensor(shape, dtype: dtype, tag: .workspace, zeroed: false)
        backend.upload([Float](repeating: .nan, count: t.count), to: t)
        return t
    }

    /// An i32 tensor of token ids or targets.
    func ids(_ values: [Int32]) -> Tensor {
        let t = backend.makeTensor([values.count], dtype: .i32, tag: .workspace, zeroed: false)
        backend.upload(values, to: t)
        return t
    }

    // MARK: Recording

    func record(_ op: String, _ shape: String, _ dtype: String, maxError: Double, bound: Double, passed: Bool, note: String = "") {
        let check = ConformanceCheck(group: group, op: op, shape: shape, dtype: dtype, maxError: maxError, bound: bound,
                                     passed: passed, note: passed ? "" : note)
        checks.append(check)
        progress?(check)
    }

    /// A check that could not run.
    func fail(_ group: ConformanceGroup, _ op: String, _ shape: String, _ dtype: String, note: String) {
        self.group = group
        record(op, shape, dtype, maxError: .infinity, bound: 0, passed: false, note: note)
    }

    /// Element-wise `|got[i] - want[i]| <= bound[i]`. NaN is expected only where the reference is NaN;
    /// an infinite reference must be matched exactly. Records the element with the largest error/bound.
    func expect(_ op: String, _ shape: String, _ dtype: String, got: [Float], want: [Double], bound: [Double]) {
        precondition(want.count == bound.count, "\(op): \(want.count) references, \(bound.count) bounds")
        guard got.count == want.count else {
            record(op, shape, dtype, maxError: .infinity, bound: 0, passed: false,
                   note: "\(got.count) values, expected \(want.count)")
            return
        }
        var worst = -1, worstRatio = -1.0, worstError = 0.0, failures = 0
        for i in 0..<got.count {
            let g = Double(got[i]), w = want[i]
            let err: Double
            if w.isNaN || g.isNaN { err = (w.isNaN && g.isNaN) ? 0 : .infinity }
            else if w.isInfinite || g.isInfinite { err = g == w ? 0 : .infinity }
            else { err = abs(g - w) }
            if err > bound[i] { failures += 1 }
            let ratio = bound[i] > 0 ? err / bound[i] : (err > 0 ? .infinity : 0)
            if ratio > worstRatio || (ratio == worstRatio && err > worstError) {
                worst = i; worstRatio = ratio; worstError = err
            }
        }
        guard worst >= 0 else {
            record(op, shape, dtype, maxError: 0, bound: 0, passed: true)
            return
        }
        let note = "\(failures) of \(got.count) out of bound, worst [\(worst)]: got \(got[worst]), want \(want[worst])"
        record(op, shape, dtype, maxError: worstError, bound: bound[worst], passed: failures == 0, note: note)
    }

    /// `expect` with one relative tolerance: `bound[i] = tolerance * magnitude[i] + 4 eta`, where eta, half
    /// the smallest subnormal of the dtype, is the absolute error of rounding into it in the gradual
    /// underflow range (|fl(x) - x| <= u|x| + eta; e.g. a softmax probability of 1e-12 is 0 in f16), four
    /// roundings' worth. A reference with magnitude 0 is exactly 0 (nothing was computed) and must be.
    func expect(_ op: String, _ shape: String, _ dtype: DType, got: [Float], want: [Double], magnitude: [Double],
                tolerance: Double) {
        let eta = Self.underflow(dtype)
        expect(op, shape, dtype.rawValue, got: got, want: want, bound: magnitude.map { $0 == 0 ? 0 : tolerance * $0 + 4 * eta })
    }

    /// Half the smallest positive subnormal of a float dtype: f32 2^-150, bf16 2^-134, f16 2^-25.
    static func underflow(_ dtype: DType) -> Double {
        switch dtype {
        case .f32: return 0x1p-150
        case .bf16: return 0x1p-134
        case .f16: return 0x1p-25
        case .i8, .u8, .i32: return 0
        }
    }

    /// Bit-exact equality (any NaN matches any NaN: payloads may differ between backends).
    func expectBits(_ op: String, _ shape: String, _ dtype: String, got: [Float], want: [Float]) {
        guard got.count == want.count else {
            record(op, shape, dtype, maxError: .infinity, bound: 0, passed: false, note: "\(got.count) values, expected \(want.count)")
            return
        }
        var worst = -1, worstError = 0.0, failures = 0
        for i in 0..<got.count where got[i].bitPattern != want[i].bitPattern && !(got[i].isNaN && want[i].isNaN) {
            failures += 1
            let d = abs(Double(got[i]) - Double(want[i]))
            let err = (d.isNaN || d == 0) ? .infinity : d  // NaN vs number, or -0 vs +0
            if worst < 0 || err > worstError { worst = i; worstError = err }
        }
        let note = worst < 0 ? "" : "\(failures) of \(got.count) differ, worst [\(worst)]: got \(got[worst]), want \(want[worst])"
        record(op, shape, dtype, maxError: worstError, bound: 0, passed: failures == 0, note: note)
    }

    /// A scalar within `bound` of its reference.
    func expectScalar(_ op: String, _ shape: String, _ dtype: String, got: Double, want: Double, bound: Double) {
        let err = got.isNaN || want.isNaN ? .infinity : abs(got - want)
        record(op, shape, dtype, maxError: err, bound: bound, passed: err <= bound, note: "got \(got), want \(want)")
    }

    /// A count equal to its reference.
    func expectCount(_ op: String, _ shape: String, _ dtype: String, got: Int, want: Int, note: String = "") {
        record(op, shape, dtype, maxError: Double(abs(got - want)), bound: 0, passed: got == want && note.isEmpty,
               note: note.isEmpty ? "got \(got), want \(want)" : note)
    }

    /// A statistic (|sample mean - mean|, ...) within its bound.
    func expectWithin(_ op: String, _ shape: String, _ dtype: String, value: Double, bound: Double, note: String = "") {
        record(op, shape, dtype, maxError: value, bound: bound, passed: value <= bound, note: note.isEmpty ? "\(value) > \(bound)" : note)
    }

    // MARK: Finite differences

    /// Step of the finite differences: 2^-5 (x +- h, x +- 2h, x +- 4h are exact on the input grid, see `values`).
    static let fdStep: Float = 0x1p-5

    /// Checks `analytic`, the backend's gradient of `loss` with respect to `x`, at `samples` evenly spaced
    /// elements against the fourth-order central difference `D(h) = (8(f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h`
    /// of the backend's forward: `x` lives in the f32 `tensor`, each evaluation uploads the perturbed values
    /// and calls `loss`, which runs the forward on the backend and returns `sum(out * r)` in Double from
    /// the downloaded output. `reference` is the same loss in Double from the host values (the naive forward).
    ///
    /// Bound, derived, per element, with no guessed constant for the forward's rounding:
    /// - rounding: the backend's loss differs from the exact one by `e(d) = |loss(x+d) - reference(x+d)|`,
    ///   measured at each of the four points, so `D(h)` is off by at most `(8(e(h) + e(-h)) + e(2h) + e(-2h)) / 12h`;
    /// - truncation: `D(h) - f' ~ c h^4`, so `D(2h) - D(h) ~ 15 c h^4` (Richardson): `|D(2h) - D(h)| / 15`
    ///   estimates it from the noise-free reference; twice that is allowed;
    /// - the analytic gradient's own rounding (f32, a few dozen roundings, the backward checks bound it
    ///   tightly): `1e-5 (1 + |D|)`.
    /// A wrong backward is off by O(|grad|), typically 10^3 times these.
    func finiteDifferences(_ op: String, _ shape: String, x: [Float], in tensor: Tensor, analytic: [Float],
                           samples: Int = 24, loss: () -> Double, reference: ([Float]) -> Double) {
        guard analytic.count == x.count else {
            record(op + " (finite differences)", shape, "f32", maxError: .infinity, bound: 0, passed: false,
                   note: "gradient has \(analytic.count) values for \(x.count) inputs")
            return
        }
        let h = Self.fdStep
        func stencil(_ f: (Float) -> Double, _ h: Float) -> Double {
            (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * Double(h))
        }
        var got: [Float] = [], want: [Double] = [], bound: [Double] = []
        for i in Swift.stride(from: 0, to: x.count, by: max(1, x.count / samples)) {
            func perturbed(_ delta: Float) -> [Float] { var p = x; p[i] += delta; return p }
            var roundingError = 0.0
            let fd = stencil({ delta in
                let p = perturbed(delta)
                backend.upload(p, to: tensor)
                let value = loss()
                let e = value.isNaN ? Double.infinity : abs(value - reference(p))
                roundingError += (abs(delta) == h ? 8 : 1) * e / (12 * Double(h))
                return value
            }, h)
            let truncation = abs(stencil({ reference(perturbed($0)) }, 2 * h) - stencil({ reference(perturbed($0)) }, h)) / 15
            got.append(analytic[i])
            want.append(fd)
            bound.append(roundingError + 2 * truncation + 1e-5 * (1 + abs(fd)))
        }
        backend.upload(x, to: tensor)
        expect(op + " (finite differences)", shape, "f32", got: got, want: want, bound: bound)
    }

    /// `sum_i a[i] * b[i]` in Double.
    static func dot(_ a: [Float], _ b: [Float]) -> Double {
        var s = 0.0
        for i in 0..<min(a.count, b.count) { s += Double(a[i]) * Double(b[i]) }
        return s
    }

    /// `sum_i a[i] * b[i]` of a Double reference and host values.
    static func dot(_ a: [Double], _ b: [Float]) -> Double {
        var s = 0.0
        for i in 0..<min(a.count, b.count) { s += a[i] * Double(b[i]) }
        return s
    }
}
