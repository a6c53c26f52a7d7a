"""Codec v2 (`ctxrank-v2`): round trips over random distributions and edge cases, the context model's bytes,
and v2 stores through the writer, every reader path and a resumed build."""

import numpy as np
import pyarrow as pa
import pytest
from store_fixtures import random_logprobs, random_row, sampled_of, target_spec, topk_of

from logit_store import LogitStore, Manifest, ShardWriter, StoreRow
from logit_store.codecs import (
    CODEC_NAME_V2,
    CONTEXT_MIN_COUNT,
    ContextModel,
    SampledCodecV2,
    SampledTargets,
    TargetError,
    TopKCodecV2,
    TopKTargets,
    rank_width,
)
from logit_store.manifest import CodecSpec


def _model(rng, ids, sizes, contexts, vocab):
    return ContextModel.from_bytes(ContextModel.learn(ids, sizes, contexts, vocab, head_size=64).to_bytes(), vocab)


def _contexts(rng, n, vocab, repeat=True):
    """Context tokens that repeat (so that some get lists) or are spread."""
    pool = rng.integers(0, vocab, 3 if repeat else n)
    return pool[rng.integers(0, pool.size, n)] if repeat else pool


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("vocab,k", [(2, 1), (2, 2), (300, 1), (300, 8), (49152, 64), (151936, 16)])
def test_topk_v2_round_trip(seed, vocab, k):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3 * CONTEXT_MIN_COUNT))
    exact = topk_of(random_logprobs(rng, n, min(vocab, 4000)), k)
    if vocab > 4000:  # ids spread over the whole vocabulary, its last id included
        exact.ids = (exact.ids * (vocab // 4000)).astype(np.int64)
        exact.ids[0, 0] = vocab - 1
    contexts = _contexts(rng, n, vocab, repeat=bool(seed % 2))
    model = _model(rng, exact.ids.ravel(), np.full(n, k), contexts, vocab)
    codec = TopKCodecV2(k, vocab)
    codec.validate(exact)
    ids, lp, mask, tail = codec.decode(codec.encode(exact, model, contexts), n, model, contexts)
    assert ids.dtype == np.int64 and ids.shape == (n, k) and mask.all()
    assert (np.sort(ids, 1) == np.sort(exact.ids, 1)).all()
    np.testing.assert_allclose(np.logaddexp(np.logaddexp.reduce(lp, 1), tail), 0, atol=1e-5)
    # the same values as codec v1 at these levels, matched by id
    order_e, order_d = np.argsort(exact.ids, 1), np.argsort(ids, 1)
    p = np.concatenate([np.take_along_axis(exact.logprobs, order_e, 1), exact.tail[:, None]], 1)
    q = np.concatenate([np.take_along_axis(lp, order_d, 1), tail[:, None]], 1)
    with np.errstate(invalid="ignore"):
        kl = np.where(np.isfinite(p), np.exp(p) * (p - q), 0).sum(1)
    assert kl.mean() <= (k + 1) / (3 * codec.levels ** 2)


def test_topk_v2_all_mass_in_one_id_and_a_model_learned_elsewhere():
    """A model learned from other rows still codes any ids (those off its lists rank after them)."""
    rng = np.random.default_rng(3)
    vocab, k, n = 1000, 4, 40
    lp = np.full((n, k), -80.0, np.float32)
    lp[:, 0] = 0.0
    exact = TopKTargets(rng.permuted(np.tile(np.arange(vocab), (n, 1)), axis=1)[:, :k], lp, np.full(n, -np.inf))
    contexts = np.full(n, 7)
    other = _model(rng, rng.integers(0, vocab, n * k), np.full(n, k), contexts, vocab)
    codec = TopKCodecV2(k, vocab)
    ids, dec, _, tail = codec.decode(codec.encode(exact, other, contexts), n, other, contexts)
    assert (np.sort(ids, 1) == np.sort(exact.ids, 1)).all()
    top = np.take_along_axis(dec, np.argsort(ids, 1), 1)[np.argsort(exact.ids, 1) == 0]
    np.testing.assert_allclose(np.exp(dec.max(1)), 1, atol=1e-3)
    assert (tail < -10).all() and top.size == n


@pytest.mark.parametrize("vocab", [2, 300, 70_000])
def test_sampled_v2_round_trip_is_lossless_with_empty_positions(vocab):
    rng = np.random.default_rng(4)
    n = 50
    t = sampled_of(rng, random_logprobs(rng, n, min(vocab, 3000)), 20)
    # some positions have no candidate: every draw fell in the tail
    sizes = t.sizes.copy()
    empty = np.array([0, 7, n - 1])
    keep = ~np.isin(np.repeat(np.arange(n), sizes), empty)
    tails = t.tail_counts.copy()
    tails[empty] = 20
    sizes[empty] = 0
    t = SampledTargets(t.ids[keep] * (vocab // 3000 or 1) % vocab, t.counts[keep], sizes, tails)
    t.ids[-1] = vocab - 1 if t.ids.size and vocab - 1 not in t.ids[-sizes[-2]:] else t.ids[-1]
    contexts = _contexts(rng, n, vocab)
    codec = SampledCodecV2(20, vocab)
    codec.validate(t)
    model = _model(rng, t.ids, t.sizes, contexts, vocab)
    ids, lp, mask, tail = codec.decode(codec.encode(t, model, contexts), n, model, contexts)
    assert (mask.sum(1) == t.sizes).all()
    seg = np.repeat(np.arange(n), t.sizes)
    got = np.lexsort((ids[mask], seg))
    want = np.lexsort((t.ids, seg))
    assert (ids[mask][got] == t.ids[want]).all()
    np.testing.assert_allclose(np.exp(lp[mask][got]), t.counts[want] / 20, rtol=1e-6)
    np.testing.assert_allclose(np.exp(tail), t.tail_counts / 20, rtol=1e-6)


def test_v2_refuses_duplicates_and_bad_models():
    rng = np.random.default_rng(5)
    codec = TopKCodecV2(2, 100)
    model = _model(rng, np.arange(40) % 100, np.full(20, 2), np.zeros(20, np.int64), 100)
    with pytest.raises(TargetError, match="twice"):
        codec.encode(TopKTargets(np.array([[3, 3]]), np.log(np.array([[0.5, 0.4]])), None), model, np.zeros(1))
    blob = model.to_bytes()
    with pytest.raises(TargetError):
        ContextModel.from_bytes(blob[:-3], 100)
    with pytest.raises(TargetError):
        ContextModel.from_bytes(blob, 10)  # ids beyond a smaller vocabulary
    assert rank_width(49_152) == 2 and rank_width(65_100) == 3 and rank_width(151_936) == 3


def test_model_is_deterministic_and_lists_frequent_followers():
    rng = np.random.default_rng(6)
    n, k = 200, 3
    contexts = np.where(np.arange(n) % 2, 5, rng.integers(10, 100, n))
    ids = np.where(contexts[:, None] == 5, np.array([[42, 43, 44]]), rng.integers(0, 1000, (n, k)))
    a = ContextModel.learn(ids.ravel(), np.full(n, k), contexts, 1000)
    b = ContextModel.learn(ids.ravel(), np.full(n, k), contexts, 1000)
    assert a.to_bytes() == b.to_bytes()
    assert 5 in a.contexts
    c = int(np.flatnonzero(a.contexts == 5)[0])
    assert sorted(a.order.ids[a.entries[a.start[c]:a.start[c] + a.lengths[c]]].tolist()) == [42, 43, 44]
    klass = np.full(k, a.klass[5])
    assert sorted(a.ranks(np.array([42, 43, 44]), klass).tolist()) == [0, 1, 2]


# ---------------------------------------------------------------- stores
def _v2_manifest(kind: str, vocab: int, **kw) -> Manifest:
    return Manifest(target=target_spec(kind, kw.get("k", 8), kw.get("samples", 20)), vocab_size=vocab,
                    codec=CodecSpec(name=CODEC_NAME_V2, levels=128), teacher={"name_or_path": "random"})


def _rows(kind, vocab, n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        row, _ = random_row(rng, vocab, int(rng.integers(4, 40)), kind, source_index=i, **kw)
        row.input_ids = row.input_ids % 7  # few context tokens, so that the model has lists
        out.append(row)
    return out


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_v2_store_reads_back_through_every_path(tmp_path, kind):
    vocab = 400
    rows = _rows(kind, vocab, 30)
    path = str(tmp_path / "s")
    with ShardWriter(path, _v2_manifest(kind, vocab), shard_tokens=300, batch_tokens=100) as w:
        for r in rows:
            w.write(r)
    store = LogitStore.open(path)
    assert store.manifest.codec.name == CODEC_NAME_V2 and len(store.manifest.shards) > 1
    assert store.verify() == []
    for want, got in zip(rows, store, strict=True):
        t = want.targets
        flat = got.target_ids[got.target_mask]
        seg = np.repeat(np.arange(len(t)), got.target_mask.sum(1))
        exp_seg = np.repeat(np.arange(len(t)), t.sizes) if kind == "sampled" else np.repeat(np.arange(len(t)),
                                                                                            t.ids.shape[1])
        assert (flat[np.lexsort((flat, seg))] == np.ravel(t.ids)[np.lexsort((np.ravel(t.ids), exp_seg))]).all()
    assert store.row(7).source_index == 7
    # plain Arrow: the shards open with pyarrow and list the v2 columns
    table = pa.ipc.open_file(str(tmp_path / "s" / store.manifest.shards[0].file)).read_all()
    assert "target_ids_hi" in table.column_names and table.num_rows == store.manifest.shards[0].rows


def test_v2_store_written_twice_is_bit_identical(tmp_path):
    """Same rows, same settings -> the same bytes (what resumed builds rely on; tests/test_faults_build.py
    checks kills and resumes with the default codec, test_v2_resume below with v2)."""
    rows = _rows("topk", 300, 25, seed=2)
    digests = []
    for name in ("a", "b"):
        with ShardWriter(str(tmp_path / name), _v2_manifest("topk", 300), shard_tokens=250, batch_tokens=90) as w:
            for r in rows:
                w.write(r)
        digests.append([(s.file, s.sha256) for s in w.manifest.shards])
    assert digests[0] == digests[1]


def test_v2_resume_is_bit_identical(tmp_path):
    rows = _rows("topk", 300, 25, seed=3)
    ref = str(tmp_path / "ref")
    with ShardWriter(ref, _v2_manifest("topk", 300), shard_tokens=250, batch_tokens=90) as w:
        for r in rows:
            w.write(r)
    out = str(tmp_path / "out")
    w = ShardWriter(out, _v2_manifest("topk", 300), shard_tokens=250, batch_tokens=90)
    for r in rows[:15]:
        w.write(r)
    w.abort()  # as a crash leaves it: complete shards listed, the one in progress dropped
    w = ShardWriter(out, _v2_manifest("topk", 300), shard_tokens=250, batch_tokens=90, resume=True)
    for r in rows[w.rows:]:
        w.write(r)
    w.close()
    want = [(s.file, s.sha256) for s in LogitStore.open(ref).manifest.shards]
    assert [(s.file, s.sha256) for s in LogitStore.open(out).manifest.shards] == want
    assert LogitStore.open(out).verify() == []


def test_unknown_codec_is_refused(tmp_path):
    from logit_store.reader import StoreError

    path = str(tmp_path / "s")
    m = _v2_manifest("topk", 300)
    with ShardWriter(path, m) as w:
        w.write(_rows("topk", 300, 1)[0])
    text = (tmp_path / "s" / "manifest.json").read_text().replace(CODEC_NAME_V2, "ctxrank-v9")
    (tmp_path / "s" / "manifest.json").write_text(text)
    with pytest.raises(StoreError, match="ctxrank-v9"):
        LogitStore.open(path)


def test_v2_store_row_with_unlisted_context(tmp_path):
    """Rows whose context tokens the model never saw decode through the IdOrder alone."""
    rng = np.random.default_rng(9)
    rows = _rows("topk", 500, 12, seed=9)
    late = StoreRow(np.arange(400, 430), np.r_[False, np.ones(29, bool)], topk_of(random_logprobs(rng, 29, 500), 8))
    path = str(tmp_path / "s")
    with ShardWriter(path, _v2_manifest("topk", 500), shard_tokens=10_000, batch_tokens=100) as w:
        for r in [*rows, late]:
            w.write(r)
    got = list(LogitStore.open(path))[-1]
    assert (np.sort(got.target_ids, 1) == np.sort(late.targets.ids, 1)).all()
