import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain

// The update-rank analysis of the ReLoRA paper (Figures 3/4): for each projection matrix of a trained model,
// the singular values of the learned update dW = W_final - W_reference (the reference is usually the
// initialization, i.e. the checkpoint at step 0). Full-rank training gives a full-rank dW; LoRA's dW = B A
// has at most r non-zero values; ReLoRA's sum of merged low-rank products climbs above r. The paper's summary
// number is the count of singular values below 0.1, summed over layers (130M, W_Q: full 1173, ReLoRA 5693,
// LoRA 7680 = 12 x (768 - 128)).

/// The singular values of one matrix's update, `final - reference`.
public struct MatrixSpectrum: Sendable, Codable, Equatable {
    /// Hugging Face tensor name, e.g. "model.layers.3.self_attn.q_proj.weight".
    public var name: String
    /// "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj" or "down_proj".
    public var kind: String
    /// Decoder layer index.
    public var layer: Int
    /// [out, in], as stored.
    public var shape: [Int]
    /// min(out, in) values, descending.
    public var singularValues: [Double]
    /// How many singular values are strictly below the report's threshold.
    public var countBelowThreshold: Int
    /// Numerical rank: values above `max(out, in) * eps_f32 * s_max` (see `UpdateSpectrum.numericalRank`).
    public var rank: Int

    public init(name: String, kind: String, layer: Int, shape: [Int], singularValues: [Double],
                countBelowThreshold: Int, rank: Int) {
        self.name = name; self.kind = kind; self.layer = layer; self.shape = shape
        self.singularValues = singularValues; self.countBelowThreshold = countBelowThreshold; self.rank = rank
    }

    // snake_case keys, like the rest of the project's JSON, so notebooks read the report directly.
    enum CodingKeys: String, CodingKey {
        case name, kind, layer, shape, rank
        case singularValues = "singular_values"
        case countBelowThreshold = "count_below_threshold"
    }
}

/// The spectra of every analysed matrix of one run (e.g. "full", "LoRA", "ReLoRA").
public struct UpdateSpectrumReport: Sendable, Codable, Equatable {
    /// A short run name shown in plots.
    public var label: String
    /// The singular-value threshold of `countBelowThreshold` (the paper uses 0.1).
    public var threshold: Double
    /// Ordered by layer, then by `UpdateSpectrum.kindOrder`.
    public var matrices: [MatrixSpectrum]

    public init(label: String, threshold: Double, matrices: [MatrixSpectrum]) {
        self.label = label; self.threshold = threshold; self.matrices = matrices
    }

    /// Sum over layers of the values below the threshold for one matrix kind (the paper's summary number).
    public func totalBelow(kind: String) -> Int {
        matrices.lazy.filter { $0.kind == kind }.reduce(0) { $0 + $1.countBelowThreshold }
    }

    /// Sum over layers of min(out, in) for one matrix kind: the denominator of `totalBelow(kind:)`.
    public func totalValues(kind: String) -> Int {
        matrices.lazy.filter { $0.kind == kind }.reduce(0) { $0 + $1.singularValues.count }
    }

    /// The matrix kinds present, in `UpdateSpectrum.kindOrder` order.
    public func kinds() -> [String] {
        let present = Set(matrices.map(\.kind))
        return UpdateSpectrum.kindOrder.filter { present.contains($0) }
    }
}

public enum UpdateSpectrum {
    /// The analysed projection kinds in LLaMA module order, with the submodule each lives in.
    public static let kindOrder = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    static let moduleOfKind: [String: String] = [
        "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
    ]

    /// (layer, kind) if `name` is `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` or
    /// `model.layers.{i}.mlp.{gate,up,down}_proj.weight`; nil for everything else (embeddings, norms, lm_head,
    /// LoRA factors, which are not updates of a weight).
    static func parseName(_ name: String) -> (layer: Int, kind: String)? {
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 6, parts[0] == "model", parts[1] == "layers", parts[5] == "weight",
              let layer = Int(parts[2]), layer >= 0, String(layer) == parts[2] else { return nil }
        let kind = String(parts[4])
        guard let module = moduleOfKind[kind], parts[3] == module else { return nil }
        return (layer, kind)
    }

