"""What every teacher backend implements (`Teacher`) and shares; the backends themselves are hf.py and vllm.py."""

from __future__ import annotations

import json
import os
import stat
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..codecs import SampledTargets, TopKTargets

Row = tuple[np.ndarray, np.ndarray]


class TeacherError(ValueError):
    """The teacher cannot be loaded or does not fit the data (path, vocabulary)."""


class TeacherWarning(UserWarning):
    """The teacher loads, but something about it likely makes its targets worse than they should be."""


class Teacher(ABC):
    backend: str
    name_or_path: str
    dtype: str
    vocab_size: int

    @abstractmethod
    def topk(self, rows: list[Row], k: int) -> list[TopKTargets]:
        """Top-k ids and log-probs per loss position, with the log of the mass outside them."""

    @abstractmethod
    def sample(self, rows: list[Row], n: int, seeds: list[int], from_top_k: int | None) -> list[SampledTargets]:
        """N draws per loss position (seeded per row), as unique ids with counts."""

    @abstractmethod
    def generate(self, prompts: list[np.ndarray], max_new_tokens: int, temperature: float,
                 seeds: list[int]) -> list[np.ndarray]:
        """A response per prompt (token ids, ending with EOS unless cut by max_new_tokens)."""

    def describe(self) -> dict:
        from ..fingerprint import model_fingerprint

        fp = model_fingerprint(self.name_or_path) if os.path.isdir(self.name_or_path) else None
        return {"name_or_path": self.name_or_path, "fingerprint": fp, "backend": self.backend, "dtype": self.dtype}


DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: str) -> str:
    """The dtype a teacher runs in: `auto` is float32 on every backend, whatever the checkpoint's dtype.

    Exactness first: a store is captured once and distilled from many times, and bf16 logits (8-bit mantissa)
    reorder a top-64's tail (on SmolLM2-135M the hf and vllm backends kept the same top-64 set at 17 % of
    positions at bf16, > 99.9 % at fp32). So both backends write the same store by default; ask for bfloat16
    explicitly where memory or speed matter more (the manifest records the dtype used).
    """
    if dtype == "auto":
        return "float32"
    if dtype not in DTYPES:
        raise TeacherError(f"dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    return dtype


# A teacher folder converted from another format (`kdstore prepare-teacher`) records what its source said:
# {"conversion_version": int, "source": file name, "add_bos_token": bool | null, "add_eos_token": bool | null}
SOURCE_RECORD = "moekd-source.json"


def read_source_record(folder: str) -> dict[str, Any] | None:
    """The folder's SOURCE_RECORD, or None (not a local folder, not converted, or unreadable)."""
    try:
        with open(os.path.join(os.path.expanduser(folder), SOURCE_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def bos_warning(bos_token_id: int | None, tokenizer: Any, teacher: str, tokenizer_from_teacher: bool) -> str | None:
    """Why the rows may lack the BOS the teacher expects (a much worse teacher, silently), or None.

    Warns when the teacher's config names a `bos_token_id` that the tokenizer knows as its BOS token but does
    not add, unless the teacher folder records that its source (a GGUF's `tokenizer.ggml.add_bos_token`) says
    not to add one. A config whose bos_token_id the tokenizer does not call its BOS (a default left in a config)
    is not warned about.
    """
    from ..fingerprint import special_tokens_added

    if bos_token_id is None or bos_token_id in special_tokens_added(tokenizer)["before"]:
        return None
    said = (read_source_record(teacher) or {}).get("add_bos_token") if tokenizer_from_teacher else None
    if said is False or (said is None and getattr(tokenizer, "bos_token_id", None) != bos_token_id):
        return None
    token = tokenizer.convert_ids_to_tokens(int(bos_token_id)) if bos_token_id < len(tokenizer) else "?"
    return (f"the teacher's config has bos_token_id {bos_token_id} ({token!r}) but its tokenizer does not add it, "
            "so no row starts with it; a teacher trained with a BOS is a much worse teacher without one. If "
            f"{teacher} was converted from GGUF by an older `kdstore prepare-teacher`, run it again (it now "
            "honours the GGUF's add_bos_token); or pass --tokenizer with one that adds the BOS. If the teacher was "
            "trained without a BOS, ignore this.")


def check_teacher_path(path: str) -> None:
    """A teacher that exists on disk (or looks like a path) must be a model folder whose files can be read; anything
    else is taken for a hub name. Says what the path is instead (a file, missing, not readable): a loader would call
    an unreadable weights file "No such file", and a file "does not exist"."""
    folder = os.path.expanduser(path)
    if not path.startswith((".", "/", "~")) and not os.path.lexists(folder):
        return  # a hub name
    try:
        is_dir = stat.S_ISDIR(os.stat(folder).st_mode)
    except FileNotFoundError:
        raise TeacherError(f"teacher {path!r} does not exist (expected a model directory or a hub name)") from None
    except OSError as e:  # EACCES on a folder above it, ENOTDIR (a file in the path), ELOOP, ...
        raise TeacherError(f"teacher {path!r} cannot be reached ({e.strerror}): check the path and its "
                           "permissions") from None
    if not is_dir:
        what = ("a GGUF file: convert it once with kdstore prepare-teacher --gguf FILE, then pass the folder it "
                "prints" if path.lower().endswith(".gguf") else "a file, not a model folder: pass the folder that "
                "holds config.json and the weights")
        raise TeacherError(f"teacher {path!r} is {what}")
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise TeacherError(f"teacher folder {path!r} cannot be listed ({e.strerror}): check its permissions") from None
    for name in sorted(names):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            continue
        try:
            os.close(os.open(file, os.O_RDONLY))
        except OSError as e:
            raise TeacherError(f"teacher file {file} exists but cannot be read ({e.strerror}): fix its "
                               f"permissions (chmod a+r {file}) or copy the teacher somewhere readable") from None


def draws_from_topk(ids: np.ndarray, logprobs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """[P, K] candidates -> [P, n] draws from (candidates + tail bucket); a tail draw is -1."""
    p = np.exp(logprobs.astype(np.float64))
    tail = np.clip(1.0 - p.sum(1, keepdims=True), 0.0, None)
    probs = np.concatenate([p, tail], 1)
    cdf = np.cumsum(probs / probs.sum(1, keepdims=True), 1)
    u = rng.random((ids.shape[0], n))
    pick = np.minimum((u[:, :, None] > cdf[:, None, :]).sum(-1), ids.shape[1])
    padded = np.concatenate([ids, np.full((ids.shape[0], 1), -1)], 1)
    return np.take_along_axis(padded, pick, 1)
