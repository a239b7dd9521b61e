import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// Everything a run reads and checks before it allocates anything or writes a file: the recipe (validated,
/// its sampler resolved), the model's config, the token data and the checkpoint a resume continues.
/// The guards that keep a new run away from existing checkpoints live here, so a refused run leaves its
/// run directory exactly as it found it.
struct RunSetup {
    /// The recipe as given, with `sampler` resolved (see `Recipe.sampler`) and, for a new run that names no
    /// `tokenizer`, its warm start's tokenizer (`warmStartTokenizer`).
    let recipe: Recipe
    let config: LlamaConfig
    let sampler: TrainingSampler
    let valTokens: TokenArray?
    /// The checkpoint a resume continues (`checkpoints/latest`); nil for a new run.
    let resumePoint: String?
    /// The run's ranks.
    let worldSize: Int
    /// Lines for the run's log about what the setup chose (the warm start's tokenizer, or why it was not kept).
    let notes: [String]

    init(recipe given: Recipe, resume: Bool, worldSize: Int = 1) throws {
        self.worldSize = worldSize
        try given.validate()  // recipes built in code skip the decoder's checks
        guard given.gradAccum % worldSize == 0 else {
            throw ReLoRAError.invalidConfig(
                "grad_accum \(given.gradAccum) counts the micro-batches of a step over all ranks and must be divisible by the \(worldSize) ranks; set grad_accum to a multiple of \(worldSize) (micro_batch is per rank)")
        }
        var recipe = given
        config = try recipe.modelConfig()
        guard recipe.seqLen <= config.maxPositionEmbeddings else {
            throw ReLoRAError.invalidConfig("seq_len \(recipe.seqLen) exceeds the model's max_position_embeddings \(config.maxPositionEmbeddings)")
        }
        let train = try TokenArray(npyPath: recipe.trainData)
        try Self.checkVocabulary(train, config)
        // A new run never goes where checkpoints are; a resume only from the checkpoint `latest` names.
        if resume {
            guard let path = try TrainingCheckpoint.resumePoint(runDir: recipe.runDir) else {
                throw ReLoRAError.invalidData("\(recipe.runDir) has no checkpoint to resume from; start the run without --resume")
            }
            resumePoint = path
            try Self.checkSameBatch(recipe, checkpoint: path)
        } else {
            try TrainingCheckpoint.requireNoCheckpoints(runDir: recipe.runDir)
            resumePoint = nil
        }
        recipe.sampler = try Self.resolveSampler(recipe, train: train, resumingFrom: resumePoint)
        var notes: [String] = []
        if !resume, let (tok, note) = try Self.warmStartTokenizer(recipe) {
            recipe.tokenizer = tok
            notes.append(note)
        }
        self.notes = notes
        switch recipe.sampler! {
        case .random: sampler = .random(try WindowSampler(tokens: train, seqLen: recipe.seqLen, seed: recipe.seed))
        case .epoch:
            sampler = .epoch(try EpochSampler(tokens: train, seqLen: recipe.seqLen, microBatch: recipe.microBatch,
                                              gradAccum: recipe.gradAccum, seed: recipe.seed))
        }
        if let v = recipe.valData {
            let val = try TokenArray(npyPath: v)
            try Self.checkVocabulary(val, config)
            guard val.count >= recipe.seqLen else {
                throw ReLoRAError.invalidData("\(v) has \(val.count) tokens, fewer than one evaluation window of seq_len \(recipe.seqLen)")
            }
            valTokens = val
        } else {
            valTokens = nil
        }
        try recipe.loraConfig?.validate(for: config)
        self.recipe = recipe
    }

