import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain

/// The ReLoRA paper's loss-curve figure for one or more runs, as a self-contained SVG (no scripts, fonts
/// or external files).
///
/// Layout: a title, then two panels sharing the x axis (tokens seen = step x tokens per step), and a legend
/// on the right.
/// - Top: training loss, a trailing moving average over the last `smoothing` logged steps (the raw loss
///   faintly behind it when smoothing > 1), validation loss as markers, and each ReLoRA restart as a dashed
///   vertical line at the restart's token position, all in the run's colour.
/// - Bottom: the learning rate (linear axis from 0), which shows warmup, the cosine and the jagged
///   schedule's drops to 0 at restarts.
/// The loss axis is fitted to the curves after the first 5 % of the tokens (when that leaves any), so the
/// initial ln(vocab) loss does not flatten the rest; curves above it are clipped at the panel's top.
/// Elements carry ids and classes for tests and stylesheets: each run is `<g class="series" id="loss-run-I">`
/// (holding `polyline.train`, `polyline.train-raw`, `circle.val` and `line.restart` with `data-step` and
/// `data-tokens`) in `g.panel.loss`, and `<g class="series" id="lr-run-I">` in `g.panel.lr`. `frame(for:)`
/// gives the coordinate mapping.
public enum LossPlot: SVGFigure {
    // Geometry in SVG user units (px).
    static let marginLeft = 84.0, plotWidth = 640.0, marginRight = 24.0, legendWidth = 250.0
    static let titleHeight = 66.0, lossHeight = 330.0, panelGap = 58.0, lrHeight = 140.0, bottomHeight = 56.0
    static var width: Double { marginLeft + plotWidth + marginRight + legendWidth }
    static var height: Double { titleHeight + lossHeight + panelGap + lrHeight + bottomHeight }

    static let inkColor = "#222222", gridColor = "#e6e6e6"
    /// Categorical colours (Tableau 10), cycled for more than ten runs.
    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

    /// Data -> pixel mapping of a figure (tests compute expected positions with it).
    public struct Frame: Sendable {
        /// Left edge and width of both panels' plot areas.
        public var left: Double, plotWidth: Double
        public var lossTop: Double, lossHeight: Double
        public var lrTop: Double, lrHeight: Double
        /// The x axis spans [0, tokensMax] tokens.
        public var tokensMax: Double
        /// The loss axis spans [lossLow, lossHigh]; the learning-rate axis [0, lrMax].
        public var lossLow: Double, lossHigh: Double
        public var lrMax: Double

        public func x(tokens: Double) -> Double { left + tokens / tokensMax * plotWidth }
        public func yLoss(_ v: Double) -> Double { lossTop + lossHeight - (v - lossLow) / (lossHigh - lossLow) * lossHeight }
        public func yLR(_ v: Double) -> Double { lrTop + lrHeight - v / lrMax * lrHeight }
    }

    /// The moving-average window used when none is given: 1 % of the longest run's logged steps, at least 1.
    public static func defaultSmoothing(_ runs: [RunMetrics]) -> Int {
        max(1, (runs.map(\.steps.count).max() ?? 0) / 100)
    }

    /// (step, mean of the finite losses among the last `window` logged steps up to it), one per finite loss.
    public static func smoothed(_ steps: [RunMetrics.Step], window: Int) -> [(step: Int, loss: Double)] {
        let w = max(1, window)
        var out: [(Int, Double)] = []
        var recent: [Double] = []
        var sum = 0.0
        for s in steps {
            guard let l = s.loss, l.isFinite else { continue }
            recent.append(l); sum += l
            if recent.count > w { sum -= recent.removeFirst() }
            out.append((s.step, sum / Double(recent.count)))
        }
        return out
    }

