#!/usr/bin/env python3
"""Build a Python-source pretraining corpus from pinned PyPI packages, train a BPE tokenizer on a
sample of it and tokenize it into .npy files for `relora train`.

Source: the ``*.py`` files of the wheels in ``PACKAGES`` (exact versions, archive file names and
sha256 pinned; all BSD, MIT, Apache-2.0 or the PSF-style Matplotlib license), fetched with
``python3 -m pip download --no-deps --only-binary :all:`` for one fixed target (CPython 3.12,
manylinux2014 x86_64), so the same archives are chosen on any host and no package is ever built.
A downloaded archive whose sha256 differs from its pin is an error.

Filtering (per file, in this order):
  1. only regular ``*.py`` members outside ``*.dist-info/`` and ``*.data/``;
  2. not valid UTF-8 (strict decode): dropped;
  3. a UTF-8 BOM is removed and CRLF / CR line ends become LF;
  4. empty or whitespace-only files and files over ``MAX_FILE_BYTES``: dropped;
  5. exact duplicates (sha256 of the normalized text): only the first occurrence is kept, in the
     order train, val, ood (packages in ``PACKAGES`` order, members in sorted path order), so a
     held-out file whose content also occurs in training is dropped from the held-out set.

Splits (every file is in exactly one):
  ood    every file of ``OOD_PACKAGE`` (a whole package, a different domain: graph algorithms);
  val    of the other packages, the files whose path key ``"<package>:<member path>"`` hashes
         (sha256, first 8 bytes, mod 10000) below ``VAL_PER_10000`` (1.5 %). The key has no
         version, so a version bump keeps a file's split;
  train  the rest.
The script asserts, and prints, that train, val and ood share no path key and no content hash.

Outputs in ``--out`` (default ``<repo>/data/corpus``, git-ignored):
  download/                   the pinned wheels
  train-NNNNN.jsonl, val-..., ood-...
                              one ``{"path": key, "text": source}`` object per file, shards of at most
                              ``SHARD_BYTES`` of text (``relora tokenize`` reads JSONL; each file
                              becomes one document followed by <|endoftext|>)
  files.tsv                   split, package, path key, sha256 and bytes of every kept file
  tokenizer_sample.txt        the tokenizer's training text: whole train files chosen by a hash of
                              their path, up to ``--sample-mb`` MB, joined by blank lines
  tokenizer.json              byte-level BPE (``relora tokenizer train --vocab-size``)
  train.npy, val.npy, ood.npy uint16 token ids (``relora tokenize``)
  manifest.json               pins, per-package counts (files seen / kept / dropped, bytes kept),
                              per-split sizes and sha256s, the disjointness check, tokenizer and
                              token counts, and the seconds each stage took

Idempotent and resumable: each stage records what it was made from in manifest.json and is
skipped when its outputs exist with the recorded sha256s (downloads: when the archive's sha256
matches its pin). Every output is written to a temporary name and renamed into place, so an
interrupted run leaves nothing half-written and the next run redoes only what is missing.
``--force`` redoes everything but the downloads.

``relora`` is taken from ``--relora PATH``, else ``.build/release/relora``, else
``.build/debug/relora`` (a release build tokenizes about 10x faster).

``--self-test`` runs the doctests and a synthetic end-to-end check of the split and dedup logic
(no network, no relora); ``--check`` re-verifies an existing corpus from its ``files.tsv``.

Exit status: 0 on success, 1 on any error (one line on stderr, "error: ...").
"""

import argparse
import email.parser
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datafiles import log, sha256_bytes, sha256_file, write_atomic  # noqa: E402

FORMAT_VERSION = 1  # bump when the file selection, normalization or output format changes

# (distribution, version, archive file name, sha256 of the archive as published on PyPI, license).
# Chosen for license (permissive only), size (~5-55 MB of .py each, ~200 MB in all) and variety
# (symbolic math, numerics, statistics, ML, web, databases, plotting, astronomy).
TARGET = ["--platform", "manylinux2014_x86_64", "--python-version", "3.12",
          "--implementation", "cp", "--abi", "cp312"]
