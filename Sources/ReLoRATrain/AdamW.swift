import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// AdamW over a set of named parameter tensors with their gradients. First and second moments live in
/// tensors tagged `.optimizer` (dtype `precision.optimizerStates`), or, with `states: .int8`, blockwise in
/// 8 bits for every tensor of at least `BlockwiseMoments.minimumCount` entries (`eightBit[i]`; `m[i]` and
/// `v[i]` are then their u8 codes); a parameter whose working copy is narrower than f32 (bf16 on CUDA) gets
/// an f32 master copy (tag `.masterWeights`) that the update runs on and that is converted back into the
/// working copy. `stepCount` counts applied updates (bias correction uses it, 1-based).
///
/// Sharded (`shards`, a data-parallel run with `shard_optimizer`): this rank keeps the moments and master
/// copies of its own tensors only (`owns(i)`), and `step`, `scaleGradients` and the resets touch only those;
/// `parameters` still lists every trained tensor with its working copy and gradient, which every rank holds.
/// The trainer makes the updated working copies identical on every rank (`Trainer.shareUpdatedValues`).
public final class AdamW {
    public struct Parameter {
        public let name: String
        public let value: Tensor
        public let grad: Tensor
        /// Whether weight decay applies (matrices yes; norm gains and scalars no).
        public let decay: Bool
        /// A LoRA factor (ReLoRA's optimizer reset applies to these only).
        public let isLoRA: Bool
        /// Which LoRA tensor, nil for dense ones.
        public let loraFactor: LoRAFactor?
        /// f32 master copy when `value` is narrower, else nil (the update runs on `value`). Nil also for a
        /// tensor another rank owns (sharded).
        public let master: Tensor?
    }

    public let parameters: [Parameter]
    /// First and second moments: f32 values, or the codes of `eightBit[i]`; nil for a tensor another rank owns.
    public let m: [Tensor?]
    public let v: [Tensor?]
    /// The 8-bit moments of parameter i (codes `m[i]`, `v[i]` and their block scales), nil where f32 (or not owned).
    public let eightBit: [(m: BlockwiseMoments, v: BlockwiseMoments)?]
    /// Which rank keeps each tensor's state, and this rank; nil when every rank keeps every tensor's.
    public let shards: OptimizerShards?
    public let rank: Int
    /// How moments are stored (`keepsEightBit` says which tensors keep 8-bit ones).
    public let states: OptimizerStates
    public var stepCount = 0
    public var beta1: Float, beta2: Float, eps: Float, weightDecay: Float
    let backend: Backend
    /// The tensors of `gradientNorm` (all gradients) and `step` (this rank's updates) for the backend's
    /// multi-tensor ops, made once: the set of trained tensors never changes while the optimizer lives.
    let group: OptimizerGroup

    /// `shards` (with this process's `rank`): keep and update only the tensors `shards` gives `rank`.
    public init(parameters: [TrainableParameter], backend: Backend, beta1: Float, beta2: Float, eps: Float, weightDecay: Float,
                states: OptimizerStates = .f32, shards: OptimizerShards? = nil, rank: Int = 0) {
        precondition(shards.map { $0.owner.count == parameters.count && (0..<$0.worldSize).contains(rank) } ?? true,
                     "AdamW: a sharding of \(shards?.owner.count ?? 0) tensors for \(parameters.count)")
        self.backend = backend
        self.beta1 = beta1; self.beta2 = beta2; self.eps = eps; self.weightDecay = weightDecay
        self.shards = shards
        self.rank = rank
        self.states = states
        let p = backend.precision
        let owned = parameters.indices.map { i in shards.map { $0.owner[i] == rank } ?? true }
        self.parameters = zip(parameters, owned).map { t, mine in
            let master = mine && p.needsMaster(t.value.dtype) ? backend.makeTensor(t.value.shape, dtype: .f32, tag: .masterWeights) : nil
            return Parameter(name: t.name, value: t.value, grad: t.grad, decay: t.value.shape.count >= 2, isLoRA: t.isLoRA,
                             loraFactor: t.loraFactor, master: master)
        }
        let eightBit = zip(parameters, owned).map { t, mine -> (m: BlockwiseMoments, v: BlockwiseMoments)? in
            guard mine, Self.keepsEightBit(count: t.value.count, states: states) else { return nil }
            return (BlockwiseMoments(backend: backend, shape: t.value.shape, isSigned: true, tag: .optimizer),
                    BlockwiseMoments(backend: backend, shape: t.value.shape, isSigned: false, tag: .optimizer))
        }
        self.eightBit = eightBit
        func moments(_ codes: ((m: BlockwiseMoments, v: BlockwiseMoments)) -> Tensor) -> [Tensor?] {
            parameters.indices.map { i in
                guard owned[i] else { return nil }
                return eightBit[i].map(codes) ?? backend.makeTensor(parameters[i].value.shape, dtype: p.optimizerStates, tag: .optimizer)
            }
        }
        m = moments { $0.m.codes }
        v = moments { $0.v.codes }
        let m = self.m, v = self.v, all = self.parameters
        let updates = all.indices.filter { owned[$0] }.map { i -> OptimizerGroup.Update in
            let p = all[i]
            let moments: OptimizerGroup.Moments = eightBit[i].map { .eightBit(m: $0.m, v: $0.v) } ?? .f32(m: m[i]!, v: v[i]!)
            return OptimizerGroup.Update(param: p.master ?? p.value, grad: p.grad, moments: moments,
                                         working: p.master == nil ? nil : p.value, decay: p.decay)
        }
        group = OptimizerGroup(gradients: all.map(\.grad), updates: updates)
    }

