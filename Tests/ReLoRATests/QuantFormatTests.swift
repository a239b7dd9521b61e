import CReLoRA
import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAFormats
@testable import ReLoRATokenizer
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain
@testable import ReLoRAAnalysis
@testable import ReLoRASelfTest

/// The quantized formats of `relora_quant.h`: byte compatibility with gguf (q8_0, q4_0) and bitsandbytes
/// (nf4) on the fixture of `Tests/Fixtures/make_quant_fixture.py`, idempotence of requantization, the
/// adversarial blocks, errors, padding and sizes. Every comparison here is exact (bytes or float bit
/// patterns): the reference is the spec, so there is no tolerance to derive.
final class QuantFormatTests: XCTestCase {
    // MARK: Sizes

    func testBlockSizesAndBitsPerWeight() {
        XCTAssertEqual(MemoryLayout<block_q8_0>.size, 34)
        XCTAssertEqual(MemoryLayout<block_q4_0>.size, 18)
        XCTAssertEqual(MemoryLayout<block_nf4>.size, 36)
        XCTAssertEqual(QuantFormat.allCases.map(\.blockAlignment), [2, 2, 4])
        let expected: [QuantFormat: (block: Int, bytes: Int, bits: Double)] = [
            .q8_0: (32, 34, 8.5), .q4_0: (32, 18, 4.5), .nf4: (64, 36, 4 + 32.0 / 64),
        ]
        for format in QuantFormat.allCases {
            XCTAssertEqual(format.blockSize, expected[format]!.block, "\(format)")
            XCTAssertEqual(format.bytesPerBlock, expected[format]!.bytes, "\(format)")
            XCTAssertEqual(format.bitsPerWeight, expected[format]!.bits, "\(format)")
            // A whole matrix costs exactly bitsPerWeight when its rows divide into blocks.
            let m = try! format.quantize([Float](repeating: 0.5, count: 4 * 256), rows: 4, cols: 256)
            XCTAssertEqual(Double(m.bytes.count * 8) / Double(4 * 256), format.bitsPerWeight, "\(format)")
        }
    }

    // MARK: fp16

    /// The header's fp16 conversions are the spec the CUDA side will be checked against; they must agree
    /// with the Swift helpers (`FloatBits`, i.e. Swift's `Float16`) everywhere.
    func testFP16ConversionsAgreeWithFloatBits() {
        // fp16 -> fp32: all 65536 patterns, compared as bits (NaN payloads included).
        for h in 0 ... UInt16.max {
            let c = relora_fp16_to_fp32(h), s = FloatBits.floatFromFloat16(h)
            if c.bitPattern != s.bitPattern {
                XCTFail("fp16 0x\(String(h, radix: 16)) -> \(c) (C) vs \(s) (Swift)")
                return
            }
        }
        // fp32 -> fp16 at every place rounding can go wrong: each fp16 value, the exact midpoint to its
        // successor (a tie: to even) and the floats on either side of that midpoint, over the whole range
        // including subnormals, the 2^-25 underflow tie and the 65520 overflow tie.
        var probes: [Float] = [0x1p-25, Float(0x1p-25).nextUp, Float(0x1p-25).nextDown, 65520, Float(65520).nextDown, 65504, bitsandbytesAbsmaxClamp, .infinity,
                               .greatestFiniteMagnitude, .leastNonzeroMagnitude, .leastNormalMagnitude]
        for h in UInt16(0) ..< 0x7C00 {
            let v = FloatBits.floatFromFloat16(h), next = FloatBits.floatFromFloat16(h + 1)
            let mid = (v + next) / 2  // exact: fp16 values have 11 significant bits
            probes += [v, mid, mid.nextUp, mid.nextDown]
        }
        var rng = TestRNG(0xF16)
        for _ in 0 ..< 200_000 { probes.append(Float(bitPattern: UInt32(truncatingIfNeeded: rng.next()))) }
        for x in probes + probes.map({ -$0 }) where !x.isNaN {
            let c = relora_fp32_to_fp16(x), s = FloatBits.float16(x)
            if c != s {
                XCTFail("fp32 \(x) (0x\(String(x.bitPattern, radix: 16))) -> 0x\(String(c, radix: 16)) (C) vs 0x\(String(s, radix: 16)) (Swift)")
                return
            }
        }
        // NaN: sign and payload as Swift's conversion keeps them (quantized formats never store one).
        for bits: UInt32 in [0x7FC0_0000, 0xFFC0_0000, 0x7F80_0001, 0x7FBF_FFFF, 0xFFE0_2000] {
            let x = Float(bitPattern: bits)
            XCTAssertEqual(relora_fp32_to_fp16(x), FloatBits.float16(x), "NaN 0x\(String(bits, radix: 16))")
        }
    }

