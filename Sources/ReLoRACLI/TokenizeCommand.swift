import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRACommandLine

let tokenizeCommand = CommandSpec(
    name: "relora tokenize",
    summary: "encode text / JSONL files into a .npy token file",
    discussion: """
        Encodes text into a 1-D .npy token file (uint16 when the vocabulary fits, else uint32). A PATH is a
        UTF-8 text file, a .jsonl file with one {"text": ...} object per line, or a directory (its *.txt and
        *.jsonl files, recursively, in sorted order). Each document (a text file or a JSONL line) is followed by
        the tokenizer's end-of-text token if it has one (<|endoftext|>, or </s> of a SentencePiece tokenizer),
        and preceded by the BOS its reference adds, if any (<s> of Llama's tokenizer.json, or of a GGUF
        file with add_bos_token). Invalid UTF-8 is an error naming the file and byte.
        Prints the token count, bytes per token and the unigram entropy of the result (the loss a model that
        knows only token frequencies would get).
        """,
    options: [
        .value("tokenizer", "FILE|DIR", help: "a tokenizer.json (from relora tokenizer train, or a Hugging Face one), a SentencePiece tokenizer.model, a directory with either (or a run directory: its tokenizer), or a GGUF file (its tokenizer)",
               required: true),
        .repeated("in", "PATH", help: "a text file, a .jsonl file or a directory", required: true),
        .value("out", "TOKENS.npy", help: "the token file to write", required: true),
    ],
    examples: ["relora tokenize --tokenizer data/mine/tokenizer.json --in my_text.txt --out data/mine/train.npy"],
    helpWhenEmpty: true)

func runTokenize(_ args: [String]) throws {
    guard let a = try tokenizeCommand.parseOrPrintHelp(args) else { return }
    let inputs = a.values("in")
    let tokenizer = try TokenizerLoader.load(try a.required("tokenizer"))
    let out = try a.required("out")
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
            if let bos = tokenizer.prefixId { tokens.append(Int64(bos)) }
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
    try Files.createParentDirectory(of: out)
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
