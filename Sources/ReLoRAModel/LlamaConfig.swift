import Foundation
import ReLoRACore
import ReLoRAFormats

/// A LLaMA architecture, read from Hugging Face `config.json` keys (`LlamaConfig`).
/// Unknown keys are ignored; a missing required key or an impossible value is a clear error.
public struct LlamaConfig: Sendable, Equatable {
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var numKeyValueHeads: Int
    public var vocabSize: Int
    public var headDim: Int
    public var rmsNormEps: Double
    public var ropeTheta: Double
    public var maxPositionEmbeddings: Int
    public var tieWordEmbeddings: Bool

    public init(hiddenSize: Int, intermediateSize: Int, numHiddenLayers: Int, numAttentionHeads: Int,
                numKeyValueHeads: Int? = nil, vocabSize: Int, headDim: Int? = nil, rmsNormEps: Double = 1e-6,
                ropeTheta: Double = 10000, maxPositionEmbeddings: Int = 2048, tieWordEmbeddings: Bool = false) throws {
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.numHiddenLayers = numHiddenLayers
        self.numAttentionHeads = numAttentionHeads
        self.numKeyValueHeads = numKeyValueHeads ?? numAttentionHeads
        self.vocabSize = vocabSize
        self.headDim = headDim ?? (numAttentionHeads > 0 ? hiddenSize / numAttentionHeads : 0)
        self.rmsNormEps = rmsNormEps
        self.ropeTheta = ropeTheta
        self.maxPositionEmbeddings = maxPositionEmbeddings
        self.tieWordEmbeddings = tieWordEmbeddings
        try validate(explicitHeadDim: headDim != nil)
    }

    /// Width of the query projection output, `numAttentionHeads * headDim`.
    public var queryWidth: Int { numAttentionHeads * headDim }
    /// Width of the key and value projection outputs, `numKeyValueHeads * headDim`.
    public var keyValueWidth: Int { numKeyValueHeads * headDim }

    /// Number of parameters (the LM head counted once more unless tied).
    public var parameterCount: Int {
        let h = hiddenSize
        let block = h * queryWidth * 2 + h * keyValueWidth * 2 + 3 * h * intermediateSize + 2 * h
        return vocabSize * h * (tieWordEmbeddings ? 1 : 2) + numHiddenLayers * block + h
    }

    private func validate(explicitHeadDim: Bool) throws {
        let sizes: [(String, Int)] = [
            ("hidden_size", hiddenSize), ("intermediate_size", intermediateSize),
            ("num_hidden_layers", numHiddenLayers), ("num_attention_heads", numAttentionHeads),
            ("num_key_value_heads", numKeyValueHeads), ("vocab_size", vocabSize),
            ("max_position_embeddings", maxPositionEmbeddings),
        ]
        for (key, value) in sizes where value <= 0 {
            throw ReLoRAError.invalidConfig("'\(key)' must be a positive integer, got \(value)")
        }
        if !explicitHeadDim && hiddenSize % numAttentionHeads != 0 {
            throw ReLoRAError.invalidConfig(
                "hidden_size \(hiddenSize) is not divisible by num_attention_heads \(numAttentionHeads); pick sizes that divide or set head_dim")
        }
        if headDim <= 0 || headDim % 2 != 0 {
            throw ReLoRAError.invalidConfig("the head dimension must be a positive even number for rotary embeddings, got \(headDim)")
        }
        if numAttentionHeads % numKeyValueHeads != 0 {
            throw ReLoRAError.invalidConfig(
                "num_attention_heads \(numAttentionHeads) is not a multiple of num_key_value_heads \(numKeyValueHeads)")
        }
        if !(rmsNormEps > 0) || !rmsNormEps.isFinite {
            throw ReLoRAError.invalidConfig("'rms_norm_eps' must be a positive number, got \(rmsNormEps)")
        }
        if !(ropeTheta > 0) || !ropeTheta.isFinite {
            throw ReLoRAError.invalidConfig("'rope_theta' must be a positive number, got \(ropeTheta)")
        }
    }
}

extension LlamaConfig {
    /// Reads a Hugging Face `config.json`.
    public init(contentsOf path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot read the model config; check the path")
        }
        do {
            try self.init(json: data)
        } catch ReLoRAError.invalidConfig(let message) {
            throw ReLoRAError.invalidFile(path: path, reason: "invalid model config: \(message)")
        }
    }

    public init(json data: Data) throws {
        let keys = try JSONKeys(data: data, what: "the config")
        if let act = try keys.optionalString("hidden_act"), act != "silu" {
            throw ReLoRAError.invalidConfig("hidden_act '\(act)' is not supported; LLaMA uses 'silu'")
        }
        if keys.has("rope_scaling") {
            throw ReLoRAError.invalidConfig("rope_scaling is not supported yet; remove it or set it to null")
        }
        try self.init(
            hiddenSize: keys.int("hidden_size"),
            intermediateSize: keys.int("intermediate_size"),
            numHiddenLayers: keys.int("num_hidden_layers"),
            numAttentionHeads: keys.int("num_attention_heads"),
            numKeyValueHeads: keys.optionalInt("num_key_value_heads"),
            vocabSize: keys.int("vocab_size"),
            headDim: keys.optionalInt("head_dim"),
            rmsNormEps: keys.optionalDouble("rms_norm_eps") ?? 1e-6,
            ropeTheta: try Self.ropeTheta(keys),
            maxPositionEmbeddings: keys.optionalInt("max_position_embeddings") ?? 2048,
            tieWordEmbeddings: keys.optionalBool("tie_word_embeddings") ?? false)
    }

    /// transformers < 5 writes `rope_theta` at the top level; 5.x nests it in `rope_parameters`.
    private static func ropeTheta(_ keys: JSONKeys) throws -> Double {
        if let theta = try keys.optionalDouble("rope_theta") { return theta }
        if case .object(let params)? = keys.values["rope_parameters"] {
            let nested = JSONKeys(params)
            if let type = try nested.optionalString("rope_type"), type != "default" {
                throw ReLoRAError.invalidConfig("rope_type '\(type)' is not supported yet; only 'default' rotary embeddings are")
            }
            if let theta = try nested.optionalDouble("rope_theta") { return theta }
        }
        return 10000
    }

    /// The Hugging Face `config.json` for this architecture (loadable by `LlamaConfig.from_pretrained`).
    public func jsonObject() -> [String: Any] {
        [
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": hiddenSize, "intermediate_size": intermediateSize,
            "num_hidden_layers": numHiddenLayers, "num_attention_heads": numAttentionHeads,
            "num_key_value_heads": numKeyValueHeads, "head_dim": headDim, "vocab_size": vocabSize,
            "rms_norm_eps": rmsNormEps, "rope_theta": ropeTheta,
            "max_position_embeddings": maxPositionEmbeddings, "tie_word_embeddings": tieWordEmbeddings,
            "attention_bias": false, "mlp_bias": false, "torch_dtype": "float32",
        ]
    }
}

