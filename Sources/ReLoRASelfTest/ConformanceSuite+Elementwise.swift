import CReLoRA
import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain

/// Dropout, the reductions, axpy/scale, AdamW and pruning. Ops that act on "the first `count` elements"
/// get a tensor longer than `count`, and the tail must come back untouched.
extension ConformanceSuite {
    // MARK: Dropout

    func checkDropout() {
        let size = 1100, count = 1031, p: Float = 0.3, seed: UInt64 = 99, stream: UInt64 = 3
        let shape = "\(count) of \(size) p 0.3"
        for dtype in computeDTypes {
            // Nonzero inputs, so a dropped element (0) is told from a kept one.
            let xs = values(size, -2, 2).map { $0 == 0 ? 0.5 : $0 }
            let (x, xv) = tensor([size], dtype, xs)
            let (out, outBefore) = tensor([size], dtype, values(size, -1, 1))
            backend.dropout(x, out, count: count, p: p, seed: seed, stream: stream)
            let got = backend.download(out)
            // The mask is specified exactly: element i is kept iff uniform(seed, stream, i) >= p.
            let kept = (0..<count).map { relora_rng_uniform(seed, stream, UInt64($0)) >= p }
            expectCount("dropout mask (kept elements as specified)", shape, dtype.rawValue,
                        got: (0..<count).filter { (got[$0] != 0) != kept[$0] }.count, want: 0)
            // Kept values: x / (1 - p), computed as x * (1 / (1 - p)) or x / (1 - p): up to 2 f32 roundings.
            let keep = 1 / (1 - Double(p))
            let want = (0..<count).map { kept[$0] ? Double(xv[$0]) * keep : 0 }
            expect("dropout values", shape, dtype, got: Array(got.prefix(count)), want: want,
                   magnitude: want.map(abs), tolerance: tolerance(acc: 3, io: 1, dtype))
            expectBits("dropout leaves [count...] alone", shape, dtype.rawValue, got: Array(got.suffix(size - count)),
                       want: Array(outBefore.suffix(size - count)))
            // In place (out = x): the same values as out of place, and the tail of x untouched.
            backend.dropout(x, x, count: count, p: p, seed: seed, stream: stream)
            let inPlace = backend.download(x)
            expectBits("dropout in place", shape, dtype.rawValue, got: inPlace, want: Array(got.prefix(count)) + xv.suffix(size - count))
        }
    }

    // MARK: Reductions

    func checkReductions() {
        for dtype in computeDTypes {
            // dotAccumulate: out[0] += sum_{i < count} a_i b_i (out f32). Specified as a Double sum; the bound
            // allows a sequential f32 one (count + 2 roundings relative to sum |a b| + |out|), one into out.
            let size = 101, count = 97
            let (a, av) = tensor([size], dtype, values(size, -1, 1))
            let (b, bv) = tensor([size], dtype, values(size, -1, 1))
            let (out, out0) = tensor([1], .f32, [0.5])  // f32 in every compute dtype, as the model's
            backend.dotAccumulate(a, b, count: count, into: out)
            var sum = Double(out0[0]), magnitude = abs(Double(out0[0]))
            for i in 0..<count { sum += Double(av[i]) * Double(bv[i]); magnitude += abs(Double(av[i]) * Double(bv[i])) }
            expect("dotAccumulate (accumulates)", "\(count) of \(size)", dtype, got: backend.download(out), want: [sum],
                   magnitude: [magnitude], tolerance: tolerance(acc: Double(count + 2), io: 1, dtype))

            // sumOfSquares into slot 1 of an f32 [3]; slots 0 and 2 keep their values. Positive terms: the
            // relative bound of an n-term sum (n + 1 roundings), the slot is f32.
            let n = 1031
            let (x, xv) = tensor([n], dtype, values(n, -2, 2))
            let (slots, slots0) = tensor([3], .f32, [7, -1, 9])
            backend.sumOfSquares(x, into: slots, at: 1)
            let got = backend.download(slots)
            let ss = xv.reduce(0.0) { $0 + Double($1) * Double($1) }
            expect("sumOfSquares(into:at: 1)", "\(n)", dtype, got: [got.count == 3 ? got[1] : .nan], want: [ss],
                   magnitude: [ss], tolerance: tolerance(acc: Double(n + 2), io: 0, dtype))
            expectBits("sumOfSquares leaves other slots alone", "\(n)", dtype.rawValue,
                       got: got.count == 3 ? [got[0], got[2]] : got, want: [slots0[0], slots0[2]])

            // The extension: squared norms of several tensors, one download, summed in Double.
            let sizes = [37, 1031, 5]
            var total = 0.0, bound = 0.0
            let tensors: [Tensor] = sizes.map { len in
                let (t, tv) = tensor([len], dtype, values(len, -1, 1))
                let s = tv.reduce(0.0) { $0 + Double($1) * Double($1) }
                total += s
                bound += tolerance(acc: Double(len + 2), io: 0, dtype) * s
                return t
            }
            expectScalar("sumOfSquares([Tensor])", sizes.map(String.init).joined(separator: "+"), dtype.rawValue,
                         got: backend.sumOfSquares(tensors), want: total, bound: bound)
            expectScalar("sumOfSquares([])", "-", dtype.rawValue, got: backend.sumOfSquares([]), want: 0, bound: 0)
        }
    }

