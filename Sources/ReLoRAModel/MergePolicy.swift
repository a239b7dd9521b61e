import ReLoRACore
import ReLoRAFormats
/// How a ReLoRA restart stores the merged weight `W + s B A` back into a linear's base weight, and what
/// the next cycle's factors start from. `AdaptedLinear.merge` is the one place a merge happens: it forms
/// `target = W + s B A` in f32, calls `store`, re-initialises the adapter the standard way (A random,
/// B = 0) and then lets the policy replace those factors (`initializeFactors`, which only `compensate`
/// does). The policies (recipe key `merge_policy`, `MergePolicyKind`):
///
/// | policy | quantized W after the merge | next factors | lost per merge |
/// |---|---|---|---|
/// | `exact` | dense only: W = target | standard | nothing (f32), bf16 rounding |
/// | `rtn` | codes of target, round to nearest | standard | the rounding: every update under half a step |
/// | `stochastic` | codes of target, unbiased stochastic rounding | standard | nothing in expectation |
/// | `compensate` | codes of target, round to nearest | s B A ~ rank-r part of the rounding residual | the residual's rest |
/// | `master` | master = target (f32, host), codes of the master | standard | nothing (the codes never drift) |
public protocol MergePolicy: Sendable {
    var name: String { get }
    /// Stores `target` (f32 `[out, in]`, the merged weight computed exactly in f32) into `weight`.
    /// Throws when the weight's format cannot hold a value (a diverged run).
    func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) throws
    /// Called after `store` and after the adapter was re-initialised (A random, B = 0), with
    /// `residual = target - W_new` (f32 `[out, in]`, what the store lost; read only: the merge measures
    /// what the new factors leave of it): may set the next cycle's factors instead. Returns whether it
    /// did. The default keeps the standard re-initialisation.
    func initializeFactors(_ adapter: LoRAAdapter, residual: Tensor, key: MergeKey, backend: Backend) throws -> Bool
}

extension MergePolicy {
    public func initializeFactors(_ adapter: LoRAAdapter, residual: Tensor, key: MergeKey, backend: Backend) throws -> Bool {
        false
    }
}

/// The recipe's `merge_policy`: which `MergePolicy` a ReLoRA run's restarts use.
public enum MergePolicyKind: String, Sendable, CaseIterable, Codable {
    /// Dense weights: W = target (the only policy for them).
    case exact
    /// Round to nearest (the default for quantized weights).
    case rtn
    /// Unbiased stochastic rounding keyed by (seed, restart, tensor, element).
    case stochastic
    /// Round to nearest, then the next factors absorb the rank-r part of the rounding residual.
    case compensate
    /// An f32 master copy in host memory, merged into exactly and requantized from.
    case master

    public var policy: MergePolicy {
        switch self {
        case .exact: return ExactMerge()
        case .rtn: return RoundToNearestMerge()
        case .stochastic: return StochasticRoundingMerge()
        case .compensate: return CompensatingMerge()
        case .master: return MasterCopyMerge()
        }
    }

    /// Whether the quantized weights carry an f32 master copy (`QuantizedTensor.master`).
    public var keepsMasterCopy: Bool { self == .master }

    /// The policy a run uses when the recipe names none: `exact` for dense weights, `rtn` for quantized ones.
    public static func defaultPolicy(quantized: Bool) -> MergePolicyKind { quantized ? .rtn : .exact }
}

/// The RNG key of one tensor's merge at one restart: a policy that draws random numbers (stochastic
/// rounding, the compensation's sketch) uses counters `(seed, stream, element)` so CPU and GPU give the
/// same codes.
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
    /// Stochastic rounding draws element `r * paddedCols + c` of it.
    public var stream: UInt64 { 0x4D45_5247_0000_0000 | (UInt64(restart) << 20) | UInt64(tensor) }

    /// The stream of `compensate`'s Gaussian sketch: `stream` with the top bit set (no other stream has it).
    public var sketchStream: UInt64 { stream | (1 << 63) }
}

/// Stores `target` into `weight`: a dense weight takes it as is (converted to its dtype); a quantized one
/// is quantized with `rounding`, and with a master copy the master becomes `target` (exactly) and the
/// codes are its quantization. The one store every policy uses.
func store(_ target: Tensor, into weight: FrozenWeight, rounding: QuantRounding, backend: Backend) throws {
    switch weight {
    case .dense(let w):
        backend.copy(target, to: w)
    case .quantized(let q):
        if let master = q.master { backend.copy(target, to: master) }
        if let failure = backend.quantize(q.master ?? target, into: q, rounding: rounding) {
            throw failure.error(format: q.format, name: nil)
        }
    }
}

