"""Codecs: teacher targets <-> compact byte payloads (format v1, see docs/FORMAT.md).

Chosen by measurement (benchmarks/store_bench.py) on a real 135M teacher:
- ids dominate the bytes. Within a position they are sorted and delta-coded; before sorting they are mapped
  through a per-shard `IdOrder` that puts the ids the shard uses most first, so gaps are small. Deltas are
  split into byte planes (all low bytes, then all high bytes) so zstd sees homogeneous streams.
- probabilities are quantised uniformly in sqrt(p), the Fisher/Hellinger geometry: KL(p || p~) ~ 4 sum
  (sqrt p - sqrt p~)^2, so a uniform sqrt-grid spends bits where KL is sensitive (large p) and few on the
  many tiny entries. Expected error with L levels is at most about (k + 1) / (3 L^2) nats per position.
- zstd itself is applied by Arrow IPC to each column buffer (see writer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CODEC_NAME = "sqrtp-rankdelta-v1"
DEFAULT_LEVELS = 255
DEFAULT_ID_ORDER_HEAD = 4096
# Code 0 means sqrt(p) * L < 0.5; it decodes to the middle of that bin on the sqrt scale.
_ZERO_CODE_SQRT = 0.25


class TargetError(ValueError):
    """Malformed teacher targets (shape, range, NaN/Inf, duplicates)."""


def id_width(vocab_size: int) -> int:
    """Bytes per delta-coded id: 2 up to a 65,536 vocabulary, else 3 (up to 16.7M)."""
    if vocab_size <= 1 << 16:
        return 2
    if vocab_size <= 1 << 24:
        return 3
    raise TargetError(f"vocab_size {vocab_size} exceeds the format's limit of {1 << 24}")


# ---------------------------------------------------------------- probability quantisation
def quantize_logprobs(logprobs: np.ndarray, levels: int) -> np.ndarray:
    """log p -> uint8 code round(sqrt(p) * levels)."""
    return np.rint(np.exp(0.5 * logprobs.astype(np.float64)) * levels).clip(0, levels).astype(np.uint8)


def dequantize_table(levels: int) -> np.ndarray:
    """Lookup table code -> log p (float32, 256 entries)."""
    codes = np.arange(256, dtype=np.float64)
    codes[0] = _ZERO_CODE_SQRT
    return (2.0 * np.log(np.minimum(codes, levels) / levels)).astype(np.float32)


def tail_logmass(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum p) over the last axis: the mass the listed candidates leave out (-inf when none)."""
    covered = np.exp(logprobs.astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        return np.log1p(-np.minimum(covered, 1.0))


# ---------------------------------------------------------------- per-shard id order
class IdOrder:
    """A permutation of the vocabulary: the `head` ids in the order given, then all others ascending.

    Ranks (positions in this order) of a shard's frequent ids are small, so sorted rank gaps are small.
    Only the head is stored (in the shard's schema metadata); the rest of the permutation is implied.
    """

    def __init__(self, head: np.ndarray, vocab_size: int):
        head = np.asarray(head, dtype=np.int64)
        if head.size and (head.min() < 0 or head.max() >= vocab_size or np.unique(head).size != head.size):
            raise TargetError("id order head must hold distinct ids within the vocabulary")
        rest = np.ones(vocab_size, dtype=bool)
        rest[head] = False
        self.head = head
        self.vocab_size = vocab_size
        self.ids = np.concatenate([head, np.flatnonzero(rest)]).astype(np.int64)  # rank -> id
        self.rank = np.empty(vocab_size, dtype=np.int64)  # id -> rank
        self.rank[self.ids] = np.arange(vocab_size)

    @classmethod
    def from_ids(cls, ids: np.ndarray, vocab_size: int, head_size: int = DEFAULT_ID_ORDER_HEAD) -> IdOrder:
        """Order by how often each id occurs in `ids` (ties by id), keeping the `head_size` most used."""
        counts = np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=vocab_size)
        used = np.flatnonzero(counts)
        order = used[np.argsort(-counts[used], kind="stable")][:head_size]
        return cls(order, vocab_size)

    def to_bytes(self) -> bytes:
        return self.head.astype("<u4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, vocab_size: int) -> IdOrder:
        return cls(np.frombuffer(data, dtype="<u4"), vocab_size)


# ---------------------------------------------------------------- delta + byte planes
def _to_planes(values: np.ndarray, width: int) -> bytes:
    """uint32 values -> `width` little-endian byte planes, concatenated."""
    b = values.astype("<u4").view(np.uint8).reshape(-1, 4)
    if values.size and b[:, width:].any():
        raise TargetError(f"value does not fit in {width} bytes")
    return np.ascontiguousarray(b[:, :width].T).tobytes()


def _from_planes(data: bytes, width: int) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8).reshape(width, -1)
    out = planes[0].astype(np.int32)
    for i in range(1, width):
        out |= planes[i].astype(np.int32) << (8 * i)
    return out


