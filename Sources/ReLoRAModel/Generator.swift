import CReLoRA
import Foundation
import ReLoRACore
import ReLoRAFormats

/// Autoregressive sampling, with a KV cache by default: the prompt runs as one forward that keeps every
/// layer's keys and values, then each new token is a one-row forward reading them (`LlamaModel.logits(appending:to:)`),
/// so a token costs O(parameters + context) instead of a forward over the whole context.
///
/// The model sees at most `max_position_embeddings` tokens: when the context outgrows that, the window
/// restarts from its last `max(1, max_position_embeddings / 2)` tokens (with the cache: one prefill of them),
/// so the cost of a restart is spread over the next half window of tokens. `useCache: false` recomputes the
/// forward over the window for every token, with the same windows: the reference the cache is tested against.
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
        /// Decode with a KV cache (false: a full forward over the window for every token).
        public var useCache = true
        public init() {}
    }

    /// Returns only the generated ids (not the prompt). `onToken` sees each id as it is produced;
    /// `onLogits` the next-token logits `[V]` each id was drawn from (tests).
    public static func generate(model: LlamaModel, prompt: [Int32], options: Options,
                                onLogits: (([Float]) -> Void)? = nil,
                                onToken: ((Int32) -> Void)? = nil) throws -> [Int32] {
        guard !prompt.isEmpty else { throw ReLoRAError.usage("the prompt encodes to no tokens; give a non-empty --prompt") }
        guard options.temperature >= 0, options.topK >= 0, options.maxTokens >= 0 else {
            throw ReLoRAError.usage("temperature, top-k and max-tokens must be non-negative")
        }
        let vocab = model.config.vocabSize, maxPositions = model.config.maxPositionEmbeddings
        // As many positions as the run can fill (the context stays within max positions): a short sample of a
        // large model does not hold a cache of max_position_embeddings rows per layer.
        let cache = options.useCache && options.maxTokens > 0
            ? KVCache(model: model, capacity: min(maxPositions, prompt.count + options.maxTokens)) : nil
        var context = prompt
        var start = 0  // the window is context[start...]
        var out: [Int32] = []
        for i in 0..<options.maxTokens {
            var restarted = i == 0
            if context.count - start > maxPositions {
                start = context.count - max(1, maxPositions / 2)
                restarted = true
            }
            let logits: [Float]
            if let cache {
                if restarted {
                    cache.reset()
                    logits = try model.logits(appending: Array(context[start...]), to: cache)
                } else {
                    logits = try model.logits(appending: [context[context.count - 1]], to: cache)
                }
            } else {
                let window = Array(context[start...])
                let all = try model.logits(inputs: window, batch: 1, seqLen: window.count)
                logits = Array(all[((window.count - 1) * vocab)..<(window.count * vocab)])
            }
            onLogits?(logits)
            let u = Double(relora_rng_u64(options.seed, 0x5A4D_504C, UInt64(i)) >> 11) * 0x1p-53
            let next = Int32(pick(logits, temperature: options.temperature, topK: options.topK, uniform: u))
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
