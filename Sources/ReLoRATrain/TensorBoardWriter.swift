import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// TensorBoard event files written by relora itself (no TensorFlow, no protobuf library): every run writes
/// `RUN_DIR/events.out.tfevents.<unix-seconds>.<hostname>.relora` beside `metrics.jsonl`, and
/// `tensorboard --logdir runs/` shows the runs side by side.
///
/// Format. A file is a sequence of TFRecords: `uint64 length`, `uint32 masked_crc32c(length bytes)`,
/// `length` bytes of data, `uint32 masked_crc32c(data)`, all little-endian (`CRC32C.masked`). Each record's
/// data is a serialized `tensorflow.Event` with only the fields used here:
///
///     Event      { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
///                  SessionLog session_log = 7; }
///     Summary    { repeated Value value = 1; }
///     Value      { string tag = 1; float simple_value = 2; }
///     SessionLog { SessionStatus status = 1; }   // START = 1
///
/// The first record is `file_version: "brain.Event:2"`. Each metrics.jsonl line becomes one Event (its
/// `step`, the wall time, and one Value per numeric key, `tags` below), written with one `write(2)`, so a
/// crash loses at most the line being written. A resumed run opens a new file whose first event after the
/// version is a `SessionLog START` at the first step it will redo: TensorBoard then drops the earlier
/// file's events from that step on, as the trainer drops those lines of metrics.jsonl.
public final class TensorBoardWriter {
    public let path: String
    let handle: FileHandle

    /// metrics.jsonl key -> TensorBoard tag (the prefix groups the charts). Numeric keys not listed here
    /// are written under their own name; `skip` keys are not scalars of interest.
    public static let tags: [String: String] = [
        "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tokens_per_second": "perf/tokens_per_second", "ms": "perf/step_ms", "memory_bytes": "perf/memory_bytes",
        "mfu": "perf/mfu",
        "val_loss": "val/loss", "val_perplexity": "val/perplexity",
        "relative_update": "restart/relative_update", "merge_error": "restart/merge_error",
        "zeroed_m": "restart/zeroed_m", "zeroed_v": "restart/zeroed_v", "merge_seconds": "restart/merge_seconds",
        "codes_changed": "restart/codes_changed", "residual_recovered": "restart/residual_recovered",
    ]
    public static let skip: Set<String> = ["step", "restart", "skipped", "val_tokens"]

    public static let filePrefix = "events.out.tfevents."
    public static let fileSuffix = ".relora"

    /// Opens a new event file in `runDir` and writes the version record (and, for a resumed run, the
    /// `SessionLog START` at `resumeStep`, the first step the run will write again). The name's seconds are
    /// bumped past any existing file's so that the new file sorts last (TensorBoard reads a directory's
    /// event files in name order).
    public init(runDir: String, resumeStep: Int? = nil, now: Date = Date(),
                hostname: String = ProcessInfo.processInfo.hostName) throws {
        let host = hostname.isEmpty ? "localhost" : hostname.replacingOccurrences(of: "/", with: "_")
        let existing = Self.eventFiles(runDir: runDir).compactMap { Self.seconds(ofFile: $0) }.max() ?? 0
        let seconds = max(Int(now.timeIntervalSince1970), existing + 1)
        path = runDir + "/" + Self.filePrefix + "\(seconds).\(host)" + Self.fileSuffix
        guard FileManager.default.createFile(atPath: path, contents: nil), let h = FileHandle(forWritingAtPath: path) else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot create the TensorBoard event file")
        }
        handle = h
        var version = ProtobufWriter()
        version.double(1, now.timeIntervalSince1970)
        version.int64(2, 0)
        version.string(3, "brain.Event:2")
        var records = Self.record(version.bytes)
        if let step = resumeStep {
            var log = ProtobufWriter()
            log.int64(1, 1)  // status (an enum: a varint) = START
            var start = ProtobufWriter()
            start.double(1, now.timeIntervalSince1970)
            start.int64(2, Int64(step))
            start.message(7, log)
            records += Self.record(start.bytes)
        }
        try write(records)
    }

    deinit { try? handle.close() }

    /// Writes one Event with `scalars` (tag, value) at `step`.
    public func write(step: Int, scalars: [(tag: String, value: Float)], wallTime: Double = Date().timeIntervalSince1970) throws {
        guard !scalars.isEmpty else { return }
        var summary = ProtobufWriter()
        for (tag, value) in scalars {
            var v = ProtobufWriter()
            v.string(1, tag)
            v.float(2, value)
            summary.message(1, v)
        }
        var event = ProtobufWriter()
        event.double(1, wallTime)
        event.int64(2, Int64(step))
        event.message(5, summary)
        try write(Self.record(event.bytes))
    }

    /// Writes a metrics.jsonl line as one Event: its `step`, and a scalar per numeric key (tags by
    /// `tags`; `null`s, strings, booleans and `skip` keys are left out). Lines without a step are ignored.
    public func write(metricsLine line: String, wallTime: Double = Date().timeIntervalSince1970) throws {
        guard let (step, scalars) = Self.scalars(ofMetricsLine: line) else { return }
        try write(step: step, scalars: scalars, wallTime: wallTime)
    }

    /// The step and the (tag, value) pairs a metrics.jsonl line becomes, in key order.
    public static func scalars(ofMetricsLine line: String) -> (step: Int, scalars: [(tag: String, value: Float)])? {
        guard let object = try? JSONDecoder().decode([String: JSONValue].self, from: Data(line.utf8)),
              case .number(let s)? = object["step"] else { return nil }
        let scalars = object.keys.sorted().compactMap { key -> (tag: String, value: Float)? in
            guard !skip.contains(key), case .number(let v)? = object[key] else { return nil }
            return (tags[key] ?? key, Float(v))
        }
        return (Int(s), scalars)
    }

    func write(_ bytes: [UInt8]) throws {
        do { try handle.write(contentsOf: Data(bytes)) } catch {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot write the TensorBoard event file (\(error.localizedDescription))")
        }
    }

    /// TFRecord framing of one record.
    static func record(_ data: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(data.count + 16)
        let length = withUnsafeBytes(of: UInt64(data.count).littleEndian) { Array($0) }
        out += length
        withUnsafeBytes(of: CRC32C.masked(length).littleEndian) { out += $0 }
        out += data
        withUnsafeBytes(of: CRC32C.masked(data).littleEndian) { out += $0 }
        return out
    }

    /// relora's event files in `runDir`, in name order (the order TensorBoard reads them).
    public static func eventFiles(runDir: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? []
        return names.filter { $0.hasPrefix(filePrefix) && $0.hasSuffix(fileSuffix) }.sorted().map { runDir + "/" + $0 }
    }

    /// Removes relora's event files from `runDir` (a fresh run in a directory without checkpoints).
    public static func removeEventFiles(runDir: String) {
        for file in eventFiles(runDir: runDir) { try? FileManager.default.removeItem(atPath: file) }
    }

    static func seconds(ofFile path: String) -> Int? {
        let name = URL(fileURLWithPath: path).lastPathComponent.dropFirst(filePrefix.count)
        return name.split(separator: ".").first.flatMap { Int($0) }
    }
}

