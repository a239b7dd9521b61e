import Foundation
import ReLoRACore
import ReLoRATokenizer
import ReLoRACommandLine

let tokenizerTrainCommand = CommandSpec(
    name: "relora tokenizer train",
    summary: "train a tokenizer (tokenizer.json): byte-level BPE or Unigram",
    discussion: """
        Trains a tokenizer on UTF-8 text files and writes a Hugging Face tokenizer.json (loadable by
        tokenizers / transformers).
        --model bpe (default): byte-level BPE, GPT-2 pre-tokenization, "<|endoftext|>" as a special token;
        N counts 256 byte tokens, the merges and the special token, so N is at least 257.
        --model unigram: a SentencePiece-style Unigram model (EM with pruning, as SentencePiece trains it)
        with byte fallback and the Metaspace pre-tokenizer, like T5's and the ReLoRA paper's tokenizer;
        ids <unk> 0, <s> 1, </s> 2 (the end of text), the 256 byte pieces, then the learned pieces, so N is
        at least 260. --min-frequency applies to BPE only.
        The model config's vocab_size must be at least the tokenizer's.
        """,
    options: [
        .value("vocab-size", "N", help: "the vocabulary size (bpe: at least 257; unigram: at least 260)", required: true),
        .repeated("in", "FILE", help: "a UTF-8 text file, or a directory (its *.txt and *.jsonl files, recursively)",
                  required: true),
        .value("out", "tokenizer.json", help: "the tokenizer file to write", required: true),
        .value("model", "KIND", help: "bpe: byte-level BPE; unigram: SentencePiece-style Unigram", default: "bpe",
               choices: ["bpe", "unigram"]),
        .value("min-frequency", "F", help: "bpe: stop merging when the most frequent pair occurs fewer than F times", default: "2"),
    ],
    examples: ["relora tokenizer train --vocab-size 4096 --in my_text.txt --out data/mine/tokenizer.json",
               "relora tokenizer train --model unigram --vocab-size 8000 --in my_text.txt --out data/mine/tokenizer.json"],
    helpWhenEmpty: true)

/// `relora tokenizer`: a group of one subcommand, `train`.
let tokenizerCommand = CommandSpec(
    name: "relora tokenizer",
    summary: "train tokenizers (byte-level BPE, Unigram)",
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
    let size: Int
    if try a.required("model") == "unigram" {
        let (tokenizer, json) = try UnigramTrainer(vocabSize: vocab).train(files: files) { standardError("tokenizer: \($0)") }
        try Files.createParentDirectory(of: out)
        try writeFileAtomically(json, to: out)
        size = tokenizer.vocabSize
    } else {
        let trainer = BPETrainer(vocabSize: vocab, minFrequency: try a.int("min-frequency"))
        let tokenizer = try trainer.train(files: files) { standardError("tokenizer: \($0)") }
        try Files.createParentDirectory(of: out)
        try tokenizer.save(to: out)
        size = tokenizer.vocabSize
    }
    printLine(String(format: "wrote %@: vocab %d (%.1f s)", out, size, Date().timeIntervalSince(start)))
}