    /// The sampler of a run: on a resume the checkpoint's (a recipe naming another one is an error: the
    /// data position of a run is its step under the sampler it started with); else the recipe's, or
    /// `SamplerMode.automatic` for the training data and the run's budget.
    static func resolveSampler(_ recipe: Recipe, train: TokenArray, resumingFrom checkpoint: String?) throws -> SamplerMode {
        if let checkpoint {
            let saved = try TrainingCheckpoint.readState(checkpoint).sampler
            guard let mode = SamplerMode(stateName: saved) else {
                throw ReLoRAError.invalidData("\(checkpoint)/state.json names sampler '\(saved)', which this version does not know")
            }
            if let asked = recipe.sampler, asked != mode {
                throw ReLoRAError.invalidData(
                    "the checkpoint was made with sampler '\(mode.rawValue)' but the recipe says '\(asked.rawValue)'; a run cannot change samplers (its data position is its step under the sampler it started with): resume with sampler '\(mode.rawValue)' or start a new run")
            }
            return mode
        }
        return recipe.sampler ?? .automatic(windows: (train.count - 1) / recipe.seqLen, needed: recipe.steps * recipe.microBatch * recipe.gradAccum)
    }

    /// A resume keeps the run's batch: the data position of a run is its step under `seq_len`, `micro_batch`
    /// (per rank) and `grad_accum` (the step's micro-batches over all ranks), so any number of ranks may
    /// continue it, but another batch would train on other tokens than the run's (one sentence).
    static func checkSameBatch(_ recipe: Recipe, checkpoint: String) throws {
        guard let data = FileManager.default.contents(atPath: checkpoint + "/recipe.json"),
              let saved = try? JSONDecoder().decode([String: JSONValue].self, from: data) else { return }  // checked by the load
        let asked: [(String, Int)] = [("seq_len", recipe.seqLen), ("micro_batch", recipe.microBatch), ("grad_accum", recipe.gradAccum)]
        for (key, value) in asked {
            guard case .number(let had)? = saved[key], Int(had) != value else { continue }
            throw ReLoRAError.invalidConfig(
                "the checkpoint \(checkpoint) was trained with \(key) \(Int(had)), the resume asks for \(value): a run's data position is its step under the batch it started with (seq_len, micro_batch per rank, grad_accum over all ranks); resume with \(key) \(Int(had)), or start a new run with warm_start")
        }
    }

    static func checkVocabulary(_ tokens: TokenArray, _ config: LlamaConfig) throws {
        guard tokens.count > 0 else { throw ReLoRAError.invalidData("\(tokens.path) holds no tokens") }
        let lo = tokens.minValue(), hi = tokens.maxValue()
        if lo < 0 || hi >= Int64(config.vocabSize) {
            throw ReLoRAError.invalidData(
                "\(tokens.path) holds token ids in [\(lo), \(hi)] but the model's vocabulary is [0, \(config.vocabSize)); tokenize with the matching tokenizer or fix vocab_size")
        }
    }

    /// Prepares `backend` for the run before the model is built: `master_copies: file` maps the master
    /// copies from files in the run directory (after checking it has room: one sentence if not), and on a
    /// device the plan (of rank `rank` of the run's ranks, with the device's own estimates) must fit the
    /// memory it has free now, which already excludes the context and the backend's scratch. Returns the
    /// plan, if planned.
    func prepare(_ backend: Backend, rank: Int = 0, log: (String) -> Void) throws -> MemoryPlan? {
        if recipe.masterCopies == .file {
            if recipe.keepsMasterCopies {
                try Self.mapMasterCopies(recipe, config: config, backend: backend)
            } else {
                log("note: master_copies 'file' has no effect: only merge_policy 'master' (with quantized weights) keeps master copies")
            }
        }
        try LlamaModel.checkSupported(config, on: backend)
        if recipe.reuseDequantized == true, recipe.quant == .none || recipe.checkpointing != .block || !backend.dequantizesWholeWeight {
            log("note: reuse_dequantized has no effect: it needs quantized weights (quant), checkpointing 'block' and a device whose quantized linears dequantize whole weights (cuda)")
        }
        guard let device = backend as? DeviceBackend else { return nil }
        let free = device.deviceMemory().free
        let plan = try MemoryPlanner.requireFits(recipe, config: config, device: device.device, budget: free,
                                                 what: "the free memory of \(device.deviceName)", worldSize: worldSize, rank: rank,
                                                 gpu: device.gpu, budgetAfterStart: true)
        log("memory plan: needs \(formatBytes(plan.need)) of \(formatBytes(free)) free on \(device.deviceName) "
            + "(tensors' peak \(formatBytes(plan.report.peakTotal)); allocator's blocks and estimated overheads included)")
        if plan.dequantizedCache > 0 {
            log("reuse_dequantized: each block's dequantized weights are kept from its recompute to its backward (a \(formatBytes(plan.dequantizedCache)) cache)")
        } else if plan.dequantizedCacheLeftOut > 0 {
            log("reuse_dequantized auto: off, its \(formatBytes(plan.dequantizedCacheLeftOut)) cache does not fit; the backward dequantizes each weight again")
        }
        return plan
    }

