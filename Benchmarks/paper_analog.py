#!/usr/bin/env python3
"""The ReLoRA paper's comparison, in miniature, on the default Shakespeare data (standard library only).

Arms, all with the same token budget (steps x 2048 tokens) and the same 5.3M-parameter model
(Configs/models/llama_shakespeare.json: hidden 256, FFN 688, 4 layers, vocab 4096):

  full                 full-rank training (lr L)                                   -- the paper's "full-rank"
  full_lr2x            full-rank at 2L, to separate the learning rate from the method
  control              full-rank, narrower model with as many parameters as ReLoRA trains (`relora control`)
  lora                 LoRA from scratch, no restarts (lr 2L)                      -- "LoRA"
  lora_ws              LoRA warm-started from full's checkpoint at N/3            -- "LoRA + warm start"
  relora               ReLoRA: warm start, restarts every N/6, magnitude reset 0.99, jagged schedule
  ablations (no warm start, as in the paper's Table 6):
    restarts           restarts only (no optimizer reset, plain cosine)
    restarts_reset     restarts + reset, plain cosine (the paper: diverges)
    restarts_jagged    restarts + jagged schedule, no reset
    relora_no_ws       restarts + reset + jagged, no warm start

r = 32, alpha = 8 (s = 0.25 as the paper's 128/32), lr L = 2e-3, 2L for the LoRA stages ("about 2x the
regular LR in the ReLoRA stage"), warmup 30 steps (scaled in --quick), restart warmup N/60.
Each arm ends with `relora export` (current LoRA cycle merged) and `relora eval` on the complete held-out
plays. Writes OUT/results.md (table) and OUT/results.json, and `relora analyze` plots the update spectra
of full, lora_ws and relora relative to the shared warm start (OUT/analysis/spectra.svg).

    python3 Benchmarks/paper_analog.py            # N = 900 steps: 57 minutes measured on 2 cores
    python3 Benchmarks/paper_analog.py --arms full_lr2x   # (re)run some arms; results.json is merged
    python3 Benchmarks/paper_analog.py --quick    # N = 180: 18 minutes measured (shared cores)
"""
import argparse, json, os, re, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = os.path.join(ROOT, ".build/release/relora")
DATA = os.path.join(ROOT, "data/shakespeare")
MODEL = os.path.join(ROOT, "Configs/models/llama_shakespeare.json")

from paper_regime import sh  # the same runner (streams output, thins step lines, fails loudly); same directory


