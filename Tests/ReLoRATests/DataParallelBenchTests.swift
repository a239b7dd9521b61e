import Foundation
import XCTest

/// `relora-bench data-parallel`: a real run at 1 and 2 ranks of a tiny model (the figures are sane, the
/// losses of both world sizes agree), and its refusals: bad --ranks, a --grad-accum some world size does
/// not divide, no mpirun, no MPI plugin; each one sentence with exit status 2. The run skips when mpirun
/// or the plugin is absent, as MPITests does (`scripts/setup.sh` installs Open MPI and builds the plugin).
final class DataParallelBenchTests: XCTestCase {
    private static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    /// The tiny config (hidden 64, 2 layers, vocabulary 512), LoRA r 4, 2 steps of 2 micro-batches of 1 x 32
    /// tokens: a few seconds for both world sizes in a debug build.
    private let tinyRun = ["data-parallel", "--config", DataParallelBenchTests.packageRoot + "/Configs/models/llama_tiny.json"]
        + DataParallelBenchTests.tinyOptions
    private static let tinyOptions = ["--rank", "4", "--seq-len", "32", "--micro-batch", "1", "--grad-accum", "2", "--steps", "2", "--threads", "2"]

    func testOneAndTwoRanksReportSaneFigures() throws {
        guard Self.onPath("mpirun") != nil else { throw XCTSkip("no mpirun on PATH (scripts/setup.sh installs Open MPI)") }
        let plugin = Self.packageRoot + "/Kernels/build/librelora-mpi.so"
        try XCTSkipUnless(FileManager.default.fileExists(atPath: plugin), "no MPI plugin at \(plugin) (`make -C Kernels mpi`)")
        _ = try requireReloraExecutable()  // the bench runs the relora next to it
        let bench = try requireExecutable("relora-bench")
        let dir = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let json = dir + "/dp.json"
        // From the package root (where the bench finds Kernels/build/); the time limit ends a hung job instead of the test run.
        let r = try runProcess("/usr/bin/timeout", ["-k", "10", "120", bench] + tinyRun + ["--ranks", "1,2", "--json", json],
                               directory: Self.packageRoot)
        XCTAssertEqual(r.status, 0, r.output)
        for line in ["run 1/2: W = 1, 2 threads a rank (one process) ...", "run 2/2: W = 2 finished in ", "not a speedup",
                     "step losses of every W against W=1: agree within 1e-6 relative"] {
            XCTAssertTrue(r.output.contains(line), "no '\(line)' in: \(r.output)")
        }

        let object = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: json))) as? [String: Any])
        XCTAssertEqual(object["losses_agree"] as? Bool, true)
        XCTAssertEqual(object["tokens_per_step"] as? Int, 64)
        let runs = try XCTUnwrap(object["runs"] as? [[String: Any]])
        XCTAssertEqual(runs.compactMap { $0["ranks"] as? Int }, [1, 2])
        XCTAssertEqual(runs.compactMap { $0["threads_per_rank"] as? Int }, [2, 1])
        for run in runs {
            let w = run["ranks"] as? Int ?? 0
            let tokens = try XCTUnwrap(run["tokens_per_second"] as? Double, "W \(w)")
            XCTAssertGreaterThan(tokens, 0, "W \(w)")
            let share = try XCTUnwrap(run["comm_share"] as? Double, "W \(w)")
            XCTAssertTrue((0...1).contains(share), "W \(w): comm share \(share)")
            if w == 1 { XCTAssertEqual(share, 0, "one process has no collectives") }
            XCTAssertGreaterThan(try XCTUnwrap(run["scaling_ratio"] as? Double, "W \(w)"), 0, "W \(w)")
            XCTAssertEqual((run["losses"] as? [Double])?.count, 2, "W \(w)")
            XCTAssertLessThanOrEqual(try XCTUnwrap(run["max_relative_loss_difference"] as? Double, "W \(w)"), 1e-6, "W \(w)")
        }
        XCTAssertEqual(runs.first?["scaling_ratio"] as? Double, 1)
    }

    func testBadInputIsOneSentence() throws {
        let cases: [([String], [String: String?], String)] = [
            (tinyRun + ["--ranks", "0"], [:], "relora-bench data-parallel: --ranks takes world sizes of at least 1 separated by commas, got '0'"),
            (tinyRun + ["--ranks", "1,x"], [:], "--ranks takes world sizes of at least 1 separated by commas, got 'x'"),
            (tinyRun + ["--ranks", "2,2"], [:], "--ranks names a world size twice"),
            (tinyRun + ["--ranks", "1,3"], [:], "--grad-accum 2 is not divisible by the world size 3 of --ranks"),
            (["data-parallel", "--steps", "1"], [:], "--steps must be an integer >= 2, got '1'"),
            (["data-parallel", "--threads", "0"], [:], "--threads must be an integer >= 1, got '0'"),
            (["data-parallel", "--mode", "relora"], [:], "--mode relora is not supported"),
            (tinyRun + ["--ranks", "1,2"], ["PATH": "/nonexistent"], "needs mpirun on PATH and there is none"),
            (["data-parallel", "--config", "/nonexistent/config.json"] + Self.tinyOptions, [:], "/nonexistent/config.json"),
        ]
        for (args, environment, fragment) in cases {
            let r = try runBuiltExecutable("relora-bench", args, environment: environment)
            XCTAssertEqual(r.status, 2, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(fragment), "\(args): stderr '\(r.stderr)' should mention '\(fragment)'")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(args): expected one line, got '\(r.stderr)'")
            XCTAssertEqual(r.stdout, "", "\(args): nothing runs before the input is checked")
        }
        // With mpirun but no plugin (RELORA_MPI_LIB, when set, is the only place looked at).
        if Self.onPath("mpirun") != nil {
            let r = try runBuiltExecutable("relora-bench", tinyRun + ["--ranks", "1,2"], environment: ["RELORA_MPI_LIB": "/nonexistent/librelora-mpi.so"])
            XCTAssertEqual(r.status, 2, r.stderr)
            XCTAssertTrue(r.stderr.contains("needs the MPI plugin and there is none at /nonexistent/librelora-mpi.so"), r.stderr)
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
    }

    private static func onPath(_ name: String) -> String? {
        (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map { "\($0)/\(name)" }
            .first { FileManager.default.isExecutableFile(atPath: $0) }
    }
}
