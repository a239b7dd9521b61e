import CReLoRA
import Foundation
import ReLoRACore
import ReLoRAFormats

/// Autoregressive sampling. No KV cache yet: every new token re-runs the forward over the context
/// (at most `max_position_embeddings` tokens, older ones dropped), which is fine for the small models
/// this runs on today and keeps one code path for training and generation.
public enum Generator {
    public struct Options: Sendable {
        public var maxTokens = 200
        /// 0 means greedy (argmax).
        public var temperature: Double = 0.8
        /// Keep only the k most likely tokens (0 = all).
        public var topK = 40
        public var seed: UInt64 = 0
        /// Stop early when this token is produced.
        public var stopToken: Int32?
        public init() {}
    }

    /// Returns only the generated ids (not the prompt). `onToken` sees each id as it is produced.
    public static func generate(model: LlamaModel, prompt: [Int32], options: Options,
                                onToken: ((Int32) -> Void)? = nil) throws -> [Int32] {
        guard !prompt.isEmpty else { throw ReLoRAError.usage("the prompt encodes to no tokens; give a non-empty --prompt") }
        guard options.temperature >= 0, options.topK >= 0, options.maxTokens >= 0 else {
            throw ReLoRAError.usage("temperature, top-k and max-tokens must be non-negative")
        }
        let vocab = model.config.vocabSize
        var context = prompt
        var out: [Int32] = []
        for i in 0..<options.maxTokens {
            let window = Array(context.suffix(model.config.maxPositionEmbeddings))
            let logits = try model.logits(inputs: window, batch: 1, seqLen: window.count)
            let last = Array(logits[((window.count - 1) * vocab)..<(window.count * vocab)])
            let u = Double(relora_rng_u64(options.seed, 0x5A4D_504C, UInt64(i)) >> 11) * 0x1p-53
            let next = Int32(pick(last, temperature: options.temperature, topK: options.topK, uniform: u))
            out.append(next)
            onToken?(next)
            if next == options.stopToken { break }
            context.append(next)
        }
        return out
    }

    /// Index drawn from softmax(logits / temperature) restricted to the top k, by inverse CDF at `uniform`.
    static func pick(_ logits: [Float], temperature: Double, topK: Int, uniform: Double) -> Int {
        if temperature == 0 { return logits.indices.max { logits[$0] < logits[$1] } ?? 0 }
        var order = Array(logits.indices)
        if topK > 0 && topK < logits.count {
            order.sort { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
            order = Array(order.prefix(topK))
        }
        let mx = order.map { Double(logits[$0]) }.max() ?? 0
        let weights = order.map { exp((Double(logits[$0]) - mx) / temperature) }
        let total = weights.reduce(0, +)
        var acc = 0.0
        for (j, w) in weights.enumerated() {
            acc += w / total
            if uniform < acc { return order[j] }
        }
        return order.last ?? 0
    }
}
