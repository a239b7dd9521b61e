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

/// The stochastic-rounding reference quantizers of `relora_quant.h` (`relora_quantize_row_*_sr`): the
/// same scales as round to nearest, codes that are one of the two neighbours of each value, the
/// probabilities of each, idempotence, and the same degenerate blocks and errors as round to nearest.
final class StochasticRoundingTests: XCTestCase {
    func key(_ s: UInt64) -> QuantRounding { .stochastic(seed: 77, stream: s) }

    /// Scales (and the nf4 absmax) are byte-identical to round to nearest's; each dequantized value is one
    /// of the two representable values around the input (so |deq - x| < the gap between them), which
    /// round to nearest's value is one of too.
    func testSameScalesAsNearestAndOneOfTheTwoNeighbours() throws {
        var rng = TestRNG(0x5C)
        for format in QuantFormat.allCases {
            let rows = 7, cols = 200
            let x = (0 ..< rows * cols).map { _ in rng.uniform(-1, 1) * (rng.int(16) == 0 ? 0.3 : 0.05) }
            let nearest = try format.quantize(x, rows: rows, cols: cols)
            let dn = nearest.dequantize()
            for stream in 0 ..< UInt64(4) {
                let sr = try QuantizedMatrix(quantizing: x, rows: rows, cols: cols, format: format, rounding: key(stream))
                XCTAssertEqual(scales(sr), scales(nearest), "\(format)")
                let ds = sr.dequantize()
                for i in 0 ..< x.count {
                    let (lo, hi) = neighbours(format, of: x[i], blockValues: blockGrid(format, nearest, i / cols, i % cols))
                    XCTAssertTrue(ds[i] == lo || ds[i] == hi, "\(format) [\(i)]: \(ds[i]) not in {\(lo), \(hi)} around \(x[i])")
                    XCTAssertTrue(dn[i] == lo || dn[i] == hi, "\(format) [\(i)]: nearest \(dn[i]) not in {\(lo), \(hi)}")
                }
            }
        }
    }

    /// P(up) is the fractional position between the neighbours: 4096 weights at the same position p of
    /// their gap (block extremes pinned, so every block has the same scale) round up in a fraction
    /// within 6 standard errors sqrt(p (1 - p) / 4096) of p, for p = 0.1, 0.5, 0.9.
    func testProbabilityOfRoundingUpIsTheFractionalPosition() throws {
        for format in QuantFormat.allCases {
            let block = format.blockSize, rows = 4096 / (block - 1), cols = block
            let (pin, lo, hi): (Float, Float, Float)
            switch format {
            case .q8_0: (pin, lo, hi) = (127 * 0x1p-7, 5 * 0x1p-7, 6 * 0x1p-7)     // d = 2^-7
            case .q4_0: (pin, lo, hi) = (1, 0.25, 0.375)                             // d = -1/8: codes 6 and 5
            case .nf4: (pin, lo, hi) = (1, relora_nf4_value(9), relora_nf4_value(10)) // absmax 1
            }
            for p: Float in [0.1, 0.5, 0.9] {
                let v = lo + p * (hi - lo)
                let x = (0 ..< rows * cols).map { $0 % cols == 0 ? pin : v }
                let d = try QuantizedMatrix(quantizing: x, rows: rows, cols: cols, format: format, rounding: key(3)).dequantize()
                let others = (0 ..< x.count).filter { $0 % cols != 0 }
                XCTAssertTrue(others.allSatisfy { d[$0] == lo || d[$0] == hi }, "\(format) p \(p)")
                let up = Double(others.filter { d[$0] == hi }.count) / Double(others.count)
                let exact = Double((v - lo) / (hi - lo))  // p as the reference computes it (v is rounded)
                XCTAssertEqual(up, exact, accuracy: 6 * (exact * (1 - exact) / Double(others.count)).squareRoot(), "\(format) p \(p)")
            }
        }
    }