    // MARK: NF4 codebook

    func testNF4CodebookAndThresholds() {
        XCTAssertEqual(relora_nf4_value(0), -1)
        XCTAssertEqual(relora_nf4_value(7).bitPattern, Float(0).bitPattern)
        XCTAssertEqual(relora_nf4_value(15), 1)
        XCTAssertEqual(relora_nf4_absmax_min(), bitsandbytesAbsmaxClamp)
        for k in 0 ..< 15 {
            let lo = relora_nf4_value(Int32(k)), hi = relora_nf4_value(Int32(k + 1))
            XCTAssertLessThan(lo, hi)
            // bitsandbytes' threshold is the float32 midpoint; a value exactly on it takes the lower code.
            let mid = (lo + hi) / 2
            XCTAssertEqual(relora_nf4_code(mid), Int32(k), "midpoint \(k)")
            XCTAssertEqual(relora_nf4_code(mid.nextUp), Int32(k + 1), "above midpoint \(k)")
            XCTAssertEqual(relora_nf4_code(lo), Int32(k))
        }
        XCTAssertEqual(relora_nf4_code(-0.0), 7)
        XCTAssertEqual(relora_nf4_code(-2), 0)
        XCTAssertEqual(relora_nf4_code(2), 15)
    }

    // MARK: Byte compatibility with gguf and bitsandbytes

    func testQ8_0MatchesGGUFByteForByte() throws {
        try checkGGUFFixture(.q8_0)
    }

    func testQ4_0MatchesGGUFByteForByte() throws {
        try checkGGUFFixture(.q4_0)
    }

    /// relora's blocks equal gguf's, byte for byte, except degenerate blocks (fp16 scale +-0), which are
    /// relora's canonical zero block while gguf's codes there multiply a zero scale; and relora's
    /// dequantizer reproduces gguf's dequantization of gguf's own bytes bit for bit.
    private func checkGGUFFixture(_ format: QuantFormat) throws {
        let file = try SafetensorsFile(path: fixturesDirectory() + "/quant_reference.safetensors")
        let labels = try fixtureLabels(file, format)
        let zero = canonicalZeroBlock(format)
        var identical = 0, canonical = 0, differingDegenerate = 0
        for part in ["random", "adversarial"] {
            let inputName = part == "random" ? "random" : "\(format.rawValue).adversarial"
            let input = try file.floats(inputName)
            let (rows, cols) = try matrixShape(file, inputName)
            let theirs = try bytes(file, "\(format.rawValue).\(part).bytes")
            let mine = try format.quantize(input, rows: rows, cols: cols)
            XCTAssertEqual(mine.bytes.count, theirs.count, "\(format) \(part)")
            let bpb = format.bytesPerBlock
            for b in 0 ..< theirs.count / bpb {
                let ref = Array(theirs[b * bpb ..< (b + 1) * bpb]), got = Array(mine.bytes[b * bpb ..< (b + 1) * bpb])
                let context = "\(format) \(part) block \(b) (row \(b / mine.blocksPerRow)\(part == "adversarial" ? ": " + labels[b / mine.blocksPerRow] : ""))"
                let scale = UInt16(ref[0]) | UInt16(ref[1]) << 8
                if scale & 0x7FFF == 0 {
                    XCTAssertEqual(got, zero, "\(context): a degenerate block must be the canonical zero block")
                    canonical += 1
                    if got != ref { differingDegenerate += 1 }
                } else {
                    XCTAssertEqual(got, ref, "\(context): bytes differ from gguf")
                    identical += 1
                }
            }
            // Our dequantizer on their bytes == their dequantizer, bit for bit (degenerate blocks included).
            let theirValues = try file.floats("\(format.rawValue).\(part).dequantized")
            let ours = try QuantizedMatrix(format: format, rows: rows, cols: cols, bytes: theirs).dequantize()
            assertBitwiseEqual(ours, theirValues, "\(format) \(part): dequantize(gguf bytes)")
            // And our own blocks dequantize to the same values as theirs (+-0 aside in degenerate blocks).
            XCTAssertEqual(mine.dequantize(), theirValues, "\(format) \(part): dequantize(relora bytes)")
        }
        XCTAssertEqual(identical + canonical, format == .q8_0 ? 64 + 36 : 64 + 34)
        XCTAssertGreaterThan(differingDegenerate, 0, "the fixture should exercise a degenerate block that gguf writes differently")
        print("\(format): \(identical) blocks byte-identical to gguf, \(canonical) degenerate blocks canonical (\(differingDegenerate) of them differ from gguf's bytes, which hold codes under a zero scale or a zero of the other sign)")
    }

