import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel

/// The kinds of model source relora opens: what `eval`, `sample`, `export`, `info` and a recipe's
/// `warm_start` accept, all through `ModelSource.open`.
///
/// Adding a format (a bitsandbytes 4-bit Hugging Face directory, ...): a case here, its recognition in
/// `detect` (from file names and magics only, nothing parsed), and its branch in each switch of
/// `ModelSource` (`open`: the config; `tensors`: its tensors under Hugging Face names, one at a time;
/// `loadWeights`: into a model of any storage, where a loader may take quantized blocks as they are;
/// `tokenizer`). Every command then accepts it with the same sentences.
public enum ModelSourceKind: String, Sendable, CaseIterable {
    /// A training run's directory (`checkpoints/`): its latest checkpoint and its `tokenizer.json`.
    case runDirectory = "run directory"
    /// One training checkpoint (`state.json`); its tokenizer is its run's.
    case checkpoint = "checkpoint directory"
    /// `config.json` with `model.safetensors` or a sharded `model.safetensors.index.json`, dense or in
    /// bitsandbytes' 4-bit layout (`BitsAndBytes4bit`, read by `HFCheckpoint.loadWeights`).
    case huggingFace = "Hugging Face directory"
    /// A LLaMA GGUF file (llama.cpp's format; the tokenizer in its metadata).
    case gguf = "GGUF file"

    /// The one description of what is accepted, in every refusal.
    public static let accepted = "a run directory, a checkpoint directory, a Hugging Face directory (config.json "
        + "with model.safetensors or model.safetensors.index.json) or a LLaMA GGUF file"

    /// Which kind `path` is, from the names of its files and a file's magic. A path that is none of them
    /// is one sentence naming what is accepted.
    public static func detect(_ path: String) throws -> ModelSourceKind {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        guard fm.fileExists(atPath: path, isDirectory: &isDir) else {
            throw ReLoRAError.invalidFile(path: path, reason: "no such file or directory; a model is \(accepted)")
        }
        if !isDir.boolValue {
            if LlamaGGUF.isGGUF(path) { return .gguf }
            throw ReLoRAError.invalidFile(path: path, reason: "is a file but not a GGUF file (no GGUF magic); a model is \(accepted)")
        }
        if fm.fileExists(atPath: path + "/state.json") { return .checkpoint }
        if fm.fileExists(atPath: TrainingCheckpoint.directory(runDir: path)) { return .runDirectory }
        if HFCheckpoint.isModelDirectory(path) { return .huggingFace }
        throw ReLoRAError.invalidFile(path: path, reason: "is a directory but not a model; a model is \(accepted)")
    }
}

/// An opened model source: its architecture, its tensors streamed one at a time, and its tokenizer if it
/// has one. Opening reads only headers and metadata (config.json, a checkpoint's state, safetensors headers,
/// the GGUF header); tensors are read when a model is loaded, one at a time, so a load holds the model plus
/// one tensor (`ModelSourceTests` measures it).
public final class ModelSource {
    public let path: String
    public let kind: ModelSourceKind
    public let config: LlamaConfig
    /// The checkpoint a run or checkpoint directory resolves to (a run's latest), else nil.
    public let checkpoint: String?
    /// The run directory of a checkpoint (its `tokenizer.json`, its recipe), else nil.
    public let runDirectory: String?
    private let gguf: GGUFFile?

    private init(path: String, kind: ModelSourceKind, config: LlamaConfig, checkpoint: String? = nil,
                 runDirectory: String? = nil, gguf: GGUFFile? = nil) {
        self.path = path; self.kind = kind; self.config = config
        self.checkpoint = checkpoint; self.runDirectory = runDirectory; self.gguf = gguf
    }

    /// Opens any kind of source (`ModelSourceKind.detect`), reading its config.
    public static func open(_ path: String) throws -> ModelSource {
        let kind = try ModelSourceKind.detect(path)
        switch kind {
        case .gguf:
            let file = try GGUFFile(path: path)
            return ModelSource(path: path, kind: kind, config: try LlamaGGUF.config(file), gguf: file)
        case .huggingFace:
            return ModelSource(path: path, kind: kind, config: try HFCheckpoint.readConfig(directory: path))
        case .checkpoint, .runDirectory:
            let (checkpoint, runDir) = try TrainingCheckpoint.resolve(path)
            _ = try TrainingCheckpoint.decodeState(checkpoint)  // a readable checkpoint format
            let config = try LlamaConfig(contentsOf: checkpoint + "/config.json")
            return ModelSource(path: path, kind: kind, config: config, checkpoint: checkpoint, runDirectory: runDir)
        }
    }

