import CZstd
import ReLoRACore

/// libzstd, checked: every return code goes through `ZSTD_isError`, and a failure becomes a
/// `ReLoRAError` sentence that names what was being read or written and gives zstd's own reason.
///
/// Frames are written with their content size in the frame header and zstd's content checksum (the low
/// 32 bits of XXH64) at the end, so `zstd -t FILE` checks a file without relora and a decoder refuses a
/// frame whose bytes changed. Both directions stream through 128 KiB chunks, with an optional byte
/// shuffle applied chunk by chunk: a tensor is never held twice (shuffled and plain, or compressed and
/// plain) in memory.
public enum Zstd {
    /// The levels zstd accepts (negative levels are its "fast" modes).
    public static var levels: ClosedRange<Int> { Int(ZSTD_minCLevel()) ... Int(ZSTD_maxCLevel()) }

    /// libzstd's version, e.g. "1.5.4".
    public static var version: String { String(cString: ZSTD_versionString()) }

    static func reason(_ code: Int) -> String { String(cString: ZSTD_getErrorName(code)) }

    /// Bytes of the staging chunk each direction uses for a shuffled tensor (and of the compressed output
    /// pieces handed to the sink): zstd's recommended stream buffer size.
    static let chunkSize = ZSTD_CStreamOutSize()

    /// A compression context, reused across the frames of a file (not thread-safe).
    public final class Compressor {
        private let context: OpaquePointer
        public let level: Int

        public init(level: Int) throws {
            guard Zstd.levels.contains(level) else {
                throw ReLoRAError.invalidConfig("zstd level \(level) is outside \(Zstd.levels.lowerBound)...\(Zstd.levels.upperBound)")
            }
            guard let context = ZSTD_createCCtx() else {
                throw ReLoRAError.invalidData("zstd could not allocate a compression context (out of memory)")
            }
            self.context = context
            self.level = level
        }

        deinit { ZSTD_freeCCtx(context) }

        /// Compresses `source`, byte-shuffled at `shuffleWidth` (1: as it is; see `ByteShuffle`), into one
        /// frame, handing the compressed bytes to `sink` in pieces of at most 128 KiB. Returns the frame's
        /// size in bytes. `path` names the destination in errors.
        @discardableResult
        public func compressFrame(_ source: UnsafeRawBufferPointer, shuffleWidth: Int = 1, path: String,
                                  sink: (UnsafeRawBufferPointer) throws -> Void) throws -> Int {
            precondition(shuffleWidth >= 1)
            func check(_ code: Int, _ action: String) throws {
                if ZSTD_isError(code) != 0 {
                    throw ReLoRAError.invalidFile(path: path, reason: "zstd failed to \(action) (\(Zstd.reason(code)))")
                }
            }
            try check(ZSTD_CCtx_reset(context, ZSTD_reset_session_and_parameters), "reset its context")
            try check(ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, Int32(level)), "set level \(level)")
            try check(ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 1), "enable frame checksums")
            try check(ZSTD_CCtx_setParameter(context, ZSTD_c_contentSizeFlag, 1), "record the content size")
            try check(ZSTD_CCtx_setPledgedSrcSize(context, UInt64(source.count)), "record the content size")

