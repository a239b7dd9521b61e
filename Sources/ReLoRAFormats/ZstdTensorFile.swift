import Foundation
import ReLoRACore

// MARK: - Format
//
// A zstd tensor file (`*.tensors.zst`, relora's compressed checkpoint container, version 1): the tensors
// of a safetensors file, each compressed as its own zstd frame, with a safetensors-style JSON index at
// the end. Every part is a zstd frame (RFC 8878), so `zstd -t FILE` verifies the whole file with the
// stock tool; `zstd -d` would only concatenate the (possibly shuffled) tensor bytes, so read it with
// relora. All integers little-endian.
//
//   [0, 16)        head: a zstd skippable frame: u32 0x184D2A5B, u32 8, then the 8 ASCII bytes "RLZTENS1"
//   [16, X)        one zstd frame per tensor, back to back in the writer's order. The frame's content is
//                  the tensor's bytes exactly as safetensors stores them (little-endian, row-major), after
//                  the byte shuffle named by the index (`ByteShuffle`: width w > 1 groups byte k of every
//                  w-byte element into plane k; w = 1 is no shuffle). Each frame records its content size
//                  in its header and ends with zstd's content checksum (low 32 bits of XXH64).
//   [X, EOF)       index: a zstd skippable frame: u32 0x184D2A5B, u32 J + 24, then
//                    J bytes    the index, UTF-8 JSON (below)
//                    u64        J
//                    u64        contentHash64 of the J index bytes (`ContentHash.swift`)
//                    8 bytes    ASCII "RLZTIDX1"
//                  so a reader finds the index from the last 24 bytes of the file.
//
// The index is a JSON object like a safetensors header: "__metadata__" (optional) maps strings to
// strings; every other key names a tensor:
//   "name": {"dtype": "F32", "shape": [2, 3], "frame": [begin, end], "shuffle": 4, "checksum": "0f1e..."}
// `dtype` and `shape` as in safetensors (the tensor has shape.product * dtype size bytes); `frame` is
// the absolute byte range of its zstd frame in the file; `shuffle` the width w above; `checksum` the
// 16 hex digits of `contentHash64` of the tensor's bytes (unshuffled), checked after decompression.
//
// Random access: a reader maps the file, reads the index, and decompresses only the frames it is asked
// for, each straight into a buffer of the tensor's size (the shuffle is undone chunk by chunk on the
// way), so loading never holds more than one tensor beyond its destination. A writer holds one tensor's
// bytes at a time and streams its compressed frame to disk in 128 KiB pieces.

/// What a tensor file says about one tensor: its element type and shape.
public struct TensorHeader: Sendable, Equatable {
    public let dtype: SafetensorsDType
    public let shape: [Int]

    public var elementCount: Int { shape.reduce(1, *) }
    public var byteCount: Int { elementCount * dtype.byteSize }

    public init(dtype: SafetensorsDType, shape: [Int]) {
        self.dtype = dtype
        self.shape = shape
    }
}

/// A file of named tensors read one at a time: a safetensors file or a zstd tensor file.
public protocol TensorFile: AnyObject, Sendable {
    var path: String { get }
    var metadata: [String: String] { get }
    /// Sorted.
    var tensorNames: [String] { get }
    func header(_ name: String) -> TensorHeader?
    /// The tensor's raw little-endian bytes, valid only inside `body` (not necessarily aligned).
    func withRawBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R
    /// The values of a floating-point tensor as Float (see `SafetensorsFile.floats`).
    func floats(_ name: String) throws -> [Float]
}

extension SafetensorsFile: TensorFile {
    public func header(_ name: String) -> TensorHeader? {
        info(name).map { TensorHeader(dtype: $0.dtype, shape: $0.shape) }
    }
}

