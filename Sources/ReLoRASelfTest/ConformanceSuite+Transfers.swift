import CReLoRA
import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain

/// Memory, transfers, conversions, fills and the counter-based random fills. All exact: conversions
/// are specified bit for bit by `FloatBits` (round to nearest even), fills by their formulas.
extension ConformanceSuite {
    // MARK: makeTensor and the ledger

    func checkMemory() {
        let shape = [3, 5, 7], count = 105
        for dtype in DType.allCases {
            let ledger = backend.ledger
            let before = ledger.report().live(.workspace)
            var delta = 0
            do {
                let t = backend.makeTensor(shape, dtype: dtype, tag: .workspace, zeroed: true)
                delta = ledger.report().live(.workspace) - before
                var note = ""
                if t.shape != shape || t.count != count || t.dtype != dtype || t.tag != .workspace || t.byteCount != count * dtype.byteSize {
                    note = "got shape \(t.shape), count \(t.count), dtype \(t.dtype.rawValue), tag \(t.tag.rawValue), \(t.byteCount) bytes"
                }
                expectCount("makeTensor ledger bytes", "3x5x7", dtype.rawValue, got: delta, want: count * dtype.byteSize, note: note)
                if dtype.isFloatingPoint {
                    expectBits("makeTensor zeroed", "3x5x7", dtype.rawValue, got: backend.download(t),
                               want: [Float](repeating: 0, count: count))
                } else if dtype == .i32 {
                    // i32 tensors are not downloadable: zero ids gather row 0 of a table.
                    for cdt in computeDTypes {
                        let (table, tv) = tensor([3, 2], cdt, [1, 2, 3, 4, 5, 6])
                        let out = output([count, 2], cdt)
                        backend.embeddingForward(ids: t, table: table, out: out, dim: 2)
                        expectBits("makeTensor zeroed (ids via embeddingForward)", "3x5x7", "i32, table \(cdt.rawValue)",
                                   got: backend.download(out), want: (0..<(2 * count)).map { tv[$0 % 2] })
                    }
                }
                // Not zeroed: only the shape and the ledger are specified.
                let u = backend.makeTensor(shape, dtype: dtype, tag: .workspace, zeroed: false)
                expectCount("makeTensor (not zeroed) ledger bytes", "3x5x7", dtype.rawValue,
                            got: ledger.report().live(.workspace) - before - delta, want: u.byteCount)
            }
            expectCount("tensor release ledger bytes", "3x5x7", dtype.rawValue,
                        got: ledger.report().live(.workspace) - before, want: 0)
        }
        // An empty tensor: allocates nothing, downloads nothing.
        let empty = backend.makeTensor([0, 4], dtype: .f32, tag: .workspace, zeroed: true)
        expectCount("makeTensor + download, empty", "0x4", "f32", got: backend.download(empty).count, want: 0,
                    note: empty.count == 0 ? "" : "count \(empty.count)")
    }

    // MARK: Upload, download, copy, zero, fill

    /// Values that exercise every rounding case of f32 -> bf16/f16, then random values over 2^-30..2^20.
    func conversionValues() -> [Float] {
        let specials: [Float] = [
            0, -0.0, 1, -1, 0.1, -1.0 / 3, 3.14159265, 1e4,
            1 + 0x1p-8, 1 + 3 * 0x1p-8, -(1 + 0x1p-8),     // bf16 halfway: ties to even (down, up, negative)
            1 + 0x1p-8 + 0x1p-20,                           // just above a bf16 tie: rounds up
            1 + 0x1p-11, 1 + 3 * 0x1p-11, 1 + 0x1p-11 + 0x1p-20,  // the same for f16
            65504, 65519.996, 65520, -70000,                // f16: max, below its overflow threshold, at it (-> inf)
            0x1p-14, 0x1p-24, 0x1p-25, 3 * 0x1p-26, 1e-8,  // f16: min normal, min subnormal, half of it (tie -> 0), subnormal ties
            Float.greatestFiniteMagnitude, 3.3961776e38,    // bf16 rounds these to infinity
            Float.leastNormalMagnitude, Float.leastNonzeroMagnitude, -Float.leastNonzeroMagnitude,
            .infinity, -.infinity, .nan,
        ]
        let s = stream()
        let random: [Float] = (0..<1031).map { i in
            let bits = relora_rng_u64(Self.inputSeed, s, UInt64(i))
            let exponent = Int(bits % 51) - 30                       // 2^-30 ..< 2^21
            let significand = 1 + Float(bits >> 40) * 0x1p-24        // 24 random bits
            let sign: Float = (bits >> 20) & 1 == 0 ? 1 : -1
            return sign * Float(sign: .plus, exponent: exponent, significand: significand)
        }
        return specials + random
    }

    /// Little-endian raw elements of `dtype` (the values must be representable in it).
    static func rawBytes(_ values: [Float], _ dtype: DType) -> [UInt8] {
        var bytes: [UInt8] = []
        for v in values {
            switch dtype {
            case .bf16: withUnsafeBytes(of: FloatBits.bfloat16(v).littleEndian) { bytes += $0 }
            case .f16: withUnsafeBytes(of: FloatBits.float16(v).littleEndian) { bytes += $0 }
            default: withUnsafeBytes(of: v.bitPattern.littleEndian) { bytes += $0 }
            }
        }
        return bytes
    }

