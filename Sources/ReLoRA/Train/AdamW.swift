/// AdamW over a set of named parameter tensors with their gradients. First and second moments live in
/// tensors tagged `.optimizer`; `stepCount` counts applied updates (bias correction uses it, 1-based).
public final class AdamW: @unchecked Sendable {
    public struct Parameter {
        public let name: String
        public let value: Tensor
        public let grad: Tensor
        /// Whether weight decay applies (matrices yes; norm gains and scalars no).
        public let decay: Bool
        /// A LoRA factor (ReLoRA's optimizer reset applies to these only).
        public let isLoRA: Bool
    }

    public let parameters: [Parameter]
    public let m: [Tensor]
    public let v: [Tensor]
    public var stepCount = 0
    public var beta1: Float, beta2: Float, eps: Float, weightDecay: Float
    let backend: Backend

    public init(parameters: [Parameter], backend: Backend, beta1: Float, beta2: Float, eps: Float, weightDecay: Float) {
        self.parameters = parameters
        self.backend = backend
        self.beta1 = beta1; self.beta2 = beta2; self.eps = eps; self.weightDecay = weightDecay
        m = parameters.map { backend.makeTensor($0.value.shape, tag: .optimizer) }
        v = parameters.map { backend.makeTensor($0.value.shape, tag: .optimizer) }
    }

    /// Global L2 norm of all gradients (Double accumulation).
    public func gradientNorm() -> Double {
        parameters.reduce(0.0) { $0 + backend.sumOfSquares($1.grad) }.squareRoot()
    }

    public func scaleGradients(by factor: Float) {
        for p in parameters { backend.scale(p.grad, by: factor) }
    }

    /// One update with learning rate `lr`.
    public func step(lr: Float) {
        stepCount += 1
        for (i, p) in parameters.enumerated() {
            backend.adamw(param: p.value, grad: p.grad, m: m[i], v: v[i], lr: lr, beta1: beta1, beta2: beta2,
                          eps: eps, weightDecay: p.decay ? weightDecay : 0, step: stepCount)
        }
    }
}

extension AdamW {
    /// Every trained tensor of a model (which must have gradients enabled), decaying matrices only.
    public convenience init(model: LlamaModel, beta1: Float, beta2: Float, eps: Float, weightDecay: Float) {
        let params = model.trainableParameters().map { p in
            Parameter(name: p.name, value: p.value, grad: p.grad, decay: p.value.shape.count >= 2, isLoRA: p.isLoRA)
        }
        self.init(parameters: params, backend: model.backend, beta1: beta1, beta2: beta2, eps: eps, weightDecay: weightDecay)
    }
}
