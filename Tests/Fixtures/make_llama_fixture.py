#!/usr/bin/env python3
"""Golden fixtures for relora's LLaMA model tests, made with Hugging Face transformers.

Run by hand (not by CI), from the repository root:

    /path/to/venv/bin/python Tests/Fixtures/make_llama_fixture.py

Made with: Python 3, torch 2.15.0 (CPU), transformers 5.24.0, safetensors 0.8.0, numpy 2.4.6.
The script is deterministic (fixed seeds, CPU, float32); re-running it with the same versions
rewrites byte-identical tensors. Everything is written next to this script:

  tiny_llama/{config.json,model.safetensors}          random LlamaForCausalLM, untied head (seed 1234)
  tiny_llama_tied/{config.json,model.safetensors}     same recipe, tie_word_embeddings=true (seed 5678)
  tiny_llama_golden.safetensors                       input_ids, labels, logits, loss, grad.<param> for tiny_llama
  tiny_llama_tied_golden.safetensors                  the same for tiny_llama_tied
  eval_tokens.npy                                     1-D uint16, 203 random ids in [0, 97) (seed 4242)
  eval_expected.json                                  windowed eval loss / perplexity of tiny_llama on eval_tokens

Model: hidden 48, 3 heads (head_dim 16), 1 KV head (GQA), FFN 80, vocab 97, 2 layers, rms_norm_eps 1e-6,
rope_theta 10000, max_position_embeddings 64, eager attention, float32. Weights are re-initialised so the
test has signal: every Linear and the embedding ~ N(0, 0.15^2); every RMSNorm weight = 1 + 0.1*N(0,1).

Loss convention (HF): labels == input_ids; the model shifts internally (position t predicts t+1) and averages
cross-entropy over the B*(T-1) predicted tokens.
"""
import json
import math
import os

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
INIT_STD = 0.15
NORM_JITTER = 0.1

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


def make_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=48,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=80,
        vocab_size=97,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        dtype=torch.float32,
        attn_implementation="eager",
    )


def make_model(tied: bool, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = make_config(tied)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() lists a tied weight once (as model.embed_tokens.weight).
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + NORM_JITTER * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()  # no dropout anyway; eval() only for clarity
    return model


def golden(model: LlamaForCausalLM, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 97, (2, 11), generator=gen, dtype=torch.int64)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    tensors = {
        "input_ids": input_ids.contiguous(),
        "labels": input_ids.clone().contiguous(),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(1).contiguous(),
    }
    # Independent check of the loss convention: shift, then mean CE over B*(T-1) tokens.
    lg = out.logits.detach().double()[:, :-1, :].reshape(-1, 97)
    tg = input_ids[:, 1:].reshape(-1)
    ref = torch.nn.functional.cross_entropy(lg, tg).item()
    assert abs(ref - out.loss.item()) < 1e-5, (ref, out.loss.item())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        tensors["grad." + name] = p.grad.detach().float().contiguous()
    return tensors


def save_model(model: LlamaForCausalLM, subdir: str) -> None:
    path = os.path.join(HERE, subdir)
    os.makedirs(path, exist_ok=True)
    for f in os.listdir(path):
        os.remove(os.path.join(path, f))
    model.save_pretrained(path, safe_serialization=True, max_shard_size="1GB")
    files = sorted(os.listdir(path))
    # generation_config.json is not part of the fixture; keep only config + weights.
    for f in files:
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(path, f))
    assert os.path.exists(os.path.join(path, "model.safetensors")), files


def reload_check(model: LlamaForCausalLM, subdir: str, ids: torch.Tensor) -> None:
    m2 = LlamaForCausalLM.from_pretrained(os.path.join(HERE, subdir), attn_implementation="eager")
    m2.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = m2(input_ids=ids).logits
    assert torch.equal(a, b), f"{subdir}: reload mismatch {(a - b).abs().max().item()}"


def eval_case(model: LlamaForCausalLM, tokens: np.ndarray, seq_len: int) -> dict:
    n = len(tokens) // seq_len
    losses = []
    with torch.no_grad():
        for w in range(n):
            win = torch.from_numpy(tokens[w * seq_len:(w + 1) * seq_len].astype(np.int64))[None, :]
            losses.append(float(model(input_ids=win, labels=win).loss.item()))
    mean = float(np.mean(np.array(losses, dtype=np.float64)))
    return {
        "seq_len": seq_len,
        "windows": n,
        "loss": mean,
        "perplexity": math.exp(mean),
        "tokens": n * (seq_len - 1),
        "window_losses": losses,
    }


def main() -> None:
    summary = {}
    models = {}
    for subdir, tied, seed, golden_name in [
        ("tiny_llama", False, 1234, "tiny_llama_golden.safetensors"),
        ("tiny_llama_tied", True, 5678, "tiny_llama_tied_golden.safetensors"),
    ]:
        model = make_model(tied, seed)
        models[subdir] = model
        save_model(model, subdir)
        g = golden(model, seed + 1)
        # A single metadata key only: safetensors writes a multi-key metadata map in hash order,
        # which would make the file bytes differ between runs. Versions are recorded in README.md.
        save_file(g, os.path.join(HERE, golden_name),
                  metadata={"generator": f"make_llama_fixture.py torch {torch.__version__} "
                                         f"transformers {transformers.__version__} model {subdir}"})
        reload_check(model, subdir, g["input_ids"])
        nparams = sum(p.numel() for p in model.parameters())
        summary[subdir] = {"loss": g["loss"].item(), "params": nparams, "tensors": len(g)}
        print(f"{subdir}: params={nparams} loss={g['loss'].item():.9f} "
              f"logits[0,0,:3]={g['logits'][0, 0, :3].tolist()} golden tensors={len(g)}")

    rng = np.random.default_rng(4242)
    tokens = rng.integers(0, 97, size=203).astype(np.uint16)
    np.save(os.path.join(HERE, "eval_tokens.npy"), tokens)
    model = models["tiny_llama"]
    expected = eval_case(model, tokens, 16)
    expected["model"] = "tiny_llama"
    expected["tokens_file"] = "eval_tokens.npy"
    expected["note"] = ("consecutive non-overlapping windows of exactly seq_len tokens, remainder dropped; "
                        "loss = mean over windows of HF loss(input_ids=window, labels=window) (float32 model, "
                        "float64 average); tokens = windows*(seq_len-1); perplexity = exp(loss)")
    expected["seq_len_7"] = eval_case(model, tokens, 7)
    with open(os.path.join(HERE, "eval_expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")
    print(f"eval seq_len 16: windows={expected['windows']} loss={expected['loss']:.9f} "
          f"ppl={expected['perplexity']:.6f} tokens={expected['tokens']}")
    s7 = expected["seq_len_7"]
    print(f"eval seq_len 7:  windows={s7['windows']} loss={s7['loss']:.9f} "
          f"ppl={s7['perplexity']:.6f} tokens={s7['tokens']}")

    total = 0
    for root, _, files in os.walk(HERE):
        for f in sorted(files):
            if f.endswith(".py") or f.endswith(".md") or "__pycache__" in root:
                continue
            p = os.path.join(root, f)
            os.chmod(p, 0o644)  # safetensors writes 0600; make the checked-in files world-readable
            size = os.path.getsize(p)
            total += size
            print(f"  {os.path.relpath(p, HERE):45s} {size:9d} bytes")
    print(f"  total fixture data: {total} bytes ({total / 1024:.1f} KiB)")
    assert total < 1_000_000


if __name__ == "__main__":
    main()
