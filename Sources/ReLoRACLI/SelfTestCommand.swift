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

let selfTestCommand = CommandSpec(
    name: "relora selftest",
    summary: "check every backend op against reference implementations (--device cpu|cuda)",
    discussion: """
        Runs the backend conformance suite on the device: every op of the backend (transfers and dtype
        conversions, fills, matmul, rmsnorm, rope, attention, swiglu, embedding, cross-entropy, dropout,
        reductions, AdamW, pruning, quantization) against naive Double references, with a bound derived per op
        and dtype, and every backward against finite differences of its forward. On cuda every op runs in f32
        and in bf16, and a few training steps of a tiny model (full-rank; ReLoRA over q4_0, nf4 and q8_0 with
        rtn, stochastic and master merges at a restart) are compared with the CPU backend, in f32 and in bf16.
        Prints one line per check (op, shape, dtype, max error, bound, pass/FAIL) and "N passed, M failed";
        exits with status 1 if any check failed. RELORA_CUDA_LIB=Kernels/build/libreloracuda-emu.so runs the
        cuda kernels in their CPU emulation.
        """,
    options: [
        deviceOption,
        .value("group", "G[,G...]", help: "only these groups: \(ConformanceGroup.allCases.map(\.rawValue).joined(separator: ", "))"),
        .flag("json", help: "print {\"backend\", \"passed\", \"failed\", \"checks\": [...]} instead of the table"),
    ],
    examples: ["relora selftest --device cuda --group training"])

func runSelfTest(_ args: [String]) throws {
    guard let a = try selfTestCommand.parseOrPrintHelp(args) else { return }
    var groups = ConformanceGroup.allCases
    if let list = a.string("group") {
        groups = try list.split(separator: ",").map { name in
            guard let g = ConformanceGroup(rawValue: String(name)) else {
                throw selfTestCommand.usageError("unknown group '\(name)'; groups: \(ConformanceGroup.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return g
        }
    }
    let backend = try a.backend()
    let quiet = a.flag("json")
    let progress: (ConformanceCheck) -> Void = { c in
        if !quiet && !c.passed { printLine("FAIL \(c.op) [\(c.shape)] \(c.dtype): \(c.note)") }
    }
    // A backend that computes in bf16 is checked in both dtypes.
    let computeDTypes: [DType] = backend.precision.activations == .f32 ? [.f32] : [.f32, backend.precision.activations]
    var checks = Conformance.run(on: backend, computeDTypes: computeDTypes, groups: groups.filter { $0 != .training },
                                 progress: progress)
    if let device = backend as? CUDABackend, groups.contains(.training) {
        checks += try TrainingConformance.run(makeDevice: { CUDABackend(library: device.library, precision: $0) }, progress: progress)
    }
    if a.flag("json") {
        print(Conformance.json(checks, backend: backend.name))
    } else {
        print(Conformance.table(checks))
        if let device = backend as? CUDABackend {
            print("device: \(device.library.deviceName) (\(device.library.buildDescription), \(device.library.path))")
        }
        print("\(backend.name): \(Conformance.summary(checks))")
    }
    if checks.contains(where: { !$0.passed }) { exit(1) }
}
