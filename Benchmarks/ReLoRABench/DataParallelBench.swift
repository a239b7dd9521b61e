import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRATrain
import ReLoRACommandLine

// `relora-bench data-parallel`: what data parallelism costs on one machine. The same training run (same
// tokens, same global batch: `micro_batch` per rank, `grad_accum` global micro-batches) is run by `relora
// train` once per world size W of --ranks, always on the same T threads in total: W = 1 as a plain process
// with RELORA_CPU_THREADS=T, W > 1 under `mpirun -np W` with T/W threads a rank (docs/distributed.md). With
// the compute fixed, tokens/s(W) / tokens/s(smallest W) is the overhead of the extra processes and of the
// gradient sums (~1.0 is ideal); it is not a speedup. Each run's figures are read back from its
// metrics.jsonl, and the step losses of every W are checked against the smallest W's (the same tokens,
// summed in another order: 1e-6 relative, the bound DataParallelTests holds the trainer to).
let dataParallelBenchCommand = CommandSpec(
    name: "relora-bench data-parallel",
    summary: "the overhead of data parallelism on one machine: relora train at several world sizes on the same threads",
    discussion: """
        Writes random tokens and a recipe to a temporary directory, then runs `relora train` (the relora
        executable next to relora-bench) once per world size of --ranks with the same --threads in total:
        1 as a plain process with RELORA_CPU_THREADS=T, W > 1 under `mpirun -np W` (Open MPI or MPICH) with
        RELORA_CPU_THREADS=T/W and the MPI plugin (RELORA_MPI_LIB, librelora-mpi.so next to the executable,
        or Kernels/build/). Every world size trains the same global batch (--grad-accum counts the
        micro-batches of a step over all ranks, so each W of --ranks must divide it). From each run's
        metrics.jsonl, after the first two steps (one when --steps < 4), prints the median step time, tokens/s,
        the share of a step spent in collectives (median comm_ms / median ms) and tokens/s against the
        smallest world size: with the compute fixed, about 1.0 is ideal, so this measures overhead, not a
        speedup. Checks that every world size's step losses agree with the smallest one's within 1e-6 relative.
        Exits 2 on an error (a bad option, a missing relora, mpirun or plugin, a failed run) and 1 when the
        losses disagree.
        """,
    options: [
        .value("config", "FILE", help: "the model config", default: "Configs/models/llama_20m.json"),
        .value("mode", help: "full-rank or LoRA training (frozen W + rank-R adapters on the seven block linears)",
               default: "lora", choices: ["full", "lora"]),
        .value("rank", "R", help: "the LoRA rank (--mode lora)", default: "128"),
        .value("seq-len", "N", help: "tokens per sequence", default: "256"),
        .value("micro-batch", "B", help: "sequences per micro-batch (per rank)", default: "2"),
        .value("grad-accum", "G", help: "micro-batches per step over all ranks; every world size must divide it", default: "4"),
        .value("steps", "S", help: "training steps per run, the first one or two untimed (warm-up)", default: "20"),
        .value("threads", "T", help: "CPU threads in total for every run, split evenly over the ranks (default: the core count)"),
        .value("ranks", "W,W,...", help: "the world sizes to run", default: "1,2"),
        .value("json", "OUT.json", help: "also write the figures to this JSON file"),
    ],
    examples: [
        "swift build -c release --product relora && swift build -c release --product relora-bench",
        ".build/release/relora-bench data-parallel --json /tmp/dp.json",
        "relora-bench data-parallel --config Configs/models/llama_9m.json --ranks 1,2 --steps 6 --json /tmp/dp.json",
    ])

struct DataParallelBenchOptions {
    var config: String
    var mode: String
    var rank: Int
    var seqLen: Int
    var microBatch: Int
    var gradAccum: Int
    var steps: Int
    var threads: Int
    var ranks: [Int]
    var json: String?

