import Foundation
import ReLoRACore
import ReLoRATokenizer
import ReLoRACommandLine

let tokenizerTrainCommand = CommandSpec(
    name: "relora tokenizer train",
    summary: "train a byte-level BPE tokenizer (tokenizer.json)",
    discussion: """
        Trains a byte-level BPE tokenizer (GPT-2 pre-tokenization, "<|endoftext|>" as a special token) on
        UTF-8 text files and writes a Hugging Face tokenizer.json (loadable by tokenizers / transformers).
        N counts every token: 256 byte tokens, the merges, and the special token, so N is at least 257
        (the model config's vocab_size must be at least the tokenizer's).
        """,
    options: [
        .value("vocab-size", "N", help: "the vocabulary size, at least 257", required: true),
        .repeated("in", "FILE", help: "a UTF-8 text file, or a directory (its *.txt and *.jsonl files, recursively)",
                  required: true),
        .value("out", "tokenizer.json", help: "the tokenizer file to write", required: true),
        .value("min-frequency", "F", help: "stop merging when the most frequent pair occurs fewer than F times", default: "2"),
    ],
    examples: ["relora tokenizer train --vocab-size 4096 --in my_text.txt --out data/mine/tokenizer.json"],
    helpWhenEmpty: true)

/// `relora tokenizer`: a group of one subcommand, `train`.
let tokenizerCommand = CommandSpec(
    name: "relora tokenizer",
    summary: "byte-level BPE tokenizers",
    synopsis: ["train [options]"],
    subcommands: [tokenizerTrainCommand])

func runTokenizer(_ args: [String]) throws {
    guard let sub = args.first, sub != "--help", sub != "-h" else { print(tokenizerCommand.usage); return }
    guard sub == "train" else { throw tokenizerCommand.usageError("unknown subcommand '\(sub)'") }
    try runTokenizerTrain(Array(args.dropFirst()))
}

func runTokenizerTrain(_ args: [String]) throws {
    guard let a = try tokenizerTrainCommand.parseOrPrintHelp(args) else { return }
    let inputs = a.values("in")
    let vocab = try a.int("vocab-size")
    let out = try a.required("out")
    let files = try expandInputs(inputs)
    let start = Date()
    let trainer = BPETrainer(vocabSize: vocab, minFrequency: try a.int("min-frequency"))
    let tokenizer = try trainer.train(files: files) { standardError("tokenizer: \($0)") }
    try Files.createParentDirectory(of: out)
    try tokenizer.save(to: out)
    printLine(String(format: "wrote %@: vocab %d (%.1f s)", out, tokenizer.vocabSize, Date().timeIntervalSince(start)))
}
