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

/// The GGUF container: what the writer writes reads back, and every kind of damage is one clear error.
final class GGUFContainerTests: XCTestCase {
    /// Row-major values that encode their own position (row * 100 + col), so a transposed or shifted
    /// tensor shows as a wrong number.
    func positional(_ rows: Int, _ cols: Int) -> [Float] {
        (0 ..< rows * cols).map { Float(($0 / cols) * 100 + $0 % cols) / 64 }
    }

    func testWrittenFileReadsBackWithEveryValueTypeAndTensorType() throws {
        let dir = temporaryDirectory()
        let metadata: [(String, GGUFValue)] = [
            ("general.architecture", .string("llama")), ("u8", .uint8(250)), ("i8", .int8(-3)), ("u16", .uint16(65000)),
            ("i16", .int16(-30000)), ("u32", .uint32(4_000_000_000)), ("i32", .int32(-7)), ("u64", .uint64(1 << 40)),
            ("i64", .int64(-(1 << 40))), ("f32", .float32(1e-6)), ("f64", .float64(0.1)), ("yes", .bool(true)),
            ("unicode", .string("Ġthe ✓ 🦙")), ("strings", .array(.string, [.string("a b"), .string(""), .string("Ċ")])),
            ("ints", .array(.int32, [.int32(1), .int32(-2)])), ("empty", .array(.uint32, [])),
        ]
        let q8 = try QuantizedMatrix(quantizing: positional(2, 64).map { $0 - 40 }, rows: 2, cols: 64, format: .q8_0)
        let q4 = try QuantizedMatrix(quantizing: positional(3, 32).map { $0 - 10 }, rows: 3, cols: 32, format: .q4_0)
        let half = positional(3, 5)
        let tensors = [
            GGUFTensorEntry(name: "f32", type: .f32, shape: [3, 5]) { self.positional(3, 5).withUnsafeBytes { Array($0) } },
            GGUFTensorEntry(name: "norm", type: .f32, shape: [7]) { [Float](repeating: 1.5, count: 7).withUnsafeBytes { Array($0) } },
            GGUFTensorEntry(name: "f16", type: .f16, shape: [3, 5]) { try LlamaGGUF.encode(half, shape: [3, 5], as: .f16, name: "f16") },
            GGUFTensorEntry(name: "bf16", type: .bf16, shape: [3, 5]) { try LlamaGGUF.encode(half, shape: [3, 5], as: .bf16, name: "bf16") },
            GGUFTensorEntry(name: "q8", type: .q8_0, shape: [2, 64]) { q8.bytes },
            GGUFTensorEntry(name: "q4", type: .q4_0, shape: [3, 32]) { q4.bytes },
        ]
        try GGUFWriter.write(metadata: metadata, tensors: tensors, to: dir + "/t.gguf")
        let file = try GGUFFile(path: dir + "/t.gguf")
        XCTAssertEqual(file.version, 3)
        XCTAssertEqual(file.alignment, 32)
        XCTAssertEqual(file.metadataKeys, metadata.map(\.0))
        for (key, value) in metadata { XCTAssertEqual(file.metadata[key], value, key) }
        XCTAssertEqual(file.metadata["f32"]?.double, 1e-6, "a float32 reads back through its shortest decimal")
        XCTAssertEqual(file.tensors.map(\.name), tensors.map(\.name))
        XCTAssertEqual(file.tensor("f32")?.dimensions, [5, 3], "ne is the row-major shape reversed")
        for t in file.tensors { XCTAssertEqual((t.byteOffset - file.tensors[0].byteOffset) % 32, 0, t.name) }
        XCTAssertEqual(file.tensors[0].byteOffset % 32, 0)
        XCTAssertEqual(try file.floats(file.tensor("f32")!), positional(3, 5))
        XCTAssertEqual(try file.floats(file.tensor("norm")!), [Float](repeating: 1.5, count: 7))
        XCTAssertEqual(try file.floats(file.tensor("f16")!), half.map { FloatBits.floatFromFloat16(FloatBits.float16($0)) })
        XCTAssertEqual(try file.floats(file.tensor("bf16")!), half.map { FloatBits.floatFromBFloat16(FloatBits.bfloat16($0)) })
        XCTAssertEqual(try file.quantized(file.tensor("q8")!), q8)
        XCTAssertEqual(try file.floats(file.tensor("q4")!), q4.dequantize())

        // The writer refuses what it cannot store, before touching the disk.
        assertInvalidData(try GGUFWriter.write(metadata: [], tensors: [GGUFTensorEntry(name: "x", type: .q8_0, shape: [2, 40]) { [] }],
                                               to: dir + "/bad.gguf"), mentions: "cannot be stored as q8_0")
        assertInvalidData(try GGUFWriter.write(metadata: [("k", .uint8(1)), ("k", .uint8(2))], tensors: [], to: dir + "/bad.gguf"),
                          mentions: "repeated")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/bad.gguf"))
    }

