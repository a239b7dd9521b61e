import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel

/// How `relora export --format gguf --quant T` stores the model's 2-D tensors. Norms (1-D) are f32 in
/// every case, as llama.cpp's converter writes them.
///
/// | T | block linears | token_embd, output | general.file_type |
/// |---|---|---|---|
/// | f32 | f32 | f32 | 0 (ALL_F32) |
/// | f16 | f16 | f16 | 1 (MOSTLY_F16) |
/// | bf16 | bf16 | bf16 | 32 (MOSTLY_BF16) |
/// | q8_0 | q8_0 | q8_0 | 7 (MOSTLY_Q8_0) |
/// | q4_0 | q4_0 | q8_0 | 2 (MOSTLY_Q4_0) |
///
/// q8_0 quantizes the embedding and the head too, as `convert_hf_to_gguf.py --outtype q8_0` does. q4_0
/// keeps them in q8_0: llama-quantize also gives the output projection more bits than the rest (q6_K in
/// its Q4_0 mix), since the logits are the most sensitive product; relora writes only formats it also
/// reads, so q8_0. A row whose length is not a multiple of 32 cannot be a q8_0/q4_0 row and is written
/// in f16 (what llama.cpp's converter falls back to).
public enum GGUFWeightType: String, Sendable, CaseIterable {
    case f32, f16, bf16, q8_0, q4_0

    /// llama.cpp's `llama_ftype` number for `general.file_type`.
    public var fileType: UInt32 {
        switch self {
        case .f32: return 0
        case .f16: return 1
        case .q4_0: return 2
        case .q8_0: return 7
        case .bf16: return 32
        }
    }

    /// The block format of the linears (nil for the float types).
    public var quantFormat: QuantFormat? {
        switch self {
        case .q8_0: return .q8_0
        case .q4_0: return .q4_0
        case .f32, .f16, .bf16: return nil
        }
    }

    /// The stored type of a tensor of row-major `shape` (`linear`: one of the seven block linears).
    public func tensorType(shape: [Int], linear: Bool) -> GGMLType {
        guard shape.count == 2 else { return .f32 }
        switch self {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        case .q8_0, .q4_0:
            guard shape[1] % 32 == 0 else { return .f16 }
            return self == .q4_0 && linear ? .q4_0 : .q8_0
        }
    }
}

/// What an export wrote, for the one line the CLI prints.
public struct GGUFExportSummary: Sendable, Equatable {
    public var path: String
    public var weightType: GGUFWeightType
    public var tensorCount = 0
    public var fileBytes = 0
    /// Linears whose blocks were copied from the checkpoint as they were (HF names).
    public var copiedLinears: [String] = []
    /// Linears of a quantized checkpoint in the requested format that had to be requantized because the
    /// current cycle's update (B A) is not zero: the stored codes do not hold it.
    public var requantizedLinears: [String] = []
    /// 2-D tensors kept in f16 because their rows are not whole 32-weight blocks (HF names).
    public var f16Fallback: [String] = []
    /// Whether the tokenizer went into the metadata.
    public var hasTokenizer = false

    /// "q8_0, 23 tensors, 1.2 MB; copied the stored q8_0 codes of 14 linears; ..."
    public var description: String {
        var parts = [String(format: "%@, %d tensors, %.1f MB", weightType.rawValue, tensorCount, Double(fileBytes) / 1e6)]
        if !copiedLinears.isEmpty {
            parts.append("copied the checkpoint's \(weightType.rawValue) codes of \(copiedLinears.count) linears unchanged")
        }
        if !requantizedLinears.isEmpty {
            parts.append("requantized \(requantizedLinears.count) linears from the merged weights (the current LoRA cycle's update is not zero, so the checkpoint's codes do not hold it)")
        }
        if !f16Fallback.isEmpty {
            parts.append("\(f16Fallback.count) tensors in f16 (rows not whole 32-weight blocks)")
        }
        if !hasTokenizer { parts.append("no tokenizer (llama.cpp needs one to load the file)") }
        return parts.joined(separator: "; ")
    }
}

