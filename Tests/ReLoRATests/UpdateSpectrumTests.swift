import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAFormats
@testable import ReLoRATokenizer
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain
@testable import ReLoRAAnalysis
@testable import ReLoRASelfTest

/// Singular values of learned updates (the paper's Figures 3/4) and their SVG plot.
///
/// Tolerances: LAPACK's values carry an absolute error ~ p(m,n) * eps_f64 * s_max (LAPACK Users' Guide 4.9);
/// for the <= 64 x 64 Double matrices here that is < 1e-13 * s_max, so `1e-10 * s_max` leaves a wide margin.
/// Inputs stored in Float (the `analyze` tests) carry per-entry rounding ~6e-8 * |w| with |w| <= 2, a matrix
/// of spectral norm <= sqrt(m n) * 1.2e-7 ~ 3e-6 for 24 x 24, so those compare at 1e-5.
final class UpdateSpectrumTests: XCTestCase {
    // MARK: - Helpers

    /// Row-major `rows x cols` product of `a` (rows x k) and `b` (k x cols).
    static func matmul(_ a: [Double], _ b: [Double], rows: Int, k: Int, cols: Int) -> [Double] {
        var c = [Double](repeating: 0, count: rows * cols)
        for i in 0..<rows {
            for p in 0..<k {
                let aip = a[i * k + p]
                if aip == 0 { continue }
                for j in 0..<cols { c[i * cols + j] += aip * b[p * cols + j] }
            }
        }
        return c
    }

    /// An n x n orthogonal matrix, the product of three Householder reflections I - 2 w w^T / |w|^2.
    static func orthogonal(_ n: Int, _ rng: inout TestRNG) -> [Double] {
        var q = [Double](repeating: 0, count: n * n)
        for i in 0..<n { q[i * n + i] = 1 }
        for _ in 0..<3 {
            let w = (0..<n).map { _ in Double(rng.uniform()) }
            let ww = w.reduce(0) { $0 + $1 * $1 }
            var h = [Double](repeating: 0, count: n * n)
            for i in 0..<n { for j in 0..<n { h[i * n + j] = (i == j ? 1 : 0) - 2 * w[i] * w[j] / ww } }
            q = matmul(q, h, rows: n, k: n, cols: n)
        }
        return q
    }

    /// Row-major m x n matrix Qm[:, :k] diag(s) Qn[:, :k]^T with k = s.count: singular values exactly |s|.
    static func withSpectrum(_ s: [Double], rows m: Int, cols n: Int, _ rng: inout TestRNG) -> [Double] {
        let qm = orthogonal(m, &rng), qn = orthogonal(n, &rng)
        var a = [Double](repeating: 0, count: m * n)
        for (t, sv) in s.enumerated() {
            for i in 0..<m { for j in 0..<n { a[i * n + j] += qm[i * m + t] * sv * qn[j * n + t] } }
        }
        return a
    }

    /// A random rank-r product U V (U: m x r, V: r x n, entries uniform in [-scale, scale)).
    static func lowRank(rows m: Int, cols n: Int, rank r: Int, scale: Double, _ rng: inout TestRNG) -> [Double] {
        let u = (0..<(m * r)).map { _ in scale * Double(rng.uniform()) }
        let v = (0..<(r * n)).map { _ in scale * Double(rng.uniform()) }
        return matmul(u, v, rows: m, k: r, cols: n)
    }

    func assertClose(_ a: [Double], _ b: [Double], atol: Double, _ message: String = "",
                     file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(a.count, b.count, "count " + message, file: file, line: line)
        for (i, (x, y)) in zip(a, b).enumerated() where !(abs(x - y) <= atol) {
            return XCTFail("\(message) [\(i)]: \(x) vs \(y) (atol \(atol))", file: file, line: line)
        }
    }

    // MARK: - Singular values of known matrices

