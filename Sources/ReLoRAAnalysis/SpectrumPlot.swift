import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain

/// A self-contained SVG (no scripts, no external fonts or files) comparing the update spectra of several runs,
/// in the manner of the ReLoRA paper's Figure 3.
///
/// Layout: one column per report (run), two rows.
/// - Top: histogram of the singular values of the chosen matrix kind, pooled over layers (x = singular value,
///   y = count). Bars left of the threshold are drawn in the "counted" colour; the threshold is a vertical
///   dashed line; the panel title gives "N of M values < threshold".
/// - Bottom: each layer's sorted spectrum (x = index, y = singular value on a log axis), one line per layer
///   coloured by depth, with the threshold as a horizontal dashed line. A LoRA update shows as a cliff at
///   index r; full-rank training and ReLoRA as curves that stay up further.
/// All panels of a row share their x and y scales so runs compare by eye. Reports are expected to share one
/// threshold (the histogram bins are aligned to the first report's). Elements carry classes ("panel",
/// "histogram", "spectra", "threshold", "legend") so tests and stylesheets can find them.
public enum SpectrumPlot: SVGFigure {
    // Geometry in SVG user units (px).
    static let plotWidth = 320.0, plotHeight = 200.0
    static let marginLeft = 70.0, marginRight = 24.0, panelTitleHeight = 52.0, axisBelow = 46.0
    static let minimumWidth = 840.0
    static let headerHeight = 64.0, legendHeight = 58.0, rowGap = 8.0
    static var panelWidth: Double { marginLeft + plotWidth + marginRight }
    static var panelHeight: Double { panelTitleHeight + plotHeight + axisBelow }

    static let belowColor = "#d6604d", aboveColor = "#4393c3", inkColor = "#222222", gridColor = "#e6e6e6"