def _segment_starts(sizes: np.ndarray) -> np.ndarray:
    starts = np.zeros(sizes.size, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return starts


def _encode_sorted_ranks(ranks: np.ndarray, sizes: np.ndarray, width: int) -> tuple[bytes, np.ndarray]:
    """Sort ranks within each segment, delta-code from 0 at each segment start. Returns (planes, sort order)."""
    seg = np.repeat(np.arange(sizes.size), sizes)
    if sizes.size and (sizes == sizes[0]).all():  # fixed width (topk): many small row sorts, much faster
        k = int(sizes[0])
        order = (np.argsort(ranks.reshape(-1, k), axis=1) + np.arange(0, ranks.size, max(k, 1))[:, None]).ravel()
    else:  # one sort on (segment, rank)
        order = np.argsort(seg * (int(ranks.max(initial=0)) + 1) + ranks)
    r = ranks[order]
    deltas = np.diff(r, prepend=0)
    starts = _segment_starts(sizes)
    nonempty = sizes > 0
    deltas[starts[nonempty]] = r[starts[nonempty]]
    dup = deltas == 0
    dup[starts[nonempty]] = False
    if dup.any():
        pos = int(seg[np.flatnonzero(dup)[0]])
        raise TargetError(f"target position {pos} lists the same token id twice")
    return _to_planes(deltas, width), order


def _decode_sorted_ranks(data: bytes, sizes: np.ndarray, width: int) -> np.ndarray:
    total = np.cumsum(_from_planes(data, width))
    if total.size == 0:
        return total
    starts = _segment_starts(sizes)
    base = np.where(starts > 0, total[np.maximum(starts - 1, 0)], 0)
    return total - np.repeat(base, sizes)


# ---------------------------------------------------------------- targets
@dataclass
class TopKTargets:
    """Top-k candidates for P predicted positions: ids/logprobs [P, k]; tail = log of the mass left out [P]."""

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray | None = None  # derived from the logprobs when None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class SampledTargets:
    """N draws per position, as unique ids with counts (ragged: `sizes[p]` entries for position p).

    `tail_counts[p]` counts draws that fell outside the K candidates they were drawn from (vLLM), else 0.
    """

    ids: np.ndarray  # [sum(sizes)]
    counts: np.ndarray  # [sum(sizes)]
    sizes: np.ndarray  # [P]
    tail_counts: np.ndarray  # [P]

    def __len__(self) -> int:
        return int(self.sizes.shape[0])


@dataclass
class Payload:
    """Encoded targets of one row: its values of the codec's binary `columns`, which are, in this order,
    target_ids, target_values, target_tail and (sampled only) target_sizes. `bytes` when encoded; the reader
    passes zero-copy uint8 views of the Arrow buffers instead."""

    ids: bytes | np.ndarray
    values: bytes | np.ndarray
    tail: bytes | np.ndarray
    sizes: bytes | np.ndarray = b""

    def column_values(self, n: int) -> tuple:
        """The values of the first n columns, in column order."""
        return (self.ids, self.values, self.tail, self.sizes)[:n]


# What every codec's `decode` returns for P positions of S slots each: ids [P, S] int64, log-probs [P, S] float32,
# mask [P, S] bool (which slots hold a candidate; the others hold 0) and tail [P] float32 (log of the mass outside
# the candidates, -inf when there is none). The reader and the trainer see only this, whatever the target kind.
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise TargetError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size})")


