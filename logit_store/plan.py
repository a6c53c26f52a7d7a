"""Which rows, in what order: the plan of reading one store or a weighted mixture of stores. numpy only.

Everything a training reads is decided here from metadata, before any record batch is decoded, as a pure
function of the stores, the settings and (seed, epoch):

- **which stores** (`parse_store_spec`, `open_stores`): `path[:weight]` specs, each store once, mixable (one
  tokenizer and vocabulary, `check_mixable`), and whether a model can read them (`check_store_for_model`: the
  one check of a store against a student's tokenizer and vocabulary, for every recipe);
- **where each row is** (`RowIndex`): every store's record batches in one list, global row numbers; and the
  decoded record batches held for reuse (`DecodedBatches`);
- **in what order** (`ReadPlan`): epoch order, the mixture's rows per store (`mixture_rows`), dealing to ranks
  and DataLoader workers, and the resume position (`state_dict`).

`stream.py` turns the plan into torch batches (`KDStream`); the transformers recipe (`student/hf_trainer.py`)
reads the same index and, for a mixture, the same epoch order.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from . import fs as storefs
from .faults import crash_point
from .fingerprint import recorded_tokenizers_differ, tokenizer_fingerprint, tokenizer_matches
from .reader import BatchRows, LogitStore

_MIX_KEY = 0x6D6978  # seeds where a mixture's stores interleave; the stores' own orders use [seed, epoch, store]


# ================================================================ which stores
def parse_store_spec(spec: str) -> tuple[str, float | None]:
    """`path` or `path:weight` (as `--store` takes it) -> (path, weight or None). Only a last `:<number>` is a
    weight, and not when it is a URL's port (`http://host:8080`, `...?endpoint_override=host:9000`; write
    `...host:9000:0.3` to weight such a store) or part of a local path that exists as given."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path or _is_url_port(spec, len(path)) or ("://" not in spec and os.path.exists(spec)):
        return spec, None
    try:
        value = float(weight)
    except ValueError:
        return spec, None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"store {spec!r}: the weight after ':' must be a positive number, got {weight!r}")
    return path, value


_NO_PORT_SCHEMES = {"s3", "gs", "gcs", "az", "abfs", "abfss", "memory", "file"}  # their URLs name no host:port


def _is_url_port(spec: str, colon: int) -> bool:
    """Whether the colon at `colon` separates a host from its port: in the authority of a URL whose scheme has
    ports (http://host:8080, hdfs://namenode:8020), or in a query value that names an endpoint or host and holds
    no port yet (`endpoint_override=host:9000`, `=http://host:9000`, `=[::1]:9000`)."""
    scheme = spec.find("://")
    if scheme >= 0 and spec[:scheme].lower() not in _NO_PORT_SCHEMES:
        authority_end = spec.find("/", scheme + 3)
        if authority_end < 0 or colon < authority_end:
            return True
    query = spec.find("?")
    if not 0 <= query < colon:
        return False
    eq = spec.rfind("=", query, colon)
    key = spec[max(spec.rfind("&", query, eq), query) + 1:eq].lower() if eq >= 0 else ""
    if not any(word in key for word in ("endpoint", "host", "proxy")):
        return False
    host = spec[eq + 1:colon].split("://", 1)[-1]
    return host.endswith("]") or ":" not in host


def parse_store_specs(specs: list[str]) -> tuple[list[str], list[float | None]]:
    """`--store` values -> (paths, weights: None where a spec gives none), each store listed once. Reads nothing:
    a training refuses these before it loads anything."""
    paths, weights = zip(*map(parse_store_spec, specs), strict=True) if specs else ((), ())
    _check_listed_once([(p, storefs.location(p)[0]) for p in paths])
    return list(paths), list(weights)


def _check_listed_once(where: list[tuple[str, Hashable]]) -> None:
    """(name as given, location) of each store: refuses a store listed twice."""
    seen: dict[Hashable, str] = {}
    for name, location in where:
        if location in seen:
            raise ValueError(f"the store {name} is listed twice (also as {seen[location]}): list it once, with a "
                             "weight if it should count more")
        seen[location] = name


