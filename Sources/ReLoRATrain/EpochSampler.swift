import CReLoRA
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// How a run draws its training windows (recipe key `sampler`).
public enum SamplerMode: String, Sendable, CaseIterable {
    /// `WindowSampler`: windows at uniformly random offsets, with replacement.
    case random
    /// `EpochSampler`: non-overlapping windows, each once per epoch, in a keyed pseudo-random order.
    case epoch

    /// The name `state.json` records (`TrainingState.sampler`); a resume must find the same one.
    public var stateName: String {
        switch self {
        case .random: return "random-windows-v1"
        case .epoch: return "epoch-windows-v1"
        }
    }

    public init?(stateName: String) {
        guard let mode = Self.allCases.first(where: { $0.stateName == stateName }) else { return nil }
        self = mode
    }

    /// The sampler of a recipe without a `sampler` key: `epoch` when one epoch of the training data
    /// holds at least as many windows as the whole run consumes (`steps * micro_batch * grad_accum`),
    /// so no window is seen twice; else `random` (a run that must repeat data anyway keeps the
    /// sampler it always had).
    public static func automatic(windows: Int, needed: Int) -> SamplerMode {
        windows >= needed ? .epoch : .random
    }
}

/// A keyed pseudo-random permutation of `0 ..< count`, computed one index at a time with O(1) state:
/// a balanced Feistel network on the smallest even number of bits `2h` with `2^(2h) >= count`, and cycle
/// walking (apply the network again until the result is below `count`). A Feistel network is a bijection
/// of `[0, 2^(2h))` whatever its round function, and cycle walking restricts a bijection to a subset
/// (the walk from an index in the subset returns to the subset before it could revisit anything), so
/// the result is a bijection of `0 ..< count`. `2^(2h) < 4 * count`, so a walk takes < 4 passes on average.
///
/// Round `i` maps `(L, R)` to `(R, L xor F_i(R))` with `F_i(R) = relora_rng_u64(key, i, R)` masked to h
/// bits (counter-based, the same on every platform). Six rounds: more than the 3-4 of Luby-Rackoff's
/// bound, since the halves of small domains are only a few bits wide.
public struct WindowPermutation: Sendable, Equatable {
    public let count: Int
    public let key: UInt64
    let halfBits: Int
    static let rounds = 6

    public init(count: Int, key: UInt64) {
        precondition(count > 0, "a permutation of an empty range")
        self.count = count
        self.key = key
        var bits = 2
        while (1 << bits) < count { bits += 1 }
        halfBits = (bits + 1) / 2
    }

    /// The image of `index` (in `0 ..< count`).
    public func callAsFunction(_ index: Int) -> Int {
        precondition(index >= 0 && index < count, "index \(index) outside 0..<\(count)")
        var x = UInt64(index)
        repeat { x = feistel(x) } while x >= UInt64(count)
        return Int(x)
    }

    func feistel(_ x: UInt64) -> UInt64 {
        let mask = (UInt64(1) << halfBits) - 1
        var left = x >> UInt64(halfBits), right = x & mask
        for round in 0..<Self.rounds {
            let f = relora_rng_u64(key, UInt64(round), right) & mask
            (left, right) = (right, left ^ f)
        }
        return left << UInt64(halfBits) | right
    }
}

/// Epoch-based training windows: the token array is cut into `windowCount = (count - 1) / seqLen`
/// windows of `seqLen + 1` tokens starting at multiples of `seqLen` (inputs the first `seqLen`, targets
/// the last `seqLen`, as in `WindowSampler`). Consecutive windows share one token, the last target of
/// one being the first input of the next, so every token after the first is a target exactly once per
/// epoch and nothing is dropped between windows (llm.c's data loader reads `B*T + 1` tokens at stride
/// `B*T` the same way).
///
/// The run's windows are numbered globally in the order the trainer consumes them:
/// `g = (step * gradAccum + micro) * microBatch + row`. Window `g` is epoch `g / windowCount`, position
/// `g % windowCount` of that epoch's order, a `WindowPermutation` keyed by (seed, epoch). So the window
/// of any (step, micro, row) is a pure function of the seed and `g`: a resumed run needs no sampler
/// state and draws bit-identical batches, each epoch visits every window exactly once, and epochs
/// differ in order. A warm-started run continues the numbering from its start step, so it does not
/// revisit the windows its full-rank start trained on (with the same seed and step size).
public struct EpochSampler: Sendable {
    public let tokens: TokenArray
    public let seqLen: Int
    public let seed: UInt64
    /// Windows an optimizer step consumes: `micro_batch * grad_accum`.
    public let windowsPerStep: Int
    public let microBatch: Int
    public let windowCount: Int

    public init(tokens: TokenArray, seqLen: Int, microBatch: Int, gradAccum: Int, seed: UInt64) throws {
        guard tokens.count > seqLen else {
            throw ReLoRAError.invalidData("\(tokens.path) has \(tokens.count) tokens; one training window needs seq_len + 1 = \(seqLen + 1)")
        }
        self.tokens = tokens; self.seqLen = seqLen; self.seed = seed; self.microBatch = microBatch
        windowsPerStep = microBatch * gradAccum
        windowCount = (tokens.count - 1) / seqLen
    }

    /// The order of `epoch`: position -> window index.
    public func permutation(epoch: Int) -> WindowPermutation {
        // The key is drawn from its own stream ("EPOCH"), apart from the streams that dropout, LoRA init
        // and the random sampler draw from with the same seed.
        WindowPermutation(count: windowCount, key: relora_rng_u64(seed, 0x45_504F_4348, UInt64(epoch)))
    }

    /// The epoch and window index of the run's `global`-th window.
    public func window(global: Int) -> (epoch: Int, window: Int) {
        let epoch = global / windowCount
        return (epoch, permutation(epoch: epoch)(global % windowCount))
    }

    /// The epoch the first window of `step` belongs to.
    public func epoch(atStep step: Int) -> Int { step * windowsPerStep / windowCount }

    /// `(inputs, targets)`, each `[microBatch * seqLen]`, of micro-batch `micro` of `step`.
    public func batch(step: Int, micro: Int, microBatch: Int) -> (inputs: [Int32], targets: [Int32]) {
        precondition(microBatch == self.microBatch, "the sampler was made for micro_batch \(self.microBatch)")
        var inputs = [Int32](), targets = [Int32]()
        inputs.reserveCapacity(microBatch * seqLen); targets.reserveCapacity(microBatch * seqLen)
        let first = (step * (windowsPerStep / microBatch) + micro) * microBatch
        for row in 0..<microBatch {
            let w = tokens.window(window(global: first + row).window * seqLen, seqLen + 1)
            inputs += w.dropLast()
            targets += w.dropFirst()
        }
        return (inputs, targets)
    }
}

/// The sampler a trainer draws its batches from.
public enum TrainingSampler: Sendable {
    case random(WindowSampler)
    case epoch(EpochSampler)

    public var mode: SamplerMode {
        switch self {
        case .random: return .random
        case .epoch: return .epoch
        }
    }

    public func batch(step: Int, micro: Int, microBatch: Int) -> (inputs: [Int32], targets: [Int32]) {
        switch self {
        case .random(let s): return s.batch(step: step, micro: micro, microBatch: microBatch)
        case .epoch(let s): return s.batch(step: step, micro: micro, microBatch: microBatch)
        }
    }
}