    init(_ a: ParsedArguments) throws {
        let command = dataParallelBenchCommand
        config = try a.required("config")
        mode = try a.required("mode")
        rank = try a.int("rank", atLeast: 1)
        seqLen = try a.int("seq-len", atLeast: 1)
        microBatch = try a.int("micro-batch", atLeast: 1)
        gradAccum = try a.int("grad-accum", atLeast: 1)
        steps = try a.int("steps", atLeast: 2)  // one warm-up step and at least one timed
        threads = a.has("threads") ? try a.int("threads", atLeast: 1) : max(1, ProcessInfo.processInfo.activeProcessorCount)
        ranks = try a.list("ranks")!.map { item in
            guard let w = Int(item), w >= 1 else {
                throw command.usageError("--ranks takes world sizes of at least 1 separated by commas, got '\(item)'")
            }
            return w
        }
        guard Set(ranks).count == ranks.count else { throw command.usageError("--ranks names a world size twice") }
        if let w = ranks.first(where: { gradAccum % $0 != 0 }) {
            throw command.usageError("--grad-accum \(gradAccum) is not divisible by the world size \(w) of --ranks (each rank runs an equal share of a step's micro-batches)")
        }
        json = a.string("json")
    }

    /// Steps left out of the medians: the first allocates workspaces and faults pages in, the second may
    /// still be settling (the first collectives set up MPI's shared-memory buffers).
    var warmupSteps: Int { steps >= 4 ? 2 : 1 }
}

/// One `relora train` run of the benchmark, as read back from its metrics.jsonl.
struct DataParallelRun {
    var worldSize: Int
    var threadsPerRank: Int
    /// Wall time of the whole process (start-up, every step, the final checkpoint), seconds.
    var wallSeconds: Double
    /// Every step's loss and time, from metrics.jsonl (rank 0's).
    var losses: [Double]
    var stepMilliseconds: [Double]
    var communicationMilliseconds: [Double]
}