    /// How many matrices `analyze` takes its SVD of in `weights` (for progress reports).
    public static func matrixCount(in weights: [String: ([Int], [Float])]) -> Int {
        weights.keys.filter { parseName($0) != nil }.count
    }

    /// The spectra of `final - reference` for every projection matrix of `final`.
    ///
    /// - Parameters:
    ///   - final, reference: Hugging Face tensor name -> (shape [out, in], row-major values). Only 2-D tensors
    ///     named `model.layers.{i}.(self_attn|mlp).{kind}.weight` are analysed; other tensors are ignored.
    ///   - threshold: the cut of `countBelowThreshold` (the paper's 0.1).
    ///   - progress: called once per matrix before its SVD, with a line such as
    ///     "model.layers.0.self_attn.q_proj.weight [768, 768] (1/84)".
    /// - Throws: `ReLoRAError.invalidData` if `final` has no such tensors, one of them is not 2-D, its value
    ///   count does not match its shape, `reference` lacks it or has another shape, or it holds NaN/Inf.
    ///
    /// The difference is taken in Double from the Float values, so it is exact; what remains full-rank in it
    /// is the Float32 rounding of the stored weights (~6e-8 * |w| per entry), which `rank` ignores by using
    /// the Float32 epsilon in its tolerance. Checkpoints stored in bf16/fp16 round far more coarsely, so their
    /// `rank` is full; `countBelowThreshold` (the paper's measure) is unaffected as long as the rounding's
    /// spectral norm stays well below the threshold.
    public static func analyze(label: String, final: [String: ([Int], [Float])], reference: [String: ([Int], [Float])],
                               threshold: Double = 0.1, progress: ((String) -> Void)? = nil) throws -> UpdateSpectrumReport {
        var selected: [(name: String, layer: Int, kind: String)] = []
        for name in final.keys {
            if let (layer, kind) = parseName(name) { selected.append((name, layer, kind)) }
        }
        guard !selected.isEmpty else {
            throw ReLoRAError.invalidData(
                "\(label): no tensors named model.layers.{i}.(self_attn|mlp).{q,k,v,o,gate,up,down}_proj.weight to analyse; pass a LLaMA checkpoint in Hugging Face naming")
        }
        let rankOfKind = Dictionary(uniqueKeysWithValues: kindOrder.enumerated().map { ($1, $0) })
        selected.sort { ($0.layer, rankOfKind[$0.kind]!) < ($1.layer, rankOfKind[$1.kind]!) }

        var matrices: [MatrixSpectrum] = []
        matrices.reserveCapacity(selected.count)
        for (index, entry) in selected.enumerated() {
            let (shape, values) = final[entry.name]!
            guard shape.count == 2 else {
                throw ReLoRAError.invalidData("\(label): \(entry.name) has shape \(shape); a projection weight must be 2-D [out, in]")
            }
            let (rows, cols) = (shape[0], shape[1])
            guard rows > 0, cols > 0, values.count == rows * cols else {
                throw ReLoRAError.invalidData("\(label): \(entry.name) has \(values.count) values for shape \(shape)")
            }
            guard let (refShape, refValues) = reference[entry.name] else {
                throw ReLoRAError.invalidData(
                    "\(label): the reference checkpoint has no tensor \(entry.name); compare two checkpoints of the same model")
            }
            guard refShape == shape, refValues.count == values.count else {
                throw ReLoRAError.invalidData(
                    "\(label): \(entry.name) has shape \(shape) but \(refShape) in the reference checkpoint; compare two checkpoints of the same model")
            }
            progress?("\(entry.name) \(shape) (\(index + 1)/\(selected.count))")
            var update = [Double](repeating: 0, count: values.count)
            for i in 0..<values.count {
                update[i] = Double(values[i]) - Double(refValues[i])  // exact: both are Float
            }
            guard update.allSatisfy({ $0.isFinite }) else {
                throw ReLoRAError.invalidData("\(label): \(entry.name) holds NaN or Inf (in the final or the reference weights)")
            }
            let s = try singularValues(rows: rows, cols: cols, rowMajor: update)
            matrices.append(MatrixSpectrum(
                name: entry.name, kind: entry.kind, layer: entry.layer, shape: shape, singularValues: s,
                countBelowThreshold: s.reduce(0) { $0 + ($1 < threshold ? 1 : 0) },
                rank: numericalRank(singularValues: s, rows: rows, cols: cols, epsilon: Double(Float.ulpOfOne))))
        }
        return UpdateSpectrumReport(label: label, threshold: threshold, matrices: matrices)
    }

