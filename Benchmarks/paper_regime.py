#!/usr/bin/env python3
"""The ReLoRA paper's comparison in the paper's regime: fresh data, no token seen twice (standard library only).

Data: the PyPI Python-source corpus (scripts/fetch_corpus.py -> data/corpus: train.npy 55M tokens, val.npy held
out by path hash, ood.npy a whole held-out package, byte-level BPE with vocab 8192). Every arm reads the training
windows once, in the epoch sampler's order (asserted: the budget is under one epoch); the seed changes the
initialisation and the data order, and an arm that warm-starts continues the data where full-rank left it.

Model (written to OUT/model_config.json): LLaMA, hidden 256, FFN 688, 6 layers, 4 heads, vocab 8192: 8.94M
parameters, of which 4.75M (53 %) in the block matrices q,k,v,o,gate,up,down (embedding + head 4.19M).
r = 32, alpha = 8 (s = 0.25 as the paper's 128/32): ReLoRA trains 5.13M of 8.94M (57 %; the paper's 130M: 54 %).

Recipe shape (the paper's): N steps x 2048 tokens (8 x 256); full-rank lr L = 2e-3, LoRA stages 2L; warmup N/30;
cosine to 0.1; warm start from full-rank's checkpoint at W = N/4; restarts every R = N/4 (3 cycles after the
warm start), restart warmup R/10, magnitude reset 0.99 of the LoRA moments, jagged schedule.

  full             full-rank (lr L)                                                -- the paper's "full-rank"
  control          full-rank, narrower model with as many parameters as ReLoRA trains (`relora control`)
  lora             LoRA from scratch, no restarts (lr 2L)                          -- "LoRA"
  lora_ws          LoRA warm-started from that seed's full checkpoint at W          -- "LoRA + warm start"
  relora           ReLoRA: that warm start + restarts + reset + jagged schedule     -- "ReLoRA"
  optional (--arms): restarts (restarts only, no warm start, no reset, plain cosine), restarts_jagged
  (restarts + jagged, no reset), relora_no_ws (ReLoRA without warm start), full_lr2x (full-rank at 2L),
  relora_lr1x (ReLoRA stages at L: an lr control), relora_r12 (restarts every N/12: 9 cycles after the warm start),
  relora_joint (the reset prunes m and v with one mask, `magnitude_joint`)
  quantized (--arms quant = all twelve): relora_<format>_<policy>, the relora arm with its frozen block
  linears stored as q8_0, q4_0 or nf4 and restarts merged by rtn, stochastic, compensate or master; their own
  table in results.md compares each with dense ReLoRA of the same seed (perplexity ratio, share of each merged
  update lost to the requantization, codes changed, measured peak memory, planned frozen-weight bytes)
  8-bit Adam: any arm name + _adam8 runs it with `optimizer_states: int8` (e.g. relora_adam8,
  relora_q4_0_compensate_adam8); the quantized table lists those rows too

Each arm: `relora train`, `relora export RUN --format hf`, `relora eval` of the export on the val and ood sets.
Evaluation uses --eval-windows evenly spaced 256-token windows of each file (default 512, i.e. 131K tokens
of val.npy and of ood.npy; 0 = the whole files), identical for every arm, so arm differences are paired.
Results merge into OUT/results.json (keyed by arm, then seed), OUT/results.md is the table, OUT/loss_curves.svg
the seed-0 loss curves, OUT/analysis/ the update spectra of full, lora_ws, relora (seed 0) against the warm start.

    nice -n 19 python3 Benchmarks/paper_regime.py                       # 5 arms x seeds 0,1,2
    nice -n 19 python3 Benchmarks/paper_regime.py --arms relora_no_ws --seeds 0
    python3 Benchmarks/paper_regime.py --table-only                     # rewrite the table and figures
"""
import argparse, json, os, re, shutil, statistics, struct, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = os.environ.get("RELORA_BIN") or os.path.join(ROOT, ".build/release/relora")
DATA = os.environ.get("RELORA_CORPUS") or os.path.join(ROOT, "data/corpus")
PUBLISH = os.path.join(ROOT, "Benchmarks/results/paper_regime")
MAIN = ["full", "control", "lora", "lora_ws", "relora"]
PAPER = {"full": 23.65, "lora": 34.17, "lora_ws": 25.46, "relora": 25.04}  # 130M, C4 val perplexity
LABELS = {
    "full": "full-rank", "control": "control (full-rank, as many params as ReLoRA trains)",
    "lora": "LoRA (from scratch)", "lora_ws": "LoRA + warm start", "relora": "ReLoRA",
    "restarts": "ablation: restarts only (no ws, no reset, no jagged)", "restarts_jagged": "ablation: restarts + jagged, no reset, no ws",
    "relora_no_ws": "ablation: ReLoRA without warm start", "full_lr2x": "full-rank at 2L (lr control)",
    "relora_lr1x": "ReLoRA with LoRA stages at L (lr control)", "relora_joint": "ReLoRA with the joint-mask reset (magnitude_joint 0.99)",
    "relora_r12": "ReLoRA restarting every N/12 (9 cycles; interval control)",
}
# The quality arms: the relora arm with its frozen block linears stored in a format and merged under a
# policy (relora_<format>_<policy>), compared per seed with dense ReLoRA (the relora arm) in their own table.
QUANT_FORMATS = ("q8_0", "q4_0", "nf4")
MERGE_POLICIES = ("rtn", "stochastic", "compensate", "master")
QUANT_LABELS = {f"relora_{f}_{p}": (f, p) for f in QUANT_FORMATS for p in MERGE_POLICIES}
# Any arm with the suffix _adam8 runs with 8-bit Adam moments (`optimizer_states: int8`); relora_adam8 and
# relora_<format>_<policy>_adam8 are rows of the quantized table.
ADAM8 = "_adam8"


