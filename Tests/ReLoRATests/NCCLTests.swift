import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRACheckpoint
@testable import ReLoRATrain

/// The NCCL engine (`NCCLCommunicator`) on the kernel library's CPU emulation, whose `nccl_*` entries talk
/// TCP between the processes: how a launch picks it, how ranks meet with and without MPI, training that
/// equals the in-process group on the same backend bit for bit, and a killed rank under torchrun-style
/// variables (no launcher to end the others).
final class NCCLTests: XCTestCase {
    // MARK: Choosing the engine (no NCCL needed)

    func testTheDeviceEngineServesLaunchesWithAndWithoutMPI() throws {
        nonisolated(unsafe) var seen: (launch: LaunchEnvironment, bootstrap: MPICommunicator?)?
        let engine: Communicators.DeviceEngine = { launch, bootstrap in
            seen = (launch, bootstrap)
            return SingleProcess()
        }
        // torchrun-style variables: the engine meets its peers itself.
        _ = try Communicators.make(environment: ["WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"], deviceEngine: engine)
        XCTAssertEqual(seen?.launch.launcher, .torchrun)
        XCTAssertEqual(seen?.launch.rank, 1)
        XCTAssertNil(seen?.bootstrap)
        // srun on a cluster without the MPI plugin, with a meeting address: the same.
        seen = nil
        _ = try Communicators.make(environment: ["SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "NCCL_COMM_ID": "node1:29600",
                                                 "RELORA_MPI_LIB": "/nonexistent/librelora-mpi.so"], deviceEngine: engine)
        XCTAssertEqual(seen?.launch.launcher, .slurm)
        XCTAssertNil(seen?.bootstrap)
        // mpirun carries the id over MPI: without the plugin it is refused, the engine never called.
        seen = nil
        XCTAssertThrowsError(try Communicators.make(environment: ["OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
                                                                  "RELORA_MPI_LIB": "/nonexistent/librelora-mpi.so"], deviceEngine: engine)) { error in
            XCTAssertTrue("\(error)".contains("cannot load the MPI plugin"), "\(error)")
        }
        XCTAssertNil(seen)
        // The CPU (no device engine) refuses torchrun-style variables with one sentence naming the way out.
        XCTAssertThrowsError(try Communicators.make(environment: ["WORLD_SIZE": "2", "RANK": "0"])) { error in
            XCTAssertTrue("\(error)".contains("--device cuda"), "\(error)")
        }
    }

    func testMeetingAddressAndTimeout() throws {
        let launch = LaunchEnvironment(launcher: .torchrun, sizeVariable: "WORLD_SIZE", worldSize: 2, rank: 0)
        XCTAssertEqual(try NCCLCommunicator.meetingAddress(launch, ["NCCL_COMM_ID": "10.0.0.1:29600", "MASTER_ADDR": "x", "MASTER_PORT": "1"]),
                       "10.0.0.1:29600")
        // torchrun's own store holds MASTER_PORT on rank 0: NCCL meets one port above.
        XCTAssertEqual(try NCCLCommunicator.meetingAddress(launch, ["MASTER_ADDR": "node7", "MASTER_PORT": "29500"]), "node7:29501")
        for bad: [String: String] in [["NCCL_COMM_ID": "10.0.0.1"], ["NCCL_COMM_ID": ":29600"], ["NCCL_COMM_ID": "h:0"],
                                      ["MASTER_ADDR": "h", "MASTER_PORT": "http"], ["MASTER_ADDR": "h"], [:]] {
            XCTAssertThrowsError(try NCCLCommunicator.meetingAddress(launch, bad), "\(bad)") { error in
                XCTAssertTrue("\(error)".contains("NCCL_COMM_ID") || "\(error)".contains("MASTER_PORT"), "\(error)")
            }
        }
        XCTAssertEqual(try NCCLCommunicator.collectiveTimeout([:]), NCCLCommunicator.defaultTimeout)
        XCTAssertEqual(try NCCLCommunicator.collectiveTimeout(["RELORA_COLLECTIVE_TIMEOUT": "2.5"]), 2.5)
        for bad in ["0", "-1", "ten", "inf"] {
            XCTAssertThrowsError(try NCCLCommunicator.collectiveTimeout(["RELORA_COLLECTIVE_TIMEOUT": bad]), bad)
        }
    }

