import Foundation
import ReLoRACore
import ReLoRACheckpoint
import ReLoRACUDA
import ReLoRACommandLine

// What several commands share: output helpers, the backend of `--device`, input file lists.

/// Writes a line to stdout unbuffered (progress must show up even when stdout is a pipe).
func printLine(_ s: String) {
    FileHandle.standardOutput.write(Data((s + "\n").utf8))
}

/// Writes a line to stderr (warnings, progress, errors).
func standardError(_ s: String) {
    FileHandle.standardError.write(Data((s + "\n").utf8))
}

/// The `--device` option of the commands that compute.
let deviceOption = OptionSpec.value(
    "device", "cpu|cuda", help: "where to compute; cuda loads the kernel library from RELORA_CUDA_LIB, "
        + "libreloracuda.so next to relora, or Kernels/build/", default: "cpu")

extension ParsedArguments {
    /// The backend of `--device cpu|cuda` (default cpu), from the one factory.
    func backend() throws -> Backend {
        try BackendFactory.make(Device(parsing: string("device") ?? "cpu"))
    }
}

/// Files named directly, and the *.txt / *.jsonl files under directories (sorted, recursive).
func expandInputs(_ paths: [String]) throws -> [String] {
    let fm = FileManager.default
    var files: [String] = []
    for p in paths {
        var isDir: ObjCBool = false
        guard fm.fileExists(atPath: p, isDirectory: &isDir) else {
            throw ReLoRAError.invalidFile(path: p, reason: "no such file or directory")
        }
        if isDir.boolValue {
            let found = ((try? fm.subpathsOfDirectory(atPath: p)) ?? [])
                .filter { $0.hasSuffix(".txt") || $0.hasSuffix(".jsonl") }.sorted().map { p + "/" + $0 }
            guard !found.isEmpty else { throw ReLoRAError.invalidFile(path: p, reason: "holds no .txt or .jsonl files") }
            files += found
        } else {
            files.append(p)
        }
    }
    return files
}

/// What every command that takes a model says it accepts (`ModelSource`: the one opener).
let modelPathHelp = """
    a run directory (its latest checkpoint), a checkpoint directory, a Hugging Face directory (config.json + \
    model.safetensors or a sharded index) or a LLaMA GGUF file (f32, f16, bf16, q8_0, q4_0 tensors; dequantized to f32)
    """

/// Opens any model source (`ModelSource.open`: the same kinds and sentences for every command).
func openModel(_ path: String) throws -> ModelSource { try ModelSource.open(path) }

/// The `warn` of the model loaders: a line on stderr.
func warning(_ message: String) { standardError("warning: \(message)") }
