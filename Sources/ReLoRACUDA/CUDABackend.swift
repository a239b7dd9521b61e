import CReLoRA
import Foundation
import ReLoRACore

/// The Backend protocol over the kernel library (`Kernels/`, ABI in `relora_abi.h`): device buffers from
/// a caching allocator, bf16 activations, LoRA factors and working copies with f32 gradients, master
/// copies and Adam states (`Precision.cudaMixed`), GEMMs through cuBLAS, the frozen weight of a quantized
/// linear dequantized into a reused bf16 scratch right before its GEMM. The same code runs on the CPU
/// emulation of the kernels (`libreloracuda-emu.so`), which is how CI runs the conformance suite and
/// training steps on this backend without a GPU.
///
/// Every call goes to the default stream in program order; host reads (`download`, the values ops
/// return) synchronize, except the transfers a training step makes per micro-batch: the token uploads and the
/// deferred loss (`crossEntropyDeferred`) go through pinned staging memory (`PinnedStaging`) and do not. A
/// failed kernel call ends the process with the library's message (see `CUDALibrary.check`): user input is
/// validated before it reaches a kernel, so what remains is running out of memory (one sentence, exit status 3)
/// or a device fault (a trap).
///
/// Dtypes: each op takes the combination its kernel takes, as the model calls it: compute tensors in one
/// dtype, f32 or bf16 (f16 is storage only: `copy` converts it), and f32 where the kernels keep f32 (norms'
/// `rstd` and weight gradients, attention's `lse`, per-token losses, embedding gradients, reduction
/// outputs, a GEMM's `alphaScale`, AdamW's tensors). Another combination is a caller's bug and traps:
/// nothing is converted behind the caller's back, so what a run allocates is what its plan counts.
///
/// Sendable (as every `Backend`): its mutable state is the allocator, used under `lock`, and the scratch that
/// grows with the shapes it sees (the embedding backward's workspace, the RoPE tables), used under
/// `scratchLock`; every other stored property is a `let` (the workspace pointers are device addresses, written
/// by kernels only), and the ledger is thread-safe. Kernel calls from several threads go to the one default
/// stream in the order they are made; an op whose kernels share a workspace holds `scratchLock` until they are
/// all enqueued, so another thread's kernels cannot interleave with them on it.
public final class CUDABackend: DeviceBackend, TensorStorageOwner, OpProfiling, @unchecked Sendable {
    public let name: String
    public let ledger = MemoryLedger()
    /// `cudaMixed` for training; `fp32` runs every op in f32, which the selftest uses to compare whole
    /// training steps with the CPU at f32 tolerances.
    public let precision: Precision
    public let computes = true
    public let library: CUDALibrary
    /// `attention_forward`/`attention_backward` take head_dim in [1, 128] (`relora_abi.h`).
    public var maxAttentionHeadDim: Int? { Device.cuda.maxAttentionHeadDim }
    public var rowPadding: RowPadding { Device.cuda.rowPadding }

    /// Where every op reports while a step is profiled (`OpProfiling`: timing events around its launches on
    /// the stream), nil otherwise.
    nonisolated(unsafe) public var profiler: OpProfiler?

    private let lock = NSLock()
    private let allocator: DeviceAllocator
    /// Persistent scratch of the reductions, selects and quantizers' failure word (not in the ledger:
    /// 2 MiB + 11 KiB of allocator blocks, allocated once per backend; plans count them in their allocator
    /// figure).
    private let reduceWorkspace: UnsafeMutableRawPointer
    private let selectWorkspace: UnsafeMutableRawPointer
    private let failureWord: UnsafeMutableRawPointer
    /// The 8-bit Adam moments' two maps (`BlockwiseMoments.maps`, 2 KiB), uploaded once.
    let adam8Maps: UnsafeMutableRawPointer
    /// Scratch sized by the shapes seen so far (not in the ledger, like the workspaces above), under
    /// `scratchLock`: the embedding backward's sort workspace (`embedding_backward_workspace_bytes`, ~20 bytes a
    /// token of the micro-batch), grown when a larger batch comes, and one RoPE table per (seqLen, headDim,
    /// theta), f32 `[2, seqLen, headDim / 2]` (the 1b config at sequence 1024: 512 KiB), made on first use.
    /// Both reach their size in the first step: no allocation after it.
    private let scratchLock = NSLock()
    nonisolated(unsafe) private var embeddingWorkspace: (pointer: UnsafeMutableRawPointer, bytes: Int)?
    nonisolated(unsafe) private var ropeTables: [String: UnsafeMutableRawPointer] = [:]
    /// Pinned host memory of the token uploads and the deferred losses (thread-safe on its own).
    let staging: PinnedStaging

    var api: relora_cuda_api { library.api }

    public init(library: CUDALibrary, precision: Precision = .cudaMixed) {
        self.library = library
        self.precision = precision
        name = library.emulated ? "cuda-emulated" : "cuda"
        let limit = ProcessInfo.processInfo.environment["RELORA_DEVICE_MEMORY_LIMIT"].flatMap { try? parseBytes($0) }
        allocator = DeviceAllocator(library: library, limit: limit)
        staging = PinnedStaging(library: library)
        // In `CachingAllocatorModel.persistentScratch`'s order and sizes, which plans reserve the same way.
        let scratch = CachingAllocatorModel.persistentScratch
        reduceWorkspace = allocator.allocate(scratch[0], tag: .workspace)
        selectWorkspace = allocator.allocate(scratch[1], tag: .workspace)
        failureWord = allocator.allocate(scratch[2], tag: .workspace)
        let mapBytes = scratch[3]
        precondition(mapBytes == 2 * Int(RELORA_ADAM8_MAP) * MemoryLayout<Float>.size, "the 8-bit Adam maps' size")
        adam8Maps = allocator.allocate(mapBytes, tag: .workspace)
        library.check(api.memcpy!(adam8Maps, BlockwiseMoments.maps, Int64(mapBytes), RELORA_MEMCPY_HOST_TO_DEVICE, nil), "memcpy")
    }

