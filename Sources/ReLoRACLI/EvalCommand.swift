import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRACommandLine

let evalCommand = CommandSpec(
    name: "relora eval",
    summary: "mean next-token loss and perplexity of a model on a token file",
    discussion: """
        Splits the 1-D token array into consecutive windows of exactly N tokens (the remainder is dropped)
        and reports the mean next-token cross-entropy over every predicted position of every window, its
        perplexity and the number of predicted tokens. Equals Hugging Face's
        LlamaForCausalLM(input_ids=window, labels=window).loss averaged over windows.
        """,
    options: [
        .value("model", "PATH", help: modelPathHelp, required: true),
        .value("data", "TOKENS.npy", help: "a .npy file: 1-D little-endian uint16, uint32, int32 or int64 token ids",
               required: true),
        .value("seq-len", "N", help: "window length in tokens (at most the model's max_position_embeddings)", required: true),
        .value("batch", "B", help: "windows per forward pass", default: "8"),
        .flag("json", help: "print {\"loss\": ..., \"perplexity\": ..., \"tokens\": ...} only"),
        deviceOption,
    ],
    examples: ["relora eval --model runs/shakespeare-demo/hf --data data/shakespeare/val.npy --seq-len 128"],
    helpWhenEmpty: true)

func runEval(_ args: [String]) throws {
    guard let a = try evalCommand.parseOrPrintHelp(args) else { return }
    let json = a.flag("json")
    let seqLen = try a.int("seq-len")
    let batch = try a.int("batch")
    let model = try openModel(try a.required("model")).loadModel(backend: try a.backend(), warn: warning)
    let tokens = try TokenArray(npyPath: try a.required("data"))
    let start = Date()
    let progress = json ? nil : ProgressReporter("eval", total: tokens.count / max(1, seqLen), unit: .count("windows"))
    let result = try Evaluator.evaluate(model: model, tokens: tokens, seqLen: seqLen, batch: batch) { done, _ in
        progress?.update(done)
    }
    progress?.finish()
    if json {
        let obj: [String: Any] = ["loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens]
        let data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    } else {
        print(String(format: "loss %.6f  perplexity %.4f  tokens %d  windows %d  (%.1f s)", result.loss,
                     result.perplexity, result.tokens, result.windows, Date().timeIntervalSince(start)))
    }
}
