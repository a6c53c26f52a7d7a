"""ShardWriter, manifest, verification and filesystems: what is written is what is read, or a fault is named."""

import json
import os

import numpy as np
import pyarrow.fs as pafs
import pytest
from store_fixtures import random_row, write_store

from logit_store import LogitStore, Manifest, ManifestError, ShardWriter, StoreRow, TargetError, TargetSpec
from logit_store.codecs import TopKTargets


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_rows_round_trip_in_order(tmp_path, kind):
    manifest, rows, exact = write_store(str(tmp_path / "s"), kind=kind)
    store = LogitStore.open(str(tmp_path / "s"))
    assert store.manifest.status == "complete"
    assert len(store.manifest.shards) > 1  # cut by the token budget
    assert store.manifest.rows == 40 and store.manifest.tokens == sum(r.input_ids.size for r in rows)
    decoded = list(store)
    for row, lp, d in zip(rows, exact, decoded, strict=False):
        assert d.source_index == row.source_index
        assert (d.input_ids == row.input_ids).all() and (d.loss_mask == row.loss_mask).all()
        for j in range(len(lp)):
            ids = d.target_ids[j][d.target_mask[j]]
            if kind == "topk":
                assert set(ids.tolist()) == set(row.targets.ids[j].tolist())
                np.testing.assert_allclose(np.exp(d.target_logprobs[j]), np.exp(lp[j, ids]), atol=4e-3)
            else:
                s = int(row.targets.sizes[:j].sum())
                n = int(row.targets.sizes[j])
                assert sorted(ids.tolist()) == sorted(row.targets.ids[s:s + n].tolist())
    assert store.verify() == []


def test_shard_files_are_complete_and_checksummed(tmp_path):
    manifest, _, _ = write_store(str(tmp_path))
    on_disk = sorted(f for f in os.listdir(tmp_path) if f.endswith(".arrow"))
    assert on_disk == sorted(s.file for s in manifest.shards)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    from logit_store.fs import sha256_of

    for s in manifest.shards:
        assert sha256_of(pafs.LocalFileSystem(), str(tmp_path / s.file)) == (s.sha256, s.bytes)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["totals"]["rows"] == 40 and saved["fingerprint"] == manifest.fingerprint()


def test_crash_leaves_a_valid_store_and_resume_continues(tmp_path):
    rng = np.random.default_rng(0)
    manifest = Manifest(target=TargetSpec("topk", k=8), vocab_size=500)
    w = ShardWriter(str(tmp_path), manifest, shard_tokens=200, batch_tokens=50)
    for i in range(30):
        w.write(random_row(rng, 500, 20, source_index=i)[0])
    # simulate a crash: the writer is never closed, a shard is half written under its temp name
    assert any(f.startswith(".tmp-") for f in os.listdir(tmp_path))
    crashed = LogitStore.open(str(tmp_path))
    assert crashed.manifest.status == "in_progress" and crashed.verify() == []
    done = crashed.manifest.rows
    assert 0 < done < 30
    w.lock.release()  # a crashed process is gone, and the kernel drops its lock (writer.OutputLock)
    resumed = ShardWriter(str(tmp_path), Manifest(target=TargetSpec("topk", k=8), vocab_size=500),
                          shard_tokens=200, batch_tokens=50, resume=True)
    assert not any(f.startswith(".tmp-") for f in os.listdir(tmp_path))  # stale temp files removed
    skip = {r.source_index for r in LogitStore.open(str(tmp_path))}
    assert skip == set(range(done)) and resumed.manifest.rows == done
    rng = np.random.default_rng(1)
    for i in range(30):
        if i not in skip:
            resumed.write(random_row(rng, 500, 20, source_index=i)[0])
    resumed.close()
    final = LogitStore.open(str(tmp_path))
    assert sorted(r.source_index for r in final) == list(range(30))
    assert final.manifest.status == "complete" and final.verify() == []


def test_existing_store_is_not_clobbered_and_resume_refuses_other_settings(tmp_path):
    write_store(str(tmp_path))
    with pytest.raises(ManifestError, match="resume"):
        ShardWriter(str(tmp_path), Manifest(target=TargetSpec("topk", k=8), vocab_size=500))
    with pytest.raises(ManifestError, match="different settings"):
        ShardWriter(str(tmp_path), Manifest(target=TargetSpec("topk", k=16), vocab_size=500), resume=True)


@pytest.mark.parametrize("bad,message", [
    (dict(loss_mask=np.array([True, True, False])), "loss_mask\\[0\\]"),
    (dict(loss_mask=np.array([False, False, False])), "target positions"),
    (dict(input_ids=np.array([1, 2, 9999])), "outside the vocabulary"),
    (dict(targets=TopKTargets(np.array([[1] * 8, [2] * 8]), np.full((2, 8), np.nan))), "NaN"),
])
def test_bad_rows_are_refused_naming_the_row(tmp_path, bad, message):
    rng = np.random.default_rng(0)
    row, _ = random_row(rng, 500, 3, source_index=7)
    fields = dict(input_ids=row.input_ids, loss_mask=row.loss_mask, targets=row.targets, source_index=7)
    fields.update(bad)
    with ShardWriter(str(tmp_path), Manifest(target=TargetSpec("topk", k=8), vocab_size=500)) as w:
        with pytest.raises(TargetError, match=f"row 7: .*{message}"):
            w.write(StoreRow(**fields))


def _corrupt_and_verify(tmp_path, damage) -> list[str]:
    manifest, _, _ = write_store(str(tmp_path))
    victim = tmp_path / manifest.shards[1].file
    damage(victim)
    faults = LogitStore.open(str(tmp_path)).verify()
    assert faults and all(f.startswith(manifest.shards[1].file) for f in faults)
    return faults


def test_verify_names_a_shard_with_a_flipped_byte(tmp_path):
    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    assert "sha256" in _corrupt_and_verify(tmp_path, flip)[0]


def test_verify_names_a_truncated_or_missing_shard(tmp_path):
    assert "truncated" in _corrupt_and_verify(tmp_path / "a", lambda p: p.write_bytes(p.read_bytes()[:-100]))[0]
    assert "missing" in _corrupt_and_verify(tmp_path / "b", lambda p: p.unlink())[0]


@pytest.mark.parametrize("url", ["file://{tmp}/store", "memory://kdtest/store"])
def test_store_on_other_filesystems(tmp_path, url):
    url = url.format(tmp=tmp_path)
    _, rows, _ = write_store(url)
    store = LogitStore.open(url)
    assert [r.source_index for r in store] == [r.source_index for r in rows]
    assert store.verify() == []


def test_shards_open_with_hf_datasets(tmp_path):
    from datasets import load_dataset

    manifest, rows, _ = write_store(str(tmp_path))
    files = [str(tmp_path / s.file) for s in manifest.shards]
    ds = load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 40
    assert ds[3]["input_ids"] == rows[3].input_ids.tolist()
    assert ds[3]["source_index"] == 3


def test_target_spec_describes_itself():
    assert str(TargetSpec("topk", k=64)) == "topk k=64"
    assert str(TargetSpec("sampled", samples=50, sampled_from_top_k=128)) == "sampled N=50 from top-128"
    assert str(TargetSpec("sampled", samples=50)) == "sampled N=50 (exact)"
