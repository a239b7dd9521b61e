import Foundation
#if canImport(Glibc)
import Glibc
#endif
import XCTest
import ReLoRACore
import ReLoRACUDA
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint
import ReLoRATrain
import ReLoRAAnalysis
import ReLoRASelfTest

final class SafetensorsTests: XCTestCase {
    // MARK: Round trips

    func testF32RoundTripKeepsValuesShapesAndOrder() throws {
        let path = try temporaryPath("f32.safetensors")
        // Values encode their own position (row * 10 + column) so a layout bug shows as a wrong number.
        let matrix: [Float] = [0, 1, 2, 10, 11, 12]
        let special: [Float] = [-0.0, .infinity, -.infinity, .leastNonzeroMagnitude, .greatestFiniteMagnitude, 3.14159]
        try SafetensorsWriter.write([
            .f32("z.matrix", shape: [2, 3], matrix),
            .f32("a.special", shape: [6], special),
        ], to: path)

        let file = try SafetensorsFile(path: path)
        XCTAssertEqual(file.tensorNames, ["a.special", "z.matrix"])
        XCTAssertEqual(file.metadata, [:])
        XCTAssertEqual(try file.floats("z.matrix"), matrix)
        XCTAssertEqual(try file.floats("a.special").map(\.bitPattern), special.map(\.bitPattern))
        XCTAssertEqual(file.info("z.matrix")?.shape, [2, 3])
        XCTAssertEqual(file.info("z.matrix")?.dtype, .F32)
        XCTAssertEqual(file.info("z.matrix")?.byteCount, 24)
        XCTAssertNil(file.info("missing"))
        XCTAssertTrue(try file.floats("a.special")[0].sign == .minus)
    }

    func testTensorsAreStoredInTheGivenOrderAtTheAbsoluteOffsetsReported() throws {
        let path = try temporaryPath("order.safetensors")
        try SafetensorsWriter.write([
            .f32("second", shape: [2], [1, 2]),
            .i64("first", shape: [1], [7]),
        ], to: path)
        let file = try SafetensorsFile(path: path)
        let raw = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
        let second = try XCTUnwrap(file.info("second"))
        let first = try XCTUnwrap(file.info("first"))
        // "second" was given first, so it comes first in the data buffer.
        XCTAssertEqual(first.byteOffset, second.byteOffset + 8)
        XCTAssertEqual(raw.count, first.byteOffset + first.byteCount)
        XCTAssertEqual(Array(raw[second.byteOffset ..< second.byteOffset + 8]), [0, 0, 0x80, 0x3F, 0, 0, 0, 0x40])
        XCTAssertEqual(Array(raw[first.byteOffset ..< first.byteOffset + 8]), [7, 0, 0, 0, 0, 0, 0, 0])
    }

    func testHeaderIsPaddedWithSpacesToAMultipleOfEight() throws {
        for nameLength in 1 ... 9 {
            let path = try temporaryPath("pad\(nameLength).safetensors")
            try SafetensorsWriter.write([.f32(String(repeating: "w", count: nameLength), shape: [1], [1])], to: path)
            let raw = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
            let headerLength = raw[0 ..< 8].reversed().reduce(0) { $0 << 8 | Int($1) }
            XCTAssertEqual(headerLength % 8, 0)
            let header = try XCTUnwrap(String(bytes: raw[8 ..< 8 + headerLength], encoding: .utf8))
            XCTAssertTrue(header.hasPrefix("{"))
            XCTAssertEqual(header.reversed().drop(while: { $0 == " " }).first, "}", "only spaces may follow the JSON object")
            XCTAssertEqual(raw.count, 8 + headerLength + 4)
        }
    }

    func testMetadataAndUnusualNamesRoundTrip() throws {
        let path = try temporaryPath("meta.safetensors")
        let metadata = ["format": "pt", "quote\"back\\slash": "line\nbreak\ttab\u{1}", "ünïcödé": "🦙 llama", "": ""]
        let oddName = "layers.0.\"attn\"\\q\n\u{7}é🦙"
        try SafetensorsWriter.write([.f32(oddName, shape: [1], [42])], metadata: metadata, to: path)
        let file = try SafetensorsFile(path: path)
        XCTAssertEqual(file.metadata, metadata)
        XCTAssertEqual(file.tensorNames, [oddName])
        XCTAssertEqual(try file.floats(oddName), [42])
    }

