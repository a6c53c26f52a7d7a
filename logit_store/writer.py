"""ShardWriter: the only code that writes a store. Shards appear whole or not at all; the manifest is atomic."""

from __future__ import annotations

import errno
import os
import re
import socket
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from . import fs as storefs
from .codecs import SampledTargets, TargetError, TopKTargets, context_tokens
from .faults import crash_point
from .format import (
    MANIFEST_NAME,
    learn_shard_model,
    make_codec,
    original_name,
    shard_footer,
    shard_metadata,
    shard_name,
    shard_schema,
)
from .manifest import Manifest, ManifestError, ShardInfo, count_domain_row


@dataclass
class StoreRow:
    """One training sequence: token ids, which tokens are predicted (carry a loss), and the teacher's targets.

    `loss_mask[t]` is True when token t is a label, predicted from tokens < t (so loss_mask[0] is False).
    `targets` holds one entry per True in loss_mask, in order.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    targets: TopKTargets | SampledTargets
    source_index: int = -1  # index of the input example the row came from (for tracing and resume)
    domain: str | None = None  # the row's domain (code, chat, ...): in a store, every row has one or none does


# errnos of a lock request that mean "another process holds it"; any other error means this filesystem cannot
# lock (ENOLCK: NFS without lockd; ENOSYS/EOPNOTSUPP: Lustre without flock, many FUSE mounts)
LOCK_HELD_ERRNOS = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})


class OutputLock:
    """An exclusive lock on one writer's part of a store (its manifest), held while it writes.

    Two builds of the same worker pointed at one store would overwrite each other's shards and manifest; with the
    lock, the second stops with an error naming the holder. Local paths (and file://) take a POSIX record lock
    (`fcntl.lockf`) on `.<manifest>.lock` beside the manifest: the kernel drops it when the holder dies, even by
    `kill -9`, so there is no stale lock to clean up. Not `flock`: an flock belongs to the open file, which a
    forked child (a vLLM engine process forked by the build) shares and would hold on after a `kill -9` of the
    build; a record lock belongs to the process alone. Record locks do not conflict within a process, so a
    second lock of the same part in this process is refused here. Object stores (s3://, gs://, ...) have no such
    lock: there, nothing is locked and the scheduler must run each worker index once (docs/BUILD.md).
    """

    _held: set[str] = set()  # lock files this process holds

    def __init__(self, store: str, manifest_name: str = MANIFEST_NAME, filesystem: pafs.FileSystem | None = None):
        self.fs, self.root = storefs.resolve(store, filesystem)
        self.path: str | None = None
        self._fd: int | None = None
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise ManifestError(f"--out {store} is a file; the store must be a directory (a new or empty one, or "
                                "the store to --resume)")
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as e:
            raise ManifestError(f"cannot create the store directory {store}: {e}") from e
        if isinstance(self.fs, pafs.LocalFileSystem):
            self._lock_local(store, storefs.join(self.root, f".{manifest_name}.lock"))

    def _lock_local(self, store: str, path: str) -> None:
        import fcntl

        key = os.path.realpath(path)
        if key in OutputLock._held:  # checked before opening: closing any descriptor of the file drops our lock
            raise ManifestError(f"{store} is being written by another build of the same worker in this process "
                                f"(lock {path}): wait for it to finish, or use another --out")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ManifestError(f"cannot write to the store directory {store} ({e.strerror}): choose a writable "
                                "--out") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in LOCK_HELD_ERRNOS:  # else: the filesystem cannot lock, and `holder` names a dead run
                raise ManifestError(f"{store} is being written by another build of the same worker ({holder}, "
                                    f"lock {path}): wait for it to finish, or use another --out") from None
            raise ManifestError(f"{store}: locking is not supported on this filesystem (errno {e.errno}, "
                                f"{e.strerror}, locking {path}), so a second build of this worker could not be "
                                "kept out: build into a local --out (then copy the store), or onto a filesystem "
                                "with locks (NFS with lockd running, Lustre mounted with -o flock)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"kdstore build on {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        self.path, self._fd, self._key = path, fd, key
        OutputLock._held.add(key)

    def release(self) -> None:
        """Give the lock up (closing the file releases the record lock). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            OutputLock._held.discard(self._key)


class ShardWriter:
    """Appends rows to a store: validated, encoded, batched into Arrow record batches, cut into shards.

    Each shard is an Arrow IPC file (zstd-compressed buffers) written under a temporary name and renamed when
    complete; its row/token/byte counts and sha256 then go into the manifest, which is replaced atomically.
    A crash therefore loses at most the shard in progress, and `resume=True` continues after the last
    complete shard (the caller skips the `manifest.rows` rows those shards already hold); it deletes the dead
    run's temp files and any shard file of its own that the manifest does not list (a crash between a shard's
    rename and the manifest update leaves one: its rows are written again). The writer holds an `OutputLock` on
    its manifest from start to close/abort (pass `lock` to take it earlier, before a slow setup).
    """

    def __init__(
        self,
        store: str,
        manifest: Manifest,
        *,
        shard_tokens: int = 1 << 22,
        batch_tokens: int = 1 << 16,
        prefix: str = "shard",
        manifest_name: str = MANIFEST_NAME,
        resume: bool = False,
        filesystem: pafs.FileSystem | None = None,
        lock: OutputLock | None = None,
    ):
        self.lock = lock or OutputLock(store, manifest_name, filesystem)
        try:
            self._open(store, manifest, shard_tokens, batch_tokens, prefix, manifest_name, resume, filesystem)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, store, manifest, shard_tokens, batch_tokens, prefix, manifest_name, resume, filesystem):
        self.fs, self.root = storefs.resolve(store, filesystem)
        self.shard_tokens, self.batch_tokens = shard_tokens, min(batch_tokens, shard_tokens)
        self.prefix, self.manifest_name = prefix, manifest_name
        self.codec = make_codec(manifest)
        path = storefs.join(self.root, manifest_name)
        if storefs.exists(self.fs, path):
            if not resume:
                raise ManifestError(f"{path} exists: pass resume=True (--resume) to continue that store, or "
                                    "choose a new output directory")
            old = Manifest.load(self.fs, self.root, manifest_name)
            differences = old.differences(manifest)
            if differences:
                raise ManifestError(f"{path} was written with different settings; refusing to mix them in one "
                                    "store: " + "; ".join(differences))
            manifest = old
            manifest.status = "in_progress"
        self.manifest = manifest
        self.removed_files: list[str] = []  # what a crashed run left behind, deleted
        self._clean_up_crashed_run(listed_manifest=storefs.exists(self.fs, path))
        self._next_shard = len([s for s in manifest.shards if self._is_own_shard(s.file)])
        # whether rows carry a domain: fixed by the shards already written, else by the first row
        self._with_domain = manifest.shards[-1].domains is not None if manifest.shards else None
        self._ipc = pa.ipc.IpcWriteOptions(
            compression=pa.Codec(manifest.codec.compression, compression_level=manifest.codec.compression_level))
        self._pending: list[StoreRow] = []
        self._pending_tokens = 0
        self._shard: dict | None = None
        self.rows = manifest.rows  # rows written so far, complete shards included
        self.manifest.save(self.fs, self.root, manifest_name)

    # ------------------------------------------------------------ public
    def write(self, row: StoreRow) -> None:
        self._validate(row)
        self._pending.append(row)
        self._pending_tokens += len(row.input_ids)
        if self._pending_tokens >= self.batch_tokens:
            self._flush_batch()
        self.rows += 1
        crash_point("row-written", self.rows - 1)

    def close(self) -> Manifest:
        """Write what is pending, finish the last shard, mark the store complete."""
        if self._pending:
            self._flush_batch()
        self._close_shard()
        self.manifest.status = "complete"
        self.manifest.save(self.fs, self.root, self.manifest_name)
        self.lock.release()
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress (its temp file); complete shards and the manifest stay valid."""
        try:
            self._pending.clear()
            if self._shard is not None:
                self._shard["writer"].close()
                self._shard["sink"].close()
                self.fs.delete_file(self._shard["tmp"])
                self._shard = None
        finally:
            self.lock.release()

    def discard(self) -> None:
        """Abort a writer that holds no row, and remove its manifest: no empty store is left behind to resume."""
        if self.manifest.shards or self._pending:
            raise ManifestError(f"{self.root}: refusing to discard a store that holds rows")
        try:
            self.fs.delete_file(storefs.join(self.root, self.manifest_name))
        finally:
            self.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------ internals
    def _validate(self, row: StoreRow) -> None:
        where = f"row {row.source_index}" if row.source_index >= 0 else "row"
        ids, mask = np.asarray(row.input_ids), np.asarray(row.loss_mask)
        try:
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise TargetError("input_ids must be a non-empty 1-D integer sequence")
            if ids.min() < 0 or ids.max() >= self.manifest.vocab_size:
                raise TargetError(f"input id outside the vocabulary [0, {self.manifest.vocab_size})")
            if mask.shape != ids.shape or mask.dtype != np.bool_:
                raise TargetError(f"loss_mask must be a bool array as long as input_ids ({ids.size})")
            if mask[0]:
                raise TargetError("loss_mask[0] is True, but the first token has no context to predict it from")
            if len(row.targets) != int(mask.sum()):
                raise TargetError(f"{len(row.targets)} target positions for {int(mask.sum())} loss positions")
            if not mask.any():
                raise TargetError("no position carries a loss")
            if row.domain is not None and (not isinstance(row.domain, str) or not row.domain):
                raise TargetError(f"domain must be a non-empty string, got {row.domain!r}")
            if self._with_domain is not None and self._with_domain != (row.domain is not None):
                raise TargetError("has a domain, but this store's rows have none" if row.domain is not None else
                                  "has no domain, but this store's rows carry one: give every row a domain")
            self.codec.validate(row.targets)
            if self.manifest.target.label_logprobs:
                labels = getattr(row.targets, "labels", None)
                if labels is None or np.shape(labels) != (len(row.targets),):
                    raise TargetError("this store records label log-probs: targets.labels must hold the teacher's "
                                      "log-prob of the row's own token at each target position")
                if not (np.isfinite(labels).all() and (np.asarray(labels) <= 0).all()):
                    raise TargetError("targets.labels must be finite log-probs (<= 0)")
            if self._with_domain is None:
                self._with_domain = row.domain is not None
        except TargetError as e:
            raise TargetError(f"{where}: {e}") from None

    def _open_shard(self) -> None:
        # The model (v1: the id order; v2: the context model) comes from the shard's first record batch: a good
        # sample of what the shard uses.
        targets = [r.targets for r in self._pending]
        sample = np.concatenate([np.asarray(t.ids).ravel() for t in targets])
        sizes = np.concatenate([np.full(len(t), np.asarray(t.ids).shape[-1]) if isinstance(t, TopKTargets)
                                else np.asarray(t.sizes) for t in targets])
        contexts = np.concatenate([context_tokens(r.input_ids, r.loss_mask) for r in self._pending])
        order = learn_shard_model(self.codec, sample, sizes, contexts, self.manifest.vocab_size,
                                  self.manifest.codec.id_order_head)
        name = shard_name(self.prefix, self._next_shard)
        path = storefs.join(self.root, name)
        tmp = storefs.temp_name(path)
        sink = storefs.HashingSink(self.fs.open_output_stream(tmp))
        schema = shard_schema(self.codec, with_domain=bool(self._with_domain),
                              with_labels=self.manifest.target.label_logprobs)
        writer = pa.ipc.new_file(sink, schema.with_metadata(shard_metadata(order)), options=self._ipc,
                                 metadata=shard_footer(name, self.manifest, order))
        self._shard = dict(name=name, path=path, tmp=tmp, sink=sink, writer=writer, order=order, schema=schema,
                           rows=0, tokens=0, positions=0, batch_rows=[], domains={} if self._with_domain else None)

    def _flush_batch(self) -> None:
        if self._shard is None:
            self._open_shard()
        sh = self._shard
        payloads = [self.codec.encode(r.targets, sh["order"], context_tokens(r.input_ids, r.loss_mask))
                    for r in self._pending]
        lengths = np.array([len(r.input_ids) for r in self._pending])
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        ids = np.concatenate([np.asarray(r.input_ids) for r in self._pending]).astype(np.int32)
        mask = np.concatenate([np.asarray(r.loss_mask) for r in self._pending])
        columns = [
            pa.array([r.source_index for r in self._pending], pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(ids)),
            pa.ListArray.from_arrays(offsets, pa.array(mask)),
        ]
        per_row = [p.column_values(self.codec.columns) for p in payloads]
        columns += [pa.array(column, pa.binary()) for column in zip(*per_row, strict=True)]  # the codec's columns
        if self.manifest.target.label_logprobs:
            positions = np.array([len(r.targets) for r in self._pending])
            labels = np.concatenate([np.asarray(r.targets.labels, np.float32) for r in self._pending])
            columns.append(pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(positions)]).astype(
                np.int32)), pa.array(labels)))
        if sh["domains"] is not None:
            columns.append(pa.array([r.domain for r in self._pending], pa.string()))
            for r in self._pending:
                count_domain_row(sh["domains"], r.domain, len(r.input_ids), int(np.asarray(r.loss_mask).sum()))
        sh["writer"].write_batch(pa.RecordBatch.from_arrays(columns, schema=sh["schema"]))
        sh["rows"] += len(self._pending)
        sh["tokens"] += int(lengths.sum())
        sh["positions"] += int(mask.sum())
        sh["batch_rows"].append(len(self._pending))
        self._pending.clear()
        self._pending_tokens = 0
        if sh["tokens"] >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        sh = self._shard
        if sh is None:
            return
        sh["writer"].close()
        sh["sink"].close()
        self.fs.move(sh["tmp"], sh["path"])
        crash_point("shard-renamed", self._next_shard)
        self.manifest.shards.append(ShardInfo(
            file=sh["name"], rows=sh["rows"], tokens=sh["tokens"], target_positions=sh["positions"],
            bytes=sh["sink"].size, sha256=sh["sink"].sha256.hexdigest(), batch_rows=sh["batch_rows"],
            domains=dict(sorted(sh["domains"].items())) if sh["domains"] is not None else None))
        self.manifest.save(self.fs, self.root, self.manifest_name)
        crash_point("shard-listed", self._next_shard)
        self._shard = None
        self._next_shard += 1

    def _is_own_shard(self, name: str) -> bool:
        m = re.fullmatch(re.escape(self.prefix) + r"-(\d+)\.arrow", name)
        return m is not None and name == shard_name(self.prefix, int(m.group(1)))

    def _clean_up_crashed_run(self, listed_manifest: bool) -> None:
        """Delete what a crashed run of this writer left: temp files (never listed, so never read) and shard files
        the manifest does not list (renamed, but the crash came before the manifest update). Check that the
        shards it does list are there, whole, before anything is appended to them."""
        listed = {s.file: s for s in self.manifest.shards}
        stray, on_disk = [], set()
        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
            on_disk.add(info.base_name)
            original = original_name(info.base_name)
            if original is not None and (original == self.manifest_name or self._is_own_shard(original)):
                stray.append(info)
            elif self._is_own_shard(info.base_name):
                if info.base_name not in listed:
                    stray.append(info)
                elif info.size != listed[info.base_name].bytes:
                    raise ManifestError(f"{info.path} holds {info.size:,} bytes but the manifest says "
                                        f"{listed[info.base_name].bytes:,}: the store is damaged; start it again in "
                                        "a new directory")
        if stray and not listed_manifest and any(original_name(i.base_name) is None for i in stray):
            raise ManifestError(f"{self.root} holds shard files ({', '.join(sorted(i.base_name for i in stray))}) "
                                f"but no {self.manifest_name}: choose an empty --out, or delete them")
        missing = sorted(f for f in listed if self._is_own_shard(f) and f not in on_disk)
        if missing:
            raise ManifestError(f"{self.root}: shards {missing} are listed in {self.manifest_name} but missing: the "
                                "store is damaged; start it again in a new directory")
        for info in stray:
            self.fs.delete_file(info.path)
            self.removed_files.append(info.base_name)
