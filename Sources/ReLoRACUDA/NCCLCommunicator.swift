import CReLoRA
import Foundation
import ReLoRACore

/// The NCCL engine: `Communicator` for ranks that compute on the CUDA backend, through the kernel library's
/// `nccl_*` entries (NCCL itself is opened by the library with dlopen on first use, so a machine without it
/// trains on one GPU and is told in one sentence when it asks for several; the CPU emulation implements the
/// entries over TCP, so CI runs this engine end to end).
///
/// How the ranks meet (`make`): under an MPI launcher rank 0 draws NCCL's unique id and the MPI plugin
/// broadcasts it (MPI carries nothing else); without MPI (torchrun-style variables, `srun` with no MPI
/// plugin) every rank derives the id from `NCCL_COMM_ID=host:port` (rank 0 listens there), or, when that is
/// unset, from `MASTER_ADDR` and `MASTER_PORT + 1` (torchrun's own store holds `MASTER_PORT` on rank 0).
/// Each rank computes on GPU `local rank mod visible GPUs`.
///
/// Gradients are summed on the device (`DeviceCollectives`), on a stream of their own that overlaps the
/// backward: the same additions in rank order as `Communicator.sumInRankOrder` (an all-to-all of shares,
/// W-1 f32 additions per element by the `axpy` kernel, an all-gather), so the bits do not depend on NCCL's
/// algorithm nor on the engine. The host-memory primitives (losses, weight hashes, stop flags) stage their
/// few bytes through device scratch on the default stream, never while sums are in flight.
///
/// Every wait is bounded by `RELORA_COLLECTIVE_TIMEOUT` seconds (default 600, NCCL's and PyTorch's usual
/// bound; rank 0 writes checkpoints and evaluates while the others wait in their next collective, so it must
/// exceed both): a peer that died or stopped makes the others' collectives fail with one sentence instead
/// of hanging, and the run exits non-zero with its last checkpoint intact.
///
/// Sendable: `comm` and `finished` are read and written under `lock`; every other stored property is a `let`.
public final class NCCLCommunicator: Communicator, DeviceCollectives, @unchecked Sendable {
    public let library: CUDALibrary
    public let rank: Int
    public let worldSize: Int
    public let localRank: Int
    public let localSize: Int
    public var engine: String { "nccl" }
    /// NCCL's version code (e.g. 22703), as the loaded library reports it.
    public let version: Int
    /// How the ranks met: "MPI" or the `NCCL_COMM_ID` address.
    public let meeting: String
    public let timeoutSeconds: Double
    private let bootstrap: MPICommunicator?
    private var comm: UnsafeMutableRawPointer?
    private let lock = NSLock()
    /// The communication stream (non-blocking: it overlaps the default stream, on which the backend computes)
    /// and the event that orders a sum after the default stream's work so far.
    private let stream: UnsafeMutableRawPointer?
    private let ready: UnsafeMutableRawPointer?
    /// The device sums' two chunk buffers (tag `.workspace`), made at the first sum; only the communication
    /// stream uses them, so its order alone keeps one chunk from overwriting another's.
    private var buffers: (flat: Tensor, parts: Tensor)?
    /// Whether sums were started since the last `finishSums`.
    private var pending = false

    private var api: relora_cuda_api { library.api }

    private init(library: CUDALibrary, comm: UnsafeMutableRawPointer?, launch: LaunchEnvironment, bootstrap: MPICommunicator?,
                 version: Int, meeting: String, timeout: Double, chunkFloats: Int) {
        self.chunkFloats = chunkFloats
        self.library = library; self.comm = comm; self.bootstrap = bootstrap
        rank = launch.rank; worldSize = launch.worldSize
        localRank = bootstrap?.localRank ?? launch.localRank ?? launch.rank
        localSize = bootstrap?.localSize ?? launch.localSize ?? launch.worldSize
        self.version = version; self.meeting = meeting; timeoutSeconds = timeout
        var stream: UnsafeMutableRawPointer?, ready: UnsafeMutableRawPointer?
        library.check(library.api.stream_create!(&stream), "stream_create")
        library.check(library.api.event_create!(&ready), "event_create")
        self.stream = stream; self.ready = ready
    }

    /// The default bound on one collective's wait, in seconds.
    public static let defaultTimeout = 600.0

