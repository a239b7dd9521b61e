import CReLoRA
import ReLoRACore

/// The per-op profile's clock on the CUDA backend: each mark is a timing event recorded on the default
/// stream (where every op runs), so the time between two marks is the device's time for the work enqueued
/// between them, known once the stream reached the second (`event_elapsed` waits for it). The events are a
/// pool kept across steps: a step of the 1b config records a few thousand, created during the first profiled
/// step and reused after. On the emulation an event's time is the host's at its record (kernels run at the
/// call), so the same code path gives the emulated kernels' host time.
final class CUDAEventClock: ProfileClock {
    private let library: CUDALibrary
    private var events: [UnsafeMutableRawPointer] = []
    private var used = 0
    /// Event records of every clock of the process, for the test that profiling off records none.
    nonisolated(unsafe) static var records = 0

    init(library: CUDALibrary) { self.library = library }

    deinit {
        for e in events { _ = library.api.event_destroy!(e) }
    }

    func mark() -> Int {
        if used == events.count {
            var e: UnsafeMutableRawPointer?
            library.check(library.api.event_create_timing!(&e), "event_create_timing")
            events.append(e!)
        }
        library.check(library.api.event_record!(events[used], nil), "event_record")
        Self.records += 1
        used += 1
        return used - 1
    }

    func drain() { library.check(library.api.stream_synchronize!(nil), "stream_synchronize") }

    func seconds(from start: Int, to end: Int) -> Double {
        var ms: Float = 0
        library.check(library.api.event_elapsed!(events[start], events[end], &ms), "event_elapsed")
        return Double(ms) / 1e3
    }

    func reset() { used = 0 }
}