    /// Runs after the last tensor went away (each holds its backend): the cache goes back to the device.
    deinit {
        if let w = embeddingWorkspace { allocator.release(w.pointer) }
        for table in ropeTables.values { allocator.release(table) }
        allocator.release(reduceWorkspace)
        allocator.release(selectWorkspace)
        allocator.release(failureWord)
        allocator.release(adam8Maps)
        allocator.emptyCache()
    }

    /// The backend on the process's kernel library (`CUDALibrary.open()`'s search), or one sentence saying
    /// what is missing.
    public static func open() throws -> CUDABackend { CUDABackend(library: try CUDALibrary.open()) }

    /// Timing events on the default stream, where every op runs.
    public func makeProfileClock() -> ProfileClock { CUDAEventClock(library: library) }

    // MARK: Memory

    public func makeTensor(_ shape: [Int], dtype: DType, tag: MemoryTag, zeroed: Bool) -> Tensor {
        let bytes = shape.reduce(1, *) * dtype.byteSize
        var storage: UnsafeMutableRawPointer?
        if bytes > 0 {
            if tag.isHost {
                // Pinned host memory the kernels read through the same pointer (the `master` policy's
                // f32 copies, which would not fit the device): not the allocator's, not device memory.
                library.check(api.host_alloc!(&storage, Int64(bytes)), "host_alloc")
                if zeroed { storage!.initializeMemory(as: UInt8.self, repeating: 0, count: bytes) }
            } else {
                lock.lock()
                storage = allocator.allocate(bytes, tag: tag)
                lock.unlock()
                if zeroed { library.check(api.memset!(storage, 0, Int64(bytes), nil), "memset") }
            }
        }
        ledger.allocated(bytes, tag)
        return Tensor(shape: shape, dtype: dtype, tag: tag, storage: storage, owner: self)
    }

    public func release(_ tensor: TensorRelease) {
        if let storage = tensor.storage {
            if tensor.tag.isHost {
                library.check(api.host_free!(storage), "host_free")
            } else {
                lock.lock()
                allocator.release(storage)
                lock.unlock()
            }
        }
        ledger.freed(tensor.byteCount, tensor.tag)
    }

    /// Declares that work on `stream` (not the default stream) reads or writes `tensor`: when the tensor is
    /// released, its block's next owner waits for that work (`DeviceAllocator.recordStream`). Host tensors
    /// (the `master` policy's pinned copies) need nothing: freeing them synchronizes the device.
    func recordStream(_ tensor: Tensor, stream: UnsafeMutableRawPointer) {
        var owner = tensor  // a view's block is its viewed tensor's
        while let viewed = owner.viewedTensor { owner = viewed }
        guard let storage = owner.storage, !owner.tag.isHost else { return }
        lock.lock(); defer { lock.unlock() }
        allocator.recordStream(storage, stream: stream)
    }

    /// The allocator's counters: reserved and in-use bytes with their high-water marks, per-tag use at the peak.
    public var allocatorStats: AllocatorStats {
        lock.lock(); defer { lock.unlock() }
        return allocator.stats
    }

    public var device: Device { .cuda }
    public var deviceName: String { library.deviceName }
    public var isEmulated: Bool { library.emulated }

    /// The device's figures for a plan's estimates (context, cuBLAS workspace): its compute capability and SMs.
    public var gpu: GPUProfile {
        GPUProfile(name: library.deviceName, computeMajor: Int(library.device.compute_major),
                   computeMinor: Int(library.device.compute_minor), multiprocessors: Int(library.device.multiprocessors),
                   emulated: library.emulated)
    }

    /// What the device reports (`cudaMemGetInfo`): free and total bytes; under a `RELORA_DEVICE_MEMORY_LIMIT`
    /// cap, what the cap leaves (total = the cap, free = the cap less what the allocator reserved).
    public func deviceMemory() -> (free: Int, total: Int) {
        var free: Int64 = 0, total: Int64 = 0
        library.check(api.mem_get_info!(&free, &total), "mem_get_info")
        lock.lock(); defer { lock.unlock() }
        guard let limit = allocator.limit else { return (Int(free), Int(total)) }
        return (min(Int(free), max(0, limit - allocator.stats.reserved)), min(Int(total), limit))
    }

    /// Returns the allocator's cached (free) blocks to the device, e.g. between benchmarks that use
    /// different backends, so `cudaMemGetInfo` shows only what is live.
    public func releaseCachedMemory() {
        lock.lock(); defer { lock.unlock() }
        allocator.emptyCache()
    }

    /// Waits for every queued kernel (benchmarks time with it; ops that return values already wait).
    public func synchronize() { sync() }

    /// One line for a run's log: the allocator's high-water marks and the device's own view.
    public func memorySummary() -> String {
        let s = allocatorStats
        let (free, total) = deviceMemory()
        let byTag = s.inUseAtPeakByTag.filter { $0.value > 0 }.sorted { $0.value > $1.value }
            .map { "\($0.key.rawValue) \(formatBytes($0.value))" }.joined(separator: ", ")
        return "device \(library.deviceName): allocator peak \(formatBytes(s.peakInUse)) in use (\(byTag)), \(formatBytes(s.peakReserved)) reserved (\(s.mallocCalls) cudaMalloc, \(s.cacheHits) cache hits); cudaMemGetInfo \(formatBytes(total - free)) used of \(formatBytes(total))"
    }

    // MARK: Helpers

    /// Waits for the default stream; the staging then knows every copy enqueued before ran.
    func sync() {
        let generation = staging.beginSync()
        library.check(api.stream_synchronize!(nil), "stream_synchronize")
        staging.endSync(generation)
    }

    /// Checks that `tensors` are in `dtype`, the one the kernel of `op` takes for them (see the type's comment).
    static func require(_ dtype: DType, _ tensors: Tensor?..., op: StaticString) {
        for t in tensors {
            guard let t else { continue }
            precondition(t.dtype == dtype, "CUDABackend.\(op): a \(t.dtype.rawValue) tensor where the kernel takes \(dtype.rawValue)")
        }
    }

