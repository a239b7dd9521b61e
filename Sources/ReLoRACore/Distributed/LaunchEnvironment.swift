import Foundation

/// What a launcher told this process about the run it belongs to, read from the environment before any
/// engine is loaded: `Communicators.forThisProcess()` uses it to refuse a multi-process launch it cannot
/// serve, instead of running N independent copies that would write one run directory.
///
/// The variables, as each launcher sets them (the world size first; rank, local rank, local size):
///
/// | launcher | variables |
/// |---|---|
/// | Open MPI's `mpirun` (checked with 4.1.4: it sets no `PMI_*` nor a PMIx size variable) | `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_SIZE` |
/// | MVAPICH's `mpirun_rsh` | `MV2_COMM_WORLD_SIZE`, `MV2_COMM_WORLD_RANK`, `MV2_COMM_WORLD_LOCAL_RANK`, `MV2_COMM_WORLD_LOCAL_SIZE` |
/// | MPICH's Hydra (`mpiexec`), Intel MPI, `srun --mpi=pmi2` | `PMI_SIZE`, `PMI_RANK`, `MPI_LOCALRANKID`, `MPI_LOCALNRANKS` (Hydra only) |
/// | Slurm's `srun` (any `--mpi`; a batch script alone does not set it) | `SLURM_STEP_NUM_TASKS`, `SLURM_PROCID`, `SLURM_LOCALID` |
/// | torchrun and the like | `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` |
///
/// PMIx (Open MPI 4 and 5, `srun --mpi=pmix`) exports the rank (`PMIX_RANK`) but no size variable: under
/// `srun` the size comes from `SLURM_STEP_NUM_TASKS`. The rows are tried in order and the first whose size
/// variable is set wins, with one exception: Slurm's variables describe the step `srun` started, which
/// under an `mpirun` or Hydra inside an allocation is one daemon per node, not the ranks; an MPI launcher's
/// own variables therefore outrank them. `WORLD_SIZE` must agree with an MPI launcher's size when both are
/// set (one exported by hand that disagrees is refused); with Slurm's it may differ: an `srun` step whose
/// tasks run torchrun, a torchrun launch.
public struct LaunchEnvironment: Equatable, Sendable {
    public enum Launcher: String, Sendable {
        case openMPI = "Open MPI's mpirun"
        case mvapich = "MVAPICH's mpirun_rsh"
        case pmi = "a PMI launcher (MPICH's mpiexec, Intel MPI, srun --mpi=pmi2)"
        case slurm = "srun"
        case torchrun = "torchrun-style variables"

        /// Whether the processes can reach each other through MPI (the plugin's MPI_Init finds them).
        public var isMPI: Bool { self != .torchrun }
    }

    public var launcher: Launcher
    /// The variable the world size was read from, for messages: `OMPI_COMM_WORLD_SIZE`.
    public var sizeVariable: String
    public var worldSize: Int
    public var rank: Int
    /// nil where the launcher does not say (MPI's own count is used then).
    public var localRank: Int?
    public var localSize: Int?

    public init(launcher: Launcher, sizeVariable: String, worldSize: Int, rank: Int, localRank: Int? = nil, localSize: Int? = nil) {
        self.launcher = launcher; self.sizeVariable = sizeVariable; self.worldSize = worldSize; self.rank = rank
        self.localRank = localRank; self.localSize = localSize
    }

    /// "rank 1 of 2 (OMPI_COMM_WORLD_SIZE)": where this process stands, and which variable said so.
    public var summary: String { "rank \(rank) of \(worldSize) (\(sizeVariable))" }

    private struct Row {
        let launcher: Launcher
        let size: String, rank: String, localRank: String?, localSize: String?
    }

