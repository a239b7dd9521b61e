import Foundation
import XCTest
import CReLoRA
@testable import ReLoRACore
@testable import ReLoRACheckpoint
@testable import ReLoRATrain
@testable import ReLoRASelfTest

/// The MPI engine and how a process finds out it was launched as one of several: launcher variables,
/// the factory's choices and refusals, the collectives' conformance check (which must catch a wrong
/// engine), and `mpirun -np 2` / `-np 3` runs of `relora selftest --group collectives` over the plugin.
/// The mpirun tests skip only when `mpirun` or the plugin (`make -C Kernels mpi`) is absent;
/// `scripts/test.sh` runs `scripts/setup.sh`, which installs Open MPI and builds the plugin.
final class MPITests: XCTestCase {
    // MARK: Launcher variables

    func testLaunchEnvironmentReadsEachLauncher() throws {
        XCTAssertNil(try LaunchEnvironment.detect([:]))
        XCTAssertNil(try LaunchEnvironment.detect(["PMIX_RANK": "0", "SLURM_NTASKS": "4", "HOME": "/root"]))

        let ompi = try XCTUnwrap(LaunchEnvironment.detect([
            "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "PMIX_RANK": "2",
        ]))
        XCTAssertEqual(ompi, LaunchEnvironment(launcher: .openMPI, sizeVariable: "OMPI_COMM_WORLD_SIZE", worldSize: 3, rank: 2,
                                               localRank: 0, localSize: 1))
        XCTAssertEqual(ompi.summary, "rank 2 of 3 (OMPI_COMM_WORLD_SIZE)")

        let hydra = try XCTUnwrap(LaunchEnvironment.detect(["PMI_SIZE": "4", "PMI_RANK": "1", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"]))
        XCTAssertEqual(hydra, LaunchEnvironment(launcher: .pmi, sizeVariable: "PMI_SIZE", worldSize: 4, rank: 1, localRank: 1, localSize: 2))

        let srun = try XCTUnwrap(LaunchEnvironment.detect(["SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"]))
        XCTAssertEqual(srun, LaunchEnvironment(launcher: .slurm, sizeVariable: "SLURM_STEP_NUM_TASKS", worldSize: 8, rank: 5, localRank: 1))
        // srun --mpi=pmi2 sets both; PMI's own variables win, Slurm's fill nothing they lack here.
        let pmi2 = try XCTUnwrap(LaunchEnvironment.detect(["SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
                                                           "PMI_SIZE": "2", "PMI_RANK": "1"]))
        XCTAssertEqual(pmi2, LaunchEnvironment(launcher: .pmi, sizeVariable: "PMI_SIZE", worldSize: 2, rank: 1, localRank: 1))

        // mpirun inside an allocation: Slurm's step is the daemons' (one task a node), the ranks are Open MPI's.
        let nested = try XCTUnwrap(LaunchEnvironment.detect(["SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0",
                                                             "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "9"]))
        XCTAssertEqual(nested.launcher, .openMPI)
        XCTAssertEqual(nested.worldSize, 16)

        let torch = try XCTUnwrap(LaunchEnvironment.detect(["WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"]))
        XCTAssertEqual(torch, LaunchEnvironment(launcher: .torchrun, sizeVariable: "WORLD_SIZE", worldSize: 2, rank: 1, localRank: 1, localSize: 2))
        XCTAssertFalse(torch.launcher.isMPI)
        // torchrun started by srun tasks (one per node): a torchrun launch, not an srun one.
        let torchUnderSrun = try XCTUnwrap(LaunchEnvironment.detect(["SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0",
                                                                     "WORLD_SIZE": "16", "RANK": "3"]))
        XCTAssertEqual(torchUnderSrun.launcher, .torchrun)
        // WORLD_SIZE that agrees with the MPI launcher is harmless.
        XCTAssertEqual(try LaunchEnvironment.detect(["OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0",
                                                     "WORLD_SIZE": "2", "RANK": "0"])?.launcher, .openMPI)
    }

    func testBadLauncherVariablesAreOneSentence() {
        let cases: [([String: String], String)] = [
            (["OMPI_COMM_WORLD_SIZE": "two", "OMPI_COMM_WORLD_RANK": "0"], "OMPI_COMM_WORLD_SIZE='two' is not a whole number"),
            (["PMI_SIZE": "0", "PMI_RANK": "0"], "PMI_SIZE='0' is not a whole number of at least 1"),
            (["PMI_SIZE": "2"], "PMI_SIZE=2 is set but PMI_RANK is not"),
            (["SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "2"], "SLURM_PROCID=2 is not a rank of a world of 2"),
            (["OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "WORLD_SIZE": "4", "RANK": "0"],
             "OMPI_COMM_WORLD_SIZE=2 but WORLD_SIZE=4"),
            (["WORLD_SIZE": "2"], "WORLD_SIZE=2 is set but RANK is not"),
        ]
        for (environment, expected) in cases {
            XCTAssertThrowsError(try LaunchEnvironment.detect(environment), "\(environment)") { error in
                let text = "\(error)"
                XCTAssertTrue(text.contains(expected), "\(text) lacks \(expected)")
                XCTAssertFalse(text.contains("\n"), text)
            }
        }
    }

    // MARK: The factory

    func testFactoryGivesSingleProcessWithoutALauncher() throws {
        for environment in [[:], ["OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"], ["WORLD_SIZE": "1", "RANK": "0"],
                            ["SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"]] {
            let c = try Communicators.make(environment: environment)
            XCTAssertTrue(c is SingleProcess, "\(environment): \(type(of: c))")
            XCTAssertEqual(c.worldSize, 1)
        }
    }

    func testFactoryRefusesTorchrunVariablesAndAMissingPlugin() {
        XCTAssertThrowsError(try Communicators.make(environment: ["WORLD_SIZE": "2", "RANK": "1"])) { error in
            guard case ReLoRAError.unsupported(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("rank 1 of 2 (WORLD_SIZE)") && m.contains("NCCL"), m)
        }
        // The MPI plugin is looked for before MPI is touched: a missing one is refused in this process.
        let missing = "/nonexistent/librelora-mpi.so"
        XCTAssertThrowsError(try Communicators.make(environment: ["OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
                                                                  "RELORA_MPI_LIB": missing])) { error in
            guard case ReLoRAError.unsupported(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("rank 1 of 2 (OMPI_COMM_WORLD_SIZE)") && m.contains(missing) && m.contains("make -C Kernels mpi"), m)
        }
        // A file that is not the plugin: the loader's sentence.
        XCTAssertThrowsError(try Communicators.make(environment: ["PMI_SIZE": "2", "PMI_RANK": "0",
                                                                  "RELORA_MPI_LIB": "/etc/hostname"])) { error in
            XCTAssertTrue("\(error)".contains("cannot open /etc/hostname"), "\(error)")
        }
    }

    func testPluginSearchIsTheKernelLibrarySearch() {
        XCTAssertEqual(MPICommunicator.candidatePaths(environment: ["RELORA_MPI_LIB": "/x/p.so"]), ["/x/p.so"])
        let paths = MPICommunicator.candidatePaths(environment: [:])
        XCTAssertTrue(paths.allSatisfy { $0.hasSuffix("/librelora-mpi.so") }, "\(paths)")
        XCTAssertEqual(paths.last, FileManager.default.currentDirectoryPath + "/Kernels/build/librelora-mpi.so")
    }

    // MARK: The collectives' conformance check

    func testCollectiveConformancePassesOnTheInProcessGroup() throws {
        for ranks in [1, 2, 3, 4] {
            let results = try InProcessGroup.run(ranks: ranks) { try CollectiveConformance.run($0) }
            for (rank, checks) in results.enumerated() {
                XCTAssertEqual(checks.count, 18)
                XCTAssertTrue(checks.allSatisfy(\.passed), "W \(ranks) rank \(rank)\n\(Conformance.table(checks))")
                XCTAssertEqual(checks, results[0], "every rank reports the same checks")
            }
        }
    }

    /// The data makes the summation order visible from 3 ranks on: another order than the rank order
    /// differs in many elements, so an engine that reorders contributions cannot pass.
    func testTheSumDataIsOrderSensitive() {
        let n = 10_000
        let x = (0..<3).map { CollectiveConformance.values(rank: $0, count: n, salt: 4) }
        let inOrder = (0..<n).map { (x[0][$0] + x[1][$0]) + x[2][$0] }
        let reversed = (0..<n).map { (x[2][$0] + x[1][$0]) + x[0][$0] }
        let differ = CollectiveConformance.differences(inOrder, reversed).count
        XCTAssertGreaterThan(differ, n / 10, "only \(differ) of \(n) sums depend on the order")
    }

    /// An engine that is wrong on one rank fails the check on every rank (every rank returns the same
    /// report), naming that rank.
    func testCollectiveConformanceCatchesAWrongEngine() throws {
        let expectations: [(FaultyCommunicator.Fault, [String])] = [
            (.allToAllBlocksReversed, ["sumInRankOrder", "allToAll"]),
            (.allGatherByteFlipped, ["allGather", "sumInRankOrder"]),
            (.broadcastIgnored, ["broadcast from rank 2"]),
        ]
        for (fault, ops) in expectations {
            let results = try InProcessGroup.run(ranks: 3) { c in
                try CollectiveConformance.run(FaultyCommunicator(c, fault: c.rank == 1 ? fault : nil))
            }
            for checks in results {
                XCTAssertEqual(checks, results[0])
                let failed = checks.filter { !$0.passed }
                for op in ops {
                    XCTAssertTrue(failed.contains { $0.op == op && $0.note.contains("rank 1:") }, "\(fault): no failed \(op)\n\(Conformance.table(checks))")
                }
                // A wrong byte collective shows on rank 1 alone; a wrong share of an ordered sum reaches every
                // rank through the final gather.
                let bytewise = failed.filter { $0.op != "sumInRankOrder" }
                XCTAssertFalse(bytewise.contains { $0.note.contains("rank 0:") || $0.note.contains("rank 2:") }, Conformance.table(failed))
            }
        }
    }

    // MARK: The CLI without a launcher

    func testPlainProcessWithTorchrunVariablesIsRefused() throws {
        let dir = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for (environment, expected) in [(["WORLD_SIZE": "2"], "WORLD_SIZE=2 is set but RANK is not"),
                                        (["WORLD_SIZE": "2", "RANK": "1"], "NCCL")] {
            let r = try runReloraProcess(["selftest", "--group", "collectives"], environment: environment, shell: "cd '\(dir)'")
            XCTAssertEqual(r.status, 2, r.stderr)
            XCTAssertEqual(r.stdout, "")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertTrue(r.stderr.hasPrefix("error: ") && r.stderr.contains(expected), r.stderr)
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [])
    }

    func testCollectivesGroupInOneProcess() throws {
        let r = try runRelora(["selftest", "--group", "collectives"], environment: ["RELORA_MPI_LIB": "/nonexistent"])
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        XCTAssertTrue(r.stdout.contains("single communicator: 18 passed, 0 failed"), r.stdout)
    }

    // MARK: mpirun

    func testMPIRunTwoRanks() throws {
        // No RELORA_MPI_LIB: the plugin is found under Kernels/build of the current directory.
        let r = try mpirun(ranks: 2, ["selftest", "--group", "collectives"], environment: ["RELORA_MPI_LIB": nil])
        XCTAssertEqual(r.status, 0, r.output)
        assertCollectivesPassed(r.output, ranks: 2)
    }

    func testMPIRunThreeRanks() throws {
        let r = try mpirun(ranks: 3, ["selftest", "--group", "collectives"], environment: ["RELORA_MPI_LIB": try mpiPluginPath()])
        XCTAssertEqual(r.status, 0, r.output)
        assertCollectivesPassed(r.output, ranks: 3)
    }

    /// Calls over 64 KiB split into pieces (strided datatypes): the path of calls over INT_MAX bytes.
    func testMPIRunSplitCalls() throws {
        let r = try mpirun(ranks: 3, ["selftest", "--group", "collectives"],
                           environment: ["RELORA_MPI_LIB": try mpiPluginPath(), "RELORA_MPI_MAX_CALL_BYTES": "65536"])
        XCTAssertEqual(r.status, 0, r.output)
        assertCollectivesPassed(r.output, ranks: 3)
        XCTAssertTrue(r.output.contains("calls split above 65536 bytes"), r.output)
    }

    /// Started by mpirun without a usable plugin: every rank ends with one sentence and a non-zero status,
    /// and nothing is written.
    func testMPIRunWithoutThePluginIsRefusedOnEveryRank() throws {
        let work = temporaryDirectory(), logs = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: work); try? FileManager.default.removeItem(atPath: logs) }
        // Each rank's stdout, stderr and exit status into its own files (any launcher: the rank comes from
        // Open MPI's or PMI's variable), so that no rank's report can be lost when mpirun ends the job.
        let wrapper = """
            r=${OMPI_COMM_WORLD_RANK:-$PMI_RANK}; cd '\(work)'; "$0" "$@" > '\(logs)'/out.$r 2> '\(logs)'/err.$r; echo $? > '\(logs)'/status.$r
            """
        let r = try mpirun(ranks: 2, ["selftest", "--group", "collectives"],
                           environment: ["RELORA_MPI_LIB": "/nonexistent/librelora-mpi.so"], wrapper: wrapper)
        XCTAssertEqual(r.status, 0, r.output)  // the wrappers end normally
        for rank in 0..<2 {
            let status = try String(contentsOfFile: "\(logs)/status.\(rank)", encoding: .utf8)
            let err = try String(contentsOfFile: "\(logs)/err.\(rank)", encoding: .utf8)
            XCTAssertEqual(status, "2\n", "rank \(rank)")
            XCTAssertEqual(try String(contentsOfFile: "\(logs)/out.\(rank)", encoding: .utf8), "")
            XCTAssertEqual(err.split(separator: "\n").count, 1, err)
            XCTAssertTrue(err.hasPrefix("error: ") && err.contains("rank \(rank) of 2 (") && err.contains("/nonexistent/librelora-mpi.so")
                          && err.contains("make -C Kernels mpi"), err)
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: work), [])
    }

    // MARK: Training under mpirun

    /// W MPI processes train exactly as W in-process ranks: the same loss bits every step and the same bytes
    /// in the final checkpoint's tensor files (ReLoRA over q4_0 with a restart, dropout, 8-bit moments). The
    /// ranks run OpenBLAS on this process's kernels (relora would otherwise restart itself on the best core
    /// for the CPU, whose sgemm may round differently).
    func testMPITrainingEqualsTheInProcessGroup() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let core = try XCTUnwrap(relora_blas_core_name().map { String(cString: $0) })
        for ranks in [2, 3] {
            let viaMPI = DataParallelTests.recipe(d, run: "mpi-\(ranks)")
            let r = try mpirun(ranks: ranks, ["train", try writeRecipe(viaMPI, to: d.dir + "/mpi-\(ranks).json")],
                               environment: ["RELORA_MPI_LIB": try mpiPluginPath(), "OPENBLAS_CORETYPE": core])
            XCTAssertEqual(r.status, 0, r.output)
            XCTAssertEqual(r.output.components(separatedBy: "done: 6 steps").count - 1, 1, "rank 0 alone reports: \(r.output)")
            let inProcess = DataParallelTests.recipe(d, run: "group-\(ranks)")
            let reference = try DataParallelTests.train(inProcess, ranks: ranks)
            XCTAssertEqual(try metricsLosses(viaMPI.runDir).map(\.bitPattern), reference.losses.map(\.bitPattern), "W \(ranks)")
            let last = "/checkpoints/" + TrainingCheckpoint.name(step: 6)
            for file in ["model.tensors.zst", "lora.tensors.zst", "optimizer.tensors.zst"] {
                XCTAssertEqual(FileManager.default.contents(atPath: viaMPI.runDir + last + "/" + file),
                               FileManager.default.contents(atPath: inProcess.runDir + last + "/" + file), "W \(ranks): \(file)")
            }
        }
    }

    /// 2 MPI processes with `shard_optimizer` train exactly as 2 in-process ranks without it: the same loss
    /// bits and final checkpoint bytes (the moments rank 1 keeps reach rank 0's file over MPI broadcasts).
    func testMPIShardedTrainingEqualsTheUnshardedGroup() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let core = try XCTUnwrap(relora_blas_core_name().map { String(cString: $0) })
        let viaMPI = ShardedOptimizerTests.recipe(d, run: "mpi-sharded", sharded: true)
        let r = try mpirun(ranks: 2, ["train", try writeRecipe(viaMPI, to: d.dir + "/mpi-sharded.json")],
                           environment: ["RELORA_MPI_LIB": try mpiPluginPath(), "OPENBLAS_CORETYPE": core])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("optimizer states sharded over 2 ranks: rank 0 holds "), r.output)
        let inProcess = ShardedOptimizerTests.recipe(d, run: "group-unsharded", sharded: false)
        let reference = try ShardedOptimizerTests.train(inProcess, ranks: 2)
        XCTAssertEqual(try metricsLosses(viaMPI.runDir).map(\.bitPattern), reference.losses.map(\.bitPattern))
        for step in [2, 4, 6] {
            XCTAssertEqual(ShardedOptimizerTests.checkpointTensors(viaMPI.runDir, step: step),
                           ShardedOptimizerTests.checkpointTensors(inProcess.runDir, step: step), "step \(step)")
        }
    }

    /// A rank killed mid-run (SIGKILL) brings the job down with a non-zero status, and the run resumes from
    /// its last checkpoint to the end with one process.
    func testAKilledRankEndsTheJobAndTheRunResumes() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        var recipe = DataParallelTests.recipe(d, run: "killed", steps: 300)
        recipe.checkpointEvery = 3
        let path = try writeRecipe(recipe, to: d.dir + "/killed.json")
        // Rank 1 is killed 3 s after it starts; the others would wait for it in their next collective.
        let wrapper = """
            r=${OMPI_COMM_WORLD_RANK:-$PMI_RANK}; if [ "$r" = 1 ]; then "$0" "$@" & p=$!; sleep 3; kill -9 $p; wait $p; exit 137; else exec "$0" "$@"; fi
            """
        let start = Date()
        let r = try mpirun(ranks: 2, ["train", path], environment: ["RELORA_MPI_LIB": try mpiPluginPath()], wrapper: wrapper)
        XCTAssertNotEqual(r.status, 0, r.output)
        XCTAssertNotEqual(r.status, 124, "the job hung until the time limit: \(r.output)")
        XCTAssertLessThan(Date().timeIntervalSince(start), 60, r.output)
        let saved = try XCTUnwrap(TrainingCheckpoint.latest(runDir: recipe.runDir), "no checkpoint before the kill: \(r.output)")
        let step = try TrainingCheckpoint.readState(saved).step
        XCTAssertLessThan(step, 300)
        let resumed = try Trainer(recipe: recipe, resume: true, log: { _ in })
        XCTAssertEqual(resumed.state.step, step)
        XCTAssertEqual(try resumed.run().steps, 300)
    }

    // MARK: Helpers

    private func assertCollectivesPassed(_ output: String, ranks: Int, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(output.contains("mpi communicator: 18 passed, 0 failed on rank 0 of \(ranks)"), output, file: file, line: line)
        XCTAssertTrue(output.contains("communicator: mpi, \(ranks) ranks"), output, file: file, line: line)
        // Rank 0 alone prints the table.
        XCTAssertEqual(output.components(separatedBy: "sumInRankOrder         786433 x \(ranks) ranks").count - 1, 1, output, file: file, line: line)
    }

}

/// A communicator that forwards to another and, when given a fault, gets one collective wrong the way a
/// broken engine would.
final class FaultyCommunicator: Communicator {
    enum Fault { case allToAllBlocksReversed, allGatherByteFlipped, broadcastIgnored }
    let inner: Communicator
    let fault: Fault?
    init(_ inner: Communicator, fault: Fault?) { self.inner = inner; self.fault = fault }

    var rank: Int { inner.rank }
    var worldSize: Int { inner.worldSize }
    var localRank: Int { inner.localRank }
    var localSize: Int { inner.localSize }
    var engine: String { "faulty" }

    func allGather(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        try inner.allGather(send, into: receive)
        // The first byte from the last rank wrong, in the data's gathers (the ordered sums' shares among
        // them) but not in the small final gather of the mismatch counts, so that the report stays readable.
        if fault == .allGatherByteFlipped, receive.count > 1024 { receive[receive.count - send.count] ^= 0x40 }
    }

    func allToAll(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        try inner.allToAll(send, into: receive)
        guard fault == .allToAllBlocksReversed, worldSize > 1 else { return }
        // The received blocks in reverse rank order: an engine that mixed up the senders.
        let block = receive.count / worldSize
        let copy = [UInt8](receive)
        for q in 0..<worldSize {
            UnsafeMutableRawBufferPointer(rebasing: receive[q * block ..< (q + 1) * block])
                .copyBytes(from: copy[(worldSize - 1 - q) * block ..< (worldSize - q) * block])
        }
    }

    func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        if fault == .broadcastIgnored {
            // Takes part in the exchange but keeps its own bytes.
            let mine = [UInt8](buffer)
            try inner.broadcast(buffer, root: root)
            buffer.copyBytes(from: mine)
        } else {
            try inner.broadcast(buffer, root: root)
        }
    }

    func barrier() throws { try inner.barrier() }
    func abort(_ message: String, status: Int32) -> Never { inner.abort(message, status: status) }
}
