#!/usr/bin/env python3
"""GGUF fixtures made by llama.cpp itself, for relora's GGUF import and warm-start tests (GGUFImportTests).

Run by hand (not by CI), from the repository root, with llama.cpp's converter from the llama-cpp-python
source distribution (`pip download --no-binary :all: --no-deps llama-cpp-python`, unpacked; the converter
is vendor/llama.cpp/convert_hf_to_gguf.py with its conversion/ and gguf-py/ beside it) and llama-cpp-python
installed (its `llama_model_quantize` is llama.cpp's quantizer, `llama-quantize`):

    python Tests/Fixtures/make_gguf_fixture.py --llama-cpp /path/to/llama_cpp_python-X/vendor/llama.cpp

Made with: torch 2.15.0 (CPU), transformers 5.24.0, sentencepiece, numpy 2.4.6, gguf 0.19.0,
llama-cpp-python 0.3.36 (its vendored llama.cpp converter and quantizer). Deterministic (fixed seeds, one
thread): a re-run with the same versions writes the same files. Everything goes to Tests/Fixtures/gguf/:

  tiny_f16.gguf        model A converted by convert_hf_to_gguf.py --outtype f16
  tiny_q8_0.gguf       model A converted by convert_hf_to_gguf.py --outtype q8_0 (every 2-D tensor q8_0)
  tiny_q4_0.gguf       tiny_f16.gguf quantized by llama_model_quantize, ftype MOSTLY_Q4_0: the linears and the
                       embedding q4_0, output.weight q8_0 (llama.cpp asks for q6_K, whose 256-blocks do not
                       divide a 64-wide row, and falls back to q8_0), norms f32
  tiny_k_q4_K_M.gguf   model B (tied head) quantized by llama_model_quantize, ftype MOSTLY_Q4_K_M: q4_K and
                       q6_K (attn_v, ffn_down and the tied embedding take q6_K), norms f32
  tokens.npy           1-D uint16, 160 random ids in [0, 64) (numpy seed 99): 10 windows of 16
  expected.json        per file: the tensor types, transformers' loss on the original model and on the file
                       (loaded by transformers' own GGUF loader), and the bound's ingredients (below)
  kquant_reference.safetensors
                       random q4_K/q5_K/q6_K blocks (`<type>.blocks` U8 [rows, bytes]) and gguf-py's
                       dequantization of them (`<type>.values` F32 [rows, cols]); the scales are finite fp16,
                       some negative, one subnormal, every other byte random

Models (LlamaForCausalLM, float32, no biases; the tokenizer, a SentencePiece BPE model trained here on a
fixed text, is needed only by the converter; relora's tests use token ids):
  A: hidden 64, 4 heads of 16, 2 KV heads (GQA), FFN 128, 2 layers, vocab 64, untied, rms_norm_eps 1e-5,
     rope_theta 500000, max_position_embeddings 64; every row is a whole number of 32-blocks (q8_0, q4_0).
  B: hidden 256, 4 heads of 64, 1 KV head, FFN 256, 1 layer, vocab 64, tied, rms_norm_eps 1e-6, rope_theta
     10000; every row a whole number of 256-blocks, so llama.cpp stores every linear in a K-quant.
Weights: every Linear and the embedding ~ N(0, std^2) (A: 0.15, B: 0.06), norms 1 + 0.1 N(0, 1).

The bound (expected.json, per file). L(W) = the windowed eval loss (mean over windows of transformers'
loss(input_ids=window, labels=window)); W the original weights, W + D the file's weights as dequantized
(D is the conversion's rounding error, per tensor t). By Taylor, L(W + D) - L(W) = <g, D> + R with
g = dL/dW at W, and by Cauchy-Schwarz |<g, D>| <= B1 = sum_t ||g_t||_F ||D_t||_F. The script measures
R = L(W + D) - L(W) - <g, D> (float64 model) and asserts |R| <= 0.25 B1, so |L(W + D) - L(W)| <= 1.25 B1:
a rigorous but loose bound (the gradient and the error are far from parallel). Rounding errors are
unbiased and independent across weights, so <g, D> = sum_i g_i D_i is a sum of independent terms of
random sign with standard deviation sigma = sqrt(sum_i g_i^2 D_i^2); the script asserts |<g, D>| <= 6 sigma
and the tests allow relora's loss on the file to differ from transformers' loss on the original by
`tolerance` = 6 sigma + 2 |R| + 2e-5 (float32 arithmetic), and never by more than 1.25 B1 + 2e-5. The tight
check is against transformers' loss on the file itself (the same weights): 2e-5.
"""
import argparse
import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gguf")
SEQ_LEN = 16

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