/// LLaMA models in GGUF, as llama.cpp names and lays them out (`general.architecture = llama`).
///
/// Tensor names: `token_embd.weight`, `blk.N.attn_norm.weight`, `blk.N.attn_{q,k,v,output}.weight`,
/// `blk.N.ffn_norm.weight`, `blk.N.ffn_{gate,up,down}.weight`, `output_norm.weight`, `output.weight`
/// (absent when the head is tied to the embedding). Shapes are the Hugging Face ones reversed (ne).
///
/// Rotary convention: Hugging Face's LLaMA rotates dimension i of a head together with i + D/2
/// (`rotate_half`); llama.cpp's LLaMA graph rotates adjacent pairs (2i, 2i+1) (GPT-J style). Hugging
/// Face's converter therefore permutes the rows of q_proj and k_proj within each head so that row 2i + j
/// of the GGUF head is row j * D/2 + i of the Hugging Face head (j = 0, 1): the pair that llama.cpp
/// rotates together is the pair Hugging Face does, and q . k is unchanged. Export applies it, reading
/// undoes it. Quantization is per row, so the rows of q8_0/q4_0 blocks permute like float rows.
public enum LlamaGGUF {
    public static let architecture = "llama"

    // MARK: Names

    /// GGUF name of a Hugging Face LLaMA tensor name (nil for names a LLaMA GGUF has no tensor for).
    public static func ggufName(_ hf: String) -> String? {
        switch hf {
        case "model.embed_tokens.weight": return "token_embd.weight"
        case "model.norm.weight": return "output_norm.weight"
        case "lm_head.weight": return "output.weight"
        default: break
        }
        let parts = hf.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count >= 5, parts[0] == "model", parts[1] == "layers", let layer = Int(parts[2]),
              parts.last == "weight" else { return nil }
        let path = parts[3 ..< parts.count - 1].joined(separator: ".")
        let suffix: String
        switch path {
        case "input_layernorm": suffix = "attn_norm"
        case "post_attention_layernorm": suffix = "ffn_norm"
        default:
            guard let kind = LinearKind.allCases.first(where: { $0.hfPath == path }) else { return nil }
            suffix = ggufLinearName(kind)
        }
        return "blk.\(layer).\(suffix).weight"
    }

    static func ggufLinearName(_ kind: LinearKind) -> String {
        switch kind {
        case .q: return "attn_q"
        case .k: return "attn_k"
        case .v: return "attn_v"
        case .o: return "attn_output"
        case .gate: return "ffn_gate"
        case .up: return "ffn_up"
        case .down: return "ffn_down"
        }
    }

    /// The heads whose rows the rotary permutation reorders: q_proj (query heads), k_proj (KV heads).
    static func rotaryHeads(_ hf: String, _ config: LlamaConfig) -> Int? {
        if hf.hasSuffix(".self_attn.q_proj.weight") { return config.numAttentionHeads }
        if hf.hasSuffix(".self_attn.k_proj.weight") { return config.numKeyValueHeads }
        return nil
    }

    // MARK: Rotary permutation

    /// Row `r` of the GGUF layout holds row `source(r)` of the Hugging Face layout: within each head of
    /// `headDim` rows, GGUF row 2i + j is HF row j * headDim/2 + i.
    static func huggingFaceRow(ofGGUFRow r: Int, headDim: Int) -> Int {
        let (head, within) = r.quotientAndRemainder(dividingBy: headDim)
        let (i, j) = within.quotientAndRemainder(dividingBy: 2)
        return head * headDim + j * (headDim / 2) + i
    }

