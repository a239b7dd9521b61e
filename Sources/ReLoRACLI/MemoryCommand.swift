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

let memoryCommand = CommandSpec(
    name: "relora memory",
    summary: "plan a run's memory by tag (cpu or cuda) without allocating it",
    discussion: """
        Plans a run's memory without allocating it: the training code path (model build, one optimizer step
        over every micro-batch with the recipe's checkpointing, and a restart for relora) runs on a planning
        backend that records every tensor's shape, dtype and tag. Prints the planned peak bytes per tag and
        in total, and whether they fit SIZE. On cpu the plan equals what a real run allocates, to the byte (a
        test checks it); on cuda it follows the precision plan (bf16 activations, LoRA factors and working
        copies; f32 gradients, master copies and Adam states), then adds what the process holds besides its
        tensors: the caching allocator's rounding and cache (modelled exactly) and estimates of the CUDA
        context, cuBLAS' workspace and, with several processes, NCCL's buffers, for the GPU --gpu names. The
        budget is checked against that device total. With quantized weights under block checkpointing on cuda
        the workspace holds the dequantized-weight cache (reuse_dequantized; auto leaves it out when only the
        plan without it fits SIZE, and says so). The data files need not exist.
        With --world-size N it plans each of N data-parallel processes: the same for all unless the recipe
        has shard_optimizer, when each keeps the optimizer state of its share of the tensors; the table is
        then that of the rank with the largest peak, followed by every rank's optimizer state and peak.
        Exits with status 3 when the plan does not fit --budget (the plan is still printed).
        """,
    positionals: .one("RECIPE.json"),
    options: [
        .value("device", "cpu|cuda", help: "the device to plan for (default: the recipe's device)"),
        .value("budget", "SIZE", help: "e.g. 24GiB (a 24 GB card), 80GB; if the plan does not fit, names a change that would"),
        .value("world-size", "N", help: "plan each of N data-parallel processes (with the recipe's shard_optimizer)", default: "1"),
        .value("gpu", "NAME", help: "the GPU the cuda estimates are for: \(GPUProfile.known.map(\.key).joined(separator: ", "))", default: "h100"),
        .flag("json", help: "print the plan as JSON"),
        .repeated("set", "key=value", help: "override a recipe key (e.g. --set model=Configs/models/llama_7b.json)"),
    ],
    examples: ["relora memory Configs/recipes/plan_1024.json --device cuda --budget 24GiB --gpu rtx4090",
               "relora memory Configs/recipes/plan_1024.json --device cuda --world-size 4 --set shard_optimizer=true"],
    helpWhenEmpty: true)

func runMemory(_ args: [String]) throws {
    guard let a = try memoryCommand.parseOrPrintHelp(args) else { return }
    let worldSize = try a.int("world-size", atLeast: 1)
    let overrides = a.values("set")
    let recipe = try Recipe(contentsOf: a.positional[0], overrides: overrides)
    let device = try Device(parsing: a.string("device") ?? recipe.device)
    let budget = try a.bytes("budget")
    let gpu = try GPUProfile(key: a.string("gpu") ?? "h100")
    let config = try recipe.modelConfig()
    let plan = try MemoryPlanner.plan(recipe, config: config, device: device, budget: budget, worldSize: worldSize, gpu: gpu)
    if a.flag("json") {
        let data = try JSONSerialization.data(withJSONObject: plan.jsonObject(), options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    } else {
        let title = "\(recipe.model): \(config.parameterCount / 1_000_000)M parameters, mode \(recipe.mode.rawValue), "
            + "\(recipe.microBatch) x \(recipe.seqLen) tokens per micro-batch, checkpointing \(recipe.checkpointing.rawValue), device \(device.rawValue)"
            + plan.ranksDescription
        print(plan.formatted(title: title))
        if let budget, !plan.fits {
            if let s = MemoryPlanner.suggestion(for: recipe, config: config, device: device, budget: budget, worldSize: worldSize, gpu: gpu) {
                print("  to fit: \(s)")
            } else {
                print("  no standard change (block checkpointing, micro-batch 1, smaller rank) fits \(formatBytes(budget))")
            }
        }
    }
    if !plan.fits { exit(3) }
}

/// Refuses (before anything is allocated) a run whose plan exceeds `budget`, naming a change that fits: the
/// plan of this process, which under a launcher is one rank of several (its share of a sharded optimizer).
/// On cuda the budget is the whole card's, so the plan's estimates (for `GPUProfile.planningDefault`: no
/// device is open yet) count in full. Returns the plan.
@discardableResult
func checkBudget(_ recipe: Recipe, budget: Int) throws -> MemoryPlan {
    let device = try Device(parsing: recipe.device)
    let launch = try LaunchEnvironment.detect()
    let plan = try MemoryPlanner.requireFits(recipe, config: try recipe.modelConfig(), device: device, budget: budget,
                                             worldSize: launch?.worldSize ?? 1, rank: launch?.rank ?? 0)
    printLine("memory plan: needs \(formatBytes(plan.need)) of the \(formatBytes(budget)) budget on \(device.rawValue)")
    if plan.dequantizedCacheLeftOut > 0 {
        printLine("reuse_dequantized auto: off, its \(formatBytes(plan.dequantizedCacheLeftOut)) cache does not fit the budget")
    }
    return plan
}
