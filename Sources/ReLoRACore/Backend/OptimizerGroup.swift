import CReLoRA

/// The tensors one optimizer step reads and writes, in a fixed order: what the multi-tensor ops
/// `Backend.gradientNorm(_:clip:)` and `Backend.adamwStep(_:...)` take. Made once by the optimizer (`AdamW`)
/// for its tensors; the set never changes while the group lives (a restart re-initialises the same tensors in
/// place), so a backend may prepare something for it once, at its first use, and keep it in `prepared`: the
/// CUDA backend's device tables of pointers and sizes, released with the group.
///
/// Used by one thread at a time (the optimizer's).
public final class OptimizerGroup {
    /// A tensor's Adam moments: f32 values, or 8-bit blockwise ones.
    public enum Moments {
        case f32(m: Tensor, v: Tensor)
        case eightBit(m: BlockwiseMoments, v: BlockwiseMoments)
    }

    /// One tensor the step updates.
    public struct Update {
        /// f32 values the update runs on: the master copy, or the working copy itself when that is f32.
        public let param: Tensor
        /// f32, the gradient (scaled in place by the clip factor when it is not 1).
        public let grad: Tensor
        public let moments: Moments
        /// The narrower working copy written from `param` after the update (`copy`), nil when `param` is it.
        public let working: Tensor?
        /// Whether weight decay applies.
        public let decay: Bool

        public init(param: Tensor, grad: Tensor, moments: Moments, working: Tensor?, decay: Bool) {
            self.param = param; self.grad = grad; self.moments = moments; self.working = working; self.decay = decay
        }

        /// Every tensor the update reads or writes: param, grad, the working copy, the moments (8-bit: codes
        /// and scales).
        public var tensors: [Tensor] {
            var t = [param, grad] + (working.map { [$0] } ?? [])
            switch moments {
            case .f32(let m, let v): t += [m, v]
            case .eightBit(let m, let v): t += [m.codes, m.absmax, v.codes, v.absmax]
            }
            return t
        }
    }

    /// Every gradient whose norm decides the clipping and the non-finite skip (all trained tensors, also those
    /// another rank updates when the optimizer is sharded), in parameter order.
    public let gradients: [Tensor]
    /// The tensors this process updates, in parameter order.
    public let updates: [Update]

    /// The clip factor the last `gradientNorm` decided, until the next `adamwStep` applies (and clears) it: a
    /// host value (the per-tensor path) or one the backend keeps on the device; nil when none is pending (an
    /// `adamwStep` without a `gradientNorm` before it does not scale).
    package enum PendingClip { case host(Float), device }
    package var pendingClip: PendingClip?
    /// What a backend prepared for this group at its first use (the CUDA backend's device tables; a plan's
    /// placeholder of the same size), released with the group.
    package var prepared: AnyObject?

    public init(gradients: [Tensor], updates: [Update]) {
        self.gradients = gradients
        self.updates = updates
    }

    /// The device layout the CUDA backend uploads for this group (and a plan for cuda reserves), see `DeviceLayout`.
    package var deviceLayout: DeviceLayout { DeviceLayout(self) }