    /// Reorders whole rows of `bytesPerRow` bytes (floats or quantized blocks) from the Hugging Face
    /// layout to GGUF's (`toGGUF`) or back. `rows` must be `heads * headDim`.
    static func permuteRows(_ bytes: [UInt8], rows: Int, headDim: Int, toGGUF: Bool) -> [UInt8] {
        precondition(rows % headDim == 0 && headDim % 2 == 0 && bytes.count % max(rows, 1) == 0,
                     "rotary permutation: \(rows) rows are not whole heads of \(headDim)")
        guard rows > 0 else { return bytes }
        let width = bytes.count / rows
        var out = [UInt8](repeating: 0, count: bytes.count)
        bytes.withUnsafeBytes { src in
            out.withUnsafeMutableBytes { dst in
                for r in 0 ..< rows {
                    let hf = huggingFaceRow(ofGGUFRow: r, headDim: headDim)
                    let (from, to) = toGGUF ? (hf, r) : (r, hf)
                    dst.baseAddress!.advanced(by: to * width).copyMemory(from: src.baseAddress! + from * width, byteCount: width)
                }
            }
        }
        return out
    }

    // MARK: Writing

    /// Writes `model` (dense, adapters folded) as a GGUF v3 file at `path`, atomically.
    ///
    /// `storedCodes` (HF name -> blocks in the `weights` format) are written as they are, row-permuted
    /// where the rotary convention needs it, instead of quantizing the model's values: the export of a
    /// quantized checkpoint whose current cycle is empty (see `export(checkpoint:...)`). `tokenizer`
    /// goes into the `tokenizer.ggml.*` metadata (`TextTokenizer.ggufMetadata`: byte-level BPE as `gpt2`,
    /// SentencePiece BPE as `llama`, padded to the model's vocabulary); without one llama.cpp
    /// cannot load the file, but readers of the weights (transformers, `relora eval`) can.
    @discardableResult
    public static func write(model: LlamaModel, tokenizer: (any TextTokenizer)?, weights: GGUFWeightType, to path: String,
                             name: String? = nil, storedCodes: [String: QuantizedMatrix] = [:],
                             progress: ((Int, Int) -> Void)? = nil) throws -> GGUFExportSummary {
        guard model.weights.isDense, model.loraConfig == nil else {
            throw ReLoRAError.invalidData("a GGUF export needs a plain dense model; export a checkpoint (`relora export RUN --format gguf`), which dequantizes and merges the LoRA cycle")
        }
        let config = model.config
        var summary = GGUFExportSummary(path: path, weightType: weights)
        var metadata = try metadataEntries(config, weights: weights, name: name)
        if let tokenizer {
            metadata += try tokenizer.ggufMetadata(vocabSize: config.vocabSize)
            summary.hasTokenizer = true
        }
        let backend = model.backend
        let linearNames = Set(model.weights.linears.map { $0.namePrefix + "weight" })
        let named = model.weights.named()
        var entries: [GGUFTensorEntry] = []
        for (index, (hf, tensor)) in named.enumerated() {
            guard let gguf = ggufName(hf) else { preconditionFailure("no GGUF name for \(hf)") }
            let isLinear = linearNames.contains(hf)
            let type = weights.tensorType(shape: tensor.shape, linear: isLinear)
            if type == .f16 && weights.quantFormat != nil { summary.f16Fallback.append(hf) }
            let heads = rotaryHeads(hf, config)
            let headDim = config.headDim
            let shape = tensor.shape
            var stored: QuantizedMatrix?
            if let codes = storedCodes[hf] {
                guard codes.format == type.quantFormat, [codes.rows, codes.cols] == shape else {
                    throw ReLoRAError.invalidData("the stored codes of '\(hf)' (\(codes.format.rawValue) [\(codes.rows), \(codes.cols)]) do not fit a \(type.name) tensor of shape \(shape)")
                }
                stored = codes
                summary.copiedLinears.append(hf)
            }
            let storedBlocks = stored
            entries.append(GGUFTensorEntry(name: gguf, type: type, shape: shape) {
                defer { progress?(index + 1, named.count) }
                let rows = shape.count == 2 ? shape[0] : 1
                if let storedBlocks {
                    return heads == nil ? storedBlocks.bytes
                        : permuteRows(storedBlocks.bytes, rows: rows, headDim: headDim, toGGUF: true)
                }
                var values = backend.download(tensor)
                if heads != nil {
                    let raw = values.withUnsafeBytes { Array($0) }
                    values = permuteRows(raw, rows: rows, headDim: headDim, toGGUF: true).withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
                }
                return try encode(values, shape: shape, as: type, name: hf)
            })
        }
        summary.tensorCount = entries.count
        try GGUFWriter.write(metadata: metadata, tensors: entries, alignment: 32, to: path)
        summary.fileBytes = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
        return summary
    }

