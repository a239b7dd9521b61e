#!/usr/bin/env python3
"""Writes a small random LLaMA as a Hugging Face model directory, to try continuing a Hugging Face
model with ReLoRA without downloading one.

    python3 -m venv .venv && .venv/bin/pip install numpy safetensors tokenizers
    .venv/bin/python scripts/make_hf_model.py --text my_text.txt --out data/hf_model

The directory holds what `LlamaForCausalLM.save_pretrained` and a tokenizer's `save_pretrained` write:
config.json (a LlamaConfig), model.safetensors (float32, Hugging Face tensor names, metadata
{"format": "pt"}) and tokenizer.json (a byte-level BPE trained on --text with the Hugging Face
`tokenizers` library, GPT-2 pre-tokenization, "<|endoftext|>" as its special token). The weights are
random (normal, std 0.02; norms 1): a stand-in for a real checkpoint, made without torch.

A real model takes the place of this directory when it is a LlamaForCausalLM in safetensors (single or
sharded) with a byte-level BPE tokenizer.json (GPT-2 or LLaMA-3 pre-tokenization).
"""
import argparse
import json
import os
import sys

try:
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import ByteLevelBPETokenizer
except ImportError as e:
    sys.exit(f"make_hf_model: {e.name} is missing: pip install numpy safetensors tokenizers (in a venv: python3 -m venv .venv)")

SPECIAL = "<|endoftext|>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", nargs="+", required=True, help="UTF-8 text file(s) to train the tokenizer on")
    ap.add_argument("--out", default="data/hf_model", help="the directory to write (default data/hf_model)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--max-positions", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.hidden % a.heads or a.heads % a.kv_heads:
        sys.exit("make_hf_model: --hidden must be a multiple of --heads, and --heads of --kv-heads")
    os.makedirs(a.out, exist_ok=True)

    tok = ByteLevelBPETokenizer()
    tok.train(a.text, vocab_size=a.vocab_size, min_frequency=2, special_tokens=[SPECIAL], show_progress=False)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eot = tok.token_to_id(SPECIAL)

    head_dim = a.hidden // a.heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": a.hidden,
        "intermediate_size": a.ffn,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": a.max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL, "eos_token": SPECIAL,
                   "unk_token": SPECIAL, "model_max_length": a.max_positions}, f, indent=2)
        f.write("\n")

    rng = np.random.default_rng(a.seed)

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    kv = a.kv_heads * head_dim
    t = {"model.embed_tokens.weight": normal(vocab, a.hidden)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(a.hidden, np.float32)
        t[p + "self_attn.q_proj.weight"] = normal(a.hidden, a.hidden)
        t[p + "self_attn.k_proj.weight"] = normal(kv, a.hidden)
        t[p + "self_attn.v_proj.weight"] = normal(kv, a.hidden)
        t[p + "self_attn.o_proj.weight"] = normal(a.hidden, a.hidden)
        t[p + "post_attention_layernorm.weight"] = np.ones(a.hidden, np.float32)
        t[p + "mlp.gate_proj.weight"] = normal(a.ffn, a.hidden)
        t[p + "mlp.up_proj.weight"] = normal(a.ffn, a.hidden)
        t[p + "mlp.down_proj.weight"] = normal(a.hidden, a.ffn)
    t["model.norm.weight"] = np.ones(a.hidden, np.float32)
    t["lm_head.weight"] = normal(vocab, a.hidden)
    save_file(t, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    params = sum(x.size for x in t.values())
    print(f"make_hf_model: wrote {a.out}: LLaMA {a.layers} x {a.hidden} (FFN {a.ffn}, {a.heads} heads, "
          f"{a.kv_heads} KV heads), vocab {vocab}, {params:,} parameters")


if __name__ == "__main__":
    main()
