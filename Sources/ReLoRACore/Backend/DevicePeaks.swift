/// A device's peak rates, from which the per-op profile predicts what each op should take
/// (`DevicePeaks.seconds(for:)`), and MFU divides by (`bf16TensorFLOPs`).
///
/// The GPU figures are the vendors' data sheets (dense, no sparsity; SXM parts unless the name says PCIe):
/// bf16 tensor-core FLOP/s with fp32 accumulation (the GeForce cards run that at half their fp16-accumulate
/// rate, which is what their headline figure is), f32 FLOP/s on the CUDA cores (non-tensor), device memory
/// bandwidth, and the host link (PCIe, one direction, the theoretical rate of the slot generation: 5.0 x16
/// = 64 GB/s, 4.0 x16 = 32 GB/s). On the CPU backend the figures are measured instead (`ReLoRATrain`'s
/// `PeakFLOPs.cpuPeaks`).
public struct DevicePeaks: Sendable, Equatable {
    /// What the figures are for: a data-sheet entry's name, or how a CPU's were measured.
    public var name: String
    /// Dense bf16 matrix FLOP/s with f32 accumulation (tensor cores); on a CPU the sgemm rate.
    public var bf16TensorFLOPs: Double
    /// f32 FLOP/s of the ordinary (non-tensor) units: every op that is not a bf16 matrix product.
    public var f32FLOPs: Double
    /// Device memory bytes/s (read + write counted together).
    public var memoryBandwidth: Double
    /// Host <-> device bytes/s (uploads and downloads).
    public var hostLinkBandwidth: Double

    public init(name: String, bf16TensorFLOPs: Double, f32FLOPs: Double, memoryBandwidth: Double, hostLinkBandwidth: Double) {
        self.name = name
        self.bf16TensorFLOPs = bf16TensorFLOPs
        self.f32FLOPs = f32FLOPs
        self.memoryBandwidth = memoryBandwidth
        self.hostLinkBandwidth = hostLinkBandwidth
    }

    /// The roofline time of one op: `max(flops / peak, bytes / bandwidth)`, the peak being the tensor cores'
    /// for a bf16 matrix product (`OpCost.tensorCores`) and the f32 units' otherwise, the bandwidth the host
    /// link's for a transfer and device memory's otherwise. No launch latency, no overlap between ops.
    public func seconds(for cost: OpCost) -> Double {
        let compute = cost.flops / (cost.tensorCores ? bf16TensorFLOPs : f32FLOPs)
        let memory = cost.bytes / (cost.overHostLink ? hostLinkBandwidth : memoryBandwidth)
        return max(compute, memory)
    }

    private static let pcie5 = 64e9, pcie4 = 32e9

    /// The data sheets, matched by a substring of the driver's device name (`cudaDeviceProp.name`, e.g.
    /// "NVIDIA H200", "NVIDIA A100-SXM4-40GB"), first match wins (so the more specific names come first).
    public static let dataSheets: [(match: String, peaks: DevicePeaks)] = [
        ("H200", DevicePeaks(name: "H200 SXM", bf16TensorFLOPs: 989e12, f32FLOPs: 67e12, memoryBandwidth: 4.8e12, hostLinkBandwidth: pcie5)),
        ("H100 PCIe", DevicePeaks(name: "H100 PCIe", bf16TensorFLOPs: 756e12, f32FLOPs: 51e12, memoryBandwidth: 2.0e12, hostLinkBandwidth: pcie5)),
        ("H100", DevicePeaks(name: "H100 SXM", bf16TensorFLOPs: 989e12, f32FLOPs: 67e12, memoryBandwidth: 3.35e12, hostLinkBandwidth: pcie5)),
        ("A100-SXM4-40GB", DevicePeaks(name: "A100 SXM 40 GB", bf16TensorFLOPs: 312e12, f32FLOPs: 19.5e12, memoryBandwidth: 1.555e12, hostLinkBandwidth: pcie4)),
        ("A100-PCIE-40GB", DevicePeaks(name: "A100 PCIe 40 GB", bf16TensorFLOPs: 312e12, f32FLOPs: 19.5e12, memoryBandwidth: 1.555e12, hostLinkBandwidth: pcie4)),
        ("A100 80GB PCIe", DevicePeaks(name: "A100 PCIe 80 GB", bf16TensorFLOPs: 312e12, f32FLOPs: 19.5e12, memoryBandwidth: 1.935e12, hostLinkBandwidth: pcie4)),
        ("A100", DevicePeaks(name: "A100 SXM 80 GB", bf16TensorFLOPs: 312e12, f32FLOPs: 19.5e12, memoryBandwidth: 2.039e12, hostLinkBandwidth: pcie4)),
        ("L40S", DevicePeaks(name: "L40S", bf16TensorFLOPs: 362e12, f32FLOPs: 91.6e12, memoryBandwidth: 864e9, hostLinkBandwidth: pcie4)),
        ("RTX 6000 Ada", DevicePeaks(name: "RTX 6000 Ada", bf16TensorFLOPs: 364e12, f32FLOPs: 91.1e12, memoryBandwidth: 960e9, hostLinkBandwidth: pcie4)),
        ("RTX 4090", DevicePeaks(name: "RTX 4090", bf16TensorFLOPs: 165.2e12, f32FLOPs: 82.6e12, memoryBandwidth: 1008e9, hostLinkBandwidth: pcie4)),
        ("RTX 3090", DevicePeaks(name: "RTX 3090", bf16TensorFLOPs: 71e12, f32FLOPs: 35.6e12, memoryBandwidth: 936e9, hostLinkBandwidth: pcie4)),
        ("RTX A6000", DevicePeaks(name: "RTX A6000", bf16TensorFLOPs: 154.8e12, f32FLOPs: 38.7e12, memoryBandwidth: 768e9, hostLinkBandwidth: pcie4)),
        ("L4", DevicePeaks(name: "L4", bf16TensorFLOPs: 121e12, f32FLOPs: 30.3e12, memoryBandwidth: 300e9, hostLinkBandwidth: pcie4)),
        ("A10", DevicePeaks(name: "A10", bf16TensorFLOPs: 125e12, f32FLOPs: 31.2e12, memoryBandwidth: 600e9, hostLinkBandwidth: pcie4)),
    ]

    /// The data sheet of the device named `deviceName`, nil for one not in the table.
    public static func dataSheet(deviceName: String) -> DevicePeaks? {
        dataSheets.first { deviceName.contains($0.match) }?.peaks
    }
}
