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
        /// f32 master copy when `value` is narrower, else nil (the update runs on `value`).
        public let master: Tensor?
    }

    public let parameters: [Parameter]
    /// First and second moments: f32 values, or the codes of `eightBit[i]`.
    public let m: [Tensor]
    public let v: [Tensor]
    /// The 8-bit moments of parameter i (codes `m[i]`, `v[i]` and their block scales), nil where f32.
    public let eightBit: [(m: BlockwiseMoments, v: BlockwiseMoments)?]
    public var stepCount = 0
    public var beta1: Float, beta2: Float, eps: Float, weightDecay: Float
    let backend: Backend

    public init(parameters: [TrainableParameter], backend: Backend, beta1: Float, beta2: Float, eps: Float, weightDecay: Float,
                states: OptimizerStates = .f32) {
        self.backend = backend
        self.beta1 = beta1; self.beta2 = beta2; self.eps = eps; self.weightDecay = weightDecay
        let p = backend.precision
        self.parameters = parameters.map { t in
            let master = p.needsMaster(t.value.dtype) ? backend.makeTensor(t.value.shape, dtype: .f32, tag: .masterWeights) : nil
            return Parameter(name: t.name, value: t.value, grad: t.grad, decay: t.value.shape.count >= 2, isLoRA: t.isLoRA,
                             loraFactor: t.loraFactor, master: master)
        }
        eightBit = parameters.map { t in
            guard states == .int8, t.value.count >= BlockwiseMoments.minimumCount else { return nil }
            return (BlockwiseMoments(backend: backend, shape: t.value.shape, isSigned: true, tag: .optimizer),
                    BlockwiseMoments(backend: backend, shape: t.value.shape, isSigned: false, tag: .optimizer))
        }
        m = zip(parameters, eightBit).map { $1?.m.codes ?? backend.makeTensor($0.value.shape, dtype: p.optimizerStates, tag: .optimizer) }
        v = zip(parameters, eightBit).map { $1?.v.codes ?? backend.makeTensor($0.value.shape, dtype: p.optimizerStates, tag: .optimizer) }
    }

    /// Every trained tensor of a model (which must have gradients enabled), decaying matrices only.
    public convenience init(model: LlamaModel, beta1: Float, beta2: Float, eps: Float, weightDecay: Float,
                            states: OptimizerStates = .f32) {
        self.init(parameters: model.trainableParameters(), backend: model.backend, beta1: beta1, beta2: beta2,
                  eps: eps, weightDecay: weightDecay, states: states)
    }

    /// Copies the working values into the master copies (after the values were initialised or loaded).
    public func refreshMasterCopies() {
        for p in parameters { if let master = p.master { backend.copy(p.value, to: master) } }
    }

    /// Global L2 norm of all gradients: per-tensor squared norms on the backend, one transfer.
    public func gradientNorm() -> Double {
        backend.sumOfSquares(parameters.map(\.grad)).squareRoot()
    }

    public func scaleGradients(by factor: Float) {
        for p in parameters { backend.scale(p.grad, by: factor) }
    }

    /// One update with learning rate `lr`.
    public func step(lr: Float) {
        stepCount += 1
        for (i, p) in parameters.enumerated() {
            let decay = p.decay ? weightDecay : 0
            if let q = eightBit[i] {
                backend.adamw8bit(param: p.master ?? p.value, grad: p.grad, m: q.m, v: q.v, lr: lr, beta1: beta1, beta2: beta2,
                                  eps: eps, weightDecay: decay, step: stepCount)
            } else {
                backend.adamw(param: p.master ?? p.value, grad: p.grad, m: m[i], v: v[i], lr: lr, beta1: beta1, beta2: beta2,
                              eps: eps, weightDecay: decay, step: stepCount)
            }
            if let master = p.master { backend.copy(master, to: p.value) }
        }
    }

    /// ReLoRA's optimizer reset: prunes the first and second moments of the LoRA parameters by `rule`
    /// (each tensor separately, m and v separately, as the reference implementation does), keyed by
    /// (seed, restart, parameter). Returns the fractions of LoRA moment entries zeroed.
    public func resetLoRAMoments(_ rule: PruneRule?, seed: UInt64, restart: Int) -> (m: Double, v: Double) {
        resetLoRAMoments(seed: seed, restart: restart) { _ in rule.map { .separately($0) } ?? .keep }
    }

    /// ReLoRA's optimizer reset in `mode` at `ratio` (see `OptimizerResetMode`), applied to each LoRA
    /// tensor's moments as `mode.reset(for:ratio:)` says. Returns the fractions of LoRA moment entries zeroed.
    public func resetLoRAMoments(_ mode: OptimizerResetMode, ratio: Double, seed: UInt64, restart: Int) -> (m: Double, v: Double) {
        resetLoRAMoments(seed: seed, restart: restart) { mode.reset(for: $0.loraFactor ?? .b, ratio: ratio) }
    }

    func resetLoRAMoments(seed: UInt64, restart: Int, _ reset: (Parameter) -> MomentReset) -> (m: Double, v: Double) {
        var zeroedM = 0, zeroedV = 0, total = 0
        for (i, p) in parameters.enumerated() where p.isLoRA {
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
        return (Double(zeroedM) / Double(max(1, total)), Double(zeroedV) / Double(max(1, total)))
    }

    /// Runs `body` on parameter i's moments as f32 tensors: the moments themselves, or, for 8-bit ones, f32
    /// scratch (tag `.workspace`) dequantized before and requantized after.
    func withF32Moments(_ i: Int, _ body: (Tensor, Tensor) -> Void) {
        guard let q = eightBit[i] else { return body(m[i], v[i]) }
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
    /// The moments a checkpoint stores and restores, in parameter order (the tensors themselves: loading
    /// writes into them).
    public var checkpointMoments: CheckpointMoments {
        CheckpointMoments(parameters.indices.map {
            CheckpointMoments.Entry(name: parameters[$0].name, m: m[$0], v: v[$0], eightBit: eightBit[$0])
        })
    }
}
