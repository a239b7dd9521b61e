import CReLoRA
import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain

/// The quantized-weight ops of the merge: quantize (round to nearest and stochastic), dequantize and
/// countChangedCodes, per format. The references are the scalar C functions of `relora_quant.h` run on
/// the host through `QuantizedMatrix` (bit for bit), and, for the statistics, exact arithmetic on codes
/// decoded here independently of the C layer.
extension ConformanceSuite {
    /// `[rows, cols]` with cols = 80: not a multiple of 32 or 64, so every format pads its rows.
    static let quantShape = (rows: 6, cols: 80)

    func checkQuantization() {
        for format in QuantFormat.allCases { checkQuantization(format) }
    }

    private func checkQuantization(_ format: QuantFormat) {
        let (rows, cols) = Self.quantShape
        let shape = "\(rows)x\(cols)", fmt = format.rawValue
        // Weights of a layer's scale, one block with a larger outlier, and exact zeros.
        var xs = values(rows * cols, -0.05, 0.05)
        xs[7] = 0.4; xs[cols + 3] = 0; xs[2 * cols + 41] = -0.3
        let (x, _) = tensor([rows, cols], .f32, xs)
        guard let want = try? QuantizedMatrix(quantizing: xs, rows: rows, cols: cols, format: format) else {
            record("quantize nearest", shape, fmt, maxError: .infinity, bound: 0, passed: false, note: "the host reference failed")
            return
        }
        // Round to nearest: the reference quantizer's bytes; one transfer (the status).
        let q = QuantizedTensor(format: format, rows: rows, cols: cols, backend: backend, tag: .workspace)
        let before = backend.ledger.transferCount
        let failure = backend.quantize(x, into: q, rounding: .nearest)
        let transfers = backend.ledger.transferCount - before
        expectBytes("quantize nearest", shape, fmt, got: backend.downloadRaw(q.blocks), want: want.bytes,
                    note: failure.map { "reported a failure: \($0)" } ?? "")
        expectCount("quantize transfer count", shape, fmt, got: transfers.total, want: 1)

        // dequantize of a row range: the reference's values, bit for bit; the rest of `out` untouched.
        let all = want.dequantize()
        let out = output([rows * cols], .f32)
        backend.dequantize(q, firstRow: 1, rowCount: rows - 2, into: out)
        let got = backend.download(out)
        expectBits("dequantize rows 1..<\(rows - 1)", shape, fmt, got: Array(got.prefix((rows - 2) * cols)),
                   want: Array(all[cols ..< (rows - 1) * cols]))
        expectCount("dequantize leaves the rest of out alone", shape, fmt,
                    got: got.suffix(2 * cols).filter { !$0.isNaN }.count, want: 0)

        // Stochastic rounding: the reference's bytes for the same key; the same key again gives the same
        // codes; another stream other codes.
        let seed: UInt64 = 0x5EED, stream: UInt64 = 0x4D45_5247_0000_0007
        let wantSR = try? QuantizedMatrix(quantizing: xs, rows: rows, cols: cols, format: format,
                                          rounding: .stochastic(seed: seed, stream: stream))
        _ = backend.quantize(x, into: q, rounding: .stochastic(seed: seed, stream: stream))
        let sr = backend.downloadRaw(q.blocks)
        expectBytes("quantize stochastic", shape, fmt, got: sr, want: wantSR?.bytes ?? [])
        _ = backend.quantize(x, into: q, rounding: .stochastic(seed: seed, stream: stream))
        expectBytes("quantize stochastic (same key, same codes)", shape, fmt, got: backend.downloadRaw(q.blocks), want: sr)
        _ = backend.quantize(x, into: q, rounding: .stochastic(seed: seed, stream: stream + 1))
        let other = Self.codes(format, backend.downloadRaw(q.blocks), rows: rows, cols: cols)
        let srCodes = Self.codes(format, sr, rows: rows, cols: cols)
        let same = Double(zip(other, srCodes).filter { $0 == $1 }.count) / Double(rows * cols)
        // Most weights sit far enough from both neighbours that two streams often disagree on them.
        expectWithin("quantize stochastic (another stream, other codes)", shape, fmt, value: same, bound: 0.875,
                     note: "\(same) of the codes are the same under two streams")

        checkStochasticIsUnbiased(format)
        checkChangedCodes(format, x: xs, q: q)
    }