    /// The bytes of row-major f32 `values` stored as `type`. A finite weight that a 16-bit float cannot
    /// hold (|x| > 65504 for f16) or a non-finite one is an error naming the tensor, not a silent inf.
    static func encode(_ values: [Float], shape: [Int], as type: GGMLType, name: String) throws -> [UInt8] {
        func overflow(_ i: Int, _ t: String) -> ReLoRAError {
            .invalidData("cannot store tensor '\(name)' as \(t): element \(i) = \(values[i]) \(values[i].isFinite ? "is out of its range" : "is not finite"); export with --quant f32\(t == "f16" ? " or bf16" : "")")
        }
        switch type {
        case .f32:
            return values.withUnsafeBytes { Array($0) }
        case .f16, .bf16:
            var out = [UInt8](repeating: 0, count: 2 * values.count)
            for (i, v) in values.enumerated() {
                let bits = type == .f16 ? FloatBits.float16(v) : FloatBits.bfloat16(v)
                let back = type == .f16 ? FloatBits.floatFromFloat16(bits) : FloatBits.floatFromBFloat16(bits)
                guard back.isFinite else { throw overflow(i, type.name) }
                out[2 * i] = UInt8(truncatingIfNeeded: bits)
                out[2 * i + 1] = UInt8(truncatingIfNeeded: bits >> 8)
            }
            return out
        case .q8_0, .q4_0:
            let rows = shape.count == 2 ? shape[0] : 1
            return try QuantizedMatrix(quantizing: values, rows: rows, cols: values.count / max(rows, 1),
                                       format: type.quantFormat!, name: name).bytes
        case .q4_K, .q5_K, .q6_K:
            throw ReLoRAError.invalidData("cannot store tensor '\(name)' as \(type.name): relora reads the K-quants but does not write them")
        }
    }

    /// The `general.*` and `llama.*` keys llama.cpp reads for a LLaMA model, with the types its loader
    /// expects (u32 sizes, f32 epsilon and base frequency).
    static func metadataEntries(_ c: LlamaConfig, weights: GGUFWeightType, name: String?) throws -> [(String, GGUFValue)] {
        func u32(_ key: String, _ v: Int) throws -> (String, GGUFValue) {
            guard let x = UInt32(exactly: v) else { throw ReLoRAError.invalidData("\(key) = \(v) does not fit GGUF's u32") }
            return (key, .uint32(x))
        }
        let a = architecture
        var m: [(String, GGUFValue)] = [("general.architecture", .string(a))]
        if let name { m.append(("general.name", .string(name))) }
        m += [
            ("general.file_type", .uint32(weights.fileType)),
            ("general.alignment", .uint32(32)),
        ]
        if weights.quantFormat != nil { m.append(("general.quantization_version", .uint32(2))) }  // GGML_QNT_VERSION
        m += [
            try u32("\(a).vocab_size", c.vocabSize),
            try u32("\(a).context_length", c.maxPositionEmbeddings),
            try u32("\(a).embedding_length", c.hiddenSize),
            try u32("\(a).block_count", c.numHiddenLayers),
            try u32("\(a).feed_forward_length", c.intermediateSize),
            try u32("\(a).attention.head_count", c.numAttentionHeads),
            try u32("\(a).attention.head_count_kv", c.numKeyValueHeads),
            try u32("\(a).attention.key_length", c.headDim),
            try u32("\(a).attention.value_length", c.headDim),
            try u32("\(a).rope.dimension_count", c.headDim),
            ("\(a).rope.freq_base", .float32(Float(c.ropeTheta))),
            ("\(a).attention.layer_norm_rms_epsilon", .float32(Float(c.rmsNormEps))),
        ]
        return m
    }