    /// relora's nf4 blocks, split into bitsandbytes' absmax and code arrays, equal bitsandbytes'
    /// quantize_4bit output except in degenerate blocks (absmax < 1e-38), and relora dequantizes
    /// bitsandbytes' arrays to exactly its dequantize_4bit values.
    func testNF4MatchesBitsandbytesByteForByte() throws {
        let file = try SafetensorsFile(path: fixturesDirectory() + "/quant_reference.safetensors")
        let labels = try fixtureLabels(file, .nf4)
        var identical = 0, canonical = 0, differingDegenerate = 0
        for part in ["random", "adversarial"] {
            let inputName = part == "random" ? "random" : "nf4.adversarial"
            let input = try file.floats(inputName)
            let (rows, cols) = try matrixShape(file, inputName)
            let codes = try bytes(file, "nf4.\(part).codes")
            let absmax = try file.floats("nf4.\(part).absmax")
            let theirValues = try file.floats("nf4.\(part).dequantized")
            let mine = try QuantFormat.nf4.quantize(input, rows: rows, cols: cols)
            XCTAssertEqual(absmax.count, rows * cols / 64)
            for b in 0 ..< absmax.count {
                let block = Array(mine.bytes[b * 36 ..< (b + 1) * 36])
                let myAbsmax = block[0 ..< 4].withUnsafeBytes { $0.loadUnaligned(as: Float.self) }
                let myCodes = Array(block[4...])
                let context = "nf4 \(part) block \(b)\(part == "adversarial" ? " (\(labels[b / (cols / 64)]))" : "")"
                if absmax[b] < bitsandbytesAbsmaxClamp {
                    XCTAssertEqual(block, canonicalZeroBlock(.nf4), "\(context): a degenerate block must be the canonical zero block")
                    for v in theirValues[b * 64 ..< (b + 1) * 64] { XCTAssertLessThan(abs(v), bitsandbytesAbsmaxClamp, context) }
                    canonical += 1
                    if absmax[b] != 0 || myCodes != Array(codes[b * 32 ..< (b + 1) * 32]) { differingDegenerate += 1 }
                } else {
                    XCTAssertEqual(myAbsmax.bitPattern, absmax[b].bitPattern, "\(context): absmax")
                    XCTAssertEqual(myCodes, Array(codes[b * 32 ..< (b + 1) * 32]), "\(context): codes")
                    identical += 1
                }
            }
            // Their arrays, interleaved into relora blocks, dequantize to their values bit for bit.
            var interleaved: [UInt8] = []
            for b in 0 ..< absmax.count {
                withUnsafeBytes(of: absmax[b]) { interleaved += $0 }
                interleaved += codes[b * 32 ..< (b + 1) * 32]
            }
            let ours = try QuantizedMatrix(format: .nf4, rows: rows, cols: cols, bytes: interleaved).dequantize()
            assertBitwiseEqual(ours, theirValues, "nf4 \(part): dequantize(bitsandbytes arrays)")
        }
        XCTAssertEqual(identical + canonical, 32 + 20)
        XCTAssertGreaterThan(canonical, 0)
        print("nf4: \(identical) blocks byte-identical to bitsandbytes (absmax and codes), \(canonical) degenerate blocks canonical (\(differingDegenerate) of them differ from bitsandbytes', which keep an absmax below 1e-38)")
    }

