#!/usr/bin/env bash
# The GPU checks and benchmarks on any machine with a CUDA GPU and nvcc, without Swift:
#   1. builds Kernels/ with the machine's nvcc (CUDA_HOME, or the nvcc on PATH, or /usr/local/cuda);
#   2. `make test-cuda`: every kernel against its scalar reference on the GPU;
#   3. `relora selftest --device cuda`: every backend op (f32 and bf16) and training steps against the CPU;
#   4. `relora-bench gpu`: quantized linear vs cuBLAS, dequantize/merge bandwidth, 1b training steps, 24 GiB fits.
# Needs dist/gpu/ (or dist/gpu.tar.xz) from Benchmarks/gpu/package.sh (static-stdlib binaries + their libraries).
# Results go to $OUT (default ./gpu-results): one log per stage, selftest.json, bench.json, summary.txt.
# Usage: bash Benchmarks/gpu/run.sh            (each stage's exit status is recorded; later stages still run)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
DIST="${DIST:-$PWD/dist/gpu}"
if [ ! -x "$DIST/relora" ] && [ -f dist/gpu.tar.xz ]; then  # what package.sh made, carried compressed
    tar -C dist -xJf dist/gpu.tar.xz 2>/dev/null || python3 -c 'import tarfile; tarfile.open("dist/gpu.tar.xz").extractall("dist")'
fi
[ -x "$DIST/relora" ] || { echo "no $DIST/relora: run Benchmarks/gpu/package.sh where Swift is and carry dist/gpu.tar.xz"; exit 1; }
export LD_LIBRARY_PATH="$DIST/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
summary="$OUT/summary.txt"
: > "$summary"
stage() {  # stage NAME TIMEOUT_S COMMAND...: runs it with its output in $OUT/NAME.log and records the status
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$summary"
    return $rc
}

if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    else CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1; "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"

# The machine's nvcc may be older or newer than the pinned 13.0: build for its own GPU's arch only.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
stage build 400 make -C Kernels -j"$(nproc)" cuda CUDA_HOME="$CUDA_HOME" ${arch:+CUDA_ARCHS="$arch"} \
    ${arch:+GENCODE="-gencode arch=compute_$arch,code=sm_$arch"} ${arch:+ARCH_TEXT="sm_$arch"} || { echo "kernel build failed: $OUT/build.log"; exit 1; }
cp Kernels/build/ptxas_report.txt "$OUT/" 2>/dev/null
stage kernel-tests 120 make -C Kernels test-cuda CUDA_HOME="$CUDA_HOME"
# RELORA_CUDA_LIB set by the caller is kept (a dry run of this script on the CPU emulation: make -C Kernels emu first).
export RELORA_CUDA_LIB="${RELORA_CUDA_LIB:-$PWD/Kernels/build/libreloracuda.so}"
# Once, as JSON (every check with its max error and bound); its failures and summary go to selftest.log.
stage selftest 300 sh -c '"$0" selftest --device cuda --json > "$1"' "$DIST/relora" "$OUT/selftest.json"
stage bench 400 "$DIST/relora-bench" gpu --json "$OUT/bench.json"
echo "results in $OUT:"; ls -la "$OUT"
cat "$summary"