class TopKCodec:
    """`topk` targets: k sorted ids per position + sqrt-quantised probabilities + a quantised tail mass."""

    kind = "topk"
    columns = ("target_ids", "target_values", "target_tail")

    def __init__(self, k: int, vocab_size: int, levels: int = DEFAULT_LEVELS):
        if not 1 <= levels <= 255:
            raise ValueError("levels must be in [1, 255]")
        if not 1 <= k <= vocab_size:
            raise ValueError(f"k must be in [1, vocab_size={vocab_size}]")
        self.k, self.vocab_size, self.levels = k, vocab_size, levels
        self.width = id_width(vocab_size)
        self._lut = dequantize_table(levels)
        self._plut = np.exp(self._lut.astype(np.float64))

    def validate(self, t: TopKTargets) -> None:
        ids, lp = np.asarray(t.ids), np.asarray(t.logprobs)
        if ids.ndim != 2 or ids.shape[1] != self.k or lp.shape != ids.shape:
            raise TargetError(f"expected ids and logprobs of shape [positions, {self.k}], got "
                              f"{tuple(ids.shape)} and {tuple(lp.shape)}")
        _check_ids(ids, self.vocab_size)
        if not np.isfinite(lp).all():
            raise TargetError("log-probs contain NaN or Inf")
        if lp.size and lp.max() > 1e-3:
            raise TargetError(f"log-prob {float(lp.max()):.4g} > 0: pass log-probabilities, not logits")
        if t.tail is not None:
            tail = np.asarray(t.tail)
            if tail.shape != (ids.shape[0],) or np.isnan(tail).any() or (tail > 1e-3).any():
                raise TargetError("tail must be one log-mass <= 0 (or -inf) per position")

    def encode(self, t: TopKTargets, order: IdOrder) -> Payload:
        ids = np.asarray(t.ids, dtype=np.int64)
        lp = np.asarray(t.logprobs, dtype=np.float32)
        tail = tail_logmass(lp) if t.tail is None else np.asarray(t.tail, dtype=np.float64)
        sizes = np.full(ids.shape[0], self.k, dtype=np.int64)
        planes, perm = _encode_sorted_ranks(order.rank[ids.ravel()], sizes, self.width)
        return Payload(planes, quantize_logprobs(lp.ravel()[perm], self.levels).tobytes(),
                       quantize_logprobs(tail, self.levels).tobytes())

    def decode(self, p: Payload, n_positions: int, order: IdOrder) -> Decoded:
        """-> ids [P, k], logprobs [P, k], mask [P, k] (all True), tail [P]: renormalised to sum to 1."""
        deltas = _from_planes(p.ids, self.width).reshape(n_positions, self.k)
        ids = order.ids.take(np.cumsum(deltas, axis=1, dtype=np.int32))  # fixed width: per-row prefix sums
        codes = np.frombuffer(p.values, dtype=np.uint8).reshape(n_positions, self.k)
        tail_codes = np.frombuffer(p.tail, dtype=np.uint8)
        # Renormalise over (candidates + tail): quantisation leaves the sum slightly off 1. Probabilities come
        # from a 256-entry table, so no exp over [P, k].
        lse = np.log(self._plut.take(codes).sum(1) + self._plut.take(tail_codes)).astype(np.float32)
        lp, tail = self._lut.take(codes) - lse[:, None], self._lut.take(tail_codes) - lse
        return ids, lp, np.ones(ids.shape, dtype=bool), tail


