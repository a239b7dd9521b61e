import Foundation
import ReLoRACore
import ReLoRAFormats

/// The `compensate` merge policy's factor initialisation: the best rank-r approximation
/// `R ~ U S V^T` of a merge's rounding residual `R = target - deq(W_new)` (`[out, in]`, f32), by a
/// randomized SVD (Halko, Martinsson & Tropp 2011, algorithms 4.3/4.4 and 5.1), split as
///
///     B = U sqrt(S / s),   A = sqrt(S / s) V^T,   so  s B A = U S V^T.
///
/// Why this split: it is the balanced factorisation, the one of least `||A||^2 + ||B||^2` among those with
/// `s B A = U S V^T` (column j of B and row j of A have the same norm, sqrt(sigma_j / s)), which is where
/// weight decay on both factors drives any factorisation; it treats the two sides alike; and neither
/// factor starts at zero, so both get gradients from the first step (with B = 0, as in the standard
/// re-init, A's gradient is zero until B moves). (`B = U sqrt(S) / sqrt(s), A = sqrt(S) V^T` would give
/// `s B A = sqrt(s) U S V^T`: the scale must be split between the factors too.) The optimizer moments of A and B restart at zero under this policy, and Adam normalises the
/// step size, so the factors' magnitudes (set by the residual: a fraction of a quantization step per
/// weight) do not slow training. Components the residual does not have (rank below r, e.g. a zero
/// update) keep the standard initialisation: A's row random, B's column 0.
///
/// Work on the device is GEMMs only; the host does the k x k factorisations (Cholesky, and LAPACK's
/// `dsyevd` for the two eigendecompositions, in Double) that a GPU would need cuSOLVER for. With
/// k = min(r + oversampling, out, in) and q power iterations, a linear costs
///
///     (2 + 2q) GEMMs of out * in * k multiply-adds (Y = R Omega, q x (R^T Q, R Z), C = Q^T R)
///     + one of out * in * r (the merge's check of what is left, `||R - s B A||`)
///     + 4q + 4 of (out or in) * k^2 (Gram matrices and rotations) and the factors,
///     + on the host: 2q Cholesky factorisations and inverses and 3 eigendecompositions of k x k,
///
/// i.e. about (2 + 2q) k / r + 1 times the merge's own `s B A` GEMM, once per restart; and 8 + 4q small
/// host transfers (a k x k Gram matrix down and a k x k rotation up per conditioning step and per pass of
/// the final orthonormalisation; then C C^T and the scale down, the two factor maps up).
/// The sketch Omega is Gaussian from the counter RNG keyed by (seed, `MergeKey.sketchStream`), so a
/// resumed run and a GPU draw the same numbers.
public struct ResidualCompensation: Sendable {
    /// Sketch columns beyond r (Halko et al.: 5 to 10 suffice when the spectrum decays).
    public var oversampling = 8
    /// Subspace iterations `Q <- orth(R orth(R^T Q))`. A quantization residual is close to white noise,
    /// whose spectrum barely decays, so the plain sketch (q = 0) finds a poor subspace; see the README's
    /// measurements for the choice.
    public var powerIterations = 2
    /// Eigenvalues of a Gram matrix below this fraction of the largest are dropped (their directions are
    /// lost in the f32 rounding of the Gram matrix, whose entries carry ~1e-6 relative error).
    public var relativeTolerance = 1e-5

    public init() {}

    /// Sets the adapter's factors (A `[r, in]`, B `[out, r]`) from `residual` R `[out, in]` (read only).
    /// The adapter holds the standard initialisation on entry; rows of A and columns of B beyond R's
    /// numerical rank keep it.
    func initialize(_ adapter: LoRAAdapter, residual r: Tensor, key: MergeKey, backend b: Backend) throws {
        let m = adapter.outFeatures, n = adapter.inFeatures, rank = adapter.rank
        let k = min(rank + oversampling, m, n)
        let omega = b.makeTensor([n, k], dtype: .f32, tag: .workspace, zeroed: false)
        b.fillNormal(omega, std: 1, seed: key.seed, stream: key.sketchStream)
        let y = b.makeTensor([m, k], dtype: .f32, tag: .workspace, zeroed: false)
        b.matmul(r, omega, y, m: m, n: k, k: n)                                  // Y = R Omega
        let z = b.makeTensor([n, k], dtype: .f32, tag: .workspace, zeroed: false)
        for _ in 0..<powerIterations {
            b.matmul(r, condition(y, rows: m, columns: k, b), z, m: n, n: k, k: m, transA: true)   // Z = R^T basis(Y)
            b.matmul(r, condition(z, rows: n, columns: k, b), y, m: m, n: k, k: n)                 // Y = R basis(Z)
        }
        let q = try orthonormalize(y, rows: m, columns: k, b)
        let c = b.makeTensor([k, n], dtype: .f32, tag: .workspace, zeroed: false)
        b.matmul(q, r, c, m: k, n: n, k: m, transA: true)                        // C = Q^T R  [k, n]
        let h = b.makeTensor([k, k], dtype: .f32, tag: .workspace, zeroed: false)
        b.matmul(c, c, h, m: k, n: k, k: n, transB: true)                        // H = C C^T = W S^2 W^T
        let (lambda, w) = try LAPACK.symmetricEigen(n: k, b.download(h).map(Double.init))
        let s = Double(b.scalar(adapter.scale))
        // R's top components: u_j = Q w_j, sigma_j = sqrt(lambda_j), v_j^T = w_j^T C / sigma_j. So
        // A_j = sqrt(sigma_j / s) v_j^T = (lambda_j^(-1/4) / sqrt(s)) w_j^T C and
        // B_j = sqrt(sigma_j / s) u_j = Q (w_j lambda_j^(1/4) / sqrt(s)).
        let kept = s > 0 ? (0..<min(rank, k)).prefix { lambda[$0] > 0 && lambda[$0] > relativeTolerance * lambda[0] }.count : 0
        var mapA = [Float](repeating: 0, count: rank * k), mapB = [Float](repeating: 0, count: k * rank)
        for j in 0..<kept {
            let down = pow(lambda[j], -0.25) / s.squareRoot(), up = pow(lambda[j], 0.25) / s.squareRoot()
            for i in 0..<k {
                mapA[j * k + i] = Float(w[j * k + i] * down)      // row j of [r, k]
                mapB[i * rank + j] = Float(w[j * k + i] * up)     // column j of [k, r]
            }
        }
        let ma = b.makeTensor([rank, k], dtype: .f32, tag: .workspace, zeroed: false)
        let mb = b.makeTensor([k, rank], dtype: .f32, tag: .workspace, zeroed: false)
        b.upload(mapA, to: ma)
        b.upload(mapB, to: mb)
        if kept > 0 {
            b.matmul(ma.view(offset: 0, shape: [kept, k]), c, adapter.a.view(offset: 0, shape: [kept, n]), m: kept, n: n, k: k)
        }
        b.matmul(q, mb, adapter.b, m: m, n: rank, k: k)                         // B = Q M_B (zero columns past `kept`)
    }

