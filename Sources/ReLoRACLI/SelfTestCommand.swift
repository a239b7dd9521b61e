import Foundation
import ReLoRA

let selfTestUsage = """
    Usage: relora selftest [--device cpu|cuda] [--json]

    Runs the backend conformance suite on the device: every op of the backend (transfers and dtype
    conversions, fills, matmul, rmsnorm, rope, attention, swiglu, embedding, cross-entropy, dropout,
    reductions, AdamW, pruning) against naive Double references, with a bound derived per op and dtype,
    and every backward against finite differences of its forward. Prints one line per check (op, shape,
    dtype, max error, bound, pass/FAIL) and "N passed, M failed"; exits 1 if any check failed.

      --device D   cpu (default) or cuda
      --json       print {"backend", "passed", "failed", "checks": [...]} instead of the table
    """

func runSelfTest(_ args: [String]) throws {
    if args.contains("--help") || args.contains("-h") { print(selfTestUsage); return }
    let a = try Arguments(args, flagNames: ["json"])
    try a.checkKnown(["device", "json"])
    guard a.positional.isEmpty else { throw ReLoRAError.usage("selftest takes no arguments; see `relora selftest --help`") }
    let backend = try a.backend()
    let checks = Conformance.run(on: backend)
    if a.flag("json") {
        print(Conformance.json(checks, backend: backend.name))
    } else {
        print(Conformance.table(checks))
        print("\(backend.name): \(Conformance.summary(checks))")
    }
    if checks.contains(where: { !$0.passed }) { exit(1) }
}
