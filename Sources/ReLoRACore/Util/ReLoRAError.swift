/// Errors a user can cause. Each carries one sentence that says what is wrong and what to do;
/// the CLI prints it and exits non-zero. Programming errors stay `precondition`s.
public enum ReLoRAError: Error, CustomStringConvertible, Equatable {
    /// A model config or recipe is missing a key or has an impossible value.
    case invalidConfig(String)
    /// A file is missing, unreadable or malformed (safetensors, npy, JSON).
    case invalidFile(path: String, reason: String)
    /// Data that is well formed but does not fit the model (token ids, lengths, tensor shapes).
    case invalidData(String)
    /// Bad command-line usage.
    case usage(String)
    /// A valid request this build cannot serve (no CUDA library, an unsupported dtype or option).
    case unsupported(String)
    /// A collective of a multi-process run failed (a peer died, the network failed).
    case communication(String)

    public var description: String {
        switch self {
        case .invalidConfig(let m): return "invalid config: \(m)"
        case .invalidFile(let path, let reason): return "\(path): \(reason)"
        case .invalidData(let m): return "invalid data: \(m)"
        case .usage(let m): return m
        case .unsupported(let m): return "unsupported: \(m)"
        case .communication(let m): return "communication failed: \(m)"
        }
    }
}