    /// Exports a training checkpoint (or a run's latest): the merged model `TrainingCheckpoint.loadModel`
    /// gives (dequantized W + s B A of the current cycle), stored as `weights`.
    ///
    /// Copy or requantize: when the run's frozen weights are stored in the requested block format, a
    /// linear whose current cycle is empty (B == 0: right after a restart, or a merged checkpoint) has a
    /// merged weight equal to deq(codes), and since `quantize(dequantize(q)) == q` its codes are the
    /// answer: they are copied byte for byte. A linear with B != 0 has moved off the quantization grid;
    /// its merged weight is requantized (round to nearest) and the summary says so.
    public static func export(checkpoint: String, tokenizer: (any TextTokenizer)?, weights: GGUFWeightType, to path: String,
                              backend: Backend, name: String? = nil,
                              progress: ((Int, Int) -> Void)? = nil) throws -> GGUFExportSummary {
        let model = try TrainingCheckpoint.loadModel(checkpoint, backend: backend)
        var stored: [String: QuantizedMatrix] = [:]
        var requantized: [String] = []
        if let format = weights.quantFormat {
            guard let file = try TrainingCheckpoint.openTensors(checkpoint, "model") else {
                throw ReLoRAError.invalidFile(path: checkpoint, reason: "has no model tensor file; it is not a complete checkpoint")
            }
            let lora = try TrainingCheckpoint.openTensors(checkpoint, "lora")
            for linear in model.weights.linears {
                let hf = linear.namePrefix + "weight"
                guard file.header(TensorIO.quantizedName(hf, format)) != nil,
                      weights.tensorType(shape: [linear.outFeatures, linear.inFeatures], linear: true).quantFormat == format
                else { continue }
                let bName = linear.namePrefix + "lora_B"
                let cycleIsEmpty = try lora.map { file in
                    guard file.header(bName) != nil else { return true }
                    return try file.floats(bName).allSatisfy { $0 == 0 }
                } ?? true
                if cycleIsEmpty {
                    stored[hf] = try TensorIO.readQuantized(file, hf, format, rows: linear.outFeatures, cols: linear.inFeatures)
                } else {
                    requantized.append(hf)
                }
            }
        }
        var summary = try write(model: model, tokenizer: tokenizer, weights: weights, to: path, name: name,
                                storedCodes: stored, progress: progress)
        summary.requantizedLinears = requantized
        return summary
    }

    // MARK: Reading

