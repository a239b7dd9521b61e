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

/// `relora plot`: real training runs (one full-rank, one ReLoRA with two restarts) read back and drawn; the
/// SVG must parse, hold one series per run in each panel, and put each restart at its token position.
final class LossPlotTests: XCTestCase {
    /// Element name, attributes and the ids of the enclosing elements, for every element of an SVG.
    final class Elements: NSObject, XMLParserDelegate {
        struct Element { var name: String; var attributes: [String: String]; var ancestorIds: [String] }
        var all: [Element] = []
        var stack: [String] = []
        func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                    attributes: [String: String] = [:]) {
            all.append(Element(name: name, attributes: attributes, ancestorIds: stack.filter { !$0.isEmpty }))
            stack.append(attributes["id"] ?? "")
        }
        func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
            stack.removeLast()
        }
        func with(class name: String, inside id: String? = nil) -> [Element] {
            all.filter { ($0.attributes["class"] ?? "").split(separator: " ").contains(Substring(name))
                && (id == nil || $0.ancestorIds.contains(id!)) }
        }
    }

    func parse(_ svg: String, file: StaticString = #filePath, line: UInt = #line) throws -> Elements {
        let parser = XMLParser(data: Data(svg.utf8))
        let elements = Elements()
        parser.delegate = elements
        XCTAssertTrue(parser.parse(), "SVG is not well-formed: \(String(describing: parser.parserError))", file: file, line: line)
        return elements
    }

    /// Two 12-step runs on byte-level Shakespeare: full-rank, and ReLoRA restarting every 4 steps (after
    /// steps 5 and 9, the zero-LR steps t = 4 and 8).
    static func makeRuns() throws -> (full: Recipe, relora: Recipe) {
        let data = try TrainerTests.makeByteData()
        let full = TrainerTests.recipe(data, run: "runs/full") { $0.steps = 12 }
        let relora = TrainerTests.recipe(data, run: "runs/exp/relora") {
            $0.mode = .relora; $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 12; $0.reloraEvery = 4; $0.restartWarmup = 1
            $0.warmupSteps = 2; $0.lr = 5e-3
        }
        for r in [full, relora] { _ = try Trainer(recipe: r, resume: false, log: { _ in }).run() }
        return (full, relora)
    }

    func testPlotOfRunsWithRestarts() throws {
        let (fullRecipe, reloraRecipe) = try Self.makeRuns()
        let full = try RunMetrics.load(runDir: fullRecipe.runDir, label: "full <rank>")
        let relora = try RunMetrics.load(runDir: reloraRecipe.runDir)
        XCTAssertEqual(relora.tokensPerStep, 256)  // 32 x 4 x 2
        XCTAssertEqual(relora.restarts.map(\.step), [5, 9])
        XCTAssertEqual(relora.evals.map(\.step), [4, 8, 12])
        XCTAssertEqual(full.steps.map(\.step), Array(1...12))
        XCTAssertEqual(full.malformedLines, 0)

        let svg = LossPlot.render(runs: [full, relora], smoothing: 3, title: "loss & <restarts>")
        let e = try parse(svg)
        XCTAssertEqual(e.all.first?.name, "svg")
        XCTAssertEqual(Set(e.with(class: "series").compactMap { $0.attributes["id"] }),
                       ["loss-run-0", "loss-run-1", "lr-run-0", "lr-run-1"])
        XCTAssertEqual(e.with(class: "series", inside: nil).count, 4, "one series per run in each panel")
        XCTAssertEqual(e.with(class: "series").first?.attributes["data-label"], "full <rank>")

        let frame = LossPlot.frame(for: [full, relora], smoothing: 3)
        for (i, run) in [full, relora].enumerated() {
            let id = "loss-run-\(i)"
            XCTAssertEqual(e.with(class: "train", inside: id).count, 1)
            XCTAssertEqual(e.with(class: "train-raw", inside: id).count, 1)
            XCTAssertEqual(e.with(class: "val", inside: id).count, run.evals.count)
            XCTAssertEqual(e.with(class: "lr", inside: "lr-run-\(i)").count, 1)
            // The smoothed curve has a point per step, starting at step 1's tokens.
            let points = try XCTUnwrap(e.with(class: "train", inside: id).first?.attributes["points"]).split(separator: " ")
            XCTAssertEqual(points.count, 12)
            let firstX = try XCTUnwrap(Double(points[0].split(separator: ",")[0]))
            XCTAssertEqual(firstX, frame.x(tokens: 256), accuracy: 0.006)
            // Restarts: a dashed vertical line at the restart step's token position.
            let restarts = e.with(class: "restart", inside: id)
            XCTAssertEqual(restarts.compactMap { $0.attributes["data-step"].flatMap { Int($0) } }, run.restarts.map(\.step))
            for (line, restart) in zip(restarts, run.restarts) {
                let expected = frame.x(tokens: Double(restart.step * 256))
                XCTAssertEqual(try XCTUnwrap(Double(line.attributes["x1"] ?? "")), expected, accuracy: 0.006)
                XCTAssertEqual(line.attributes["x1"], line.attributes["x2"])
                XCTAssertEqual(try XCTUnwrap(Double(line.attributes["y1"] ?? "")), frame.lossTop, accuracy: 0.006)
                XCTAssertEqual(try XCTUnwrap(Double(line.attributes["y2"] ?? "")), frame.lossTop + frame.lossHeight, accuracy: 0.006)
            }
            // Validation markers sit at their step's tokens and loss.
            for (circle, eval) in zip(e.with(class: "val", inside: id), run.evals) {
                XCTAssertEqual(try XCTUnwrap(Double(circle.attributes["cx"] ?? "")), frame.x(tokens: Double(eval.step * 256)), accuracy: 0.006)
                XCTAssertEqual(try XCTUnwrap(Double(circle.attributes["cy"] ?? "")), frame.yLoss(eval.loss), accuracy: 0.006)
            }
        }
        XCTAssertEqual(e.with(class: "restart", inside: "loss-run-0").count, 0)
        // The x axis covers every step: the last step's tokens are inside the panel.
        XCTAssertLessThanOrEqual(frame.x(tokens: 12 * 256), frame.left + frame.plotWidth)
        XCTAssertEqual(e.with(class: "legend-entry").count, 2)
    }

    func testMovingAverage() {
        let steps = [1.0, 3.0, nil, 5.0, 7.0].enumerated().map { RunMetrics.Step(step: $0 + 1, loss: $1, lr: nil, gradNorm: nil, tokensPerSecond: nil, mfu: nil) }
        let s = LossPlot.smoothed(steps, window: 2)
        XCTAssertEqual(s.map(\.step), [1, 2, 4, 5])         // the skipped step (null loss) has no point
        XCTAssertEqual(s.map(\.loss), [1, 2, 4, 6])         // mean of the last two finite losses
        XCTAssertEqual(LossPlot.smoothed(steps, window: 1).map(\.loss), [1, 3, 5, 7])
    }

    /// Malformed lines (a crash's cut-off line, junk) are skipped and counted; a missing or empty file is
    /// an error naming it.
    func testMalformedAndMissingMetrics() throws {
        let data = try TrainerTests.makeByteData()
        let r = TrainerTests.recipe(data, run: "bad") { $0.steps = 4 }
        _ = try Trainer(recipe: r, resume: false, log: { _ in }).run()
        let path = r.runDir + "/metrics.jsonl"
        let good = try RunMetrics.load(runDir: r.runDir)
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: path))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data("not json\n[1,2]\n{\"loss\":1}\n\n{\"step\":5,\"loss\":2.5,\"lr\"".utf8))
        try handle.close()
        let bad = try RunMetrics.load(runDir: r.runDir)
        XCTAssertEqual(bad.malformedLines, 4)
        XCTAssertEqual(bad.steps, good.steps)
        XCTAssertEqual(bad.evals, good.evals)

        // The CLI warns with the count and still plots.
        let out = data.dir + "/plot.svg"
        let result = try runRelora(["plot", r.runDir, "--out", out, "--labels", "bad run"])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stderr.contains("skipped 4 malformed lines"), result.stderr)
        XCTAssertNoThrow(try parse(try String(contentsOfFile: out, encoding: .utf8)))

        try Data().write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try RunMetrics.load(runDir: r.runDir)) { error in
            XCTAssertTrue("\(error)".contains("metrics.jsonl") && "\(error)".contains("no metrics"), "\(error)")
        }
        try FileManager.default.removeItem(atPath: path)
        XCTAssertThrowsError(try RunMetrics.load(runDir: r.runDir)) { error in
            XCTAssertTrue("\(error)".contains("metrics.jsonl"), "\(error)")
        }
        XCTAssertThrowsError(try RunMetrics.load(runDir: data.dir + "/nowhere")) { error in
            XCTAssertTrue("\(error)".contains("no such run directory"), "\(error)")
        }
        let missing = try runRelora(["plot", data.dir + "/nowhere"])
        XCTAssertEqual(missing.status, 2)
        XCTAssertEqual(missing.stderr.split(separator: "\n").count, 1, missing.stderr)
    }

    func testEmptyPlotIsWellFormed() throws {
        XCTAssertEqual(try parse(LossPlot.render(runs: [], title: "none")).all.first?.name, "svg")
    }
}
