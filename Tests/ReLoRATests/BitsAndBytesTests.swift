import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRAFormats
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain

/// bitsandbytes 4-bit checkpoints (`BitsAndBytes4bit`) against the fixtures of
/// `Tests/Fixtures/make_bnb_fixture.py` (transformers + bitsandbytes' `save_pretrained` of one random tiny
/// LLaMA in nf4, nf4 with double quantization, fp4 with double quantization; see Tests/Fixtures/README.md).
final class BitsAndBytesTests: XCTestCase {
    static let variants = ["nf4", "nf4_dq", "fp4_dq"]
    static let linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    var fixtures: String { fixturesDirectory() + "/bnb" }
    func golden() throws -> SafetensorsFile { try SafetensorsFile(path: fixtures + "/golden.safetensors") }

    /// Every 4-bit weight of a variant with its [out, in] shape (the fixture's model: hidden 128, FFN 96).
    func weights(_ variant: String) throws -> [(String, [Int])] {
        let config = try HFCheckpoint.readConfig(directory: fixtures + "/" + variant)
        let model = LlamaModel(config: config, backend: CPUBackend())
        return model.weights.linears.map { ($0.namePrefix + "weight", $0.weight.shape) }
    }

    // MARK: Reading

    /// The de-nested absmax equals bitsandbytes' (dequantize_blockwise(absmax, state2) + offset, saved by the
    /// fixture script) bit for bit, for every weight, with and without double quantization, nf4 and fp4.
    func testDenestedAbsmaxEqualsBitsandbytesBitForBit() throws {
        let golden = try golden()
        for variant in Self.variants {
            let shards = try HFCheckpoint.openShards(URL(fileURLWithPath: fixtures + "/" + variant))
            let list = try weights(variant)
            XCTAssertEqual(list.count, 14)
            for (name, shape) in list {
                let w = try XCTUnwrap(try BitsAndBytes4bit.read(name, shape: shape, from: shards), name)
                XCTAssertEqual(w.doubleQuantized, variant.hasSuffix("_dq"))
                XCTAssertEqual(w.quantType.rawValue, String(variant.prefix(3)))
                let expected = try golden.floats("\(variant).absmax.\(name)")
                XCTAssertEqual(w.absmax.map(\.bitPattern), expected.map(\.bitPattern), "\(variant) \(name)")
            }
        }
    }

    /// The dequantized weights equal bitsandbytes' (its flattened-block dequantization) bit for bit: k_proj
    /// (whole-block rows) and down_proj (96-weight rows: blocks straddle rows), in nf4 and fp4.
    func testDequantizedWeightsEqualBitsandbytesBitForBit() throws {
        let golden = try golden()
        for variant in Self.variants {
            let shards = try HFCheckpoint.openShards(URL(fileURLWithPath: fixtures + "/" + variant))
            for path in ["self_attn.k_proj", "mlp.down_proj"] {
                let name = "model.layers.1.\(path).weight"
                let expected = try golden.floats("\(variant).dequant.\(name)")
                let shape = try XCTUnwrap(golden.info("\(variant).dequant.\(name)")).shape
                let w = try XCTUnwrap(try BitsAndBytes4bit.read(name, shape: shape, from: shards))
                XCTAssertEqual(w.dequantize().map(\.bitPattern), expected.map(\.bitPattern), "\(variant) \(name)")
            }
        }
    }