    // MARK: axpy, scale

    func checkElementwise() {
        let size = 101, count = 97
        for dtype in computeDTypes {
            // a += alpha b over the first count: a product and a sum (2 roundings, or 1 with FMA), relative
            // to |a| + |alpha b|; the rest of a untouched.
            let alpha: Float = -0.6
            let (a, av) = tensor([size], dtype, values(size, -1, 1))
            let (b, bv) = tensor([size], dtype, values(size, -1, 1))
            backend.axpy(alpha, b, a, count: count)
            let got = backend.download(a)
            let want = (0..<count).map { Double(av[$0]) + Double(alpha) * Double(bv[$0]) }
            let magnitude = (0..<count).map { abs(Double(av[$0])) + abs(Double(alpha) * Double(bv[$0])) }
            expect("axpy", "\(count) of \(size) alpha -0.6", dtype, got: Array(got.prefix(count)), want: want,
                   magnitude: magnitude, tolerance: tolerance(acc: 2, io: 1, dtype))
            expectBits("axpy leaves [count...] alone", "\(count) of \(size)", dtype.rawValue,
                       got: Array(got.suffix(size - count)), want: Array(av.suffix(size - count)))
            // The whole-tensor extension.
            let (a2, a2v) = tensor([size], dtype, values(size, -1, 1))
            backend.axpy(alpha, b, a2)
            expect("axpy (all elements)", "\(size) alpha -0.6", dtype, got: backend.download(a2),
                   want: (0..<size).map { Double(a2v[$0]) + Double(alpha) * Double(bv[$0]) },
                   magnitude: (0..<size).map { abs(Double(a2v[$0])) + abs(Double(alpha) * Double(bv[$0])) },
                   tolerance: tolerance(acc: 2, io: 1, dtype))

            // x *= alpha: one product.
            let (x, xv) = tensor([size], dtype, values(size, -3, 3))
            backend.scale(x, by: 0.37)
            let scaled = xv.map { Double($0) * Double(Float(0.37)) }
            expect("scale", "\(size) by 0.37", dtype, got: backend.download(x), want: scaled, magnitude: scaled.map(abs),
                   tolerance: tolerance(acc: 1, io: 1, dtype))
        }
    }

    // MARK: AdamW

