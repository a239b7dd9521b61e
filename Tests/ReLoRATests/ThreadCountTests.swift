import Foundation
import XCTest
@testable import ReLoRACore

/// The CPU backend computes the same bits with any number of threads (`RELORA_CPU_THREADS`,
/// `withCPUThreads`): data-parallel ranks split a node's cores between them and must agree with one
/// process. Each op whose work is combined across rows or elements runs with 1, 2 and 3 threads (3 on a
/// 2-core machine still splits the work three ways).
final class ThreadCountTests: XCTestCase {
    static let threadCounts = [1, 2, 3]

    /// `body` under each thread count; every result must equal the first, bit for bit.
    func assertSameBits<T: Equatable>(_ what: String, file: StaticString = #filePath, line: UInt = #line,
                                      _ body: () throws -> T) rethrows {
        let results = try Self.threadCounts.map { n in try withCPUThreads(n) { try body() } }
        for (n, r) in zip(Self.threadCounts, results).dropFirst() where r != results[0] {
            XCTFail("\(what): \(n) threads differ from \(Self.threadCounts[0])", file: file, line: line)
        }
    }

    /// Bit patterns, so that NaNs and signed zeros compare too.
    func bits(_ values: [Float]) -> [UInt32] { values.map(\.bitPattern) }

    func testEnvironmentValue() {
        XCTAssertEqual(CPUThreads.parse(nil, cores: 8).threads, 8)
        XCTAssertNil(CPUThreads.parse(nil, cores: 8).warning)
        XCTAssertEqual(CPUThreads.parse("3", cores: 8).threads, 3)
        XCTAssertEqual(CPUThreads.parse(" 12 ", cores: 8).threads, 12)
        for bad in ["0", "-2", "two", "1.5", ""] {
            let (threads, warning) = CPUThreads.parse(bad, cores: 8)
            XCTAssertEqual(threads, 8, bad)
            XCTAssertEqual(warning, "RELORA_CPU_THREADS=\(bad) is not a positive integer; using 8 threads (one per core)")
        }
        XCTAssertEqual(withCPUThreads(3) { withCPUThreads(1) { cpuThreadCount } }, 1)
        XCTAssertEqual(withCPUThreads(3) { cpuThreadCount }, 3)
    }

    // MARK: Ops

    /// The weight gradient sums over rows; dx is per row.
    func testRMSNormBackward() {
        let b = CPUBackend()
        var rng = TestRNG(1)
        let rows = 1000, dim = 96
        let x = makeTensor(b, [rows, dim], rng.floats(rows * dim)), dy = makeTensor(b, [rows, dim], rng.floats(rows * dim))
        let w = makeTensor(b, [dim], rng.floats(dim)), out = b.makeTensor([rows, dim], tag: .workspace)
        let rstd = b.makeTensor([rows], tag: .workspace)
        b.rmsnormForward(x, weight: w, out: out, rstd: rstd, rows: rows, dim: dim, eps: 1e-5)
        assertSameBits("rmsnormBackward") { () -> [UInt32] in
            let dx = b.makeTensor([rows, dim], tag: .workspace, zeroed: true), dw = b.makeTensor([dim], tag: .workspace, zeroed: true)
            b.rmsnormBackward(dy, x: x, weight: w, rstd: rstd, dx: dx, dweight: dw, rows: rows, dim: dim)
            return bits(dx.toArray() + dw.toArray())
        }
    }

    /// The returned loss sums over rows (one ignored); the per-row losses and gradients are per row. A Double
    /// sum of Float losses is exact unless their sum needs over 53 bits, so the rows alternate between a loss
    /// of ~0.06 (the target logit 0, the others -7: a unit in the last place of 2^-28) and one of ~1e9 (the
    /// target logit -1e9): the order of the additions then shows.
    func testCrossEntropy() {
        let b = CPUBackend()
        var rng = TestRNG(2)
        let rows = 300, vocab = 64
        var logits = [Float](repeating: 0, count: rows * vocab)
        let targets = (0..<rows).map { $0 == 7 ? Int32(-1) : Int32(($0 * 13) % vocab) }
        for r in 0..<rows {
            for j in 0..<vocab { logits[r * vocab + j] = r % 2 == 0 ? -7 + 0.1 * rng.uniform() : rng.uniform() }
            if targets[r] >= 0 { logits[r * vocab + Int(targets[r])] = r % 2 == 0 ? 0 : -1e9 * (1 + rng.uniform(0, 1)) }
        }
        let t = b.makeTensor([rows], dtype: .i32, tag: .workspace)
        b.upload(targets, to: t)
        for gradScale in [nil, Float(1) / Float(rows)] {
            assertSameBits("crossEntropy gradScale \(String(describing: gradScale))") { () -> [UInt64] in
                let l = makeTensor(b, [rows, vocab], logits), losses = b.makeTensor([rows], tag: .workspace)
                let sum = b.crossEntropy(logits: l, targets: t, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale)
                return [sum.bitPattern] + (losses.toArray() + l.toArray()).map { UInt64($0.bitPattern) }
            }
        }
    }

    /// Several of the 2^16-element blocks and a ragged end; each run of 256 values scaled by 2^-20 ... 2^20,
    /// so the partial sums span 2^80 and how they are grouped shows in the Double sum (the op stores it as
    /// a Float, which hides most differences; the Double is what is combined).
    func testSumOfSquares() {
        let b = CPUBackend()
        var rng = TestRNG(3)
        let count = 5 * 65536 + 123
        var values = rng.floats(count)
        for i in 0..<count { values[i] *= Float(sign: .plus, exponent: (i / 256 * 7) % 41 - 20, significand: 1) }
        let x = makeTensor(b, [count], values)
        let out = b.makeTensor([2], tag: .workspace, zeroed: true)
        assertSameBits("sumOfSquares") { () -> [UInt64] in
            b.sumOfSquares(x, into: out, at: 1)
            return [CPUBackend.sumOfSquares(x.f32, count: count).bitPattern, UInt64(out.toArray()[1].bitPattern)]
        }
    }

    /// An integer count, exact whatever the grouping; checked so that it stays so.
    func testCountChangedCodes() {
        let b = CPUBackend()
        var rng = TestRNG(4)
        let rows = 700, cols = 64
        let q = QuantizedTensor(format: .q4_0, rows: rows, cols: cols, backend: b, tag: .workspace)
        XCTAssertNil(b.quantize(makeTensor(b, [rows, cols], rng.floats(rows * cols)), into: q, rounding: .nearest))
        let old = b.makeTensor([q.blocks.count], dtype: .u8, tag: .workspace)
        b.copy(q.blocks, to: old)
        XCTAssertNil(b.quantize(makeTensor(b, [rows, cols], rng.floats(rows * cols)), into: q, rounding: .nearest))
        let out = b.makeTensor([1], tag: .workspace, zeroed: true)
        assertSameBits("countChangedCodes") { () -> Float in
            b.countChangedCodes(old: old, new: q, into: out, at: 0)
            return out.toArray()[0]
        }
    }
}