    func testLAPACKIsAvailable() {
        XCTAssertTrue(LAPACK.isAvailable, "OpenBLAS should export dgesdd_/dgesvd_")
    }

    func testDiagonal() throws {
        let d = [3.0, -1.0, 2.0, 0.5]
        var a = [Double](repeating: 0, count: 16)
        for i in 0..<4 { a[i * 4 + i] = d[i] }
        assertClose(try UpdateSpectrum.singularValues(rows: 4, cols: 4, rowMajor: a), [3, 2, 1, 0.5], atol: 1e-14)
        // All zero: all values 0, rank 0.
        let z = try UpdateSpectrum.singularValues(rows: 3, cols: 2, rowMajor: [Double](repeating: 0, count: 6))
        XCTAssertEqual(z, [0, 0])
        XCTAssertEqual(UpdateSpectrum.numericalRank(singularValues: z, rows: 3, cols: 2, epsilon: .ulpOfOne), 0)
    }

    func testRankOneOuterProduct() throws {
        let u = [1.0, -2.0, 3.0, 0.5, 4.0], v = [2.0, 0.25, -1.0, 1.5, -3.0, 0.75, 1.0]
        let a = Self.matmul(u, v, rows: 5, k: 1, cols: 7)
        let s = try UpdateSpectrum.singularValues(rows: 5, cols: 7, rowMajor: a)
        let norm = { (x: [Double]) in x.reduce(0) { $0 + $1 * $1 }.squareRoot() }
        XCTAssertEqual(s.count, 5)
        XCTAssertEqual(s[0], norm(u) * norm(v), accuracy: 1e-12 * s[0])
        for x in s.dropFirst() { XCTAssertLessThan(x, 1e-13 * s[0]) }
        XCTAssertEqual(UpdateSpectrum.numericalRank(singularValues: s, rows: 5, cols: 7, epsilon: .ulpOfOne), 1)
    }

    func testHouseholderBuiltMatricesHaveTheirSpectrum() throws {
        var rng = TestRNG(11)
        for (m, n, s) in [(6, 6, [5.0, 3.0, 1.0, 0.5, 0.25, 0.125]), (9, 5, [2.0, 1.5, 1e-3, 1e-6, 0]),
                          (4, 10, [7.0, 7.0, 0.1, 0.01])] {
            let a = Self.withSpectrum(s, rows: m, cols: n, &rng)
            assertClose(try UpdateSpectrum.singularValues(rows: m, cols: n, rowMajor: a), s, atol: 1e-10 * s[0], "\(m)x\(n)")
            assertClose(UpdateSpectrum.jacobiSingularValues(rows: m, cols: n, rowMajor: a), s, atol: 1e-10 * s[0], "jacobi \(m)x\(n)")
        }
    }

    func testTransposeHasTheSameValues() throws {
        // Entries encode their position (10 i + j) plus a non-linear term so the matrix is full rank.
        var a = [Double](repeating: 0, count: 15)
        for i in 0..<3 {
            for j in 0..<5 {
                let wiggle: Int = (i * 7 + j * j * 3) % 5
                a[i * 5 + j] = Double(10 * i + j + wiggle)
            }
        }
        var at = [Double](repeating: 0, count: 15)
        for i in 0..<3 { for j in 0..<5 { at[j * 3 + i] = a[i * 5 + j] } }
        let s35 = try UpdateSpectrum.singularValues(rows: 3, cols: 5, rowMajor: a)
        let s53 = try UpdateSpectrum.singularValues(rows: 5, cols: 3, rowMajor: at)
        XCTAssertEqual(s35.count, 3)
        assertClose(s35, s53, atol: 1e-12 * s35[0])
        assertClose(s35, UpdateSpectrum.jacobiSingularValues(rows: 3, cols: 5, rowMajor: a), atol: 1e-12 * s35[0], "jacobi")
        XCTAssertEqual(s35, s35.sorted(by: >), "descending")
        // Sum of squares = Frobenius norm squared.
        XCTAssertEqual(s35.reduce(0) { $0 + $1 * $1 }, a.reduce(0) { $0 + $1 * $1 }, accuracy: 1e-9)
    }