/// Reads an event file back, checking the framing and both CRCs of every record (tests; a debugging aid).
public enum TensorBoardEventFile {
    public struct Event: Sendable {
        public var wallTime: Double
        public var step: Int
        public var fileVersion: String?
        /// `SessionLog.status` (1 = START) if the event holds a session log.
        public var sessionStatus: Int?
        public var scalars: [(tag: String, value: Float)]
    }

    public static func read(_ path: String) throws -> [Event] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot read the event file")
        }
        let bytes = [UInt8](data)
        var events: [Event] = []
        var i = 0
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * UInt32($1)) } }
        while i < bytes.count {
            guard i + 12 <= bytes.count else { throw ReLoRAError.invalidFile(path: path, reason: "truncated record header at byte \(i)") }
            let lengthBytes = Array(bytes[i..<(i + 8)])
            let length = Int((0..<8).reduce(UInt64(0)) { $0 | UInt64(lengthBytes[$1]) << (8 * UInt64($1)) })
            guard u32(i + 8) == CRC32C.masked(lengthBytes) else {
                throw ReLoRAError.invalidFile(path: path, reason: "bad length CRC at byte \(i)")
            }
            guard length >= 0, i + 12 + length + 4 <= bytes.count else {
                throw ReLoRAError.invalidFile(path: path, reason: "truncated record at byte \(i)")
            }
            let payload = Array(bytes[(i + 12)..<(i + 12 + length)])
            guard u32(i + 12 + length) == CRC32C.masked(payload) else {
                throw ReLoRAError.invalidFile(path: path, reason: "bad data CRC at byte \(i)")
            }
            events.append(try decodeEvent(payload))
            i += 12 + length + 4
        }
        return events
    }

    static func decodeEvent(_ bytes: [UInt8]) throws -> Event {
        var event = Event(wallTime: 0, step: 0, fileVersion: nil, sessionStatus: nil, scalars: [])
        for (field, value) in try ProtobufReader.fields(bytes) {
            switch field {
            case 1: event.wallTime = value.double ?? 0
            case 2: event.step = Int(value.int64 ?? 0)
            case 3: event.fileVersion = value.string
            case 5:
                for (f, v) in try ProtobufReader.fields(value.data ?? []) where f == 1 {
                    var tag = "", simple: Float?
                    for (vf, vv) in try ProtobufReader.fields(v.data ?? []) {
                        if vf == 1 { tag = vv.string ?? "" } else if vf == 2 { simple = vv.float }
                    }
                    if let simple { event.scalars.append((tag, simple)) }
                }
            case 7:
                for (f, v) in try ProtobufReader.fields(value.data ?? []) where f == 1 { event.sessionStatus = Int(v.int64 ?? 0) }
            default: break
            }
        }
        return event
    }
}
