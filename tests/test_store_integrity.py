"""The reader trusts nothing it has not checked: every way a store can be damaged or edited after it was written is
caught, by `LogitStore.open` (the manifest against itself and the directory) or when a process first opens a shard
(the file against the manifest), with a StoreError naming the file and the manifest field."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from store_fixtures import write_store

from cli import kdstore
from logit_store import KDStream, LogitStore, Manifest, StoreError, StoreLoader
from logit_store.format import SHARD_IDENTITY_KEY
from logit_store.fs import sha256_of

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "store"
    write_store(str(path), n_rows=30, shard_tokens=150, batch_tokens=60)
    return path


@pytest.fixture()
def store(pristine, tmp_path) -> Path:
    """A fresh copy of a sound store (3+ shards) for each test to damage."""
    path = tmp_path / "store"
    shutil.copytree(pristine, path)
    assert len(LogitStore.open(str(path)).manifest.shards) >= 3
    return path


def _edit_manifest(store: Path, edit) -> None:
    d = json.loads((store / "manifest.json").read_text())
    edit(d)
    (store / "manifest.json").write_text(json.dumps(d, indent=1))


def _open_fails(store: Path, *fragments: str) -> StoreError:
    with pytest.raises(StoreError) as err:
        LogitStore.open(str(store))
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return err.value


def _stream_fails(store: Path, *fragments: str, workers: int = 0) -> StoreError:
    """The store opens (its manifest is consistent), but reading the damaged shard stops the stream."""
    stream = KDStream(str(store), batch_size=4, seed=0)
    with pytest.raises(StoreError) as err:
        for _ in StoreLoader(stream, num_workers=workers):
            pass
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    err.value.__traceback__ = None  # frees the DataLoader (its frames) now: its workers shut down at once
    return err.value


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x10
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- damaged shard files (caught while streaming)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_bit_flipped_shard_stops_the_stream_and_fails_verify(store, workers, capsys):
    shard = LogitStore.open(str(store)).manifest.shards[1].file
    _flip_byte(store / shard)
    err = _stream_fails(store, shard, "sha256 mismatch", "shards[1].sha256", workers=workers)
    if workers == 0:  # (a DataLoader worker's exception crosses the process boundary as its text only)
        assert err.field == "shards[1].sha256" and err.where.endswith(shard)
    assert kdstore.main(["verify", str(store)]) == 1
    assert f"FAULT {shard}: sha256 mismatch" in capsys.readouterr().err


def test_workers_hash_each_shard_once_per_run(store, tmp_path, monkeypatch):
    """DataLoader workers are new processes every epoch; the shards they hashed come back to the training process,
    so the next epoch's workers check everything but the hash again (a store read twice per epoch otherwise)."""
    from logit_store import fs as storefs

    log, real = tmp_path / "hashed.log", storefs.sha256_of

    def counting(fs, path, *args, **kwargs):  # forked workers inherit this patch
        with open(log, "a") as f:
            f.write(path + "\n")
        return real(fs, path, *args, **kwargs)

    monkeypatch.setattr(storefs, "sha256_of", counting)
    loader = StoreLoader(KDStream(str(store), batch_size=4, seed=1), num_workers=2)
    shards = {s.file for s in loader.stream.stores[0].manifest.shards}
    first = sum(len(b["source_index"]) for b in loader)
    hashed = log.read_text().splitlines()
    assert {Path(p).name for p in hashed} == shards  # epoch 0: every shard hashed (by whichever worker read it)
    assert loader.stream.stores[0].hashed == shards
    assert sum(len(b["source_index"]) for b in loader) == first  # epoch 1: the same rows...
    assert log.read_text().splitlines() == hashed  # ...and no shard hashed again
    shard = sorted(shards)[0]
    (store / shard).write_bytes((store / shard).read_bytes()[:-40])  # damage that keeps being caught: size
    with pytest.raises(StoreError, match="truncated"):
        sum(1 for _ in loader)


def test_a_truncated_shard_is_named_with_its_size(store):
    shard = LogitStore.open(str(store)).manifest.shards[0].file
    (store / shard).write_bytes((store / shard).read_bytes()[:-40])
    err = _stream_fails(store, shard, "truncated", "shards[0].bytes")
    assert err.field == "shards[0].bytes"
    assert [f.split(":")[0] for f in LogitStore.open(str(store)).verify()] == [shard]


def test_a_shard_replaced_by_another_with_a_matching_entry_is_caught_by_its_own_name(store):
    """Copy shard 0 over shard 2 and fix shards[2]'s size and sha256: the bytes hash right, but the shard says
    which file it was written as."""
    m = LogitStore.open(str(store)).manifest
    shutil.copy(store / m.shards[0].file, store / m.shards[2].file)
    digest, size = sha256_of(pa.fs.LocalFileSystem(), str(store / m.shards[2].file))

    def edit(d):
        d["shards"][2].update(sha256=digest, bytes=size)
        d["totals"]["bytes"] += size - m.shards[2].bytes
    _edit_manifest(store, edit)
    _stream_fails(store, m.shards[2].file, "shards[2].file", repr(m.shards[0].file))


# ---------------------------------------------------------------- edited manifests (caught on open)
@pytest.mark.parametrize("key", ["rows", "tokens", "target_positions", "bytes"])
def test_an_edited_shard_count_is_caught_by_the_totals(store, key):
    _edit_manifest(store, lambda d: d["shards"][1].update({key: d["shards"][1][key] + 1}))
    _open_fails(store, f"totals.{key}", "manifest.json")