    // MARK: Hand-built files

    /// A GGUF file assembled byte by byte, independently of `GGUFWriter`, with every field overridable.
    struct RawGGUF {
        var magic = Array("GGUF".utf8)
        var version: UInt32 = 3
        var tensorCount: UInt64?
        var keyCount: UInt64?
        var pairs: [[UInt8]] = [RawGGUF.pair("general.alignment", type: 4, u32(32))]
        var infos: [[UInt8]] = [RawGGUF.info("a", dims: [4, 2], type: 0, offset: 0), RawGGUF.info("b", dims: [3], type: 0, offset: 32)]
        var data: [UInt8] = (0 ..< 44).map { UInt8($0) }
        var alignment = 32

        static func u32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        static func u64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        static func string(_ s: String) -> [UInt8] { u64(UInt64(s.utf8.count)) + Array(s.utf8) }
        static func pair(_ key: String, type: UInt32, _ payload: [UInt8]) -> [UInt8] { string(key) + u32(type) + payload }
        static func info(_ name: String, dims: [UInt64], type: UInt32, offset: UInt64) -> [UInt8] {
            string(name) + u32(UInt32(dims.count)) + dims.flatMap(u64) + u32(type) + u64(offset)
        }

        var bytes: [UInt8] {
            var b = magic + Self.u32(version) + Self.u64(tensorCount ?? UInt64(infos.count)) + Self.u64(keyCount ?? UInt64(pairs.count))
            for p in pairs { b += p }
            for i in infos { b += i }
            b += [UInt8](repeating: 0, count: (alignment - b.count % alignment) % alignment)
            return b + data
        }
    }

