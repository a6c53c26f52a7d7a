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
    exe = os.path.join(os.path.dirname(sys.executable), "kdstore")
    return subprocess.run([exe, *args], capture_output=True, text=True)


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
