"""Reading a store: `LogitStore` opens it, decodes its rows and verifies it. numpy and pyarrow only (no torch).

The reader trusts nothing it has not checked. Opening a store checks the manifest against itself and the
directory (`Manifest.consistency_faults`, shard files nobody lists); the first time a process opens a shard it
checks the file against the manifest (size, sha256 of every byte, what the shard was written as, schema, record
batches, rows, tokens and targets) before any row of it is decoded. The sha256 is taken once per run: a store
handed to DataLoader workers (`share_hash_checks`, which `KDStream` and `StoreDataset` call) keeps a ledger that
the training process and all its workers share (`HashLedger`), so the worker that first needs a shard hashes it,
the others wait for it and check everything else, and the next epoch's workers find it hashed. A fault is a
`StoreError` that names the shard and the manifest field. The training stream over a store (`KDStream`,
`collate`) is in stream.py and reads through these checks.
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from . import fs as storefs
from .codecs import Payload, TargetError
from .format import (
    BUILD_SHARD_PREFIX,
    DOMAIN_COLUMN,
    LABEL_COLUMN,
    MANIFEST_NAME,
    SHARD_FILE,
    SHARD_IDENTITY_KEY,
    WORKER_MANIFEST,
    ShardModel,
    identity_differences,
    make_codec,
    model_key,
    read_shard_model,
    shard_schema,
    worker_names,
)
from .manifest import Manifest, ShardInfo, count_domain_row


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
    label_logprobs: np.ndarray | None = None  # [P] float32: the teacher's log-prob of each position's own token

    @property
    def positions(self) -> np.ndarray:
        return np.flatnonzero(self.loss_mask)


class StoreError(RuntimeError):
    """A store whose files do not match its manifest or cannot be decoded.

    `where` is the file at fault (a shard, or the manifest), `field` the manifest field it contradicts (e.g.
    `shards[1].sha256`; None when no single field is), `problem` what is wrong; str() says all three."""

    def __init__(self, where: str, problem: str | None = None, field: str | None = None):
        self.where, self.problem, self.field = where, problem, field
        # (one argument: a whole message, as when torch re-raises a DataLoader worker's error in the main process)
        super().__init__(where if problem is None else f"{where}: {problem}")


class HashLedger:
    """Which shards of a store had their sha256 checked in this run, shared by the process that made it and every
    process it hands the store to (DataLoader workers under any start method, epoch after epoch): an anonymous
    file (no name on any filesystem, so nothing is left behind, even by a killed run) of one byte per shard, 1 once
    the shard's bytes matched the manifest. Forked workers inherit its descriptor; spawned ones get a duplicate
    when the store is pickled into them (pickled any other way, the ledger is dropped: that copy hashes for
    itself).

    A process about to hash shard i holds a lock on byte i (`fcntl.lockf`: per process, released by the kernel if
    the process dies), so two workers needing one shard hash it once: the second waits, then finds the 1. A hash
    that fails marks nothing (every reader then finds the fault itself). Where the file cannot be locked or read,
    `claim` returns None and the caller hashes for itself."""

    def __init__(self, shards: int, fd: int | None = None):
        self.shards = shards
        if fd is None:
            fd = _anonymous_file()
            try:
                os.ftruncate(fd, shards)
            except OSError:
                os.close(fd)
                raise
        self.fd = fd
        weakref.finalize(self, os.close, fd)

    def __reduce__(self):
        from multiprocessing import context, reduction

        if context.get_spawning_popen() is None:  # not into a process being started: no descriptor to share
            return _no_ledger, ()
        return _rebuild_ledger, (self.shards, reduction.DupFd(self.fd))

    def claim(self, index: int) -> bool | None:
        """Lock shard `index` (waiting while another process hashes it): True if it was hashed in this run, False
        if the caller is to hash it (then `release(index, hashed)`), None if the ledger is unusable here."""
        try:
            import fcntl

            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, index, os.SEEK_SET)
        except (ImportError, OSError):
            return None
        try:
            done = os.pread(self.fd, 1, index) == b"\x01"
        except OSError:
            done = None
        if done is not False:
            self.release(index, False)
        return done

    def release(self, index: int, hashed: bool) -> None:
        """Unlock shard `index`, marking it hashed if `hashed`."""
        import fcntl

        try:
            if hashed:
                os.pwrite(self.fd, b"\x01", index)
        except OSError:
            pass  # not marked: the others hash it themselves
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, index, os.SEEK_SET)

    def marked(self) -> list[int]:
        """The shards hashed in this run (none if the ledger cannot be read here)."""
        try:
            return [i for i, b in enumerate(os.pread(self.fd, self.shards, 0)) if b == 1]
        except OSError:
            return []


def _anonymous_file() -> int:
    """A descriptor of a read-write file with no name (memfd on Linux, else an unlinked temporary file)."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("moekd-hashed", os.MFD_CLOEXEC)
        except OSError:
            pass
    with tempfile.TemporaryFile() as f:
        return os.dup(f.fileno())


