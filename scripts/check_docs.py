#!/usr/bin/env python3
"""Checks the links of every Markdown file in the repository (standard library only).

    python3 scripts/check_docs.py          # from anywhere inside the repository

Scans each *.md file git knows (tracked, or untracked and not ignored) and reports, as FILE:LINE, every
  - relative link (inline, reference-style, or an HTML href/src) whose target is not a file or directory
    of the repository (ignored files such as runs/ or data/ do not count: a fresh clone lacks them), or
    whose #anchor names no heading of the target Markdown file;
  - link that leads outside the repository (a `../` path above its root, or an absolute file path);
  - path in the text that leads outside the repository (`../` above its root) or names a Markdown file
    the repository does not have (such as a design note kept elsewhere).
Links with a scheme (https:, http:, mailto:) are not followed. Exits 1 if anything was reported, else 0,
and ends with one line: `check_docs: N files, M links, K dead`.
"""
import os
import re
import subprocess
import sys
import unicodedata

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"""<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
HTML_ANCHOR = re.compile(r"""<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
UP_PATH = re.compile(r"(?<![\w./-])((?:\.\./)+[\w.\-/]*)")
MD_MENTION = re.compile(r"(?<![\w./-])([\w.\-/]*[\w-]\.md)\b")


def repo_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "-C", here, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("check_docs: not inside a git repository")
    return out.stdout.strip()


def repo_files(root: str) -> list:
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    return sorted({p for p in out.stdout.decode().split("\0") if p and os.path.lexists(os.path.join(root, p))})


def slug(text: str) -> str:
    """GitHub's heading anchor: the heading's text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    kept = [c for c in text.lower() if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"]
    return "".join(kept).replace(" ", "-")


def anchors(lines: list) -> set:
    seen, out, fence = {}, set(), None
    for line in lines:
        m = FENCE.match(line)
        if m:
            fence = None if fence and m.group(1)[0] == fence else (fence or m.group(1)[0])
            continue
        if fence:
            continue
        out.update(HTML_ANCHOR.findall(line))
        h = HEADING.match(line)
        if h:
            s = slug(h.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def strip_code_spans(line: str) -> str:
    return re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)


def main() -> int:
    root = repo_root()
    files = repo_files(root)
    known = set(files)
    dirs = {""}
    for f in files:
        d = os.path.dirname(f)
        while d and d not in dirs:
            dirs.add(d)
            d = os.path.dirname(d)
    basenames = {os.path.basename(f) for f in files}
    md_files = [f for f in files if f.endswith(".md")]
    text_of, anchor_cache = {}, {}

    def lines_of(rel: str) -> list:
        if rel not in text_of:
            with open(os.path.join(root, rel), encoding="utf-8") as fh:
                text_of[rel] = fh.read().split("\n")
        return text_of[rel]

    def anchors_of(rel: str) -> set:
        if rel not in anchor_cache:
            anchor_cache[rel] = anchors(lines_of(rel))
        return anchor_cache[rel]

    def inside(rel_dir: str, path: str):
        """The repository-relative normalized path, or None when it leaves the repository."""
        joined = os.path.normpath(os.path.join(rel_dir, path))
        return None if joined == ".." or joined.startswith("../") or os.path.isabs(joined) else ("" if joined == "." else joined)

    problems, links = [], 0
    for md in md_files:
        rel_dir = os.path.dirname(md)
        fence = None
        for no, line in enumerate(lines_of(md), 1):
            m = FENCE.match(line)
            if m:
                fence = None if fence and m.group(1)[0] == fence else (fence or m.group(1)[0])
            bare = URL.sub(" ", line)
            for link in (INLINE_LINK, HTML_LINK, REF_DEF):
                bare = link.sub(" ", bare)  # links are judged as links below
            # Path text, in prose and code alike: nothing may lead outside the repository.
            for p in UP_PATH.findall(bare):
                if inside(rel_dir, p.rstrip(".")) is None:
                    problems.append(f"{md}:{no}: path leads outside the repository: {p}")
            for p in MD_MENTION.findall(bare):
                if "../" in p:
                    continue  # judged above
                cands = [inside(rel_dir, p), inside("", p.lstrip("/"))]
                if not any(c in known for c in cands if c is not None) and os.path.basename(p) not in basenames:
                    problems.append(f"{md}:{no}: names {p}, which is not in the repository")
            if fence or m:
                continue
            code_free = strip_code_spans(line)
            targets = [t for t in INLINE_LINK.findall(code_free)]
            targets += HTML_LINK.findall(code_free)
            r = REF_DEF.match(code_free)
            if r:
                targets.append(r.group(1))
            for raw in targets:
                links += 1
                target = raw[1:-1] if raw.startswith("<") and raw.endswith(">") else raw
                if SCHEME.match(target):
                    continue  # a web address (or mailto:), not a file of the repository
                path, _, anchor = target.partition("#")
                if not path:
                    dest = md
                elif path.startswith("/"):
                    problems.append(f"{md}:{no}: absolute path in a link (use a path relative to this file): {target}")
                    continue
                else:
                    dest = inside(rel_dir, path)
                    if dest is None:
                        problems.append(f"{md}:{no}: link leads outside the repository: {target}")
                        continue
                if dest not in known and dest not in dirs:
                    problems.append(f"{md}:{no}: dead link: {target}")
                    continue
                if anchor and dest.endswith(".md") and dest in known and anchor not in anchors_of(dest):
                    problems.append(f"{md}:{no}: dead anchor: {target} (no such heading in {dest})")
    for p in problems:
        print(p)
    print(f"check_docs: {len(md_files)} files, {links} links, {len(problems)} dead")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
