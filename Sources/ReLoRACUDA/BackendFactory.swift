import ReLoRACore
/// The devices a run can ask for (recipe key `device`, `--device` on every command that computes).
public enum Device: String, Sendable, CaseIterable {
    case cpu, cuda

    /// Parses a user's device string with one sentence on failure.
    public init(parsing text: String) throws {
        guard let d = Device(rawValue: text.lowercased()) else {
            throw ReLoRAError.invalidConfig("device must be 'cpu' or 'cuda', got '\(text)'")
        }
        self = d
    }
}

/// The one place backends are constructed (tests may build `CPUBackend` directly).
public enum BackendFactory {
    /// A computing backend for `device`. `cuda` without a kernel library or a device fails with one sentence
    /// naming what is missing (`CUDALibrary.open`).
    public static func make(_ device: Device) throws -> Backend {
        switch device {
        case .cpu:
            return CPUBackend()
        case .cuda:
            return try CUDABackend.open()
        }
    }

    /// A planning backend that mirrors `device`'s allocations.
    public static func planning(_ device: Device) -> PlanningBackend {
        PlanningBackend(target: device == .cpu ? .cpu : .cuda)
    }
}
