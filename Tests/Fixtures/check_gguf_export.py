#!/usr/bin/env python3
"""Checks a `relora export --format gguf` file outside relora. Run by hand (not by CI); needs a venv with
`pip install gguf transformers accelerate torch numpy` (and `llama-cpp-python` for --llama-cpp):

    python Tests/Fixtures/check_gguf_export.py model.gguf val.npy --seq-len 64 --windows 32 \
        --relora .build/debug/relora [--tokenizer tokenizer.json] [--llama-cpp]

(`scripts/check_gguf.sh` trains a small model and runs this on its f32, q8_0 and q4_0 exports.)

1. transformers: AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (its GGUF loader dequantizes with
   the gguf package and undoes the q/k rotary permutation) computes the mean of model(input_ids=w,
   labels=w).loss over the first N windows of the token file; `relora eval --model model.gguf --json` runs on
   a .npy of exactly those windows; the two losses must agree to 1e-4 (both dequantize to the same f32
   values, so what is left is f32 summation order).
2. --tokenizer: the GGUF's tokenizer as transformers converts it encodes a sample text to the same ids as
   `relora tokenize` with the run's tokenizer.json.
3. --llama-cpp: llama.cpp (through llama-cpp-python) loads the file, tokenizes the sample like relora, and
   its logits on the first window equal transformers' (max |diff| reported; llama.cpp computes in f32 with
   its own kernels, and for q8_0/q4_0 multiplies with quantized activations, so the bound is loose: its
   mean loss on that window must be within 0.02 nats of transformers').
"""
import argparse, json, os, subprocess, sys, tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from check_hf_export import compare_losses  # same directory

SAMPLE = "ROMEO.\nBut soft, what light through yonder window breaks?\n  It is the east, and Juliet is the sun!  123 4567"


def relora_ids(relora, tokenizer_json, text, tmp):
    src, out = os.path.join(tmp, "sample.txt"), os.path.join(tmp, "sample.npy")
    with open(src, "w", encoding="utf-8") as f:
        f.write(text)
    subprocess.run([relora, "tokenize", "--tokenizer", tokenizer_json, "--in", src, "--out", out],
                   check=True, capture_output=True)
    ids = np.load(out).astype(np.int64).tolist()
    with open(tokenizer_json, encoding="utf-8") as f:
        eot = next((t["id"] for t in json.load(f)["added_tokens"] if t["content"] == "<|endoftext|>"), None)
    return ids[:-1] if eot is not None and ids and ids[-1] == eot else ids  # `relora tokenize` appends <|endoftext|>


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("tokens")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--relora", default=".build/debug/relora")
    ap.add_argument("--tokenizer", help="the run's tokenizer.json, to compare tokenizations")
    ap.add_argument("--llama-cpp", action="store_true", help="also run the file in llama.cpp (llama-cpp-python)")
    args = ap.parse_args()
    ok = True

    path = os.path.abspath(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32, attn_implementation="eager")
    model.eval()
    n, hf_loss, relora_loss = compare_losses(model, path, args.tokens, args.seq_len, args.windows, args.relora)
    sub = np.load(args.tokens)[: args.seq_len].astype(np.int64)  # the first window, for llama.cpp below

    with tempfile.TemporaryDirectory() as tmp:
        diff = abs(relora_loss - hf_loss)
        print(f"{os.path.basename(path)}: transformers loss {hf_loss:.6f}  relora loss {relora_loss:.6f}  "
              f"|diff| {diff:.2e}  ({n} windows of {args.seq_len})")
        ok &= diff < 1e-4

        want = relora_ids(args.relora, args.tokenizer, SAMPLE, tmp) if args.tokenizer else None
        if want is not None:
            try:
                from transformers import AutoTokenizer
                tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
                got = tok(SAMPLE, add_special_tokens=False)["input_ids"]
                print(f"transformers GGUF tokenizer: {'same ids as relora' if got == want else 'DIFFERENT ids from relora'} "
                      f"({len(got)} vs {len(want)} tokens)")
            except Exception as e:  # the converter's support for byte-level BPE under 'llama' varies by version
                print(f"transformers GGUF tokenizer: could not be built ({type(e).__name__}: {e})")

    if args.llama_cpp:
        from llama_cpp import Llama
        llm = Llama(model_path=path, n_ctx=args.seq_len, logits_all=True, verbose=False, n_threads=2)
        if want is not None:
            got = llm.tokenize(SAMPLE.encode("utf-8"), add_bos=False, special=False)
            same = list(got) == want
            print(f"llama.cpp tokenizer: {'same ids as relora' if same else 'DIFFERENT ids from relora'} ({len(got)} vs {len(want)} tokens)")
            ok &= same
        window = sub[: args.seq_len].tolist()
        llm.reset()
        llm.eval(window)
        cpp = np.array(llm.scores[: args.seq_len], dtype=np.float64)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([window])).logits[0].double().numpy()
        def loss(logits):
            z = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            return float(-logp[np.arange(len(window) - 1), window[1:]].mean())
        ldiff = abs(loss(cpp) - loss(ref))
        print(f"llama.cpp logits vs transformers on window 0: max |diff| {np.abs(cpp - ref).max():.2e} "
              f"(logits up to {np.abs(ref).max():.1f}); loss {loss(cpp):.6f} vs {loss(ref):.6f} (|diff| {ldiff:.2e})")
        ok &= ldiff < 0.02

    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