    // MARK: Idempotence: quantize(dequantize(q)) == q

    func testRequantizingIsIdempotentOnRandomData() throws {
        var rng = TestRNG(0x1DE)
        for format in QuantFormat.allCases {
            // Scales from far below a fp16 subnormal scale to near the format's limit; odd shapes pad.
            for (rows, cols, scale) in [(3, 256, Float(0.02)), (5, 100, 1), (2, 5461, 0.05), (4, 64, 1e-6),
                                        (4, 96, 3e-5), (2, 130, 1e4), (1, 7, 3)] {
                let values = (0 ..< rows * cols).map { _ in rng.uniform(-1, 1) * scale * (rng.int(8) == 0 ? 10 : 1) }
                try assertIdempotent(format, values, rows: rows, cols: cols, "\(format) [\(rows), \(cols)] scale \(scale)")
            }
        }
    }

    func testRequantizingIsIdempotentOnTheAdversarialFixture() throws {
        let file = try SafetensorsFile(path: fixturesDirectory() + "/quant_reference.safetensors")
        for format in QuantFormat.allCases {
            let name = "\(format.rawValue).adversarial"
            let (rows, cols) = try matrixShape(file, name)
            try assertIdempotent(format, try file.floats(name), rows: rows, cols: cols, name)
            try assertIdempotent(format, try file.floats("random"), rows: 8, cols: 256, "\(format) random")
        }
    }

    private func assertIdempotent(_ format: QuantFormat, _ values: [Float], rows: Int, cols: Int, _ context: String,
                                  file: StaticString = #filePath, line: UInt = #line) throws {
        let q = try format.quantize(values, rows: rows, cols: cols)
        var current = q
        for merge in 1 ... 3 {  // several zero-update merges in a row
            current = try format.quantize(current.dequantize(), rows: rows, cols: cols)
            if current != q {
                let diff = zip(q.bytes, current.bytes).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
                XCTFail("\(context): requantization \(merge) changed the bytes (first at byte \(diff), block \(diff / format.bytesPerBlock))",
                        file: file, line: line)
                return
            }
        }
    }

    // MARK: Adversarial blocks, spelled out

    func testAllZeroAndSignedZeroBlocksAreTheCanonicalZeroBlock() throws {
        for format in QuantFormat.allCases {
            let n = format.blockSize
            for values in [[Float](repeating: 0, count: n), [Float](repeating: -0.0, count: n),
                           (0 ..< n).map { $0 % 2 == 0 ? -0.0 : 0.0 }] {
                let q = try format.quantize(values, rows: 1, cols: n)
                XCTAssertEqual(q.bytes, canonicalZeroBlock(format), "\(format)")
                XCTAssertEqual(q.dequantize(), [Float](repeating: 0, count: n), "\(format)")
            }
        }
    }

    func testSubnormalOnlyBlocksAreZeroAndSubnormalsBesideANormalMaxQuantizeToZero() throws {
        for format in QuantFormat.allCases {
            let n = format.blockSize
            let sub: [Float] = (0 ..< n).map { (j: Int) -> Float in
                let magnitude = Float(bitPattern: UInt32(j * 1234 + 1))  // all subnormal
                return j % 3 == 0 ? -magnitude : magnitude
            }
            XCTAssertTrue(sub.allSatisfy { $0.isSubnormal })
            let q = try format.quantize(sub, rows: 1, cols: n)
            XCTAssertEqual(q.bytes, canonicalZeroBlock(format), "\(format): subnormal-only block")
            // Beside a normal maximum (one whose scale is exact: d = 1 for q8_0 and q4_0) they quantize to 0.
            var mixed = sub
            let top: Float = format == .q4_0 ? -8 : 127
            mixed[n / 2] = top
            let m = try format.quantize(mixed, rows: 1, cols: n).dequantize()
            for j in 0 ..< n { XCTAssertEqual(m[j], j == n / 2 ? top : 0, "\(format) element \(j)") }
        }
    }

