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

let memoryUsage = """
    Usage: relora memory RECIPE.json [--device cpu|cuda] [--budget SIZE] [--json] [--set key=value ...]

    Plans a run's memory without allocating it: the training code path (model build, one optimizer step
    over every micro-batch with the recipe's checkpointing, and a restart for relora) runs on a planning
    backend that records every tensor's shape, dtype and tag. Prints the planned peak bytes per tag and
    in total, and whether they fit SIZE. On cpu the plan equals what a real run allocates, to the byte (a
    test checks it); on cuda it follows the precision plan (bf16 activations, LoRA factors and working
    copies; f32 gradients, master copies and Adam states). The data files need not exist.

      --device D        cpu (default) or cuda
      --budget SIZE     e.g. 24GiB (a 24 GB card), 80GB; if the plan does not fit, names a change that would
      --json            print the plan as JSON
      --set key=value   override a recipe key (e.g. --set model=Configs/models/llama_7b.json), repeatable
    """

func runMemory(_ args: [String]) throws {
    if args.isEmpty || args.contains("--help") || args.contains("-h") { print(memoryUsage); return }
    var overrides: [String] = []
    var rest: [String] = []
    var i = 0
    while i < args.count {
        if args[i] == "--set" {
            guard i + 1 < args.count else { throw ReLoRAError.usage("--set needs key=value") }
            overrides.append(args[i + 1]); i += 2
        } else {
            rest.append(args[i]); i += 1
        }
    }
    let a = try Arguments(rest, flagNames: ["json"])
    try a.checkKnown(["device", "budget", "json"])
    guard a.positional.count == 1 else { throw ReLoRAError.usage("give one recipe file; see `relora memory --help`") }
    let recipe = try Recipe(contentsOf: a.positional[0], overrides: overrides)
    let device = try Device(parsing: a.string("device") ?? recipe.device)
    let budget = try a.string("budget").map(parseBytes)
    let config = try LlamaConfig(contentsOf: recipe.model)
    let plan = try MemoryPlanner.plan(recipe, config: config, device: device, budget: budget)
    if a.flag("json") {
        let data = try JSONSerialization.data(withJSONObject: plan.jsonObject(), options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    } else {
        let title = "\(recipe.model): \(config.parameterCount / 1_000_000)M parameters, mode \(recipe.mode.rawValue), "
            + "\(recipe.microBatch) x \(recipe.seqLen) tokens per micro-batch, checkpointing \(recipe.checkpointing.rawValue), device \(device.rawValue)"
        print(plan.formatted(title: title))
        if let budget, !plan.fits {
            if let s = MemoryPlanner.suggestion(for: recipe, config: config, device: device, budget: budget) {
                print("  to fit: \(s)")
            } else {
                print("  no standard change (block checkpointing, micro-batch 1, smaller rank) fits \(formatBytes(budget))")
            }
        }
    }
    if !plan.fits { exit(3) }
}

/// Refuses (before anything is allocated) a run whose plan exceeds `budget`, naming a change that fits.
func checkBudget(_ recipe: Recipe, budget: Int) throws {
    let device = try Device(parsing: recipe.device)
    let plan = try MemoryPlanner.requireFits(recipe, config: try LlamaConfig(contentsOf: recipe.model), device: device, budget: budget)
    printLine("memory plan: peak \(formatBytes(plan.report.peakTotal)) of the \(formatBytes(budget)) budget on \(device.rawValue)")
}
