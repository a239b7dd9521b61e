import CReLoRA
import Foundation
import ReLoRACore

/// The optimizer step in a fixed number of launches, whatever the number of trained tensors (and the zeroing of the
/// gradients before the step's micro-batches: `zero_multi`, one launch): `gradient_norm`
/// (three kernels: per-(tensor, block) partial sums, per-tensor squares, the total with its square root and the
/// clip factor), then `adamw_multi` and `adamw_8bit_multi` (one kernel each, skipped when no tensor keeps
/// moments of that kind), which scale the gradients by the device-side clip factor, update, and write the bf16
/// working copies. One scalar comes back per step: the norm (8 bytes), which also decides a non-finite step's
/// skip. The kernels read a group's tensors through a device table (`OptimizerGroup.DeviceLayout`), built and
/// uploaded at the group's first use (one synchronizing upload) and kept with the group.
///
/// Bits: the per-tensor ops' (`loopingGradientNorm`, `loopingAdamwStep`), see `relora_abi.h`.
extension CUDABackend {
    /// A group's device buffer: the tables and the norm's scratch, tagged `.workspace`.
    final class OptimizerTables {
        let buffer: Tensor
        let layout: OptimizerGroup.DeviceLayout
        init(buffer: Tensor, layout: OptimizerGroup.DeviceLayout) { self.buffer = buffer; self.layout = layout }

        func at<T>(_ offset: Int, _ type: T.Type) -> UnsafeMutablePointer<T> {
            (buffer.storage! + offset).assumingMemoryBound(to: T.self)
        }
    }

    public func gradientNorm(_ group: OptimizerGroup, clip: Double) -> Double {
        guard !group.gradients.isEmpty else { return loopingGradientNorm(group, clip: clip) }
        let span = profiler?.begin(.reduction, .total(group.gradients.map { .sumOfSquares($0) })); defer { span?.end() }
        let t = tables(group), l = t.layout
        library.check(api.gradient_norm!(t.at(l.normTable, relora_norm_entry.self), Int64(group.gradients.count), Int64(l.normUnits),
                                         t.at(l.partials, Double.self), t.at(l.squares, Float.self), clip,
                                         t.at(l.norm, Double.self), t.at(l.clipFactor, Float.self), nil), "gradient_norm")
        ledger.downloaded(MemoryLayout<Double>.size)
        var norm = 0.0
        library.check(api.memcpy!(&norm, t.at(l.norm, Double.self), Int64(MemoryLayout<Double>.size), RELORA_MEMCPY_DEVICE_TO_HOST, nil),
                      "memcpy")
        sync()
        group.pendingClip = .device
        return norm
    }

    /// Every gradient of the group zeroed by one `zero_multi` launch over the norm's table (the gradients' pointers,
    /// sizes and dtypes, already on the device for `gradient_norm`), instead of a memset per tensor. Why a table and
    /// not one contiguous gradient arena zeroed by a single memset: the gradients are separate allocations made by
    /// the model (tagged, planned and freed each on its own, viewed by the data-parallel sums and the checkpoints);
    /// an arena would change how all of them are allocated, while the table exists already and is the group's.
    public func zeroGradients(_ group: OptimizerGroup) {
        guard !group.gradients.isEmpty else { return }
        let span = profiler?.begin(.elementwise, .total(group.gradients.map { .fill($0) })); defer { span?.end() }
        let t = tables(group), l = t.layout
        library.check(api.zero_multi!(t.at(l.normTable, relora_norm_entry.self), Int64(group.gradients.count), Int64(l.normUnits), nil),
                      "zero_multi")
    }

    public func adamwStep(_ group: OptimizerGroup, lr: Float, beta1: Float, beta2: Float, eps: Float, weightDecay: Float, step: Int) {
        var clip = false
        if case .device = group.pendingClip { clip = true }
        group.pendingClip = nil
        guard !group.updates.isEmpty else { return }
        let span = profiler?.begin(.optimizer, .total(group.updates.map {
            if case .eightBit = $0.moments { return .adamw8bit(count: $0.param.count) }
            return .adamw(count: $0.param.count)
        })); defer { span?.end() }
        let t = tables(group), l = t.layout
        let factor = clip ? UnsafePointer(t.at(l.clipFactor, Float.self)) : nil
        if l.f32Units > 0 {
            library.check(api.adamw_multi!(t.at(l.f32Table, relora_adam_entry.self), Int64(l.f32Updates.count), Int64(l.f32Units), factor,
                                           lr, beta1, beta2, eps, weightDecay, Int64(step), nil), "adamw_multi")
        }
        if l.eightBitUnits > 0 {
            library.check(api.adamw_8bit_multi!(t.at(l.eightBitTable, relora_adam_entry.self), Int64(l.eightBitUpdates.count),
                                                Int64(l.eightBitUnits), factor, adam8Maps.assumingMemoryBound(to: Float.self), lr, beta1,
                                                beta2, eps, weightDecay, Int64(step), nil), "adamw_8bit_multi")
        }
    }

