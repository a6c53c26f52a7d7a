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
    k = int(sizes[0]) if sizes.size and sizes[0] > 0 and (sizes == sizes[0]).all() else None  # topk: row sorts
    deltas, order = _sorted_rank_deltas(ranks, sizes, k)
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
    # [P] the teacher's exact log-prob of the row's own token at each position (every backend computes it; a store
    # keeps it only when built with label log-probs: FORMAT.md §3, `label_logprob`)
    labels: np.ndarray | None = None

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
    ids_hi: bytes | np.ndarray = b""  # codec v2: the rank deltas' high byte planes

    def column_values(self, columns: tuple[str, ...]) -> tuple:
        """The values of the named columns, in the order given."""
        return tuple(getattr(self, PAYLOAD_FIELD[c]) for c in columns)

    @classmethod
    def of_columns(cls, columns: tuple[str, ...], values) -> Payload:
        return cls(**{PAYLOAD_FIELD[c]: v for c, v in zip(columns, values, strict=True)})


# binary column of a shard -> Payload field
PAYLOAD_FIELD = {"target_ids": "ids", "target_values": "values", "target_tail": "tail", "target_sizes": "sizes",
                 "target_ids_hi": "ids_hi"}


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
    name = CODEC_NAME
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

    def encode(self, t: TopKTargets, order: IdOrder, contexts: np.ndarray | None = None) -> Payload:
        """`contexts` (each position's context token) is what codec v2 uses; v1 ignores it."""
        ids = np.asarray(t.ids, dtype=np.int64)
        lp = np.asarray(t.logprobs, dtype=np.float32)
        tail = tail_logmass(lp) if t.tail is None else np.asarray(t.tail, dtype=np.float64)
        sizes = np.full(ids.shape[0], self.k, dtype=np.int64)
        planes, perm = _encode_sorted_ranks(order.rank[ids.ravel()], sizes, self.width)
        return Payload(planes, quantize_logprobs(lp.ravel()[perm], self.levels).tobytes(),
                       quantize_logprobs(tail, self.levels).tobytes())

    def decode(self, p: Payload, n_positions: int, order: IdOrder, contexts: np.ndarray | None = None) -> Decoded:
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
    name = CODEC_NAME
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

    def encode(self, t: SampledTargets, order: IdOrder, contexts: np.ndarray | None = None) -> Payload:
        sizes = np.asarray(t.sizes, dtype=np.int64)
        planes, perm = _encode_sorted_ranks(order.rank[np.asarray(t.ids, dtype=np.int64)], sizes, self.width)
        counts = np.asarray(t.counts)[perm].astype(np.uint8)
        return Payload(planes, counts.tobytes(), np.asarray(t.tail_counts, dtype=np.uint8).tobytes(),
                       sizes.astype(np.uint8).tobytes())

    def decode(self, p: Payload, n_positions: int, order: IdOrder, contexts: np.ndarray | None = None) -> Decoded:
        """-> ids [P, S], log(count/N) [P, S], mask [P, S], tail log(count/N) [P]; S = the largest support.

        Position p's candidates fill its first sizes[p] slots, in stored order."""
        sizes = np.frombuffer(p.sizes, dtype=np.uint8).astype(np.int64)
        if sizes.size != n_positions:
            raise TargetError(f"{sizes.size} target sizes for {n_positions} positions")
        flat_ids = order.ids.take(_decode_sorted_ranks(p.ids, sizes, self.width))
        return self._grid(flat_ids, np.frombuffer(p.values, dtype=np.uint8), np.frombuffer(p.tail, dtype=np.uint8),
                          sizes, n_positions)

    def _grid(self, flat_ids: np.ndarray, counts: np.ndarray, tail_counts: np.ndarray, sizes: np.ndarray,
              n_positions: int) -> Decoded:
        """Flat candidates (position by position) -> the [P, S] grid `decode` returns."""
        if counts.size != flat_ids.size or tail_counts.size != n_positions:
            raise TargetError(f"{counts.size} counts for {flat_ids.size} candidates, {tail_counts.size} tail "
                              f"counts for {n_positions} positions")
        flat_lp = self._log_share.take(counts)
        tail = self._log_share.take(tail_counts)
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


