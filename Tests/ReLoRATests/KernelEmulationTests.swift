import CReLoRA
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

/// The kernel library seen from Swift, without a GPU: `Kernels/`'s CPU emulation (`libreloracuda-emu.so`,
/// the same kernel sources compiled by g++ against `Kernels/emu/cuda_emu.h`).
///
/// - The kernel harness (`make -C Kernels emu test`: every kernel against scalar references, in four
///   thread schedules, plus the emulation's own checks) passes.
/// - The emulated library loads through `relora_cuda_load`, the loader the CUDA backend uses, and
///   agrees with this side's view of the ABI: the version, `relora_library_info`'s size and the quantized
///   block layouts as the kernels' compiler laid them out.
/// - A call through the loaded table from Swift (upload, dequantize on the emulated device, download)
///   gives the CPU reference's bits.
///
/// The tests need `make` and a C++ compiler; without them they are skipped (the Swift package itself never
/// needs either).
final class KernelEmulationTests: XCTestCase {
    static let kernelsDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Kernels").path
    static var emulatedLibrary: String { kernelsDirectory + "/build/libreloracuda-emu.so" }

    static func which(_ tool: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        return path.split(separator: ":").map { "\($0)/\(tool)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Runs `make -C Kernels <targets>`; returns the exit status and the combined output.
    static func make(_ targets: [String]) throws -> (status: Int32, output: String) {
        try runProcess(which("make")!, ["-C", kernelsDirectory] + targets)
    }

    /// A NUL-terminated C string in a buffer.
    static func text(_ buffer: [CChar]) -> String {
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func requireToolchain() throws {
        guard which("make") != nil, which("g++") != nil else {
            throw XCTSkip("make and g++ are needed to build Kernels/'s CPU emulation")
        }
    }

    /// Builds the emulated library once per test process (make is incremental anyway).
    nonisolated(unsafe) static var built: (status: Int32, output: String)?
    static func buildEmulation() throws {
        try requireToolchain()
        if built == nil { built = try make(["emu"]) }
        if let b = built, b.status != 0 {
            XCTFail("make -C Kernels emu failed (\(b.status)):\n\(b.output.suffix(4000))")
            throw XCTSkip("no emulated library")
        }
    }

    func testKernelHarnessPasses() throws {
        try Self.requireToolchain()
        let (status, output) = try Self.make(["emu", "test"])
        XCTAssertEqual(status, 0, "make -C Kernels emu test failed; its failing lines and summary:\n" +
            output.split(separator: "\n").filter { !$0.hasPrefix("PASS") }.suffix(60).joined(separator: "\n"))
        XCTAssertTrue(output.contains("ALL PASSED"), String(output.suffix(2000)))
    }

    func testEmulatedLibraryMatchesTheABIHeader() throws {
        try Self.buildEmulation()
        var api = relora_cuda_api()
        var err = [CChar](repeating: 0, count: 512)
        XCTAssertEqual(relora_cuda_load(Self.emulatedLibrary, &api, &err, err.count), 0, Self.text(err))
        defer { relora_cuda_unload(&api) }
        XCTAssertEqual(api.abi_version?(), RELORA_ABI_VERSION)

        var info = relora_library_info()
        XCTAssertEqual(api.library_info?(&info), RELORA_OK)
        let build = withUnsafeBytes(of: info.build) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        XCTAssertEqual(info.abi_version, RELORA_ABI_VERSION)
        XCTAssertEqual(info.emulated, 1, build)
        // The struct both sides pass by pointer, and the block layouts the kernels index, must agree.
        XCTAssertEqual(Int(info.info_size), MemoryLayout<relora_library_info>.size)
        XCTAssertEqual(Int(info.block_q8_0_size), MemoryLayout<block_q8_0>.size)
        XCTAssertEqual(Int(info.block_q4_0_size), MemoryLayout<block_q4_0>.size)
        XCTAssertEqual(Int(info.block_nf4_size), MemoryLayout<block_nf4>.size)
        XCTAssertEqual(Int(info.block_nf4_align), MemoryLayout<block_nf4>.alignment)
        XCTAssertEqual(Int(info.bf16_size), DType.bf16.byteSize)
        XCTAssertEqual(Int(info.device_properties_size), MemoryLayout<relora_device_properties>.size)
        XCTAssertEqual(Int(info.norm_entry_size), MemoryLayout<relora_norm_entry>.stride)
        XCTAssertEqual(Int(info.adam_entry_size), MemoryLayout<relora_adam_entry>.stride)
        for format in QuantFormat.allCases {
            let kernelBytes = [QuantFormat.q8_0: info.block_q8_0_size, .q4_0: info.block_q4_0_size, .nf4: info.block_nf4_size][format]!
            XCTAssertEqual(Int(kernelBytes), format.bytesPerBlock, format.rawValue)
        }
        var count: Int32 = 0
        XCTAssertEqual(api.device_count?(&count), Int32(RELORA_OK.rawValue))
        XCTAssertEqual(count, 1, "the emulation is one device")
    }

    /// The CUDA build, where one was made (`make -C Kernels cuda`, or Kernels/ci.sh): nvcc's layouts agree
    /// with this side's too. Its library_info needs no device, only the CUDA runtime the build links.
    func testCUDALibraryMatchesTheABIHeaderWhenBuilt() throws {
        let path = Self.kernelsDirectory + "/build/libreloracuda.so"
        guard FileManager.default.fileExists(atPath: path) else { throw XCTSkip("no CUDA build at \(path)") }
        var api = relora_cuda_api()
        var err = [CChar](repeating: 0, count: 512)
        guard relora_cuda_load(path, &api, &err, err.count) == 0 else {
            throw XCTSkip("the CUDA build does not load here (\(Self.text(err)))")
        }
        defer { relora_cuda_unload(&api) }
        var info = relora_library_info()
        XCTAssertEqual(api.library_info?(&info), RELORA_OK)
        XCTAssertEqual(info.emulated, 0)
        XCTAssertEqual(Int(info.info_size), MemoryLayout<relora_library_info>.size)
        XCTAssertEqual(Int(info.block_q8_0_size), MemoryLayout<block_q8_0>.size)
        XCTAssertEqual(Int(info.block_q4_0_size), MemoryLayout<block_q4_0>.size)
        XCTAssertEqual(Int(info.block_nf4_size), MemoryLayout<block_nf4>.size)
        XCTAssertEqual(Int(info.bf16_size), 2)
        XCTAssertEqual(Int(info.device_properties_size), MemoryLayout<relora_device_properties>.size)
        // No device is an answer, not an error.
        var count: Int32 = -1
        XCTAssertEqual(api.device_count?(&count), Int32(RELORA_OK.rawValue))
        XCTAssertGreaterThanOrEqual(count, 0)
    }

    /// Quantize on the host with the Swift path, dequantize on the emulated device through the ABI table,
    /// compare bit for bit with `QuantizedMatrix.dequantize` (padded rows: 70 columns).
    func testDequantizeThroughTheLoadedTable() throws {
        try Self.buildEmulation()
        var api = relora_cuda_api()
        var err = [CChar](repeating: 0, count: 512)
        XCTAssertEqual(relora_cuda_load(Self.emulatedLibrary, &api, &err, err.count), 0, Self.text(err))
        defer { relora_cuda_unload(&api) }
        let rows = 3, cols = 70
        let values = (0 ..< rows * cols).map { Float(($0 * 37) % 101) / 50 - 1 }
        for (format, id) in [(QuantFormat.q8_0, RELORA_FORMAT_Q8_0), (.q4_0, RELORA_FORMAT_Q4_0), (.nf4, RELORA_FORMAT_NF4)] {
            let q = try QuantizedMatrix(quantizing: values, rows: rows, cols: cols, format: format)
            var blocks: UnsafeMutableRawPointer?
            var out: UnsafeMutableRawPointer?
            XCTAssertEqual(api.malloc?(&blocks, Int64(q.bytes.count)), RELORA_OK)
            XCTAssertEqual(api.malloc?(&out, Int64(rows * cols * 4)), RELORA_OK)
            defer { _ = api.free?(blocks); _ = api.free?(out) }
            q.bytes.withUnsafeBytes { raw in
                XCTAssertEqual(api.memcpy?(blocks, raw.baseAddress, Int64(raw.count), RELORA_MEMCPY_HOST_TO_DEVICE, nil), RELORA_OK)
            }
            XCTAssertEqual(api.dequantize?(id, blocks, Int64(rows), Int64(cols), out, RELORA_DTYPE_F32, nil), RELORA_OK,
                           String(cString: api.last_error!()!))
            var device = [Float](repeating: .nan, count: rows * cols)
            device.withUnsafeMutableBytes { raw in
                XCTAssertEqual(api.memcpy?(raw.baseAddress, out, Int64(raw.count), RELORA_MEMCPY_DEVICE_TO_HOST, nil), RELORA_OK)
            }
            XCTAssertEqual(api.stream_synchronize?(nil), RELORA_OK)
            XCTAssertEqual(device.map(\.bitPattern), q.dequantize().map(\.bitPattern), format.rawValue)
        }
    }

    /// The loader's contract: a missing file and a library without the entry points fail with one sentence.
    func testLoaderRejectsWhatIsNotAKernelLibrary() throws {
        var api = relora_cuda_api()
        var err = [CChar](repeating: 0, count: 512)
        XCTAssertEqual(relora_cuda_load("/nonexistent/libreloracuda.so", &api, &err, err.count), 1)
        XCTAssertTrue(Self.text(err).contains("cannot open the CUDA kernel library"), Self.text(err))
        XCTAssertEqual(relora_cuda_load("libm.so.6", &api, &err, err.count), 2)
        XCTAssertTrue(Self.text(err).contains("is not a relora kernel library"), Self.text(err))
        XCTAssertNil(api.handle, "a failed load leaves nothing open")
    }
}
