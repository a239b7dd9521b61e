import Foundation

/// A backend that allocates and computes nothing: it runs the model's and the trainer's real code
/// path and records every tensor's shape, dtype and tag in its ledger, so live and peak bytes per tag
/// are what a real run on the target device would allocate (`relora memory`, and `relora train`'s
/// check before it allocates). Values read back are zeros; nothing depends on them when planning.
///
/// `target` says whose allocations to mirror: the precision plan (f32 on the CPU; bf16 activations,
/// LoRA factors and working copies with f32 gradients, master copies and Adam states on CUDA) and the
/// op-internal scratch (the CPU attention's `[T, T]` score buffers, one set per slot; none for the CUDA kernels, whose
/// attention is fused and whose cuBLAS workspace is cuBLAS' own, estimated by `GPUProfile`).
///
/// On `cuda` it also runs the CUDA backend's caching allocator over the same allocations (`allocator`): the
/// persistent scratch a `CUDABackend` reserves when it starts, then every device tensor's block, so the plan
/// says what the allocator will hold in use and reserve, rounding and cache included.
public final class PlanningBackend: Backend, TensorStorageOwner {
    public let target: Device
    public let ledger = MemoryLedger()
    /// The CUDA allocator's policy over this plan's device tensors (`cuda` only; nil on `cpu`, whose
    /// allocations are exact).
    public let allocator: CachingAllocatorModel?
    public let precision: Precision
    public let computes = false
    public var name: String { "plan:\(target.rawValue)" }
    public var maxAttentionHeadDim: Int? { target.maxAttentionHeadDim }
    public var rowPadding: RowPadding { target.rowPadding }

    /// The CUDA backend's scratch made on first use: rope tables (by shape) and the embedding sort's workspace.
    private let lock = NSLock()
    nonisolated(unsafe) private var ropeTables: Set<String> = []  // under lock
    nonisolated(unsafe) private var embeddingWorkspaceBytes = 0  // under lock

    public init(target: Device) {
        self.target = target
        precision = target == .cpu ? .fp32 : .cudaMixed
        if target == .cuda {
            let allocator = CachingAllocatorModel()
            for bytes in CachingAllocatorModel.persistentScratch { allocator.allocate(bytes, tag: .workspace) }
            self.allocator = allocator
        } else {
            allocator = nil
        }
    }

    public func makeTensor(_ shape: [Int], dtype: DType, tag: MemoryTag, zeroed: Bool) -> Tensor {
        let t = Tensor(shape: shape, dtype: dtype, tag: tag, storage: nil, owner: self)
        ledger.allocated(t.byteCount, tag)
        // As CUDABackend.makeTensor: host tensors are pinned host memory, empty ones get no block.
        if t.byteCount > 0 && !tag.isHost { allocator?.allocate(t.byteCount, tag: tag) }
        return t
    }

    public func release(_ tensor: TensorRelease) {
        ledger.freed(tensor.byteCount, tensor.tag)
        if tensor.byteCount > 0 && !tensor.tag.isHost { allocator?.release(tensor.byteCount, tag: tensor.tag) }
    }

    public func upload(_ values: [Float], to tensor: Tensor) { ledger.uploaded(tensor.byteCount) }
    public func upload(_ values: [Int32], to tensor: Tensor) { ledger.uploaded(tensor.byteCount) }
    public func upload(raw: UnsafeRawBufferPointer, dtype: DType, to tensor: Tensor) { ledger.uploaded(tensor.byteCount) }
    public func download(_ tensor: Tensor) -> [Float] {
        ledger.downloaded(tensor.byteCount)
        return [Float](repeating: 0, count: tensor.count)
    }
    public func copy(_ src: Tensor, to dst: Tensor) {
        precondition(src.count == dst.count, "copy: \(src.count) into \(dst.count)")
    }
    public func zero(_ tensor: Tensor) {}
    public func fill(_ tensor: Tensor, value: Float) {}
    public func fillUniform(_ tensor: Tensor, bound: Float, seed: UInt64, stream: UInt64) {}
    public func fillNormal(_ tensor: Tensor, std: Float, seed: UInt64, stream: UInt64) {}