def test_edited_row_counts_that_agree_with_each_other_are_caught_by_the_shard(store):
    """rows, batch_rows and totals edited together: the manifest agrees with itself, not with the shard."""
    def edit(d):
        d["shards"][1]["batch_rows"][0] -= 1
        d["shards"][1]["rows"] -= 1
        d["totals"]["rows"] -= 1
    _edit_manifest(store, edit)
    _stream_fails(store, LogitStore.open(str(store)).manifest.shards[1].file, "shards[1].batch_rows")


def test_edited_token_counts_that_agree_with_the_totals_are_caught_by_the_shard(store):
    def edit(d):
        d["shards"][0]["tokens"] += 3
        d["totals"]["tokens"] += 3
    _edit_manifest(store, edit)
    _stream_fails(store, "shards[0].tokens")


def test_rows_that_disagree_with_batch_rows_are_caught_on_open(store):
    def edit(d):
        d["shards"][0]["rows"] += 1
        d["totals"]["rows"] += 1
    _edit_manifest(store, edit)
    _open_fails(store, "shards[0].rows")


@pytest.mark.parametrize("field,value", [("levels", 200), ("name", "other-codec")])
def test_edited_codec_parameters_are_caught(store, field, value):
    _edit_manifest(store, lambda d: d["codec"].update({field: value}))
    _open_fails(store, "fingerprint", "was edited", f"codec.{field}: {value!r}, but shard-00000.arrow was written")


def test_an_edited_id_width_is_caught(store):
    _edit_manifest(store, lambda d: d["codec"].update(id_bytes=3))
    _open_fails(store, "codec.id_bytes")


@pytest.mark.parametrize("edit", [
    lambda d: d.update(vocab_size=d["vocab_size"] + 1),
    lambda d: d["target"].update(k=4),
    lambda d: d.update(target={"kind": "sampled", "samples": 8, "k": None, "sampled_from_top_k": None}),
])
def test_an_edited_vocabulary_or_target_is_caught(store, edit):
    _edit_manifest(store, edit)
    _open_fails(store, "fingerprint", "was edited")


@pytest.mark.parametrize("edit,field", [
    (lambda m: setattr(m.codec, "levels", 100), "codec.levels"),
    (lambda m: setattr(m, "vocab_size", m.vocab_size + 7), "vocab_size"),
    (lambda m: setattr(m.target, "k", 4), "target.k"),
])
def test_a_manifest_edited_and_saved_through_the_library_is_caught_by_the_shards(store, edit, field):
    """Saved with `Manifest.save`, the edited manifest's fingerprint and totals are recomputed and agree with it;
    each shard still says what it was written with."""
    fs = pa.fs.LocalFileSystem()
    m = Manifest.load(fs, str(store))
    edit(m)
    m.save(fs, str(store))
    err = _stream_fails(store, field)
    assert err.field == field


def test_a_shard_listed_twice_is_caught(store):
    def edit(d):
        d["shards"].append(dict(d["shards"][0]))
        for key in d["totals"]:
            d["totals"][key] += d["shards"][0][key]
    _edit_manifest(store, edit)
    _open_fails(store, "shards[", "listed twice")


def test_swapped_shard_entries_are_caught(store):
    def edit(d):
        d["shards"][0], d["shards"][1] = d["shards"][1], d["shards"][0]
    _edit_manifest(store, edit)
    _open_fails(store, "shards[1].file", "entries swapped")


def test_a_shard_entry_removed_from_the_manifest_is_caught_by_its_file(store):
    def edit(d):
        gone = d["shards"].pop()
        for key in d["totals"]:
            d["totals"][key] -= gone[key]
    _edit_manifest(store, edit)
    name = sorted(p.name for p in store.glob("shard-*.arrow"))[-1]
    _open_fails(store, name, "not listed")


def test_an_unlisted_shard_file_is_caught_but_not_in_a_store_still_being_written(store):
    shutil.copy(store / "shard-00000.arrow", store / "shard-00042.arrow")
    _open_fails(store, "shard-00042.arrow", "not listed")
    # a writer renames a finished shard into place just before it lists it: no fault while in progress
    _edit_manifest(store, lambda d: d.update(status="in_progress"))
    assert LogitStore.open(str(store)).verify() == []


def test_a_shard_path_outside_the_store_is_refused(store):
    _edit_manifest(store, lambda d: d["shards"][0].update(file="../elsewhere/shard-00000.arrow"))
    _open_fails(store, "shards[0].file", "not a shard file name")


# ---------------------------------------------------------------- stores written before shards had an identity
def test_old_stores_without_shard_identity_still_open_verify_and_catch_damage(tmp_path):
    for name in ("v1-topk", "v1-sampled", "v1-topk-wide"):
        shard = next((FIXTURES / name).glob("shard-*.arrow"))
        assert SHARD_IDENTITY_KEY not in (pa.ipc.open_file(str(shard)).metadata or {})
        assert LogitStore.open(str(FIXTURES / name)).verify() == []
    old = tmp_path / "old"
    shutil.copytree(FIXTURES / "v1-topk", old)
    _flip_byte(old / "shard-00001.arrow")
    _stream_fails(old, "shard-00001.arrow", "sha256 mismatch")
    shutil.copy(FIXTURES / "v1-topk" / "shard-00001.arrow", old / "shard-00001.arrow")
    _edit_manifest(old, lambda d: d["codec"].update(levels=128))
    _open_fails(old, "fingerprint")


def test_new_shards_record_what_they_were_written_as(store):
    m = LogitStore.open(str(store)).manifest
    for s in m.shards:
        identity = json.loads(pa.ipc.open_file(str(store / s.file)).metadata[SHARD_IDENTITY_KEY])
        assert identity == {"file": s.file, "vocab_size": m.vocab_size,
                            "target": {"kind": "topk", "k": 8, "samples": None, "sampled_from_top_k": None},
                            "codec": {"name": m.codec.name, "levels": m.codec.levels, "id_bytes": 2}}
