import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
/// The paper's control baseline: a full-rank model with as many trainable parameters as a (Re)LoRA run
/// trains. Same depth, vocabulary, head dimension and FFN/hidden ratio as the base model; the width
/// is chosen so that the full-rank parameter count is closest to the target.
public enum ControlBaseline {
    /// Parameters a `lora`/`relora` run of `model` trains: embeddings, head and norms (dense) plus the
    /// LoRA factors of the seven linears of every block (`r * (in + out)` each).
    public static func trainableCount(model c: LlamaConfig, rank r: Int, trainableScale: Bool = false) -> Int {
        let dense = c.vocabSize * c.hiddenSize * (c.tieWordEmbeddings ? 1 : 2) + c.hiddenSize * (2 * c.numHiddenLayers + 1)
        let perBlock = LinearKind.allCases.reduce(0) { acc, kind in
            let (out, inF) = kind.shape(c)
            return acc + r * (out + inF) + (trainableScale ? 1 : 0)
        }
        return dense + c.numHiddenLayers * perBlock
    }

    /// The narrower config whose `parameterCount` is closest to `target`: the head dimension stays,
    /// the number of heads shrinks in steps of the kv group size (so grouped-query attention stays
    /// valid), and the FFN keeps the base model's FFN/hidden ratio.
    public static func config(matching target: Int, like base: LlamaConfig) throws -> LlamaConfig {
        let ratio = Double(base.intermediateSize) / Double(base.hiddenSize)
        let group = base.numAttentionHeads / base.numKeyValueHeads
        var best: LlamaConfig?
        var heads = group
        while heads * base.headDim <= base.hiddenSize {
            let hidden = heads * base.headDim
            let candidate = try LlamaConfig(
                hiddenSize: hidden, intermediateSize: max(1, Int((ratio * Double(hidden)).rounded())),
                numHiddenLayers: base.numHiddenLayers, numAttentionHeads: heads, numKeyValueHeads: heads / group,
                vocabSize: base.vocabSize, headDim: base.headDim, rmsNormEps: base.rmsNormEps, ropeTheta: base.ropeTheta,
                maxPositionEmbeddings: base.maxPositionEmbeddings, tieWordEmbeddings: base.tieWordEmbeddings)
            if best == nil || abs(candidate.parameterCount - target) < abs(best!.parameterCount - target) { best = candidate }
            heads += group
        }
        guard let found = best else { throw ReLoRAError.invalidConfig("no narrower config exists for this model") }
        return found
    }
}
