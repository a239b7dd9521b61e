import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRAFormats
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain
@testable import ReLoRATokenizer

/// GGUF files made by llama.cpp itself (`Tests/Fixtures/gguf`, written by `make_gguf_fixture.py` with
/// llama.cpp's `convert_hf_to_gguf.py` and `llama_model_quantize`): K-quant dequantization against gguf-py,
/// losses against transformers, warm starts that keep the file's codes, and fuzzed headers.
final class GGUFImportTests: XCTestCase {
    let dir = fixturesDirectory() + "/gguf"

    func expected(_ file: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: dir + "/expected.json"))
        let all = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        return try XCTUnwrap(all[file] as? [String: Any], "expected.json has no entry for \(file)")
    }

    // MARK: K-quants

    /// relora_quant.h's q4_K, q5_K and q6_K dequantizers give gguf-py's values bit for bit on random
    /// blocks (every code, scale and min bit pattern random; fp16 super-block scales finite, some negative,
    /// one subnormal), read through a GGUF file like any tensor.
    func testKQuantDequantizationEqualsGGUFPyBitForBit() throws {
        let reference = try SafetensorsFile(path: dir + "/kquant_reference.safetensors")
        let tmp = temporaryDirectory()
        for type in [GGMLType.q4_K, .q5_K, .q6_K] {
            let info = try XCTUnwrap(reference.info(type.name + ".blocks"))
            let blocks = try reference.withRawBytes(type.name + ".blocks") { Array($0) }
            let values = try reference.floats(type.name + ".values")
            let (rows, cols) = (info.shape[0], info.shape[1] / type.bytesPerBlock * type.blockSize)
            XCTAssertEqual(values.count, rows * cols)
            typealias Raw = GGUFContainerTests.RawGGUF
            var raw = Raw()
            raw.infos = [Raw.info("w", dims: [UInt64(cols), UInt64(rows)], type: type.rawValue, offset: 0)]
            raw.data = blocks
            let path = tmp + "/\(type.name).gguf"
            try Data(raw.bytes).write(to: URL(fileURLWithPath: path))
            let file = try GGUFFile(path: path)
            let got = try file.floats(try XCTUnwrap(file.tensor("w")))
            XCTAssertEqual(got.map(\.bitPattern), values.map(\.bitPattern), type.name)
            XCTAssertTrue(values.contains { $0 < 0 } && values.contains { $0 > 0 }, "the reference exercises both signs")
        }
    }

    // MARK: Losses

    /// `relora eval`'s model (`LlamaGGUF.loadModel`) on each llama.cpp file: the reader sees the tensor
    /// types llama.cpp wrote; the loss equals transformers' on the same file (its own GGUF loader, so its
    /// own q/k un-permutation and dequantization) to float32 rounding, and transformers' on the original
    /// model within the bound the fixture derives from the file's rounding error (make_gguf_fixture.py:
    /// 6 sigma of the first-order term plus the measured Taylor remainder; never more than the
    /// Cauchy-Schwarz bound 1.25 B1).
    /// relora's loss against transformers' on the same file: both sum the same f32 values in other orders.
    /// Four ulps of a loss near 4.7 (an ulp is 4.8e-7); measured: at most 1e-7 on these files.
    static let f32Rounding = 2e-6

    func testLossOnLlamaCppFilesEqualsTransformersWithinTheRoundingBound() throws {
        let tokens = try TokenArray(npyPath: dir + "/tokens.npy")
        for name in ["tiny_f16.gguf", "tiny_q8_0.gguf", "tiny_q4_0.gguf", "tiny_k_q4_K_M.gguf"] {
            let want = try expected(name)
            let file = try GGUFFile(path: dir + "/" + name)
            let types = Dictionary(uniqueKeysWithValues: file.tensors.map { ($0.name, $0.type.name) })
            XCTAssertEqual(types, want["types"] as? [String: String], name)
            let model = try LlamaGGUF.loadModel(file, backend: CPUBackend())
            let loss = try Evaluator.evaluate(model: model, tokens: tokens, seqLen: 16, batch: 10).loss
            let viaTransformers = try XCTUnwrap(want["loss_transformers_gguf"] as? Double)
            let original = try XCTUnwrap(want["loss_original"] as? Double)
            let tolerance = try XCTUnwrap(want["tolerance"] as? Double)
            let b1 = try XCTUnwrap(want["first_order_bound"] as? Double)
            XCTAssertLessThanOrEqual(tolerance, 1.25 * b1 + 2e-5, name)
            XCTAssertEqual(loss, viaTransformers, accuracy: Self.f32Rounding, name)
            XCTAssertEqual(loss, original, accuracy: tolerance, name)
            print(String(format: "%@: relora %.7f, transformers on the file %.7f, on the original %.7f (allowed +-%.2e; Cauchy-Schwarz %.2e); types %@",
                         name, loss, viaTransformers, original, tolerance, 1.25 * b1, Set(types.values).sorted().joined(separator: " ")))
        }
    }

    // MARK: Warm start

    func recipe(_ d: TrainerTests.ByteData, _ run: String, file: String, quant: FrozenStorage,
                policy: MergePolicyKind? = nil) -> Recipe {
        TrainerTests.recipe(d, run: run) {
            $0.model = file; $0.warmStart = file; $0.trainData = self.dir + "/tokens.npy"; $0.valData = nil
            $0.mode = .relora; $0.quant = quant; $0.mergePolicy = policy; $0.loraRank = 4; $0.loraAlpha = 8
            $0.seqLen = 16; $0.microBatch = 2; $0.gradAccum = 1; $0.steps = 10; $0.reloraEvery = 5
            $0.restartWarmup = 1; $0.warmupSteps = 1; $0.evalEvery = 100; $0.checkpointEvery = 100
        }
    }

    /// The file's blocks of one linear in relora's (Hugging Face) row order.
    func fileBlocks(_ file: GGUFFile, _ linear: AdaptedLinear, _ config: LlamaConfig) throws -> QuantizedMatrix {
        let info = try XCTUnwrap(file.tensor(try XCTUnwrap(LlamaGGUF.ggufName(linear.namePrefix + "weight"))))
        let q = try file.quantized(info)
        guard linear.kind == .q || linear.kind == .k else { return q }
        return try QuantizedMatrix(format: q.format, rows: q.rows, cols: q.cols,
                                   bytes: LlamaGGUF.permuteRows(q.bytes, rows: q.rows, headDim: config.headDim, toGGUF: false))
    }

    /// `warm_start: FILE.gguf` with `quant` equal to the file's type: after 0 steps every block linear
    /// holds the file's codes byte for byte (no dequantize-requantize; q4_0's embedding, in q4_0, and
    /// head, in q8_0, are dense and equal their dequantization), and the log says so. After training and
    /// one restart, each merged linear's codes are the requantization of dequant(file codes) + s B A.
    /// Before training, the warm-started model's loss is transformers' on the file.
    /// With merge policy `master` the master copy is the codes' dequantization.
    func testWarmStartInTheFilesFormatKeepsEveryBlockByteForByte() throws {
        let d = try TrainerTests.makeByteData()
        for (name, quant) in [("tiny_q8_0.gguf", FrozenStorage.q8_0), ("tiny_q4_0.gguf", .q4_0)] {
            let path = dir + "/" + name
            let file = try GGUFFile(path: path)
            for policy in [MergePolicyKind.rtn, .master] {
                let label = "\(name) \(policy.rawValue)"
                var lines: [String] = []
                let t = try Trainer(recipe: recipe(d, "warm-\(quant.rawValue)-\(policy.rawValue)", file: path, quant: quant, policy: policy),
                                    resume: false, log: { lines.append($0) })
                let b = t.model.backend
                XCTAssertEqual(t.state.step, 0)
                XCTAssertTrue(lines.contains { $0.contains("took the \(quant.rawValue) blocks of 14 linears from \(path) byte for byte") }, "\(label): \(lines)")
                XCTAssertFalse(lines.contains { $0.hasPrefix("quantized ") }, "\(label): nothing is requantized: \(lines)")
                var original: [QuantizedMatrix] = []
                for linear in t.model.weights.linears {
                    let q = try XCTUnwrap(linear.weight.quantized)
                    let want = try fileBlocks(file, linear, t.model.config)
                    XCTAssertEqual(b.downloadRaw(q.blocks), want.bytes, "\(label) \(linear.namePrefix)")
                    if let master = q.master { XCTAssertEqual(b.download(master), want.dequantize(), "\(label) \(linear.namePrefix) master") }
                    original.append(want)
                }
                let embed = try file.floats(try XCTUnwrap(file.tensor("token_embd.weight")))
                XCTAssertEqual(t.model.weights.embed.toArray(), embed, label)
                // The warm-started quantized model (B = 0) computes what transformers computes on the file.
                let loss = try Evaluator.evaluate(model: t.model, tokens: try TokenArray(npyPath: dir + "/tokens.npy"), seqLen: 16, batch: 10).loss
                XCTAssertEqual(loss, try XCTUnwrap(try expected(name)["loss_transformers_gguf"] as? Double), accuracy: Self.f32Rounding, label)

                for _ in 0 ..< 3 { _ = try t.trainStep() }
                // s B A of every linear, as the merge forms it, on the same backend.
                var expectedCodes: [[UInt8]] = []
                for (linear, codes) in zip(t.model.weights.linears, original) {
                    let ad = try XCTUnwrap(linear.adapter)
                    XCTAssertTrue(b.download(ad.b).contains { $0 != 0 }, "\(label): training moved B")
                    let update = b.makeTensor([linear.outFeatures, linear.inFeatures], dtype: .f32, tag: .workspace, zeroed: false)
                    b.matmul(ad.b, ad.a, update, m: linear.outFeatures, n: linear.inFeatures, k: ad.rank, alphaScale: ad.scale)
                    let merged = zip(codes.dequantize(), b.download(update)).map { $0 + $1 }
                    expectedCodes.append(try QuantizedMatrix(quantizing: merged, rows: codes.rows, cols: codes.cols, format: codes.format).bytes)
                }
                try t.restart()
                var changed = 0
                for ((linear, want), codes) in zip(zip(t.model.weights.linears, expectedCodes), original) {
                    let got = b.downloadRaw(linear.weight.storage)
                    XCTAssertEqual(got, want, "\(label) \(linear.namePrefix) after the restart")
                    changed += zip(got, codes.bytes).filter { $0 != $1 }.count
                }
                XCTAssertGreaterThan(changed, 0, "\(label): the merge changed codes")
            }
        }
    }

    /// A K-quant file (Q4_K_M: q4_K and q6_K) warm-starts a q4_0 run: each block linear is dequantized
    /// exactly and requantized with its error logged; an f16 file into q8_0 is quantized as before; a
    /// dense run (mode lora, no quant) from the q8_0 file holds exactly the dequantized codes.
    func testWarmStartConvertsOtherTypesAndLogsTheError() throws {
        let d = try TrainerTests.makeByteData()
        for (name, quant, sources) in [("tiny_k_q4_K_M.gguf", FrozenStorage.q4_0, ["q4_K", "q6_K"]), ("tiny_f16.gguf", .q8_0, ["f16"])] {
            var lines: [String] = []
            let path = dir + "/" + name
            let t = try Trainer(recipe: recipe(d, "convert-\(quant.rawValue)", file: path, quant: quant), resume: false, log: { lines.append($0) })
            let logged = lines.filter { $0.hasPrefix("quantized model.layers.") }
            XCTAssertEqual(logged.count, t.model.weights.linears.count, "\(name): \(lines)")
            XCTAssertEqual(Set(logged.compactMap { line in sources.first { line.contains("(\($0) in the GGUF) to \(quant.rawValue): relative error") } }),
                           Set(sources), "\(name): \(logged)")
            for line in logged {
                let error = try XCTUnwrap(Double(line.split(separator: " ").last!), line)
                XCTAssertGreaterThan(error, 1e-4, line)
                XCTAssertLessThan(error, quant == .q4_0 ? 0.2 : 0.02, line)
            }
            XCTAssertTrue(try t.trainStep().loss.isFinite)
        }
        var dense = recipe(d, "dense", file: dir + "/tiny_q8_0.gguf", quant: .none)
        dense.mode = .lora
        dense.reloraEvery = nil
        let t = try Trainer(recipe: dense, resume: false, log: { _ in })
        let file = try GGUFFile(path: dir + "/tiny_q8_0.gguf")
        for linear in t.model.weights.linears {
            XCTAssertEqual(try XCTUnwrap(linear.weight.dense).toArray(), try fileBlocks(file, linear, t.model.config).dequantize(), linear.namePrefix)
        }
    }

    /// The commands around a run warm-started from a GGUF file: `relora train` with `model` and
    /// `warm_start` naming the file (and no `tokenizer`) logs the codes it kept and keeps the file's
    /// tokenizer as the run's `tokenizer.gguf`, so `relora tokenize` with the run directory gives the ids
    /// of the GGUF file itself and `relora sample` on the run works; `relora analyze` measures the update
    /// against the file's weights; `relora eval` reads the K-quant file.
    func testCommandsOnARunWarmStartedFromGGUF() throws {
        let d = try TrainerTests.makeByteData()
        let gguf = dir + "/tiny_q4_0.gguf"
        var r = recipe(d, "cli", file: gguf, quant: .q4_0)
        r.steps = 4; r.reloraEvery = 2; r.checkpointEvery = 4
        XCTAssertNil(r.tokenizer)
        try Files.writeJSON(r.jsonObject(), to: d.dir + "/recipe.json")
        let train = try runRelora(["train", d.dir + "/recipe.json"])
        XCTAssertEqual(train.status, 0, train.stderr)
        XCTAssertTrue((train.stdout + train.stderr).contains("took the q4_0 blocks of 14 linears from \(dir)/tiny_q4_0.gguf byte for byte"), train.stdout + train.stderr)

        // The tokenizer: the file's tokenizer metadata without its tensors, named in the resolved recipe.
        XCTAssertTrue((train.stdout + train.stderr).contains("tokenizer: the warm start's (\(gguf)), kept in the run"), train.stdout + train.stderr)
        let kept = try GGUFFile(path: r.runDir + "/tokenizer.gguf")
        XCTAssertTrue(kept.tensors.isEmpty)
        XCTAssertLessThan(try XCTUnwrap(FileManager.default.attributesOfItem(atPath: r.runDir + "/tokenizer.gguf")[.size] as? Int), 4096)
        let resolved = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: r.runDir + "/recipe.json"))) as? [String: Any])
        XCTAssertEqual(resolved["tokenizer"] as? String, gguf)
        let text = "the theatre: a cold wet stack of shade, sworn twice.\n  xyz"
        try text.write(toFile: d.dir + "/sample.txt", atomically: true, encoding: .utf8)
        for (source, out) in [(r.runDir, "run.npy"), (gguf, "file.npy")] {
            let t = try runRelora(["tokenize", "--tokenizer", source, "--in", d.dir + "/sample.txt", "--out", d.dir + "/" + out])
            XCTAssertEqual(t.status, 0, t.stderr)
        }
        let viaRun = try TokenArray(npyPath: d.dir + "/run.npy"), viaFile = try TokenArray(npyPath: d.dir + "/file.npy")
        XCTAssertEqual((0..<viaRun.count).map { viaRun[$0] }, (0..<viaFile.count).map { viaFile[$0] })
        let direct = try TokenizerLoader.load(gguf: try GGUFFile(path: gguf))
        XCTAssertEqual((0..<viaRun.count).map { Int32(viaRun[$0]) }, [1] + direct.encode(text) + [2], "<s>, the ids, </s>, as from the file")
        XCTAssertGreaterThan(Set(direct.encode(text)).count, 10, "the sample exercises the vocabulary")
        let sample = try runRelora(["sample", "--model", r.runDir, "--prompt", "the", "--max-tokens", "4", "--seed", "1"])
        XCTAssertEqual(sample.status, 0, sample.stderr)
        XCTAssertTrue(sample.stdout.hasPrefix("the"), sample.stdout)
        // Exported back to GGUF, the run carries the file's tokenizer: the converter's tokens, scores and types,
        // its BOS added as before, and the same ids.
        let export = try runRelora(["export", r.runDir, "--format", "gguf", "--quant", "q4_0", "--out", d.dir + "/again.gguf"])
        XCTAssertEqual(export.status, 0, export.stderr)
        let again = try GGUFFile(path: d.dir + "/again.gguf"), source = try GGUFFile(path: gguf)
        for key in ["model", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id"] {
            XCTAssertEqual(again.metadata["tokenizer.ggml.\(key)"], source.metadata["tokenizer.ggml.\(key)"], key)
        }
        XCTAssertEqual(again.metadata["tokenizer.ggml.add_bos_token"], .bool(true))
        let reread = try TokenizerLoader.load(gguf: again)
        XCTAssertEqual(reread.encode(text), direct.encode(text))
        XCTAssertEqual(reread.prefixId, direct.prefixId)
        let analyze = try runRelora(["analyze", r.runDir])
        XCTAssertEqual(analyze.status, 0, analyze.stderr)
        XCTAssertTrue((analyze.stdout + analyze.stderr).contains("against \(dir)/tiny_q4_0.gguf"), analyze.stdout + analyze.stderr)
        let eval = try runRelora(["eval", "--model", dir + "/tiny_k_q4_K_M.gguf", "--data", dir + "/tokens.npy", "--seq-len", "16", "--json"])
        XCTAssertEqual(eval.status, 0, eval.stderr)
        let loss = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(eval.stdout.utf8)) as? [String: Any])?["loss"] as? Double, eval.stdout)
        XCTAssertEqual(loss, try XCTUnwrap(try expected("tiny_k_q4_K_M.gguf")["loss_transformers_gguf"] as? Double), accuracy: Self.f32Rounding)
    }

    /// Refusals, one sentence each: an IQ tensor names the type and the tensor; a recipe whose model is
    /// another architecture points at the GGUF file.
    func testIQTypesAndOtherArchitecturesAreRefused() throws {
        let d = try TrainerTests.makeByteData()
        // iq4_nl has q4_0's block size and bytes per block (32 weights in 18 bytes): the same file with one
        // tensor's type field changed is a well-formed iq4_nl file.
        var bytes = try Array(Data(contentsOf: URL(fileURLWithPath: dir + "/tiny_q4_0.gguf")))
        let typeOffset = try XCTUnwrap(Self.tensorTypeOffset(bytes, tensor: "blk.1.ffn_up.weight"))
        XCTAssertEqual(bytes[typeOffset], 2)
        bytes[typeOffset] = 20
        let iq = temporaryDirectory() + "/iq.gguf"
        try Data(bytes).write(to: URL(fileURLWithPath: iq))
        assertInvalidFile(try GGUFFile(path: iq), mentions: "tensor 'blk.1.ffn_up.weight' is stored as iq4_nl (ggml type 20), which relora cannot read")
        XCTAssertThrowsError(try Trainer(recipe: recipe(d, "iq", file: iq, quant: .q4_0), resume: false, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("iq4_nl"), "\($0)")
        }
        var other = recipe(d, "other", file: dir + "/tiny_q8_0.gguf", quant: .q8_0)
        other.model = dir + "/tiny_k_q4_K_M.gguf"
        other.trainData = dir + "/tokens.npy"
        XCTAssertThrowsError(try Trainer(recipe: other, resume: false, log: { _ in })) {
            XCTAssertTrue("\($0)".contains("another architecture") && "\($0)".contains("the GGUF file itself"), "\($0)")
        }
    }

    // MARK: Fuzzing

    /// Where each header field of a GGUF file lies, found by walking the header independently of
    /// `GGUFFile` (the fuzzer's map of what to mutate).
    struct Field {
        enum Kind: String, CaseIterable {
            case count = "counts", stringLength = "string lengths", valueType = "value types", arrayCount = "array counts"
            case dimensionCount = "dimension counts", dimension = "dimensions", tensorType = "tensor types", offset = "tensor offsets"
            case alignment = "alignment"
        }
        var kind: Kind
        var at: Int
        var width: Int
    }

    static func fields(_ b: [UInt8]) -> [Field] { layout(b).fields }

    /// The header's fields, where the metadata ends (the first tensor entry starts) and where the header ends.
    static func layout(_ b: [UInt8]) -> (fields: [Field], metadataEnd: Int, headerEnd: Int) {
        var out: [Field] = []
        var p = 8
        func u32(_ at: Int) -> Int { Int(b[at]) | Int(b[at + 1]) << 8 | Int(b[at + 2]) << 16 | Int(b[at + 3]) << 24 }
        func u64(_ at: Int) -> Int { (0 ..< 8).reduce(0) { $0 | Int(b[at + $1]) << (8 * $1) } }
        out.append(Field(kind: .count, at: 8, width: 8))
        out.append(Field(kind: .count, at: 16, width: 8))
        let tensors = u64(8), keys = u64(16)
        p = 24
        func string(_ kind: Field.Kind = .stringLength) -> String {
            out.append(Field(kind: kind, at: p, width: 8))
            let n = u64(p)
            defer { p += 8 + n }
            return String(decoding: b[p + 8 ..< p + 8 + n], as: UTF8.self)
        }
        let sizes: [Int: Int] = [0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8]
        for _ in 0 ..< keys {
            let key = string()
            out.append(Field(kind: .valueType, at: p, width: 4))
            let type = u32(p)
            p += 4
            if key == "general.alignment" { out.append(Field(kind: .alignment, at: p, width: 4)) }
            if type == 8 { _ = string() } else if type == 9 {
                out.append(Field(kind: .valueType, at: p, width: 4))
                let element = u32(p)
                out.append(Field(kind: .arrayCount, at: p + 4, width: 8))
                let n = u64(p + 4)
                p += 12
                for _ in 0 ..< n { if element == 8 { _ = string() } else { p += sizes[element]! } }
            } else { p += sizes[type]! }
        }
        let metadataEnd = p
        for _ in 0 ..< tensors {
            _ = string()
            out.append(Field(kind: .dimensionCount, at: p, width: 4))
            let n = u32(p)
            p += 4
            for _ in 0 ..< n { out.append(Field(kind: .dimension, at: p, width: 8)); p += 8 }
            out.append(Field(kind: .tensorType, at: p, width: 4))
            out.append(Field(kind: .offset, at: p + 4, width: 8))
            p += 12
        }
        return (out, metadataEnd, p)
    }

    /// The file with `general.alignment = 32` (u32) appended to its metadata (llama.cpp's converter leaves
    /// the default implicit): the same tensors at the same offsets, after a header padded to 32 again.
    static func withExplicitAlignment(_ b: [UInt8]) -> [UInt8] {
        let (_, metadataEnd, headerEnd) = layout(b)
        let key = Array("general.alignment".utf8)
        func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        var out = Array(b[0 ..< metadataEnd]) + le(UInt64(key.count)) + key + le(UInt32(4)) + le(UInt32(32)) + Array(b[metadataEnd ..< headerEnd])
        let keys = (0 ..< 8).reduce(0) { $0 | Int(b[16 + $1]) << (8 * $1) }
        out.replaceSubrange(16 ..< 24, with: le(UInt64(keys + 1)))
        out += [UInt8](repeating: 0, count: (32 - out.count % 32) % 32)
        return out + b[(headerEnd + 31) / 32 * 32 ..< b.count]
    }

    /// The byte offset of a tensor's type field in a GGUF file's header.
    static func tensorTypeOffset(_ b: [UInt8], tensor name: String) -> Int? {
        let fields = fields(b)
        for (i, f) in fields.enumerated() where f.kind == .tensorType {
            // The tensor's name is the string before its dimension count.
            guard let nameField = fields[..<i].last(where: { $0.kind == .stringLength }) else { continue }
            let n = (0 ..< 8).reduce(0) { $0 | Int(b[nameField.at + $1]) << (8 * $1) }
            if String(decoding: b[nameField.at + 8 ..< nameField.at + 8 + n], as: UTF8.self) == name { return f.at }
        }
        return nil
    }

    /// Mutated headers of a real llama.cpp file (q4_0, with its tokenizer arrays): each field kind set to
    /// boundary values (0, 1, all ones, the top bit, +-1, a random value) and random byte flips over the
    /// whole header. Every mutated file either opens, and then every tensor reads and the LLaMA loader
    /// answers with a model or a `ReLoRAError`, or is refused with one `invalidFile` sentence; none
    /// crashes (a crash ends the test process). The counts are printed.
    func testFuzzedHeadersAreRejectedWithOneSentenceAndNeverCrash() throws {
        let directory = temporaryDirectory()
        func write(_ bytes: [UInt8]) throws -> String {
            try Data(bytes).write(to: URL(fileURLWithPath: directory + "/good.gguf"))
            return directory + "/good.gguf"
        }
        let good = Self.withExplicitAlignment(try Array(Data(contentsOf: URL(fileURLWithPath: dir + "/tiny_q4_0.gguf"))))
        XCTAssertEqual(try GGUFFile(path: try write(good)).alignment, 32, "the unmutated file opens")
        let fields = Self.fields(good)
        let headerEnd = fields.map { $0.at + $0.width }.max()!
        XCTAssertEqual(Set(fields.map(\.kind)), Set(Field.Kind.allCases), "the map covers every kind of field")
        let path = directory + "/fuzz.gguf"
        var rng = TestRNG(0x6603)
        var rejected: [String: Int] = [:], opened: [String: Int] = [:], loaded = 0
        func run(_ bytes: [UInt8], _ kind: String) throws {
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            do {
                let file = try GGUFFile(path: path)
                opened[kind, default: 0] += 1
                for t in file.tensors { _ = try file.floats(t) }
                do {
                    _ = try LlamaGGUF.loadModel(file, backend: CPUBackend())
                    loaded += 1
                } catch let error as ReLoRAError {
                    XCTAssertFalse("\(error)".contains("\n"), "\(kind): \(error)")
                }
            } catch ReLoRAError.invalidFile(_, let reason) {
                rejected[kind, default: 0] += 1
                XCTAssertFalse(reason.isEmpty || reason.contains("\n"), "\(kind): \(reason)")
            }
        }
        func set(_ bytes: inout [UInt8], _ f: Field, _ value: UInt64) {
            for i in 0 ..< f.width { bytes[f.at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        }
        for f in fields {
            let old = (0 ..< f.width).reduce(UInt64(0)) { $0 | UInt64(good[f.at + $1]) << (8 * UInt64($1)) }
            let top = UInt64(1) << (8 * UInt64(f.width) - 1)
            let ones = f.width == 8 ? UInt64.max : (top << 1) - 1
            for value in [0, 1, ones, top, old &+ 1, old &- 1, rng.next() & ones] {
                var bytes = good
                set(&bytes, f, value)
                try run(bytes, f.kind.rawValue)
            }
        }
        for _ in 0 ..< 300 {
            var bytes = good
            for _ in 0 ..< 1 + rng.int(4) { bytes[rng.int(headerEnd)] = UInt8(truncatingIfNeeded: rng.next()) }
            try run(bytes, "random bytes")
        }
        let kinds = Field.Kind.allCases.map(\.rawValue) + ["random bytes"]
        let total = kinds.reduce(0) { $0 + rejected[$1, default: 0] + opened[$1, default: 0] }
        print("GGUF header fuzz: \(total) mutated files of tiny_q4_0.gguf (\(fields.count) header fields): "
              + kinds.map { "\($0) \(rejected[$0, default: 0]) rejected / \(opened[$0, default: 0]) opened" }.joined(separator: "; ")
              + "; \(loaded) opened files loaded as a model; 0 crashes")
        XCTAssertGreaterThan(rejected.values.reduce(0, +), total / 2)
    }
}
