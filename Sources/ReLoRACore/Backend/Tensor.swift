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
///
/// Sendable: every stored property is a `let`; `storage` (a raw pointer, which Swift does not mark Sendable)
/// is memory of the backend, read and written by its ops only.
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
    /// The tensor a view looks into (kept alive by the view), nil for a tensor that owns its storage.
    public let viewedTensor: Tensor?
    /// Element offset of a view inside `viewedTensor` (0 for an owning tensor).
    private let viewOffset: Int

    /// For backends only: `storage` must hold `byteCount` bytes (or be nil for a planning backend).
    public init(shape: [Int], dtype: DType, tag: MemoryTag, storage: UnsafeMutableRawPointer?, owner: TensorStorageOwner) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        self.shape = shape
        self.count = shape.reduce(1, *)
        self.dtype = dtype
        self.tag = tag
        self.storage = storage
        self.owner = owner
        self.viewedTensor = nil
        self.viewOffset = 0
    }

    private init(viewing parent: Tensor, offset: Int, shape: [Int]) {
        self.shape = shape
        self.count = shape.reduce(1, *)
        precondition(offset >= 0 && offset + count <= parent.count,
                     "view of \(count) elements at \(offset) outside a tensor of \(parent.count)")
        self.dtype = parent.dtype
        self.tag = parent.tag
        self.storage = parent.storage.map { $0 + offset * parent.dtype.byteSize }
        self.owner = ViewStorage.shared
        self.viewedTensor = parent
        self.viewOffset = offset
    }

    /// A tensor of `shape` over this one's elements `offset ..< offset + shape.product`: the same storage,
    /// dtype and tag, not counted in the memory ledger again. Ops on the view read and write this
    /// tensor's memory (how the adapters of q, k and v share one contiguous A for a fused GEMM).
    public func view(offset: Int, shape: [Int]) -> Tensor {
        Tensor(viewing: viewedTensor ?? self, offset: offset + viewOffset, shape: shape)
    }

    deinit {
        owner.release(TensorRelease(storage: storage, byteCount: byteCount, tag: tag))
    }
}

/// Views own nothing: releasing one frees nothing and leaves the ledger alone.
private final class ViewStorage: TensorStorageOwner {
    static let shared = ViewStorage()
    func release(_ tensor: TensorRelease) {}
}
