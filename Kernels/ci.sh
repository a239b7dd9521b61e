#!/usr/bin/env bash
# CI for Kernels/ on a machine without a GPU:
#   1. a cached venv with the pinned CUDA 13.0 wheels (docs/cuda.md): nvcc, nvvm, crt, runtime, cccl, cuBLAS,
#      and NCCL (nvidia-nccl-cu13: only its nccl.h is used, by src/collectives.cu; NCCL is never linked)
#   2. `make cuda STRICT=1`: the real library for sm_80, sm_86, sm_89, sm_90 + PTX, warnings as errors, and
#      ptxas' register/spill report with the no-spill check (compile check only: nothing runs on a GPU)
#   3. `make emu test STRICT=1`: the same sources on the CPU emulation, every kernel against its reference
#      (skipped with --compile-only: the repository's CI runs the harness once, as the kernel-tests stage of
#      `Benchmarks/gpu/run.sh --emulation`)
#
# The venv lives in $RELORA_CUDA_VENV (default ~/.cache/relora-cuda-venv) and is reused while the pinned
# list is unchanged (a stamp file holds it); a cold run downloads ~1 GB of wheels (pip's cache helps).
# Needs python3 (with venv), make and g++ (g++-12 preferred as nvcc's host compiler).
set -euo pipefail
cd "$(dirname "$0")"
compile_only=0
case "${1:-}" in
    "") ;;
    --compile-only) compile_only=1 ;;
    *) echo "ci.sh: unknown option $1; the only option is --compile-only" >&2; exit 2 ;;
esac

PINNED=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-cuda-runtime==13.0.*"
    "nvidia-cuda-cccl==13.0.*"
    "nvidia-cublas==13.0.2.14"
    "nvidia-nccl-cu13==2.28.9"
)
VENV="${RELORA_CUDA_VENV:-$HOME/.cache/relora-cuda-venv}"
STAMP="$VENV/.relora-pinned"

phase_start=$(date +%s)
phase() {
    local now
    now=$(date +%s)
    echo "ci: $1 ($((now - phase_start)) s)"
    phase_start=$now
}
t0=$(date +%s)

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${PINNED[*]}" ]; then
    echo "ci: installing the pinned CUDA wheels into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --progress-bar off "${PINNED[@]}"
    echo "${PINNED[*]}" > "$STAMP"
    phase "venv ready (installed)"
else
    phase "venv ready (cached)"
fi

# Build from scratch so the compile check and the report reflect these sources, whatever was built before.
make --no-print-directory clean
make --no-print-directory -j"${RELORA_CI_JOBS:-2}" CUDA_VENV="$VENV" STRICT=1 cuda
phase "nvcc build, 4 archs + PTX, no warnings, no spills in hot kernels"
if [ "$compile_only" = 1 ]; then
    echo "ci: Kernels compile check OK in $(($(date +%s) - t0)) s"
    exit 0
fi
make --no-print-directory -j"${RELORA_CI_JOBS:-2}" STRICT=1 emu
phase "emulated library built"
make --no-print-directory STRICT=1 test | grep -v '^PASS'
phase "emulated kernel tests passed"
echo "ci: Kernels OK in $(($(date +%s) - t0)) s"
