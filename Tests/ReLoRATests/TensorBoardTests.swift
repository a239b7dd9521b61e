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

/// The TensorBoard event files: CRC32C and protobuf pieces against known encodings, and a training run's
/// events read back (framing, both CRCs of every record, the fields) and compared with its metrics.jsonl.
/// `Tests/Fixtures/check_tensorboard.py` reads the same files with TensorBoard's own reader.
final class TensorBoardTests: XCTestCase {
    func testCRC32CKnownVectors() {
        // The standard check value, and the iSCSI vectors of RFC 3720, B.4.
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(CRC32C.checksum([UInt8]()), 0)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        XCTAssertEqual(CRC32C.checksum((0..<32).map { UInt8($0) }), 0x46DD_794E)
        XCTAssertEqual(CRC32C.checksum((0..<32).map { UInt8(31 - $0) }), 0x113F_DB5C)
        // The TFRecord mask: rotate right by 15, add 0xa282ead8 (wrapping).
        let c: UInt32 = 0xE306_9283
        XCTAssertEqual(CRC32C.masked(Array("123456789".utf8)), ((c >> 15) | (c << 17)) &+ 0xA282_EAD8)
    }

    func testProtobufEncodings() throws {
        var w = ProtobufWriter()
        w.varint(300)
        XCTAssertEqual(w.bytes, [0xAC, 0x02])
        w = ProtobufWriter()
        w.int64(2, -1)  // key 0x10, then 10 bytes: negative int64 is sign-extended
        XCTAssertEqual(w.bytes, [0x10] + [UInt8](repeating: 0xFF, count: 9) + [0x01])
        w = ProtobufWriter()
        w.string(1, "testing")  // the protobuf guide's example: 12 07 74 65 73 74 69 6e 67 (with field 2)
        XCTAssertEqual(w.bytes, [0x0A, 0x07, 0x74, 0x65, 0x73, 0x74, 0x69, 0x6E, 0x67])
        w = ProtobufWriter()
        w.float(2, 1.5)  // key 0x15, 1.5f = 0x3fc00000 little-endian
        XCTAssertEqual(w.bytes, [0x15, 0x00, 0x00, 0xC0, 0x3F])
        w = ProtobufWriter()
        w.double(1, 0.5)  // key 0x09, 0.5 = 0x3fe0000000000000
        XCTAssertEqual(w.bytes, [0x09, 0, 0, 0, 0, 0, 0, 0xE0, 0x3F])

        var event = ProtobufWriter()
        event.double(1, 1234.25); event.int64(2, 1 << 40); event.string(3, "brain.Event:2")
        let fields = try ProtobufReader.fields(event.bytes)
        XCTAssertEqual(fields.map(\.field), [1, 2, 3])
        XCTAssertEqual(fields[0].value.double, 1234.25)
        XCTAssertEqual(fields[1].value.int64, 1 << 40)
        XCTAssertEqual(fields[2].value.string, "brain.Event:2")
    }

    /// One record by hand: the framing's byte layout.
    func testRecordFraming() throws {
        let data: [UInt8] = [1, 2, 3]
        let r = TensorBoardWriter.record(data)
        XCTAssertEqual(r.count, 8 + 4 + 3 + 4)
        XCTAssertEqual(Array(r[0..<8]), [3, 0, 0, 0, 0, 0, 0, 0])
        let lengthCRC = CRC32C.masked([3, 0, 0, 0, 0, 0, 0, 0]), dataCRC = CRC32C.masked(data)
        XCTAssertEqual(Array(r[8..<12]), (0..<4).map { UInt8(truncatingIfNeeded: lengthCRC >> (8 * $0)) })
        XCTAssertEqual(Array(r[12..<15]), data)
        XCTAssertEqual(Array(r[15..<19]), (0..<4).map { UInt8(truncatingIfNeeded: dataCRC >> (8 * $0)) })
    }