    /// `master_copies: file` on a backend that can keep host tensors in mapped files (the CPU backend).
    static func mapMasterCopies(_ recipe: Recipe, config: LlamaConfig, backend: Backend) throws {
        guard let host = backend as? HostFileBacking else {
            throw ReLoRAError.invalidConfig("'master_copies' 'file' is for the cpu device; on \(backend.name) the master copies live in pinned host memory: drop the key or set it to 'ram'")
        }
        try Files.createDirectory(recipe.runDir)
        let needed = try MemoryPlanner.plan(recipe, config: config, device: .cpu).report.hostPeakTotal
        var fs = statvfs()
        if statvfs(recipe.runDir, &fs) == 0 {
            let free = Int(fs.f_bavail) * Int(fs.f_frsize)
            guard free >= needed else {
                throw ReLoRAError.invalidConfig("'master_copies' 'file' needs \(formatBytes(needed)) in \(recipe.runDir), which has \(formatBytes(free)) free; free space there, choose another run_dir, or use 'ram'")
            }
        }
        host.hostFileDirectory = recipe.runDir
    }

    /// A new run's files: the run directory, `recipe.json` (the resolved recipe) and the tokenizer the recipe
    /// names (so the run directory alone can sample, tokenize and export): a `tokenizer.json` or
    /// `tokenizer.model` copied under its own name (a `tokenizer.json` with a `tokenizer.model` beside it brings
    /// both), a GGUF model's tokenizer as a vocabulary-only
    /// `tokenizer.gguf` (`TokenizerLoader.writeVocabularyOnly`: its `tokenizer.*` metadata, no tensors).
    func createRunDirectory() throws {
        try Files.createDirectory(recipe.runDir)
        try writeRecipe()
        if var tok = recipe.tokenizer {
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: tok, isDirectory: &isDirectory), isDirectory.boolValue {
                guard let file = TokenizerLoader.file(in: tok) else {
                    throw ReLoRAError.invalidFile(path: tok, reason: "the recipe's tokenizer directory has neither a tokenizer.json nor a tokenizer.model")
                }
                tok = file
            }
            // A GGUF model holds its tokenizer in its metadata; the run keeps that alone, not the model.
            if LlamaGGUF.isGGUF(tok) {
                try TokenizerLoader.writeVocabularyOnly(from: try GGUFFile(path: tok), to: recipe.runDir + "/tokenizer.gguf")
                return
            }
            guard let data = FileManager.default.contents(atPath: tok) else {
                throw ReLoRAError.invalidFile(path: tok, reason: "cannot read the tokenizer named by the recipe")
            }
            // A SentencePiece model keeps its name: the commands that read the run look for either file.
            let name = tok.hasSuffix(".model") ? "tokenizer.model" : "tokenizer.json"
            try writeFileAtomically(data, to: recipe.runDir + "/" + name)
            // A Hugging Face directory's tokenizer.json with a tokenizer.model beside it (Llama 2's pair): the run
            // keeps the .model too, which a GGUF export writes in the tokenizer.json's stead (llama.cpp has the
            // .model's rules) once it has checked that the two tokenize alike. Training reads tokenizer.json.
            let sibling = (tok as NSString).deletingLastPathComponent + "/tokenizer.model"
            if (tok as NSString).lastPathComponent == "tokenizer.json", FileManager.default.fileExists(atPath: sibling) {
                guard let model = FileManager.default.contents(atPath: sibling) else {
                    throw ReLoRAError.invalidFile(path: sibling, reason: "cannot read the tokenizer.model beside the tokenizer.json")
                }
                try writeFileAtomically(model, to: recipe.runDir + "/tokenizer.model")
            }
        }
    }

    /// The tokenizer a run keeps when its recipe names none: its warm start's (`ModelSource.tokenizerPath`: a
    /// Hugging Face directory's tokenizer.json or tokenizer.model, a GGUF file's metadata tokenizer, a relora
    /// run's tokenizer), since a warm start's data must be tokenized with it anyway, and a line saying so; nil
    /// without a warm start or when it has none. A tokenizer relora cannot read (a GGUF `gpt2` with another
    /// pre-tokenizer, ...) is not kept, and the line says why: the run trains without one, as it did before a
    /// warm start's tokenizer was kept, rather than being refused for a tokenizer nobody named.
    static func warmStartTokenizer(_ recipe: Recipe) throws -> (path: String?, note: String)? {
        guard recipe.tokenizer == nil, let warm = recipe.warmStart else { return nil }
        let source = try ModelSource.open(warm)
        guard let path = source.tokenizerPath else { return nil }
        do {
            _ = try source.tokenizer()
        } catch {
            return (nil, "warning: the run does not keep the warm start's tokenizer (\(error)); name a tokenizer in the recipe for `relora sample` and exports to have one")
        }
        return (path, "tokenizer: the warm start's (\(path)), kept in the run")
    }
}

