import Foundation
#if canImport(Glibc)
import Glibc
#endif
import COpenBLAS  // links libopenblas, which exports the Fortran LAPACK symbols this file resolves

// Double-precision singular values through LAPACK's Fortran entry points in OpenBLAS.
//
// Debian's libopenblas exports `dgesdd_` / `dgesvd_` but ships no lapacke.h, and the shared COpenBLAS shim
// only includes cblas.h. Rather than declaring the symbols with `@_silgen_name` (which gives them the Swift
// calling convention and only works because it happens to coincide with C's for pointer-only arguments),
// they are looked up once with dlsym in the process's global scope (libopenblas is already loaded as a
// dependency of this module) and called through `@convention(c)` function types, so the ABI is C's by
// construction. A missing symbol (an OpenBLAS built without LAPACK) is a typed error, not a link failure.
//
// Fortran calling convention (gfortran, LP64 OpenBLAS): every argument by pointer, INTEGER = Int32,
// column-major arrays, and one hidden `size_t` length per CHARACTER argument appended after the explicit
// ones. The routines never read the lengths of single-character job flags, but they are passed (= 1)
// so the call matches the callee's prototype exactly.

/// DGESDD(JOBZ, M, N, A, LDA, S, U, LDU, VT, LDVT, WORK, LWORK, IWORK, INFO) + hidden len(JOBZ).
private typealias DGESDD = @convention(c) (
    UnsafePointer<CChar>, UnsafePointer<Int32>, UnsafePointer<Int32>, UnsafeMutablePointer<Double>,
    UnsafePointer<Int32>, UnsafeMutablePointer<Double>, UnsafeMutablePointer<Double>, UnsafePointer<Int32>,
    UnsafeMutablePointer<Double>, UnsafePointer<Int32>, UnsafeMutablePointer<Double>, UnsafePointer<Int32>,
    UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>, Int
) -> Void

/// DGESVD(JOBU, JOBVT, M, N, A, LDA, S, U, LDU, VT, LDVT, WORK, LWORK, INFO) + hidden len(JOBU), len(JOBVT).
private typealias DGESVD = @convention(c) (
    UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafePointer<Int32>, UnsafePointer<Int32>,
    UnsafeMutablePointer<Double>, UnsafePointer<Int32>, UnsafeMutablePointer<Double>,
    UnsafeMutablePointer<Double>, UnsafePointer<Int32>, UnsafeMutablePointer<Double>, UnsafePointer<Int32>,
    UnsafeMutablePointer<Double>, UnsafePointer<Int32>, UnsafeMutablePointer<Int32>, Int, Int
) -> Void

/// DSYEV(JOBZ, UPLO, N, A, LDA, W, WORK, LWORK, INFO) + hidden len(JOBZ), len(UPLO).
private typealias DSYEV = @convention(c) (
    UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafePointer<Int32>, UnsafeMutablePointer<Double>,
    UnsafePointer<Int32>, UnsafeMutablePointer<Double>, UnsafeMutablePointer<Double>, UnsafePointer<Int32>,
    UnsafeMutablePointer<Int32>, Int, Int
) -> Void

/// DSYEVD(JOBZ, UPLO, N, A, LDA, W, WORK, LWORK, IWORK, LIWORK, INFO) + hidden len(JOBZ), len(UPLO).
private typealias DSYEVD = @convention(c) (
    UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafePointer<Int32>, UnsafeMutablePointer<Double>,
    UnsafePointer<Int32>, UnsafeMutablePointer<Double>, UnsafeMutablePointer<Double>, UnsafePointer<Int32>,
    UnsafeMutablePointer<Int32>, UnsafePointer<Int32>, UnsafeMutablePointer<Int32>, Int, Int
) -> Void

/// Symbol addresses as integers (Sendable), resolved once on first use; 0 = not found.
private let lapackSymbols: (dgesdd: UInt, dgesvd: UInt, dsyev: UInt, dsyevd: UInt) = {
    func find(_ name: String) -> UInt {
        guard let handle = dlopen(nil, RTLD_NOW), let sym = dlsym(handle, name) else { return 0 }
        return UInt(bitPattern: sym)
    }
    return (find("dgesdd_"), find("dgesvd_"), find("dsyev_"), find("dsyevd_"))
}()

