#!/usr/bin/env python3
"""Golden SentencePiece-style tokenizers (byte fallback, Metaspace, Unigram) for SentencePieceTests.swift.

Run by hand from the repository root with the reference venv (CI does not run it; the outputs are checked in):

    /work/venv-ref/bin/python Tests/Fixtures/make_sentencepiece_fixture.py

Versions used: Python 3.11, sentencepiece 0.2.3, tokenizers 0.23.3, transformers 5.24.0, gguf 0.19.0.
Training text: the built-in text of make_tokenizer_fixture.py (for sentencepiece: its Latin-script lines, one
sentence per line).
Re-runs: sentencepiece's files (.model, .gguf) come out byte-identical; tokenizers' trainers break count ties in
hash order, so their .json files (and the ids expected of them) can differ between runs, each run consistent.

    /work/venv-ref/bin/python Tests/Fixtures/make_sentencepiece_fixture.py --nmt-nfkc /tmp/nmt_nfkc
    RELORA_NMT_NFKC_DIR=/tmp/nmt_nfkc swift test --filter SentencePieceTests/testNmtNfkcCharsmap

The second form writes, outside the repository, a T5-like model with sentencepiece's default nmt_nfkc
charsmap (too large to commit) for an opt-in test (see nmt_nfkc()).

Writes Tests/Fixtures/sentencepiece/:
  spm_unigram.model    sentencepiece Unigram, vocab 420, byte_fallback, character_coverage 0.98, a small
                       custom normalization rule TSV (fullwidth ASCII, ligatures, e+U+0301, circled digits,
                       tab and no-break spaces) compiled into precompiled_charsmap, user-defined symbol
                       "<sep>", add_dummy_prefix and remove_extra_whitespaces on (the defaults).
  spm_bpe.model        sentencepiece BPE, vocab 400, byte_fallback, identity normalizer, remove_extra_whitespaces
                       off, split_digits, allow_whitespace_only_pieces (Llama's tokenizer.model settings).
  spm_bpe_edited.model spm_bpe.model with "he" and "▁t" marked UNUSED and "ing" USER_DEFINED (edited with
                       the protobuf classes; sentencepiece resegments unused pieces and keeps user-defined whole).
  spm_unigram_nofallback.model  Unigram, vocab 200, no byte fallback (unknown characters become <unk>),
                       nmt-free identity normalizer with the default remove_extra_whitespaces.
  spm_bpe.gguf         a GGUF file with no tensors and spm_bpe.model's vocabulary as llama.cpp's converter
                       writes it (tokenizer.ggml.model "llama", tokens, scores, token_type, bos/eos/unk ids,
                       add_bos_token, add_space_prefix).
  llama2_legacy.json   tokenizers BPE trained with Metaspace pieces, rebuilt in Llama 2's layout: <unk> <s> </s>,
                       the 256 <0xNN> byte tokens, then the learned tokens; byte_fallback, fuse_unk; normalizer
                       Sequence[Prepend("▁"), Replace(" ", "▁")], no pre-tokenizer, decoder
                       Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)], post-processor
                       TemplateProcessing "<s> $A" (Llama 2 / Mistral / TinyLlama files).
  llama_metaspace.json the same model with no normalizer, pre_tokenizer Metaspace(prepend_scheme "first",
                       split false) and a Metaspace decoder (newer Llama conversions).
  metaspace_split.json the same model with Metaspace(prepend_scheme "always", split true) as trained.
  unigram.json         tokenizers Unigram (UnigramTrainer, vocab 300, on the Latin-script lines) with Metaspace(always, split) pre-tokenizer
                       and decoder, unk <unk>, no byte fallback.
  unigram_fallback.json  unigram.json plus the 256 <0xNN> tokens (score: the lowest piece score) and
                       byte_fallback true.
  converted_unigram.json, converted_bpe.json  transformers' SpmConverter.build_tokenizer_from_spm_proto of the
                       two .model files (Precompiled normalizer, Replace regexes, Metaspace, decoder chain).
  relora_unigram.json  not written here: made by relora's own Unigram trainer (the committed file, from
                           relora tokenizer train --model unigram --vocab-size 500 \
                               --in Tests/Fixtures/shakespeare/train_slice.txt \
                               --out Tests/Fixtures/sentencepiece/relora_unigram.json
                       ); this script loads it with tokenizers, records its ids and decodes like the others,
                       and checks that tokenizers round-trips every string without a leading space, a literal
                       "▁" or a literal "<0xNN>".
  expected.json        (decodes equal to their string are null; strings: make_tokenizer_fixture.py's, EXTRA_STRINGS, and 3000 characters of
                       shakespeare/val_slice.txt) {"strings": [...], "<name>": {"ids": [[...]], "decoded": [...]}} for every file above:
                       sentencepiece's encode(s) / decode(ids) for .model and .gguf (the .gguf expects the same
                       ids as spm_bpe.model), tokenizers' encode(s, add_special_tokens=False).ids /
                       decode(ids, skip_special_tokens=False) for .json; under "random", the same for 150
                       short random strings (random_strings()) and the tokenizers in RANDOM_CHECKED.
"""
import io
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_tokenizer_fixture import TEST_STRINGS, TRAINING_TEXT  # noqa: E402

