"""Format v1 in code: file names, the shard schema and its metadata, and which codec a manifest's targets use
(`sqrtp-rankdelta-v1` or `ctxrank-v2`).

docs/FORMAT.md describes the format in words; this module and codecs.py (the byte encoding of the targets) are
its reference implementation. The writer and the reader both take the format from here and never from each
other. This module imports no other store module but the codecs, so that anything may import it.
"""

from __future__ import annotations

import json
import re
import uuid

import numpy as np
import pyarrow as pa

from .codecs import (
    CODEC_NAME,
    CODEC_NAME_V2,
    ContextModel,
    IdOrder,
    SampledCodec,
    SampledCodecV2,
    TargetError,
    TopKCodec,
    TopKCodecV2,
)

FORMAT_NAME = "kd-logit-store"
FORMAT_VERSION = 1

# ---------------------------------------------------------------- file names
MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "shard"
# manifest of worker i of N in a multi-worker build (`kdstore merge` combines them into MANIFEST_NAME)
WORKER_MANIFEST = re.compile(r"manifest-w(\d{5})-of-(\d{5})\.json")
TEMP_PREFIX = ".tmp-"
_TEMP_TAG = 12  # hex digits of randomness in a temp name


# `<prefix>-<NNNNN>.arrow`; group 1 = the writer's prefix, group 2 = the shard's index in that writer's sequence
SHARD_FILE = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*)-(\d{5,})\.arrow")
# the prefixes `kdstore build` writes: `shard` (one worker) and `shard-wIIIII` (worker I of several)
BUILD_SHARD_PREFIX = re.compile(r"shard(-w\d{5})?")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.arrow"


def worker_names(index: int, count: int) -> tuple[str, str]:
    """(shard prefix, manifest name) of build worker `index` of `count`; a single worker writes the store's own."""
    if count == 1:
        return SHARD_PREFIX, MANIFEST_NAME
    return f"{SHARD_PREFIX}-w{index:05d}", f"manifest-w{index:05d}-of-{count:05d}.json"


def temp_name(name: str) -> str:
    """`.tmp-<12 hex>-<name>`: where a file is written before it is renamed to `name`. Readers ignore it."""
    return f"{TEMP_PREFIX}{uuid.uuid4().hex[:_TEMP_TAG]}-{name}"


def original_name(name: str) -> str | None:
    """The name a temp file (see `temp_name`) was going to be renamed to; None if `name` is not a temp name."""
    if not name.startswith(TEMP_PREFIX):
        return None
    return name[len(TEMP_PREFIX) + _TEMP_TAG + 1:]


# ---------------------------------------------------------------- shards
ID_ORDER_KEY = b"kd.id_order"  # the shard's id-order head, little-endian uint32 (codec v1)
CONTEXT_MODEL_KEY = b"kd.context_model"  # codec v2: the shard's ContextModel, in the file (footer) metadata
FORMAT_VERSION_KEY = b"kd.format_version"
# Optional last column: the row's domain (a non-empty string), present in the shards of a store built with
# domains (kdstore build --domain / --domain-field) and absent otherwise, so stores without domains keep the
# exact schema earlier versions wrote.
DOMAIN_COLUMN = "domain"
# Optional column before it: the teacher's exact log-prob of the row's own token at each target position (float32,
# one per position), in stores built with label log-probs (manifest target.label_logprobs): what the teacher's NLL
# of a text needs, which the top-k does not hold when the token is outside it (student rollouts, kdstudent eval).
LABEL_COLUMN = "label_logprob"


Codec = TopKCodec | SampledCodec  # (TopKCodecV2 and SampledCodecV2 are subclasses)
ShardModel = IdOrder | ContextModel  # what a shard's targets are coded against: v1 an IdOrder, v2 a ContextModel


def make_codec(manifest) -> Codec:
    """The codec of a store's targets, from its `Manifest` (manifest.py, which imports this module, hence no
    annotation). The only place the target kind and the codec name are looked at to encode or decode."""
    t, name = manifest.target, manifest.codec.name
    if name not in (CODEC_NAME, CODEC_NAME_V2):
        raise TargetError(f"codec {name!r} is not one this version reads ({CODEC_NAME!r}, {CODEC_NAME_V2!r}): "
                          "upgrade the tool")
    v2 = name == CODEC_NAME_V2
    if t.kind == "topk":
        return (TopKCodecV2 if v2 else TopKCodec)(t.k, manifest.vocab_size, manifest.codec.levels)
    return (SampledCodecV2 if v2 else SampledCodec)(t.samples, manifest.vocab_size)