    /// AdamW in f32 (param, grad, m, v are f32 by contract: master copies and optimizer states), three
    /// steps from zero states, against PyTorch's semantics in Double. The bound is the first-order error
    /// propagated through the steps by `NaiveReference.adamw` (in units of u), times 2u.
    func checkAdamW() {
        let n = 37, steps = 3
        let lr: Float = 1e-2, beta1: Float = 0.9, beta2: Float = 0.999, eps: Float = 1e-8, wd: Float = 0.1
        let shape = "\(n) x \(steps) steps lr 1e-2 wd 0.1"
        var ps = values(n, -1, 1)
        ps[0] = 0
        let (p, p0) = tensor([n], .f32, ps)
        let m = backend.makeTensor([n], dtype: .f32, tag: .optimizer, zeroed: true)
        let v = backend.makeTensor([n], dtype: .f32, tag: .optimizer, zeroed: true)
        var grads: [[Float]] = []
        for _ in 0..<steps {
            var g = values(n, -1, 1)
            g[1] = 0          // a zero gradient: v = 0, the update is 0 / (0 + eps)
            g[2] *= 1e3       // a large one, and a tiny one
            g[3] *= 1e-4
            grads.append(g)
        }
        for (t, g) in grads.enumerated() {
            let (gt, _) = tensor([n], .f32, g)
            backend.adamw(param: p, grad: gt, m: m, v: v, lr: lr, beta1: beta1, beta2: beta2, eps: eps, weightDecay: wd, step: t + 1)
        }
        // The Float hyperparameters as Double (beta2 = 0.99900001 in f32; 1 - beta2 is exact in f32).
        let ref = NaiveReference.adamw(p0: p0, m0: [Float](repeating: 0, count: n), v0: [Float](repeating: 0, count: n),
                                       grads: grads, lr: Double(lr), beta1: Double(beta1), beta2: Double(beta2),
                                       eps: Double(eps), weightDecay: Double(wd), firstStep: 1)
        let tol = tolerance(acc: 1, io: 0, .f32)
        expect("adamw param", shape, .f32, got: backend.download(p), want: ref.p.value, magnitude: ref.p.magnitude, tolerance: tol)
        expect("adamw m", shape, .f32, got: backend.download(m), want: ref.m.value, magnitude: ref.m.magnitude, tolerance: tol)
        expect("adamw v", shape, .f32, got: backend.download(v), want: ref.v.value, magnitude: ref.v.magnitude, tolerance: tol)
    }

