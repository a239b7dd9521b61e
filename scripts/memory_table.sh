#!/usr/bin/env bash
# Prints the planned-memory tables of docs/memory.md: `relora memory --device cuda --json` for the paper's
# sizes and a Llama-2-70B-shaped model at sequence 1024, full-rank vs ReLoRA (dense bf16 frozen weights), both
# checkpointing settings; then quantized weights and 8-bit moments; then 1b per process of W data-parallel
# processes with shard_optimizer. Each plan counts the tensors, the caching allocator's blocks and the
# estimated CUDA context, cuBLAS workspace and NCCL buffers; a card "fits" when that device total is within
# its memory, each card with its own estimates:
#   24 GB  --gpu rtx4090 --budget 24GiB
#   80 GB  --gpu h100    --budget 81559MiB   (an H100 80GB's total as nvidia-smi reports it)
#   141 GB --gpu h200    --budget 143771MiB  (an H200's)
# The "device" columns are an H100's (--gpu h100).
# Usage: bash scripts/memory_table.sh [path/to/relora]   (default: .build/release/relora, else debug)
set -euo pipefail
cd "$(dirname "$0")/.."
RELORA=${1:-}
if [ -z "$RELORA" ]; then
    if [ -x .build/release/relora ]; then RELORA=.build/release/relora; else RELORA=.build/debug/relora; fi
fi
exec python3 - "$RELORA" <<'PY'
import json, subprocess, sys

relora = sys.argv[1]
recipe = "Configs/recipes/plan_1024.json"
cards = [("24 GB", "rtx4090", "24GiB"), ("80 GB", "h100", "81559MiB"), ("141 GB", "h200", "143771MiB")]

def plan(sets, gpu="h100", budget=None, world=1):
    args = [relora, "memory", recipe, "--device", "cuda", "--json", "--gpu", gpu, "--world-size", str(world)]
    if budget: args += ["--budget", budget]
    for s in sets: args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode not in (0, 3): sys.exit(f"{' '.join(args)}: {r.stderr}")
    return json.loads(r.stdout)

def fits(sets, world=1):
    return ["yes" if plan(sets, gpu, budget, world)["fits"] else "no" for _, gpu, budget in cards]

g = lambda b: f"{b / 2**30:.2f}"
model = lambda m: f"model=Configs/models/llama_{m}.json"
full = ["mode=full", "relora_every=null"]
card_header = " | ".join(f"fits {name}" for name, _, _ in cards)

print("| model | mode | checkpointing | frozen | LoRA | trainable | master | Adam | grads | activations | workspace "
      f"| tensors | + allocator | + CUDA | device | {card_header} |")
print("|" + "---|" * 18)
for m in ["130m", "350m", "1b", "7b", "13b", "70b"]:
    for mode in ["full", "relora"]:
        for ckpt in ["none", "block"]:
            sets = [model(m), f"mode={mode}", f"checkpointing={ckpt}"] + (full if mode == "full" else [])
            p = plan(sets)
            t, c = p["peak_bytes_by_tag"], p["cuda"]
            tags = ["frozen_weights", "lora", "trainable", "master_weights", "optimizer", "gradients", "activations", "workspace"]
            allocator = c["allocator_reserved_peak_bytes"] - p["peak_total_bytes"]
            print(f"| {m} | {mode} | {ckpt} | " + " | ".join(g(t[k]) for k in tags)
                  + f" | {g(p['peak_total_bytes'])} | {g(allocator)} | {g(c['context_bytes'] + c['cublas_workspace_bytes'])}"
                  + f" | **{g(p['device_total_bytes'])}** | " + " | ".join(fits(sets)) + " |")
print()
print("GiB; cuda precision plan: bf16 activations, LoRA factors and working copies; f32 gradients, master copies and")
print("Adam states. + allocator: the caching allocator's rounding and cache and the backend's 2 MiB of scratch")
print("(modelled exactly); + CUDA: the estimated context and cuBLAS workspace of an H100 (0.48 GiB).")

print()
print("Quantized frozen weights and 8-bit Adam moments (optimizer_states: int8), block checkpointing, same recipe; GiB:")
print()
print(f"| model | run | frozen weights | other tensors | tensors | device | vs full-rank | {card_header} |")
print("|" + "---|" * 10)
names = {"full": "full-rank bf16", "full_int8": "full-rank bf16, 8-bit Adam", "none": "relora, dense bf16 W",
         "q4_0_int8": "relora, q4_0 W, 8-bit Adam"}
for m in ["1b", "7b", "13b", "70b"]:
    reference = None
    for variant in ["full", "full_int8", "none", "q8_0", "q4_0", "nf4", "q4_0_int8"]:
        if variant == "full": extra = full
        elif variant == "full_int8": extra = full + ["optimizer_states=int8"]
        elif variant.endswith("_int8"): extra = ["mode=relora", f"quant={variant[:-5]}", "optimizer_states=int8"]
        else: extra = ["mode=relora", f"quant={variant}"]
        sets = [model(m), "checkpointing=block"] + extra
        p = plan(sets)
        device, frozen = p["device_total_bytes"], p["peak_bytes_by_tag"]["frozen_weights"]
        reference = reference or device
        print(f"| {m} | {names.get(variant, f'relora, {variant} W')} | {g(frozen)} | {g(p['peak_total_bytes'] - frozen)} "
              f"| {g(p['peak_total_bytes'])} | **{g(device)}** | {device / reference:.2f}x | " + " | ".join(fits(sets)) + " |")

print()
print("Per process of W data-parallel processes with shard_optimizer (1b, block checkpointing, same recipe), GiB,")
print("the rank with the largest need:")
print()
print("| mode | W | Adam moments | master copies | tensors | + NCCL (estimate) | device | smallest rank's device |")
print("|---|---|---|---|---|---|---|---|")
for mode in ["relora", "full"]:
    for w in [1, 2, 4, 8]:
        p = plan(["shard_optimizer=true"] + (full if mode == "full" else []), world=w)
        t = p["peak_bytes_by_tag"]
        smallest = min(r["device_total_bytes"] for r in p.get("ranks", [p]))
        label = "1 (one process)" if w == 1 else str(w)
        print(f"| {mode} | {label} | {g(t['optimizer'])} | {g(t['master_weights'])} | {g(p['peak_total_bytes'])} "
              f"| {g(p['cuda']['nccl_bytes'])} | **{g(p['device_total_bytes'])}** | {g(smallest)} |")
PY
