import CReLoRA
import Foundation

// What a CUDA process holds on its device, beyond the bytes of its tensors (the ledger's figure): the
// caching allocator's rounding and cache, the backend's persistent scratch, cuBLAS' workspace, the CUDA
// context and, in a data-parallel run, NCCL's buffers. The allocator's part is modelled exactly (the
// planning backend runs `CachingAllocatorModel`, the policy `DeviceAllocator` follows, over the same
// allocations; `CUDABackendTests` checks the two agree to the byte on the emulated device); the rest are
// estimates per GPU (`GPUProfile`), each derived below with its source. docs/memory.md explains them.

/// A caching allocator's counters: what `DeviceAllocator` measures on a device and `CachingAllocatorModel`
/// predicts in a plan.
public struct AllocatorStats: Sendable, Equatable {
    /// Bytes obtained from cudaMalloc and not returned (live blocks + the cache).
    public var reserved = 0
    public var peakReserved = 0
    /// Bytes in live blocks (rounded sizes).
    public var inUse = 0
    public var peakInUse = 0
    public var mallocCalls = 0
    public var cacheHits = 0
    /// Rounded bytes in live blocks by tag at the moment `inUse` first reached its peak.
    public var inUseAtPeakByTag: [MemoryTag: Int] = [:]

    public init() {}
}

/// The caching allocator's policy without memory, for plans. Sizes round up to 512 bytes below 1 MiB and to
/// 2 MiB from 1 MiB on (`roundedSize`); a freed block is cached under its rounded size and reused only for a
/// request of that same rounded size, so the allocator never splits or merges blocks. Hence the reservation
/// is, per rounded size, the most blocks of that size ever live at once: a step that frees its forward's
/// activations and allocates its backward's gradients of other sizes keeps both in the reservation.
///
/// `DeviceAllocator` (ReLoRACUDA) applies the same policy to real blocks; the one place it departs is a
/// failed cudaMalloc, after which it returns its cache to the device and retries (slower, not an error), so a
/// run needs at least `peakInUse` and, with memory to spare, reserves `peakReserved`. Thread-safe.
public final class CachingAllocatorModel: @unchecked Sendable {  // every var is read and written under `lock`
    private let lock = NSLock()
    private var counters = AllocatorStats()
    private var cachedBlocks: [Int: Int] = [:]  // rounded size -> free blocks of that size
    private var inUseByTag: [MemoryTag: Int] = [:]

    public init() {}

    /// The block size a request of `bytes` (> 0) gets: a multiple of 512 B below 1 MiB, of 2 MiB from 1 MiB on.
    public static func roundedSize(_ bytes: Int) -> Int {
        let small = 512, large = 2 << 20
        return bytes < (1 << 20) ? (bytes + small - 1) / small * small : (bytes + large - 1) / large * large
    }

    /// The backend's persistent scratch, allocated through the allocator when a `CUDABackend` starts and held
    /// until it ends, in its order: the reductions' workspace (8 KiB), the selects' (1 MiB, a 2 MiB block),
    /// the quantizers' failure word (8 B) and the 8-bit Adam moments' two maps (2 KiB). Not tensors, so not in
    /// the ledger: 2 MiB + 11 KiB of blocks.
    public static let persistentScratch: [Int] = [
        Int(RELORA_REDUCE_WORKSPACE_BYTES), Int(RELORA_SELECT_WORKSPACE_BYTES), 8,
        2 * Int(RELORA_ADAM8_MAP) * MemoryLayout<Float>.size,
    ]

    /// The blocks `persistentScratch` occupies.
    public static var persistentScratchBytes: Int { persistentScratch.reduce(0) { $0 + roundedSize($1) } }

    /// A block for a request of `bytes` (> 0) tagged `tag`: a cached one of the same rounded size if any,
    /// else a new one. Returns the block's size.
    @discardableResult
    public func allocate(_ bytes: Int, tag: MemoryTag) -> Int {
        precondition(bytes > 0, "CachingAllocatorModel.allocate: \(bytes) bytes")
        let size = Self.roundedSize(bytes)
        lock.lock(); defer { lock.unlock() }
        if let free = cachedBlocks[size], free > 0 {
            cachedBlocks[size] = free - 1
            counters.cacheHits += 1
        } else {
            counters.mallocCalls += 1
            counters.reserved += size
            counters.peakReserved = max(counters.peakReserved, counters.reserved)
        }
        counters.inUse += size
        inUseByTag[tag, default: 0] += size
        if counters.inUse > counters.peakInUse {
            counters.peakInUse = counters.inUse
            counters.inUseAtPeakByTag = inUseByTag
        }
        return size
    }

    /// Returns the block of a request of `bytes` tagged `tag` to the cache.
    public func release(_ bytes: Int, tag: MemoryTag) {
        let size = Self.roundedSize(bytes)
        lock.lock(); defer { lock.unlock() }
        counters.inUse -= size
        inUseByTag[tag, default: 0] -= size
        cachedBlocks[size, default: 0] += 1
    }

