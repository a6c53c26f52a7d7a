"""Codec round trips: bounded error for top-k, lossless for sampled; malformed targets refused."""

import numpy as np
import pytest
from store_fixtures import random_logprobs, sampled_of, topk_of

from logit_store.codecs import (
    IdOrder,
    SampledCodec,
    TargetError,
    TopKCodec,
    TopKTargets,
    dequantize_table,
    quantize_logprobs,
)


def _kl_support(exact: TopKTargets, ids, lp, tail) -> np.ndarray:
    """KL(exact || decoded) over (candidates + tail bucket), per position, matching candidates by id."""
    order_e = np.argsort(exact.ids, 1)
    order_d = np.argsort(ids, 1)
    assert (np.take_along_axis(exact.ids, order_e, 1) == np.take_along_axis(ids, order_d, 1)).all()
    p = np.concatenate([np.take_along_axis(exact.logprobs, order_e, 1), exact.tail[:, None]], 1)
    q = np.concatenate([np.take_along_axis(lp, order_d, 1), tail[:, None]], 1)
    return (np.exp(p) * (p - q)).sum(1)


@pytest.mark.parametrize("vocab,k,levels", [(500, 8, 255), (49152, 64, 255), (151936, 16, 128)])
def test_topk_round_trip_error_is_bounded(vocab, k, levels):
    rng = np.random.default_rng(1)
    exact = topk_of(random_logprobs(rng, 40, vocab), k)
    if vocab > 65536:  # make sure ids beyond 16 bits and large gaps occur
        exact.ids[:, 0] = vocab - 1 - np.arange(40)
    codec = TopKCodec(k, vocab, levels)
    order = IdOrder.from_ids(exact.ids, vocab, head_size=64)
    ids, lp, mask, tail = codec.decode(codec.encode(exact, order), 40, order)
    assert mask.all()
    assert ids.dtype == np.int64 and ids.shape == (40, k)
    # decoded distributions are normalised over candidates + tail
    np.testing.assert_allclose(np.logaddexp(np.logaddexp.reduce(lp, 1), tail), 0, atol=1e-5)
    kl = _kl_support(exact, ids, lp, tail)
    assert kl.min() >= -1e-7
    assert kl.mean() <= (k + 1) / (3 * levels**2)  # the bound documented in docs/FORMAT.md


def test_quantiser_error_per_entry():
    p = np.random.default_rng(0).random(10_000) ** 4
    codes = quantize_logprobs(np.log(p), 255)
    back = np.exp(0.5 * dequantize_table(255)[codes].astype(np.float64))
    big = codes > 0
    assert np.abs(back[big] - np.sqrt(p[big])).max() <= 0.5 / 255 + 1e-7
    assert (np.sqrt(p[~big]) < 0.5 / 255).all()


@pytest.mark.parametrize("vocab", [300, 70_000])
def test_sampled_round_trip_is_lossless(vocab):
    rng = np.random.default_rng(2)
    t = sampled_of(rng, random_logprobs(rng, 30, vocab), 50)
    codec = SampledCodec(50, vocab)
    codec.validate(t)
    order = IdOrder.from_ids(t.ids, vocab)
    ids, lp, mask, tail = codec.decode(codec.encode(t, order), 30, order)
    sizes, ids, lp = mask.sum(1), ids[mask], lp[mask]  # the grid's candidates, flat, position by position
    assert (sizes == t.sizes).all() and np.isneginf(tail).all()
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for p, (s, n) in enumerate(zip(starts, sizes, strict=False)):
        want = dict(zip(t.ids[s:s + n].tolist(), t.counts[s:s + n].tolist(), strict=False))
        got = dict(zip(ids[s:s + n].tolist(), np.rint(np.exp(lp[s:s + n]) * 50).astype(int).tolist(), strict=False))
        assert got == want, p


def test_id_order_is_a_permutation_and_round_trips():
    order = IdOrder.from_ids(np.array([5, 5, 5, 9, 9, 2]), 12, head_size=2)
    assert order.ids[:2].tolist() == [5, 9]
    assert sorted(order.ids.tolist()) == list(range(12))
    assert (order.rank[order.ids] == np.arange(12)).all()
    again = IdOrder.from_bytes(order.to_bytes(), 12)
    assert (again.ids == order.ids).all()


def _topk(ids, lp):
    return TopKTargets(np.array(ids), np.array(lp, dtype=np.float32))


@pytest.mark.parametrize("targets,message", [
    (_topk([[1, 2]], [[-0.1, np.nan]]), "NaN or Inf"),
    (_topk([[1, 2]], [[-0.1, -np.inf]]), "NaN or Inf"),
    (_topk([[1, 2]], [[3.0, 1.0]]), "not logits"),
    (_topk([[1, 999]], [[-0.1, -3.0]]), "outside the vocabulary"),
    (_topk([[1, 2, 3]], [[-0.1, -3.0, -4.0]]), "shape"),
])
def test_malformed_topk_targets_are_refused(targets, message):
    with pytest.raises(TargetError, match=message):
        TopKCodec(2, 100).validate(targets)


def test_duplicate_ids_are_refused():
    codec = TopKCodec(2, 100)
    t = _topk([[4, 4]], [[-1.0, -2.0]])
    with pytest.raises(TargetError, match="same token id twice"):
        codec.encode(t, IdOrder(np.array([], dtype=np.int64), 100))


def test_sampled_counts_must_add_up_to_n():
    rng = np.random.default_rng(0)
    t = sampled_of(rng, random_logprobs(rng, 3, 50), 10)
    t.counts = t.counts.copy()
    t.counts[0] += 1
    with pytest.raises(TargetError, match="expected N = 10"):
        SampledCodec(10, 50).validate(t)
