import Dispatch
import Foundation

/// Number of worker chunks for row-parallel CPU ops (one per core).
public let cpuThreadCount = max(1, ProcessInfo.processInfo.activeProcessorCount)

/// Runs `body` over `0..<count` split into at most `cpuThreadCount` contiguous chunks.
/// Chunk boundaries depend only on `count` and the thread count, so any per-chunk partial
/// reduction is deterministic run to run. Work below `minPerChunk` items stays on one thread.
@inline(__always)
func parallelChunks(_ count: Int, minPerChunk: Int = 1, _ body: (_ chunk: Int, _ range: Range<Int>) -> Void) {
    let chunks = max(1, min(cpuThreadCount, count / max(1, minPerChunk)))
    if chunks == 1 {
        if count > 0 { body(0, 0..<count) }
        return
    }
    let per = (count + chunks - 1) / chunks
    // concurrentPerform wants a @Sendable closure; `body` only runs inside this call, on disjoint
    // ranges chosen here, so handing it across threads is safe.
    withoutActuallyEscaping(body) { body in
        let work = UncheckedSendable(body)
        DispatchQueue.concurrentPerform(iterations: chunks) { c in
            let lo = c * per, hi = min(count, lo + per)
            if lo < hi { work.value(c, lo..<hi) }
        }
    }
}

/// Wraps a value that is known to be used safely across threads (see the call sites).
struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// The number of chunks `parallelChunks(count, minPerChunk:)` uses (to size per-chunk partials).
func parallelChunkCount(_ count: Int, minPerChunk: Int = 1) -> Int {
    max(1, min(cpuThreadCount, count / max(1, minPerChunk)))
}