def learn_shard_model(codec: Codec, ids: np.ndarray, sizes: np.ndarray, contexts: np.ndarray, vocab_size: int,
                      head_size: int) -> ShardModel:
    """The model a new shard's targets are coded against, from a sample of them (the shard's first record batch):
    flat candidate ids, candidates per position, each position's context token."""
    if codec.name == CODEC_NAME_V2:
        return ContextModel.learn(ids, sizes, contexts, vocab_size, head_size)
    return IdOrder.from_ids(ids, vocab_size, head_size)


def read_shard_model(codec: Codec, schema_metadata: dict, file_metadata: dict, vocab_size: int) -> ShardModel:
    """A shard's model from its schema and file metadata; KeyError if absent, TargetError if malformed."""
    if codec.name == CODEC_NAME_V2:
        return ContextModel.from_bytes(file_metadata[CONTEXT_MODEL_KEY], vocab_size)
    return IdOrder.from_bytes(schema_metadata[ID_ORDER_KEY], vocab_size)


def model_key(codec: Codec) -> bytes:
    """The metadata key that holds a shard's model (schema metadata for v1, file metadata for v2)."""
    return CONTEXT_MODEL_KEY if codec.name == CODEC_NAME_V2 else ID_ORDER_KEY


def shard_schema(codec: Codec, with_domain: bool = False, with_labels: bool = False) -> pa.Schema:
    """Columns of a shard, in order: the row's tokens, the codec's binary target columns, then (`with_labels`) the
    teacher's log-probs of the row's own tokens and (`with_domain`) the row's domain."""
    return pa.schema([
        pa.field("source_index", pa.int64()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("loss_mask", pa.list_(pa.bool_())),
        *(pa.field(name, pa.binary()) for name in codec.columns),
        *([pa.field(LABEL_COLUMN, pa.list_(pa.float32()))] if with_labels else []),
        *([pa.field(DOMAIN_COLUMN, pa.string())] if with_domain else []),
    ])


def shard_metadata(model: ShardModel) -> dict[bytes, bytes]:
    """Schema metadata of a shard whose targets are encoded with `model` (v2 keeps its model in the file metadata,
    `shard_footer`, which the Arrow file holds once, where schema metadata is written twice)."""
    if isinstance(model, ContextModel):
        return {FORMAT_VERSION_KEY: str(FORMAT_VERSION).encode()}
    return {ID_ORDER_KEY: model.to_bytes(), FORMAT_VERSION_KEY: str(FORMAT_VERSION).encode()}


# ---------------------------------------------------------------- what a shard was written as (file footer)
SHARD_IDENTITY_KEY = b"kd.shard"  # file-level (IPC footer) metadata: JSON of `shard_identity`


def shard_identity(name: str, manifest) -> dict:
    """What a shard must agree with to be decoded right: its own file name and the manifest fields its bytes
    depend on. Written into each new shard's footer, so that a reader catches a manifest edited after the shard
    was written (or a shard file that is another's under a new name) even though the file's sha256 still matches.
    """
    return {"file": name, "vocab_size": manifest.vocab_size, "target": manifest.target.to_dict(),
            "codec": {"name": manifest.codec.name, "levels": manifest.codec.levels,
                      "id_bytes": manifest.codec.id_bytes}}


def shard_footer(name: str, manifest, model: ShardModel | None = None) -> dict[bytes, bytes]:
    """Footer metadata of a new shard (`pyarrow.ipc.new_file(..., metadata=...)`): see `shard_identity`, and a v2
    shard's `ContextModel`.

    Stores written before it existed have none; readers then skip that check (the sha256 still holds)."""
    out = {SHARD_IDENTITY_KEY: json.dumps(shard_identity(name, manifest), sort_keys=True).encode()}
    if isinstance(model, ContextModel):
        out[CONTEXT_MODEL_KEY] = model.to_bytes()
    return out


def identity_differences(recorded: dict, name: str, manifest) -> list[tuple[str, object, object]]:
    """(field, value the shard was written with, value in the manifest) wherever a shard's recorded identity
    (`shard_identity`, as read from its footer) disagrees with the manifest that lists it as `name`. Fields are
    named as in the manifest (`codec.levels`, `vocab_size`, ...); `file` is the shard's own name."""
    out: list[tuple[str, object, object]] = []

    def walk(have, want, where: str) -> None:
        if isinstance(want, dict) and isinstance(have, dict):
            for key in want:
                walk(have.get(key), want[key], f"{where}.{key}" if where else key)
        elif have != want:
            out.append((where, have, want))

    walk(recorded, shard_identity(name, manifest), "")
    return out
