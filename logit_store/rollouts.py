"""The rollouts folder: what `kdstudent generate` writes and `kdstore build` reads, defined once for both.

A rollouts folder holds a policy's (a student's) sampled responses to prompts, as JSON lines, so that an inference
node can score them with the teacher (`kdstore build --input-ids-field prompt_ids --response-ids-field
response_ids`) and a training node can train on that store (on-policy distillation without a live teacher):

    ROLLOUTS/
      rollouts-NNNNNN.jsonl     chunk N: the rollouts of input prompts [N*C, (N+1)*C), in prompt then sample order
      _rollouts.wIIIII.json     worker I's manifest: policy, sampling settings, and when complete its counts
      .tmp-...                  a chunk being written (renamed into place when whole)

Each chunk is written whole or not at all and does not depend on which worker wrote it (worker I of W writes the
chunks N with N % W == I), so a folder written by W workers is byte-identical to one written by one, and a
resumed run only writes the chunks that are missing. Names starting with '_' or '.' are not data to
`datasets`/`kdstore build` (logit_store/inputs.py), so the build reads the chunks alone.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from pyarrow import fs as pafs

from .faults import crash_point
from .fs import temp_name, write_atomic

CHUNK_FILE = "rollouts-{:06d}.jsonl"
MANIFEST_FILE = "_rollouts.w{:05d}.json"
# the fields of every line, in order
FIELDS = ("prompt_index", "sample", "domain", "prompt", "response", "prompt_ids", "response_ids", "logprobs",
          "finish_reason")


class RolloutsError(ValueError):
    """A rollouts folder that cannot be used as it is (incomplete, or written with different settings)."""


def chunk_path(folder: str, chunk: int) -> str:
    return os.path.join(folder, CHUNK_FILE.format(chunk))


def manifest_path(folder: str, worker: int) -> str:
    return os.path.join(folder, MANIFEST_FILE.format(worker))


def write_manifest(folder: str, worker: int, manifest: dict[str, Any]) -> None:
    write_atomic(pafs.LocalFileSystem(), manifest_path(folder, worker),
                 json.dumps(manifest, indent=1, allow_nan=False).encode())


def write_chunk(folder: str, chunk: int, lines: list[dict[str, Any]]) -> None:
    """Write a chunk whole (a temp file renamed into place), one JSON object per line, fields in `FIELDS` order."""
    path = chunk_path(folder, chunk)
    tmp = temp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps({key: line[key] for key in FIELDS}, ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    crash_point("rollouts-chunk-written", chunk)
    os.replace(tmp, path)


def remove_temp_chunks(folder: str, chunks: range) -> None:
    """Remove the chunk files a killed run of these chunks left half-written (never read: their names start
    with '.')."""
    for chunk in chunks:
        for tmp in glob.glob(os.path.join(glob.escape(folder), ".tmp-*-" + CHUNK_FILE.format(chunk))):
            os.remove(tmp)


def read_manifests(folder: str) -> list[dict[str, Any]]:
    """Every worker manifest of a rollouts folder, by worker index ([] when `folder` is no rollouts folder)."""
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), MANIFEST_FILE.replace("{:05d}", "*"))))
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                out.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise RolloutsError(f"{path}: not a readable rollouts manifest ({e})") from e
    return out


def provenance(data: str) -> dict[str, Any] | None:
    """Where the responses of a build's input came from, when `data` is a rollouts folder (or a file in one): the
    policy, the sampling settings and the round, which `kdstore build` records as the store's `input.rollouts`.
    None for other inputs. A folder still being written, or whose workers disagree, is refused: its store would
    miss rollouts or mix two policies."""
    folder = data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))
    manifests = read_manifests(folder)
    if not manifests:
        return None
    first = manifests[0]
    workers = int(first["num_workers"])
    if sorted(m["worker_index"] for m in manifests) != list(range(workers)):
        raise RolloutsError(f"{folder}: rollouts of {workers} workers, but the manifests of workers "
                            f"{sorted(m['worker_index'] for m in manifests)} are here: run the missing workers "
                            "(kdstudent generate --worker-index I) first")
    pending = [m["worker_index"] for m in manifests if m.get("status") != "complete"]
    if pending:
        raise RolloutsError(f"{folder}: the rollouts of worker(s) {pending} are not complete: finish them "
                            "(kdstudent generate ... --resume) before scoring them")
    shared = ("policy", "sampling", "round", "prompts", "num_workers", "chunk_prompts")
    for m in manifests[1:]:
        differ = [key for key in shared if m.get(key) != first.get(key)]
        if differ:
            raise RolloutsError(f"{folder}: worker {m['worker_index']} was run with other {', '.join(differ)} "
                                "than worker 0: its rollouts come from another policy or setting")
    counts = {key: sum(m["counts"][key] for m in manifests) for key in first["counts"]}
    return {key: first[key] for key in ("policy", "sampling", "round", "prompts")} | {"counts": counts}


def describe(rollouts: dict[str, Any]) -> str:
    """One line for `kdstore info`: whose samples a store scored, how they were drawn, in which round."""
    policy, sampling = rollouts["policy"], rollouts["sampling"]
    return (f"round {rollouts['round']} rollouts of {policy['kind']} student {policy['path']} (fingerprint "
            f"{policy['fingerprint']}): {sampling['samples_per_prompt']} per prompt, temperature "
            f"{sampling['temperature']}, top-p {sampling['top_p']}, <= {sampling['max_new_tokens']} new tokens, seed "
            f"{sampling['seed']}, {sampling['backend']} backend")
