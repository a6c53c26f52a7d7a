"""Reading a store: `LogitStore` opens it, decodes its rows and verifies it. numpy and pyarrow only (no torch).

The training stream over a store (`KDStream`, `collate`) is in stream.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from . import fs as storefs
from .codecs import IdOrder, Payload, TargetError
from .format import DOMAIN_COLUMN, ID_ORDER_KEY, MANIFEST_NAME, make_codec, shard_schema
from .manifest import Manifest, count_domain_row


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
    domain: str | None = None  # the row's domain, in a store built with domains

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
        expected = shard_schema(self.codec, with_domain=s.domains is not None)
        if not reader.schema.remove_metadata().equals(expected):
            return [f"schema {reader.schema.remove_metadata()} differs from format v1's {expected}"]
        batch_rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        if batch_rows != s.batch_rows:
            return [f"record batches hold {batch_rows} rows, manifest says {s.batch_rows}"]
        if not decode:
            return []
        faults, tokens, positions = [], 0, 0
        domains: dict[str, dict[str, int]] = {}
        for b in range(reader.num_record_batches):
            try:
                for r in self.decode_batch(s.file, reader.get_batch(b)):
                    tokens += r.input_ids.size
                    positions += r.target_ids.shape[0]
                    _check_row(r, self.manifest.vocab_size)
                    if r.domain is not None:
                        count_domain_row(domains, r.domain, r.input_ids.size, r.target_ids.shape[0])
            except (TargetError, ValueError, IndexError) as e:
                faults.append(f"record batch {b}: cannot be decoded ({e})")
        if not faults and (tokens, positions) != (s.tokens, s.target_positions):
            faults.append(f"holds {tokens} tokens / {positions} targets, manifest says "
                          f"{s.tokens} / {s.target_positions}")
        if not faults and s.domains is not None and domains != s.domains:
            faults.append(f"rows / tokens / targets per domain are {domains}, manifest says {s.domains}")
        return faults


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
        self.payload_cols = [_binary_slices(batch.column(c)) for c in store.codec.columns]
        has_domain = batch.schema.get_field_index(DOMAIN_COLUMN) >= 0
        self.domains = batch.column(DOMAIN_COLUMN).to_pylist() if has_domain else None

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, i: int) -> DecodedRow:
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        mask = self.mask[lo:hi]
        payload = Payload(*(col(i) for col in self.payload_cols))
        ids, lp, tmask, tail = self.store.codec.decode(payload, int(mask.sum()), self.order)
        domain = self.domains[i] if self.domains is not None else None
        return DecodedRow(int(self.source[i]), self.ids[lo:hi].astype(np.int64), mask, ids, lp, tmask, tail, domain)


def _check_row(r: DecodedRow, vocab_size: int) -> None:
    if r.target_ids.shape[0] != int(r.loss_mask.sum()):
        raise TargetError(f"row {r.source_index}: target count differs from its loss mask")
    if r.target_ids.size and (r.target_ids.min() < 0 or r.target_ids.max() >= vocab_size):
        raise TargetError(f"row {r.source_index}: target id outside the vocabulary")
    if np.isnan(r.target_logprobs).any() or np.isnan(r.target_tail).any():
        raise TargetError(f"row {r.source_index}: NaN in decoded targets")