    func write(_ bytes: [UInt8], _ dir: String, _ name: String = "x.gguf") throws -> String {
        let path = dir + "/" + name
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    func testHandBuiltFileReads() throws {
        let dir = temporaryDirectory()
        let file = try GGUFFile(path: try write(RawGGUF().bytes, dir))
        XCTAssertEqual(file.tensors.map(\.shape), [[2, 4], [3]])
        XCTAssertEqual(file.tensor("b")?.byteOffset, file.tensor("a")!.byteOffset + 32)
        var v2 = RawGGUF()
        v2.version = 2
        XCTAssertEqual(try GGUFFile(path: try write(v2.bytes, dir)).version, 2)
    }

    /// Every truncation of a valid file that cuts into its header or tensor data, and each kind of
    /// corruption, is one `.invalidFile` sentence naming the problem; nothing crashes or allocates wildly.
    func testTruncatedAndCorruptFilesAreRejectedWithOneClearError() throws {
        let dir = temporaryDirectory()
        let good = RawGGUF().bytes
        let end = good.count - 0  // the data ends exactly at the last tensor (b: 12 bytes at 32)
        for length in 0 ..< end {
            assertInvalidFile(try GGUFFile(path: try write(Array(good[0 ..< length]), dir)), mentions: "", "prefix \(length)")
        }

        typealias R = RawGGUF
        var cases: [(String, RawGGUF, String)] = []
        func add(_ what: String, _ keyword: String, _ edit: (inout RawGGUF) -> Void) {
            var r = RawGGUF()
            edit(&r)
            cases.append((what, r, keyword))
        }
        add("bad magic", "not a GGUF file") { $0.magic = Array("GGUE".utf8) }
        add("version 1", "version 1") { $0.version = 1 }
        add("version 4", "version 4") { $0.version = 4 }
        add("big-endian", "big-endian") { $0.version = UInt32(3).byteSwapped }
        add("absurd tensor count", "absurd") { $0.tensorCount = UInt64.max }
        add("absurd metadata count", "absurd") { $0.keyCount = 1 << 60 }
        add("more tensors than present", "") { $0.tensorCount = 3 }
        add("absurd string length", "claims") { $0.pairs = [R.u64(UInt64.max - 3) + Array("key".utf8)] }
        add("absurd array length", "claims") { $0.pairs.append(R.pair("arr", type: 9, R.u32(4) + R.u64(1 << 61))) }
        add("unknown value type", "unknown value type 13") { $0.pairs.append(R.pair("x", type: 13, R.u32(0))) }
        add("array of arrays", "array of arrays") { $0.pairs.append(R.pair("x", type: 9, R.u32(9) + R.u64(1))) }
        add("bad bool", "bool") { $0.pairs.append(R.pair("x", type: 7, [2])) }
        add("invalid UTF-8 key", "UTF-8") { $0.pairs.append(R.u64(2) + [0xC3, 0x28] + R.u32(0) + [1]) }
        add("duplicate key", "twice") { $0.pairs.append(R.pair("general.alignment", type: 4, R.u32(32))) }
        add("alignment not a power of two", "power of two") { $0.pairs = [R.pair("general.alignment", type: 4, R.u32(24))] }
        add("alignment of the wrong type", "power of two") { $0.pairs = [R.pair("general.alignment", type: 10, R.u64(32))] }
        add("unreadable tensor type", "iq2_xxs (ggml type 16)") { $0.infos[0] = R.info("a", dims: [4, 2], type: 16, offset: 0) }
        add("unknown tensor type", "ggml type 99") { $0.infos[0] = R.info("a", dims: [4, 2], type: 99, offset: 0) }
        add("q4_K rows not whole super-blocks", "block size 256") { $0.infos[0] = R.info("a", dims: [32, 1], type: 12, offset: 0) }
        add("no dimensions", "dimensions") { $0.infos[0] = R.info("a", dims: [], type: 0, offset: 0) }
        add("five dimensions", "dimensions") { $0.infos[0] = R.info("a", dims: [1, 1, 1, 1, 8], type: 0, offset: 0) }
        add("dimension overflow", "overflow") { $0.infos[0] = R.info("a", dims: [1 << 40, 1 << 40], type: 0, offset: 0) }
        add("absurd dimension", "absurd") { $0.infos[0] = R.info("a", dims: [UInt64.max], type: 0, offset: 0) }
        add("q8_0 rows not whole blocks", "block size") { $0.infos[0] = R.info("a", dims: [40, 1], type: 8, offset: 0) }
        add("misaligned offset", "alignment") { $0.infos[1] = R.info("b", dims: [3], type: 0, offset: 16) }
        add("data out of range", "truncated or corrupt") { $0.infos[1] = R.info("b", dims: [3], type: 0, offset: 1 << 40) }
        add("data past the end", "truncated or corrupt") { $0.infos[1] = R.info("b", dims: [4], type: 0, offset: 32) }
        add("overlapping tensors", "overlap") { $0.infos[1] = R.info("b", dims: [3], type: 0, offset: 0) }
        add("duplicate tensor name", "twice") { $0.infos[1] = R.info("a", dims: [3], type: 0, offset: 32) }
        for (what, raw, keyword) in cases {
            assertInvalidFile(try GGUFFile(path: try write(raw.bytes, dir)), mentions: keyword, what)
        }
        assertInvalidFile(try GGUFFile(path: dir), mentions: "not a regular file")
    }
}

/// LLaMA models through GGUF: names, metadata, the rotary permutation, every --quant, the copy path,
/// the tokenizer.
final class GGUFModelTests: XCTestCase {
    /// GQA (4 query heads over 2 KV heads of 16 dims); FFN 72 is not a multiple of 32, so a q8_0/q4_0
    /// export keeps ffn_down (72 inputs) in f16 while every other linear is quantized.
    func config(tied: Bool = false, intermediate: Int = 72) throws -> LlamaConfig {
        try LlamaConfig(hiddenSize: 64, intermediateSize: intermediate, numHiddenLayers: 2, numAttentionHeads: 4,
                        numKeyValueHeads: 2, vocabSize: 50, rmsNormEps: 1e-5, ropeTheta: 500000,
                        maxPositionEmbeddings: 32, tieWordEmbeddings: tied)
    }

    func randomModel(_ config: LlamaConfig, seed: UInt64 = 7) throws -> LlamaModel {
        let model = LlamaModel(config: config, backend: CPUBackend())
        try model.weights.initializeRandom(seed: seed, std: 0.15, backend: model.backend)
        var rng = TestRNG(seed)
        for b in model.weights.blocks { b.attnNorm.copy(from: rng.floats(64, 0.5, 1.5)); b.mlpNorm.copy(from: rng.floats(64, 0.5, 1.5)) }
        return model
    }

    let ids: [Int32] = (0 ..< 24).map { Int32(($0 * 17 + 3) % 50) }

    func logits(_ m: LlamaModel) throws -> [Float] { try m.logits(inputs: ids, batch: 2, seqLen: 12) }

    // MARK: Rotary permutation

