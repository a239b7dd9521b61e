import ReLoRACore
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
}