extension RunSetup {
    /// `recipe.json`, the recipe the run goes on with: written by a new run, and rewritten by a resume, whose
    /// `--set` overrides (more `steps`, another `eval_every`) are then what `relora runs`, `relora plot` and a
    /// later `--resume` read.
    func writeRecipe() throws {
        try Files.writeJSON(recipe.jsonObject(), to: recipe.runDir + "/recipe.json")
    }
}

/// The model and the optimizer a recipe trains, built one way for the trainer and the memory planner (so
/// a plan allocates exactly what a run does): the model with the recipe's checkpointing, LoRA, frozen-weight
/// format and master copies, gradients enabled, and AdamW with its moments in the recipe's precision,
/// for rank `rank` of `worldSize`: with `shard_optimizer` and more than one rank, AdamW keeps the state of
/// the rank's share of the tensors only (`OptimizerShards`).
enum TrainingModel {
    static func build(_ recipe: Recipe, config: LlamaConfig, backend: Backend, rank: Int = 0,
                      worldSize: Int = 1) -> (model: LlamaModel, optimizer: AdamW) {
        let model = LlamaModel(config: config, backend: backend, checkpointing: recipe.checkpointing, lora: recipe.loraConfig,
                               quant: recipe.quant.format, masterCopies: recipe.keepsMasterCopies,
                               reusesDequantizedWeights: recipe.reuseDequantized ?? true)
        model.dropoutSeed = recipe.seed
        model.enableGradients()
        let parameters = model.trainableParameters()
        let shards = recipe.shardOptimizer && worldSize > 1
            ? OptimizerShards(parameters: parameters, precision: backend.precision, states: recipe.optimizerStates, worldSize: worldSize)
            : nil
        let optimizer = AdamW(parameters: parameters, backend: backend, beta1: Float(recipe.adamBeta1), beta2: Float(recipe.adamBeta2),
                              eps: Float(recipe.adamEps), weightDecay: Float(recipe.weightDecay), states: recipe.optimizerStates,
                              shards: shards, rank: rank)
        return (model, optimizer)
    }
}
