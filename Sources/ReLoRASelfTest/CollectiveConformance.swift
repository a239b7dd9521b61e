import Foundation
import ReLoRACore

/// The collectives of a `Communicator` checked on every rank of the run, bit for bit, against what the
/// same data gives computed in one place: `relora selftest --group collectives`, under `mpirun -np N` for
/// the MPI engine (and in one process for `SingleProcess`; the tests run it on `InProcessGroup`).
///
/// Every rank can generate every rank's data (a function of rank, element and case), so each rank computes
/// the expected result on its own: for `sumInRankOrder` the sequential f32 sum `((x0 + x1) + x2) + ...`
/// in rank order. The values span 2^-16 to 2^16 in magnitude with both signs, so from 3 ranks on a sum in
/// another order differs in many elements (the tests check that); with 2 ranks the order does not matter
/// (x0 + x1 = x1 + x0) and the check is of the data movement. The sizes are awkward on purpose: empty, one
/// element, a prime that the ranks cannot share evenly, and a few MB (several pieces when the plugin is
/// told to split calls).
///
/// Each check's mismatch count is gathered from every rank, so every rank returns the same checks: a
/// check passes when no element differs on any rank; `maxError` is the number of differing elements
/// summed over the ranks (bound 0), and a failure's note names the ranks.
public enum CollectiveConformance {
    /// f32 elements per rank for the ordered sums; bytes per rank (all-gather, broadcast) and per block
    /// (all-to-all) for the byte collectives.
    public static let sumSizes = [0, 1, 7, 1000, 786_433]  // 786433 f32: 3 MiB + 4 bytes
    public static let byteSizes = [0, 1, 7, 2_000_003]

    /// Runs every check on `communicator`; every rank of the run must call it. Throws what a collective
    /// throws (a failure of the engine, such as a dead peer); wrong results are failed checks.
    public static func run(_ communicator: Communicator) throws -> [ConformanceCheck] {
        let w = communicator.worldSize, me = communicator.rank
        var local: [(op: String, shape: String, dtype: String, mismatches: Int, first: Int)] = []
        func record<T: BitwiseCopyable>(_ op: String, _ shape: String, _ dtype: String, _ got: [T], _ expected: [T]) {
            let d = differences(got, expected)
            local.append((op, shape, dtype, d.count, d.first))
        }

        for (c, n) in sumSizes.enumerated() {
            let salt = UInt64(c)
            var values = self.values(rank: me, count: n, salt: salt)
            try communicator.sumInRankOrder(&values)
            var sum = self.values(rank: 0, count: n, salt: salt)
            for q in 1..<max(w, 1) {
                let x = self.values(rank: q, count: n, salt: salt)
                for i in 0..<n { sum[i] += x[i] }
            }
            record("sumInRankOrder", "\(n) x \(w) ranks", "f32", values, sum)
        }
        for (c, n) in byteSizes.enumerated() {
            let salt = 0x100 + UInt64(c)
            let send = bytes(stream: me, count: n, salt: salt)
            var receive = [UInt8](repeating: 0, count: n * w)
            try send.withUnsafeBytes { s in try receive.withUnsafeMutableBytes { try communicator.allGather(s, into: $0) } }
            record("allGather", "\(n) B x \(w) ranks", "bytes", receive,
                   (0..<w).flatMap { bytes(stream: $0, count: n, salt: salt) })
        }
        for (c, n) in byteSizes.enumerated() {
            let salt = 0x200 + UInt64(c)
            // Rank r's block for rank s is stream r * w + s; block q of rank s's receive: stream q * w + s.
            let send = (0..<w).flatMap { bytes(stream: me * w + $0, count: n, salt: salt) }
            var receive = [UInt8](repeating: 0, count: n * w)
            try send.withUnsafeBytes { s in try receive.withUnsafeMutableBytes { try communicator.allToAll(s, into: $0) } }
            record("allToAll", "\(n) B blocks x \(w) ranks", "bytes", receive,
                   (0..<w).flatMap { bytes(stream: $0 * w + me, count: n, salt: salt) })
        }
        let root = w - 1
        for (c, n) in byteSizes.enumerated() {
            let salt = 0x300 + UInt64(c)
            let expected = bytes(stream: root, count: n, salt: salt)
            var buffer = me == root ? expected : [UInt8](repeating: 0xA5, count: n)
            try buffer.withUnsafeMutableBytes { try communicator.broadcast($0, root: root) }
            record("broadcast from rank \(root)", "\(n) B", "bytes", buffer, expected)
        }
        try communicator.barrier()
        local.append(("barrier", "\(w) ranks", "-", 0, -1))

        // Every rank's counts, in rank order: [mismatches, first] per check.
        let mine = local.flatMap { [Int64($0.mismatches), Int64($0.first)] }
        let all = try communicator.allGather(mine)
        return local.enumerated().map { k, check in
            let perRank = all.map { (count: Int($0[2 * k]), first: Int($0[2 * k + 1])) }
            let failing = perRank.enumerated().filter { $0.element.count > 0 }
            let total = perRank.reduce(0) { $0 + $1.count }
            let note = failing.map { r, m in "rank \(r): \(m.count) differ (first at \(m.first))" }.joined(separator: "; ")
            return ConformanceCheck(group: .collectives, op: check.op, shape: check.shape, dtype: check.dtype,
                                    maxError: Double(total), bound: 0, passed: total == 0, note: note)
        }
    }