    func checkTransfers() {
        let values = conversionValues()
        let n = values.count, shape = "\(n)"
        for dst in Self.floatTypes {
            let t = backend.makeTensor([n], dtype: dst, tag: .workspace, zeroed: false)
            backend.upload(values, to: t)
            expectBits("upload [Float] + download", shape, "f32->\(dst.rawValue)", got: backend.download(t),
                       want: values.map { Self.round($0, to: dst) })
        }
        for src in Self.floatTypes {
            let source = values.map { Self.round($0, to: src) }
            let bytes = Self.rawBytes(source, src)
            for dst in Self.floatTypes {
                let t = backend.makeTensor([n], dtype: dst, tag: .workspace, zeroed: false)
                bytes.withUnsafeBytes { backend.upload(raw: $0, dtype: src, to: t) }
                expectBits("upload raw + download", shape, "\(src.rawValue)->\(dst.rawValue)", got: backend.download(t),
                           want: source.map { Self.round($0, to: dst) })
            }
        }
        // copy converts; bf16 <-> f16 goes through the exact f32 value, so it is one rounding.
        for src in Self.floatTypes {
            let (s, held) = tensor([n], src, values)
            for dst in Self.floatTypes {
                let d = output([n], dst)
                backend.copy(s, to: d)
                expectBits("copy", shape, "\(src.rawValue)->\(dst.rawValue)", got: backend.download(d),
                           want: held.map { Self.round($0, to: dst) })
            }
        }
        // i32 upload, observed through the ops that read ids: table row r holds (r / 32, r % 32), exact in
        // every float dtype, so each id comes back whole; ids over 255 catch a byte-order or width bug.
        let idValues: [Int32] = [0, 1, 1030, 255, 256, 257, 511, 512, 1024, 7, 7, 1029, 0, 300]
        let idTensor = ids(idValues)
        for cdt in computeDTypes {
            let vocab = 1031
            var rows: [Float] = []
            for r in 0..<vocab { rows += [Float(r / 32), Float(r % 32)] }
            let (table, _) = tensor([vocab, 2], cdt, rows)
            let out = output([idValues.count, 2], cdt)
            backend.embeddingForward(ids: idTensor, table: table, out: out, dim: 2)
            expectBits("upload [Int32] (via embeddingForward)", "\(idValues.count) ids, vocab \(vocab)", "i32",
                       got: backend.download(out), want: idValues.flatMap { [Float($0 / 32), Float($0 % 32)] })
        }
        for dtype in Self.floatTypes {
            let (t, _) = tensor([n], dtype, values)
            backend.zero(t)
            expectBits("zero", shape, dtype.rawValue, got: backend.download(t), want: [Float](repeating: 0, count: n))
        }
        for dtype in computeDTypes {
            for value: Float in [0.3, -2.5e-3] {
                let t = output([n], dtype)
                backend.fill(t, value: value)
                expectBits("fill \(value)", shape, dtype.rawValue, got: backend.download(t),
                           want: [Float](repeating: Self.round(value, to: dtype), count: n))
            }
        }
        checkTransferCounts()
    }

    /// Each upload, download and host-returning op counts one transfer in the ledger; ops that stay on
    /// the device count none (a training step's O(1) transfers are measured with these counts).
    func checkTransferCounts() {
        let dtype = computeDTypes.first ?? .f32
        let ledger = backend.ledger
        let a = backend.makeTensor([37], dtype: dtype, tag: .workspace, zeroed: true)
        let b = backend.makeTensor([37], dtype: dtype, tag: .workspace, zeroed: true)
        let targets = ids([1, -1, 4])
        let logits = backend.makeTensor([3, 5], dtype: dtype, tag: .workspace, zeroed: true)
        let losses = backend.makeTensor([3], dtype: dtype, tag: .workspace, zeroed: true)
        func count(_ op: String, uploads: Int, downloads: Int, _ body: () -> Void) {
            let before = ledger.transferCount
            body()
            let d = ledger.transferCount - before
            expectCount("transfer count: \(op)", "uploads, downloads", dtype.rawValue, got: d.uploads * 1000 + d.downloads,
                        want: uploads * 1000 + downloads,
                        note: d.uploads == uploads && d.downloads == downloads ? "" : "\(d.uploads) uploads, \(d.downloads) downloads; want \(uploads), \(downloads)")
        }
        count("upload [Float]", uploads: 1, downloads: 0) { backend.upload([Float](repeating: 1, count: 37), to: a) }
        count("upload [Int32]", uploads: 1, downloads: 0) { backend.upload([2, 0, 3] as [Int32], to: targets) }
        count("upload raw", uploads: 1, downloads: 0) {
            Self.rawBytes([Float](repeating: 1, count: 37), .f32).withUnsafeBytes { backend.upload(raw: $0, dtype: .f32, to: b) }
        }
        count("download", uploads: 0, downloads: 1) { _ = backend.download(a) }
        count("device ops (copy, zero, fill, scale, axpy)", uploads: 0, downloads: 0) {
            backend.copy(a, to: b); backend.zero(b); backend.fill(b, value: 2); backend.scale(b, by: 3); backend.axpy(1, a, b)
        }
        count("crossEntropy", uploads: 0, downloads: 1) {
            _ = backend.crossEntropy(logits: logits, targets: targets, losses: losses, rows: 3, vocab: 5, gradScale: 1)
        }
        count("crossEntropyDeferred, read", uploads: 0, downloads: 1) {
            _ = backend.crossEntropyDeferred(logits: logits, targets: targets, losses: losses, rows: 3, vocab: 5, gradScale: 1).value
        }
        count("prune", uploads: 0, downloads: 1) { _ = backend.prune(b, .all, seed: 0, stream: 0) }
        count("pruneMoments", uploads: 0, downloads: 1) { _ = backend.pruneMoments(m: a, v: b, ratio: 0.5, eps: 1e-8) }
        count("sumOfSquares([a, b, losses])", uploads: 0, downloads: 1) { _ = backend.sumOfSquares([a, b, losses]) }
    }

