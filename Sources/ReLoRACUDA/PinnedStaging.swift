import CReLoRA
import Foundation
import ReLoRACore

/// Pinned host memory (`host_alloc`) through which the CUDA backend moves a training step's small per-micro-batch
/// transfers without making the host wait for the device: the token ids and targets going up (`upload`) and the
/// per-row losses coming down (`readBack`). Both are asynchronous copies on the default stream, where every op
/// runs, so the kernels before and after them see them in program order; what needs care is the host memory:
/// - an upload's bytes are copied into a region of the **upload ring** and the region is not written again until
///   its copy ran. Each region records an event after its copy; the host waits on that event
///   (`event_synchronize`) only when it would overwrite a region still in flight and the ring is at its limit
///   (`ringLimit`): below the limit the ring grows instead (doubling, from `ringMinimum`). Copies enqueued
///   before the last completed synchronize of the default stream are known to have run without asking the
///   device (the sync generations below), so a training step, which synchronizes once at its end (the gradient
///   norm), starts on an empty ring: the first step sizes it to one step's uploads (2 G regions of the
///   micro-batch's ids or targets, 256-byte aligned) and the later ones neither allocate nor wait.
/// - a read-back owns a **slot** (pinned, from a pool) until its reader drops it; the reader waits for the
///   slot's event only if no synchronization covered the copy since (`ReadBack.bytes`).
/// Growth never frees memory a copy may still use: replaced rings and too-small slots are freed after a
/// synchronize of the default stream that covers their last copy (`endSync`), when the device is idle anyway
/// (`host_free` synchronizes).
///
/// The generations: `started` counts synchronizations begun, and a copy is stamped with it when enqueued; a
/// synchronize that began at generation g and returned covers every copy stamped g or lower (`covered = g + 1`).
/// A copy enqueued by another thread while a synchronize runs is stamped g + 1 and is not taken as covered.
///
/// Thread-safe: every member is used under `lock` (the backend's ops may come from several threads).
final class PinnedStaging: @unchecked Sendable {
    /// The upload ring's largest size (bytes): beyond it, uploads wait for the oldest region instead of growing
    /// the ring. The default, 64 MiB, holds the ids and targets of a step of 8 Mi tokens.
    let ringLimit: Int
    /// The smallest ring (default 64 KiB).
    let ringMinimum: Int
    /// The alignment of every region (a copy engine's friendly granularity).
    static let alignment = 256

    private let library: CUDALibrary
    private var api: relora_cuda_api { library.api }
    private let lock = NSLock()

    private var started: UInt64 = 0, covered: UInt64 = 0

    /// A region of the ring whose copy may not have run yet.
    private struct Flight {
        var start: Int, end: Int, stamp: UInt64, event: UnsafeMutableRawPointer
    }
    private var ring: UnsafeMutableRawPointer?
    private var capacity = 0
    /// Where the next region starts (when it fits before the end or before the oldest flight).
    private var cursor = 0
    /// Oldest first; their regions follow one another in the ring's order (wrapping at most once).
    private var flights: [Flight] = []
    private var freeEvents: [UnsafeMutableRawPointer] = []
    /// Pinned memory to free once a synchronize covered it (replaced rings, too-small slots), stamped with the
    /// generation at its retirement (no copy into it was enqueued later), and the flights of replaced rings,
    /// whose events go back to the pool then.
    private var retired: [(pointer: UnsafeMutableRawPointer, stamp: UInt64)] = []
    private var retiredFlights: [Flight] = []

    /// Read-back slots not in use, each with its own event.
    private var freeSlots: [Slot] = []
    /// What this staging allocated with host_alloc (rings and slots), for the tests' "the first step sizes it".
    private(set) var hostAllocations = 0
    /// Host waits on an event (a region or a slot still in flight), for the tests' "in steady state never".
    private(set) var eventWaits = 0