/// Dense weights: `W = target`, converted to W's dtype (exact for f32; round to nearest even for bf16).
/// A quantized weight is requantized to nearest (the same as `RoundToNearestMerge`).
public struct ExactMerge: MergePolicy {
    public let name = "exact"
    public init() {}
    public func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) throws {
        try ReLoRAModel.store(target, into: weight, rounding: .nearest, backend: backend)
    }
}

/// Dequantize -> add -> requantize with the reference quantizer, rounding every weight to its nearest
/// code. Updates smaller than half a quantization step are lost (which is why the other policies
/// exist); a zero update leaves every code unchanged (`quantize(dequantize(q)) == q`).
public struct RoundToNearestMerge: MergePolicy {
    public let name = "rtn"
    public init() {}
    public func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) throws {
        try ReLoRAModel.store(target, into: weight, rounding: .nearest, backend: backend)
    }
}

/// Requantizes with unbiased stochastic rounding (`relora_quant.h`, `QuantRounding.stochastic`): every
/// weight rounds to one of its two neighbouring codes with the probabilities that make the expected
/// dequantized value the merged value, keyed by (seed, restart, tensor, element). An update smaller
/// than half a step then moves a weight up one code with a probability proportional to its size, so a
/// run of small updates adds up in expectation instead of vanishing; the price is the rounding noise
/// (variance at most step^2 / 4 per weight and merge). Dense weights are stored exactly.
public struct StochasticRoundingMerge: MergePolicy {
    public let name = "stochastic"
    public init() {}
    public func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) throws {
        try ReLoRAModel.store(target, into: weight, rounding: .stochastic(seed: key.seed, stream: key.stream), backend: backend)
    }
}

/// Round to nearest, then error compensation in the spirit of LoQT: the next cycle's factors start at
/// the best rank-r approximation of the rounding residual `R = target - deq(W_new)` (found by
/// `ResidualCompensation`, a randomized SVD), so the model's function right after the restart is the
/// exact merged weight up to what rank r cannot hold, instead of losing R. Updates that rounding
/// erased are carried into the next cycle by the factors and merged again at the next restart, on top of
/// that cycle's own update. The optimizer moments of A and B start at zero (the trainer resets them
/// fully under this policy: the factors are new, unrelated to the old moments).
public struct CompensatingMerge: MergePolicy {
    public let name = "compensate"
    public var compensation = ResidualCompensation()
    public init() {}
    public func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) throws {
        try ReLoRAModel.store(target, into: weight, rounding: .nearest, backend: backend)
    }
    public func initializeFactors(_ adapter: LoRAAdapter, residual: Tensor, key: MergeKey, backend: Backend) throws -> Bool {
        try compensation.initialize(adapter, residual: residual, key: key, backend: backend)
        return true
    }
}

/// An f32 master copy of each quantized weight in host memory (`QuantizedTensor.master`, tag
/// `.hostMaster`): the merge adds `s B A` to the master exactly (`AdaptedLinear.merge` reads the master
/// as W) and the codes are the master's round-to-nearest quantization. Nothing drifts: after any number of
/// merges the codes are `quantize(W0 + sum of updates)`, exactly as if the sum had been merged at once.
/// Costs 4 bytes per weight of host memory and, on a GPU, the master's round trip at each restart.
public struct MasterCopyMerge: MergePolicy {
    public let name = "master"
    public init() {}
    public func store(_ target: Tensor, into weight: FrozenWeight, key: MergeKey, backend: Backend) throws {
        precondition(weight.quantized.map { $0.master != nil } ?? true,
                     "merge policy 'master' needs weights with master copies (LlamaModel masterCopies)")
        try ReLoRAModel.store(target, into: weight, rounding: .nearest, backend: backend)
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
    /// `||W_new - (W + s B A)||_F / ||s B A||_F`: the fraction of the update's norm the store lost, W being
    /// the weight merged into (deq(codes), or the master copy under `master`). 0 for exact f32 and
    /// `master`; the rounding's share for `rtn`, `stochastic` and `compensate` (before compensation).
    public var mergeError: Double
    /// Fraction of the quantized weights whose code changed (nil for dense weights).
    public var codesChanged: Double?
    /// `compensate`: `1 - ||R - s B' A'|| / ||R||`, the fraction of the rounding residual's norm the
    /// new factors recovered (nil for the other policies).
    public var residualRecovered: Double?
}
