#!/usr/bin/env bash
# The GPU checks and benchmarks on any machine with a CUDA GPU and nvcc, without Swift:
#   1. builds Kernels/ with the machine's nvcc (CUDA_HOME, or the nvcc on PATH, or /usr/local/cuda);
#   2. `make test-cuda`: every kernel against its scalar reference on the GPU;
#   3. `relora selftest --device cuda`: every backend op (f32 and bf16) and training steps against the CPU;
#   4. `relora-bench gpu`: quantized linear vs cuBLAS, dequantize/merge bandwidth, 1b training steps, 24 GiB fits.
#   5. data parallel over NCCL with 2 GPUs: the 1b LoRA r128 q4_0 steps on 1 GPU and on 2 (torchrun-style, no
#      mpirun): tokens/s per GPU and scaling efficiency in data_parallel.txt (skipped with fewer GPUs).
# Needs dist/gpu/ (or dist/gpu.tar.xz) from Benchmarks/gpu/package.sh (static-stdlib binaries + their libraries).
# Results go to $OUT (default ./gpu-results): one log per stage, selftest.json, bench.json, data_parallel.txt,
# summary.txt.
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

# Data parallel: the same short run (1b, LoRA r 128 over q4_0 frozen weights, 4 x 1024 tokens a micro-batch, 2
# micro-batches a step, so the same 8192 tokens a step) on 1 GPU and as 2 ranks on 2 GPUs, the ranks started
# torchrun-style (WORLD_SIZE/RANK/LOCAL_RANK, NCCL's id at NCCL_COMM_ID; no mpirun). Medians over the steps
# after the first two. Scaling efficiency = tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU); 1.0 is ideal.
data_parallel() {  # data_parallel DIST OUT
    local dist=$1 dir=$2/data_parallel port=$(( 29500 + RANDOM % 500 ))
    mkdir -p "$dir"
    # Random token ids below the 1b vocabulary (32100) as a uint16 .npy; only the speed matters here.
    python3 - "$dir/train.npy" <<'PY' || return 1
import array, random, struct, sys
n, vocab = 1 << 19, 32100
header = "{'descr': '<u2', 'fortran_order': False, 'shape': (%d,), }" % n
header += " " * (63 - (10 + len(header)) % 64) + "\n"  # the data starts on a 64-byte boundary
rng = random.Random(0)
tokens = array.array("H", (rng.randrange(vocab) for _ in range(n)))
if sys.byteorder == "big": tokens.byteswap()
with open(sys.argv[1], "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + tokens.tobytes())
PY
    local set=(--device cuda --set mode=lora --set relora_every=null --set quant=q4_0 --set lora_r=128
               --set micro_batch=4 --set grad_accum=2 --set steps=8 --set warmup_steps=0 --set eval_every=1000000
               --set checkpoint_every=1000000 --set train_data="$dir/train.npy")
    "$dist/relora" train Configs/recipes/plan_1024.json "${set[@]}" --set run_dir="$dir/w1" > "$dir/w1.log" 2>&1 \
        || { echo "1 GPU run failed: $(tail -1 "$dir/w1.log")"; return 1; }
    local pids=() r rc=0
    for r in 0 1; do
        WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 NCCL_COMM_ID=127.0.0.1:$port RELORA_COLLECTIVE_TIMEOUT=60 \
            "$dist/relora" train Configs/recipes/plan_1024.json "${set[@]}" --set run_dir="$dir/w2" > "$dir/w2-rank$r.log" 2>&1 &
        pids+=($!)
    done
    for r in 0 1; do wait "${pids[$r]}" || { rc=$?; echo "2 GPU run: rank $r exited $rc: $(tail -1 "$dir/w2-rank$r.log")"; }; done
    [ "$rc" = 0 ] || return "$rc"
    python3 - "$dir" <<'PY'
import json, statistics, sys
d = sys.argv[1]
def steps(run):
    return [x for x in map(json.loads, open(f"{d}/{run}/metrics.jsonl")) if "ms" in x]
w1, w2 = steps("w1"), steps("w2")
tok1 = statistics.median(x["tokens_per_second"] for x in w1[2:])
tok2 = statistics.median(x["tokens_per_second"] for x in w2[2:])
comm = statistics.median(x.get("comm_ms", 0) / x["ms"] for x in w2[2:])
loss = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(w1, w2))
print(f"1 GPU: {tok1:.0f} tokens/s; 2 GPUs: {tok2:.0f} tokens/s = {tok2 / 2:.0f} per GPU, scaling efficiency "
      f"{tok2 / (2 * tok1):.3f}, comm share {100 * comm:.1f}%; step losses 2 vs 1 GPU: max relative difference {loss:.1e}")
PY
}
export -f data_parallel
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if [ "${gpus:-0}" -ge 2 ]; then
    stage data-parallel 150 bash -c 'data_parallel "$0" "$1"' "$DIST" "$OUT"
    tail -1 "$OUT/data-parallel.log" | sed 's/^/data-parallel: /' | tee "$OUT/data_parallel.txt" >> "$summary"
else
    # Two ranks on one GPU: NCCL (2.5 and later) refuses a communicator with two ranks on the same device
    # ("Duplicate GPU detected", ncclInvalidUsage), and no NCCL variable lifts that check (its maintainers:
    # the topology search cannot work with it), so there is no 2-rank run to try here.
    echo "data-parallel: untested (1 GPU)" | tee "$OUT/data_parallel.txt" >> "$summary"
fi
echo "results in $OUT:"; ls -la "$OUT"
cat "$summary"
