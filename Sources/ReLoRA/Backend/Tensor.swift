/// A contiguous, row-major block of backend memory with a shape and a memory tag.
///
/// On the CPU backend `storage` is host memory and `f32` gives typed access; a GPU backend stores a
/// device pointer there. Tensors are reference types: ops write into tensors the caller allocated
/// (llm.c style), so the model controls exactly what is live at any time. The memory is freed and
/// the ledger updated when the last reference goes away.
public final class Tensor: @unchecked Sendable {
    public let shape: [Int]
    public let count: Int
    public let tag: MemoryTag
    public let storage: UnsafeMutableRawPointer
    private let ledger: MemoryLedger
    private let byteCount: Int

    init(shape: [Int], tag: MemoryTag, ledger: MemoryLedger, zeroed: Bool) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        self.shape = shape
        self.count = shape.reduce(1, *)
        self.tag = tag
        self.ledger = ledger
        self.byteCount = count * MemoryLayout<Float>.stride
        // 64-byte alignment: whole cache lines, and what AVX-512 loads like.
        self.storage = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: 64)
        if zeroed { storage.initializeMemory(as: UInt8.self, repeating: 0, count: max(byteCount, 1)) }
        ledger.allocated(byteCount, tag)
    }

    deinit {
        storage.deallocate()
        ledger.freed(byteCount, tag)
    }

    /// fp32 view of the storage (CPU backend).
    @inline(__always) public var f32: UnsafeMutablePointer<Float> { storage.assumingMemoryBound(to: Float.self) }

    /// A copy of the contents as a Swift array (tests, checkpoints, small tensors).
    public func toArray() -> [Float] { Array(UnsafeBufferPointer(start: f32, count: count)) }

    public func copy(from values: [Float]) {
        precondition(values.count == count, "copy: \(values.count) values into a tensor of \(count)")
        values.withUnsafeBufferPointer { f32.update(from: $0.baseAddress!, count: count) }
    }

    public func fill(_ value: Float) { f32.update(repeating: value, count: count) }
}
