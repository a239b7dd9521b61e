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

let trainCommand = CommandSpec(
    name: "relora train",
    summary: "train a model from a recipe (or --resume a run)",
    synopsis: [
        "RECIPE.json [--set key=value ...] [--device cpu|cuda] [--budget SIZE] [--profile N]",
        "--resume RUN_DIR [--set key=value ...] [--device cpu|cuda] [--budget SIZE]",
    ],
    discussion: """
        Trains a model as the recipe says (see Configs/recipes/ for examples and docs/recipes-and-relora.md for
        every key). Prints one line per step (step, loss, lr, grad norm, tokens/s, ms, memory, MFU, ETA); metrics
        also go to RUN_DIR/metrics.jsonl and to TensorBoard event files in RUN_DIR (`tensorboard --logdir`).
        Checkpoints are written atomically every checkpoint_every steps and at the end.
        Ctrl-C saves a checkpoint and stops with exit status 130 (press again to abort at once; SIGTERM: 143).
        Running out of device memory or disk mid-run prints one line and exits with status 3 (checkpoints stay intact).
        --resume continues the latest checkpoint of RUN_DIR with bit-identical results to an uninterrupted run.
        """,
    positionals: .optional("RECIPE.json"),
    options: [
        .repeated("set", "key=value", help: "override a recipe key (the value parsed as JSON, else taken as a string)"),
        .value("resume", "RUN_DIR", help: "continue a run from its latest checkpoint (uses RUN_DIR/recipe.json)"),
        .value("device", "cpu|cuda", help: """
            same as --set device=D, applied after the --set overrides (default: the recipe's device, cpu if it \
            names none). On cuda the run is planned first and refused, before allocating, if the plan exceeds the \
            device's free memory; after the first step it prints the allocator's and the device's measured peaks \
            beside the plan. Kernel library: RELORA_CUDA_LIB, libreloracuda.so next to relora, or Kernels/build/; \
            RELORA_DEVICE_MEMORY_LIMIT=24GiB caps device memory (a smaller card on a bigger one)
            """),
        .value("budget", "SIZE", help: "refuse to start, before allocating, if the memory plan exceeds SIZE (e.g. 24GiB)"),
        .value("profile", "N", help: """
            time every op of the N steps after the run's first (a warm-up) and print a table per category (GEMMs by \
            role, dequantize, attention, norms, elementwise, cross-entropy, embedding, optimizer, reductions, \
            transfers): ops a step, measured ms and share of the step, the roofline prediction from the device's \
            data-sheet peaks (the CPU's measured ones), achieved TFLOP/s and GB/s; the rest of the step is "other". \
            CUDA: timing events, no synchronization inside a step; 0 = off. See docs/cuda.md
            """, default: "0"),
    ],
    examples: [
        "relora train Configs/recipes/shakespeare_demo.json --set lr=1e-3 --set run_dir=runs/lr1e-3",
        "relora train --resume runs/shakespeare-demo",
        "relora train Configs/recipes/shakespeare_demo.json --profile 3",
    ],
    helpWhenEmpty: true)

/// The signal (SIGINT or SIGTERM) that asked the run to stop, 0 if none; the trainer checks it between steps.
nonisolated(unsafe) var stopRequested: sig_atomic_t = 0

func installStopHandler() {
    let handler: @convention(c) (Int32) -> Void = { sig in
        stopRequested = sig
        signal(sig, SIG_DFL)  // a second signal ends the process at once
    }
    signal(SIGINT, handler)
    signal(SIGTERM, handler)
}

func runTrain(_ args: [String]) throws {
    guard let a = try trainCommand.parseOrPrintHelp(args) else { return }
    let overrides = a.values("set") + (a.string("device").map { ["device=\(jsonQuoted($0))"] } ?? [])
    let resumeDir = a.string("resume")
    let budget = try a.bytes("budget")
    let profileSteps = try a.int("profile", atLeast: 0)
    var recipe: Recipe
    switch (a.positional.first, resumeDir) {
    case (let path?, nil):
        recipe = try Recipe(contentsOf: path, overrides: overrides)
    case (nil, let dir?):
        recipe = try Recipe(contentsOf: dir + "/recipe.json", overrides: overrides + ["run_dir=\(jsonQuoted(dir))"])
    case (_?, _?):
        throw trainCommand.usageError("give either a recipe or --resume RUN_DIR, not both")
    case (nil, nil):
        throw trainCommand.usageError("missing the recipe file (or --resume RUN_DIR)")
    }
    // A budget only the plan without the dequantized-weight cache fits settles `reuse_dequantized: auto` to false
    // for this run (its recipe.json then says so, and a resume stays within the budget too).
    if let budget, try checkBudget(recipe, budget: budget).dequantizedCacheLeftOut > 0 { recipe.reuseDequantized = false }
    if resumeDir == nil { try Trainer.checkProfileFits(profileSteps: profileSteps, done: 0, steps: recipe.steps) }
    installStopHandler()
    // One process, or every rank of a launch (docs/distributed.md): each runs this same command; on the
    // CUDA backend the ranks talk through NCCL, on the CPU through MPI.
    let communicator = try Communicators.forThisProcess(deviceEngine: BackendFactory.collectives(for: Device(parsing: recipe.device)))
    // The ranks on a node share its cores: each gets its share unless RELORA_CPU_THREADS says otherwise.
    let cores = max(1, ProcessInfo.processInfo.activeProcessorCount)
    let threads = communicator.localSize > 1 && ProcessInfo.processInfo.environment[CPUThreads.environmentVariable] == nil
        ? max(1, cores / communicator.localSize) : cpuThreadCount
    let summary = try withCPUThreads(threads) {
        let trainer = try Trainer(recipe: recipe, resume: resumeDir != nil, communicator: communicator, log: { printLine($0) })
        if communicator.localSize > 1 && communicator.rank == 0 {
            printLine("cpu threads: \(threads) per process (\(communicator.localSize) processes on this node, \(cores) cores)")
        }
        trainer.shouldStop = { stopRequested != 0 }
        trainer.profileSteps = profileSteps
        return try trainer.run()
    }
    var line = summary.stoppedEarly
        ? String(format: "stopped at step %d of %d, last loss %.4f", summary.steps, recipe.steps, summary.lastLoss)
        : String(format: "done: %d steps, last loss %.4f", summary.steps, summary.lastLoss)
    if let v = summary.lastValLoss { line += String(format: ", val loss %.4f (ppl %.2f)", v, exp(v)) }
    if summary.skippedSteps > 0 { line += ", \(summary.skippedSteps) skipped" }
    if let c = summary.checkpoint { line += "; checkpoint \(c)" }
    if communicator.rank == 0 { print(line) }
    let status = trainExitStatus(summary, signal: stopRequested)
    if status != 0 {
        Communicators.finishProcess()  // every rank stopped after the same step
        exit(status)  // exit() flushes stdout
    }
}

/// 0 for a run that reached its last step; a run stopped by a signal exits as shells report a process
/// ended by it, 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), so scripts can tell it was cut short.
/// The checkpoint is saved either way.
func trainExitStatus(_ summary: TrainingSummary, signal: Int32) -> Int32 {
    guard summary.stoppedEarly else { return 0 }
    return 128 + (signal > 0 ? signal : SIGINT)
}

func jsonQuoted(_ s: String) -> String {
    let data = try! JSONSerialization.data(withJSONObject: [s])
    return String(String(decoding: data, as: UTF8.self).dropFirst().dropLast())
}
