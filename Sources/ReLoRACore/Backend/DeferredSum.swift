/// A Double the backend computed and the host reads later: `Backend.crossEntropyDeferred`'s loss sum. The
/// value is the one the immediate op returns, bit for bit; what differs is when the host waits for it. On
/// the CPU (and any backend without an override) it is known at once. On the CUDA backend the per-row
/// losses travel to pinned host memory by an asynchronous copy enqueued behind the kernel, and `value` sums
/// them; it waits for that copy only when no synchronization since covered it, so a trainer that reads
/// its micro-batches' losses after the step's one read-back (the gradient norm) waits for nothing more.
///
/// Read once or many times, from one thread at a time (the trainer's); dropping an unread one is fine.
public final class DeferredSum: @unchecked Sendable {
    private var known: Double?
    private var read: (() -> Double)?

    /// A value known now.
    public init(_ value: Double) { known = value }

    /// A value `read` produces, called at the first `value` only, then released (with whatever it holds:
    /// the CUDA backend's staging slot goes back to its pool).
    public init(reading read: @escaping () -> Double) { self.read = read }

    public var value: Double {
        if let known { return known }
        let v = read!()
        known = v
        read = nil
        return v
    }
}