            let output = UnsafeMutableRawBufferPointer.allocate(byteCount: Zstd.chunkSize, alignment: 16)
            defer { output.deallocate() }
            var written = 0
            /// Feeds `input` to the stream; with `last`, until the frame is complete.
            func feed(_ input: UnsafeRawBufferPointer, last: Bool) throws {
                var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
                while true {
                    var outBuffer = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
                    let remaining = ZSTD_compressStream2(context, &outBuffer, &inBuffer, last ? ZSTD_e_end : ZSTD_e_continue)
                    try check(remaining, "compress")
                    if outBuffer.pos > 0 {
                        try sink(UnsafeRawBufferPointer(rebasing: output[0 ..< outBuffer.pos]))
                        written += outBuffer.pos
                    }
                    // `continue` is done when the input is consumed; `end` when nothing is left to flush.
                    if last ? remaining == 0 : inBuffer.pos == inBuffer.size { return }
                }
            }
            if shuffleWidth == 1 {
                try feed(source, last: true)
            } else {
                let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: Zstd.chunkSize, alignment: 16)
                defer { chunk.deallocate() }
                var start = 0
                repeat {
                    let end = min(start + chunk.count, source.count)
                    let piece = UnsafeMutableRawBufferPointer(rebasing: chunk[0 ..< end - start])
                    ByteShuffle.gather(source, width: shuffleWidth, shuffledRange: start ..< end, into: piece)
                    try feed(UnsafeRawBufferPointer(piece), last: end == source.count)
                    start = end
                } while start < source.count
            }
            return written
        }
    }

    /// A decompression context, reused across frames (not thread-safe).
    public final class Decompressor {
        private let context: OpaquePointer

        public init() throws {
            guard let context = ZSTD_createDCtx() else {
                throw ReLoRAError.invalidData("zstd could not allocate a decompression context (out of memory)")
            }
            self.context = context
        }

        deinit { ZSTD_freeDCtx(context) }

        /// Decompresses `frame`, which must be exactly one zstd frame holding exactly `destination.count`
        /// bytes (byte-shuffled at `shuffleWidth`, undone here), into `destination`; zstd verifies the
        /// frame's checksum. Anything else throws `corrupt(reason)`, with a reason such as "zstd cannot
        /// decompress it (Restored data doesn't match checksum)"; the caller names the file and tensor.
        public func decompressFrame(_ frame: UnsafeRawBufferPointer, shuffleWidth: Int = 1,
                                    into destination: UnsafeMutableRawBufferPointer,
                                    corrupt: (String) -> ReLoRAError) throws {
            precondition(shuffleWidth >= 1)
            guard let base = frame.baseAddress, !frame.isEmpty else { throw corrupt("its zstd frame is empty") }
            let frameSize = ZSTD_findFrameCompressedSize(base, frame.count)
            guard ZSTD_isError(frameSize) == 0 else {
                throw corrupt("its bytes are not one complete zstd frame (\(Zstd.reason(frameSize)))")
            }
            guard frameSize == frame.count else {
                throw corrupt("its zstd frame is \(frameSize) bytes, but the index gives it \(frame.count)")
            }
            let contentSize = ZSTD_getFrameContentSize(base, frame.count)
            guard contentSize == UInt64(destination.count) else {
                let declared = contentSize == ZSTD_CONTENTSIZE_UNKNOWN ? "no size"
                    : contentSize == ZSTD_CONTENTSIZE_ERROR ? "an unreadable size" : "\(contentSize) bytes"
                throw corrupt("its zstd frame declares \(declared), the tensor needs \(destination.count)")
            }
            let reset = ZSTD_DCtx_reset(context, ZSTD_reset_session_only)
            guard ZSTD_isError(reset) == 0 else { throw corrupt("zstd could not reset its context (\(Zstd.reason(reset)))") }

            if shuffleWidth == 1 {
                let produced = ZSTD_decompressDCtx(context, destination.baseAddress, destination.count, base, frame.count)
                guard ZSTD_isError(produced) == 0 else { throw corrupt("zstd cannot decompress it (\(Zstd.reason(produced)))") }
                guard produced == destination.count else {
                    throw corrupt("it decompressed to \(produced) bytes, the tensor needs \(destination.count)")
                }
                return
            }
            // Shuffled: stream through a chunk and scatter each piece to its place in `destination`.
            let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: Zstd.chunkSize, alignment: 16)
            defer { chunk.deallocate() }
            var inBuffer = ZSTD_inBuffer(src: base, size: frame.count, pos: 0)
            var produced = 0
            while true {
                var outBuffer = ZSTD_outBuffer(dst: chunk.baseAddress, size: chunk.count, pos: 0)
                let hint = ZSTD_decompressStream(context, &outBuffer, &inBuffer)
                guard ZSTD_isError(hint) == 0 else { throw corrupt("zstd cannot decompress it (\(Zstd.reason(hint)))") }
                guard produced + outBuffer.pos <= destination.count else {
                    throw corrupt("it decompresses to more than the tensor's \(destination.count) bytes")
                }
                ByteShuffle.scatter(UnsafeRawBufferPointer(rebasing: chunk[0 ..< outBuffer.pos]), width: shuffleWidth,
                                    shuffledOffset: produced, into: destination)
                produced += outBuffer.pos
                if hint == 0 { break }  // the frame is complete, its checksum verified
                if inBuffer.pos == inBuffer.size && outBuffer.pos < outBuffer.size {
                    throw corrupt("its zstd frame ends early (\(produced) of \(destination.count) bytes decoded)")
                }
            }
            guard produced == destination.count, inBuffer.pos == frame.count else {
                throw corrupt("it decompressed to \(produced) bytes from \(inBuffer.pos) of \(frame.count), the tensor needs \(destination.count)")
            }
        }
    }
}