    /// How many elements of `got` differ from `expected` in their bits, and the first that does (-1 when
    /// none). memcmp first: the element loop runs only for a failure.
    static func differences<T: BitwiseCopyable>(_ got: [T], _ expected: [T]) -> (count: Int, first: Int) {
        precondition(got.count == expected.count)
        let size = MemoryLayout<T>.stride
        return got.withUnsafeBytes { a in
            expected.withUnsafeBytes { b in
                if a.count == 0 || memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0 { return (0, -1) }
                var count = 0, first = -1
                for i in 0..<got.count where memcmp(a.baseAddress! + i * size, b.baseAddress! + i * size, size) != 0 {
                    if first < 0 { first = i }
                    count += 1
                }
                return (count, first)
            }
        }
    }

    /// Rank `rank`'s `count` f32 elements of case `salt`.
    static func values(rank: Int, count: Int, salt: UInt64) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            for i in 0..<count { buffer[i] = value(rank: rank, index: i, salt: salt) }
            initialized = count
        }
    }

    /// SplitMix64's finalizer: a well-mixed 64-bit function of its input.
    private static func mix(_ x: UInt64) -> UInt64 {
        var z = x &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Rank `rank`'s f32 element `index` of case `salt`: ±(1 + m) * 2^e with a random 23-bit m and e in
    /// -16 ... 15 (built from its bits: a sign bit, the biased exponent 127 + e, the significand bits), so
    /// that sums of a few of them round differently in different orders.
    static func value(rank: Int, index: Int, salt: UInt64) -> Float {
        let z = mix(UInt64(truncatingIfNeeded: index) ^ (UInt64(truncatingIfNeeded: rank) << 40) ^ (salt << 52))
        let sign = UInt32(truncatingIfNeeded: z >> 5) & 1
        let exponent = UInt32(truncatingIfNeeded: z & 31) + 127 - 16
        return Float(bitPattern: sign << 31 | exponent << 23 | UInt32(truncatingIfNeeded: z >> 41))
    }

    /// `count` bytes of stream `stream` (a rank, or a block of a rank) of case `salt`: 64-bit words of a
    /// cheap hash (the byte collectives move millions of bytes), in the machine's byte order.
    static func bytes(stream: Int, count: Int, salt: UInt64) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            let seed = mix(UInt64(truncatingIfNeeded: stream) &* 0x1_0000_0001 ^ salt)
            let raw = UnsafeMutableRawBufferPointer(buffer)
            var i = 0
            while i < count {
                var word = (UInt64(truncatingIfNeeded: i) &+ seed) &* 0x9E37_79B9_7F4A_7C15
                word ^= word >> 29
                withUnsafeBytes(of: &word) { w in
                    let n = min(8, count - i)
                    raw.baseAddress!.advanced(by: i).copyMemory(from: w.baseAddress!, byteCount: n)
                }
                i += 8
            }
            initialized = count
        }
    }
}
