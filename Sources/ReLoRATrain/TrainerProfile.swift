import ReLoRACore

/// A per-op profile in progress: the profiler the backend reports to during the profiled steps, and how many
/// of them are left.
final class ProfileSession {
    let profiler: OpProfiler
    let backend: OpProfiling
    var stepsLeft: Int
    init(profiler: OpProfiler, backend: OpProfiling, steps: Int) {
        self.profiler = profiler
        self.backend = backend
        stepsLeft = steps
    }
}

extension Trainer {
    /// Profiles the next `steps` calls of `trainStep` op by op (`OpProfiler`): during each, every op of the
    /// backend is timed (host clock on the CPU, timing events on a GPU) and filed under its `OpCategory`;
    /// after the last, `profile` holds the per-step figures with the predictions from `PeakFLOPs.devicePeaks`,
    /// the table goes to the log, and the backend runs unprofiled again. Restarts, evaluations and
    /// checkpoints between the steps are not profiled. Take it after a warm-up step (the first step of a
    /// process allocates, uploads the RoPE tables and lets cuBLAS choose its kernels).
    public func startProfile(steps: Int) throws {
        precondition(steps > 0, "startProfile: \(steps) steps")
        guard let backend = model.backend as? OpProfiling else {
            throw ReLoRAError.unsupported("the \(model.backend.name) backend cannot profile its ops; use --device cpu or cuda")
        }
        let deviceName = (backend as? DeviceBackend).map { $0.deviceName + ($0.isEmulated ? " (emulated: times are the CPU's)" : "") }
            ?? "the CPU (\(cpuThreadCount) threads)"
        let profiler = OpProfiler(clock: backend.makeProfileClock(), peaks: PeakFLOPs.devicePeaks(for: backend),
                                  deviceName: deviceName)
        profiling = ProfileSession(profiler: profiler, backend: backend, steps: steps)
        profile = nil
    }

    /// `--profile N` needs N steps after a warm-up step in what is left of the run: one sentence otherwise,
    /// before the first step.
    func checkProfileFits() throws {
        try Self.checkProfileFits(profileSteps: profileSteps, done: state.step, steps: recipe.steps)
    }

    /// The check of `checkProfileFits` for a run at step `done` of `steps` (the command checks a new run's
    /// before anything is written).
    public static func checkProfileFits(profileSteps: Int, done: Int, steps: Int) throws {
        guard profileSteps > 0, steps - done < profileSteps + 1 else { return }
        throw ReLoRAError.invalidConfig(
            "--profile \(profileSteps) needs \(profileSteps + 1) steps (one warm-up, then \(profileSteps) profiled) but the run has \(steps - done) left; lower --profile or raise steps (--set steps=\(done + profileSteps + 1))")
    }

    /// Attaches the profiler for the step about to run, if a profile is being taken (the stream drained, the
    /// step's clock started).
    func beginProfiledStep() -> OpProfiler? {
        guard let session = profiling else { return nil }
        session.backend.profiler = session.profiler
        session.profiler.beginStep()
        return session.profiler
    }

    /// Closes a profiled step; after the last one, detaches the profiler, keeps the result in `profile` and
    /// logs its table.
    func endProfiledStep(_ profiler: OpProfiler) {
        guard let session = profiling else { return }
        profiler.endStep()
        session.backend.profiler = nil
        session.stepsLeft -= 1
        if session.stepsLeft == 0 {
            let result = profiler.result
            profile = result
            profiling = nil
            log(result.formatted())
        }
    }
}
