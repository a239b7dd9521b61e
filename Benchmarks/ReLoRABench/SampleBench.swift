import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAModel
import ReLoRACommandLine

// `relora-bench sample`: tokens/s of `Generator` (what `relora sample` runs) with and without the KV cache,
// on a randomly initialised model of a config (no checkpoint needed: the cost of a token does not depend on
// the weights' values). "Full forward" is what `relora sample` did before the KV cache (the same Generator loop
// with useCache false: one forward over the window per token).
let sampleBenchCommand = CommandSpec(
    name: "relora-bench sample",
    summary: "sampling tokens/s with and without the KV cache, on a random model of a config",
    discussion: """
        Initialises the config's model randomly (uniform, std 0.02), then generates --tokens tokens greedily after a
        prompt of --prompt random tokens, first with the KV cache and then (unless --cache-only) with a full
        forward over the context for every token, as `relora sample` did before the cache. Prints for each the
        time of the first token (the prompt's forward), the tokens/s of the rest and of the whole, and whether
        both produced the same tokens.
        """,
    options: [
        .value("config", "FILE", help: "the model config", default: "Configs/models/llama_20m.json"),
        .value("prompt", "P", help: "prompt tokens", default: "16"),
        .value("tokens", "N", help: "tokens to generate", default: "8"),
        .flag("cache-only", help: "skip the run without the cache (slow for large models)"),
        .value("json", "OUT.json", help: "also write the figures to this JSON file"),
        .value("device", "cpu|cuda", help: "where to compute", default: "cpu"),
    ],
    examples: ["relora-bench sample --config Configs/models/llama_1b.json --prompt 16 --tokens 8"])

func runSampleBench(_ args: [String]) throws {
    guard let a = try sampleBenchCommand.parseOrPrintHelp(args) else { return }
    let configPath = try a.required("config")
    let promptCount = try a.int("prompt", atLeast: 1), tokens = try a.int("tokens", atLeast: 2)
    let config = try LlamaConfig(contentsOf: configPath)
    let backend = try BackendFactory.make(Device(parsing: a.string("device") ?? "cpu"))
    let start = now()
    let model = LlamaModel(config: config, backend: backend)
    // Uniform values of the init's standard deviation (cheaper to draw than the normal init, which takes
    // minutes for 1b on 2 cores; a token's cost does not depend on the values).
    for (i, (_, t)) in model.weights.named().enumerated() {
        backend.fillUniform(t, bound: 0.02 * Float(3).squareRoot(), seed: 1, stream: UInt64(i))
    }
    print(String(format: "%@: %.1fM parameters, initialised in %.1f s on %@ (%d threads, load average %.1f)", configPath,
                 Double(config.parameterCount) / 1e6, now() - start, backend.name, cpuThreadCount, loadAverage()))
    var rng = UInt64(12345)
    let prompt: [Int32] = (0..<promptCount).map { _ in
        rng = rng &* 6364136223846793005 &+ 1442695040888963407
        return Int32((rng >> 33) % UInt64(config.vocabSize))
    }
    var options = Generator.Options()
    options.maxTokens = tokens
    options.temperature = 0
    var results: [String: Any] = ["config": configPath, "parameters": config.parameterCount, "prompt": promptCount,
                                  "tokens": tokens, "device": backend.name, "threads": cpuThreadCount,
                                  "load_average": loadAverage()]
    // Warm-up (untimed): the first forward of a process touches fresh workspace pages and OpenBLAS's buffers.
    var warmUp = options
    warmUp.maxTokens = 2
    _ = try Generator.generate(model: model, prompt: prompt, options: warmUp)
    var produced: [String: [Int32]] = [:]
    for cached in a.flag("cache-only") ? [true] : [true, false] {
        options.useCache = cached
        var times: [Double] = []
        let t0 = now()
        produced[cached ? "cache" : "full"] = try Generator.generate(model: model, prompt: prompt, options: options,
                                                                     onToken: { _ in times.append(now() - t0) })
        let total = times.last!, first = times[0]
        let rest = Double(times.count - 1) / (total - first)
        let label = cached ? "with KV cache" : "full forward"
        print(String(format: "%@: first token %.3f s, then %.3f tokens/s (%.3f s/token); %.3f tokens/s overall", label,
                     first, rest, 1 / rest, Double(times.count) / total))
        results[cached ? "cache" : "full"] = ["first_token_s": first, "tokens_per_s_after_first": rest,
                                              "tokens_per_s_overall": Double(times.count) / total]
    }
    if let full = produced["full"] {
        let same = full == produced["cache"]
        print("same tokens with and without the cache: \(same)")
        results["same_tokens"] = same
    }
    if let path = a.string("json") {
        let data = try JSONSerialization.data(withJSONObject: results, options: [.sortedKeys, .prettyPrinted])
        try data.write(to: URL(fileURLWithPath: path))
    }
}

/// The 1-minute load average (/proc/loadavg), for the record: these machines are shared.
func loadAverage() -> Double {
    guard let text = try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8) else { return .nan }
    return Double(text.split(separator: " ").first ?? "") ?? .nan
}