def quant_key(name):
    """(format, policy, 8-bit moments) of a row of the quantized table, or None."""
    base, adam8 = (name[:-len(ADAM8)], True) if name.endswith(ADAM8) else (name, False)
    if base == "relora":
        return ("dense f32", "exact", adam8) if adam8 else None
    return (*QUANT_LABELS[base], adam8) if base in QUANT_LABELS else None

MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 6, "num_attention_heads": 4,
    "num_key_value_heads": 4, "vocab_size": 8192, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "max_position_embeddings": 256, "tie_word_embeddings": False, "initializer_range": 0.02, "torch_dtype": "float32",
}


def sh(args, log=None, quiet=False):
    """Runs a command, streaming its output (step lines thinned) to stdout and an optional log; fails loudly."""
    print("$ " + " ".join(args), flush=True)
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as p:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if log:
                log.write(line)
                log.flush()
            if not quiet and (not line.startswith("step ") or "0/" in line.split("|")[0] or "SKIPPED" in line):
                print("  " + line, end="", flush=True)
        if p.wait() != 0:
            sys.exit(f"error: {' '.join(args[:2])} failed (exit {p.returncode}):\n" + "".join(lines[-20:]))
    return "".join(lines)


def npy_len(path):
    """Number of elements of a 1-D .npy file, from its header."""
    with open(path, "rb") as f:
        head = f.read(10)
        n = struct.unpack("<H", head[8:10])[0] if head[6] == 1 else struct.unpack("<I", f.read(2) + head[8:10])[0]
        header = f.read(n).decode("latin1")
    return int(re.search(r"'shape': \((\d+),?\)", header).group(1))


def eval_subset(src, dst, windows, seq):
    """Writes `windows` evenly spaced, non-overlapping seq-token windows of the uint16 .npy src into dst."""
    with open(src, "rb") as f:
        raw = f.read()
    hl = struct.unpack("<H", raw[8:10])[0]
    assert "'<u2'" in raw[10:10 + hl].decode("latin1"), f"{src}: expected uint16 tokens"
    data = raw[10 + hl:]
    total = len(data) // 2
    stride = total // windows
    assert stride >= seq, f"{src}: {total} tokens hold fewer than {windows} windows of {seq}"
    body = b"".join(data[2 * i * stride: 2 * (i * stride + seq)] for i in range(windows))
    header = "{'descr': '<u2', 'fortran_order': False, 'shape': (%d,), }" % (windows * seq)
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    with open(dst, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + body)