    public static func render(reports: [UpdateSpectrumReport], kind: String = "q_proj", title: String) -> String {
        let columns = max(1, reports.count)
        let width = max(Double(columns) * panelWidth + 20, minimumWidth)  // the legend needs ~800 px
        let height = headerHeight + 2 * panelHeight + rowGap + legendHeight
        var svg = SVG()
        svg.open(width: width, height: height)

        // Header: title and a line that says what is plotted.
        let perRun = reports.map { $0.matrices.filter { $0.kind == kind } }
        let layerCount = (perRun.flatMap { $0.map(\.layer) }.max() ?? -1) + 1
        let threshold = reports.first?.threshold ?? 0.1
        svg.text(title, x: width / 2, y: 26, size: 18, anchor: "middle", weight: "bold")
        svg.text("Singular values of the learned update \u{394}W = W_final \u{2212} W_reference for \(kind), \(layerCount) layer\(layerCount == 1 ? "" : "s") per run; threshold \(g(threshold)).",
                 x: width / 2, y: 48, size: 12, anchor: "middle", fill: "#555555")

        if reports.isEmpty {
            svg.text("no reports to plot", x: width / 2, y: headerHeight + 40, size: 14, anchor: "middle")
            svg.close()
            return svg.body
        }

        // Shared scales. Histogram x: [0, xMax] with bins aligned so the threshold is a bin edge.
        let allValues = perRun.flatMap { $0.flatMap(\.singularValues) }
        let sMax = allValues.max() ?? 0
        let xMax = niceCeil(max(sMax, threshold) * 1.02)
        let binWidth = histogramBinWidth(xMax: xMax, threshold: threshold, targetBins: 48)
        let binCount = max(1, Int((xMax / binWidth).rounded(.up)))
        let histograms = perRun.map { mats in histogram(mats.flatMap(\.singularValues), binWidth: binWidth, binCount: binCount) }
        let yMaxCount = histogramYMax(histograms)

        // Spectra: x = index over the widest spectrum; y = log10 of value, floored at 1e-6 of the largest.
        let indexMax = Double(max(1, perRun.flatMap { $0.map(\.singularValues.count) }.max() ?? 1))
        let positive = allValues.filter { $0 > 0 }
        // An all-zero run (nothing trained) has no scale of its own: fall back to the threshold's.
        let top = sMax > 0 ? sMax : (threshold > 0 ? threshold : 1)
        let logHi = log10(max(top, threshold)).rounded(.up)
        let floorValue = max(positive.min() ?? top * 1e-6, top * 1e-6)
        let logLo = min(log10(floorValue).rounded(.down), threshold > 0 ? log10(threshold).rounded(.down) : logHi - 1, logHi - 1)
        let clamped = positive.count < allValues.count || (positive.min() ?? 1) < pow(10, logLo)

        for (column, report) in reports.enumerated() {
            let mats = perRun[column]
            let ox = (width - Double(columns) * panelWidth) / 2 + Double(column) * panelWidth
            let label = report.label
            let total = report.totalValues(kind: kind), below = report.totalBelow(kind: kind)

            // --- Top row: histogram ---
            var oy = headerHeight
            svg.raw("<g class=\"panel histogram\" data-label=\"\(escape(label))\" data-below=\"\(below)\" data-total=\"\(total)\">")
            svg.text(label, x: ox + marginLeft + plotWidth / 2, y: oy + 20, size: 15, anchor: "middle", weight: "bold")
            let summary = total == 0 ? "no \(kind) matrices"
                : "\(below) of \(total) values < \(g(report.threshold)) (\(percent(below, total)))"
            svg.text(summary, x: ox + marginLeft + plotWidth / 2, y: oy + 38, size: 12, anchor: "middle",
                     fill: total == 0 ? "#999999" : belowColor, weight: "bold")
            let px0 = ox + marginLeft, py0 = oy + panelTitleHeight
            let xToPx = { (v: Double) in px0 + v / xMax * plotWidth }
            let yToPx = { (c: Double) in py0 + plotHeight - c / yMaxCount * plotHeight }
            // Grid and axes.
            let yTicks = niceTicks(0, yMaxCount, target: 5)
            for t in yTicks { svg.line(px0, yToPx(t), px0 + plotWidth, yToPx(t), stroke: gridColor) }
            if total > 0 {
                let hist = histograms[column]
                svg.raw("<g class=\"bars\">")
                for (b, count) in hist.enumerated() where count > 0 {
                    let lo = Double(b) * binWidth
                    let x = xToPx(lo), w = max(0.5, xToPx(min(lo + binWidth, xMax)) - x - 0.6)
                    let clipped = Double(count) > yMaxCount
                    let y = yToPx(min(Double(count), yMaxCount))
                    // Bins are aligned to the threshold, so a bin is wholly below or wholly at/above it.
                    let color = lo + binWidth <= report.threshold + binWidth * 1e-9 ? belowColor : aboveColor
                    svg.raw("<rect x=\"\(f(x))\" y=\"\(f(y))\" width=\"\(f(w))\" height=\"\(f(py0 + plotHeight - y))\" fill=\"\(color)\"><title>[\(g(lo)), \(g(lo + binWidth))): \(count)</title></rect>")
                    if clipped {
                        // A bar taller than the axis: cut it with a white break mark and print its count.
                        let my = py0 + 14
                        svg.raw("<path class=\"axis-break\" d=\"M \(f(x - 2)) \(f(my + 3)) L \(f(x + w + 2)) \(f(my - 3)) M \(f(x - 2)) \(f(my + 8)) L \(f(x + w + 2)) \(f(my + 2))\" stroke=\"white\" stroke-width=\"2.5\"/>")
                        svg.text("\(count) \u{2191}", x: max(x + w, xToPx(report.threshold)) + 4, y: py0 + 14, size: 11, fill: color, weight: "bold")
                    }
                }
                svg.raw("</g>")
            }
            svg.rect(px0, py0, plotWidth, plotHeight, stroke: inkColor)
            for t in yTicks {
                svg.line(px0 - 4, yToPx(t), px0, yToPx(t), stroke: inkColor)
                svg.text(tickLabel(t, step: yTicks.count > 1 ? yTicks[1] - yTicks[0] : 1), x: px0 - 7, y: yToPx(t) + 4, size: 11, anchor: "end")
            }
            let xTicks = niceTicks(0, xMax, target: 5)
            for t in xTicks {
                svg.line(xToPx(t), py0 + plotHeight, xToPx(t), py0 + plotHeight + 4, stroke: inkColor)
                svg.text(tickLabel(t, step: xTicks.count > 1 ? xTicks[1] - xTicks[0] : 1), x: xToPx(t), y: py0 + plotHeight + 17, size: 11, anchor: "middle")
            }
            svg.text("singular value", x: px0 + plotWidth / 2, y: py0 + plotHeight + 35, size: 12, anchor: "middle")
            svg.text("count (all layers)", x: ox + 18, y: py0 + plotHeight / 2, size: 12, anchor: "middle", rotate: true)
            svg.text(g(report.threshold), x: xToPx(report.threshold), y: py0 - 3, size: 10, anchor: "middle", fill: "#555555")
            svg.raw("<line class=\"threshold\" x1=\"\(f(xToPx(report.threshold)))\" y1=\"\(f(py0))\" x2=\"\(f(xToPx(report.threshold)))\" y2=\"\(f(py0 + plotHeight))\" stroke=\"\(inkColor)\" stroke-width=\"1.5\" stroke-dasharray=\"6,4\"/>")
            svg.raw("</g>")

            // --- Bottom row: sorted spectra per layer, log y ---
            oy = headerHeight + panelHeight + rowGap
            let sy0 = oy + panelTitleHeight - 22
            svg.raw("<g class=\"panel spectra\" data-label=\"\(escape(label))\">")
            svg.text("\(label): sorted spectrum per layer", x: ox + marginLeft + plotWidth / 2, y: sy0 - 8, size: 13, anchor: "middle", weight: "bold")
            let sxToPx = { (i: Double) in px0 + i / indexMax * plotWidth }
            let syToPx = { (v: Double) -> Double in
                let l = min(max(log10(max(v, 1e-300)), logLo), logHi)
                return sy0 + plotHeight - (l - logLo) / (logHi - logLo) * plotHeight
            }
            let decades = Int(logHi - logLo)
            let decadeStep = max(1, Int((Double(decades) / 6).rounded(.up)))
            var logTicks: [Int] = []
            var e = Int(logLo)
            while e <= Int(logHi) { logTicks.append(e); e += decadeStep }
            for t in logTicks { svg.line(px0, syToPx(pow(10, Double(t))), px0 + plotWidth, syToPx(pow(10, Double(t))), stroke: gridColor) }
            for m in mats {
                let s = m.singularValues
                guard !s.isEmpty else { continue }
                // Spectra are monotone, so keeping ~2 points per pixel column (plus the last) loses nothing visible.
                let stride = max(1, s.count / Int(plotWidth * 2))
                var points: [String] = []
                var i = 0
                while i < s.count {
                    points.append("\(f(sxToPx(Double(i))))," + f(syToPx(s[i])))
                    if i == s.count - 1 { break }
                    i = min(i + stride, s.count - 1)
                }
                if s.count == 1 { points.append("\(f(sxToPx(1))),\(f(syToPx(s[0])))") }
                svg.raw("<polyline class=\"layer\" data-layer=\"\(m.layer)\" fill=\"none\" stroke=\"\(layerColor(m.layer, count: layerCount))\" stroke-width=\"1.3\" stroke-opacity=\"0.9\" points=\"\(points.joined(separator: " "))\"><title>layer \(m.layer): rank \(m.rank), \(m.countBelowThreshold) below \(g(report.threshold))</title></polyline>")
            }
            if mats.isEmpty {
                svg.text("no \(kind) matrices", x: px0 + plotWidth / 2, y: sy0 + plotHeight / 2, size: 12, anchor: "middle", fill: "#999999")
            }
            let thresholdY = syToPx(report.threshold)
            svg.text(g(report.threshold), x: px0 + plotWidth - 4, y: thresholdY - 4, size: 10, anchor: "end", fill: "#555555")
            svg.raw("<line class=\"threshold\" x1=\"\(f(px0))\" y1=\"\(f(thresholdY))\" x2=\"\(f(px0 + plotWidth))\" y2=\"\(f(thresholdY))\" stroke=\"\(inkColor)\" stroke-width=\"1.5\" stroke-dasharray=\"6,4\"/>")
            svg.rect(px0, sy0, plotWidth, plotHeight, stroke: inkColor)
            for t in logTicks {
                let y = syToPx(pow(10, Double(t)))
                svg.line(px0 - 4, y, px0, y, stroke: inkColor)
                let prefix = t == Int(logLo) && clamped ? "\u{2264}" : ""
                svg.text(prefix + powerLabel(t), x: px0 - 7, y: y + 4, size: 11, anchor: "end")
            }
            let iTicks = niceTicks(0, indexMax, target: 5)
            for t in iTicks {
                svg.line(sxToPx(t), sy0 + plotHeight, sxToPx(t), sy0 + plotHeight + 4, stroke: inkColor)
                svg.text(tickLabel(t, step: 1), x: sxToPx(t), y: sy0 + plotHeight + 17, size: 11, anchor: "middle")
            }
            svg.text("index (largest first)", x: px0 + plotWidth / 2, y: sy0 + plotHeight + 35, size: 12, anchor: "middle")
            svg.text("singular value (log)", x: ox + 18, y: sy0 + plotHeight / 2, size: 12, anchor: "middle", rotate: true)
            svg.raw("</g>")
        }

        // Legend along the bottom.
        let ly = height - legendHeight + 24
        var lx = 10 + marginLeft
        svg.raw("<g class=\"legend\">")
        svg.raw("<rect x=\"\(f(lx))\" y=\"\(f(ly - 10))\" width=\"14\" height=\"12\" fill=\"\(belowColor)\"/>")
        svg.text("values < threshold (counted)", x: lx + 20, y: ly, size: 12); lx += 200
        svg.raw("<rect x=\"\(f(lx))\" y=\"\(f(ly - 10))\" width=\"14\" height=\"12\" fill=\"\(aboveColor)\"/>")
        svg.text("values \u{2265} threshold", x: lx + 20, y: ly, size: 12); lx += 150
        svg.raw("<line x1=\"\(f(lx))\" y1=\"\(f(ly - 4))\" x2=\"\(f(lx + 28))\" y2=\"\(f(ly - 4))\" stroke=\"\(inkColor)\" stroke-width=\"1.5\" stroke-dasharray=\"6,4\"/>")
        svg.text("threshold \(g(threshold))", x: lx + 34, y: ly, size: 12); lx += 130
        if layerCount > 0 {
            svg.raw("<defs><linearGradient id=\"layers\" x1=\"0\" x2=\"1\" y1=\"0\" y2=\"0\">")
            for stop in 0...8 {
                let u = Double(stop) / 8
                svg.raw("<stop offset=\"\(f(u))\" stop-color=\"\(viridis(u))\"/>")
            }
            svg.raw("</linearGradient></defs>")
            svg.text("spectra lines: layer 0", x: lx, y: ly, size: 12)
            lx += 128
            svg.raw("<rect x=\"\(f(lx))\" y=\"\(f(ly - 10))\" width=\"90\" height=\"12\" fill=\"url(#layers)\"/>")
            svg.text("\(layerCount - 1)", x: lx + 96, y: ly, size: 12)
        }
        if clamped {
            svg.text("Spectra: values under the log axis floor (\u{2264}\(powerLabel(Int(logLo)))), including exact zeros, are drawn on the floor.",
                     x: 10 + marginLeft, y: ly + 22, size: 11, fill: "#777777")
        }
        svg.raw("</g>")
        svg.close()
        return svg.body
    }

