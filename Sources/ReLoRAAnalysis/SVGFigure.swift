import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain

/// What the hand-written SVG figures (`SpectrumPlot`, `LossPlot`) share: number formatting, escaping, "nice"
/// axis ticks and a line-oriented writer. A figure is an enum that conforms, so its code calls `f(x)`,
/// `niceTicks(...)` and `SVG()` unqualified.
protocol SVGFigure {}

extension SVGFigure {
    typealias SVG = SVGWriter

    /// Coordinates with two decimals: sub-pixel precision without bloating the file.
    static func f(_ v: Double) -> String { String(format: "%.2f", v) }
    /// A short human number (threshold, bin edges).
    static func g(_ v: Double) -> String { String(format: "%g", v) }

    static func escape(_ s: String) -> String {
        var out = ""
        for ch in s {
            switch ch {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&apos;"
            default: out.append(ch)
            }
        }
        return out
    }

    /// The smallest 1, 2, 2.5 or 5 x 10^k that is >= x (for axis ends).
    static func niceCeil(_ x: Double) -> Double {
        guard x > 0, x.isFinite else { return 1 }
        let p = pow(10, log10(x).rounded(.down))
        for m in [1.0, 2.0, 2.5, 5.0, 10.0] where m * p >= x * (1 - 1e-12) { return m * p }
        return 10 * p
    }

    /// About `target` ticks at a 1, 2 or 5 x 10^k step covering [lo, hi]. Tick i is computed as the integer
    /// i * m scaled by a power of ten (dividing for negative powers), so 0.6 comes out as 0.6, not 0.6000000000000001.
    static func niceTicks(_ lo: Double, _ hi: Double, target: Int) -> [Double] {
        guard hi > lo, lo.isFinite, hi.isFinite else { return [lo] }
        let raw = (hi - lo) / Double(max(1, target))
        var e = Int(log10(raw).rounded(.down))
        var m = [1, 2, 5, 10].first { Double($0) * pow(10, Double(e)) >= raw * (1 - 1e-12) } ?? 10
        if m == 10 { m = 1; e += 1 }
        let scale = pow(10, Double(abs(e)))
        func value(_ k: Int) -> Double { e >= 0 ? Double(k * m) * scale : Double(k * m) / scale }
        let step = value(1)
        var ticks: [Double] = []
        var k = Int((lo / step).rounded(.up))
        while value(k) <= hi + step * 1e-9 { ticks.append(value(k)); k += 1 }
        return ticks
    }

    static func tickLabel(_ v: Double, step: Double) -> String {
        let decimals = max(0, Int(-log10(step).rounded(.down)))
        if decimals == 0, abs(v) >= 10_000 { return String(format: "%.0fk", v / 1000) }
        return String(format: "%.\(decimals)f", v)
    }
}

/// A line-oriented SVG writer; every text goes through `escape`.
struct SVGWriter: SVGFigure {
    var body = ""

    /// The XML declaration, the root element (self-contained: no scripts, fonts or external files) and a
    /// white background. Close with `close()`.
    mutating func open(width: Double, height: Double) {
        raw("<?xml version=\"1.0\" encoding=\"UTF-8\"?>")
        raw("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Self.f(width))\" height=\"\(Self.f(height))\" viewBox=\"0 0 \(Self.f(width)) \(Self.f(height))\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">")
        raw("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>")
    }

    mutating func close() { raw("</svg>") }

    mutating func raw(_ s: String) { body += s; body += "\n" }
    mutating func line(_ x1: Double, _ y1: Double, _ x2: Double, _ y2: Double, stroke: String) {
        raw("<line x1=\"\(Self.f(x1))\" y1=\"\(Self.f(y1))\" x2=\"\(Self.f(x2))\" y2=\"\(Self.f(y2))\" stroke=\"\(stroke)\" stroke-width=\"1\"/>")
    }
    mutating func rect(_ x: Double, _ y: Double, _ w: Double, _ h: Double, stroke: String) {
        raw("<rect x=\"\(Self.f(x))\" y=\"\(Self.f(y))\" width=\"\(Self.f(w))\" height=\"\(Self.f(h))\" fill=\"none\" stroke=\"\(stroke)\" stroke-width=\"1\"/>")
    }
    mutating func text(_ s: String, x: Double, y: Double, size: Double, anchor: String = "start",
                       fill: String = "#222222", weight: String = "normal", rotate: Bool = false) {
        let transform = rotate ? " transform=\"rotate(-90 \(Self.f(x)) \(Self.f(y)))\"" : ""
        raw("<text x=\"\(Self.f(x))\" y=\"\(Self.f(y))\" font-size=\"\(Self.f(size))\" text-anchor=\"\(anchor)\" fill=\"\(fill)\" font-weight=\"\(weight)\"\(transform)>\(Self.escape(s))</text>")
    }
    /// `points` as "x,y x,y ..." with two decimals.
    static func points(_ xy: [(Double, Double)]) -> String {
        xy.map { "\(f($0.0)),\(f($0.1))" }.joined(separator: " ")
    }
}
