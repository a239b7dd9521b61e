#!/usr/bin/env python3
"""Independent ReLoRA reference: 12 training steps of the tiny fixture model in PyTorch + transformers.

Run by hand (not by CI), from the repository root, after make_llama_fixture.py has made tiny_llama/:

    /path/to/venv/bin/python Tests/Fixtures/make_relora_fixture.py      # ~10 s on CPU

Made with: Python 3.11, torch 2.15.0 (CPU), transformers 5.24.0, safetensors 0.8.0.
Deterministic (fixed seeds, CPU, float32, one thread): re-running with these versions rewrites
byte-identical files. Writes next to this script:

  relora_reference.safetensors   data, initial A of every cycle, per-step loss / lr / grad norm,
                                 reset counts and the final merged weights (names below)
  relora_reference.json          the hyperparameters, and how far a float64 run and two ablations move
                                 the results (see "Conditioning")

Everything here is written from ReLoRA's description (the ReLoRA paper's recipe, Lialin et al. 2023; README "LoRA and
ReLoRA"), not from relora's Swift code. Where the description leaves a convention open, the convention
chosen is relora's (read from its sources only for that) and is stated here as the spec:

Model. transformers LlamaForCausalLM loaded from tiny_llama/ (hidden 48, 3 heads / 1 KV head, FFN 80,
vocab 97, 2 layers), float32, eager attention.

LoRA (recipe step 2). Each of the 7 block linears (q, k, v, o, gate, up, down) of every layer becomes
    y = x W^T + s * (x A^T) B^T,   s = alpha / r = 8 / 4 = 2,   A [r, in], B [out, r],
W frozen (no gradient, no optimizer state), no dropout, s a constant. Embeddings, the final norm, the
per-layer RMSNorm gains and the LM head stay trainable. A of every cycle is drawn by this script
(A ~ U(-1/sqrt(in), 1/sqrt(in)), torch generator, seed 20240) and saved; B = 0 at the start of a cycle.

Data. One batch per step, [2, 16] inputs and [2, 16] targets, cut from 17-token windows
(inputs = window[:-1], targets = window[1:]) of a seeded Markov chain over the 97 ids (every id has 3
preferred successors, p = 0.9; otherwise uniform), so that training has something to learn.
loss = mean cross-entropy over the 2 * 16 target tokens. This equals the HF convention
model(input_ids=window, labels=window).loss, which the script checks.

Step t (0-based, t = 0 .. 11), in this order:
  1. loss and gradients of the batch of step t (all grads zeroed first);
  2. grad_norm = sqrt(sum of squares of every trainable gradient), accumulated in float64;
  3. clipping: if grad_norm > 3.6, every gradient *= 3.6 / grad_norm (no epsilon; otherwise untouched).
     The norms are 3.4..4.7, so 7 of the 12 steps clip and 5 don't; none is within 2% of 3.6;
  4. lr_t = 3e-3 * mult(t), and one torch.optim.AdamW step: betas (0.9, 0.999), eps 1e-4 (see
     "Conditioning" below for why not 1e-8), weight decay 0.01 on 2-D parameters (embedding, LM head,
     every A and B) and 0 on the 1-D RMSNorm gains; decoupled decay p *= 1 - lr*wd, bias corrections
     with the 1-based update count;
  5. restart (recipe steps 3-4) if t >= R and t % R == 0, R = 4, i.e. right after t = 4 and t = 8, the
     steps whose lr the jagged schedule makes 0:
       merge   W += s * (B @ A) for every adapted linear (float32);
       re-init A = the saved A of the next cycle, B = 0;
       reset   for every A and B, Adam's exp_avg and exp_avg_sq are pruned separately: with n entries
               and k = ceil(0.9 * n), every entry whose |x| <= the k-th smallest |x| is set to 0 (ties at
               the threshold are pruned too). Dense parameters' moments are untouched and the step
               counter is kept.
After step 11 the last cycle is merged once more (W += s B A): that is the "final merged" model.

Jagged schedule (recipe step 5). N = 12 steps, W0 = 2 warmup, R = 4, w = 2 restart warmup, m = 0.1:
    cos_curve(x) = m + (1 - m) * 0.5 * (1 + cos(pi * clamp((x - W0) / (N - W0), 0, 1)))
    t < W0:                 mult = t / W0                                (so step 0 has lr 0)
    t >= R and t % R < w:   mult = (t % R) / w * cos_curve((t // R) * R + w)   (0 at t = 4, 8)
    otherwise:              mult = cos_curve(t)
t is the 0-based index of the step about to be taken (as with torch's LambdaLR, whose first step uses
lambda(0)); the reference code restarts when the 1-based update count u satisfies u % R == 1 after the
update, i.e. after the 0-based step R, whose lambda is 0: the same timing as above.

Open conventions and how they were resolved (relora's choice, recorded here):
  * the reset threshold: the paper says "magnitude below the p-quantile". The reference code prunes
    |x| <= torch.quantile(|x|, p) (linear interpolation, which prunes floor(p*(n-1)) + 1 entries);
    relora and this fixture prune the k = ceil(p * n) smallest (one entry more for most sizes here).
    The script also trains with the quantile rule: that changes a loss by 7e-3 and a merged weight by
    8% of its tensor's largest entry, so the test does pin relora's rule.
  * the ramp target after a restart is cos_curve(k*R + w) as in the paper (one version of the reference
    code uses the cosine at progress k*R / (N - W0) instead);
  * clipping without torch's +1e-6 in the denominator, and only when the norm exceeds the maximum.

Conditioning (why eps is 1e-4). The script trains the same run in float64 and requires every reported
number to move by < 1e-5 (it moves by ~1e-6; the JSON records it): the Swift test's tolerances come from
that. With Adam's usual eps 1e-8 this fails by four orders of magnitude, because of a property of the
method as specified (and as the reference code does it): m and v are pruned separately, so some entries
(here ~4.5% of the LoRA entries) keep m but lose v, and at the first step after a restart B = 0 makes
A's gradient exactly 0, so such an entry of A keeps v = 0 and moves by lr * m_hat / eps. With eps 1e-8
that is up to 110 (a normal step moves A by ~2e-3), the grad norm then jumps from 3.5 to 534, and float32
rounding is amplified ~1e5-fold (float32 and float64 runs differ by 0.13 in a loss and by 97% in a merged
weight). eps 1e-4 keeps that first step at 0.011. The script also checks that the float32 and float64 runs prune exactly the same
entries (the smallest relative gap between the k-th and (k+1)-th |x| is 3e-5, against ~1e-6 noise).

Tensors in relora_reference.safetensors (F32 unless noted):
  inputs, targets                     I32 [12, 2, 16]
  loss, lr, grad_norm                 F64 [12]   (loss and grad_norm before clipping; lr as used)
  reset_zeroed_m, reset_zeroed_v      I64 [2]    entries zeroed over all A and B at each restart
  cycle{c}.model.layers.{l}.{path}.lora_A   [r, in], c = 0, 1, 2 (path as in HF: self_attn.q_proj, ...)
  final.<HF name>                     every parameter of the final merged model (block linears merged)
"""
import json
import math
import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "relora_reference.safetensors")
OUT_JSON = os.path.join(HERE, "relora_reference.json")

