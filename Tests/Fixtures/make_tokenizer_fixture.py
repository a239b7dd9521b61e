#!/usr/bin/env python3
"""Golden byte-level BPE tokenizers and encodings from Hugging Face `tokenizers`, for TokenizerTests.swift.

Run by hand from the repository root (CI does not run it; the outputs are checked in):

    python Tests/Fixtures/make_tokenizer_fixture.py
    python Tests/Fixtures/make_tokenizer_fixture.py --check path/to/our/tokenizer.json

Versions used: Python 3.11.7, tokenizers 0.23.3, transformers 5.24.0 (only for --check).
Deterministic: training is single-threaded on a fixed built-in text, so running it again with these
versions writes byte-identical files.

Writes Tests/Fixtures/tokenizer/:
  gpt2_style.json    BPE, vocab 500, pre_tokenizer ByteLevel(add_prefix_space=False, use_regex=True)
                     (the GPT-2 regex), ByteLevel decoder and post-processor (trim_offsets=False),
                     added special token "<|endoftext|>", initial alphabet = all 256 byte characters.
  llama3_style.json  the same training, but pre_tokenizer Sequence[Split(LLaMA-3 regex, Isolated),
                     ByteLevel(add_prefix_space=False, use_regex=False)] and model ignore_merges=True.
  expected.json      {"strings": [...], "split_strings": [...],
                      "<name>": {"ids": [[...]], "decoded": [...], "piece_lengths": [[...]]}} for gpt2_style,
                     llama3_style and gpt2_style_prefix_space (gpt2_style.json with the pre-tokenizer's
                     add_prefix_space set to true, loaded from a string; not saved as a file).
                     ids: encode(s, add_special_tokens=False).ids; decoded: decode(ids, skip_special_tokens=False),
                     for each of "strings"; piece_lengths: the UTF-8 byte lengths of the pre-tokenizer's pieces
                     (pre_tokenizer.pre_tokenize_str) for each of "split_strings" = strings + 300 random strings
                     dense in apostrophes, contraction letters, whitespace kinds, digits and marks, so a
                     pre-tokenizer difference shows even where the small vocab would hide it.

--check PATH loads a tokenizer.json written by the Swift BPETrainer with `tokenizers.Tokenizer.from_file`
and with `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`, encodes the test strings (plus the
training text) with both, and compares them with the ids in PATH + ".expected.json" if it exists
(a JSON {"strings": [...], "ids": [[...]]} written by the Swift side); prints a summary and exits non-zero
on any mismatch.
"""
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # single-threaded, deterministic

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "tokenizer")

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ~8 KB of varied text (public domain or written for this fixture).
TRAINING_TEXT = [
    """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.""",
    """HAMLET. To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die--to sleep,
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep, perchance to dream--ay, there's the rub.""",
    """KING LEAR. Blow, winds, and crack your cheeks! rage! blow!
You cataracts and hurricanoes, spout
Till you have drench'd our steeples, drown'd the cocks!
FOOL. O nuncle, court holy-water in a dry house is better than this rain-water out o' door.
I'll tell thee what: they're here, we've gone, you'd said it's THEIR'S, WE'LL see, I'M sure.""",
    """The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!
Pack my box with five dozen liquor jugs... Sphinx of black quartz, judge my vow?!
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 365 1024 2048 65536 3.14159 2.71828 -17 +23 1,000,000 1e-9 0x1F 2024-06-30 12:34:56.
Counting: 123 1234 12345 123456 1234567 2023 2024 2025 1000 2000 3000 100 200 300 123 456 789 12 34 56 78 90 12 34 56.
Prices: $19.99, EUR 5,00, 100% sure, 50/50 odds, a+b=c, x*y^2, (nested [brackets {here}]) <tags> & "quotes" 'single'.""",
    """Le renard brun rapide saute par-dessus le chien paresseux. Où est l'hôtel ? C'est très économique, déjà vu, naïve façon.
Der schnelle braune Fuchs springt über den faulen Hund. Größe, Straße, Äpfel und Öl für Übermorgen.
El veloz murciélago hindú comía feliz cardillo y kiwi. ¿Dónde está la biblioteca? ¡Qué día más bonito, señor!
A rápida raposa marrom pula sobre o cão preguiçoso. Ação, coração, são João.""",
    """Съешь же ещё этих мягких французских булок, да выпей чаю. Москва — столица России. Привет, мир!
Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Καλημέρα κόσμε, τι κάνεις σήμερα;
Zażółć gęślą jaźń. Příliš žluťoučký kůň úpěl ďábelské ódy. Árvíztűrő tükörfúrógép.""",
    """我能吞下玻璃而不伤身体。你好，世界！今天天气很好，我们去公园散步吧。中文分词是一个有趣的问题。
日本語のテキストも少し入れておきます。東京は日本の首都です。ひらがな、カタカナ、漢字を混ぜて書きます。
다람쥐 헌 쳇바퀴에 타고파. 안녕하세요, 세계! 한국어 문장도 조금 넣습니다.""",
    """الثعلب البني السريع يقفز فوق الكلب الكسول. مرحبا بالعالم!
עטלף אבק נס דרך מזגן שהתפוצץ כי חם. שלום עולם!
नमस्ते दुनिया! यह एक परीक्षण वाक्य है। हिन्दी में लिखा गया पाठ।
สวัสดีชาวโลก นี่คือประโยคทดสอบภาษาไทย""",
    """def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):\n\tprint(f"{i}: {fibonacci(i)}")  # tabs\tand\ttrailing spaces   
if (x != y && y >= 0) { z = x << 2 | y >> 1; } // C-style ==> ok
<html><body class="main">Hello&nbsp;world</body></html>""",
    """Emoji: 😀 😃 😄 👍 👍🏽 ❤️ 🎉🎉🎉 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸 🇯🇵 🤖 — and symbols: © ® ™ € £ ¥ ° ± × ÷ ∞ ≠ ≤ ≥ → ← ↔ ✓ ✗ ★ ☆.
Combining marks: e\u0301 (e + acute), n\u0303, a\u0308, Z\u0324\u0354\u0367\u0311\u0313; precomposed é ñ ä.
Whitespace:  two  spaces,   three   spaces,\ttab,\r\nwindows line,\n\n\nthree newlines,\u00a0nbsp,\u3000ideographic space.""",
    """It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness,
it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness,
it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing before us.
Call me Ishmael. Some years ago--never mind how long precisely--having little or no money in my purse,
and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world.""",
    """Document one ends here.<|endoftext|>Document two starts here and talks about tokenizers, merges, vocabularies,
byte-level BPE, pre-tokenization with regular expressions, and round trips: decode(encode(text)) == text.
<|endoftext|>A third document: lists -- item one; item two; item three. Questions? Answers! Done.""",
]

