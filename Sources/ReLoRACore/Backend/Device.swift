/// The devices a run can ask for (recipe key `device`, `--device` on every command that computes), and the
/// device whose allocations a `PlanningBackend` mirrors. Constructing a computing backend for one is
/// `BackendFactory.make` (ReLoRACUDA), the only layer that knows the CUDA backend.
public enum Device: String, Sendable, CaseIterable {
    case cpu, cuda

    /// Parses a user's device string with one sentence on failure.
    public init(parsing text: String) throws {
        guard let d = Device(rawValue: text.lowercased()) else {
            throw ReLoRAError.invalidConfig("device must be 'cpu' or 'cuda', got '\(text)'")
        }
        self = d
    }

    /// The largest attention `head_dim` the device's kernels take, nil for any: the CUDA attention kernels
    /// keep a query row and its output accumulator in registers, sized for head_dim <= 128 (every LLaMA size
    /// in Configs/models). `Backend.maxAttentionHeadDim` of the CUDA backend and of a plan for it.
    public var maxAttentionHeadDim: Int? {
        switch self {
        case .cpu: return nil
        case .cuda: return 128
        }
    }

    /// How the model pads activation rows on the device (`RowPadding`; `Backend.rowPadding` of the CUDA
    /// backend and of a plan for it).
    public var rowPadding: RowPadding {
        switch self {
        case .cpu: return .none
        case .cuda: return .cuda
        }
    }
}

// MARK: Capabilities
//
// What the layers above need to know about a backend beyond its ops, asked as `backend as? Capability`
// instead of a downcast to a concrete backend (the trainer, the memory check and MFU never name CUDABackend
// or CPUBackend). A backend adopts the capabilities it has.

/// A backend that computes on an accelerator with its own memory (the CUDA backend, on a GPU or on the
/// kernels' CPU emulation).
public protocol DeviceBackend: Backend {
    /// Whose allocations a plan for this backend mirrors (`PlanningBackend(target:)`).
    var device: Device { get }
    /// The device's name as the driver reports it (`cudaDeviceProp.name`, e.g. "NVIDIA H200"); peak FLOP/s
    /// tables are keyed by it.
    var deviceName: String { get }
    /// True on the CPU emulation of the kernels: results are real, times and peaks are not.
    var isEmulated: Bool { get }
    /// The GPU's figures that size a plan's estimates of the context and cuBLAS' workspace (`CUDAFootprint`).
    var gpu: GPUProfile { get }
    /// Free and total bytes of device memory now (under a memory cap, what the cap leaves).
    func deviceMemory() -> (free: Int, total: Int)
    /// One line for a run's log: the allocator's high-water marks and the device's own view of its memory.
    func memorySummary() -> String
}

/// A backend whose host-resident tensors (`MemoryTag.isHost`: the `master` merge policy's f32 copies) can
/// live in memory-mapped files instead of RAM (`master_copies: file`).
public protocol HostFileBacking: Backend {
    /// nil for RAM, else the directory the files are made in (each is unlinked as soon as it is mapped).
    var hostFileDirectory: String? { get set }
}