    func testAgreesWithJacobiReferenceOnRandomMatrices() throws {
        var rng = TestRNG(5)
        for (m, n) in [(9, 6), (6, 9), (20, 20), (1, 4), (33, 17)] {
            let a = (0..<(m * n)).map { _ in Double(rng.uniform()) }
            let s = try UpdateSpectrum.singularValues(rows: m, cols: n, rowMajor: a)
            assertClose(s, UpdateSpectrum.jacobiSingularValues(rows: m, cols: n, rowMajor: a), atol: 1e-10 * s[0], "\(m)x\(n)")
        }
    }

    /// The ReLoRA idea: each restart merges a rank-r product, and the sum of k of them has rank k r.
    func testSumOfLowRankProductsHasRankKR() throws {
        var rng = TestRNG(21)
        let (m, n, r) = (64, 48, 4)
        var sum = [Double](repeating: 0, count: m * n)
        for k in 1...6 {
            let p = Self.lowRank(rows: m, cols: n, rank: r, scale: 1, &rng)
            for i in 0..<sum.count { sum[i] += p[i] }
            let s = try UpdateSpectrum.singularValues(rows: m, cols: n, rowMajor: sum)
            XCTAssertEqual(UpdateSpectrum.numericalRank(singularValues: s, rows: m, cols: n, epsilon: .ulpOfOne), k * r, "k = \(k)")
            // The gap is wide: value k r is O(1), value k r + 1 is rounding noise.
            XCTAssertGreaterThan(s[k * r - 1], 1e-3 * s[0])
            XCTAssertLessThan(s[k * r], 1e-12 * s[0])
        }
    }

    func testBadInputsToSingularValues() {
        XCTAssertThrowsError(try UpdateSpectrum.singularValues(rows: 2, cols: 3, rowMajor: [1, 2, 3])) { error in
            guard case ReLoRAError.invalidData = error else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try UpdateSpectrum.singularValues(rows: 1, cols: 2, rowMajor: [1, .nan])) { error in
            guard case ReLoRAError.invalidData = error else { return XCTFail("\(error)") }
        }
        XCTAssertEqual(try UpdateSpectrum.singularValues(rows: 0, cols: 3, rowMajor: []), [])
    }

    // MARK: - analyze() on fake models

    static let hidden = 16, intermediate = 24

    /// A 2-layer LLaMA-shaped checkpoint with random weights, plus tensors that must be ignored.
    static func fakeModel(layers: Int = 2, _ rng: inout TestRNG) -> [String: ([Int], [Float])] {
        var t: [String: ([Int], [Float])] = [:]
        func add(_ name: String, _ shape: [Int]) { t[name] = (shape, rng.floats(shape.reduce(1, *))) }
        add("model.embed_tokens.weight", [50, hidden])
        add("model.norm.weight", [hidden])
        add("lm_head.weight", [50, hidden])
        for l in 0..<layers {
            for k in ["q_proj", "k_proj", "v_proj", "o_proj"] { add("model.layers.\(l).self_attn.\(k).weight", [hidden, hidden]) }
            add("model.layers.\(l).mlp.gate_proj.weight", [intermediate, hidden])
            add("model.layers.\(l).mlp.up_proj.weight", [intermediate, hidden])
            add("model.layers.\(l).mlp.down_proj.weight", [hidden, intermediate])
            add("model.layers.\(l).input_layernorm.weight", [hidden])
            add("model.layers.\(l).post_attention_layernorm.weight", [hidden])
        }
        return t
    }

    static func adding(_ update: [Double], to name: String, in model: [String: ([Int], [Float])]) -> [String: ([Int], [Float])] {
        var out = model
        let (shape, values) = model[name]!
        out[name] = (shape, zip(values, update).map { Float(Double($0) + $1) })
        return out
    }