    func testBF16WriterRoundsToNearestEven() throws {
        // bfloat16 keeps 7 mantissa bits: near 1.0 its spacing is 2^-7, so 1 + 2^-8 is a tie.
        let inputs: [Float] = [
            1.0,
            1.0 + 0x1p-8,               // tie between 0x3F80 (even) and 0x3F81 -> 0x3F80
            1.0 + 3 * 0x1p-8,           // tie between 0x3F81 and 0x3F82 (even) -> 0x3F82
            1.0 + 0x1p-8 + 0x1p-20,     // just above the tie -> 0x3F81
            -2.5,                       // exact: 0xC020
            .greatestFiniteMagnitude,   // past the largest bfloat16 -> +inf
            -0.0, .infinity, -.infinity,
        ]
        let expected: [UInt16] = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F80, 0x8000, 0x7F80, 0xFF80]
        let entry = SafetensorsEntry.bf16("w", shape: [inputs.count], inputs)
        XCTAssertEqual(entry.dtype, .BF16)
        XCTAssertEqual(littleEndianUInt16s(entry.bytes), expected)

        let nanBits = littleEndianUInt16s(SafetensorsEntry.bf16("n", shape: [2], [.nan, -Float.nan]).bytes)
        XCTAssertTrue(nanBits.allSatisfy { $0 & 0x7F80 == 0x7F80 && $0 & 0x007F != 0 }, "NaN must stay NaN")
        XCTAssertEqual(nanBits.map { $0 >> 15 }, [0, 1], "NaN keeps its sign")

