/// Typed host access to a tensor's storage. Only the CPU backend (whose storage is host memory), its
/// upload/download ops and the tests use these; everything else goes through `Backend` ops. They are
/// internal to ReLoRACore, so the compiler holds that rule: no other target can read tensor memory.
extension Tensor {
    /// f32 view of host storage. Traps if the tensor is not f32 or has no host storage.
    @inline(__always) var f32: UnsafeMutablePointer<Float> {
        precondition(dtype == .f32, "an f32 op got a \(dtype.rawValue) tensor \(shape)")
        return storage!.assumingMemoryBound(to: Float.self)
    }

    /// i32 view of host storage (token ids).
    @inline(__always) var i32: UnsafeMutablePointer<Int32> {
        precondition(dtype == .i32, "an i32 op got a \(dtype.rawValue) tensor \(shape)")
        return storage!.assumingMemoryBound(to: Int32.self)
    }

    /// u8 view of host storage (8-bit codes).
    @inline(__always) var u8: UnsafeMutablePointer<UInt8> {
        precondition(dtype == .u8, "a u8 op got a \(dtype.rawValue) tensor \(shape)")
        return storage!.assumingMemoryBound(to: UInt8.self)
    }

    /// The raw bytes of host storage.
    var hostBytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: storage, count: byteCount) }
}

/// Element-wise float conversions between host buffers, the CPU side of upload, download and copy.
package enum HostConversion {
    /// Reads element `i` of a float buffer of `dtype` as f32.
    @inline(__always)
    package static func load(_ p: UnsafeRawPointer, _ dtype: DType, _ i: Int) -> Float {
        switch dtype {
        case .f32: return p.loadUnaligned(fromByteOffset: 4 * i, as: Float.self)
        case .bf16: return FloatBits.floatFromBFloat16(p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
        case .f16: return FloatBits.floatFromFloat16(p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
        case .i8, .u8, .i32: preconditionFailure("\(dtype.rawValue) is not a float type")
        }
    }

    /// Writes f32 `value` as element `i` of a float buffer of `dtype` (round to nearest even).
    @inline(__always)
    package static func store(_ value: Float, _ p: UnsafeMutableRawPointer, _ dtype: DType, _ i: Int) {
        switch dtype {
        case .f32: p.storeBytes(of: value, toByteOffset: 4 * i, as: Float.self)
        case .bf16: p.storeBytes(of: FloatBits.bfloat16(value), toByteOffset: 2 * i, as: UInt16.self)
        case .f16: p.storeBytes(of: FloatBits.float16(value), toByteOffset: 2 * i, as: UInt16.self)
        case .i8, .u8, .i32: preconditionFailure("\(dtype.rawValue) is not a float type")
        }
    }

    /// `count` floats from `src` (of `srcType`) into `dst` (of `dstType`); a memcpy when the types match.
    package static func convert(_ src: UnsafeRawPointer, _ srcType: DType, _ dst: UnsafeMutableRawPointer, _ dstType: DType, count: Int) {
        if srcType == dstType {
            dst.copyMemory(from: src, byteCount: count * srcType.byteSize)
            return
        }
        for i in 0..<count { store(load(src, srcType, i), dst, dstType, i) }
    }
}
