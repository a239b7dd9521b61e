#!/usr/bin/env bash
# The README's test command: installs the system libraries, builds everything (tests included) and runs
# the XCTest suite. The test process cannot restart itself the way `relora` does when OpenBLAS picks weak
# kernels for a CPU newer than itself, so the core `relora` settles on is passed to it in
# OPENBLAS_CORETYPE (a value you set yourself is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
swift build --build-tests
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
    core=$(.build/debug/relora info --blas-core 2>/dev/null || true)
    [ -n "$core" ] && export OPENBLAS_CORETYPE="$core"
fi
echo "test: OpenBLAS core ${OPENBLAS_CORETYPE:-as chosen by OpenBLAS}"
swift test --skip-build --disable-swift-testing  # XCTest only: its closing line is the count