func runDataParallelBench(_ args: [String]) throws {
    guard let a = try dataParallelBenchCommand.parseOrPrintHelp(args) else { return }
    let o = try DataParallelBenchOptions(a)

    // Everything that can be missing is checked before the first run.
    let fm = FileManager.default
    let benchDirectory = (Bundle.main.executableURL ?? URL(fileURLWithPath: CommandLine.arguments[0])).resolvingSymlinksInPath()
        .deletingLastPathComponent().path
    let relora = benchDirectory + "/relora"
    guard fm.isExecutableFile(atPath: relora) else {
        throw ReLoRAError.unsupported("relora-bench data-parallel runs the relora executable next to it, and there is none at \(relora); build it with `swift build --product relora` and the same -c as relora-bench")
    }
    let configPath = URL(fileURLWithPath: o.config).standardizedFileURL.path  // the runs start in a temporary directory
    let config = try LlamaConfig(contentsOf: configPath)
    if o.mode == "lora" { try LoRAConfig(rank: o.rank, alpha: 32).validate(for: config) }
    var launcher: MPILauncher?
    if o.ranks.contains(where: { $0 > 1 }) { launcher = try MPILauncher.find() }

    let dir = fm.temporaryDirectory.appendingPathComponent("relora-bench-dp-\(getpid())").path
    try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? fm.removeItem(atPath: dir) }
    let tokensPerStep = o.seqLen * o.microBatch * o.gradAccum
    // Enough tokens that the sampler's windows of every step are distinct (random tokens: the loss stays
    // near ln(vocab), which is all the runs need to be comparable).
    var rng = SystemRandomNumberGenerator()
    let tokenCount = max(200_000, 2 * tokensPerStep * o.steps)
    try NpyWriter.write(tokens: (0..<tokenCount).map { _ in Int64.random(in: 0..<Int64(config.vocabSize), using: &rng) },
                        dtype: config.vocabSize <= 65536 ? .uint16 : .uint32, to: dir + "/train.npy")

    let load = (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?.split(separator: " ").first.map(String.init) ?? "?"
    say("data parallel on one machine: \(o.config), \(o.mode == "lora" ? "LoRA r \(o.rank)" : "full-rank"), "
          + "\(o.microBatch) x \(o.seqLen) tokens a micro-batch, \(o.gradAccum) micro-batches a step (\(tokensPerStep) tokens), "
          + "\(o.steps) steps (the first \(o.warmupSteps) untimed), \(o.threads) threads in total; cpu: \(cpuModelName()), "
          + "load average \(load)")

    var runs: [DataParallelRun] = []
    for (index, w) in o.ranks.enumerated() {
        var recipe = Recipe(model: configPath, trainData: dir + "/train.npy", runDir: dir + "/run-w\(w)")
        recipe.seqLen = o.seqLen; recipe.microBatch = o.microBatch; recipe.gradAccum = o.gradAccum
        recipe.steps = o.steps; recipe.warmupSteps = 0; recipe.seed = 1
        recipe.evalEvery = 1_000_000; recipe.checkpointEvery = 1_000_000; recipe.keepCheckpoints = 1
        if o.mode == "lora" { recipe.mode = .lora; recipe.loraRank = o.rank; recipe.loraAlpha = 32 }
        let recipePath = dir + "/recipe-w\(w).json"
        try JSONSerialization.data(withJSONObject: recipe.jsonObject(), options: [.sortedKeys]).write(to: URL(fileURLWithPath: recipePath))
        _ = try Recipe(contentsOf: recipePath)  // a bad combination is one sentence here, not a failed run

        let threadsPerRank = max(1, o.threads / w)
        let (executable, arguments, environment) = w == 1
            ? (relora, ["train", recipePath], ["RELORA_CPU_THREADS": "\(threadsPerRank)"])
            : launcher!.command(ranks: w, relora: relora, arguments: ["train", recipePath], threadsPerRank: threadsPerRank)
        say("run \(index + 1)/\(o.ranks.count): W = \(w), \(threadsPerRank) thread\(threadsPerRank == 1 ? "" : "s") a rank"
              + (w == 1 ? " (one process)" : " (mpirun -np \(w))") + " ...")
        let start = monotonicSeconds()
        let log = dir + "/run-w\(w).log"
        let status = try runLogged(executable, arguments, environment: environment, log: log)
        let seconds = monotonicSeconds() - start
        guard status == 0 else {
            let lines = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n")
            let reason = lines.last { $0.contains("error") } ?? lines.last ?? "no output"
            throw ReLoRAError.unsupported("relora train at W = \(w) exited with status \(status) after \(String(format: "%.1f", seconds)) s: \(reason)")
        }
        var run = try readRun(metrics: recipe.runDir + "/metrics.jsonl", steps: o.steps)
        run.worldSize = w; run.threadsPerRank = threadsPerRank; run.wallSeconds = seconds
        runs.append(run)
        say(String(format: "run %d/%d: W = %d finished in %.1f s", index + 1, o.ranks.count, w, seconds))
    }

    // Figures: medians over the timed steps; tokens/s from the median step time.
    let reference = runs.min { $0.worldSize < $1.worldSize }!
    let lossBound = 1e-6
    func figures(_ run: DataParallelRun) -> (step: Double, tokens: Double, comm: Double, share: Double, lossDifference: Double) {
        let step = median(Array(run.stepMilliseconds.dropFirst(o.warmupSteps))) / 1000
        let comm = run.communicationMilliseconds.isEmpty ? 0 : median(Array(run.communicationMilliseconds.dropFirst(o.warmupSteps))) / 1000
        let difference = zip(run.losses, reference.losses).map { abs($0 - $1) / max(abs($1), .leastNormalMagnitude) }.max() ?? 0
        return (step, Double(tokensPerStep) / step, comm, comm / step, difference)
    }
    let referenceTokens = figures(reference).tokens
    say("")
    say(" ranks  threads/rank  step s  tokens/s  comm share  tokens/s vs W=\(reference.worldSize)  max loss diff vs W=\(reference.worldSize)")
    var rows: [[String: Any]] = []
    var lossesAgree = true
    for run in runs {
        let f = figures(run)
        let ok = f.lossDifference <= lossBound
        lossesAgree = lossesAgree && ok
        say(String(format: "%6d  %12d  %6.3f  %8.0f  %9.1f%%  %15.3f  %@", run.worldSize, run.threadsPerRank, f.step, f.tokens,
                     100 * f.share, f.tokens / referenceTokens,
                     run.worldSize == reference.worldSize ? "-" : String(format: "%.1e%@", f.lossDifference, ok ? "" : " (over 1e-6)")))
        rows.append([
            "ranks": run.worldSize, "threads_per_rank": run.threadsPerRank, "step_seconds": f.step,
            "tokens_per_second": f.tokens, "comm_seconds": f.comm, "comm_share": f.share,
            "scaling_ratio": f.tokens / referenceTokens, "wall_seconds": run.wallSeconds, "losses": run.losses,
            "step_ms": run.stepMilliseconds, "comm_ms": run.communicationMilliseconds,
            "max_relative_loss_difference": f.lossDifference,
        ])
    }
    say("""

        tokens/s vs W=\(reference.worldSize): tokens/s at W ranks over tokens/s at W=\(reference.worldSize), every run on the same \
        \(o.threads) threads in total: about 1.0 is ideal. This is the overhead of data parallelism on one machine (extra \
        processes, the gradient sums in comm share), not a speedup.
        """)
    let verdict = lossesAgree ? "agree" : "DISAGREE"
    say("step losses of every W against W=\(reference.worldSize): \(verdict) within 1e-6 relative (the same tokens; only the summation order differs)")

    if let path = o.json {
        let obj: [String: Any] = [
            "config": o.config, "mode": o.mode, "rank": o.rank, "seq_len": o.seqLen, "micro_batch": o.microBatch,
            "grad_accum": o.gradAccum, "tokens_per_step": tokensPerStep, "steps": o.steps, "warmup_steps": o.warmupSteps,
            "threads": o.threads, "cpu": cpuModelName(), "load_average_before": load, "runs": rows,
            "reference_ranks": reference.worldSize,
            "loss_bound": lossBound, "losses_agree": lossesAgree,
            "mpi": launcher?.version ?? NSNull(),
        ]
        try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys])
            .write(to: URL(fileURLWithPath: path))
    }
    if !lossesAgree { exit(1) }
}

