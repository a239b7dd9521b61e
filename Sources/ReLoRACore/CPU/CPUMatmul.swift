import COpenBLAS
import Dispatch

/// Matrix products on the CPU: a grid of tiles fixed by the product's shape, each tile one single-threaded
/// OpenBLAS sgemm, the tiles spread over `cpuThreadCount` threads.
///
/// Why not OpenBLAS's own threads: its result depends on their number. Measured on OpenBLAS 0.3.21 (sgemm
/// with every transpose, the model's shapes, 1 to 8 threads): with one thread it cuts K into blocks one way
/// and with several another way (K between one and two of its K blocks, e.g. 513 to 1023 for the SkylakeX
/// kernels: the 688-wide MLP of llama_20m, a 32000-word vocabulary), and with its Haswell kernels (AVX2
/// CPUs, AMD Zen included) and the SSE3 ones every partition of M and N changes the bits of most entries.
/// Its LAPACK (`dsyevd`, which the compensating merge calls) also differs between one thread and several.
/// Each tile here is one call of a shape fixed by the product's, run single-threaded, so its bits are the
/// same whichever thread runs it; OpenBLAS is held to one thread for the process (`CPUThreads.pinOpenBLAS`).
extension CPUBackend {
    public func matmul(_ a: Tensor, _ b: Tensor, _ c: Tensor, m: Int, n: Int, k: Int,
                       transA: Bool, transB: Bool, alpha: Float, beta: Float, alphaScale: Tensor?, lda: Int, ldb: Int, ldc: Int) {
        let ld = StoredMatrix.gemmStrides(a, b, c, m: m, n: n, k: k, transA: transA, transB: transB, lda: lda, ldb: ldb, ldc: ldc)
        let span = profiler?.beginGEMM(.gemm(m: m, n: n, k: k, abBytes: a.dtype.byteSize, cBytes: c.dtype.byteSize, accumulates: beta != 0))
        defer { span?.end() }
        let s = alphaScale.map { alpha * $0.f32[0] } ?? alpha
        Self.sgemm(a.f32, b.f32, c.f32, m: m, n: n, k: k, lda: ld.a, ldb: ld.b, ldc: ld.c,
                   transA: transA, transB: transB, alpha: s, beta: beta)
    }

    /// Row-major `C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C` on raw pointers with explicit leading
    /// dimensions (strided head views); A is stored `[k, m]` if `transA`, B `[n, k]` if `transB`. The same
    /// bits with any thread count.
    package static func sgemm(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
                              m: Int, n: Int, k: Int, lda: Int, ldb: Int, ldc: Int,
                              transA: Bool, transB: Bool, alpha: Float, beta: Float) {
        if m == 0 || n == 0 { return }
        _ = CPUThreads.pinOpenBLAS
        let tile = gemmTile(m: m, n: n, k: k)
        let tileRows = (m + tile.rows - 1) / tile.rows, tileCols = (n + tile.cols - 1) / tile.cols
        func run(_ t: Int) {
            let i0 = t / tileCols * tile.rows, j0 = t % tileCols * tile.cols
            let rows = min(tile.rows, m - i0), cols = min(tile.cols, n - j0)
            if m == 1 {
                // One row (the decode step of a KV cache): a GEMV per tile of columns. OpenBLAS 0.3.21's sgemm
                // packs B for m = 1 as for any m, so a weight-bound product would read and write W twice more.
                let incx = Int32(transA ? lda : 1)
                if transB {  // c[j] = sum_k a[k] B[j, k]: B's rows j0 ..< j0 + cols times a
                    cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(cols), Int32(k), alpha, b + j0 * ldb, Int32(ldb), a, incx,
                                beta, c + j0, 1)
                } else {  // c[j] = sum_k a[k] B[k, j]: B's columns j0 ..< j0 + cols transposed times a
                    cblas_sgemv(CblasRowMajor, CblasTrans, Int32(k), Int32(cols), alpha, b + j0, Int32(ldb), a, incx,
                                beta, c + j0, 1)
                }
                return
            }
            // Rows i0..<i0+rows of op(A): A's rows (or columns, stored transposed); likewise B's columns.
            cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                        Int32(rows), Int32(cols), Int32(k), alpha, a + (transA ? i0 : i0 * lda), Int32(lda),
                        b + (transB ? j0 * ldb : j0), Int32(ldb), beta, c + i0 * ldc + j0, Int32(ldc))
        }
        parallelTasks(tileRows * tileCols, workers: .max) { t, _ in run(t) }
    }

    /// One OpenBLAS call on the calling thread (OpenBLAS is held to one thread): for ops that run several
    /// small products in parallel themselves (attention's heads).
    static func sgemmOneThread(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
                               m: Int, n: Int, k: Int, lda: Int, ldb: Int, ldc: Int,
                               transA: Bool, transB: Bool, alpha: Float, beta: Float) {
        if m == 0 || n == 0 { return }
        _ = CPUThreads.pinOpenBLAS
        cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    /// The tile of an `m x n x k` product, from the shape alone (never the thread count): starting from the
    /// whole of C, the longer side is halved (to a multiple of 16, OpenBLAS's widest register block) while
    /// the grid has fewer than 16 tiles, a tile keeps at least 2^21 multiply-adds (~20-40 us on one core;
    /// smaller ones lose more to waking threads than they gain) and the halves stay at least 1024 wide; at
    /// least 256 while there are fewer than 4 tiles and 64 while there is one, so mid-sized products still
    /// use a few threads. Each tile packs its own rows of A and columns of B, which OpenBLAS's threads would
    /// share: on one thread, 512 x 512 tiles measured ~5-14 % slower than one call of the whole product and
    /// 256 x 256 tiles ~10-20 % (OpenBLAS 0.3.21, SkylakeX kernels, 2 busy cores), hence tiles as large as
    /// the parallelism allows.
    static func gemmTile(m: Int, n: Int, k: Int) -> (rows: Int, cols: Int) {
        var rows = m, cols = n
        func halved(_ side: Int) -> Int { ((side + 1) / 2 + 15) / 16 * 16 }
        while true {
            let tiles = ((m + rows - 1) / rows) * ((n + cols - 1) / cols)
            guard tiles < 16, rows * cols * k >= 1 << 22 else { break }
            let minSide = tiles < 2 ? 64 : tiles < 4 ? 256 : 1024
            let splitRows = halved(rows) >= minSide && halved(rows) < rows
            let splitCols = halved(cols) >= minSide && halved(cols) < cols
            if splitRows && (rows >= cols || !splitCols) {
                rows = halved(rows)
            } else if splitCols {
                cols = halved(cols)
            } else {
                break
            }
        }
        return (rows, cols)
    }
}
