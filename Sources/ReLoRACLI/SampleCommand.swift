import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRACommandLine

let sampleCommand = CommandSpec(
    name: "relora sample",
    summary: "generate text from a model",
    discussion: """
        Generates text after the prompt and prints both, decoding with a KV cache (each new token is one
        row through the model; the window restarts from its last half when it outgrows
        max_position_embeddings). The model is any source relora opens and must carry a tokenizer: a run
        directory or checkpoint (its run's tokenizer), a Hugging Face directory with tokenizer.json or a
        SentencePiece tokenizer.model (e.g. from `relora export`), or a GGUF file with its tokenizer in the
        metadata ('gpt2' or 'llama'), e.g. from `relora export --format gguf` or llama.cpp's converter.
        Stops at --max-tokens or at the tokenizer's end-of-text token (<|endoftext|>, </s>).
        """,
    options: [
        .value("model", "PATH", help: modelPathHelp + "; it must carry a tokenizer", required: true),
        .value("prompt", "TEXT", help: "the text to continue", required: true),
        .value("max-tokens", "N", help: "at most this many new tokens", default: "200"),
        .value("temperature", "T", help: "softmax temperature, >= 0; 0 = greedy", default: "0.8"),
        .value("top-k", "K", help: "sample among the K most likely tokens; 0 = all", default: "40"),
        .value("seed", "S", help: "the sampler's random seed (the same seed gives the same text)", default: "0"),
        deviceOption,
    ],
    examples: ["relora sample --model runs/shakespeare-demo --prompt \"ROMEO.\" --max-tokens 120 --seed 1"],
    helpWhenEmpty: true)

func runSample(_ args: [String]) throws {
    guard let a = try sampleCommand.parseOrPrintHelp(args) else { return }
    var options = Generator.Options()
    options.maxTokens = try a.int("max-tokens")
    options.topK = try a.int("top-k")
    options.seed = UInt64(max(0, try a.int("seed")))
    options.temperature = try a.double("temperature", atLeast: 0)
    let prompt = try a.required("prompt")
    let source = try openModel(try a.required("model"))
    let tokenizer = try source.requireTokenizer(for: "encode the prompt with")
    let model = try source.loadModel(backend: try a.backend(), warn: warning)
    options.stopToken = tokenizer.endOfTextId
    FileHandle.standardOutput.write(Data(prompt.utf8))
    // Stream bytes as they come, holding back an incomplete UTF-8 sequence at the end.
    var pending: [UInt8] = []
    // The prompt as the model's reference tokenizer encodes a text: with its leading <s>, if it puts one.
    let promptIds = (tokenizer.prefixId.map { [$0] } ?? []) + tokenizer.encode(prompt)
    _ = try Generator.generate(model: model, prompt: promptIds, options: options, onToken: { id in
        guard id != tokenizer.endOfTextId else { return }
        pending += tokenizer.bytes(of: id) ?? []
        let cut = completeUTF8Prefix(pending)
        if cut > 0 {
            FileHandle.standardOutput.write(Data(pending[..<cut]))
            pending.removeFirst(cut)
        }
    })
    FileHandle.standardOutput.write(Data(String(decoding: pending, as: UTF8.self).utf8) + Data("\n".utf8))
}

/// Length of the longest prefix that does not end inside a multi-byte UTF-8 sequence.
func completeUTF8Prefix(_ bytes: [UInt8]) -> Int {
    var i = bytes.count
    var back = 0
    while i > 0 && back < 4 {
        let b = bytes[i - 1]
        if b & 0xC0 == 0x80 { i -= 1; back += 1; continue }  // continuation byte
        let need = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1
        return need == back + 1 ? bytes.count : i - 1
    }
    return bytes.count
}
