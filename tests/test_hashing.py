"""The integrity sha256 of a shard is taken once per run (docs/FORMAT.md §7), not once per process: DataLoader
workers, new processes every epoch on both training paths (`KDStream` through `StoreLoader`, `StoreDataset` under
a torch DataLoader with non-persistent workers, as the transformers Trainer runs it), share one ledger with the
training process (`HashLedger`). No row is decoded from a shard whose bytes were not checked: a corrupted shard is
refused in a worker, a hash that failed marks nothing, and `verify()` hashes again."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from store_fixtures import write_store

from logit_store import KDStream, LogitStore, StoreError, StoreLoader
from logit_store import fs as storefs
from logit_store.reader import HashLedger

# (student.hf_trainer, which imports transformers, is imported where used: a spawned worker imports this module)


@pytest.fixture
def store(tmp_path) -> Path:
    """60 rows in several shards of several record batches (two workers read rows of the same shards)."""
    path = tmp_path / "store"
    write_store(str(path), n_rows=60, seed=7, shard_tokens=250, batch_tokens=80)
    assert len(LogitStore.open(str(path)).manifest.shards) >= 4
    return path


@pytest.fixture
def hashes(tmp_path, monkeypatch):
    """Every sha256 the reader takes, in this process or a forked worker: the list of shard files hashed."""
    log, real = tmp_path / "hashed.log", storefs.sha256_of

    def counting(fs, path, *args, **kwargs):  # forked workers inherit this patch
        with open(log, "a") as f:
            f.write(os.path.basename(path) + "\n")
        return real(fs, path, *args, **kwargs)

    monkeypatch.setattr(storefs, "sha256_of", counting)
    return lambda: log.read_text().splitlines() if log.exists() else []


def _rows(rows: list) -> int:
    return len(rows)


def _store_dataset_epochs(dataset, workers: int, epochs: int) -> list[int]:
    """Rows read per epoch by a DataLoader like the Trainer's: shuffled, non-persistent workers."""
    out = []
    for epoch in range(epochs):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=workers,
                                             persistent_workers=False, collate_fn=_rows,
                                             generator=torch.Generator().manual_seed(epoch))
        out.append(sum(loader))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_kdstream_hashes_each_shard_once_per_run(store, hashes, workers):
    loader = StoreLoader(KDStream(str(store), batch_size=4, seed=1), num_workers=workers)
    shards = [s.file for s in loader.stream.stores[0].manifest.shards]
    for epoch in range(3):
        assert sum(len(b["source_index"]) for b in loader) == 60
        assert sorted(hashes()) == sorted(shards), epoch  # each shard once in epoch 0, none after
    assert loader.stream.stores[0].hashed == set(shards)


@pytest.mark.parametrize("workers", [0, 2])
def test_store_dataset_hashes_each_shard_once_per_run(store, hashes, workers):
    """The Trainer's workers are new processes every epoch and report nothing back (before: 2x, 4x, 6x the store
    after epochs 0-2 on 2 workers)."""
    from student.hf_trainer import StoreDataset

    dataset = StoreDataset(str(store))
    shards = [s.file for s in dataset.store.manifest.shards]
    assert _store_dataset_epochs(dataset, workers, 3) == [60, 60, 60]
    assert Counter(hashes()) == Counter(shards)
    assert dataset.store.hashed == set(shards)


def test_ranks_hash_for_themselves_once_each(store, hashes):
    """Each rank is its own process with its own ledger: a shard is hashed at most once per rank."""
    loaders = [StoreLoader(KDStream(str(store), batch_size=2, seed=1, rank=r, world_size=2), num_workers=2)
               for r in range(2)]
    for _ in range(2):
        for loader in loaders:
            sum(1 for _ in loader)
    counts = Counter(hashes())
    assert max(counts.values()) <= 2 and set(counts) == {s.file for s in loaders[0].stream.stores[0].manifest.shards}
    assert sum(counts.values()) == sum(len(loader.stream.stores[0].hashed) for loader in loaders)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_corrupted_shard_is_refused_in_a_worker_and_marked_for_no_one(store):
    shard = LogitStore.open(str(store)).manifest.shards[2].file
    _flip_byte(store / shard)
    loader = StoreLoader(KDStream(str(store), batch_size=4, seed=1), num_workers=2)
    with pytest.raises(StoreError, match=f"{shard}.*sha256 mismatch"):
        sum(1 for _ in loader)
    assert shard not in loader.stream.stores[0].hashed  # the next reader hashes it again, and refuses it too
    with pytest.raises(StoreError, match="sha256 mismatch"):
        sum(1 for _ in loader)
    from student.hf_trainer import StoreDataset

    dataset = StoreDataset(str(store))
    with pytest.raises(StoreError, match="sha256 mismatch"):  # the Trainer's path: torch re-raises the worker's
        _store_dataset_epochs(dataset, 1, 1)  # (one worker: torch takes 5 s per worker to stop after an error)