    /// relora's loss of each 4-bit checkpoint (opened as for `relora eval`: dequantized to f32) equals the
    /// loss transformers computes from the same f32 weights (golden `<variant>.loss`).
    ///
    /// Bound: both sides hold bit-identical f32 weights (tests above), so only the f32 evaluation order of the
    /// forward differs. Each logit is a dot product of 128 terms of magnitude <~ 1 after the final norm, whose
    /// f32 error is typically sqrt(128) * 2^-24 * sum|terms| ~ 1e-6 (worst case 128 * 2^-24 * ... ~ 1e-5);
    /// the loss, a mean of log-softmax values, moves by at most twice the largest logit error. 1e-4 covers
    /// the worst case with room, and is 400x below what the quantization itself moves the loss (nf4 vs the
    /// model before quantization: 0.04), so a wrong code, absmax or block order fails it. Measured: <= 6e-7.
    func testLossEqualsTransformersOnTheSameWeights() throws {
        let golden = try golden()
        let ids = try golden.integers("input_ids")
        let tokens = temporaryDirectory() + "/batch.npy"
        try NpyWriter.write(tokens: ids, dtype: .uint16, to: tokens)
        for variant in Self.variants {
            let model = try HFCheckpoint.load(directory: fixtures + "/" + variant, backend: CPUBackend())
            let result = try Evaluator.evaluate(model: model, tokens: try TokenArray(npyPath: tokens), seqLen: 16, batch: 2)
            let expected = Double(try golden.floats("\(variant).loss")[0])
            XCTAssertEqual(result.tokens, 30)
            XCTAssertEqual(result.loss, expected, accuracy: 1e-4, variant)
        }
    }

    /// Another block size (bitsandbytes' quantize_4bit with blocksize 128, double-quantized): dequantized bit for
    /// bit as bitsandbytes does, converted into an nf4 weight with its error, copied exactly into a dense one.
    func testOtherBlockSizeIsConvertedWithItsError() throws {
        let name = "model.layers.0.self_attn.k_proj.weight"
        let file = try SafetensorsFile(path: fixtures + "/blocksize128.safetensors")
        let shards = Dictionary(uniqueKeysWithValues: file.tensorNames.map { ($0, file) })
        let w = try XCTUnwrap(try BitsAndBytes4bit.read(name, shape: [64, 128], from: shards))
        XCTAssertEqual(w.blocksize, 128)
        XCTAssertTrue(w.doubleQuantized)
        let expected = try file.floats(name + ".dequant")
        XCTAssertEqual(w.dequantize().map(\.bitPattern), expected.map(\.bitPattern))
        let backend = CPUBackend()
        let q = QuantizedTensor(format: .nf4, rows: 64, cols: 128, backend: backend, tag: .frozenWeights)
        guard case .converted(let error, let reason) = try BitsAndBytes4bit.load(w, into: .quantized(q), backend: backend) else {
            return XCTFail("a 128-block weight must be converted")
        }
        XCTAssertEqual(reason, "its blocks are 128 weights, not 64")
        // Requantizing nf4 values to nf4 with other block boundaries: an error of the order of one 4-bit
        // quantization's (~0.1 relative), and not 0.
        XCTAssertGreaterThan(error, 1e-3)
        XCTAssertLessThan(error, 0.2)
        let dense = backend.makeTensor([64, 128], dtype: .f32, tag: .workspace)
        XCTAssertEqual(try BitsAndBytes4bit.load(w, into: .dense(dense), backend: backend), .dequantized)
        XCTAssertEqual(backend.download(dense).map(\.bitPattern), expected.map(\.bitPattern))
    }