    /// The permutation turns Hugging Face's rotary pairs (i, i + D/2) into llama.cpp's (2i, 2i + 1):
    /// rotating the permuted vector GPT-J style equals permuting the vector rotated Hugging Face style,
    /// for every position (computed in Double from the definitions, not from relora's RoPE).
    func testRotaryPermutationMapsHuggingFaceRotationToInterleavedRotation() throws {
        let d = 16, heads = 3, theta = 10000.0
        var rng = TestRNG(1)
        let x = rng.floats(heads * d).map(Double.init)
        func angle(_ i: Int, _ p: Int) -> Double { Double(p) * pow(theta, -2 * Double(i) / Double(d)) }
        func hf(_ v: [Double], _ p: Int) -> [Double] {  // rotate_half: (v_i, v_{i+D/2})
            var out = v
            for h in 0 ..< heads { for i in 0 ..< d / 2 {
                let (a, b) = (v[h * d + i], v[h * d + i + d / 2]), t = angle(i, p)
                out[h * d + i] = a * cos(t) - b * sin(t); out[h * d + i + d / 2] = b * cos(t) + a * sin(t)
            } }
            return out
        }
        func interleaved(_ v: [Double], _ p: Int) -> [Double] {  // GPT-J / llama.cpp mode 0: (v_2i, v_2i+1)
            var out = v
            for h in 0 ..< heads { for i in 0 ..< d / 2 {
                let (a, b) = (v[h * d + 2 * i], v[h * d + 2 * i + 1]), t = angle(i, p)
                out[h * d + 2 * i] = a * cos(t) - b * sin(t); out[h * d + 2 * i + 1] = b * cos(t) + a * sin(t)
            } }
            return out
        }
        func permute(_ v: [Double]) -> [Double] { (0 ..< v.count).map { v[LlamaGGUF.huggingFaceRow(ofGGUFRow: $0, headDim: d)] } }
        for p in [0, 1, 5, 31] {
            let want = permute(hf(x, p)), got = interleaved(permute(x), p)
            for (a, b) in zip(got, want) { XCTAssertEqual(a, b, accuracy: 1e-12, "position \(p)") }
        }
        // On rows of bytes: GGUF row 2i + j is HF row j * D/2 + i, and the inverse restores the original.
        let rows = (0 ..< heads * d).flatMap { r in [UInt8(r), UInt8(r), UInt8(r)] }
        let gguf = LlamaGGUF.permuteRows(rows, rows: heads * d, headDim: d, toGGUF: true)
        XCTAssertEqual(Array(gguf[0 ..< 12]), [0, 0, 0, 8, 8, 8, 1, 1, 1, 9, 9, 9])
        XCTAssertEqual(gguf[3 * (d + 3)], UInt8(d + 9), "head 1, GGUF row 3 = HF row 8 + 1")
        XCTAssertEqual(LlamaGGUF.permuteRows(gguf, rows: heads * d, headDim: d, toGGUF: false), rows)
    }

    // MARK: f32

    /// f32: the file has llama.cpp's names, ne order, metadata keys and types, q/k rows in the
    /// interleaved order; reading it back gives the same config and bit-identical logits (tied and not).
    func testF32ExportReadsBackToIdenticalLogits() throws {
        for tied in [false, true] {
            let dir = temporaryDirectory()
            let c = try config(tied: tied)
            let model = try randomModel(c)
            let summary = try LlamaGGUF.write(model: model, tokenizer: nil, weights: .f32, to: dir + "/m.gguf", name: "test")
            XCTAssertEqual(summary.tensorCount, tied ? 20 : 21)
            let file = try GGUFFile(path: dir + "/m.gguf")
            let m = file.metadata
            XCTAssertEqual(m["general.architecture"], .string("llama"))
            XCTAssertEqual(m["general.file_type"], .uint32(0))
            XCTAssertEqual(m["general.alignment"], .uint32(32))
            XCTAssertEqual(m["llama.embedding_length"], .uint32(64))
            XCTAssertEqual(m["llama.feed_forward_length"], .uint32(72))
            XCTAssertEqual(m["llama.block_count"], .uint32(2))
            XCTAssertEqual(m["llama.attention.head_count"], .uint32(4))
            XCTAssertEqual(m["llama.attention.head_count_kv"], .uint32(2))
            XCTAssertEqual(m["llama.rope.dimension_count"], .uint32(16))
            XCTAssertEqual(m["llama.context_length"], .uint32(32))
            XCTAssertEqual(m["llama.vocab_size"], .uint32(50))
            XCTAssertEqual(m["llama.rope.freq_base"], .float32(500000))
            XCTAssertEqual(m["llama.attention.layer_norm_rms_epsilon"], .float32(1e-5))
            var names = ["token_embd.weight", "output_norm.weight"] + (tied ? [] : ["output.weight"])
            for l in 0 ..< 2 {
                names += ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
                    .map { "blk.\(l).\($0).weight" }
            }
            XCTAssertEqual(Set(file.tensors.map(\.name)), Set(names))
            XCTAssertTrue(file.tensors.allSatisfy { $0.type == .f32 })
            XCTAssertEqual(file.tensor("token_embd.weight")?.dimensions, [64, 50])
            XCTAssertEqual(file.tensor("blk.0.attn_k.weight")?.dimensions, [64, 32])
            XCTAssertEqual(file.tensor("blk.1.ffn_down.weight")?.dimensions, [72, 64])
            XCTAssertEqual(file.tensor("blk.0.attn_norm.weight")?.dimensions, [64])
            // k: 2 heads of 16 rows; GGUF row r holds HF row huggingFaceRow(r).
            let k = model.weights.blocks[1].linear(.k).weight.dense!.toArray()
            let stored = try file.floats(file.tensor("blk.1.attn_k.weight")!)
            for r in 0 ..< 32 {
                let hfRow = LlamaGGUF.huggingFaceRow(ofGGUFRow: r, headDim: 16)
                XCTAssertEqual(Array(stored[r * 64 ..< (r + 1) * 64]), Array(k[hfRow * 64 ..< (hfRow + 1) * 64]), "row \(r)")
            }
            XCTAssertEqual(try file.floats(file.tensor("blk.1.attn_v.weight")!), model.weights.blocks[1].linear(.v).weight.dense!.toArray(),
                           "v is not permuted")

            let back = try LlamaGGUF.loadModel(file, backend: CPUBackend())
            XCTAssertEqual(back.config, c)
            for ((n, a), (_, b)) in zip(model.weights.named(), back.weights.named()) { XCTAssertEqual(a.toArray(), b.toArray(), n) }
            XCTAssertEqual(try logits(back), try logits(model), "tied \(tied): logits equal, not merely close")
        }
    }