MODELS = {
    "A": dict(hidden=64, heads=4, kv=2, head_dim=16, ffn=128, layers=2, tied=False, eps=1e-5, theta=500000.0,
              std=0.15, seed=2024),
    "B": dict(hidden=256, heads=4, kv=1, head_dim=64, ffn=256, layers=1, tied=True, eps=1e-6, theta=10000.0,
              std=0.06, seed=2025),
}
VOCAB = 64

TEXT = ("the quick brown fox jumps over the lazy dog while a llama reads a file of weights and "
        "every block of thirty two numbers shares one scale so the model keeps its codes\n") * 40


def make_tokenizer(directory: str) -> None:
    import sentencepiece as spm
    text = os.path.join(directory, "text.txt")
    with open(text, "w") as f:
        f.write(TEXT)
    spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(directory, "tokenizer"), vocab_size=48,
                                   model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2)
    os.remove(text)
    os.remove(os.path.join(directory, "tokenizer.vocab"))


def make_model(spec: dict, directory: str) -> LlamaForCausalLM:
    torch.manual_seed(spec["seed"])
    config = LlamaConfig(
        hidden_size=spec["hidden"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"],
        head_dim=spec["head_dim"], intermediate_size=spec["ffn"], vocab_size=VOCAB,
        num_hidden_layers=spec["layers"], rms_norm_eps=spec["eps"], rope_theta=spec["theta"],
        max_position_embeddings=64, tie_word_embeddings=spec["tied"], hidden_act="silu", attention_bias=False,
        mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=None, dtype=torch.float32,
        attn_implementation="eager")
    model = LlamaForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(spec["std"] * torch.randn(p.shape, generator=gen))
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    make_tokenizer(directory)
    return model


def convert(llama_cpp: str, model_dir: str, outtype: str, out: str) -> None:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py
    subprocess.run([sys.executable, os.path.join(llama_cpp, "convert_hf_to_gguf.py"), model_dir,
                    "--outtype", outtype, "--outfile", out], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def quantize(src: str, dst: str, ftype_name: str) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype_name}) failed: {rc}"


def windows(tokens: np.ndarray):
    n = len(tokens) // SEQ_LEN
    return [torch.from_numpy(tokens[w * SEQ_LEN:(w + 1) * SEQ_LEN].astype(np.int64))[None, :] for w in range(n)]


def eval_loss(model, tokens: np.ndarray, grad: bool = False):
    """Mean over windows of transformers' window loss (the relora Evaluator's convention)."""
    ws = windows(tokens)
    total = 0
    for win in ws:
        total = total + model(input_ids=win, labels=win).loss.double()
    loss = total / len(ws)
    if grad:
        loss.backward()
    return loss


def tensor_types(path: str) -> dict:
    from gguf import GGUFReader
    return {t.name: t.tensor_type.name.lower().replace("_k", "_K") for t in GGUFReader(path).tensors}


def bound_case(original: LlamaForCausalLM, gguf_path: str, tokens: np.ndarray) -> dict:
    """transformers' loss on the original and on the file, and the first-order bound (module docstring)."""
    loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                  dtype=torch.float32, attn_implementation="eager").eval()
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "num_hidden_layers", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        a, b = getattr(loaded.config, key), getattr(original.config, key)
        assert (abs(a - b) <= 1e-6 * abs(b)) if isinstance(b, float) else a == b, (gguf_path, key, a, b)  # eps is an f32
    with torch.no_grad():
        loss_file = float(eval_loss(loaded, tokens))
    # float64 copies for the Taylor remainder.
    w = {k: v.detach().double() for k, v in original.named_parameters()}
    f = {k: v.detach().double() for k, v in loaded.named_parameters()}
    assert w.keys() == f.keys(), (w.keys() ^ f.keys())
    m64 = LlamaForCausalLM(original.config).double().eval()
    m64.load_state_dict({k: v for k, v in w.items()}, strict=False)
    m64.zero_grad()
    loss_w = eval_loss(m64, tokens, grad=True)
    grads = {k: p.grad.detach().clone() for k, p in m64.named_parameters()}
    with torch.no_grad():
        for k, p in m64.named_parameters():
            p.copy_(f[k])
        loss_wd = float(eval_loss(m64, tokens))
    inner = sum(float((grads[k] * (f[k] - w[k])).sum()) for k in w)
    b1 = sum(float(grads[k].norm() * (f[k] - w[k]).norm()) for k in w)
    sigma = math.sqrt(sum(float(((grads[k] * (f[k] - w[k])) ** 2).sum()) for k in w))
    remainder = loss_wd - float(loss_w.detach()) - inner
    assert abs(remainder) <= 0.25 * b1, (gguf_path, remainder, b1)
    assert abs(inner) <= 6 * sigma, (gguf_path, inner, sigma)
    with torch.no_grad():
        loss_original = float(eval_loss(original, tokens))
    tolerance = 6 * sigma + 2 * abs(remainder) + 2e-5
    assert abs(loss_file - loss_original) <= tolerance, (gguf_path, loss_file, loss_original, tolerance)
    return {
        "types": tensor_types(gguf_path),
        "loss_original": loss_original,
        "loss_transformers_gguf": loss_file,
        "first_order_bound": b1,
        "first_order_sigma": sigma,
        "tolerance": tolerance,
        "taylor_remainder": remainder,
        "first_order_term": inner,
        "max_abs_weight_error": max(float((f[k] - w[k]).abs().max()) for k in w),
    }


