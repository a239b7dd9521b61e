#!/usr/bin/env python3
"""ReLoRA with quantized frozen weights against dense ReLoRA and full-rank, on the default Shakespeare data
(standard library only; the quality experiment at demo scale).

Every arm continues the demo's model (`bash scripts/demo.sh`: runs/shakespeare-demo, full-rank, step
400) for the same budget with the recipe Configs/recipes/shakespeare_relora.json (r 32, alpha 8, restarts
every 100 steps, magnitude reset 0.99, jagged schedule, lr 4e-3), changing only the frozen weights'
storage (`quant`) and, where the build has them, the merge policy (`merge_policy`). The control arm
continues full-rank training at the demo's own learning rate. Each arm ends with `relora export` and
`relora eval` on the complete held-out plays; the restart lines of metrics.jsonl give the fraction of
each merged update lost to quantization.

    python3 Benchmarks/quant_quality.py [--steps 800] [--every 100] [--arms dense,q8_0,...] [--policies q4_0,nf4]
        [--out Benchmarks/results/quant_quality]
"""
import argparse, json, math, os, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = os.path.join(ROOT, ".build/release/relora")
DATA = os.path.join(ROOT, "data/shakespeare")
WARM = os.path.join(ROOT, "runs/shakespeare-demo")
RECIPE = os.path.join(ROOT, "Configs/recipes/shakespeare_relora.json")

# name -> recipe overrides (on top of the ReLoRA continuation recipe)
ARMS = {
    "full": ["mode=\"full\"", "relora_every=null", "lr=2e-3"],
    "dense": [],
    "q8_0": ["quant=\"q8_0\""],
    "q4_0": ["quant=\"q4_0\""],
    "nf4": ["quant=\"nf4\""],
}
POLICIES = ["stochastic", "compensate", "master"]


def run(args):
    print("$ " + " ".join(args), flush=True)
    out = subprocess.run(args, cwd=ROOT, text=True, capture_output=True)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(args)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def arm(name, overrides, steps, every, out):
    run_dir = os.path.join(out, name)
    sets = [f"run_dir=\"{run_dir}\"", f"steps={steps}", f"warm_start=\"{WARM}\"", "checkpoint_every=100000"]
    sets += [] if "mode=\"full\"" in overrides else [f"relora_every={every}"]
    sets += overrides
    start = time.time()
    args = [R, "train", RECIPE]
    for s in sets:
        args += ["--set", s]
    subprocess.run(["rm", "-rf", run_dir])
    run(args)
    seconds = time.time() - start
    run([R, "export", run_dir, "--format", "hf", "--out", run_dir + "/hf"])
    ev = json.loads(run([R, "eval", "--model", run_dir + "/hf", "--data", DATA + "/val.npy", "--seq-len", "128", "--json"]))
    lost, changed, peak = [], [], None
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        m = json.loads(line)
        if "restart" in m:
            lost.append(m.get("merge_error", 0.0))
            if "codes_changed" in m:
                changed.append(m["codes_changed"])
        if "memory_bytes" in m:
            peak = max(peak or 0, m["memory_bytes"])
    return {"arm": name, "val_loss": ev["loss"], "val_ppl": ev["perplexity"], "tokens": ev["tokens"],
            "lost_update_mean": sum(lost) / len(lost) if lost else None, "restarts": len(lost),
            "codes_changed_mean": sum(changed) / len(changed) if changed else None,
            "memory_bytes": peak, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800, help="final step (the warm start is at 400)")
    ap.add_argument("--every", type=int, default=100, help="relora_every (restart interval)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--policies", default="", help="formats (e.g. q4_0,nf4) to also run under each other merge policy")
    ap.add_argument("--out", default=os.path.join(ROOT, "Benchmarks/results/quant_quality"))
    a = ap.parse_args()
    if not os.path.exists(os.path.join(WARM, "checkpoints/latest")):
        sys.exit("run `bash scripts/demo.sh` first: the arms continue its model")
    os.makedirs(a.out, exist_ok=True)
    results_path = os.path.join(a.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    todo = [(n, ARMS[n]) for n in a.arms.split(",") if n]
    todo += [(f"{q}_{p}", [f"quant=\"{q}\"", f"merge_policy=\"{p}\""]) for q in a.policies.split(",") if q for p in POLICIES]
    for name, overrides in todo:
        results[name] = arm(name, overrides, a.steps, a.every, a.out)
        json.dump(results, open(results_path, "w"), indent=2, sort_keys=True)
    dense = results.get("dense", {}).get("val_ppl")
    lines = ["| arm | val loss | val ppl | vs dense ReLoRA | lost update (mean over restarts) | peak memory | time |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rel = f"{100 * (r['val_ppl'] / dense - 1):+.2f} %" if dense else "-"
        lost = f"{r['lost_update_mean']:.3f}" if r["lost_update_mean"] is not None else "-"
        mem = f"{r['memory_bytes'] / 2**20:.1f} MiB" if r["memory_bytes"] else "-"
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {rel} | {lost} | {mem} | {r['seconds']:.0f} s |")
    open(os.path.join(a.out, "results.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
