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

let runsUsage = """
    Usage: relora runs DIR [--json]

    Lists the runs under DIR (DIR itself and directories one or two levels below it that hold recipe.json
    and metrics.jsonl), one line each: mode, quantization of the frozen weights, steps done/total, tokens
    seen, the last training loss, the last and the best validation loss and perplexity, and the step of
    the best. --json prints a JSON array with the same fields (null where a run has no value).
    """

func runRuns(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(runsUsage); return }
    let a = try Arguments(args, flagNames: ["json"])
    try a.checkKnown(["json"])
    guard a.positional.count == 1 else { throw ReLoRAError.usage("give one directory") }
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