def open_stores(stores: list[str | LogitStore], filesystem: pafs.FileSystem | None = None) -> list[LogitStore]:
    """The stores one run reads, opened and checked: each once, mixable, with rows, and ready to share their
    integrity checks with the DataLoader workers they are handed to (`LogitStore.share_hash_checks`: each shard is
    hashed once per run, not once per worker). Warns of a store still being written (its complete shards are
    read) and of sampled targets drawn from a top-K (biased gradients)."""
    if not stores:
        raise ValueError("no store to read")
    opened = [s if isinstance(s, LogitStore) else LogitStore.open(s, filesystem) for s in stores]
    for s in opened:
        s.share_hash_checks()
        m = s.manifest
        if m.status != "complete":
            warnings.warn(f"{s.root}: the store is still being written; reading its complete shards", stacklevel=3)
        if m.target.kind == "sampled" and m.target.sampled_from_top_k:
            warnings.warn(f"{s.root}: its sampled targets were drawn from the teacher's top-"
                          f"{m.target.sampled_from_top_k} plus one tail bucket, which biases the KD gradient "
                          "(docs/BUILD.md, 'Sampled targets'); rebuild it with --backend hf", stacklevel=3)
    check_mixable(opened)
    return opened


def check_mixable(stores: list[LogitStore]) -> None:
    """Stores mixed in one run: each once (weights say how often), and giving token ids one meaning (the same
    tokenizer and vocabulary)."""
    _check_listed_once([(s.root, (type(s.fs).__name__, storefs.location(s.root, s.fs)[0])) for s in stores])
    first = stores[0]
    for other in stores[1:]:
        a, b = first.manifest, other.manifest
        if a.vocab_size != b.vocab_size or recorded_tokenizers_differ(a.tokenizer, b.tokenizer):
            raise ValueError(
                f"the stores {first.root} (tokenizer {a.tokenizer.get('name_or_path')}, fingerprint "
                f"{a.tokenizer.get('fingerprint')}, vocabulary {a.vocab_size:,}) and {other.root} (tokenizer "
                f"{b.tokenizer.get('name_or_path')}, fingerprint {b.tokenizer.get('fingerprint')}, vocabulary "
                f"{b.vocab_size:,}) were built with different tokenizers or vocabularies: their token ids mean "
                "different things and cannot be mixed. Rebuild one with the other's tokenizer.")


def check_store_for_model(store: LogitStore, tokenizer: Any | None, vocab_size: int | None = None,
                          tokenizer_name: str = "the student's tokenizer",
                          cross_tokenizer: str | None = None) -> bool:
    """The student must speak the store's token ids: the store's tokenizer (same fingerprint; not checked when
    `tokenizer` is None), and, when `vocab_size` (its LM head's rows) is given, a vocabulary that holds every
    stored id. Every recipe (training,
    evaluation, the transformers Trainer) checks this before its first step: else it would run and report
    numbers that mean nothing. ValueError naming both tokenizers otherwise.

    With `cross_tokenizer` ("gold" or "uld": `kdstudent train --cross-tokenizer`) another tokenizer is accepted:
    the student then reads the store's rows as text (student/cross_tokenizer.py), not as ids, and its vocabulary
    need not hold them. Returns whether the tokenizers differ (so the rows must be read that way)."""
    m = store.manifest
    if tokenizer is not None and not tokenizer_matches(tokenizer, m.tokenizer):
        if cross_tokenizer is not None:
            return True
        mine = tokenizer_fingerprint(tokenizer, int(m.tokenizer.get("fingerprint_version", 1)))
        raise ValueError(f"the student's tokenizer ({tokenizer_name}, fingerprint {mine}) is not the one the store "
                         f"{store.root} was built with ({m.tokenizer.get('name_or_path')}, fingerprint "
                         f"{m.tokenizer.get('fingerprint')}): token ids would mean different things, or the "
                         "tokenizers add different special tokens. Use a student of the teacher's family, or "
                         "distil across tokenizers with --cross-tokenizer gold (or uld): the student then reads "
                         "the store's text with its own tokenizer (docs/TRAINING.md, 'Students of another "
                         "tokenizer').")
    if vocab_size is not None and vocab_size < m.vocab_size:
        raise ValueError(f"the student's vocabulary ({vocab_size}) is smaller than the store's {store.root} "
                         f"({m.vocab_size}): it cannot score every stored token id")
    return False


