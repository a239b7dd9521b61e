#!/usr/bin/env bash
# Prints the planned-memory tables of docs/memory.md: `relora memory` on cuda for the paper's sizes at
# sequence 1024, full-rank vs ReLoRA (dense bf16 frozen weights), both checkpointing settings, against a
# 24 GiB card; then quantized weights and 8-bit moments; then 1b per process of W with shard_optimizer.
# Usage: bash scripts/memory_table.sh [path/to/relora]   (default: .build/release/relora, else debug)
set -euo pipefail
cd "$(dirname "$0")/.."
RELORA=${1:-}
if [ -z "$RELORA" ]; then
    if [ -x .build/release/relora ]; then RELORA=.build/release/relora; else RELORA=.build/debug/relora; fi
fi
echo "| model | mode | checkpointing | frozen | LoRA | trainable | master | Adam | grads | activations | workspace | peak | fits 24 GiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for model in 130m 350m 1b 7b 13b; do
    for mode in full relora; do
        for ckpt in none block; do
            extra=()
            [ "$mode" = full ] && extra=(--set relora_every=null)
            json=$("$RELORA" memory Configs/recipes/plan_1024.json --device cuda --budget 24GiB --json \
                --set model=Configs/models/llama_$model.json --set mode=$mode --set checkpointing=$ckpt "${extra[@]}" || true)
            python3 - "$model" "$mode" "$ckpt" "$json" <<'PY'
import json, sys
model, mode, ckpt, raw = sys.argv[1:5]
p = json.loads(raw)
t = p["peak_bytes_by_tag"]
g = lambda b: f"{b / 2**30:.2f}"
cols = [t[k] for k in ["frozen_weights", "lora", "trainable", "master_weights", "optimizer", "gradients", "activations", "workspace"]]
print(f"| {model} | {mode} | {ckpt} | " + " | ".join(g(c) for c in cols) + f" | **{g(p['peak_total_bytes'])}** | {'yes' if p['fits'] else 'no'} |")
PY
        done
    done
done
echo
echo "GiB; cuda precision plan: bf16 activations, LoRA factors and working copies; f32 gradients, master copies and Adam states."

echo
echo "Quantized frozen weights and 8-bit Adam moments (optimizer_states: int8) (block checkpointing, same recipe):"
echo
echo "| model | run | frozen weights | other | peak | vs full-rank | fits 24 GiB |"
echo "|---|---|---|---|---|---|---|"
for model in 1b 7b 13b; do
    full=""
    for variant in full full_int8 none q8_0 q4_0 nf4 q4_0_int8; do
        case $variant in
            full) args=(--set mode=full --set relora_every=null) ;;
            full_int8) args=(--set mode=full --set relora_every=null --set optimizer_states=int8) ;;
            *_int8) args=(--set mode=relora --set quant=${variant%_int8} --set optimizer_states=int8) ;;
            *) args=(--set mode=relora --set quant=$variant) ;;
        esac
        json=$("$RELORA" memory Configs/recipes/plan_1024.json --device cuda --budget 24GiB --json \
            --set model=Configs/models/llama_$model.json --set checkpointing=block "${args[@]}" || true)
        full=$(python3 - "$model" "$variant" "$json" "$full" <<'PY'
import json, sys
model, variant, raw, full = sys.argv[1:5]
p = json.loads(raw)
peak = p["peak_total_bytes"]
frozen = p["peak_bytes_by_tag"]["frozen_weights"]
full = int(full) if full else peak
name = {"full": "full-rank bf16", "full_int8": "full-rank bf16, 8-bit Adam", "none": "relora, dense bf16 W",
        "q4_0_int8": "relora, q4_0 W, 8-bit Adam"}.get(variant, f"relora, {variant} W")
g = lambda b: f"{b / 2**30:.2f}"
print(f"| {model} | {name} | {g(frozen)} | {g(peak - frozen)} | **{g(peak)}** | {peak / full:.2f}x | {'yes' if p['fits'] else 'no'} |", file=sys.stderr)
print(full)
PY
)
    done
done 2>&1 >/dev/null

echo
echo "Per process of W data-parallel processes with shard_optimizer (1b, block checkpointing, same recipe), GiB,"
echo "the rank with the largest peak:"
echo
echo "| mode | W | Adam moments | master copies | peak | smallest rank's peak |"
echo "|---|---|---|---|---|---|"
for mode in relora full; do
    extra=()
    [ "$mode" = full ] && extra=(--set mode=full --set relora_every=null)
    for w in 1 2 4 8; do
        json=$("$RELORA" memory Configs/recipes/plan_1024.json --world-size $w --set shard_optimizer=true --json "${extra[@]}")
        python3 - "$mode" "$w" "$json" <<'PY'
import json, sys
mode, w, raw = sys.argv[1:4]
p = json.loads(raw)
t = p["peak_bytes_by_tag"]
g = lambda b: f"{b / 2**30:.2f}"
smallest = min(r["peak_total_bytes"] for r in p.get("ranks", [p]))
label = "any, unsharded" if w == "1" else w
print(f"| {mode} | {label} | {g(t['optimizer'])} | {g(t['master_weights'])} | **{g(p['peak_total_bytes'])}** | {g(smallest)} |")
PY
    done
done
