import CReLoRA
import Foundation

/// The MPI engine: the four byte primitives of `Communicator` over the plugin `librelora-mpi.so`
/// (`Kernels/mpi/relora_mpi.c`, built by the machine's own `mpicc` with `make -C Kernels mpi`), opened with
/// dlopen through `relora_mpi_load`. The package links no MPI, so it builds and runs without one.
///
/// The plugin is looked for like the CUDA kernel library (`RuntimeLibrary`): `$RELORA_MPI_LIB`, else
/// `librelora-mpi.so` next to the executable, else `Kernels/build/librelora-mpi.so` under the current
/// directory. MPI initialises once per process, so an `MPICommunicator` is made once, by
/// `Communicators.forThisProcess()`, when a launcher started more than one rank.
///
/// Collectives are serialized by a lock (the plugin asks MPI for MPI_THREAD_SERIALIZED) and run on the
/// plugin's duplicate of MPI_COMM_WORLD; a failure MPI reports (a dead peer) throws
/// `ReLoRAError.communication` naming the collective and this rank.
///
/// Sendable: every stored property but `finalized` is a `let` set in `init` (`api` is a C table of function
/// pointers, which Swift does not mark Sendable); `finalized` and every call into MPI are under `lock`.
public final class MPICommunicator: Communicator, @unchecked Sendable {
    private let api: relora_mpi_api
    /// The plugin that was loaded.
    public let path: String
    public let rank: Int
    public let worldSize: Int
    public let localRank: Int
    public let localSize: Int
    /// The MPI library's own description (the first line of MPI_Get_library_version), e.g.
    /// "Open MPI v4.1.4, package: Debian OpenMPI, ..."; and the MPI standard it implements, "3.1".
    public let library: String
    public let standard: String
    /// What MPI_Init_thread provided: 0 single, 1 funneled, 2 serialized, 3 multiple.
    public let threadLevel: Int
    /// `RELORA_MPI_MAX_CALL_BYTES`: the cap on the bytes one MPI call moves per rank, when one was set.
    public let maxCallBytes: Int64?
    public var engine: String { "mpi" }

    private let lock = NSLock()
    private var finalized = false

    private init(api: relora_mpi_api, path: String, info: relora_mpi_info, maxCallBytes: Int64?) {
        self.api = api
        self.path = path
        self.maxCallBytes = maxCallBytes
        rank = Int(info.rank); worldSize = Int(info.size)
        localRank = Int(info.local_rank); localSize = Int(info.local_size)
        library = withUnsafeBytes(of: info.library) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        standard = "\(info.mpi_version).\(info.mpi_subversion)"
        threadLevel = Int(info.thread_level)
    }

    /// The paths the plugin is looked for at, in order.
    public static func candidatePaths(environment: [String: String] = ProcessInfo.processInfo.environment) -> [String] {
        RuntimeLibrary.candidatePaths(fileName: "librelora-mpi.so", variable: "RELORA_MPI_LIB", environment: environment)
    }

    /// Why the plugin could not be used: a clause for the factory's sentence ("cannot load the MPI plugin
    /// (...)"), not a sentence of its own.
    struct Unavailable: Error { let reason: String }

    /// Loads the plugin and initialises MPI. Once per process: `Communicators.forThisProcess()` is the caller.
    /// `RELORA_MPI_MAX_CALL_BYTES` (tests) caps the bytes one MPI call moves per rank, so that small
    /// collectives exercise the plugin's splitting of calls over INT_MAX bytes.
    static func initialize(environment: [String: String]) throws(Unavailable) -> MPICommunicator {
        let paths = candidatePaths(environment: environment)
        guard let path = RuntimeLibrary.firstExisting(paths) else {
            throw Unavailable(reason: "no librelora-mpi.so at \(paths.joined(separator: " or "))")
        }
        var maxCallBytes: Int64?
        if let text = environment["RELORA_MPI_MAX_CALL_BYTES"] {
            guard let value = Int64(text), value > 0 else {
                throw Unavailable(reason: "RELORA_MPI_MAX_CALL_BYTES='\(text)' is not a positive number of bytes")
            }
            maxCallBytes = value
        }
        var api = relora_mpi_api()
        var err = [CChar](repeating: 0, count: 1024)
        if relora_mpi_load(path, &api, &err, err.count) != 0 {
            throw Unavailable(reason: String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
        var info = relora_mpi_info()
        // From here on MPI may be initialised: the plugin is never unloaded.
        guard api.initialize!(maxCallBytes ?? 0, &info) == RELORA_MPI_OK else {
            throw Unavailable(reason: "\(path) could not initialise MPI: \(api.last_error!().map { String(cString: $0) } ?? "")")
        }
        guard info.info_size == Int32(MemoryLayout<relora_mpi_info>.size) else {
            throw Unavailable(reason: "\(path) does not describe itself as this build expects (info of \(info.info_size) bytes, expected \(MemoryLayout<relora_mpi_info>.size)); rebuild it")
        }
        return MPICommunicator(api: api, path: path, info: info, maxCallBytes: maxCallBytes)
    }

    public func allGather(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(receive.count == send.count * worldSize, "allGather: \(send.count) bytes a rank into \(receive.count)")
        try call("all-gather of \(send.count) bytes a rank") {
            api.all_gather!(send.baseAddress, receive.baseAddress, Int64(send.count))
        }
    }

    public func allToAll(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(send.count == receive.count && send.count % worldSize == 0, "allToAll: \(send.count) bytes into \(receive.count)")
        try call("all-to-all of \(send.count / worldSize)-byte blocks") {
            api.all_to_all!(send.baseAddress, receive.baseAddress, Int64(send.count / worldSize))
        }
    }

    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        precondition(root >= 0 && root < worldSize, "broadcast from rank \(root) of \(worldSize)")
        try call("broadcast of \(buffer.count) bytes from rank \(root)") {
            api.broadcast!(buffer.baseAddress, Int64(buffer.count), Int32(root))
        }
    }

    public func barrier() throws {
        try call("barrier") { api.barrier!() }
    }

    /// Prints `rank R: message` on stderr and ends every rank of the job (MPI_Abort) with `status`, which
    /// mpirun passes on as its own exit status.
    public func abort(_ message: String, status: Int32) -> Never {
        fflush(nil)
        FileHandle.standardError.write(Data("rank \(rank): \(message)\n".utf8))
        api.abort!(status)
        _exit(status)  // relora_mpi_abort does not return
    }

    /// MPI_Finalize, for the end of a process every rank reaches (a rank that exits without it makes mpirun
    /// end the job). Later collectives throw.
    public func finish() { finalize() }

    public func finalize() {
        lock.lock(); defer { lock.unlock() }
        guard !finalized else { return }
        finalized = true
        _ = api.finalize!()
    }

    private func call(_ what: @autoclosure () -> String, _ body: () -> relora_mpi_status) throws {
        lock.lock(); defer { lock.unlock() }
        guard !finalized else {
            throw ReLoRAError.communication("MPI \(what()) was called after MPI was finalized (a bug)")
        }
        let status = body()
        guard status == RELORA_MPI_OK else {
            let why = api.last_error!().map { String(cString: $0) } ?? "status \(status.rawValue)"
            throw ReLoRAError.communication("MPI \(what()) failed on rank \(rank) of \(worldSize): \(why)")
        }
    }
}
