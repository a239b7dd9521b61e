import CReLoRA

/// The CPU backend's quantized-weight ops: the reference quantizer and dequantizer of `relora_quant.h`
/// (bit-exact by construction), and linear layers that dequantize bounded tiles of W's rows into a
/// reused f32 scratch and hand each tile to sgemm, so the dense weight of a layer never exists.
extension CPUBackend {
    /// Rows of W per tile: about 4 MiB of f32 and at least 512 rows (at most all of them). The tile is a
    /// GEMM dimension (N of the forward, K of the input gradient, whose C = dx is re-read once per tile):
    /// with 48-row tiles (1 MiB of a 5461-wide row) the skinny GEMMs ran at half the dense rate; 512 rows
    /// measured 1.02-1.05x of dense on the 1b down_proj shape against 1.06-1.08x for 256 (same runs).
    static func tileRows(rows: Int, cols: Int) -> Int {
        min(rows, max(512, (1 << 20) / max(1, cols)))
    }

    public func dequantizeScratchShape(rows: Int, cols: Int) -> [Int] {
        [Self.tileRows(rows: rows, cols: cols), cols]
    }

    public func downloadRaw(_ tensor: Tensor) -> [UInt8] {
        ledger.downloaded(tensor.byteCount)
        return Array(UnsafeRawBufferPointer(tensor.hostBytes))
    }

    public func quantize(_ source: Tensor, into q: QuantizedTensor, rounding: QuantRounding) -> QuantizationFailure? {
        ledger.downloaded(MemoryLayout<Int32>.size)  // the status
        precondition(source.count == q.rows * q.cols, "quantize: \(source.count) values for [\(q.rows), \(q.cols)]")
        precondition(q.blocks.dtype == .u8 && q.blocks.count == q.rows * q.bytesPerRow, "quantize: blocks of the wrong size")
        let src = source.f32, out = q.blocks.storage!
        let (rows, cols, paddedCols, bytesPerRow, format) = (q.rows, q.cols, q.paddedCols, q.bytesPerRow, q.format)
        // Rows in parallel chunks; each chunk stops at its first failing row, and the failure of the lowest
        // row wins, so the reported element is the first in row-major order whatever the chunking.
        let chunks = parallelChunkCount(rows, minPerChunk: 8)
        var failures = [QuantizationFailure?](repeating: nil, count: chunks)
        failures.withUnsafeMutableBufferPointer { failed in
            let failed = UncheckedSendable(failed.baseAddress!)
            parallelChunks(rows, minPerChunk: 8) { chunk, range in
                let padded = UnsafeMutablePointer<Float>.allocate(capacity: max(1, paddedCols))
                padded.initialize(repeating: 0, count: max(1, paddedCols))
                defer { padded.deallocate() }
                for r in range {
                    let row = src + r * cols
                    let input: UnsafePointer<Float>
                    if paddedCols == cols {
                        input = UnsafePointer(row)
                    } else {
                        padded.update(from: row, count: cols)  // the padding stays zero
                        input = UnsafePointer(padded)
                    }
                    var bad: Int64 = -1
                    let status = QuantizedMatrix.quantizeRow(format, input, out + r * bytesPerRow, Int64(paddedCols), &bad,
                                                             rounding: rounding, counter0: UInt64(r * paddedCols))
                    if status != RELORA_QUANT_OK {
                        let col = Int(bad)
                        failed.value[chunk] = QuantizationFailure(
                            reason: status == RELORA_QUANT_ERR_NONFINITE ? .nonFinite : .scaleOverflow, row: r, col: col, value: row[col])
                        return
                    }
                }
            }
        }
        return failures.lazy.compactMap { $0 }.first
    }

    public func countChangedCodes(old: Tensor, new q: QuantizedTensor, into out: Tensor, at index: Int) {
        precondition(old.dtype == .u8 && old.count == q.blocks.count, "countChangedCodes: old blocks of another size")
        let a = UnsafeRawPointer(old.storage!), b = UnsafeRawPointer(q.blocks.storage!)
        let blocksPerRow = q.format.blocksPerRow(cols: q.cols), bytesPerRow = q.bytesPerRow, format = q.format
        // Integer counts per chunk: their sum is exact, so the thread count cannot change it.
        let chunks = parallelChunkCount(q.rows, minPerChunk: 64)
        var partial = [Int](repeating: 0, count: chunks)
        partial.withUnsafeMutableBufferPointer { counts in
            let counts = UncheckedSendable(counts.baseAddress!)
            parallelChunks(q.rows, minPerChunk: 64) { chunk, range in
                var changed = 0
                for r in range {
                    changed += QuantizedMatrix.changedCodes(format, a + r * bytesPerRow, b + r * bytesPerRow, blocks: blocksPerRow)
                }
                counts.value[chunk] = changed
            }
        }
        out.f32[index] = Float(partial.reduce(0, +))
    }