    /// Smaller `ringLimit` and `ringMinimum` than the defaults are for the tests of the waits.
    init(library: CUDALibrary, ringLimit: Int = 64 << 20, ringMinimum: Int = 64 << 10) {
        self.library = library; self.ringLimit = ringLimit; self.ringMinimum = ringMinimum
    }

    deinit {
        for f in flights + retiredFlights { _ = api.event_destroy!(f.event) }
        for e in freeEvents { _ = api.event_destroy!(e) }
        for s in freeSlots { _ = api.event_destroy!(s.event); _ = api.host_free!(s.pointer) }
        for r in retired { _ = api.host_free!(r.pointer) }
        if let ring { _ = api.host_free!(ring) }
    }

    // MARK: Synchronizations of the default stream (CUDABackend.sync)

    /// Before the host waits for the default stream: the generation this synchronize covers.
    func beginSync() -> UInt64 {
        lock.lock(); defer { lock.unlock() }
        started += 1
        return started - 1
    }

    /// After it returned: every copy stamped `generation` or lower ran; the retired memory those were the last
    /// copies of is freed (the device is idle, so `host_free`'s own synchronization costs nothing).
    func endSync(_ generation: UInt64) {
        lock.lock(); defer { lock.unlock() }
        covered = max(covered, generation + 1)
        retireCompleted()
        for f in retiredFlights where isCovered(f.stamp) { freeEvents.append(f.event) }
        retiredFlights.removeAll { isCovered($0.stamp) }
        for r in retired where isCovered(r.stamp) { library.check(api.host_free!(r.pointer), "host_free") }
        retired.removeAll { isCovered($0.stamp) }
    }

    private func isCovered(_ stamp: UInt64) -> Bool { stamp < covered }

    /// Drops the flights known to have run (oldest first); an empty ring starts over at its beginning, so every
    /// step uses the same addresses.
    private func retireCompleted() {
        var done = 0
        while done < flights.count, isCovered(flights[done].stamp) { done += 1 }
        for f in flights.prefix(done) { freeEvents.append(f.event) }
        flights.removeFirst(done)
        if flights.isEmpty { cursor = 0 }
    }

    // MARK: Uploads

    /// Copies `source` into the ring and enqueues its copy to the device memory `destination` on the default stream.
    /// Returns when the host may reuse `source` (at once: the ring holds the bytes).
    func upload(_ source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer) {
        let count = source.count
        guard count > 0 else { return }
        lock.lock(); defer { lock.unlock() }
        retireCompleted()
        let need = (count + Self.alignment - 1) / Self.alignment * Self.alignment
        let start = reserve(need)
        let region = ring! + start
        region.copyMemory(from: source.baseAddress!, byteCount: count)
        library.check(api.memcpy!(destination, region, Int64(count), RELORA_MEMCPY_HOST_TO_DEVICE, nil), "memcpy")
        let event = takeEvent()
        library.check(api.event_record!(event, nil), "event_record")
        flights.append(Flight(start: start, end: start + need, stamp: started, event: event))
        cursor = start + need
    }

    /// The start of a free region of `need` bytes: after the newest flight, or at the ring's beginning when the
    /// oldest flight starts far enough into it; else a larger ring (below the limit), else wait for the oldest.
    private func reserve(_ need: Int) -> Int {
        while true {
            if let oldest = flights.first {
                if cursor > oldest.start {  // the flights span [oldest.start, cursor)
                    if cursor + need <= capacity { return cursor }
                    if need <= oldest.start { return 0 }
                } else if cursor + need <= oldest.start {  // wrapped: the free space is [cursor, oldest.start)
                    return cursor
                }
            } else if need <= capacity {
                return 0
            }
            if capacity < max(need, ringLimit) {
                grow(to: max(need, min(max(2 * capacity, ringMinimum), ringLimit)))
                continue
            }
            let oldest = flights.removeFirst()
            eventWaits += 1
            library.check(api.event_synchronize!(oldest.event), "event_synchronize")
            freeEvents.append(oldest.event)
            if flights.isEmpty { cursor = 0 }
        }
    }

