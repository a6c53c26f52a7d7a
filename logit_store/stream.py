"""The training stream over a store, or a weighted mixture of stores: `KDStream` deals their rows to ranks and
DataLoader workers, shuffled and resumable, and yields them as `KDBatch`es of torch tensors (`collate`);
`StoreLoader` runs it in worker processes.

`KDBatch` is the contract between the store and the loss: student/losses.py, student/evaluate.py and the
benchmarks read batches by these keys and know nothing else of the store.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import TypedDict

import numpy as np
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .faults import crash_point
from .fingerprint import recorded_tokenizers_differ
from .reader import BatchRows, DecodedRow, LogitStore, StoreError


class KDBatch(TypedDict):
    """A batch of B rows, right-padded to T tokens, aligned with a causal LM's logits: every [B, T] entry at
    position t describes the prediction the logits at t make, i.e. of token t + 1. S = the most candidates any
    position in the batch has (k for topk targets). Entries where loss_mask is False are padding (0, or -100
    for labels) and are ignored, as are slots where target_mask is False.
    """

    input_ids: torch.Tensor  # [B, T] int64: the tokens, padded with pad_id
    attention_mask: torch.Tensor  # [B, T] int64: 1 on the row's tokens, 0 on padding
    labels: torch.Tensor  # [B, T] int64: token t + 1 where position t carries a loss, else -100 (already shifted)
    loss_mask: torch.Tensor  # [B, T] bool: position t carries a loss (labels != -100)
    target_ids: torch.Tensor  # [B, T, S] int64: the teacher's candidate ids for token t + 1
    target_logprobs: torch.Tensor  # [B, T, S] float32: their log-probs (topk: log p; sampled: log(count / N))
    target_mask: torch.Tensor  # [B, T, S] bool: which slots hold a candidate
    target_tail: torch.Tensor  # [B, T] float32: log of the teacher mass outside the candidates (-inf: none)
    source_index: torch.Tensor  # [B] int64: the input example each row came from (-1 if unknown)
    domain: torch.Tensor  # [B] int64: the row's domain as an index into the domain_names given to collate (-1: none)


def collate(rows: list[DecodedRow], pad_id: int = 0, domains: list[str] | None = None) -> KDBatch:
    """Rows -> a `KDBatch`: right-padded tensors aligned with the student's logits (position t predicts t + 1).

    `domains`: the names a row's domain is looked up in (`Manifest.domain_names`) for the `domain` index."""
    bsz, seq = len(rows), max(r.input_ids.size for r in rows)
    width = max((r.target_ids.shape[1] for r in rows), default=0)
    input_ids = np.full((bsz, seq), pad_id, np.int64)
    attention = np.zeros((bsz, seq), np.int64)
    labels = np.full((bsz, seq), -100, np.int64)
    loss_mask = np.zeros((bsz, seq), bool)
    t_ids = np.zeros((bsz, seq, width), np.int64)
    t_lp = np.zeros((bsz, seq, width), np.float32)
    t_mask = np.zeros((bsz, seq, width), bool)
    t_tail = np.zeros((bsz, seq), np.float32)
    for b, r in enumerate(rows):
        n = r.input_ids.size
        input_ids[b, :n] = r.input_ids
        attention[b, :n] = 1
        pos = r.positions - 1  # the position whose logits predict each labelled token
        labels[b, pos] = r.input_ids[r.positions]
        loss_mask[b, pos] = True
        s = r.target_ids.shape[1]
        t_ids[b, pos, :s], t_lp[b, pos, :s], t_mask[b, pos, :s] = r.target_ids, r.target_logprobs, r.target_mask
        t_tail[b, pos] = r.target_tail
    out = dict(input_ids=input_ids, attention_mask=attention, labels=labels, loss_mask=loss_mask,
               target_ids=t_ids, target_logprobs=t_lp, target_mask=t_mask, target_tail=t_tail,
               source_index=np.array([r.source_index for r in rows], np.int64),
               domain=np.array([_domain_index(r.domain, domains) for r in rows], np.int64))
    return KDBatch(**{k: torch.from_numpy(v) for k, v in out.items()})


