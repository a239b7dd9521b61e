import CReLoRA
import Foundation
import ReLoRACore

/// A caching allocator over `relora_cuda_malloc`: freed blocks are kept by rounded size and handed out
/// again, so a training step (which frees and reallocates the same shapes every micro-batch) never calls
/// cudaMalloc after the first one. Sizes round up to 512 bytes below 1 MiB and to 2 MiB above, so
/// nearby sizes share blocks and fragmentation stays bounded; a block is reused only for the same rounded
/// size. `CachingAllocatorModel` (ReLoRACore) is this policy without memory, which plans run; this allocator
/// keeps its counters in one (`accounting`), told of every block it hands out, takes back and frees, so the
/// two cannot count differently (`CUDABackendTests` also compares a plan's model with this allocator after a
/// training step). When cudaMalloc fails the cache is returned to the device and the call retried once (a
/// plan assumes memory to spare and never trims); if that fails too the process stops with one sentence
/// (`ResourceExhaustion`: a training step cannot continue without the tensor, and nothing here can throw).
///
/// Each live block carries the memory tag of its tensor, so the allocator can say what the device held by
/// role at its high-water mark, beside the ledger's exact per-tensor bytes (the difference is rounding
/// and the cache). Not thread-safe on its own: `CUDABackend` calls it under its lock.
///
/// Streams. Blocks are handed out for the default stream, on which the backend computes. A block that another
/// stream also uses (the data-parallel gradient sums' stream) is declared with `recordStream`, as PyTorch's
/// `record_stream`: its release records an event on each such stream, and the block's next allocation makes
/// the default stream wait for those events (`stream_wait_event`, no host synchronization) before anything
/// else is enqueued there, so the new owner's writes cannot overtake the other stream's reads and writes of
/// the old owner. PyTorch instead keeps such a block out of the cache until a query finds its events
/// complete; here the block is reused at once and the device orders the uses, so which block an allocation
/// gets does not depend on timing and `CachingAllocatorModel` stays this allocator's exact policy.
final class DeviceAllocator {
    /// The counters a plan predicts (`CachingAllocatorModel`, the same policy without memory).
    typealias Stats = AllocatorStats

    private let library: CUDALibrary
    /// A cap on reserved bytes below the device's memory (`RELORA_DEVICE_MEMORY_LIMIT`): how a 24 GB card
    /// is measured on a bigger one. nil: the device's own limit.
    let limit: Int?
    private var cache: [Int: [UnsafeMutableRawPointer]] = [:]
    private var live: [UnsafeMutableRawPointer: (bytes: Int, tag: MemoryTag)] = [:]
    /// The counters: the policy's model, mirroring `cache` block for block.
    private let accounting = CachingAllocatorModel()
    /// Streams other than the default one that used a live block (`recordStream`).
    private var streamUses: [UnsafeMutableRawPointer: [UnsafeMutableRawPointer]] = [:]
    /// A cached block's events, recorded at its release on the streams that used it.
    private var releaseEvents: [UnsafeMutableRawPointer: [UnsafeMutableRawPointer]] = [:]
    /// Events no block waits for (created on demand, reused: a wait captures the record it follows at the call).
    private var idleEvents: [UnsafeMutableRawPointer] = []
    var stats: Stats { accounting.stats }

    init(library: CUDALibrary, limit: Int?) {
        self.library = library
        self.limit = limit
    }

    deinit {
        for events in releaseEvents.values { idleEvents += events }
        for e in idleEvents { library.check(library.api.event_destroy!(e), "event_destroy") }
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
            block = reused
            if let events = releaseEvents.removeValue(forKey: reused) {
                for e in events { library.check(library.api.stream_wait_event!(nil, e), "stream_wait_event") }
                idleEvents += events
            }
        } else {
            block = mallocOrTrim(size)
        }
        live[block] = (size, tag)
        accounting.allocate(size, tag: tag)  // a cache hit there exactly when `cache` had the block here
        return block
    }

    func release(_ block: UnsafeMutableRawPointer) {
        guard let (size, tag) = live.removeValue(forKey: block) else {
            preconditionFailure("DeviceAllocator.release: \(block) is not a live block")
        }
        accounting.release(size, tag: tag)
        if let streams = streamUses.removeValue(forKey: block) {
            releaseEvents[block] = streams.map { stream in
                var event = idleEvents.popLast()
                if event == nil { library.check(library.api.event_create!(&event), "event_create") }
                library.check(library.api.event_record!(event, stream), "event_record")
                return event!
            }
        }
        cache[size, default: []].append(block)
    }

    /// Declares that `stream` (not the default stream) uses the live `block` too: work enqueued there so far
    /// finishes before the block's next owner's work on the default stream starts.
    func recordStream(_ block: UnsafeMutableRawPointer, stream: UnsafeMutableRawPointer) {
        precondition(live[block] != nil, "DeviceAllocator.recordStream: \(block) is not a live block")
        if !(streamUses[block]?.contains(stream) ?? false) { streamUses[block, default: []].append(stream) }
    }

    /// Returns every cached block to the device.
    func emptyCache() {
        // cudaFree synchronizes the device: the events' work is done.
        for events in releaseEvents.values { idleEvents += events }
        releaseEvents.removeAll()
        for b in cache.values.joined() { library.check(library.api.free!(b), "free") }
        cache.removeAll()
        accounting.emptyCache()
    }

    private func mallocOrTrim(_ size: Int) -> UnsafeMutableRawPointer {
        var ptr: UnsafeMutableRawPointer?
        let overCap = { self.limit.map { self.accounting.stats.reserved + size > $0 } ?? false }
        var status = overCap() ? RELORA_ERR_OUT_OF_MEMORY : library.api.malloc!(&ptr, Int64(size))
        if status == RELORA_ERR_OUT_OF_MEMORY && !cache.isEmpty {
            emptyCache()
            status = overCap() ? RELORA_ERR_OUT_OF_MEMORY : library.api.malloc!(&ptr, Int64(size))
        }
        if status != RELORA_OK || ptr == nil {
            let message = overCap() ? "over the RELORA_DEVICE_MEMORY_LIMIT cap of \(formatBytes(limit!))" : library.lastError
            let stats = accounting.stats
            ResourceExhaustion.stop("cuda: out of device memory allocating \(formatBytes(size)) (\(formatBytes(stats.inUse)) in use, \(formatBytes(stats.reserved)) reserved): \(message); plan the run with `relora memory --device cuda` and apply its suggestion (block checkpointing, a smaller micro_batch, a quantized base); " + ResourceExhaustion.resumeAdvice)
        }
        return ptr!
    }
}
