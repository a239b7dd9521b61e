#!/usr/bin/env bash
# Checks of Benchmarks/gpu/run.sh's own behaviour on the paths a first GPU machine may take, in ~10 s, after
# `run.sh --emulation` has built the emulated kernels (CI runs it right after; it builds nothing itself):
#   1. no bundle: the kernel build still runs and passes, the bundle and the Swift stages are skipped with
#      the reason, the exit status is 1, and $OUT holds exactly summary.txt, results.json and logs.tar.gz;
#   2. a Swift stage that fails: it reruns with CUDA_LAUNCH_BLOCKING=1, both logs are in the archive, and the
#      summary line quotes the rerun's first error line (the op that faulted, not the next synchronize);
#      the bundle's C++ runtime is taken when newer than the machine's, and left out when older;
#   3. a stage that outlives what is left of the run's budget is stopped and reported as a timeout, and the
#      next one is skipped for lack of time.
# The bundles here are fakes: shell scripts standing in for relora and relora-bench.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_run: FAILED: $*" >&2; exit 1; }
field() {  # field OUT STAGE KEY: a stage's entry in results.json (also checks that the JSON parses)
    python3 - "$1/results.json" "$2" "$3" <<'PY'
import json, sys
stages = {s["name"]: s for s in json.load(open(sys.argv[1]))["stages"]}
value = stages[sys.argv[2]]
for key in sys.argv[3].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else value)
PY
}

# 1. No bundle.
status=0
DIST=$tmp/none OUT=$tmp/1 bash Benchmarks/gpu/run.sh --emulation --stages build,selftest,bench > "$tmp/1.txt" 2>&1 || status=$?
[ "$status" = 1 ] || fail "no bundle: exit $status, expected 1 ($(cat "$tmp/1.txt"))"
[ "$(field "$tmp/1" build status)" = pass ] || fail "no bundle: the kernel build did not pass: $(cat "$tmp/1/summary.txt")"
for s in bundle selftest bench; do
    [ "$(field "$tmp/1" $s status)" = skipped ] || fail "no bundle: $s is not skipped"
    [[ $(field "$tmp/1" $s reason) == *"$tmp/none/relora"* ]] || fail "no bundle: $s's reason does not name the bundle"
done
grep -q "^selftest: skipped: no $tmp/none/relora" "$tmp/1/summary.txt" || fail "no bundle: no summary line for selftest"
[ "$(cd "$tmp/1" && ls | paste -sd ' ')" = "logs.tar.gz results.json summary.txt" ] || fail "no bundle: \$OUT holds $(ls "$tmp/1")"
tar -tzf "$tmp/1/logs.tar.gz" | grep -qx 'logs/build.log' || fail "no bundle: no build log in the archive"

# A fake bundle: relora fails with the op it was running, which differs under CUDA_LAUNCH_BLOCKING=1 as a
# kernel fault does; its libstdc++ defines GLIBCXX_3.4.$1.
fake_bundle() {
    rm -rf "$tmp/dist" && mkdir -p "$tmp/dist/lib"
    printf 'GLIBCXX_3.4.1\0GLIBCXX_3.4.%s\0' "$1" > "$tmp/dist/lib/libstdc++.so.6"
    printf 'fake' > "$tmp/dist/lib/libopenblas.so.0"
    cat > "$tmp/dist/relora" <<'SH'
#!/bin/sh
case "$1" in info|--help) ls "$LD_LIBRARY_PATH"; exit 0 ;; esac
[ "${FAKE_SLEEP:-0}" = 0 ] || sleep "$FAKE_SLEEP"
if [ -n "${CUDA_LAUNCH_BLOCKING:-}" ]; then op=attentionForward; else op=synchronize; fi
echo "ReLoRACUDA/CUDALibrary.swift:110: Fatal error: cuda: $op failed (status 5): an illegal memory access was encountered" >&2
exit 134
SH
    chmod +x "$tmp/dist/relora"
    cp "$tmp/dist/relora" "$tmp/dist/relora-bench"
}

# 2. A failing stage, reruns, the C++ runtime's choice.
fake_bundle 999
status=0
DIST=$tmp/dist OUT=$tmp/2 bash Benchmarks/gpu/run.sh --emulation --stages selftest > "$tmp/2.txt" 2>&1 || status=$?
[ "$status" = 1 ] || fail "failing stage: exit $status, expected 1"
[ "$(field "$tmp/2" selftest status)" = fail ] || fail "failing stage: selftest is not 'fail'"
[ "$(field "$tmp/2" selftest rerun.exit)" = 134 ] || fail "failing stage: no rerun recorded"
grep -q '^selftest: FAIL (exit 134 .*rerun with CUDA_LAUNCH_BLOCKING=1: exit 134.*cuda: attentionForward failed' "$tmp/2/summary.txt" ||
    fail "failing stage: the summary does not quote the rerun's op: $(cat "$tmp/2/summary.txt")"
[ "$(tar -tzf "$tmp/2/logs.tar.gz" | grep -c 'logs/selftest\.\(rerun\.\)\{0,1\}log$')" = 2 ] || fail "failing stage: the archive lacks a log"
[[ $(field "$tmp/2" bundle figures.cxx_runtime) == *"the bundle's"* ]] || fail "a newer bundled libstdc++ was not used"
fake_bundle 2
DIST=$tmp/dist OUT=$tmp/2b bash Benchmarks/gpu/run.sh --emulation --stages bundle > /dev/null 2>&1 || fail "the fake bundle does not start"
[[ $(field "$tmp/2b" bundle figures.cxx_runtime) == *"the machine's"* ]] || fail "an older bundled libstdc++ shadows the machine's"
tar -xzf "$tmp/2b/logs.tar.gz" -C "$tmp" logs/bundle.log
grep -qx 'libstdc++.so.6' "$tmp/logs/bundle.log" && fail "an older bundled libstdc++ is on the Swift stages' library path"

# 3. The budget: 22 s, 10 of them kept for the end, so the selftest gets at most 12 s and sleeps 60.
status=0
FAKE_SLEEP=60 DIST=$tmp/dist OUT=$tmp/3 bash Benchmarks/gpu/run.sh --emulation --stages selftest,bench --budget 22 > "$tmp/3.txt" 2>&1 || status=$?
[ "$status" = 1 ] || fail "budget: exit $status, expected 1"
[ "$(field "$tmp/3" selftest status)" = timeout ] || fail "budget: selftest is not a timeout: $(cat "$tmp/3/summary.txt")"
[ "$(field "$tmp/3" bench status)" = skipped ] || fail "budget: bench is not skipped: $(cat "$tmp/3/summary.txt")"
echo "test_run: run.sh without a bundle, with a failing stage and out of budget: OK"
