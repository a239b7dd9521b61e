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

/// The recipe key table: every key decodes, encodes and round-trips through `recipe.json`; keys are
/// written only for the modes they apply to; cross-key rules (warmup vs restart interval).
final class RecipeTests: XCTestCase {
    /// A valid `relora` recipe (so every key applies) that uses the defaults wherever it can.
    static let base: [String: JSONValue] = [
        "model": .string("m.json"), "train_data": .string("t.npy"), "run_dir": .string("r"),
        "mode": .string("relora"), "relora_every": .number(100),  // default steps 1000, warmup 100, restart_warmup 50
    ]

    /// Per key: the edit of `base` that sets it to a valid value other than the one `base` decodes to
    /// (`.null` removes a key). Every table key must be here, so a new key cannot skip this test.
    static let samples: [String: [String: JSONValue]] = [
        "model": ["model": .string("other.json")],
        "train_data": ["train_data": .string("other.npy")],
        "val_data": ["val_data": .string("v.npy")],
        "tokenizer": ["tokenizer": .string("tok.json")],
        "run_dir": ["run_dir": .string("runs/x")],
        "seq_len": ["seq_len": .number(64)],
        "micro_batch": ["micro_batch": .number(4)],
        "grad_accum": ["grad_accum": .number(3)],
        "tokens_per_step": ["tokens_per_step": .number(128 * 8 * 5)],  // -> grad_accum 5
        "steps": ["steps": .number(2000)],
        "token_budget": ["token_budget": .number(128 * 8 * 500 + 7)],  // -> steps 500 (rounded down)
        "lr": ["lr": .number(3.0e-4)],
        "warmup_steps": ["warmup_steps": .number(60)],
        "min_lr_ratio": ["min_lr_ratio": .number(0.123456789012345)],
        "optimizer_states": ["optimizer_states": .string("int8")],
        "adam_beta1": ["adam_beta1": .number(0.8)],
        "adam_beta2": ["adam_beta2": .number(0.95)],
        "adam_eps": ["adam_eps": .number(1e-6)],
        "weight_decay": ["weight_decay": .number(0.1)],
        "grad_clip": ["grad_clip": .number(0.5)],
        "eval_every": ["eval_every": .number(50)],
        "eval_tokens": ["eval_tokens": .number(1000)],
        "checkpoint_every": ["checkpoint_every": .number(250)],
        "keep_checkpoints": ["keep_checkpoints": .number(3)],
        "log_every": ["log_every": .number(5)],
        "seed": ["seed": .number(7)],
        // A recipe may name cuda (the backend factory judges availability when a run starts).
        "device": ["device": .string("cuda")],
        "checkpointing": ["checkpointing": .string("block")],
        "sampler": ["sampler": .string("epoch")],
        "init_std": ["init_std": .number(0.01)],
        "max_skipped_fraction": ["max_skipped_fraction": .number(0.2)],
        "description": ["description": .string("a note for people")],
        "mode": ["mode": .string("lora"), "relora_every": .null],
        "lora_r": ["lora_r": .number(8)],
        "lora_alpha": ["lora_alpha": .number(16.5)],
        "lora_dropout": ["lora_dropout": .number(0.1)],
        "lora_trainable_scale": ["lora_trainable_scale": .bool(true)],
        "quant": ["quant": .string("q4_0")],
        // base has dense weights: `exact` is their only policy (and not the unset default).
        "merge_policy": ["merge_policy": .string("exact")],
        "relora_every": ["relora_every": .number(200)],
        // (ignored unless merge_policy is master, but stored like any relora key)
        "master_copies": ["master_copies": .string("file")],
        "restart_warmup": ["restart_warmup": .number(30)],
        "optimizer_reset": ["optimizer_reset": .string("random")],
        "optimizer_reset_ratio": ["optimizer_reset_ratio": .number(0.5)],
        "jagged_schedule": ["jagged_schedule": .bool(false)],
        "warm_start": ["warm_start": .string("runs/full")],
        "shard_optimizer": ["shard_optimizer": .bool(true)],
        "reuse_dequantized": ["reuse_dequantized": .bool(false)],
    ]
    /// Keys with no valid value that changes the recipe: `description` is not stored.
    static let noOtherValue: Set<String> = ["description"]
    /// Keys read into another key's field and never written: the stored key and its value for the sample.
    static let inputOnly: [String: (stored: String, value: JSONValue)] = [
        "tokens_per_step": ("grad_accum", .number(5)), "token_budget": ("steps", .number(500)),
    ]