    /// Unbiasedness. Every block's scale is pinned by its first element (an exactly representable
    /// extreme), and every other weight sits between two neighbouring representable values lo < hi at
    /// a fraction f in [0.05, 0.45] of the gap g = hi - lo. Over S keys and N weights the normalised
    /// error D = mean((deq - x) / g) has expectation 0 for stochastic rounding (E deq = x), while round
    /// to nearest gives -E[f] = -0.25 and a rounding with the probabilities swapped (up with 1 - f)
    /// gives 1 - 2 E[f] = +0.5. Each term has variance f(1 - f) <= 1/4 and the terms are independent
    /// (distinct counters), so sd(D) <= 1 / (2 sqrt(N S)); the bound is 6 of those (a false alarm
    /// would have probability ~2e-9; the draw is fixed anyway), about 0.012 here.
    private func checkStochasticIsUnbiased(_ format: QuantFormat) {
        let rows = 16, cols = 256, draws = 16
        let block = format.blockSize
        // The representable values of a block whose extreme is pinned, ascending, and what pins it.
        let grid: [Float], pin: Float
        switch format {
        case .q8_0: pin = 127 * 0x1p-7; grid = (-127...127).map { Float($0) * 0x1p-7 }       // d = 2^-7 exactly in fp16
        case .q4_0: pin = 1; grid = (0...15).map { Float(8 - $0) * 0.125 }.reversed()        // d = 1 / -8 = -0.125
        case .nf4: pin = 1; grid = (0..<16).map { relora_nf4_value(Int32($0)) }               // absmax = 1
        }
        let fractions = values(rows * cols, 0.05, 0.45)
        let picks = integers(rows * cols, below: grid.count - 3)
        var xs = [Float](repeating: 0, count: rows * cols), gaps = [Double](repeating: 0, count: rows * cols)
        for i in 0..<xs.count {
            if i % cols % block == 0 { xs[i] = pin; continue }
            let k = picks[i] + 1  // a gap away from both ends (no clamping)
            let lo = grid[k], hi = grid[k + 1]
            xs[i] = lo + fractions[i] * (hi - lo)
            gaps[i] = Double(hi - lo)
        }
        let (x, held) = tensor([rows, cols], .f32, xs)
        let q = QuantizedTensor(format: format, rows: rows, cols: cols, backend: backend, tag: .workspace)
        let out = output([rows * cols], .f32)
        var sum = 0.0, n = 0
        for s in 0..<draws {
            _ = backend.quantize(x, into: q, rounding: .stochastic(seed: 11, stream: UInt64(s)))
            backend.dequantize(q, firstRow: 0, rowCount: rows, into: out)
            let deq = backend.download(out)
            for i in 0..<xs.count where gaps[i] > 0 {
                sum += (Double(deq[i]) - Double(held[i])) / gaps[i]
                n += 1
            }
        }
        let d = sum / Double(n)
        expectWithin("quantize stochastic is unbiased (mean error / gap)", "\(rows)x\(cols) x \(draws) keys", format.rawValue,
                     value: abs(d), bound: 6 / (2 * Double(n).squareRoot()),
                     note: String(format: "mean normalised error %.4f (round to nearest: -0.25)", d))
    }