def _domain_index(domain: str | None, domains: list[str] | None) -> int:
    if domain is None:
        return -1
    if not domains or domain not in domains:
        raise ValueError(f"row of domain {domain!r}, which is not among the store's domains {domains}")
    return domains.index(domain)


_MIX_KEY = 0x6D6978  # seeds where a mixture's stores interleave; the stores' own orders use [seed, epoch, store]


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


def mixture_rows(stores: list[LogitStore], rows: list[int], weights: list[float | None]) -> tuple[list[int],
                                                                                                list[float]]:
    """How many rows of each store (`rows` each) one epoch of a mixture holds, and each store's share of the tokens.

    A weight is a store's share of the tokens the student trains on (rows' tokens, `Manifest.tokens`). Stores without
    one share what the others leave, in proportion to their tokens (all without one: every store in proportion to
    its tokens, so an epoch reads each store once); weights given for every store are normalised. An epoch of the
    mixture holds as many rows as the stores together, split so each store's rows carry its share of the tokens."""
    for store, w in zip(stores, weights, strict=True):
        if w is not None and not 0 < w < float("inf"):
            raise ValueError(f"{store.root}: weight {w!r} is not a positive number")
    tokens = np.array([s.manifest.tokens for s in stores], np.float64)
    rows = np.array(rows, np.float64)
    free = np.array([w is None for w in weights])
    given = np.array([0.0 if w is None else w for w in weights])
    if free.all():
        share = tokens / tokens.sum()
    elif not free.any():
        share = given / given.sum()
    elif given.sum() >= 1:
        raise ValueError(f"the weights given ({given.sum():g} in all) leave nothing for the "
                         f"{int(free.sum())} store(s) without one: give every store a weight, or weights below 1")
    else:
        share = given + free * (1 - given.sum()) * tokens / tokens[free].sum()
    per_row = share / (tokens / rows)  # rows needed for each unit of token share
    exact = per_row / per_row.sum() * rows.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: int(rows.sum() - counts.sum())]] += 1  # largest remainders
    for store, n, w in zip(stores, counts, share, strict=True):
        if n == 0:
            raise ValueError(f"{store.root}: a weight of {w:.2g} gives it no row in an epoch of the mixture "
                             f"({int(rows.sum()):,} rows): raise its weight or leave the store out")
    return [int(n) for n in counts], [float(w) for w in share]


def domain_names(stores: list[LogitStore]) -> list[str]:
    """Every domain of every store, in order, once: what a batch's `domain` index points into."""
    return list(dict.fromkeys(n for s in stores for n in s.manifest.domain_names))


def check_mixable(stores: list[LogitStore]) -> None:
    """Stores mixed in one run: each once (weights say how often), and giving token ids one meaning (the same
    tokenizer and vocabulary)."""
    def where(s: LogitStore) -> str:
        local = isinstance(s.fs, pafs.LocalFileSystem)
        return os.path.realpath(s.root) if local else s.root.rstrip("/")

    for i, s in enumerate(stores):
        for t in stores[:i]:
            if where(s) == where(t) and s.fs.equals(t.fs):
                raise ValueError(f"the store {s.root} is listed twice (also as {t.root}): list it once, with a "
                                 "weight if it should count more")
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