/// A line on stdout, unbuffered: the progress lines show as the runs go, also through a pipe.
private func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

/// The median (the mean of the middle two for an even count).
private func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// The step lines of a run's metrics.jsonl (lines with `ms`; evaluations and restarts have none).
private func readRun(metrics path: String, steps: Int) throws -> DataParallelRun {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
        throw ReLoRAError.invalidFile(path: path, reason: "the run wrote no metrics file")
    }
    var run = DataParallelRun(worldSize: 0, threadsPerRank: 0, wallSeconds: 0, losses: [], stepMilliseconds: [], communicationMilliseconds: [])
    for line in text.split(separator: "\n") {
        guard let d = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
              let ms = (d["ms"] as? NSNumber)?.doubleValue else { continue }
        run.stepMilliseconds.append(ms)
        run.losses.append((d["loss"] as? NSNumber)?.doubleValue ?? .nan)
        if let comm = (d["comm_ms"] as? NSNumber)?.doubleValue { run.communicationMilliseconds.append(comm) }
    }
    guard run.stepMilliseconds.count == steps else {
        throw ReLoRAError.invalidFile(path: path, reason: "has \(run.stepMilliseconds.count) step lines, expected \(steps)")
    }
    return run
}

/// Runs `executable` with this process's environment changed by `environment`, its stdout and stderr into
/// the file `log`; returns its exit status.
private func runLogged(_ executable: String, _ arguments: [String], environment: [String: String], log: String) throws -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    p.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
    guard FileManager.default.createFile(atPath: log, contents: nil) else {
        throw ReLoRAError.invalidFile(path: log, reason: "cannot create the run's log")
    }
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
    defer { try? handle.close() }
    p.standardOutput = handle
    p.standardError = handle
    try p.run()
    p.waitUntilExit()
    return p.terminationStatus
}

