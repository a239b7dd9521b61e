import Foundation
import ReLoRACore
import ReLoRAFormats

/// What the commands need from a tokenizer, whichever kind it is: byte-level BPE (`BPETokenizer`) or
/// SentencePiece style (`SentencePieceTokenizer`: BPE with byte fallback, Unigram). Ids are dense
/// `0..<vocabSize`; `encode` adds no special tokens (no BOS), but added tokens that occur literally match.
public protocol TextTokenizer: AnyObject, Sendable {
    /// Number of ids, added tokens included.
    var vocabSize: Int { get }
    /// The token that ends a document (`tokenize` appends it after each one; `sample` stops at it).
    var endOfTextId: Int32? { get }
    /// The token the reference puts before a text, nil for none: the leading special token of a
    /// `tokenizer.json`'s `TemplateProcessing` post-processor (Llama's `<s>`, LLaMA 3's
    /// `<|begin_of_text|>`), GGUF's `add_bos_token` (default true for `llama`, as llama.cpp); never for a
    /// `tokenizer.model` (sentencepiece adds none). `tokenize` puts it before each document, `sample`
    /// before the prompt.
    var prefixId: Int32? { get }
    func encode(_ text: String) -> [Int32]
    /// Token ids of UTF-8 bytes; invalid UTF-8 throws `ReLoRAError.invalidData` with the byte offset.
    func encode(utf8 bytes: UnsafeBufferPointer<UInt8>) throws -> [Int32]
    /// The text of `ids`, as the reference library decodes them (special tokens kept).
    func decode(_ ids: [Int32]) -> String
    /// The bytes one token contributes to running text, for streaming output (`sample`): a token in the
    /// middle of a text (a SentencePiece "▁" is a space there; control tokens are empty).
    func bytes(of id: Int32) -> [UInt8]?
    /// The `tokenizer.ggml.*` entries of a GGUF export for a model of `vocabSize` ids (at least the
    /// tokenizer's; the rest padded), written so that llama.cpp tokenizes as this tokenizer does: byte-level
    /// BPE as `gpt2`, SentencePiece BPE as `llama`. A tokenizer llama.cpp would tokenize otherwise throws one
    /// sentence saying why.
    func ggufMetadata(vocabSize: Int) throws -> [(String, GGUFValue)]
}

extension BPETokenizer: TextTokenizer {
    public var prefixId: Int32? { leadingSpecialToken(postProcessor).flatMap { id(of: $0) } }
}

/// The content of the special token a `tokenizer.json` post-processor puts first in a single sequence:
/// `TemplateProcessing` (alone or in a `Sequence`) whose `single` starts with a `SpecialToken`.
func leadingSpecialToken(_ post: TJSON) -> String? {
    let steps: [TJSON]
    if post["type"]?.stringValue == "Sequence", case .array(let items)? = post["processors"] { steps = items } else { steps = [post] }
    for step in steps where step["type"]?.stringValue == "TemplateProcessing" {
        guard case .array(let single)? = step["single"], let first = single.first else { return nil }
        guard let name = first["SpecialToken"]?["id"]?.stringValue else { return nil }
        // The token's content: special_tokens[name].tokens[0] when listed, else the name itself.
        if case .array(let tokens)? = step["special_tokens"]?[name]?["tokens"], let t = tokens.first?.stringValue { return t }
        return name
    }
    return nil
}

/// Opens a tokenizer from what the ecosystem ships, choosing the reader from the contents.
public enum TokenizerLoader {
    /// The tokenizer files a directory may hold, in the order they are preferred: a Hugging Face
    /// `tokenizer.json` (as `transformers` prefers it), a SentencePiece `tokenizer.model`, and the
    /// vocabulary-only `tokenizer.gguf` a run keeps of a GGUF model's tokenizer (`writeVocabularyOnly`).
    public static let fileNames = ["tokenizer.json", "tokenizer.model", "tokenizer.gguf"]

    /// The first of `fileNames` in `directory`, as a path; nil if it holds none.
    public static func file(in directory: String) -> String? {
        fileNames.lazy.map { directory + "/" + $0 }.first { FileManager.default.fileExists(atPath: $0) }
    }

