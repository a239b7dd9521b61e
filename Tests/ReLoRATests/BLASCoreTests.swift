import COpenBLAS
import CReLoRA
import Foundation
import XCTest

/// The OpenBLAS core check (relora_blas_core.h): the pure decision on table cases, the core this test
/// process runs on (reported, since `swift test` starts it and only the user's environment can fix it),
/// and the `relora` executable, which restarts itself on the best core.
final class BLASCoreTests: XCTestCase {
    static func features(avx512: Bool = false, avx2: Bool = false, avx: Bool = false,
                         osZmm: Bool = true) -> relora_cpu_features {
        var f = relora_cpu_features()
        let ymm = avx512 || avx2 || avx
        f.avx = ymm ? 1 : 0
        f.os_ymm = ymm ? 1 : 0
        f.avx2 = avx512 || avx2 ? 1 : 0
        f.fma = avx512 || avx2 ? 1 : 0
        let z: Int32 = avx512 ? 1 : 0
        (f.avx512f, f.avx512bw, f.avx512dq, f.avx512vl) = (z, z, z, z)
        f.os_zmm = avx512 && osZmm ? 1 : 0
        return f
    }

    static let avx512 = features(avx512: true)
    static let avx512NoOSState = features(avx512: true, osZmm: false)
    static let avx2 = features(avx2: true)
    static let avxOnly = features(avx: true)
    static let sseOnly = features()

    func decide(_ cpu: relora_cpu_features, _ core: String?, user: String? = nil, dynamic: Bool = true) -> String? {
        var cpu = cpu
        func call(_ core: UnsafePointer<CChar>?) -> String? {
            let answer: UnsafePointer<CChar>? = if let user {
                user.withCString { relora_blas_core_to_force(&cpu, core, $0, dynamic ? 1 : 0) }
            } else {
                relora_blas_core_to_force(&cpu, core, nil, dynamic ? 1 : 0)
            }
            return answer.map { String(cString: $0) }
        }
        return core.map { $0.withCString { call($0) } } ?? call(nil)
    }

    func testBestCoreFromFeatures() {
        func best(_ f: relora_cpu_features) -> String? {
            var f = f
            return relora_blas_best_core(&f).map { String(cString: $0) }
        }
        XCTAssertEqual(best(Self.avx512), "SkylakeX")
        XCTAssertEqual(best(Self.avx512NoOSState), "Haswell", "AVX-512 without OS zmm state must not pick AVX-512 kernels")
        XCTAssertEqual(best(Self.avx2), "Haswell")
        XCTAssertEqual(best(Self.avxOnly), "Sandybridge")
        XCTAssertNil(best(Self.sseOnly))
        var noFMA = Self.avx2
        noFMA.fma = 0
        XCTAssertEqual(best(noFMA), "Sandybridge")
    }