    // MARK: 16-bit and quantized

    /// The values a tensor holds after a GGUF export as `type`, computed directly: the reference each
    /// export must reproduce exactly.
    func rounded(_ v: [Float], shape: [Int], _ type: GGMLType) throws -> [Float] {
        switch type {
        case .f32: return v
        case .f16: return v.map { FloatBits.floatFromFloat16(FloatBits.float16($0)) }
        case .bf16: return v.map { FloatBits.floatFromBFloat16(FloatBits.bfloat16($0)) }
        case .q8_0, .q4_0: return try type.quantFormat!.quantize(v, rows: shape[0], cols: shape[1]).dequantize()
        case .q4_K, .q5_K, .q6_K: throw ReLoRAError.invalidData("relora does not export \(type.name)")
        }
    }

    /// f16, bf16, q8_0, q4_0: the file's tensor types follow `GGUFWeightType.tensorType` (norms f32,
    /// ffn_down's 72-wide rows in f16, q4_0's embedding and head in q8_0), and the model read back computes
    /// exactly what the original computes on its rounded weights (same codes, same dequantization; the
    /// q/k row permutation commutes with per-row quantization).
    ///
    /// Against the unrounded original, a loose sanity bound on the logits' relative RMS error. Rounding
    /// error per weight: uniform in +-d/2 with d = absmax/127 (q8_0) or absmax/8 (q4_0); for blocks of 32
    /// Gaussian weights absmax ~ 2.5 sigma, so the relative RMS weight error is ~2.5/(127 sqrt 12) = 0.6 %
    /// (q8_0) and ~2.5/(8 sqrt 12) = 9 % (q4_0; the embedding and head in q8_0). Errors of the ~10
    /// quantized products on a path add roughly in quadrature: ~2 % and ~25 % on the logits; the bounds
    /// are 3x that. Measured: f16 0.1 %, bf16 0.7 %, q8_0 2.1 %, q4_0 29 %.
    func testHalfAndQuantizedExportsEqualTheOriginalOnItsRoundedWeights() throws {
        let c = try config()
        let model = try randomModel(c)
        let want = try logits(model)
        let linears = Set(model.weights.linears.map { $0.namePrefix + "weight" })
        for weights in [GGUFWeightType.f16, .bf16, .q8_0, .q4_0] {
            let dir = temporaryDirectory()
            let summary = try LlamaGGUF.write(model: model, tokenizer: nil, weights: weights, to: dir + "/m.gguf")
            let file = try GGUFFile(path: dir + "/m.gguf")
            XCTAssertEqual(file.metadata["general.file_type"], .uint32(weights.fileType))
            let reference = LlamaModel(config: c, backend: CPUBackend())
            for ((hf, t), (_, r)) in zip(model.weights.named(), reference.weights.named()) {
                let type = weights.tensorType(shape: t.shape, linear: linears.contains(hf))
                XCTAssertEqual(file.tensor(LlamaGGUF.ggufName(hf)!)?.type, type, "\(weights) \(hf)")
                r.copy(from: try rounded(t.toArray(), shape: t.shape, type))
            }
            let q = weights.quantFormat
            XCTAssertEqual(file.tensor("blk.0.attn_norm.weight")?.type, .f32)
            XCTAssertEqual(file.tensor("blk.0.ffn_down.weight")?.type, q == nil ? GGMLType(rawValue: weights == .f16 ? 1 : 30) : .f16)
            XCTAssertEqual(file.tensor("blk.0.attn_q.weight")?.type.quantFormat, q)
            XCTAssertEqual(file.tensor("token_embd.weight")?.type, q == nil ? file.tensor("blk.0.attn_q.weight")?.type : .q8_0)
            XCTAssertEqual(summary.f16Fallback, q == nil ? [] : ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"])

            let back = try LlamaGGUF.loadModel(file, backend: CPUBackend())
            let got = try logits(back)
            XCTAssertEqual(got, try logits(reference), "\(weights): equal to the rounded original, bit for bit")
            let err = zip(got, want).map { Double($0 - $1) * Double($0 - $1) }.reduce(0, +)
            let norm = want.map { Double($0) * Double($0) }.reduce(0, +)
            let relative = (err / norm).squareRoot()
            let bound = ["f16": 0.003, "bf16": 0.03, "q8_0": 0.06, "q4_0": 0.75][weights.rawValue]!
            XCTAssertLessThan(relative, bound, "\(weights): relative RMS logits error \(relative)")
        }
    }

    /// A weight f16 cannot hold is an error naming the tensor, not an inf in the file.
    func testF16OverflowIsAnError() throws {
        let model = try randomModel(try config())
        var w = model.weights.blocks[0].linear(.up).weight.dense!.toArray()
        w[5] = 70000
        model.weights.blocks[0].linear(.up).weight.dense!.copy(from: w)
        let dir = temporaryDirectory()
        assertInvalidData(try LlamaGGUF.write(model: model, tokenizer: nil, weights: .f16, to: dir + "/m.gguf"),
                          mentions: "model.layers.0.mlp.up_proj.weight")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/m.gguf"), "no partial file")
        XCTAssertNoThrow(try LlamaGGUF.write(model: model, tokenizer: nil, weights: .bf16, to: dir + "/m.gguf"))
    }

    // MARK: Checkpoints: copy or requantize

    /// A quantized ReLoRA run exported in its own format. Right after a restart (B == 0) the merged
    /// weight is deq(codes), and the GGUF holds the checkpoint's codes byte for byte (q and k rows
    /// permuted as whole block rows); the same export requantizing instead gives the same bytes
    /// (quantize(dequantize(q)) == q). Mid-cycle (B != 0) the merged weights are requantized: the bytes
    /// are quantize(merged), not the stored codes, and the summary says so. ffn_down (136 inputs) is f16.
    func testQuantizedCheckpointCopiesCodesWhenTheCycleIsEmptyAndRequantizesOtherwise() throws {
        let d = try TrainerTests.makeByteData(hidden: 64, layers: 2)
        for format in [FrozenStorage.q8_0, .q4_0] {
            let weights = GGUFWeightType(rawValue: format.rawValue)!
            // R = 3, 6 steps: the restart after step 4 (t = 3) precedes that step's checkpoint, so it holds
            // B = 0; the checkpoint after step 6 holds the second cycle's B != 0.
            let run = "gguf-\(format)"
            let recipe = TrainerTests.recipe(d, run: run) {
                $0.mode = .relora; $0.quant = format; $0.loraRank = 4; $0.loraAlpha = 8; $0.steps = 6; $0.reloraEvery = 3
                $0.restartWarmup = 1; $0.warmupSteps = 1; $0.checkpointEvery = 4; $0.evalEvery = 100
            }
            _ = try Trainer(recipe: recipe, resume: false, log: { _ in }).run()
            for steps in [4, 6] {
                let ckpt = TrainingCheckpoint.directory(runDir: recipe.runDir) + "/" + TrainingCheckpoint.name(step: steps)
                let lora = try XCTUnwrap(TrainingCheckpoint.openTensors(ckpt, "lora"))
                let bIsZero = try lora.tensorNames.filter { $0.hasSuffix("lora_B") }.allSatisfy { try lora.floats($0).allSatisfy { $0 == 0 } }
                XCTAssertEqual(bIsZero, steps == 4, "\(format) step \(steps)")

                let out = d.dir + "/\(run)-\(steps).gguf"
                let summary = try LlamaGGUF.export(checkpoint: ckpt, tokenizer: nil, weights: weights, to: out, backend: CPUBackend())
                let file = try GGUFFile(path: out)
                let stored = try XCTUnwrap(TrainingCheckpoint.openTensors(ckpt, "model"))
                let merged = try TrainingCheckpoint.loadModel(ckpt, backend: CPUBackend())
                let quantizedLinears = merged.weights.linears.filter { $0.kind != .down }
                XCTAssertEqual(file.tensor("blk.0.ffn_down.weight")?.type, .f16)
                XCTAssertEqual(Set(steps == 4 ? summary.copiedLinears : summary.requantizedLinears),
                               Set(quantizedLinears.map { $0.namePrefix + "weight" }), "\(format) step \(steps)")
                XCTAssertTrue(steps == 4 ? summary.requantizedLinears.isEmpty : summary.copiedLinears.isEmpty)
                XCTAssertTrue(summary.description.contains(steps == 4 ? "unchanged" : "requantized"), summary.description)
                for linear in quantizedLinears {
                    let hf = linear.namePrefix + "weight"
                    let info = try XCTUnwrap(file.tensor(LlamaGGUF.ggufName(hf)!))
                    XCTAssertEqual(info.type.quantFormat?.rawValue, format.rawValue)
                    let codes = try TensorIO.readQuantized(stored, hf, info.type.quantFormat!, rows: linear.outFeatures, cols: linear.inFeatures)
                    let permuted = [.q, .k].contains(linear.kind)
                    let storedOrder = permuted
                        ? LlamaGGUF.permuteRows(codes.bytes, rows: linear.outFeatures, headDim: 16, toGGUF: true) : codes.bytes
                    var requantized = try info.type.quantFormat!.quantize(linear.weight.dense!.toArray(), rows: linear.outFeatures,
                                                                          cols: linear.inFeatures).bytes
                    if permuted { requantized = LlamaGGUF.permuteRows(requantized, rows: linear.outFeatures, headDim: 16, toGGUF: true) }
                    let written = file.withBytes(info) { Array($0) }
                    XCTAssertEqual(written, requantized, "\(hf): the GGUF holds quantize(merged weight)")
                    if steps == 4 {
                        XCTAssertEqual(written, storedOrder, "\(hf): the checkpoint's codes, byte for byte")
                    } else {
                        XCTAssertNotEqual(written, storedOrder, "\(hf): the cycle's update moved the codes")
                    }
                }
                // Against the merged checkpoint: step 4 differs only by the q8_0 embedding and head (measured
                // 1.1 %), step 6 also by the requantized linears (measured 2.2 % q8_0, 4.2 % q4_0).
                let back = try LlamaGGUF.loadModel(file, backend: CPUBackend())
                let ids = (0 ..< 16).map { Int32(($0 * 11) % 256) }
                let a = try back.logits(inputs: ids, batch: 1, seqLen: 16), b = try merged.logits(inputs: ids, batch: 1, seqLen: 16)
                let rel = (zip(a, b).map { Double($0 - $1) * Double($0 - $1) }.reduce(0, +) / b.map { Double($0 * $0) }.reduce(0, +)).squareRoot()
                XCTAssertLessThan(rel, steps == 4 ? 0.04 : 0.15, "\(format) step \(steps)")
            }
        }
    }

    // MARK: Tokenizer

    func testTokenizerRoundTripsThroughGGUFMetadata() throws {
        let fixtures = fixturesDirectory() + "/tokenizer"
        let expected = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: fixtures + "/expected.json"))) as! [String: Any]
        let texts = expected["strings"] as! [String]
        for (style, pre) in [("gpt2_style", "gpt-2"), ("llama3_style", "llama-bpe")] {
            let original = try BPETokenizer(contentsOf: fixtures + "/\(style).json")
            XCTAssertEqual(try original.ggufPreTokenizer(), pre)
            let vocab = original.vocabSize + 6
            let metadata = try original.ggufMetadata(vocabSize: vocab)
            let dir = temporaryDirectory()
            try GGUFWriter.write(metadata: metadata, tensors: [], to: dir + "/t.gguf")
            let file = try GGUFFile(path: dir + "/t.gguf")
            XCTAssertEqual(file.metadata["tokenizer.ggml.model"], .string("gpt2"))
            XCTAssertEqual(file.metadata["tokenizer.ggml.pre"], .string(pre))
            let tokens = try XCTUnwrap(file.metadata["tokenizer.ggml.tokens"]?.strings)
            let types = try XCTUnwrap(file.metadata["tokenizer.ggml.token_type"]?.integers)
            XCTAssertEqual(tokens.count, vocab)
            let eot = try XCTUnwrap(original.endOfTextId)
            XCTAssertEqual(tokens[Int(eot)], "<|endoftext|>")
            XCTAssertEqual(types[Int(eot)], 3, "special added token: control")
            XCTAssertEqual(Array(types.suffix(6)), [Int](repeating: 5, count: 6), "padding: unused")
            XCTAssertEqual(tokens.last, "[PAD\(vocab - 1)]")
            XCTAssertEqual(file.metadata["tokenizer.ggml.eos_token_id"], .uint32(UInt32(eot)))
            XCTAssertEqual(file.metadata["tokenizer.ggml.add_bos_token"], .bool(false))
            XCTAssertEqual(file.metadata["tokenizer.ggml.merges"]?.strings?.count, original.merges.count)

            let back = try BPETokenizer(gguf: file)
            XCTAssertEqual(back.vocabSize, original.vocabSize, "padding dropped")
            XCTAssertEqual(back.endOfTextId, eot)
            for text in texts + ["KING LEAR.\nBlow, winds, and crack your cheeks! 1234567 <|endoftext|>"] {
                XCTAssertEqual(back.encode(text), original.encode(text), "\(style): \(text.debugDescription)")
            }
        }
        // A tokenizer that puts a BOS before each document (here a GGUF asking for one, as LLaMA 3's do)
        // exports that BOS with add_bos_token true, so llama.cpp prompts as the data was made.
        let llama3 = try BPETokenizer(contentsOf: fixtures + "/llama3_style.json")
        let bosId = try XCTUnwrap(llama3.endOfTextId)
        let asked = try llama3.ggufMetadata(vocabSize: llama3.vocabSize).map { key, value in
            key == "tokenizer.ggml.add_bos_token" ? (key, GGUFValue.bool(true)) : (key, value)
        }
        let bosPath = temporaryDirectory() + "/bos.gguf"
        try GGUFWriter.write(metadata: asked, tensors: [], to: bosPath)
        let withBOS = try BPETokenizer(gguf: try GGUFFile(path: bosPath))
        XCTAssertEqual(withBOS.prefixId, bosId)
        let exported = Dictionary(try withBOS.ggufMetadata(vocabSize: withBOS.vocabSize), uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(exported["tokenizer.ggml.add_bos_token"], .bool(true))
        XCTAssertEqual(exported["tokenizer.ggml.bos_token_id"], .uint32(UInt32(bosId)))

        // A pre-tokenization llama.cpp has no name for is refused at export.
        var json = try String(contentsOfFile: fixtures + "/gpt2_style.json", encoding: .utf8)
        json = json.replacingOccurrences(of: "\"add_prefix_space\": false", with: "\"add_prefix_space\": true")
        let prefixed = try BPETokenizer(jsonData: Data(json.utf8))
        XCTAssertThrowsError(try prefixed.ggufMetadata(vocabSize: prefixed.vocabSize)) { error in
            guard case ReLoRAError.unsupported(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("no llama.cpp equivalent"), m)
        }
        let tok = try BPETokenizer(contentsOf: fixtures + "/gpt2_style.json")
        assertInvalidData(try tok.ggufMetadata(vocabSize: tok.vocabSize - 1), mentions: "cannot be the model's tokenizer")
    }

