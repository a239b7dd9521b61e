#!/usr/bin/env python3
"""Tokenizers relora refuses, written by the reference libraries, for the refusal tests
(`SentencePieceTests.testReferenceWrittenKindsAreRefused`). Run by hand, not by CI:

    /work/venv-ref/bin/python Tests/Fixtures/make_refused_fixture.py

Writes into Tests/Fixtures/refused/ (each a few KB, trained on the first lines of
shakespeare/val_slice.txt so the files are what the libraries write for a real vocabulary):

  wordlevel.json        tokenizers: WordLevel model (WordLevelTrainer), Whitespace pre-tokenizer
  bert_normalizer.json  tokenizers: WordPiece-free Unigram with a BertNormalizer (the only unsupported part)
  digits_metaspace.json tokenizers: Unigram, Sequence[Digits, Metaspace] pre-tokenizer (Digits the only unsupported part)
  digits_bytelevel.json tokenizers: byte-level BPE, Sequence[Digits, ByteLevel] (the DeepSeek-style layout)
  t5.gguf               gguf: tokenizer metadata as llama.cpp's convert_hf_to_gguf writes it for T5
                        (tokenizer.ggml.model "t5", tokens, scores, token types, add_space_prefix,
                        remove_extra_whitespaces), vocabulary from a small sentencepiece Unigram; no tensors
"""
import io, os

import gguf
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "refused")


def lines():
    with open(os.path.join(HERE, "shakespeare", "val_slice.txt"), encoding="utf-8") as f:
        return [l for l in f.read().splitlines() if l.strip()][:400]


def save(tok, name):
    tok.save(os.path.join(OUT, name))


def main():
    os.makedirs(OUT, exist_ok=True)
    text = lines()

    wl = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.train_from_iterator(text, trainers.WordLevelTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    save(wl, "wordlevel.json")

    def unigram():
        t = Tokenizer(models.Unigram())
        t.pre_tokenizer = pre_tokenizers.Metaspace()
        t.decoder = decoders.Metaspace()
        return t

    bert = unigram()
    bert.normalizer = normalizers.BertNormalizer(lowercase=True)
    bert.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>"], unk_token="<unk>"))
    save(bert, "bert_normalizer.json")

    digits = unigram()
    digits.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Metaspace()])
    digits.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>"], unk_token="<unk>"))
    save(digits, "digits_metaspace.json")

    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    save(bl, "digits_bytelevel.json")

    # T5's tokenizer in GGUF: a sentencepiece Unigram's pieces, as convert_hf_to_gguf's T5 vocab writer puts them.
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=120, model_type="unigram",
                                   num_threads=1, minloglevel=2, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   normalization_rule_name="identity")  # no charsmap: keeps the file small
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    w = gguf.GGUFWriter(os.path.join(OUT, "t5.gguf"), "t5")
    w.add_tokenizer_model("t5")
    w.add_tokenizer_pre("default")
    w.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([p.type for p in proto.pieces])
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    w.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name in sorted(os.listdir(OUT)):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
    main()
