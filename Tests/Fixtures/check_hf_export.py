#!/usr/bin/env python3
"""Checks that a `relora export --format hf` directory loads in Hugging Face transformers and computes
the same thing as relora. Run by hand (needs torch + transformers; not run by CI):

    python Tests/Fixtures/check_hf_export.py runs/shakespeare-demo/hf data/shakespeare/val.npy \
        --seq-len 128 --windows 64 --relora .build/release/relora

It (1) loads the model with LlamaForCausalLM.from_pretrained and the tokenizer with
AutoTokenizer.from_pretrained, (2) computes the mean of LlamaForCausalLM(input_ids=w, labels=w).loss over
the first N windows of the token file, (3) runs `relora eval` on a .npy holding exactly those windows and
compares the two losses, and (4) checks that the HF tokenizer round-trips a sample of text.
"""
import argparse, json, os, subprocess, sys, tempfile

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM


def compare_losses(model, relora_model, tokens, seq_len, windows, relora):
    """Mean transformers loss of `model` over the first `windows` windows of `seq_len` tokens of the token
    file, and `relora eval --model relora_model` on a .npy of exactly those windows: (n, hf, relora).
    Shared by check_gguf_export.py."""
    ids = np.load(tokens)
    n = min(windows, len(ids) // seq_len)
    sub = ids[: n * seq_len].astype(np.int64)
    losses = []
    with torch.no_grad():
        for w in range(n):
            x = torch.from_numpy(sub[w * seq_len:(w + 1) * seq_len]).unsqueeze(0)
            losses.append(model(input_ids=x, labels=x).loss.double().item())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "windows.npy")
        np.save(path, sub.astype(ids.dtype))
        out = subprocess.run([relora, "eval", "--model", relora_model, "--data", path, "--seq-len", str(seq_len),
                              "--json"], check=True, capture_output=True, text=True)
    return n, float(np.mean(losses)), json.loads(out.stdout)["loss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("tokens")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--relora", default=".build/release/relora")
    args = ap.parse_args()

    model = LlamaForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    n, hf_loss, relora_loss = compare_losses(model, args.model_dir, args.tokens, args.seq_len, args.windows, args.relora)
    diff = abs(relora_loss - hf_loss)
    print(f"transformers loss {hf_loss:.6f}  relora loss {relora_loss:.6f}  |diff| {diff:.2e}  ({n} windows of {args.seq_len})")

    text = "ROMEO.\nBut soft, what light through yonder window breaks?\n  It is the east — and Juliet is the sun! 🌞"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    print(f"tokenizer: {len(enc)} ids, round trip {'ok' if tok.decode(enc) == text else 'MISMATCH'}")
    ok = diff < 1e-4 and tok.decode(enc) == text
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