    /// "the GGUF file x.gguf", "the run directory runs/a (checkpoint step_00000040)": how messages name it.
    public var description: String {
        if kind == .runDirectory, let checkpoint {
            return "the \(kind.rawValue) \(path) (checkpoint \(URL(fileURLWithPath: checkpoint).lastPathComponent))"
        }
        return "the \(kind.rawValue) \(path)"
    }

    /// Whether the source is a checkpoint that holds LoRA factors (its model is W + s B A of the current cycle).
    public var hasLoRA: Bool {
        guard let checkpoint, let state = try? TrainingCheckpoint.decodeState(checkpoint) else { return false }
        return TrainingCheckpoint.hasLoRA(checkpoint, version: state.formatVersion)
    }

    // MARK: Tensors

    /// The source's weights under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`), each read
    /// when asked for: a Hugging Face directory's (possibly sharded) safetensors as stored (a bitsandbytes
    /// weight as its packed codes and quant-state companions, which `loadWeights` decodes), a GGUF file's tensors as
    /// f32 with llama.cpp's q/k row order undone, a checkpoint's model tensor file (quantized frozen weights
    /// as `<name>.<format>` blocks; a LoRA checkpoint's factors are not in it).
    public func tensors() throws -> any TensorFile {
        switch kind {
        case .gguf: return LlamaGGUF.TensorSource(gguf!, config: config)
        case .huggingFace: return try ShardedTensors(directory: path)
        case .checkpoint, .runDirectory:
            guard let file = try TrainingCheckpoint.openTensors(checkpoint!, "model") else {
                throw ReLoRAError.invalidFile(path: checkpoint!, reason: "has no model tensor file; it is not a complete checkpoint")
            }
            return file
        }
    }

    /// Streams the weights into `model`, whose config must be `config`'s architecture and whose storage may
    /// be anything (quantized frozen weights are quantized as they arrive, `quantized(name, relativeError)`).
    /// A LoRA checkpoint is refused: its weights are W + s B A, which only `loadModel` folds.
    /// `log` gets the loaders' notes (a bitsandbytes 4-bit weight: whether its codes were kept or converted; a
    /// GGUF file: how many linears kept their blocks byte for byte).
    public func loadWeights(into model: LlamaModel, warn: (String) -> Void = { _ in },
                            quantized: (String, Double) -> Void = { _, _ in }, log: (String) -> Void = { _ in }) throws {
        switch kind {
        case .gguf:
            let imported = try LlamaGGUF.loadWeights(gguf!, into: model, warn: warn)
            if let format = model.quant, !imported.copied.isEmpty {
                log("took the \(format.rawValue) blocks of \(imported.copied.count) linears from \(path) byte for byte")
            }
            for (name, from, error) in imported.quantized { quantized("\(name) (\(from.name) in the GGUF)", error) }
        case .huggingFace:
            try HFCheckpoint.loadWeights(directory: path, into: model, warn: warn, quantized: quantized, log: log)
        case .checkpoint, .runDirectory:
            guard !hasLoRA else {
                throw ReLoRAError.invalidFile(path: checkpoint!, reason: "holds LoRA factors, so its weights are W + s B A; use its merged export (`relora export --format hf`) or continue the run with --resume")
            }
            let file = try tensors()
            for (name, slot) in model.weights.slots() {
                if let error = try TensorIO.load(slot, from: file, name, backend: model.backend) { quantized(name, error) }
            }
        }
    }

    /// A dense full-rank model of the source on `backend` (a LoRA checkpoint's current cycle merged, quantized
    /// frozen weights dequantized): what `eval`, `sample` and `export` compute with.
    public func loadModel(backend: Backend, warn: (String) -> Void = { _ in }) throws -> LlamaModel {
        if let checkpoint { return try TrainingCheckpoint.loadModel(checkpoint, backend: backend) }
        let model = LlamaModel(config: config, backend: backend)
        try loadWeights(into: model, warn: warn)
        return model
    }

    // MARK: Tokenizer

    /// The directory whose tokenizer files a directory source carries (a checkpoint's is its run's); nil for GGUF.
    private var tokenizerDirectory: String? {
        switch kind {
        case .gguf: return nil
        case .huggingFace: return path
        case .checkpoint, .runDirectory: return runDirectory
        }
    }

    private func tokenizerFile(_ name: String) -> String? {
        guard let dir = tokenizerDirectory, FileManager.default.fileExists(atPath: dir + "/" + name) else { return nil }
        return dir + "/" + name
    }