HP = {
    "model": "tiny_llama",
    "lora_r": 4,
    "lora_alpha": 8.0,
    "steps": 12,
    "warmup_steps": 2,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "relora_every": 4,
    "restart_warmup": 2,
    "optimizer_reset": "magnitude",
    "optimizer_reset_ratio": 0.9,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_eps": 1e-4,
    "weight_decay": 0.01,
    "grad_clip": 3.6,
    "micro_batch": 2,
    "seq_len": 16,
    "data_seed": 31337,
    "a_seed": 20240,
}
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()


class LoRALinear(torch.nn.Module):
    """y = x W^T + s * (x A^T) B^T with W frozen."""

    def __init__(self, base: torch.nn.Linear, rank: int, scale: float):
        super().__init__()
        assert base.bias is None
        self.weight = base.weight
        self.weight.requires_grad_(False)
        out_f, in_f = self.weight.shape
        self.lora_A = torch.nn.Parameter(torch.zeros(rank, in_f, dtype=self.weight.dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_f, rank, dtype=self.weight.dtype))
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self):
        self.weight.add_(self.scale * (self.lora_B @ self.lora_A))


def lr_multiplier(t: int) -> float:
    n, w0, r, w, m = HP["steps"], HP["warmup_steps"], HP["relora_every"], HP["restart_warmup"], HP["min_lr_ratio"]

    def cos_curve(x):
        progress = min(1.0, max(0.0, (x - w0) / (n - w0)))
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))

    if t < w0:
        return t / w0
    if t >= r and t % r < w:
        return (t % r) / w * cos_curve((t // r) * r + w)
    return cos_curve(t)


def make_data():
    """[steps, batch, seq_len + 1] windows of a seeded Markov chain over the vocabulary."""
    g = torch.Generator().manual_seed(HP["data_seed"])
    vocab, steps, batch, length = 97, HP["steps"], HP["micro_batch"], HP["seq_len"] + 1
    successors = torch.randint(0, vocab, (vocab, 3), generator=g)
    windows = torch.empty(steps, batch, length, dtype=torch.int64)
    for s in range(steps):
        for b in range(batch):
            tok = int(torch.randint(0, vocab, (1,), generator=g))
            for i in range(length):
                windows[s, b, i] = tok
                if float(torch.rand(1, generator=g)) < 0.9:
                    tok = int(successors[tok, int(torch.randint(0, 3, (1,), generator=g))])
                else:
                    tok = int(torch.randint(0, vocab, (1,), generator=g))
    return windows


def make_initial_a(model_config):
    """A of every cycle: U(-1/sqrt(in), 1/sqrt(in)), keyed 'cycle{c}.model.layers.{l}.{kind}.lora_A'."""
    g = torch.Generator().manual_seed(HP["a_seed"])
    hidden, ffn, r = model_config.hidden_size, model_config.intermediate_size, HP["lora_r"]
    heads, head_dim = model_config.num_attention_heads, model_config.head_dim
    cycles = HP["steps"] // HP["relora_every"]
    out = {}
    for c in range(cycles):
        for layer in range(model_config.num_hidden_layers):
            for kind in KINDS:
                fan_in = {"mlp.down_proj": ffn, "self_attn.o_proj": heads * head_dim}.get(kind, hidden)
                bound = 1.0 / math.sqrt(fan_in)
                out[f"cycle{c}.model.layers.{layer}.{kind}.lora_A"] = (torch.rand(r, fan_in, generator=g) * 2 - 1) * bound
    return out


def magnitude_prune_(x: torch.Tensor, ratio: float, rule: str) -> torch.Tensor:
    """Zero the entries with |x| <= threshold in place; returns the mask of the zeroed entries."""
    mag = x.abs().flatten()
    n = mag.numel()
    if rule == "kth":  # relora / this fixture: k = ceil(ratio * n), ties pruned
        k = math.ceil(ratio * n)
        threshold = torch.kthvalue(mag, k).values
    else:  # the reference code's torch.quantile rule (sensitivity check only)
        threshold = torch.quantile(mag, ratio)
    mask = x.abs() <= threshold
    x.masked_fill_(mask, 0.0)
    return mask


def kth_gap(x: torch.Tensor, ratio: float) -> float:
    """Relative gap between the k-th and (k+1)-th smallest |x| (a near-tie could flip between implementations)."""
    mag, _ = x.abs().flatten().double().sort()
    k = math.ceil(ratio * mag.numel())
    return float((mag[k] - mag[k - 1]) / mag[k].clamp_min(1e-30))


def wrap(model):
    scale = HP["lora_alpha"] / HP["lora_r"]
    adapters = {}
    for layer, block in enumerate(model.model.layers):
        for kind in KINDS:
            parent_name, attr = kind.split(".")
            parent = getattr(block, parent_name)
            ad = LoRALinear(getattr(parent, attr), HP["lora_r"], scale)
            setattr(parent, attr, ad)
            adapters[f"model.layers.{layer}.{kind}"] = ad
    return adapters


def train(windows, initial_a, reset=True, rule="kth", dtype=torch.float32, verbose=False):
    model = LlamaForCausalLM.from_pretrained(os.path.join(HERE, HP["model"]), attn_implementation="eager",
                                             dtype=torch.float32).to(dtype)
    model.train()  # no dropout in this config; train() only for clarity
    adapters = wrap(model)

    def load_cycle(c):
        with torch.no_grad():
            for name, ad in adapters.items():
                ad.lora_A.copy_(initial_a[f"cycle{c}.{name}.lora_A"].to(dtype))
                ad.lora_B.zero_()

    load_cycle(0)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) == 7 * model.config.num_hidden_layers and all(n.endswith(".weight") for n in frozen)
    lora_params = [p for n, p in params if n.endswith("lora_A") or n.endswith("lora_B")]
    opt = torch.optim.AdamW(
        [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": HP["weight_decay"]},
         {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=HP["lr"], betas=(HP["adam_beta1"], HP["adam_beta2"]), eps=HP["adam_eps"], foreach=False)

    losses, lrs, norms, zeroed_m, zeroed_v, gaps, masks = [], [], [], [], [], [], []
    vocab, r_every = model.config.vocab_size, HP["relora_every"]
    for t in range(HP["steps"]):
        inputs, targets = windows[t, :, :-1], windows[t, :, 1:]
        opt.zero_grad(set_to_none=False)
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        loss.backward()
        if verbose:  # the HF convention gives the same loss
            with torch.no_grad():
                hf = model(input_ids=windows[t], labels=windows[t]).loss.item()
            assert abs(hf - loss.item()) < 1e-5, (t, hf, loss.item())
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for _, p in params))
        if norm > HP["grad_clip"]:
            for _, p in params:
                p.grad.mul_(HP["grad_clip"] / norm)
        lr = HP["lr"] * lr_multiplier(t)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        losses.append(loss.item()); lrs.append(lr); norms.append(norm)
        if verbose:
            print(f"step {t:2d} loss {loss.item():.9f} lr {lr:.3e} grad_norm {norm:.6f}"
                  f"{' (clipped)' if norm > HP['grad_clip'] else ''}")
        if t >= r_every and t % r_every == 0:
            for ad in adapters.values():
                ad.merge()
            load_cycle(t // r_every)
            zm = zv = 0
            for p in lora_params:
                st = opt.state[p]
                gaps.append(min(kth_gap(st["exp_avg"], HP["optimizer_reset_ratio"]),
                                kth_gap(st["exp_avg_sq"], HP["optimizer_reset_ratio"])))
                if reset:
                    masks += [magnitude_prune_(st[key], HP["optimizer_reset_ratio"], rule)
                              for key in ("exp_avg", "exp_avg_sq")]
                    zm += int(masks[-2].sum())
                    zv += int(masks[-1].sum())
                assert int(st["step"]) == t + 1  # the step counter is kept
            zeroed_m.append(zm); zeroed_v.append(zv)
            if verbose:
                print(f"  restart {t // r_every} after step {t}: zeroed {zm} of m, {zv} of v")
    for ad in adapters.values():
        ad.merge()
    final = {n: p.detach().clone() for n, p in model.named_parameters()
             if not (n.endswith("lora_A") or n.endswith("lora_B"))}
    return {"loss": losses, "lr": lrs, "grad_norm": norms, "zeroed_m": zeroed_m, "zeroed_v": zeroed_v,
            "final": final, "kth_gap": min(gaps), "masks": masks}


def differences(a: dict, b: dict) -> dict:
    """Largest differences between two runs, in the measures the Swift test uses."""
    return {
        "loss_abs": max(abs(x - y) for x, y in zip(a["loss"], b["loss"])),
        "grad_norm_rel": max(abs(x - y) / y for x, y in zip(a["grad_norm"], b["grad_norm"])),
        "final_weight_rel": max(float((a["final"][n].double() - b["final"][n].double()).abs().max()
                                      / b["final"][n].double().abs().max()) for n in b["final"]),
    }


def main() -> None:
    windows = make_data()
    config = transformers.AutoConfig.from_pretrained(os.path.join(HERE, HP["model"]))
    initial_a = make_initial_a(config)
    ref = train(windows, initial_a, verbose=True)
    start = {n: p.detach() for n, p in
             LlamaForCausalLM.from_pretrained(os.path.join(HERE, HP["model"]), dtype=torch.float32).named_parameters()}

    # Safeguards: no step's norm sits near the clip threshold (some steps clip, some don't), no reset has a
    # near-tie at its threshold, the schedule is 0 where it must be.
    norms = ref["grad_norm"]
    assert min(abs(n - HP["grad_clip"]) for n in norms) > 1e-2 * HP["grad_clip"], norms
    assert any(n > HP["grad_clip"] for n in norms) and any(n < HP["grad_clip"] for n in norms), norms
    assert ref["kth_gap"] > 1e-5, ref["kth_gap"]
    assert lr_multiplier(0) == 0 and lr_multiplier(4) == 0 and lr_multiplier(8) == 0
    moved = min(float((ref["final"][n] - start[n]).abs().max()) for n in ref["final"] if any(k in n for k in KINDS))
    assert moved > 1e-3, moved  # every merged linear moved: the fixture has signal

    # Conditioning: the same run in float64 shows how far float32 rounding alone moves each number. The
    # Swift test's tolerances are derived from it; the ablations below show what a real mistake changes.
    run64 = train(windows, initial_a, dtype=torch.float64)
    fp64 = differences(run64, ref)
    assert all(torch.equal(a, b) for a, b in zip(run64["masks"], ref["masks"]))  # the same entries pruned
    ablations = {label: differences(train(windows, initial_a, **kw), ref) for label, kw in
                 [("no_optimizer_reset", {"reset": False}), ("torch_quantile_reset_rule", {"rule": "quantile"})]}
    print("max differences to this run (|loss|, relative grad norm, final weight / max |weight| of its tensor):")
    for label, d in [("float64 run", fp64)] + list(ablations.items()):
        print(f"  {label:28s} {d['loss_abs']:.2e}  {d['grad_norm_rel']:.2e}  {d['final_weight_rel']:.2e}")
    assert max(fp64.values()) < 1e-5, fp64  # well conditioned: float32 rounding stays at ~1e-6
    for d in ablations.values():
        assert min(d.values()) > 100 * max(fp64.values()), d
    print(f"smallest max |merged update| of a linear: {moved:.3e}; "
          f"smallest relative gap at a reset threshold: {ref['kth_gap']:.3e}")

    tensors = {
        "inputs": windows[:, :, :-1].to(torch.int32).contiguous(),
        "targets": windows[:, :, 1:].to(torch.int32).contiguous(),
        "loss": torch.tensor(ref["loss"], dtype=torch.float64),
        "lr": torch.tensor(ref["lr"], dtype=torch.float64),
        "grad_norm": torch.tensor(ref["grad_norm"], dtype=torch.float64),
        "reset_zeroed_m": torch.tensor(ref["zeroed_m"], dtype=torch.int64),
        "reset_zeroed_v": torch.tensor(ref["zeroed_v"], dtype=torch.int64),
    }
    tensors.update({k: v.contiguous() for k, v in initial_a.items()})
    tensors.update({"final." + n: p.contiguous() for n, p in ref["final"].items()})
    save_file(tensors, OUT, metadata={"generator": f"make_relora_fixture.py torch {torch.__version__} "
                                                   f"transformers {transformers.__version__}"})
    os.chmod(OUT, 0o644)
    with open(OUT_JSON, "w") as f:
        json.dump({**HP, "note": "hyperparameters of relora_reference.safetensors; conventions in "
                                 "make_relora_fixture.py's docstring",
                   "float64_vs_float32": {k: float(f"{v:.3g}") for k, v in fp64.items()},
                   "ablations_vs_reference": {a: {k: float(f"{v:.3g}") for k, v in d.items()}
                                              for a, d in ablations.items()}}, f, indent=2)
        f.write("\n")
    size = os.path.getsize(OUT) + os.path.getsize(OUT_JSON)
    print(f"wrote {len(tensors)} tensors, {size} bytes ({size / 1024:.1f} KiB)")
    assert size < 400_000


if __name__ == "__main__":
    main()
