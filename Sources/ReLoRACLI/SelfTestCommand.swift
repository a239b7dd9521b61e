import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain
import ReLoRAAnalysis
import ReLoRASelfTest
import ReLoRACommandLine

let selfTestCommand = CommandSpec(
    name: "relora selftest",
    summary: "check every backend op against reference implementations (--device cpu|cuda)",
    discussion: """
        Runs the backend conformance suite on the device: every op of the backend (transfers and dtype
        conversions, fills, matmul, rmsnorm, rope, attention, swiglu, embedding, cross-entropy, dropout,
        reductions, AdamW, pruning, quantization) against naive Double references, with a bound derived per op
        and dtype, and every backward against finite differences of its forward. On cuda every op runs in f32
        and in bf16, and a few training steps of a tiny model (full-rank; ReLoRA over q4_0, nf4 and q8_0 with
        rtn, stochastic and master merges at a restart) are compared with the CPU backend, in f32 and in bf16.
        Prints one line per check (op, shape, dtype, max error, bound, pass/FAIL) and "N passed, M failed";
        exits with status 1 if any check failed. RELORA_CUDA_LIB=Kernels/build/libreloracuda-emu.so runs the
        cuda kernels in their CPU emulation.

        The collectives group checks the process's communicator: under `mpirun -np N relora selftest --group
        collectives` every rank sums rank-dependent data in rank order, gathers, exchanges and broadcasts
        (empty to a few MB), each rank checks the results bit for bit against the same data combined
        sequentially, rank 0 prints the table, and every rank exits 1 if any rank saw a difference.
        """,
    options: [
        deviceOption,
        .value("group", "G[,G...]", help: "only these groups: \(ConformanceGroup.allCases.map(\.rawValue).joined(separator: ", "))"),
        .flag("json", help: "print {\"backend\", \"passed\", \"failed\", \"checks\": [...]} instead of the table (failures still on stderr as they happen)"),
    ],
    examples: ["relora selftest --device cuda --group training", "mpirun -np 2 relora selftest --group collectives"])

func runSelfTest(_ args: [String]) throws {
    guard let a = try selfTestCommand.parseOrPrintHelp(args) else { return }
    var groups = ConformanceGroup.allCases
    if let list = a.string("group") {
        groups = try list.split(separator: ",").map { name in
            guard let g = ConformanceGroup(rawValue: String(name)) else {
                throw selfTestCommand.usageError("unknown group '\(name)'; groups: \(ConformanceGroup.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return g
        }
    }
    // Under a launcher every rank runs the selftest; rank 0 prints (one sentence and no output at all when
    // the launch cannot be served).
    let communicator = try Communicators.forThisProcess(deviceEngine: BackendFactory.collectives(for: Device(parsing: a.string("device") ?? "cpu")))
    let lead = communicator.rank == 0
    let ranks = communicator.worldSize
    let quiet = a.flag("json")
    // Each failure as it happens (a later crash must not hide the earlier failures); with --json on stderr,
    // so that stdout stays one JSON document.
    let progress: (ConformanceCheck) -> Void = { c in
        guard !c.passed else { return }
        let line = (ranks > 1 ? "rank \(communicator.rank): " : "") + "FAIL \(c.op) [\(c.shape)] \(c.dtype): \(c.note)"
        if quiet { standardError(line) } else { printLine(line) }
    }
    var checks: [ConformanceCheck] = []
    var backendName = "\(communicator.engine) communicator"
    var deviceLine: String?
    let backendGroups = groups.filter { $0 != .collectives }
    if !backendGroups.isEmpty {
        let backend = try a.backend()
        backendName = backend.name
        // A backend that computes in bf16 is checked in both dtypes.
        let computeDTypes: [DType] = backend.precision.activations == .f32 ? [.f32] : [.f32, backend.precision.activations]
        checks = Conformance.run(on: backend, computeDTypes: computeDTypes, groups: backendGroups.filter { $0 != .training },
                                 progress: progress)
        if let device = backend as? CUDABackend, groups.contains(.training) {
            checks += try TrainingConformance.run(makeDevice: { CUDABackend(library: device.library, precision: $0) }, progress: progress)
        }
        if let device = backend as? CUDABackend {
            deviceLine = "device: \(device.library.deviceName) (\(device.library.buildDescription), \(device.library.path))"
        }
    }
    if groups.contains(.collectives) {
        // The same checks on every rank: the mismatches of all ranks are gathered inside.
        let collective = try CollectiveConformance.run(communicator)
        if lead { collective.filter { !$0.passed }.forEach(progress) }
        checks += collective
    }
    // Each rank's failures of its own backend checks, so that rank 0 reports them and every rank exits alike.
    let ownFailures = checks.filter { !$0.passed && $0.group != .collectives }.count
    let failuresByRank = try communicator.allGather([Int64(ownFailures)]).map { Int($0[0]) }
    if lead {
        if quiet {
            print(Conformance.json(checks, backend: backendName))
        } else {
            print(Conformance.table(checks))
            if let deviceLine { print(deviceLine) }
            if let mpi = communicator as? MPICommunicator {
                let split = mpi.maxCallBytes.map { "; calls split above \($0) bytes" } ?? ""
                print("communicator: mpi, \(ranks) ranks, \(mpi.localSize) on this node (\(mpi.library); MPI \(mpi.standard); \(mpi.path)\(split))")
            }
            if let nccl = communicator as? NCCLCommunicator {
                print("communicator: nccl \(nccl.version), \(ranks) ranks, \(nccl.localSize) on this node, met through \(nccl.meeting) (\(nccl.library.path), GPU \(nccl.library.deviceOrdinal) of \(nccl.library.deviceCount))")
            }
            for (r, n) in failuresByRank.enumerated() where r > 0 && n > 0 { print("rank \(r): \(n) checks failed") }
            print("\(backendName): \(Conformance.summary(checks))" + (ranks > 1 ? " on rank 0 of \(ranks)" : ""))
        }
    }
    let failed = checks.contains { !$0.passed } || failuresByRank.contains { $0 > 0 }
    Communicators.finishProcess()  // every rank gets here, failed or not: MPI ends normally
    if failed { exit(1) }
}
