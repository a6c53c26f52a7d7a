"""The training stream over a store: `KDStream` deals its rows to ranks and DataLoader workers, shuffled and
resumable, and yields them as `KDBatch`es of torch tensors (`collate`); `StoreLoader` runs it in worker processes.

`KDBatch` is the contract between the store and the loss: student/losses.py, student/evaluate.py and the
benchmarks read batches by these keys and know nothing else of the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict

import numpy as np
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .reader import BatchRows, DecodedRow, LogitStore


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
    domain: torch.Tensor  # [B] int64: the row's domain as an index into the store's domain_names (-1: none)


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


class KDStream(IterableDataset):
    """Streams batches of a store for training: shuffled, split by rank and DataLoader worker, resumable.

    The unit of work is one Arrow record batch. Each epoch, units are permuted (seeded), dealt to ranks
    (`perm[rank::world_size]`), then to DataLoader workers; each worker's rows are shuffled in windows of
    `shuffle_buffer` rows. So every row is delivered exactly once per epoch across ranks x workers, and the
    order is a pure function of (seed, epoch, rank, worker): resuming skips rows without reading them.
    Ranks may get a few rows more or fewer than others (whole units); `rows_per_rank()` says how many.

    Iterate it directly (num_workers=0) or through `StoreLoader`, which tracks worker positions so that
    `state_dict()` is exact.
    """

    def __init__(
        self,
        store: str | LogitStore,
        batch_size: int,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        pad_id: int = 0,
        filesystem: pafs.FileSystem | None = None,
    ):
        self.store = store if isinstance(store, LogitStore) else LogitStore.open(store, filesystem)
        if self.store.manifest.status != "complete":
            import warnings

            warnings.warn(f"{self.store.root}: the store is still being written; reading its complete shards",
                          stacklevel=2)
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.batch_size, self.shuffle, self.shuffle_buffer, self.seed = batch_size, shuffle, shuffle_buffer, seed
        self.rank, self.world_size, self.drop_last, self.pad_id = rank, world_size, drop_last, pad_id
        self.num_workers = 0  # set by StoreLoader; part of the resumable state
        self.epoch = 0
        self.rows_done: dict[int, int] = {}  # per slot (worker): rows already yielded this epoch
        self.batches_done = 0  # this epoch, all slots together
        self._units = self.store.units()

    # ------------------------------------------------------------ plan (metadata only, no I/O)
    def _slot_units(self, worker: int, workers: int) -> np.ndarray:
        n = len(self._units)
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        return perm[self.rank::self.world_size][worker::workers]

    def _slot_rows(self, worker: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit, row-in-unit) of every row this slot yields this epoch, in order."""
        units = self._slot_units(worker, workers)
        counts = np.array([self._units[u][2] for u in units], dtype=np.int64)
        unit_of = np.repeat(units, counts)
        row_in = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        if self.shuffle and unit_of.size:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            order = np.arange(unit_of.size)
            for start in range(0, order.size, self.shuffle_buffer):
                rng.shuffle(order[start:start + self.shuffle_buffer])
            unit_of, row_in = unit_of[order], row_in[order]
        return unit_of, row_in

    def rows_per_rank(self) -> int:
        return int(sum(self._units[u][2] for u in self._slot_units(0, 1)))

    def __len__(self) -> int:
        """Batches this rank yields per epoch (with the current num_workers)."""
        workers = max(self.num_workers, 1)
        total = 0
        for w in range(workers):
            rows = int(sum(self._units[u][2] for u in self._slot_units(w, workers)))
            total += rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
        return total

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[KDBatch]:
        info = get_worker_info()
        # DataLoader always starts polling at worker 0; after a resume the slot due next must be polled
        # first, so DataLoader worker i plays slot (i + batches_done) % workers.
        worker, workers = ((info.id + self.batches_done) % info.num_workers, info.num_workers) if info else (0, 1)
        unit_of, row_in = self._slot_rows(worker, workers)
        start = self.rows_done.get(worker, 0)
        last_use = {int(u): i for i, u in enumerate(unit_of)}  # evict a decoded unit after its last row
        cache: dict[int, BatchRows] = {}
        for lo in range(start, unit_of.size, self.batch_size):
            hi = min(lo + self.batch_size, unit_of.size)
            if self.drop_last and hi - lo < self.batch_size:
                break
            rows = []
            for i in range(lo, hi):
                u = int(unit_of[i])
                if u not in cache:
                    file, b, _ = self._units[u]
                    cache[u] = self.store.decode_batch(file, self.store.read_batch(file, b))
                rows.append(cache[u][int(row_in[i])])
                if last_use[u] == i:
                    del cache[u]
            batch = collate(rows, self.pad_id, self.store.manifest.domain_names)
            if info is None:
                self.rows_done[worker] = hi
                self.batches_done += 1
            else:
                batch["_position"] = torch.tensor([worker, hi])  # not part of KDBatch: StoreLoader pops it
            yield batch
        if info is None:
            self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.rows_done = {}
        self.batches_done = 0

    # ------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                    num_workers=self.num_workers, batch_size=self.batch_size, shuffle=self.shuffle,
                    shuffle_buffer=self.shuffle_buffer, store=self.store.manifest.fingerprint(),
                    rows=self.store.manifest.rows, batches_done=self.batches_done,
                    rows_done={str(k): v for k, v in self.rows_done.items()})

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "num_workers", "batch_size", "shuffle", "shuffle_buffer",
                    "store", "rows"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume the reader exactly: {key} was {state[key]!r} when the "
                                 f"checkpoint was taken and is {mine[key]!r} now")
        self.epoch = state["epoch"]
        self.batches_done = state["batches_done"]
        self.rows_done = {int(k): v for k, v in state["rows_done"].items()}


class StoreLoader:
    """A torch DataLoader over a KDStream that keeps the stream's position exact across worker processes."""

    def __init__(self, stream: KDStream, num_workers: int = 0, **dataloader_kwargs):
        self.stream = stream
        stream.num_workers = num_workers
        self.kwargs = dict(num_workers=num_workers, batch_size=None, **dataloader_kwargs)
        if num_workers:
            self.kwargs.setdefault("persistent_workers", False)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[KDBatch]:
        if not self.kwargs["num_workers"]:
            yield from self.stream
            return
        for batch in DataLoader(self.stream, **self.kwargs):
            worker, done = batch.pop("_position").tolist()
            self.stream.rows_done[worker] = done
            self.stream.batches_done += 1
            yield batch
        self.stream.set_epoch(self.stream.epoch + 1)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