    public static func frame(for runs: [RunMetrics], smoothing: Int) -> Frame {
        let maxTokens = runs.map { $0.tokens(atStep: $0.stepsDone) }.max() ?? 0
        let xTicks = niceTicks(0, max(maxTokens, 1), target: 6)
        let xStep = xTicks.count > 1 ? xTicks[1] - xTicks[0] : max(maxTokens, 1)
        let tokensMax = max(xStep, (max(maxTokens, 1) / xStep).rounded(.up) * xStep)

        // Loss range: smoothed training loss past the first 5 % of the axis (if any there) and validation losses.
        var all: [Double] = [], late: [Double] = []
        for run in runs {
            for p in smoothed(run.steps, window: smoothing) {
                all.append(p.loss)
                if run.tokens(atStep: p.step) >= 0.05 * tokensMax { late.append(p.loss) }
            }
            let vals = run.evals.map(\.loss).filter(\.isFinite)
            all += vals; late += vals
        }
        let values = late.isEmpty ? all : late
        var lo = values.min() ?? 0, hi = values.max() ?? 1
        if hi - lo < 1e-9 { lo -= 0.5; hi += 0.5 }
        let pad = 0.06 * (hi - lo)
        let lrMax = runs.flatMap { $0.steps.compactMap(\.lr) }.filter(\.isFinite).max() ?? 0
        return Frame(left: marginLeft, plotWidth: plotWidth, lossTop: titleHeight, lossHeight: lossHeight,
                     lrTop: titleHeight + lossHeight + panelGap, lrHeight: lrHeight, tokensMax: tokensMax,
                     lossLow: lo - pad, lossHigh: hi + pad, lrMax: lrMax > 0 ? lrMax * 1.08 : 1)
    }

