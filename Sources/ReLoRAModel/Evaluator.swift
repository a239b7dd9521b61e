import Foundation
import ReLoRACore
import ReLoRAFormats

/// Mean next-token loss of a model over a 1-D token stream.
public struct EvalResult: Sendable, Equatable {
    /// Mean cross-entropy in nats over every predicted position.
    public var loss: Double
    public var perplexity: Double { exp(loss) }
    /// Number of predicted positions: `windows * (seqLen - 1)`.
    public var tokens: Int
    public var windows: Int
}

public enum Evaluator {
    /// Splits `tokens` into consecutive windows of exactly `seqLen` tokens (the remainder is dropped)
    /// and averages the next-token loss over every position that has a next token inside its window,
    /// i.e. `LlamaForCausalLM(input_ids=window, labels=window).loss` averaged over windows (all windows
    /// have `seqLen - 1` predictions, so the mean of window means equals the mean over tokens).
    /// `progress(windowsDone, windowsTotal)` is called after each batch.
    /// `maxWindows` limits the evaluation to the first windows (periodic evaluation during training).
    public static func evaluate(model: LlamaModel, tokens: TokenArray, seqLen: Int, batch: Int,
                                maxWindows: Int? = nil, progress: ((Int, Int) -> Void)? = nil) throws -> EvalResult {
        guard seqLen >= 2 else { throw ReLoRAError.usage("--seq-len must be at least 2 to predict anything, got \(seqLen)") }
        guard batch >= 1 else { throw ReLoRAError.usage("--batch must be at least 1, got \(batch)") }
        guard seqLen <= model.config.maxPositionEmbeddings else {
            throw ReLoRAError.invalidData(
                "sequence length \(seqLen) exceeds the model's max_position_embeddings \(model.config.maxPositionEmbeddings); use a shorter --seq-len")
        }
        let windows = min(tokens.count / seqLen, maxWindows ?? Int.max)
        guard windows > 0 else {
            throw ReLoRAError.invalidData("\(tokens.path) has \(tokens.count) tokens, fewer than one window of \(seqLen)")
        }
        // Token ids are checked batch by batch by `LlamaModel.loss` (only the windows evaluated are read);
        // a whole-file scan here would reread the validation file at every periodic evaluation.
        // One batch in flight: a batch's loss is read after the next batch is queued, so a device never waits
        // for the host between batches; the sums are added in batch order as before (the same bits).
        var total = 0.0, predicted = 0
        var start = 0
        var inFlight: (loss: PendingLossSum, windowsDone: Int)?
        func settle() {
            guard let (loss, done) = inFlight else { return }
            let result = loss.resolved
            total += result.sum
            predicted += result.tokens
            inFlight = nil
            progress?(done, windows)
        }
        while start < windows {
            let b = min(batch, windows - start)
            var inputs = [Int32](), targets = [Int32]()
            inputs.reserveCapacity(b * seqLen); targets.reserveCapacity(b * seqLen)
            for w in start..<(start + b) {
                let window = tokens.window((w) * seqLen, seqLen)
                inputs += window
                targets += window.dropFirst()
                targets.append(-1)
            }
            let next = try model.enqueueLoss(inputs: inputs, targets: targets, batch: b, seqLen: seqLen)
            settle()
            start += b
            inFlight = (next, start)
        }
        settle()
        return EvalResult(loss: total / Double(predicted), tokens: predicted, windows: windows)
    }
}