    /// The LLaMA architecture of a GGUF file's `llama.*` metadata. Mixture-of-experts, rope scaling and
    /// partial rotary dimensions are rejected (relora's model has none of them).
    public static func config(_ file: GGUFFile) throws -> LlamaConfig {
        func fail(_ reason: String) -> ReLoRAError { .invalidFile(path: file.path, reason: reason) }
        let arch = file.metadata["general.architecture"]?.string
        guard arch == architecture else {
            throw fail("general.architecture is \(arch.map { "'\($0)'" } ?? "missing"); relora reads LLaMA models ('llama') only")
        }
        let a = architecture
        func int(_ key: String, default def: Int? = nil) throws -> Int {
            guard let value = file.metadata["\(a).\(key)"] else {
                if let def { return def }
                throw fail("metadata \(a).\(key) is missing; it is required for a LLaMA model")
            }
            guard let v = value.integer else { throw fail("metadata \(a).\(key) must be an integer, got \(value)") }
            return v
        }
        func double(_ key: String, default def: Double? = nil) throws -> Double {
            guard let value = file.metadata["\(a).\(key)"] else {
                if let def { return def }
                throw fail("metadata \(a).\(key) is missing; it is required for a LLaMA model")
            }
            guard let v = value.double ?? value.integer.map(Double.init) else { throw fail("metadata \(a).\(key) must be a number, got \(value)") }
            return v
        }
        if try int("expert_count", default: 0) > 0 {
            throw fail("it is a mixture-of-experts model (\(a).expert_count > 0); relora reads dense LLaMA models only")
        }
        if let scaling = file.metadata["\(a).rope.scaling.type"]?.string, scaling != "none" {
            throw fail("rope scaling '\(scaling)' is not supported; relora uses plain rotary embeddings")
        }
        let hidden = try int("embedding_length")
        let heads = try int("attention.head_count")
        let headDim = try int("attention.key_length", default: heads > 0 ? hidden / heads : 0)
        if try int("attention.value_length", default: headDim) != headDim {
            throw fail("\(a).attention.value_length differs from key_length; relora's attention uses one head size")
        }
        if try int("rope.dimension_count", default: headDim) != headDim {
            throw fail("\(a).rope.dimension_count is not the head size \(headDim); partial rotary embeddings are not supported")
        }
        let embed = file.tensor("token_embd.weight")
        let vocab = try int("vocab_size", default: embed?.shape.first ?? file.metadata["tokenizer.ggml.tokens"]?.strings?.count ?? 0)
        let config: LlamaConfig
        do {
            config = try LlamaConfig(
                hiddenSize: hidden, intermediateSize: try int("feed_forward_length"), numHiddenLayers: try int("block_count"),
                numAttentionHeads: heads, numKeyValueHeads: try int("attention.head_count_kv", default: heads),
                vocabSize: vocab, headDim: headDim, rmsNormEps: try double("attention.layer_norm_rms_epsilon"),
                ropeTheta: try double("rope.freq_base", default: 10000),
                maxPositionEmbeddings: try int("context_length"),
                tieWordEmbeddings: file.tensor("output.weight") == nil)
        } catch ReLoRAError.invalidConfig(let message) {
            throw fail("invalid LLaMA metadata: \(message)")
        }
        // Every tensor the metadata implies, with its shape, before anyone allocates a model of this size:
        // the file's bytes then bound the allocation (a corrupt block_count or embedding_length is caught here).
        guard config.numHiddenLayers * 9 <= file.tensors.count else {
            throw fail("\(a).block_count \(config.numHiddenLayers) needs \(config.numHiddenLayers * 9) block tensors, but the file holds \(file.tensors.count) tensors")
        }
        for (hf, shape) in tensorShapes(config) {
            let name = ggufName(hf)!
            guard let info = file.tensor(name) else { throw fail("tensor '\(name)' is missing; the metadata's LLaMA architecture needs it") }
            guard info.shape == shape else {
                throw fail("tensor '\(name)' has ne \(info.dimensions), but the metadata's LLaMA architecture needs \(Array(shape.reversed()))")
            }
        }
        return config
    }

    /// The Hugging Face name and row-major shape of every tensor of a LLaMA model with `c`: the names
    /// `LlamaParameters.slots()` lists, computed without allocating the model.
    static func tensorShapes(_ c: LlamaConfig) -> [(String, [Int])] {
        var out: [(String, [Int])] = [("model.embed_tokens.weight", [c.vocabSize, c.hiddenSize])]
        for l in 0 ..< c.numHiddenLayers {
            out.append(("model.layers.\(l).input_layernorm.weight", [c.hiddenSize]))
            out.append(("model.layers.\(l).post_attention_layernorm.weight", [c.hiddenSize]))
            for kind in LinearKind.allCases {
                let (o, i) = kind.shape(c)
                out.append(("model.layers.\(l).\(kind.hfPath).weight", [o, i]))
            }
        }
        out.append(("model.norm.weight", [c.hiddenSize]))
        if !c.tieWordEmbeddings { out.append(("lm_head.weight", [c.vocabSize, c.hiddenSize])) }
        return out
    }