package enum LAPACK {
    /// Whether OpenBLAS's LAPACK SVD routines were found in this process.
    static var isAvailable: Bool { lapackSymbols.dgesdd != 0 || lapackSymbols.dgesvd != 0 }

    /// Singular values (descending) of the `m x n` column-major matrix in `a` (overwritten), values only.
    ///
    /// Uses DGESDD (divide and conquer, JOBZ = 'N'); if it reports non-convergence (INFO > 0, rare), retries
    /// with DGESVD (QR iteration) on a fresh copy. Accuracy: each value has absolute error about
    /// `p(m,n) * eps_f64 * s_max` (LAPACK Users' Guide, section 4.9), i.e. ~1e-13 * s_max for the sizes here.
    package static func singularValues(m: Int, n: Int, columnMajor a: [Double]) throws -> [Double] {
        _ = CPUThreads.pinOpenBLAS  // OpenBLAS's LAPACK gives other bits with more than one thread
        precondition(a.count == m * n, "LAPACK.singularValues: \(a.count) values for a \(m) x \(n) matrix")
        let k = min(m, n)
        if k == 0 { return [] }
        guard m < Int(Int32.max), n < Int(Int32.max), m * n < Int(Int32.max) else {
            throw ReLoRAError.unsupported(
                "a \(m) x \(n) matrix is too large for 32-bit LAPACK indices; analyse a smaller model or slice")
        }
        if lapackSymbols.dgesdd != 0 {
            var copy = a
            let (s, info) = dgesdd(m: m, n: n, a: &copy)
            if info == 0 { return s }
            if info < 0 { preconditionFailure("DGESDD rejected argument \(-info)") }
        }
        if lapackSymbols.dgesvd != 0 {
            var copy = a
            let (s, info) = dgesvd(m: m, n: n, a: &copy)
            if info == 0 { return s }
            if info < 0 { preconditionFailure("DGESVD rejected argument \(-info)") }
            throw ReLoRAError.invalidData(
                "the SVD of a \(m) x \(n) matrix did not converge (LAPACK INFO = \(info)); check it for extreme values")
        }
        throw ReLoRAError.unsupported(
            "this OpenBLAS exports no LAPACK SVD (dgesdd_/dgesvd_); install Debian's libopenblas0 (which includes LAPACK)")
    }

    /// Eigenvalues (descending) and unit eigenvectors of the symmetric `n x n` matrix `a` (row- or
    /// column-major: it is symmetric; only its lower triangle in column-major order is read), by DSYEVD
    /// (divide and conquer: ~5x faster than DSYEV's QR iteration for n ~ 136, the compensation's size), or
    /// DSYEV if this LAPACK lacks it. `vectors[j * n ..< (j + 1) * n]` is the eigenvector of `values[j]`.
    /// Accuracy: each eigenvalue within about `p(n) * eps_f64 * max|lambda|` (LAPACK Users' Guide, 4.7).
    package static func symmetricEigen(n: Int, _ a: [Double]) throws -> (values: [Double], vectors: [Double]) {
        _ = CPUThreads.pinOpenBLAS  // OpenBLAS's LAPACK gives other bits with more than one thread
        precondition(a.count == n * n, "LAPACK.symmetricEigen: \(a.count) values for a \(n) x \(n) matrix")
        if n == 0 { return ([], []) }
        var jobz = CChar(UInt8(ascii: "V")), uplo = CChar(UInt8(ascii: "L"))
        var n32 = Int32(n), lda = Int32(n), info: Int32 = 0
        var m = a, w = [Double](repeating: 0, count: n)
        var query = 0.0, lwork: Int32 = -1
        if lapackSymbols.dsyevd != 0 {
            let fn = unsafeBitCast(UnsafeRawPointer(bitPattern: lapackSymbols.dsyevd)!, to: DSYEVD.self)
            var iquery: Int32 = 0, liwork: Int32 = -1
            fn(&jobz, &uplo, &n32, &m, &lda, &w, &query, &lwork, &iquery, &liwork, &info, 1, 1)
            lwork = Int32(clamping: max(1 + 6 * n + 2 * n * n, Int(query.rounded(.up))))
            liwork = max(3 + 5 * Int32(n), iquery)
            var work = [Double](repeating: 0, count: Int(lwork)), iwork = [Int32](repeating: 0, count: Int(liwork))
            fn(&jobz, &uplo, &n32, &m, &lda, &w, &work, &lwork, &iwork, &liwork, &info, 1, 1)
        } else if lapackSymbols.dsyev != 0 {
            let fn = unsafeBitCast(UnsafeRawPointer(bitPattern: lapackSymbols.dsyev)!, to: DSYEV.self)
            fn(&jobz, &uplo, &n32, &m, &lda, &w, &query, &lwork, &info, 1, 1)
            lwork = Int32(clamping: max(3 * n, Int(query.rounded(.up))))
            var work = [Double](repeating: 0, count: Int(lwork))
            fn(&jobz, &uplo, &n32, &m, &lda, &w, &work, &lwork, &info, 1, 1)
        } else {
            throw ReLoRAError.unsupported(
                "this OpenBLAS exports no LAPACK eigensolver (dsyevd_/dsyev_); install Debian's libopenblas0 (which includes LAPACK)")
        }
        if info < 0 { preconditionFailure("the LAPACK eigensolver rejected argument \(-info)") }
        guard info == 0 else {
            throw ReLoRAError.invalidData("the eigendecomposition of a \(n) x \(n) matrix did not converge (LAPACK INFO = \(info)); check it for extreme values")
        }
        // LAPACK returns ascending values and the vectors as the columns of the column-major result.
        var values: [Double] = [], vectors: [Double] = []
        for j in stride(from: n - 1, through: 0, by: -1) {
            values.append(w[j])
            vectors.append(contentsOf: m[j * n ..< (j + 1) * n])
        }
        return (values, vectors)
    }

    private static func dgesdd(m: Int, n: Int, a: inout [Double]) -> ([Double], Int32) {
        let fn = unsafeBitCast(UnsafeRawPointer(bitPattern: lapackSymbols.dgesdd)!, to: DGESDD.self)
        var jobz = CChar(UInt8(ascii: "N"))
        var m32 = Int32(m), n32 = Int32(n), lda = Int32(max(1, m)), ldu: Int32 = 1, ldvt: Int32 = 1
        var s = [Double](repeating: 0, count: min(m, n))
        var dummyU = 0.0, dummyVT = 0.0, info: Int32 = 0
        var iwork = [Int32](repeating: 0, count: 8 * min(m, n))
        // Workspace query (LWORK = -1) returns the optimal size in WORK(1).
        var query = 0.0, lwork: Int32 = -1
        fn(&jobz, &m32, &n32, &a, &lda, &s, &dummyU, &ldu, &dummyVT, &ldvt, &query, &lwork, &iwork, &info, 1)
        if info != 0 { return (s, info) }
        lwork = Int32(clamping: Int(query.rounded(.up)))
        var work = [Double](repeating: 0, count: max(1, Int(lwork)))
        fn(&jobz, &m32, &n32, &a, &lda, &s, &dummyU, &ldu, &dummyVT, &ldvt, &work, &lwork, &iwork, &info, 1)
        return (s, info)
    }

    private static func dgesvd(m: Int, n: Int, a: inout [Double]) -> ([Double], Int32) {
        let fn = unsafeBitCast(UnsafeRawPointer(bitPattern: lapackSymbols.dgesvd)!, to: DGESVD.self)
        var jobu = CChar(UInt8(ascii: "N")), jobvt = CChar(UInt8(ascii: "N"))
        var m32 = Int32(m), n32 = Int32(n), lda = Int32(max(1, m)), ldu: Int32 = 1, ldvt: Int32 = 1
        var s = [Double](repeating: 0, count: min(m, n))
        var dummyU = 0.0, dummyVT = 0.0, info: Int32 = 0
        var query = 0.0, lwork: Int32 = -1
        fn(&jobu, &jobvt, &m32, &n32, &a, &lda, &s, &dummyU, &ldu, &dummyVT, &ldvt, &query, &lwork, &info, 1, 1)
        if info != 0 { return (s, info) }
        lwork = Int32(clamping: Int(query.rounded(.up)))
        var work = [Double](repeating: 0, count: max(1, Int(lwork)))
        fn(&jobu, &jobvt, &m32, &n32, &a, &lda, &s, &dummyU, &ldu, &dummyVT, &ldvt, &work, &lwork, &info, 1, 1)
        return (s, info)
    }
}