        let path = try temporaryPath("bf16.safetensors")
        try SafetensorsWriter.write([entry], to: path)
        let read = try SafetensorsFile(path: path).floats("w")
        XCTAssertEqual(read.map(\.bitPattern), expected.map { UInt32($0) << 16 })
        XCTAssertEqual(read[0], 1.0)
        XCTAssertEqual(read[2], 1.0 + 0x1p-6)
    }

    func testBF16ReaderKnownBitPatterns() throws {
        let patterns: [UInt16: Float] = [0x3F80: 1.0, 0xBF80: -1.0, 0x4049: 3.140625, 0x0000: 0, 0x7F80: .infinity, 0x0001: 0x1p-133]
        let keys = Array(patterns.keys)
        let file = try writeRaw(.BF16, shape: [keys.count], bytes: keys.flatMap(littleEndianBytes))
        XCTAssertEqual(try file.floats("t"), keys.map { patterns[$0]! })
        XCTAssertTrue(try readRawFloats(.BF16, [0x7FC0]).first!.isNaN)
    }

    func testF16ReaderKnownBitPatterns() throws {
        let cases: [(UInt16, Float)] = [
            (0x3C00, 1.0), (0xBC00, -1.0), (0x4000, 2.0), (0x3555, 0.333251953125),
            (0x7BFF, 65504),                 // largest finite half
            (0x0400, 0x1p-14),               // smallest normal
            (0x0001, 0x1p-24),               // smallest subnormal
            (0x03FF, 1023 * 0x1p-24),        // largest subnormal
            (0x8001, -0x1p-24),
            (0x7C00, .infinity), (0xFC00, -.infinity), (0x0000, 0),
        ]
        let read = try readRawFloats(.F16, cases.map(\.0))
        XCTAssertEqual(read, cases.map(\.1))
        XCTAssertEqual(try readRawFloats(.F16, [0x8000])[0].bitPattern, (-Float(0)).bitPattern)
        let nans = try readRawFloats(.F16, [0x7E00, 0xFE00, 0x7C01])
        XCTAssertTrue(nans.allSatisfy(\.isNaN))
        XCTAssertEqual(nans[1].sign, .minus)
    }

    #if !(os(macOS) && arch(x86_64))
    func testF16ReaderMatchesFloat16ForEveryBitPattern() throws {
        let all = (0 ... UInt16.max).map { $0 }
        let read = try readRawFloats(.F16, all)
        for (bits, value) in zip(all, read) {
            let reference = Float(Float16(bitPattern: bits))
            if reference.isNaN {
                XCTAssertTrue(value.isNaN && value.sign == reference.sign, "pattern \(String(bits, radix: 16))")
            } else if value.bitPattern != reference.bitPattern {
                XCTFail("pattern 0x\(String(bits, radix: 16)): got \(value), expected \(reference)")
                return
            }
        }
    }
    #endif

    func testF64ReadsAsNearestFloat() throws {
        let doubles: [Double] = [1.0, -2.5, 0.1, 1e300, 1.0 + 0x1p-30]
        let file = try writeRaw(.F64, shape: [doubles.count], bytes: doubles.withUnsafeBytes { Array($0) })
        XCTAssertEqual(try file.floats("t"), doubles.map { Float($0) })
        XCTAssertEqual(try file.floats("t")[3], .infinity)
    }

    func testEveryIntegerDTypeRoundTrips() throws {
        let path = try temporaryPath("ints.safetensors")
        let i64: [Int64] = [.min, -1, 0, 1, .max]
        let i32: [Int32] = [.min, -1, 0, .max]
        let i16: [Int16] = [.min, -1, 0, .max]
        let i8: [Int8] = [.min, -1, 0, .max]
        let u8: [UInt8] = [0, 1, 200, 255]
        let bools: [UInt8] = [0, 1, 1, 0, 7]
        try SafetensorsWriter.write([
            .i64("i64", shape: [5], i64),
            SafetensorsEntry(name: "i32", dtype: .I32, shape: [2, 2], bytes: i32.withUnsafeBytes { Array($0) }),
            SafetensorsEntry(name: "i16", dtype: .I16, shape: [4], bytes: i16.withUnsafeBytes { Array($0) }),
            SafetensorsEntry(name: "i8", dtype: .I8, shape: [4, 1], bytes: i8.withUnsafeBytes { Array($0) }),
            SafetensorsEntry(name: "u8", dtype: .U8, shape: [4], bytes: u8),
            SafetensorsEntry(name: "bool", dtype: .BOOL, shape: [5], bytes: bools),
        ], to: path)
        let file = try SafetensorsFile(path: path)
        XCTAssertEqual(try file.integers("i64"), i64)
        XCTAssertEqual(try file.integers("i32"), i32.map(Int64.init))
        XCTAssertEqual(try file.integers("i16"), i16.map(Int64.init))
        XCTAssertEqual(try file.integers("i8"), i8.map(Int64.init))
        XCTAssertEqual(try file.integers("u8"), u8.map(Int64.init))
        XCTAssertEqual(try file.integers("bool"), [0, 1, 1, 0, 1])
        XCTAssertEqual(file.info("i32")?.shape, [2, 2])
        XCTAssertEqual(try file.withRawBytes("u8") { Array($0) }, u8)
    }

    func testZeroSizeAndScalarTensors() throws {
        let path = try temporaryPath("empty.safetensors")
        try SafetensorsWriter.write([
            .f32("empty", shape: [0, 4], []),
            .f32("scalar", shape: [], [5]),
            .i64("also.empty", shape: [3, 0], []),
        ], to: path)
        let file = try SafetensorsFile(path: path)
        XCTAssertEqual(try file.floats("empty"), [])
        XCTAssertEqual(file.info("empty")?.shape, [0, 4])
        XCTAssertEqual(try file.floats("scalar"), [5])
        XCTAssertEqual(file.info("scalar")?.shape, [])
        XCTAssertEqual(try file.integers("also.empty"), [])

        let none = try temporaryPath("none.safetensors")
        try SafetensorsWriter.write([], to: none)
        XCTAssertEqual(try SafetensorsFile(path: none).tensorNames, [])
    }

    func testReadsAHandWrittenReferenceFile() throws {
        // What the reference writer produces for {"w": f32 [[1, 2]]} with metadata {"format": "pt"}:
        // keys in this order, compact JSON, padded to 8. Offsets are relative to the data buffer.
        let json = #"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}"#
        let file = try SafetensorsFile(path: writeHostile(header: json, data: [0, 0, 0x80, 0x3F, 0, 0, 0, 0x40]))
        XCTAssertEqual(try file.floats("w"), [1, 2])
        XCTAssertEqual(file.metadata, ["format": "pt"])
        // Gaps and trailing bytes are tolerated; they cannot lead a read out of bounds.
        let gappy = #"{"a":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#
        XCTAssertEqual(try SafetensorsFile(path: writeHostile(header: gappy, data: [9, 9, 5, 9])).integers("a"), [5])
    }

    func testWrongAccessorOrMissingTensorIsInvalidData() throws {
        let path = try temporaryPath("kinds.safetensors")
        try SafetensorsWriter.write([.f32("f", shape: [1], [1]), .i64("i", shape: [1], [1])], to: path)
        let file = try SafetensorsFile(path: path)
        assertInvalidData(try file.integers("f"), mentions: "floats(_:)")
        assertInvalidData(try file.floats("i"), mentions: "integers(_:)")
        assertInvalidData(try file.floats("nope"), mentions: "no tensor named 'nope'")
        assertInvalidData(try file.withRawBytes("nope") { _ in }, mentions: "no tensor")
    }

    // MARK: Malformed files: one test per check, each with its own message

    func testRejectsMissingFileAndDirectory() throws {
        assertInvalidFile(try SafetensorsFile(path: "/nonexistent/x.safetensors"), mentions: "cannot open")
        assertInvalidFile(try SafetensorsFile(path: try scratchDirectory()), mentions: "not a regular file")
    }

    func testRejectsFileShorterThanTheLengthPrefix() throws {
        for length in 0 ..< 8 {
            assertInvalidFile(try SafetensorsFile(path: writeBytes(Array(repeating: 1, count: length))), mentions: "shorter than the 8-byte")
        }
    }

    func testRejectsZeroHeaderLength() throws {
        assertInvalidFile(try SafetensorsFile(path: writeBytes(lengthPrefix(0) + Array("{}".utf8))), mentions: "header length is 0")
    }

    func testRejectsHeaderLengthPastTheEndOfTheFile() throws {
        let header = Array(#"{}"#.utf8)
        assertInvalidFile(try SafetensorsFile(path: writeBytes(lengthPrefix(3) + header)), mentions: "runs past the end")
    }

    func testRejectsAbsurdHeaderLength() throws {
        for declared: UInt64 in [100_000_001, 1 << 40, .max] {
            assertInvalidFile(try SafetensorsFile(path: writeBytes(lengthPrefix(declared) + Array("{}".utf8))), mentions: "absurd")
        }
    }

    func testRejectsHeaderThatIsNotUTF8() throws {
        let bytes: [UInt8] = Array(#"{"a"#.utf8) + [0xFF, 0xFE] + Array(#"":{}}"#.utf8)
        assertInvalidFile(try SafetensorsFile(path: writeBytes(lengthPrefix(UInt64(bytes.count)) + bytes)), mentions: "UTF-8")
    }

    func testRejectsHeaderThatIsNotJSON() throws {
        for text in [#"{"a": "#, "not json at all", String(repeating: "[", count: 100_000), #"{"a":1e400}"#] {
            assertInvalidFile(try SafetensorsFile(path: writeHostile(header: text)), mentions: "not valid JSON")
        }
    }

    func testRejectsHeaderThatIsNotAnObject() throws {
        for text in ["[1, 2]", "42", #""text""#, "null"] {
            assertInvalidFile(try SafetensorsFile(path: writeHostile(header: text)), mentions: "not an object")
        }
    }

    func testRejectsEntryThatIsNotAnObject() throws {
        assertInvalidFile(try SafetensorsFile(path: writeHostile(header: #"{"w": [1, 2]}"#)), mentions: "'w' is not a JSON object")
    }

    func testRejectsEntryMissingAKey() throws {
        let complete = ["dtype": #""F32""#, "shape": "[1]", "data_offsets": "[0, 4]"]
        for missing in complete.keys {
            let fields = complete.filter { $0.key != missing }.map { "\"\($0.key)\": \($0.value)" }.joined(separator: ", ")
            assertInvalidFile(try SafetensorsFile(path: writeHostile(header: "{\"w\": {\(fields)}}", data: [0, 0, 0, 0])),
                              mentions: "missing '\(missing)'")
        }
    }

    func testRejectsUnknownDTypeByName() throws {
        assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: #""dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]"#, data: [0])),
                          mentions: "unknown dtype 'F8_E4M3'")
        assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: #""dtype": "f32", "shape": [1], "data_offsets": [0, 4]"#, data: [0, 0, 0, 0])),
                          mentions: "unknown dtype 'f32'")
        assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: #""dtype": 4, "shape": [1], "data_offsets": [0, 4]"#, data: [0, 0, 0, 0])),
                          mentions: "dtype that is not a string")
    }

    func testRejectsInvalidShapes() throws {
        for shape in ["[-1]", "[2, 1.5]", #"["2"]"#, "[true]", "[null]", "[1e30]", "[99999999999999999999]", "3", "{}"] {
            let entry = #""dtype": "U8", "shape": \#(shape), "data_offsets": [0, 0]"#
            let mention = shape.hasPrefix("[") ? "invalid shape" : "shape that is not a JSON array"
            assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: entry)), mentions: mention, "shape \(shape)")
        }
    }

    func testRejectsShapeWhoseSizeOverflows() throws {
        for shape in ["[4294967296, 4294967296]", "[9223372036854775807, 2]", "[2305843009213693952]"] {
            let entry = #""dtype": "F32", "shape": \#(shape), "data_offsets": [0, 0]"#
            assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: entry)), mentions: "overflows", "shape \(shape)")
        }
        // A zero dimension anywhere makes the product 0 even when the other dimensions are huge.
        let zero = #""dtype": "F32", "shape": [9223372036854775807, 9223372036854775807, 0], "data_offsets": [0, 0]"#
        XCTAssertEqual(try SafetensorsFile(path: writeHostile(entry: zero)).floats("w"), [])
    }

    func testRejectsMalformedDataOffsets() throws {
        for offsets in ["[0]", "[0, 4, 8]", "[-4, 0]", "[0, 4.5]", "[0, true]", #"["0", 4]"#, "4", "[0, 1e30]", "[0, 99999999999999999999]"] {
            let entry = #""dtype": "F32", "shape": [1], "data_offsets": \#(offsets)"#
            assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: entry, data: [0, 0, 0, 0])),
                              mentions: "not two non-negative integers", "offsets \(offsets)")
        }
        // Exact integers written as floats are still integers.
        let floaty = #""dtype": "F32", "shape": [1.0], "data_offsets": [0.0, 4e0]"#
        XCTAssertEqual(try SafetensorsFile(path: writeHostile(entry: floaty, data: [0, 0, 0x80, 0x3F])).floats("w"), [1])
    }

    func testRejectsBeginAfterEnd() throws {
        let entry = #""dtype": "F32", "shape": [1], "data_offsets": [4, 0]"#
        assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: entry, data: [0, 0, 0, 0])), mentions: "begin after end")
    }

    func testRejectsEndBeyondTheDataBuffer() throws {
        let entry = #""dtype": "F32", "shape": [2], "data_offsets": [0, 8]"#
        assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: entry, data: [0, 0, 0, 0])), mentions: "beyond the 4-byte data buffer")
        let huge = #""dtype": "U8", "shape": [9223372036854775807], "data_offsets": [0, 9223372036854775807]"#
        assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: huge)), mentions: "beyond")
    }

    func testRejectsByteCountThatDoesNotMatchShape() throws {
        let entry = #""dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]"#
        assertInvalidFile(try SafetensorsFile(path: writeHostile(entry: entry, data: Array(repeating: 0, count: 16))),
                          mentions: "occupies 12 bytes but dtype F32 with shape [2, 2] needs 16")
    }

    func testRejectsOverlappingTensors() throws {
        let header = #"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#
        assertInvalidFile(try SafetensorsFile(path: writeHostile(header: header, data: Array(repeating: 0, count: 8))), mentions: "overlapping")
        // Touching ranges and empty ranges inside another tensor are fine.
        let fine = #"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, "c": {"dtype": "F32", "shape": [0], "data_offsets": [2, 2]}}"#
        XCTAssertEqual(try SafetensorsFile(path: writeHostile(header: fine, data: Array(repeating: 0, count: 8))).tensorNames, ["a", "b", "c"])
    }

    func testRejectsMetadataThatIsNotStringToString() throws {
        assertInvalidFile(try SafetensorsFile(path: writeHostile(header: #"{"__metadata__": ["pt"]}"#)), mentions: "__metadata__ is not a JSON object")
        assertInvalidFile(try SafetensorsFile(path: writeHostile(header: #"{"__metadata__": {"step": 10}}"#)), mentions: "'step' has a non-string value")
        assertInvalidFile(try SafetensorsFile(path: writeHostile(header: #"{"__metadata__": {"x": null}}"#)), mentions: "non-string value")
    }

    /// Every proper prefix of a valid file is rejected cleanly, and random corruption of the header never
    /// crashes: it either parses (into in-bounds tensors) or throws `.invalidFile`.
    func testTruncationAndCorruptionNeverCrash() throws {
        let path = try temporaryPath("valid.safetensors")
        try SafetensorsWriter.write([.f32("a", shape: [2, 2], [1, 2, 3, 4]), .bf16("b", shape: [3], [1, 2, 3])],
                                    metadata: ["k": "v"], to: path)
        let valid = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
        for length in 0 ..< valid.count {
            XCTAssertThrowsError(try SafetensorsFile(path: writeBytes(Array(valid[..<length])))) { error in
                guard case ReLoRAError.invalidFile = error else { return XCTFail("prefix \(length): \(error)") }
            }
        }
        var random = TestRNG(0x5AFE)
        let headerEnd = valid.count - (4 * 4 + 3 * 2)  // corrupt the prefix and header, not the data
        for trial in 0 ..< 500 {
            var corrupted = valid
            for _ in 0 ..< 1 + random.int(3) {
                corrupted[random.int(headerEnd)] = UInt8(truncatingIfNeeded: random.next())
            }
            do {
                let file = try SafetensorsFile(path: writeBytes(corrupted, name: "fuzz.safetensors"))
                for name in file.tensorNames {
                    _ = try? file.floats(name)
                    _ = try? file.integers(name)
                }
            } catch ReLoRAError.invalidFile {
            } catch {
                XCTFail("trial \(trial): unexpected \(error)")
            }
        }
    }

    // MARK: Writer

    func testWriterRejectsEntriesBeforeTouchingTheDisk() throws {
        let path = try temporaryPath("keep.safetensors")
        try SafetensorsWriter.write([.f32("old", shape: [1], [1])], to: path)
        let before = try Data(contentsOf: URL(fileURLWithPath: path))

        assertInvalidData(try SafetensorsWriter.write([.f32("w", shape: [2, 2], [1, 2, 3])], to: path), mentions: "has 12 bytes but dtype F32 with shape [2, 2] needs 16")
        assertInvalidData(try SafetensorsWriter.write([.f32("w", shape: [1], [1]), .f32("w", shape: [1], [2])], to: path), mentions: "appears twice")
        assertInvalidData(try SafetensorsWriter.write([.f32("__metadata__", shape: [1], [1])], to: path), mentions: "__metadata__")
        assertInvalidData(try SafetensorsWriter.write([.f32("", shape: [1], [1])], to: path), mentions: "non-empty")
        assertInvalidData(try SafetensorsWriter.write([.f32("w", shape: [-1], [])], to: path), mentions: "negative")
        assertInvalidData(try SafetensorsWriter.write([.f32("w", shape: [1 << 62, 4], [])], to: path), mentions: "needs more than")

        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), before)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: (path as NSString).deletingLastPathComponent), ["keep.safetensors"])
    }

    func testWriterIntoMissingDirectoryThrowsClearError() throws {
        let path = try scratchDirectory() + "/no/such/dir/w.safetensors"
        assertInvalidFile(try SafetensorsWriter.write([.f32("w", shape: [1], [1])], to: path), mentions: "check that the directory exists")
    }

    func testWriterWhoseParentIsARegularFileThrows() throws {
        let parent = try temporaryPath("plain-file")
        try Data([1]).write(to: URL(fileURLWithPath: parent))
        assertInvalidFile(try SafetensorsWriter.write([.f32("w", shape: [1], [1])], to: parent + "/w.safetensors"), mentions: "Not a directory")
    }

    func testFailedRenameLeavesTheDestinationAndNoTemporaryFile() throws {
        // The destination is a non-empty directory: everything succeeds up to the rename, which fails.
        let directory = try scratchDirectory()
        let destination = directory + "/occupied"
        try FileManager.default.createDirectory(atPath: destination, withIntermediateDirectories: false)
        try Data([7]).write(to: URL(fileURLWithPath: destination + "/inside"))
        assertInvalidFile(try SafetensorsWriter.write([.f32("w", shape: [1], [1])], to: destination), mentions: "moving the temporary file")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: directory), ["occupied"])
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: destination + "/inside")), Data([7]))
    }

    #if os(Linux)
    /// A write that fails halfway (here: the file-size limit, standing in for a full disk) throws, keeps the
    /// previous file byte for byte, and leaves no temporary file behind.
    func testWriteFailingMidwayKeepsTheOldFile() throws {
        let path = try temporaryPath("midway.safetensors")
        try SafetensorsWriter.write([.f32("old", shape: [1], [1])], to: path)
        let before = try Data(contentsOf: URL(fileURLWithPath: path))

        // Beyond RLIMIT_FSIZE, write() fails with EFBIG once SIGXFSZ (which would kill the process) is ignored.
        var original = rlimit()
        XCTAssertEqual(getrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &original), 0)
        var limited = original
        limited.rlim_cur = 4096
        let previousHandler = signal(SIGXFSZ, SIG_IGN)
        XCTAssertEqual(setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limited), 0)
        defer {
            setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &original)
            signal(SIGXFSZ, previousHandler)
        }
        assertInvalidFile(try SafetensorsWriter.write([.f32("big", shape: [4096], Array(repeating: 2, count: 4096))], to: path),
                          mentions: "writing the temporary file failed")

        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), before)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: (path as NSString).deletingLastPathComponent), ["midway.safetensors"])
    }
    #endif

    func testWriterReplacesAnExistingFile() throws {
        let path = try temporaryPath("replace.safetensors")
        try SafetensorsWriter.write([.f32("old", shape: [1], [1])], to: path)
        let oldFile = try SafetensorsFile(path: path)  // an open map keeps the old inode alive
        try SafetensorsWriter.write([.f32("new", shape: [2], [2, 3])], to: path)
        XCTAssertEqual(try SafetensorsFile(path: path).floats("new"), [2, 3])
        XCTAssertEqual(try oldFile.floats("old"), [1])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: (path as NSString).deletingLastPathComponent), ["replace.safetensors"])
    }

    func testWriterAcceptsARelativePath() throws {
        let directory = try scratchDirectory()
        let previous = FileManager.default.currentDirectoryPath
        XCTAssertTrue(FileManager.default.changeCurrentDirectoryPath(directory))
        defer { _ = FileManager.default.changeCurrentDirectoryPath(previous) }
        try SafetensorsWriter.write([.f32("w", shape: [1], [9])], to: "relative.safetensors")
        XCTAssertEqual(try SafetensorsFile(path: directory + "/relative.safetensors").floats("w"), [9])
    }

    // MARK: Helpers

    private func scratchDirectory() throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("relora-safetensors-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: path) }
        return path
    }

    private func temporaryPath(_ name: String) throws -> String {
        try scratchDirectory() + "/" + name
    }

    private func writeBytes(_ bytes: [UInt8], name: String = "hostile.safetensors") throws -> String {
        let path = try temporaryPath(name)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    private func lengthPrefix(_ length: UInt64) -> [UInt8] {
        (0 ..< 8).map { UInt8(truncatingIfNeeded: length >> (8 * $0)) }
    }

    /// A file with the given header text (length prefix computed) and data buffer.
    private func writeHostile(header: String, data: [UInt8] = []) throws -> String {
        let headerBytes = Array(header.utf8)
        return try writeBytes(lengthPrefix(UInt64(headerBytes.count)) + headerBytes + data)
    }

    /// A file with one tensor "w" whose entry object holds `entry`.
    private func writeHostile(entry: String, data: [UInt8] = []) throws -> String {
        try writeHostile(header: "{\"w\": {\(entry)}}", data: data)
    }

    private func writeRaw(_ dtype: SafetensorsDType, shape: [Int], bytes: [UInt8]) throws -> SafetensorsFile {
        let path = try temporaryPath("raw.safetensors")
        try SafetensorsWriter.write([SafetensorsEntry(name: "t", dtype: dtype, shape: shape, bytes: bytes)], to: path)
        return try SafetensorsFile(path: path)
    }

    private func readRawFloats(_ dtype: SafetensorsDType, _ patterns: [UInt16]) throws -> [Float] {
        try writeRaw(dtype, shape: [patterns.count], bytes: patterns.flatMap(littleEndianBytes)).floats("t")
    }

    private func littleEndianBytes(_ value: UInt16) -> [UInt8] {
        [UInt8(truncatingIfNeeded: value), UInt8(truncatingIfNeeded: value >> 8)]
    }

    private func littleEndianUInt16s(_ bytes: [UInt8]) -> [UInt16] {
        stride(from: 0, to: bytes.count, by: 2).map { UInt16(bytes[$0]) | UInt16(bytes[$0 + 1]) << 8 }
    }
}