    /// A new, empty ring of `bytes`; the old one and its flights' events retire until a synchronize covers them.
    private func grow(to bytes: Int) {
        var pointer: UnsafeMutableRawPointer?
        library.check(api.host_alloc!(&pointer, Int64(bytes)), "host_alloc")
        hostAllocations += 1
        if let ring { retired.append((ring, started)) }
        retiredFlights += flights
        flights.removeAll()
        ring = pointer
        capacity = bytes
        cursor = 0
    }

    private func takeEvent() -> UnsafeMutableRawPointer {
        if let e = freeEvents.popLast() { return e }
        var e: UnsafeMutableRawPointer?
        library.check(api.event_create!(&e), "event_create")
        return e!
    }

    // MARK: Read-backs

    /// A pinned buffer and the event recorded after the copy into it.
    final class Slot {
        let pointer: UnsafeMutableRawPointer
        let bytes: Int
        let event: UnsafeMutableRawPointer
        var stamp: UInt64 = 0
        init(pointer: UnsafeMutableRawPointer, bytes: Int, event: UnsafeMutableRawPointer) {
            self.pointer = pointer; self.bytes = bytes; self.event = event
        }
    }

    /// Device bytes on their way to the host: a slot held until this is dropped.
    final class ReadBack: @unchecked Sendable {
        private let staging: PinnedStaging
        private let slot: Slot
        private var ready = false
        let count: Int

        fileprivate init(staging: PinnedStaging, slot: Slot, count: Int) {
            self.staging = staging; self.slot = slot; self.count = count
        }

        deinit { staging.giveBack(slot) }

        /// The `count` bytes, once their copy ran: at once when a synchronize covered it, else after waiting for
        /// the slot's event. Valid while this lives.
        var bytes: UnsafeRawBufferPointer {
            if !ready {
                staging.wait(for: slot)
                ready = true
            }
            return UnsafeRawBufferPointer(start: slot.pointer, count: count)
        }
    }

    /// Enqueues the copy of `count` device bytes at `source` into a slot, on the default stream.
    func readBack(_ source: UnsafeRawPointer?, count: Int) -> ReadBack {
        lock.lock(); defer { lock.unlock() }
        let slot = takeSlot(max(count, 1))
        if count > 0, let source {
            library.check(api.memcpy!(slot.pointer, source, Int64(count), RELORA_MEMCPY_DEVICE_TO_HOST, nil), "memcpy")
        }
        library.check(api.event_record!(slot.event, nil), "event_record")
        slot.stamp = started
        return ReadBack(staging: self, slot: slot, count: count)
    }

    /// The smallest free slot that holds `bytes`, else a new one (a too-small free one retires).
    private func takeSlot(_ bytes: Int) -> Slot {
        if let i = freeSlots.indices.filter({ freeSlots[$0].bytes >= bytes }).min(by: { freeSlots[$0].bytes < freeSlots[$1].bytes }) {
            return freeSlots.remove(at: i)
        }
        if let small = freeSlots.popLast() {
            retired.append((small.pointer, started))
            retiredFlights.append(Flight(start: 0, end: 0, stamp: started, event: small.event))
        }
        var pointer: UnsafeMutableRawPointer?
        library.check(api.host_alloc!(&pointer, Int64(bytes)), "host_alloc")
        hostAllocations += 1
        return Slot(pointer: pointer!, bytes: bytes, event: takeEvent())
    }

    fileprivate func wait(for slot: Slot) {
        lock.lock()
        let waits = !isCovered(slot.stamp)
        if waits { eventWaits += 1 }
        lock.unlock()
        if waits { library.check(api.event_synchronize!(slot.event), "event_synchronize") }
    }

    fileprivate func giveBack(_ slot: Slot) {
        lock.lock(); defer { lock.unlock() }
        freeSlots.append(slot)
    }
}