TEST_STRINGS = [
    "",
    " ",
    "Hello, world!",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "I'm sure you're right, we've seen they'll say he'd done it; it's JOHN'S, WE'RE, I'LL, 'S 'T",
    "'s 't 're 've 'm 'll 'd ''s '' 'x 'sa 're'",
    "'ſa 'ſ x'Ll",
    "!!!???... ---=== ((([[[{{{ }}}]]]))) ;;:: ,,, \"\"\" ''' ``` ~~~ @@## $$%% ^^&& **",
    "a  b   c    d\te\t\tf \t g\t h",
    "trailing spaces   ",
    "   leading spaces",
    "line one\r\nline two\r\n\r\nline four\n\n\nline seven\r\r\n  \n  indented\n",
    "a  \n  b \n\n c\t\n\td",
    "   \n\t ",
    "\n",
    "\t",
    "1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 -42 +7 1e-9 0x1F 2024-06-30",
    "x1 x12 x1234 A1B2C3 99bottles",
    "你好，世界！我能吞下玻璃而不伤身体。",
    "日本語のテキスト、カタカナ、ひらがな。東京タワー",
    "안녕하세요 세계",
    "😀👍🏽 ❤️ 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸🇯🇵 🤖🤖🤖",
    "e\u0301 n\u0303 Z\u0324\u0354\u0367\u0311\u0313 a\u0308b caf\u00e9 cafe\u0301",
    "नमस्ते दुनिया। الثعلب البني. שלום עולם. สวัสดีชาวโลก",
    "Съешь же ещё этих мягких французских булок. Ξεσκεπάζω.",
    "Hello<|endoftext|>World",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|> between <|endoftext|>",
    "<|endof <|endoftext| endoftext|> <|ENDOFTEXT|>",
    "nbsp\u00a0here ideographic\u3000space em\u2003space line\u2028sep",
    "control\x00chars\x01\x02\x7f and \x0b\x0c form feeds",
    "max \U0010ffff private \ue000 \U000f0000",
    "def f(x):\n    return x ** 2  # comment\n\tif x != 0: pass",
    "TO BE, OR NOT TO BE: THAT IS THE QUESTION. to be, or not to be",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "tokenizers merges vocabularies byte-level round trips",
    "ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖ×ØÙÚÛÜÝÞßàáâãäåæçèéêëìíîïðñòóôõö÷øùúûüýþÿ",
    "¡¢£¤¥¦§¨©ª«¬\u00ad®¯°±²³´µ¶·¸¹º»¼½¾¿",
]