    /// A dense model holding the GGUF's weights (`loadWeights` into a dense model): it computes what the
    /// model that wrote the file computed. Tensors a LLaMA model does not use are reported on `warn`.
    public static func loadModel(_ file: GGUFFile, backend: Backend, warn: (String) -> Void = { _ in }) throws -> LlamaModel {
        let model = LlamaModel(config: try config(file), backend: backend)
        try loadWeights(file, into: model, warn: warn)
        return model
    }

    /// What `loadWeights` did with the block linears of a model whose frozen weights are quantized.
    public struct WeightImport: Sendable {
        /// Linears whose blocks were taken from the file byte for byte (Hugging Face names).
        public var copied: [String] = []
        /// Linears quantized to the model's format from another stored type, with the relative error
        /// `||deq(q) - w|| / ||w||` against the file's (dequantized) values.
        public var quantized: [(name: String, from: GGMLType, error: Double)] = []
    }

    /// Fills `model`'s weights from the file, one tensor at a time (a tensor's f32 values, or its blocks,
    /// are the only host copy beyond the model). `model.config` must be the file's (`config(file)`):
    /// names and shapes are checked, and a missing tensor or another shape is one sentence.
    ///
    /// Each weight slot:
    /// - dense (embedding, norms, head, and every linear of a dense model): the file's values as f32 (f16,
    ///   bf16 exactly; q8_0, q4_0 and the K-quants by the reference dequantizers), so a dense model from a
    ///   quantized file holds exactly deq(codes);
    /// - quantized, with the file's tensor in the same format (q8_0 or q4_0): the blocks byte for byte (the
    ///   rotary permutation moves whole rows, and rows are whole blocks), no dequantize-requantize; a
    ///   master copy (merge policy `master`) is their dequantization, so `blocks == quantize(master)`;
    /// - quantized, stored otherwise (floats, the other block format, a K-quant): the f32 values quantized
    ///   on the backend (round to nearest), the relative error returned in `WeightImport.quantized`.
    /// In every case the rotary row permutation of q and k is undone (see the type's doc).
    @discardableResult
    public static func loadWeights(_ file: GGUFFile, into model: LlamaModel, warn: (String) -> Void = { _ in }) throws -> WeightImport {
        let config = model.config
        let backend = model.backend
        var report = WeightImport()
        var used = Set<String>()
        for (hf, slot) in model.weights.slots() {
            let name = ggufName(hf)!
            guard let info = file.tensor(name) else {
                throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' is missing")
            }
            guard info.shape == slot.shape else {
                throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' has ne \(info.dimensions), expected \(Array(slot.shape.reversed())) for this model's metadata")
            }
            used.insert(name)
            let rows = slot.shape[0]
            let permuted = rotaryHeads(hf, config) != nil
            switch slot {
            case .quantized(let q) where info.type.quantFormat == q.format:
                var bytes = try file.quantized(info).bytes
                if permuted { bytes = permuteRows(bytes, rows: rows, headDim: config.headDim, toGGUF: false) }
                bytes.withUnsafeBytes { backend.upload(raw: $0, dtype: .u8, to: q.blocks) }
                if let master = q.master { backend.dequantize(q, firstRow: 0, rowCount: q.rows, into: master) }
                report.copied.append(hf)
            case .quantized(let q):
                let dense = q.master ?? backend.makeTensor([q.rows, q.cols], dtype: .f32, tag: .workspace, zeroed: false)
                backend.upload(try values(file, info, rows: rows, permuted: permuted, headDim: config.headDim), to: dense)
                let error = try TensorIO.quantize(dense, into: q, name: hf, backend: backend)
                report.quantized.append((hf, info.type, error))
            case .dense(let tensor):
                backend.upload(try values(file, info, rows: rows, permuted: permuted, headDim: config.headDim), to: tensor)
            }
        }
        let unused = file.tensors.map(\.name).filter { !used.contains($0) && $0 != "rope_freqs.weight" }
        if !unused.isEmpty {
            warn("ignored \(unused.count) tensor(s) a LLaMA model does not use: \(unused.prefix(5).joined(separator: ", "))")
        }
        return report
    }

