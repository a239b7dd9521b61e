import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain
import ReLoRAAnalysis
import ReLoRASelfTest
import ReLoRACommandLine

let runsCommand = CommandSpec(
    name: "relora runs",
    summary: "list the runs under a directory: mode, steps, tokens, losses",
    discussion: """
        Lists the runs under DIR (DIR itself and directories one or two levels below it that hold recipe.json
        and metrics.jsonl), one line each: mode, quantization of the frozen weights, steps done/total, tokens
        seen, the last training loss, the last and the best validation loss and perplexity, and the step of
        the best.
        """,
    positionals: .one("DIR"),
    options: [.flag("json", help: "print a JSON array with the same fields (null where a run has no value)")],
    examples: ["relora runs runs/"],
    helpWhenEmpty: true)

func runRuns(_ args: [String]) throws {
    guard let a = try runsCommand.parseOrPrintHelp(args) else { return }
    let rows = try RunListing.rows(under: a.positional[0]) { standardError("warning: \($0)") }
    if a.flag("json") {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        print(String(decoding: try encoder.encode(rows), as: UTF8.self))
        return
    }
    guard !rows.isEmpty else {
        standardError("no runs under \(a.positional[0]) (a run directory holds recipe.json and metrics.jsonl)")
        return
    }
    print(RunListing.table(rows))
}