    // MARK: Collectives over the emulated NCCL

    func testSelftestCollectivesUnderMPI() throws {
        for ranks in [2, 3] {
            let r = try mpirun(ranks: ranks, ["selftest", "--group", "collectives", "--device", "cuda"],
                               environment: ["RELORA_MPI_LIB": try mpiPluginPath(), "RELORA_CUDA_LIB": try emulation()])
            XCTAssertEqual(r.status, 0, r.output)
            XCTAssertTrue(r.output.contains("nccl communicator: 18 passed, 0 failed on rank 0 of \(ranks)"), r.output)
            XCTAssertTrue(r.output.contains("met through MPI"), r.output)
        }
    }

    func testSelftestCollectivesWithTorchrunVariables() throws {
        let runs = try torchrunStyle(ranks: 3, ["selftest", "--group", "collectives", "--device", "cuda"])
        for (rank, r) in runs.enumerated() { XCTAssertEqual(r.status, 0, "rank \(rank): \(r.output)") }
        XCTAssertTrue(runs[0].output.contains("nccl communicator: 18 passed, 0 failed on rank 0 of 3"), runs[0].output)
        XCTAssertTrue(runs[0].output.contains("met through NCCL_COMM_ID=127.0.0.1:"), runs[0].output)
        XCTAssertFalse(runs[1].output.contains("passed"), "rank 1 printed: \(runs[1].output)")
    }

