import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint

extension Trainer {
    /// Starts from a full-rank relora checkpoint (or run directory) or a Hugging Face LLaMA directory
    /// (single or sharded safetensors, dense or bitsandbytes 4-bit: continued pretraining of an existing
    /// model; a 4-bit weight's nf4 codes are kept byte for byte where they can be, see `BitsAndBytes4bit`).
    ///
    /// From a relora checkpoint: its weights (the LoRA run's frozen W), its step count (the schedule
    /// continues, as in the reference), and Adam's moments and step counter for the dense tensors that
    /// stay trainable (embeddings, norms, head). From a Hugging Face directory: its weights only; the
    /// run starts at step 0 with fresh optimizer state. LoRA factors start fresh with zero moments.
    static func warmStart(from path: String, model: LlamaModel, optimizer: AdamW, seed: UInt64,
                          log: @escaping (String) -> Void) throws -> TrainingState {
        // A training checkpoint (it has state.json) also holds config.json and, in format 1 or when a tensor
        // file is stored uncompressed, model.safetensors: check for it first, or its step, optimizer state
        // and data position would be dropped as if it were a Hugging Face export.
        let isTrainingCheckpoint = FileManager.default.fileExists(atPath: path + "/state.json")
        if !isTrainingCheckpoint && HFCheckpoint.isModelDirectory(path) {
            let config = try HFCheckpoint.readConfig(directory: path)
            try checkSameArchitecture(config, model.config, source: path)
            try HFCheckpoint.loadWeights(directory: path, into: model, warn: { log("warning: \($0)") },
                                         quantized: quantizationLog(model, log), log: log)
            return TrainingState(step: 0, optimizerStep: 0, skippedSteps: 0, tokensSeen: 0, seed: seed)
        }
        let checkpoint = try TrainingCheckpoint.resolve(path).checkpoint
        let warmState = try TrainingCheckpoint.readState(checkpoint)
        let config = try LlamaConfig(contentsOf: checkpoint + "/config.json")
        try checkSameArchitecture(config, model.config, source: checkpoint)
        guard !TrainingCheckpoint.hasLoRA(checkpoint, version: warmState.formatVersion) else {
            throw ReLoRAError.invalidConfig("warm_start must be a full-rank checkpoint or a Hugging Face model directory; \(checkpoint) holds LoRA factors (continue it with --resume, or export it with `relora export --format hf` and warm-start from the export)")
        }
        let weights = try TrainingCheckpoint.openTensors(checkpoint, "model", version: warmState.formatVersion)
        let report = quantizationLog(model, log)
        for (name, slot) in model.weights.slots() {
            if let error = try TensorIO.load(slot, from: weights, name, backend: model.backend) { report(name, error) }
        }
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

    static func checkSameArchitecture(_ source: LlamaConfig, _ model: LlamaConfig, source path: String) throws {
        guard source == model else {
            throw ReLoRAError.invalidConfig(
                "the warm start \(path) has another architecture (hidden \(source.hiddenSize), layers \(source.numHiddenLayers), vocab \(source.vocabSize)) than the recipe's model (hidden \(model.hiddenSize), layers \(model.numHiddenLayers), vocab \(model.vocabSize)); point 'model' at the warm start's config.json")
        }
    }
}