    func testOneHugeValueKeepsItselfAndZeroesTheRest() throws {
        for format in QuantFormat.allCases {
            let n = format.blockSize
            let huge: Float = format == .q4_0 ? 5e5 : 8e6
            var values = (0 ..< n).map { Float($0 % 7) * 0.1 - 0.3 }
            values[3] = -huge
            let q = try format.quantize(values, rows: 1, cols: n)
            let d = q.dequantize()
            // The largest value survives to the scale's precision (fp16: 2^-11 relative; nf4's fp32 absmax: exact).
            let rel = abs(d[3] + huge) / huge
            XCTAssertLessThanOrEqual(rel, format == .nf4 ? 0 : 0x1p-11, "\(format)")
            for j in 0 ..< n where j != 3 { XCTAssertEqual(d[j], 0, "\(format) element \(j)") }
        }
    }

    func testQ4_0MagnitudeTieTakesTheFirstValueSign() throws {
        var a = [Float](repeating: 0.25, count: 32)
        a[2] = 3; a[9] = -3
        var b = a
        b[2] = -3; b[9] = 3
        let qa = try QuantFormat.q4_0.quantize(a, rows: 1, cols: 32), qb = try QuantFormat.q4_0.quantize(b, rows: 1, cols: 32)
        // d = max / -8 with max the first of +-3: -0.375 for a, +0.375 for b.
        XCTAssertEqual(relora_fp16_to_fp32(UInt16(qa.bytes[0]) | UInt16(qa.bytes[1]) << 8), -0.375)
        XCTAssertEqual(relora_fp16_to_fp32(UInt16(qb.bytes[0]) | UInt16(qb.bytes[1]) << 8), 0.375)
        // Nibble order: byte j = element j (low) | element j + 16 (high). Element 2 is code 0 in a.
        XCTAssertEqual(qa.bytes[2 + 2] & 0x0F, 0)
        XCTAssertEqual(qa.dequantize()[2], 3)
        // The opposite extreme gets x / d + 8 = 16, clamped to code 15: q4_0 stores -8d ... 7d, so -3 reads 7 * -0.375.
        XCTAssertEqual(qa.dequantize()[9], -2.625)
        XCTAssertEqual(qb.dequantize()[2], -3)
        XCTAssertEqual(qb.dequantize()[9], 2.625)
    }

    func testNF4NibbleOrderIsHighThenLow() throws {
        // Element 0 -> code 15 (1.0), element 1 -> code 0 (-1.0), element 2 -> 7 (0): byte 0 = 0xF0, byte 1 = 0x7?.
        var values = [Float](repeating: 0, count: 64)
        values[0] = 2; values[1] = -2; values[3] = 1
        let q = try QuantFormat.nf4.quantize(values, rows: 1, cols: 64)
        XCTAssertEqual(q.bytes[0 ..< 4].withUnsafeBytes { $0.loadUnaligned(as: Float.self) }, 2)
        XCTAssertEqual(q.bytes[4], 0xF0)
        XCTAssertEqual(q.bytes[5], 0x7C)  // 0.5 -> code 12 (0.4407) in the low nibble: 0.5 < midpoint 0.5017
    }

    // MARK: Errors