    /// The recipe as `recipe.json` holds it, parsed back.
    func stored(_ r: Recipe) throws -> [String: JSONValue] {
        try JSONKeys(data: JSONSerialization.data(withJSONObject: r.jsonObject()), what: "recipe.json").values
    }

    func testKeyTableHasNoDuplicatesAndEveryKeyRoundTrips() throws {
        let names = Recipe.keyTable.map(\.name)
        let duplicates = Dictionary(grouping: names, by: { $0 }).filter { $0.value.count > 1 }.keys.sorted()
        XCTAssertEqual(duplicates, [], "keys declared twice")
        XCTAssertEqual(Set(Self.samples.keys), Recipe.knownKeys, "every table key needs a sample value here")

        let reference = try Recipe(keys: Self.base)
        let referenceJSON = try stored(reference)
        XCTAssertEqual(try Recipe(keys: referenceJSON), reference)
        for name in names {
            var keys = Self.base
            for (k, v) in Self.samples[name]! { keys[k] = v }
            let r: Recipe
            do { r = try Recipe(keys: keys) } catch { XCTFail("\(name): sample rejected: \(error)"); continue }
            if !Self.noOtherValue.contains(name) {
                XCTAssertNotEqual(r, reference, "\(name): decoding the key changed nothing")
            }
            let json = try stored(r)
            XCTAssertEqual(try Recipe(keys: json), r, "\(name): decode(encode(r)) != r")
            XCTAssertTrue(Set(json.keys).isSubset(of: Recipe.knownKeys), "\(name): wrote keys outside the table")
            // Setting one key changes only that key in recipe.json, so no two keys share a field.
            let changed = Set(json.keys).union(referenceJSON.keys).filter { json[$0] != referenceJSON[$0] }
            let expected: Set<String> = Self.noOtherValue.contains(name) ? []
                : name == "mode" ? Set(referenceJSON.keys).subtracting(json.keys).union(["mode"])
                : [Self.inputOnly[name]?.stored ?? name]
            XCTAssertEqual(changed, expected, "\(name): recipe.json changed in other keys")
            if let result = Self.inputOnly[name] {
                XCTAssertNil(json[name], "\(name) is input-only")
                XCTAssertEqual(json[result.stored], result.value, name)
            } else if name == "description" {
                XCTAssertNil(json[name], "description is not stored")
            } else {
                // The encoder reads the field the decoder wrote (not merely some field).
                XCTAssertEqual(json[name], Self.samples[name]![name], "\(name): stored value differs from the input")
            }
        }
    }

    func testKeysAreWrittenOnlyForTheirModes() throws {
        let loraKeys: Set = ["lora_r", "lora_alpha", "lora_dropout", "lora_trainable_scale", "quant"]
        let reloraKeys: Set = ["relora_every", "restart_warmup", "optimizer_reset", "optimizer_reset_ratio", "jagged_schedule", "master_copies"]
        let optionalKeys: Set = ["val_data", "tokenizer", "warm_start", "sampler", "merge_policy"]
        let inputOnly: Set = ["tokens_per_step", "token_budget", "description"]
        // Flags written only when set (the recipes of runs without them stay as they were).
        let onlyWhenSet: Set = ["shard_optimizer", "reuse_dequantized"]
        let always = Recipe.knownKeys.subtracting(loraKeys).subtracting(reloraKeys).subtracting(optionalKeys).subtracting(inputOnly)
            .subtracting(onlyWhenSet)
        var full = Self.base
        full["mode"] = .string("full"); full["relora_every"] = .null
        var lora = full
        lora["mode"] = .string("lora")
        for (keys, expected) in [(full, always), (lora, always.union(loraKeys)), (Self.base, always.union(loraKeys).union(reloraKeys))] {
            let r = try Recipe(keys: keys)
            XCTAssertEqual(Set(try stored(r).keys), expected, "mode \(r.mode)")
            XCTAssertEqual(try Recipe(keys: stored(r)), r)
        }
        var withOptionals = Self.base
        for k in optionalKeys { withOptionals[k] = .string(k == "sampler" ? "epoch" : k == "merge_policy" ? "exact" : "x") }
        XCTAssertTrue(optionalKeys.isSubset(of: Set(try stored(Recipe(keys: withOptionals)).keys)))
        var withFlags = Self.base
        for k in onlyWhenSet { withFlags[k] = .bool(true) }
        XCTAssertTrue(onlyWhenSet.isSubset(of: Set(try stored(Recipe(keys: withFlags)).keys)))
    }

