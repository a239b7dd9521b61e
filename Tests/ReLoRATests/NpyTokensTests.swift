import Foundation
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

final class NpyTokensTests: XCTestCase {
    /// `np.save(f, np.array([1, 2, 3], dtype=np.uint16))` from numpy 2.x, byte for byte: magic, version 1.0,
    /// header length 118, the dict with 21 characters of growth room, space padding to a 64-byte boundary,
    /// "\n", then the three little-endian uint16 values.
    static let numpyUInt16OneTwoThree: [UInt8] = [
        147, 78, 85, 77, 80, 89, 1, 0, 118, 0, 123, 39, 100, 101, 115, 99, 114, 39, 58, 32, 39, 60, 117, 50, 39,
        44, 32, 39, 102, 111, 114, 116, 114, 97, 110, 95, 111, 114, 100, 101, 114, 39, 58, 32, 70, 97, 108, 115,
        101, 44, 32, 39, 115, 104, 97, 112, 101, 39, 58, 32, 40, 51, 44, 41, 44, 32, 125, 32, 32, 32, 32, 32,
        32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
        32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
        32, 32, 32, 10, 1, 0, 2, 0, 3, 0,
    ]

    // MARK: numpy compatibility

    func testReadsNumpysOwnOutput() throws {
        let tokens = try TokenArray(npyPath: writeBytes(Self.numpyUInt16OneTwoThree))
        XCTAssertEqual(tokens.dtype, .uint16)
        XCTAssertEqual(tokens.count, 3)
        XCTAssertEqual((0 ..< 3).map { tokens[$0] }, [1, 2, 3])
        XCTAssertEqual(tokens.window(0, 3), [1, 2, 3])
    }

    func testWriterMatchesNumpyByteForByte() throws {
        let path = try temporaryPath("written.npy")
        try NpyWriter.write(tokens: [1, 2, 3], dtype: .uint16, to: path)
        XCTAssertEqual(try Array(Data(contentsOf: URL(fileURLWithPath: path))), Self.numpyUInt16OneTwoThree)
    }

    func testWriterAlignsDataTo64BytesForAnyCount() throws {
        for count in [0, 1, 9, 10, 99_999, 1_000_000] {
            let path = try temporaryPath("aligned\(count).npy")
            try NpyWriter.write(tokens: (0 ..< Int64(count)).map { $0 % 50_000 }, dtype: .uint16, to: path)
            let raw = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
            let headerEnd = 10 + Int(raw[8]) + Int(raw[9]) << 8
            XCTAssertEqual(headerEnd % 64, 0, "count \(count)")
            XCTAssertEqual(raw[headerEnd - 1], UInt8(ascii: "\n"))
            XCTAssertEqual(raw.count - headerEnd, 2 * count)
            XCTAssertEqual(try TokenArray(npyPath: path).count, count)
        }
    }

    // MARK: Round trips

    func testEveryDTypeRoundTripsItsExtremes() throws {
        let cases: [(TokenDType, [Int64])] = [
            (.uint16, [0, 1, 65_535, 300]),
            (.uint32, [0, 65_536, 4_294_967_295, 7]),
            (.int32, [Int64(Int32.min), -1, 0, Int64(Int32.max)]),
            (.int64, [.min, -1, 0, .max]),
        ]
        for (dtype, values) in cases {
            let path = try temporaryPath("\(dtype.rawValue).npy")
            try NpyWriter.write(tokens: values, dtype: dtype, to: path)
            let tokens = try TokenArray(npyPath: path)
            XCTAssertEqual(tokens.dtype, dtype)
            XCTAssertEqual(tokens.path, path)
            XCTAssertEqual(tokens.count, values.count)
            XCTAssertEqual((0 ..< values.count).map { tokens[$0] }, values, "\(dtype)")
            XCTAssertEqual(tokens.maxValue(), values.max(), "\(dtype)")
            XCTAssertEqual(tokens.minValue(), values.min(), "\(dtype)")
            // Values beyond Int32 wrap in window(); callers validate with minValue()/maxValue() first.
            XCTAssertEqual(tokens.window(0, values.count), values.map { Int32(truncatingIfNeeded: $0) }, "\(dtype)")
            XCTAssertEqual(try Array(Data(contentsOf: URL(fileURLWithPath: path))).count, 128 + values.count * dtype.byteSize)
        }
    }

