import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint

extension Trainer {
    /// Starts from any model source `ModelSource.open` accepts: a full-rank relora checkpoint (or run
    /// directory), a Hugging Face LLaMA directory (single or sharded safetensors, dense or bitsandbytes 4-bit:
    /// continued pretraining of an existing model; a 4-bit weight's nf4 codes are kept byte for byte where they
    /// can be, see `BitsAndBytes4bit`) or a LLaMA GGUF file.
    ///
    /// From a relora checkpoint: its weights (the LoRA run's frozen W), its step count (the schedule
    /// continues, as in the reference), and Adam's moments and step counter for the dense tensors that
    /// stay trainable (embeddings, norms, head). From a Hugging Face directory or a GGUF file: its weights
    /// only, streamed one tensor at a time (quantized as they arrive when the recipe's `quant` asks; a GGUF
    /// block linear stored in the run's `quant` format keeps its codes byte for byte, `LlamaGGUF.loadWeights`);
    /// the run starts at step 0 with fresh optimizer state. LoRA factors start fresh with zero moments.
    static func warmStart(from path: String, model: LlamaModel, optimizer: AdamW, seed: UInt64,
                          log: @escaping (String) -> Void) throws -> TrainingState {
        let source = try ModelSource.open(path)
        try checkSameArchitecture(source.config, model.config, source: path)
        guard let checkpoint = source.checkpoint else {
            try source.loadWeights(into: model, warn: { log("warning: \($0)") }, quantized: quantizationLog(model, log),
                                   log: log)
            return TrainingState(step: 0, optimizerStep: 0, skippedSteps: 0, tokensSeen: 0, seed: seed)
        }
        let warmState = try TrainingCheckpoint.readState(checkpoint)
        guard !TrainingCheckpoint.hasLoRA(checkpoint, version: warmState.formatVersion) else {
            throw ReLoRAError.invalidConfig("warm_start must be a full-rank checkpoint, a Hugging Face directory or a GGUF file; \(checkpoint) holds LoRA factors (continue it with --resume, or export it with `relora export --format hf` and warm-start from the export)")
        }
        try source.loadWeights(into: model, warn: { log("warning: \($0)") }, quantized: quantizationLog(model, log))
        let moments = try TrainingCheckpoint.openTensors(checkpoint, "optimizer", version: warmState.formatVersion)
        for (i, p) in optimizer.parameters.enumerated() where !p.isLoRA && optimizer.owns(i) {
            try TrainingCheckpoint.loadMoments(optimizer.checkpointEntry(i), from: moments, backend: model.backend)
        }
        optimizer.stepCount = warmState.optimizerStep
        return TrainingState(step: warmState.step, optimizerStep: warmState.optimizerStep, skippedSteps: 0,
                             tokensSeen: warmState.tokensSeen, seed: seed)
    }

    /// Logs each warm-start weight quantized on load with its relative error `||deq(q) - w|| / ||w||`.
    static func quantizationLog(_ model: LlamaModel, _ log: @escaping (String) -> Void) -> (String, Double) -> Void {
        let format = model.quant?.rawValue ?? "dense"
        return { name, error in log(String(format: "quantized %@ to %@: relative error %.3e", name, format, error)) }
    }

    /// The architectures agree; a GGUF file stores rms_norm_eps and rope theta as f32, so those compare at f32.
    static func checkSameArchitecture(_ source: LlamaConfig, _ model: LlamaConfig, source path: String) throws {
        var rounded = model
        rounded.rmsNormEps = Double(Float(model.rmsNormEps))
        rounded.ropeTheta = Double(Float(model.ropeTheta))
        var sourceRounded = source
        sourceRounded.rmsNormEps = Double(Float(source.rmsNormEps))
        sourceRounded.ropeTheta = Double(Float(source.ropeTheta))
        guard sourceRounded == rounded else {
            throw ReLoRAError.invalidConfig(
                "the warm start \(path) has another architecture (hidden \(source.hiddenSize), layers \(source.numHiddenLayers), vocab \(source.vocabSize)) than the recipe's model (hidden \(model.hiddenSize), layers \(model.numHiddenLayers), vocab \(model.vocabSize)); point 'model' at \(LlamaGGUF.isGGUF(path) ? "the GGUF file itself" : "the warm start's config.json")")
        }
    }
}
