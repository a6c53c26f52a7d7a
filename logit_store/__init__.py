"""The logit store: teacher next-token distributions, captured once, streamed by many training runs."""

__version__ = "0.1.0"

from .codecs import IdOrder, SampledCodec, SampledTargets, TargetError, TopKCodec, TopKTargets  # noqa: E402
from .manifest import CodecSpec, Manifest, ManifestError, ShardInfo, TargetSpec  # noqa: E402
from .reader import DecodedRow, KDStream, LogitStore, StoreError, StoreLoader, collate  # noqa: E402
from .writer import ShardWriter, StoreRow  # noqa: E402

__all__ = [
    "CodecSpec", "DecodedRow", "IdOrder", "KDStream", "LogitStore", "Manifest", "ManifestError", "SampledCodec",
    "SampledTargets", "ShardInfo", "ShardWriter", "StoreError", "StoreLoader", "StoreRow", "TargetError",
    "TargetSpec", "TopKCodec", "TopKTargets", "collate",
]
