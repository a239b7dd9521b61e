/// How a ReLoRA restart stores the merged weight `W + s B A` back into a linear's base weight.
/// `exact` (dense weights: a plain f32 store) is the one policy today; the quantized formats add
/// round-to-nearest, stochastic rounding (keyed by `MergeKey`), error compensation and master copies.
public protocol MergePolicy: Sendable {
    var name: String { get }
    /// Stores `target` (f32 `[out, in]`, the merged weight computed exactly in f32) into `weight`.
    func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend)
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
public struct ExactMerge: MergePolicy {
    public let name = "exact"
    public init() {}
    public func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) {
        backend.copy(target, to: weight.dense)
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
