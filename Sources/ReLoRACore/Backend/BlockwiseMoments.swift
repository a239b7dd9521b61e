import CReLoRA

/// One Adam moment tensor stored in 8 bits, blockwise (`optimizer_states: int8`; the format and the update
/// are specified in `relora_adam8.h`): `codes` u8 with the parameter's shape, and `absmax` f32
/// `[ceil(n / 256)]`, one scale per block of 256 consecutive entries. Entry i is
/// `map[codes[i]] * absmax[i / 256]`, with the signed dynamic map for the first moment m and the unsigned one
/// for the second moment v. A block whose absmax is 0 holds zeros whatever its codes (a fresh state is all
/// zero bytes).
public struct BlockwiseMoments: Sendable {
    public let codes: Tensor
    public let absmax: Tensor
    /// The signed map (m) or the unsigned one (v).
    public let isSigned: Bool

    /// Number of absmax blocks of a tensor of `count` entries.
    public static func blocks(_ count: Int) -> Int { Int(relora_adam8_blocks(Int64(count))) }

    /// Tensors with fewer entries keep f32 moments (as bitsandbytes' `min_8bit_size`): they are small.
    public static let minimumCount = Int(RELORA_ADAM8_MIN_COUNT)

    /// A zero state for a parameter of `shape`, allocated on `backend` with `tag`.
    public init(backend: Backend, shape: [Int], isSigned: Bool, tag: MemoryTag) {
        codes = backend.makeTensor(shape, dtype: .u8, tag: tag, zeroed: true)
        absmax = backend.makeTensor([Self.blocks(shape.reduce(1, *))], dtype: .f32, tag: tag, zeroed: true)
        self.isSigned = isSigned
    }

    /// The 512 floats of `relora_adam8_build_maps` (signed map, then unsigned), built once per process; every
    /// backend reads these bytes (the CUDA backend uploads them), so all produce the same codes. Written
    /// once, when first used, and only read afterwards.
    nonisolated(unsafe) public static let maps: UnsafePointer<Float> = {
        let p = UnsafeMutablePointer<Float>.allocate(capacity: 2 * Int(RELORA_ADAM8_MAP))
        relora_adam8_build_maps(p)
        return UnsafePointer(p)
    }()

    static func map(signed: Bool) -> UnsafePointer<Float> { signed ? maps : maps + Int(RELORA_ADAM8_MAP) }

    /// The two maps' host search indexes (`relora_adam8_build_index`, 2 x 64 KiB: signed, then unsigned):
    /// the CPU's codes are the binary search's, found faster. Built once, when first used.
    nonisolated(unsafe) static let index: UnsafePointer<UInt8> = {
        let p = UnsafeMutablePointer<UInt8>.allocate(capacity: 2 * Int(RELORA_ADAM8_INDEX))
        relora_adam8_build_index(maps, p)
        relora_adam8_build_index(maps + Int(RELORA_ADAM8_MAP), p + Int(RELORA_ADAM8_INDEX))
        return UnsafePointer(p)
    }()

    static func index(signed: Bool) -> UnsafePointer<UInt8> { signed ? index : index + Int(RELORA_ADAM8_INDEX) }

    /// Host quantization of `values` (checkpoint conversion): codes and absmax as `quantizeMoments` makes them.
    public static func quantize(_ values: [Float], isSigned: Bool) -> (codes: [UInt8], absmax: [Float]) {
        let n = values.count
        var codes = [UInt8](repeating: 0, count: n), absmax = [Float](repeating: 0, count: blocks(n))
        values.withUnsafeBufferPointer { x in
            codes.withUnsafeMutableBufferPointer { c in
                absmax.withUnsafeMutableBufferPointer { a in
                    for b in 0..<blocks(n) {
                        relora_adam8_quantize_block(map(signed: isSigned), index(signed: isSigned), x.baseAddress, c.baseAddress, a.baseAddress, Int64(n), Int64(b))
                    }
                }
            }
        }
        return (codes, absmax)
    }

    /// Host dequantization (checkpoint conversion, tests): entry i = map[codes[i]] * absmax[i / 256].
    public static func dequantize(codes: [UInt8], absmax: [Float], isSigned: Bool) -> [Float] {
        precondition(absmax.count == blocks(codes.count), "dequantize: \(codes.count) codes need \(blocks(codes.count)) scales, got \(absmax.count)")
        let m = map(signed: isSigned), block = Int(RELORA_ADAM8_BLOCK)
        return codes.indices.map { relora_adam8_value(m, codes[$0], absmax[$0 / block]) }
    }
}
