import CReLoRA
import Foundation
import ReLoRACore
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRACommandLine

let infoCommand = CommandSpec(
    name: "relora info",
    summary: "a model config's sizes and parameter count, and the BLAS kernels in use",
    discussion: """
        Prints the architecture and parameter count of a model (a config.json file, or any model source:
        a run directory, a checkpoint directory, a Hugging Face directory or a LLaMA GGUF file, of which only
        the config and headers are read) and which kind of source it is, then a line naming the
        OpenBLAS kernels (its "core") this process runs and the best ones the CPU supports. Without a config
        only that line is printed. relora restarts itself with OPENBLAS_CORETYPE set when OpenBLAS picked
        kernels weaker than the CPU supports, unless OPENBLAS_CORETYPE is already set.
        """,
    positionals: .optional("CONFIG.json|MODEL"),
    options: [
        .flag("blas-core", help: """
            print only the core name relora runs OpenBLAS with, for other programs, e.g.
            OPENBLAS_CORETYPE=$(.build/debug/relora info --blas-core) swift test --skip-build
            """),
    ],
    examples: ["relora info Configs/models/llama_20m.json"])

/// "blas: OpenBLAS 0.3.21 core SkylakeX (cpu supports SkylakeX)".
func blasLine() -> String {
    var buf = [CChar](repeating: 0, count: 256)
    return "blas: " + buf.withUnsafeMutableBufferPointer { String(cString: relora_blas_describe($0.baseAddress, $0.count)) }
}

func runInfo(_ args: [String]) throws {
    guard let a = try infoCommand.parseOrPrintHelp(args) else { return }
    if a.flag("blas-core") {
        guard let core = relora_blas_core_name() else { throw ReLoRAError.usage("this relora runs without OpenBLAS") }
        print(String(cString: core))
        return
    }
    guard let path = a.positional.first else { print(blasLine()); return }
    let c: LlamaConfig
    if path.hasSuffix(".json") && !LlamaGGUF.isGGUF(path) {
        c = try LlamaConfig(contentsOf: path)
    } else {
        let source = try openModel(path)
        c = source.config
        print(source.description)
    }
    print("""
        hidden \(c.hiddenSize)  intermediate \(c.intermediateSize)  layers \(c.numHiddenLayers)  \
        heads \(c.numAttentionHeads) (kv \(c.numKeyValueHeads), head_dim \(c.headDim))  vocab \(c.vocabSize)
        parameters \(c.parameterCount) (\(String(format: "%.1f", Double(c.parameterCount) / 1e6))M)\
        \(c.tieWordEmbeddings ? ", tied embeddings" : "")
        """)
    print(blasLine())
}