    func testWindowsReturnTheRightSlice() throws {
        let path = try temporaryPath("positions.npy")
        // Each token is its own index, so an off-by-one shows as a wrong number.
        try NpyWriter.write(tokens: (0 ..< 1000).map { Int64($0) }, dtype: .uint32, to: path)
        let tokens = try TokenArray(npyPath: path)
        XCTAssertEqual(tokens.window(10, 5), [10, 11, 12, 13, 14])
        XCTAssertEqual(tokens.window(995, 5), [995, 996, 997, 998, 999])
        XCTAssertEqual(tokens.window(1000, 0), [])
        XCTAssertEqual(tokens[999], 999)
    }

    func testEmptyArrayIsValid() throws {
        let path = try temporaryPath("empty.npy")
        try NpyWriter.write(tokens: [], dtype: .int32, to: path)
        let tokens = try TokenArray(npyPath: path)
        XCTAssertEqual(tokens.count, 0)
        XCTAssertEqual(tokens.window(0, 0), [])
        XCTAssertEqual(tokens.maxValue(), 0)
        XCTAssertEqual(tokens.minValue(), 0)
    }

    func testAcceptsVersions2And3AndUnpaddedOrUnalignedHeaders() throws {
        // numpy's version 2.0 / 3.0 output for np.array([1, 2], dtype=np.uint16): a 4-byte header length.
        for major: UInt8 in [2, 3] {
            let path = try writeNpy(header: "{'descr': '<u2', 'fortran_order': False, 'shape': (2,), }", data: [1, 0, 2, 0], major: major)
            let tokens = try TokenArray(npyPath: path)
            XCTAssertEqual(tokens.window(0, 2), [1, 2], "version \(major)")
        }
        // No padding, no newline, odd header length (data not aligned), double quotes, other key order.
        let path = try writeNpy(header: #"{"shape":(3,),"fortran_order":False,"descr":"<i8"}"#,
                                data: [5, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 7, 0, 0, 0, 0, 0, 0, 0])
        let tokens = try TokenArray(npyPath: path)
        XCTAssertEqual((0 ..< 3).map { tokens[$0] }, [5, -1, 7])
        XCTAssertEqual(tokens.window(1, 2), [-1, 7])
    }

    func testAcceptsShapeSpelledWithoutTrailingCommaAndFortranOrder1D() throws {
        XCTAssertEqual(try TokenArray(npyPath: writeNpy(header: "{'descr': '<u2', 'fortran_order': False, 'shape': (2)}", data: [1, 0, 2, 0])).count, 2)
        XCTAssertEqual(try TokenArray(npyPath: writeNpy(header: "{'descr': '<u2', 'fortran_order': False, 'shape': ( 2 , ) , }\n", data: [1, 0, 2, 0])).count, 2)
        // A 1-D Fortran-ordered array has the same layout as a C-ordered one.
        XCTAssertEqual(try TokenArray(npyPath: writeNpy(header: "{'descr': '<u2', 'fortran_order': True, 'shape': (2,)}", data: [1, 0, 2, 0])).window(0, 2), [1, 2])
    }

    // MARK: Malformed files

    func testRejectsMissingFile() {
        assertInvalidFile(try TokenArray(npyPath: "/nonexistent/tokens.npy"), mentions: "cannot open")
    }

    func testRejectsBadMagic() throws {
        for bytes in [[], [0x93, 0x4E], Array("PK\u{3}\u{4} this is a zip".utf8), Array("\u{93}NUMPX\u{1}\u{0}xxxx".utf8)] {
            assertInvalidFile(try TokenArray(npyPath: writeBytes(bytes)), mentions: "not a .npy file")
        }
    }

    func testRejectsUnsupportedVersion() throws {
        for major: UInt8 in [0, 4, 255] {
            let path = try writeNpy(header: "{'descr': '<u2', 'fortran_order': False, 'shape': (0,), }", data: [], major: major)
            assertInvalidFile(try TokenArray(npyPath: path), mentions: "unsupported .npy format version \(major).0")
        }
    }