def _rebuild_ledger(shards: int, fd) -> HashLedger:
    return HashLedger(shards, fd.detach())


def _no_ledger() -> None:
    return None


class LogitStore:
    """An opened store: its manifest, and decoded access to its shards (each checked on first use: see module)."""

    def __init__(self, fs: pafs.FileSystem, root: str, manifest: Manifest, manifest_name: str = MANIFEST_NAME):
        self.fs, self.root, self.manifest, self.manifest_name = fs, root, manifest, manifest_name
        self._files: dict[str, pa.ipc.RecordBatchFileReader] = {}
        self._orders: dict[str, ShardModel] = {}  # each shard's model: v1 its IdOrder, v2 its ContextModel
        self._listed = {s.file: (i, s) for i, s in reversed(list(enumerate(manifest.shards)))}  # first entry wins
        self._hashed: set[str] = set()  # shard files whose every byte matched the manifest in this process
        self.ledger: HashLedger | None = None  # shared with DataLoader workers: `share_hash_checks`
        faults = self.manifest_faults()
        if faults:
            raise StoreError(storefs.join(root, manifest_name), "; ".join(f"{field}: {problem}"
                                                                        for field, problem in faults)
                             + ". Do not train on it: restore the manifest as it was written, or rebuild the store",
                             faults[0][0])
        try:  # after the manifest's own checks: an edited codec name is reported as the edit it is
            self.codec = make_codec(manifest)
        except TargetError as e:
            raise StoreError(storefs.join(root, manifest_name), str(e), "codec.name") from None

    @classmethod
    def open(cls, store: str, filesystem: pafs.FileSystem | None = None,
             manifest_name: str = MANIFEST_NAME) -> LogitStore:
        """Open a store after checking its manifest (`manifest_faults`); raises StoreError on any fault."""
        fs, root = storefs.resolve(store, filesystem)
        return cls(fs, root, Manifest.load(fs, root, manifest_name), manifest_name)

    def __getstate__(self) -> dict:
        """DataLoader workers reopen (and so check again) shard files themselves: handles do not cross processes.
        The ledger does: a worker's hash counts for the others and for later epochs' workers."""
        return dict(self.__dict__, _files={})

    def share_hash_checks(self) -> LogitStore:
        """Share the sha256 checks of this run with the processes this store is handed to (DataLoader workers):
        made before they start, the ledger (`HashLedger`) lets each shard be hashed once per run, by whichever
        process needs it first, rather than once per process. Without it (or where it cannot be made) every process
        hashes the shards it opens. Returns the store."""
        if self.ledger is None and self.manifest.shards:
            try:
                self.ledger = HashLedger(len(self.manifest.shards))
            except OSError:
                pass
        return self

    @property
    def hashed(self) -> set[str]:
        """Shard files whose sha256 was checked in this run: by this process, or by any sharing its ledger."""
        shared = self.ledger.marked() if self.ledger is not None else []
        return self._hashed | {self.manifest.shards[i].file for i in shared}

    # ------------------------------------------------------------ checks
    def manifest_faults(self) -> list[tuple[str, str]]:
        """(manifest field, problem) for a manifest that contradicts itself, and for shard files of this
        manifest's writer(s) in the store directory that it does not list (checked once the store is complete: a
        writer renames a finished shard into place just before it lists it). Reads the directory, not the shards.
        """
        faults = self.manifest.consistency_faults()
        if faults and faults[0][0] == "fingerprint" and self.manifest.shards:
            faults[1:1] = self._edited_fields(self.manifest.shards[0].file)
        if self.manifest.status != "complete":
            return faults
        own = WORKER_MANIFEST.fullmatch(self.manifest_name)
        prefixes = {m.group(1) for s in self.manifest.shards if (m := SHARD_FILE.fullmatch(s.file))}
        if own:
            prefixes.add(worker_names(int(own.group(1)), int(own.group(2)))[0])
        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
            m = SHARD_FILE.fullmatch(info.base_name)
            if m is None or info.base_name in self._listed or info.type != pafs.FileType.File:
                continue
            if m.group(1) in prefixes or (not own and BUILD_SHARD_PREFIX.fullmatch(m.group(1))):
                faults.append(("shards", f"{info.base_name} is in the store directory but not listed (an entry "
                               "was removed from the manifest, or a file was added): restore the manifest, or "
                               "move the file out of the store"))
        return faults

    def _edited_fields(self, file: str) -> list[tuple[str, str]]:
        """Which decoding fields of the manifest differ from what shard `file` was written with (read from its
        footer only; nothing for a shard written before shards recorded it, or one that cannot be read)."""
        try:
            recorded = pa.ipc.open_file(self.fs.open_input_file(storefs.join(self.root, file))).metadata or {}
            differences = identity_differences(json.loads(recorded[SHARD_IDENTITY_KEY]), file, self.manifest)
        except (KeyError, ValueError, OSError):
            return []
        return [(field, f"{want!r}, but {file} was written with {have!r}") for field, have, want in differences]

    def _check_shard(self, index: int, s: ShardInfo, force_hash: bool = False) -> pa.ipc.RecordBatchFileReader:
        """Open shard `s` (the manifest's shards[index]) after checking every byte and count of it against the
        manifest. One sequential read for the sha256 (once per run, or again with `force_hash`) plus the token
        columns for the counts, before any row is decoded; raises StoreError(shard path, problem, manifest field).
        """
        path, at = storefs.join(self.root, s.file), f"shards[{index}]"

        def fault(problem: str, field: str | None) -> StoreError:
            return StoreError(path, problem, field)

        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise fault("missing (listed in the manifest, not on the filesystem)", f"{at}.file")
        size = info.size  # None where the filesystem does not say
        if size is not None and size != s.bytes:
            raise fault(f"size {size} bytes, manifest says {s.bytes} (truncated or overwritten; {at}.bytes)",
                        f"{at}.bytes")
        if size is None or force_hash or s.file not in self._hashed:  # hashed earlier in this run: other checks
            claim = self.ledger.claim(index) if self.ledger is not None and size is not None and not force_hash \
                else None
            if claim is False:  # this process hashes it for the run (the others sharing the ledger wait)
                hashed = False
                try:
                    self._hash(path, at, s)
                    hashed = True
                finally:
                    self.ledger.release(index, hashed)
            elif claim is None:  # no ledger here, or a check that must hash: this process hashes for itself
                self._hash(path, at, s)
            self._hashed.add(s.file)
        try:
            reader = pa.ipc.open_file(self.fs.open_input_file(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise fault(f"not a readable Arrow IPC file ({e})", None) from e
        recorded = (reader.metadata or {}).get(SHARD_IDENTITY_KEY)
        if recorded is not None:  # stores written before shards recorded their identity skip this
            for field, have, want in identity_differences(json.loads(recorded), s.file, self.manifest):
                name = f"{at}.file" if field == "file" else field
                raise fault(f"written as {field} = {have!r}, but the manifest says {name} = {want!r} (the manifest "
                            "was edited, or the file is another shard's)", name)
        expected = shard_schema(self.codec, with_domain=s.domains is not None,
                                with_labels=self.manifest.target.label_logprobs)
        if not reader.schema.remove_metadata().equals(expected):
            raise fault(f"schema {reader.schema.remove_metadata()} differs from the one format v1 gives target "
                        f"{self.manifest.target} ({expected}); target was edited?", "target")
        try:
            order = read_shard_model(self.codec, reader.schema.metadata or {}, reader.metadata or {},
                                     self.manifest.vocab_size)
        except KeyError:
            raise fault(f"metadata lacks {model_key(self.codec).decode()}", None) from None
        except (TargetError, ValueError, IndexError) as e:
            raise fault(f"its {'context model' if model_key(self.codec) != b'kd.id_order' else 'id order'} does not "
                        f"fit vocab_size {self.manifest.vocab_size:,} ({e})", "vocab_size") from e
        self._check_counts(path, at, s)
        self._orders[s.file] = order
        return reader

    def _hash(self, path: str, at: str, s: ShardInfo) -> None:
        """The sha256 of every byte of a shard (and its size, where the filesystem did not say) against its entry."""
        digest, size = storefs.sha256_of(self.fs, path)
        if size != s.bytes:
            raise StoreError(path, f"size {size} bytes, manifest says {s.bytes} (truncated or overwritten; "
                             f"{at}.bytes)", f"{at}.bytes")
        if digest != s.sha256:
            raise StoreError(path, f"sha256 mismatch: the file changed or is corrupted (it hashes to {digest[:16]}"
                             f"..., {at}.sha256 says {s.sha256[:16]}...)", f"{at}.sha256")

    def _check_counts(self, path: str, at: str, s: ShardInfo) -> None:
        """Record batches, rows, tokens and target positions of a shard against its manifest entry (reads only
        the input_ids and loss_mask columns)."""
        names = shard_schema(self.codec).names
        options = pa.ipc.IpcReadOptions(included_fields=[names.index("input_ids"), names.index("loss_mask")])
        tokens_of = pa.ipc.open_file(self.fs.open_input_file(path), options=options)
        if tokens_of.num_record_batches != len(s.batch_rows):
            raise StoreError(path, f"{tokens_of.num_record_batches} record batches, manifest lists "
                             f"{len(s.batch_rows)} in {at}.batch_rows", f"{at}.batch_rows")
        batch_rows, tokens, positions = [], 0, 0
        for b in range(tokens_of.num_record_batches):
            batch = tokens_of.get_batch(b)
            batch_rows.append(batch.num_rows)
            tokens += len(batch.column("input_ids").values)
            positions += batch.column("loss_mask").values.true_count
        for field, have, want in (("batch_rows", batch_rows, s.batch_rows), ("tokens", tokens, s.tokens),
                                  ("target_positions", positions, s.target_positions)):
            if have != want:
                raise StoreError(path, f"holds {have} {field.replace('_', ' ')}, manifest says {at}.{field} = {want}",
                                 f"{at}.{field}")

    # ------------------------------------------------------------ raw access
    def shard_reader(self, file: str) -> pa.ipc.RecordBatchFileReader:
        """The open reader of a listed shard, checked against the manifest the first time this process opens it."""
        if file not in self._files:
            if file not in self._listed:
                raise StoreError(storefs.join(self.root, file), "not a shard of this store (not in its manifest)")
            self._files[file] = self._check_shard(*self._listed[file])
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
        """Check every shard against the manifest (the checks of a first open: size, sha256, identity, schema,
        record batches, rows, tokens, targets) and, with `decode`, decode and check every row.

        Returns the faults found, each starting with the shard file it is in; an empty list means the store is
        sound. Manifest faults stop `open` itself; the ones found here (`manifest_faults` again: a shard file added
        since the store was opened) start with the manifest's name.
        """
        faults = [f"{self.manifest_name}: {field}: {problem}" for field, problem in self.manifest_faults()]
        for i, s in enumerate(self.manifest.shards):
            if self._listed[s.file][0] != i:
                continue  # listed twice: reported above
            try:
                faults.extend(f"{s.file}: {msg}" for msg in self._verify_shard(s, decode))
            except StoreError as e:
                faults.append(f"{s.file}: {e.problem}")
            except Exception as e:  # any failure to read is a fault of this shard, reported by name
                faults.append(f"{s.file}: cannot be read ({type(e).__name__}: {e})")
        return faults

    def _verify_shard(self, s: ShardInfo, decode: bool) -> list[str]:
        # check again, the sha256 too, even if this run has opened it before
        reader = self._files[s.file] = self._check_shard(*self._listed[s.file], force_hash=True)
        if not decode:
            return []
        faults = []
        domains: dict[str, dict[str, int]] = {}
        for b in range(reader.num_record_batches):
            try:
                for r in self.decode_batch(s.file, reader.get_batch(b)):
                    _check_row(r, self.manifest.vocab_size)
                    if r.domain is not None:
                        count_domain_row(domains, r.domain, r.input_ids.size, r.target_ids.shape[0])
            except (TargetError, ValueError, IndexError) as e:
                faults.append(f"record batch {b}: cannot be decoded ({e})")
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

    def __init__(self, store: LogitStore, batch: pa.RecordBatch, order: ShardModel):
        self.store, self.order = store, order
        ids = batch.column("input_ids")
        self.offsets = ids.offsets.to_numpy()
        self.ids = ids.values.to_numpy(zero_copy_only=False)
        self.mask = batch.column("loss_mask").values.to_numpy(zero_copy_only=False)
        self.source = batch.column("source_index").to_numpy()
        self.payload_cols = [_binary_slices(batch.column(c)) for c in store.codec.columns]
        has_domain = batch.schema.get_field_index(DOMAIN_COLUMN) >= 0
        self.domains = batch.column(DOMAIN_COLUMN).to_pylist() if has_domain else None
        labels = batch.column(LABEL_COLUMN) if batch.schema.get_field_index(LABEL_COLUMN) >= 0 else None
        self.labels = None if labels is None else (labels.offsets.to_numpy(), labels.values.to_numpy())

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, i: int) -> DecodedRow:
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        mask = self.mask[lo:hi]
        codec = self.store.codec
        payload = Payload.of_columns(codec.columns, [col(i) for col in self.payload_cols])
        row_ids = self.ids[lo:hi]
        contexts = row_ids[:-1][mask[1:]].astype(np.int64)  # each target's context token (codec v2)
        ids, lp, tmask, tail = codec.decode(payload, int(mask.sum()), self.order, contexts)
        domain = self.domains[i] if self.domains is not None else None
        labels = None
        if self.labels is not None:
            offsets, values = self.labels
            labels = values[offsets[i]:offsets[i + 1]]
        return DecodedRow(int(self.source[i]), self.ids[lo:hi].astype(np.int64), mask, ids, lp, tmask, tail, domain,
                          labels)


def _check_row(r: DecodedRow, vocab_size: int) -> None:
    if r.target_ids.shape[0] != int(r.loss_mask.sum()):
        raise TargetError(f"row {r.source_index}: target count differs from its loss mask")
    if r.target_ids.size and (r.target_ids.min() < 0 or r.target_ids.max() >= vocab_size):
        raise TargetError(f"row {r.source_index}: target id outside the vocabulary")
    if np.isnan(r.target_logprobs).any() or np.isnan(r.target_tail).any():
        raise TargetError(f"row {r.source_index}: NaN in decoded targets")
    if r.label_logprobs is not None and (r.label_logprobs.shape != r.target_ids.shape[:1]
                                         or not np.isfinite(r.label_logprobs).all() or (r.label_logprobs > 0).any()):
        raise TargetError(f"row {r.source_index}: label log-probs are not one finite log-prob per target position")
