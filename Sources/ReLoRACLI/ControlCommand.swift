import Foundation
import ReLoRACore
import ReLoRAModel
import ReLoRATrain
import ReLoRACommandLine

let controlCommand = CommandSpec(
    name: "relora control",
    summary: "the control baseline's model config for a lora/relora recipe",
    discussion: """
        Writes the control baseline's model config for a lora/relora recipe: a full-rank model of the same
        depth and vocabulary, narrowed so that its parameter count matches the number of parameters the
        recipe's run trains (embeddings, head, norms and LoRA factors).
        """,
    positionals: .one("RECIPE.json"),
    options: [.value("out", "CONFIG.json", help: "the model config to write", required: true)],
    examples: ["relora control Configs/recipes/shakespeare_demo.json --out runs/control_config.json"],
    helpWhenEmpty: true)

func runControl(_ args: [String]) throws {
    guard let a = try controlCommand.parseOrPrintHelp(args) else { return }
    let recipe = try Recipe(contentsOf: a.positional[0])
    guard recipe.mode != .full else { throw controlCommand.usageError("the recipe trains full-rank; a control baseline is for lora/relora recipes") }
    let base = try recipe.modelConfig()
    let target = ControlBaseline.trainableCount(model: base, rank: recipe.loraRank, trainableScale: recipe.loraTrainableScale)
    let control = try ControlBaseline.config(matching: target, like: base)
    let out = try a.required("out")
    try writeFileAtomically(try JSONSerialization.data(withJSONObject: control.jsonObject(), options: [.prettyPrinted, .sortedKeys]), to: out)
    printLine("\(recipe.mode.rawValue) run trains \(target) parameters; control: hidden \(control.hiddenSize), intermediate \(control.intermediateSize), heads \(control.numAttentionHeads) -> \(control.parameterCount) parameters; wrote \(out)")
}