def arms_for(out, seed, N, W, RE):
    lr = 2e-3
    base = {
        "model": f"{out}/model_config.json", "train_data": f"{DATA}/train.npy", "val_data": f"{DATA}/val.npy",
        "tokenizer": f"{DATA}/tokenizer.json", "seq_len": 256, "micro_batch": 8, "grad_accum": 1, "steps": N, "lr": lr,
        "warmup_steps": max(5, N // 30), "min_lr_ratio": 0.1, "eval_every": W, "eval_tokens": 16384,
        "checkpoint_every": W, "keep_checkpoints": 10, "log_every": 10, "seed": seed, "sampler": "epoch",
    }
    lora = {"lora_r": 32, "lora_alpha": 8, "lr": 2 * lr}
    relora = {**lora, "mode": "relora", "relora_every": RE, "restart_warmup": max(2, RE // 10),
              "optimizer_reset": "magnitude", "optimizer_reset_ratio": 0.99, "jagged_schedule": True}
    warm = f"{out}/full_s{seed}/checkpoints/step_{W:08d}"
    # The warm start goes through a run directory whose `latest` names full-rank's step-W checkpoint: this
    # build takes a checkpoint directory given directly (config.json + model.safetensors) for a Hugging Face
    # model and starts at step 0 with fresh optimizer state, i.e. it would re-read full-rank's first W steps
    # of data and restart the schedule; through a run directory it resumes step W's state and data position.
    warm_run = f"{out}/warm_s{seed}"
    arms = {
        "full": {},
        "control": {"model": f"{out}/control_config.json"},
        "lora": {**lora, "mode": "lora"},
        "lora_ws": {**lora, "mode": "lora", "warm_start": warm_run},
        "relora": {**relora, "warm_start": warm_run},
        "restarts": {**relora, "optimizer_reset": "none", "jagged_schedule": False},
        "restarts_jagged": {**relora, "optimizer_reset": "none"},
        "relora_no_ws": {**relora},
        "full_lr2x": {"lr": 2 * lr},
        "relora_lr1x": {**relora, "lr": lr, "warm_start": warm_run},
        "relora_joint": {**relora, "optimizer_reset": "magnitude_joint", "warm_start": warm_run},
        "relora_r12": {**relora, "relora_every": N // 12, "restart_warmup": max(2, N // 120), "warm_start": warm_run},
    }
    for name, (fmt, policy) in QUANT_LABELS.items():
        arms[name] = {**relora, "quant": fmt, "merge_policy": policy, "warm_start": warm_run}
    for name in list(arms):
        arms[name + ADAM8] = {**arms[name], "optimizer_states": "int8"}
    return base, arms, warm, warm_run


def publish(out, commit, message):
    """Copies the small results into Benchmarks/results/paper_regime and (with --commit) commits them."""
    os.makedirs(f"{PUBLISH}/recipes", exist_ok=True)
    for name in ("results.json", "results.md", "loss_curves.svg", "model_config.json", "control_config.json"):
        if os.path.exists(f"{out}/{name}"):
            shutil.copy(f"{out}/{name}", f"{PUBLISH}/{name}")
    for name in os.listdir(f"{out}/recipes"):
        shutil.copy(f"{out}/recipes/{name}", f"{PUBLISH}/recipes/{name}")
    if os.path.isdir(f"{out}/analysis"):
        os.makedirs(f"{PUBLISH}/analysis", exist_ok=True)
        for name in os.listdir(f"{out}/analysis"):
            if name.endswith((".svg", ".json")):
                shutil.copy(f"{out}/analysis/{name}", f"{PUBLISH}/analysis/{name}")
    if commit:
        rel = os.path.relpath(PUBLISH, ROOT)
        subprocess.run(["git", "add", rel], cwd=ROOT)
        r = subprocess.run(["git", "commit", "-q", "-m", message, "--", rel], cwd=ROOT)
        if r.returncode != 0:
            print("warning: git commit failed (results stay copied)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="N, steps of 2048 tokens (default 300; N/4 must divide it)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "paper-regime"))
    ap.add_argument("--arms", default=",".join(MAIN), help=f"comma-separated arms (default {','.join(MAIN)})")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-windows", type=int, default=512, help="256-token windows of val/ood per eval (0 = all)")
    ap.add_argument("--commit", action="store_true", help="copy results to Benchmarks/results/paper_regime and git commit after each arm")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    N = args.steps
    W = RE = N // 4
    assert N % 4 == 0, "N must be a multiple of 4"
    out = os.path.abspath(args.out)
    os.makedirs(f"{out}/recipes", exist_ok=True)
    json.dump(MODEL, open(f"{out}/model_config.json", "w"), indent=2)
    train_tokens = npy_len(f"{DATA}/train.npy")
    budget = N * 2048
    assert budget < train_tokens - 257 * 8, f"budget {budget} tokens exceeds one epoch of {train_tokens}"
    results = json.load(open(f"{out}/results.json")) if os.path.exists(f"{out}/results.json") else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    selected = [a for arm in args.arms.split(",") for a in (QUANT_LABELS if arm == "quant" else [arm])]

    eval_sets = {}
    for split in ("val", "ood"):
        if args.eval_windows:
            path = f"{out}/{split}_eval_{args.eval_windows}.npy"
            if not os.path.exists(path):
                eval_subset(f"{DATA}/{split}.npy", path, args.eval_windows, 256)
            eval_sets[split] = path
        else:
            eval_sets[split] = f"{DATA}/{split}.npy"

    for seed in ([] if args.table_only else seeds):
        base, arms, warm, warm_run = arms_for(out, seed, N, W, RE)
        for name in arms:
            if name not in selected and name != "relora":  # relora's recipe is `relora control`'s input
                continue
            recipe = {**base, **arms[name], "run_dir": f"{out}/{name}_s{seed}"}
            json.dump(recipe, open(f"{out}/recipes/{name}_s{seed}.json", "w"), indent=2)
        sh([R, "control", f"{out}/recipes/relora_s{seed}.json", "--out", f"{out}/control_config.json"])
        for name in selected:
            if name not in arms:
                sys.exit(f"error: unknown arm {name}; arms: {', '.join(arms)}")
            if "warm_start" in arms[name]:
                if not os.path.exists(warm):
                    sys.exit(f"error: {name} needs {warm}: run the full arm of seed {seed} first")
                os.makedirs(f"{warm_run}/checkpoints", exist_ok=True)
                link = f"{warm_run}/checkpoints/{os.path.basename(warm)}"
                if not os.path.islink(link):
                    os.symlink(os.path.relpath(warm, f"{warm_run}/checkpoints"), link)
                open(f"{warm_run}/checkpoints/latest", "w").write(os.path.basename(warm) + "\n")
            run = f"{out}/{name}_s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            print(f"\n== {name} seed {seed}  ({time.strftime('%H:%M:%S')})", flush=True)
            start = time.time()
            with open(f"{run}.log", "w") as log:
                train_out = sh([R, "train", f"{out}/recipes/{name}_s{seed}.json"], log)
            seconds = time.time() - start
            sh([R, "export", run, "--format", "hf", "--out", f"{run}/hf"], quiet=True)
            ev = {}
            for split, path in eval_sets.items():
                t0 = time.time()
                ev[split] = json.loads(sh([R, "eval", "--model", f"{run}/hf", "--data", path, "--seq-len", "256",
                                           "--batch", "8", "--json"]).strip().splitlines()[-1])
                ev[split]["seconds"] = time.time() - t0
            m = re.search(r"(\d+) parameters, (\d+) trained", train_out)
            metrics = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
            tps = [x["tokens_per_second"] for x in metrics if "tokens_per_second" in x]
            restarts = [x for x in metrics if "restart" in x]
            # The first restart merges the B = 0 factors of the warm start's step (nothing to lose): only
            # restarts that merged an update count for the lost share and codes changed.
            merged = [x for x in restarts if x.get("relative_update", 0) > 0]
            first = int(re.search(r"steps (\d+)\.\.<", train_out).group(1)) if re.search(r"steps (\d+)\.\.<", train_out) else 0
            results.setdefault(name, {})[str(seed)] = {
                "val_loss": ev["val"]["loss"], "val_perplexity": ev["val"]["perplexity"], "val_tokens": ev["val"]["tokens"],
                "ood_loss": ev["ood"]["loss"], "ood_perplexity": ev["ood"]["perplexity"], "ood_tokens": ev["ood"]["tokens"],
                "parameters": int(m.group(1)) if m else None, "trained_parameters": int(m.group(2)) if m else None,
                "steps_trained": N - first, "tokens_trained": (N - first) * 2048,
                "tokens_per_second": statistics.median(tps) if tps else None, "train_seconds": round(seconds, 1),
                "eval_seconds": round(ev["val"]["seconds"] + ev["ood"]["seconds"], 1),
                "restarts": len(restarts), "zeroed_m": [r.get("zeroed_m") for r in restarts],
                "relative_update": [r.get("relative_update") for r in restarts],
                "final_train_loss": statistics.mean([x["loss"] for x in metrics if "loss" in x and "step" in x][-20:]),
                "merge_error": [x.get("merge_error") for x in merged], "codes_changed": [x.get("codes_changed") for x in merged],
                "residual_recovered": [x["residual_recovered"] for x in merged if "residual_recovered" in x],
                "merge_seconds": [x.get("merge_seconds") for x in restarts],
                "peak_memory_bytes": max((x["memory_bytes"] for x in metrics if "memory_bytes" in x), default=None),
            }
            if quant_key(name) or name == "relora":
                results[name][str(seed)]["planned_bytes"] = planned_bytes(f"{out}/recipes/{name}_s{seed}.json")
            json.dump(results, open(f"{out}/results.json", "w"), indent=2)
            write_table(out, N, W, RE, results, eval_sets)
            figures(out, warm if seed == 0 else None)
            publish(out, args.commit, f"paper_regime: {name} seed {seed}: val ppl {ev['val']['perplexity']:.2f}, ood ppl {ev['ood']['perplexity']:.2f}")
    figures(out, f"{out}/full_s0/checkpoints/step_{W:08d}")
    write_table(out, N, W, RE, results, eval_sets)
    if args.table_only:
        publish(out, args.commit, "paper_regime: table and figures")


def figures(out, warm):
    """Loss curves of the seed-0 main arms; update spectra of full, lora_ws, relora (seed 0) against the warm start."""
    runs = [(a, f"{out}/{a}_s0") for a in MAIN if os.path.exists(f"{out}/{a}_s0/metrics.jsonl")]
    if len(runs) == len(MAIN):  # a partial rerun (e.g. only the quantized arms) keeps the published figure
        sh([R, "plot", *[r for _, r in runs], "--out", f"{out}/loss_curves.svg", "--labels",
            ",".join(LABELS[a].split(" (")[0] for a, _ in runs), "--title",
            "Python corpus, 6 x 256 LLaMA, seed 0, no token seen twice"], quiet=True)
    trio = [f"{out}/{a}_s0" for a in ("full", "lora_ws", "relora")]
    if warm and os.path.exists(warm) and all(os.path.exists(f"{t}/checkpoints/latest") for t in trio) \
            and not os.path.exists(f"{out}/analysis/spectra.json"):
        sh([R, "analyze", *trio, "--against", warm, "--labels", "full-rank,LoRA + warm start,ReLoRA",
            "--out", f"{out}/analysis"], quiet=True)


def planned_bytes(recipe):
    """`relora memory RECIPE --json`'s planned peak bytes per tag on the cpu (equal to a real run's, tested)."""
    plan = json.loads(sh([R, "memory", recipe, "--json"], quiet=True).strip().splitlines()[-1])
    return plan


def stats(values):
    if not values:
        return None
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd, min(values), max(values)


def fmt(s):
    if s is None:
        return "-"
    mean, sd, lo, hi = s
    return f"{mean:.2f} ± {sd:.2f} ({lo:.2f}-{hi:.2f})"


def paired(rs, full, key):
    """The arm's perplexity over full-rank's of the same seed: mean (min-max) over the seeds both have."""
    ratios = [r[key] / full[s][key] for s, r in rs.items() if s in full]
    if not ratios:
        return "-"
    return f"{statistics.mean(ratios):.3f}" + (f" ({min(ratios):.3f}-{max(ratios):.3f})" if len(ratios) > 1 else "")


def write_table(out, N, W, RE, results, eval_sets):
    nonemb = 6 * (4 * 256 * 256 + 3 * 256 * 688)
    full = results.get("full", {})
    full_val = stats([r["val_perplexity"] for r in full.values()])
    full_ood = stats([r["ood_perplexity"] for r in full.values()])
    vt = next((r["val_tokens"] for a in results.values() for r in a.values()), 0)
    ot = next((r["ood_tokens"] for a in results.values() for r in a.values()), 0)
    lines = [
        f"N = {N} steps x 2048 tokens = {N * 2048:,} tokens (never repeated: {N * 2048 / 55026197:.1%} of one epoch), "
        f"warm start at step {W}, restarts every {RE} (ReLoRA: 3 cycles after the warm start), r = 32, alpha = 8, "
        f"lr 2e-3 (full-rank) / 4e-3 (LoRA stages).",
        f"Model 6 x 256 (FFN 688), vocab 8192: {MODEL_PARAMS:,} parameters, {nonemb:,} non-embedding; "
        f"{N * 2048 / nonemb:.2f} tokens per non-embedding parameter (the paper's 130M: on the order of 30).",
        f"Perplexity of the exported model on {vt:,} predicted tokens of val.npy and {ot:,} of ood.npy "
        f"(evenly spaced 256-token windows; the same for every arm). Mean ± std (min-max) over seeds; the ratio to "
        f"full-rank is per seed (same seed's full-rank run: same data order), mean (min-max) over seeds.",
        "",
        "| arm | seeds | val ppl | val ratio to full | ood ppl | ood ratio to full | paper 130M ppl (ratio) | trained params | tokens/s (median) | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in LABELS.items():
        rs = results.get(key)
        if not rs:
            continue
        v = stats([r["val_perplexity"] for r in rs.values()])
        o = stats([r["ood_perplexity"] for r in rs.values()])
        rv, ro = paired(rs, full, "val_perplexity"), paired(rs, full, "ood_perplexity")
        paper = f"{PAPER[key]:.2f} ({PAPER[key] / PAPER['full']:.3f})" if key in PAPER else "-"
        tp = statistics.mean([r["trained_parameters"] for r in rs.values()])
        tps = statistics.mean([r["tokens_per_second"] for r in rs.values()])
        ts = statistics.mean([r["train_seconds"] for r in rs.values()])
        lines.append(f"| {label} | {','.join(sorted(rs))} | {fmt(v)} | {rv} | {fmt(o)} | {ro} | {paper} | {tp:,.0f} | {tps:.0f} | {ts:.0f} |")
    lines += quant_table(results)
    open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)


def quant_table(results):
    """The quantization table: each quantized arm against dense ReLoRA of the same seed (empty without quantized arms)."""
    dense = results.get("relora", {})
    present = sorted((k for k in results if quant_key(k)), key=lambda k: (k.endswith(ADAM8), list(QUANT_LABELS).index(k.removesuffix(ADAM8)) if k.removesuffix(ADAM8) in QUANT_LABELS else -1))
    if not present:
        return []
    mean = lambda xs: statistics.mean(xs) if xs else None
    mib = lambda b: f"{b / 2**20:.1f} MiB" if b else "-"
    lines = [
        "", "Quantized frozen weights: ReLoRA above with its seven block linears stored as q8_0, q4_0 or nf4, "
        "restarts merged by `merge_policy`; everything else identical (seed, data order, warm start). The ratio is to "
        "dense ReLoRA's perplexity of the same seed, mean (min-max) over seeds. Lost: the share of each merged update's "
        "norm the requantization lost (`merge_error`), mean over the restarts that merged an update; codes changed: "
        "the share of weights whose code changed at those merges. Frozen weights: planned bytes of the block linears' "
        "storage (tag `frozen_weights`; dense: f32); optimizer states: planned bytes of Adam's moments (tag `optimizer`, "
        "f32 or 8-bit); peak: the measured peak of the run (CPU, all tags).",
        "",
        "| format | merge policy | Adam moments | seeds | val ppl | val ratio to dense ReLoRA | ood ratio to dense ReLoRA | update lost per merge | codes changed | residual recovered | frozen weights | optimizer states | peak memory | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def row(fmt, policy, adam8, rs):
        v = stats([r["val_perplexity"] for r in rs.values()])
        rv, ro = paired(rs, dense, "val_perplexity"), paired(rs, dense, "ood_perplexity")
        lost = mean([e for r in rs.values() for e in r.get("merge_error", []) if e is not None])
        changed = mean([c for r in rs.values() for c in r.get("codes_changed", []) if c is not None])
        recovered = mean([c for r in rs.values() for c in r.get("residual_recovered", [])])
        planned = next((r["planned_bytes"]["peak_bytes_by_tag"] for r in rs.values() if r.get("planned_bytes")), {})
        frozen, states = planned.get("frozen_weights"), planned.get("optimizer")
        peak = mean([r["peak_memory_bytes"] for r in rs.values() if r.get("peak_memory_bytes")])
        ts = statistics.mean([r["train_seconds"] for r in rs.values()])
        f3 = lambda x: "-" if x is None else f"{x:.3f}"
        return (f"| {fmt} | {policy} | {'int8' if adam8 else 'f32'} | {','.join(sorted(rs))} | {fmt_ppl(v)} | {rv} | {ro} | "
                f"{f3(lost)} | {f3(changed)} | {f3(recovered)} | {mib(frozen)} | {mib(states)} | {mib(peak)} | {ts:.0f} |")
    if dense:
        lines.append(row("dense f32", "exact", False, dense))
    for key in present:
        lines.append(row(*quant_key(key), results[key]))
    return lines


def fmt_ppl(s):
    return "-" if s is None else f"{s[0]:.2f}" + (f" ± {s[1]:.2f}" if s[1] else "")


MODEL_PARAMS = 8940800

if __name__ == "__main__":
    main()
