import ReLoRACore

/// One block's frozen weights dequantized, kept from the block's recompute to its backward.
///
/// Under block checkpointing a quantized linear is dequantized three times per micro-batch: in the forward,
/// in the backward's recompute of its block, and for its input gradient right after. On a backend whose
/// quantized linears dequantize the whole weight into their scratch (`Backend.dequantizesWholeWeight`: CUDA),
/// giving each of the block's linears a scratch of its own keeps what the recompute dequantized, and the input
/// gradient is then a plain GEMM against it (the GEMM `quantizedLinearInput` would run, on the same bf16
/// values: the bits are the same). The recompute skips the down projection's base GEMM (the block's output is
/// not needed), so down is still dequantized in the backward; the six others (q, k, v, o, gate, up; each its
/// own weight, q/k/v are not fused) are dequantized twice per micro-batch instead of three times.
///
/// The slots replace the model's shared scratch in a training workspace (every quantized linear dequantizes
/// into its own slot, in the forward too), so the cache costs the sum of a block's dequantized weights less the
/// largest one: 96 MiB against 21 MiB of scratch for the 1b config in bf16 (+75 MiB), 386 MiB against 86 MiB
/// for 7b. One tensor, tag `.workspace`, allocated with the workspace (no allocation on the step path after
/// the first step).
///
/// Staleness: a slot counts as holding `(layer, kind)` only between `keep(layer)` (before the block's recompute)
/// and `forget()` (after its backward), and only if that recompute wrote it. Nothing else runs in between, so the
/// weights cannot change under it: a ReLoRA merge (which requantizes W), a load or an evaluation all happen
/// outside a backward, and the next block's recompute starts with `keep` again. Between those windows the slots
/// are plain scratch.
final class DequantizedBlock {
    /// `[sum over the seven linears of their scratch]` in the frozen-weight dtype: kind k's slot, shaped as the
    /// backend's whole-weight scratch (`Backend.dequantizeScratchShape`: `[out, in]` in padded rows on CUDA),
    /// at `offsets[k]`.
    let storage: Tensor
    private let offsets: [Int]
    private let shapes: [[Int]]
    /// The block whose recompute fills the slots (between `keep` and `forget`), and the kinds it dequantized.
    private var keptLayer: Int?
    private var held: Set<LinearKind> = []

    init(_ cfg: LlamaConfig, backend: Backend) {
        shapes = Self.slotShapes(cfg, backend: backend)
        var offsets: [Int] = [], total = 0
        for s in shapes { offsets.append(total); total += s.reduce(1, *) }
        self.offsets = offsets
        storage = backend.makeTensor([total], dtype: backend.precision.frozenWeights, tag: .workspace, zeroed: false)
    }

    /// The bytes of the cache for `cfg` on `backend`: what `init` allocates.
    static func bytes(_ cfg: LlamaConfig, backend: Backend) -> Int {
        slotShapes(cfg, backend: backend).reduce(0) { $0 + $1.reduce(1, *) } * backend.precision.frozenWeights.byteSize
    }

    private static func slotShapes(_ cfg: LlamaConfig, backend: Backend) -> [[Int]] {
        LinearKind.allCases.map { backend.dequantizeScratchShape(rows: $0.shape(cfg).out, cols: $0.shape(cfg).in) }
    }

    /// Kind `kind`'s slot (`[out, row stride]`): its scratch, and after the recompute its dequantized weight.
    func slot(_ kind: LinearKind) -> Tensor {
        storage.view(offset: offsets[kind.rawValue], shape: shapes[kind.rawValue])
    }

    /// Before the recompute of block `layer`: what its quantized linears dequantize from now on is kept.
    func keep(_ layer: Int) {
        keptLayer = layer
        held = []
    }

    /// After the backward of the kept block: the slots are scratch again.
    func forget() {
        keptLayer = nil
        held = []
    }

    /// A quantized linear of block `layer` dequantized its whole weight into its slot.
    func wrote(layer: Int, _ kind: LinearKind) {
        if layer == keptLayer { held.insert(kind) }
    }

    /// Whether `kind`'s slot holds block `layer`'s dequantized weight, written by the block's recompute.
    func holds(layer: Int, _ kind: LinearKind) -> Bool { layer == keptLayer && held.contains(kind) }
}
