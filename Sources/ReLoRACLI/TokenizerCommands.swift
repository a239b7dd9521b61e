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

let tokenizerUsage = """
    Usage: relora tokenizer train --vocab-size N --in FILE [--in FILE ...] --out tokenizer.json [--min-frequency F]

    Trains a byte-level BPE tokenizer (GPT-2 pre-tokenization, "<|endoftext|>" as a special token) on
    UTF-8 text files and writes a Hugging Face tokenizer.json (loadable by tokenizers / transformers).
    N counts every token: 256 byte tokens, the merges, and the special token, so N is at least 257
    (the model config's vocab_size must be at least the tokenizer's).
    """

func runTokenizer(_ args: [String]) throws {
    guard let sub = args.first, sub != "--help", sub != "-h" else { print(tokenizerUsage); return }
    guard sub == "train" else { throw ReLoRAError.usage("unknown subcommand 'tokenizer \(sub)'; see `relora tokenizer --help`") }
    let rest = Array(args.dropFirst())
    if rest.contains("--help") { print(tokenizerUsage); return }
    let inputs = try repeatedOption("in", in: rest)
    let a = try Arguments(rest.filter { $0 != "--in" && !inputs.contains($0) }, flagNames: [])
    try a.checkKnown(["vocab-size", "out", "min-frequency"])
    let vocab = try a.int("vocab-size")
    let out = try a.required("out")
    guard !inputs.isEmpty else { throw ReLoRAError.usage("give at least one --in FILE") }
    let files = try expandInputs(inputs)
    let start = Date()
    let trainer = BPETrainer(vocabSize: vocab, minFrequency: try a.int("min-frequency", default: 2))
    let tokenizer = try trainer.train(files: files) { standardError("tokenizer: \($0)") }
    try tokenizer.save(to: out)
    printLine(String(format: "wrote %@: vocab %d (%.1f s)", out, tokenizer.vocabSize, Date().timeIntervalSince(start)))
}

let tokenizeUsage = """
    Usage: relora tokenize --tokenizer tokenizer.json --in PATH [--in PATH ...] --out TOKENS.npy

    Encodes text into a 1-D .npy token file (uint16 when the vocabulary fits, else uint32). A PATH is a
    UTF-8 text file, a .jsonl file with one {"text": ...} object per line, or a directory (its *.txt and
    *.jsonl files, recursively, in sorted order). Each document (a text file or a JSONL line) is followed by
    the tokenizer's <|endoftext|> token if it has one. Invalid UTF-8 is an error naming the file and byte.
    Prints the token count, bytes per token and the unigram entropy of the result (the loss a model that
    knows only token frequencies would get).
    """

func runTokenize(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(tokenizeUsage); return }
    let inputs = try repeatedOption("in", in: args)
    let a = try Arguments(args.filter { $0 != "--in" && !inputs.contains($0) }, flagNames: [])
    try a.checkKnown(["tokenizer", "out"])
    let tokenizer = try BPETokenizer(contentsOf: try a.required("tokenizer"))
    let out = try a.required("out")
    guard !inputs.isEmpty else { throw ReLoRAError.usage("give at least one --in PATH") }
    let files = try expandInputs(inputs)
    var tokens: [Int64] = []
    var bytesRead = 0
    // Progress in input bytes; a JSONL file advances per document (by the document's bytes), a text file
    // when it is done.
    let totalBytes = files.reduce(0) { $0 + ((try? FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0) }
    let progress = ProgressReporter("tokenize", total: totalBytes, unit: .bytes)
    for (i, file) in files.enumerated() {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: file), options: .mappedIfSafe) } catch {
            throw ReLoRAError.invalidFile(path: file, reason: "cannot read the file")
        }
        let documents = file.hasSuffix(".jsonl") ? try jsonlTexts(data, path: file) : [data]
        var documentBytes = 0
        for doc in documents {
            let ids: [Int32]
            do {
                ids = try doc.withUnsafeBytes { try tokenizer.encode(utf8: $0.bindMemory(to: UInt8.self)) }
            } catch ReLoRAError.invalidData(let m) {
                throw ReLoRAError.invalidFile(path: file, reason: m)
            }
            // No reserveCapacity(count + ids.count) here: reserving the exact size per document defeats the
            // array's geometric growth and made tokenizing a 100 MB corpus quadratic (each document copied
            // every token before it).
            for id in ids { tokens.append(Int64(id)) }
            if let eot = tokenizer.endOfTextId { tokens.append(Int64(eot)) }
            documentBytes += doc.count
            if documents.count > 1 { progress.update(bytesRead + min(documentBytes, data.count), detail: "file \(i + 1)/\(files.count), \(formatCount(tokens.count)) tokens") }
        }
        bytesRead += data.count
        progress.update(bytesRead, detail: "file \(i + 1)/\(files.count), \(formatCount(tokens.count)) tokens")
    }
    progress.finish()
    let dtype: TokenDType = tokenizer.vocabSize <= 65536 ? .uint16 : .uint32
    try NpyWriter.write(tokens: tokens, dtype: dtype, to: out)
    printLine(String(format: "wrote %@: %d tokens (%@), %.2f bytes/token, unigram entropy %.3f nats",
                     out, tokens.count, dtype.rawValue, Double(bytesRead) / Double(max(1, tokens.count)),
                     unigramEntropy(tokens)))
}