    /// A well-conditioned basis of the span of the columns of `x` `[rows, columns]` (a new tensor), as
    /// subspace iteration needs between its products (the span is what matters; exact orthonormality only
    /// at the end): `X R^-1` with `R^T R = X^T X + delta I` (Cholesky in Double on the host), the shift
    /// `delta = 1e-4 max_i (X^T X)_ii` making it positive definite whatever the f32 rounding of the Gram
    /// matrix or the rank of X. Directions of X weaker than 1% of the strongest come out shrunk instead of
    /// normalised, which only slows their convergence (they hold < 1e-4 of the energy). Cheaper than the
    /// eigendecomposition of `orthonormalize` (k^3 / 3 against ~10 k^3 flops), which it replaces in all
    /// but the last step.
    func condition(_ x: Tensor, rows: Int, columns k: Int, _ b: Backend) -> Tensor {
        let g = b.makeTensor([k, k], dtype: .f32, tag: .workspace, zeroed: false)
        b.matmul(x, x, g, m: k, n: k, k: rows, transA: true)
        var a = b.download(g).map(Double.init)                    // row-major, symmetric
        let delta = 1e-4 * (0..<k).map { a[$0 * k + $0] }.max()!
        var t = [Float](repeating: 0, count: k * k)
        if delta > 0 {
            // Cholesky, upper: G + delta I = U^T U, U stored in the upper triangle of `a`.
            for i in 0..<k { a[i * k + i] += delta }
            for i in 0..<k {
                var d = a[i * k + i]
                for p in 0..<i { d -= a[p * k + i] * a[p * k + i] }
                let uii = d.squareRoot()
                a[i * k + i] = uii
                for j in (i + 1)..<max(i + 1, k) {
                    var v = a[i * k + j]
                    for p in 0..<i { v -= a[p * k + i] * a[p * k + j] }
                    a[i * k + j] = v / uii
                }
            }
            // T = U^-1 (upper), column by column: U T = I.
            var inv = [Double](repeating: 0, count: k * k)
            for j in 0..<k {
                for i in stride(from: j, through: 0, by: -1) {
                    var v = i == j ? 1.0 : 0.0
                    for p in (i + 1)..<max(i + 1, j + 1) { v -= a[i * k + p] * inv[p * k + j] }
                    inv[i * k + j] = v / a[i * k + i]
                }
            }
            t = inv.map { Float($0) }
        }
        let rotation = b.makeTensor([k, k], dtype: .f32, tag: .workspace, zeroed: false)
        b.upload(t, to: rotation)
        let next = b.makeTensor([rows, k], dtype: .f32, tag: .workspace, zeroed: false)
        b.matmul(x, rotation, next, m: rows, n: k, k: k)
        return next
    }

    /// An orthonormal basis of the columns of `x` `[rows, columns]` (a new tensor; columns whose
    /// direction is numerically absent come out zero): `X T` with `T = E diag(lambda^-1/2)` from the
    /// eigendecomposition `X^T X = E diag(lambda) E^T`, twice (the second pass removes the first's
    /// loss of orthogonality, which grows with the condition number squared through the f32 Gram matrix;
    /// "CholeskyQR2" with an eigendecomposition instead of Cholesky, which also handles rank deficiency).
    func orthonormalize(_ x: Tensor, rows: Int, columns k: Int, _ b: Backend) throws -> Tensor {
        var current = x
        for _ in 0..<2 {
            let g = b.makeTensor([k, k], dtype: .f32, tag: .workspace, zeroed: false)
            b.matmul(current, current, g, m: k, n: k, k: rows, transA: true)
            let (lambda, e) = try LAPACK.symmetricEigen(n: k, b.download(g).map(Double.init))
            var t = [Float](repeating: 0, count: k * k)
            for j in 0..<k where lambda[j] > 0 && lambda[j] > relativeTolerance * lambda[0] {
                let scale = 1 / lambda[j].squareRoot()
                for i in 0..<k { t[i * k + j] = Float(e[j * k + i] * scale) }
            }
            let rotation = b.makeTensor([k, k], dtype: .f32, tag: .workspace, zeroed: false)
            b.upload(t, to: rotation)
            let next = b.makeTensor([rows, k], dtype: .f32, tag: .workspace, zeroed: false)
            b.matmul(current, rotation, next, m: rows, n: k, k: k)
            current = next
        }
        return current
    }
}
