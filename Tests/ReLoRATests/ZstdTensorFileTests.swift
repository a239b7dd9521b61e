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

/// The zstd tensor file (relora's compressed checkpoint container): the byte shuffle's layout, lossless
/// round trips of every dtype (empty and multi-chunk tensors included), random access, the stock zstd
/// tool's view of the file, and one clear error for every kind of damage.
final class ZstdTensorFileTests: XCTestCase {
    /// Bytes that encode their own position, so a misplaced byte shows as a wrong value.
    func positional(_ count: Int) -> [UInt8] { (0 ..< count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 8) } }

    func testShuffleLayoutAndChunkedRoundTrip() {
        for (width, count) in [(1, 10), (2, 11), (4, 4 * 1000 + 3), (18, 18 * 7), (4, 0), (4, 3)] {
            let source = positional(count)
            let shuffled = ByteShuffle.shuffled(source, width: width)
            let n = count / width
            // Plane k holds byte k of every element, in element order; the tail follows unchanged.
            for p in 0 ..< count {
                let expected = p < n * width ? source[(p % n) * width + p / n] : source[p]
                XCTAssertEqual(shuffled[p], expected, "width \(width) count \(count) position \(p)")
            }
            // Gathered and scattered in uneven chunks, as the streaming writer and reader do.
            var rng = TestRNG(UInt64(count))
            var gathered = [UInt8](repeating: 0, count: count)
            var restored = [UInt8](repeating: 0, count: count)
            var start = 0
            while start < count {
                let end = min(count, start + 1 + rng.int(97))
                source.withUnsafeBytes { s in
                    gathered.withUnsafeMutableBytes {
                        ByteShuffle.gather(s, width: width, shuffledRange: start ..< end, into: UnsafeMutableRawBufferPointer(rebasing: $0[start ..< end]))
                    }
                }
                gathered.withUnsafeBytes { g in
                    restored.withUnsafeMutableBytes {
                        ByteShuffle.scatter(UnsafeRawBufferPointer(rebasing: g[start ..< end]), width: width, shuffledOffset: start, into: $0)
                    }
                }
                start = end
            }
            XCTAssertEqual(gathered, shuffled, "width \(width) count \(count)")
            XCTAssertEqual(restored, source, "width \(width) count \(count)")
        }
    }

    /// Tensors of each dtype, one larger than zstd's 128 KiB stream chunk, one empty.
    func sampleEntries() -> [SafetensorsEntry] {
        var rng = TestRNG(3)
        let big = rng.floats(3 * 65536 + 5, -0.1, 0.1)  // 786 KB: several chunks, and an odd tail
        return [
            .f32("big", shape: [big.count], big),
            .bf16("half", shape: [3, 5], rng.floats(15)),
            .i64("ids", shape: [4], [1, -2, 3, Int64.max]),
            SafetensorsEntry(name: "blocks.q4_0", dtype: .U8, shape: [2, 18], bytes: positional(36)),
            .f32("empty", shape: [0, 4], []),
            .f32("scalar", shape: [], [42]),
        ]
    }

    func write(_ entries: [SafetensorsEntry], level: Int = 3, metadata: [String: String] = ["rank": "4"]) throws -> String {
        let path = temporaryDirectory() + "/t.tensors.zst"
        try ZstdTensorWriter.write(entries, metadata: metadata, level: level, to: path)
        return path
    }

    func testRoundTripIsLosslessWithRandomAccess() throws {
        let entries = sampleEntries()
        for level in [1, 19] {
            let path = try write(entries, level: level)
            let file = try ZstdTensorFile(path: path)
            XCTAssertEqual(file.metadata, ["rank": "4"])
            XCTAssertEqual(file.tensorNames, entries.map(\.name).sorted())
            // Read in reverse order: every tensor is its own frame.
            for entry in entries.reversed() {
                XCTAssertEqual(file.header(entry.name), TensorHeader(dtype: entry.dtype, shape: entry.shape))
                XCTAssertEqual(try file.withRawBytes(entry.name) { Array($0) }, entry.bytes, "\(entry.name) level \(level)")
            }
            XCTAssertEqual(try file.floats("scalar"), [42])
            XCTAssertNil(file.header("missing"))
            assertInvalidFile(try file.withRawBytes("missing") { _ in }, mentions: "has no tensor named 'missing'")
            // Byte-shuffled fp32 compresses: the big tensor's frame is smaller than its bytes.
            XCTAssertLessThan(try XCTUnwrap(file.compressedByteCount("big")), 4 * (3 * 65536 + 5))
        }
    }

    /// Every part of the file is a zstd frame: the stock tool checks it (skipped without `zstd`).
    func testStockZstdVerifiesTheFile() throws {
        let tool = "/usr/bin/zstd"
        guard FileManager.default.isExecutableFile(atPath: tool) else { throw XCTSkip("no \(tool)") }
        let path = try write(sampleEntries())
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = ["-t", "-q", path]
        try p.run()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
    }

    func testTruncatedFileIsOneClearError() throws {
        let path = try write(sampleEntries())
        let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        let file = try ZstdTensorFile(path: path)
        // Cut at the end of the index, inside it, inside the big frame, after the head, inside the head, empty.
        let bigEnd = try XCTUnwrap(file.compressedByteCount("big")) + 16
        for length in [bytes.count - 1, bytes.count - 30, bigEnd / 2, 16, 7, 0] {
            let cut = temporaryDirectory() + "/cut-\(length).tensors.zst"
            try bytes.prefix(length).write(to: URL(fileURLWithPath: cut))
            do {
                _ = try ZstdTensorFile(path: cut)
                XCTFail("truncated to \(length) bytes but opened")
            } catch ReLoRAError.invalidFile(let p, let reason) {
                XCTAssertEqual(p, cut)
                XCTAssertTrue(reason.contains("truncated") || reason.contains("not such a file"), reason)
                XCTAssertFalse(reason.contains("\n"))
            }
        }
    }

    /// A flipped byte inside one tensor's frame: that tensor fails with one sentence naming the file and
    /// the tensor; the other tensors still read (random access).
    func testCorruptFrameFailsOnlyThatTensor() throws {
        let path = try write(sampleEntries())
        var bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        let size = try XCTUnwrap(ZstdTensorFile(path: path).compressedByteCount("big"))
        for offset in [16 + size / 2, 16 + 6, 16 + size - 2] {  // the middle, the frame header, the checksum
            var damaged = bytes
            damaged[offset] ^= 0x10
            let damagedPath = temporaryDirectory() + "/flip-\(offset).tensors.zst"
            try damaged.write(to: URL(fileURLWithPath: damagedPath))
            let file = try ZstdTensorFile(path: damagedPath)
            do {
                _ = try file.withRawBytes("big") { Array($0) }
                XCTFail("a flipped byte at \(offset) went unnoticed")
            } catch ReLoRAError.invalidFile(let p, let reason) {
                XCTAssertEqual(p, damagedPath)
                XCTAssertTrue(reason.hasPrefix("tensor 'big' is corrupt: "), reason)
                XCTAssertFalse(reason.contains("\n"))
            }
            XCTAssertEqual(try file.floats("scalar"), [42])
        }
        bytes[0] ^= 1
        let headless = temporaryDirectory() + "/head.tensors.zst"
        try bytes.write(to: URL(fileURLWithPath: headless))
        assertInvalidFile(try ZstdTensorFile(path: headless), mentions: "does not start with the head")
    }

    /// The index's own checksum catches a damaged index; an index rewritten consistently but wrongly
    /// (its checksum recomputed) is caught by the frame and tensor checks.
    func testBadIndexIsOneClearError() throws {
        let path = try write(sampleEntries())
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let indexLength = Int(bytes[(bytes.count - 24)...].withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        let indexStart = bytes.count - 24 - indexLength
        let index = String(decoding: bytes[indexStart ..< indexStart + indexLength], as: UTF8.self)

        var flipped = bytes
        flipped[indexStart + indexLength / 2] ^= 0x01
        assertInvalidFile(try ZstdTensorFile(path: save(flipped, "flipped")), mentions: "index is corrupt (checksum mismatch)")

        /// The file with its index replaced by `edit(index)` and a matching footer.
        func rewritten(_ edit: (String) -> String) -> [UInt8] {
            let newIndex = Array(edit(index).utf8)
            var out = Array(bytes[..<(indexStart - 8)])
            out += withUnsafeBytes(of: UInt32(0x184D_2A5B).littleEndian) { Array($0) }
            out += withUnsafeBytes(of: UInt32(newIndex.count + 24).littleEndian) { Array($0) }
            out += newIndex
            out += withUnsafeBytes(of: UInt64(newIndex.count).littleEndian) { Array($0) }
            out += withUnsafeBytes(of: newIndex.withUnsafeBytes { contentHash64($0) }.littleEndian) { Array($0) }
            out += Array("RLZTIDX1".utf8)
            return out
        }
        let entry = { (name: String) -> String in
            let start = index.range(of: "\"\(name)\":{")!.upperBound
            return String(index[start ..< index[start...].firstIndex(of: "}")!])
        }
        // The same index re-serialised is accepted (the test's rewrite itself is sound).
        XCTAssertEqual(try ZstdTensorFile(path: save(rewritten { $0 }, "same")).floats("scalar"), [42])
        // A frame range beyond the frames, a shuffle of 0, a malformed checksum: rejected when opened.
        let big = entry("big")
        let frame = big.range(of: #""frame":\[[0-9]+,[0-9]+\]"#, options: .regularExpression)!
        assertInvalidFile(try ZstdTensorFile(path: save(rewritten { $0.replacingOccurrences(of: big, with: big.replacingCharacters(in: frame, with: "\"frame\":[16,99999999]")) }, "range")),
                          mentions: "tensor 'big' has a frame range")
        assertInvalidFile(try ZstdTensorFile(path: save(rewritten { $0.replacingOccurrences(of: "\"shuffle\":4", with: "\"shuffle\":0") }, "shuffle")),
                          mentions: "no shuffle width")
        assertInvalidFile(try ZstdTensorFile(path: save(rewritten { $0.replacingOccurrences(of: "\"checksum\":\"", with: "\"checksum\":\"x") }, "sum")),
                          mentions: "checksum")
        // A frame range that is inside the file but not the tensor's frame, a wrong checksum, a wrong shape:
        // caught when the tensor is read.
        let half = entry("half")
        let halfFrame = String(half[half.range(of: #""frame":\[[0-9]+,[0-9]+\]"#, options: .regularExpression)!])
        let swapped = try ZstdTensorFile(path: save(rewritten { $0.replacingOccurrences(of: big, with: big.replacingCharacters(in: frame, with: halfFrame))
            .replacingOccurrences(of: half, with: half.replacingOccurrences(of: halfFrame, with: String(big[frame]))) }, "swapped"))
        assertInvalidFile(try swapped.withRawBytes("big") { _ in }, mentions: "tensor 'big' is corrupt: its zstd frame declares")
        let sum = String(big[big.range(of: #"[0-9a-f]{16}"#, options: .regularExpression)!])
        let wrongSum = try ZstdTensorFile(path: save(rewritten { $0.replacingOccurrences(of: sum, with: "0123456789abcdef") }, "wrongsum"))
        assertInvalidFile(try wrongSum.withRawBytes("big") { _ in }, mentions: "do not match the index's checksum")
        let reshaped = try ZstdTensorFile(path: save(rewritten { $0.replacingOccurrences(of: "\"shape\":[3,5]", with: "\"shape\":[3,4]") }, "shape"))
        assertInvalidFile(try reshaped.withRawBytes("half") { _ in }, mentions: "tensor 'half' is corrupt")
    }

    func save(_ bytes: [UInt8], _ name: String) throws -> String {
        let path = temporaryDirectory() + "/\(name).tensors.zst"
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    func testNotAZstdTensorFile() throws {
        let plain = temporaryDirectory() + "/plain.safetensors"
        try SafetensorsWriter.write([.f32("w", shape: [2], [1, 2])], to: plain)
        assertInvalidFile(try ZstdTensorFile(path: plain), mentions: "not such a file")
        assertInvalidFile(try ZstdTensorFile(path: "/nonexistent/x.tensors.zst"), mentions: "cannot open")
    }

    func testWriterChecksLevelAndEntries() throws {
        let path = temporaryDirectory() + "/bad.tensors.zst"
        XCTAssertThrowsError(try ZstdTensorWriter.write([.f32("w", shape: [1], [1])], level: 99, to: path))
        assertInvalidData(try ZstdTensorWriter.write([.f32("w", shape: [1], [1]), .f32("w", shape: [1], [2])], level: 3, to: path),
                          mentions: "appears twice")
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))
    }
}
