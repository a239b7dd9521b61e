import Foundation
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

/// `relora runs DIR`: which directories count as runs, and each row's numbers against metrics.jsonl.
final class RunListingTests: XCTestCase {
    func testRowsOfRunsUnderADirectory() throws {
        let (full, relora) = try LossPlotTests.makeRuns()
        let root = URL(fileURLWithPath: full.runDir).deletingLastPathComponent().path  // .../runs
        // Not runs: a directory with a recipe only; a run with an empty metrics file is listed with a note.
        try FileManager.default.createDirectory(atPath: root + "/exp/not-a-run", withIntermediateDirectories: true)
        try Data("{}".utf8).write(to: URL(fileURLWithPath: root + "/exp/not-a-run/recipe.json"))
        try FileManager.default.createDirectory(atPath: root + "/exp/empty", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: relora.runDir + "/recipe.json", toPath: root + "/exp/empty/recipe.json")
        try Data().write(to: URL(fileURLWithPath: root + "/exp/empty/metrics.jsonl"))
        // Three levels down is beyond the search.
        try FileManager.default.createDirectory(atPath: root + "/exp/a/b", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: full.runDir + "/recipe.json", toPath: root + "/exp/a/b/recipe.json")
        try FileManager.default.copyItem(atPath: full.runDir + "/metrics.jsonl", toPath: root + "/exp/a/b/metrics.jsonl")

        let rows = try RunListing.rows(under: root)
        XCTAssertEqual(rows.map(\.run), ["exp/empty", "exp/relora", "full"])

        let f = try XCTUnwrap(rows.first { $0.run == "full" })
        let lines = try metricsLines(full.runDir)
        let losses = lines.compactMap { $0["loss"] }
        let vals = lines.compactMap { l -> (Int, Double, Double)? in
            guard let v = l["val_loss"] else { return nil }
            return (Int(l["step"]!), v, l["val_perplexity"]!)
        }
        XCTAssertEqual(f.mode, "full")
        XCTAssertEqual(f.quantization, "dense")
        XCTAssertEqual(f.stepsDone, 12)
        XCTAssertEqual(f.stepsTotal, 12)
        XCTAssertEqual(f.tokensSeen, 12 * 256)
        XCTAssertEqual(f.finalTrainLoss, losses.last)
        XCTAssertEqual(f.finalValLoss, vals.last?.1)
        XCTAssertEqual(f.finalValPerplexity, vals.last?.2)
        let best = try XCTUnwrap(vals.min { $0.1 < $1.1 })
        XCTAssertEqual(f.bestValLoss, best.1)
        XCTAssertEqual(f.bestValPerplexity, best.2)
        XCTAssertEqual(f.bestValStep, best.0)
        XCTAssertNil(f.note)

        let r = try XCTUnwrap(rows.first { $0.run == "exp/relora" })
        XCTAssertEqual(r.mode, "relora")
        let empty = try XCTUnwrap(rows.first { $0.run == "exp/empty" })
        XCTAssertNil(empty.finalValLoss)
        XCTAssertTrue(empty.note?.contains("no metrics") == true, "\(String(describing: empty.note))")

        // A `quant` recipe key (quantized frozen weights, a later feature) is shown when present.
        var recipe = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: relora.runDir + "/recipe.json"))) as! [String: Any]
        recipe["quant"] = "nf4"
        try JSONSerialization.data(withJSONObject: recipe).write(to: URL(fileURLWithPath: relora.runDir + "/recipe.json"))
        XCTAssertEqual(try RunListing.rows(under: root).first { $0.run == "exp/relora" }?.quantization, "nf4")

        // The directory itself can be a run.
        XCTAssertEqual(try RunListing.rows(under: full.runDir).map(\.run), ["."])
        XCTAssertThrowsError(try RunListing.rows(under: root + "/nowhere"))
    }

    /// A resume that extends the run (`--resume --set steps=N`) is listed with its new total: the resume
    /// rewrites recipe.json (before, `relora runs` kept showing the first recipe's steps).
    func testResumedRunWithMoreStepsShowsItsNewTotal() throws {
        let d = try TrainerTests.makeByteData(hidden: 16, layers: 1)
        let first = TrainerTests.recipe(d, run: "runs/extended") { $0.steps = 4; $0.valData = nil }
        _ = try Trainer(recipe: first, resume: false, log: { _ in }).run()
        var more = first
        more.steps = 6
        _ = try Trainer(recipe: more, resume: true, log: { _ in }).run()
        let row = try XCTUnwrap(try RunListing.rows(under: d.dir + "/runs").first)
        XCTAssertEqual(row.stepsDone, 6)
        XCTAssertEqual(row.stepsTotal, 6)
    }

    func testTableIsAligned() throws {
        let rows = [
            RunRow(run: "a", mode: "full", quantization: "dense", stepsDone: 12, stepsTotal: 12, tokensSeen: 3072,
                   finalTrainLoss: 3.5, finalValLoss: 4.25, finalValPerplexity: 70.1, bestValLoss: 4.2, bestValPerplexity: 66.69, bestValStep: 8),
            RunRow(run: "experiment/relora", mode: "relora", quantization: "nf4", stepsDone: 1200, stepsTotal: 20000, tokensSeen: 2_457_600),
            RunRow(run: "broken", mode: "?", quantization: "?", stepsDone: 0, stepsTotal: 0, tokensSeen: 0, note: "holds no metrics yet"),
        ]
        let lines = RunListing.table(rows).split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.count, 4)
        XCTAssertTrue(lines[0].hasPrefix("run "))
        // Right-aligned numeric columns end at the same offset as their header.
        let headerEnd = try XCTUnwrap(lines[0].range(of: "steps")).upperBound.utf16Offset(in: lines[0])
        XCTAssertEqual(try XCTUnwrap(lines[1].range(of: "12/12")).upperBound.utf16Offset(in: lines[1]), headerEnd)
        XCTAssertEqual(try XCTUnwrap(lines[2].range(of: "1200/20000")).upperBound.utf16Offset(in: lines[2]), headerEnd)
        XCTAssertTrue(lines[1].contains("3.07k") && lines[2].contains("2.46M"), "\(lines)")
        XCTAssertTrue(lines[1].contains("4.2000") && lines[1].contains("66.69"), lines[1])
        XCTAssertTrue(lines[3].hasSuffix("(holds no metrics yet)"), lines[3])
        XCTAssertEqual(formatCount(999), "999")
        XCTAssertEqual(formatCount(12_345_678), "12.3M")
        XCTAssertEqual(formatCount(2_000_000_000), "2.00B")
    }

    func testJSONHasEveryKeyInEveryRow() throws {
        let row = RunRow(run: "x", mode: "lora", quantization: "dense", stepsDone: 1, stepsTotal: 2, tokensSeen: 3)
        let object = try JSONSerialization.jsonObject(with: JSONEncoder().encode(row)) as! [String: Any]
        XCTAssertEqual(Set(object.keys), ["run", "mode", "quantization", "steps_done", "steps_total", "tokens_seen", "final_train_loss",
                                          "final_val_loss", "final_val_perplexity", "best_val_loss", "best_val_perplexity",
                                          "best_val_step", "note"])
        XCTAssertTrue(object["best_val_loss"] is NSNull)
    }

    /// The numbers of each metrics.jsonl line. Read with JSONDecoder, which rounds correctly (as `relora runs`
    /// does); JSONSerialization's NSDecimalNumber can be a unit in the last place off as a Double.
    func metricsLines(_ runDir: String) throws -> [[String: Double]] {
        try String(contentsOfFile: runDir + "/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .map { try JSONDecoder().decode([String: JSONValue].self, from: Data($0.utf8)) }
            .map { $0.compactMapValues { if case .number(let x) = $0 { return x } else { return nil } } }
    }
}