    static func code(_ dtype: DType) -> Int32 {
        switch dtype {
        case .f32: return RELORA_DTYPE_F32
        case .bf16: return RELORA_DTYPE_BF16
        case .f16: return RELORA_DTYPE_F16
        case .i8, .u8, .i32: preconditionFailure("\(dtype.rawValue) is not a float dtype of the kernels")
        }
    }

    /// The dtype kernels compute `t` in: its own, which must be f32 or bf16 (f16 is storage only).
    static func computeType(_ t: Tensor, op: StaticString) -> DType {
        precondition(t.dtype == .f32 || t.dtype == .bf16, "CUDABackend.\(op): a \(t.dtype.rawValue) tensor; the kernels compute in f32 or bf16")
        return t.dtype
    }

    private static func format(_ f: QuantFormat) -> Int32 {
        switch f {
        case .q8_0: return RELORA_FORMAT_Q8_0
        case .q4_0: return RELORA_FORMAT_Q4_0
        case .nf4: return RELORA_FORMAT_NF4
        }
    }

    // MARK: Transfers and fills

    public func upload(_ values: [Float], to tensor: Tensor) {
        let span = profiler?.begin(.transfer, .transfer(bytes: tensor.byteCount)); defer { span?.end() }
        precondition(values.count == tensor.count, "upload: \(values.count) values into a tensor of \(tensor.count)")
        values.withUnsafeBytes { uploadConverted($0, .f32, to: tensor) }
    }

    /// Token ids and targets, once per micro-batch: through the pinned staging ring, an asynchronous copy the
    /// host does not wait for (the ring holds the values until it ran). Into a host tensor: written at once.
    public func upload(_ values: [Int32], to tensor: Tensor) {
        let span = profiler?.begin(.transfer, .transfer(bytes: tensor.byteCount)); defer { span?.end() }
        precondition(values.count == tensor.count && tensor.dtype == .i32, "upload: \(values.count) ids into a \(tensor.dtype.rawValue) tensor of \(tensor.count)")
        ledger.uploaded(tensor.byteCount)
        guard tensor.count > 0 else { return }
        if tensor.tag.isHost {
            sync()  // queued kernels may still read it
            values.withUnsafeBytes { tensor.storage!.copyMemory(from: $0.baseAddress!, byteCount: tensor.byteCount) }
            return
        }
        values.withUnsafeBytes { staging.upload($0, to: tensor.storage!) }
    }

    public func upload(raw: UnsafeRawBufferPointer, dtype: DType, to tensor: Tensor) {
        let span = profiler?.begin(.transfer, .transfer(bytes: tensor.byteCount)); defer { span?.end() }
        precondition(raw.count == tensor.count * dtype.byteSize, "upload: \(raw.count) bytes of \(dtype.rawValue) into a tensor of \(tensor.count)")
        uploadConverted(raw, dtype, to: tensor)
    }

    /// Host elements of `dtype` into `tensor`, converted on the host (round to nearest even), one copy.
    private func uploadConverted(_ raw: UnsafeRawBufferPointer, _ dtype: DType, to tensor: Tensor) {
        ledger.uploaded(tensor.byteCount)
        guard tensor.count > 0 else { return }
        if tensor.tag.isHost {  // pinned host memory: written by the host, once queued kernels are done with it
            sync()
            HostConversion.convert(raw.baseAddress!, dtype, tensor.storage!, tensor.dtype, count: tensor.count)
            return
        }
        if dtype == tensor.dtype {
            library.check(api.memcpy!(tensor.storage, raw.baseAddress, Int64(tensor.byteCount), RELORA_MEMCPY_HOST_TO_DEVICE, nil), "memcpy")
        } else {
            let host = UnsafeMutableRawPointer.allocate(byteCount: tensor.byteCount, alignment: 64)
            defer { host.deallocate() }
            HostConversion.convert(raw.baseAddress!, dtype, host, tensor.dtype, count: tensor.count)
            library.check(api.memcpy!(tensor.storage, host, Int64(tensor.byteCount), RELORA_MEMCPY_HOST_TO_DEVICE, nil), "memcpy")
        }
        sync()
    }

    public func download(_ tensor: Tensor) -> [Float] {
        let span = profiler?.begin(.transfer, .transfer(bytes: tensor.byteCount)); defer { span?.end() }
        ledger.downloaded(tensor.byteCount)
        var out = [Float](repeating: 0, count: tensor.count)
        guard tensor.count > 0 else { return out }
        let host = copyToHost(tensor)
        defer { host.deallocate() }
        out.withUnsafeMutableBytes { HostConversion.convert(host, tensor.dtype, $0.baseAddress!, .f32, count: tensor.count) }
        return out
    }

    /// The tensor's bytes in a fresh host buffer (the caller deallocates), after the stream drained.
    private func copyToHost(_ tensor: Tensor) -> UnsafeMutableRawPointer {
        let host = UnsafeMutableRawPointer.allocate(byteCount: max(1, tensor.byteCount), alignment: 64)
        if tensor.byteCount > 0 {
            library.check(api.memcpy!(host, tensor.storage, Int64(tensor.byteCount),
                                      tensor.tag.isHost ? RELORA_MEMCPY_DEFAULT : RELORA_MEMCPY_DEVICE_TO_HOST, nil), "memcpy")
        }
        sync()
        return host
    }

    public func copy(_ src: Tensor, to dst: Tensor) {
        let span = profiler?.begin(.elementwise, .copy(src, dst)); defer { span?.end() }
        precondition(src.count == dst.count, "copy: \(src.count) into \(dst.count)")
        guard src.count > 0 else { return }
        if src.dtype == dst.dtype {
            let kind = src.tag.isHost || dst.tag.isHost ? RELORA_MEMCPY_DEFAULT : RELORA_MEMCPY_DEVICE_TO_DEVICE
            library.check(api.memcpy!(dst.storage, src.storage, Int64(src.byteCount), kind, nil), "memcpy")
        } else {
            library.check(api.convert!(src.storage, Self.code(src.dtype), dst.storage, Self.code(dst.dtype), Int64(src.count), nil), "convert")
        }
    }

