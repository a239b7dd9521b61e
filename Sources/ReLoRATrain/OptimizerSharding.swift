import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint

/// Which rank keeps the optimizer state of each trained tensor in a data-parallel run with
/// `shard_optimizer` (ZeRO stage 1 by whole tensors).
///
/// Whole tensors, never pieces: ReLoRA's magnitude reset prunes below a quantile of each tensor's moments,
/// and 8-bit moments scale blocks of 256 consecutive entries, so a tensor split over ranks would need both
/// made collective. The assignment is a pure function of the tensors' state bytes (in parameter order) and
/// W: largest first (ties: the earlier tensor), each to the rank holding the fewest bytes so far (ties:
/// the lower rank). A tensor larger than an even share (the embedding and the head of a ReLoRA run) is one
/// rank's alone, so the largest share falls no lower than the largest tensor's state.
public struct OptimizerShards: Sendable, Equatable {
    public let worldSize: Int
    /// `owner[i]`: the rank that keeps parameter i's moments (and master copy) and runs its update.
    public let owner: [Int]
    /// State bytes each rank keeps.
    public let bytes: [Int]

    /// `costs[i]`: the state bytes of parameter i (`AdamW.stateBytes`).
    public init(costs: [Int], worldSize: Int) {
        precondition(worldSize >= 1, "a sharding over \(worldSize) ranks")
        self.worldSize = worldSize
        var owner = [Int](repeating: 0, count: costs.count), bytes = [Int](repeating: 0, count: worldSize)
        for i in costs.indices.sorted(by: { costs[$0] != costs[$1] ? costs[$0] > costs[$1] : $0 < $1 }) {
            let rank = bytes.indices.min { bytes[$0] != bytes[$1] ? bytes[$0] < bytes[$1] : $0 < $1 }!
            owner[i] = rank
            bytes[rank] += costs[i]
        }
        self.owner = owner
        self.bytes = bytes
    }

    /// The sharding of `parameters` over `worldSize` ranks on a backend of `precision` with moments in `states`.
    public init(parameters: [TrainableParameter], precision: Precision, states: OptimizerStates, worldSize: Int) {
        self.init(costs: parameters.map {
            AdamW.stateBytes(count: $0.value.count, dtype: $0.value.dtype, precision: precision, states: states)
        }, worldSize: worldSize)
    }

    /// The parameters `rank` owns, in parameter order.
    public func tensors(of rank: Int) -> [Int] { owner.indices.filter { owner[$0] == rank } }

    /// One line for the start of a run: "optimizer states sharded over 2 ranks: rank 0 holds 41 tensors (12.3 MiB), ...".
    public var summary: String {
        let ranks = (0..<worldSize).map { "rank \($0) holds \(tensors(of: $0).count) tensors (\(formatBytes(bytes[$0])))" }
        return "optimizer states sharded over \(worldSize) ranks: " + ranks.joined(separator: ", ")
    }
}

extension Trainer {
    /// Bytes of working copies each rank contributes to one all-gather round of `shareUpdatedValues`
    /// (16 MiB, the size of a gradient bucket).
    static let valueChunk = 1 << 24

    /// After a sharded update, makes every working copy identical on every rank: each rank's updated
    /// tensors, as one byte stream in parameter order (their working copies' raw bytes, bf16 on CUDA), go
    /// to all ranks in rounds of one all-gather of `valueChunk` bytes per rank (a stream that ended sends
    /// zeros), through host memory. A tensor is downloaded whole when its bytes are first needed and
    /// uploaded whole when all have arrived, so the host holds about (W + 1) chunks plus the tensors in
    /// flight, one a rank. The ranks receive the bytes their owners computed: the same values as if every
    /// rank had run every update (AdamW is element-wise and runs the same ops on the owner). `valueChunk`
    /// is a parameter for the tests, which cut tensors at odd byte counts.
    static func shareUpdatedValues(_ optimizer: AdamW, _ communicator: Communicator, valueChunk: Int = valueChunk) throws {
        guard let shards = optimizer.shards, communicator.worldSize > 1 else { return }
        // A plan (`MemoryPlanner`) has no values to share, and the exchange allocates no device memory.
        guard optimizer.backend.computes else { return }
        precondition(shards.worldSize == communicator.worldSize,
                     "optimizer sharded over \(shards.worldSize) ranks in a run of \(communicator.worldSize)")
        let backend = optimizer.backend, params = optimizer.parameters
        let w = shards.worldSize, me = communicator.rank
        let lists = (0..<w).map { shards.tensors(of: $0) }
        func size(_ i: Int) -> Int { params[i].value.byteCount }
        let longest = lists.map { $0.reduce(0) { $0 + size($1) } }.max() ?? 0
        guard longest > 0 else { return }
        let chunk = min(valueChunk, longest)
        var send = [UInt8](repeating: 0, count: chunk), receive = [UInt8](repeating: 0, count: chunk * w)
        // Sending: the next of my tensors, and the bytes of the current one not yet sent.
        var nextToSend = 0, pending: ArraySlice<UInt8> = []
        // Receiving: per rank, the next of its tensors and the bytes of it gathered so far.
        var nextToReceive = [Int](repeating: 0, count: w), partial = [[UInt8]](repeating: [], count: w)
        for _ in 0 ..< (longest + chunk - 1) / chunk {
            var filled = 0
            while filled < chunk {
                if pending.isEmpty {
                    guard nextToSend < lists[me].count else { break }
                    pending = backend.downloadRaw(params[lists[me][nextToSend]].value)[...]
                    nextToSend += 1
                    continue
                }
                let n = min(chunk - filled, pending.count)
                send.replaceSubrange(filled ..< filled + n, with: pending.prefix(n))
                pending = pending.dropFirst(n)
                filled += n
            }
            for j in filled ..< chunk { send[j] = 0 }
            try send.withUnsafeBytes { s in try receive.withUnsafeMutableBytes { r in try communicator.allGather(s, into: r) } }
            for q in 0..<w where q != me {
                var offset = q * chunk
                let end = offset + chunk
                while nextToReceive[q] < lists[q].count {
                    let i = lists[q][nextToReceive[q]]
                    let n = min(size(i) - partial[q].count, end - offset)
                    if partial[q].isEmpty { partial[q].reserveCapacity(size(i)) }
                    partial[q] += receive[offset ..< offset + n]
                    offset += n
                    guard partial[q].count == size(i) else { break }  // the chunk ended inside tensor i
                    partial[q].withUnsafeBytes { backend.upload(raw: $0, dtype: params[i].value.dtype, to: params[i].value) }
                    partial[q] = []
                    nextToReceive[q] += 1
                }
            }
        }
    }

