"""The training stream over a store, or a weighted mixture of stores: `KDStream` reads the rows its `ReadPlan`
(plan.py) deals this rank and DataLoader worker and yields them as `KDBatch`es of torch tensors (`collate`);
`StoreLoader` runs it in worker processes and keeps the position exact.

`KDBatch` is the contract between the store and the loss: student/losses.py, student/evaluate.py and the
benchmarks read batches by these keys and know nothing else of the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NotRequired, TypedDict

import numpy as np
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .plan import DecodedBatches, ReadPlan, RowIndex, domain_names, open_stores
from .reader import DecodedRow, LogitStore, StoreError


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
    # [B, T] float32: the teacher's log-prob of labels[b, t], only when every row carries it (stores built with
    # label log-probs: the teacher's NLL of the text, e.g. of a student's own samples)
    label_logprobs: NotRequired[torch.Tensor]


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
    if all(r.label_logprobs is not None for r in rows):
        out["label_logprobs"] = np.zeros((bsz, seq), np.float32)
        for b, r in enumerate(rows):
            out["label_logprobs"][b, r.positions - 1] = r.label_logprobs
    return KDBatch(**{k: torch.from_numpy(v) for k, v in out.items()})


def _domain_index(domain: str | None, domains: list[str] | None) -> int:
    if domain is None:
        return -1
    if not domains or domain not in domains:
        raise ValueError(f"row of domain {domain!r}, which is not among the store's domains {domains}")
    return domains.index(domain)


class KDStream(IterableDataset):
    """Streams batches of a store, or of a weighted mixture of stores, for training: shuffled, dealt to ranks and
    DataLoader workers, resumable.

    Which rows come when is the `ReadPlan` (plan.py: epoch order, mixture, dealing to ranks and workers, the
    resume position); this class reads the plan's rows, decoding each record batch once per store pass and
    dropping it after its last row of that pass (so the decoded batches held stay within about one shuffle
    window), and collates them into `KDBatch`es. `state_dict()` is the plan's (epoch, batches done, and every
    setting the order depends on) plus the number of workers, which may change on resume.

    `store`: one store, or a list of them; `weights`: each store's share of the loss positions (`mix_by=
    "positions"`) or of the rows' tokens (`mix_by="tokens"`), None where unset (`mixture_rows`). Mixed stores
    must share a tokenizer and vocabulary; they may differ in target kind and k (`collate` pads candidates to the
    widest). Iterate it directly (num_workers=0) or through `StoreLoader`, which tracks the position across
    workers; either way each shard is hashed once per run (`LogitStore.share_hash_checks`). `collate_fn` makes
    the batches (default `collate`; a student of another tokenizer passes its own, student/cross_tokenizer.py).
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
        mix_by: str = "positions",
        collate_fn: Callable[[list[DecodedRow], int, list[str] | None], KDBatch] = collate,
    ):
        self.stores = open_stores(store if isinstance(store, list) else [store], filesystem)
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        self.index = RowIndex(self.stores)
        self.plan = ReadPlan(self.index, batch_size, weights=weights, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                             seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, mix_by=mix_by)
        self.pad_id = pad_id
        # rows -> a batch: `collate` (the store's own ids), or a student's collator (another tokenizer's ids)
        self.collate_fn = collate_fn
        self.num_workers = 0  # set by StoreLoader; recorded in state_dict, free to change on resume
        self.domain_names = domain_names(self.stores)  # the `domain` index of a batch looks names up here

    # ------------------------------------------------------------ the plan's figures and position
    rows = property(lambda self: self.plan.rows, doc="rows per epoch")
    epoch_rows = property(lambda self: self.plan.epoch_rows, doc="rows of each store per epoch")
    share = property(lambda self: self.plan.share, doc="each store's weight, resolved (a share of `mix_by`)")
    position_share = property(lambda self: self.plan.position_share,
                              doc="each store's share of an epoch's loss positions")
    token_share = property(lambda self: self.plan.token_share, doc="each store's share of an epoch's tokens")
    store_rows = property(lambda self: self.index.store_rows, doc="rows of each store")
    store_start = property(lambda self: self.index.store_start, doc="first global row number of each store")
    epoch = property(lambda self: self.plan.epoch, doc="the epoch being read")

    @property
    def batches_done(self) -> int:
        """This rank's batches read so far this epoch."""
        return self.plan.batches_done

    @batches_done.setter
    def batches_done(self, value: int) -> None:
        self.plan.batches_done = value

    def store_order(self, store: int, epoch: int) -> np.ndarray:
        return self.plan.store_order(store, epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.plan.epoch_order(epoch)

    def batch_rows(self, index: int, epoch: int | None = None) -> np.ndarray:
        return self.plan.batch_rows(index, epoch)

    def rows_per_rank(self) -> int:
        return self.plan.rows_per_rank()

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        self.plan.set_epoch(epoch)

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[KDBatch]:
        info = get_worker_info()
        if info is None:
            self.plan.roll_over()
            worker, workers = 0, 1
        else:
            worker, workers = info.id, info.num_workers
        indices = self.plan.worker_batches(worker, workers)
        try:
            for index, rows in zip(indices, self._decoded(indices), strict=True):
                batch = self.collate_fn(rows, self.pad_id, self.domain_names)
                if info is None:
                    self.batches_done = index + 1
                else:  # not part of KDBatch: StoreLoader pops it
                    batch["_batch_index"] = torch.tensor(index)
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
        """The rows of these batches, reading each record batch once per store pass and releasing it after its
        last row of that pass here."""
        batches = [self.plan.batch(i) for i in indices]
        if not batches:
            return
        flat = np.concatenate([b for b, _ in batches])
        unit_of = self.index.unit_of(flat)
        keys = list(zip(unit_of.tolist(), np.concatenate([p for _, p in batches]).tolist(), strict=True))
        last_use = {key: i for i, key in enumerate(keys)}
        held = DecodedBatches(self.index)
        i = 0
        for ids, _ in batches:
            rows = []
            for row in ids:
                key = keys[i]
                rows.append(held.get(key[0], key)[int(row - self.index.unit_start[key[0]])])
                if last_use[key] == i:
                    held.release(key)
                i += 1
            yield rows

    # ------------------------------------------------------------ checkpointing
    def layout(self) -> str:
        """Digest of the stores' record batch layouts (files and row counts), which the shuffled order depends on."""
        return self.index.layout()

    def state_dict(self) -> dict:
        return dict(self.plan.state_dict(), num_workers=self.num_workers)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses (ValueError, naming the setting) what would change the order of batches.
        The number of DataLoader workers may change."""
        self.plan.load_state_dict(state)


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
        stream.plan.roll_over()
        for batch in DataLoader(stream, **self.kwargs):
            if "_error" in batch:
                raise batch["_error"]
            index = int(batch.pop("_batch_index"))
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