class KDStream(IterableDataset):
    """Streams batches of a store, or of a weighted mixture of stores, for training: shuffled, dealt to ranks and
    DataLoader workers, resumable.

    Each epoch is planned first, from metadata only (no I/O), as a pure function of (seed, epoch):

    1. **Order.** The store's record batches are permuted, their rows concatenated, and the rows shuffled within
       consecutive windows of `shuffle_buffer` rows (a buffer >= the store's rows is a uniform shuffle). Rows
       stay near their record batch, so a reader holds only the record batches of about one window.
    2. **Mixture.** With several stores, an epoch holds as many rows as the stores together, n_i of them from
       store i (`mixture_rows`: n_i carry store i's share of the tokens). Each store keeps its own sequence of
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

    The unit of dealing is the row: any store serves any number of ranks up to its row count, whatever its
    record batch layout. A rank's epoch is its list of batches; DataLoader worker w of W yields batches
    w, w + W, ... of it, which is the order DataLoader's round-robin delivers them in, so the order of batches
    does not depend on `num_workers`. `state_dict()` is (epoch, batches done); after a resume at batch b worker
    w yields batches b + w, b + w + W, ..., so resuming continues the same sequence of batches, also with another
    worker count, also at an epoch boundary.

    `store`: one store, or a list of them; `weights`: each store's share of the tokens, None where unset
    (`mixture_rows`). Mixed stores must share a tokenizer and vocabulary; they may differ in target kind and k
    (`collate` pads candidates to the widest). Iterate it directly (num_workers=0) or through `StoreLoader`,
    which tracks the position across workers.
    """

    def __init__(
        self,
        store: str | LogitStore | list[str | LogitStore],
        batch_size: int,
        *,
        weights: list[float | None] | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        pad_id: int = 0,
        filesystem: pafs.FileSystem | None = None,
    ):
        given = store if isinstance(store, list) else [store]
        if not given:
            raise ValueError("no store to read")
        self.stores = [s if isinstance(s, LogitStore) else LogitStore.open(s, filesystem) for s in given]
        weights = [None] * len(self.stores) if weights is None else list(weights)
        if len(weights) != len(self.stores):
            raise ValueError(f"{len(weights)} weights for {len(self.stores)} stores")
        for s in self.stores:
            if s.manifest.status != "complete":
                import warnings

                warnings.warn(f"{s.root}: the store is still being written; reading its complete shards",
                              stacklevel=2)
        check_mixable(self.stores)
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError(f"batch_size and shuffle_buffer must be >= 1, got {batch_size} and {shuffle_buffer}")
        self.batch_size, self.shuffle, self.shuffle_buffer, self.seed = batch_size, shuffle, shuffle_buffer, seed
        self.rank, self.world_size, self.drop_last, self.pad_id = rank, world_size, drop_last, pad_id
        self.num_workers = 0  # set by StoreLoader; recorded in state_dict, free to change on resume
        self.epoch = 0
        self.batches_done = 0  # of this rank's batches this epoch
        self._store_units = [s.units() for s in self.stores]
        self.store_rows = [sum(n for _, _, n in units) for units in self._store_units]
        for s, n in zip(self.stores, self.store_rows, strict=True):
            if n == 0:
                raise ValueError(f"{s.root}: the store has no rows to read" + (
                    "" if s.manifest.status == "complete" else " yet (it is still being written)"))
        self.store_start = np.cumsum(self.store_rows) - self.store_rows  # first global row number of each store
        # record batches of every store in one list: (store, file, batch, rows)
        self._units = [(i, *u) for i, units in enumerate(self._store_units) for u in units]
        unit_rows = np.array([u[-1] for u in self._units], dtype=np.int64)
        self._unit_start = np.cumsum(unit_rows) - unit_rows
        self.rows = int(unit_rows.sum())  # rows per epoch (one pass over every store's rows when unweighted)
        self.epoch_rows, self.token_share = mixture_rows(self.stores, self.store_rows, weights)
        self.domain_names = domain_names(self.stores)  # the `domain` index of a batch looks names up here
        where = " and ".join(str(s.root) for s in self.stores)
        if self.rows < world_size:
            raise ValueError(f"{where}: {self.rows} rows, fewer than the {world_size} processes reading them; "
                             "every process needs rows of its own: use fewer processes")
        if len(self) == 0:
            raise ValueError(f"{where}: {self.rows} rows make no full batch of {batch_size} rows for each of "
                             f"{world_size} processes with drop_last: use a smaller batch or fewer processes")
        self._order: tuple | None = None  # (epoch, its padded global order, read passes), computed lazily

    # ------------------------------------------------------------ plan (metadata only, no I/O)
    def store_order(self, store: int, epoch: int) -> np.ndarray:
        """Row numbers within store `store` in the order its own epoch `epoch` reads them (step 1)."""
        units, rows = self._store_units[store], self.store_rows[store]
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
        return self._epoch_plan(epoch)[0]

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(epoch_order, the pass of its store each row is read in): a weighted store's rows of one mixture epoch
        can come from two or more of its own epochs (passes); the reader keeps a record batch only within one."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1:]
        taken, passes = [], []  # each store's next epoch_rows[i] rows of its own sequence of epochs (step 2)
        for i, (n, rows) in enumerate(zip(self.epoch_rows, self.store_rows, strict=True)):
            lo = epoch * n
            first, last = lo // rows, -(-(lo + n) // rows)
            sequence = np.concatenate([self.store_order(i, e) for e in range(first, last)])
            taken.append(sequence[lo - first * rows:lo - first * rows + n].astype(np.int64) + self.store_start[i])
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
        return self._batch(index, epoch)[0]

    def _batch(self, index: int, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(this rank's rows of batch `index`, the store pass each is read in)."""
        order, read_pass = self._epoch_plan(self.epoch if epoch is None else epoch)
        step = self.world_size * self.batch_size
        window = slice(index * step, (index + 1) * step)
        # sorted: rank r takes the r-th part of the batch's rows in store order, so over a window each rank
        # reads about 1/world_size of its record batches, not all of them (which ranks compute which rows of a
        # global batch does not change the step: its loss is normalised over the global batch)
        by_row = np.argsort(order[window], kind="stable")
        rows, passes = order[window][by_row], read_pass[window][by_row]
        spread = len(self.stores) > 1 and self.world_size > 1
        if spread:  # each store's rows split evenly over the ranks, each rank a contiguous run of them
            store = np.searchsorted(self.store_start, rows, side="right") - 1
            counts = np.bincount(store, minlength=len(self.stores))
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

    def rows_per_rank(self) -> int:
        """Rows this rank yields per epoch (the same on every rank)."""
        padded = -(-self.rows // self.world_size)
        return len(self) * self.batch_size if self.drop_last else padded

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank, whatever the number of workers)."""
        padded = -(-self.rows // self.world_size) * self.world_size
        step = self.world_size * self.batch_size
        return padded // step if self.drop_last else -(-padded // step)

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[KDBatch]:
        info = get_worker_info()
        if info is None:
            self._roll_over()
            worker, workers = 0, 1
        else:
            worker, workers = info.id, info.num_workers
        indices = range(self.batches_done + worker, len(self), workers)
        reported: set[tuple[int, str]] = set()
        try:
            for index, rows in zip(indices, self._decoded(indices), strict=True):
                batch = collate(rows, self.pad_id, self.domain_names)
                if info is None:
                    self.batches_done = index + 1
                else:  # not part of KDBatch: StoreLoader pops them
                    batch["_batch_index"] = torch.tensor(index)
                    hashed = {(i, f) for i, s in enumerate(self.stores) for f in s.hashed} - reported
                    if hashed:  # shards this worker hashed: later epochs' workers need not hash them again
                        batch["_hashed"] = sorted(hashed)
                        reported |= hashed
                yield batch
        except (StoreError, ValueError, OSError) as e:
            if info is None:
                raise
            # DataLoader would re-raise it as a new exception whose message is the worker's traceback: hand the
            # error itself to StoreLoader, which raises it as it is (one line naming the shard)
            yield {"_error": e}
            return
        if info is None:
            self.set_epoch(self.epoch + 1)

    def _decoded(self, indices: range) -> Iterator[list[DecodedRow]]:
        """The rows of these batches, reading each record batch once per store pass and dropping it after its
        last row of that pass here (so the decoded batches held stay within about one shuffle window)."""
        batches = [self._batch(i) for i in indices]
        if not batches:
            return
        flat = np.concatenate([b for b, _ in batches])
        unit_of = np.searchsorted(self._unit_start, flat, side="right") - 1
        keys = list(zip(unit_of.tolist(), np.concatenate([p for _, p in batches]).tolist(), strict=True))
        last_use = {key: i for i, key in enumerate(keys)}
        cache: dict[tuple[int, int], BatchRows] = {}
        i = 0
        for ids, _ in batches:
            rows = []
            for row in ids:
                key = keys[i]
                u = key[0]
                if key not in cache:
                    store, file, b, _ = self._units[u]
                    reader = self.stores[store]
                    cache[key] = reader.decode_batch(file, reader.read_batch(file, b))
                rows.append(cache[key][int(row - self._unit_start[u])])
                if last_use[key] == i:
                    del cache[key]
                i += 1
            yield rows

    def _roll_over(self) -> None:
        """Start the next epoch if this one's batches were all yielded (a checkpoint taken right after an epoch's
        last batch resumes here), and mark the start of an epoch as a crash point for the fault tests."""
        if self.batches_done >= len(self):
            self.set_epoch(self.epoch + 1)
        if self.batches_done == 0:
            crash_point("epoch", self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches_done = 0

    # ------------------------------------------------------------ checkpointing
    def layout(self) -> str:
        """Digest of the stores' record batch layouts (files and row counts), which the shuffled order depends on."""
        units = self._store_units[0] if len(self.stores) == 1 else self._store_units
        return hashlib.sha256(json.dumps(units).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        fingerprints = [s.manifest.fingerprint() for s in self.stores]
        # a mixture on several ranks spreads each store's rows of a batch over the ranks (earlier: sorted runs)
        dealing = "rows, stores spread over ranks" if len(self.stores) > 1 and self.world_size > 1 else "rows"
        state = dict(dealing=dealing, epoch=self.epoch, batches_done=self.batches_done, seed=self.seed,
                     rank=self.rank, world_size=self.world_size, batch_size=self.batch_size, shuffle=self.shuffle,
                     shuffle_buffer=self.shuffle_buffer, drop_last=self.drop_last,
                     store=fingerprints[0] if len(fingerprints) == 1 else fingerprints, rows=self.rows,
                     layout=self.layout(), num_workers=self.num_workers)
        if len(self.stores) > 1:
            state["mixture"] = self.epoch_rows  # rows of each store per epoch: the weights, as the order uses them
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses (ValueError, naming the setting) what would change the order of batches.
        The number of DataLoader workers may change."""
        mine = self.state_dict()
        for key in ("world_size", "store", "dealing", "seed", "rank", "batch_size", "shuffle", "shuffle_buffer",
                    "drop_last", "rows", "layout", "mixture"):
            if key == "dealing" and state.get(key) != mine[key]:  # how the stores' rows are dealt to ranks
                raise ValueError(f"this reader position was saved by an earlier moekd that dealt batches to ranks "
                                 f"another way ({state.get('dealing', 'whole record batches')!r}); it cannot be "
                                 "continued exactly: finish the run with that version, or start a new run")
            if state.get(key) != mine.get(key):
                raise ValueError(f"cannot resume the reader exactly: {key} was {state.get(key)!r} when the "
                                 f"checkpoint was taken and is {mine.get(key)!r} now")
        if not 0 <= state["batches_done"] <= len(self):
            raise ValueError(f"reader position {state['batches_done']} is outside an epoch of {len(self)} batches")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


class StoreLoader:
    """A torch DataLoader over a KDStream that keeps the stream's position exact across worker processes."""

    def __init__(self, stream: KDStream, num_workers: int = 0, **dataloader_kwargs):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.stream = stream
        stream.num_workers = num_workers
        self.kwargs = dict(num_workers=num_workers, batch_size=None, **dataloader_kwargs)
        if num_workers:
            self.kwargs.setdefault("persistent_workers", False)
            # DataLoader seeds its workers from the global torch RNG unless given a generator: a fixed one keeps
            # the trainer's RNG (dropout) the same whether or not a resume started the workers mid-epoch
            self.kwargs.setdefault("generator", torch.Generator())

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[KDBatch]:
        if not self.kwargs["num_workers"]:
            yield from self.stream
            return
        stream = self.stream
        stream._roll_over()
        for batch in DataLoader(stream, **self.kwargs):
            if "_error" in batch:
                raise batch["_error"]
            index = int(batch.pop("_batch_index"))
            for store, file in batch.pop("_hashed", ()):
                stream.stores[store].hashed.add(file)
            if index != stream.batches_done:  # the plan guarantees it; a DataLoader that reordered would break it
                raise RuntimeError(f"DataLoader delivered batch {index} of epoch {stream.epoch}, expected batch "
                                   f"{stream.batches_done}")
            stream.batches_done = index + 1
            yield batch
        stream.set_epoch(stream.epoch + 1)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