    /// Returns every cached block to the device (the CUDA allocator's retry after a failed cudaMalloc).
    public func emptyCache() {
        lock.lock(); defer { lock.unlock() }
        counters.reserved -= cachedBlocks.reduce(0) { $0 + $1.key * $1.value }
        cachedBlocks.removeAll()
    }

    public var stats: AllocatorStats {
        lock.lock(); defer { lock.unlock() }
        return counters
    }
}

/// A GPU as far as the estimates of a CUDA plan need it: its compute capability and number of SMs (which
/// size the context's local-memory reservation and cuBLAS' workspace). `relora memory --gpu` picks one of
/// `known`; a run on a device uses the device's own figures.
public struct GPUProfile: Sendable, Equatable {
    public var name: String
    public var computeMajor: Int
    public var computeMinor: Int
    public var multiprocessors: Int
    /// The kernels' CPU emulation: no driver context, no cuBLAS workspace and no NCCL buffers on its "device"
    /// (its cuBLAS and NCCL stand-ins allocate nothing there), so every estimate is 0.
    public var emulated = false

    public init(name: String, computeMajor: Int, computeMinor: Int, multiprocessors: Int, emulated: Bool = false) {
        self.name = name; self.computeMajor = computeMajor; self.computeMinor = computeMinor
        self.multiprocessors = multiprocessors; self.emulated = emulated
    }

    /// Data-sheet figures (compute capability, SM count) of the GPUs a plan can be made for, by the key
    /// `relora memory --gpu` takes.
    public static let known: [(key: String, gpu: GPUProfile)] = [
        ("h200", GPUProfile(name: "H200 (141 GB)", computeMajor: 9, computeMinor: 0, multiprocessors: 132)),
        ("h100", GPUProfile(name: "H100 SXM (80 GB)", computeMajor: 9, computeMinor: 0, multiprocessors: 132)),
        ("a100", GPUProfile(name: "A100 SXM (40/80 GB)", computeMajor: 8, computeMinor: 0, multiprocessors: 108)),
        ("l40s", GPUProfile(name: "L40S (48 GB)", computeMajor: 8, computeMinor: 9, multiprocessors: 142)),
        ("rtx4090", GPUProfile(name: "RTX 4090 (24 GB)", computeMajor: 8, computeMinor: 9, multiprocessors: 128)),
        ("rtx3090", GPUProfile(name: "RTX 3090 (24 GB)", computeMajor: 8, computeMinor: 6, multiprocessors: 82)),
        ("a10", GPUProfile(name: "A10 (24 GB)", computeMajor: 8, computeMinor: 6, multiprocessors: 72)),
        ("l4", GPUProfile(name: "L4 (24 GB)", computeMajor: 8, computeMinor: 9, multiprocessors: 58)),
    ]

    /// What a plan assumes when it knows no device: an H100/H200 (sm_90, 132 SMs), the largest context and
    /// cuBLAS workspace of `known`, so a smaller card's plan errs by at most ~0.1 GiB on the safe side.
    public static let planningDefault = known[1].gpu

    /// The profile `key` names (`known`), or one sentence listing the keys.
    public init(key: String) throws {
        guard let gpu = Self.known.first(where: { $0.key == key.lowercased() })?.gpu else {
            throw ReLoRAError.usage("unknown GPU '\(key)'; one of: \(Self.known.map(\.key).joined(separator: ", "))")
        }
        self = gpu
    }

    /// Resident threads per SM (the CUDA C Programming Guide's table of compute capabilities): 1536 on
    /// sm_86/sm_89 (and sm_120), 1024 on sm_75, 2048 on sm_70/80/87/90/100.
    public var maxThreadsPerMultiprocessor: Int {
        switch (computeMajor, computeMinor) {
        case (8, 6), (8, 9), (12, _): return 1536
        case (7, 5): return 1024
        default: return 2048
        }
    }

    /// Bytes the driver reserves for the threads' local memory (stacks) when the context is created: the
    /// stack limit (`cudaLimitStackSize`, 1 KiB by default; relora's kernels need at most 40 B, Kernels/README)
    /// for every thread the device can hold at once, SMs x resident threads per SM. That is 264 MiB on an
    /// H100/H200, 216 MiB on an A100 (the A100 figure is reported in arcs-skku/EMDC_llvm#13; the formula in
    /// cms-sw/cmssw#51395 and NVlabs/cuda-oxide#699). Exact given the stack limit, which relora never raises.
    public var localMemoryBytes: Int { emulated ? 0 : 1024 * multiprocessors * maxThreadsPerMultiprocessor }

