import CReLoRA
import Foundation

/// The CPU reference backend: fp32 everywhere, OpenBLAS sgemm for matrix products, plain loops for
/// the rest (parallel over rows where that pays on a few cores; the same bits with any thread count,
/// see Parallel.swift). Readability first: this is the
/// specification the CUDA kernels are checked against. Accumulations that span many terms
/// (norms, losses) use Double.
public final class CPUBackend: HostFileBacking, TensorStorageOwner, OpProfiling {
    public let name = "cpu"
    public let ledger = MemoryLedger()
    public let precision = Precision.fp32
    public let computes = true
    /// Where every op reports while a step is profiled (`OpProfiling`, host clock), nil otherwise.
    nonisolated(unsafe) public var profiler: OpProfiler?

    /// Packed rows, the CPU's own layout; tests ask for `.cuda`'s to run the model's padded layout here.
    public let rowPadding: RowPadding

    public init(rowPadding: RowPadding = .none) {
        self.rowPadding = rowPadding
        _ = CPUThreads.processDefault  // reads RELORA_CPU_THREADS (and warns) up front
        _ = CPUThreads.pinOpenBLAS
    }

    /// Where host-tagged tensors (`MemoryTag.isHost`: the `master` policy's f32 copies) live: nil for RAM,
    /// else a directory for memory-mapped files (`master_copies: file`), each unlinked as soon as it is mapped.
    public var hostFileDirectory: String? {
        get { mappedLock.lock(); defer { mappedLock.unlock() }; return fileDirectory }
        set { mappedLock.lock(); fileDirectory = newValue; mappedLock.unlock() }
    }
    private let mappedLock = NSLock()
    nonisolated(unsafe) private var fileDirectory: String?
    /// Storage that is a file mapping (released with munmap), by address.
    nonisolated(unsafe) private var mapped: Set<UnsafeMutableRawPointer> = []

    public func makeProfileClock() -> ProfileClock { HostProfileClock() }

    // MARK: Memory

    public func makeTensor(_ shape: [Int], dtype: DType, tag: MemoryTag, zeroed: Bool) -> Tensor {
        let bytes = shape.reduce(1, *) * dtype.byteSize
        let storage: UnsafeMutableRawPointer
        if tag.isHost, let dir = hostFileDirectory, bytes > 0 {
            storage = mapFile(bytes, in: dir)  // a fresh file reads as zeros
        } else {
            // 64-byte alignment: whole cache lines, and what AVX-512 loads like.
            storage = UnsafeMutableRawPointer.allocate(byteCount: max(bytes, 1), alignment: 64)
            if zeroed { storage.initializeMemory(as: UInt8.self, repeating: 0, count: max(bytes, 1)) }
        }
        ledger.allocated(bytes, tag)
        return Tensor(shape: shape, dtype: dtype, tag: tag, storage: storage, owner: self)
    }

    public func release(_ tensor: TensorRelease) {
        if let storage = tensor.storage {
            mappedLock.lock()
            let wasMapped = mapped.remove(storage) != nil
            mappedLock.unlock()
            if wasMapped { munmap(storage, tensor.byteCount) } else { storage.deallocate() }
        }
        ledger.freed(tensor.byteCount, tensor.tag)
    }

