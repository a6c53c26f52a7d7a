"""ShardWriter: the only code that writes a store. Shards appear whole or not at all; the manifest is atomic."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from . import fs as storefs
from .codecs import IdOrder, SampledTargets, TargetError, TopKTargets
from .format import MANIFEST_NAME, make_codec, original_name, shard_footer, shard_metadata, shard_name, shard_schema
from .manifest import Manifest, ManifestError, ShardInfo


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


class ShardWriter:
    """Appends rows to a store: validated, encoded, batched into Arrow record batches, cut into shards.

    Each shard is an Arrow IPC file (zstd-compressed buffers) written under a temporary name and renamed when
    complete; its row/token/byte counts and sha256 then go into the manifest, which is replaced atomically.
    A crash therefore loses at most the shard in progress, and `resume=True` continues after the last
    complete shard (the caller skips the `manifest.rows` rows those shards already hold).
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
    ):
        self.fs, self.root = storefs.resolve(store, filesystem)
        self.shard_tokens, self.batch_tokens = shard_tokens, min(batch_tokens, shard_tokens)
        self.prefix, self.manifest_name = prefix, manifest_name
        self.codec = make_codec(manifest)
        self.fs.create_dir(self.root, recursive=True)
        path = storefs.join(self.root, manifest_name)
        if storefs.exists(self.fs, path):
            if not resume:
                raise ManifestError(f"{path} exists: pass resume=True (--resume) to continue that store, or "
                                    "choose a new output directory")
            old = Manifest.load(self.fs, self.root, manifest_name)
            if old.fingerprint() != manifest.fingerprint():
                raise ManifestError(f"{path} was written with different settings (teacher, tokenizer, targets, "
                                    "codec, input or sequence options); refusing to mix them in one store")
            manifest = old
            manifest.status = "in_progress"
        self.manifest = manifest
        self._remove_stale_temp_files()
        self._next_shard = len([s for s in manifest.shards if s.file.startswith(prefix + "-")])
        self._schema = shard_schema(self.codec)
        self._ipc = pa.ipc.IpcWriteOptions(
            compression=pa.Codec(manifest.codec.compression, compression_level=manifest.codec.compression_level))
        self._pending: list[StoreRow] = []
        self._pending_tokens = 0
        self._shard: dict | None = None
        self.manifest.save(self.fs, self.root, manifest_name)

    # ------------------------------------------------------------ public
    def write(self, row: StoreRow) -> None:
        self._validate(row)
        self._pending.append(row)
        self._pending_tokens += len(row.input_ids)
        if self._pending_tokens >= self.batch_tokens:
            self._flush_batch()

    def close(self) -> Manifest:
        """Write what is pending, finish the last shard, mark the store complete."""
        if self._pending:
            self._flush_batch()
        self._close_shard()
        self.manifest.status = "complete"
        self.manifest.save(self.fs, self.root, self.manifest_name)
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress (its temp file); complete shards and the manifest stay valid."""
        self._pending.clear()
        if self._shard is not None:
            self._shard["writer"].close()
            self._shard["sink"].close()
            self.fs.delete_file(self._shard["tmp"])
            self._shard = None

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
            self.codec.validate(row.targets)
        except TargetError as e:
            raise TargetError(f"{where}: {e}") from None

    def _open_shard(self) -> None:
        # The id order comes from the shard's first record batch: a good sample of what the shard uses.
        sample = np.concatenate([np.asarray(r.targets.ids).ravel() for r in self._pending])
        order = IdOrder.from_ids(sample, self.manifest.vocab_size, self.manifest.codec.id_order_head)
        name = shard_name(self.prefix, self._next_shard)
        path = storefs.join(self.root, name)
        tmp = storefs.temp_name(path)
        sink = storefs.HashingSink(self.fs.open_output_stream(tmp))
        writer = pa.ipc.new_file(sink, self._schema.with_metadata(shard_metadata(order)), options=self._ipc,
                                 metadata=shard_footer(name, self.manifest))
        self._shard = dict(name=name, path=path, tmp=tmp, sink=sink, writer=writer, order=order,
                           rows=0, tokens=0, positions=0, batch_rows=[])

    def _flush_batch(self) -> None:
        if self._shard is None:
            self._open_shard()
        sh = self._shard
        payloads = [self.codec.encode(r.targets, sh["order"]) for r in self._pending]
        lengths = np.array([len(r.input_ids) for r in self._pending])
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        ids = np.concatenate([np.asarray(r.input_ids) for r in self._pending]).astype(np.int32)
        mask = np.concatenate([np.asarray(r.loss_mask) for r in self._pending])
        columns = [
            pa.array([r.source_index for r in self._pending], pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(ids)),
            pa.ListArray.from_arrays(offsets, pa.array(mask)),
        ]
        per_row = [p.column_values(len(self.codec.columns)) for p in payloads]
        columns += [pa.array(column, pa.binary()) for column in zip(*per_row, strict=True)]  # the codec's columns
        sh["writer"].write_batch(pa.RecordBatch.from_arrays(columns, schema=self._schema))
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
        self.manifest.shards.append(ShardInfo(
            file=sh["name"], rows=sh["rows"], tokens=sh["tokens"], target_positions=sh["positions"],
            bytes=sh["sink"].size, sha256=sh["sink"].sha256.hexdigest(), batch_rows=sh["batch_rows"]))
        self.manifest.save(self.fs, self.root, self.manifest_name)
        self._shard = None
        self._next_shard += 1

    def _remove_stale_temp_files(self) -> None:
        """Temp files of ours left by a crashed run: never listed in a manifest, so never read; delete them."""
        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
            original = original_name(info.base_name)
            if original is not None and (original == self.manifest_name or original.startswith(self.prefix + "-")):
                self.fs.delete_file(info.path)
