import Foundation
import ReLoRACore
import ReLoRAFormats
import ReLoRATokenizer
import ReLoRAModel
import ReLoRACheckpoint

/// Model FLOPs of a training step, for MFU (model FLOPs utilisation = model FLOPs per second / peak).
///
/// Convention (PaLM's MFU, as in the benchmark): one multiply-add is 2 FLOPs; for every matmul with a weight
/// (the seven block linears and the LM head; the embedding is a lookup) a token costs 2 FLOPs per weight
/// forward, 2 for the input gradient dX and 2 for the weight gradient dW: 6 per weight. Attention adds
/// 12 x seqLen x (heads x head_dim) per token per layer (QK^T and AV, forward 4, backward 8; the full
/// T x T square is counted, as PaLM does, though the causal mask makes half of it zeros). Recomputation by
/// gradient checkpointing is not counted (it is not model work), nor are norms, RoPE, SwiGLU, softmax and
/// the optimizer (O(weights) per step, not per token).
///
/// In `lora`/`relora` modes the FLOPs actually executed are counted: a frozen block linear costs 4 per
/// weight per token (forward and dX; no dW), and each adapter adds 6 x r x (in + out) per token (x A^T and
/// (xA^T) B^T forward, dB, d(xA^T), dA and dX backward). The LM head and embeddings stay trained (6).
public enum ModelFLOPs {
    /// (in, out) of the seven block linears of one layer: q, k, v, o, gate, up, down.
    public static func blockLinears(_ c: LlamaConfig) -> [(in: Int, out: Int)] {
        let h = c.hiddenSize
        return [(h, c.queryWidth), (h, c.keyValueWidth), (h, c.keyValueWidth), (c.queryWidth, h),
                (h, c.intermediateSize), (h, c.intermediateSize), (c.intermediateSize, h)]
    }

    /// Training FLOPs per token (forward + backward) at sequence length `seqLen`; `lora` nil = full-rank.
    public static func perToken(config c: LlamaConfig, seqLen: Int, lora: LoRAConfig?) -> Double {
        let linears = blockLinears(c)
        let blockWeights = Double(c.numHiddenLayers * linears.reduce(0) { $0 + $1.in * $1.out })
        let headWeights = Double(c.vocabSize * c.hiddenSize)
        let attention = 12.0 * Double(c.numHiddenLayers * seqLen * c.queryWidth)
        guard let lora else { return 6 * (blockWeights + headWeights) + attention }
        let adapters = 6.0 * Double(lora.rank * c.numHiddenLayers * linears.reduce(0) { $0 + $1.in + $1.out })
        return 4 * blockWeights + 6 * headWeights + adapters + attention
    }

    /// FLOPs of one optimizer step of `recipe` (all its micro-batches).
    public static func perStep(config: LlamaConfig, recipe: Recipe) -> Double {
        perToken(config: config, seqLen: recipe.seqLen, lora: recipe.loraConfig) * Double(recipe.tokensPerStep)
    }
}

/// The peak FLOP/s a backend's MFU is measured against.
public enum PeakFLOPs {
    /// Best FLOP/s of the CPU backend's sgemm (OpenBLAS tiles on `cpuThreadCount` threads; row-major,
    /// `C[m,n] = A[m,k] B[k,n]`, B stored `[n,k]` if `transB`) over `reps` timed calls after one untimed
    /// warm-up call.
    public static func sgemm(m: Int, n: Int, k: Int, transB: Bool = false, reps: Int = 3) -> Double {
        let a = [Float](repeating: 0.5, count: m * k), b = [Float](repeating: 0.25, count: k * n)
        var c = [Float](repeating: 0, count: m * n)
        func run() {
            c.withUnsafeMutableBufferPointer { cp in
                CPUBackend.sgemm(a, b, cp.baseAddress!, m: m, n: n, k: k, lda: k, ldb: transB ? k : n, ldc: n,
                                 transA: false, transB: transB, alpha: 1, beta: 0)
            }
        }
        run()
        var best = 0.0
        for _ in 0..<max(1, reps) {
            let t0 = DispatchTime.now().uptimeNanoseconds
            run()
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            best = max(best, 2.0 * Double(m) * Double(n) * Double(k) / max(seconds, 1e-9))
        }
        return best
    }

    /// The CPU's peak: the sgemm rate of a 1024^3 product (2.1 GFLOP; ~0.1 s for the warm-up and three
    /// timed calls on 2 cores), measured once per process on first use. Other jobs on the machine lower it,
    /// which raises the MFU of steps that run while they are quiet: read MFU as a ratio within one run.
    public static let cpu: Double = sgemm(m: 1024, n: 1024, k: 1024)

    /// The peak for `backend`'s MFU: the measured sgemm rate on the CPU, the device's dense bf16 tensor-core
    /// peak on a GPU (`cudaBF16Peak`); nil where none is known (a planning backend, the emulation, a GPU
    /// missing from the table).
    public static func peak(for backend: Backend) -> Double? {
        if let device = backend as? DeviceBackend {
            return device.isEmulated ? nil : cudaBF16Peak(deviceName: device.deviceName)
        }
        return backend.name == "cpu" ? cpu : nil
    }

    /// Dense bf16 tensor-core FLOP/s with fp32 accumulation (no sparsity) from the vendors' data sheets, by
    /// device name (`cudaDeviceProp.name`): `DevicePeaks.dataSheets`.
    public static func cudaBF16Peak(deviceName name: String) -> Double? {
        DevicePeaks.dataSheet(deviceName: name)?.bf16TensorFLOPs
    }

    /// The peaks the per-op profile predicts from: a GPU's data sheet (nil on the emulation and for a GPU
    /// missing from the table), the CPU's measured rates (`cpuPeaks`), nil for a planning backend.
    public static func devicePeaks(for backend: Backend) -> DevicePeaks? {
        if let device = backend as? DeviceBackend {
            return device.isEmulated ? nil : DevicePeaks.dataSheet(deviceName: device.deviceName)
        }
        return backend.name == "cpu" ? cpuPeaks : nil
    }

    /// The CPU's rates, measured once per process on first use: the sgemm peak (`cpu`) for every FLOP, and
    /// for memory and "transfers" (host copies) the best of three single-threaded 64 MiB memcpys (read +
    /// write: 128 MiB moved; ~0.1 s). One thread's copy rate is below what all cores stream together, so
    /// bandwidth-bound ops may beat their prediction slightly.
    public static let cpuPeaks: DevicePeaks = {
        let bytes = 64 << 20
        let a = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        let b = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        defer { a.deallocate(); b.deallocate() }
        a.initializeMemory(as: UInt8.self, repeating: 1, count: bytes)
        b.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        var best = Double.infinity
        for _ in 0..<3 {
            let t0 = DispatchTime.now().uptimeNanoseconds
            memcpy(b, a, bytes)
            best = min(best, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
        }
        let bandwidth = 2 * Double(bytes) / max(best, 1e-9)
        return DevicePeaks(name: "this CPU (measured: sgemm, one thread's memcpy)", bf16TensorFLOPs: cpu, f32FLOPs: cpu,
                           memoryBandwidth: bandwidth, hostLinkBandwidth: bandwidth)
    }()
}