    /// Opens the kernel library on this rank's GPU, meets the other ranks and initialises NCCL; one
    /// sentence when it cannot (NCCL missing, no meeting address, a peer that never came).
    public static func make(launch: LaunchEnvironment, bootstrap: MPICommunicator?,
                            environment: [String: String] = ProcessInfo.processInfo.environment) throws -> NCCLCommunicator {
        let timeout = try collectiveTimeout(environment)
        let chunkFloats = try Self.chunkFloats(environment)
        let localRank = bootstrap?.localRank ?? launch.localRank ?? launch.rank
        let library = try CUDALibrary.open(localRank: localRank)
        let api = library.api
        func failure(_ what: String) -> ReLoRAError {
            .unsupported("relora was started as \(launch.summary) on device cuda but \(what): \(library.lastError)")
        }
        var version: Int32 = 0
        guard api.nccl_version!(&version) == RELORA_OK else { throw failure("cannot use NCCL") }
        var id = [UInt8](repeating: 0, count: Int(RELORA_NCCL_ID_BYTES))
        let meeting: String
        if let bootstrap {
            if launch.rank == 0 && api.nccl_unique_id!(&id) != RELORA_OK {
                // The others wait in the broadcast: end them all.
                bootstrap.abort("\(failure("NCCL cannot make its unique id"))", status: 1)
            }
            id = try bootstrap.broadcast(id, root: 0)
            meeting = "MPI"
        } else {
            let address = try meetingAddress(launch, environment)
            setenv("NCCL_COMM_ID", address, 1)  // read by ncclGetUniqueId: the same id on every rank
            guard api.nccl_unique_id!(&id) == RELORA_OK else {
                throw failure("NCCL cannot make its id from NCCL_COMM_ID=\(address)")
            }
            meeting = "NCCL_COMM_ID=\(address)"
        }
        var comm: UnsafeMutableRawPointer?
        guard api.nccl_init!(&comm, id, Int32(launch.worldSize), Int32(launch.rank), timeout) == RELORA_OK else {
            throw failure("NCCL could not connect the \(launch.worldSize) ranks (met through \(meeting))")
        }
        return NCCLCommunicator(library: library, comm: comm, launch: launch, bootstrap: bootstrap, version: Int(version),
                                meeting: meeting, timeout: timeout, chunkFloats: chunkFloats)
    }

    /// `RELORA_COLLECTIVE_TIMEOUT` (seconds), else `defaultTimeout`.
    static func collectiveTimeout(_ environment: [String: String]) throws -> Double {
        guard let text = environment["RELORA_COLLECTIVE_TIMEOUT"] else { return defaultTimeout }
        guard let value = Double(text), value > 0, value.isFinite else {
            throw ReLoRAError.invalidConfig("RELORA_COLLECTIVE_TIMEOUT='\(text)' is not a positive number of seconds")
        }
        return value
    }

    /// Where ranks that have no MPI meet: `NCCL_COMM_ID`, else `MASTER_ADDR:MASTER_PORT+1`.
    static func meetingAddress(_ launch: LaunchEnvironment, _ environment: [String: String]) throws -> String {
        if let id = environment["NCCL_COMM_ID"], !id.isEmpty {
            guard let colon = id.lastIndex(of: ":"), let port = Int(id[id.index(after: colon)...]), (1...65535).contains(port),
                  colon != id.startIndex else {
                throw ReLoRAError.invalidConfig("NCCL_COMM_ID='\(id)' is not host:port; set it to rank 0's address and a free port, e.g. 10.0.0.1:29600")
            }
            return id
        }
        if let host = environment["MASTER_ADDR"], !host.isEmpty, let portText = environment["MASTER_PORT"] {
            guard let port = Int(portText), (1..<65535).contains(port) else {
                throw ReLoRAError.invalidConfig("MASTER_PORT='\(portText)' is not a port number")
            }
            return "\(host):\(port + 1)"
        }
        throw ReLoRAError.unsupported("relora was started as \(launch.summary) without MPI, so its ranks meet at NCCL_COMM_ID=host:port (rank 0's host and a free port) or at MASTER_ADDR:MASTER_PORT+1, and neither is set; set NCCL_COMM_ID on every rank (docs/distributed.md)")
    }

    // MARK: Host-memory primitives (staged through device scratch)

    public func allGather(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(receive.count == send.count * worldSize, "allGather: \(send.count) bytes a rank into \(receive.count)")
        try staged("all-gather of \(send.count) bytes a rank", send: send, receive: receive) { comm, s, r in
            api.nccl_all_gather!(comm, s, r, Int64(send.count), nil)
        }
    }

