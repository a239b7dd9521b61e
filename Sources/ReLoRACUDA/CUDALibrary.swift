import CReLoRA
import Foundation
import ReLoRACore

/// The kernel library (`libreloracuda.so`, or its CPU emulation `libreloracuda-emu.so`) opened with
/// dlopen through `relora_cuda_load`, probed once per process. The Swift package never links CUDA: without
/// a library, or without a device, `open()` throws one sentence naming what is missing and the CPU
/// path is unaffected.
///
/// Where the library is looked for, first match wins:
/// 1. `$RELORA_CUDA_LIB` (a path; how CI points the backend at the emulation),
/// 2. `libreloracuda.so` next to the running executable (how a packaged build ships it),
/// 3. `Kernels/build/libreloracuda.so` under the current directory (a source checkout after `make -C Kernels cuda`).
/// The emulation is only ever used when named explicitly in `RELORA_CUDA_LIB`: nobody trains on it by accident.
///
/// Sendable: every stored property is a `let` set in `init` (`api` is a C table of function pointers, which
/// Swift does not mark Sendable), and the process's cached library (`loaded`) is read and written under `lock`.
public final class CUDALibrary: @unchecked Sendable {
    /// The resolved entry points; every member is non-nil after a successful load.
    let api: relora_cuda_api
    public let path: String
    public let info: relora_library_info
    public let device: relora_device_properties
    /// The GPU this process computes on (`set_device`), of `deviceCount` it sees.
    public let deviceOrdinal: Int
    public let deviceCount: Int

    private init(api: relora_cuda_api, path: String, info: relora_library_info, device: relora_device_properties,
                 ordinal: Int, count: Int) {
        self.api = api; self.path = path; self.info = info; self.device = device
        deviceOrdinal = ordinal; deviceCount = count
    }

    /// Whether the library is the CPU emulation of the kernels.
    public var emulated: Bool { info.emulated != 0 }
    public var deviceName: String { Self.text(device.name) }
    public var buildDescription: String { Self.text(info.build) }

    /// The paths `open()` tries, in order (`RuntimeLibrary`'s search, shared with the MPI plugin).
    public static func candidatePaths(environment: [String: String] = ProcessInfo.processInfo.environment) -> [String] {
        RuntimeLibrary.candidatePaths(fileName: "libreloracuda.so", variable: "RELORA_CUDA_LIB", environment: environment)
    }

    private static let lock = NSLock()
    nonisolated(unsafe) private static var loaded: Result<CUDALibrary, ReLoRAError>?

    /// The process's kernel library, loaded and probed on first use (later calls return the same result).
    /// The first call chooses the GPU: `localRank` modulo the devices the process sees (the rank's place on
    /// its node, so that the ranks of a node spread over its GPUs; 0 for one process).
    public static func open(localRank: Int = 0) throws -> CUDALibrary {
        lock.lock(); defer { lock.unlock() }
        if let loaded { return try loaded.get() }
        let result = Result<CUDALibrary, ReLoRAError> { () throws(ReLoRAError) in try load(candidatePaths(), localRank: localRank) }
        loaded = result
        return try result.get()
    }

    /// The library at `path`, loaded and probed now (not the process's cached one): tests use it.
    public static func load(path: String) throws -> CUDALibrary { try load([path], localRank: 0) }

    private static func load(_ paths: [String], localRank: Int) throws(ReLoRAError) -> CUDALibrary {
        guard let path = RuntimeLibrary.firstExisting(paths) else {
            throw .invalidConfig("device 'cuda' is not available: no CUDA kernel library found (looked for \(paths.joined(separator: ", "))); build it with `make -C Kernels cuda` on a machine with the CUDA toolchain, or set RELORA_CUDA_LIB; use --device cpu otherwise")
        }
        var api = relora_cuda_api()
        var err = [CChar](repeating: 0, count: 1024)
        if relora_cuda_load(path, &api, &err, err.count) != 0 {
            throw .invalidConfig("device 'cuda' is not available: \(text(err))")
        }
        var count: Int32 = 0
        _ = api.device_count!(&count)
        if count < 1 {
            let why = Self.lastError(api)
            relora_cuda_unload(&api)
            throw .invalidConfig("device 'cuda' is not available: the kernel library \(path) loaded but sees no CUDA device (\(why.isEmpty ? "no driver or no GPU" : why)); use --device cpu")
        }
        let ordinal = localRank % Int(count)
        guard api.set_device!(Int32(ordinal)) == RELORA_OK else {
            let why = Self.lastError(api)
            relora_cuda_unload(&api)
            throw .invalidConfig("device 'cuda' is not available: the kernel library \(path) cannot select GPU \(ordinal) of \(count) (\(why))")
        }
        var info = relora_library_info()
        var props = relora_device_properties()
        guard api.library_info!(&info) == RELORA_OK, info.info_size == Int32(MemoryLayout<relora_library_info>.size),
              info.device_properties_size == Int32(MemoryLayout<relora_device_properties>.size),
              info.norm_entry_size == Int32(MemoryLayout<relora_norm_entry>.stride),
              info.adam_entry_size == Int32(MemoryLayout<relora_adam_entry>.stride),
              api.device_properties!(&props) == RELORA_OK else {
            let why = Self.lastError(api)
            relora_cuda_unload(&api)
            throw .invalidConfig("device 'cuda' is not available: the kernel library \(path) does not describe itself as this build expects (\(why)); rebuild it with `make -C Kernels`")
        }
        return CUDALibrary(api: api, path: path, info: info, device: props, ordinal: ordinal, count: Int(count))
    }

