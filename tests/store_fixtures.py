"""Builders of teacher targets and small stores for the store tests (random but realistic: heavy-tailed)."""

from __future__ import annotations

import numpy as np

from logit_store import Manifest, SampledTargets, ShardWriter, StoreRow, TargetSpec, TopKTargets
from logit_store.codecs import sampled_from_draws


def random_logprobs(rng: np.random.Generator, n: int, vocab: int, scale: float = 3.0) -> np.ndarray:
    """[n, vocab] log-softmax of heavy-tailed random logits (peaked like a real LM's)."""
    logits = rng.standard_t(3, size=(n, vocab)) * scale
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def topk_of(logprobs: np.ndarray, k: int) -> TopKTargets:
    ids = np.argsort(-logprobs, axis=1)[:, :k]
    lp = np.take_along_axis(logprobs, ids, 1)
    rest = logprobs.copy()
    np.put_along_axis(rest, ids, -np.inf, 1)
    return TopKTargets(ids, lp, np.logaddexp.reduce(rest, axis=1))


def sampled_of(rng: np.random.Generator, logprobs: np.ndarray, n: int) -> SampledTargets:
    p = np.exp(logprobs)
    draws = np.stack([rng.choice(p.shape[1], size=n, p=row / row.sum()) for row in p])
    return sampled_from_draws(draws)


def random_row(rng: np.random.Generator, vocab: int, length: int, kind: str = "topk", k: int = 8,
               samples: int = 20, source_index: int = 0, loss_from: int = 1) -> tuple[StoreRow, np.ndarray]:
    """A row whose tokens from `loss_from` on carry a loss; returns it with its exact log-probs [P, V]."""
    ids = rng.integers(0, vocab, length)
    mask = np.zeros(length, bool)
    mask[max(loss_from, 1):] = True
    lp = random_logprobs(rng, int(mask.sum()), vocab)
    targets = topk_of(lp, k) if kind == "topk" else sampled_of(rng, lp, samples)
    return StoreRow(ids, mask, targets, source_index), lp


def target_spec(kind: str, k: int = 8, samples: int = 20) -> TargetSpec:
    return TargetSpec("topk", k=k) if kind == "topk" else TargetSpec("sampled", samples=samples)


def write_store(path: str, n_rows: int = 40, vocab: int = 500, kind: str = "topk", seed: int = 0,
                shard_tokens: int = 300, batch_tokens: int = 100, filesystem=None, domain: str | None = None,
                tokenizer: dict | None = None, **row_kw):
    """Write a store of random rows (every one of `domain`, if given; `tokenizer`: the manifest's tokenizer
    section); returns (manifest, rows, exact log-probs per row)."""
    rng = np.random.default_rng(seed)
    manifest = Manifest(target=target_spec(kind, row_kw.get("k", 8), row_kw.get("samples", 20)),
                        vocab_size=vocab, teacher={"name_or_path": "random"}, tokenizer=tokenizer or {})
    rows, exact = [], []
    with ShardWriter(path, manifest, shard_tokens=shard_tokens, batch_tokens=batch_tokens,
                     filesystem=filesystem) as w:
        for i in range(n_rows):
            row, lp = random_row(rng, vocab, int(rng.integers(4, 30)), kind, source_index=i, **row_kw)
            row.domain = domain
            w.write(row)
            rows.append(row)
            exact.append(lp)
    return w.manifest, rows, exact


def write_teacher_store(path: str, teacher_dir: str, rows: int, seq: int, rows_per_batch: int | None = None,
                        k: int = 16, n_docs: int = 120, corpus_seed: int = 4, domains: list[str] | None = None,
                        lengths: list[int] | None = None) -> str:
    """A store of a real (tiny) teacher's top-k targets: `rows` rows of exactly `seq` tokens of synthetic text, with
    its tokenizer's fingerprint, so that students of its family train on it. `rows_per_batch` rows per Arrow record
    batch (default: all in one); row i's domain is domains[i % len(domains)] (default: none) and its length
    lengths[i % len(lengths)] (≤ seq; default: seq)."""
    from transformers import AutoTokenizer

    from assets.synthetic import synthetic_corpus
    from logit_store.fingerprint import describe_tokenizer
    from logit_store.teachers.hf import HFTeacher

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = HFTeacher.from_pretrained(teacher_dir)
    ids = np.concatenate([tok(t + tok.eos_token).input_ids for t in synthetic_corpus(n_docs, seed=corpus_seed)])
    if ids.size < rows * seq:
        raise ValueError(f"{n_docs} synthetic documents hold {ids.size} tokens, fewer than {rows} x {seq}")
    token_rows = [ids[i * seq:i * seq + (lengths[i % len(lengths)] if lengths else seq)] for i in range(rows)]
    manifest = Manifest(target=TargetSpec("topk", k=k), vocab_size=teacher.vocab_size,
                        tokenizer=describe_tokenizer(tok, teacher_dir))
    masks = [np.arange(len(r)) > 0 for r in token_rows]  # every token but the first is predicted
    with ShardWriter(path, manifest, batch_tokens=seq * (rows_per_batch or rows)) as w:
        targets = teacher.topk(list(zip(token_rows, masks, strict=True)), k)
        for i, (r, m, t) in enumerate(zip(token_rows, masks, targets, strict=True)):
            w.write(StoreRow(r, m, t, i, domains[i % len(domains)] if domains else None))
    return path