    // MARK: - Scales

    /// A bin width that divides the threshold exactly (so no bin straddles it) and gives about `targetBins`
    /// bins over [0, xMax].
    static func histogramBinWidth(xMax: Double, threshold: Double, targetBins: Int) -> Double {
        let raw = xMax / Double(targetBins)
        guard threshold > 0, raw > 0 else { return max(raw, 1e-12) }
        let perThreshold = max(1, (threshold / raw).rounded())
        return threshold / perThreshold
    }

    /// The shared count axis. Normally the tallest bin; but a LoRA run piles (d - r) values per layer into the
    /// first bin, which would flatten every other bar, so when the tallest first bin is over 2.5x every other
    /// bin the axis is cut at 1.3x the tallest other bin and the taller bars are drawn clipped, with their counts.
    static func histogramYMax(_ histograms: [[Int]]) -> Double {
        let tallest = histograms.flatMap { $0 }.max() ?? 0
        let firstBins = histograms.compactMap(\.first).max() ?? 0
        let others = histograms.flatMap { $0.dropFirst() }.max() ?? 0
        if firstBins == tallest, others > 0, Double(firstBins) > 2.5 * Double(others) {
            return niceCeil(1.3 * Double(others))
        }
        return niceCeil(Double(max(1, tallest)))
    }