    /// Without NCCL_COMM_ID and MASTER_ADDR the ranks have nowhere to meet: one sentence, nothing written.
    func testTorchrunVariablesWithoutAMeetingPointAreRefused() throws {
        let dir = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try runReloraProcess(["selftest", "--group", "collectives", "--device", "cuda"],
                                     environment: ["WORLD_SIZE": "2", "RANK": "1", "RELORA_CUDA_LIB": try emulation(),
                                                   "NCCL_COMM_ID": nil, "MASTER_ADDR": nil], shell: "cd '\(dir)'")
        XCTAssertEqual(r.status, 2, r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("rank 1 of 2 (WORLD_SIZE)") && r.stderr.contains("set NCCL_COMM_ID"), r.stderr)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [])
    }

    // MARK: Training

    /// Two ranks on the emulated CUDA backend, under mpirun and under torchrun-style variables (with small
    /// chunks), train the same bits as two in-process ranks on the same backend (whose gradients are summed
    /// through host copies: the device sums, started block by block during the backward, add the same
    /// values in the same order), and stay within bf16's bound of the same run on the CPU (the selftest's
    /// training bound, 3e-2 relative). The emulation's streams run deferred (Kernels/README.md, Streams), the
    /// mpirun ranks' in the default order and the torchrun ranks' in the reverse one, so a missing event
    /// between the default stream and the sums' stream changes the bits and fails this test.
    func testTrainingEqualsTheInProcessGroupOnTheSameBackend() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let library = try emulation()
        func recipe(_ run: String) -> Recipe {
            var r = DataParallelTests.recipe(d, run: run, steps: 4, reloraEvery: 2)
            r.device = "cuda"
            return r
        }
        let viaMPI = recipe("nccl-mpi")
        let m = try mpirun(ranks: 2, ["train", try writeRecipe(viaMPI, to: d.dir + "/nccl-mpi.json")],
                           environment: ["RELORA_MPI_LIB": try mpiPluginPath(), "RELORA_CUDA_LIB": library])
        XCTAssertEqual(m.status, 0, m.output)
        XCTAssertTrue(m.output.contains("data parallel: 2 ranks (nccl)"), m.output)
        // Chunks of 999 floats: they end inside tensors and their shares are padded (999 = 2 x 500 - 1).
        let viaTorchrun = recipe("nccl-torchrun")
        let t = try torchrunStyle(ranks: 2, ["train", try writeRecipe(viaTorchrun, to: d.dir + "/nccl-torchrun.json")],
                                  environment: ["RELORA_COLLECTIVE_CHUNK_FLOATS": "999", "RELORA_EMU_STREAM_ORDER": "reverse"])
        for (rank, r) in t.enumerated() { XCTAssertEqual(r.status, 0, "rank \(rank): \(r.output)") }
        // After the first step each run prints its allocator's figures and its plan's: equal, the gradient sums'
        // buffers (made during the backward, enlarged for the last group) included.
        for output in [m.output, t[0].output] {
            let measured = try XCTUnwrap(firstMatch(#"allocator peak (\S+ \S+) in use \([^)]*\), (\S+ \S+) reserved \((\d+) cudaMalloc"#, output), output)
            let planned = try XCTUnwrap(firstMatch(#"planned: allocator peak (\S+ \S+) in use, (\S+ \S+) reserved \((\d+) cudaMalloc\)"#, output), output)
            XCTAssertEqual(measured, planned, output)
        }

        let group = recipe("group")
        let emulated = try CUDABackendTests.emulatedBackend().library
        let reference = try DataParallelTests.train(group, ranks: 2, backend: { CUDABackend(library: emulated) })
        XCTAssertEqual(Set(reference.hashes).count, 1)
        let last = "/checkpoints/" + TrainingCheckpoint.name(step: 4)
        for run in [viaMPI, viaTorchrun] {
            XCTAssertEqual(try metricsLosses(run.runDir).map(\.bitPattern), reference.losses.map(\.bitPattern), run.runDir)
            for file in ["model.tensors.zst", "lora.tensors.zst", "optimizer.tensors.zst"] {
                XCTAssertEqual(FileManager.default.contents(atPath: run.runDir + last + "/" + file),
                               FileManager.default.contents(atPath: group.runDir + last + "/" + file), "\(run.runDir): \(file)")
            }
        }
        var onCPU = recipe("cpu")
        onCPU.device = "cpu"
        let cpu = try DataParallelTests.train(onCPU, ranks: 2)
        for (a, b) in zip(reference.losses, cpu.losses) { XCTAssertEqual(a, b, accuracy: 3e-2 * abs(b), "\(reference.losses) vs \(cpu.losses)") }
    }

    /// Under torchrun-style variables nothing ends the other ranks when one dies: rank 1 is killed (SIGKILL)
    /// mid-run and rank 0's next collective fails (the emulation sees the closed connection; real NCCL within
    /// RELORA_COLLECTIVE_TIMEOUT), so it exits non-zero with one sentence naming its rank; the run resumes
    /// from its last checkpoint on one process to the end.
    func testAKilledRankEndsTheOthersAndTheRunResumes() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        var recipe = DataParallelTests.recipe(d, run: "killed", steps: 60)
        recipe.device = "cuda"
        recipe.checkpointEvery = 3
        let path = try writeRecipe(recipe, to: d.dir + "/killed.json")
        let start = Date()
        let runs = try torchrunStyle(ranks: 2, ["train", path], environment: ["RELORA_COLLECTIVE_TIMEOUT": "30"], killRank1After: 6)
        XCTAssertLessThan(Date().timeIntervalSince(start), 90, runs[0].output)
        XCTAssertNotEqual(runs[0].status, 0, runs[0].output)
        XCTAssertNotEqual(runs[0].status, 124, "rank 0 hung until the time limit: \(runs[0].output)")
        XCTAssertTrue(runs[0].output.contains("rank 0: ") && runs[0].output.contains("communication failed"), runs[0].output)
        let saved = try XCTUnwrap(TrainingCheckpoint.latest(runDir: recipe.runDir), "no checkpoint before the kill: \(runs[0].output)")
        let step = try TrainingCheckpoint.readState(saved).step
        XCTAssertLessThan(step, 60)
        let emulated = try CUDABackendTests.emulatedBackend().library
        let resumed = try Trainer(recipe: recipe, resume: true, backend: CUDABackend(library: emulated), log: { _ in })
        XCTAssertEqual(resumed.state.step, step)
        XCTAssertEqual(try resumed.run().steps, 60)
    }

    // MARK: Helpers

    /// The emulated kernel library (built if needed).
    private func emulation() throws -> String {
        try KernelEmulationTests.buildEmulation()
        return KernelEmulationTests.emulatedLibrary
    }

    /// `ranks` relora processes started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
    /// LOCAL_WORLD_SIZE, and NCCL_COMM_ID on a free loopback port), on the emulated CUDA library, from the
    /// package root, each with a time limit; each rank's status and output (stdout and stderr together).
    /// `killRank1After`: rank 1 gets SIGKILL that many seconds after it starts.
    private func torchrunStyle(ranks: Int, _ args: [String], environment: [String: String] = [:],
                               killRank1After: Int? = nil) throws -> [(status: Int32, output: String)] {
        let relora = try requireReloraExecutable()
        let library = try emulation()
        let port = try freeLoopbackPort()
        let results = LockedResults(count: ranks)
        // Every rank on a thread of its own at once (a pool would run only as many as there are cores, and a
        // rank that waits for one not started yet would wait forever).
        let all = DispatchGroup()
        for rank in 0..<ranks { all.enter(); Thread {
            defer { all.leave() }
            var env = ProcessInfo.processInfo.environment
            for key in env.keys where key.hasPrefix("OMPI_") || key.hasPrefix("PMI") || key.hasPrefix("SLURM_") { env[key] = nil }
            env["WORLD_SIZE"] = "\(ranks)"; env["RANK"] = "\(rank)"; env["LOCAL_RANK"] = "\(rank)"; env["LOCAL_WORLD_SIZE"] = "\(ranks)"
            env["NCCL_COMM_ID"] = "127.0.0.1:\(port)"; env["RELORA_CUDA_LIB"] = library; env["MASTER_ADDR"] = nil
            for (k, v) in environment { env[k] = v }
            let command: [String]
            if rank == 1, let seconds = killRank1After {
                command = ["/bin/sh", "-c", "\"$0\" \"$@\" & p=$!; sleep \(seconds); kill -9 $p; wait $p; exit 137", relora] + args
            } else {
                command = [relora] + args
            }
            let r = Result { try runProcess("/usr/bin/timeout", ["-k", "10", "300"] + command, environment: env, directory: launchPackageRoot) }
            results.set(rank, r)
        }.start() }
        all.wait()
        return try results.values()
    }

    /// The capture groups of the first match of `pattern` in `text`.
    private func firstMatch(_ pattern: String, _ text: String) -> [String]? {
        guard let regex = try? NSRegularExpression(pattern: pattern),
              let m = regex.firstMatch(in: text, range: NSRange(text.startIndex..., in: text)) else { return nil }
        return (1..<m.numberOfRanges).map { String(text[Range(m.range(at: $0), in: text)!]) }
    }

    private func freeLoopbackPort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw XCTSkip("no sockets") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw XCTSkip("cannot bind a loopback port") }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

/// The per-rank results of `torchrunStyle`, written by concurrent threads.
private final class LockedResults: @unchecked Sendable {  // each slot written once under the lock, read after the join
    private var slots: [Result<(status: Int32, output: String), Error>?]
    private let lock = NSLock()
    init(count: Int) { slots = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ r: Result<(status: Int32, output: String), Error>) { lock.lock(); slots[i] = r; lock.unlock() }
    func values() throws -> [(status: Int32, output: String)] {
        lock.lock(); defer { lock.unlock() }
        return try slots.map { try XCTUnwrap($0).get() }
    }
}