    private static let rows: [Row] = [
        Row(launcher: .openMPI, size: "OMPI_COMM_WORLD_SIZE", rank: "OMPI_COMM_WORLD_RANK",
            localRank: "OMPI_COMM_WORLD_LOCAL_RANK", localSize: "OMPI_COMM_WORLD_LOCAL_SIZE"),
        Row(launcher: .mvapich, size: "MV2_COMM_WORLD_SIZE", rank: "MV2_COMM_WORLD_RANK",
            localRank: "MV2_COMM_WORLD_LOCAL_RANK", localSize: "MV2_COMM_WORLD_LOCAL_SIZE"),
        Row(launcher: .pmi, size: "PMI_SIZE", rank: "PMI_RANK", localRank: "MPI_LOCALRANKID", localSize: "MPI_LOCALNRANKS"),
        Row(launcher: .slurm, size: "SLURM_STEP_NUM_TASKS", rank: "SLURM_PROCID", localRank: "SLURM_LOCALID", localSize: nil),
        Row(launcher: .torchrun, size: "WORLD_SIZE", rank: "RANK", localRank: "LOCAL_RANK", localSize: "LOCAL_WORLD_SIZE"),
    ]

    /// The launch `environment` describes; nil when no launcher variable is set (a plain process). Throws
    /// one sentence for a value that is not a number, a rank outside the world, or launchers that disagree.
    public static func detect(_ environment: [String: String] = ProcessInfo.processInfo.environment) throws -> LaunchEnvironment? {
        let found = try rows.compactMap { row in try read(row, environment) }
        let mpiLaunchers = found.filter { $0.launcher.isMPI && $0.launcher != .slurm }
        let slurm = found.first { $0.launcher == .slurm }
        let torchrun = found.first { $0.launcher == .torchrun }
        guard var chosen = mpiLaunchers.first ?? slurm ?? torchrun else { return nil }
        if let torchrun, chosen.launcher != .torchrun, torchrun.worldSize != chosen.worldSize {
            guard chosen.launcher == .slurm else {
                throw ReLoRAError.invalidConfig("the launcher variables disagree: \(chosen.sizeVariable)=\(chosen.worldSize) but WORLD_SIZE=\(torchrun.worldSize); unset WORLD_SIZE unless your launcher set it")
            }
            chosen = torchrun  // `srun ... torchrun ...`: the step's tasks started the processes
        }
        // Fill what the chosen launcher does not say from the others that agree on the world (srun with
        // PMI also gives MPI_LOCALNRANKS; a later row never overrides the chosen one).
        for other in found where other.worldSize == chosen.worldSize && other.rank == chosen.rank {
            chosen.localRank = chosen.localRank ?? other.localRank
            chosen.localSize = chosen.localSize ?? other.localSize
        }
        return chosen
    }

    private static func read(_ row: Row, _ environment: [String: String]) throws -> LaunchEnvironment? {
        guard let sizeText = environment[row.size] else { return nil }
        let size = try number(row.size, sizeText, minimum: 1)
        guard let rankText = environment[row.rank] else {
            throw ReLoRAError.invalidConfig("\(row.size)=\(size) is set but \(row.rank) is not; start relora with the launcher, which sets both, or unset \(row.size)")
        }
        let rank = try number(row.rank, rankText, minimum: 0)
        guard rank < size else {
            throw ReLoRAError.invalidConfig("\(row.rank)=\(rank) is not a rank of a world of \(size) (\(row.size)); unset the variables your launcher did not set")
        }
        let localRank = try row.localRank.flatMap { name in try environment[name].map { try number(name, $0, minimum: 0) } }
        let localSize = try row.localSize.flatMap { name in try environment[name].map { try number(name, $0, minimum: 1) } }
        return LaunchEnvironment(launcher: row.launcher, sizeVariable: row.size, worldSize: size, rank: rank,
                                 localRank: localRank, localSize: localSize)
    }

    private static func number(_ name: String, _ text: String, minimum: Int) throws -> Int {
        guard let value = Int(text.trimmingCharacters(in: .whitespaces)), value >= minimum else {
            throw ReLoRAError.invalidConfig("\(name)='\(text)' is not a whole number of at least \(minimum); unset it unless your launcher set it")
        }
        return value
    }
}