    func testRejectsTruncatedHeader() throws {
        let full = Self.numpyUInt16OneTwoThree
        for length in [6, 7, 8, 9, 11, 60, 127] {
            assertInvalidFile(try TokenArray(npyPath: writeBytes(Array(full[..<length]))), mentions: "truncated header")
        }
        // A version-2 length field that claims 4 GB.
        let huge: [UInt8] = [0x93] + Array("NUMPY".utf8) + [2, 0, 0xFF, 0xFF, 0xFF, 0xFF] + Array("{}".utf8)
        assertInvalidFile(try TokenArray(npyPath: writeBytes(huge)), mentions: "absurd")
    }

    func testRejectsUnparsableHeaders() throws {
        let headers = [
            "",
            "not a dict",
            "{'descr': '<u2', 'fortran_order': False, 'shape': (3,), ",      // no closing brace
            "{'descr': '<u2', 'fortran_order': False}",                       // missing shape
            "{'descr': '<u2', 'fortran_order': False, 'shape': (3,), 'extra': 1}",
            "{'descr': '<u2', 'fortran_order': False, 'shape': (3,)} trailing",
            "{'descr': '<u2', 'fortran_order': 'no', 'shape': (3,)}",
            "{'descr': '<u2', 'fortran_order': False, 'shape': (-3,)}",
            "{'descr': '<u2', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
            "{'descr': '<u2', 'fortran_order': False, 'shape': [3]}",
            "{'descr': '<u2', 'fortran_order': False, 'shape': (3.5,)}",
            "{'descr': '<u2', 'descr': '<u2', 'fortran_order': False, 'shape': (3,)}",
            "{'descr': '<u2\\n', 'fortran_order': False, 'shape': (3,)}",
            "{'descr: '<u2', 'fortran_order': False, 'shape': (3,)}",
            "{'descr': '<u2', 'fortran_order': False, 'shape': " + String(repeating: "(", count: 10_000) + "}",
        ]
        for header in headers {
            assertInvalidFile(try TokenArray(npyPath: writeNpy(header: header, data: [1, 0, 2, 0, 3, 0])),
                              mentions: "unparsable header", "header \(header.prefix(80))")
        }
    }

    func testRejectsBigEndian() throws {
        let path = try writeNpy(header: "{'descr': '>u2', 'fortran_order': False, 'shape': (2,), }", data: [0, 1, 0, 2])
        assertInvalidFile(try TokenArray(npyPath: path), mentions: "big-endian")
    }

    func testRejectsOtherDTypesAndSaysWhichAreAccepted() throws {
        for descr in ["<f4", "|u1", "<u8", "<i2", "|b1", "<U5", "=u2"] {
            let path = try writeNpy(header: "{'descr': '\(descr)', 'fortran_order': False, 'shape': (0,), }", data: [])
            assertInvalidFile(try TokenArray(npyPath: path), mentions: "unsupported dtype '\(descr)'; token files must hold uint16, uint32, int32 or int64, little-endian")
        }
        let structured = try writeNpy(header: "{'descr': [('a', '<u2')], 'fortran_order': False, 'shape': (0,), }", data: [])
        assertInvalidFile(try TokenArray(npyPath: structured), mentions: "structured")
    }

    func testRejectsFortranOrderedMatrix() throws {
        let path = try writeNpy(header: "{'descr': '<u2', 'fortran_order': True, 'shape': (2, 3), }", data: Array(repeating: 0, count: 12))
        assertInvalidFile(try TokenArray(npyPath: path), mentions: "Fortran-ordered with shape (2, 3)")
    }

    func testRejectsArraysThatAreNot1D() throws {
        for (shape, spelled) in [("(2, 3)", "(2, 3)"), ("()", "()"), ("(1, 1, 6)", "(1, 1, 6)")] {
            let path = try writeNpy(header: "{'descr': '<u2', 'fortran_order': False, 'shape': \(shape), }", data: Array(repeating: 0, count: 12))
            assertInvalidFile(try TokenArray(npyPath: path), mentions: "expected a 1-D array of token ids, got shape \(spelled)")
        }
    }