# ================================================================ codec v2: context-ranked ids
# Codec v2 (`ctxrank-v2`, docs/FORMAT.md §4.6) codes each position's candidate ids through a per-shard context
# model: the input token that precedes the predicted token (the position's *context*) selects a list of the ids
# that followed it most often in the shard's first record batch; ids on the list are ranked by their place in
# it, all others after the list by their place in the shard's IdOrder. Sorted and delta-coded as in v1, these
# ranks are smaller than v1's, so their bytes compress better (measured in benchmarks/store_bench.py). The low
# byte of every delta goes to one column and the high bytes to another, so zstd (applied by Arrow per column
# buffer) sees homogeneous streams. Everything is vectorised numpy: no per-token Python and no arithmetic coder
# (one from `constriction` decoded ~40 M symbols/s per core here, below the ~130 M symbols/s a million top-64
# positions per second need; zstd's Huffman/FSE stages decode several hundred M/s).
CODEC_NAME_V2 = "ctxrank-v2"
CODEC_NAMES = {"v1": CODEC_NAME, "v2": CODEC_NAME_V2}
DEFAULT_LEVELS_V2 = 128


def default_levels(codec_name: str) -> int:
    """Probability levels `kdstore build` uses with a codec when --levels is not given."""
    return DEFAULT_LEVELS_V2 if codec_name == CODEC_NAME_V2 else DEFAULT_LEVELS


CONTEXT_MIN_COUNT = 16  # a context token gets a list when it precedes this many positions of the model's sample
CONTEXT_MIN_PAIR = 2  # an id enters a context's list when it is a candidate of that many of its positions
CONTEXT_MAX_LIST = 512  # list length cap
CONTEXT_MAX_SAMPLE = 1 << 15  # positions of the first record batch the model is learned from, at most
_MODEL_ZSTD_LEVEL = 9


def _planes(values: np.ndarray, width: int) -> bytes:
    """uint values -> `width` little-endian byte planes, concatenated (no range check)."""
    b = np.ascontiguousarray(values, dtype="<u4").view(np.uint8).reshape(-1, 4)
    return np.ascontiguousarray(b[:, :width].T).tobytes()


def _unplanes(data, width: int, n: int) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8, count=width * n).reshape(width, n)
    out = planes[0].astype(np.int64)
    for i in range(1, width):
        out |= planes[i].astype(np.int64) << (8 * i)
    return out


def rank_width(vocab_size: int) -> int:
    """Bytes per v2 rank delta: enough for CONTEXT_MAX_LIST + vocab_size - 1 (2 up to a vocabulary of 65,024)."""
    return id_width(vocab_size + CONTEXT_MAX_LIST)


