import Foundation

/// How a process ends when the machine cannot give it the memory or disk space an operation needs in the
/// middle of work that cannot throw: a tensor allocation (`Backend.makeTensor` does not throw, and a step
/// cannot be unwound half way) on a device that is full, or a `master_copies: file` mapping that the disk
/// refuses after the free-space check. One sentence on stderr (what failed, the numbers, what to do) and
/// exit status `exitStatus`, never a trap. Checkpoints are written atomically (`TrainingCheckpoint.save`),
/// so the last one on disk is intact and `relora train --resume` continues from it after the change.
public enum ResourceExhaustion {
    /// The exit status of a process stopped this way (`relora train --help`; 1 and 2 are other errors).
    public static let exitStatus: Int32 = 3

    /// What to do, for the end of a sentence about a failed allocation during training.
    public static let resumeAdvice = "checkpoints already written are intact: continue with `relora train --resume RUN_DIR` after the change"

    /// Prints `error: <sentence>` and exits with `exitStatus`. Exits at once (`_exit`, after flushing
    /// stdout): no exit handlers or destructors run while another thread may be inside the backend. The
    /// line goes out with write(2), whose failure (stderr on the full disk) is ignored, not raised.
    public static func stop(_ sentence: String) -> Never {
        fflush(nil)  // every C stream, stdout (print) among them
        let line = Array(("error: " + sentence + "\n").utf8)
        var offset = 0
        while offset < line.count {
            let n = line[offset...].withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            offset += n
        }
        _exit(exitStatus)
    }
}
