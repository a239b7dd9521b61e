import Foundation
import ReLoRACore

/// The device collectives of a planned CUDA run of `worldSize` ranks: what `NCCLCommunicator` allocates on
/// the device, nothing more. A sum makes (and later enlarges) the same two `.workspace` buffers as the NCCL
/// engine, sized by the same `DeviceSumBuffers`, at the same moments of the step (each block's sum starts
/// during the last micro-batch's backward, the rest after it), so a plan's peak and the allocator's blocks
/// include them. The host collectives copy this rank's bytes into every rank's place (a plan reads no values).
///
/// `rank` is 0 whichever rank is planned: a rank runs micro-batches r, r + W, ... one after another, so which
/// of them it runs does not change its peak, and rank 0 runs at least one for any `grad_accum` (the rank's
/// share of a sharded optimizer is planned by `TrainingModel.build`, not here).
final class PlannedCollectives: DeviceCollectives {
    let worldSize: Int
    let chunkFloats: Int
    private var buffers: (flat: Tensor, parts: Tensor)?

    init(worldSize: Int, chunkFloats: Int) {
        self.worldSize = worldSize
        self.chunkFloats = chunkFloats
    }

    var rank: Int { 0 }
    var localRank: Int { 0 }
    var localSize: Int { worldSize }
    var engine: String { "plan" }

    func serves(_ backend: Backend) -> Bool { (backend as? PlanningBackend)?.target == .cuda }

    /// As `NCCLCommunicator.startSum`: a pair of buffers for the sum, remade when a later sum needs larger ones
    /// (the old pair released once the new one exists).
    func startSum(_ tensors: [Tensor], on backend: Backend) throws {
        let n = tensors.reduce(0) { $0 + $1.count }
        guard worldSize > 1, n > 0 else { return }
        let capacity = DeviceSumBuffers.floats(count: n, chunkFloats: chunkFloats, worldSize: worldSize)
        if buffers == nil || buffers!.flat.count < capacity {
            buffers = (backend.makeTensor([capacity], dtype: .f32, tag: .workspace, zeroed: false),
                       backend.makeTensor([capacity], dtype: .f32, tag: .workspace, zeroed: false))
        }
    }

    func finishSums() throws {}

    func allGather(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(receive.count == send.count * worldSize, "allGather: \(send.count) bytes into \(receive.count)")
        for q in 0..<worldSize { UnsafeMutableRawBufferPointer(rebasing: receive[q * send.count ..< (q + 1) * send.count]).copyMemory(from: send) }
    }

    func allToAll(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(receive.count == send.count, "allToAll: \(send.count) bytes into \(receive.count)")
        receive.copyMemory(from: send)
    }

    func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {}
    func barrier() throws {}
    func abort(_ message: String, status: Int32) -> Never { preconditionFailure("a plan aborted: \(message)") }
}