    public static func render(runs: [RunMetrics], smoothing: Int? = nil, title: String = "Training and validation loss") -> String {
        let window = max(1, smoothing ?? defaultSmoothing(runs))
        let fr = frame(for: runs, smoothing: window)
        var svg = SVG()
        svg.open(width: width, height: height)
        svg.text(title, x: fr.left + fr.plotWidth / 2, y: 26, size: 18, anchor: "middle", weight: "bold")
        let smoothingText = window == 1 ? "training loss per step" : "training loss: moving average of the last \(window) steps (raw behind)"
        svg.text("\(smoothingText); dots: validation loss; dashed: ReLoRA restarts", x: fr.left + fr.plotWidth / 2, y: 46,
                 size: 12, anchor: "middle", fill: "#555555")
        svg.raw("<defs><clipPath id=\"loss-area\"><rect x=\"\(f(fr.left))\" y=\"\(f(fr.lossTop))\" width=\"\(f(fr.plotWidth))\" height=\"\(f(fr.lossHeight))\"/></clipPath>"
            + "<clipPath id=\"lr-area\"><rect x=\"\(f(fr.left))\" y=\"\(f(fr.lrTop - 2))\" width=\"\(f(fr.plotWidth))\" height=\"\(f(fr.lrHeight + 2))\"/></clipPath></defs>")
        if runs.isEmpty {
            svg.text("no runs to plot", x: fr.left + fr.plotWidth / 2, y: fr.lossTop + 40, size: 14, anchor: "middle")
            svg.close()
            return svg.body
        }

        // --- Top panel: loss ---
        svg.raw("<g class=\"panel loss\">")
        let lossTicks = niceTicks(fr.lossLow, fr.lossHigh, target: 6)
        let lossStep = lossTicks.count > 1 ? lossTicks[1] - lossTicks[0] : 1
        xGrid(&svg, fr, top: fr.lossTop, height: fr.lossHeight)
        for t in lossTicks { svg.line(fr.left, fr.yLoss(t), fr.left + fr.plotWidth, fr.yLoss(t), stroke: gridColor) }
        for (i, run) in runs.enumerated() {
            let color = palette[i % palette.count]
            svg.raw("<g class=\"series\" id=\"loss-run-\(i)\" data-label=\"\(escape(run.label))\" clip-path=\"url(#loss-area)\">")
            if window > 1 {
                let raw = run.steps.compactMap { s in s.loss.flatMap { $0.isFinite ? (fr.x(tokens: run.tokens(atStep: s.step)), fr.yLoss($0)) : nil } }
                svg.raw("<polyline class=\"train-raw\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"0.8\" stroke-opacity=\"0.22\" points=\"\(SVG.points(thinned(raw)))\"/>")
            }
            let smooth = smoothed(run.steps, window: window).map { (fr.x(tokens: run.tokens(atStep: $0.step)), fr.yLoss($0.loss)) }
            svg.raw("<polyline class=\"train\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"1.8\" stroke-linejoin=\"round\" points=\"\(SVG.points(thinned(smooth)))\"/>")
            for r in run.restarts {
                let x = fr.x(tokens: run.tokens(atStep: r.step))
                svg.raw("<line class=\"restart\" data-step=\"\(r.step)\" data-tokens=\"\(run.tokens(atStep: r.step))\" x1=\"\(f(x))\" y1=\"\(f(fr.lossTop))\" x2=\"\(f(x))\" y2=\"\(f(fr.lossTop + fr.lossHeight))\" stroke=\"\(color)\" stroke-width=\"1\" stroke-dasharray=\"5,4\" stroke-opacity=\"0.75\"><title>\(escape(run.label)): restart \(r.index) after step \(r.step)</title></line>")
            }
            for e in run.evals where e.loss.isFinite {
                svg.raw("<circle class=\"val\" data-step=\"\(e.step)\" cx=\"\(f(fr.x(tokens: run.tokens(atStep: e.step))))\" cy=\"\(f(fr.yLoss(e.loss)))\" r=\"3.6\" fill=\"\(color)\" stroke=\"white\" stroke-width=\"1\"><title>\(escape(run.label)) step \(e.step): val loss \(String(format: "%.4f", e.loss)) (ppl \(String(format: "%.2f", e.perplexity)))</title></circle>")
            }
            svg.raw("</g>")
        }
        svg.rect(fr.left, fr.lossTop, fr.plotWidth, fr.lossHeight, stroke: inkColor)
        for t in lossTicks {
            svg.line(fr.left - 4, fr.yLoss(t), fr.left, fr.yLoss(t), stroke: inkColor)
            svg.text(tickLabel(t, step: lossStep), x: fr.left - 7, y: fr.yLoss(t) + 4, size: 11, anchor: "end")
        }
        xAxis(&svg, fr, bottom: fr.lossTop + fr.lossHeight)
        svg.text("loss (nats per token)", x: 22, y: fr.lossTop + fr.lossHeight / 2, size: 12, anchor: "middle", rotate: true)
        svg.raw("</g>")

        // --- Bottom panel: learning rate ---
        svg.raw("<g class=\"panel lr\">")
        let lrTicks = niceTicks(0, fr.lrMax, target: 4)
        xGrid(&svg, fr, top: fr.lrTop, height: fr.lrHeight)
        for t in lrTicks { svg.line(fr.left, fr.yLR(t), fr.left + fr.plotWidth, fr.yLR(t), stroke: gridColor) }
        for (i, run) in runs.enumerated() {
            let points = run.steps.compactMap { s in s.lr.flatMap { $0.isFinite ? (fr.x(tokens: run.tokens(atStep: s.step)), fr.yLR($0)) : nil } }
            svg.raw("<g class=\"series\" id=\"lr-run-\(i)\" data-label=\"\(escape(run.label))\" clip-path=\"url(#lr-area)\">")
            svg.raw("<polyline class=\"lr\" fill=\"none\" stroke=\"\(palette[i % palette.count])\" stroke-width=\"1.5\" points=\"\(SVG.points(thinned(points)))\"/>")
            svg.raw("</g>")
        }
        svg.rect(fr.left, fr.lrTop, fr.plotWidth, fr.lrHeight, stroke: inkColor)
        for t in lrTicks {
            svg.line(fr.left - 4, fr.yLR(t), fr.left, fr.yLR(t), stroke: inkColor)
            svg.text(t == 0 ? "0" : String(format: "%.3g", t), x: fr.left - 7, y: fr.yLR(t) + 4, size: 11, anchor: "end")
        }
        xAxis(&svg, fr, bottom: fr.lrTop + fr.lrHeight)
        svg.text("tokens seen", x: fr.left + fr.plotWidth / 2, y: fr.lrTop + fr.lrHeight + 38, size: 12, anchor: "middle")
        svg.text("learning rate", x: 22, y: fr.lrTop + fr.lrHeight / 2, size: 12, anchor: "middle", rotate: true)
        svg.raw("</g>")

        legend(&svg, runs: runs, window: window, x: fr.left + fr.plotWidth + marginRight + 8, y: fr.lossTop + 6)
        svg.close()
        return svg.body
    }