    /// The multi-tensor step (`gradientNorm(_:clip:)` then `adamwStep`, a device's few launches over all tensors)
    /// against the same backend's per-tensor ops (`loopingGradientNorm`, `loopingAdamwStep`), bit for bit: the norm
    /// (Double), parameters, clipped gradients, f32 and 8-bit moments and bf16 working copies, three steps
    /// (clipping, not, clipping) over tensors of 1, 300 (no working copy, no decay), 1100 (8-bit) and 9000
    /// entries, and a gradient no update reads. The norm also against Double sums of the squares. Then
    /// `zeroGradients(group)` against `zero` per tensor.
    func checkOptimizerStep() {
        let sizes = [1, 300, 1100, 9000], other = 5000
        let shape = sizes.map(String.init).joined(separator: "+") + "+\(other)"
        let initial = sizes.map { values($0, -1, 1) }, otherGrad = values(other, -0.01, 0.01)
        func group() -> (OptimizerGroup, [Tensor]) {
            var grads: [Tensor] = []
            let updates = sizes.enumerated().map { i, n -> OptimizerGroup.Update in
                let (param, _) = tensor([n], .f32, initial[i], tag: .masterWeights)
                let grad = backend.makeTensor([n], dtype: .f32, tag: .gradients, zeroed: true)
                grads.append(grad)
                let moments: OptimizerGroup.Moments = i == 2
                    ? .eightBit(m: BlockwiseMoments(backend: backend, shape: [n], isSigned: true, tag: .optimizer),
                                v: BlockwiseMoments(backend: backend, shape: [n], isSigned: false, tag: .optimizer))
                    : .f32(m: backend.makeTensor([n], dtype: .f32, tag: .optimizer, zeroed: true),
                           v: backend.makeTensor([n], dtype: .f32, tag: .optimizer, zeroed: true))
                let working = i == 1 ? nil : backend.makeTensor([n], dtype: .bf16, tag: .trainable, zeroed: true)
                return OptimizerGroup.Update(param: param, grad: grad, moments: moments, working: working, decay: i != 1)
            }
            let (rest, _) = tensor([other], .f32, otherGrad, tag: .gradients)
            return (OptimizerGroup(gradients: grads + [rest], updates: updates), grads)
        }
        let (multi, multiGrads) = group(), (looping, loopingGrads) = group()
        func state(_ g: OptimizerGroup) -> [UInt8] {
            g.updates.flatMap { $0.tensors.flatMap { backend.downloadRaw($0) } }
        }
        for (step, clip) in [(1, 0.5), (2, 0.0), (3, 0.2)] {
            var squares: [Double] = []
            for (i, n) in sizes.enumerated() {
                let g = values(n, -0.1, 0.1)
                backend.upload(g, to: multiGrads[i])
                backend.upload(g, to: loopingGrads[i])
                squares.append(g.reduce(0.0) { $0 + Double($1) * Double($1) })
            }
            let norm = backend.gradientNorm(multi, clip: clip), want = backend.loopingGradientNorm(looping, clip: clip)
            let label = "step \(step) clip \(clip)"
            record("gradientNorm(group) f64 bits", "\(shape) \(label)", "f64", maxError: norm.bitPattern == want.bitPattern ? 0 : .infinity,
                   bound: 0, passed: norm.bitPattern == want.bitPattern, note: "\(norm) vs \(want)")
            let rest = otherGrad.reduce(0.0) { $0 + Double($1) * Double($1) }
            let exact = (squares.reduce(0, +) + rest).squareRoot()
            // Each tensor's f32 rounding of its squared norm (u) and the Double sums: 2u of the norm suffices.
            expectScalar("gradientNorm(group) value", "\(shape) \(label)", "f64", got: norm, want: exact, bound: 2 * 0x1p-24 * exact)
            backend.adamwStep(multi, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1, step: step)
            backend.loopingAdamwStep(looping, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1, step: step)
            expectBytes("adamwStep(group) state", "\(shape) \(label)", "mixed", got: state(multi), want: state(looping))
        }
        // The next step's start: every gradient zeroed (a device's one launch over the group), as `zero` per tensor.
        backend.zeroGradients(multi)
        backend.loopingZeroGradients(looping)
        let zeroed = multi.gradients.flatMap { backend.downloadRaw($0) }
        expectBytes("zeroGradients(group)", shape, "f32", got: zeroed, want: looping.gradients.flatMap { backend.downloadRaw($0) })
        expectBytes("zeroGradients(group) zeros", shape, "f32", got: zeroed, want: [UInt8](repeating: 0, count: zeroed.count))
    }