    /// Counts per bin [b*w, (b+1)*w); values at or past the last edge go in the last bin.
    static func histogram(_ values: [Double], binWidth: Double, binCount: Int) -> [Int] {
        var counts = [Int](repeating: 0, count: binCount)
        for v in values {
            // Guard the edge case v = k*w computed as k*w*(1-eps): nudge by a relative 1e-9 of a bin.
            let b = Int((v / binWidth + 1e-9).rounded(.down))
            counts[min(max(b, 0), binCount - 1)] += 1
        }
        return counts
    }

    static func powerLabel(_ e: Int) -> String {
        switch e {
        case 0: return "1"
        case 1: return "10"
        case -1: return "0.1"
        case -2: return "0.01"
        default: return "1e\(e)"
        }
    }

    // MARK: - Colours

    /// Depth colour of a layer: viridis from dark purple (layer 0) to yellow (last layer).
    static func layerColor(_ layer: Int, count: Int) -> String {
        viridis(count <= 1 ? 0 : Double(layer) / Double(count - 1))
    }

    /// Piecewise-linear viridis through 5 anchors, `u` in [0, 1]; stops at 0.92 so the last layer stays
    /// visible on white.
    static func viridis(_ u: Double) -> String {
        let anchors: [(Double, Double, Double)] = [
            (68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37),
        ]
        let x = min(max(u, 0), 1) * 0.92 * Double(anchors.count - 1)
        let i = min(Int(x), anchors.count - 2), t = x - Double(i)
        let (a, b) = (anchors[i], anchors[i + 1])
        func mix(_ p: Double, _ q: Double) -> Int { Int((p + (q - p) * t).rounded()) }
        return String(format: "#%02x%02x%02x", mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
    }

    // MARK: - Text

    static func percent(_ a: Int, _ b: Int) -> String { String(format: "%.0f%%", 100 * Double(a) / Double(max(1, b))) }
}
