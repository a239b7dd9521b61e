#!/usr/bin/env bash
# The README's test command: installs the system libraries, builds everything (tests included) and runs
# the fast XCTest suite, which skips the tests listed in Tests/long-tests.txt and Tests/gpu-script-tests.txt.
# `--long` runs exactly the first list instead (scripts/test_long.sh), `--all` everything. The second list's
# checks are stages of `Benchmarks/gpu/run.sh --emulation`, which is how CI runs them (.ci/run).
#
# The test process cannot restart itself the way `relora` does when OpenBLAS picks weak kernels for a CPU
# newer than itself, so the core `relora` settles on is passed to it in OPENBLAS_CORETYPE (a value you set
# yourself is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
suite=fast
case "${1:-}" in
    "") ;;
    --long) suite=long ;;
    --all) suite=all ;;
    -h|--help) sed -n '2,4p' "$0" | sed 's/^# //'; exit 0 ;;
    *) echo "test.sh: unknown option $1; use --long, --all or nothing" >&2; exit 2 ;;
esac
bash scripts/setup.sh
swift build --build-tests
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
    core=$(.build/debug/relora info --blas-core 2>/dev/null || true)
    [ -n "$core" ] && export OPENBLAS_CORETYPE="$core"
fi
echo "test: OpenBLAS core ${OPENBLAS_CORETYPE:-as chosen by OpenBLAS}"

# The listed tests as one anchored regular expression over XCTest's names (ReLoRATests.Class/test).
listed() { grep -v '^#' "$1" | awk 'NF { print $1 }'; }
long=$(listed Tests/long-tests.txt)
script=$(listed Tests/gpu-script-tests.txt)
count=$(echo "$long" | wc -l)
pattern="^ReLoRATests\\.($(echo "$long" | paste -sd '|'))\$"
skipped="^ReLoRATests\\.($(printf '%s\n%s\n' "$long" "$script" | paste -sd '|'))\$"
# A renamed or removed test would leave a list naming nothing (and, renamed, run in the fast suite).
known=$(swift test --skip-build list --disable-swift-testing 2>/dev/null | sed 's/^ReLoRATests\.//')
for name in $long $script; do
    if ! grep -qxF "$name" <<< "$known"; then
        echo "test.sh: $name is listed in Tests/long-tests.txt or Tests/gpu-script-tests.txt but is no test; fix the list" >&2
        exit 1
    fi
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
case $suite in
    fast) swift test --skip-build --disable-swift-testing --skip "$skipped" 2>&1 | tee "$log" || status=$? ;;
    long) swift test --skip-build --disable-swift-testing --filter "$pattern" 2>&1 | tee "$log" || status=$? ;;
    all) swift test --skip-build --disable-swift-testing 2>&1 | tee "$log" || status=$? ;;
esac
summary=$(grep -E "^\s+Executed [0-9]+ tests?," "$log" | tail -n 1 | sed 's/^\s*//')
if [ "$suite" = long ] && [ "$status" -eq 0 ]; then
    ran=$(echo "$summary" | awk '{ print $2 }')
    if [ "$ran" != "$count" ]; then
        echo "test.sh: Tests/long-tests.txt lists $count tests but $ran ran; fix the list (a test was renamed or removed)" >&2
        exit 1
    fi
fi
echo "test: $suite suite: ${summary:-no XCTest summary}"
exit "$status"