    /// Files relora cannot turn into a LLaMA model or tokenizer are one clear sentence each.
    func testUnsupportedModelsAreRejectedClearly() throws {
        let dir = temporaryDirectory()
        let model = try randomModel(try config())
        try LlamaGGUF.write(model: model, tokenizer: nil, weights: .f32, to: dir + "/m.gguf")
        let file = try GGUFFile(path: dir + "/m.gguf")
        assertInvalidFile(try BPETokenizer(gguf: file), mentions: "tokenizer.ggml.model")
        func variant(_ edit: ([(String, GGUFValue)]) -> [(String, GGUFValue)], _ keyword: String) throws {
            let metadata = edit(file.metadataKeys.map { ($0, file.metadata[$0]!) })
            let tensors = file.tensors.map { t in
                GGUFTensorEntry(name: t.name, type: t.type, shape: t.shape) { file.withBytes(t) { Array($0) } }
            }
            try GGUFWriter.write(metadata: metadata, tensors: tensors, to: dir + "/v.gguf")
            assertInvalidFile(try LlamaGGUF.loadModel(try GGUFFile(path: dir + "/v.gguf"), backend: CPUBackend()), mentions: keyword)
        }
        try variant({ $0.map { $0.0 == "general.architecture" ? ($0.0, .string("gpt2")) : $0 } }, "'gpt2'")
        try variant({ $0.filter { $0.0 != "llama.block_count" } }, "llama.block_count is missing")
        try variant({ $0 + [("llama.expert_count", .uint32(8))] }, "mixture-of-experts")
        try variant({ $0 + [("llama.rope.scaling.type", .string("linear"))] }, "rope scaling")
        try variant({ $0.map { $0.0 == "llama.rope.dimension_count" ? ($0.0, .uint32(8)) : $0 } }, "partial rotary")
        try variant({ $0.map { $0.0 == "llama.embedding_length" ? ($0.0, .uint32(32)) : $0 } }, "has ne")
    }
}
