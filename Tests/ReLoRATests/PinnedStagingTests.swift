import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA

/// The CUDA backend's pinned staging (`PinnedStaging`) on the emulated device, whose queues run only when something
/// forces them (`RELORA_EMU_STREAM_ORDER=deferred`, the default): a copy still queued reads its staging region when
/// it runs, so a region rewritten before its copy ran would give a tensor another upload's values.
final class PinnedStagingTests: XCTestCase {
    /// Twelve uploads of 400 bytes (512-byte regions) with no synchronize between them, into a ring of at most 2 KiB:
    /// the ring grows once (1 KiB, then 2 KiB), then each of the last six uploads waits for the oldest region's copy
    /// before rewriting it; every tensor holds its own values (test data: upload i's values are i * 1000 + index).
    /// After a synchronize the ring starts over: more uploads neither allocate nor wait.
    func testTheRingIsRewrittenOnlyAfterItsCopiesRan() throws {
        let backend = try CUDABackendTests.emulatedBackend()
        let staging = PinnedStaging(library: backend.library, ringLimit: 2048, ringMinimum: 1024)
        func upload(_ i: Int, to t: Tensor) {
            let values = (0..<100).map { Int32(i * 1000 + $0) }
            values.withUnsafeBytes { staging.upload($0, to: t.storage!) }
        }
        func contents(_ t: Tensor) -> [Int32] {
            backend.downloadRaw(t).withUnsafeBytes { Array($0.bindMemory(to: Int32.self)) }
        }
        let tensors = (0..<12).map { _ in backend.makeTensor([100], dtype: .i32, tag: .activations, zeroed: true) }
        for (i, t) in tensors.enumerated() { upload(i, to: t) }
        XCTAssertEqual(staging.hostAllocations, 2, "a ring of 1 KiB, then one of 2 KiB")
        XCTAssertEqual(staging.eventWaits, 6, "uploads 7 to 12 each wait for the oldest region")
        let generation = staging.beginSync()
        backend.synchronize()
        staging.endSync(generation)
        for (i, t) in tensors.enumerated() {
            XCTAssertEqual(contents(t), (0..<100).map { Int32(i * 1000 + $0) }, "upload \(i)")
        }
        for (i, t) in tensors.prefix(4).enumerated() { upload(100 + i, to: t) }
        XCTAssertEqual(staging.hostAllocations, 2)
        XCTAssertEqual(staging.eventWaits, 6, "after a synchronize every region is free")
        for (i, t) in tensors.prefix(4).enumerated() {
            XCTAssertEqual(contents(t), (0..<100).map { Int32((100 + i) * 1000 + $0) })
        }
    }

    /// `crossEntropyDeferred` gives `crossEntropy`'s sum bit for bit, also when the losses buffer was overwritten
    /// before the read; a read waits for its copy only when no synchronize covered it (the first below), and the
    /// backend's token uploads do not synchronize.
    func testTheDeferredLossIsTheImmediateOne() throws {
        let backend = try CUDABackendTests.emulatedBackend(precision: .fp32)
        let rows = 6, vocab = 7
        let logits = backend.makeTensor([rows, vocab], tag: .activations)
        backend.fillUniform(logits, bound: 3, seed: 11, stream: 1)
        let targets = backend.makeTensor([rows], dtype: .i32, tag: .activations)
        let losses = backend.makeTensor([rows], tag: .activations)
        let counters = { try XCTUnwrap(backend.library.emulationCounters()) }
        var before = try counters()
        backend.upload([3, -1, 0, 6, 2, 5] as [Int32], to: targets)
        XCTAssertEqual(try counters().since(before).synchronizations, 0, "a token upload does not wait")
        let immediate = backend.crossEntropy(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: nil)
        let waits = backend.staging.eventWaits
        before = try counters()
        let first = backend.crossEntropyDeferred(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: nil)
        let second = backend.crossEntropyDeferred(logits: logits, targets: targets, losses: losses, rows: rows, vocab: vocab, gradScale: nil)
        backend.zero(losses)
        XCTAssertEqual(try counters().since(before).synchronizations, 0, "nothing waited yet")
        XCTAssertEqual(first.value.bitPattern, immediate.bitPattern, "\(first.value) vs \(immediate)")
        XCTAssertEqual(backend.staging.eventWaits, waits + 1, "the first read waited for its copy")
        backend.synchronize()
        XCTAssertEqual(second.value.bitPattern, immediate.bitPattern)
        XCTAssertEqual(backend.staging.eventWaits, waits + 1, "the synchronize covered the second copy")
        XCTAssertGreaterThan(immediate, 0)
    }
}
