"""`kdstore info / verify / inspect` as a user runs them."""

import json
import os
import subprocess
import sys

import pytest
from store_fixtures import write_store

from cli import kdstore


@pytest.fixture()
def store(tmp_path):
    manifest, _, _ = write_store(str(tmp_path / "store"))
    return str(tmp_path / "store"), manifest


def _kdstore(*args):
    """`kdstore ARGS` in a new process, from this checkout (the installed `kdstore` script may be another one's)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "cli.kdstore", *args], capture_output=True, text=True, cwd=root)


def test_info_reports_the_figures(store, capsys):
    path, manifest = store
    assert kdstore.main(["info", path, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["rows"] == 40 and summary["tokens"] == manifest.tokens
    assert summary["bytes"] == manifest.bytes and summary["target"] == "topk k=8"
    assert summary["bytes_per_token"] == round(manifest.bytes / manifest.tokens, 2)
    assert kdstore.main(["info", path]) == 0
    assert "bytes_per_token" in capsys.readouterr().out


def test_verify_exit_status_names_the_damaged_shard(store):
    path, manifest = store
    ok = _kdstore("verify", path)
    assert ok.returncode == 0 and ok.stdout.startswith("OK")
    victim = os.path.join(path, manifest.shards[0].file)
    with open(victim, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = _kdstore("verify", path)
    assert bad.returncode == 1
    assert f"FAULT {manifest.shards[0].file}: sha256 mismatch" in bad.stderr


def test_inspect_shows_candidates_and_errors_are_clear(store, capsys):
    path, _ = store
    assert kdstore.main(["inspect", path, "--row", "3", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("row 3 (source example 3)") and "tail" in out
    assert kdstore.main(["inspect", path, "--row", "400"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert kdstore.main(["info", os.path.dirname(path)]) == 2
    assert "no manifest here" in capsys.readouterr().err


def test_demo_runs_the_whole_path(tmp_path, capsys):
    from cli.demo import main

    assert main(["--out", str(tmp_path), "--teacher", "tiny", "--steps", "6"]) == 0  # vllm backend, as make demo
    out = capsys.readouterr().out
    assert "OK " in out and "teacher_kl" in out and "loss.png" in out and "student :" in out


# ---------------------------------------------------------------- kdstore build: options, outputs, teacher, lock
@pytest.fixture()
def no_teacher_load(monkeypatch):
    """Every case below must be refused before a model loads: loading one fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr("logit_store.build.load_teacher", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def _build_cli(teacher: str, data: str, out: str, *extra: str) -> list[str]:
    return ["build", "--teacher", teacher, "--data", data, "--text-field", "text", "--out", out, "--backend", "hf",
            "--no-progress", *extra]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "The cat sees a dog."}\n{"text": "A dog sees the cat."}\n')
    return str(path)