    /// Singular values, descending, of the `rows x cols` row-major matrix `values`, in Double via LAPACK.
    ///
    /// A row-major `rows x cols` buffer is the column-major `cols x rows` transpose, which has the same
    /// singular values, so the buffer goes to LAPACK as is. Absolute error per value ~ `p(m,n) * 1e-16 * s_max`.
    /// - Throws: `ReLoRAError.invalidData` for a count/shape mismatch or NaN/Inf, or a LAPACK failure.
    public static func singularValues(rows: Int, cols: Int, rowMajor values: [Double]) throws -> [Double] {
        guard rows >= 0, cols >= 0, values.count == rows * cols else {
            throw ReLoRAError.invalidData("\(values.count) values for a \(rows) x \(cols) matrix")
        }
        guard values.allSatisfy({ $0.isFinite }) else {
            throw ReLoRAError.invalidData("a \(rows) x \(cols) matrix holds NaN or Inf; its singular values are undefined")
        }
        return try LAPACK.singularValues(m: cols, n: rows, columnMajor: values)
    }

    /// How many of `singularValues` exceed `max(rows, cols) * epsilon * s_max`, the tolerance of NumPy's
    /// `matrix_rank` (and LAPACK's own error bound): a value below it is indistinguishable from zero given
    /// entries known to relative precision `epsilon`. Use the epsilon of the data's storage type (Float32's
    /// 1.19e-7 for weights read from F32 checkpoints), not of the arithmetic.
    public static func numericalRank(singularValues s: [Double], rows: Int, cols: Int, epsilon: Double) -> Int {
        guard let sMax = s.max(), sMax > 0 else { return 0 }
        let tolerance = Double(max(rows, cols)) * epsilon * sMax
        return s.reduce(0) { $0 + ($1 > tolerance ? 1 : 0) }
    }

    /// Reference singular values by one-sided Jacobi (Hestenes) in plain Swift: the boring, independent
    /// check for the LAPACK path (tests compare the two). O(min * max * min) per sweep, ~6-10 sweeps; fine
    /// for test sizes, too slow for real models. Column pairs are rotated until every pair is orthogonal
    /// to `1e-15` relative; the column norms are then the singular values.
    static func jacobiSingularValues(rows: Int, cols: Int, rowMajor values: [Double]) -> [Double] {
        precondition(values.count == rows * cols)
        // Work on the orientation with more rows than columns: columns (n of them, length m) as arrays.
        let transpose = cols > rows
        let (m, n) = transpose ? (cols, rows) : (rows, cols)
        var c = [[Double]](repeating: [Double](repeating: 0, count: m), count: n)
        for i in 0..<rows {
            for j in 0..<cols {
                if transpose { c[i][j] = values[i * cols + j] } else { c[j][i] = values[i * cols + j] }
            }
        }
        for _ in 0..<60 {
            var rotated = false
            for p in 0..<n {
                for q in (p + 1)..<n {
                    var alpha = 0.0, beta = 0.0, gamma = 0.0
                    for k in 0..<m {
                        alpha += c[p][k] * c[p][k]; beta += c[q][k] * c[q][k]; gamma += c[p][k] * c[q][k]
                    }
                    if abs(gamma) <= 1e-15 * (alpha * beta).squareRoot() || gamma == 0 { continue }
                    rotated = true
                    let zeta = (beta - alpha) / (2 * gamma)
                    let t = (zeta >= 0 ? 1.0 : -1.0) / (abs(zeta) + (1 + zeta * zeta).squareRoot())
                    let cs = 1 / (1 + t * t).squareRoot(), sn = cs * t
                    for k in 0..<m {
                        let x = c[p][k], y = c[q][k]
                        c[p][k] = cs * x - sn * y
                        c[q][k] = sn * x + cs * y
                    }
                }
            }
            if !rotated { break }
        }
        return c.map { col in col.reduce(0) { $0 + $1 * $1 }.squareRoot() }.sorted(by: >)
    }
}