    /// `path` is a `tokenizer.json`, a SentencePiece `tokenizer.model`, a directory holding one of
    /// `fileNames` (the first present), or a GGUF file (its metadata's tokenizer, so data for continuing a GGUF
    /// model is tokenized as llama.cpp would). A `tokenizer.json` whose model is BPE with a
    /// `ByteLevel` pre-tokenizer or decoder is byte-level BPE; every other one is read as SentencePiece style.
    public static func load(_ path: String) throws -> any TextTokenizer {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw ReLoRAError.invalidFile(path: path, reason: "no such file or directory (expected a tokenizer.json, a tokenizer.model or a directory with one)")
        }
        if isDirectory.boolValue {
            if let file = file(in: path) { return try load(file) }
            throw ReLoRAError.invalidFile(path: path, reason: "the directory has neither a tokenizer.json nor a SentencePiece tokenizer.model (nor a run's tokenizer.gguf)")
        }
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path), options: .mappedIfSafe)
        } catch {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot read the tokenizer file (\(error.localizedDescription))")
        }
        if data.starts(with: Array("GGUF".utf8)) { return try load(gguf: try GGUFFile(path: path)) }
        // A tokenizer.json starts with "{" (after whitespace); a ModelProto starts with field 1 (0x0A).
        let first = data.first { ![0x20, 0x09, 0x0A, 0x0D].contains($0) }
        if path.hasSuffix(".model") || (first != UInt8(ascii: "{") && data.first == 0x0A) {
            return try SentencePieceTokenizer(modelProto: Array(data), path: path)
        }
        let root: TJSON
        do {
            root = try TJSONParser.parse(data)
        } catch let e as TJSONError {
            throw ReLoRAError.invalidFile(path: path, reason: "not valid JSON: \(e.message)")
        }
        if isByteLevelBPE(root) { return try BPETokenizer(jsonData: data, path: path) }
        return try SentencePieceTokenizer(tokenizerJSON: root, path: path)
    }

    /// The tokenizer in a GGUF file's `tokenizer.ggml.*` metadata: `gpt2` (byte-level BPE) or `llama`
    /// (SentencePiece: pieces, scores and token types, merged by score as llama.cpp does).
    public static func load(gguf file: GGUFFile) throws -> any TextTokenizer {
        switch file.metadata["tokenizer.ggml.model"]?.string {
        case "llama"?: return try SentencePieceTokenizer(gguf: file)
        case "gpt2"?: return try BPETokenizer(gguf: file)
        case let other:
            throw ReLoRAError.invalidFile(path: file.path, reason: "the tokenizer is \(other.map { "'\($0)'" } ?? "missing") (tokenizer.ggml.model); relora reads 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) tokenizers")
        }
    }

    /// Writes the tokenizer of the GGUF model `file` alone to `path`: a GGUF with no tensors holding its
    /// `general.architecture` and every `tokenizer.*` entry as they are (llama.cpp's own vocabulary files,
    /// `models/ggml-vocab-*.gguf`, have this form, and llama.cpp loads them with `vocab_only`), so a run keeps
    /// a GGUF model's tokenizer in kilobytes, and every reader of it (`load`, a GGUF export) sees exactly the
    /// source's tokenizer. The tokenizer must load (an unsupported one is refused here, with its sentence).
    public static func writeVocabularyOnly(from file: GGUFFile, to path: String) throws {
        guard file.metadata["tokenizer.ggml.model"] != nil else {
            throw ReLoRAError.invalidFile(path: file.path, reason: "has no tokenizer in its metadata (no tokenizer.ggml.model)")
        }
        _ = try load(gguf: file)
        let keys = file.metadataKeys.filter { $0 == "general.architecture" || $0.hasPrefix("tokenizer.") }
        try GGUFWriter.write(metadata: keys.map { ($0, file.metadata[$0]!) }, tensors: [], to: path)
    }

    static func isByteLevelBPE(_ root: TJSON) -> Bool {
        guard let model = root["model"] else { return false }
        let type = model["type"]?.stringValue
        guard type == "BPE" || (type == nil && model["merges"] != nil) else { return false }
        if model["byte_fallback"]?.boolValue == true { return false }
        func mentionsByteLevel(_ v: TJSON?) -> Bool {
            guard let v else { return false }
            if v["type"]?.stringValue == "ByteLevel" { return true }
            for key in ["pretokenizers", "decoders"] {
                if case .array(let items)? = v[key], items.contains(where: { mentionsByteLevel($0) }) { return true }
            }
            return false
        }
        return mentionsByteLevel(root["pre_tokenizer"]) || mentionsByteLevel(root["decoder"])
    }
}
