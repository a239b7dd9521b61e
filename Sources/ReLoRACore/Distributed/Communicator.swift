import Foundation

/// The processes of one data-parallel run and the collectives training needs, over host memory.
///
/// An engine implements four byte-level primitives (all-gather, all-to-all, broadcast, barrier) and
/// `abort`; everything training uses is built on them here, once, so that results never depend on the
/// engine or its algorithm. In particular `sumInRankOrder` adds the ranks' buffers in rank order
/// (`((b0 + b1) + b2) + ...`, element by element, in f32) on every engine: W MPI processes give the same
/// bits as W virtual ranks in one process.
///
/// Every rank must call the same collectives in the same order with the same sizes (a mismatch is a
/// bug; engines may hang or abort on it). Collectives throw `ReLoRAError` when the engine reports a
/// failure (a peer that died): the run then ends with one sentence and a non-zero exit.
public protocol Communicator: AnyObject {
    /// 0 ..< worldSize; rank 0 prints, writes metrics and saves checkpoints.
    var rank: Int { get }
    var worldSize: Int { get }
    /// Rank among the processes on this node (chooses the GPU), and how many there are (divides the cores).
    var localRank: Int { get }
    var localSize: Int { get }
    /// `single`, `in-process`, `mpi`, `nccl`: for logs.
    var engine: String { get }

