"""Reading a store: `LogitStore` (open, decode, verify) and `KDStream`, the streaming reader a trainer uses."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import fs as storefs
from .codecs import IdOrder, TargetError
from .manifest import MANIFEST_NAME, Manifest
from .writer import ID_ORDER_KEY, make_codec, shard_schema


@dataclass
class DecodedRow:
    """A row with targets decoded. `positions[j]` is the token index the j-th target predicts."""

    source_index: int
    input_ids: np.ndarray  # [T] int64
    loss_mask: np.ndarray  # [T] bool
    target_ids: np.ndarray  # [P, S] int64 (S = k for topk, the row's largest support for sampled)
    target_logprobs: np.ndarray  # [P, S] float32 (log p for topk, log(count/N) for sampled)
    target_mask: np.ndarray  # [P, S] bool: which of the S slots hold a candidate
    target_tail: np.ndarray  # [P] float32: log of the teacher mass outside the listed candidates

    @property
    def positions(self) -> np.ndarray:
        return np.flatnonzero(self.loss_mask)


class StoreError(RuntimeError):
    """A store whose files do not match its manifest or cannot be decoded."""


class LogitStore:
    """An opened store: its manifest, and decoded access to its shards."""

    def __init__(self, fs: pafs.FileSystem, root: str, manifest: Manifest):
        self.fs, self.root, self.manifest = fs, root, manifest
        self.codec = make_codec(manifest)
        self._files: dict[str, pa.ipc.RecordBatchFileReader] = {}
        self._orders: dict[str, IdOrder] = {}

    @classmethod
    def open(cls, store: str, filesystem: pafs.FileSystem | None = None,
             manifest_name: str = MANIFEST_NAME) -> LogitStore:
        fs, root = storefs.resolve(store, filesystem)
        return cls(fs, root, Manifest.load(fs, root, manifest_name))

    def __getstate__(self) -> dict:
        """DataLoader workers reopen shard files themselves (open handles do not cross processes)."""
        return dict(self.__dict__, _files={})

    # ------------------------------------------------------------ raw access
    def shard_reader(self, file: str) -> pa.ipc.RecordBatchFileReader:
        if file not in self._files:
            path = storefs.join(self.root, file)
            try:
                reader = pa.ipc.open_file(self.fs.open_input_file(path))
            except (pa.ArrowInvalid, OSError) as e:
                raise StoreError(f"{path}: not a readable Arrow IPC file ({e})") from e
            meta = reader.schema.metadata or {}
            if ID_ORDER_KEY not in meta:
                raise StoreError(f"{path}: schema metadata lacks {ID_ORDER_KEY.decode()}")
            self._orders[file] = IdOrder.from_bytes(meta[ID_ORDER_KEY], self.manifest.vocab_size)
            self._files[file] = reader
        return self._files[file]

    def read_batch(self, file: str, index: int) -> pa.RecordBatch:
        return self.shard_reader(file).get_batch(index)

    def read_column(self, file: str, column: str) -> pa.ChunkedArray:
        return self.shard_reader(file).read_all().column(column)

    # ------------------------------------------------------------ decoding
    def decode_batch(self, file: str, batch: pa.RecordBatch) -> BatchRows:
        """The rows of a record batch, each decoded when it is indexed (decoding all at once costs memory)."""
        self.shard_reader(file)  # loads the shard's id order
        return BatchRows(self, batch, self._orders[file])

    def decode_targets(self, payload, n_pos: int, order: IdOrder):
        """-> ids [P, S], log-probs [P, S], slot mask [P, S], tail [P]."""
        if self.manifest.target.kind == "topk":
            ids, lp, tail = self.codec.decode(payload, n_pos, order)
            return ids, lp, np.ones(ids.shape, dtype=bool), tail
        flat_ids, flat_lp, tail, sizes = self.codec.decode(payload, n_pos, order)
        width = int(sizes.max()) if sizes.size else 0
        # slot of each flat entry in the [P, width] grid: row * width + column
        starts = np.cumsum(sizes) - sizes
        slot = np.arange(flat_ids.size) + np.repeat(np.arange(n_pos) * width - starts, sizes)
        ids = np.zeros(n_pos * width, np.int64)
        lp = np.zeros(n_pos * width, np.float32)
        tmask = np.zeros(n_pos * width, bool)
        ids[slot], lp[slot], tmask[slot] = flat_ids, flat_lp, True
        shape = (n_pos, width)
        return ids.reshape(shape), lp.reshape(shape), tmask.reshape(shape), tail

    # ------------------------------------------------------------ row access
    def units(self) -> list[tuple[str, int, int]]:
        """(shard file, record batch index, rows) for every record batch, in store order."""
        return [(s.file, b, n) for s in self.manifest.shards for b, n in enumerate(s.batch_rows)]

    def row(self, n: int) -> DecodedRow:
        """The n-th row of the store (in manifest order)."""
        if not 0 <= n < self.manifest.rows:
            raise IndexError(f"row {n} out of range: the store has {self.manifest.rows} rows")
        for file, b, rows in self.units():
            if n < rows:
                return self.decode_batch(file, self.read_batch(file, b))[n]
            n -= rows
        raise AssertionError("unreachable")

    def __iter__(self) -> Iterator[DecodedRow]:
        for file, b, _ in self.units():
            yield from self.decode_batch(file, self.read_batch(file, b))

    # ------------------------------------------------------------ verification
    def verify(self, decode: bool = True) -> list[str]:
        """Check every shard against the manifest (size, sha256, schema, counts) and decode every row.

        Returns the faults found, each naming the shard file; an empty list means the store is sound.
        """
        faults = []
        listed = {s.file for s in self.manifest.shards}
        if len(listed) != len(self.manifest.shards):
            faults.append(f"{MANIFEST_NAME}: a shard is listed twice")
        for s in self.manifest.shards:
            path = storefs.join(self.root, s.file)
            try:
                faults.extend(f"{s.file}: {msg}" for msg in self._verify_shard(s, path, decode))
            except Exception as e:  # any failure to read is a fault of this shard, reported by name
                faults.append(f"{s.file}: cannot be read ({type(e).__name__}: {e})")
        return faults

    def _verify_shard(self, s, path: str, decode: bool) -> list[str]:
        if not storefs.exists(self.fs, path):
            return ["missing (listed in the manifest, not on the filesystem)"]
        digest, size = storefs.sha256_of(self.fs, path)
        if size != s.bytes:
            return [f"size {size} bytes, manifest says {s.bytes} (truncated or overwritten)"]
        if digest != s.sha256:
            return ["sha256 mismatch: the file changed or is corrupted"]
        self._files.pop(s.file, None)
        reader = self.shard_reader(s.file)
        expected = shard_schema(self.manifest.target.kind)
        if not reader.schema.remove_metadata().equals(expected):
            return [f"schema {reader.schema.remove_metadata()} differs from format v1's {expected}"]
        batch_rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        if batch_rows != s.batch_rows:
            return [f"record batches hold {batch_rows} rows, manifest says {s.batch_rows}"]
        if not decode:
            return []
        faults, tokens, positions = [], 0, 0
        for b in range(reader.num_record_batches):
            try:
                for r in self.decode_batch(s.file, reader.get_batch(b)):
                    tokens += r.input_ids.size
                    positions += r.target_ids.shape[0]
                    _check_row(r, self.manifest.vocab_size)
            except (TargetError, ValueError, IndexError) as e:
                faults.append(f"record batch {b}: cannot be decoded ({e})")
        if not faults and (tokens, positions) != (s.tokens, s.target_positions):
            faults.append(f"holds {tokens} tokens / {positions} targets, manifest says "
                          f"{s.tokens} / {s.target_positions}")
        return faults


@dataclass
class _Payload:
    ids: np.ndarray
    values: np.ndarray
    tail: np.ndarray
    sizes: np.ndarray = b""


def _binary_slices(arr: pa.BinaryArray):
    """Zero-copy access to the i-th value of a binary column, as a uint8 array."""
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return lambda i: data[offsets[i]:offsets[i + 1]]


class BatchRows:
    """Rows of one record batch: its columns are viewed once (zero-copy); row i is decoded on access."""

    def __init__(self, store: LogitStore, batch: pa.RecordBatch, order: IdOrder):
        self.store, self.order = store, order
        ids = batch.column("input_ids")
        self.offsets = ids.offsets.to_numpy()
        self.ids = ids.values.to_numpy(zero_copy_only=False)
        self.mask = batch.column("loss_mask").values.to_numpy(zero_copy_only=False)
        self.source = batch.column("source_index").to_numpy()
        names = ["target_ids", "target_values", "target_tail"]
        if "target_sizes" in batch.schema.names:
            names.append("target_sizes")
        self.payload_cols = [_binary_slices(batch.column(c)) for c in names]

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, i: int) -> DecodedRow:
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        mask = self.mask[lo:hi]
        payload = _Payload(*(col(i) for col in self.payload_cols))
        ids, lp, tmask, tail = self.store.decode_targets(payload, int(mask.sum()), self.order)
        return DecodedRow(int(self.source[i]), self.ids[lo:hi].astype(np.int64), mask, ids, lp, tmask, tail)


def _check_row(r: DecodedRow, vocab_size: int) -> None:
    if r.target_ids.shape[0] != int(r.loss_mask.sum()):
        raise TargetError(f"row {r.source_index}: target count differs from its loss mask")
    if r.target_ids.size and (r.target_ids.min() < 0 or r.target_ids.max() >= vocab_size):
        raise TargetError(f"row {r.source_index}: target id outside the vocabulary")
    if np.isnan(r.target_logprobs).any() or np.isnan(r.target_tail).any():
        raise TargetError(f"row {r.source_index}: NaN in decoded targets")


# ================================================================ streaming reader
def collate(rows: list[DecodedRow], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Rows -> right-padded tensors aligned with the student's logits: position t predicts token t + 1.

    loss_mask[b, t] / labels[b, t] / target_*[b, t] all describe the prediction made at position t.
    Slots where target_mask is False hold 0 and must be ignored; a tail of -inf means no mass outside.
    """
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
               source_index=np.array([r.source_index for r in rows], np.int64))
    return {k: torch.from_numpy(v) for k, v in out.items()}


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
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
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
            batch = collate(rows, self.pad_id)
            if info is None:
                self.rows_done[worker] = hi
                self.batches_done += 1
            else:
                batch["_position"] = torch.tensor([worker, hi])
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

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
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