    func testAnalyzeFindsARankTwoUpdate() throws {
        var rng = TestRNG(3)
        let reference = Self.fakeModel(&rng)
        let q0 = "model.layers.0.self_attn.q_proj.weight"
        // Update with singular values exactly 0.5 and 0.05: one above the 0.1 threshold, one below.
        let update = Self.withSpectrum([0.5, 0.05], rows: Self.hidden, cols: Self.hidden, &rng)
        let final = Self.adding(update, to: q0, in: reference)
        var lines: [String] = []
        let report = try UpdateSpectrum.analyze(label: "test", final: final, reference: reference) { lines.append($0) }

        XCTAssertEqual(report.label, "test")
        XCTAssertEqual(report.threshold, 0.1)
        XCTAssertEqual(report.matrices.count, 14, "7 projections x 2 layers; embeddings, norms and lm_head ignored")
        XCTAssertEqual(lines.count, 14)
        XCTAssertTrue(lines[0].hasPrefix(q0), lines[0])
        XCTAssertEqual(report.matrices.map(\.kind), Array(repeating: UpdateSpectrum.kindOrder, count: 2).flatMap { $0 })
        XCTAssertEqual(report.matrices.map(\.layer), Array(repeating: 0, count: 7) + Array(repeating: 1, count: 7))
        XCTAssertEqual(report.kinds(), UpdateSpectrum.kindOrder)

        let q = report.matrices[0]
        XCTAssertEqual(q.name, q0)
        XCTAssertEqual(q.shape, [Self.hidden, Self.hidden])
        XCTAssertEqual(q.rank, 2)
        XCTAssertEqual(q.singularValues.count, Self.hidden)
        XCTAssertEqual(q.singularValues[0], 0.5, accuracy: 1e-5)
        XCTAssertEqual(q.singularValues[1], 0.05, accuracy: 1e-5)
        XCTAssertEqual(q.countBelowThreshold, Self.hidden - 1)
        for m in report.matrices.dropFirst() {
            XCTAssertEqual(m.rank, 0, m.name)
            XCTAssertEqual(m.singularValues.max(), 0, m.name)
            XCTAssertEqual(m.countBelowThreshold, min(m.shape[0], m.shape[1]), m.name)
        }
        XCTAssertEqual(report.totalBelow(kind: "q_proj"), 2 * Self.hidden - 1)
        XCTAssertEqual(report.totalValues(kind: "q_proj"), 2 * Self.hidden)
        XCTAssertEqual(report.totalBelow(kind: "down_proj"), 2 * Self.hidden)
        XCTAssertEqual(report.totalBelow(kind: "no_such"), 0)
    }

    func testRankOfFloatStoredSumOfMerges() throws {
        // Three "merges" of rank 3 into a non-square MLP matrix stored in Float: rank 9 despite Float rounding.
        var rng = TestRNG(8)
        let reference = Self.fakeModel(&rng)
        let name = "model.layers.1.mlp.up_proj.weight"
        var update = [Double](repeating: 0, count: Self.intermediate * Self.hidden)
        for _ in 0..<3 {
            let p = Self.lowRank(rows: Self.intermediate, cols: Self.hidden, rank: 3, scale: 0.3, &rng)
            for i in 0..<update.count { update[i] += p[i] }
        }
        let report = try UpdateSpectrum.analyze(label: "relora", final: Self.adding(update, to: name, in: reference), reference: reference)
        let m = try XCTUnwrap(report.matrices.first { $0.name == name })
        XCTAssertEqual(m.shape, [Self.intermediate, Self.hidden])
        XCTAssertEqual(m.singularValues.count, Self.hidden)
        XCTAssertEqual(m.rank, 9)
        let exact = try UpdateSpectrum.singularValues(rows: Self.intermediate, cols: Self.hidden, rowMajor: update)
        assertClose(Array(m.singularValues.prefix(9)), Array(exact.prefix(9)), atol: 1e-5)
    }

