import CReLoRA
import Foundation
import ReLoRACore
import ReLoRACommandLine

/// relora: ReLoRA pretraining. The CLI is thin: each command (one file each, named after it) parses its
/// arguments with its `CommandSpec`, calls the library and prints. This file only dispatches.

// Before anything else: restart on OpenBLAS's best kernels if it fell back to weak ones (see
// relora_blas_core.h); returns here when OpenBLAS's choice is already right or the user set one.
relora_blas_ensure_best_core(CommandLine.unsafeArgv)

/// Every command and what runs it, in the order `relora --help` lists them.
let commands: [(spec: CommandSpec, run: ([String]) throws -> Void)] = [
    (trainCommand, runTrain),
    (exportCommand, runExport),
    (evalCommand, runEval),
    (sampleCommand, runSample),
    (tokenizerCommand, runTokenizer),
    (tokenizeCommand, runTokenize),
    (memoryCommand, runMemory),
    (plotCommand, runPlot),
    (runsCommand, runRuns),
    (analyzeCommand, runAnalyze),
    (controlCommand, runControl),
    (selfTestCommand, runSelfTest),
    (infoCommand, runInfo),
]

let relora = CommandSpec(
    name: "relora",
    summary: "pretrain LLaMA-style models with ReLoRA (high-rank training through low-rank updates)",
    synopsis: ["<command> [options]"],
    discussion: """
        Every command, its options and the exit codes are in docs/cli.md. Errors you can fix (a bad option,
        recipe or file) print one line on stderr and exit with status 2.
        """,
    examples: [
        "relora train Configs/recipes/shakespeare_demo.json",
        "relora sample --model runs/shakespeare-demo --prompt \"ROMEO.\"",
    ],
    subcommands: commands.map(\.spec))

let argv = Array(CommandLine.arguments.dropFirst())
guard let word = argv.first, word != "--help", word != "-h", word != "help" else {
    print(relora.usage)
    exit(argv.isEmpty ? 1 : 0)
}
do {
    guard let command = commands.first(where: { $0.spec.name == "relora \(word)" }) else {
        throw relora.usageError(word.hasPrefix("-") ? "unknown option \(word) (a command comes first)" : "unknown command '\(word)'")
    }
    try command.run(Array(argv.dropFirst()))
    Communicators.finishProcess()
} catch let error as ReLoRAError {
    Communicators.fail("error: \(error)", status: 2)  // in a run of several processes: every rank ends
} catch {
    Communicators.fail("error: \(error)", status: 1)
}