    /// Every trained tensor of a model (which must have gradients enabled), decaying matrices only.
    public convenience init(model: LlamaModel, beta1: Float, beta2: Float, eps: Float, weightDecay: Float,
                            states: OptimizerStates = .f32, shards: OptimizerShards? = nil, rank: Int = 0) {
        self.init(parameters: model.trainableParameters(), backend: model.backend, beta1: beta1, beta2: beta2,
                  eps: eps, weightDecay: weightDecay, states: states, shards: shards, rank: rank)
    }

    /// Whether a tensor of `count` entries keeps 8-bit moments under `states` (smaller ones keep f32).
    public static func keepsEightBit(count: Int, states: OptimizerStates) -> Bool {
        states == .int8 && count >= BlockwiseMoments.minimumCount
    }

    /// Bytes of optimizer state a trained tensor of `count` entries and working dtype `dtype` needs on a
    /// backend of `precision`: its two moments (f32 in `precision.optimizerStates`, or 8-bit codes with
    /// an f32 scale per 256 entries) and an f32 master copy where the working copy is narrower. What a
    /// sharded optimizer balances over the ranks.
    public static func stateBytes(count: Int, dtype: DType, precision: Precision, states: OptimizerStates) -> Int {
        let moments = keepsEightBit(count: count, states: states)
            ? 2 * (count + 4 * BlockwiseMoments.blocks(count)) : 2 * count * precision.optimizerStates.byteSize
        return moments + (precision.needsMaster(dtype) ? 4 * count : 0)
    }

    /// Whether this rank keeps parameter i's state and runs its update.
    public func owns(_ i: Int) -> Bool { shards.map { $0.owner[i] == rank } ?? true }

    /// Copies the working values into the master copies (after the values were initialised or loaded, or
    /// re-initialised by a restart: `which` chooses), for the tensors this rank owns.
    public func refreshMasterCopies(_ which: (Parameter) -> Bool = { _ in true }) {
        for p in parameters where which(p) { if let master = p.master { backend.copy(p.value, to: master) } }
    }

    /// Zeroes every trained tensor's gradient, the start of a step (`Backend.zeroGradients`: on a device one launch
    /// for all of them; the model's `zeroGradients` zeroes the same tensors one by one).
    public func zeroGradients() {
        backend.zeroGradients(group)
    }

    /// Global L2 norm of all gradients (`Backend.gradientNorm(_:clip:)`: one scalar read back), deciding the clip
    /// factor the next `step` applies to the gradients it reads: `clip / norm` when `clip > 0` and the norm
    /// exceeds it, else none. A non-finite norm is the caller's to act on (skip the step).
    public func gradientNorm(clip: Double = 0) -> Double {
        backend.gradientNorm(group, clip: clip)
    }

    /// One update with learning rate `lr`, of the tensors this rank owns, their gradients first scaled by the
    /// factor the last `gradientNorm` decided (`Backend.adamwStep`: on a device, a fixed number of launches).
    public func step(lr: Float) {
        stepCount += 1
        backend.adamwStep(group, lr: lr, beta1: beta1, beta2: beta2, eps: eps, weightDecay: weightDecay, step: stepCount)
    }

    /// ReLoRA's optimizer reset: prunes the first and second moments of the LoRA parameters by `rule`
    /// (each tensor separately, m and v separately, as the reference implementation does), keyed by
    /// (seed, restart, parameter). Returns the fractions of LoRA moment entries zeroed (of this rank's
    /// tensors when sharded; `Trainer.resetAfterMerge` counts over all ranks).
    public func resetLoRAMoments(_ rule: PruneRule?, seed: UInt64, restart: Int) -> (m: Double, v: Double) {
        resetLoRAMoments(seed: seed, restart: restart) { _ in rule.map { .separately($0) } ?? .keep }
    }