import sentencepiece as spm  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

OUT = os.path.join(HERE, "sentencepiece")

# Unicode, whitespace runs, digits, unknown characters and bytes that need the fallback (characters absent
# from the training text: Cyrillic extended, CJK ext., rare symbols, emoji), plus text that looks like tokens.
EXTRA_STRINGS = [
    "  leading and   inner   runs of spaces   ",
    "tabs\tand\t\tnewlines\n\nand\r\ncarriage returns",
    "digits 0 07 123 4567 89012 3.14 1,000,000 ２０２４ ①②③",
    "fullwidth ＡＢＣ ａｂｃ ligatures ﬁ ﬂ decomposed e\u0301 precomposed é",
    "unknown ꙮ ᚠᛇᚻ ⵣ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 and emoji 🦜🦩🧬",
    "▁already▁escaped ▁ ▁▁ word▁",
    "<s> </s> <unk> <pad> <sep> <0x41> <0x4> <0xZZ> literal-looking tokens",
    "a<sep>b <sep> c",
    "\u00a0nbsp\u00a0\u3000ideographic\u3000space",
    "x",
    "   ",
    "ÀÉÎÕÜ àéîõü ß Æ œ",
]
# One long text (a held-out play's first 3000 characters, newlines and all): a Llama 2 file has no
# pre-tokenizer, so a whole document is one piece for BPE, and long inputs must merge the same.
with open(os.path.join(HERE, "shakespeare", "val_slice.txt"), encoding="utf-8") as _f:
    LONG_TEXT = _f.read()[:3000]
STRINGS = TEST_STRINGS + EXTRA_STRINGS + [LONG_TEXT]

def random_strings(count=150, seed=4321):
    """Short strings dense in what these tokenizers treat specially: runs of spaces and other whitespace,
    the "▁" symbol, charsmap keys (fullwidth, ligature, e + combining acute, circled digits, no-break and
    ideographic spaces), digits, characters absent from the training text, and token-like text."""
    import random
    rng = random.Random(seed)
    alphabet = (list(" " * 10) + list("\t\n\r") + ["\u2581", "\u2581\u2581", "\u00a0", "\u3000", "\ufb01", "e\u0301", "\u0301",
                "\uff21", "\uff41", "\u2460", "\u2463"] + list("0123456789") + list("etaoinshrdlu") + ["the", "and", "ing", "thou"]
                + list("TEAI.,;:!?'\"-()") + ["\u4e2d", "\ua66e", "\U0001f99c", "\u00e9", "\u00df", "\u03a9", "\x00", "\x7f"]
                + ["<s>", "</s>", "<unk>", "<sep>", "<0x41>", "<pad>"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(count)]


RANDOM_STRINGS = random_strings()
# The tokenizers whose ids are also recorded for RANDOM_STRINGS (the others share their machinery).
RANDOM_CHECKED = ["spm_unigram", "spm_bpe", "spm_unigram_nofallback", "llama2_legacy", "llama_metaspace",
                  "unigram_fallback", "converted_unigram", "relora_unigram"]

# A small normalization rule set (TSV of code points, as sentencepiece's --normalization_rule_tsv).
RULES = (
    [(f"{0xFF01 + k:X}", f"{0x21 + k:X}") for k in range(0x5E)]  # fullwidth ASCII -> ASCII
    + [("FB01", "66 69"), ("FB02", "66 6C"), ("65 301", "E9"), ("9", "20"), ("A0", "20"), ("3000", "20")]
    + [(f"{0x2460 + k:X}", f"{0x31 + k:X}") for k in range(9)]  # circled 1..9
)


def lines():
    """The Latin-script lines (sentencepiece needs vocab_size above the character count; the other scripts
    then exercise the byte fallback and <unk>)."""
    for doc in TRAINING_TEXT:
        for line in doc.split("\n"):
            if line.strip() and all(ord(c) < 0x250 for c in line):
                yield line


def train_spm(name, **options):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=buf, num_threads=1,
                                   minloglevel=2, **options)
    data = buf.getvalue()
    with open(os.path.join(OUT, name + ".model"), "wb") as f:
        f.write(data)
    return spm.SentencePieceProcessor(model_proto=data)