def prepare_data():
    sh([sys.executable, "scripts/fetch_shakespeare.py", "--out", DATA])
    if not os.path.exists(f"{DATA}/tokenizer.json"):
        sh([R, "tokenizer", "train", "--vocab-size", "4096", "--in", f"{DATA}/train.txt", "--out", f"{DATA}/tokenizer.json"])
    for split in ("train", "val"):
        if not os.path.exists(f"{DATA}/{split}.npy"):
            sh([R, "tokenize", "--tokenizer", f"{DATA}/tokenizer.json", "--in", f"{DATA}/{split}.txt", "--out", f"{DATA}/{split}.npy"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 180 steps instead of 900")
    ap.add_argument("--out", default=None, help="output directory (default runs/paper-analog[-quick])")
    ap.add_argument("--arms", default=None, help="comma-separated subset of arms to (re)run")
    args = ap.parse_args()
    N = 180 if args.quick else 900
    W, RE = N // 3, N // 6
    out = args.out or os.path.join(ROOT, "runs", "paper-analog-quick" if args.quick else "paper-analog")
    os.makedirs(f"{out}/recipes", exist_ok=True)
    if not os.path.exists(R):
        sh(["swift", "build", "-c", "release", "--product", "relora"])
    prepare_data()

    base = {
        "model": MODEL, "train_data": f"{DATA}/train.npy", "val_data": f"{DATA}/val.npy",
        "tokenizer": f"{DATA}/tokenizer.json", "seq_len": 128, "micro_batch": 16, "steps": N, "lr": 2e-3,
        "warmup_steps": max(5, N // 30), "min_lr_ratio": 0.1, "eval_every": N, "eval_tokens": 32768,
        "checkpoint_every": W, "keep_checkpoints": 10, "log_every": 10, "seed": 0,
    }
    lora = {"lora_r": 32, "lora_alpha": 8, "lr": 4e-3}
    relora = {**lora, "mode": "relora", "relora_every": RE, "restart_warmup": max(2, N // 60),
              "optimizer_reset": "magnitude", "optimizer_reset_ratio": 0.99, "jagged_schedule": True}
    warm = f"{out}/full/checkpoints/step_{W:08d}"
    arms = {
        "full": {},
        "full_lr2x": {"lr": 4e-3},
        "control": {"model": f"{out}/control_config.json"},
        "lora": {**lora, "mode": "lora"},
        "lora_ws": {**lora, "mode": "lora", "warm_start": warm},
        "relora": {**relora, "warm_start": warm},
        "restarts": {**relora, "optimizer_reset": "none", "jagged_schedule": False},
        "restarts_reset": {**relora, "jagged_schedule": False},
        "restarts_jagged": {**relora, "optimizer_reset": "none"},
        "relora_no_ws": {**relora},
    }
    selected = args.arms.split(",") if args.arms else list(arms)
    results = {}
    if os.path.exists(f"{out}/results.json"):
        results = json.load(open(f"{out}/results.json"))
    for name in arms:
        recipe = {**base, **arms[name], "run_dir": f"{out}/{name}"}
        path = f"{out}/recipes/{name}.json"
        json.dump(recipe, open(path, "w"), indent=2)
        if name == "relora":  # the control matches what ReLoRA trains
            sh([R, "control", path, "--out", f"{out}/control_config.json"])
    for name in selected:
        if name not in arms:
            sys.exit(f"error: unknown arm {name}; arms: {', '.join(arms)}")
        run = f"{out}/{name}"
        subprocess.run(["rm", "-rf", run, f"{run}.log"])
        print(f"\n== {name}", flush=True)
        start = time.time()
        with open(f"{run}.log", "w") as log:
            train_out = sh([R, "train", f"{out}/recipes/{name}.json"], log)
        seconds = time.time() - start
        sh([R, "export", run, "--format", "hf", "--out", f"{run}/hf"])
        ev = json.loads(sh([R, "eval", "--model", f"{run}/hf", "--data", f"{DATA}/val.npy", "--seq-len", "128", "--json"]).strip().splitlines()[-1])
        m = re.search(r"parameters, (\d+) trained", train_out)
        mem = re.search(r"memory by tag after the first step:\n((?:.+\n)+?)total\s+(.+)\n", train_out)
        tps = [json.loads(l)["tokens_per_second"] for l in open(f"{run}/metrics.jsonl") if '"tokens_per_second"' in l]
        restarts = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"restart"' in l]
        results[name] = {
            "val_loss": ev["loss"], "val_perplexity": ev["perplexity"], "trained_parameters": int(m.group(1)) if m else None,
            "tokens_per_second": statistics.median(tps) if tps else None, "train_seconds": seconds,
            "memory": (mem.group(1) + "total " + mem.group(2)).strip().splitlines() if mem else [],
            "restarts": len(restarts), "zeroed_m": [r["zeroed_m"] for r in restarts],
        }
        json.dump(results, open(f"{out}/results.json", "w"), indent=2)
    if all(os.path.exists(f"{out}/{a}/checkpoints/latest") for a in ("full", "lora_ws", "relora")):
        sh([R, "analyze", f"{out}/full", f"{out}/lora_ws", f"{out}/relora", "--against", warm,
            "--labels", "full-rank,LoRA + warm start,ReLoRA", "--out", f"{out}/analysis"])
    write_table(out, N, W, RE, results)


def write_table(out, N, W, RE, results):
    rows = [
        ("full", "full-rank"), ("full_lr2x", "full-rank at the LoRA stages' lr (4e-3), an lr control"), ("control", "control (full-rank, as many params as ReLoRA trains)"),
        ("lora", "LoRA (from scratch)"), ("lora_ws", "LoRA + warm start"), ("relora", "ReLoRA"),
        ("restarts", "ablation: restarts only"), ("restarts_reset", "ablation: restarts + reset, no jagged"),
        ("restarts_jagged", "ablation: restarts + jagged, no reset"), ("relora_no_ws", "ablation: ReLoRA without warm start"),
    ]
    lines = [f"N = {N} steps x 2048 tokens, warm start at {W}, restarts every {RE}, r = 32.", "",
             "| arm | val loss | val ppl | trained params | tokens/s | peak memory |", "|---|---|---|---|---|---|"]
    for key, label in rows:
        r = results.get(key)
        if not r:
            continue
        peak = r["memory"][-1].split("peak")[-1].strip(" )") if r["memory"] else "-"
        lines.append(f"| {label} | {r['val_loss']:.4f} | {r['val_perplexity']:.2f} | {r['trained_parameters']:,} | "
                     f"{r['tokens_per_second']:.0f} | {peak} |")
    open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