    func testChoiceErrorsListTheAllowedValues() {
        for (key, allowed) in [("mode", "'full', 'lora' or 'relora'"), ("checkpointing", "'none' or 'block'"),
                               ("optimizer_reset", "'magnitude', 'random', 'full', 'none', 'magnitude_joint' or 'magnitude_reinit_a'"),
                               ("sampler", "'random' or 'epoch'"),
                               ("merge_policy", "'exact', 'rtn', 'stochastic', 'compensate' or 'master'")] {
            var keys = Self.base
            keys[key] = .string("bogus")
            XCTAssertThrowsError(try Recipe(keys: keys)) {
                XCTAssertEqual("\($0)".contains("'\(key)' must be \(allowed), got 'bogus'"), true, "\($0)")
            }
        }
    }

    /// `reuse_dequantized` is true, false or "auto" (null and absent: auto, stored as nothing); anything else is
    /// one sentence naming the three.
    func testReuseDequantizedIsTrueFalseOrAuto() throws {
        for (value, expected) in [(JSONValue.bool(true), true), (.bool(false), false), (.string("auto"), nil), (.null, nil)] as [(JSONValue, Bool?)] {
            var keys = Self.base
            keys["reuse_dequantized"] = value
            let r = try Recipe(keys: keys)
            XCTAssertEqual(r.reuseDequantized, expected, value.summary)
            XCTAssertEqual(try stored(r)["reuse_dequantized"], expected.map { .bool($0) }, value.summary)
        }
        XCTAssertNil(try Recipe(keys: Self.base).reuseDequantized)
        for bad in [JSONValue.string("yes"), .number(1)] {
            var keys = Self.base
            keys["reuse_dequantized"] = bad
            XCTAssertThrowsError(try Recipe(keys: keys)) {
                XCTAssertTrue("\($0)".contains("'reuse_dequantized' must be true, false or \"auto\", got \(bad.summary)"), "\($0)")
            }
        }
    }

    /// warmup_steps 25 with relora_every 20 used to start the first restart at lr 0.8 * lr (t / W0) and give
    /// the steps after the optimizer reset no ramp. Such jagged recipes are rejected; W0 = R gives lr 0 at R.
    func testWarmupLongerThanRestartIntervalIsRejected() throws {
        var keys = Self.base
        keys["steps"] = .number(60); keys["relora_every"] = .number(20); keys["restart_warmup"] = .number(5)
        keys["warmup_steps"] = .number(25)
        XCTAssertThrowsError(try Recipe(keys: keys)) {
            XCTAssertTrue("\($0)".contains("'warmup_steps' (25) must be at most 'relora_every' (20)"), "\($0)")
            XCTAssertFalse("\($0)".contains("\n"))
        }
        // Recipes built in code are checked too (the Trainer calls validate()).
        var code = try Recipe(keys: Self.base)
        code.warmupSteps = 101
        XCTAssertThrowsError(try code.validate())

        keys["warmup_steps"] = .number(20)
        let r = try Recipe(keys: keys)
        XCTAssertEqual(r.schedule.multiplier(step: 19), 19.0 / 20)
        for restart in [20, 40] {
            XCTAssertEqual(r.schedule.multiplier(step: restart), 0, "lr at restart step \(restart)")
            XCTAssertGreaterThan(r.schedule.multiplier(step: restart + 1), 0)
            XCTAssertLessThan(r.schedule.multiplier(step: restart + 1), r.schedule.multiplier(step: restart + 4))
        }
        // Without the jagged schedule (ablation) there is no lr-0 step to protect.
        keys["warmup_steps"] = .number(25); keys["jagged_schedule"] = .bool(false)
        XCTAssertNoThrow(try Recipe(keys: keys))
    }
}