    /// A shared mapping of a new `bytes`-long file in `dir`, unlinked at once (the mapping keeps it alive).
    /// Failing here means the disk or the directory cannot hold the copy (the trainer checked the free
    /// space, but a quota, a file-size limit or another writer can still refuse it): the file is removed and
    /// the process stops with one sentence (`ResourceExhaustion`), before training (the copies are made
    /// when the model is built).
    private func mapFile(_ bytes: Int, in dir: String) -> UnsafeMutableRawPointer {
        let path = dir + "/.master-copy-\(getpid())-\(UUID().uuidString)"
        let held = ledger.report().hostLiveTotal
        func stop(_ what: String, _ error: Int32) -> Never {
            unlink(path)
            ResourceExhaustion.stop("master_copies file: \(what) (\(String(cString: strerror(error))); \(formatBytes(held)) of master copies mapped so far); free space in \(dir) (or lift its quota), choose another run_dir, or set master_copies ram; " + ResourceExhaustion.resumeAdvice)
        }
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0o600)
        guard fd >= 0 else { stop("cannot create \(path)", errno) }
        defer { close(fd); unlink(path) }
        if ftruncate(fd, off_t(bytes)) != 0 { stop("cannot reserve \(formatBytes(bytes)) in \(dir)", errno) }
        let reserved = posix_fallocate(fd, 0, off_t(bytes))  // returns the error number
        if reserved != 0 { stop("cannot reserve \(formatBytes(bytes)) in \(dir)", reserved) }
        guard let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            stop("cannot map \(formatBytes(bytes)) from \(dir)", errno)
        }
        mappedLock.lock(); mapped.insert(p); mappedLock.unlock()
        return p
    }

    // MARK: Transfers and fills

    public func upload(_ values: [Float], to tensor: Tensor) {
        let span = profiler?.begin(.transfer, .transfer(bytes: tensor.byteCount)); defer { span?.end() }
        precondition(values.count == tensor.count, "upload: \(values.count) values into a tensor of \(tensor.count)")
        ledger.uploaded(tensor.byteCount)
        values.withUnsafeBytes { HostConversion.convert($0.baseAddress!, .f32, tensor.storage!, tensor.dtype, count: values.count) }
    }

    public func upload(_ values: [Int32], to tensor: Tensor) {
        let span = profiler?.begin(.transfer, .transfer(bytes: tensor.byteCount)); defer { span?.end() }
        precondition(values.count == tensor.count, "upload: \(values.count) ids into a tensor of \(tensor.count)")
        ledger.uploaded(tensor.byteCount)
        values.withUnsafeBufferPointer { tensor.i32.update(from: $0.baseAddress!, count: values.count) }
    }

    public func upload(raw: UnsafeRawBufferPointer, dtype: DType, to tensor: Tensor) {
        let span = profiler?.begin(.transfer, .transfer(bytes: tensor.byteCount)); defer { span?.end() }
        precondition(raw.count == tensor.count * dtype.byteSize, "upload: \(raw.count) bytes of \(dtype.rawValue) into a tensor of \(tensor.count)")
        ledger.uploaded(tensor.byteCount)
        if tensor.count > 0 { HostConversion.convert(raw.baseAddress!, dtype, tensor.storage!, tensor.dtype, count: tensor.count) }
    }

    public func download(_ tensor: Tensor) -> [Float] {
        let span = profiler?.begin(.transfer, .transfer(bytes: tensor.byteCount)); defer { span?.end() }
        ledger.downloaded(tensor.byteCount)
        var out = [Float](repeating: 0, count: tensor.count)
        out.withUnsafeMutableBytes { HostConversion.convert(tensor.storage!, tensor.dtype, $0.baseAddress!, .f32, count: tensor.count) }
        return out
    }

    public func copy(_ src: Tensor, to dst: Tensor) {
        let span = profiler?.begin(.elementwise, .copy(src, dst)); defer { span?.end() }
        precondition(src.count == dst.count, "copy: \(src.count) into \(dst.count)")
        HostConversion.convert(src.storage!, src.dtype, dst.storage!, dst.dtype, count: src.count)
    }

    public func zero(_ tensor: Tensor) {
        let span = profiler?.begin(.elementwise, .fill(tensor)); defer { span?.end() }
        tensor.hostBytes.initializeMemory(as: UInt8.self, repeating: 0)
    }

    public func fill(_ tensor: Tensor, value: Float) {
        let span = profiler?.begin(.elementwise, .fill(tensor)); defer { span?.end() }
        tensor.f32.update(repeating: value, count: tensor.count)
    }

    public func fillUniform(_ tensor: Tensor, bound: Float, seed: UInt64, stream: UInt64) {
        let span = profiler?.begin(.elementwise, .fill(tensor, flopsPerElement: 2)); defer { span?.end() }
        let p = tensor.f32
        for i in 0..<tensor.count { p[i] = (2 * relora_rng_uniform(seed, stream, UInt64(i)) - 1) * bound }
    }

    public func fillNormal(_ tensor: Tensor, std: Float, seed: UInt64, stream: UInt64) {
        let span = profiler?.begin(.elementwise, .fill(tensor, flopsPerElement: 8)); defer { span?.end() }
        let p = tensor.f32
        for i in 0..<tensor.count {
            let u1 = Double(relora_rng_u64(seed, stream, UInt64(2 * i)) >> 11) * 0x1p-53
            let u2 = Double(relora_rng_u64(seed, stream, UInt64(2 * i + 1)) >> 11) * 0x1p-53
            let r = (-2 * Foundation.log(1 - u1)).squareRoot()  // 1 - u1 in (0, 1]: log is finite
            p[i] = Float(r * Foundation.cos(2 * Double.pi * u2)) * std
        }
    }

    // MARK: RMSNorm

    public func rmsnormForward(_ x: Tensor, weight: Tensor, out: Tensor, rstd: Tensor, rows: Int, dim: Int, eps: Float) {
        let span = profiler?.begin(.norm, .rmsnorm(forward: true, rows: rows, dim: dim, elementBytes: x.dtype.byteSize))
        defer { span?.end() }
        let xp = x.f32, wp = weight.f32, op = out.f32, rp = rstd.f32
        parallelChunks(rows, minPerChunk: 16) { _, range in
            for r in range {
                let xr = xp + r * dim, orow = op + r * dim
                var ss: Float = 0
                for i in 0..<dim { ss += xr[i] * xr[i] }
                let s = 1 / (ss / Float(dim) + eps).squareRoot()
                rp[r] = s
                for i in 0..<dim { orow[i] = xr[i] * s * wp[i] }
            }
        }
    }

    /// With g = w * dy and s = rstd: dx_i += s*g_i - s^3 * x_i * (sum_j g_j x_j) / dim; dw_i += dy_i x_i s.
    /// dweight sums over the rows: one partial row per block of rows (at least 16 rows, at most 64 blocks,
    /// fixed by `rows`), added into dweight in block order, the columns in parallel.
    public func rmsnormBackward(_ dout: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                                dx: Tensor, dweight: Tensor, rows: Int, dim: Int) {
        let span = profiler?.begin(.norm, .rmsnorm(forward: false, rows: rows, dim: dim, elementBytes: x.dtype.byteSize))
        defer { span?.end() }
        let dyp = dout.f32, xp = x.f32, wp = weight.f32, rp = rstd.f32, dxp = dx.f32
        let blocks = ReductionBlocks(rows, minSize: 16, maxBlocks: 64)
        let partial = UnsafeMutablePointer<Float>.allocate(capacity: max(1, blocks.blockCount * dim))
        defer { partial.deallocate() }
        blocks.forEach { block, range in
            let dw = partial + block * dim
            dw.initialize(repeating: 0, count: dim)
            for r in range {
                let dy = dyp + r * dim, xr = xp + r * dim, dxr = dxp + r * dim
                let s = rp[r]
                var dot: Float = 0
                for i in 0..<dim { dot += wp[i] * dy[i] * xr[i] }
                let c = s * s * s * dot / Float(dim)
                for i in 0..<dim {
                    dxr[i] += s * wp[i] * dy[i] - c * xr[i]
                    dw[i] += dy[i] * xr[i] * s
                }
            }
        }
        let dwp = dweight.f32, n = blocks.blockCount
        parallelChunks(dim, minPerChunk: 256) { _, columns in
            for b in 0..<n {
                let p = partial + b * dim
                for i in columns { dwp[i] += p[i] }
            }
        }
    }

    // MARK: RoPE

    /// cos/sin tables `[seqLen, headDim/2]`, cached per (seqLen, headDim, theta).
    private let ropeCacheLock = NSLock()
    nonisolated(unsafe) private var ropeCache: [String: (cos: [Float], sin: [Float])] = [:]

    func ropeTables(seqLen: Int, headDim: Int, theta: Float) -> (cos: [Float], sin: [Float]) {
        let key = "\(seqLen)/\(headDim)/\(theta)"
        ropeCacheLock.lock(); defer { ropeCacheLock.unlock() }
        if let t = ropeCache[key] { return t }
        let tables = RoPETables.make(seqLen: seqLen, headDim: headDim, theta: theta)
        ropeCache[key] = tables
        return tables
    }

    public func rope(_ x: Tensor, batch: Int, seqLen: Int, heads: Int, headDim: Int, theta: Float, inverse: Bool) {
        let span = profiler?.begin(.elementwise, .rope(count: batch * seqLen * heads * headDim, elementBytes: x.dtype.byteSize))
        defer { span?.end() }
        rotate(x, rows: batch * seqLen, seqLen: seqLen, first: 0, tableLength: seqLen, heads: heads, headDim: headDim,
               theta: theta, inverse: inverse)
    }

    /// The table of the smallest power of two of positions (at least 64) that holds the rows: a table's
    /// values at a position do not depend on its length (`RoPETables`), so the bits are `rope`'s.
    public func ropeAt(_ x: Tensor, rows: Int, position: Int, heads: Int, headDim: Int, theta: Float) {
        precondition(position >= 0 && rows >= 0, "ropeAt: negative position or rows")
        let span = profiler?.begin(.elementwise, .rope(count: rows * heads * headDim, elementBytes: x.dtype.byteSize))
        defer { span?.end() }
        var length = 64
        while length < position + rows { length *= 2 }
        rotate(x, rows: rows, seqLen: rows, first: position, tableLength: length, heads: heads, headDim: headDim,
               theta: theta, inverse: false)
    }

    /// Row n of x at position `first + n % seqLen`, rotated with the table of `tableLength` positions.
    private func rotate(_ x: Tensor, rows: Int, seqLen: Int, first: Int, tableLength: Int, heads: Int, headDim: Int,
                        theta: Float, inverse: Bool) {
        let (cosT, sinT) = ropeTables(seqLen: tableLength, headDim: headDim, theta: theta)
        let half = headDim / 2, width = heads * headDim
        let sign: Float = inverse ? -1 : 1
        let xp = x.f32
        cosT.withUnsafeBufferPointer { cp in
            sinT.withUnsafeBufferPointer { sp in
                let cb = cp.baseAddress!, sb = sp.baseAddress!
                parallelChunks(rows, minPerChunk: 8) { _, range in
                    for n in range {
                        let pos = first + n % seqLen
                        let cr = cb + pos * half, sr = sb + pos * half
                        for h in 0..<heads {
                            let v = xp + n * width + h * headDim
                            for i in 0..<half {
                                let a = v[i], b = v[i + half], c = cr[i], s = sign * sr[i]
                                v[i] = a * c - b * s
                                v[i + half] = b * c + a * s
                            }
                        }
                    }
                }
            }
        }
    }

    // MARK: Attention

    /// How many (batch, kv head) pairs the CPU attention runs at once, each with its own score scratch:
    /// fixed by the shape (at most 8), so the scratch, and the memory plan, do not depend on the thread count.
    static func attentionSlots(batch: Int, kvHeads: Int) -> Int { max(1, min(batch * kvHeads, 8)) }

    /// The CPU attention's score scratch, one `[T, T]` per slot (the forward needs one set, the backward
    /// two plus a `[slots, T]` row). Allocated through the ledger (tag `.workspace`) so plans count it too.
    static func attentionScratchShape(seqLen T: Int, slots: Int) -> [Int] { [slots, T, T] }

    /// The (batch, kv head) pairs of causal attention in parallel, the query heads of a pair in order on one
    /// thread with one scratch slot, every product one OpenBLAS call on that thread: each output (and each
    /// dK, dV sum over a group's query heads) is computed the same way whichever thread runs it.
    public func attentionForward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 batch: Int, seqLen T: Int, heads: Int, kvHeads: Int, headDim D: Int) {
        let span = profiler?.begin(.attentionForward, .attention(forward: true, batch: batch, seqLen: T, heads: heads,
                                                                 kvHeads: kvHeads, headDim: D, elementBytes: q.dtype.byteSize))
        defer { span?.end() }
        let group = heads / kvHeads
        let qs = heads * D, ks = kvHeads * D  // row strides
        let scale = 1 / Float(D).squareRoot()
        let slots = Self.attentionSlots(batch: batch, kvHeads: kvHeads)
        let scoresTensor = makeTensor(Self.attentionScratchShape(seqLen: T, slots: slots), tag: .workspace, zeroed: false)
        let qp = q.f32, kp = k.f32, vp = v.f32, op = out.f32, lp = lse.f32, sp = scoresTensor.f32
        parallelTasks(batch * kvHeads, workers: slots) { pair, slot in
            let b = pair / kvHeads, kvh = pair % kvHeads
            let scores = sp + slot * T * T
            let kh = kp + b * T * ks + kvh * D
            let vh = vp + b * T * ks + kvh * D
            for h in kvh * group ..< (kvh + 1) * group {
                let qh = qp + b * T * qs + h * D
                let oh = op + b * T * qs + h * D
                // S = scale * Q K^T  [T, T]; only j <= i is used (causal).
                Self.sgemmOneThread(qh, kh, scores, m: T, n: T, k: D, lda: qs, ldb: ks, ldc: T,
                                    transA: false, transB: true, alpha: scale, beta: 0)
                let lrow = lp + (b * heads + h) * T
                for i in 0..<T {
                    let row = scores + i * T
                    var mx = -Float.infinity
                    for j in 0...i { mx = max(mx, row[j]) }
                    var sum: Float = 0
                    for j in 0...i { let e = expf(row[j] - mx); row[j] = e; sum += e }
                    let inv = 1 / sum
                    for j in 0...i { row[j] *= inv }
                    for j in (i + 1)..<T { row[j] = 0 }
                    lrow[i] = mx + logf(sum)
                }
                // O = P V  [T, D]
                Self.sgemmOneThread(scores, vh, oh, m: T, n: D, k: T, lda: T, ldb: ks, ldc: qs,
                                    transA: false, transB: false, alpha: 1, beta: 0)
            }
        }
    }

    /// Row `position` of `attentionForward`'s computation, per query head: the scores of keys `0 ... position`
    /// as one OpenBLAS product (`[1, position + 1]`), the same softmax loop, then `P V` (`[1, D]`, k =
    /// position + 1). The forward's products have more rows (and k = T for `P V`, with zeros past the
    /// diagonal), which OpenBLAS may block differently, so a row can differ from the forward's in the last
    /// bits (docs/checkpoints-and-export.md, KVCacheTests).
    public func attentionDecode(q: Tensor, kCache: Tensor, vCache: Tensor, out: Tensor, position: Int,
                                heads: Int, kvHeads: Int, headDim D: Int) {
        let keys = position + 1, group = heads / kvHeads, ks = kvHeads * D
        precondition(position >= 0 && kCache.count >= keys * ks && vCache.count >= keys * ks && q.count >= heads * D
                     && out.count >= heads * D, "attentionDecode: operand too small")
        let scale = 1 / Float(D).squareRoot()
        let scoresTensor = makeTensor([heads, keys], tag: .workspace, zeroed: false)
        let qp = q.f32, kp = kCache.f32, vp = vCache.f32, op = out.f32, sp = scoresTensor.f32
        parallelTasks(heads, workers: min(heads, 8)) { h, _ in
            let row = sp + h * keys
            let kh = kp + (h / group) * D, vh = vp + (h / group) * D
            Self.sgemmOneThread(qp + h * D, kh, row, m: 1, n: keys, k: D, lda: heads * D, ldb: ks, ldc: keys,
                                transA: false, transB: true, alpha: scale, beta: 0)
            var mx = -Float.infinity
            for j in 0..<keys { mx = max(mx, row[j]) }
            var sum: Float = 0
            for j in 0..<keys { let e = expf(row[j] - mx); row[j] = e; sum += e }
            let inv = 1 / sum
            for j in 0..<keys { row[j] *= inv }
            Self.sgemmOneThread(row, vh, op + h * D, m: 1, n: D, k: keys, lda: keys, ldb: ks, ldc: heads * D,
                                transA: false, transB: false, alpha: 1, beta: 0)
        }
    }

    /// With P recomputed from the saved lse: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    /// dQ = scale * dS K, dK = scale * dS^T Q. dK and dV sum over the query heads of a group, in head order.
    public func attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  dq: Tensor, dk: Tensor, dv: Tensor,
                                  batch: Int, seqLen T: Int, heads: Int, kvHeads: Int, headDim D: Int) {
        let span = profiler?.begin(.attentionBackward, .attention(forward: false, batch: batch, seqLen: T, heads: heads,
                                                                  kvHeads: kvHeads, headDim: D, elementBytes: q.dtype.byteSize))
        defer { span?.end() }
        let group = heads / kvHeads
        let qs = heads * D, ks = kvHeads * D
        let scale = 1 / Float(D).squareRoot()
        let slots = Self.attentionSlots(batch: batch, kvHeads: kvHeads)
        let probsTensor = makeTensor(Self.attentionScratchShape(seqLen: T, slots: slots), tag: .workspace, zeroed: false)
        let dprobsTensor = makeTensor(Self.attentionScratchShape(seqLen: T, slots: slots), tag: .workspace, zeroed: false)
        let rowDotTensor = makeTensor([slots, T], tag: .workspace, zeroed: false)
        let pp = probsTensor.f32, dpp = dprobsTensor.f32, rp = rowDotTensor.f32
        zero(dk); zero(dv)
        let qp = q.f32, kp = k.f32, vp = v.f32, op = out.f32, lp = lse.f32, dop = dout.f32
        let dqp = dq.f32, dkp = dk.f32, dvp = dv.f32
        parallelTasks(batch * kvHeads, workers: slots) { pair, slot in
            let b = pair / kvHeads, kvh = pair % kvHeads
            let probs = pp + slot * T * T, dprobs = dpp + slot * T * T, rowDot = rp + slot * T
            let kh = kp + b * T * ks + kvh * D, vh = vp + b * T * ks + kvh * D
            let dkh = dkp + b * T * ks + kvh * D, dvh = dvp + b * T * ks + kvh * D
            for h in kvh * group ..< (kvh + 1) * group {
                let qh = qp + b * T * qs + h * D, oh = op + b * T * qs + h * D, doh = dop + b * T * qs + h * D
                let dqh = dqp + b * T * qs + h * D
                let lrow = lp + (b * heads + h) * T
                Self.sgemmOneThread(qh, kh, probs, m: T, n: T, k: D, lda: qs, ldb: ks, ldc: T,
                                    transA: false, transB: true, alpha: scale, beta: 0)
                // dP = dO V^T
                Self.sgemmOneThread(doh, vh, dprobs, m: T, n: T, k: D, lda: qs, ldb: ks, ldc: T,
                                    transA: false, transB: true, alpha: 1, beta: 0)
                for i in 0..<T {
                    var dot: Float = 0
                    for d in 0..<D { dot += doh[i * qs + d] * oh[i * qs + d] }
                    rowDot[i] = dot
                    let p = probs + i * T, dp = dprobs + i * T
                    let l = lrow[i]
                    for j in 0...i {
                        let pij = expf(p[j] - l)
                        p[j] = pij
                        dp[j] = pij * (dp[j] - dot)
                    }
                    for j in (i + 1)..<T { p[j] = 0; dp[j] = 0 }
                }
                // dV += P^T dO   [T, D]
                Self.sgemmOneThread(probs, doh, dvh, m: T, n: D, k: T, lda: T, ldb: qs, ldc: ks,
                                    transA: true, transB: false, alpha: 1, beta: 1)
                // dQ = scale * dS K   [T, D]
                Self.sgemmOneThread(dprobs, kh, dqh, m: T, n: D, k: T, lda: T, ldb: ks, ldc: qs,
                                    transA: false, transB: false, alpha: scale, beta: 0)
                // dK += scale * dS^T Q   [T, D]
                Self.sgemmOneThread(dprobs, qh, dkh, m: T, n: D, k: T, lda: T, ldb: qs, ldc: ks,
                                    transA: true, transB: false, alpha: scale, beta: 1)
            }
        }
    }

    // MARK: SwiGLU

    public func swigluForward(gate: Tensor, up: Tensor, out: Tensor, count: Int) {
        let span = profiler?.begin(.elementwise, .swiglu(forward: true, count: count, elementBytes: gate.dtype.byteSize))
        defer { span?.end() }
        let g = gate.f32, u = up.f32, o = out.f32
        parallelChunks(count, minPerChunk: 4096) { _, range in
            for i in range {
                let x = g[i]
                o[i] = x / (1 + expf(-x)) * u[i]
            }
        }
    }

    /// silu(x) = x*sig(x); silu'(x) = sig(x) * (1 + x*(1 - sig(x))).
    public func swigluBackward(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, count: Int) {
        let span = profiler?.begin(.elementwise, .swiglu(forward: false, count: count, elementBytes: gate.dtype.byteSize))
        defer { span?.end() }
        let dy = dout.f32, g = gate.f32, u = up.f32, dg = dgate.f32, du = dup.f32
        parallelChunks(count, minPerChunk: 4096) { _, range in
            for i in range {
                let x = g[i]
                let sig = 1 / (1 + expf(-x))
                let silu = x * sig
                du[i] = dy[i] * silu
                dg[i] = dy[i] * u[i] * sig * (1 + x * (1 - sig))
            }
        }
    }

    // MARK: Embedding

    public func embeddingForward(ids: Tensor, table: Tensor, out: Tensor, dim: Int) {
        let span = profiler?.begin(.embedding, .embedding(forward: true, tokens: ids.count, dim: dim,
                                                          elementBytes: table.dtype.byteSize))
        defer { span?.end() }
        let tp = table.f32, op = out.f32, ip = ids.i32
        for n in 0..<ids.count {
            (op + n * dim).update(from: tp + Int(ip[n]) * dim, count: dim)
        }
    }

    public func embeddingBackward(ids: Tensor, dout: Tensor, dtable: Tensor, dim: Int) {
        let span = profiler?.begin(.embedding, .embedding(forward: false, tokens: ids.count, dim: dim,
                                                          elementBytes: dout.dtype.byteSize))
        defer { span?.end() }
        let dp = dout.f32, tp = dtable.f32, ip = ids.i32, n = ids.count
        // Sequential over tokens so repeated ids accumulate in a fixed order; parallel over columns.
        parallelChunks(dim, minPerChunk: 64) { _, cols in
            for t in 0..<n {
                let src = dp + t * dim, dst = tp + Int(ip[t]) * dim
                for c in cols { dst[c] += src[c] }
            }
        }
    }

    // MARK: Cross-entropy

    public func crossEntropy(logits: Tensor, targets: Tensor, losses: Tensor, rows: Int, vocab: Int,
                             gradScale: Float?, ld: Int) -> Double {
        let span = profiler?.begin(.crossEntropy, .crossEntropy(rows: rows, vocab: vocab, elementBytes: logits.dtype.byteSize,
                                                                withGradient: gradScale != nil))
        defer { span?.end() }
        precondition(targets.count == rows, "crossEntropy: \(targets.count) targets for \(rows) rows")
        let stride = StoredMatrix.stride(of: logits, rows: rows, cols: vocab, ld: ld, "crossEntropy")
        let lp = logits.f32, lossp = losses.f32, tb = targets.i32
        ledger.downloaded(MemoryLayout<Double>.size)  // the returned sum
        parallelChunks(rows, minPerChunk: 4) { _, range in
            for r in range {
                let row = lp + r * stride
                let target = Int(tb[r])
                if target < 0 {
                    lossp[r] = 0
                    if gradScale != nil { row.update(repeating: 0, count: vocab) }
                    continue
                }
                let mx = rowMax(row, vocab)
                let targetLogit = row[target]
                let sum: Float
                if let g = gradScale {
                    // One exp per logit: keep exp(x - max) in place, then scale it into softmax.
                    sum = expShiftedSum(row, row, vocab, shift: mx)
                    let inv = SIMD8<Float>(repeating: g / sum)
                    var j = 0
                    while j + 8 <= vocab { storeSIMD8(loadSIMD8(row + j) * inv, row + j); j += 8 }
                    while j < vocab { row[j] *= inv[0]; j += 1 }
                    row[target] -= g
                } else {
                    sum = expShiftedSum(row, nil, vocab, shift: mx)
                }
                lossp[r] = mx + logf(sum) - targetLogit
            }
        }
        // The sum in row order, after the rows: the same bits with any thread count (a few thousand adds).
        var total = 0.0
        for r in 0..<rows { total += Double(lossp[r]) }
        return total
    }

    // MARK: Elementwise

    public func dropout(_ x: Tensor, _ out: Tensor, count: Int, p: Float, seed: UInt64, stream: UInt64, cols: Int, ld: Int) {
        let span = profiler?.begin(.elementwise, .dropout(count: count, elementBytes: x.dtype.byteSize)); defer { span?.end() }
        let (rowLength, stride) = StoredMatrix.elementRows(count: count, cols: cols, ld: ld, x, out, op: "dropout")
        let xp = x.f32, op = out.f32
        let keep = 1 / (1 - p)
        parallelChunks(count, minPerChunk: 1 << 14) { _, r in
            for i in r {
                let at = i / rowLength * stride + i % rowLength
                op[at] = relora_rng_uniform(seed, stream, UInt64(i)) >= p ? xp[at] * keep : 0
            }
        }
    }

    public func dotAccumulate(_ a: Tensor, _ b: Tensor, count: Int, into out: Tensor) {
        let span = profiler?.begin(.reduction, .dot(count: count, elementBytes: a.dtype.byteSize)); defer { span?.end() }
        precondition(count <= a.count && count <= b.count)
        let ap = a.f32, bp = b.f32
        var acc = 0.0
        for i in 0..<count { acc += Double(ap[i]) * Double(bp[i]) }
        out.f32[0] += Float(acc)
    }

    public func axpy(_ alpha: Float, _ b: Tensor, _ a: Tensor, count: Int) {
        let span = profiler?.begin(.elementwise, .axpy(count: count, bBytes: b.dtype.byteSize, aBytes: a.dtype.byteSize))
        defer { span?.end() }
        precondition(count <= a.count && count <= b.count)
        let ap = a.f32, bp = b.f32
        parallelChunks(count, minPerChunk: 1 << 15) { _, r in for i in r { ap[i] += alpha * bp[i] } }
    }

    public func scale(_ x: Tensor, by alpha: Float) {
        let span = profiler?.begin(.elementwise, .scale(x)); defer { span?.end() }
        let p = x.f32
        parallelChunks(x.count, minPerChunk: 1 << 15) { _, r in for i in r { p[i] *= alpha } }
    }

    public func sumOfSquares(_ x: Tensor, into out: Tensor, at index: Int) {
        let span = profiler?.begin(.reduction, .sumOfSquares(x)); defer { span?.end() }
        out.f32[index] = Float(Self.sumOfSquares(x.f32, count: x.count))
    }

    /// Float sums over runs of 256 (SIMD lanes), Double across the runs of each 2^16-element block, and the
    /// blocks' partials added in block order: the blocks are fixed by `count`, so the bits are too.
    static func sumOfSquares(_ p: UnsafeMutablePointer<Float>, count: Int) -> Double {
        if count == 0 { return 0 }
        let blocks = ReductionBlocks(count, size: 1 << 16)
        var partial = [Double](repeating: 0, count: blocks.blockCount)
        partial.withUnsafeMutableBufferPointer { out in
            let o = out.baseAddress!
            blocks.forEach { block, range in
                var acc = 0.0
                var i = range.lowerBound
                while i < range.upperBound {
                    let end = min(range.upperBound, i + 256)
                    var s8 = SIMD8<Float>()
                    var j = i
                    while j + 8 <= end {
                        let v = UnsafeRawPointer(p + j).loadUnaligned(as: SIMD8<Float>.self)
                        s8 += v * v
                        j += 8
                    }
                    var s = s8.sum()
                    while j < end { s += p[j] * p[j]; j += 1 }
                    acc += Double(s)
                    i = end
                }
                o[block] = acc
            }
        }
        return partial.reduce(0, +)
    }

    public func adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, lr: Float, beta1: Float, beta2: Float,
                      eps: Float, weightDecay: Float, step: Int) {
        let span = profiler?.begin(.optimizer, .adamw(count: param.count)); defer { span?.end() }
        precondition(param.count == grad.count && m.count == param.count && v.count == param.count)
        let p = param.f32, g = grad.f32, mp = m.f32, vp = v.f32
        let bc1 = 1 - Float(pow(Double(beta1), Double(step)))
        let bc2 = 1 - Float(pow(Double(beta2), Double(step)))
        let stepSize = lr / bc1
        let bc2Sqrt = bc2.squareRoot()
        let decay = 1 - lr * weightDecay
        parallelChunks(param.count, minPerChunk: 1 << 14) { _, r in
            // 8 lanes at a time (the pointers are distinct tensors, but the compiler cannot know
            // that, so the scalar loop would not vectorize), then the scalar tail.
            var i = r.lowerBound
            let b1 = SIMD8<Float>(repeating: beta1), b2 = SIMD8<Float>(repeating: beta2)
            let c1 = SIMD8<Float>(repeating: 1 - beta1), c2 = SIMD8<Float>(repeating: 1 - beta2)
            let dec = SIMD8<Float>(repeating: decay), step8 = SIMD8<Float>(repeating: stepSize)
            let bcs = SIMD8<Float>(repeating: bc2Sqrt), eps8 = SIMD8<Float>(repeating: eps)
            while i + 8 <= r.upperBound {
                let gi = UnsafeRawPointer(g + i).loadUnaligned(as: SIMD8<Float>.self)
                let mi = b1 * UnsafeRawPointer(mp + i).loadUnaligned(as: SIMD8<Float>.self) + c1 * gi
                let vi = b2 * UnsafeRawPointer(vp + i).loadUnaligned(as: SIMD8<Float>.self) + c2 * gi * gi
                let pi = UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<Float>.self)
                let newP = pi * dec - step8 * mi / (vi.squareRoot() / bcs + eps8)
                UnsafeMutableRawPointer(mp + i).storeBytes(of: mi, as: SIMD8<Float>.self)
                UnsafeMutableRawPointer(vp + i).storeBytes(of: vi, as: SIMD8<Float>.self)
                UnsafeMutableRawPointer(p + i).storeBytes(of: newP, as: SIMD8<Float>.self)
                i += 8
            }
            while i < r.upperBound {
                let gi = g[i]
                let mi = beta1 * mp[i] + (1 - beta1) * gi
                let vi = beta2 * vp[i] + (1 - beta2) * gi * gi
                mp[i] = mi
                vp[i] = vi
                p[i] = p[i] * decay - stepSize * mi / (vi.squareRoot() / bc2Sqrt + eps)
                i += 1
            }
        }
    }

    /// Blocks of 256 in parallel chunks; each block is `relora_adamw8_block`, the reference itself, with the
    /// host search index (the same codes as the binary search, tested).
    public func adamw8bit(param: Tensor, grad: Tensor, m: BlockwiseMoments, v: BlockwiseMoments, lr: Float, beta1: Float,
                          beta2: Float, eps: Float, weightDecay: Float, step: Int) {
        let span = profiler?.begin(.optimizer, .adamw8bit(count: param.count)); defer { span?.end() }
        let n = param.count
        checkMoments("adamw8bit", count: n, m, v, f32: param, grad)
        precondition(m.isSigned && !v.isSigned, "adamw8bit: m takes the signed map, v the unsigned one")
        var scalars = relora_adam_scalars_make(lr, beta1, beta2, eps, weightDecay, Int64(step))
        let p = param.f32, g = grad.f32, maps = BlockwiseMoments.maps, index = BlockwiseMoments.index
        let mc = m.codes.u8, ma = m.absmax.f32
        let vc = v.codes.u8, va = v.absmax.f32
        parallelChunks(BlockwiseMoments.blocks(n), minPerChunk: 64) { _, r in
            for b in r { relora_adamw8_block(maps, index, &scalars, p, g, mc, ma, vc, va, Int64(n), Int64(b)) }
        }
    }

    public func dequantizeMoments(_ moments: BlockwiseMoments, into out: Tensor) {
        let span = profiler?.begin(.optimizer, .convertMoments(count: out.count)); defer { span?.end() }
        checkMoments("dequantizeMoments", count: out.count, moments, f32: out)
        let map = BlockwiseMoments.map(signed: moments.isSigned), block = Int(RELORA_ADAM8_BLOCK)
        let c = moments.codes.u8, a = moments.absmax.f32, o = out.f32
        for i in 0..<out.count { o[i] = relora_adam8_value(map, c[i], a[i / block]) }
    }

    public func quantizeMoments(_ x: Tensor, into moments: BlockwiseMoments) {
        let span = profiler?.begin(.optimizer, .convertMoments(count: x.count)); defer { span?.end() }
        let n = x.count
        checkMoments("quantizeMoments", count: n, moments, f32: x)
        let map = BlockwiseMoments.map(signed: moments.isSigned)
        let c = moments.codes.u8, a = moments.absmax.f32, xp = x.f32
        let index = BlockwiseMoments.index(signed: moments.isSigned)
        for b in 0..<BlockwiseMoments.blocks(n) { relora_adam8_quantize_block(map, index, xp, c, a, Int64(n), Int64(b)) }
    }

    // MARK: Pruning (optimizer reset)

    /// Magnitude pruning finds the exact k-th smallest |x| (k = ceil(ratio * n)) without sorting or
    /// copying: for non-negative IEEE floats the bit pattern orders like the value, so a two-pass radix
    /// select on the 32-bit patterns of |x| (a 65,536-bin histogram of the high 16 bits, then of the
    /// low 16 bits inside the chosen bin) gives the threshold in O(n) time and O(1) extra memory.
    /// Entries equal to the threshold are zeroed too, so ties (e.g. many exact zeros) can raise the
    /// fraction above `ratio`; for continuous values it is k/n.
    public func prune(_ tensor: Tensor, _ rule: PruneRule, seed: UInt64, stream: UInt64) -> Int {
        ledger.downloaded(MemoryLayout<Int>.size)  // the returned count
        let n = tensor.count
        guard n > 0 else { return 0 }
        let p = tensor.f32
        switch rule {
        case .all:
            zero(tensor)
            return n
        case .random(let probability):
            var zeroed = 0
            for i in 0..<n where Double(relora_rng_uniform(seed, stream, UInt64(i))) < probability {
                p[i] = 0
                zeroed += 1
            }
            return zeroed
        case .magnitude(let ratio):
            let k = PruneRule.magnitudeRank(ratio: ratio, of: n)
            guard k > 0 else { return 0 }
            if k >= n { zero(tensor); return n }
            let threshold = Self.kthSmallestMagnitudeBits(p, n, k)
            var zeroed = 0
            for i in 0..<n where p[i].bitPattern & 0x7FFF_FFFF <= threshold {
                p[i] = 0
                zeroed += 1
            }
            return zeroed
        }
    }

    /// The scores `|m| / (sqrt(v) + eps)` go into a host buffer of n floats (the CPU's workspace; a GPU
    /// kernel keeps them on the device) and the same radix select as `prune` finds the k-th smallest.
    public func pruneMoments(m: Tensor, v: Tensor, ratio: Double, eps: Float) -> Int {
        let k: Int
        switch pruneMomentsPrologue(m: m, v: v, ratio: ratio) {
        case .done(let zeroed): return zeroed
        case .select(let rank): k = rank
        }
        let n = m.count
        let mp = m.f32, vp = v.f32
        var scores = [Float](repeating: 0, count: n)
        return scores.withUnsafeMutableBufferPointer { s in
            let sp = s.baseAddress!
            for i in 0..<n { sp[i] = abs(mp[i]) / (vp[i].squareRoot() + eps) }
            let threshold = Self.kthSmallestMagnitudeBits(sp, n, k)
            var zeroed = 0
            for i in 0..<n where sp[i].bitPattern & 0x7FFF_FFFF <= threshold {
                mp[i] = 0
                vp[i] = 0
                zeroed += 1
            }
            return zeroed
        }
    }

    /// Bit pattern of the k-th smallest |x| (1-based k) among p[0..<n]. NaNs sort above everything.
    static func kthSmallestMagnitudeBits(_ p: UnsafeMutablePointer<Float>, _ n: Int, _ k: Int) -> UInt32 {
        var hist = [Int](repeating: 0, count: 65536)
        for i in 0..<n { hist[Int((p[i].bitPattern & 0x7FFF_FFFF) >> 16)] += 1 }
        var remaining = k, high = 0
        while remaining > hist[high] { remaining -= hist[high]; high += 1 }
        hist = [Int](repeating: 0, count: 65536)
        for i in 0..<n {
            let bits = p[i].bitPattern & 0x7FFF_FFFF
            if Int(bits >> 16) == high { hist[Int(bits & 0xFFFF)] += 1 }
        }
        var low = 0
        while remaining > hist[low] { remaining -= hist[low]; low += 1 }
        return UInt32(high) << 16 | UInt32(low)
    }
}
