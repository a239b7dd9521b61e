import Foundation

/// Where relora looks for a library it opens with dlopen at run time instead of linking: the CUDA kernel
/// library (`libreloracuda.so`) and the MPI plugin (`librelora-mpi.so`), both built under `Kernels/`.
/// First match wins:
/// 1. the path in the library's environment variable (`RELORA_CUDA_LIB`, `RELORA_MPI_LIB`): when set,
///    it is the only candidate, so a wrong path is reported rather than silently replaced by another file;
/// 2. the file next to the running executable (how a packaged build ships it);
/// 3. `Kernels/build/<file>` under the current directory (a source checkout after `make -C Kernels ...`).
public enum RuntimeLibrary {
    /// The paths to try, in order.
    public static func candidatePaths(fileName: String, variable: String,
                                      environment: [String: String] = ProcessInfo.processInfo.environment) -> [String] {
        if let explicit = environment[variable], !explicit.isEmpty { return [explicit] }
        var paths: [String] = []
        if let exe = Bundle.main.executableURL?.resolvingSymlinksInPath().deletingLastPathComponent() {
            paths.append(exe.appendingPathComponent(fileName).path)
        }
        paths.append(FileManager.default.currentDirectoryPath + "/Kernels/build/" + fileName)
        return paths
    }

    /// The first of `paths` that exists.
    public static func firstExisting(_ paths: [String]) -> String? {
        paths.first { FileManager.default.fileExists(atPath: $0) }
    }
}
