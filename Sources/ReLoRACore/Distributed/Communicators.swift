import Foundation

/// The one place a process gets its `Communicator`, from what its launcher set (`LaunchEnvironment`):
///
/// - no launcher variable, or a world of 1: `SingleProcess`;
/// - a device engine given (the CUDA backend's NCCL, `ReLoRACUDA.NCCLCommunicator`): that engine, started
///   with an MPI bootstrap under an MPI launcher (`mpirun`, `mpiexec`, `srun` with the cluster's MPI: the
///   MPI plugin sends the NCCL id), or without one (torchrun-style variables, or `srun` without a usable
///   MPI): the ranks then meet at `NCCL_COMM_ID`, or `MASTER_ADDR:MASTER_PORT+1`;
/// - otherwise an MPI launcher with more than one rank: `MPICommunicator`, whose MPI world must be the one
///   the launcher described (same size, same rank);
/// - anything else throws one sentence, so that a launch relora cannot serve never runs as N independent
///   copies writing one run directory: the MPI plugin missing or unloadable, torchrun-style variables on the
///   CPU (they need NCCL), variables that are malformed or disagree.
///
/// A process that joined a run of several ends through `finishProcess()` (every rank, normal end) or
/// `fail(_:status:)` (an error some ranks may not see: every rank ends).
public enum Communicators {
    /// Makes a device backend's communicator: the launch, and the MPI communicator to exchange its id over
    /// (nil: none, the engine meets its peers itself).
    public typealias DeviceEngine = (_ launch: LaunchEnvironment, _ bootstrap: MPICommunicator?) throws -> Communicator

    private static let lock = NSLock()
    nonisolated(unsafe) private static var made: Result<Communicator, ReLoRAError>?

    /// The process's communicator, made on the first call (MPI initialises once per process); later calls
    /// return the same one, or throw the same error. `deviceEngine`: the collectives of the backend the
    /// process computes on, when it has its own (CUDA: NCCL); nil for host memory (the CPU backend: MPI).
    public static func forThisProcess(deviceEngine: DeviceEngine? = nil) throws -> Communicator {
        lock.lock(); defer { lock.unlock() }
        if let made { return try made.get() }
        let result = Result<Communicator, ReLoRAError> { () throws(ReLoRAError) in
            do { return try make(environment: ProcessInfo.processInfo.environment, deviceEngine: deviceEngine) } catch let e as ReLoRAError { throw e } catch {
                throw .invalidConfig("\(error)")
            }
        }
        made = result
        return try result.get()
    }

    /// The communicator `forThisProcess()` made, if it has made one.
    public static var current: Communicator? {
        lock.lock(); defer { lock.unlock() }
        return try? made?.get()
    }

    /// What `environment` asks for, decided now (not cached). Initialises MPI when it asks for more than
    /// one MPI rank, which a process can do once: use `forThisProcess()`; tests call this with
    /// environments that decide without MPI.
    static func make(environment: [String: String], deviceEngine: DeviceEngine? = nil) throws -> Communicator {
        guard let launch = try LaunchEnvironment.detect(environment), launch.worldSize > 1 else { return SingleProcess() }
        if let deviceEngine {
            // MPI only carries the engine's id. Under srun with no MPI plugin the engine meets its peers at
            // NCCL_COMM_ID / MASTER_ADDR, as under torchrun.
            let meetsWithoutMPI = environment["NCCL_COMM_ID"] != nil || environment["MASTER_ADDR"] != nil
            let noPlugin = RuntimeLibrary.firstExisting(MPICommunicator.candidatePaths(environment: environment)) == nil
            switch launch.launcher {
            case .torchrun: return try deviceEngine(launch, nil)
            case .slurm where meetsWithoutMPI && noPlugin: return try deviceEngine(launch, nil)
            default: return try deviceEngine(launch, try mpi(launch, environment))
            }
        }
        guard launch.launcher.isMPI else {
            throw ReLoRAError.unsupported("relora was started as \(launch.summary) by torchrun-style variables, which only the CUDA backend serves (NCCL meets its peers at NCCL_COMM_ID without MPI); use --device cuda, or start the ranks with mpirun or srun and the MPI plugin (docs/distributed.md), or run one process")
        }
        return try mpi(launch, environment)
    }

    /// The MPI world the launcher described, through the plugin; one sentence when it cannot be had.
    private static func mpi(_ launch: LaunchEnvironment, _ environment: [String: String]) throws -> MPICommunicator {
        let mpi: MPICommunicator
        do {
            mpi = try MPICommunicator.initialize(environment: environment)
        } catch {
            throw ReLoRAError.unsupported("relora was started as \(launch.summary) but cannot load the MPI plugin (\(error.reason)); build it with `make -C Kernels mpi` (or set RELORA_MPI_LIB to it), or run one process")
        }
        guard mpi.worldSize == launch.worldSize, mpi.rank == launch.rank else {
            // A world of one: MPI_Init found no launcher to join (an MPI without support for this launcher's
            // PMI). Nothing waits on this process, so it can finish MPI and end with the sentence.
            if mpi.worldSize == 1 { mpi.finalize() }
            let advice = launch.launcher == .slurm
                ? "the MPI library the plugin was built with does not support this srun (use `srun --mpi=pmix` or `--mpi=pmi2` as your cluster documents, or mpirun inside the allocation)"
                : "the plugin was built with another MPI than the launcher's (rebuild it with `make -C Kernels mpi` using that MPI's mpicc)"
            throw ReLoRAError.unsupported("relora was started as \(launch.summary) by \(launch.launcher.rawValue) but MPI sees rank \(mpi.rank) of \(mpi.worldSize): \(advice)")
        }
        return mpi
    }

    /// Ends a process that succeeded: every rank of a run of several must reach it (MPI_Finalize,
    /// ncclCommDestroy); nothing for one process.
    public static func finishProcess() {
        current?.finish()
    }

    /// Ends the process after an error: prints `message` on stderr and exits with `status`. In a run of
    /// several processes the error may be this rank's alone while the others wait in a collective, so every
    /// rank ends (the message is prefixed with this rank; `abort`).
    public static func fail(_ message: String, status: Int32) -> Never {
        if let c = current, c.worldSize > 1 { c.abort(message, status: status) }
        FileHandle.standardError.write(Data((message + "\n").utf8))
        exit(status)
    }
}