    static func legend(_ svg: inout SVG, runs: [RunMetrics], window: Int, x: Double, y: Double) {
        svg.raw("<g class=\"legend\">")
        var ly = y + 8
        for (i, run) in runs.enumerated() {
            let color = palette[i % palette.count]
            svg.raw("<g class=\"legend-entry\" data-run=\"\(i)\">")
            svg.raw("<line x1=\"\(f(x))\" y1=\"\(f(ly - 4))\" x2=\"\(f(x + 24))\" y2=\"\(f(ly - 4))\" stroke=\"\(color)\" stroke-width=\"2.5\"/>")
            svg.text(run.label, x: x + 32, y: ly, size: 12, weight: "bold")
            var detail = run.mode
            if let best = run.evals.filter({ $0.loss.isFinite }).min(by: { $0.loss < $1.loss }) {
                detail += String(format: ", best val %.3f", best.loss)
            }
            if !run.restarts.isEmpty { detail += ", \(run.restarts.count) restart\(run.restarts.count == 1 ? "" : "s")" }
            svg.text(detail, x: x + 32, y: ly + 15, size: 11, fill: "#555555")
            svg.raw("</g>")
            ly += 38
        }
        ly += 6
        let key = "#555555"
        svg.raw("<line x1=\"\(f(x))\" y1=\"\(f(ly - 4))\" x2=\"\(f(x + 24))\" y2=\"\(f(ly - 4))\" stroke=\"\(key)\" stroke-width=\"1.8\"/>")
        svg.text(window == 1 ? "training loss" : "training loss (mean of \(window) steps)", x: x + 32, y: ly, size: 11); ly += 20
        svg.raw("<circle cx=\"\(f(x + 12))\" cy=\"\(f(ly - 4))\" r=\"3.6\" fill=\"\(key)\"/>")
        svg.text("validation loss", x: x + 32, y: ly, size: 11); ly += 20
        svg.raw("<line x1=\"\(f(x + 12))\" y1=\"\(f(ly - 12))\" x2=\"\(f(x + 12))\" y2=\"\(f(ly + 4))\" stroke=\"\(key)\" stroke-dasharray=\"5,4\"/>")
        svg.text("ReLoRA restart (merge)", x: x + 32, y: ly, size: 11)
        svg.raw("</g>")
    }

    static func xGrid(_ svg: inout SVG, _ fr: Frame, top: Double, height: Double) {
        for t in niceTicks(0, fr.tokensMax, target: 6) { svg.line(fr.x(tokens: t), top, fr.x(tokens: t), top + height, stroke: gridColor) }
    }

    static func xAxis(_ svg: inout SVG, _ fr: Frame, bottom: Double) {
        for t in niceTicks(0, fr.tokensMax, target: 6) {
            svg.line(fr.x(tokens: t), bottom, fr.x(tokens: t), bottom + 4, stroke: inkColor)
            svg.text(tokenLabel(t, max: fr.tokensMax), x: fr.x(tokens: t), y: bottom + 17, size: 11, anchor: "middle")
        }
    }

    /// Token counts with a unit chosen by the axis end: 250k, 1.5M, 2B.
    static func tokenLabel(_ v: Double, max: Double) -> String {
        let (unit, suffix): (Double, String) = max >= 2e9 ? (1e9, "B") : max >= 2e6 ? (1e6, "M") : max >= 2e3 ? (1e3, "k") : (1, "")
        if v == 0 { return "0" }
        return String(format: "%g", (v / unit * 1000).rounded() / 1000) + suffix
    }

    /// At most ~2 points per pixel column (plus the last point): long runs stay small files.
    static func thinned(_ points: [(Double, Double)]) -> [(Double, Double)] {
        let limit = Int(plotWidth * 2)
        guard points.count > limit else { return points }
        let stride = (points.count + limit - 1) / limit
        var out = Swift.stride(from: 0, to: points.count, by: stride).map { points[$0] }
        if let last = points.last, out.count == 0 || out[out.count - 1] != last { out.append(last) }
        return out
    }
}