    /// The rest of the context, estimated: the driver's and runtime's own allocations and the kernels a run
    /// loads (lazily: CUDA_MODULE_LOADING=LAZY is the default on Linux since CUDA 12.2, CUDA Programming Guide
    /// "Lazy Loading"), i.e. relora's kernel library and the cuBLAS GEMM kernels it calls. 192 MiB: a bare
    /// PyTorch context measured 256 MiB on an RTX 3090 (invoke-ai/InvokeAI#9413), of which 123 MiB is that
    /// card's local memory, leaving ~133 MiB; ~60 MiB more is allowed for the cuBLAS kernels loaded on first
    /// use. Reports of whole contexts agree within ~100 MiB: ~300-400 MB with lazy loading
    /// (pytorch/pytorch#107667, #109888), 287 MB lazy against 667 MB eager (pytorch/pytorch#86509). With eager
    /// loading (CUDA_MODULE_LOADING=EAGER, or a driver older than 12.2) add a few hundred MiB.
    public static let contextBaseBytes = 192 << 20

    /// The CUDA context, estimated: `contextBaseBytes` + `localMemoryBytes` (456 MiB on an H100/H200, 408 MiB
    /// on an A100, 384 MiB on an RTX 4090). Held from the first CUDA call, outside the allocator.
    public var contextBytes: Int { emulated ? 0 : Self.contextBaseBytes + localMemoryBytes }

    /// cuBLAS' workspace of one stream that runs GEMMs. The kernel library (Kernels/src/gemm.cu) gives each such
    /// stream a cuBLAS handle of its own and allocates it this workspace with cudaMalloc (`cublasSetWorkspace`),
    /// outside the allocator: the figure cuBLAS' documentation (cublasSetWorkspace) recommends on Hopper, 32 MiB
    /// (as cited in pytorch/pytorch#120925), and before sm_90 PyTorch's mirror of cuBLAS' default pool,
    /// 2 x 4 MiB + 8 x 16 KiB (":4096:2:16:8", 8.125 MiB; pytorch/pytorch#89027). Only the default stream runs
    /// GEMMs (the gradient sums' stream runs copies, additions and NCCL), so a plan counts one
    /// (`CUDAFootprint.gemmStreams`). cuBLAS' own small allocations besides it are not counted.
    public var cublasWorkspaceBytes: Int {
        if emulated { return 0 }
        return computeMajor >= 9 ? 32 << 20 : (2 * (4 << 20) + 8 * (16 << 10))
    }

    /// NCCL's own buffers in a data-parallel run of `worldSize` processes (0 for one), estimated (NCCL sizes
    /// them by its channels, topology and algorithms, so only a measurement with NCCL_DEBUG_SUBSYS=ALLOC is
    /// exact): 512 MiB for the communicator, +448 MiB per peer, since the gradient sums use an all-to-all,
    /// which connects every pair of ranks over each channel. On 8 NVLink H100s a first all-to-all took each
    /// GPU from 1.06 GB (context + communicator) to 4.34 GB, 32 channels per peer (NVIDIA/nccl#1685), i.e.
    /// ~0.47 GB per peer; one all-reduce communicator ~1.6 GB (NVIDIA/nccl#864). Fewer channels (NVLink-less
    /// or PCIe machines; NCCL_MAX_NCHANNELS) need less.
    public func ncclBytes(worldSize: Int) -> Int {
        guard worldSize > 1, !emulated else { return 0 }
        return (512 << 20) + (448 << 20) * (worldSize - 1)
    }
}

/// What a CUDA process holds on its device, by part: the caching allocator's blocks (modelled exactly, the
/// backend's persistent scratch included) and the estimates of `GPUProfile` for the CUDA context, cuBLAS'
/// workspace and NCCL's buffers.
public struct CUDAFootprint: Sendable {
    /// The allocator's counters over the plan: in-use and reserved peaks, per tag at the in-use peak.
    public var allocator: AllocatorStats
    /// The same when the first optimizer step has ended (before a restart): what a run's allocator measures
    /// at that point, which `relora train` prints beside it.
    public var afterFirstStep: AllocatorStats
    /// The backend's persistent scratch blocks (in `allocator`).
    public var persistentScratch = CachingAllocatorModel.persistentScratchBytes
    public var gpu: GPUProfile
    public var context: Int
    public var cublasWorkspace: Int
    public var nccl: Int
    /// Streams that run GEMMs, each with its own cuBLAS workspace: the default stream.
    public static let gemmStreams = 1

    public init(allocator: AllocatorStats, afterFirstStep: AllocatorStats, gpu: GPUProfile, worldSize: Int) {
        self.allocator = allocator
        self.afterFirstStep = afterFirstStep
        self.gpu = gpu
        context = gpu.contextBytes
        cublasWorkspace = gpu.cublasWorkspaceBytes * Self.gemmStreams
        nccl = gpu.ncclBytes(worldSize: worldSize)
    }

    /// The estimated parts: context, cuBLAS workspace, NCCL.
    public var estimated: Int { context + cublasWorkspace + nccl }

    /// What the process needs on the device: the allocator's reservation with its cache, plus the estimates.
    public var total: Int { allocator.peakReserved + estimated }

    /// What it needs once the backend has started (the context exists and the persistent scratch is
    /// reserved, so `cudaMemGetInfo`'s free memory already excludes them): the check a run makes before it
    /// allocates its model.
    public var neededAfterStart: Int { total - context - persistentScratch }
}