def context_tokens(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """The context of each target of a row: the input token just before the predicted token
    (input_ids[t - 1] for each t with loss_mask[t]; loss_mask[0] is always False)."""
    input_ids, loss_mask = np.asarray(input_ids), np.asarray(loss_mask)
    return input_ids[:-1][loss_mask[1:]].astype(np.int64)


class ContextModel:
    """A shard's v2 model: its IdOrder plus, for some context tokens, a ranked list of ids.

    `contexts` (ascending token ids) each own a list of distinct ids given as IdOrder ranks (`entries`, the lists
    concatenated, `lengths` of each). The rank of id i at a position with context c is its index in c's list if
    it is on it, else len(list) + order.rank[i]; a position whose context has no list ranks ids as v1 does.
    """

    def __init__(self, order: IdOrder, contexts: np.ndarray, lengths: np.ndarray, entries: np.ndarray):
        v = order.vocab_size
        contexts, lengths = np.asarray(contexts, np.int64), np.asarray(lengths, np.int64)
        entries = np.asarray(entries, np.int64)
        if contexts.shape != lengths.shape or int(lengths.sum()) != entries.size or (lengths < 1).any() \
                or (lengths > CONTEXT_MAX_LIST).any():
            raise TargetError("context model: one list length (1..512) per context, adding up to the entries")
        if contexts.size and (contexts.min() < 0 or contexts.max() >= v or (np.diff(contexts) <= 0).any()):
            raise TargetError("context model: contexts must be ascending distinct ids within the vocabulary")
        if entries.size and (entries.min() < 0 or entries.max() >= v):
            raise TargetError("context model: list entries must be ranks within the vocabulary")
        self.order, self.vocab_size = order, v
        self.contexts, self.lengths, self.entries = contexts, lengths, entries
        n = contexts.size
        self.klass = np.full(v, n, np.int64)  # token -> its context class; n = no list
        self.klass[contexts] = np.arange(n)
        self.start = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=self.start[1:])
        self.length = np.append(lengths, 0).astype(np.int32)  # per class, class n (no list) has none
        self.start = self.start.astype(np.int32)
        # class * V + id of every entry, sorted, with its index in its list (to find an id's list index)
        cls = np.repeat(np.arange(n), lengths)
        index = np.arange(entries.size) - self.start[cls]
        entry_ids = order.ids[entries]
        if np.unique(cls * v + entry_ids).size != entries.size:
            raise TargetError("context model: a list names the same id twice")
        self._table = np.concatenate([entry_ids, order.ids]).astype(np.int32)  # see `ids_of`
        keys = cls * v + entry_ids
        sort = np.argsort(keys, kind="stable")
        self._keys = np.append(keys[sort], np.iinfo(np.int64).max)  # + a sentinel no key equals
        self._index = np.append(index[sort], 0)

    # ------------------------------------------------------------ learning and storage
    @classmethod
    def learn(cls, ids: np.ndarray, sizes: np.ndarray, contexts: np.ndarray, vocab_size: int,
              head_size: int = DEFAULT_ID_ORDER_HEAD) -> ContextModel:
        """From a sample: flat candidate ids, candidates per position (`sizes`) and each position's context.

        Lists: contexts seen at >= CONTEXT_MIN_COUNT positions; ids that are candidates at >= CONTEXT_MIN_PAIR of
        them, most frequent first (ties by IdOrder rank), at most CONTEXT_MAX_LIST. Deterministic."""
        ids, sizes = np.asarray(ids, np.int64), np.asarray(sizes, np.int64)
        contexts = np.asarray(contexts, np.int64)
        if sizes.size > CONTEXT_MAX_SAMPLE:
            keep = int(sizes[:CONTEXT_MAX_SAMPLE].sum())
            ids, sizes, contexts = ids[:keep], sizes[:CONTEXT_MAX_SAMPLE], contexts[:CONTEXT_MAX_SAMPLE]
        order = IdOrder.from_ids(ids, vocab_size, head_size)
        ctx_count = np.bincount(contexts, minlength=vocab_size)
        chosen = np.flatnonzero(ctx_count >= CONTEXT_MIN_COUNT)
        klass = np.full(vocab_size, -1, np.int64)
        klass[chosen] = np.arange(chosen.size)
        pos_class = np.repeat(klass[contexts], sizes)
        sel = pos_class >= 0
        keys, counts = np.unique(pos_class[sel] * vocab_size + ids[sel], return_counts=True)
        keep = counts >= CONTEXT_MIN_PAIR
        keys, counts = keys[keep], counts[keep]
        k_cls, k_rank = keys // vocab_size, order.rank[keys % vocab_size]
        s = np.lexsort((k_rank, -counts, k_cls))
        k_cls, k_rank = k_cls[s], k_rank[s]
        lengths = np.bincount(k_cls, minlength=chosen.size)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        within = np.arange(k_cls.size) - starts[k_cls]
        keep = within < CONTEXT_MAX_LIST
        k_cls, k_rank = k_cls[keep], k_rank[keep]
        lengths = np.minimum(lengths, CONTEXT_MAX_LIST)
        has = lengths > 0
        return cls(order, chosen[has], lengths[has], k_rank)

    def to_bytes(self) -> bytes:
        """The model as stored (docs/FORMAT.md §4.6.1): a zstd frame of
        u32 head length, u32 context count, then byte planes (4 each) of head ids, contexts, lengths, entries."""
        import pyarrow as pa

        raw = np.array([self.order.head.size, self.contexts.size], "<u4").tobytes() + b"".join(
            _planes(a, 4) for a in (self.order.head, self.contexts, self.lengths, self.entries))
        return np.array([len(raw)], "<u4").tobytes() + pa.Codec("zstd", compression_level=_MODEL_ZSTD_LEVEL) \
            .compress(raw, asbytes=True)

    @classmethod
    def from_bytes(cls, data: bytes, vocab_size: int) -> ContextModel:
        import pyarrow as pa

        try:
            size = int(np.frombuffer(data[:4], "<u4")[0])
            raw = pa.Codec("zstd").decompress(data[4:], decompressed_size=size, asbytes=True)
            n_head, n_ctx = (int(x) for x in np.frombuffer(raw[:8], "<u4"))
            at = 8
            head = _unplanes(raw[at:], 4, n_head)
            at += 4 * n_head
            contexts = _unplanes(raw[at:], 4, n_ctx)
            at += 4 * n_ctx
            lengths = _unplanes(raw[at:], 4, n_ctx)
            at += 4 * n_ctx
            n = int(lengths.sum())
            entries = _unplanes(raw[at:], 4, n)
            if at + 4 * n != len(raw):
                raise TargetError(f"context model holds {len(raw) - at - 4 * n} bytes more than it describes")
        except (IndexError, ValueError, OSError) as e:
            raise TargetError(f"context model is not readable ({e})") from None
        return cls(IdOrder(head, vocab_size), contexts, lengths, entries)

    # ------------------------------------------------------------ ranks
    def ranks(self, ids: np.ndarray, klass: np.ndarray) -> np.ndarray:
        """Ranks of flat `ids` whose positions' classes are `klass` (same length)."""
        keys = klass * self.vocab_size + ids
        at = np.searchsorted(self._keys, keys)
        hit = self._keys[at] == keys
        return np.where(hit, self._index[at],
                        self.length[klass] + self.order.rank[ids])

    def ids_of(self, ranks: np.ndarray, klass: np.ndarray) -> np.ndarray:
        """Inverse of `ranks`: `klass` is per rank, or per row of a 2-D `ranks` as a column [P, 1]."""
        length = self.length[klass]
        # one table, the lists then the IdOrder: a rank r < length is list entry start + r, else the order's
        # entry r - length, i.e. table index r + (E - length) with E = the number of list entries
        offset = np.where(ranks < length, self.start[klass], self.entries.size - length)
        offset += ranks
        return self._table.take(offset).astype(np.int64)