    /// A ReLoRA reset's entry counts summed over the ranks of a sharded optimizer (each counted its own
    /// tensors): the fractions every rank reports are those of the whole model, as unsharded.
    static func sumOverRanks(_ counts: AdamW.ResetCounts, _ optimizer: AdamW, _ communicator: Communicator) throws -> AdamW.ResetCounts {
        guard optimizer.shards != nil, communicator.worldSize > 1 else { return counts }
        let all = try communicator.allGather([counts.zeroedM, counts.zeroedV, counts.total])
        return AdamW.ResetCounts(zeroedM: all.reduce(0) { $0 + $1[0] }, zeroedV: all.reduce(0) { $0 + $1[1] },
                                 total: all.reduce(0) { $0 + $1[2] })
    }

    /// The layout in the checkpoint of parameter i's moments (known to every rank, owner or not).
    static func momentLayout(_ optimizer: AdamW, _ i: Int) -> [(name: String, dtype: SafetensorsDType, shape: [Int])] {
        let p = optimizer.parameters[i]
        return TrainingCheckpoint.momentLayout(name: p.name, shape: p.value.shape,
                                               eightBit: AdamW.keepsEightBit(count: p.value.count, states: optimizer.states),
                                               master: optimizer.backend.precision.needsMaster(p.value.dtype))
    }

    /// Rank 0's moments for a save of a sharded optimizer: its own tensors' as they are; every other
    /// tensor's as `remote` entries whose bytes the owner broadcasts when the writer reaches them, while the
    /// other ranks run `serveMoments` (the same broadcasts, in the same order: parameter order, then the
    /// layout's order). The writer holds one tensor's moments in host memory at a time, as for its own:
    /// a sharded save needs no buffer for the whole of another rank's share. A failed broadcast makes the
    /// entry short, which fails the write; `fetch.error` then holds the collective's error.
    static func momentsForSave(_ optimizer: AdamW, _ communicator: Communicator) -> (moments: CheckpointMoments, fetch: MomentFetch) {
        let fetch = MomentFetch(communicator)
        guard let shards = optimizer.shards, communicator.worldSize > 1 else { return (optimizer.checkpointMoments, fetch) }
        let items = optimizer.parameters.indices.map { i -> CheckpointMoments.Item in
            if optimizer.owns(i) { return .held(optimizer.checkpointEntry(i)) }
            let owner = shards.owner[i]
            return .remote(momentLayout(optimizer, i).map { part in
                SafetensorsEntry(name: part.name, dtype: part.dtype, shape: part.shape) {
                    fetch.bytes(part.shape.reduce(1, *) * part.dtype.byteSize, from: owner)
                }
            })
        }
        return (CheckpointMoments(items: items), fetch)
    }

    /// The side of a sharded save on the ranks other than 0: the broadcasts `momentsForSave`'s entries
    /// make on rank 0, each rank sending its own tensors' moments (one tensor's bytes on the host at a time).
    static func serveMoments(_ optimizer: AdamW, _ communicator: Communicator) throws {
        guard let shards = optimizer.shards, communicator.worldSize > 1, communicator.rank != 0 else { return }
        for i in optimizer.parameters.indices where shards.owner[i] != 0 {
            let owner = shards.owner[i]
            if owner == communicator.rank {
                for entry in TrainingCheckpoint.momentEntries(optimizer.checkpointEntry(i), backend: optimizer.backend) {
                    _ = try communicator.broadcast(entry.bytes, root: owner)
                }
            } else {
                for part in momentLayout(optimizer, i) {
                    _ = try communicator.broadcast([UInt8](repeating: 0, count: part.shape.reduce(1, *) * part.dtype.byteSize), root: owner)
                }
            }
        }
    }
}

/// Rank 0's receiving end of a sharded save: broadcasts from the owners, called from a tensor writer's
/// deferred bytes, which cannot throw; the first error is kept for the caller to report.
final class MomentFetch: @unchecked Sendable {  // used by the saving thread only
    private let communicator: Communicator
    private(set) var error: Error?

    init(_ communicator: Communicator) { self.communicator = communicator }

    /// `count` bytes broadcast by rank `owner`, or none after a collective failed.
    func bytes(_ count: Int, from owner: Int) -> [UInt8] {
        guard error == nil else { return [] }
        do {
            return try communicator.broadcast([UInt8](repeating: 0, count: count), root: owner)
        } catch {
            self.error = error
            return []
        }
    }
}