    public func zero(_ tensor: Tensor) {
        let span = profiler?.begin(.elementwise, .fill(tensor)); defer { span?.end() }
        guard tensor.byteCount > 0 else { return }
        library.check(api.memset!(tensor.storage, 0, Int64(tensor.byteCount), nil), "memset")
    }

    public func fill(_ tensor: Tensor, value: Float) {
        let span = profiler?.begin(.elementwise, .fill(tensor)); defer { span?.end() }
        let t = Self.computeType(tensor, op: "fill")
        library.check(api.fill!(tensor.storage, value, Int64(tensor.count), Self.code(t), nil), "fill")
    }

    public func fillUniform(_ tensor: Tensor, bound: Float, seed: UInt64, stream: UInt64) {
        let span = profiler?.begin(.elementwise, .fill(tensor, flopsPerElement: 2)); defer { span?.end() }
        let t = Self.computeType(tensor, op: "fillUniform")
        library.check(api.fill_uniform!(tensor.storage, Int64(tensor.count), bound, seed, stream, Self.code(t), nil), "fill_uniform")
    }

    public func fillNormal(_ tensor: Tensor, std: Float, seed: UInt64, stream: UInt64) {
        let span = profiler?.begin(.elementwise, .fill(tensor, flopsPerElement: 8)); defer { span?.end() }
        let t = Self.computeType(tensor, op: "fillNormal")
        library.check(api.fill_normal!(tensor.storage, Int64(tensor.count), std, seed, stream, Self.code(t), nil), "fill_normal")
    }

    // MARK: Dense math