    /// Every rank's `send` (the same byte count on every rank), concatenated in rank order into `receive`
    /// (`worldSize * send.count` bytes).
    func allGather(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws
    /// `send` is `worldSize` equal blocks; block `s` goes to rank `s`. `receive` gets, as block `q`, the
    /// block rank `q` sent to this rank. Both hold `worldSize * block` bytes.
    func allToAll(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws
    /// `root`'s bytes into `buffer` on every rank.
    func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws
    func barrier() throws
    /// Ends every rank of the run (after printing `message` on this one, prefixed with its rank in a run
    /// of several) with exit status `status` where the engine can pass it on: for errors some ranks cannot
    /// see, so that no rank waits forever in a collective.
    func abort(_ message: String, status: Int32) -> Never
    /// The normal end of a process every rank reaches (MPI_Finalize, ncclCommDestroy). Later collectives
    /// throw. Idempotent.
    func finish()
}

extension Communicator {
    public func abort(_ message: String) -> Never { abort(message, status: 1) }
    public func finish() {}

    /// Element-wise sum over ranks, in rank order, into `values` on every rank. Each rank sums one share of
    /// the elements (all-to-all of shares, the W contributions added in rank order, all-gather of the
    /// sums): every rank moves about 2 (W-1)/W of the buffer, and the result does not depend on the engine.
    public func sumInRankOrder(_ values: UnsafeMutableBufferPointer<Float>) throws {
        let w = worldSize, n = values.count
        guard w > 1, n > 0 else { return }
        let share = (n + w - 1) / w  // the last shares may be short or empty: padded with zeros
        var send = [Float](repeating: 0, count: share * w)
        send.withUnsafeMutableBufferPointer { s in
            for i in 0..<n { s[i] = values[i] }
        }
        var received = [Float](repeating: 0, count: share * w)
        try send.withUnsafeBytes { s in try received.withUnsafeMutableBytes { r in try allToAll(s, into: r) } }
        // received[q * share + j] is rank q's element (rank * share + j): add in rank order.
        var mine = [Float](repeating: 0, count: share)
        for j in 0..<share {
            var sum = received[j]
            for q in 1..<w { sum += received[q * share + j] }
            mine[j] = sum
        }
        var all = [Float](repeating: 0, count: share * w)
        try mine.withUnsafeBytes { m in try all.withUnsafeMutableBytes { a in try allGather(m, into: a) } }
        for i in 0..<n { values[i] = all[i] }
    }

    public func sumInRankOrder(_ values: inout [Float]) throws {
        try values.withUnsafeMutableBufferPointer { try sumInRankOrder($0) }
    }

    /// Every rank's `values` (the same count on every rank), in rank order.
    public func allGather<T: BitwiseCopyable>(_ values: [T]) throws -> [[T]] {
        guard worldSize > 1 else { return [values] }
        var all = [T](unsafeUninitializedCapacity: values.count * worldSize) { _, count in count = values.count * worldSize }
        try values.withUnsafeBytes { v in try all.withUnsafeMutableBytes { a in try allGather(v, into: a) } }
        return (0..<worldSize).map { Array(all[$0 * values.count ..< ($0 + 1) * values.count]) }
    }

    /// `root`'s `values` on every rank (the same count on every rank).
    public func broadcast<T: BitwiseCopyable>(_ values: [T], root: Int = 0) throws -> [T] {
        guard worldSize > 1 else { return values }
        var out = values
        try out.withUnsafeMutableBytes { try broadcast($0, root: root) }
        return out
    }
}

/// One process: every collective is the identity.
public final class SingleProcess: Communicator {
    public init() {}
    public var rank: Int { 0 }
    public var worldSize: Int { 1 }
    public var localRank: Int { 0 }
    public var localSize: Int { 1 }
    public var engine: String { "single" }
    public func allGather(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(receive.count == send.count, "allGather: \(send.count) bytes into \(receive.count)")
        receive.copyMemory(from: send)
    }
    public func allToAll(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(receive.count == send.count, "allToAll: \(send.count) bytes into \(receive.count)")
        receive.copyMemory(from: send)
    }
    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        precondition(root == 0, "broadcast from rank \(root) of 1")
    }
    public func barrier() throws {}
    public func abort(_ message: String, status: Int32) -> Never {
        FileHandle.standardError.write(Data((message + "\n").utf8))
        exit(status)
    }
}

/// A communicator whose collectives work on a backend's own tensors (device memory) without staging them
/// through the host, overlapped with the backend's computation: the CUDA backend's NCCL engine. The trainer
/// sums gradients through it when it `serves` the trainer's backend, and through `sumInRankOrder` of host
/// copies otherwise.
public protocol DeviceCollectives: Communicator {
    /// Whether `backend`'s tensors can be passed to `startSum(_:on:)`.
    func serves(_ backend: Backend) -> Bool
    /// Starts the element-wise sum over the ranks, in rank order, of the f32 `tensors` taken as one
    /// concatenated vector, written back into them on every rank: the same bits as `sumInRankOrder` of their
    /// host copies (every element is the W contributions added in rank order, whatever the chunking). The
    /// sum runs after the work the backend has been given so far and alongside what it is given next, which
    /// must neither read nor write these tensors before `finishSums()`. Every rank starts the same sums in
    /// the same order.
    func startSum(_ tensors: [Tensor], on backend: Backend) throws
    /// Waits for every started sum (within the engine's timeout); after it the backend's work sees them.
    func finishSums() throws
}

/// The two device buffers a device engine's gradient sums run through (NCCL's `flat` and `parts`, tag
/// `.workspace`), sized here once for the engine and for plans of its runs. They are made at the first sum and
/// remade larger when a later sum needs more (the old pair is released once the new one exists); each holds
/// `floats(count:chunkFloats:worldSize:)` f32 values.
public enum DeviceSumBuffers {
    /// The most floats one chunk of a device sum moves unless `RELORA_COLLECTIVE_CHUNK_FLOATS` says otherwise:
    /// 4 Mi (16 MiB in each of the two buffers).
    public static let defaultChunkFloats = 1 << 22

    /// Floats in each buffer for a sum of `count` values in chunks of at most `chunkFloats`: the chunk,
    /// min(chunkFloats, count), rounded up to a multiple of `worldSize` (each rank sums an equal share).
    public static func floats(count: Int, chunkFloats: Int, worldSize: Int) -> Int {
        let chunk = min(chunkFloats, count)
        return (chunk + worldSize - 1) / worldSize * worldSize
    }
}
