#!/usr/bin/env python3
r"""PyTorch peer benchmark for relora's training step (CPU, eager mode).

Builds transformers.LlamaForCausalLM from the same Hugging Face config JSON that relora reads, in float32,
and times one training step: zero_grad, forward with labels (random tokens, HF's shifted-label loss),
backward, grad-norm clip to 1.0, AdamW step. Two modes:

  full  AdamW over every parameter.
  lora  the seven linears of every block (q/k/v/o, gate/up/down) become y = x W^T + s (x A^T) B^T with W
        frozen, A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)), B [out, r] = 0, s = alpha / r. Embeddings, LM head
        and RMSNorm gains stay trainable. AdamW over the trainable parameters only.

Example:
  /work/venv-torch/bin/python Benchmarks/pytorch/relora_step.py \
      --config Configs/models/llama_20m.json --mode lora --threads 2 --json /tmp/pt.json
"""

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = x W^T + s * (x A^T) B^T, W frozen; A Kaiming-uniform U(-1/sqrt(in), 1/sqrt(in)), B zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LLaMA linears have no bias; LoRALinear does not handle one")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=base.weight.dtype).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x):
        return nn.functional.linear(x, self.weight) + self.scale * nn.functional.linear(
            nn.functional.linear(x, self.lora_A), self.lora_B)


def wrap_lora(model, rank, alpha):
    wrapped = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                child = getattr(parent, name, None)
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
                    wrapped += 1
    expected = 7 * len(model.model.layers)
    if wrapped != expected:
        raise RuntimeError(f"wrapped {wrapped} linears, expected {expected}")
    return wrapped


def model_flops_per_step(cfg, seq_len, tokens):
    """6 * (matmul weights: 7 block linears per layer + LM head) * tokens
    + 12 * layers * seq_len * (heads * head_dim) * tokens  (relora's benchmark convention)."""
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    q_width = heads * head_dim
    kv_width = kv_heads * head_dim
    layers = cfg.num_hidden_layers
    linear = layers * (2 * h * q_width + 2 * h * kv_width + 3 * h * cfg.intermediate_size) + cfg.vocab_size * h
    return 6.0 * linear * tokens + 12.0 * layers * seq_len * q_width * tokens


def peak_rss_bytes():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB, macOS bytes


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="Hugging Face LLaMA config JSON")
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps, after 1 warm-up step")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpointing", choices=("none", "block"), default="none")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="OUT", help="write the results to this JSON file")
    p.add_argument("--compare", metavar="RELORA_JSON", help="JSON written by relora's benchmark")
    return p.parse_args()


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    rss_before_model = peak_rss_bytes()  # libraries alone (torch + transformers)
    cfg = LlamaConfig.from_json_file(a.config)
    cfg.use_cache = False
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=a.attn, dtype=torch.float32)
    model = model.to(dtype=torch.float32)
    total_params = sum(p.numel() for p in model.parameters())
    if a.mode == "lora":
        wrap_lora(model, a.rank, a.alpha)
    if a.checkpointing == "block":
        # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias) to
        # activation_checkpointing_enable; same behaviour: checkpoint every decoder layer.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise RuntimeError("gradient checkpointing did not engage")
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    tokens = a.batch * a.seq_len
    gen = torch.Generator().manual_seed(a.seed)
    input_ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len), generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    step()  # warm-up: allocates optimizer state, faults in pages
    times, cpu_times, losses = [], [], []
    for _ in range(a.steps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)

    median = statistics.median(times)
    tps = tokens / median
    flops = model_flops_per_step(cfg, a.seq_len, tokens)
    rss = peak_rss_bytes()
    cpu_median = statistics.median(cpu_times)

    print(f"config {a.config}  mode {a.mode}  attn {a.attn}  {a.batch} x {a.seq_len} tokens  "
          f"checkpointing {a.checkpointing}  threads {a.threads}")
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  "
          f"python {platform.python_version()}  cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"parameters: {total_params:,} total, {trainable:,} trainable"
          + (f" (LoRA r={a.rank}, alpha={a.alpha:g})" if a.mode == "lora" else ""))
    print(f"step: {median:.3f} s/step (median of {a.steps}; min {min(times):.3f}, max {max(times):.3f}), "
          f"{tps:.0f} tokens/s (best step {tokens / min(times):.0f})")
    print(f"full-model FLOPs/step (reference convention): {flops / 1e9:.2f} GFLOP "
          f"= {flops / median / 1e9:.1f} GFLOP/s at this step time")
    print(f"cpu time: {cpu_median:.3f} s/step (median) = {cpu_median / median:.2f} busy cores of {a.threads} "
          f"(well below {a.threads} means the machine is contended)")
    print(f"peak RSS: {rss / 2**20:.1f} MiB ({rss_before_model / 2**20:.1f} MiB after imports, before the model; "
          f"+{(rss - rss_before_model) / 2**20:.1f} MiB)")
    print(f"loss: first timed {losses[0]:.4f}, last {losses[-1]:.4f}")

    result = {
        "framework": "pytorch", "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "config": a.config, "mode": a.mode, "attn": a.attn, "batch": a.batch, "seq_len": a.seq_len,
        "checkpointing": a.checkpointing, "threads": a.threads, "steps": a.steps,
        "rank": a.rank if a.mode == "lora" else None, "alpha": a.alpha if a.mode == "lora" else None,
        "step_seconds": median, "step_seconds_min": min(times), "step_seconds_all": times,
        "tokens_per_second": tps, "best_tokens_per_second": tokens / min(times),
        "cpu_seconds_per_step": cpu_median, "peak_rss_bytes": rss, "rss_before_model_bytes": rss_before_model, "total_params": total_params, "trainable_params": trainable,
        "model_flops_per_step": flops, "model_gflops": flops / median / 1e9,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)

    if a.compare:
        with open(a.compare) as f:
            ref = json.load(f)
        ref_mode = ref.get("mode")
        if ref_mode is None:
            print(f"note: {a.compare} has no 'mode' key; assuming 'full'")
            ref_mode = "full"
        if ref_mode != a.mode:
            print(f"compare: relora JSON is mode '{ref_mode}', this run is '{a.mode}'; no ratio printed")
        else:
            # Prefer the whole training step (what this script times); fall back to forward+backward only.
            key = "train_tokens_per_second" if "train_tokens_per_second" in ref else "tokens_per_second"
            if key not in ref:
                print(f"compare: {a.compare} has neither train_tokens_per_second nor tokens_per_second")
            else:
                print(f"relora / pytorch tokens/s ratio: {ref[key] / tps:.3f}  "
                      f"(relora {key} {ref[key]:.0f} vs pytorch {tps:.0f})")


if __name__ == "__main__":
    main()