    func testRejectsTruncatedData() throws {
        let full = Self.numpyUInt16OneTwoThree
        for cut in 1 ... 6 {
            assertInvalidFile(try TokenArray(npyPath: writeBytes(Array(full.dropLast(cut)))), mentions: "truncated data")
        }
        // A count whose byte size overflows Int is reported the same way, not as a crash.
        let path = try writeNpy(header: "{'descr': '<i8', 'fortran_order': False, 'shape': (9223372036854775807,), }", data: [])
        assertInvalidFile(try TokenArray(npyPath: path), mentions: "truncated data")
    }

    func testRejectsTrailingBytesAfterTheData() throws {
        assertInvalidFile(try TokenArray(npyPath: writeBytes(Self.numpyUInt16OneTwoThree + [0])), mentions: "1 bytes after the 3 tokens")
    }

    /// Every proper prefix of a valid file is rejected, and random header corruption never crashes.
    func testTruncationAndCorruptionNeverCrash() throws {
        let valid = Self.numpyUInt16OneTwoThree
        for length in 0 ..< valid.count {
            assertInvalidFile(try TokenArray(npyPath: writeBytes(Array(valid[..<length]))), mentions: "", "prefix \(length)")
        }
        var random = TestRNG(0x0123_4567)
        for trial in 0 ..< 500 {
            var corrupted = valid
            for _ in 0 ..< 1 + random.int(3) {
                corrupted[random.int(128)] = UInt8(truncatingIfNeeded: random.next())
            }
            do {
                let tokens = try TokenArray(npyPath: writeBytes(corrupted))
                _ = tokens.window(0, tokens.count)
                _ = tokens.maxValue()
            } catch ReLoRAError.invalidFile {
            } catch {
                XCTFail("trial \(trial): unexpected \(error)")
            }
        }
    }

    // MARK: Writer

    func testWriterRejectsValuesThatDoNotFitAndKeepsTheOldFile() throws {
        let path = try temporaryPath("keep.npy")
        try NpyWriter.write(tokens: [1, 2], dtype: .uint16, to: path)
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        assertInvalidData(try NpyWriter.write(tokens: [1, 65_536], dtype: .uint16, to: path), mentions: "token 65536 at index 1 does not fit uint16")
        assertInvalidData(try NpyWriter.write(tokens: [-1], dtype: .uint32, to: path), mentions: "does not fit uint32")
        assertInvalidData(try NpyWriter.write(tokens: [Int64(Int32.max) + 1], dtype: .int32, to: path), mentions: "does not fit int32")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), before)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: (path as NSString).deletingLastPathComponent), ["keep.npy"])
    }

    func testWriterIntoMissingDirectoryThrowsClearError() throws {
        let path = try scratchDirectory() + "/missing/tokens.npy"
        assertInvalidFile(try NpyWriter.write(tokens: [1], dtype: .uint16, to: path), mentions: "No such file or directory")
    }

    func testWriterReplacesAnExistingFile() throws {
        let path = try temporaryPath("replace.npy")
        try NpyWriter.write(tokens: [1, 2, 3], dtype: .uint16, to: path)
        try NpyWriter.write(tokens: [9], dtype: .int64, to: path)
        let tokens = try TokenArray(npyPath: path)
        XCTAssertEqual(tokens.dtype, .int64)
        XCTAssertEqual(tokens[0], 9)
    }

    // MARK: Helpers

    private func scratchDirectory() throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("relora-npy-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: path) }
        return path
    }

    private func temporaryPath(_ name: String) throws -> String {
        try scratchDirectory() + "/" + name
    }

    private func writeBytes(_ bytes: [UInt8]) throws -> String {
        let path = try temporaryPath("hostile.npy")
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// A .npy file with the given header text, unpadded, and data. Version 1 has a 2-byte length, 2 and 3
    /// (and the unsupported ones, for the version test) a 4-byte length.
    private func writeNpy(header: String, data: [UInt8], major: UInt8 = 1) throws -> String {
        let headerBytes = Array(header.utf8)
        let length = headerBytes.count
        let lengthField: [UInt8] = major == 1
            ? [UInt8(length & 0xFF), UInt8(length >> 8)]
            : (0 ..< 4).map { UInt8(truncatingIfNeeded: length >> (8 * $0)) }
        return try writeBytes([0x93] + Array("NUMPY".utf8) + [major, 0] + lengthField + headerBytes + data)
    }
}