    // MARK: Random fills

    func checkRandom() {
        let n = 4099
        for dtype in computeDTypes {
            // fillUniform: t[i] = (2 u - 1) * bound in f32, u = relora_rng_uniform(seed, stream, i) (24 bits,
            // so 2u - 1 is exact and the product rounds once), then rounded to the dtype: exact.
            let bound: Float = 0.37, seed: UInt64 = 1234, stream: UInt64 = 7
            let t = output([n], dtype)
            backend.fillUniform(t, bound: bound, seed: seed, stream: stream)
            let got = backend.download(t)
            let want = (0..<n).map { i in
                Self.round((2 * relora_rng_uniform(seed, stream, UInt64(i)) - 1) * bound, to: dtype)
            }
            let shape = "\(n) bound 0.37"
            expectBits("fillUniform", shape, dtype.rawValue, got: got, want: want)
            expectWithin("fillUniform max |x|", shape, dtype.rawValue, value: Double(got.map(abs).max() ?? 0),
                         bound: Double(Self.round(bound, to: dtype)))
            // Moments, 6 standard errors (a false alarm has probability ~2e-9; the draw is fixed anyway):
            // U(-b, b) has mean 0, variance b^2/3, Var(x^2) = E x^4 - (E x^2)^2 = b^4/5 - b^4/9 = 4 b^4 / 45.
            let b = Double(bound)
            let (mean, meanSquare) = Self.moments(got)
            expectWithin("fillUniform mean", shape, dtype.rawValue, value: abs(mean), bound: 6 * b / (3.0 * Double(n)).squareRoot())
            expectWithin("fillUniform variance", shape, dtype.rawValue, value: abs(meanSquare - b * b / 3),
                         bound: 6 * (4.0 / 45).squareRoot() * b * b / Double(n).squareRoot())

            // fillNormal: Box-Muller from counters 2i and 2i+1 in Double, u = (64-bit draw >> 11) * 2^-53,
            // z = sqrt(-2 ln(1 - u1)) cos(2 pi u2), stored as Float(z) * std (f32) rounded to the dtype: exact.
            let std: Float = 0.02
            let tn = output([n], dtype)
            backend.fillNormal(tn, std: std, seed: seed, stream: stream)
            let gotN = backend.download(tn)
            let wantN: [Float] = (0..<n).map { i in
                let u1 = Double(relora_rng_u64(seed, stream, UInt64(2 * i)) >> 11) * 0x1p-53
                let u2 = Double(relora_rng_u64(seed, stream, UInt64(2 * i + 1)) >> 11) * 0x1p-53
                let z = (-2 * Foundation.log(1 - u1)).squareRoot() * Foundation.cos(2 * Double.pi * u2)
                return Self.round(Float(z) * std, to: dtype)
            }
            let shapeN = "\(n) std 0.02"
            expectBits("fillNormal", shapeN, dtype.rawValue, got: gotN, want: wantN)
            // N(0, s^2): mean's standard error s / sqrt(n); Var(x^2) = 2 s^4.
            let s = Double(std)
            let (meanN, meanSquareN) = Self.moments(gotN)
            expectWithin("fillNormal mean", shapeN, dtype.rawValue, value: abs(meanN), bound: 6 * s / Double(n).squareRoot())
            expectWithin("fillNormal variance", shapeN, dtype.rawValue, value: abs(meanSquareN - s * s),
                         bound: 6 * 2.0.squareRoot() * s * s / Double(n).squareRoot())
        }
    }

    /// Sample mean and mean of squares, in Double.
    static func moments(_ x: [Float]) -> (mean: Double, meanSquare: Double) {
        guard !x.isEmpty else { return (0, 0) }
        let n = Double(x.count)
        return (x.reduce(0.0) { $0 + Double($1) } / n, x.reduce(0.0) { $0 + Double($1) * Double($1) } / n)
    }
}