@pytest.mark.parametrize(("flags", "message"), [
    (["--top-k", "0"], "--top-k must be at least 1 (got 0)"),
    (["--top-k", "-3"], "--top-k must be at least 1 (got -3)"),
    (["--samples", "0"], "--samples must be in [1, 255] (got 0)"),
    (["--samples", "256"], "--samples must be in [1, 255] (got 256)"),
    (["--samples", "8", "--top-k", "8"], "choose --top-k or --samples, not both"),
    (["--top-k", "8", "--sample-from-top-k", "16"], "--sample-from-top-k is not accepted"),
    (["--limit", "-1"], "--limit must be at least 1 (got -1); leave it out to use every example"),
    (["--limit", "0"], "--limit must be at least 1 (got 0)"),
    (["--batch-rows", "0"], "--batch-rows must be at least 1 (got 0)"),
    (["--shard-tokens", "0"], "--shard-tokens must be at least 1 (got 0)"),
    (["--record-batch-tokens", "0"], "--record-batch-tokens must be at least 1 (got 0)"),
    (["--levels", "0"], "--levels must be in [1, 255] (got 0)"),
    (["--levels", "256"], "--levels must be in [1, 255] (got 256)"),
    (["--compression-level", "30"], "--compression-level must be a zstd level in [1, 22] (got 30)"),
    (["--num-workers", "0"], "--num-workers must be at least 1 (got 0)"),
    (["--num-workers", "2", "--worker-index", "2"], "--worker-index 2 not in [0, --num-workers=2)"),
    (["--max-seq-len", "1"], "--max-seq-len must be at least 2 (got 1)"),
    (["--pack", "--generate"], "--pack cannot be combined with --generate"),
    (["--top-k", "100000"], "--top-k 100000 exceeds the teacher's vocabulary of 442 tokens"),
    (["--samples", "8", "--sample-from-top-k", "443"], "--sample-from-top-k is not accepted"),
])
def test_build_refuses_bad_options_before_loading_a_model(tiny_teacher_dir, data_file, tmp_path, capsys, flags,
                                                         message, no_teacher_load):
    out = str(tmp_path / "s")
    assert kdstore.main(_build_cli(tiny_teacher_dir, data_file, out, *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kdstore build: error:") and message in err[-1]
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # nothing "complete", nothing to resume


def test_build_names_an_unusable_output_before_loading_a_model(tiny_teacher_dir, data_file, tmp_path, capsys,
                                                               no_teacher_load):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a store")
    assert kdstore.main(_build_cli(tiny_teacher_dir, data_file, str(a_file))) == 2
    assert f"--out {a_file} is a file" in capsys.readouterr().err
    if os.geteuid() == 0:  # root writes through permission bits: take a directory nobody can write to
        read_only = "/sys"
    else:
        read_only = str(tmp_path / "read-only")
        os.mkdir(read_only, 0o555)
    assert kdstore.main(_build_cli(tiny_teacher_dir, data_file, read_only)) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the store directory {read_only}" in err and "choose a writable --out" in err
    store, _, _ = write_store(str(tmp_path / "store"))
    assert kdstore.main(_build_cli(tiny_teacher_dir, data_file, str(tmp_path / "store"))) == 2
    assert "already holds a store (manifest.json): pass --resume" in capsys.readouterr().err


def test_build_names_an_unreadable_teacher_before_loading_it(tiny_teacher_dir, data_file, tmp_path, capsys,
                                                             no_teacher_load):
    import shutil

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    assert kdstore.main(_build_cli(str(no_config), data_file, str(tmp_path / "s1"))) == 2
    assert f"cannot read the teacher's config in {no_config}" in capsys.readouterr().err
    bad_config = tmp_path / "bad-config"
    shutil.copytree(tiny_teacher_dir, bad_config)
    (bad_config / "config.json").write_text("{ not json")
    assert kdstore.main(_build_cli(str(bad_config), data_file, str(tmp_path / "s2"))) == 2
    assert f"cannot read the teacher's config in {bad_config}" in capsys.readouterr().err
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_teacher_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert kdstore.main(_build_cli(str(no_weights), data_file, str(tmp_path / "s3"))) == 2
    assert f"the teacher folder {no_weights} holds no weights" in capsys.readouterr().err


def test_a_second_build_of_the_same_worker_stops_at_the_lock(tiny_teacher_dir, data_file, tmp_path):
    """Two `kdstore build` processes on one output: the one that holds the lock goes on, the other stops at once,
    naming the holder. (This process holds the lock as a running build does; `kill -9` of a holder frees it.)"""
    from logit_store.build import BuildConfig, build
    from logit_store.writer import OutputLock

    out = str(tmp_path / "s")
    held = OutputLock(out)
    try:
        second = _kdstore(*_build_cli(tiny_teacher_dir, data_file, out))
        assert second.returncode == 2, second.stderr
        assert f"{out} is being written by another build of the same worker (kdstore build on " in second.stderr
        assert f"pid {os.getpid()}" in second.stderr and "wait for it to finish, or use another --out" in second.stderr
        assert not os.path.exists(os.path.join(out, "manifest.json"))
    finally:
        held.release()
    summary = build(BuildConfig(teacher=tiny_teacher_dir, data=data_file, out=out, text_field="text", backend="hf",
                                top_k=4, progress=False))  # the lock is free again: this one proceeds
    assert summary.rows == 2


def test_info_on_an_unmerged_multi_worker_store_says_to_merge(tmp_path, capsys):
    from logit_store.writer import ShardWriter

    manifest, _, _ = write_store(str(tmp_path / "one"))
    manifest.shards, manifest.status = [], "in_progress"
    for i in range(2):
        ShardWriter(str(tmp_path / "two"), manifest, prefix=f"shard-w{i:05d}",
                    manifest_name=f"manifest-w{i:05d}-of-00003.json").close()
    for command in ("info", "verify"):
        assert kdstore.main([command, str(tmp_path / "two")]) == 2
        assert (f"{tmp_path / 'two'} is a multi-worker build that is not merged yet: 2 of 3 workers have started, 2 "
                f"have finished. When all have, run: kdstore merge {tmp_path / 'two'}") in capsys.readouterr().err