def domain_names(stores: list[LogitStore]) -> list[str]:
    """Every domain of every store, in order, once: what a batch's `domain` index points into."""
    return list(dict.fromkeys(n for s in stores for n in s.manifest.domain_names))


# ================================================================ where each row is
class RowIndex:
    """Every store's record batches ("units": the store's unit of compression) in one list, and global row
    numbers: store 0's rows in store order, then store 1's, ... The plan deals global row numbers; a reader finds
    a row's record batch here and decodes it whole."""

    def __init__(self, stores: list[LogitStore]):
        self.stores = stores
        self.store_units = [s.units() for s in stores]
        self.store_rows = [sum(n for _, _, n in units) for units in self.store_units]
        for s, n in zip(stores, self.store_rows, strict=True):
            if n == 0:
                raise ValueError(f"{s.root}: the store has no rows to read" + (
                    "" if s.manifest.status == "complete" else " yet (it is still being written)"))
        self.store_start = np.cumsum(self.store_rows) - self.store_rows  # first global row number of each store
        self.units = [(i, *u) for i, units in enumerate(self.store_units) for u in units]  # (store, file, b, rows)
        unit_rows = np.array([u[-1] for u in self.units], dtype=np.int64)
        self.unit_start = np.cumsum(unit_rows) - unit_rows
        self.rows = int(unit_rows.sum())

    def unit_of(self, rows: np.ndarray | int) -> np.ndarray | int:
        """The record batch (index into `units`) holding each global row."""
        return np.searchsorted(self.unit_start, rows, side="right") - 1

    def decode(self, unit: int) -> BatchRows:
        """Read and decode record batch `unit` (its rows decode when indexed)."""
        store, file, batch, _ = self.units[unit]
        reader = self.stores[store]
        return reader.decode_batch(file, reader.read_batch(file, batch))

    def layout(self) -> str:
        """Digest of the stores' record batch layouts (files and row counts), which a shuffled order depends on."""
        units = self.store_units[0] if len(self.stores) == 1 else self.store_units
        return hashlib.sha256(json.dumps(units).encode()).hexdigest()[:16]


class DecodedBatches:
    """Decoded record batches held for reuse, by key (a unit, or (unit, pass)): at most `capacity` of them, the
    least recently used dropped first (random access), or, with no capacity, each until `release`d (a reader
    that knows each record batch's last use from the plan). Pickled empty: DataLoader workers start without
    them (decoded batches hold views of Arrow buffers)."""

    def __init__(self, index: RowIndex, capacity: int | None = None):
        self.index, self.capacity = index, capacity
        self._held: OrderedDict[Hashable, BatchRows] = OrderedDict()

    def get(self, unit: int, key: Hashable | None = None) -> BatchRows:
        key = unit if key is None else key
        rows = self._held.get(key)
        if rows is None:
            rows = self._held[key] = self.index.decode(unit)
            if self.capacity is not None and len(self._held) > self.capacity:
                self._held.popitem(last=False)
        else:
            self._held.move_to_end(key)
        return rows

    def release(self, key: Hashable) -> None:
        self._held.pop(key, None)

    def __len__(self) -> int:
        return len(self._held)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _held=OrderedDict())


# ================================================================ in what order
MIX_BY = ("positions", "tokens")  # what a mixture weight is a share of (`mixture_rows`)


