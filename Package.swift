// swift-tools-version:6.0
// relora: ReLoRA pretraining in Swift with a CPU reference backend and dlopen'd CUDA kernels.
// No Swift package dependencies; system libraries only (OpenBLAS, libzstd). CUDA is never linked:
// Kernels/ builds libreloracuda.so, which CReLoRA's loader opens at run time.
import PackageDescription

let package = Package(
    name: "relora",
    products: [
        .executable(name: "relora", targets: ["ReLoRACLI"]),
        .executable(name: "relora-bench", targets: ["ReLoRABench"]),
        .library(name: "ReLoRA", targets: ["ReLoRA"]),
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
        .target(
            name: "ReLoRA", dependencies: ["CReLoRA", "COpenBLAS", "CZstd"], path: "Sources/ReLoRA"),
        .executableTarget(name: "ReLoRACLI", dependencies: ["ReLoRA", "CReLoRA"], path: "Sources/ReLoRACLI"),
        .executableTarget(name: "ReLoRABench", dependencies: ["ReLoRA", "CReLoRA", "COpenBLAS"], path: "Benchmarks/ReLoRABench"),
        .testTarget(
            name: "ReLoRATests", dependencies: ["ReLoRA", "CReLoRA", "COpenBLAS"], path: "Tests/ReLoRATests"),
    ],
    swiftLanguageModes: [.v6]
)
