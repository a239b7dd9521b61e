import CReLoRA
import Foundation
import ReLoRACore

/// A caching allocator over `relora_cuda_malloc`: freed blocks are kept by rounded size and handed out
/// again, so a training step (which frees and reallocates the same shapes every micro-batch) never calls
/// cudaMalloc after the first one. Sizes round up to 512 bytes below 1 MiB and to 2 MiB above, so
/// nearby sizes share blocks and fragmentation stays bounded; a block is reused only for the same rounded
/// size. `CachingAllocatorModel` (ReLoRACore) is this policy without memory, which plans run: a change here
/// must be made there too (`CUDABackendTests` compares the two after a training step). When cudaMalloc
/// fails the cache is returned to the device and the call retried once (the model assumes memory to
/// spare and never trims); if that fails too the process stops with one sentence
/// (`ResourceExhaustion`: a training step cannot continue without the tensor, and nothing here can throw).
///
/// Each live block carries the memory tag of its tensor, so the allocator can say what the device held by
/// role at its high-water mark, beside the ledger's exact per-tensor bytes (the difference is rounding
/// and the cache). Not thread-safe on its own: `CUDABackend` calls it under its lock.
final class DeviceAllocator {
    /// The counters a plan predicts (`CachingAllocatorModel`, the same policy without memory).
    typealias Stats = AllocatorStats

    private let library: CUDALibrary
    /// A cap on reserved bytes below the device's memory (`RELORA_DEVICE_MEMORY_LIMIT`): how a 24 GB card
    /// is measured on a bigger one. nil: the device's own limit.
    let limit: Int?
    private var cache: [Int: [UnsafeMutableRawPointer]] = [:]
    private var live: [UnsafeMutableRawPointer: (bytes: Int, tag: MemoryTag)] = [:]
    private var inUseByTag: [MemoryTag: Int] = [:]
    private(set) var stats = Stats()

    init(library: CUDALibrary, limit: Int?) {
        self.library = library
        self.limit = limit
    }

    /// The policy's size classes, shared with the plan's model.
    static func roundedSize(_ bytes: Int) -> Int { CachingAllocatorModel.roundedSize(bytes) }

    /// A device block of at least `bytes` (> 0) bytes for a tensor tagged `tag`.
    func allocate(_ bytes: Int, tag: MemoryTag) -> UnsafeMutableRawPointer {
        precondition(bytes > 0, "DeviceAllocator.allocate: \(bytes) bytes")
        let size = Self.roundedSize(bytes)
        let block: UnsafeMutableRawPointer
        if var free = cache[size], let reused = free.popLast() {
            cache[size] = free
            stats.cacheHits += 1
            block = reused
        } else {
            block = mallocOrTrim(size)
        }
        live[block] = (size, tag)
        stats.inUse += size
        inUseByTag[tag, default: 0] += size
        if stats.inUse > stats.peakInUse {
            stats.peakInUse = stats.inUse
            stats.inUseAtPeakByTag = inUseByTag
        }
        return block
    }

    func release(_ block: UnsafeMutableRawPointer) {
        guard let (size, tag) = live.removeValue(forKey: block) else {
            preconditionFailure("DeviceAllocator.release: \(block) is not a live block")
        }
        stats.inUse -= size
        inUseByTag[tag, default: 0] -= size
        cache[size, default: []].append(block)
    }

    /// Returns every cached block to the device.
    func emptyCache() {
        for (size, blocks) in cache {
            for b in blocks {
                library.check(library.api.free!(b), "free")
                stats.reserved -= size
            }
        }
        cache.removeAll()
    }

    private func mallocOrTrim(_ size: Int) -> UnsafeMutableRawPointer {
        var ptr: UnsafeMutableRawPointer?
        let overCap = { self.limit.map { self.stats.reserved + size > $0 } ?? false }
        var status = overCap() ? RELORA_ERR_OUT_OF_MEMORY : library.api.malloc!(&ptr, Int64(size))
        if status == RELORA_ERR_OUT_OF_MEMORY && !cache.isEmpty {
            emptyCache()
            status = overCap() ? RELORA_ERR_OUT_OF_MEMORY : library.api.malloc!(&ptr, Int64(size))
        }
        if status != RELORA_OK || ptr == nil {
            let message = overCap() ? "over the RELORA_DEVICE_MEMORY_LIMIT cap of \(formatBytes(limit!))" : library.lastError
            ResourceExhaustion.stop("cuda: out of device memory allocating \(formatBytes(size)) (\(formatBytes(stats.inUse)) in use, \(formatBytes(stats.reserved)) reserved): \(message); plan the run with `relora memory --device cuda` and apply its suggestion (block checkpointing, a smaller micro_batch, a quantized base); " + ResourceExhaustion.resumeAdvice)
        }
        stats.mallocCalls += 1
        stats.reserved += size
        stats.peakReserved = max(stats.peakReserved, stats.reserved)
        return ptr!
    }
}
