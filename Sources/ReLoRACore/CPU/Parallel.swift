import COpenBLAS
import Dispatch
import Foundation
import Synchronization

// The CPU backend's threads. Results have the same bits whatever their number:
//
// Ops whose outputs are independent (elementwise, per row) split their index range into `cpuThreadCount`
// contiguous chunks (`parallelChunks`); each output is computed within one chunk, the same way whichever
// chunk it falls in. Reductions (a sum over rows or elements) keep one partial per block of a size fixed
// by the problem alone (`ReductionBlocks`) and add the partials in block order: the threads only choose
// which blocks they run, so the result has the same bits with any thread count. Matrix products run as a
// grid of tiles fixed by their shape, each one single-threaded OpenBLAS call (CPUMatmul.swift says why
// OpenBLAS's own threads cannot be used).

/// How many threads the CPU backend runs: `RELORA_CPU_THREADS` if set (a positive integer), else one per
/// active core; `withCPUThreads` overrides it for a scope.
public var cpuThreadCount: Int { CPUThreads.scoped ?? CPUThreads.processDefault }

/// Where `cpuThreadCount` comes from.
package enum CPUThreads {
    /// The variable that sets the process's thread count.
    package static let environmentVariable = "RELORA_CPU_THREADS"

    /// `RELORA_CPU_THREADS`, read once, on first use; the active core count if it is unset. A value that
    /// is not a positive integer falls back to the core count with a one-line warning on stderr: the count
    /// changes only speed, so a typo does not stop a run.
    package static let processDefault: Int = {
        let cores = max(1, ProcessInfo.processInfo.activeProcessorCount)
        let (threads, warning) = parse(ProcessInfo.processInfo.environment[environmentVariable], cores: cores)
        if let warning { FileHandle.standardError.write(Data(("relora: warning: " + warning + "\n").utf8)) }
        return threads
    }()

    /// The thread count a `RELORA_CPU_THREADS` value asks for (nil: unset), and the warning for a bad one.
    package static func parse(_ value: String?, cores: Int) -> (threads: Int, warning: String?) {
        guard let value else { return (cores, nil) }
        let trimmed = value.trimmingCharacters(in: .whitespaces)
        if let n = Int(trimmed), n > 0 { return (n, nil) }
        return (cores, "\(environmentVariable)=\(value) is not a positive integer; using \(cores) threads (one per core)")
    }

    /// The thread count `withCPUThreads` set for the running task or thread, if any.
    @TaskLocal package static var scoped: Int?

    /// OpenBLAS held to one thread, once per process, before the CPU backend's first matrix product or
    /// LAPACK call: its own threads would make results depend on their number (CPUMatmul.swift); the
    /// backend's tiles run on `cpuThreadCount` threads instead, so `OPENBLAS_NUM_THREADS` has no effect.
    package static let pinOpenBLAS: Void = openblas_set_num_threads(1)
}

/// Runs `body` with the CPU backend on `threads` threads, on this task or thread only (nested calls see
/// the innermost; other threads keep theirs). For tests, and for workers sharing one process.
package func withCPUThreads<R>(_ threads: Int, _ body: () throws -> R) rethrows -> R {
    precondition(threads > 0, "withCPUThreads: \(threads) threads")
    return try CPUThreads.$scoped.withValue(threads, operation: body)
}

/// Runs `body` over `0..<count` split into at most `cpuThreadCount` contiguous chunks (fewer when a
/// chunk would hold under `minPerChunk` items; work below that stays on the calling thread). The chunks
/// depend on the thread count: use this where each output is computed within one chunk, and
/// `ReductionBlocks` where partial results are combined.
@inline(__always)
func parallelChunks(_ count: Int, minPerChunk: Int = 1, _ body: (_ chunk: Int, _ range: Range<Int>) -> Void) {
    runChunks(count, chunks: min(cpuThreadCount, count / max(1, minPerChunk)), body)
}

/// Runs `body` over `0..<count` in `chunks` contiguous chunks (at least one), concurrently.
@inline(__always)
private func runChunks(_ count: Int, chunks: Int, _ body: (_ chunk: Int, _ range: Range<Int>) -> Void) {
    let chunks = max(1, chunks)
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

/// Runs `body(task, worker)` for every task in `0..<count` on at most `min(workers, cpuThreadCount)`
/// threads, each taking the next task until none is left; `worker` (below `workers`) is the running
/// thread's index, for per-thread scratch. For tasks of uneven cost or count; which thread runs a task
/// must not change its result.
func parallelTasks(_ count: Int, workers: Int, _ body: (_ task: Int, _ worker: Int) -> Void) {
    let threads = max(1, min(workers, cpuThreadCount, count))
    if threads == 1 {
        for t in 0..<count { body(t, 0) }
        return
    }
    let next = Atomic<Int>(0)
    withoutActuallyEscaping(body) { body in
        let work = UncheckedSendable(body)
        DispatchQueue.concurrentPerform(iterations: threads) { worker in
            while true {
                let t = next.wrappingAdd(1, ordering: .relaxed).oldValue
                if t >= count { return }
                work.value(t, worker)
            }
        }
    }
}

/// `0..<count` cut into blocks whose boundaries depend on `count` alone: block `b` is
/// `b * size ..< min(count, (b + 1) * size)`. A reduction keeps one partial per block and combines the
/// partials in block order, so its bits do not depend on how many threads ran the blocks.
struct ReductionBlocks {
    let count: Int
    /// Items per block (the last block may hold fewer).
    let size: Int

    /// Blocks of `size` items.
    init(_ count: Int, size: Int) {
        precondition(count >= 0 && size > 0, "ReductionBlocks: \(count) items in blocks of \(size)")
        self.count = count
        self.size = size
    }

    /// Blocks of at least `minSize` items, and at most `maxBlocks` of them (which bounds the partials'
    /// memory where each partial is a row of numbers rather than one).
    init(_ count: Int, minSize: Int, maxBlocks: Int) {
        self.init(count, size: max(minSize, (count + maxBlocks - 1) / maxBlocks, 1))
    }

    var blockCount: Int { (count + size - 1) / size }

    func range(_ block: Int) -> Range<Int> { block * size ..< min(count, (block + 1) * size) }

    /// Runs `body(block, range)` once per block, the blocks spread over at most `cpuThreadCount` threads
    /// and no more threads than whole blocks (a short last block does not earn a thread of its own).
    @inline(__always)
    func forEach(_ body: (_ block: Int, _ range: Range<Int>) -> Void) {
        runChunks(blockCount, chunks: min(cpuThreadCount, count / size)) { _, blocks in
            for b in blocks { body(b, range(b)) }
        }
    }
}

/// Wraps a value that is known to be used safely across threads (see the call sites).
struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// The number of chunks `parallelChunks(count, minPerChunk:)` uses (to size per-chunk results that are not
/// combined arithmetically, such as `quantize`'s first failure, or are integers, whose sum is exact).
func parallelChunkCount(_ count: Int, minPerChunk: Int = 1) -> Int {
    max(1, min(cpuThreadCount, count / max(1, minPerChunk)))
}