/// Entropy in nats of the token frequency distribution.
func unigramEntropy(_ tokens: [Int64]) -> Double {
    var counts: [Int64: Int] = [:]
    for t in tokens { counts[t, default: 0] += 1 }
    let n = Double(tokens.count)
    return counts.values.reduce(0.0) { $0 - Double($1) / n * log(Double($1) / n) }
}

/// The `"text"` of every line of a JSONL file (blank lines skipped).
func jsonlTexts(_ data: Data, path: String) throws -> [Data] {
    var out: [Data] = []
    var lineNumber = 0
    for line in data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
        lineNumber += 1
        if line.allSatisfy({ $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\r") || $0 == UInt8(ascii: "\t") }) { continue }
        guard let value = try? JSONDecoder().decode(JSONValue.self, from: Data(line)),
              case .object(let obj) = value, case .string(let text)? = obj["text"] else {
            throw ReLoRAError.invalidFile(path: path, reason: "line \(lineNumber) is not a JSON object with a string \"text\" field")
        }
        out.append(Data(text.utf8))
    }
    return out
}

/// Values of every `--name VALUE` occurrence.
func repeatedOption(_ name: String, in args: [String]) throws -> [String] {
    var values: [String] = []
    var i = 0
    while i < args.count {
        if args[i] == "--" + name {
            guard i + 1 < args.count else { throw ReLoRAError.usage("--\(name) needs a value") }
            values.append(args[i + 1]); i += 2
        } else { i += 1 }
    }
    return values
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

let sampleUsage = """
    Usage: relora sample --model DIR|FILE.gguf --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K] [--seed S] [--device cpu|cuda]

    Generates text. DIR is a Hugging Face directory with tokenizer.json (e.g. from `relora export`), a
    checkpoint directory, or a run directory (its latest checkpoint and its tokenizer.json); FILE.gguf a
    LLaMA GGUF file with its tokenizer in the metadata (e.g. from `relora export --format gguf`).
    Defaults: --max-tokens 200 --temperature 0.8 --top-k 40 --seed 0 (temperature 0 = greedy).
    """

func runSample(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(sampleUsage); return }
    let a = try Arguments(args, flagNames: [])
    try a.checkKnown(["model", "prompt", "max-tokens", "temperature", "top-k", "seed", "device"])
    var options = Generator.Options()
    options.maxTokens = try a.int("max-tokens", default: 200)
    options.topK = try a.int("top-k", default: 40)
    options.seed = UInt64(max(0, try a.int("seed", default: 0)))
    if let t = a.string("temperature") {
        guard let v = Double(t), v >= 0 else { throw ReLoRAError.usage("--temperature must be a number >= 0, got '\(t)'") }
        options.temperature = v
    }
    let prompt = try a.required("prompt")
    let dir = try a.required("model")
    let backend = try a.backend()
    let model: LlamaModel
    let tokenizer: BPETokenizer
    if LlamaGGUF.isGGUF(dir) {
        let file = try GGUFFile(path: dir)
        model = try LlamaGGUF.loadModel(file, backend: backend, warn: { standardError("warning: \($0)") })
        tokenizer = try BPETokenizer(gguf: file)
    } else {
        let tokenizerPath: String
        if FileManager.default.fileExists(atPath: dir + "/config.json") && FileManager.default.fileExists(atPath: dir + "/tokenizer.json")
            && !FileManager.default.fileExists(atPath: dir + "/state.json") {
            model = try HFCheckpoint.load(directory: dir, backend: backend)
            tokenizerPath = dir + "/tokenizer.json"
        } else {
            let (checkpoint, runDir) = try TrainingCheckpoint.resolve(dir)
            model = try TrainingCheckpoint.loadModel(checkpoint, backend: backend)
            tokenizerPath = runDir + "/tokenizer.json"
        }
        guard FileManager.default.fileExists(atPath: tokenizerPath) else {
            throw ReLoRAError.invalidFile(path: dir, reason: "has no tokenizer.json to encode the prompt with")
        }
        tokenizer = try BPETokenizer(contentsOf: tokenizerPath)
    }
    options.stopToken = tokenizer.endOfTextId
    FileHandle.standardOutput.write(Data(prompt.utf8))
    // Stream bytes as they come, holding back an incomplete UTF-8 sequence at the end.
    var pending: [UInt8] = []
    _ = try Generator.generate(model: model, prompt: tokenizer.encode(prompt), options: options) { id in
        guard id != tokenizer.endOfTextId else { return }
        pending += tokenizer.bytes(of: id) ?? []
        let cut = completeUTF8Prefix(pending)
        if cut > 0 {
            FileHandle.standardOutput.write(Data(pending[..<cut]))
            pending.removeFirst(cut)
        }
    }
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
