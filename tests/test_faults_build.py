"""`kdstore build` killed at named points and resumed equals a build that was never interrupted, bit for bit.

Each crash is a real `kill -9` (SIGKILL, no cleanup) of a real `kdstore build` process, placed by a crash point
(`MOEKD_FAULT=<point>:<n>`, logit_store/faults.py) rather than by a timer. The resume runs in this process on the
same tiny teacher. "Equal" means the shard files are byte-identical (same sha256, sizes, row counts and record
batches in the manifest), the store verifies, and no file of the crashed run is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from assets.synthetic import synthetic_corpus
from logit_store import LogitStore
from logit_store.build import BuildConfig, build
from logit_store.format import TEMP_PREFIX
from logit_store.teachers.hf import HFTeacher

BATCH_ROWS = 4
OPTIONS = dict(text_field="text", top_k=8, shard_tokens=400, record_batch_tokens=150, batch_rows=BATCH_ROWS,
               backend="hf", dtype="float32", progress=False)


def _flags(options: dict) -> list[str]:
    flags = []
    for name, value in options.items():
        if name == "progress":
            flags.append("--no-progress")
        else:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


@contextlib.contextmanager
def one_thread():
    """The subprocesses run with OMP_NUM_THREADS=1; run in-process builds the same way (a thread count can change
    float results in general; the bit-identity claim is for one thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return HFTeacher.from_pretrained(tiny_teacher_dir, dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("faults") / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_corpus(60, seed=11)))
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir, teacher, data, tmp_path_factory) -> str:
    """The same build, never interrupted."""
    out = str(tmp_path_factory.mktemp("faults") / "ref")
    with one_thread():
        build(BuildConfig(teacher=tiny_teacher_dir, data=data, out=out, **OPTIONS), teacher=teacher)
    return out


def _manifest(store: str) -> dict:
    with open(os.path.join(store, "manifest.json")) as f:
        return json.load(f)


def crash(tiny_teacher_dir: str, data: str, out: str, fault: str, options: dict = OPTIONS) -> None:
    """Run `kdstore build` until the crash point kills it."""
    args = [sys.executable, "-m", "cli.kdstore", "build", "--teacher", tiny_teacher_dir, "--data", data, "--out", out,
            *_flags(options)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MOEKD_FAULT=fault)
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, f"expected a SIGKILL at {fault}, got exit {run.returncode}: {run.stderr[-2000:]}"


def resume(tiny_teacher_dir: str, teacher: HFTeacher, data: str, out: str, options: dict = OPTIONS):
    with one_thread():
        return build(BuildConfig(teacher=tiny_teacher_dir, data=data, out=out, resume=True, **options),
                     teacher=teacher)


def assert_identical(reference: str, store: str) -> None:
    ref, got = _manifest(reference), _manifest(store)
    assert got["status"] == "complete"
    assert got["shards"] == ref["shards"]  # names, rows, tokens, bytes, sha256 and record batches, in order
    assert LogitStore.open(store).verify() == []
    files = sorted(os.listdir(store))
    assert files == sorted(os.listdir(reference)), "a file of the crashed run was left behind (or one is missing)"
    a, b = list(LogitStore.open(reference)), list(LogitStore.open(store))
    assert [r.source_index for r in a] == [r.source_index for r in b] == list(range(60))  # none lost, none twice
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.target_ids, y.target_ids) and np.array_equal(x.target_logprobs, y.target_logprobs)


def test_killed_before_the_first_shard(tiny_teacher_dir, teacher, data, reference, tmp_path):
    first = _manifest(reference)["shards"][0]
    assert len(first["batch_rows"]) >= 2, "the first shard must hold more than one record batch for this test"
    kill_at = first["batch_rows"][0]  # the first row of the shard's 2nd record batch: the 1st is in the temp file
    out = str(tmp_path / "s")
    crash(tiny_teacher_dir, data, out, f"row-written:{kill_at}")
    assert _manifest(out)["shards"] == [] and _manifest(out)["status"] == "in_progress"
    assert any(f.startswith(TEMP_PREFIX) for f in os.listdir(out)), "the shard in progress was not on disk"
    summary = resume(tiny_teacher_dir, teacher, data, out)
    assert summary.resumed_rows == 0 and summary.rows == 60
    assert_identical(reference, out)


def test_killed_mid_shard_in_a_teacher_batch_split_by_a_shard_end(tiny_teacher_dir, teacher, data, reference,
                                                                  tmp_path):
    ends = np.cumsum([s["rows"] for s in _manifest(reference)["shards"]])
    split = next(int(e) for e in ends[:-1] if e % BATCH_ROWS)  # a shard that ends inside a teacher batch
    out = str(tmp_path / "s")
    crash(tiny_teacher_dir, data, out, f"row-written:{split + 1}")  # the next shard has begun
    assert sum(s["rows"] for s in _manifest(out)["shards"]) == split
    summary = resume(tiny_teacher_dir, teacher, data, out)
    assert summary.resumed_rows == split and summary.recomputed_rows == split % BATCH_ROWS > 0
    assert_identical(reference, out)