enum ZstdTensorFormat {
    /// Skippable-frame magic of the head and the index (one of zstd's 16 skippable magics; 0x184D2A5E is
    /// zstd's seekable format, avoided so its tools do not take our index for a seek table).
    static let skippableMagic: UInt32 = 0x184D_2A5B
    static let headTag = Array("RLZTENS1".utf8)
    static let indexTag = Array("RLZTIDX1".utf8)
    static let headSize = 16
    static let footerSize = 24
    /// Widest shuffle a reader accepts (wider than any element or quantized block: q8_0 34, nf4 36 bytes).
    static let maximumShuffle = 256
}

// MARK: - Writer

public enum ZstdTensorWriter {
    /// Writes `entries` as a zstd tensor file at zstd `level`, each byte-shuffled at `shuffleWidth(entry)`
    /// (1: none). Atomic like `SafetensorsWriter.write`, with the same validation of the entries. Returns
    /// the file's size in bytes.
    @discardableResult
    public static func write(_ entries: [SafetensorsEntry], metadata: [String: String] = [:], level: Int,
                             shuffleWidth: (SafetensorsEntry) -> Int = { $0.dtype.byteSize },
                             to path: String) throws -> Int {
        try SafetensorsWriter.validate(entries, path: path)
        let compressor = try Zstd.Compressor(level: level)
        var size = 0
        try AtomicFileWriter.write(to: path) { sink in
            var offset = 0
            func emit(_ bytes: UnsafeRawBufferPointer) throws {
                try sink.write(bytes)
                offset += bytes.count
            }
            func emit(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try emit($0) } }
            func u32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
            func u64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

            try emit(u32(ZstdTensorFormat.skippableMagic) + u32(UInt32(ZstdTensorFormat.headTag.count)) + ZstdTensorFormat.headTag)
            var fields: [String] = []
            if !metadata.isEmpty {
                let pairs = metadata.sorted { $0.key < $1.key }.map {
                    "\(SafetensorsWriter.jsonString($0.key)):\(SafetensorsWriter.jsonString($0.value))"
                }
                fields.append("\"__metadata__\":{\(pairs.joined(separator: ","))}")
            }
            for entry in entries {
                let bytes = entry.bytes
                guard bytes.count == entry.declaredByteCount else {
                    throw ReLoRAError.invalidData("cannot write \(path): tensor '\(entry.name)' produced \(bytes.count) bytes, expected \(entry.declaredByteCount)")
                }
                let width = max(1, min(shuffleWidth(entry), ZstdTensorFormat.maximumShuffle))
                let begin = offset
                let checksum = try bytes.withUnsafeBytes { raw -> UInt64 in
                    try compressor.compressFrame(raw, shuffleWidth: width, path: path) { try emit($0) }
                    return contentHash64(raw)
                }
                let shape = entry.shape.map(String.init).joined(separator: ",")
                fields.append("\(SafetensorsWriter.jsonString(entry.name)):{\"dtype\":\"\(entry.dtype.rawValue)\",\"shape\":[\(shape)],\"frame\":[\(begin),\(offset)],\"shuffle\":\(width),\"checksum\":\"\(hex16(checksum))\"}")
            }
            let index = Array(("{" + fields.joined(separator: ",") + "}").utf8)
            guard index.count + ZstdTensorFormat.footerSize <= Int(UInt32.max) else {
                throw ReLoRAError.invalidData("cannot write \(path): its index of \(index.count) bytes exceeds a zstd skippable frame")
            }
            try emit(u32(ZstdTensorFormat.skippableMagic) + u32(UInt32(index.count + ZstdTensorFormat.footerSize)))
            try emit(index)
            try emit(u64(UInt64(index.count)) + u64(contentHash64Of(index)) + ZstdTensorFormat.indexTag)
            size = offset
        }
        return size
    }

    static func hex16(_ value: UInt64) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }
}

private func contentHash64Of(_ bytes: [UInt8]) -> UInt64 { bytes.withUnsafeBytes { contentHash64($0) } }

// MARK: - Reader

