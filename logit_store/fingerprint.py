"""Fingerprints that say whether two stores (or a store and a student) mean the same thing."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

_SAMPLE = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


TOKENIZER_FINGERPRINT_VERSION = 2
# the text `special_tokens_added` encodes: what a tokenizer puts around any text shows around this one
_PROBE = "Hello world"


def special_tokens_added(tokenizer: Any) -> dict[str, list[int]]:
    """The ids `tokenizer(text)` puts before and after a text's own tokens (BOS, EOS, ...): what a model sees
    around every row, and what a student tokenizer must add the same way at inference."""
    with_special = [int(i) for i in tokenizer(_PROBE, add_special_tokens=True)["input_ids"]]
    bare = [int(i) for i in tokenizer(_PROBE, add_special_tokens=False)["input_ids"]]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start:start + len(bare)] == bare:
            return {"before": with_special[:start], "after": with_special[start + len(bare):]}
    return {"before": with_special, "after": []}  # the special tokens change the text's own tokens: keep it all


def tokenizer_fingerprint(tokenizer: Any, version: int = TOKENIZER_FINGERPRINT_VERSION) -> str:
    """Hash of what makes token ids comparable between a store and a student.

    Version 1 (stores written before fingerprint_version was recorded): the id <-> token mapping and the special
    tokens. Version 2 adds the special-token behaviour: what encoding adds around a text (`special_tokens_added`)
    and the chat template, so that two tokenizers that differ only in, say, adding a BOS differ.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    content: dict[str, Any] = {"vocab": vocab, "special": special}
    if version == 2:
        content["added"] = special_tokens_added(tokenizer)
        content["chat_template"] = getattr(tokenizer, "chat_template", None)
    elif version != 1:
        raise ValueError(f"tokenizer fingerprint version {version} is newer than this tool knows "
                         f"({TOKENIZER_FINGERPRINT_VERSION}): upgrade the tool")
    blob = json.dumps(content, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_tokenizer(tokenizer: Any, name_or_path: str) -> dict[str, Any]:
    """The manifest's `tokenizer` section: name, fingerprint (and its version), vocabulary size, and the ids it
    adds around every text (informative: the fingerprint covers them)."""
    return {"name_or_path": name_or_path, "fingerprint": tokenizer_fingerprint(tokenizer),
            "fingerprint_version": TOKENIZER_FINGERPRINT_VERSION, "vocab_size": len(tokenizer),
            "special_tokens_added": special_tokens_added(tokenizer)}


def tokenizer_matches(tokenizer: Any, recorded: dict[str, Any]) -> bool:
    """Whether `tokenizer` is the one a store was built with, given the manifest's `tokenizer` section.

    Computes the fingerprint the way the store's version did (a manifest without `fingerprint_version` has
    version 1), so stores written before version 2 still match the same tokenizer. True when the store records
    no fingerprint (nothing to disagree with).
    """
    if not recorded.get("fingerprint"):
        return True
    version = int(recorded.get("fingerprint_version", 1))
    return tokenizer_fingerprint(tokenizer, version) == recorded["fingerprint"]


def recorded_tokenizers_differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two manifests' `tokenizer` sections certainly name different tokenizers: both fingerprinted the
    same way, with different results. (Fingerprints of different versions cannot be compared without the
    tokenizer itself; training checks each store against the student's tokenizer with `tokenizer_matches`.)"""
    if not (a.get("fingerprint") and b.get("fingerprint")):
        return False
    same_version = int(a.get("fingerprint_version", 1)) == int(b.get("fingerprint_version", 1))
    return same_version and a["fingerprint"] != b["fingerprint"]


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
