import Foundation
#if canImport(Glibc)
import Glibc
#endif

// MARK: - File plumbing shared by the IO readers and writers

/// A whole file mapped read-only (MAP_PRIVATE, PROT_READ) and unmapped in deinit. An empty file has an
/// empty buffer and no mapping (mmap rejects length 0).
///
/// If another process truncates the file while it is mapped, touching the lost pages raises SIGBUS; files
/// this package maps are treated as immutable while open.
package final class MemoryMappedFile: @unchecked Sendable {  // read-only after init
    let path: String
    package let bytes: UnsafeRawBufferPointer

    package init(path: String) throws {
        self.path = path
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot open the file (\(systemErrorText(errno)))")
        }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot read the file's size (\(systemErrorText(errno)))")
        }
        guard (status.st_mode & S_IFMT) == S_IFREG else {
            throw ReLoRAError.invalidFile(path: path, reason: "the path is not a regular file (a directory or device?); give the path of a file")
        }
        let size = Int(status.st_size)
        guard size > 0 else {
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
            return
        }
        let address = mmap(nil, size, PROT_READ, MAP_PRIVATE, descriptor, 0)
        guard let address, address != UnsafeMutableRawPointer(bitPattern: -1) else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot memory-map the file's \(size) bytes (\(systemErrorText(errno)))")
        }
        bytes = UnsafeRawBufferPointer(start: address, count: size)
    }

    deinit {
        if let base = bytes.baseAddress {
            munmap(UnsafeMutableRawPointer(mutating: base), bytes.count)
        }
    }
}

/// Writes a file atomically: the bytes go to a hidden temporary file in the destination's directory (so
/// the rename cannot cross file systems), which is fsynced, renamed over the destination, and then the
/// directory is fsynced so the rename itself survives a crash. On any failure the temporary file is
/// removed and the destination is untouched. Failures are `.invalidFile` naming the destination.
package enum AtomicFileWriter {
    package struct Sink {
        fileprivate let descriptor: Int32
        fileprivate let fail: (String) -> ReLoRAError

        /// Writes all of `buffer`, retrying short writes and EINTR.
        package func write(_ buffer: UnsafeRawBufferPointer) throws {
            guard var cursor = buffer.baseAddress else { return }
            var remaining = buffer.count
            while remaining > 0 {
                let written = Glibc.write(descriptor, cursor, remaining)
                if written < 0 {
                    if errno == EINTR { continue }
                    throw fail("writing the temporary file failed (\(systemErrorText(errno)))")
                }
                cursor += written
                remaining -= written
            }
        }
    }

    package static func write(to path: String, _ produce: (Sink) throws -> Void) throws {
        // After the temporary file exists, every failure leaves the destination as it was; say so.
        let fail = { (what: String) in
            ReLoRAError.invalidFile(path: path, reason: "cannot write: \(what); the previous file at this path, if any, is unchanged")
        }
        let slash = path.lastIndex(of: "/")
        let fileName = slash.map { String(path[path.index(after: $0)...]) } ?? path
        guard !fileName.isEmpty, fileName != ".", fileName != ".." else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot write: the path names a directory, not a file")
        }
        let directory = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let temporaryPath = (directory == "/" ? "" : directory) + "/.\(fileName).tmp-\(getpid())-\(UInt32.random(in: 0 ... .max))"

        let descriptor = open(temporaryPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot write: creating a temporary file in '\(directory)' failed (\(systemErrorText(errno))); check that the directory exists and is writable")
        }
        var descriptorOpen = true
        var renamed = false
        defer {
            if descriptorOpen { close(descriptor) }
            if !renamed { unlink(temporaryPath) }
        }

        try produce(Sink(descriptor: descriptor, fail: fail))
        guard fsync(descriptor) == 0 else {
            throw fail("flushing the temporary file to disk failed (\(systemErrorText(errno)))")
        }
        descriptorOpen = false
        guard close(descriptor) == 0 else {
            throw fail("closing the temporary file failed (\(systemErrorText(errno)))")
        }
        guard rename(temporaryPath, path) == 0 else {
            throw fail("moving the temporary file over the destination failed (\(systemErrorText(errno)))")
        }
        renamed = true

        // Make the rename durable. Some file systems cannot fsync a directory (EINVAL); the file itself is
        // complete either way, so only a real I/O error is reported.
        let directoryDescriptor = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directoryDescriptor >= 0 {
            defer { close(directoryDescriptor) }
            if fsync(directoryDescriptor) != 0, errno == EIO {
                throw ReLoRAError.invalidFile(path: path, reason: "the file was written but syncing its directory failed (\(systemErrorText(EIO))); check the disk")
            }
        }
    }
}

/// The C library's text for an errno value, e.g. "No such file or directory".
private func systemErrorText(_ code: Int32) -> String {
    String(cString: strerror(code))
}

/// Writes `data` to `path` atomically (temporary file in the same directory, fsync, rename): the file
/// is complete or absent, and a previous file survives any failure.
public func writeFileAtomically(_ data: Data, to path: String) throws {
    try AtomicFileWriter.write(to: path) { sink in try data.withUnsafeBytes { try sink.write($0) } }
}

/// Moves the complete directory `temp` to `path`, replacing an existing one only once the new one is
/// in place (old moved aside, new renamed in, old deleted), so `path` is never left half-written.
package func replaceDirectory(at path: String, with temp: String) throws {
    let fm = FileManager.default
    if fm.fileExists(atPath: path) {
        let old = path + ".old-\(getpid())"
        try fm.moveItem(atPath: path, toPath: old)
        try fm.moveItem(atPath: temp, toPath: path)
        try? fm.removeItem(atPath: old)
    } else {
        try fm.moveItem(atPath: temp, toPath: path)
    }
}

/// Directory and JSON helpers shared by the checkpoint writers.
package enum Files {
    package static func createDirectory(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw ReLoRAError.invalidFile(path: path, reason: "cannot create the directory (\(error.localizedDescription))")
        }
    }

    /// Creates the directory `path` will be written into, if missing (an output path's folders, as a user
    /// would expect `--out data/mine/train.npy` to work in a fresh checkout).
    package static func createParentDirectory(of path: String) throws {
        let parent = URL(fileURLWithPath: path).deletingLastPathComponent().path
        if !FileManager.default.fileExists(atPath: parent) { try createDirectory(parent) }
    }

    /// Pretty-printed, sorted keys, written atomically.
    package static func writeJSON(_ object: [String: Any], to path: String) throws {
        try writeFileAtomically(try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]), to: path)
    }

    package static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw ReLoRAError.invalidFile(path: path, reason: "cannot open the directory to sync it") }
        defer { close(fd) }
        _ = fsync(fd)
    }
}
