#!/usr/bin/env python3
"""Checks `relora export --format gguf` of a SentencePiece tokenizer outside relora, and records the ids for
`SentencePieceGGUFExportTests`. Run by hand (CI never runs Python), after `swift build`:

    /work/venv-ref/bin/python Tests/Fixtures/make_sentencepiece_gguf_export.py [--relora .build/debug/relora]

1. Makes a tiny Hugging Face LLaMA (transformers, random weights, vocab_size 416: the 400 pieces of
   sentencepiece/spm_bpe.model, Llama's settings, plus 16 ids of padding) with spm_bpe.model as its
   tokenizer.model, and exports it with `relora export DIR --format gguf --quant f32`.
2. gguf (the package llama.cpp's tools use) reads the file: tokenizer.ggml.model "llama", the tokens,
   scores and token types are the .model's pieces (then [PAD<id>], unused), the bos/eos/unk ids the
   .model's, add_bos_token false (sentencepiece's encode adds no BOS, so relora's data had none),
   add_space_prefix the .model's add_dummy_prefix.
3. llama.cpp (llama-cpp-python) loads the whole file (n_vocab 416), and with vocab_only tokenizes the strings of
   sentencepiece/expected.json shorter than 300 characters (add_bos False, special False); each must
   equal sentencepiece's ids on spm_bpe.model.
4. `relora export model.gguf --format hf` writes the GGUF's tokenizer as a tokenizer.model; sentencepiece
   loads it (416 pieces) and gives the same ids.
5. llama.cpp ignores tokenizer.ggml.remove_extra_whitespaces for this tokenizer type: a copy of the
   exported tokenizer with the key true and one with it false tokenize "  hello   world  " alike.

Writes sentencepiece/gguf_export_expected.json: the strings, sentencepiece's ids (= llama.cpp's on the
export, checked here), the exported metadata summary, and the two ids lists of step 5. Versions used:
transformers 5.24.0, sentencepiece 0.2.3, gguf 0.19.0, llama-cpp-python 0.3.36.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

import gguf
import llama_cpp
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))
SP = os.path.join(HERE, "sentencepiece")
VOCAB = 416
WHITESPACE = "  hello   world  "


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode("utf-8")
    return f.parts[-1][0].item()


def llama_ids(path, texts):
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    return [list(llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)) for t in texts]


def tokenizer_only(reader, path, remove_extra):
    """The exported tokenizer metadata alone, with remove_extra_whitespaces set."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(field(reader, "tokenizer.ggml.tokens"))
    w.add_token_scores(field(reader, "tokenizer.ggml.scores"))
    w.add_token_types(field(reader, "tokenizer.ggml.token_type"))
    w.add_bos_token_id(field(reader, "tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field(reader, "tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(field(reader, "tokenizer.ggml.unknown_token_id"))
    w.add_add_bos_token(False)
    w.add_add_space_prefix(True)
    w.add_remove_extra_whitespaces(remove_extra)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--relora", default=".build/debug/relora")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_path = os.path.join(SP, "spm_bpe.model")
    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    sp = spm.SentencePieceProcessor(model_file=model_path)
    with open(os.path.join(SP, "expected.json"), encoding="utf-8") as f:
        strings = [s for s in json.load(f)["strings"] if len(s) < 300]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        hf = os.path.join(tmp, "hf")
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        LlamaForCausalLM(config).save_pretrained(hf)
        shutil.copy(model_path, os.path.join(hf, "tokenizer.model"))
        out = os.path.join(tmp, "model.gguf")
        subprocess.run([args.relora, "export", hf, "--format", "gguf", "--quant", "f32", "--out", out], check=True)

        r = gguf.GGUFReader(out)
        pieces = [p.piece for p in proto.pieces]
        n = len(pieces)
        meta = {k: field(r, k) for k in r.fields if k.startswith("tokenizer.")}
        checks = {
            "model llama": meta["tokenizer.ggml.model"] == "llama",
            "tokens": meta["tokenizer.ggml.tokens"] == pieces + [f"[PAD{i}]" for i in range(n, VOCAB)],
            "scores": meta["tokenizer.ggml.scores"][:n] == [float(__import__("numpy").float32(p.score)) for p in proto.pieces],
            "types": meta["tokenizer.ggml.token_type"] == [p.type for p in proto.pieces] + [5] * (VOCAB - n),
            "ids": (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
                    meta["tokenizer.ggml.unknown_token_id"]) == (proto.trainer_spec.bos_id, proto.trainer_spec.eos_id,
                                                                 proto.trainer_spec.unk_id),
            "add_bos_token false": meta["tokenizer.ggml.add_bos_token"] is False,
            "add_space_prefix": meta["tokenizer.ggml.add_space_prefix"] == proto.normalizer_spec.add_dummy_prefix,
        }
        for name, good in checks.items():
            print(f"gguf metadata {name}: {'ok' if good else 'WRONG'}")
            ok &= good

        want = [sp.encode(s) for s in strings]
        got = llama_ids(out, strings)
        bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
        print(f"llama.cpp on the export: {len(strings) - len(bad)} of {len(strings)} strings give sentencepiece's ids")
        for i in bad:
            print(f"  {strings[i]!r}: sentencepiece {want[i]} llama.cpp {got[i]}")
        ok &= not bad

        # Back to Hugging Face: the GGUF's tokenizer written as a tokenizer.model, which sentencepiece reads.
        back = os.path.join(tmp, "back")
        subprocess.run([args.relora, "export", out, "--format", "hf", "--dtype", "float32", "--out", back], check=True)
        sp_back = spm.SentencePieceProcessor(model_file=os.path.join(back, "tokenizer.model"))
        same = [sp_back.encode(s) for s in strings] == want
        print(f"sentencepiece on the tokenizer.model of `relora export model.gguf --format hf`: {'same ids' if same else 'DIFFERENT ids'}")
        ok &= same and sp_back.get_piece_size() == VOCAB

        full = llama_cpp.Llama(model_path=out, n_ctx=64, verbose=False, n_threads=2)  # the weights load too
        print(f"llama.cpp loads the whole export: n_vocab {full.n_vocab()}")
        ok &= full.n_vocab() == VOCAB
        del full

        rxw = {}
        for flag in (False, True):
            p = os.path.join(tmp, f"rxw-{flag}.gguf")
            tokenizer_only(r, p, flag)
            rxw[flag] = llama_ids(p, [WHITESPACE])[0]
        print(f"llama.cpp, remove_extra_whitespaces false/true on {WHITESPACE!r}: {rxw[False]} / {rxw[True]}")
        ok &= rxw[False] == rxw[True] == sp.encode(WHITESPACE)

    fixture = {
        "source": "spm_bpe.model", "vocab_size": VOCAB, "strings": strings, "ids": want,
        "metadata": {"bos": meta["tokenizer.ggml.bos_token_id"], "eos": meta["tokenizer.ggml.eos_token_id"],
                     "unk": meta["tokenizer.ggml.unknown_token_id"], "add_bos_token": meta["tokenizer.ggml.add_bos_token"],
                     "add_space_prefix": meta["tokenizer.ggml.add_space_prefix"]},
        "whitespace": {"text": WHITESPACE, "llama_cpp_remove_extra_false": rxw[False], "llama_cpp_remove_extra_true": rxw[True]},
    }
    with open(os.path.join(SP, "gguf_export_expected.json"), "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