class SampledCodec:
    """`sampled` targets (RS-KD): unique ids per position with their draw counts out of N."""

    kind = "sampled"
    columns = (*TopKCodec.columns, "target_sizes")

    def __init__(self, samples: int, vocab_size: int):
        if not 1 <= samples <= 255:
            raise ValueError("samples (N draws per position) must be in [1, 255]")
        self.samples, self.vocab_size = samples, vocab_size
        self.width = id_width(vocab_size)
        with np.errstate(divide="ignore"):  # count -> log(count / N); log 0 = -inf
            self._log_share = (np.log(np.arange(256, dtype=np.float64)) - np.log(samples)).astype(np.float32)

    def validate(self, t: SampledTargets) -> None:
        sizes, counts = np.asarray(t.sizes), np.asarray(t.counts)
        tails = np.asarray(t.tail_counts)
        if sizes.ndim != 1 or tails.shape != sizes.shape or np.asarray(t.ids).shape != counts.shape \
                or counts.shape != (int(sizes.sum()),):
            raise TargetError("sampled targets need ids/counts of length sum(sizes) and one tail count "
                              "per position")
        _check_ids(np.asarray(t.ids), self.vocab_size)
        if counts.size and counts.min() < 1:
            raise TargetError("sampled counts must be >= 1")
        seg = np.repeat(np.arange(sizes.size), sizes)
        totals = np.bincount(seg, weights=counts, minlength=sizes.size).astype(np.int64) + tails
        if (totals != self.samples).any():
            pos = int(np.flatnonzero(totals != self.samples)[0])
            raise TargetError(f"position {pos}: counts + tail count = {int(totals[pos])}, expected "
                              f"N = {self.samples} draws")

    def encode(self, t: SampledTargets, order: IdOrder) -> Payload:
        sizes = np.asarray(t.sizes, dtype=np.int64)
        planes, perm = _encode_sorted_ranks(order.rank[np.asarray(t.ids, dtype=np.int64)], sizes, self.width)
        counts = np.asarray(t.counts)[perm].astype(np.uint8)
        return Payload(planes, counts.tobytes(), np.asarray(t.tail_counts, dtype=np.uint8).tobytes(),
                       sizes.astype(np.uint8).tobytes())

    def decode(self, p: Payload, n_positions: int, order: IdOrder) -> Decoded:
        """-> ids [P, S], log(count/N) [P, S], mask [P, S], tail log(count/N) [P]; S = the largest support.

        Position p's candidates fill its first sizes[p] slots, in stored order."""
        sizes = np.frombuffer(p.sizes, dtype=np.uint8).astype(np.int64)
        if sizes.size != n_positions:
            raise TargetError(f"{sizes.size} target sizes for {n_positions} positions")
        flat_ids = order.ids.take(_decode_sorted_ranks(p.ids, sizes, self.width))
        flat_lp = self._log_share.take(np.frombuffer(p.values, dtype=np.uint8))
        tail = self._log_share.take(np.frombuffer(p.tail, dtype=np.uint8))
        width = int(sizes.max()) if sizes.size else 0
        # slot of each flat entry in the [P, width] grid: row * width + column
        starts = np.cumsum(sizes) - sizes
        slot = np.arange(flat_ids.size) + np.repeat(np.arange(n_positions) * width - starts, sizes)
        ids = np.zeros(n_positions * width, np.int64)
        lp = np.zeros(n_positions * width, np.float32)
        mask = np.zeros(n_positions * width, bool)
        ids[slot], lp[slot], mask[slot] = flat_ids, flat_lp, True
        shape = (n_positions, width)
        return ids.reshape(shape), lp.reshape(shape), mask.reshape(shape), tail


def sampled_from_draws(draws: np.ndarray, tail_id: int = -1) -> SampledTargets:
    """[P, N] drawn ids (tail_id marks a draw outside the candidates) -> SampledTargets."""
    draws = np.asarray(draws, dtype=np.int64)
    n_pos, n = draws.shape
    tails = (draws == tail_id).sum(1)
    pos = np.repeat(np.arange(n_pos), n)
    flat = draws.ravel()
    keep = flat != tail_id
    pairs = np.unique(np.stack([pos[keep], flat[keep]]), axis=1, return_counts=True)
    (upos, uids), counts = pairs
    sizes = np.bincount(upos, minlength=n_pos)
    return SampledTargets(uids, counts, sizes, tails)