    /// ReLoRA's optimizer reset in `mode` at `ratio` (see `OptimizerResetMode`), applied to each LoRA
    /// tensor's moments as `mode.reset(for:ratio:)` says. Returns the fractions of LoRA moment entries zeroed.
    public func resetLoRAMoments(_ mode: OptimizerResetMode, ratio: Double, seed: UInt64, restart: Int) -> (m: Double, v: Double) {
        resetLoRAMoments(seed: seed, restart: restart) { mode.reset(for: $0.loraFactor ?? .b, ratio: ratio) }
    }

    func resetLoRAMoments(seed: UInt64, restart: Int, _ reset: (Parameter) -> MomentReset) -> (m: Double, v: Double) {
        resetLoRAMomentCounts(seed: seed, restart: restart, reset).fractions
    }

    /// Entry counts of a reset, which ranks of a sharded optimizer add up before dividing.
    public struct ResetCounts: Sendable, Equatable {
        public var zeroedM = 0, zeroedV = 0, total = 0
        public var fractions: (m: Double, v: Double) {
            (Double(zeroedM) / Double(max(1, total)), Double(zeroedV) / Double(max(1, total)))
        }
    }

    /// The reset of the LoRA tensors this rank owns, with its entry counts.
    func resetLoRAMomentCounts(seed: UInt64, restart: Int, _ reset: (Parameter) -> MomentReset) -> ResetCounts {
        var zeroedM = 0, zeroedV = 0, total = 0
        for (i, p) in parameters.enumerated() where p.isLoRA && owns(i) {
            let stream = UInt64(restart) << 32 | UInt64(i) << 1
            let action = reset(p)
            if action == .keep {
                total += p.value.count
                continue
            }
            // 8-bit moments are pruned as values: dequantized into f32 scratch, pruned, requantized.
            withF32Moments(i) { m, v in
                switch action {
                case .keep:
                    break
                case .separately(let rule):
                    zeroedM += backend.prune(m, rule, seed: seed, stream: stream)
                    zeroedV += backend.prune(v, rule, seed: seed, stream: stream | 1)
                case .jointly(let ratio):
                    // Ranking by |m| / (sqrt(v) + eps') with eps' = eps * sqrt(1 - beta2^t) orders the positions
                    // exactly like the bias-corrected step |m^| / (sqrt(v^) + eps) (the corrections are
                    // per-tensor constants: m^ = m / (1 - beta1^t), v^ = v / (1 - beta2^t)).
                    let t = Double(max(1, stepCount))
                    let epsCorrected = Float(Double(eps) * (1 - pow(Double(beta2), t)).squareRoot())
                    let zeroed = backend.pruneMoments(m: m, v: v, ratio: ratio, eps: epsCorrected)
                    zeroedM += zeroed
                    zeroedV += zeroed
                case .zero:
                    backend.zero(m)
                    backend.zero(v)
                    zeroedM += p.value.count
                    zeroedV += p.value.count
                }
            }
            total += p.value.count
        }
        return ResetCounts(zeroedM: zeroedM, zeroedV: zeroedV, total: total)
    }

    /// Runs `body` on parameter i's moments as f32 tensors: the moments themselves, or, for 8-bit ones, f32
    /// scratch (tag `.workspace`) dequantized before and requantized after.
    func withF32Moments(_ i: Int, _ body: (Tensor, Tensor) -> Void) {
        guard let q = eightBit[i] else { return body(m[i]!, v[i]!) }
        let shape = parameters[i].value.shape
        let mf = backend.makeTensor(shape, dtype: .f32, tag: .workspace, zeroed: false)
        let vf = backend.makeTensor(shape, dtype: .f32, tag: .workspace, zeroed: false)
        backend.dequantizeMoments(q.m, into: mf)
        backend.dequantizeMoments(q.v, into: vf)
        body(mf, vf)
        backend.quantizeMoments(mf, into: q.m)
        backend.quantizeMoments(vf, into: q.v)
    }
}

extension AdamW {
    /// The moments this rank keeps, in parameter order (the tensors themselves: loading writes into them).
    /// A sharded optimizer's save adds the other ranks' (`Trainer.momentsForSave`).
    public var checkpointMoments: CheckpointMoments {
        CheckpointMoments(parameters.indices.filter(owns).map { checkpointEntry($0) })
    }

    /// Parameter i's moments as a checkpoint entry (i must be owned).
    func checkpointEntry(_ i: Int) -> CheckpointMoments.Entry {
        CheckpointMoments.Entry(name: parameters[i].name, m: m[i]!, v: v[i]!, eightBit: eightBit[i], master: parameters[i].master)
    }
}