    /// quantize_sr(deq(q)) == q, for q from either rounding and under any key: a dequantized value is
    /// representable (probability of moving 0), so merging a zero update changes no code.
    func testRequantizingIsIdempotent() throws {
        var rng = TestRNG(0x1D5)
        let file = try SafetensorsFile(path: fixturesDirectory() + "/quant_reference.safetensors")
        for format in QuantFormat.allCases {
            var inputs: [([Float], Int, Int)] = [(try file.floats("random"), 8, 256)]
            for (rows, cols, scale) in [(3, 256, Float(0.02)), (5, 100, 1), (4, 64, 1e-6), (2, 130, 1e4)] {
                inputs.append(((0 ..< rows * cols).map { _ in rng.uniform(-1, 1) * scale }, rows, cols))
            }
            let adversarial = "\(format.rawValue).adversarial"
            let shape = try XCTUnwrap(file.info(adversarial)?.shape)
            inputs.append((try file.floats(adversarial), shape[0], shape[1]))
            for (x, rows, cols) in inputs {
                for q in [try format.quantize(x, rows: rows, cols: cols),
                          try QuantizedMatrix(quantizing: x, rows: rows, cols: cols, format: format, rounding: key(1))] {
                    for stream in 10 ..< UInt64(13) {
                        let again = try QuantizedMatrix(quantizing: q.dequantize(), rows: rows, cols: cols, format: format,
                                                        rounding: key(stream))
                        XCTAssertEqual(again.bytes, q.bytes, "\(format) [\(rows), \(cols)] stream \(stream)")
                    }
                }
            }
        }
    }

    /// Zero blocks are the canonical zero block, and inf/NaN and scale overflows are rejected at the same
    /// element as round to nearest rejects them.
    func testDegenerateBlocksAndErrorsAsNearest() throws {
        for format in QuantFormat.allCases {
            let n = 2 * format.blockSize
            let zeros = [Float](repeating: -0.0, count: n)
            XCTAssertEqual(try QuantizedMatrix(quantizing: zeros, rows: 1, cols: n, format: format, rounding: key(0)).bytes,
                           try format.quantize(zeros, rows: 1, cols: n).bytes, "\(format)")
            var bad = [Float](repeating: 0.5, count: 3 * n)
            bad[n + 5] = .nan
            for rounding in [QuantRounding.nearest, key(0)] {
                XCTAssertThrowsError(try QuantizedMatrix(quantizing: bad, rows: 3, cols: n, format: format, rounding: rounding)) {
                    XCTAssertTrue("\($0)".contains("element [1, 5] is NaN"), "\($0)")
                }
            }
            if let limit = format.magnitudeLimit {
                var big = [Float](repeating: 1, count: n)
                big[7] = limit
                XCTAssertThrowsError(try QuantizedMatrix(quantizing: big, rows: 1, cols: n, format: format, rounding: key(0))) {
                    XCTAssertTrue("\($0)".contains("element [0, 7]"), "\($0)")
                }
            }
        }
    }

    // MARK: Helpers

    /// Every block's scale bytes (q8_0, q4_0: the fp16 d; nf4: the fp32 absmax).
    func scales(_ q: QuantizedMatrix) -> [UInt8] {
        let size = q.format.bytesPerBlock, scaleBytes = q.format == .nf4 ? 4 : 2
        return stride(from: 0, to: q.bytes.count, by: size).flatMap { q.bytes[$0 ..< $0 + scaleBytes] }
    }

    /// The values a weight's block can represent, ascending, from its stored scale.
    func blockGrid(_ format: QuantFormat, _ q: QuantizedMatrix, _ row: Int, _ col: Int) -> [Float] {
        let base = row * q.bytesPerRow + (col / format.blockSize) * format.bytesPerBlock
        switch format {
        case .q8_0, .q4_0:
            let d = relora_fp16_to_fp32(UInt16(q.bytes[base]) | UInt16(q.bytes[base + 1]) << 8)
            let codes = format == .q8_0 ? Array(-127 ... 127) : Array(-8 ... 7)
            return codes.map { Float($0) * d }.sorted()
        case .nf4:
            let absmax = q.bytes[base ..< base + 4].withUnsafeBytes { $0.loadUnaligned(as: Float.self) }
            return (0 ..< 16).map { relora_nf4_value(Int32($0)) * absmax }.sorted()
        }
    }

    /// The representable values lo <= x <= hi around x (lo == hi when x is representable or beyond an end).
    func neighbours(_ format: QuantFormat, of x: Float, blockValues grid: [Float]) -> (Float, Float) {
        guard let i = grid.lastIndex(where: { $0 <= x }) else { return (grid[0], grid[0]) }
        if grid[i] == x || i == grid.count - 1 { return (grid[i], grid[i]) }
        return (grid[i], grid[i + 1])
    }
}
