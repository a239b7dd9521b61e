/// How the model stores the rows of the activation matrices that are as wide as the MLP's intermediate
/// size F or the vocabulary V (`[N, F]` gate, up, their product and gradients; `[N, V]` logits), whose
/// widths need not be multiples of anything (F = 5461 for the 1b config, V = 32100 for T5's vocabulary).
///
/// Why: cuBLAS chooses its tensor-core kernels by the alignment of each operand's leading dimension, and
/// a bf16 row of 5461 elements is 2-byte aligned, which sends those products (about 70 % of a 1b step's
/// linear FLOPs) to its slow low-alignment kernels. Storing such rows `stride(F)` elements apart makes
/// every row start 32-byte aligned. The padding is the model's storage only: weights, gradients, optimizer
/// states, checkpoints and exports keep their logical shapes, and the products read and write the logical
/// columns through `Backend.matmul`'s row strides (what llm.c does with its padded vocabulary, without
/// padding the weights).
///
/// The model keeps the padding columns of the MLP's activations zero (allocated zeroed, written by no op),
/// so the elementwise SwiGLU can run over whole padded rows; the logits' padding is never read.
public struct RowPadding: Sendable, Equatable {
    /// Row strides are multiples of this many elements (1: packed rows).
    public let multiple: Int

    public init(multiple: Int) {
        precondition(multiple >= 1, "row padding multiple \(multiple)")
        self.multiple = multiple
    }

    /// Packed rows (the CPU backend, whose OpenBLAS kernels gain nothing from aligned rows).
    public static let none = RowPadding(multiple: 1)
    /// The CUDA backend (and a plan for it): 16 elements, 32 bytes of bf16, 64 of f32.
    public static let cuda = RowPadding(multiple: 16)

    /// The row stride of a row of `cols` elements.
    public func stride(_ cols: Int) -> Int { (cols + multiple - 1) / multiple * multiple }
}

/// A stored row-major matrix operand of `rows` rows of `cols` elements, `ld` elements apart (0 = packed):
/// what an op checks its tensors against.
package enum StoredMatrix {
    /// The row stride `ld` means (`cols` when 0), checked to hold a row.
    package static func stride(_ ld: Int, cols: Int, _ op: StaticString) -> Int {
        precondition(ld == 0 || ld >= cols, "\(op): row stride \(ld) < row length \(cols)")
        return ld == 0 ? cols : ld
    }

    /// The row stride `ld` means for `tensor` holding `rows` rows of `cols` (0 = packed), after checking that
    /// the tensor holds them: what an op with one strided operand checks.
    package static func stride(of tensor: Tensor, rows: Int, cols: Int, ld: Int, _ op: StaticString) -> Int {
        let s = stride(ld, cols: cols, op)
        precondition(tensor.count >= span(rows: rows, cols: cols, ld: s), "\(op): a [\(rows), \(cols)] operand of row stride \(s) is outside its tensor of \(tensor.count)")
        return s
    }

    /// The elements the matrix spans: `(rows - 1) * ld + cols` (0 when empty).
    package static func span(rows: Int, cols: Int, ld: Int) -> Int {
        rows == 0 || cols == 0 ? 0 : (rows - 1) * ld + cols
    }

    /// `count` elements in rows of `cols` stored `ld` apart (0, 0: one packed row), as `Backend.dropout`
    /// takes them: the resolved row length and stride, after checking that `tensors` hold them.
    package static func elementRows(count: Int, cols: Int, ld: Int, _ tensors: Tensor..., op: StaticString) -> (cols: Int, ld: Int) {
        let rowLength = cols == 0 ? max(count, 1) : cols, stride = stride(ld, cols: rowLength, op)
        let rows = (count + rowLength - 1) / rowLength
        let spanned = rows == 0 ? 0 : (rows - 1) * stride + (count - (rows - 1) * rowLength)
        precondition(tensors.allSatisfy { $0.count >= spanned }, "\(op): \(count) elements outside the tensors")
        return (rowLength, stride)
    }

    /// `Backend.matmul`'s row strides with 0 resolved to packed, after checking that each tensor holds
    /// its operand (a stored `[k, m]` if `transA`, else `[m, k]`; b `[n, k]` if `transB`, else `[k, n]`;
    /// c `[m, n]`).
    package static func gemmStrides(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int, transA: Bool, transB: Bool,
                                    lda: Int, ldb: Int, ldc: Int) -> (a: Int, b: Int, c: Int) {
        let (aRows, aCols) = transA ? (k, m) : (m, k), (bRows, bCols) = transB ? (n, k) : (k, n)
        return (stride(of: a, rows: aRows, cols: aCols, ld: lda, "matmul"), stride(of: b, rows: bRows, cols: bCols, ld: ldb, "matmul"),
                stride(of: c, rows: m, cols: n, ld: ldc, "matmul"))
    }
}
