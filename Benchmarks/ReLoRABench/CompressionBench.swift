import Foundation
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain
import ReLoRACommandLine

// relora-bench compression CHECKPOINT_DIR [--levels 1,3,9,19] [--json OUT]: how well zstd compresses a
// training checkpoint's tensors, per file, level and filter, so the checkpoint writer's level and
// shuffle choice rest on numbers (README "Checkpoints"). Every tensor is one independent frame, as the
// writer does it; time is single-threaded wall time of compressing (and of decompressing, with the
// output checked against the input), summed over tensors.
//
// Filters: `none`; `shuffle` = `ByteShuffle` at the element width (F32: 4, BF16/F16: 2) or, for
// quantized blocks (U8 `<name>.<format>`), at the block stride (q8_0: 34, q4_0: 18, nf4: 36), which
// puts the scales' bytes together and each code position together. F32 tensors are also measured
// after rounding to BF16 (`bf16`, `bf16+shuffle`) to see what a bf16 checkpoint would gain.

let compressionBenchCommand = CommandSpec(
    name: "relora-bench compression",
    summary: "how well zstd compresses a checkpoint's tensors, per file, level and filter",
    discussion: """
        Compresses every tensor of every .safetensors file of CHECKPOINT_DIR as one independent zstd frame (as
        the checkpoint writer does) at each level, without a filter and with a byte shuffle (F32 tensors also
        rounded to BF16), decompresses it and checks the round trip. Prints one line per file, kind, level
        and filter: sizes, ratio and single-threaded MB/s of compressing and decompressing.
        """,
    positionals: .one("CHECKPOINT_DIR"),
    options: [
        .value("levels", "L,L,...", help: "the zstd levels to measure", default: "1,3,9,19"),
        .value("json", "OUT.json", help: "also write the rows to this JSON file"),
    ],
    examples: ["relora-bench compression runs/shakespeare-demo/checkpoints/step_00000400 --levels 1,3 --json /tmp/zstd.json"],
    helpWhenEmpty: true)

enum CompressionBench {
    struct Row: Codable {
        var file: String
        /// "F32" or the quantized blocks' format ("q4_0").
        var kind: String
        var level: Int
        var filter: String
        var rawBytes: Int
        var compressedBytes: Int
        var compressSeconds: Double
        var decompressSeconds: Double

        enum CodingKeys: String, CodingKey {
            case file, kind, level, filter, rawBytes = "raw_bytes", compressedBytes = "compressed_bytes"
            case compressSeconds = "compress_seconds", decompressSeconds = "decompress_seconds"
        }
    }

    static func run(_ args: [String]) throws {
        guard let a = try compressionBenchCommand.parseOrPrintHelp(args) else { return }
        let checkpoint = a.positional[0]
        let json = a.string("json")
        let levels = try a.list("levels")!.map { item in
            guard let level = Int(item), Zstd.levels.contains(level) else {
                throw compressionBenchCommand.usageError(
                    "--levels takes zstd levels (\(Zstd.levels.lowerBound) to \(Zstd.levels.upperBound)) separated by commas, got '\(item)'")
            }
            return level
        }
        guard let listing = try? FileManager.default.contentsOfDirectory(atPath: checkpoint) else {
            throw ReLoRAError.invalidFile(path: checkpoint, reason: "cannot list the directory; give a checkpoint directory")
        }
        let files = listing.filter { $0.hasSuffix(".safetensors") }.sorted()
        var rows: [Row] = []
        /// "F32", "BF16", ... or the format of quantized blocks stored as U8 `<name>.<format>`.
        func kind(_ file: SafetensorsFile, _ tensor: String) -> String {
            let dtype = file.info(tensor)!.dtype
            if dtype == .U8, let format = QuantFormat(rawValue: String(tensor.split(separator: ".").last ?? "")) {
                return format.rawValue
            }
            return dtype.rawValue
        }
        for name in files {
            let file = try SafetensorsFile(path: checkpoint + "/" + name)
            for group in Set(file.tensorNames.map { kind(file, $0) }).sorted() {
            for level in levels {
                for filter in group == "F32" ? ["none", "shuffle", "bf16", "bf16+shuffle"] : ["none", "shuffle"] {
                    var row = Row(file: name, kind: group, level: level, filter: filter, rawBytes: 0, compressedBytes: 0,
                                  compressSeconds: 0, decompressSeconds: 0)
                    let compressor = try Zstd.Compressor(level: level)
                    let decompressor = try Zstd.Decompressor()
                    for tensor in file.tensorNames where kind(file, tensor) == group {
                        guard let info = file.info(tensor) else { continue }
                        var bytes = try file.withRawBytes(tensor) { Array($0) }
                        var width = info.dtype.byteSize
                        if info.dtype == .U8, let format = QuantFormat(rawValue: String(tensor.split(separator: ".").last ?? "")) {
                            width = format.bytesPerBlock
                        }
                        if filter.hasPrefix("bf16"), info.dtype == .F32 {
                            bytes = SafetensorsEntry.bf16(tensor, shape: info.shape, try file.floats(tensor)).bytes
                            width = 2
                        }
                        let shuffle = filter.hasSuffix("shuffle") ? width : 1
                        var frame: [UInt8] = []
                        let t0 = Date()
                        _ = try bytes.withUnsafeBytes { src in
                            try compressor.compressFrame(src, shuffleWidth: shuffle, path: name) { frame.append(contentsOf: $0) }
                        }
                        let t1 = Date()
                        var back = [UInt8](repeating: 0, count: bytes.count)
                        try frame.withUnsafeBytes { f in
                            try back.withUnsafeMutableBytes {
                                try decompressor.decompressFrame(f, shuffleWidth: shuffle, into: $0) { ReLoRAError.invalidData("\(tensor): \($0)") }
                            }
                        }
                        let t2 = Date()
                        precondition(back == bytes, "round trip of \(tensor) failed")
                        row.rawBytes += bytes.count
                        row.compressedBytes += frame.count
                        row.compressSeconds += t1.timeIntervalSince(t0)
                        row.decompressSeconds += t2.timeIntervalSince(t1)
                    }
                    rows.append(row)
                    print(String(format: "%-22@ %-5@ level %2d %-13@ %9.2f MiB -> %9.2f MiB  ratio %.3f  compress %7.1f MB/s  decompress %7.1f MB/s",
                                 name, group, level, filter, Double(row.rawBytes) / 1048576, Double(row.compressedBytes) / 1048576,
                                 Double(row.compressedBytes) / Double(max(row.rawBytes, 1)),
                                 Double(row.rawBytes) / 1e6 / max(row.compressSeconds, 1e-9),
                                 Double(row.rawBytes) / 1e6 / max(row.decompressSeconds, 1e-9)))
                }
            }
            }
        }
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try encoder.encode(rows).write(to: URL(fileURLWithPath: json))
        }
    }
}
