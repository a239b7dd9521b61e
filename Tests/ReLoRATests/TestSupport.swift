import Foundation
import XCTest
@testable import ReLoRACore
@testable import ReLoRACUDA
@testable import ReLoRAFormats
@testable import ReLoRATokenizer
@testable import ReLoRAModel
@testable import ReLoRACheckpoint
@testable import ReLoRATrain
@testable import ReLoRAAnalysis
@testable import ReLoRASelfTest

/// Deterministic pseudo-random values for tests (SplitMix64), uniform in [lo, hi).
struct TestRNG {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }
    mutating func uniform(_ lo: Float = -1, _ hi: Float = 1) -> Float {
        lo + (hi - lo) * Float(next() >> 40) / Float(1 << 24)
    }
    mutating func floats(_ n: Int, _ lo: Float = -1, _ hi: Float = 1) -> [Float] { (0..<n).map { _ in uniform(lo, hi) } }
    mutating func int(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
}

func makeTensor(_ backend: CPUBackend, _ shape: [Int], _ values: [Float], tag: MemoryTag = .workspace) -> Tensor {
    let t = backend.makeTensor(shape, tag: tag)
    t.copy(from: values)
    return t
}

/// sum_i a_i * b_i in Double.
func dotDouble(_ a: [Float], _ b: [Float]) -> Double {
    precondition(a.count == b.count)
    var s = 0.0
    for i in 0..<a.count { s += Double(a[i]) * Double(b[i]) }
    return s
}

/// Central finite differences of `loss` with respect to sampled elements of `x`, compared with `analytic`.
///
/// Uses the fourth-order central stencil `(8(f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h`.
/// Tolerance derivation (fp32 forward, loss summed in Double): its truncation error is
/// ~ h^4/30 * |f^(5)| and its rounding error ~ 1.5 * eps_f32 * |f| * sqrt(terms) / h. For the O(1)
/// inputs and O(10) losses used here and h = 1e-2 that is ~1e-9 * |f^(5)| + ~1e-4, so
/// `|fd - analytic| <= atol + rtol*|analytic|` with atol = 1e-3, rtol = 1e-2 leaves a ~10x margin,
/// while a wrong backward is off by O(|analytic|). (The plain 2-point stencil's h^2 error was too
/// large for softmax-heavy paths of the whole model: 0.06 on a gradient of 0.012 at h = 1e-2.)
func checkFiniteDifferences(_ name: String, _ x: Tensor, analytic: [Float], samples: Int = 16, h: Float = 1e-2,
                            atol: Double = 1e-3, rtol: Double = 1e-2,
                            loss: () -> Double, file: StaticString = #filePath, line: UInt = #line) {
    precondition(analytic.count == x.count)
    let stride = max(1, x.count / samples)
    for i in Swift.stride(from: 0, to: x.count, by: stride) {
        let orig = x.f32[i]
        func f(_ delta: Float) -> Double {
            x.f32[i] = orig + delta
            defer { x.f32[i] = orig }
            return loss()
        }
        let fd = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * Double(h))
        let err = abs(fd - Double(analytic[i]))
        if err > atol + rtol * abs(Double(analytic[i])) {
            XCTFail("\(name)[\(i)]: finite difference \(fd) vs analytic \(analytic[i])", file: file, line: line)
            return
        }
    }
}

func fixturesDirectory() -> String {
    URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures").path
}

func temporaryDirectory(_ name: String = #function) -> String {
    let safe = name.filter { $0.isLetter || $0.isNumber }
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("relora-tests-\(safe)-\(UUID().uuidString)")
    try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.path
}

/// `relora` sits next to the test runner (`.build/<config>/reloraPackageTests.xctest`) in the build directory.
var reloraExecutable: String { builtExecutable("relora") }

/// An executable product of this package (`relora`, `relora-bench`) in the build directory.
func builtExecutable(_ name: String) -> String {
    let candidates = [
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent(),
        Bundle(for: CLITests.self).bundleURL.deletingLastPathComponent(),
        Bundle.main.bundleURL,
    ].map { $0.appendingPathComponent(name).path }
    return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
}

/// The `relora` executable's path; a missing one is a test failure, not a skip (`swift test` and
/// `swift build --build-tests` build it with the tests).
func requireReloraExecutable() throws -> String { try requireExecutable("relora") }

func requireExecutable(_ name: String) throws -> String {
    let path = builtExecutable(name)
    guard FileManager.default.isExecutableFile(atPath: path) else {
        throw MissingExecutable(path: path)
    }
    return path
}

struct MissingExecutable: Error, CustomStringConvertible {
    let path: String
    var description: String {
        "the executable is not at \(path); build it with `swift build --build-tests` before `swift test --skip-build`"
    }
}