/// A zstd tensor file, memory-mapped read-only with its index validated in `init`: every frame lies
/// between the head and the index without overlap, and every entry has a known dtype, a shape whose byte
/// count fits, a shuffle width and a checksum. A read decompresses the tensor's frame and checks its
/// size, zstd's frame checksum and the index's checksum; any failure is one `.invalidFile` sentence naming
/// the file and the tensor.
public final class ZstdTensorFile: TensorFile {
    struct Entry {
        let header: TensorHeader
        let frame: Range<Int>
        let shuffle: Int
        let checksum: UInt64
    }

    public let path: String
    public let metadata: [String: String]
    public let tensorNames: [String]
    private let mapping: MemoryMappedFile
    private let entries: [String: Entry]

    public init(path: String) throws {
        self.path = path
        mapping = try MemoryMappedFile(path: path)
        let bytes = mapping.bytes
        func invalid(_ reason: String) -> ReLoRAError { .invalidFile(path: path, reason: reason) }
        func u32(_ at: Int) -> UInt32 { UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
        func u64(_ at: Int) -> UInt64 { UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
        func tag(_ at: Int) -> [UInt8] { Array(bytes[at ..< at + 8]) }

        let minimum = ZstdTensorFormat.headSize + 8 + ZstdTensorFormat.footerSize
        guard bytes.count >= ZstdTensorFormat.headSize else {
            throw invalid("the file is \(bytes.count) bytes long, shorter than the 16-byte head of a zstd tensor file; it is truncated or not such a file")
        }
        guard u32(0) == ZstdTensorFormat.skippableMagic,
              u32(4) == 8, tag(8) == ZstdTensorFormat.headTag else {
            throw invalid("does not start with the head of a relora zstd tensor file (a skippable frame holding 'RLZTENS1'); it is not such a file, or its start is damaged")
        }
        guard bytes.count >= minimum, tag(bytes.count - 8) == ZstdTensorFormat.indexTag else {
            throw invalid("does not end with the index of a zstd tensor file (tag 'RLZTIDX1' in its last 8 bytes); the file is truncated or damaged")
        }
        let indexLength = u64(bytes.count - 24)
        guard indexLength <= UInt64(bytes.count - minimum) else {
            throw invalid("its footer gives an index of \(indexLength) bytes, more than the file holds; the file is truncated or damaged")
        }
        let indexStart = bytes.count - ZstdTensorFormat.footerSize - Int(indexLength)
        let frameStart = indexStart - 8
        guard u32(frameStart) == ZstdTensorFormat.skippableMagic, u32(frameStart + 4) == UInt32(Int(indexLength) + ZstdTensorFormat.footerSize) else {
            throw invalid("the index's skippable frame header is missing where the footer puts it; the file is truncated or damaged")
        }
        let indexBytes = UnsafeRawBufferPointer(rebasing: bytes[indexStart ..< indexStart + Int(indexLength)])
        guard contentHash64(indexBytes) == u64(bytes.count - 16) else {
            throw invalid("its index is corrupt (checksum mismatch); the file is damaged")
        }
        let index = try SafetensorsFile.parseHeader(indexBytes, invalid: { invalid("its index is not valid: " + $0) })
        metadata = try SafetensorsFile.parseMetadata(index["__metadata__"], invalid: { invalid("its index is not valid: " + $0) })

        var entries: [String: Entry] = [:]
        for (name, value) in index where name != "__metadata__" {
            entries[name] = try Self.parseEntry(name, value, framesEnd: frameStart, invalid: invalid)
        }
        let ordered = entries.sorted { $0.value.frame.lowerBound < $1.value.frame.lowerBound }
        for (previous, next) in zip(ordered, ordered.dropFirst()) where previous.value.frame.upperBound > next.value.frame.lowerBound {
            throw invalid("its index gives tensors '\(previous.key)' and '\(next.key)' overlapping frames; the file is damaged")
        }
        self.entries = entries
        tensorNames = entries.keys.sorted()
    }

    private static func parseEntry(_ name: String, _ value: Any, framesEnd: Int,
                                   invalid: (String) -> ReLoRAError) throws -> Entry {
        func bad(_ what: String) -> ReLoRAError { invalid("its index entry for tensor '\(name)' \(what); the file is damaged") }
        guard let entry = value as? [String: Any] else { throw bad("is not an object") }
        guard let dtypeName = entry["dtype"] as? String, let dtype = SafetensorsDType(rawValue: dtypeName) else {
            throw bad("has no known dtype")
        }
        guard let dimensions = entry["shape"] as? [Any] else { throw bad("has no shape") }
        var shape: [Int] = []
        var byteCount = dtype.byteSize
        for dimension in dimensions {
            guard let size = SafetensorsFile.exactInteger(dimension), size >= 0 else { throw bad("has a shape that is not non-negative integers") }
            let (product, overflow) = byteCount.multipliedReportingOverflow(by: size)
            guard !overflow else { throw bad("has a shape whose size overflows") }
            shape.append(size)
            byteCount = product
        }
        guard let range = entry["frame"] as? [Any], range.count == 2,
              let begin = SafetensorsFile.exactInteger(range[0]), let end = SafetensorsFile.exactInteger(range[1]),
              ZstdTensorFormat.headSize <= begin, begin < end, end <= framesEnd else {
            throw bad("has a frame range that is not inside the file's frames [\(ZstdTensorFormat.headSize), \(framesEnd))")
        }
        guard let shuffle = entry["shuffle"].flatMap(SafetensorsFile.exactInteger),
              (1 ... ZstdTensorFormat.maximumShuffle).contains(shuffle) else {
            throw bad("has no shuffle width in 1...\(ZstdTensorFormat.maximumShuffle)")
        }
        guard let text = entry["checksum"] as? String, text.count == 16, let checksum = UInt64(text, radix: 16) else {
            throw bad("has no 16-hex-digit checksum")
        }
        return Entry(header: TensorHeader(dtype: dtype, shape: shape), frame: begin ..< end, shuffle: shuffle, checksum: checksum)
    }

    public func header(_ name: String) -> TensorHeader? { entries[name]?.header }

    /// Compressed size of a tensor's frame, for reports.
    public func compressedByteCount(_ name: String) -> Int? { entries[name]?.frame.count }

    /// Decompresses the tensor into a fresh buffer of its size, checks it, and passes it to `body`.
    public func withRawBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard let entry = entries[name] else {
            throw ReLoRAError.invalidFile(path: path, reason: "has no tensor named '\(name)'; it has \(entries.count) tensors")
        }
        let count = entry.header.byteCount
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(count, 1), alignment: 64)
        defer { buffer.deallocate() }
        let destination = UnsafeMutableRawBufferPointer(rebasing: buffer[0 ..< count])
        let corrupt = { (reason: String) in
            ReLoRAError.invalidFile(path: self.path, reason: "tensor '\(name)' is corrupt: \(reason); the file is damaged")
        }
        // A context per read: ~100 KiB, nothing next to a tensor, and the file stays safe to share across threads.
        try Zstd.Decompressor().decompressFrame(UnsafeRawBufferPointer(rebasing: mapping.bytes[entry.frame]),
                                                  shuffleWidth: entry.shuffle, into: destination, corrupt: corrupt)
        guard contentHash64(UnsafeRawBufferPointer(destination)) == entry.checksum else {
            throw corrupt("its bytes do not match the index's checksum")
        }
        return try body(UnsafeRawBufferPointer(destination))
    }

    public func floats(_ name: String) throws -> [Float] {
        guard let header = header(name) else {
            throw ReLoRAError.invalidFile(path: path, reason: "has no tensor named '\(name)'")
        }
        guard header.dtype.isFloatingPoint else {
            throw ReLoRAError.invalidData("tensor '\(name)' in \(path) has dtype \(header.dtype.rawValue); floats(_:) reads only F64, F32, F16 and BF16")
        }
        return try withRawBytes(name) { SafetensorsFile.decodeFloats($0, dtype: header.dtype) }
    }
}