def test_killed_between_shard_rename_and_manifest_update(tiny_teacher_dir, teacher, data, reference, tmp_path):
    out = str(tmp_path / "s")
    crash(tiny_teacher_dir, data, out, "shard-renamed:1")
    listed = [s["file"] for s in _manifest(out)["shards"]]
    assert listed == ["shard-00000.arrow"] and os.path.exists(os.path.join(out, "shard-00001.arrow"))
    summary = resume(tiny_teacher_dir, teacher, data, out)
    assert summary.resumed_rows == _manifest(reference)["shards"][0]["rows"]
    assert any("removed shard-00001.arrow" in note for note in summary.notes)
    assert_identical(reference, out)


def test_a_codec_v2_build_killed_mid_shard_resumes_to_the_same_bytes(tiny_teacher_dir, teacher, data, tmp_path):
    """Codec v2 learns each shard's id model from the shard's first record batch; the resumed shard, rewritten from
    its first row, must learn the same model and so write the same bytes as a build that was never killed."""
    options = OPTIONS | {"codec": "v2"}
    reference = str(tmp_path / "ref")
    with one_thread():
        build(BuildConfig(teacher=tiny_teacher_dir, data=data, out=reference, **options), teacher=teacher)
    assert LogitStore.open(reference).manifest.codec.name == "ctxrank-v2"
    ends = np.cumsum([s["rows"] for s in _manifest(reference)["shards"]])
    split = next(int(e) for e in ends[:-1] if e % BATCH_ROWS)
    out = str(tmp_path / "s")
    crash(tiny_teacher_dir, data, out, f"row-written:{split + 2}", options)  # inside the next shard's first batch
    assert sum(s["rows"] for s in _manifest(out)["shards"]) == split
    summary = resume(tiny_teacher_dir, teacher, data, out, options)
    assert summary.resumed_rows == split
    assert_identical(reference, out)


class RecordingTeacher:
    """The real teacher, plus a record of the batches it was given (each a tuple of its rows' token ids)."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def topk(self, rows, k):
        self.batches.append(tuple(tuple(ids.tolist()) for ids, _ in rows))
        return self.inner.topk(rows, k)


def as_if_killed_after_shard(store: str, kept: int) -> int:
    """Leave `store` as a kill -9 right after shard `kept - 1` was listed leaves it (the crash tests above make
    that state for real); returns the rows kept."""
    manifest = _manifest(store)
    for s in manifest["shards"][kept:]:
        os.remove(os.path.join(store, s["file"]))
    manifest["shards"], manifest["status"] = manifest["shards"][:kept], "in_progress"
    with open(os.path.join(store, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return sum(s["rows"] for s in manifest["shards"])


def test_a_resumed_build_gives_the_teacher_the_batches_of_an_uninterrupted_one(tiny_teacher_dir, teacher, data,
                                                                                reference, tmp_path):
    """The cause of the old flaky kill test: after a resume, the teacher saw other batches (other companions, other
    padded shapes), and a row's fp32 log-probs can change with its batch. Now batch j is always rows
    [j*B, (j+1)*B) of the share: a resume runs the teacher again on the batch it stopped in."""
    spy = RecordingTeacher(teacher)
    out = str(tmp_path / "s")
    with one_thread():
        build(BuildConfig(teacher=tiny_teacher_dir, data=data, out=out, **OPTIONS), teacher=spy)
    uninterrupted = spy.batches
    assert_identical(reference, out)  # two uninterrupted builds
    shutil.copytree(out, tmp_path / "ref")
    ends = np.cumsum([s["rows"] for s in _manifest(out)["shards"]])
    kept = next(i + 1 for i, e in enumerate(ends[:-1]) if e % BATCH_ROWS)
    done = as_if_killed_after_shard(out, kept)
    spy.batches = []
    resume(tiny_teacher_dir, spy, data, out)
    assert done % BATCH_ROWS and spy.batches == uninterrupted[done // BATCH_ROWS:]
    assert_identical(str(tmp_path / "ref"), out)


@pytest.mark.slow
def test_killed_twice(tiny_teacher_dir, teacher, data, reference, tmp_path):
    """A resume that is itself killed (right after a shard is listed) resumes again to the same store."""
    out = str(tmp_path / "s")
    crash(tiny_teacher_dir, data, out, "shard-listed:0")
    shutil.copy(os.path.join(out, "manifest.json"), tmp_path / "after-first-crash.json")
    crash_again = [sys.executable, "-m", "cli.kdstore", "build", "--teacher", tiny_teacher_dir, "--data", data,
                   "--out", out, "--resume", *_flags(OPTIONS)]
    run = subprocess.run(crash_again, env=dict(os.environ, OMP_NUM_THREADS="1", MOEKD_FAULT="shard-renamed:3"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert len(_manifest(out)["shards"]) == 3
    resume(tiny_teacher_dir, teacher, data, out)
    assert_identical(reference, out)