    public func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int,
                       transA: Bool, transB: Bool, alpha: Float, beta: Float, alphaScale: Tensor?, lda: Int, ldb: Int, ldc: Int) {
        let span = profiler?.beginGEMM(.gemm(m: m, n: n, k: k, abBytes: a.dtype.byteSize, cBytes: c.dtype.byteSize,
                                             accumulates: beta != 0))
        defer { span?.end() }
        let ld = StoredMatrix.gemmStrides(a, b, c, m: m, n: n, k: k, transA: transA, transB: transB, lda: lda, ldb: ldb, ldc: ldc)
        let abType = Self.computeType(a, op: "matmul"), cType = Self.computeType(c, op: "matmul")
        Self.require(abType, b, op: "matmul")
        Self.require(.f32, alphaScale, op: "matmul")
        library.check(api.gemm!(transA ? 1 : 0, transB ? 1 : 0, Int64(m), Int64(n), Int64(k), alpha,
                                alphaScale?.storage?.assumingMemoryBound(to: Float.self), a.storage, b.storage,
                                Self.code(abType), beta, c.storage, Self.code(cType), Int64(ld.a), Int64(ld.b), Int64(ld.c), nil),
                      "gemm")
    }

    public func rmsnormForward(_ x: Tensor, weight: Tensor, out: Tensor, rstd: Tensor, rows: Int, dim: Int, eps: Float) {
        let span = profiler?.begin(.norm, .rmsnorm(forward: true, rows: rows, dim: dim, elementBytes: x.dtype.byteSize))
        defer { span?.end() }
        let t = Self.computeType(x, op: "rmsnormForward")
        Self.require(t, weight, out, op: "rmsnormForward")
        Self.require(.f32, rstd, op: "rmsnormForward")
        library.check(api.rmsnorm_forward!(x.storage, weight.storage, out.storage, rstd.storage?.assumingMemoryBound(to: Float.self),
                                           Int64(rows), Int64(dim), eps, Self.code(t), nil), "rmsnorm_forward")
    }

    public func rmsnormBackward(_ dout: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                                dx: Tensor, dweight: Tensor, rows: Int, dim: Int) {
        let span = profiler?.begin(.norm, .rmsnorm(forward: false, rows: rows, dim: dim, elementBytes: x.dtype.byteSize))
        defer { span?.end() }
        let t = Self.computeType(x, op: "rmsnormBackward")
        Self.require(t, dout, weight, dx, op: "rmsnormBackward")
        Self.require(.f32, rstd, dweight, op: "rmsnormBackward")
        library.check(api.rmsnorm_backward!(dout.storage, x.storage, weight.storage, rstd.storage?.assumingMemoryBound(to: Float.self),
                                            dx.storage, dweight.storage?.assumingMemoryBound(to: Float.self),
                                            Int64(rows), Int64(dim), Self.code(t), nil), "rmsnorm_backward")
    }

    public func rope(_ x: Tensor, batch: Int, seqLen: Int, heads: Int, headDim: Int, theta: Float, inverse: Bool) {
        let span = profiler?.begin(.elementwise, .rope(count: batch * seqLen * heads * headDim, elementBytes: x.dtype.byteSize))
        defer { span?.end() }
        let t = Self.computeType(x, op: "rope")
        guard batch > 0, seqLen > 0, heads > 0, headDim > 0 else { return }
        let table = ropeTable(seqLen: seqLen, headDim: headDim, theta: theta)
        library.check(api.rope!(x.storage, table.assumingMemoryBound(to: Float.self), Int64(batch), Int64(seqLen),
                                Int64(heads), Int64(headDim), inverse ? 1 : 0, Self.code(t), nil), "rope")
    }

    /// The table of the smallest power of two of positions (at least 64) holding the rows, as the CPU picks
    /// it: a table's values at a position do not depend on its length, so the bits are `rope`'s.
    public func ropeAt(_ x: Tensor, rows: Int, position: Int, heads: Int, headDim: Int, theta: Float) {
        let t = Self.computeType(x, op: "ropeAt")
        guard rows > 0, heads > 0, headDim > 0 else { return }
        var length = 64
        while length < position + rows { length *= 2 }
        let table = ropeTable(seqLen: length, headDim: headDim, theta: theta)
        library.check(api.rope_at!(x.storage, table.assumingMemoryBound(to: Float.self), Int64(length), Int64(position),
                                   Int64(rows), Int64(heads), Int64(headDim), Self.code(t), nil), "rope_at")
    }

    public func attentionDecode(q: Tensor, kCache: Tensor, vCache: Tensor, out: Tensor, position: Int,
                                heads: Int, kvHeads: Int, headDim: Int) {
        let t = Self.computeType(q, op: "attentionDecode")
        Self.require(t, kCache, vCache, out, op: "attentionDecode")
        precondition(kCache.count >= (position + 1) * kvHeads * headDim && vCache.count == kCache.count,
                     "attentionDecode: the caches hold fewer than \(position + 1) rows")
        library.check(api.attention_decode!(q.storage, kCache.storage, vCache.storage, out.storage, Int64(position),
                                            Int64(heads), Int64(kvHeads), Int64(headDim), Self.code(t), nil),
                      "attention_decode")
    }

    /// The device copy of `RoPETables.make(...)` for this shape, cos then sin (`[2, seqLen, headDim / 2]`): the
    /// CPU's own values, uploaded once (the upload synchronizes, so the host arrays can go).
    private func ropeTable(seqLen: Int, headDim: Int, theta: Float) -> UnsafeMutableRawPointer {
        let key = "\(seqLen)/\(headDim)/\(theta.bitPattern)"
        scratchLock.lock(); defer { scratchLock.unlock() }
        if let table = ropeTables[key] { return table }
        let (cosT, sinT) = RoPETables.make(seqLen: seqLen, headDim: headDim, theta: theta)
        let bytes = (cosT.count + sinT.count) * MemoryLayout<Float>.size
        lock.lock()
        let table = allocator.allocate(max(bytes, 1), tag: .workspace)
        lock.unlock()
        let contents = cosT + sinT
        contents.withUnsafeBytes { host in
            library.check(api.memcpy!(table, host.baseAddress, Int64(bytes), RELORA_MEMCPY_HOST_TO_DEVICE, nil), "memcpy")
            sync()
        }
        ropeTables[key] = table
        return table
    }

    public func attentionForward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int) {
        let span = profiler?.begin(.attentionForward, .attention(forward: true, batch: batch, seqLen: seqLen, heads: heads,
                                                                 kvHeads: kvHeads, headDim: headDim, elementBytes: q.dtype.byteSize))
        defer { span?.end() }
        let t = Self.computeType(q, op: "attentionForward")
        Self.require(t, k, v, out, op: "attentionForward")
        Self.require(.f32, lse, op: "attentionForward")
        library.check(api.attention_forward!(q.storage, k.storage, v.storage, out.storage, lse.storage?.assumingMemoryBound(to: Float.self),
                                             Int64(batch), Int64(seqLen), Int64(heads), Int64(kvHeads), Int64(headDim),
                                             Self.code(t), nil), "attention_forward")
    }

    public func attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  dq: Tensor, dk: Tensor, dv: Tensor,
                                  batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int) {
        let span = profiler?.begin(.attentionBackward, .attention(forward: false, batch: batch, seqLen: seqLen, heads: heads,
                                                                  kvHeads: kvHeads, headDim: headDim, elementBytes: q.dtype.byteSize))
        defer { span?.end() }
        let t = Self.computeType(q, op: "attentionBackward")
        Self.require(t, dout, k, v, out, dq, dk, dv, op: "attentionBackward")
        Self.require(.f32, lse, op: "attentionBackward")
        library.check(api.attention_backward!(dout.storage, q.storage, k.storage, v.storage, out.storage,
                                              lse.storage?.assumingMemoryBound(to: Float.self),
                                              dq.storage, dk.storage, dv.storage, Int64(batch), Int64(seqLen),
                                              Int64(heads), Int64(kvHeads), Int64(headDim), Self.code(t), nil),
                      "attention_backward")
    }

    public func swigluForward(gate: Tensor, up: Tensor, out: Tensor, count: Int) {
        let span = profiler?.begin(.elementwise, .swiglu(forward: true, count: count, elementBytes: gate.dtype.byteSize))
        defer { span?.end() }
        let t = Self.computeType(gate, op: "swigluForward")
        Self.require(t, up, out, op: "swigluForward")
        library.check(api.swiglu_forward!(gate.storage, up.storage, out.storage, Int64(count), Self.code(t), nil), "swiglu_forward")
    }

    public func swigluBackward(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, count: Int) {
        let span = profiler?.begin(.elementwise, .swiglu(forward: false, count: count, elementBytes: gate.dtype.byteSize))
        defer { span?.end() }
        let t = Self.computeType(gate, op: "swigluBackward")
        Self.require(t, dout, up, dgate, dup, op: "swigluBackward")
        library.check(api.swiglu_backward!(dout.storage, gate.storage, up.storage, dgate.storage, dup.storage, Int64(count),
                                           Self.code(t), nil), "swiglu_backward")
    }

    public func embeddingForward(ids: Tensor, table: Tensor, out: Tensor, dim: Int) {
        let span = profiler?.begin(.embedding, .embedding(forward: true, tokens: ids.count, dim: dim,
                                                          elementBytes: table.dtype.byteSize))
        defer { span?.end() }
        let t = Self.computeType(table, op: "embeddingForward")
        Self.require(t, out, op: "embeddingForward")
        library.check(api.embedding_forward!(ids.storage?.assumingMemoryBound(to: Int32.self), table.storage, out.storage,
                                             Int64(ids.count), Int64(dim), Int64(table.count / max(1, dim)),
                                             Self.code(t), nil), "embedding_forward")
    }

    /// The library sorts the tokens by id in a workspace (grown here to the largest batch seen) and sums each id's
    /// rows in token order: the CPU's additions.
    public func embeddingBackward(ids: Tensor, dout: Tensor, dtable: Tensor, dim: Int) {
        let span = profiler?.begin(.embedding, .embedding(forward: false, tokens: ids.count, dim: dim,
                                                          elementBytes: dout.dtype.byteSize))
        defer { span?.end() }
        let t = Self.computeType(dout, op: "embeddingBackward")
        Self.require(.f32, dtable, op: "embeddingBackward")
        let needed = Int(api.embedding_backward_workspace_bytes!(Int64(ids.count)))
        scratchLock.lock(); defer { scratchLock.unlock() }
        if needed > (embeddingWorkspace?.bytes ?? 0) {
            lock.lock()
            if let old = embeddingWorkspace { allocator.release(old.pointer) }  // its kernels are ahead on the stream
            embeddingWorkspace = (allocator.allocate(needed, tag: .workspace), needed)
            lock.unlock()
        }
        library.check(api.embedding_backward!(ids.storage?.assumingMemoryBound(to: Int32.self), dout.storage,
                                              dtable.storage?.assumingMemoryBound(to: Float.self), Int64(ids.count), Int64(dim),
                                              Int64(dtable.count / max(1, dim)), Self.code(t), embeddingWorkspace?.pointer, nil),
                      "embedding_backward")
    }

    /// The per-row losses stay on the device; their sum comes back by downloading them (`rows` floats: one
    /// transfer, summed in Double in row order on the host).
    public func crossEntropy(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                             gradScale: Float?, ld: Int) -> Double {
        launchCrossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale, ld: ld)
        return download(losses.view(offset: 0, shape: [rows])).reduce(0.0) { $0 + Double($1) }
    }

    /// The same kernel; the `rows` losses go to a pinned staging slot by an asynchronous copy behind it, and the
    /// returned value sums them as `crossEntropy` does (Double, row order: the same bits) when it is read, after
    /// waiting for the copy only if no synchronize covered it since (the trainer reads after the gradient norm's).
    public func crossEntropyDeferred(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                                     gradScale: Float?, ld: Int) -> DeferredSum {
        launchCrossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: gradScale, ld: ld)
        let bytes = rows * MemoryLayout<Float>.size
        let span = profiler?.begin(.transfer, .transfer(bytes: bytes)); defer { span?.end() }
        ledger.downloaded(bytes)
        let copy = staging.readBack(losses.storage.map { UnsafeRawPointer($0) }, count: bytes)
        return DeferredSum {
            let values = copy.bytes.assumingMemoryBound(to: Float.self)
            return values.reduce(0.0) { $0 + Double($1) }
        }
    }

    private func launchCrossEntropy(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int, gradScale: Float?,
                                    ld: Int) {
        precondition(targets.count == rows, "crossEntropy: \(targets.count) targets for \(rows) rows")
        precondition(losses.count >= rows, "crossEntropy: \(losses.count) losses for \(rows) rows")
        let stride = StoredMatrix.stride(of: logits, rows: rows, cols: vocab, ld: ld, "crossEntropy")
        let t = Self.computeType(logits, op: "crossEntropy")
        Self.require(.f32, losses, op: "crossEntropy")
        let span = profiler?.begin(.crossEntropy, .crossEntropy(rows: rows, vocab: vocab, elementBytes: logits.dtype.byteSize,
                                                                 withGradient: gradScale != nil))
        defer { span?.end() }  // the losses' transfer is one of its own
        library.check(api.cross_entropy!(logits.storage, targets.storage?.assumingMemoryBound(to: Int32.self),
                                         losses.storage?.assumingMemoryBound(to: Float.self), Int64(rows), Int64(vocab),
                                         Int64(stride), gradScale == nil ? 0 : 1, gradScale ?? 0, Self.code(t), nil), "cross_entropy")
    }

    public func dropout(_ x: Tensor, _ out: Tensor, count: Int, p: Float, seed: UInt64, stream: UInt64, cols: Int, ld: Int) {
        let span = profiler?.begin(.elementwise, .dropout(count: count, elementBytes: x.dtype.byteSize)); defer { span?.end() }
        let t = Self.computeType(x, op: "dropout")
        Self.require(t, out, op: "dropout")
        let rows = StoredMatrix.elementRows(count: count, cols: cols, ld: ld, x, out, op: "dropout")
        library.check(api.dropout!(x.storage, out.storage, Int64(count), Int64(rows.cols), Int64(rows.ld), p, seed, stream,
                                   Self.code(t), nil), "dropout")
    }

    public func dotAccumulate(_ a: Tensor, _ b: Tensor, count: Int, into out: Tensor) {
        let span = profiler?.begin(.reduction, .dot(count: count, elementBytes: a.dtype.byteSize)); defer { span?.end() }
        let t = Self.computeType(a, op: "dotAccumulate")
        Self.require(t, b, op: "dotAccumulate")
        Self.require(.f32, out, op: "dotAccumulate")
        library.check(api.dot_accumulate!(a.storage, b.storage, Int64(count), Self.code(t), out.storage?.assumingMemoryBound(to: Float.self),
                                          reduceWorkspace, nil), "dot_accumulate")
    }

    public func axpy(_ alpha: Float, _ b: Tensor, _ a: Tensor, count: Int) {
        let span = profiler?.begin(.elementwise, .axpy(count: count, bBytes: b.dtype.byteSize, aBytes: a.dtype.byteSize))
        defer { span?.end() }
        let bType = Self.computeType(b, op: "axpy"), aType = Self.computeType(a, op: "axpy")
        library.check(api.axpy!(alpha, b.storage, Self.code(bType), a.storage, Self.code(aType), Int64(count), nil), "axpy")
    }

    public func scale(_ x: Tensor, by alpha: Float) {
        let span = profiler?.begin(.elementwise, .scale(x)); defer { span?.end() }
        let t = Self.computeType(x, op: "scale")
        library.check(api.scale!(x.storage, alpha, Int64(x.count), Self.code(t), nil), "scale")
    }

    public func sumOfSquares(_ x: Tensor, into out: Tensor, at index: Int) {
        let span = profiler?.begin(.reduction, .sumOfSquares(x)); defer { span?.end() }
        precondition(index >= 0 && index < out.count, "sumOfSquares: slot \(index) of \(out.count)")
        let t = Self.computeType(x, op: "sumOfSquares")
        Self.require(.f32, out, op: "sumOfSquares")
        library.check(api.sum_of_squares!(x.storage, Int64(x.count), Self.code(t), out.storage?.assumingMemoryBound(to: Float.self),
                                          Int64(index), reduceWorkspace, nil), "sum_of_squares")
    }

    public func adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, lr: Float, beta1: Float, beta2: Float,
                      eps: Float, weightDecay: Float, step: Int) {
        let span = profiler?.begin(.optimizer, .adamw(count: param.count)); defer { span?.end() }
        Self.require(.f32, param, grad, m, v, op: "adamw")
        library.check(api.adamw!(param.storage?.assumingMemoryBound(to: Float.self), grad.storage?.assumingMemoryBound(to: Float.self),
                                 m.storage?.assumingMemoryBound(to: Float.self), v.storage?.assumingMemoryBound(to: Float.self),
                                 nil, Int64(param.count), lr, beta1, beta2, eps, weightDecay, Int64(step), nil), "adamw")
    }

    public func adamw8bit(param: Tensor, grad: Tensor, m: BlockwiseMoments, v: BlockwiseMoments, lr: Float, beta1: Float,
                          beta2: Float, eps: Float, weightDecay: Float, step: Int) {
        let span = profiler?.begin(.optimizer, .adamw8bit(count: param.count)); defer { span?.end() }
        let n = param.count
        checkMoments("adamw8bit", count: n, m, v, f32: param, grad)
        precondition(m.isSigned && !v.isSigned, "adamw8bit: m takes the signed map, v the unsigned one")
        library.check(api.adamw_8bit!(param.storage?.assumingMemoryBound(to: Float.self), grad.storage?.assumingMemoryBound(to: Float.self),
                                      m.codes.storage?.assumingMemoryBound(to: UInt8.self), m.absmax.storage?.assumingMemoryBound(to: Float.self),
                                      v.codes.storage?.assumingMemoryBound(to: UInt8.self), v.absmax.storage?.assumingMemoryBound(to: Float.self),
                                      adam8Maps.assumingMemoryBound(to: Float.self), Int64(n), lr, beta1, beta2, eps, weightDecay,
                                      Int64(step), nil), "adamw_8bit")
    }

    public func dequantizeMoments(_ moments: BlockwiseMoments, into out: Tensor) {
        let span = profiler?.begin(.optimizer, .convertMoments(count: out.count)); defer { span?.end() }
        checkMoments("dequantizeMoments", count: out.count, moments, f32: out)
        library.check(api.dequantize_8bit!(moments.codes.storage?.assumingMemoryBound(to: UInt8.self),
                                           moments.absmax.storage?.assumingMemoryBound(to: Float.self), adam8Maps.assumingMemoryBound(to: Float.self),
                                           moments.isSigned ? 1 : 0, Int64(out.count), out.storage?.assumingMemoryBound(to: Float.self), nil),
                      "dequantize_8bit")
    }

    public func quantizeMoments(_ x: Tensor, into moments: BlockwiseMoments) {
        let span = profiler?.begin(.optimizer, .convertMoments(count: x.count)); defer { span?.end() }
        checkMoments("quantizeMoments", count: x.count, moments, f32: x)
        library.check(api.quantize_8bit!(x.storage?.assumingMemoryBound(to: Float.self), adam8Maps.assumingMemoryBound(to: Float.self),
                                         moments.isSigned ? 1 : 0, Int64(x.count), moments.codes.storage?.assumingMemoryBound(to: UInt8.self),
                                         moments.absmax.storage?.assumingMemoryBound(to: Float.self), nil), "quantize_8bit")
    }

    public func prune(_ tensor: Tensor, _ rule: PruneRule, seed: UInt64, stream: UInt64) -> Int {
        ledger.downloaded(MemoryLayout<Int>.size)  // the returned count
        let n = tensor.count
        guard n > 0 else { return 0 }
        var zeroed: Int64 = 0
        switch rule {
        case .all:
            zero(tensor)
            return n
        case .random(let probability):
            let t = Self.computeType(tensor, op: "prune")
            library.check(api.prune_random!(tensor.storage, Int64(n), Self.code(t), probability, seed, stream, &zeroed, nil), "prune_random")
        case .magnitude(let ratio):
            let k = PruneRule.magnitudeRank(ratio: ratio, of: n)
            guard k > 0 else { return 0 }
            if k >= n { zero(tensor); return n }
            let t = Self.computeType(tensor, op: "prune")
            library.check(api.prune_magnitude!(tensor.storage, Int64(n), Self.code(t), Int64(k), selectWorkspace, &zeroed, nil), "prune_magnitude")
        }
        return Int(zeroed)
    }

    public func pruneMoments(m: Tensor, v: Tensor, ratio: Double, eps: Float) -> Int {
        let k: Int
        switch pruneMomentsPrologue(m: m, v: v, ratio: ratio) {
        case .done(let zeroed): return zeroed
        case .select(let rank): k = rank
        }
        let n = m.count
        var zeroed: Int64 = 0
        Self.require(.f32, m, v, op: "pruneMoments")
        library.check(api.prune_moments!(m.storage?.assumingMemoryBound(to: Float.self), v.storage?.assumingMemoryBound(to: Float.self),
                                         Int64(n), Int64(k), eps, selectWorkspace, &zeroed, nil), "prune_moments")
        return Int(zeroed)
    }

    // MARK: Quantized weights

    public func downloadRaw(_ tensor: Tensor) -> [UInt8] {
        let span = profiler?.begin(.transfer, .transfer(bytes: tensor.byteCount)); defer { span?.end() }
        ledger.downloaded(tensor.byteCount)
        let host = copyToHost(tensor)
        defer { host.deallocate() }
        return Array(UnsafeRawBufferPointer(start: host, count: tensor.byteCount))
    }

    public func quantize(_ source: Tensor, into q: QuantizedTensor, rounding: QuantRounding) -> QuantizationFailure? {
        ledger.downloaded(MemoryLayout<Int32>.size)  // the status
        precondition(source.count == q.rows * q.cols, "quantize: \(source.count) values for [\(q.rows), \(q.cols)]")
        precondition(q.blocks.dtype == .u8 && q.blocks.count == q.rows * q.bytesPerRow, "quantize: blocks of the wrong size")
        guard q.rows > 0, q.cols > 0 else { return nil }
        Self.require(.f32, source, op: "quantize")
        let (mode, seed, stream): (Int32, UInt64, UInt64) = {
            switch rounding {
            case .nearest: return (RELORA_ROUND_NEAREST, 0, 0)
            case .stochastic(let seed, let stream): return (RELORA_ROUND_STOCHASTIC, seed, stream)
            }
        }()
        library.check(api.quantize!(Self.format(q.format), source.storage?.assumingMemoryBound(to: Float.self), Int64(q.rows), Int64(q.cols),
                                    q.blocks.storage, mode, seed, stream, failureWord.assumingMemoryBound(to: UInt64.self), nil), "quantize")
        var word: UInt64 = 0
        library.check(api.memcpy!(&word, failureWord, 8, RELORA_MEMCPY_DEVICE_TO_HOST, nil), "memcpy")
        sync()
        guard word != UInt64.max else { return nil }
        let index = Int(word >> 2), status = Int32(word & 3)
        let row = index / q.paddedCols, col = index % q.paddedCols
        let value = download(source.view(offset: row * q.cols + col, shape: [1]))[0]
        return QuantizationFailure(reason: status == RELORA_QUANT_ERR_NONFINITE ? .nonFinite : .scaleOverflow,
                                   row: row, col: col, value: value)
    }

    public func countChangedCodes(old: Tensor, new q: QuantizedTensor, into out: Tensor, at index: Int) {
        precondition(old.dtype == .u8 && old.count == q.blocks.count, "countChangedCodes: old blocks of another size")
        Self.require(.f32, out, op: "countChangedCodes")
        library.check(api.count_changed_codes!(Self.format(q.format), old.storage, q.blocks.storage, Int64(q.rows), Int64(q.cols),
                                               out.storage?.assumingMemoryBound(to: Float.self), Int64(index), selectWorkspace, nil),
                      "count_changed_codes")
    }

    public func dequantize(_ q: QuantizedTensor, firstRow: Int, rowCount: Int, into out: Tensor) {
        precondition(firstRow >= 0 && rowCount >= 0 && firstRow + rowCount <= q.rows, "dequantize: rows out of range")
        dequantize(q, firstRow: firstRow, rowCount: rowCount, cols: q.cols, into: out)
    }

    /// Rows of `q` dequantized as rows of `cols` elements, `q.cols <= cols <= q.paddedCols`: the columns past
    /// `q.cols` are the row's block padding decoded (zeros).
    private func dequantize(_ q: QuantizedTensor, firstRow: Int, rowCount: Int, cols: Int, into out: Tensor) {
        let span = profiler?.begin(.dequantize, .dequantize(rows: rowCount, cols: cols, blockBytes: rowCount * q.bytesPerRow,
                                                            outBytes: out.dtype.byteSize))
        defer { span?.end() }
        precondition(out.count >= rowCount * cols, "dequantize: output too small")
        guard rowCount > 0, cols > 0 else { return }
        let t = Self.computeType(out, op: "dequantize")
        library.check(api.dequantize!(Self.format(q.format), q.blocks.storage! + firstRow * q.bytesPerRow, Int64(rowCount), Int64(cols),
                                      out.storage, Self.code(t), nil), "dequantize")
    }

    /// The whole layer in padded rows (`RowPadding`): cuBLAS runs one GEMM over the weight dequantized right
    /// before it.
    public func dequantizeScratchShape(rows: Int, cols: Int) -> [Int] { [rows, rowPadding.stride(cols)] }

    /// `dequantizedWeight` writes all of deq(W) into the scratch and nothing else writes it.
    public var dequantizesWholeWeight: Bool { true }

    public func quantizedLinear(_ x: Tensor, _ q: QuantizedTensor, _ y: Tensor, tokens n: Int, beta: Float, scratch: Tensor,
                                ldx: Int, ldy: Int) {
        let w = dequantizedWeight(q, scratch)
        matmul(x, w, y, m: n, n: q.rows, k: q.cols, transB: true, beta: beta, lda: ldx, ldb: w.shape[1], ldc: ldy)
    }

    public func quantizedLinearInput(_ dy: Tensor, _ q: QuantizedTensor, _ dx: Tensor, tokens n: Int, beta: Float, scratch: Tensor,
                                     lddy: Int, lddx: Int) {
        let w = dequantizedWeight(q, scratch)
        matmul(dy, w, dx, m: n, n: q.cols, k: q.rows, beta: beta, lda: lddy, ldb: w.shape[1], ldc: lddx)
    }

    /// W `[rows, cols]` dequantized into the first `rows * stride` elements of `scratch`, as a view
    /// `[rows, stride]`: rows padded as activations are (`RowPadding`), so cuBLAS reads aligned rows. The
    /// padding columns are the row's block padding decoded (zeros: every format's blocks are multiples of 16
    /// wide, so `stride <= q.paddedCols`); the products read only the `cols` logical ones.
    private func dequantizedWeight(_ q: QuantizedTensor, _ scratch: Tensor) -> Tensor {
        let stride = rowPadding.stride(q.cols)
        precondition(stride <= q.paddedCols || q.rows == 0, "quantizedLinear: block rows of \(q.paddedCols) < stride \(stride)")
        precondition(scratch.count >= q.rows * stride, "quantizedLinear: scratch of \(scratch.count) for [\(q.rows), \(stride)]")
        let w = scratch.view(offset: 0, shape: [q.rows, stride])
        dequantize(q, firstRow: 0, rowCount: q.rows, cols: stride, into: w)
        return w
    }
}