    func testDecisionTable() {
        let cases: [(String, relora_cpu_features, String?, String?, Bool, String?)] = [
            // name, cpu, OpenBLAS's core, OPENBLAS_CORETYPE, DYNAMIC_ARCH, expected
            ("Emerald Rapids fallback", Self.avx512, "Prescott", nil, true, "SkylakeX"),
            ("user's choice kept", Self.avx512, "Prescott", "Prescott", true, nil),
            ("user's other choice kept", Self.avx512, "Haswell", "Haswell", true, nil),
            ("empty variable is unset", Self.avx512, "Prescott", "", true, "SkylakeX"),
            ("already SkylakeX", Self.avx512, "SkylakeX", nil, true, nil),
            ("Cooperlake is AVX-512", Self.avx512, "Cooperlake", nil, true, nil),
            ("SapphireRapids is AVX-512", Self.avx512, "SapphireRapids", nil, true, nil),
            ("unknown newer core trusted", Self.avx512, "GraniteRapids", nil, true, nil),
            ("Haswell on AVX-512", Self.avx512, "Haswell", nil, true, "SkylakeX"),
            ("Sandybridge on AVX-512", Self.avx512, "Sandybridge", nil, true, "SkylakeX"),
            ("Nehalem on AVX-512", Self.avx512, "Nehalem", nil, true, "SkylakeX"),
            ("capitals of a static build", Self.avx512, "PRESCOTT", nil, true, "SkylakeX"),
            ("static build ignores the variable", Self.avx512, "Prescott", nil, false, nil),
            ("no OpenBLAS", Self.avx512, nil, nil, true, nil),
            ("no OS zmm state", Self.avx512NoOSState, "Prescott", nil, true, "Haswell"),
            ("no OS zmm state, Haswell", Self.avx512NoOSState, "Haswell", nil, true, nil),
            ("Haswell on AVX2", Self.avx2, "Haswell", nil, true, nil),
            ("Zen on AVX2", Self.avx2, "Zen", nil, true, nil),
            ("Excavator on AVX2", Self.avx2, "Excavator", nil, true, nil),
            ("Core2 on AVX2", Self.avx2, "Core2", nil, true, "Haswell"),
            ("Sandybridge on AVX2", Self.avx2, "Sandybridge", nil, true, "Haswell"),
            ("Prescott on AVX", Self.avxOnly, "Prescott", nil, true, "Sandybridge"),
            ("Sandybridge on AVX", Self.avxOnly, "Sandybridge", nil, true, nil),
            ("Prescott on SSE", Self.sseOnly, "Prescott", nil, true, nil),
        ]
        for (name, cpu, core, user, dynamic, expected) in cases {
            XCTAssertEqual(decide(cpu, core, user: user, dynamic: dynamic), expected, name)
        }
    }

    /// This process cannot restart itself (`swift test` reads its output), so it reports its core and
    /// warns when OpenBLAS runs weaker kernels than the CPU allows; tests stay correct, only slower.
    func testReportsThisProcessCore() throws {
        let core = try XCTUnwrap(relora_blas_core_name(), "the test bundle links OpenBLAS").pointee
        XCTAssertNotEqual(core, 0)
        var buffer = [CChar](repeating: 0, count: 256)
        let line = buffer.withUnsafeMutableBufferPointer { String(cString: relora_blas_describe($0.baseAddress, $0.count)) }
        print("blas: \(line)")
        XCTAssertTrue(line.hasPrefix("OpenBLAS"), line)
        if line.contains("slower than the CPU allows") {
            FileHandle.standardError.write(Data("warning: tests run OpenBLAS on weak kernels: \(line)\n".utf8))
        }
    }

    /// `relora info` restarts on the best core, so the core it reports is never weaker than the CPU
    /// allows (on any CPU: without AVX-512 the bar is AVX2 or AVX, without AVX nothing). The child runs
    /// without OPENBLAS_CORETYPE (scripts/test.sh sets it for this process; relora keeps a user's choice).
    func testCLIRunsOnBestCore() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: reloraExecutable), "relora not built")
        let config = try XCTUnwrap(openblas_get_config().map { String(cString: $0) })
        try XCTSkipUnless(config.contains("DYNAMIC_ARCH"), "OpenBLAS without DYNAMIC_ARCH cannot change its core")
        let unset: [String: String?] = ["OPENBLAS_CORETYPE": nil]
        let info = try runRelora(["info"], environment: unset)
        XCTAssertEqual(info.status, 0, info.stderr)
        XCTAssertEqual(info.stderr, "", "no warning expected")
        let line = info.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertTrue(line.hasPrefix("blas: OpenBLAS "), line)
        XCTAssertFalse(line.contains("slower than the CPU allows"), line)
        let bare = try runRelora(["info", "--blas-core"], environment: unset)
        XCTAssertEqual(bare.status, 0, bare.stderr)
        let core = bare.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertTrue(line.contains(" core \(core) "), "\(line) vs --blas-core \(core)")
        XCTAssertNil(decide(relora_cpu_features_detect(), core), "relora runs OpenBLAS core \(core): \(line)")
    }
}
