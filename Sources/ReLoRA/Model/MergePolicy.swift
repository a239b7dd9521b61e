/// How a ReLoRA restart stores the merged weight `W + s B A` back into a linear's base weight:
/// `exact` for dense weights, `rtn` (round to nearest) for quantized ones. Stochastic rounding (keyed by
/// `MergeKey`), error compensation and master copies plug in here.
public protocol MergePolicy: Sendable {
    var name: String { get }
    /// Stores `target` (f32 `[out, in]`, the merged weight computed exactly in f32) into `weight`.
    /// Throws when the weight's format cannot hold a value (a diverged run).
    func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) throws
}

/// The RNG key of one tensor's merge at one restart: a policy that draws random numbers (stochastic
/// rounding) uses counters `(seed, stream, element)` so CPU and GPU give the same codes.
public struct MergeKey: Sendable, Equatable {
    public var seed: UInt64
    /// 0 for the first restart.
    public var restart: Int
    /// Index of the linear in the model: `layer * 7 + kind.rawValue`.
    public var tensor: Int

    public init(seed: UInt64, restart: Int, tensor: Int) {
        self.seed = seed; self.restart = restart; self.tensor = tensor
    }

    /// Stream id: distinct per (restart, tensor), and never equal to an init or dropout stream's high bits.
    public var stream: UInt64 { 0x4D45_5247_0000_0000 | (UInt64(restart) << 20) | UInt64(tensor) }
}

/// Dense weights: `W = target`, converted to W's dtype (exact for f32; round to nearest even for bf16).
/// A quantized weight is requantized to nearest (the same as `RoundToNearestMerge`).
public struct ExactMerge: MergePolicy {
    public let name = "exact"
    public init() {}
    public func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) throws {
        try RoundToNearestMerge().store(target, into: weight, key: key, backend: backend)
    }
}

/// Dequantize -> add -> requantize with the reference quantizer, rounding every weight to its nearest
/// code. Updates smaller than half a quantization step are lost (which is why the other policies
/// exist); a zero update leaves every code unchanged (`quantize(dequantize(q)) == q`).
public struct RoundToNearestMerge: MergePolicy {
    public let name = "rtn"
    public init() {}
    public func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) throws {
        switch weight {
        case .dense(let w):
            backend.copy(target, to: w)
        case .quantized(let q):
            if let failure = backend.quantize(target, into: q) { throw failure.error(format: q.format, name: nil) }
        }
    }
}

/// What one restart's merge did, summed over every adapted linear.
public struct MergeReport: Sendable {
    /// Index of this merge (0 for the first).
    public var restart: Int
    public var policy: String
    public var seconds: Double
    /// `||s B A||_F / ||W||_F` over all adapted matrices: how large the merged update was.
    public var relativeUpdate: Double
    /// `||W_new - (W + s B A)||_F / ||s B A||_F`: the fraction of the update the store lost (0 for exact f32).
    public var mergeError: Double
}
