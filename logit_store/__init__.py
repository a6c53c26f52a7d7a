"""The logit store: teacher next-token distributions, captured once, streamed by many training runs.

`import logit_store` loads the reading side only (numpy and pyarrow). The writer and the torch training stream
load on first use of their names, so that reading or verifying a store needs neither torch nor the writer.
"""

import importlib

from .codecs import IdOrder, SampledCodec, SampledTargets, TargetError, TopKCodec, TopKTargets  # noqa: E402
from .manifest import CodecSpec, Manifest, ManifestError, ShardInfo, TargetSpec  # noqa: E402
from .reader import DecodedRow, LogitStore, StoreError  # noqa: E402
from .version import __version__  # noqa: F401

_LAZY = {"ShardWriter": "writer", "StoreRow": "writer",
         "KDBatch": "stream", "KDStream": "stream", "StoreLoader": "stream", "collate": "stream"}

__all__ = [
    "CodecSpec", "DecodedRow", "IdOrder", "KDBatch", "KDStream", "LogitStore", "Manifest", "ManifestError",
    "SampledCodec", "SampledTargets", "ShardInfo", "ShardWriter", "StoreError", "StoreLoader", "StoreRow",
    "TargetError", "TargetSpec", "TopKCodec", "TopKTargets", "collate",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