    /// AdamW with blockwise 8-bit moments (`relora_adam8.h`): three steps from zero states on 3 blocks and a
    /// tail, with per-block gradient scales from 1e-4 to 1e2 and an all-zero block, against the header's host
    /// reference `relora_adamw8_block`: parameters, codes and scales bit for bit (every backend runs the same
    /// single-rounded operations). Then the moments' quantize and dequantize ops against the host functions,
    /// and requantizing the dequantized moments keeps them.
    func checkAdamW8bit() {
        let n = 3 * 256 + 77, steps = 3, blocks = BlockwiseMoments.blocks(n)
        let lr: Float = 1e-2, beta1: Float = 0.9, beta2: Float = 0.999, eps: Float = 1e-8, wd: Float = 0.1
        let shape = "\(n) x \(steps) steps"
        var p = values(n, -1, 1)
        let param = backend.makeTensor([n], dtype: .f32, tag: .trainable, zeroed: false)
        backend.upload(p, to: param)
        let m = BlockwiseMoments(backend: backend, shape: [n], isSigned: true, tag: .optimizer)
        let v = BlockwiseMoments(backend: backend, shape: [n], isSigned: false, tag: .optimizer)
        var mc = [UInt8](repeating: 0, count: n), vc = mc
        var ma = [Float](repeating: 0, count: blocks), va = ma
        let scales: [Float] = [1e-4, 0, 1e2, 1]
        for step in 1...steps {
            let g = values(n, -1, 1).enumerated().map { $1 * scales[$0 / 256] }
            let grad = backend.makeTensor([n], dtype: .f32, tag: .gradients, zeroed: false)
            backend.upload(g, to: grad)
            backend.adamw8bit(param: param, grad: grad, m: m, v: v, lr: lr, beta1: beta1, beta2: beta2, eps: eps, weightDecay: wd, step: step)
            var scalars = relora_adam_scalars_make(lr, beta1, beta2, eps, wd, Int64(step))
            for b in 0..<blocks {
                relora_adamw8_block(BlockwiseMoments.maps, nil, &scalars, &p, g, &mc, &ma, &vc, &va, Int64(n), Int64(b))  // binary search
            }
        }
        expectBits("adamw8bit param", shape, "f32", got: backend.download(param), want: p)
        expectBytes("adamw8bit m codes", shape, "u8", got: backend.downloadRaw(m.codes), want: mc)
        expectBytes("adamw8bit v codes", shape, "u8", got: backend.downloadRaw(v.codes), want: vc)
        expectBits("adamw8bit m absmax", shape, "f32", got: backend.download(m.absmax), want: ma)
        expectBits("adamw8bit v absmax", shape, "f32", got: backend.download(v.absmax), want: va)

        let x = values(n, -1, 1).enumerated().map { $1 * scales[$0 / 256] }
        let xt = backend.makeTensor([n], dtype: .f32, tag: .workspace, zeroed: false)
        for q in [m, v] {
            let input = q.isSigned ? x : x.map(abs)
            let label = q.isSigned ? "signed" : "unsigned"
            backend.upload(input, to: xt)
            backend.quantizeMoments(xt, into: q)
            let want = BlockwiseMoments.quantize(input, isSigned: q.isSigned)
            expectBytes("quantizeMoments codes", "\(n) \(label)", "u8", got: backend.downloadRaw(q.codes), want: want.codes)
            expectBits("quantizeMoments absmax", "\(n) \(label)", "f32", got: backend.download(q.absmax), want: want.absmax)
            backend.dequantizeMoments(q, into: xt)
            let values = BlockwiseMoments.dequantize(codes: want.codes, absmax: want.absmax, isSigned: q.isSigned)
            expectBits("dequantizeMoments", "\(n) \(label)", "f32", got: backend.download(xt), want: values)
            backend.quantizeMoments(xt, into: q)
            expectBytes("requantized moments", "\(n) \(label)", "u8", got: backend.downloadRaw(q.codes), want: want.codes)
        }
    }

    // MARK: Prune

    func checkPrune() {
        for dtype in computeDTypes {
            // Magnitude with many ties: 101 values +-k/8, k in 0..<8 (exact zeros, equal magnitudes of both
            // signs). k = ceil(0.3 * 101) = 31; every |x| <= the 31st smallest goes, so more than 31 may.
            let signs = integers(101, below: 2), levels = integers(101, below: 8)
            let tied: [Float] = (0..<101).map { i in
                let sign: Float = signs[i] == 0 ? 1 : -1
                return sign * Float(levels[i]) / 8
            }
            checkPrune(dtype, "101 with ties", tied, .magnitude(ratio: 0.3))
            // Distinct magnitudes: exactly k zeroed.
            let distinct: [Float] = (0..<1031).map { i in
                let sign: Float = i % 3 == 0 ? -1 : 1
                return sign * Float(i + 1) / 1031
            }
            let shuffled = zip(integers(1031, below: 1 << 30), distinct).sorted { $0.0 < $1.0 }.map(\.1)
            checkPrune(dtype, "1031 distinct", shuffled, .magnitude(ratio: 0.5))
            checkPrune(dtype, "1031 distinct", shuffled, .magnitude(ratio: 0))
            checkPrune(dtype, "1031 distinct", shuffled, .magnitude(ratio: 1))
            // Random: the mask is specified (uniform(seed, stream, i) < p); the count is also checked against
            // Binomial(n, p) at 6 standard deviations.
            let n = 4099, prob = 0.4
            let zeroed = checkPrune(dtype, "\(n)", values(n, -1, 1).map { $0 == 0 ? 0.25 : $0 }, .random(probability: prob))
            expectWithin("prune random count ~ Binomial(n, p)", "\(n) p 0.4", dtype.rawValue,
                         value: abs(Double(zeroed) - Double(n) * prob),
                         bound: 6 * (Double(n) * prob * (1 - prob)).squareRoot())
            checkPrune(dtype, "101", values(101, -1, 1), .all)
        }
        checkPruneMoments()
    }

