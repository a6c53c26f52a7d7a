"""Fingerprints that say whether two stores (or a store and a student) mean the same thing."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

_SAMPLE = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the id <-> token mapping and the special tokens: what makes token ids comparable."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_fingerprint(folder: str, sample: int | None = _SAMPLE) -> str:
    """Hash of a model folder's configs and weight files (names, sizes, contents).

    Configs are hashed whole. Weight files are hashed by their first and last `sample` bytes, which tells
    apart any two checkpoints in practice without reading gigabytes on every build worker; `sample=None`
    reads them whole, for checks that must be exact (a student's adapters are only valid on its own base).
    """
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".json") and "tokenizer" not in name:
            h.update(name.encode())
            with open(path, "rb") as f:
                h.update(f.read())
        elif name.endswith(_WEIGHT_SUFFIXES):
            size = os.path.getsize(path)
            h.update(f"{name}:{size}".encode())
            with open(path, "rb") as f:
                if sample is None:
                    while chunk := f.read(1 << 23):
                        h.update(chunk)
                else:
                    h.update(f.read(sample))
                    f.seek(max(size - sample, 0))
                    h.update(f.read(sample))
    return h.hexdigest()[:16]