    func testInfAndNaNAreRejectedWithTheirPosition() {
        for format in QuantFormat.allCases {
            for bad: Float in [.nan, .infinity, -.infinity] {
                var values = [Float](repeating: 0.5, count: 4 * 100)
                values[2 * 100 + 37] = bad
                assertInvalidData(try format.quantize(values, rows: 4, cols: 100, name: "layers.0.mlp.up_proj.weight"),
                                  mentions: "element [2, 37] is \(bad.isNaN ? "NaN" : "\(bad)")")
                assertInvalidData(try format.quantize(values, rows: 4, cols: 100, name: "layers.0.mlp.up_proj.weight"),
                                  mentions: "tensor 'layers.0.mlp.up_proj.weight' to \(format.rawValue)")
            }
        }
        // The C reference reports the first non-finite element of the row.
        var x = [Float](repeating: 1, count: 64)
        x[40] = .nan; x[50] = .infinity
        var bad: Int64 = 0
        var q8 = [block_q8_0](repeating: block_q8_0(), count: 2)
        XCTAssertEqual(relora_quantize_row_q8_0(x, &q8, 64, &bad), RELORA_QUANT_ERR_NONFINITE)
        XCTAssertEqual(bad, 40)
        var n4 = block_nf4()
        XCTAssertEqual(relora_quantize_row_nf4(x, &n4, 64, &bad), RELORA_QUANT_ERR_NONFINITE)
        XCTAssertEqual(bad, 40)
    }

    func testScaleOverflowIsRejectedExactlyAtTheLimit() throws {
        for format in [QuantFormat.q8_0, .q4_0] {
            let limit = format.magnitudeLimit!
            var values = [Float](repeating: 1, count: 64)
            values[33] = -limit.nextDown
            let q = try format.quantize(values, rows: 1, cols: 64)
            XCTAssertEqual(q.dequantize()[33], -65504 * (format == .q8_0 ? 127 : 8), "\(format): the largest fp16 scale")
            values[33] = -limit
            assertInvalidData(try format.quantize(values, rows: 1, cols: 64), mentions: "element [0, 33] = \(-limit) is too large")
        }
        var values = [Float](repeating: 1, count: 64)
        values[10] = -.greatestFiniteMagnitude
        let q = try QuantFormat.nf4.quantize(values, rows: 1, cols: 64)
        XCTAssertEqual(q.dequantize()[10], -.greatestFiniteMagnitude)
    }

    func testTheReferenceRejectsPartialBlocks() {
        let x = [Float](repeating: 1, count: 64)
        var bad: Int64 = 0
        var q8 = [block_q8_0](repeating: block_q8_0(), count: 2)
        var q4 = [block_q4_0](repeating: block_q4_0(), count: 2)
        var n4 = block_nf4()
        var y = [Float](repeating: 0, count: 64)
        XCTAssertEqual(relora_quantize_row_q8_0(x, &q8, 33, &bad), RELORA_QUANT_ERR_LENGTH)
        XCTAssertEqual(bad, -1)
        XCTAssertEqual(relora_quantize_row_q4_0(x, &q4, 48, &bad), RELORA_QUANT_ERR_LENGTH)
        XCTAssertEqual(relora_quantize_row_nf4(x, &n4, 32, &bad), RELORA_QUANT_ERR_LENGTH)
        XCTAssertEqual(relora_quantize_row_nf4(x, &n4, -64, &bad), RELORA_QUANT_ERR_LENGTH)
        XCTAssertEqual(relora_dequantize_row_q8_0(q8, &y, 31), RELORA_QUANT_ERR_LENGTH)
        XCTAssertEqual(relora_dequantize_row_nf4(&n4, &y, 63), RELORA_QUANT_ERR_LENGTH)
        XCTAssertEqual(relora_quantize_row_q8_0(x, &q8, 64, &bad), RELORA_QUANT_OK)
        XCTAssertEqual(relora_quantize_row_q8_0(x, &q8, 0, &bad), RELORA_QUANT_OK)
    }

    func testWrappedBytesMustMatchTheShape() {
        assertInvalidData(try QuantizedMatrix(format: .q4_0, rows: 2, cols: 33, bytes: [UInt8](repeating: 0, count: 36)),
                          mentions: "needs 72 bytes")
        XCTAssertNoThrow(try QuantizedMatrix(format: .q4_0, rows: 2, cols: 33, bytes: [UInt8](repeating: 0, count: 72)))
    }

