/// Element types a tensor can hold. The CPU backend computes in `f32` only; the other types are
/// storage types (bf16/f16 activations and weights on a GPU, int8/uint8 codes of quantized weights,
/// int32 token ids) that the upload, download and copy ops convert.
public enum DType: String, CaseIterable, Sendable, Codable {
    case f32, bf16, f16, i8, u8, i32

    public var byteSize: Int {
        switch self {
        case .f32, .i32: return 4
        case .bf16, .f16: return 2
        case .i8, .u8: return 1
        }
    }

    public var isFloatingPoint: Bool {
        switch self {
        case .f32, .bf16, .f16: return true
        case .i8, .u8, .i32: return false
        }
    }
}

/// Who frees a tensor's storage: the backend that allocated it. Called once, from `Tensor.deinit`.
public protocol TensorStorageOwner: AnyObject, Sendable {
    func release(_ tensor: TensorRelease)
}

/// What a backend needs to free a tensor (the tensor itself is being deinitialised).
public struct TensorRelease {
    public let storage: UnsafeMutableRawPointer?
    public let byteCount: Int
    public let tag: MemoryTag
}

/// A contiguous, row-major block of backend memory with a shape, an element type and a memory tag.
///
/// `storage` is owned by the backend that made the tensor: host memory on the CPU, a device pointer on
/// a GPU, nil in the planning backend (which only counts). Nothing outside a backend, its
/// upload/download ops and the tests reads or writes through it: the model, trainer, optimizer,
/// checkpoints and analysis go through backend ops, so the same code runs on every backend.
/// Tensors are reference types: ops write into tensors the caller allocated (llm.c style), so the model
/// controls exactly what is live at any time. The storage is released (and the memory ledger updated)
/// when the last reference goes away.
public final class Tensor: @unchecked Sendable {
    public let shape: [Int]
    public let count: Int
    public let dtype: DType
    public let tag: MemoryTag
    /// Backend-owned storage; see the type's comment.
    public let storage: UnsafeMutableRawPointer?
    public var byteCount: Int { count * dtype.byteSize }
    /// Strong: a backend lives as long as any of its tensors.
    private let owner: TensorStorageOwner

    /// For backends only: `storage` must hold `byteCount` bytes (or be nil for a planning backend).
    public init(shape: [Int], dtype: DType, tag: MemoryTag, storage: UnsafeMutableRawPointer?, owner: TensorStorageOwner) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        self.shape = shape
        self.count = shape.reduce(1, *)
        self.dtype = dtype
        self.tag = tag
        self.storage = storage
        self.owner = owner
    }

    deinit {
        owner.release(TensorRelease(storage: storage, byteCount: byteCount, tag: tag))
    }
}
