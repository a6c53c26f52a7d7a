"""What every teacher backend implements (`Teacher`) and shares; the backends themselves are hf.py and vllm.py."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np

from ..codecs import SampledTargets, TopKTargets

Row = tuple[np.ndarray, np.ndarray]


class TeacherError(ValueError):
    """The teacher cannot be loaded or does not fit the data (path, vocabulary)."""


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


def check_teacher_path(path: str) -> None:
    """A path-like teacher must be a directory; anything else is taken for a hub name."""
    if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise TeacherError(f"teacher {path!r} does not exist (expected a model directory or a hub name)")


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