/// Byte shuffling (the shuffle filter of HDF5 and Blosc): `n` elements of `width` bytes become `width`
/// planes of `n` bytes, plane k holding byte k (in little-endian significance) of every element, in
/// element order; the last `count % width` bytes follow unchanged. For fp32 weights and Adam moments the
/// sign/exponent bytes then sit together and compress much better than interleaved with near-random
/// mantissa bytes (measured in README "Checkpoints").
///
/// Position p of the shuffled stream, for p < n * width, holds byte `p / n` of element `p % n`, i.e.
/// source byte `(p % n) * width + p / n`. Both directions work on a range of the shuffled stream, so a
/// tensor is shuffled chunk by chunk as it streams through zstd.
public enum ByteShuffle {
    /// Writes positions `shuffledRange` of the shuffled form of `source` into `chunk` (`chunk.count` ==
    /// `shuffledRange.count`).
    public static func gather(_ source: UnsafeRawBufferPointer, width: Int, shuffledRange: Range<Int>,
                              into chunk: UnsafeMutableRawBufferPointer) {
        precondition(chunk.count == shuffledRange.count && shuffledRange.upperBound <= source.count && width >= 1)
        guard !shuffledRange.isEmpty, let s = source.baseAddress?.assumingMemoryBound(to: UInt8.self),
              let d = chunk.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return }
        let n = source.count / width
        var p = shuffledRange.lowerBound
        var out = 0
        while p < shuffledRange.upperBound {
            if p >= n * width {  // the unshuffled tail
                d[out] = s[p]; p += 1; out += 1
                continue
            }
            // A run inside plane k: elements i ..< i + run.
            let k = p / n, i = p % n
            let run = min(n - i, shuffledRange.upperBound - p)
            var from = s + i * width + k
            for j in 0 ..< run { d[out + j] = from.pointee; from += width }
            p += run; out += run
        }
    }

    /// Places `chunk`, positions `shuffledOffset ..< shuffledOffset + chunk.count` of a shuffled stream,
    /// into their unshuffled places in `destination` (the inverse of `gather`).
    public static func scatter(_ chunk: UnsafeRawBufferPointer, width: Int, shuffledOffset: Int,
                               into destination: UnsafeMutableRawBufferPointer) {
        precondition(shuffledOffset + chunk.count <= destination.count && width >= 1)
        guard !chunk.isEmpty, let s = chunk.baseAddress?.assumingMemoryBound(to: UInt8.self),
              let d = destination.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return }
        let n = destination.count / width
        var p = shuffledOffset
        var from = 0
        let end = shuffledOffset + chunk.count
        while p < end {
            if p >= n * width {
                d[p] = s[from]; p += 1; from += 1
                continue
            }
            let k = p / n, i = p % n
            let run = min(n - i, end - p)
            var to = d + i * width + k
            for j in 0 ..< run { to.pointee = s[from + j]; to += width }
            p += run; from += run
        }
    }

    /// The whole shuffled form of `source` (for measurements and tests).
    public static func shuffled(_ source: [UInt8], width: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: source.count)
        source.withUnsafeBytes { s in
            out.withUnsafeMutableBytes { gather(s, width: width, shuffledRange: 0 ..< s.count, into: $0) }
        }
        return out
    }
}