    // MARK: Padding

    /// Rows that do not divide into blocks are stored zero-padded: the bytes are those of the matrix with
    /// explicit zero columns appended, and `dequantize()` returns exactly `rows * cols` values.
    func testRowsArePaddedWithZerosThatDequantizeToNothingVisible() throws {
        var rng = TestRNG(0xDAD)
        for format in QuantFormat.allCases {
            for cols in [5461, 5, 33, 65, 100] {
                let rows = 3
                let values = rng.floats(rows * cols)
                let q = try format.quantize(values, rows: rows, cols: cols)
                let padded = q.paddedCols
                XCTAssertEqual(padded % format.blockSize, 0)
                XCTAssertLessThan(padded - cols, format.blockSize)
                XCTAssertEqual(q.bytes.count, rows * q.blocksPerRow * format.bytesPerBlock)
                var explicit = [Float](repeating: 0, count: rows * padded)
                for r in 0 ..< rows { for c in 0 ..< cols { explicit[r * padded + c] = values[r * cols + c] } }
                let e = try format.quantize(explicit, rows: rows, cols: padded)
                XCTAssertEqual(q.bytes, e.bytes, "\(format) cols \(cols): padding must be zeros")
                let d = q.dequantize(), de = e.dequantize()
                XCTAssertEqual(d.count, rows * cols)
                for r in 0 ..< rows {
                    XCTAssertEqual(Array(d[r * cols ..< (r + 1) * cols]), Array(de[r * padded ..< r * padded + cols]))
                    // The padded tail dequantizes to zeros (it is never visible, but it must not be garbage).
                    XCTAssertTrue(de[r * padded + cols ..< (r + 1) * padded].allSatisfy { $0 == 0 }, "\(format) cols \(cols)")
                }
            }
            let empty = try format.quantize([], rows: 0, cols: 10)
            XCTAssertEqual(empty.bytes.count, 0)
            XCTAssertEqual(try format.quantize([], rows: 4, cols: 0).dequantize(), [])
        }
    }

    // MARK: Helpers

    /// float32(1e-38), the subnormal that bitsandbytes clamps the absmax to (converted from a Double at run
    /// time: a Float literal this small draws an underflow warning).
    private let bitsandbytesAbsmaxClamp = Float(1e-38 as Double)

    private func canonicalZeroBlock(_ format: QuantFormat) -> [UInt8] {
        switch format {
        case .q8_0: return [UInt8](repeating: 0, count: 34)
        case .q4_0: return [0x00, 0x80] + [UInt8](repeating: 0x88, count: 16)
        case .nf4: return [0, 0, 0, 0] + [UInt8](repeating: 0x77, count: 32)
        }
    }

    private func bytes(_ file: SafetensorsFile, _ name: String) throws -> [UInt8] {
        try file.withRawBytes(name) { [UInt8]($0) }
    }

    private func matrixShape(_ file: SafetensorsFile, _ name: String) throws -> (Int, Int) {
        let shape = try XCTUnwrap(file.info(name)?.shape, name)
        XCTAssertEqual(shape.count, 2, name)
        return (shape[0], shape[1])
    }

    private func fixtureLabels(_ file: SafetensorsFile, _ format: QuantFormat) throws -> [String] {
        struct Fixture: Decodable { let labels: [String: [String]] }
        let json = try XCTUnwrap(file.metadata["fixture"])
        return try XCTUnwrap(JSONDecoder().decode(Fixture.self, from: Data(json.utf8)).labels[format.rawValue])
    }

    private func assertBitwiseEqual(_ a: [Float], _ b: [Float], _ context: String,
                                    file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(a.count, b.count, context, file: file, line: line)
        if let i = zip(a, b).enumerated().first(where: { $0.element.0.bitPattern != $0.element.1.bitPattern })?.offset {
            XCTFail("\(context): element \(i): \(a[i]) vs \(b[i])", file: file, line: line)
        }
    }
}