/// "AMD EPYC 9R14" from /proc/cpuinfo's first `model name`, else "unknown".
private func cpuModelName() -> String {
    let info = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
    guard let line = info.split(separator: "\n").first(where: { $0.hasPrefix("model name") }),
          let colon = line.firstIndex(of: ":") else { return "unknown" }
    return line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
}

/// How to start W ranks of relora on this machine: the `mpirun` on PATH and the MPI plugin relora would load.
struct MPILauncher {
    let mpirun: String
    let plugin: String
    /// The first line of `mpirun --version` ("mpirun (Open MPI) 4.1.2").
    let version: String
    let isOpenMPI: Bool

    static func find() throws -> MPILauncher {
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map { "\($0)/mpirun" }
            .first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let mpirun = path else {
            throw ReLoRAError.unsupported("a world size above 1 in --ranks needs mpirun on PATH and there is none (scripts/setup.sh installs Open MPI); or run --ranks 1")
        }
        // The plugin as relora looks for it, from relora-bench's directory (relora's own) and the current one.
        let candidates = RuntimeLibrary.candidatePaths(fileName: "librelora-mpi.so", variable: "RELORA_MPI_LIB")
        guard let plugin = RuntimeLibrary.firstExisting(candidates) else {
            throw ReLoRAError.unsupported("a world size above 1 in --ranks needs the MPI plugin and there is none at \(candidates.joined(separator: " or ")); build it with `make -C Kernels mpi` or set RELORA_MPI_LIB")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: mpirun)
        p.arguments = ["--version"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        let first = text.split(separator: "\n").first.map(String.init) ?? "unknown"
        return MPILauncher(mpirun: URL(fileURLWithPath: mpirun).standardizedFileURL.path, plugin: URL(fileURLWithPath: plugin).standardizedFileURL.path,
                           version: first, isOpenMPI: text.contains("Open MPI"))
    }

    /// `mpirun -np W ... relora ARGS` and the variables it needs. Open MPI: --oversubscribe (more ranks than
    /// cores is allowed: the threads, not the ranks, are the budget), --allow-run-as-root as root (containers),
    /// the variables passed on with -x, and on Open MPI 4 shared memory and loopback only with copies through
    /// shared memory (no probing of network devices; CMA's single copy needs ptrace rights containers deny),
    /// unless the caller set those MCA variables. MPICH's mpirun passes the whole environment itself.
    func command(ranks: Int, relora: String, arguments: [String], threadsPerRank: Int)
        -> (executable: String, arguments: [String], environment: [String: String]) {
        var env = ["RELORA_CPU_THREADS": "\(threadsPerRank)", "RELORA_MPI_LIB": plugin]
        var flags = ["-np", "\(ranks)"]
        if isOpenMPI {
            flags += ["--oversubscribe"]
            if geteuid() == 0 { flags += ["--allow-run-as-root"] }
            flags += env.keys.sorted().flatMap { ["-x", $0] }
            let inherited = ProcessInfo.processInfo.environment
            if version.contains("(Open MPI) 4.") {
                for (key, value) in ["OMPI_MCA_btl": "self,vader", "OMPI_MCA_btl_vader_single_copy_mechanism": "none"]
                where inherited[key] == nil { env[key] = value }
            }
        }
        return (mpirun, flags + [relora] + arguments, env)
    }
}