    /// A ReLoRA run with restarts and evaluations: every metrics.jsonl line is one event with the same step
    /// and values (as float32), under the documented tags, after the version record.
    func testTrainingEventsMatchMetrics() throws {
        let data = try TrainerTests.makeByteData()
        let r = TrainerTests.recipe(data, run: "tb") {
            $0.mode = .relora; $0.loraRank = 4; $0.loraAlpha = 8; $0.reloraEvery = 4; $0.restartWarmup = 1
            $0.steps = 8; $0.warmupSteps = 2; $0.evalEvery = 4
        }
        _ = try Trainer(recipe: r, resume: false, log: { _ in }).run()
        let files = TensorBoardWriter.eventFiles(runDir: r.runDir)
        XCTAssertEqual(files.count, 1)
        let name = URL(fileURLWithPath: files[0]).lastPathComponent
        XCTAssertTrue(name.hasPrefix("events.out.tfevents.") && name.hasSuffix(".relora"), name)
        let events = try TensorBoardEventFile.read(files[0])
        XCTAssertEqual(events.first?.fileVersion, "brain.Event:2")
        try assertEvents(Array(events.dropFirst()), equalMetricsOf: r.runDir)
        // The documented tags are there: losses, lr, grad norm, speed, memory, MFU, validation, merges.
        let tags = Set(events.flatMap { $0.scalars.map(\.tag) })
        for tag in ["train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_second", "perf/memory_bytes", "perf/mfu",
                    "val/loss", "val/perplexity", "restart/relative_update", "restart/merge_error", "restart/zeroed_m",
                    "restart/zeroed_v", "restart/merge_seconds"] {
            XCTAssertTrue(tags.contains(tag), "missing \(tag) in \(tags.sorted())")
        }
    }

    /// A resumed run opens a second file whose first event after the version is SessionLog START at the
    /// first redone step; the first file's events before it plus the second file's equal metrics.jsonl.
    func testResumeStartsANewEventFile() throws {
        let data = try TrainerTests.makeByteData()
        let r = TrainerTests.recipe(data, run: "tb-resume") { $0.steps = 8; $0.checkpointEvery = 2 }
        let first = try Trainer(recipe: r, resume: false, log: { _ in })
        first.shouldStop = { first.state.step >= 5 }  // steps 5 runs, checkpoint at 5 (stop), metrics to 5
        _ = try first.run()
        // Pretend the process died after writing step 6's events but before a checkpoint: the resumed run
        // redoes step 6, and TensorBoard must show the new step 6 only.
        try first.appendMetricsForTest("{\"step\":6,\"loss\":99,\"lr\":0}")
        let second = try Trainer(recipe: r, resume: true, log: { _ in })
        _ = try second.run()

        let files = TensorBoardWriter.eventFiles(runDir: r.runDir)
        XCTAssertEqual(files.count, 2, "\(files)")
        let old = try TensorBoardEventFile.read(files[0]), new = try TensorBoardEventFile.read(files[1])
        XCTAssertEqual(new.first?.fileVersion, "brain.Event:2")
        XCTAssertEqual(new.dropFirst().first?.sessionStatus, 1)
        let start = try XCTUnwrap(new.dropFirst().first?.step)
        XCTAssertEqual(start, 6)
        // TensorBoard's purge on START keeps the earlier events with step < START's step.
        let merged = old.dropFirst().filter { $0.step < start } + new.dropFirst(2)
        try assertEvents(Array(merged), equalMetricsOf: r.runDir)
    }

    func assertEvents(_ events: [TensorBoardEventFile.Event], equalMetricsOf runDir: String,
                      file: StaticString = #filePath, line: UInt = #line) throws {
        let lines = try String(contentsOfFile: runDir + "/metrics.jsonl", encoding: .utf8).split(separator: "\n").map(String.init)
        XCTAssertEqual(events.count, lines.count, "one event per metrics line", file: file, line: line)
        for (event, text) in zip(events, lines) {
            let object = try JSONDecoder().decode([String: JSONValue].self, from: Data(text.utf8))
            guard case .number(let step)? = object["step"] else { return XCTFail("no step in \(text)", file: file, line: line) }
            XCTAssertEqual(event.step, Int(step), text, file: file, line: line)
            XCTAssertGreaterThan(event.wallTime, 1.5e9, file: file, line: line)
            var expected: [String: Float] = [:]
            for (key, value) in object where !TensorBoardWriter.skip.contains(key) {
                if case .number(let v) = value { expected[TensorBoardWriter.tags[key] ?? key] = Float(v) }
            }
            let got = Dictionary(event.scalars.map { ($0.tag, $0.value) }, uniquingKeysWith: { a, _ in a })
            XCTAssertEqual(got, expected, text, file: file, line: line)
        }
    }
}

extension Trainer {
    func appendMetricsForTest(_ line: String) throws { try metrics!.append(line: line) }
}