def _counts(stores: list[LogitStore], by: str) -> np.ndarray:
    """Each store's loss positions (`Manifest.target_positions`) or tokens (`Manifest.tokens`)."""
    if by not in MIX_BY:
        raise ValueError(f"mix_by {by!r}: one of {', '.join(MIX_BY)}")
    return np.array([s.manifest.target_positions if by == "positions" else s.manifest.tokens for s in stores],
                    np.float64)


def mixture_rows(stores: list[LogitStore], rows: list[int], weights: list[float | None],
                 by: str = "positions") -> tuple[list[int], list[float]]:
    """How many rows of each store (`rows` each) one epoch of a mixture holds, and each store's share (the weights
    resolved).

    A weight is a store's share of what the loss averages over: its loss positions (`by="positions"`, the
    default: `Manifest.target_positions`, the tokens that carry a target), or, with `by="tokens"`, of the rows'
    tokens (`Manifest.tokens`; the rule before loss positions, which a prompt-masked store's weight overstates:
    0.5 gave it 18 % of the loss positions). Stores without a weight share what the others leave, in proportion
    to their positions (tokens); all without one: every store once per epoch, whatever `by`. Weights given for
    every store are normalised. An epoch of the mixture holds as many rows as the stores together, split so each
    store's rows carry its share (within about one row's worth: rows are whole)."""
    for store, w in zip(stores, weights, strict=True):
        if w is not None and not 0 < w < float("inf"):
            raise ValueError(f"{store.root}: weight {w!r} is not a positive number")
    amount = _counts(stores, by)
    rows = np.array(rows, np.float64)
    free = np.array([w is None for w in weights])
    given = np.array([0.0 if w is None else w for w in weights])
    if free.all():
        share = amount / amount.sum()
    elif not free.any():
        share = given / given.sum()
    elif given.sum() >= 1:
        raise ValueError(f"the weights given ({given.sum():g} in all) leave nothing for the "
                         f"{int(free.sum())} store(s) without one: give every store a weight, or weights below 1")
    else:
        share = given + free * (1 - given.sum()) * amount / amount[free].sum()
    per_row = share / (amount / rows)  # rows needed for each unit of share
    exact = per_row / per_row.sum() * rows.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: int(rows.sum() - counts.sum())]] += 1  # largest remainders
    for store, n, w in zip(stores, counts, share, strict=True):
        if n == 0:
            raise ValueError(f"{store.root}: a weight of {w:.2g} gives it no row in an epoch of the mixture "
                             f"({int(rows.sum()):,} rows): raise its weight or leave the store out")
    return [int(n) for n in counts], [float(w) for w in share]


def epoch_shares(stores: list[LogitStore], rows: list[int], epoch_rows: list[int], by: str) -> list[float]:
    """Each store's expected share of an epoch's loss positions (`by="positions"`) or tokens, given the rows it
    gives per epoch (its rows at their mean length): what a run reports, whichever the weights were shares of."""
    per_epoch = _counts(stores, by) / np.array(rows, np.float64) * np.array(epoch_rows, np.float64)
    return [float(x) for x in per_epoch / per_epoch.sum()]