    /// Where the source's tokenizer is, for `TokenizerLoader.load` and for a run that keeps it: the directory's
    /// (a checkpoint's run's) first of `TokenizerLoader.fileNames`, or the GGUF file itself when its metadata
    /// has a tokenizer; nil if it has none.
    public var tokenizerPath: String? {
        if let gguf { return gguf.metadata["tokenizer.ggml.model"] != nil ? path : nil }
        return tokenizerDirectory.flatMap { TokenizerLoader.file(in: $0) }
    }

    /// The source's tokenizer (`TokenizerLoader`, from `tokenizerPath`); nil if it has none. Read when asked
    /// (an evaluation needs none).
    public func tokenizer() throws -> (any TextTokenizer)? {
        if let gguf { return tokenizerPath == nil ? nil : try TokenizerLoader.load(gguf: gguf) }
        return try tokenizerPath.map { try TokenizerLoader.load($0) }
    }

    /// The tokenizer a GGUF export writes: `tokenizer()`, or, when that is a SentencePiece-style tokenizer.json
    /// with a `tokenizer.model` beside it (a Hugging Face Llama directory, or a run that kept both), a
    /// `GGUFStandInTokenizer` writing the `.model`'s pieces after checking that the two tokenize alike
    /// (one sentence if they do not); nil if the source has none.
    public func ggufTokenizer() throws -> (any TextTokenizer)? {
        guard let primary = try tokenizer() else { return nil }
        guard tokenizerPath?.hasSuffix("/tokenizer.json") == true else { return primary }
        return try GGUFStandInTokenizer.forGGUF(primary, tokenizerModel: tokenizerFile("tokenizer.model"))
    }

    /// The tokenizer, or one sentence saying the source has none and what `purpose` needed it for.
    public func requireTokenizer(for purpose: String) throws -> any TextTokenizer {
        guard let t = try tokenizer() else {
            let where_ = kind == .gguf ? "no tokenizer in its metadata" : "no tokenizer.json or tokenizer.model"
            throw ReLoRAError.invalidFile(path: path, reason: "has \(where_) to \(purpose)")
        }
        return t
    }

    /// The tokenizer as `tokenizer.json` bytes (for a Hugging Face export): the directory's file as it is, or a
    /// GGUF tokenizer (a GGUF file's, a run's `tokenizer.gguf`) that is byte-level BPE written out; nil if there
    /// is none in that form.
    public func tokenizerJSON() throws -> Data? {
        if let file = tokenizerFile("tokenizer.json") { return try Data(contentsOf: URL(fileURLWithPath: file)) }
        guard gguf != nil || tokenizerFile("tokenizer.gguf") != nil else { return nil }
        return try (tokenizer() as? BPETokenizer)?.jsonData()
    }

    /// The SentencePiece `tokenizer.model` bytes a Hugging Face export carries: a directory source's file as it
    /// is, or a GGUF tokenizer (a GGUF file's, a run's `tokenizer.gguf`) that is SentencePiece written out
    /// (`SentencePieceTokenizer.modelProto`); else nil.
    public func tokenizerModel() throws -> Data? {
        if let file = tokenizerFile("tokenizer.model") { return FileManager.default.contents(atPath: file) }
        guard gguf != nil || tokenizerFile("tokenizer.gguf") != nil, let sp = try tokenizer() as? SentencePieceTokenizer else { return nil }
        return Data(try sp.modelProto())
    }
}

/// A Hugging Face directory's tensors across its safetensors files (one, or the shards its index names),
/// by tensor name.
final class ShardedTensors: TensorFile, @unchecked Sendable {  // immutable after init
    let path: String
    let files: [String: SafetensorsFile]
    let tensorNames: [String]
    var metadata: [String: String] { [:] }

    init(directory: String) throws {
        path = directory
        files = try HFCheckpoint.openShards(URL(fileURLWithPath: directory))
        tensorNames = files.keys.sorted()
    }

    func header(_ name: String) -> TensorHeader? { files[name]?.header(name) }
    func withRawBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard let file = files[name] else { throw ReLoRAError.invalidFile(path: path, reason: "tensor '\(name)' is missing") }
        return try file.withRawBytes(name, body)
    }
    func floats(_ name: String) throws -> [Float] {
        guard let file = files[name] else { throw ReLoRAError.invalidFile(path: path, reason: "tensor '\(name)' is missing") }
        return try file.floats(name)
    }
}