    func testCountBelowThreshold() throws {
        var rng = TestRNG(4)
        let reference = Self.fakeModel(layers: 1, &rng)
        let name = "model.layers.0.self_attn.v_proj.weight"
        // Diagonal update 0.3, 0.2, 0.05, 0.01 and 12 zeros; no value near a threshold tested below.
        var update = [Double](repeating: 0, count: Self.hidden * Self.hidden)
        for (i, d) in [0.3, 0.2, 0.05, 0.01].enumerated() { update[i * Self.hidden + i] = d }
        let final = Self.adding(update, to: name, in: reference)
        for (threshold, expected) in [(0.1, 14), (0.25, 15), (1e-3, 12), (1.0, 16), (0.0, 0)] {
            let report = try UpdateSpectrum.analyze(label: "t", final: final, reference: reference, threshold: threshold)
            let m = try XCTUnwrap(report.matrices.first { $0.name == name })
            XCTAssertEqual(m.countBelowThreshold, expected, "threshold \(threshold)")
            XCTAssertEqual(m.rank, 4)
            XCTAssertEqual(report.threshold, threshold)
        }
    }

    func testAnalyzeErrors() {
        var rng = TestRNG(9)
        let model = Self.fakeModel(layers: 1, &rng)
        let q = "model.layers.0.self_attn.q_proj.weight"
        func expectInvalid(_ final: [String: ([Int], [Float])], _ reference: [String: ([Int], [Float])],
                           mentioning needle: String, line: UInt = #line) {
            XCTAssertThrowsError(try UpdateSpectrum.analyze(label: "run", final: final, reference: reference), line: line) { error in
                guard case ReLoRAError.invalidData(let message) = error else { return XCTFail("\(error)", line: line) }
                XCTAssertTrue(message.contains(needle), message, line: line)
            }
        }
        var missing = model
        missing[q] = nil
        expectInvalid(model, missing, mentioning: "reference checkpoint has no tensor \(q)")

        var reshaped = model
        reshaped[q] = ([8, 32], model[q]!.1)
        expectInvalid(model, reshaped, mentioning: "[8, 32] in the reference")

        var short = model
        short[q] = ([Self.hidden, Self.hidden], Array(model[q]!.1.dropLast()))
        expectInvalid(short, model, mentioning: "255 values for shape [16, 16]")

        var flat = model
        flat[q] = ([Self.hidden * Self.hidden], model[q]!.1)
        expectInvalid(flat, model, mentioning: "must be 2-D")

        var nan = model
        nan[q] = ([Self.hidden, Self.hidden], [Float.nan] + model[q]!.1.dropFirst())
        expectInvalid(nan, model, mentioning: "NaN")

        let none = model.filter { !$0.key.hasPrefix("model.layers") }
        expectInvalid(none, model, mentioning: "no tensors named")
    }

    func testNameParsing() {
        XCTAssertEqual(UpdateSpectrum.parseName("model.layers.11.mlp.down_proj.weight")?.layer, 11)
        XCTAssertEqual(UpdateSpectrum.parseName("model.layers.0.self_attn.o_proj.weight")?.kind, "o_proj")
        for bad in ["model.layers.0.mlp.q_proj.weight", "model.layers.0.self_attn.gate_proj.weight",
                    "model.layers.0.self_attn.q_proj.bias", "model.layers.x.self_attn.q_proj.weight",
                    "model.layers.-1.self_attn.q_proj.weight", "model.layers.01.self_attn.q_proj.weight",
                    "model.layers.0.self_attn.q_proj.lora_A.weight", "model.embed_tokens.weight"] {
            XCTAssertNil(UpdateSpectrum.parseName(bad), bad)
        }
    }