    public func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int,
                       transA: Bool, transB: Bool, alpha: Float, beta: Float, alphaScale: Tensor?, lda: Int, ldb: Int, ldc: Int) {
        _ = StoredMatrix.gemmStrides(a, b, c, m: m, n: n, k: k, transA: transA, transB: transB, lda: lda, ldb: ldb, ldc: ldc)
    }
    public func rmsnormForward(_ x: Tensor, weight: Tensor, out: Tensor, rstd: Tensor, rows: Int, dim: Int, eps: Float) {}
    public func rmsnormBackward(_ dout: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                                dx: Tensor, dweight: Tensor, rows: Int, dim: Int) {}
    public func rope(_ x: Tensor, batch: Int, seqLen: Int, heads: Int, headDim: Int, theta: Float, inverse: Bool) {
        // As CUDABackend: one cos/sin table per shape, `[2, seqLen, headDim / 2]` f32, made at its first use.
        guard let allocator else { return }
        lock.lock(); defer { lock.unlock() }
        guard ropeTables.insert("\(seqLen)/\(headDim)/\(theta.bitPattern)").inserted else { return }
        allocator.allocate(max(2 * seqLen * (headDim / 2) * MemoryLayout<Float>.size, 1), tag: .workspace)
    }

    public func ropeAt(_ x: Tensor, rows: Int, position: Int, heads: Int, headDim: Int, theta: Float) {}
    public func attentionDecode(q: Tensor, kCache: Tensor, vCache: Tensor, out: Tensor, position: Int,
                                heads: Int, kvHeads: Int, headDim: Int) {
        if target == .cpu { _ = makeTensor([heads, position + 1], tag: .workspace, zeroed: false) }
    }

    public func attentionForward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int) {
        if target == .cpu {
            let slots = CPUBackend.attentionSlots(batch: batch, kvHeads: kvHeads)
            _ = makeTensor(CPUBackend.attentionScratchShape(seqLen: seqLen, slots: slots), tag: .workspace, zeroed: false)
        }
    }

    public func attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  dq: Tensor, dk: Tensor, dv: Tensor,
                                  batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int) {
        if target == .cpu {
            let slots = CPUBackend.attentionSlots(batch: batch, kvHeads: kvHeads)
            let scores = CPUBackend.attentionScratchShape(seqLen: seqLen, slots: slots)
            let scratch = [scores, scores, [slots, seqLen]]
            withExtendedLifetime(scratch.map { makeTensor($0, tag: .workspace, zeroed: false) }) {}
        }
    }

    public func swigluForward(gate: Tensor, up: Tensor, out: Tensor, count: Int) {}
    public func swigluBackward(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, count: Int) {}
    public func embeddingForward(ids: Tensor, table: Tensor, out: Tensor, dim: Int) {}
    public func embeddingBackward(ids: Tensor, dout: Tensor, dtable: Tensor, dim: Int) {
        // As CUDABackend: the sort's workspace, grown to the largest batch seen (the old one released first).
        guard let allocator else { return }
        let needed = Self.embeddingSortWorkspaceBytes(tokens: ids.count)
        lock.lock(); defer { lock.unlock() }
        guard needed > embeddingWorkspaceBytes else { return }
        if embeddingWorkspaceBytes > 0 { allocator.release(embeddingWorkspaceBytes, tag: .workspace) }
        allocator.allocate(needed, tag: .workspace)
        embeddingWorkspaceBytes = needed
    }

    /// `relora_cuda_embedding_backward_workspace_bytes` (Kernels/src/embedding.cu), which a plan cannot call:
    /// keys and values twice, then 256 digit counts per tile of 256 tokens, each region 256-byte aligned.
    /// CUDABackendTests' plan = allocator test fails if the two drift apart.
    static func embeddingSortWorkspaceBytes(tokens: Int) -> Int {
        guard tokens > 0 else { return 0 }
        func align256(_ b: Int) -> Int { (b + 255) / 256 * 256 }
        return 4 * align256(tokens * 4) + align256(256 * ((tokens + 255) / 256) * 4)
    }
    public func crossEntropy(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                             gradScale: Float?, ld: Int) -> Double {
        ledger.downloaded(MemoryLayout<Double>.size)
        return 0
    }
    public func dropout(_ x: Tensor, _ out: Tensor, count: Int, p: Float, seed: UInt64, stream: UInt64, cols: Int, ld: Int) {}
    public func dotAccumulate(_ a: Tensor, _ b: Tensor, count: Int, into out: Tensor) {}
    public func axpy(_ alpha: Float, _ b: Tensor, _ a: Tensor, count: Int) {}
    public func scale(_ x: Tensor, by alpha: Float) {}
    public func sumOfSquares(_ x: Tensor, into out: Tensor, at index: Int) {}
    public func adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, lr: Float, beta1: Float, beta2: Float,
                      eps: Float, weightDecay: Float, step: Int) {}
    public func prune(_ tensor: Tensor, _ rule: PruneRule, seed: UInt64, stream: UInt64) -> Int {
        ledger.downloaded(MemoryLayout<Int>.size)
        return 0
    }
    /// On cuda, as CUDABackend: the group's device buffer (`OptimizerGroup.DeviceLayout`) at its first use, one
    /// upload then, one scalar read back per norm. On cpu, the per-tensor ops (as CPUBackend).
    public func gradientNorm(_ group: OptimizerGroup, clip: Double) -> Double {
        guard target == .cuda, !group.gradients.isEmpty else { return loopingGradientNorm(group, clip: clip) }
        reserveTables(group)
        ledger.downloaded(MemoryLayout<Double>.size)
        group.pendingClip = .device
        return 0
    }

    public func adamwStep(_ group: OptimizerGroup, lr: Float, beta1: Float, beta2: Float, eps: Float, weightDecay: Float, step: Int) {
        guard target == .cuda else {
            return loopingAdamwStep(group, lr: lr, beta1: beta1, beta2: beta2, eps: eps, weightDecay: weightDecay, step: step)
        }
        group.pendingClip = nil
        if !group.updates.isEmpty { reserveTables(group) }
    }

    /// On cuda, as CUDABackend: the group's device buffer at its first use (one launch over its table); on cpu,
    /// the per-tensor zeroes.
    public func zeroGradients(_ group: OptimizerGroup) {
        guard target == .cuda, !group.gradients.isEmpty else { return loopingZeroGradients(group) }
        reserveTables(group)
    }

    private func reserveTables(_ group: OptimizerGroup) {
        guard group.prepared == nil else { return }
        let bytes = group.deviceLayout.bytes
        group.prepared = makeTensor([bytes], dtype: .u8, tag: .workspace, zeroed: false)
        ledger.uploaded(bytes)
    }

    public func adamw8bit(param: Tensor, grad: Tensor, m: BlockwiseMoments, v: BlockwiseMoments, lr: Float, beta1: Float,
                          beta2: Float, eps: Float, weightDecay: Float, step: Int) {}
    public func dequantizeMoments(_ moments: BlockwiseMoments, into out: Tensor) {}
    public func quantizeMoments(_ x: Tensor, into moments: BlockwiseMoments) {}

    public func pruneMoments(m: Tensor, v: Tensor, ratio: Double, eps: Float) -> Int {
        ledger.downloaded(MemoryLayout<Int>.size)
        return 0
    }


    public func downloadRaw(_ tensor: Tensor) -> [UInt8] {
        ledger.downloaded(tensor.byteCount)
        return [UInt8](repeating: 0, count: tensor.byteCount)
    }
    public func quantize(_ source: Tensor, into q: QuantizedTensor, rounding: QuantRounding) -> QuantizationFailure? {
        ledger.downloaded(MemoryLayout<Int32>.size)
        return nil
    }
    public func countChangedCodes(old: Tensor, new: QuantizedTensor, into out: Tensor, at index: Int) {}
    public func dequantize(_ q: QuantizedTensor, firstRow: Int, rowCount: Int, into out: Tensor) {}
    /// CPU: the CPU backend's row tiles. CUDA: the whole layer in padded rows, dequantized right before its
    /// GEMMs (one reused buffer, then cuBLAS).
    public func dequantizeScratchShape(rows: Int, cols: Int) -> [Int] {
        target == .cpu ? [CPUBackend.tileRows(rows: rows, cols: cols), cols] : [rows, rowPadding.stride(cols)]
    }
    /// As the target's backend: so a plan for cuda holds the model's dequantized-block cache where a run does.
    public var dequantizesWholeWeight: Bool { target == .cuda }
    public func quantizedLinear(_ x: Tensor, _ q: QuantizedTensor, _ y: Tensor, tokens n: Int, beta: Float, scratch: Tensor,
                                ldx: Int, ldy: Int) {}
    public func quantizedLinearInput(_ dy: Tensor, _ q: QuantizedTensor, _ dx: Tensor, tokens n: Int, beta: Float, scratch: Tensor,
                                     lddy: Int, lddx: Int) {}
}