    /// countChangedCodes against codes decoded here: requantize `x` with a few weights moved (some by
    /// less than half a step, which must not count, some past several steps) and one block's scale moved.
    private func checkChangedCodes(_ format: QuantFormat, x xs: [Float], q: QuantizedTensor) {
        let (rows, cols) = (q.rows, q.cols)
        let shape = "\(rows)x\(cols)", fmt = format.rawValue
        let (x, _) = tensor([rows, cols], .f32, xs)
        _ = backend.quantize(x, into: q, rounding: .nearest)
        let oldBytes = backend.downloadRaw(q.blocks)
        let old = backend.makeTensor(q.blocks.shape, dtype: .u8, tag: .workspace, zeroed: false)
        oldBytes.withUnsafeBytes { backend.upload(raw: $0, dtype: .u8, to: old) }
        var moved = xs
        for i in Swift.stride(from: 5, to: moved.count, by: 37) { moved[i] += 0.02 }
        moved[cols + 2] *= 1 + 1e-6
        moved[3 * cols + 1] = 0.6  // a new block extreme: the whole block's scale changes
        let (y, _) = tensor([rows, cols], .f32, moved)
        _ = backend.quantize(y, into: q, rounding: .nearest)
        let slots = output([3], .f32)
        backend.upload([7, 7, 7] as [Float], to: slots)
        let before = backend.ledger.transferCount
        backend.countChangedCodes(old: old, new: q, into: slots, at: 1)
        let transfers = backend.ledger.transferCount - before
        let got = backend.download(slots)
        let want = zip(Self.codes(format, oldBytes, rows: rows, cols: cols),
                       Self.codes(format, backend.downloadRaw(q.blocks), rows: rows, cols: cols)).filter { $0 != $1 }.count
        expectCount("countChangedCodes", shape, fmt, got: Int(got[1]), want: want,
                    note: want > 0 && got[0] == 7 && got[2] == 7 ? "" : "slots 0 and 2 changed, or nothing moved (\(want))")
        expectCount("countChangedCodes transfer count", shape, fmt, got: transfers.total, want: 0)
    }

    /// Every weight's code (row-major, padding dropped), decoded from the block layouts of
    /// `relora_quant.h` by hand: q8_0 the int8 after the 2-byte scale; q4_0 byte j's low nibble for
    /// element j and high nibble for j + 16, after the 2-byte scale; nf4 byte k's high nibble for element
    /// 2k and low nibble for 2k + 1, after the 4-byte absmax.
    static func codes(_ format: QuantFormat, _ bytes: [UInt8], rows: Int, cols: Int) -> [Int] {
        let bytesPerRow = format.bytesPerRow(cols: cols), block = format.blockSize, size = format.bytesPerBlock
        var out: [Int] = []
        out.reserveCapacity(rows * cols)
        for r in 0..<rows {
            for c in 0..<cols {
                let base = r * bytesPerRow + (c / block) * size, j = c % block
                guard base + size <= bytes.count else { out.append(-1); continue }
                switch format {
                case .q8_0: out.append(Int(Int8(bitPattern: bytes[base + 2 + j])))
                case .q4_0: out.append(Int(j < 16 ? bytes[base + 2 + j] & 15 : bytes[base + 2 + j - 16] >> 4))
                case .nf4: out.append(Int(j % 2 == 0 ? bytes[base + 4 + j / 2] >> 4 : bytes[base + 4 + j / 2] & 15))
                }
            }
        }
        return out
    }

    /// Byte-for-byte equality (the maximum error is the number of differing bytes).
    func expectBytes(_ op: String, _ shape: String, _ dtype: String, got: [UInt8], want: [UInt8], note: String = "") {
        let differing = got.count == want.count ? zip(got, want).filter { $0 != $1 }.count : max(got.count, want.count)
        let first = zip(got, want).enumerated().first { $1.0 != $1.1 }?.offset
        record(op, shape, dtype, maxError: Double(differing), bound: 0, passed: differing == 0 && note.isEmpty,
               note: note.isEmpty ? "\(differing) of \(want.count) bytes differ (first at \(first ?? min(got.count, want.count)))" : note)
    }
}