    public func dequantize(_ q: QuantizedTensor, firstRow: Int, rowCount: Int, into out: Tensor) {
        precondition(firstRow >= 0 && rowCount >= 0 && firstRow + rowCount <= q.rows, "dequantize: rows out of range")
        precondition(out.count >= rowCount * q.cols, "dequantize: output too small")
        let span = profiler?.begin(.dequantize, .dequantize(rows: rowCount, cols: q.cols, blockBytes: rowCount * q.bytesPerRow,
                                                            outBytes: out.dtype.byteSize))
        defer { span?.end() }
        let dst = out.f32, blocks = UnsafeRawPointer(q.blocks.storage!)
        let (cols, paddedCols, bytesPerRow, format) = (q.cols, q.paddedCols, q.bytesPerRow, q.format)
        parallelChunks(rowCount, minPerChunk: 8) { _, range in
            if paddedCols == cols {
                for r in range {
                    QuantizedMatrix.dequantizeRow(format, blocks + (firstRow + r) * bytesPerRow, dst + r * cols, Int64(cols))
                }
                return
            }
            let padded = UnsafeMutablePointer<Float>.allocate(capacity: paddedCols)
            defer { padded.deallocate() }
            for r in range {
                QuantizedMatrix.dequantizeRow(format, blocks + (firstRow + r) * bytesPerRow, padded, Int64(paddedCols))
                (dst + r * cols).update(from: padded, count: cols)
            }
        }
    }

    public func quantizedLinear(_ x: Tensor, _ q: QuantizedTensor, _ y: Tensor, tokens n: Int, beta: Float, scratch: Tensor,
                                ldx: Int, ldy: Int) {
        let tile = Self.tileRows(rows: q.rows, cols: q.cols)
        precondition(scratch.count >= tile * q.cols, "quantizedLinear: scratch of \(scratch.count) < \(tile * q.cols)")
        let ldx = StoredMatrix.stride(of: x, rows: n, cols: q.cols, ld: ldx, "quantizedLinear")
        let ldy = StoredMatrix.stride(of: y, rows: n, cols: q.rows, ld: ldy, "quantizedLinear")
        var r0 = 0
        while r0 < q.rows {
            let t = min(tile, q.rows - r0)
            dequantize(q, firstRow: r0, rowCount: t, into: scratch)
            // y[:, r0 ..< r0+t] = x [n, in] * tile^T [in, t] (+ beta y): the output columns of this tile.
            // Profiled as one dequantize and one GEMM per tile.
            let span = profiler?.beginGEMM(.gemm(m: n, n: t, k: q.cols, abBytes: 4, cBytes: 4, accumulates: beta != 0))
            Self.sgemm(x.f32, scratch.f32, y.f32 + r0, m: n, n: t, k: q.cols, lda: ldx, ldb: q.cols, ldc: ldy,
                       transA: false, transB: true, alpha: 1, beta: beta)
            span?.end()
            r0 += t
        }
    }

    public func quantizedLinearInput(_ dy: Tensor, _ q: QuantizedTensor, _ dx: Tensor, tokens n: Int, beta: Float, scratch: Tensor,
                                     lddy: Int, lddx: Int) {
        let tile = Self.tileRows(rows: q.rows, cols: q.cols)
        precondition(scratch.count >= tile * q.cols, "quantizedLinearInput: scratch of \(scratch.count) < \(tile * q.cols)")
        let lddy = StoredMatrix.stride(of: dy, rows: n, cols: q.rows, ld: lddy, "quantizedLinearInput")
        let lddx = StoredMatrix.stride(of: dx, rows: n, cols: q.cols, ld: lddx, "quantizedLinearInput")
        if q.rows == 0 { scale(dx, by: beta); return }
        var r0 = 0
        while r0 < q.rows {
            let t = min(tile, q.rows - r0)
            dequantize(q, firstRow: r0, rowCount: t, into: scratch)
            // dx += dy[:, r0 ..< r0+t] [n, t] * tile [t, in]; the first tile applies beta.
            let span = profiler?.beginGEMM(.gemm(m: n, n: q.cols, k: t, abBytes: 4, cBytes: 4, accumulates: r0 > 0 || beta != 0))
            Self.sgemm(dy.f32 + r0, scratch.f32, dx.f32, m: n, n: q.cols, k: t, lda: lddy, ldb: q.cols, ldc: lddx,
                       transA: false, transB: false, alpha: 1, beta: r0 == 0 ? beta : 1)
            span?.end()
            r0 += t
        }
    }
}
