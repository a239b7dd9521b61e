import Foundation
import XCTest
@testable import ReLoRACore

/// The collectives on the in-process group (the reference the engines are tested against).
final class CommunicatorTests: XCTestCase {
    /// Rank r's values: distinct per rank and element, with magnitudes that make the summation order visible.
    static func values(rank: Int, count: Int) -> [Float] {
        var rng = TestRNG(UInt64(100 + rank))
        return (0..<count).map { _ in rng.uniform(-1, 1) * Float(1 << (rank * 7 % 20)) }
    }

    func testSumInRankOrderEqualsTheSequentialSum() throws {
        for ranks in [1, 2, 3, 4] {
            for count in [0, 1, 2, 7, 1001] {
                let sums = try InProcessGroup.run(ranks: ranks) { c -> [Float] in
                    var v = Self.values(rank: c.rank, count: count)
                    try c.sumInRankOrder(&v)
                    return v
                }
                var expected = Self.values(rank: 0, count: count)
                for r in 1..<max(ranks, 1) where ranks > 1 {
                    let v = Self.values(rank: r, count: count)
                    for i in 0..<count { expected[i] += v[i] }
                }
                for (rank, sum) in sums.enumerated() {
                    XCTAssertEqual(sum.map(\.bitPattern), expected.map(\.bitPattern), "W \(ranks), n \(count), rank \(rank)")
                }
            }
        }
    }

    func testGatherAllToAllBroadcast() throws {
        let w = 3
        let out = try InProcessGroup.run(ranks: w) { c -> ([[Int32]], [Int32], [Int32]) in
            let gathered = try c.allGather([Int32(c.rank), Int32(10 * c.rank)])
            // Block s of rank r's send is [100 r + s, 100 r + s]; rank r receives block r of every rank.
            var send: [Int32] = []
            for s in 0..<w { let x = Int32(100 * c.rank + s); send += [x, x] }
            var received = [Int32](repeating: -1, count: send.count)
            try send.withUnsafeBytes { s in try received.withUnsafeMutableBytes { try c.allToAll(s, into: $0) } }
            let rooted = try c.broadcast([Int32(c.rank + 7)], root: 2)
            try c.barrier()
            return (gathered, received, rooted)
        }
        for (rank, (gathered, received, rooted)) in out.enumerated() {
            XCTAssertEqual(gathered, [[0, 0], [1, 10], [2, 20]])
            var expected: [Int32] = []
            for q in 0..<w { let x = Int32(100 * q + rank); expected += [x, x] }
            XCTAssertEqual(received, expected)
            XCTAssertEqual(rooted, [9])
        }
    }

    /// A rank that fails does not leave the others waiting in their next collective.
    func testAFailingRankFailsTheGroupWithoutHanging() {
        struct Boom: Error {}
        XCTAssertThrowsError(try InProcessGroup.run(ranks: 3) { c -> Int in
            if c.rank == 1 { throw Boom() }
            try c.barrier()
            try c.barrier()
            return c.rank
        }) { XCTAssertTrue($0 is Boom, "\($0)") }
    }
}