    /// One device buffer (u8, tag `.workspace`) holding a group's tables (`relora_norm_entry` per gradient, `relora_adam_entry` per
    /// update: the f32-moment ones, then the 8-bit ones) and the norm's scratch (`relora_reduce_blocks` partial
    /// doubles per gradient, an f32 square per gradient, the f64 norm, the f32 clip factor), each region
    /// 256-byte aligned. A function of the tensors' sizes and kinds only, so `PlanningBackend` reserves what
    /// `CUDABackend` allocates.
    package struct DeviceLayout {
        /// Work units of `gradient_norm`, `adamw_multi` and `adamw_8bit_multi` (`relora_abi.h`).
        package let normUnits: Int, f32Units: Int, eightBitUnits: Int
        /// Indices into `updates` of the f32-moment and the 8-bit ones, in order.
        package let f32Updates: [Int], eightBitUpdates: [Int]
        /// Byte offsets of the regions, and the buffer's size.
        package let normTable: Int, f32Table: Int, eightBitTable: Int, partials: Int, squares: Int, norm: Int, clipFactor: Int
        package let bytes: Int

        init(_ group: OptimizerGroup) {
            f32Updates = group.updates.indices.filter { if case .f32 = group.updates[$0].moments { return true }; return false }
            eightBitUpdates = group.updates.indices.filter { if case .eightBit = group.updates[$0].moments { return true }; return false }
            normUnits = group.gradients.reduce(0) { $0 + Int(relora_reduce_blocks(Int64($1.count))) }
            let chunk = Int(RELORA_ADAM_CHUNK)
            f32Units = f32Updates.reduce(0) { $0 + (group.updates[$1].param.count + chunk - 1) / chunk }
            eightBitUnits = eightBitUpdates.reduce(0) { $0 + BlockwiseMoments.blocks(group.updates[$1].param.count) }
            var end = 0
            func region(_ size: Int) -> Int {
                let start = (end + 255) / 256 * 256
                end = start + size
                return start
            }
            normTable = region(group.gradients.count * MemoryLayout<relora_norm_entry>.stride)
            f32Table = region(f32Updates.count * MemoryLayout<relora_adam_entry>.stride)
            eightBitTable = region(eightBitUpdates.count * MemoryLayout<relora_adam_entry>.stride)
            partials = region(normUnits * MemoryLayout<Double>.size)
            squares = region(group.gradients.count * MemoryLayout<Float>.size)
            norm = region(MemoryLayout<Double>.size)
            clipFactor = region(MemoryLayout<Float>.size)
            bytes = end
        }
    }
}

extension Backend {
    /// `gradientNorm(_:clip:)` as per-tensor ops: `sumOfSquares([Tensor])` (each tensor's squared norm summed in
    /// Double and rounded to f32, the f32 values read back in one transfer and summed in Double in order), its
    /// square root, and the clip factor kept on the host. What every backend does unless it overrides the op.
    public func loopingGradientNorm(_ group: OptimizerGroup, clip: Double) -> Double {
        let norm = sumOfSquares(group.gradients).squareRoot()
        group.pendingClip = .host(clip > 0 && norm > clip ? Float(clip / norm) : 1)
        return norm
    }

    /// `adamwStep` as per-tensor ops: `scale` by the pending clip factor (unless 1), then `adamw` or `adamw8bit`
    /// and `copy` into the working copy, tensor by tensor.
    public func loopingAdamwStep(_ group: OptimizerGroup, lr: Float, beta1: Float, beta2: Float, eps: Float,
                                 weightDecay: Float, step: Int) {
        var factor: Float = 1
        if case .host(let f) = group.pendingClip { factor = f }
        group.pendingClip = nil
        for u in group.updates {
            if factor != 1 { scale(u.grad, by: factor) }
            let decay = u.decay ? weightDecay : 0
            switch u.moments {
            case .f32(let m, let v):
                adamw(param: u.param, grad: u.grad, m: m, v: v, lr: lr, beta1: beta1, beta2: beta2, eps: eps,
                      weightDecay: decay, step: step)
            case .eightBit(let m, let v):
                adamw8bit(param: u.param, grad: u.grad, m: m, v: v, lr: lr, beta1: beta1, beta2: beta2, eps: eps,
                          weightDecay: decay, step: step)
            }
            if let working = u.working { copy(u.param, to: working) }
        }
    }

    /// `zeroGradients` as per-tensor ops: `zero` on each gradient.
    public func loopingZeroGradients(_ group: OptimizerGroup) {
        for g in group.gradients { zero(g) }
    }

    public func zeroGradients(_ group: OptimizerGroup) { loopingZeroGradients(group) }

    public func gradientNorm(_ group: OptimizerGroup, clip: Double) -> Double { loopingGradientNorm(group, clip: clip) }

    public func adamwStep(_ group: OptimizerGroup, lr: Float, beta1: Float, beta2: Float, eps: Float, weightDecay: Float,
                          step: Int) {
        loopingAdamwStep(group, lr: lr, beta1: beta1, beta2: beta2, eps: eps, weightDecay: weightDecay, step: step)
    }
}