def random_strings(count=300, seed=1234):
    """Strings dense in what the regexes care about: apostrophes and contraction letters, every kind of
    whitespace, letters/numbers/marks/symbols of several scripts and planes."""
    import random
    rng = random.Random(seed)
    alphabet = (list(" " * 6) + list("\t\n\r\n") + ["\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\x85", "\u2003"]
                + list("'" * 6) + list("strevlmdSTREVLMD") + ["\u017f", "\u212a"] + list("abcxyzAZ")
                + list("0123456789") + ["\u0663", "\u00bd", "\u216b", "\u00b2"]  # Arabic-Indic 3, 1/2, Roman 12, superscript 2
                + ["\u00e9", "\u0301", "\u0308", "\u4e2d", "\u6587", "\u3042", "\uac00", "\u0627", "\u05d0", "\u0928", "\u094d"]
                + list("!?.,;:-_()[]{}\"#$%&*+/<=>@\\^`|~") + ["\u2014", "\u00bf", "\u00a9", "\u20ac"]
                + ["\U0001f600", "\U0001f3fd", "\u200d", "\ufe0f", "\U0001f1fa", "\U0001d400", "\U00010400", "\x00", "\x7f"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


SPLIT_STRINGS = TEST_STRINGS + random_strings()


def piece_lengths(tok):
    """UTF-8 byte length of each pre-tokenizer piece: pieces come back in the byte-level alphabet, one
    character per byte. Without add_prefix_space they tile the string's bytes."""
    return [[len(piece) for piece, _ in tok.pre_tokenizer.pre_tokenize_str(s)] for s in SPLIT_STRINGS]


def train(pre_tokenizer, ignore_merges):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    return tok


def encodings(tok):
    ids = [tok.encode(s, add_special_tokens=False).ids for s in TEST_STRINGS]
    decoded = [tok.decode(i, skip_special_tokens=False) for i in ids]
    return {"ids": ids, "decoded": decoded, "piece_lengths": piece_lengths(tok)}


def make():
    os.makedirs(OUT, exist_ok=True)
    gpt2 = train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), ignore_merges=False)
    llama3 = train(
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
        ignore_merges=True,
    )
    gpt2.save(os.path.join(OUT, "gpt2_style.json"), pretty=True)
    llama3.save(os.path.join(OUT, "llama3_style.json"), pretty=True)

    spec = json.loads(gpt2.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    prefixed = Tokenizer.from_str(json.dumps(spec))

    expected = {
        "strings": TEST_STRINGS,
        "split_strings": SPLIT_STRINGS,
        "gpt2_style": encodings(gpt2),
        "llama3_style": encodings(llama3),
        "gpt2_style_prefix_space": encodings(prefixed),
    }
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    for name in ["gpt2_style", "llama3_style"]:
        tok = gpt2 if name == "gpt2_style" else llama3
        print(f"{name}: vocab {tok.get_vocab_size(with_added_tokens=True)}, "
              f"{sum(len(i) for i in expected[name]['ids'])} tokens over {len(TEST_STRINGS)} strings")
        for s, d in zip(TEST_STRINGS, expected[name]["decoded"]):
            assert s == d, f"{name}: HF does not round-trip {s!r}"
        for s, lengths in zip(SPLIT_STRINGS, expected[name]["piece_lengths"]):
            assert sum(lengths) == len(s.encode("utf-8")), f"{name}: pieces do not tile {s!r}"


def check(path):
    """Load a tokenizer.json written by the Swift trainer with HF and compare encodings."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(path)
    fast = PreTrainedTokenizerFast(tokenizer_file=path)
    strings = TEST_STRINGS + TRAINING_TEXT
    ours = None
    if os.path.exists(path + ".expected.json"):
        with open(path + ".expected.json", encoding="utf-8") as f:
            ours = json.load(f)
        strings = ours["strings"]
    bad = 0
    total = 0
    for k, s in enumerate(strings):
        ids = tok.encode(s, add_special_tokens=False).ids
        ids_fast = fast.encode(s, add_special_tokens=False)
        total += len(ids)
        if ids != ids_fast:
            bad += 1
            print(f"tokenizers vs transformers differ on {s[:60]!r}")
        if tok.decode(ids, skip_special_tokens=False) != s:
            bad += 1
            print(f"HF does not round-trip {s[:60]!r}")
        if ours is not None and ids != ours["ids"][k]:
            bad += 1
            print(f"HF and Swift differ on {s[:60]!r}:\n  HF    {ids[:40]}\n  Swift {ours['ids'][k][:40]}")
    print(f"{path}: vocab {tok.get_vocab_size(with_added_tokens=True)} (transformers len {len(fast)}), "
          f"eos {tok.token_to_id('<|endoftext|>')}, {len(strings)} strings, {total} tokens, "
          f"{'compared with Swift ids, ' if ours else ''}{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(check(sys.argv[2]))
    elif len(sys.argv) == 1:
        make()
    else:
        sys.exit(__doc__)