def test_damage_after_the_hash_is_caught_by_size_and_by_verify(store, hashes):
    """Once hashed in a run, a shard is checked for everything but its hash: a truncation is still caught (its
    size); a same-size change is not, until `verify()`, which always hashes again."""
    stream = KDStream(str(store), batch_size=4, seed=1)
    sum(1 for _ in stream)
    reader = stream.stores[0]
    first, second = reader.manifest.shards[0].file, reader.manifest.shards[1].file
    _flip_byte(store / first)
    assert [f.split(":")[0] for f in reader.verify()] == [first]
    (store / second).write_bytes((store / second).read_bytes()[:-40])
    loader = StoreLoader(KDStream(str(store), batch_size=4, seed=1), num_workers=2)
    loader.stream.stores[0].ledger = reader.ledger  # the run's ledger says both were hashed
    with pytest.raises(StoreError, match="truncated"):
        sum(1 for _ in loader)


def _hold_and_die(ledger: HashLedger, index: int) -> None:
    assert ledger.claim(index) is False  # "hash it": then the process dies holding the lock
    os._exit(0)


def test_a_worker_that_dies_while_hashing_leaves_the_shard_to_the_next():
    """The lock on a shard is the kernel's (fcntl.lockf): a worker killed mid-hash releases it, and the shard is
    not marked, so the next process hashes it; a marked shard is not hashed again by anyone."""
    ledger = HashLedger(3)
    child = multiprocessing.get_context("fork").Process(target=_hold_and_die, args=(ledger, 1))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert ledger.claim(1) is False  # not waiting forever, and not marked
    ledger.release(1, hashed=True)
    assert ledger.claim(1) is True and ledger.marked() == [1]
    fd = ledger.fd
    del ledger  # an anonymous file: nothing to remove, even after a kill -9; its descriptor closes with it
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_store_pickled_outside_a_process_start_hashes_for_itself(store):
    """Only a process being started gets the ledger's descriptor; any other copy (pickle, deepcopy) has none and
    hashes the shards it opens itself."""
    import copy
    import pickle

    opened = LogitStore.open(str(store)).share_hash_checks()
    assert opened.ledger is not None
    for other in (pickle.loads(pickle.dumps(opened)), copy.deepcopy(opened)):
        assert other.ledger is None and len(list(other)) == 60


def _count_in_worker(worker_id: int) -> None:
    """A spawned worker's own wrapper of the sha256 (spawned processes inherit no patch)."""
    real = storefs.sha256_of

    def counting(fs, path, *args, **kwargs):
        raise AssertionError(f"worker {worker_id} hashed {path}, which this run had hashed")

    storefs.sha256_of = counting
    del real


def test_the_ledger_crosses_a_spawn_start(store):
    """Under the spawn start method the store is pickled into the worker; its ledger goes with it: the shards
    the run hashed (here by fork workers, so that this process's own record is empty) are not hashed again."""
    stream = KDStream(str(store), batch_size=4, seed=1)
    sum(1 for _ in StoreLoader(stream, num_workers=1))
    assert not stream.stores[0]._hashed and len(stream.stores[0].hashed) == len(stream.stores[0].manifest.shards)
    spawned = StoreLoader(stream, num_workers=1, multiprocessing_context="spawn", worker_init_fn=_count_in_worker)
    assert sum(len(b["source_index"]) for b in spawned) == 60
