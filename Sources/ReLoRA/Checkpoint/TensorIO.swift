/// Moving tensors between safetensors files and a backend, one tensor at a time: a load streams the
/// mapped file's bytes straight into the backend's upload (converting F32/BF16/F16 to the tensor's
/// dtype), so importing a model never holds more than one tensor beyond the model itself; a save makes
/// each tensor's bytes only when the writer reaches it.
enum TensorIO {
    /// Fills `tensor` from tensor `name` of `file`, checking presence and shape.
    static func load(_ tensor: Tensor, from file: SafetensorsFile, _ name: String, backend: Backend) throws {
        guard let info = file.info(name) else {
            throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' is missing")
        }
        guard info.shape == tensor.shape else {
            throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' has shape \(info.shape), expected \(tensor.shape)")
        }
        switch info.dtype {
        case .F32, .BF16, .F16:
            let dtype: DType = info.dtype == .F32 ? .f32 : info.dtype == .BF16 ? .bf16 : .f16
            try file.withRawBytes(name) { backend.upload(raw: $0, dtype: dtype, to: tensor) }
        case .F64:
            backend.upload(try file.floats(name), to: tensor)
        case .I64, .I32, .I16, .I8, .U8, .BOOL:
            throw ReLoRAError.invalidFile(path: file.path, reason: "tensor '\(name)' has dtype \(info.dtype.rawValue), expected a float type (F32, BF16, F16)")
        }
    }

    /// A safetensors entry that downloads `tensor` when written, as F32 or rounded to BF16.
    static func entry(_ name: String, _ tensor: Tensor, backend: Backend, bfloat16: Bool = false) -> SafetensorsEntry {
        if bfloat16 {
            return SafetensorsEntry(name: name, dtype: .BF16, shape: tensor.shape) {
                SafetensorsEntry.bf16(name, shape: tensor.shape, backend.download(tensor)).bytes
            }
        }
        return SafetensorsEntry(name: name, dtype: .F32, shape: tensor.shape) {
            backend.download(tensor).withUnsafeBytes { Array($0) }
        }
    }
}
