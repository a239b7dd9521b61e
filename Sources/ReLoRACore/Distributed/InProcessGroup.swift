import Foundation

/// W ranks in one process, each run by its own thread: the reference the MPI and NCCL engines are
/// tested against (the same collectives, from the same `Communicator` extension, give the same bits), and
/// a way to test data-parallel training without a launcher.
///
/// `InProcessGroup.run(ranks: W) { communicator in ... }` runs the body once per rank concurrently and
/// returns the results in rank order. A rank whose body throws fails the group: the other ranks' next
/// collective throws instead of waiting for it, and `run` rethrows the first error.
public final class InProcessGroup: @unchecked Sendable {  // mutable state under `condition`
    public let size: Int
    private let condition = NSCondition()
    private var deposits: [Data?]
    private var arrived = 0
    private var generation = 0
    private var result: [Data] = []
    private var failure: String?

    init(size: Int) {
        precondition(size >= 1, "a group needs at least one rank")
        self.size = size
        deposits = Array(repeating: nil, count: size)
    }

    /// Runs `body` for ranks 0 ..< `ranks`, each on its own thread, and returns their results in rank order.
    public static func run<T>(ranks: Int, _ body: @escaping (Communicator) throws -> T) throws -> [T] {
        let group = InProcessGroup(size: ranks)
        let outcomes = OutcomeSlots<T>(count: ranks)
        let done = DispatchGroup()
        let work = UncheckedSendable(body)
        for rank in 0..<ranks {
            done.enter()
            let thread = Thread {
                defer { done.leave() }
                do {
                    outcomes.set(rank, .success(try work.value(InProcessRank(group: group, rank: rank))))
                } catch {
                    group.fail("rank \(rank): \(error)")
                    outcomes.set(rank, .failure(error))
                }
            }
            thread.stackSize = 16 << 20  // training code recurses little, but the default 512 KiB is tight
            thread.start()
        }
        done.wait()
        return try outcomes.values()
    }

    func fail(_ reason: String) {
        condition.lock()
        if failure == nil { failure = reason }
        condition.broadcast()
        condition.unlock()
    }

    /// Deposits this rank's bytes and returns every rank's, in rank order, once all have deposited. The
    /// result of one exchange is replaced only when every rank has arrived at the next one, that is after
    /// every rank has read it.
    func exchange(_ rank: Int, _ payload: Data) throws -> [Data] {
        condition.lock()
        defer { condition.unlock() }
        if let failure { throw ReLoRAError.invalidData("another rank of the group failed (\(failure))") }
        let mine = generation
        deposits[rank] = payload
        arrived += 1
        if arrived == size {
            result = deposits.map { $0! }
            deposits = Array(repeating: nil, count: size)
            arrived = 0
            generation += 1
            condition.broadcast()
        } else {
            while generation == mine && failure == nil { condition.wait() }
            if generation == mine, let failure {
                throw ReLoRAError.invalidData("another rank of the group failed (\(failure))")
            }
        }
        return result
    }
}

/// One rank of an `InProcessGroup`.
final class InProcessRank: Communicator {
    let group: InProcessGroup
    let rank: Int
    init(group: InProcessGroup, rank: Int) { self.group = group; self.rank = rank }

    var worldSize: Int { group.size }
    var localRank: Int { rank }
    var localSize: Int { group.size }
    var engine: String { "in-process" }

    func allGather(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(receive.count == send.count * worldSize, "allGather: \(send.count) bytes a rank into \(receive.count)")
        let all = try group.exchange(rank, Data(send))
        for (q, bytes) in all.enumerated() {
            precondition(bytes.count == send.count, "allGather: rank \(q) sent \(bytes.count) bytes, rank \(rank) \(send.count)")
            bytes.copyBytes(to: UnsafeMutableRawBufferPointer(rebasing: receive[q * send.count ..< (q + 1) * send.count]))
        }
    }

    func allToAll(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(send.count == receive.count && send.count % worldSize == 0, "allToAll: \(send.count) bytes into \(receive.count)")
        let block = send.count / worldSize
        let all = try group.exchange(rank, Data(send))
        for (q, bytes) in all.enumerated() {
            precondition(bytes.count == send.count, "allToAll: rank \(q) sent \(bytes.count) bytes, rank \(rank) \(send.count)")
            bytes[bytes.startIndex + rank * block ..< bytes.startIndex + (rank + 1) * block]
                .copyBytes(to: UnsafeMutableRawBufferPointer(rebasing: receive[q * block ..< (q + 1) * block]))
        }
    }

    func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        let all = try group.exchange(rank, Data(UnsafeRawBufferPointer(buffer)))
        precondition(all[root].count == buffer.count, "broadcast: root sent \(all[root].count) bytes into \(buffer.count)")
        all[root].copyBytes(to: buffer)
    }

    func barrier() throws { _ = try group.exchange(rank, Data()) }

    func abort(_ message: String, status: Int32) -> Never {
        FileHandle.standardError.write(Data("rank \(rank): \(message)\n".utf8))
        exit(status)
    }
}

/// The per-rank outcomes of `InProcessGroup.run`, written by the rank threads.
private final class OutcomeSlots<T>: @unchecked Sendable {  // each slot written once, read after the join
    private var slots: [Result<T, Error>?]
    private let lock = NSLock()
    init(count: Int) { slots = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ r: Result<T, Error>) { lock.lock(); slots[i] = r; lock.unlock() }
    func values() throws -> [T] {
        lock.lock(); defer { lock.unlock() }
        // The first failure in rank order that is not a consequence of another's.
        let failures = slots.compactMap { slot -> Error? in if case .failure(let e)? = slot { return e } else { return nil } }
        if let first = failures.first(where: { !"\($0)".contains("another rank of the group failed") }) ?? failures.first { throw first }
        return slots.map { if case .success(let v)? = $0 { return v } else { preconditionFailure("rank without outcome") } }
    }
}