    /// A tensor's f32 values in the Hugging Face row order (`permuted`: q or k, whose rows GGUF interleaves):
    /// one reordered copy, GGUF row r going to Hugging Face row `huggingFaceRow(r)` (`permuteRows` on floats).
    static func values(_ file: GGUFFile, _ info: GGUFTensorInfo, rows: Int, permuted: Bool, headDim: Int) throws -> [Float] {
        let values = try file.floats(info)
        guard permuted else { return values }
        precondition(rows % headDim == 0 && headDim % 2 == 0, "rotary permutation: \(rows) rows are not whole heads of \(headDim)")
        let width = values.count / max(rows, 1)
        var out = [Float](repeating: 0, count: values.count)
        values.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for r in 0..<rows {
                    let to = huggingFaceRow(ofGGUFRow: r, headDim: headDim) * width
                    (dst.baseAddress! + to).update(from: src.baseAddress! + r * width, count: width)
                }
            }
        }
        return out
    }

    /// A GGUF file's LLaMA tensors under Hugging Face names, each read when asked as f32 (`values`: f16/bf16
    /// exact, blocks by the reference dequantizers) with q and k's rotary rows back in Hugging Face order:
    /// `ModelSource.tensors()` of a GGUF file (`loadWeights` reads the file itself, to take blocks as they are).
    public final class TensorSource: TensorFile, @unchecked Sendable {  // immutable after init
        let file: GGUFFile
        let config: LlamaConfig
        /// Hugging Face name -> the GGUF tensor.
        let byName: [String: GGUFTensorInfo]
        public var path: String { file.path }
        public var metadata: [String: String] { [:] }
        public let tensorNames: [String]

        init(_ file: GGUFFile, config: LlamaConfig) {
            self.file = file
            self.config = config
            var names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
            for i in 0..<config.numHiddenLayers {
                names += ["model.layers.\(i).input_layernorm.weight", "model.layers.\(i).post_attention_layernorm.weight"]
                names += LinearKind.allCases.map { "model.layers.\(i).\($0.hfPath).weight" }
            }
            var map: [String: GGUFTensorInfo] = [:]
            for hf in names { if let g = LlamaGGUF.ggufName(hf), let info = file.tensor(g) { map[hf] = info } }
            byName = map
            tensorNames = map.keys.sorted()
        }

        public func header(_ name: String) -> TensorHeader? { byName[name].map { TensorHeader(dtype: .F32, shape: $0.shape) } }

        public func floats(_ name: String) throws -> [Float] {
            guard let info = byName[name] else { throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' is missing") }
            return try LlamaGGUF.values(file, info, rows: info.shape[0], permuted: LlamaGGUF.rotaryHeads(name, config) != nil,
                                        headDim: config.headDim)
        }

        public func withRawBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
            try floats(name).withUnsafeBytes(body)
        }
    }

    /// Whether `path` is a file that starts with the GGUF magic (for commands that take a model path).
    public static func isGGUF(_ path: String) -> Bool {
        guard let handle = FileHandle(forReadingAtPath: path) else { return false }
        defer { try? handle.close() }
        return (try? handle.read(upToCount: 4)) == Data(GGUFFile.magic)
    }
}