    /// A sharded checkpoint whose companion tensors sit in another shard than their codes (the shard index
    /// names each tensor's file) reads the same weights as the single file.
    func testShardedCheckpointWithCompanionsInOtherShards() throws {
        let source = fixtures + "/nf4_dq"
        let file = try SafetensorsFile(path: source + "/model.safetensors")
        let dir = temporaryDirectory("bnb-sharded")
        // Codes (and dense tensors) in shard 1, every companion tensor (".absmax", ".quant_state...") in shard 2.
        let (first, second) = (file.tensorNames.filter { !$0.hasPrefix("model.layers.") || $0.hasSuffix(".weight") },
                               file.tensorNames.filter { $0.hasPrefix("model.layers.") && !$0.hasSuffix(".weight") })
        var map: [String: String] = [:]
        for (shard, names) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
            let entries = try names.map { n in
                SafetensorsEntry(name: n, dtype: file.info(n)!.dtype, shape: file.info(n)!.shape, bytes: try file.withRawBytes(n) { Array($0) })
            }
            try SafetensorsWriter.write(entries, to: dir + "/" + shard)
            for n in names { map[n] = shard }
        }
        try JSONSerialization.data(withJSONObject: ["weight_map": map]).write(to: URL(fileURLWithPath: dir + "/model.safetensors.index.json"))
        try FileManager.default.copyItem(atPath: source + "/config.json", toPath: dir + "/config.json")
        XCTAssertGreaterThan(second.count, 14 * 4)
        let a = try HFCheckpoint.load(directory: dir, backend: CPUBackend())
        let b = try HFCheckpoint.load(directory: source, backend: CPUBackend())
        for ((name, x), (_, y)) in zip(a.weights.named(), b.weights.named()) {
            XCTAssertTrue(a.backend.download(x) == b.backend.download(y), name)
        }
    }

    // MARK: Warm start

    /// A LoRA run with quant nf4 warm-started from a bitsandbytes nf4 checkpoint holds, after 0 steps, exactly
    /// the checkpoint's codes, each block's absmax being bitsandbytes' (de-nested) f32 value: the 12 linears
    /// with 128-weight rows byte for byte. The 2 down_projs (96-weight rows, blocks straddling rows) are
    /// converted and their error logged; fp4 is converted everywhere. A zero merge then changes no byte.
    func testWarmStartKeepsNF4CodesByteForByte() throws {
        let golden = try golden()
        for variant in Self.variants {
            var lines: [String] = []
            let t = try Trainer(recipe: try recipe(variant, run: "warm-\(variant)"), resume: false, log: { lines.append($0) })
            let raw = try SafetensorsFile(path: fixtures + "/" + variant + "/model.safetensors")
            var kept = 0
            for linear in t.model.weights.linears {
                let name = linear.namePrefix + "weight"
                let q = try XCTUnwrap(linear.weight.quantized)
                XCTAssertEqual(q.format, .nf4)
                let blocks = t.model.backend.downloadRaw(q.blocks)
                if variant.hasPrefix("nf4") && q.cols % 64 == 0 {
                    // The expected blocks, from the file's bytes and bitsandbytes' absmax (not relora's reader).
                    let codes = try raw.withRawBytes(name) { Array($0) }
                    let absmax = try golden.floats("\(variant).absmax.\(name)")
                    var expected: [UInt8] = []
                    for (b, a) in absmax.enumerated() {
                        withUnsafeBytes(of: a.bitPattern.littleEndian) { expected += $0 }
                        expected += codes[32 * b ..< 32 * (b + 1)]
                    }
                    XCTAssertEqual(blocks, expected, "\(variant) \(name)")
                    XCTAssertTrue(lines.contains("kept \(name) from bitsandbytes nf4\(variant.hasSuffix("_dq") ? " (double-quantized absmax)" : ""): nf4 codes byte for byte"), "\(lines)")
                    kept += 1
                } else {
                    let line = try XCTUnwrap(lines.first { $0.hasPrefix("converted \(name) from bitsandbytes") }, "\(lines)")
                    XCTAssertTrue(line.contains(variant.hasPrefix("fp4") ? "its codes are fp4" : "blocks straddle rows"), line)
                    // Requantizing 4-bit weights to nf4 costs about what one 4-bit quantization does
                    // (~0.1 relative on Gaussian-like weights); 0 would mean nothing was requantized.
                    let error = try XCTUnwrap(Double(line.split(separator: " ").last!))
                    XCTAssertGreaterThan(error, 1e-3, line)
                    XCTAssertLessThan(error, 0.2, line)
                }
            }
            XCTAssertEqual(kept, variant.hasPrefix("nf4") ? 12 : 0, variant)
            // A restart's merge of the first cycle (B = 0: a zero update) changes no byte of any linear, the
            // kept bitsandbytes blocks included (quantize(dequantize(q)) = q for them too).
            let before = t.model.weights.linears.map { t.model.backend.downloadRaw($0.weight.quantized!.blocks) }
            let report = try t.model.mergeAdapters(policy: RoundToNearestMerge(), seed: 1)
            XCTAssertEqual(report.codesChanged, 0, variant)
            XCTAssertEqual(t.model.weights.linears.map { t.model.backend.downloadRaw($0.weight.quantized!.blocks) }, before, variant)
            // The quant-state tensors are not "tensors a LLaMA model does not use".
            XCTAssertFalse(lines.contains { $0.hasPrefix("warning") }, "\(lines)")
        }
    }

    /// Under merge policy `master`, the kept codes come with an f32 master copy of their exact values, so
    /// the master requantizes to the kept blocks (the policy's invariant); a converted weight's master is the
    /// checkpoint's weight and its blocks that master quantized.
    func testWarmStartWithMasterCopiesKeepsCodesAndTheirValues() throws {
        var r = try recipe("nf4_dq", run: "warm-master")
        r.mode = .relora; r.reloraEvery = 1; r.restartWarmup = 0; r.mergePolicy = .master
        var lines: [String] = []
        let t = try Trainer(recipe: r, resume: false, log: { lines.append($0) })
        XCTAssertEqual(lines.filter { $0.hasSuffix(": nf4 codes byte for byte") }.count, 12, "\(lines)")
        for linear in t.model.weights.linears {
            let q = try XCTUnwrap(linear.weight.quantized)
            let master = t.model.backend.download(try XCTUnwrap(q.master))
            let blocks = try QuantizedMatrix(format: .nf4, rows: q.rows, cols: q.cols, bytes: t.model.backend.downloadRaw(q.blocks))
            XCTAssertTrue(try QuantFormat.nf4.quantize(master, rows: q.rows, cols: q.cols).bytes == blocks.bytes, linear.namePrefix)
            // Kept codes: the master is their exact values. Converted (down_proj): the master is the
            // checkpoint's weights, which the blocks approximate.
            XCTAssertEqual(master.map(\.bitPattern) == blocks.dequantize().map(\.bitPattern), q.cols % 64 == 0, linear.namePrefix)
        }
    }

    /// A recipe warm-starting a LoRA nf4 run from a fixture variant (byte-level tokens below the vocab of 64).
    func recipe(_ variant: String, run: String) throws -> Recipe {
        let dir = temporaryDirectory(run)
        try NpyWriter.write(tokens: (0..<600).map { Int64(($0 * 7) % 64) }, dtype: .uint16, to: dir + "/train.npy")
        var r = Recipe(model: fixtures + "/\(variant)/config.json", trainData: dir + "/train.npy", valData: nil, runDir: dir + "/run")
        r.mode = .lora; r.quant = .nf4; r.loraRank = 4; r.steps = 1; r.warmupSteps = 0; r.seqLen = 16
        r.microBatch = 2; r.gradAccum = 1; r.checkpointEvery = 100; r.evalEvery = 100
        r.warmStart = fixtures + "/" + variant
        return r
    }

    // MARK: Export

    /// `HFCheckpoint.save(bitsandbytesNF4:)` of the nf4 fixture opened densely writes the fixture's own
    /// bytes back: every code, absmax and quant_map of the 14 linears (down_proj's straddling blocks
    /// included: the export blocks the flattened tensor as bitsandbytes does, and requantizing dequantized
    /// nf4 gives the same codes) and every dense tensor; the quant states say the same. Re-importing the
    /// export reads the same weights. From the double-quantized fixture, the export's absmax is the
    /// de-nested one.
    func testNF4ExportWritesTheFixturesBytes() throws {
        let golden = try golden()
        for variant in ["nf4", "nf4_dq"] {
            let source = fixtures + "/" + variant
            let model = try HFCheckpoint.load(directory: source, backend: CPUBackend())
            let out = temporaryDirectory("export-\(variant)")
            try HFCheckpoint.save(model: model, to: out, bitsandbytesNF4: true)
            let exported = try SafetensorsFile(path: out + "/model.safetensors")
            let original = try SafetensorsFile(path: source + "/model.safetensors")
            for (name, shape) in try weights(variant) {
                for suffix in ["", ".quant_map"] + (variant == "nf4" ? [".absmax"] : []) {
                    XCTAssertEqual(try exported.withRawBytes(name + suffix) { Array($0) },
                                   try original.withRawBytes(name + suffix) { Array($0) }, "\(variant) \(name)\(suffix)")
                }
                XCTAssertEqual(try exported.floats(name + ".absmax").map(\.bitPattern),
                               try golden.floats("\(variant).absmax.\(name)").map(\.bitPattern), "\(variant) \(name).absmax")
                let state = try JSONKeys(data: exported.withRawBytes(name + ".quant_state.bitsandbytes__nf4") { Data($0) }, what: "state")
                XCTAssertEqual(state.values["shape"], .array(shape.map { .number(Double($0)) }))
                XCTAssertEqual(state.values["blocksize"], .number(64))
                XCTAssertNil(state.values["nested_offset"])
            }
            for (name, _) in model.weights.named() {
                XCTAssertEqual(try exported.withRawBytes(name) { Array($0) }, try original.withRawBytes(name) { Array($0) }, name)
            }
            let config = try HFCheckpoint.readJSONObject(out + "/config.json")
            guard case .object(let q)? = config.values["quantization_config"] else { return XCTFail("no quantization_config") }
            XCTAssertEqual(q["quant_method"], .string("bitsandbytes"))
            XCTAssertEqual(q["bnb_4bit_quant_type"], .string("nf4"))
            XCTAssertEqual(q["bnb_4bit_use_double_quant"], .bool(false))
            // Re-import: the same weights, read from the export.
            let again = try HFCheckpoint.openShards(URL(fileURLWithPath: out))
            let first = try HFCheckpoint.openShards(URL(fileURLWithPath: source))
            for (name, shape) in try weights(variant) {
                let a = try XCTUnwrap(try BitsAndBytes4bit.read(name, shape: shape, from: again))
                let b = try XCTUnwrap(try BitsAndBytes4bit.read(name, shape: shape, from: first))
                XCTAssertEqual(a.codes, b.codes, name)
                XCTAssertEqual(a.absmax.map(\.bitPattern), b.absmax.map(\.bitPattern), name)
            }
        }
    }

    /// A weight nf4 cannot hold (NaN) fails the export with the quantizer's sentence, and nothing is written.
    func testNF4ExportOfANonFiniteWeightIsOneSentence() throws {
        let model = try HFCheckpoint.load(directory: fixtures + "/nf4", backend: CPUBackend())
        let q = try XCTUnwrap(model.weights.linears[3].weight.dense)
        var values = model.backend.download(q)
        values[200] = .nan
        model.backend.upload(values, to: q)
        let out = temporaryDirectory("export-nan") + "/hf"
        assertInvalidData(try HFCheckpoint.save(model: model, to: out, bitsandbytesNF4: true),
                          mentions: "cannot quantize tensor 'model.layers.0.self_attn.o_proj.weight' to nf4: element [1, 72] is NaN")
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
    }

    /// The way back from a run: warm start (nf4 codes kept), checkpoint, `relora export --format hf --quant
    /// nf4`'s library path, warm start again from the export: the 12 whole-block linears hold the same
    /// blocks at every stage, byte for byte (the current cycle's B is 0, so the merge adds exactly nothing).
    func testRunExportReimportsByteIdentically() throws {
        let t = try Trainer(recipe: try recipe("nf4_dq", run: "roundtrip-a"), resume: false, log: { _ in })
        let checkpoint = try t.saveCheckpoint()
        let out = temporaryDirectory("roundtrip-export")
        try HFCheckpoint.save(model: try TrainingCheckpoint.loadModel(checkpoint, backend: CPUBackend()), to: out, bitsandbytesNF4: true)
        var r = try recipe("nf4_dq", run: "roundtrip-b")
        r.warmStart = out
        var lines: [String] = []
        let u = try Trainer(recipe: r, resume: false, log: { lines.append($0) })
        var compared = 0
        for (a, b) in zip(t.model.weights.linears, u.model.weights.linears) where a.weight.shape[1] % 64 == 0 {
            XCTAssertEqual(t.model.backend.downloadRaw(a.weight.quantized!.blocks),
                           u.model.backend.downloadRaw(b.weight.quantized!.blocks), a.namePrefix)
            compared += 1
        }
        XCTAssertEqual(compared, 12)
        XCTAssertEqual(lines.filter { $0.contains(": nf4 codes byte for byte") }.count, 12, "\(lines)")
    }

    /// The export command's options: --quant nf4 with gguf and another --quant with hf are usage errors.
    func testExportCommandRefusesMismatchedQuant() throws {
        let t = try Trainer(recipe: try recipe("nf4", run: "cli-export"), resume: false, log: { _ in })
        let checkpoint = try t.saveCheckpoint()
        let out = temporaryDirectory("cli-export-out")
        var result = try runRelora(["export", checkpoint, "--format", "gguf", "--quant", "nf4", "--out", out + "/m.gguf"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains("--quant nf4 is for --format hf"), result.stderr)
        result = try runRelora(["export", checkpoint, "--format", "hf", "--quant", "q8_0", "--out", out + "/hf"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains("--format hf takes --quant nf4 only"), result.stderr)
        result = try runRelora(["export", checkpoint, "--format", "hf", "--quant", "nf4", "--out", out + "/hf"])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stdout.contains("block linears in bitsandbytes nf4"), result.stdout)
        XCTAssertNotNil(try BitsAndBytes4bit.read("model.layers.0.self_attn.q_proj.weight", shape: [128, 128],
                                                  from: HFCheckpoint.openShards(URL(fileURLWithPath: out + "/hf"))))
    }

    // MARK: Hostile input

    /// A copy of the nf4_dq fixture with tensors replaced (nil: removed) and config edits, in a new directory.
    func mutated(_ name: String, tensors: [String: SafetensorsEntry?] = [:], config: [String: Any]? = nil,
                 from variant: String = "nf4_dq") throws -> String {
        let dir = temporaryDirectory("bnb-bad-\(name)")
        let file = try SafetensorsFile(path: fixtures + "/\(variant)/model.safetensors")
        var entries: [SafetensorsEntry] = []
        for n in file.tensorNames where tensors[n] == nil {
            let info = file.info(n)!
            entries.append(SafetensorsEntry(name: n, dtype: info.dtype, shape: info.shape, bytes: try file.withRawBytes(n) { Array($0) }))
        }
        for case let (_, entry?) in tensors { entries.append(entry) }
        try SafetensorsWriter.write(entries, to: dir + "/model.safetensors")
        var keys = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: fixtures + "/\(variant)/config.json"))) as! [String: Any]
        for (k, v) in config ?? [:] { keys[k] = v }
        try JSONSerialization.data(withJSONObject: keys).write(to: URL(fileURLWithPath: dir + "/config.json"))
        return dir
    }

    /// Every malformed quant state or companion tensor is one sentence naming the problem, never a crash.
    func testMalformedQuantStateIsRefusedWithOneSentence() throws {
        let w = "model.layers.0.self_attn.q_proj.weight"
        let stateName = w + ".quant_state.bitsandbytes__nf4"
        let file = try SafetensorsFile(path: fixtures + "/nf4_dq/model.safetensors")
        let state = try JSONSerialization.jsonObject(with: file.withRawBytes(stateName) { Data($0) }) as! [String: Any]
        func blob(_ edit: (inout [String: Any]) -> Void) throws -> SafetensorsEntry {
            var s = state
            edit(&s)
            let bytes = Array(try JSONSerialization.data(withJSONObject: s))
            return SafetensorsEntry(name: stateName, dtype: .U8, shape: [bytes.count], bytes: bytes)
        }
        func raw(_ text: String, name: String = stateName) -> SafetensorsEntry {
            SafetensorsEntry(name: name, dtype: .U8, shape: [text.utf8.count], bytes: Array(text.utf8))
        }
        let cases: [(String, [String: SafetensorsEntry?], [String: Any]?, String)] = [
            ("json", [stateName: raw("{\"quant_type\": \"nf4\", ")], nil, "is not a JSON object"),
            ("shape", [stateName: try blob { $0["shape"] = [128, 64] }], nil, "of shape [128, 64] but config.json implies [128, 128]"),
            ("type", [stateName: try blob { $0["quant_type"] = "fp4" }], nil, "says quant_type 'fp4' but its name says 'nf4'"),
            ("blocksize", [stateName: try blob { $0["blocksize"] = 48 }], nil, "has blocksize 48"),
            ("nested-blocksize", [stateName: try blob { $0["nested_blocksize"] = 1 << 40 }], nil, "has nested_blocksize \(1 << 40)"),
            ("unknown-key", [stateName: try blob { $0["zero_point"] = 1 }], nil, "has the unknown key 'zero_point'"),
            ("offset", [stateName: try blob { $0["nested_offset"] = "x" }], nil, "no finite number 'nested_offset'"),
            ("no-offset", [stateName: try blob { $0["nested_offset"] = nil }], nil, "must be F32 with 256 values"),
            ("absmax-missing", [w + ".absmax": nil], nil, "has no tensor '\(w).absmax'"),
            ("absmax-size", [w + ".absmax": SafetensorsEntry(name: w + ".absmax", dtype: .U8, shape: [3], bytes: [1, 2, 3])], nil,
             "must be U8 with 256 codes"),
            ("codes-size", [w: SafetensorsEntry(name: w, dtype: .U8, shape: [10, 1], bytes: Array(repeating: 0, count: 10))], nil,
             "are 10 bytes but shape [128, 128] needs 8192"),
            ("storage", [w: SafetensorsEntry(name: w, dtype: .BF16, shape: [4096, 1], bytes: Array(repeating: 0, count: 8192))], nil,
             "relora reads bnb_4bit_quant_storage uint8 only"),
            ("table", [w + ".quant_map": .f32(w + ".quant_map", shape: [16], (0..<16).map { Float($0) })], nil,
             "is not bitsandbytes' nf4 table"),
            ("two-states", [w + ".quant_state.bitsandbytes__fp4": raw("{}", name: w + ".quant_state.bitsandbytes__fp4")], nil, "has 2 quant_state tensors"),
            ("int4", [stateName: nil, w + ".quant_state.bitsandbytes__int4": raw("{}", name: w + ".quant_state.bitsandbytes__int4")], nil, "relora reads bitsandbytes__nf4 and bitsandbytes__fp4"),
            ("8bit", [:], ["quantization_config": ["quant_method": "bitsandbytes", "load_in_8bit": true]], "8-bit checkpoints (load_in_8bit) are not supported"),
            ("gptq", [:], ["quantization_config": ["quant_method": "gptq"]], "quantization method 'gptq' is not supported"),
        ]
        for (name, tensors, config, fragment) in cases {
            let dir = try mutated(name, tensors: tensors, config: config)
            assertInvalidFile(try HFCheckpoint.load(directory: dir, backend: CPUBackend()), mentions: fragment, name)
        }
        // A non-finite absmax (a corrupt nested scale): refused, not carried into the blocks.
        let nested = try mutated("nan", tensors: [w + ".nested_absmax": .f32(w + ".nested_absmax", shape: [1], [.nan])])
        assertInvalidFile(try HFCheckpoint.load(directory: nested, backend: CPUBackend()), mentions: "has a non-finite absmax")
        // Nested tensors without nested keys in the non-nested fixture.
        let stray = try mutated("stray", tensors: [w + ".nested_quant_map": .f32(w + ".nested_quant_map", shape: [256], Array(repeating: 0, count: 256))], from: "nf4")
        assertInvalidFile(try HFCheckpoint.load(directory: stray, backend: CPUBackend()), mentions: "has no nested_offset, yet")
    }
}