    /// The emulation's counters since it was loaded (process-wide): kernel launches (`relora_emu_counters`), calls
    /// that make the host wait for the device (stream, device and event synchronizes, blocking copies) and
    /// cudaMalloc calls (`relora_emu_host_counters`), memsets and copies enqueued (`relora_emu_command_counters`).
    /// nil for a CUDA build. Tests bound a training step's work with them.
    public struct EmulationCounters: Sendable, Equatable {
        public var launches: UInt64 = 0, synchronizations: UInt64 = 0, mallocs: UInt64 = 0, memsets: UInt64 = 0, copies: UInt64 = 0

        /// What happened between `earlier` and these counters.
        public func since(_ earlier: EmulationCounters) -> EmulationCounters {
            EmulationCounters(launches: launches - earlier.launches, synchronizations: synchronizations - earlier.synchronizations,
                              mallocs: mallocs - earlier.mallocs, memsets: memsets - earlier.memsets, copies: copies - earlier.copies)
        }
    }

    public func emulationCounters() -> EmulationCounters? {
        typealias Launches = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?,
                                             UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
        typealias Pair = @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<UInt64>?) -> Void
        guard emulated, let handle = api.handle, let launches = dlsym(handle, "relora_emu_counters"),
              let host = dlsym(handle, "relora_emu_host_counters"), let commands = dlsym(handle, "relora_emu_command_counters")
        else { return nil }
        var c = EmulationCounters()
        unsafeBitCast(launches, to: Launches.self)(&c.launches, nil, nil, nil)
        unsafeBitCast(host, to: Pair.self)(&c.synchronizations, &c.mallocs)
        unsafeBitCast(commands, to: Pair.self)(&c.memsets, &c.copies)
        return c
    }

    /// The emulation's launches since it was loaded of the kernels whose name contains `substring`
    /// (`relora_emu_launches_named`; e.g. "dequantize_kernel": the frozen weights' dequantizations). nil for a CUDA
    /// build.
    public func emulatedLaunches(named substring: String) -> UInt64? {
        typealias Named = @convention(c) (UnsafePointer<CChar>?) -> UInt64
        guard emulated, let handle = api.handle, let named = dlsym(handle, "relora_emu_launches_named") else { return nil }
        return substring.withCString { unsafeBitCast(named, to: Named.self)($0) }
    }

    /// Ends the process when a kernel call failed (no step can recover from it half way; the last checkpoint
    /// on disk is intact). Out of memory (pinned host memory for master copies, cuBLAS's workspace, a CUDA
    /// call that could not allocate) is what a recipe can cause: one sentence and exit status 3
    /// (`ResourceExhaustion`). Anything else traps: arguments are validated before every call, so what
    /// remains is a device fault (an illegal address, a lost device) or a bug, and its backtrace is wanted.
    @inline(__always)
    func check(_ status: relora_status, _ op: StaticString) {
        if status != RELORA_OK { fail(status, op) }
    }

    func fail(_ status: relora_status, _ op: StaticString) -> Never {
        let message = Self.lastError(api)
        if status == RELORA_ERR_OUT_OF_MEMORY {
            ResourceExhaustion.stop("cuda: \(op) ran out of memory: \(message); plan the run with `relora memory --device cuda` (device and host memory by tag) and apply its suggestion; " + ResourceExhaustion.resumeAdvice)
        }
        fatalError("cuda: \(op) failed (status \(status.rawValue)): \(message)")
    }

    /// The calling thread's last failure message of the library.
    var lastError: String { Self.lastError(api) }

    static func lastError(_ api: relora_cuda_api) -> String {
        api.last_error!().map { String(cString: $0) } ?? ""
    }

    static func text<T>(_ tuple: T) -> String {
        withUnsafeBytes(of: tuple) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    static func text(_ buffer: [CChar]) -> String {
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