PACKAGES = [
    ("sympy", "1.14.0", "sympy-1.14.0-py3-none-any.whl",
     "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5", "BSD-3-Clause"),
    ("transformers", "5.24.0", "transformers-5.24.0-py3-none-any.whl",
     "ff5ebedf9359f94bb63772b6380eba6e7104d010cbbb2cb82c788817ea7486f6", "Apache-2.0"),
    ("django", "6.1.3", "django-6.1.3-py3-none-any.whl",
     "a0530e3fdac55d34ccc5893c36f6c57d7a7083064f3d414537e51473648b3290", "BSD-3-Clause"),
    ("numpy", "2.2.6", "numpy-2.2.6-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
     "fd83c01228a688733f1ded5201c678f0c53ecc1006ffbc404db9f7a899ac6249", "BSD-3-Clause"),
    ("scipy", "1.16.3", "scipy-1.16.3-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
     "72d1717fd3b5e6ec747327ce9bda32d5463f472c9dce9f54499e81fbd50245a1", "BSD-3-Clause"),
    ("pandas", "2.3.2", "pandas-2.3.2-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
     "96d31a6b4354e3b9b8a2c848af75d31da390657e3ac6f30c05c82068b9ed79b9", "BSD-3-Clause"),
    ("matplotlib", "3.11.2",
     "matplotlib-3.11.2-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
     "df4f7784aca81a94f254c0a2767d592ee25f407e488f5fa7203e51093fb6ca27", "Matplotlib (PSF-based)"),
    ("sqlalchemy", "2.1.9",
     "sqlalchemy-2.1.9-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
     "fcff5267a11d865efaff9ffc37ba3c8eab775bb4f4880a957c13dd7e63df5469", "MIT"),
    ("scikit-learn", "1.7.2",
     "scikit_learn-1.7.2-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
     "e5bf3d930aee75a65478df91ac1225ff89cd28e9ac7bd1196853a9229b6adb0b", "BSD-3-Clause"),
    ("astropy", "8.0.2",
     "astropy-8.0.2-cp311-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
     "000d6998bcf4f097257b3776f29f1dafde0967bf1b091edbad95df564eee4eea", "BSD-3-Clause"),
    ("statsmodels", "0.14.6",
     "statsmodels-0.14.6-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
     "19b58cf7474aa9e7e3b0771a66537148b2df9b5884fbf156096c0e6c1ff0469d", "BSD-3-Clause"),
    ("networkx", "3.7", "networkx-3.7-py3-none-any.whl",
     "e3fd2c13a7814cee3746340d8d7f8598a67f16a58bf47fb7f8793fab6efca1b0", "BSD-3-Clause"),
]
OOD_PACKAGE = "networkx"
VAL_PER_10000 = 150  # 1.5 % of the in-distribution files
MAX_FILE_BYTES = 1 << 20  # no pinned file is this large; guards against generated data tables
SHARD_BYTES = 16 << 20
SPLITS = ("train", "val", "ood")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FetchError(Exception):
    pass










def mb(n):
    return f"{n / 1e6:,.1f} MB"


def settings():
    """Everything that determines the text outputs besides the archives' contents."""
    return {
        "format_version": FORMAT_VERSION,
        "packages": [[p[0], p[1], p[2], p[3]] for p in PACKAGES],
        "target": TARGET,
        "ood_package": OOD_PACKAGE,
        "val_per_10000": VAL_PER_10000,
        "max_file_bytes": MAX_FILE_BYTES,
        "shard_bytes": SHARD_BYTES,
    }


# --------------------------------------------------------------------------
# split and dedup (pure functions: the doctests and --self-test check them)


def path_key(package, member):
    """The version-free name of a file, used for the split and in every output.

    >>> path_key("sympy", "sympy/core/add.py")
    'sympy:sympy/core/add.py'
    """
    return f"{package}:{member}"


