import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRATrain

/// Starting relora as the ranks of a run: `mpirun`, and the recipes and metrics those runs read and write
/// (MPITests, NCCLTests).
let launchPackageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path

extension XCTestCase {
    /// Writes `recipe` as a JSON file and returns its path.
    func writeRecipe(_ recipe: Recipe, to path: String) throws -> String {
        try JSONSerialization.data(withJSONObject: recipe.jsonObject()).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// The step losses of a run's metrics.jsonl (written in shortest round-trip form: read back exactly).
    func metricsLosses(_ runDir: String) throws -> [Double] {
        try String(contentsOfFile: runDir + "/metrics.jsonl", encoding: .utf8).split(separator: "\n").compactMap { line in
            let d = try JSONDecoder().decode([String: JSONValue].self, from: Data(line.utf8))
            if case .number(let loss)? = d["loss"] { return loss }
            return nil
        }
    }

    func mpiPluginPath() throws -> String {
        let path = launchPackageRoot + "/Kernels/build/librelora-mpi.so"
        try XCTSkipUnless(FileManager.default.fileExists(atPath: path), "no MPI plugin at \(path) (`make -C Kernels mpi`; scripts/setup.sh builds it when mpicc exists)")
        return path
    }

    func executableOnPath(_ name: String) -> String? {
        (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map { "\($0)/\(name)" }
            .first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// `mpirun -np ranks relora args` from the package root (through `sh -c wrapper` when given), with a
    /// time limit; stdout and stderr together.
    func mpirun(ranks: Int, _ args: [String], environment: [String: String?], wrapper: String? = nil) throws
        -> (status: Int32, output: String) {
        guard let mpirun = executableOnPath("mpirun") else { throw XCTSkip("no mpirun on PATH (scripts/setup.sh installs Open MPI)") }
        _ = try mpiPluginPath()
        let relora = try requireReloraExecutable()
        var launcher = ["-np", "\(ranks)"]
        var env = ProcessInfo.processInfo.environment
        let version = try runProcess(mpirun, ["--version"], environment: env, directory: launchPackageRoot)
        if version.output.contains("Open MPI") {
            launcher += ["--oversubscribe"]  // more ranks than this machine's cores
            if geteuid() == 0 { launcher += ["--allow-run-as-root"] }
            if version.output.contains("(Open MPI) 4.") {
                // One node: shared memory and loopback only (no probing of network devices a container
                // lacks), copies through shared memory (CMA's single copy needs ptrace rights containers deny).
                env["OMPI_MCA_btl"] = "self,vader"
                env["OMPI_MCA_btl_vader_single_copy_mechanism"] = "none"
            }
        }
        for (key, value) in environment { env[key] = value }
        let command = wrapper.map { ["/bin/sh", "-c", $0, relora] } ?? [relora]
        // The time limit ends a hung job (a collective that never completes) instead of the test run.
        return try runProcess("/usr/bin/timeout", ["-k", "10", "300", mpirun] + launcher + command + args, environment: env, directory: launchPackageRoot)
    }
}
