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

    /// The collectives of `device`'s backend for a run of several processes (`Communicators.forThisProcess`):
    /// NCCL on device memory for `cuda`; nil for `cpu`, whose ranks use MPI on host memory.
    public static func collectives(for device: Device) -> Communicators.DeviceEngine? {
        switch device {
        case .cpu:
            return nil
        case .cuda:
            return { launch, bootstrap in try NCCLCommunicator.make(launch: launch, bootstrap: bootstrap) }
        }
    }
}