    /// `pruneMoments` (Adam's moments are f32 on every backend): one mask for m and v, by the update
    /// magnitude |m| / (sqrt(v) + eps). The inputs are made so that pruning m and v by their own
    /// magnitudes would give other masks (v is independent of m), and so that the score, not |m|,
    /// decides (a large |m| with a larger v ranks low).
    func checkPruneMoments() {
        let eps: Float = 1e-8
        let n = 1031
        let m = values(n, -1e-3, 1e-3).map { $0 == 0 ? 1e-5 : $0 }
        let v = values(n, 0, 1e-6).map { $0 * $0 * 1e6 }  // [0, 1e-6): a spread of sqrt(v) around |m|
        for ratio in [0.9, 0.5, 0.0, 1.0] {
            checkPruneMoments("\(n)", m, v, ratio: ratio, eps: eps)
        }
        // Ties and exact zeros: m and v on coarse grids, positions with m = v = 0 (score 0) and repeated
        // (m, v) pairs of both signs. k = ceil(0.3 * 101) = 31; every score <= the 31st smallest goes.
        let levels = integers(101, below: 4), signs = integers(101, below: 2), vLevels = integers(101, below: 3)
        let tiedM: [Float] = (0..<101).map { i in Float(levels[i]) / 8 * (signs[i] == 0 ? 1 : -1) }
        let tiedV: [Float] = (0..<101).map { i in levels[i] == 0 ? 0 : Float(vLevels[i] + 1) / 16 }
        checkPruneMoments("101 with ties", tiedM, tiedV, ratio: 0.3, eps: eps)
    }

    /// Runs `pruneMoments` on the backend; checks the count and both tensors exactly.
    func checkPruneMoments(_ shape: String, _ m: [Float], _ v: [Float], ratio: Double, eps: Float) {
        let (mt, heldM) = tensor([m.count], .f32, m, tag: .optimizer)
        let (vt, heldV) = tensor([v.count], .f32, v, tag: .optimizer)
        let zeroed = backend.pruneMoments(m: mt, v: vt, ratio: ratio, eps: eps)
        let ref = NaiveReference.pruneMoments(m: heldM, v: heldV, ratio: ratio, eps: eps)
        let name = "pruneMoments \(ratio)"
        expectCount(name + " count", shape, "f32", got: zeroed, want: ref.zeroed)
        expectBits(name + " m", shape, "f32", got: backend.download(mt), want: ref.m)
        expectBits(name + " v", shape, "f32", got: backend.download(vt), want: ref.v)
    }

    /// Prunes `values` by `rule` on the backend; checks the returned count and the tensor exactly.
    @discardableResult
    func checkPrune(_ dtype: DType, _ shape: String, _ values: [Float], _ rule: PruneRule) -> Int {
        let seed: UInt64 = 5, stream: UInt64 = 9
        let (t, held) = tensor([values.count], dtype, values)
        let zeroed = backend.prune(t, rule, seed: seed, stream: stream)
        let ref = NaiveReference.prune(held, rule) { relora_rng_uniform(seed, stream, UInt64($0)) }
        let name: String
        switch rule {
        case .magnitude(let ratio): name = "prune magnitude \(ratio)"
        case .random(let p): name = "prune random \(p)"
        case .all: name = "prune all"
        }
        expectCount(name + " count", shape, dtype.rawValue, got: zeroed, want: ref.zeroed)
        expectBits(name, shape, dtype.rawValue, got: backend.download(t), want: ref.values)
        return zeroed
    }
}