def spm_expected(sp, strings=None):
    ids = [sp.encode(s) for s in (strings or STRINGS)]
    return {"ids": ids, "decoded": [sp.decode(i) for i in ids]}


def hf_expected(tok, strings=None):
    ids = [tok.encode(s, add_special_tokens=False).ids for s in (strings or STRINGS)]
    return {"ids": ids, "decoded": [tok.decode(i, skip_special_tokens=False) for i in ids]}


def save_json(spec, name):
    text = json.dumps(spec, ensure_ascii=False, indent=2)
    with open(os.path.join(OUT, name + ".json"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return Tokenizer.from_str(text)


def byte_tokens():
    return [f"<0x{b:02X}>" for b in range(256)]


def llama_bpe():
    """BPE trained on Metaspace pieces, rebuilt in Llama 2's id layout with byte fallback."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=260, min_frequency=2, limit_alphabet=90, show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    names = ["<unk>", "<s>", "</s>"] + byte_tokens() + [k for k, _ in learned]
    spec["model"]["vocab"] = {k: i for i, k in enumerate(names)}
    spec["model"].update(byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    spec["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, c in enumerate(names[:3])]
    chain = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    bos_template = {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    legacy = dict(spec, normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        pre_tokenizer=None, decoder=chain, post_processor=bos_template)
    meta_first = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    metaspace = dict(spec, normalizer=None, pre_tokenizer=meta_first, decoder=meta_first)
    meta_split = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    split = dict(spec, normalizer=None, pre_tokenizer=meta_split, decoder=meta_split)
    return {"llama2_legacy": save_json(legacy, "llama2_legacy"),
            "llama_metaspace": save_json(metaspace, "llama_metaspace"),
            "metaspace_split": save_json(split, "metaspace_split")}


def unigram():
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(list(lines()), trainer)
    spec = json.loads(tok.to_str())
    plain = save_json(spec, "unigram")
    low = min(score for _, score in spec["model"]["vocab"])
    fallback = json.loads(json.dumps(spec))
    fallback["model"]["vocab"] += [[t, low] for t in byte_tokens()]
    fallback["model"]["byte_fallback"] = True
    return {"unigram": plain, "unigram_fallback": save_json(fallback, "unigram_fallback")}


def converted(model_path, name):
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    pb = import_protobuf()
    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = pieces if proto.trainer_spec.model_type == 1 else {p: i for i, (p, _) in enumerate(pieces)}
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    return save_json(json.loads(tok.to_str()), name)


def edited_bpe(source, path):
    """spm_bpe.model with the pieces of two frequent merges marked UNUSED (BPE resegments them into the
    pair they were made of) and one piece made USER_DEFINED (kept whole, never merged with neighbours)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    with open(source, "rb") as f:
        proto.ParseFromString(f.read())
    for p in proto.pieces:
        if p.piece in ("he", "▁t"):
            p.type = pb.ModelProto.SentencePiece.UNUSED
        elif p.piece == "ing":
            p.type = pb.ModelProto.SentencePiece.USER_DEFINED
    data = proto.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
    return spm.SentencePieceProcessor(model_proto=data)


def write_gguf(model_path, path):
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([p.type for p in proto.pieces])  # sentencepiece's enum is llama.cpp's token type
    w.add_bos_token_id(proto.trainer_spec.bos_id)
    w.add_eos_token_id(proto.trainer_spec.eos_id)
    w.add_unk_token_id(proto.trainer_spec.unk_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    os.makedirs(OUT, exist_ok=True)
    rules = os.path.join(OUT, ".rules.tsv")
    with open(rules, "w") as f:
        for src, dst in RULES:
            f.write(f"{src}\t{dst}\n")
    expected = {"strings": STRINGS}
    sp_uni = train_spm("spm_unigram", model_type="unigram", vocab_size=420, byte_fallback=True,
                       character_coverage=0.98, normalization_rule_tsv=rules, user_defined_symbols=["<sep>"])
    os.remove(rules)
    sp_bpe = train_spm("spm_bpe", model_type="bpe", vocab_size=400, byte_fallback=True, character_coverage=0.98,
                       normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                       allow_whitespace_only_pieces=True)
    sp_nofb = train_spm("spm_unigram_nofallback", model_type="unigram", vocab_size=200, character_coverage=0.98,
                        normalization_rule_name="identity")
    random_expected = {"strings": RANDOM_STRINGS}
    for name, sp in [("spm_unigram", sp_uni), ("spm_bpe", sp_bpe), ("spm_unigram_nofallback", sp_nofb)]:
        random_expected[name] = spm_expected(sp, RANDOM_STRINGS)
    sp_edit = edited_bpe(os.path.join(OUT, "spm_bpe.model"), os.path.join(OUT, "spm_bpe_edited.model"))
    expected["spm_bpe_edited"] = spm_expected(sp_edit)
    expected["spm_unigram"] = spm_expected(sp_uni)
    expected["spm_bpe"] = spm_expected(sp_bpe)
    expected["spm_unigram_nofallback"] = spm_expected(sp_nofb)
    expected["spm_bpe_gguf"] = expected["spm_bpe"]
    write_gguf(os.path.join(OUT, "spm_bpe.model"), os.path.join(OUT, "spm_bpe.gguf"))

    hf = {}
    hf.update(llama_bpe())
    hf.update(unigram())
    hf["converted_unigram"] = converted(os.path.join(OUT, "spm_unigram.model"), "converted_unigram")
    hf["converted_bpe"] = converted(os.path.join(OUT, "spm_bpe.model"), "converted_bpe")
    ours = os.path.join(OUT, "relora_unigram.json")
    if os.path.exists(ours):
        hf["relora_unigram"] = Tokenizer.from_file(ours)
    for name, tok in hf.items():
        expected[name] = hf_expected(tok)
        if name in RANDOM_CHECKED:
            random_expected[name] = hf_expected(tok, RANDOM_STRINGS)
    expected["random"] = random_expected
    # A decode equal to its input string is written as null (the file stays small).
    def squeeze(table, strings):
        return {k: (v if k == "strings" else {"ids": v["ids"], "decoded": [None if d == s else d for d, s in zip(v["decoded"], strings)]})
                for k, v in table.items()}
    compact = squeeze({k: v for k, v in expected.items() if k != "random"}, STRINGS)
    compact["random"] = squeeze(random_expected, RANDOM_STRINGS)
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(compact, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    for name in expected:
        if name in ("strings", "random"):
            continue
        e = expected[name]
        same = sum(d == s for d, s in zip(e["decoded"], STRINGS))
        print(f"{name}: {sum(len(i) for i in e['ids'])} tokens over {len(STRINGS)} strings, "
              f"{same} decode back to the input exactly")
    if "relora_unigram" in expected:
        e = expected["relora_unigram"]
        # Not round-tripped by design (as with Llama's tokenizers): a leading space (the decoder strips the
        # prefix it adds), a literal "▁" (it is the space symbol) and literal "<0xNN>" (a byte piece).
        trips = [d == s for d, s in zip(e["decoded"], STRINGS)
                 if not s.startswith(" ") and "\u2581" not in s and "<0x" not in s]
        print(f"relora_unigram: tokenizers round-trips {sum(trips)} of {len(trips)} strings (those without a leading "
              f"space, '▁' or '<0x')")
        assert all(trips), "tokenizers does not round-trip relora's Unigram tokenizer"
    # The fixture must exercise what it is for.
    assert any(i in range(3, 259) for ids in expected["spm_bpe"]["ids"] for i in ids), "no byte fallback in spm_bpe"
    assert any(0 in ids for ids in expected["spm_unigram_nofallback"]["ids"]), "no <unk> in spm_unigram_nofallback"
    assert any(i in range(3, 259) for ids in expected["llama2_legacy"]["ids"] for i in ids), "no byte fallback"


def nmt_nfkc(outdir):
    """Not committed (the nmt_nfkc charsmap alone is ~240 KiB): a T5-like sentencepiece Unigram with the
    default nmt_nfkc normalizer and transformers' conversion of it, with expected ids and decodes for the
    fixture strings, the random strings and some NFKC-heavy text, in the layout of expected.json.
    SentencePieceTests.testNmtNfkcCharsmap reads it when RELORA_NMT_NFKC_DIR names the directory."""
    global OUT
    OUT = outdir
    os.makedirs(outdir, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=buf, num_threads=1, minloglevel=2,
                                   model_type="unigram", vocab_size=300, character_coverage=0.98)
    with open(os.path.join(outdir, "t5.model"), "wb") as f:
        f.write(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    strings = STRINGS + RANDOM_STRINGS + [
        "Ｈｅｌｌｏ　ｗｏｒｌｄ ①②③ ﬁne ™ ½ Å Ω ｶﾀｶﾅ ㍻ ℃ x\u00a0y \u2028z", "\u1100\u1161\u11a8 가", "e\u0301\u0302 A\u030a"]
    tok = converted(os.path.join(outdir, "t5.model"), "t5_converted")
    expected = {"strings": strings, "t5_model": spm_expected(sp, strings), "t5_converted": hf_expected(tok, strings)}
    with open(os.path.join(outdir, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False)
    print(f"{outdir}: t5.model ({len(buf.getvalue())} bytes, nmt_nfkc), t5_converted.json, {len(strings)} strings")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--nmt-nfkc":
        nmt_nfkc(sys.argv[2])
    elif len(sys.argv) == 1:
        main()
    else:
        sys.exit(__doc__)
