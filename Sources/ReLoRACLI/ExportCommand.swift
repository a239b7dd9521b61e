import Foundation
import ReLoRACore
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRACommandLine

let exportCommand = CommandSpec(
    name: "relora export",
    summary: "export a model as a Hugging Face model directory or a GGUF file",
    synopsis: [
        "MODEL --format hf --out DIR [--dtype float32|bfloat16] [--quant nf4] [--device cpu|cuda]",
        "MODEL --format gguf --out FILE.gguf [--quant f32|f16|bf16|q8_0|q4_0] [--device cpu|cuda]",
    ],
    discussion: """
        Exports a model: MODEL is any source relora opens, a run directory (its latest checkpoint), a
        checkpoint directory, a Hugging Face directory or a LLaMA GGUF file (so it also converts between the
        two). A checkpoint's model is the trained one (a LoRA run's current cycle merged in; quantized frozen
        weights dequantized); the tokenizer goes along when the source has one.

        --format hf: a Hugging Face directory (config.json, model.safetensors with LLaMA tensor names, the run's
        tokenizer.json or tokenizer.model; a GGUF tokenizer written as one of them) that transformers'
        LlamaForCausalLM / AutoTokenizer.from_pretrained load. With --quant nf4
        the block linears are written in bitsandbytes' 4-bit layout (nf4, blocksize 64, no double quantization)
        with a quantization_config, so from_pretrained loads a bitsandbytes 4-bit model.
        --format gguf: one GGUF v3 file for llama.cpp (and transformers' GGUF loader): LLaMA metadata, llama.cpp
        tensor names with q/k rows permuted to llama.cpp's rotary convention, and the tokenizer (byte-level BPE
        as llama.cpp's gpt2, SentencePiece BPE from a tokenizer.model or GGUF as its llama, a SentencePiece-style
        tokenizer.json from the tokenizer.model beside it if the two give the same ids; others are refused
        with the reason). f16/bf16 store
        2-D tensors in 16 bits; q8_0 quantizes every 2-D tensor; q4_0 the block linears (embedding and head in
        q8_0). Norms stay f32; rows that are not whole 32-weight blocks stay f16. A run whose frozen weights are
        in the same format has its codes copied, not requantized, where the current cycle's update is zero.
        """,
    positionals: .one("MODEL"),
    options: [
        .value("format", help: "hf: a Hugging Face directory; gguf: one llama.cpp file", default: "hf", choices: ["hf", "gguf"]),
        .value("out", "PATH", help: "the directory (hf) or file (gguf) to write", required: true),
        .value("dtype", help: "the weights' dtype in model.safetensors (--format hf only)", default: "float32",
               choices: ["float32", "bfloat16"]),
        .value("quant", help: "gguf: the 2-D tensors' type; hf: nf4 writes the block linears in bitsandbytes 4-bit",
               default: "f32", choices: GGUFWeightType.allCases.map(\.rawValue) + ["nf4"]),
        deviceOption,
    ],
    examples: [
        "relora export runs/shakespeare-demo --format hf --out runs/shakespeare-demo/hf",
        "relora export runs/shakespeare-demo --format gguf --quant q8_0 --out shakespeare-q8_0.gguf",
    ],
    helpWhenEmpty: true)

func runExport(_ args: [String]) throws {
    guard let a = try exportCommand.parseOrPrintHelp(args) else { return }
    let out = try a.required("out")
    let source = try openModel(a.positional[0])
    switch a.string("format") {
    case "gguf":
        guard !a.has("dtype") else {
            throw exportCommand.usageError("--dtype is for --format hf; use --quant f32|f16|bf16|q8_0|q4_0 with gguf")
        }
        guard a.string("quant") != "nf4" else {
            throw exportCommand.usageError("--quant nf4 is for --format hf (bitsandbytes 4-bit); gguf takes f32|f16|bf16|q8_0|q4_0")
        }
        try exportGGUF(source, out: out, a)
    default:
        guard !a.has("quant") || a.string("quant") == "nf4" else {
            throw exportCommand.usageError("--format hf takes --quant nf4 only (bitsandbytes 4-bit); the other types are for --format gguf")
        }
        try exportHF(source, out: out, a)
    }
}

func exportHF(_ source: ModelSource, out: String, _ a: ParsedArguments) throws {
    let dtype = try a.required("dtype")
    let model = try source.loadModel(backend: try a.backend(), warn: warning)
    let tokenizer = try source.tokenizerJSON()
    // A SentencePiece tokenizer.model goes along too (transformers reads it when there is no tokenizer.json).
    let sentencePiece = try source.tokenizerModel()
    if tokenizer == nil && sentencePiece == nil {
        warning("\(source.path) has no tokenizer.json or tokenizer.model; the export will not include one")
    }
    let progress = ProgressReporter("export", total: model.weights.named().count, unit: .count("tensors"))
    let nf4 = a.has("quant")  // only nf4 reaches here
    try HFCheckpoint.save(model: model, to: out, bfloat16: dtype == "bfloat16", bitsandbytesNF4: nf4,
                          tokenizerJSON: tokenizer) { done, _ in
        progress.update(done)
    }
    progress.finish()
    if let sentencePiece { try writeFileAtomically(sentencePiece, to: out + "/tokenizer.model") }
    print("exported \(source.checkpoint ?? source.path) -> \(out) (\(dtype)\(nf4 ? ", block linears in bitsandbytes nf4" : ""))")
}

func exportGGUF(_ source: ModelSource, out: String, _ a: ParsedArguments) throws {
    let weights = GGUFWeightType(rawValue: try a.required("quant"))!  // one of the declared choices
    // A SentencePiece-style tokenizer.json is written from the tokenizer.model beside it, if it tokenizes alike.
    let tokenizer = try source.ggufTokenizer()
    // A tokenizer llama.cpp would read differently is refused here, before the model is loaded.
    _ = try tokenizer?.ggufMetadata(vocabSize: source.config.vocabSize)
    if tokenizer == nil {
        warning("\(source.path) has no tokenizer; the GGUF will have no tokenizer, which llama.cpp needs to load it")
    }
    // The exporter reports (done, total) per tensor, total = the loaded model's parameter list
    // (`LlamaParameters.named()`); the reporter starts with the first report.
    var progress: ProgressReporter?
    let report: (Int, Int) -> Void = { done, total in
        if progress == nil { progress = ProgressReporter("export", total: total, unit: .count("tensors")) }
        progress?.update(done)
    }
    let name = URL(fileURLWithPath: source.runDirectory ?? source.path).deletingPathExtension().lastPathComponent
    let backend = try a.backend()
    let summary: GGUFExportSummary
    if let checkpoint = source.checkpoint {
        // A checkpoint's frozen codes in the requested format are copied where its cycle is empty.
        summary = try LlamaGGUF.export(checkpoint: checkpoint, tokenizer: tokenizer, weights: weights, to: out,
                                       backend: backend, name: name, progress: report)
    } else {
        summary = try LlamaGGUF.write(model: try source.loadModel(backend: backend, warn: warning), tokenizer: tokenizer,
                                      weights: weights, to: out, name: name, progress: report)
    }
    progress?.finish()
    print("exported \(source.checkpoint ?? source.path) -> \(out) (\(summary.description))")
}