    /// The group's tables, made and uploaded at its first use (the dtypes checked as the per-tensor ops check them).
    private func tables(_ group: OptimizerGroup) -> OptimizerTables {
        if let t = group.prepared as? OptimizerTables { return t }
        let layout = group.deviceLayout
        let buffer = makeTensor([layout.bytes], dtype: .u8, tag: .workspace, zeroed: false)
        var host = [UInt8](repeating: 0, count: layout.bytes)
        host.withUnsafeMutableBytes { raw in
            var first: Int64 = 0
            for (i, g) in group.gradients.enumerated() {
                let blocks = relora_reduce_blocks(Int64(g.count))
                let entry = relora_norm_entry(x: UnsafeRawPointer(g.storage), count: Int64(g.count), first_unit: first,
                                              dtype: Self.code(Self.computeType(g, op: "gradientNorm")), blocks: Int32(blocks))
                raw.storeBytes(of: entry, toByteOffset: layout.normTable + i * MemoryLayout<relora_norm_entry>.stride, as: relora_norm_entry.self)
                first += blocks
            }
            func store(_ indices: [Int], at offset: Int, units: (Int) -> Int) {
                var first: Int64 = 0
                for (k, i) in indices.enumerated() {
                    let u = group.updates[i], n = u.param.count
                    Self.require(.f32, u.param, u.grad, op: "adamwStep")
                    precondition(u.grad.count == n, "adamwStep: a gradient of \(u.grad.count) for \(n) values")
                    if let w = u.working {
                        precondition(w.dtype == .bf16 && w.count == n, "CUDABackend.adamwStep: a \(w.dtype.rawValue) working copy of \(w.count) where the kernels write bf16 [\(n)]")
                    }
                    var entry = relora_adam_entry()
                    entry.param = u.param.storage?.assumingMemoryBound(to: Float.self)
                    entry.grad = u.grad.storage?.assumingMemoryBound(to: Float.self)
                    switch u.moments {
                    case .f32(let m, let v):
                        Self.require(.f32, m, v, op: "adamwStep")
                        precondition(m.count == n && v.count == n, "adamwStep: moments of another size")
                        entry.m = m.storage
                        entry.v = v.storage
                    case .eightBit(let m, let v):
                        checkMoments("adamwStep", count: n, m, v)
                        precondition(m.isSigned && !v.isSigned, "adamwStep: m takes the signed map, v the unsigned one")
                        entry.m = m.codes.storage
                        entry.v = v.codes.storage
                        entry.m_absmax = m.absmax.storage?.assumingMemoryBound(to: Float.self)
                        entry.v_absmax = v.absmax.storage?.assumingMemoryBound(to: Float.self)
                    }
                    entry.working = u.working?.storage
                    entry.working_dtype = u.working == nil ? 0 : RELORA_DTYPE_BF16
                    entry.count = Int64(n)
                    entry.first_unit = first
                    entry.decay = u.decay ? 1 : 0
                    raw.storeBytes(of: entry, toByteOffset: offset + k * MemoryLayout<relora_adam_entry>.stride, as: relora_adam_entry.self)
                    first += Int64(units(n))
                }
            }
            let chunk = Int(RELORA_ADAM_CHUNK)
            store(layout.f32Updates, at: layout.f32Table) { ($0 + chunk - 1) / chunk }
            store(layout.eightBitUpdates, at: layout.eightBitTable) { BlockwiseMoments.blocks($0) }
        }
        ledger.uploaded(layout.bytes)
        host.withUnsafeBytes {
            library.check(api.memcpy!(buffer.storage, $0.baseAddress, Int64(layout.bytes), RELORA_MEMCPY_HOST_TO_DEVICE, nil), "memcpy")
        }
        sync()  // the host table goes away when this returns
        let t = OptimizerTables(buffer: buffer, layout: layout)
        group.prepared = t
        return t
    }
}
