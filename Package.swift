// swift-tools-version:6.0
// relora: ReLoRA pretraining in Swift with a CPU reference backend and dlopen'd CUDA kernels.
// No Swift package dependencies; system libraries only (OpenBLAS, libzstd). CUDA is never linked:
// Kernels/ builds libreloracuda.so, which CReLoRA's loader opens at run time.
//
// The targets are the layers (docs/architecture.md draws them); each imports only the layers below it,
// and CI builds with `--explicit-target-dependency-import-check=error`, so an undeclared import fails.
//
//   ReLoRACLI, ReLoRABench            commands (relora, relora-bench)
//   ReLoRASelfTest, ReLoRAAnalysis     conformance suite; spectra, plots, run listings
//   ReLoRATrain                        recipe, trainer loop, AdamW, samplers, schedules, memory plan
//   ReLoRACheckpoint                   training checkpoints, Hugging Face and GGUF model files
//   ReLoRAModel                        LLaMA model, adapted (frozen + LoRA) linears, merge policies, eval
//   ReLoRATokenizer                    tokenizers: byte-level BPE, SentencePiece BPE/Unigram; trainers; GGUF vocabularies
//   ReLoRACUDA                         CUDA backend over the dlopen'd kernel library; backend factory
//   ReLoRAFormats                      safetensors, zstd tensor files, GGUF containers, .npy tokens
//   ReLoRACommandLine                  the one option parser and --help text of both executables
//   ReLoRACore                         tensors, the Backend protocol, CPU and planning backends, quant
//   CReLoRA, COpenBLAS, CZstd          C: kernel ABI and loader, quant blocks, RNG; system libraries
import PackageDescription

let package = Package(
    name: "relora",
    products: [
        .executable(name: "relora", targets: ["ReLoRACLI"]),
        .executable(name: "relora-bench", targets: ["ReLoRABench"]),
        .library(name: "ReLoRA", targets: [
            "ReLoRACore", "ReLoRACUDA", "ReLoRAFormats", "ReLoRATokenizer", "ReLoRAModel", "ReLoRACheckpoint",
            "ReLoRATrain", "ReLoRAAnalysis", "ReLoRASelfTest",
        ]),
    ],
    targets: [
        .systemLibrary(
            name: "COpenBLAS", path: "Sources/COpenBLAS", pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev", "pkg-config"])]),
        .systemLibrary(
            name: "CZstd", path: "Sources/CZstd", pkgConfig: "libzstd",
            providers: [.apt(["libzstd-dev", "pkg-config"])]),
        .target(
            name: "CReLoRA", path: "Sources/CReLoRA",
            linkerSettings: [.linkedLibrary("dl")]),
        // Release is plain -O: preconditions (the size checks) stay. -Ounchecked measured within noise on
        // relora-bench (20m, full and LoRA step), and unsafe flags would bar use as a package dependency.
        .target(name: "ReLoRACore", dependencies: ["CReLoRA", "COpenBLAS"], path: "Sources/ReLoRACore"),
        .target(name: "ReLoRACommandLine", dependencies: ["ReLoRACore"], path: "Sources/ReLoRACommandLine"),
        .target(name: "ReLoRACUDA", dependencies: ["ReLoRACore", "CReLoRA"], path: "Sources/ReLoRACUDA"),
        .target(name: "ReLoRAFormats", dependencies: ["ReLoRACore", "CReLoRA", "CZstd"], path: "Sources/ReLoRAFormats"),
        .target(name: "ReLoRATokenizer", dependencies: ["ReLoRACore", "ReLoRAFormats"], path: "Sources/ReLoRATokenizer"),
        .target(
            name: "ReLoRAModel", dependencies: ["ReLoRACore", "ReLoRAFormats", "CReLoRA"], path: "Sources/ReLoRAModel"),
        .target(
            name: "ReLoRACheckpoint", dependencies: ["ReLoRACore", "ReLoRAFormats", "ReLoRATokenizer", "ReLoRAModel", "CReLoRA"],
            path: "Sources/ReLoRACheckpoint"),
        .target(
            name: "ReLoRATrain",
            dependencies: ["ReLoRACore", "ReLoRACUDA", "ReLoRAFormats", "ReLoRATokenizer", "ReLoRAModel", "ReLoRACheckpoint", "CReLoRA"],
            path: "Sources/ReLoRATrain"),
        .target(
            name: "ReLoRAAnalysis",
            dependencies: ["ReLoRACore", "ReLoRAFormats", "ReLoRAModel", "ReLoRACheckpoint", "ReLoRATrain", "COpenBLAS"],
            path: "Sources/ReLoRAAnalysis"),
        .target(
            name: "ReLoRASelfTest",
            dependencies: ["ReLoRACore", "ReLoRAFormats", "ReLoRAModel", "ReLoRATrain", "CReLoRA"],
            path: "Sources/ReLoRASelfTest"),
        .executableTarget(
            name: "ReLoRACLI",
            dependencies: [
                "ReLoRACore", "ReLoRACUDA", "ReLoRAFormats", "ReLoRATokenizer", "ReLoRAModel", "ReLoRACheckpoint",
                "ReLoRATrain", "ReLoRAAnalysis", "ReLoRASelfTest", "ReLoRACommandLine", "CReLoRA",
            ],
            path: "Sources/ReLoRACLI"),
        .executableTarget(
            name: "ReLoRABench",
            dependencies: [
                "ReLoRACore", "ReLoRACUDA", "ReLoRAFormats", "ReLoRAModel", "ReLoRACheckpoint", "ReLoRATrain",
                "ReLoRACommandLine", "CReLoRA", "COpenBLAS",
            ],
            path: "Benchmarks/ReLoRABench"),
        .testTarget(
            name: "ReLoRATests",
            dependencies: [
                "ReLoRACore", "ReLoRACUDA", "ReLoRAFormats", "ReLoRATokenizer", "ReLoRAModel", "ReLoRACheckpoint",
                "ReLoRATrain", "ReLoRAAnalysis", "ReLoRASelfTest", "ReLoRACommandLine", "CReLoRA", "COpenBLAS",
            ],
            path: "Tests/ReLoRATests"),
    ],
    swiftLanguageModes: [.v6]
)