def _sorted_rank_deltas(ranks: np.ndarray, sizes: np.ndarray, fixed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Sort ranks within each position, delta-code from 0 at each position's start: (deltas, sort order)."""
    if fixed is not None:
        r2 = ranks.reshape(-1, fixed)
        order = np.argsort(r2, axis=1)
        r2 = np.take_along_axis(r2, order, 1)
        deltas = np.diff(r2, axis=1, prepend=0)
        if fixed > 1 and (deltas[:, 1:] == 0).any():
            pos = int(np.flatnonzero((deltas[:, 1:] == 0).any(1))[0])
            raise TargetError(f"target position {pos} lists the same token id twice")
        return deltas.ravel(), (order + np.arange(0, ranks.size, max(fixed, 1))[:, None]).ravel()
    seg = np.repeat(np.arange(sizes.size), sizes)
    order = np.lexsort((ranks, seg))
    r = ranks[order]
    deltas = np.diff(r, prepend=0)
    starts = _segment_starts(sizes)
    nonempty = sizes > 0
    deltas[starts[nonempty]] = r[starts[nonempty]]
    dup = deltas == 0
    dup[starts[nonempty]] = False
    if dup.any():
        raise TargetError(f"target position {int(seg[np.flatnonzero(dup)[0]])} lists the same token id twice")
    return deltas, order


def _split_deltas(deltas: np.ndarray, width: int) -> tuple[bytes, bytes]:
    """(low byte plane, the higher planes) of the deltas."""
    if deltas.size and int(deltas.max()) >> (8 * width):
        raise TargetError(f"rank delta does not fit in {width} bytes")
    b = np.ascontiguousarray(deltas, dtype="<u4").view(np.uint8).reshape(-1, 4)
    return b[:, 0].tobytes(), np.ascontiguousarray(b[:, 1:width].T).tobytes()


def _join_deltas(lo, hi, width: int) -> np.ndarray:
    """Inverse of `_split_deltas`: int32 deltas."""
    out = np.frombuffer(hi, dtype=np.uint8, count=0 if width == 1 else -1).astype(np.int32)
    lo = np.frombuffer(lo, dtype=np.uint8)
    if width == 1:
        return lo.astype(np.int32)
    if width == 3:
        planes = out.reshape(2, lo.size)
        out = planes[1] << 8
        out |= planes[0]
    elif out.size != lo.size:
        raise TargetError(f"{out.size} high bytes for {lo.size} rank deltas")
    out <<= 8
    out |= lo
    return out


class TopKCodecV2(TopKCodec):
    """`topk` targets, codec v2: context-ranked sorted ids (two columns) + sqrt-quantised values + tail."""

    name = CODEC_NAME_V2
    columns = ("target_ids", "target_values", "target_tail", "target_ids_hi")

    def __init__(self, k: int, vocab_size: int, levels: int = DEFAULT_LEVELS_V2):
        super().__init__(k, vocab_size, levels)
        self.width = rank_width(vocab_size)

    def encode(self, t: TopKTargets, model: ContextModel, contexts: np.ndarray) -> Payload:
        ids = np.asarray(t.ids, dtype=np.int64)
        lp = np.asarray(t.logprobs, dtype=np.float32)
        tail = tail_logmass(lp) if t.tail is None else np.asarray(t.tail, dtype=np.float64)
        klass = np.repeat(model.klass[np.asarray(contexts, np.int64)], self.k)
        deltas, perm = _sorted_rank_deltas(model.ranks(ids.ravel(), klass), None, self.k)
        lo, hi = _split_deltas(deltas, self.width)
        return Payload(lo, quantize_logprobs(lp.ravel()[perm], self.levels).tobytes(),
                       quantize_logprobs(tail, self.levels).tobytes(), ids_hi=hi)

    def decode(self, p: Payload, n_positions: int, model: ContextModel, contexts: np.ndarray) -> Decoded:
        """-> ids [P, k] (ascending rank), logprobs [P, k], mask [P, k] (all True), tail [P], renormalised."""
        deltas = _join_deltas(p.ids, p.ids_hi, self.width).reshape(n_positions, self.k)
        ranks = np.cumsum(deltas, axis=1, dtype=np.int32)
        ids = model.ids_of(ranks, model.klass[contexts][:, None])
        codes = np.frombuffer(p.values, dtype=np.uint8).reshape(n_positions, self.k)
        tail_codes = np.frombuffer(p.tail, dtype=np.uint8)
        lse = np.log(self._plut.take(codes).sum(1) + self._plut.take(tail_codes)).astype(np.float32)
        lp, tail = self._lut.take(codes) - lse[:, None], self._lut.take(tail_codes) - lse
        return ids, lp, np.ones(ids.shape, dtype=bool), tail


class SampledCodecV2(SampledCodec):
    """`sampled` targets, codec v2: context-ranked sorted ids (two columns) + counts + sizes + tail counts."""

    name = CODEC_NAME_V2
    columns = ("target_ids", "target_values", "target_tail", "target_sizes", "target_ids_hi")

    def __init__(self, samples: int, vocab_size: int):
        super().__init__(samples, vocab_size)
        self.width = rank_width(vocab_size)

    def encode(self, t: SampledTargets, model: ContextModel, contexts: np.ndarray) -> Payload:
        sizes = np.asarray(t.sizes, dtype=np.int64)
        klass = np.repeat(model.klass[np.asarray(contexts, np.int64)], sizes)
        deltas, perm = _sorted_rank_deltas(model.ranks(np.asarray(t.ids, dtype=np.int64), klass), sizes, None)
        lo, hi = _split_deltas(deltas, self.width)
        counts = np.asarray(t.counts)[perm].astype(np.uint8)
        return Payload(lo, counts.tobytes(), np.asarray(t.tail_counts, dtype=np.uint8).tobytes(),
                       sizes.astype(np.uint8).tobytes(), ids_hi=hi)

    def decode(self, p: Payload, n_positions: int, model: ContextModel, contexts: np.ndarray) -> Decoded:
        sizes = np.frombuffer(p.sizes, dtype=np.uint8).astype(np.int64)
        if sizes.size != n_positions:
            raise TargetError(f"{sizes.size} target sizes for {n_positions} positions")
        deltas = _join_deltas(p.ids, p.ids_hi, self.width)
        if deltas.size != int(sizes.sum()):
            raise TargetError(f"{deltas.size} candidate ids for {int(sizes.sum())} listed by the sizes")
        total = np.cumsum(deltas)
        starts = _segment_starts(sizes)
        base = np.where(starts > 0, total[np.maximum(starts - 1, 0)], 0) if total.size else starts
        ranks = total - np.repeat(base, sizes)
        flat_ids = model.ids_of(ranks, np.repeat(model.klass[contexts], sizes))
        return self._grid(flat_ids, np.frombuffer(p.values, dtype=np.uint8), np.frombuffer(p.tail, np.uint8),
                          sizes, n_positions)