def kquant_reference() -> dict:
    from gguf import GGMLQuantizationType as T, quants
    rng = np.random.default_rng(7)
    out = {}
    # (type, rows, blocks per row, byte offsets of fp16 scales)
    for name, qtype, size, scale_offsets in (("q4_K", T.Q4_K, 144, (0, 2)), ("q5_K", T.Q5_K, 176, (0, 2)),
                                            ("q6_K", T.Q6_K, 210, (208,))):
        rows, per_row = 4, 2
        blocks = rng.integers(0, 256, size=(rows * per_row, size), dtype=np.uint8)
        for i in range(rows * per_row):
            for k, off in enumerate(scale_offsets):
                d = np.float16(rng.normal() * 0.01)
                if i == 1 and k == 0:
                    d = np.float16(2.0 ** -20)  # subnormal fp16
                blocks[i, off:off + 2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
        data = blocks.reshape(rows, per_row * size)
        values = quants.dequantize(data, qtype).astype(np.float32)
        assert values.shape == (rows, per_row * 256) and np.isfinite(values).all()
        out[name + ".blocks"] = np.ascontiguousarray(data)
        out[name + ".values"] = np.ascontiguousarray(values)
    return out


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp", required=True, help="vendor/llama.cpp of the llama-cpp-python sdist")
    ARGS = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    tokens = np.random.default_rng(99).integers(0, VOCAB, size=160).astype(np.uint16)
    np.save(os.path.join(OUT, "tokens.npy"), tokens)
    expected = {"seq_len": SEQ_LEN, "note": __doc__.split("The bound (expected.json")[1].strip()}
    with tempfile.TemporaryDirectory() as tmp:
        for key, spec in MODELS.items():
            d = os.path.join(tmp, key)
            os.makedirs(d)
            model = make_model(spec, d)
            if key == "A":
                files = {"tiny_f16.gguf": None, "tiny_q8_0.gguf": None, "tiny_q4_0.gguf": None}
                convert(ARGS.llama_cpp, d, "f16", os.path.join(OUT, "tiny_f16.gguf"))
                convert(ARGS.llama_cpp, d, "q8_0", os.path.join(OUT, "tiny_q8_0.gguf"))
                quantize(os.path.join(OUT, "tiny_f16.gguf"), os.path.join(OUT, "tiny_q4_0.gguf"), "LLAMA_FTYPE_MOSTLY_Q4_0")
            else:
                files = {"tiny_k_q4_K_M.gguf": None}
                f16 = os.path.join(tmp, "b_f16.gguf")
                convert(ARGS.llama_cpp, d, "f16", f16)
                quantize(f16, os.path.join(OUT, "tiny_k_q4_K_M.gguf"), "LLAMA_FTYPE_MOSTLY_Q4_K_M")
            for name in files:
                case = bound_case(model, os.path.join(OUT, name), tokens)
                case["model"] = key
                expected[name] = case
                print(f"{name}: loss original {case['loss_original']:.7f}, transformers on the file "
                      f"{case['loss_transformers_gguf']:.7f}, tolerance {case['tolerance']:.2e} (Cauchy-Schwarz "
                      f"{1.25 * case['first_order_bound']:.2e}), remainder {case['taylor_remainder']:.2e}; "
                      f"types {sorted(set(case['types'].values()))}")
    expected["models"] = {k: {kk: vv for kk, vv in v.items() if kk != "seed"} for k, v in MODELS.items()}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    save_file(kquant_reference(), os.path.join(OUT, "kquant_reference.safetensors"))
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