/// Runs `executable` with `args` (in `directory`, with `environment`, or this process's) and returns its
/// exit status and its stdout and stderr together, in the order written.
func runProcess(_ executable: String, _ args: [String], environment: [String: String]? = nil,
                directory: String? = nil) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    if let environment { p.environment = environment }
    if let directory { p.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// The built `relora` with `args` and this process's environment, changed by `environment` (a nil value
/// removes the variable); through `/bin/sh -c 'SHELL; exec relora ...'` when `shell` is given (a `ulimit`
/// for the child only). Returns how it ended and what it printed.
func runReloraProcess(_ args: [String], environment: [String: String?] = [:], shell: String? = nil) throws
    -> (status: Int32, reason: Process.TerminationReason, stdout: String, stderr: String) {
    try runBuiltExecutable("relora", args, environment: environment, shell: shell)
}

/// `runReloraProcess` for any executable product of the package (`relora`, `relora-bench`).
func runBuiltExecutable(_ name: String, _ args: [String], environment: [String: String?] = [:], shell: String? = nil) throws
    -> (status: Int32, reason: Process.TerminationReason, stdout: String, stderr: String) {
    let p = Process()
    let exe = try requireExecutable(name)
    if let shell {
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", shell + "; exec \"$0\" \"$@\"", exe] + args
    } else {
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
    }
    var env = ProcessInfo.processInfo.environment
    for (key, value) in environment { env[key] = value }
    p.environment = env
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, p.terminationReason, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

func runRelora(_ args: [String], environment: [String: String?] = [:]) throws -> (status: Int32, stdout: String, stderr: String) {
    let r = try runReloraProcess(args, environment: environment)
    return (r.status, r.stdout, r.stderr)
}

func runReloraBench(_ args: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
    let r = try runBuiltExecutable("relora-bench", args)
    return (r.status, r.stdout, r.stderr)
}


/// Asserts `expression` throws `.invalidFile` whose one-line reason mentions `keyword` (empty: any).
func assertInvalidFile<T>(
    _ expression: @autoclosure () throws -> T, mentions keyword: String, _ context: String = "",
    file: StaticString = #filePath, line: UInt = #line
) {
    do {
        _ = try expression()
        XCTFail("expected .invalidFile mentioning \"\(keyword)\" \(context)", file: file, line: line)
    } catch ReLoRAError.invalidFile(_, let reason) {
        XCTAssertTrue(keyword.isEmpty || reason.contains(keyword), "reason \"\(reason)\" lacks \"\(keyword)\" \(context)", file: file, line: line)
        XCTAssertFalse(reason.contains("\n"), "reason must be one line: \(reason)", file: file, line: line)
    } catch {
        XCTFail("expected .invalidFile, got \(error) \(context)", file: file, line: line)
    }
}

/// Asserts `expression` throws `.invalidData` whose message mentions `keyword`.
func assertInvalidData<T>(
    _ expression: @autoclosure () throws -> T, mentions keyword: String,
    file: StaticString = #filePath, line: UInt = #line
) {
    do {
        _ = try expression()
        XCTFail("expected .invalidData mentioning \"\(keyword)\"", file: file, line: line)
    } catch ReLoRAError.invalidData(let message) {
        XCTAssertTrue(message.contains(keyword), "message \"\(message)\" lacks \"\(keyword)\"", file: file, line: line)
    } catch {
        XCTFail("expected .invalidData, got \(error)", file: file, line: line)
    }
}

// MARK: Host access for tests (the library itself goes through backend ops)

extension Tensor {
    /// The values of an f32 CPU tensor.
    func toArray() -> [Float] { Array(UnsafeBufferPointer(start: f32, count: count)) }

    /// Overwrites an f32 CPU tensor.
    func copy(from values: [Float]) {
        precondition(values.count == count, "copy: \(values.count) values into a tensor of \(count)")
        values.withUnsafeBufferPointer { f32.update(from: $0.baseAddress!, count: count) }
    }
}

extension BlockParameters {
    /// The dense base weight W of each linear.
    var q: Tensor { linear(.q).weight.dense! }
    var k: Tensor { linear(.k).weight.dense! }
    var v: Tensor { linear(.v).weight.dense! }
    var o: Tensor { linear(.o).weight.dense! }
    var gate: Tensor { linear(.gate).weight.dense! }
    var up: Tensor { linear(.up).weight.dense! }
    var down: Tensor { linear(.down).weight.dense! }
}

extension LlamaModel {
    /// (name, gradient) of every trained tensor, in `trainableParameters()` order.
    func namedGradients() -> [(String, Tensor)] { trainableParameters().map { ($0.name, $0.grad) } }
}
