import CReLoRA
import Foundation
import ReLoRACore
import ReLoRACommandLine

// relora-bench: measurements a person runs by hand (Benchmarks/results/ has what they gave). This file
// only dispatches; each benchmark's options and --help are its `CommandSpec`:
//   relora-bench [--mode full|lora|quant-linear ...]   CPU step throughput (CPUBench.swift)
//   relora-bench gpu [...]                             the CUDA backend's figures (GPUBench.swift)
//   relora-bench compression CHECKPOINT [...]          zstd levels and filters on a checkpoint (CompressionBench.swift)
//   relora-bench data-parallel [...]                   relora train at several world sizes, same threads (DataParallelBench.swift)
//   relora-bench sample [...]                          sampling tokens/s with and without the KV cache (SampleBench.swift)

// First: restart on OpenBLAS's best kernels if it fell back to weak ones (see relora_blas_core.h).
relora_blas_ensure_best_core(CommandLine.unsafeArgv)

let argv = Array(CommandLine.arguments.dropFirst())
do {
    switch argv.first {
    case "gpu": try runGPUBench(Array(argv.dropFirst()))
    case "compression": try CompressionBench.run(Array(argv.dropFirst()))
    case "data-parallel": try runDataParallelBench(Array(argv.dropFirst()))
    case "sample": try runSampleBench(Array(argv.dropFirst()))
    default: try runCPUBench(argv)
    }
} catch {
    FileHandle.standardError.write(Data("error: \(error)\n".utf8))
    exit(2)
}