    func testReportJSONRoundTrip() throws {
        let report = UpdateSpectrumReport(label: "ReLoRA", threshold: 0.1, matrices: [
            MatrixSpectrum(name: "model.layers.0.self_attn.q_proj.weight", kind: "q_proj", layer: 0, shape: [2, 2],
                           singularValues: [0.5, 0.01], countBelowThreshold: 1, rank: 2),
        ])
        let data = try JSONEncoder().encode(report)
        let text = String(decoding: data, as: UTF8.self)
        XCTAssertTrue(text.contains("\"singular_values\""), text)
        XCTAssertTrue(text.contains("\"count_below_threshold\""), text)
        XCTAssertEqual(try JSONDecoder().decode(UpdateSpectrumReport.self, from: data), report)
    }

    // MARK: - Plot

    /// Collects what the tests check of the SVG; parsing at all proves it is well-formed XML.
    final class SVGSummary: NSObject, XMLParserDelegate {
        var root = ""
        var histogramLabels: [String] = [], spectraLabels: [String] = []
        var thresholdLines = 0, polylines = 0, scripts = 0, texts: [String] = []
        var inText = false
        func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                    attributes: [String: String] = [:]) {
            if root.isEmpty { root = name }
            let classes = (attributes["class"] ?? "").split(separator: " ")
            if name == "g", classes.contains("histogram") { histogramLabels.append(attributes["data-label"] ?? "") }
            if name == "g", classes.contains("spectra") { spectraLabels.append(attributes["data-label"] ?? "") }
            if name == "line", classes.contains("threshold") { thresholdLines += 1 }
            if name == "polyline" { polylines += 1 }
            if name == "script" || attributes.keys.contains(where: { $0.hasPrefix("on") }) { scripts += 1 }
            if name == "text" { inText = true; texts.append("") }
        }
        func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
            if name == "text" { inText = false }
        }
        func parser(_ parser: XMLParser, foundCharacters string: String) {
            if inText { texts[texts.count - 1] += string }
        }
    }

    func parseSVG(_ svg: String, file: StaticString = #filePath, line: UInt = #line) -> SVGSummary {
        let parser = XMLParser(data: Data(svg.utf8))
        let summary = SVGSummary()
        parser.delegate = summary
        XCTAssertTrue(parser.parse(), "not well-formed XML: \(String(describing: parser.parserError))", file: file, line: line)
        return summary
    }

    /// Three synthetic runs shaped like the paper's 130M W_Q comparison, scaled down: `layers` layers of
    /// d x d, LoRA rank r. full: iid noise (Marchenko-Pastur spectrum) plus a few strong directions;
    /// LoRA: one rank-r product; ReLoRA: four merged rank-r products of decreasing size.
    static func syntheticReports(layers: Int, d: Int, r: Int) throws -> [UpdateSpectrumReport] {
        var rng = TestRNG(2024)
        var reference: [String: ([Int], [Float])] = [:]
        for l in 0..<layers { reference["model.layers.\(l).self_attn.q_proj.weight"] = ([d, d], rng.floats(d * d, -0.05, 0.05)) }
        func run(_ label: String, _ makeUpdate: (Int, inout TestRNG) -> [Double]) throws -> UpdateSpectrumReport {
            var final = reference
            for l in 0..<layers {
                let name = "model.layers.\(l).self_attn.q_proj.weight"
                final = adding(makeUpdate(l, &rng), to: name, in: final)
            }
            return try UpdateSpectrum.analyze(label: label, final: final, reference: reference)
        }
        // iid uniform[-a, a] entries have sigma = a / sqrt(3); the largest value of a d x d matrix is ~2 sigma sqrt(d).
        let noise = 0.3 * 3.0.squareRoot() / Double(d).squareRoot()
        // U V with U: d x r, V: r x d, entries uniform[-s, s]: typical singular value ~ d s^2 / 3 =: t.
        func scale(typical t: Double) -> Double { (3 * t / Double(d)).squareRoot() }
        // Deeper layers learn slightly larger updates (factor 0.7 ... 1.3), so the per-layer lines differ.
        func depth(_ l: Int) -> Double { 0.7 + 0.6 * Double(l) / Double(max(1, layers - 1)) }
        let full = try run("full-rank") { l, rng in
            var u = (0..<(d * d)).map { _ in depth(l) * noise * Double(rng.uniform()) }
            let strong = lowRank(rows: d, cols: d, rank: 8, scale: scale(typical: 1.2 * depth(l)), &rng)
            for i in 0..<u.count { u[i] += strong[i] }
            return u
        }
        let lora = try run("LoRA") { l, rng in lowRank(rows: d, cols: d, rank: r, scale: scale(typical: 0.8 * depth(l)), &rng) }
        let relora = try run("ReLoRA") { l, rng in
            var u = [Double](repeating: 0, count: d * d)
            for t in [0.8, 0.5, 0.3, 0.15] {
                let p = lowRank(rows: d, cols: d, rank: r, scale: scale(typical: t * depth(l)), &rng)
                for i in 0..<u.count { u[i] += p[i] }
            }
            return u
        }
        return [full, lora, relora]
    }

    func testRenderIsWellFormedWithOnePanelPerReport() throws {
        let reports = try Self.syntheticReports(layers: 3, d: 24, r: 4)
        var tricky = reports
        tricky[1].label = "LoRA <r=4> & \"friends\""
        let svg = SpectrumPlot.render(reports: tricky, title: "Update spectra: q_proj <test>")
        let summary = parseSVG(svg)
        XCTAssertEqual(summary.root, "svg")
        XCTAssertEqual(summary.histogramLabels, tricky.map(\.label))
        XCTAssertEqual(summary.spectraLabels, tricky.map(\.label))
        XCTAssertEqual(summary.thresholdLines, 2 * tricky.count, "a vertical one per histogram, a horizontal one per spectra panel")
        XCTAssertEqual(summary.polylines, 3 * tricky.count, "one spectrum line per layer per run")
        XCTAssertEqual(summary.scripts, 0)
        XCTAssertTrue(summary.texts.contains("Update spectra: q_proj <test>"))
        // The panel titles print the pooled count below the threshold.
        for report in tricky {
            let below = report.totalBelow(kind: "q_proj"), total = report.totalValues(kind: "q_proj")
            XCTAssertTrue(summary.texts.contains { $0.hasPrefix("\(below) of \(total) values < 0.1") }, "\(report.label): \(below)")
        }
        // The LoRA-like run is capped at rank r, so at least (d - r) values per layer are below the threshold.
        XCTAssertGreaterThanOrEqual(reports[1].totalBelow(kind: "q_proj"), 3 * (24 - 4))
        XCTAssertEqual(reports[1].matrices.map(\.rank), [4, 4, 4])
        XCTAssertEqual(reports[2].matrices.map(\.rank), [16, 16, 16])
    }

    func testRenderEdgeCases() throws {
        XCTAssertEqual(parseSVG(SpectrumPlot.render(reports: [], title: "empty")).root, "svg")
        let reports = try Self.syntheticReports(layers: 1, d: 8, r: 2)
        // A kind the reports lack: panels still render and say so.
        let summary = parseSVG(SpectrumPlot.render(reports: reports, kind: "down_proj", title: "none"))
        XCTAssertEqual(summary.histogramLabels.count, 3)
        XCTAssertTrue(summary.texts.contains("no down_proj matrices"))
        // A single all-zero update (nothing trained) must not produce NaN coordinates.
        let zero = UpdateSpectrumReport(label: "untrained", threshold: 0.1, matrices: [
            MatrixSpectrum(name: "model.layers.0.self_attn.q_proj.weight", kind: "q_proj", layer: 0, shape: [4, 4],
                           singularValues: [0, 0, 0, 0], countBelowThreshold: 4, rank: 0),
        ])
        let svg = SpectrumPlot.render(reports: [zero], title: "zero")
        XCTAssertEqual(parseSVG(svg).histogramLabels, ["untrained"])
        XCTAssertFalse(svg.contains("nan") || svg.contains("inf"), "non-finite coordinates")
        XCTAssertTrue(svg.contains("1e-7"), "an all-zero run gets a log axis 6 decades under the threshold")
        XCTAssertFalse(svg.contains("1e-20"), "not hundreds of decades")
        // Threshold 0 (count nothing) must not produce log10(0) = -inf either.
        var zeroThreshold = reports
        for i in zeroThreshold.indices { zeroThreshold[i].threshold = 0 }
        let svg0 = SpectrumPlot.render(reports: zeroThreshold, title: "t0")
        XCTAssertEqual(parseSVG(svg0).thresholdLines, 6)
        XCTAssertFalse(svg0.contains("nan") || svg0.contains("inf"), "non-finite coordinates")
    }

    func testHistogramBinsAlignWithThreshold() {
        let w = SpectrumPlot.histogramBinWidth(xMax: 2.5, threshold: 0.1, targetBins: 48)
        XCTAssertEqual((0.1 / w).rounded(), 0.1 / w, accuracy: 1e-9, "the threshold is a bin edge")
        let counts = SpectrumPlot.histogram([0, 0.05, 0.0999, 0.1, 0.35, 2.5], binWidth: 0.05, binCount: 50)
        XCTAssertEqual(counts[0], 1); XCTAssertEqual(counts[1], 2); XCTAssertEqual(counts[2], 1)
        XCTAssertEqual(counts[7], 1); XCTAssertEqual(counts[49], 1, "the right edge goes in the last bin")
        XCTAssertEqual(SpectrumPlot.niceTicks(0, 1, target: 5), [0, 0.2, 0.4, 0.6, 0.8, 1.0])
        XCTAssertEqual(SpectrumPlot.niceCeil(7300), 10000)
        XCTAssertEqual(SpectrumPlot.niceCeil(2.3), 2.5)
    }

    /// Renders the three-run example at a size like the paper's (12 layers, LoRA rank = d / 6). Set
    /// RELORA_SPECTRUM_EXAMPLE=/path/to/file.svg to keep it for a look.
    func testRenderExample() throws {
        let reports = try Self.syntheticReports(layers: 12, d: 192, r: 32)
        let svg = SpectrumPlot.render(reports: reports, kind: "q_proj", title: "Synthetic update spectra (W_Q): full-rank vs LoRA vs ReLoRA")
        XCTAssertEqual(parseSVG(svg).histogramLabels, ["full-rank", "LoRA", "ReLoRA"])
        XCTAssertEqual(reports[1].matrices.map(\.rank), Array(repeating: 32, count: 12))
        XCTAssertEqual(reports[2].matrices.map(\.rank), Array(repeating: 128, count: 12))
        // The paper's ordering of the below-threshold counts: full < ReLoRA < LoRA.
        let below = reports.map { $0.totalBelow(kind: "q_proj") }
        XCTAssertLessThan(below[0], below[2]); XCTAssertLessThan(below[2], below[1])
        if let path = ProcessInfo.processInfo.environment["RELORA_SPECTRUM_EXAMPLE_SINGLE"] {
            try SpectrumPlot.render(reports: [reports[2]], title: "One run").write(toFile: path, atomically: true, encoding: .utf8)
        }
        if let path = ProcessInfo.processInfo.environment["RELORA_SPECTRUM_EXAMPLE"] {
            try svg.write(toFile: path, atomically: true, encoding: .utf8)
            let json = try JSONEncoder().encode(reports)
            try json.write(to: URL(fileURLWithPath: path).deletingPathExtension().appendingPathExtension("json"))
        }
    }
}