    public func allToAll(_ send: UnsafeRawBufferPointer, into receive: UnsafeMutableRawBufferPointer) throws {
        precondition(send.count == receive.count && send.count % worldSize == 0, "allToAll: \(send.count) bytes into \(receive.count)")
        try staged("all-to-all of \(send.count / worldSize)-byte blocks", send: send, receive: receive) { comm, s, r in
            api.nccl_all_to_all!(comm, s, r, Int64(send.count / worldSize), nil)
        }
    }

    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        precondition(root >= 0 && root < worldSize, "broadcast from rank \(root) of \(worldSize)")
        try staged("broadcast of \(buffer.count) bytes from rank \(root)", send: UnsafeRawBufferPointer(buffer), receive: buffer) { comm, _, r in
            api.nccl_broadcast!(comm, r, Int64(buffer.count), Int32(root), nil)
        }
    }

    public func barrier() throws {
        var one: [UInt8] = [1]
        var all = [UInt8](repeating: 0, count: worldSize)
        try one.withUnsafeMutableBytes { o in try all.withUnsafeMutableBytes { a in try allGather(UnsafeRawBufferPointer(o), into: a) } }
    }

    /// Copies `send` into device scratch, runs `body(comm, deviceSend, deviceReceive)` (the receive scratch
    /// holds `receive.count` bytes; for a broadcast both are one buffer), waits, and copies the result out.
    private func staged(_ what: @autoclosure () -> String, send: UnsafeRawBufferPointer, receive: UnsafeMutableRawBufferPointer,
                        _ body: (UnsafeMutableRawPointer?, UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> relora_status) throws {
        lock.lock(); defer { lock.unlock() }
        let comm = try live(what())
        let inPlace = UnsafeRawPointer(receive.baseAddress) == send.baseAddress
        var deviceSend: UnsafeMutableRawPointer?, deviceReceive: UnsafeMutableRawPointer?
        library.check(api.malloc!(&deviceReceive, Int64(max(1, receive.count))), "malloc")
        defer { library.check(api.free!(deviceReceive), "free") }
        if inPlace {
            deviceSend = deviceReceive
        } else {
            library.check(api.malloc!(&deviceSend, Int64(max(1, send.count))), "malloc")
        }
        defer { if !inPlace { library.check(api.free!(deviceSend), "free") } }
        if send.count > 0 {
            library.check(api.memcpy!(deviceSend, send.baseAddress, Int64(send.count), RELORA_MEMCPY_HOST_TO_DEVICE, nil), "memcpy")
        }
        try check(body(comm, deviceSend, deviceReceive), what())
        try check(api.nccl_wait!(comm, nil), what())
        if receive.count > 0 {
            library.check(api.memcpy!(receive.baseAddress, deviceReceive, Int64(receive.count), RELORA_MEMCPY_DEVICE_TO_HOST, nil), "memcpy")
        }
    }

    // MARK: Device collectives

    /// The most floats one chunk of a device sum moves: 4 Mi (16 MiB in each of the two buffers), or
    /// `RELORA_COLLECTIVE_CHUNK_FLOATS` (tests set a small odd count, so that chunks end inside tensors).
    public let chunkFloats: Int
    public static let defaultChunkFloats = DeviceSumBuffers.defaultChunkFloats

    /// `RELORA_COLLECTIVE_CHUNK_FLOATS` of `environment`, else `defaultChunkFloats`; one sentence when it is
    /// not a positive number. Plans of a run (`MemoryPlanner`) read it the same way.
    public static func chunkFloats(_ environment: [String: String]) throws -> Int {
        guard let text = environment["RELORA_COLLECTIVE_CHUNK_FLOATS"] else { return defaultChunkFloats }
        guard let value = Int(text), value > 0 else {
            throw ReLoRAError.invalidConfig("RELORA_COLLECTIVE_CHUNK_FLOATS='\(text)' is not a positive number of floats")
        }
        return value
    }

    public func serves(_ backend: Backend) -> Bool {
        (backend as? CUDABackend)?.library === library
    }

    /// Enqueues on the communication stream, behind an event of the default stream: for each chunk of at
    /// most `chunkFloats` (rounded up to W) of the concatenated tensors, the chunk copied into `flat` (zero-padded to W equal
    /// shares), an all-to-all of the shares into `parts` (block q: rank q's values of this rank's share), the
    /// W blocks added in rank order into block 0 by the `axpy` kernel (`a + 1 * b` in f32: the host sum's
    /// additions), an all-gather of the sums back into `flat`, and the chunk copied back into the tensors.
    public func startSum(_ tensors: [Tensor], on backend: Backend) throws {
        precondition(serves(backend), "NCCLCommunicator.startSum: tensors of another backend (\(backend.name))")
        let w = worldSize, n = tensors.reduce(0) { $0 + $1.count }
        guard w > 1, n > 0 else { return }
        for t in tensors { precondition(t.dtype == .f32, "startSum: \(t.dtype) tensor; gradients are f32") }
        lock.lock(); defer { lock.unlock() }
        let what = "sum of \(n) gradient values"
        let comm = try live(what)
        let capacity = DeviceSumBuffers.floats(count: n, chunkFloats: chunkFloats, worldSize: w)  // a multiple of W
        if buffers == nil || buffers!.flat.count < capacity {
            if buffers != nil { try check(api.nccl_wait!(comm, stream), what) }  // the old ones may be in use
            buffers = (backend.makeTensor([capacity], dtype: .f32, tag: .workspace, zeroed: false),
                       backend.makeTensor([capacity], dtype: .f32, tag: .workspace, zeroed: false))
        }
        let (flat, parts) = buffers!
        // The gradients are read and written on the communication stream: a gradient released before the sums
        // end leaves its block to a next owner that waits for them (the allocator's stream events).
        if let cuda = backend as? CUDABackend, let stream { for t in tensors { cuda.recordStream(t, stream: stream) } }
        // The gradients' last writes are on the default stream.
        library.check(api.event_record!(ready, nil), "event_record")
        library.check(api.stream_wait_event!(stream, ready), "stream_wait_event")
        let f32 = Int32(RELORA_DTYPE_F32), float = MemoryLayout<Float>.size
        var start = 0
        while start < n {
            let count = min(capacity, n - start), share = (count + w - 1) / w
            copy(tensors, elements: start ..< start + count, flat: flat.storage!, intoFlat: true)
            if share * w > count {
                library.check(api.memset!(flat.storage! + count * float, 0, Int64((share * w - count) * float), stream), "memset")
            }
            try check(api.nccl_all_to_all!(comm, flat.storage, parts.storage, Int64(share * float), stream), what)
            for q in 1..<w {
                library.check(api.axpy!(1, parts.storage! + q * share * float, f32, parts.storage, f32, Int64(share), stream), "axpy")
            }
            try check(api.nccl_all_gather!(comm, parts.storage, flat.storage, Int64(share * float), stream), what)
            copy(tensors, elements: start ..< start + count, flat: flat.storage!, intoFlat: false)
            start += count
        }
        pending = true
    }

    public func finishSums() throws {
        lock.lock(); defer { lock.unlock() }
        guard pending else { return }
        let comm = try live("gradient sums")
        // The host waits (bounded): the default stream's next work, enqueued after this, sees the sums.
        try check(api.nccl_wait!(comm, stream), "gradient sums")
        pending = false
    }

    /// Copies `elements` of the tensors' concatenation between the tensors and `flat` (whose element 0 is
    /// the range's first), on the communication stream.
    private func copy(_ tensors: [Tensor], elements: Range<Int>, flat: UnsafeMutableRawPointer, intoFlat: Bool) {
        let float = MemoryLayout<Float>.size
        var offset = 0  // of the current tensor in the concatenation
        for t in tensors {
            defer { offset += t.count }
            let lo = max(elements.lowerBound, offset), hi = min(elements.upperBound, offset + t.count)
            guard lo < hi else { continue }
            let inTensor = t.storage! + (lo - offset) * float, inFlat = flat + (lo - elements.lowerBound) * float
            library.check(api.memcpy!(intoFlat ? inFlat : inTensor, intoFlat ? inTensor : inFlat, Int64((hi - lo) * float),
                                      RELORA_MEMCPY_DEVICE_TO_DEVICE, stream), "memcpy")
        }
    }

    // MARK: Ends

    /// Prints `rank R: message`, aborts NCCL (the peers' collectives fail within their timeout) and ends
    /// the process with `status`; under an MPI launcher MPI_Abort ends every rank at once.
    public func abort(_ message: String, status: Int32) -> Never {
        lock.lock()
        if let comm { _ = api.nccl_abort!(comm) }
        comm = nil
        lock.unlock()
        if let bootstrap { bootstrap.abort(message, status: status) }
        fflush(nil)
        FileHandle.standardError.write(Data("rank \(rank): \(message)\n".utf8))
        _exit(status)
    }

    /// ncclCommDestroy after the last collective, then MPI_Finalize under an MPI launcher.
    public func finish() {
        lock.lock()
        if let comm { _ = api.nccl_destroy!(comm) }
        comm = nil
        lock.unlock()
        bootstrap?.finish()
    }

    private func live(_ what: String) throws -> UnsafeMutableRawPointer {
        guard let comm else {
            throw ReLoRAError.communication("NCCL \(what) was called after the communicator ended (a bug)")
        }
        return comm
    }

    private func check(_ status: relora_status, _ what: @autoclosure () -> String) throws {
        guard status == RELORA_OK else {
            throw ReLoRAError.communication("NCCL \(what()) failed on rank \(rank) of \(worldSize): \(library.lastError)")
        }
    }
}