class ReadPlan:
    """The order in which one rank reads a store, or a weighted mixture of stores, epoch after epoch, and where
    it is in it (the resume position).

    Each epoch is planned from metadata only (no I/O), as a pure function of (seed, epoch):

    1. **Order.** The store's record batches are permuted, their rows concatenated, and the rows shuffled within
       consecutive windows of `shuffle_buffer` rows (a buffer >= the store's rows is a uniform shuffle). Rows
       stay near their record batch, so a reader holds only the record batches of about one window.
    2. **Mixture.** With several stores, an epoch holds as many rows as the stores together, n_i of them from
       store i (`mixture_rows`: n_i carry store i's share of the loss positions, or of the tokens with
       `mix_by="tokens"`). Each store keeps its own sequence of
       shuffled epochs (step 1) and the mixture takes the next n_i rows of it every epoch, so every row of a
       store comes once per pass over that store; the stores' rows are interleaved at seeded random places
       (stores in proportion, evenly spread, without `shuffle`). One store is the mixture of one.
    3. **Equal shares.** If the rows do not divide by `world_size`, the first rows of the order are appended
       again (DistributedSampler's wrap-around): every rank gets the same number of rows and batches per epoch,
       so ranks change epochs in lockstep. Every row is dealt once per epoch, and at most `world_size - 1` of
       them (the first of that epoch's order, different rows every shuffled epoch) a second time.
    4. **Batches.** Global batch j is rows [j·G, (j+1)·G) of the order, G = world_size × batch_size, and rank r
       takes the r-th slice of it in store order. So N processes with batch B see, step by step, the rows one
       process sees with batch N·B. The last global batch of an epoch may be short (split evenly), or dropped
       with `drop_last`.
    5. **Workers.** A rank's epoch is its list of batches; DataLoader worker w of W takes batches w, w + W, ...
       of it (`worker_batches`), which is the order DataLoader's round-robin delivers them in, so the order of
       batches does not depend on the number of workers.

    The unit of dealing is the row: any store serves any number of ranks up to its row count, whatever its
    record batch layout. The position is (epoch, batches done); `state_dict()` records it with every setting
    the order depends on, and `load_state_dict` refuses a change that would alter the order.
    """

    def __init__(self, index: RowIndex, batch_size: int, *, weights: list[float | None] | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 1024, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, mix_by: str = "positions"):
        weights = [None] * len(index.stores) if weights is None else list(weights)
        if len(weights) != len(index.stores):
            raise ValueError(f"{len(weights)} weights for {len(index.stores)} stores")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError(f"batch_size and shuffle_buffer must be >= 1, got {batch_size} and {shuffle_buffer}")
        self.index = index
        self.batch_size, self.shuffle, self.shuffle_buffer, self.seed = batch_size, shuffle, shuffle_buffer, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.batches_done = 0  # of this rank's batches this epoch
        self.rows = index.rows  # rows per epoch (one pass over every store's rows when unweighted)
        self.mix_by = mix_by
        self.epoch_rows, self.share = mixture_rows(index.stores, index.store_rows, weights, mix_by)
        # what each store gives an epoch, as shares of the loss positions and of the tokens (for the run's report)
        self.position_share, self.token_share = (epoch_shares(index.stores, index.store_rows, self.epoch_rows, by)
                                                 for by in MIX_BY)
        where = " and ".join(str(s.root) for s in index.stores)
        if self.rows < world_size:
            raise ValueError(f"{where}: {self.rows} rows, fewer than the {world_size} processes reading them; "
                             "every process needs rows of its own: use fewer processes")
        if len(self) == 0:
            raise ValueError(f"{where}: {self.rows} rows make no full batch of {batch_size} rows for each of "
                             f"{world_size} processes with drop_last: use a smaller batch or fewer processes")
        self._order: tuple | None = None  # (epoch, its padded global order, read passes), computed lazily

    # ------------------------------------------------------------ the order
    def store_order(self, store: int, epoch: int) -> np.ndarray:
        """Row numbers within store `store` in the order its own epoch `epoch` reads them (step 1)."""
        units, rows = self.index.store_units[store], self.index.store_rows[store]
        dtype = np.int32 if rows < 2**31 else np.int64
        if not self.shuffle:
            return np.arange(rows, dtype=dtype)
        # store 0 keeps the key a single store has always had, so runs from before mixing resume exactly
        rng = np.random.default_rng([self.seed, epoch] + ([store] if store else []))
        unit_rows = np.array([n for _, _, n in units], dtype=np.int64)
        unit_start = np.cumsum(unit_rows) - unit_rows
        perm = rng.permutation(len(units))
        counts = unit_rows[perm]
        first = np.repeat(unit_start[perm] - (np.cumsum(counts) - counts), counts)
        order = (first + np.arange(rows)).astype(dtype)
        for lo in range(0, rows, self.shuffle_buffer):
            rng.shuffle(order[lo:lo + self.shuffle_buffer])
        return order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global row numbers (stores concatenated) in the order epoch `epoch` deals them, wrap-around padding
        included."""
        return self.epoch_plan(epoch)[0]

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(epoch_order, the pass of its store each row is read in): a weighted store's rows of one mixture epoch
        can come from two or more of its own epochs (passes); a reader keeps a record batch only within one."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1:]
        taken, passes = [], []  # each store's next epoch_rows[i] rows of its own sequence of epochs (step 2)
        for i, (n, rows) in enumerate(zip(self.epoch_rows, self.index.store_rows, strict=True)):
            lo = epoch * n
            first, last = lo // rows, -(-(lo + n) // rows)
            sequence = np.concatenate([self.store_order(i, e) for e in range(first, last)])
            taken.append(sequence[lo - first * rows:lo - first * rows + n].astype(np.int64)
                         + self.index.store_start[i])
            passes.append((lo + np.arange(n)) // rows)
        if len(taken) == 1:
            order, read_pass = taken[0], passes[0]
        else:
            slots = np.repeat(np.arange(len(taken)), self.epoch_rows)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch, _MIX_KEY]).shuffle(slots)
            else:  # evenly spread: store i's k-th row at fraction (k + 1/2) / n_i of the epoch
                spread = np.concatenate([(np.arange(n) + 0.5) / n for n in self.epoch_rows])
                slots = slots[np.argsort(spread, kind="stable")]
            order, read_pass = np.empty(self.rows, np.int64), np.empty(self.rows, np.int64)
            for i, (rows, p) in enumerate(zip(taken, passes, strict=True)):
                order[slots == i], read_pass[slots == i] = rows, p
        pad = (-self.rows) % self.world_size  # wrap-around rows: read again, apart from their first reading
        order = np.concatenate([order, order[:pad]])
        read_pass = np.concatenate([read_pass, np.full(pad, -1)])
        self._order = (epoch, order, read_pass)
        return order, read_pass

    def batch_rows(self, index: int, epoch: int | None = None) -> np.ndarray:
        """Global row numbers of this rank's batch `index` of epoch `epoch` (default: the current one)."""
        return self.batch(index, epoch)[0]

    def batch(self, index: int, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(this rank's rows of batch `index`, the store pass each is read in)."""
        order, read_pass = self.epoch_plan(self.epoch if epoch is None else epoch)
        step = self.world_size * self.batch_size
        window = slice(index * step, (index + 1) * step)
        # sorted: rank r takes the r-th part of the batch's rows in store order, so over a window each rank
        # reads about 1/world_size of its record batches, not all of them (which ranks compute which rows of a
        # global batch does not change the step: its loss is normalised over the global batch)
        by_row = np.argsort(order[window], kind="stable")
        rows, passes = order[window][by_row], read_pass[window][by_row]
        spread = len(self.index.stores) > 1 and self.world_size > 1
        if spread:  # each store's rows split evenly over the ranks, each rank a contiguous run of them
            store = np.searchsorted(self.index.store_start, rows, side="right") - 1
            counts = np.bincount(store, minlength=len(self.index.stores))
            at = (np.arange(rows.size) - (np.cumsum(counts) - counts)[store] + 0.5) / counts[store]
            by_share = np.argsort(at, kind="stable")
            rows, passes = rows[by_share], passes[by_share]
        share = rows.size // self.world_size
        mine = slice(self.rank * share, (self.rank + 1) * share)
        rows, passes = rows[mine], passes[mine]
        if spread:
            by_row = np.argsort(rows, kind="stable")
            rows, passes = rows[by_row], passes[by_row]
        return rows, passes

    def worker_batches(self, worker: int = 0, workers: int = 1) -> range:
        """The batches of this epoch DataLoader worker `worker` of `workers` yields, from the resume position on
        (step 5): after a resume at batch b, worker w yields b + w, b + w + W, ..., so resuming continues the same
        sequence of batches, also with another worker count, also at an epoch boundary."""
        return range(self.batches_done + worker, len(self), workers)

    def rows_per_rank(self) -> int:
        """Rows this rank yields per epoch (the same on every rank)."""
        padded = -(-self.rows // self.world_size)
        return len(self) * self.batch_size if self.drop_last else padded

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank, whatever the number of workers)."""
        padded = -(-self.rows // self.world_size) * self.world_size
        step = self.world_size * self.batch_size
        return padded // step if self.drop_last else -(-padded // step)

    # ------------------------------------------------------------ the position
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches_done = 0

    def roll_over(self) -> None:
        """Start the next epoch if this one's batches were all read (a checkpoint taken right after an epoch's
        last batch resumes here), and mark the start of an epoch as a crash point for the fault tests."""
        if self.batches_done >= len(self):
            self.set_epoch(self.epoch + 1)
        if self.batches_done == 0:
            crash_point("epoch", self.epoch)

    def state_dict(self) -> dict:
        stores = self.index.stores
        fingerprints = [s.manifest.fingerprint() for s in stores]
        # a mixture on several ranks spreads each store's rows of a batch over the ranks (earlier: sorted runs)
        dealing = "rows, stores spread over ranks" if len(stores) > 1 and self.world_size > 1 else "rows"
        state = dict(dealing=dealing, epoch=self.epoch, batches_done=self.batches_done, seed=self.seed,
                     rank=self.rank, world_size=self.world_size, batch_size=self.batch_size, shuffle=self.shuffle,
                     shuffle_buffer=self.shuffle_buffer, drop_last=self.drop_last,
                     store=fingerprints[0] if len(fingerprints) == 1 else fingerprints, rows=self.rows,
                     layout=self.index.layout())
        if len(stores) > 1:
            state["mixture"] = self.epoch_rows  # rows of each store per epoch: the weights, as the order uses them
            state["mix_by"] = self.mix_by  # what the weights were shares of (absent: tokens, before positions)
        return state

    def _mixture_changed(self, state: dict) -> str:
        """Why a checkpoint's rows per store and epoch differ from this plan's: other weights, or weights read as
        shares of something else (a checkpoint without `mix_by` weighted by tokens)."""
        then, now = state.get("mix_by", "tokens"), self.mix_by
        name = {"positions": "loss positions", "tokens": "tokens"}
        why = (f"the checkpoint's weights were shares of the stores' {name[then]} and are shares of their "
               f"{name[now]} now"
               + (" (this checkpoint is from a moekd that weighted mixtures by tokens, before weights became shares "
                  "of the loss positions)" if "mix_by" not in state else "")
               + f": resume with --mix-by {then} (KDStream: mix_by={then!r}) to continue it exactly"
               if then != now else "the stores' weights changed: resume with the weights the run started with")
        return (f"cannot resume the reader exactly: the mixture gave each store {state.get('mixture')} rows per "
                f"epoch when the checkpoint was taken and gives {self.epoch_rows} now; {why}")

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses (ValueError, naming the setting) what would change the order of batches.
        Keys this plan does not record (the number of DataLoader workers) may change."""
        mine = self.state_dict()
        for key in ("world_size", "store", "dealing", "seed", "rank", "batch_size", "shuffle", "shuffle_buffer",
                    "drop_last", "rows", "layout", "mixture"):
            if key == "dealing" and state.get(key) != mine[key]:  # how the stores' rows are dealt to ranks
                raise ValueError(f"this reader position was saved by an earlier moekd that dealt batches to ranks "
                                 f"another way ({state.get('dealing', 'whole record batches')!r}); it cannot be "
                                 "continued exactly: finish the run with that version, or start a new run")
            if key == "mixture" and state.get(key) != mine.get(key):
                raise ValueError(self._mixture_changed(state))
            if state.get(key) != mine.get(key):
                raise ValueError(f"cannot resume the reader exactly: {key} was {state.get(key)!r} when the "
                                 f"checkpoint was taken and is {mine.get(key)!r} now")
        if not 0 <= state["batches_done"] <= len(self):
            raise ValueError(f"reader position {state['batches_done']} is outside an epoch of {len(self)} batches")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