def hash_fraction(tag, key):
    """A deterministic number in [0, 10000) from sha256(tag + ":" + key).

    >>> hash_fraction("val", "sympy:sympy/core/add.py") == hash_fraction("val", "sympy:sympy/core/add.py")
    True
    >>> 0 <= hash_fraction("val", "x") < 10000
    True
    """
    digest = hashlib.sha256(f"{tag}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10000


def split_of(package, key, ood_package=OOD_PACKAGE, val_per_10000=VAL_PER_10000):
    """The split of a file: the whole OOD package is "ood", 1.5 % of the rest (by a hash of the
    path key, so the choice is stable across runs and versions) is "val", the rest "train".

    >>> split_of("networkx", "networkx:networkx/classes/graph.py")
    'ood'
    >>> split_of("sympy", "sympy:sympy/core/add.py", val_per_10000=0)
    'train'
    >>> split_of("sympy", "sympy:sympy/core/add.py", val_per_10000=10000)
    'val'
    >>> keys = [f"pkg:pkg/m{i}.py" for i in range(20000)]
    >>> n = sum(split_of("pkg", k) == "val" for k in keys)
    >>> 200 < n < 400  # 1.5 % of 20000 = 300
    True
    """
    if package == ood_package:
        return "ood"
    return "val" if hash_fraction("val", key) < val_per_10000 else "train"


def normalize(raw):
    """Decoded, normalized text of a source file, or None when it is not valid UTF-8.

    >>> normalize(b"\\xef\\xbb\\xbfx = 1\\r\\ny = 2\\r")
    'x = 1\\ny = 2\\n'
    >>> normalize(b"caf\\xe9") is None
    True
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def assign(files, ood_package=OOD_PACKAGE, val_per_10000=VAL_PER_10000, max_bytes=MAX_FILE_BYTES):
    """Filters, splits and deduplicates source files.

    `files`: (package, member path, raw bytes) in package order, members in any order.
    Returns (kept, dropped): `kept` maps each split to a list of (key, package, text, sha256) in
    (package, path) order; `dropped` counts per package the files dropped by reason
    (invalid_utf8, empty, too_large, duplicate). Duplicates keep the first occurrence in the
    order train, val, ood, so held-out sets never repeat training content.

    >>> fs = [("a", "a/x.py", b"x = 1\\n"), ("a", "a/y.py", b"x = 1\\n"), ("a", "a/z.py", b"\\xff"),
    ...       ("a", "a/e.py", b"  \\n"), ("b", "b/w.py", b"x = 1\\n"), ("b", "b/v.py", b"v = 2\\n")]
    >>> kept, dropped = assign(fs, ood_package="b", val_per_10000=0)
    >>> [(s, [k for k, *_ in kept[s]]) for s in ("train", "val", "ood")]
    [('train', ['a:a/x.py']), ('val', []), ('ood', ['b:b/v.py'])]
    >>> dropped["a"] == {"invalid_utf8": 1, "empty": 1, "too_large": 0, "duplicate": 1}
    True
    >>> dropped["b"]["duplicate"]
    1
    """
    order = {}
    for package, _, _ in files:
        order.setdefault(package, len(order))
    candidates = {s: [] for s in SPLITS}
    dropped = {p: {"invalid_utf8": 0, "empty": 0, "too_large": 0, "duplicate": 0} for p in order}
    for package, member, raw in files:
        text = normalize(raw)
        if text is None:
            dropped[package]["invalid_utf8"] += 1
            continue
        blob = text.encode("utf-8")
        if not text.strip():
            dropped[package]["empty"] += 1
            continue
        if len(blob) > max_bytes:
            dropped[package]["too_large"] += 1
            continue
        key = path_key(package, member)
        split = split_of(package, key, ood_package, val_per_10000)
        candidates[split].append((order[package], member, key, package, text, sha256_bytes(blob)))
    seen = set()
    kept = {s: [] for s in SPLITS}
    for split in SPLITS:
        for _, _, key, package, text, digest in sorted(candidates[split], key=lambda c: (c[0], c[1])):
            if digest in seen:
                dropped[package]["duplicate"] += 1
                continue
            seen.add(digest)
            kept[split].append((key, package, text, digest))
    return kept, dropped


def check_disjoint(rows):
    """`rows`: (split, key, sha256). Raises FetchError unless no key and no content hash occurs in two
    splits (or twice at all). Returns a one-line summary.

    >>> check_disjoint([("train", "a:1", "h1"), ("val", "a:2", "h2"), ("ood", "b:1", "h3")])
    'train/val/ood: 3 files, no shared path, no shared content hash'
    >>> check_disjoint([("train", "a:1", "h1"), ("val", "a:2", "h1")])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    FetchError: content hash h1 is in both train and val (a:1, a:2)
    """
    by_key, by_hash = {}, {}
    for split, key, digest in rows:
        if key in by_key:
            raise FetchError(f"path {key} is in both {by_key[key][0]} and {split}")
        if digest in by_hash:
            other_split, other_key = by_hash[digest]
            raise FetchError(f"content hash {digest} is in both {other_split} and {split} "
                             f"({other_key}, {key})")
        by_key[key] = (split, key)
        by_hash[digest] = (split, key)
    return (f"train/val/ood: {len(rows)} files, no shared path, no shared content hash")


def shards(records, limit):
    """Groups consecutive records (whose text sizes are given) into shards of at most `limit` bytes
    (a record larger than the limit gets a shard of its own).

    >>> shards([5, 5, 5, 12, 1], 10)
    [[0, 1], [2], [3], [4]]
    """
    out, current, size = [], [], 0
    for i, n in enumerate(records):
        if current and size + n > limit:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        out.append(current)
    return out


# --------------------------------------------------------------------------
# stage 1: download


def download(dl_dir):
    os.makedirs(dl_dir, exist_ok=True)
    t0 = time.time()
    fetched = 0
    for i, (name, version, filename, pin, _) in enumerate(PACKAGES):
        path = os.path.join(dl_dir, filename)
        if os.path.isfile(path) and sha256_file(path) == pin:
            log(f"  [{i + 1}/{len(PACKAGES)}] {filename}: present, sha256 ok")
            continue
        tmp = tempfile.mkdtemp(dir=dl_dir, prefix=".tmp-pip-")
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--no-input", "--only-binary", ":all:", *TARGET, f"{name}=={version}", "-d", tmp]
            start = time.time()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                lines = [l.strip() for l in proc.stdout.splitlines() if l.strip()]
                hint = next((l for l in reversed(lines) if l.lower().startswith("error")), lines[-1] if lines else "")
                raise FetchError(f"pip download {name}=={version} failed (exit {proc.returncode}; "
                                 f"no network access to PyPI?): {hint[:300]}")
            got = os.path.join(tmp, filename)
            if not os.path.isfile(got):
                raise FetchError(f"pip download {name}=={version} saved {sorted(os.listdir(tmp))}, "
                                 f"not the pinned {filename}")
            digest = sha256_file(got)
            if digest != pin:
                raise FetchError(f"{filename} has sha256 {digest}, not the pinned {pin}")
            size = os.path.getsize(got)
            os.replace(got, path)
            fetched += size
            secs = time.time() - start
            log(f"  [{i + 1}/{len(PACKAGES)}] {filename}: {mb(size)} in {secs:.1f} s "
                f"({size / 1e6 / max(secs, 1e-9):.1f} MB/s), sha256 ok")
        finally:
            for f in os.listdir(tmp):
                os.unlink(os.path.join(tmp, f))
            os.rmdir(tmp)
    return fetched, time.time() - t0


# --------------------------------------------------------------------------
# stage 2: extract, filter, split, dedup, write


def license_from_metadata(z):
    """The License-Expression, else the first line of License, else the license classifiers."""
    name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
    if name is None:
        return ""
    msg = email.parser.BytesParser().parsebytes(z.read(name), headersonly=True)
    expr = msg.get("License-Expression")
    if expr:
        return str(expr).strip()
    lic = str(msg.get("License") or "").strip()
    if lic:
        return lic.splitlines()[0][:80]
    return "; ".join(str(c) for c in (msg.get_all("Classifier") or []) if str(c).startswith("License"))


def read_package(path):
    """(member, bytes) of every .py member, and the license in the archive's metadata."""
    out = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            n = info.filename
            if info.is_dir() or not n.endswith(".py"):
                continue
            top = n.split("/", 1)[0]
            if top.endswith(".dist-info") or top.endswith(".data"):
                continue
            out.append((n, z.read(info)))
        lic = license_from_metadata(z)
    return out, lic


def build_corpus(out_dir, dl_dir):
    t0 = time.time()
    files, packages = [], []
    read_bytes = 0
    for i, (name, version, filename, pin, license_) in enumerate(PACKAGES):
        start = time.time()
        members, lic_meta = read_package(os.path.join(dl_dir, filename))
        size = sum(len(b) for _, b in members)
        read_bytes += size
        files += [(name, m, b) for m, b in members]
        packages.append({"package": name, "version": version, "archive": filename,
                         "archive_sha256": pin, "archive_bytes": os.path.getsize(os.path.join(dl_dir, filename)),
                         "license": license_, "license_metadata": lic_meta,
                         "role": "ood" if name == OOD_PACKAGE else "train/val",
                         "py_files": len(members), "py_bytes": size})
        secs = time.time() - t0
        log(f"  [{i + 1}/{len(PACKAGES)}] {name} {version}: {len(members):,} .py files, {mb(size)} "
            f"({time.time() - start:.1f} s) | total {len(files):,} files, {mb(read_bytes)}, "
            f"{read_bytes / 1e6 / max(secs, 1e-9):.1f} MB/s")

    log("  filtering, splitting by path hash, removing exact duplicates")
    kept, dropped = assign(files)
    del files
    rows = [(s, key, digest) for s in SPLITS for key, _, _, digest in kept[s]]
    summary = check_disjoint(rows)
    log(f"  check: {summary}")

    by_package = {p["package"]: p for p in packages}
    for p in packages:
        p["dropped"] = dropped[p["package"]]
        p["files_kept"] = {s: 0 for s in SPLITS}
        p["bytes_kept"] = {s: 0 for s in SPLITS}
    for s in SPLITS:
        for key, package, text, _ in kept[s]:
            by_package[package]["files_kept"][s] += 1
            by_package[package]["bytes_kept"][s] += len(text.encode("utf-8"))

    splits = {}
    tsv = ["split\tpackage\tpath\tsha256\tbytes"]
    for s in SPLITS:
        sizes = [len(t.encode("utf-8")) for _, _, t, _ in kept[s]]
        shard_info = []
        for n, idx in enumerate(shards(sizes, SHARD_BYTES)):
            lines = [json.dumps({"path": kept[s][j][0], "text": kept[s][j][2]}, ensure_ascii=False)
                     for j in idx]
            blob = ("\n".join(lines) + "\n").encode("utf-8")
            fname = f"{s}-{n:05d}.jsonl"
            write_atomic(os.path.join(out_dir, fname), blob)
            shard_info.append({"file": fname, "sha256": sha256_bytes(blob), "files": len(idx),
                               "text_bytes": sum(sizes[j] for j in idx)})
        for (key, package, text, digest), n in zip(kept[s], sizes):
            tsv.append(f"{s}\t{package}\t{key}\t{digest}\t{n}")
        splits[s] = {"files": len(kept[s]), "text_bytes": sum(sizes), "shards": shard_info}
        log(f"  {s}: {len(kept[s]):,} files, {mb(sum(sizes))} in {len(shard_info)} shard(s)")
    tsv_blob = ("\n".join(tsv) + "\n").encode("utf-8")
    write_atomic(os.path.join(out_dir, "files.tsv"), tsv_blob)
    # Remove shards of an earlier, larger build (their names are no longer in the manifest).
    names = {sh["file"] for info in splits.values() for sh in info["shards"]}
    for f in os.listdir(out_dir):
        if f.endswith(".jsonl") and f.split("-")[0] in SPLITS and f not in names:
            os.unlink(os.path.join(out_dir, f))
    total = sum(v["text_bytes"] for v in splits.values())
    return {
        "settings": settings(),
        "normalization": [
            "*.py members outside *.dist-info/ and *.data/",
            "strict UTF-8 decode (invalid: dropped); BOM removed; CRLF/CR -> LF",
            "empty/whitespace-only files and files over max_file_bytes dropped",
            "exact duplicates by sha256 of the normalized text dropped (first kept; order train, val, ood)",
        ],
        "packages": packages,
        "splits": splits,
        "files_tsv_sha256": sha256_bytes(tsv_blob),
        "total_text_bytes": total,
        "check": summary,
        "seconds": {"corpus": round(time.time() - t0, 1)},
    }


def corpus_up_to_date(out_dir, manifest):
    if not manifest or manifest.get("settings") != settings():
        return False
    try:
        if sha256_file(os.path.join(out_dir, "files.tsv")) != manifest["files_tsv_sha256"]:
            return False
        for info in manifest["splits"].values():
            for sh in info["shards"]:
                p = os.path.join(out_dir, sh["file"])
                if not os.path.isfile(p) or sha256_file(p) != sh["sha256"]:
                    return False
    except (KeyError, TypeError, OSError):
        return False
    return True


def check_files_tsv(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            split, _, key, digest, _ = line.rstrip("\n").split("\t")
            rows.append((split, key, digest))
    return check_disjoint(rows)


# --------------------------------------------------------------------------
# stages 3 and 4: tokenizer and tokens (with the relora CLI)


def find_relora(explicit):
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise FetchError(f"--relora {explicit} is not an executable file")
        return os.path.abspath(explicit)
    for config in ("release", "debug"):
        p = os.path.join(REPO_ROOT, ".build", config, "relora")
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise FetchError("no relora executable at .build/release/relora or .build/debug/relora; "
                     "build it with `swift build -c release --product relora` or pass --relora PATH")


def run_relora(relora, args, label):
    """Runs relora, echoing its stderr progress lines; returns its stdout."""
    log(f"  running: relora {' '.join(args)}")
    start = time.time()
    proc = subprocess.Popen([relora, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stderr:
        line = line.rstrip("\n")
        if line:
            last = line
            log(f"    {label} {time.time() - start:6.0f} s | {line[-160:]}")
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise FetchError(f"relora {args[0]} failed (exit {proc.returncode}): {last or out.strip()[-300:]}")
    return out.strip()


def tokenizer_sample(out_dir, manifest, sample_bytes):
    """Whole train files, in the order of a hash of their path key, up to `sample_bytes`."""
    texts = {}
    for sh in manifest["splits"]["train"]["shards"]:
        with open(os.path.join(out_dir, sh["file"]), encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                texts[obj["path"]] = obj["text"]
    chosen, size = [], 0
    for key in sorted(texts, key=lambda k: (hash_fraction("sample", k), k)):
        n = len(texts[key].encode("utf-8"))
        if size + n > sample_bytes:
            continue
        chosen.append(key)
        size += n
    chosen.sort()
    return ("\n\n".join(texts[k] for k in chosen) + "\n").encode("utf-8"), len(chosen)


def build_tokenizer(out_dir, manifest, relora, vocab, sample_bytes, force):
    stamp = {"vocab_size": vocab, "sample_bytes": sample_bytes,
             "train_shards": [sh["sha256"] for sh in manifest["splits"]["train"]["shards"]]}
    tok_path = os.path.join(out_dir, "tokenizer.json")
    old = manifest.get("tokenizer") or {}
    if (not force and old.get("stamp") == stamp and os.path.isfile(tok_path)
            and sha256_file(tok_path) == old.get("sha256")):
        log(f"  tokenizer.json up to date (vocab {old.get('vocab_size')})")
        return False
    t0 = time.time()
    blob, nfiles = tokenizer_sample(out_dir, manifest, sample_bytes)
    sample_path = os.path.join(out_dir, "tokenizer_sample.txt")
    write_atomic(sample_path, blob)
    log(f"  sample: {nfiles:,} train files, {mb(len(blob))} -> tokenizer_sample.txt")
    tmp = os.path.join(out_dir, ".tmp-tokenizer.json")
    out = run_relora(relora, ["tokenizer", "train", "--vocab-size", str(vocab), "--in", sample_path,
                              "--out", tmp], "tokenizer")
    os.replace(tmp, tok_path)
    m = re.search(r"vocab (\d+)", out)
    got_vocab = int(m.group(1)) if m else None
    secs = time.time() - t0
    log(f"  {out} -> tokenizer.json ({secs:.1f} s)")
    manifest["tokenizer"] = {"stamp": stamp, "sha256": sha256_file(tok_path), "vocab_size": got_vocab,
                             "sample_files": nfiles, "sample_bytes": len(blob),
                             "sample_sha256": sha256_bytes(blob)}
    manifest["seconds"]["tokenizer"] = round(secs, 1)
    manifest.pop("tokens", None)
    return True


def npy_token_count(path):
    """Length of a 1-D .npy array (from its header)."""
    with open(path, "rb") as f:
        head = f.read(10)
        if head[:6] != b"\x93NUMPY":
            raise FetchError(f"{path} is not a .npy file")
        hlen = int.from_bytes(head[8:10], "little") if head[6] == 1 else int.from_bytes(head[8:10] + f.read(2), "little")
        header = f.read(hlen).decode("latin-1")
    shape = header.split("'shape':")[1].split(")")[0].strip(" (")
    return int(shape.rstrip(",").strip())


def tokenize_splits(out_dir, manifest, relora, force):
    tok_sha = manifest["tokenizer"]["sha256"]
    tokens = manifest.setdefault("tokens", {})
    for s in SPLITS:
        info = manifest["splits"][s]
        stamp = {"tokenizer_sha256": tok_sha, "shards": [sh["sha256"] for sh in info["shards"]]}
        path = os.path.join(out_dir, f"{s}.npy")
        old = tokens.get(s) or {}
        if (not force and old.get("stamp") == stamp and os.path.isfile(path)
                and sha256_file(path) == old.get("sha256")):
            log(f"  {s}.npy up to date: {old['tokens']:,} tokens")
            continue
        start = time.time()
        tmp = os.path.join(out_dir, f".tmp-{s}.npy")
        args = ["tokenize", "--tokenizer", os.path.join(out_dir, "tokenizer.json")]
        for sh in info["shards"]:
            args += ["--in", os.path.join(out_dir, sh["file"])]
        out = run_relora(relora, args + ["--out", tmp], f"tokenize {s}")
        os.replace(tmp, path)
        n = npy_token_count(path)
        secs = time.time() - start
        log(f"  {s}.npy: {n:,} tokens, {info['text_bytes'] / max(n, 1):.2f} bytes/token, {secs:.1f} s "
            f"({info['text_bytes'] / 1e6 / max(secs, 1e-9):.2f} MB/s) | {out}")
        tokens[s] = {"stamp": stamp, "file": f"{s}.npy", "sha256": sha256_file(path), "tokens": n,
                     "bytes_per_token": round(info["text_bytes"] / max(n, 1), 4), "relora": out}
        manifest["seconds"][f"tokenize_{s}"] = round(secs, 1)
        write_manifest(out_dir, manifest)


def remove_stale_temporaries(*dirs):
    """Temporary files and directories of a run that was killed (ours all start with ".tmp-")."""
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.startswith(".tmp-"):
                path = os.path.join(d, name)
                if os.path.isdir(path):
                    for f in os.listdir(path):
                        os.unlink(os.path.join(path, f))
                    os.rmdir(path)
                else:
                    os.unlink(path)


def write_manifest(out_dir, manifest):
    write_atomic(os.path.join(out_dir, "manifest.json"),
                 (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def load_manifest(out_dir):
    try:
        with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------
# self-test


def self_test():
    import doctest
    failures, tests = doctest.testmod(sys.modules[__name__])
    if failures:
        raise FetchError(f"{failures} of {tests} doctests failed")
    # A synthetic corpus: two in-distribution packages and an OOD one, with duplicates across
    # splits, invalid UTF-8 and empty files. Every file lands in exactly one split, held-out sets
    # repeat no training content, and the val fraction is near its target.
    files = []
    for i in range(4000):
        files.append(("p", f"p/m{i}.py", f"def f{i}():\n    return {i}\n".encode()))
    for i in range(200):
        files.append(("q", f"q/dup{i}.py", f"def f{i}():\n    return {i}\n".encode()))  # dups of p
    files.append(("q", "q/bad.py", b"\xc3\x28"))
    files.append(("q", "q/empty.py", b"\n\n"))
    files += [("o", f"o/g{i}.py", f"G = {i % 50}\n".encode()) for i in range(100)]  # 50 distinct
    kept, dropped = assign(files, ood_package="o")
    rows = [(s, key, digest) for s in SPLITS for key, _, _, digest in kept[s]]
    check_disjoint(rows)
    assert sum(len(kept[s]) for s in SPLITS) == 4000 + 50, {s: len(kept[s]) for s in SPLITS}
    # A p file in val whose duplicate in q went to train is the copy dropped (train wins).
    assert dropped["q"]["invalid_utf8"] == 1 and dropped["q"]["empty"] == 1, dropped
    assert dropped["p"]["duplicate"] + dropped["q"]["duplicate"] == 200, dropped
    assert dropped["o"]["duplicate"] == 50 and len(kept["ood"]) == 50
    assert all(pkg == "o" for _, pkg, _, _ in kept["ood"])
    val = len(kept["val"])
    assert 30 <= val <= 90, val  # 1.5 % of 4000 = 60
    log(f"self-test: {tests} doctests passed; synthetic corpus: train {len(kept['train'])}, "
        f"val {val}, ood {len(kept['ood'])}, duplicates and invalid files dropped, "
        f"splits disjoint by path and content")


# --------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build the PyPI Python-source corpus, its tokenizer and "
                                             "token files (see the module docstring).")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "data", "corpus"),
                    help="output directory (default: %(default)s)")
    ap.add_argument("--relora", help="the relora executable (default: .build/release/relora, "
                                     "else .build/debug/relora)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default 8192)")
    ap.add_argument("--sample-mb", type=float, default=24,
                    help="MB of train files the tokenizer is trained on (default 24)")
    ap.add_argument("--no-tokenize", action="store_true", help="stop after the JSONL corpus")
    ap.add_argument("--force", action="store_true", help="rebuild every stage (downloads are kept)")
    ap.add_argument("--check", action="store_true",
                    help="verify an existing corpus (sha256s and split disjointness) and exit")
    ap.add_argument("--self-test", action="store_true",
                    help="run the doctests and a synthetic split/dedup check, then exit")
    args = ap.parse_args(argv)
    out_dir = os.path.abspath(args.out)
    try:
        if args.self_test:
            self_test()
            return 0
        manifest = load_manifest(out_dir)
        if args.check:
            if not corpus_up_to_date(out_dir, manifest):
                raise FetchError(f"{out_dir} holds no complete corpus matching this script; run it without --check")
            log(f"ok: {check_files_tsv(os.path.join(out_dir, 'files.tsv'))}")
            return 0
        t0 = time.time()
        os.makedirs(out_dir, exist_ok=True)
        remove_stale_temporaries(out_dir, os.path.join(out_dir, "download"))
        log(f"[1/4] downloading {len(PACKAGES)} pinned wheels into {os.path.join(out_dir, 'download')}")
        fetched, dl_secs = download(os.path.join(out_dir, "download"))
        if not args.force and corpus_up_to_date(out_dir, manifest):
            counts = ", ".join(f"{s} {manifest['splits'][s]['files']:,} files" for s in SPLITS)
            log(f"[2/4] corpus up to date: {mb(manifest['total_text_bytes'])} ({counts})")
            log(f"      check: {check_files_tsv(os.path.join(out_dir, 'files.tsv'))}")
        else:
            log("[2/4] extracting .py files")
            manifest = build_corpus(out_dir, os.path.join(out_dir, "download"))
            write_manifest(out_dir, manifest)
        manifest["seconds"]["download"] = round(dl_secs, 1)
        if args.no_tokenize:
            write_manifest(out_dir, manifest)
            log(f"done in {time.time() - t0:.1f} s (no tokenization) -> {out_dir}")
            return 0
        relora = find_relora(args.relora)
        log(f"[3/4] tokenizer (vocab {args.vocab_size}, sample {args.sample_mb:g} MB) with {relora}")
        if build_tokenizer(out_dir, manifest, relora, args.vocab_size, int(args.sample_mb * 1e6), args.force):
            write_manifest(out_dir, manifest)
        log("[4/4] tokenizing train, val, ood")
        tokenize_splits(out_dir, manifest, relora, args.force)
        write_manifest(out_dir, manifest)
        t = manifest["tokens"]
        log(f"done in {time.time() - t0:.1f} s -> {out_dir}: {mb(manifest['total_text_bytes'])} of text; "
            + ", ".join(f"{s} {manifest['splits'][s]['files']:,} files / {t[s]['tokens']:,} tokens" for s in SPLITS))
    except (FetchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
