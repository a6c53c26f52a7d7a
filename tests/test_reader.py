"""KDStream: rows dealt to ranks x workers (equal shares, every row every epoch), the same batches whatever the
worker count, exact resume at any position (epoch boundaries included), tensors aligned with the logits."""

import numpy as np
import pytest
import torch
from store_fixtures import write_store

from logit_store import KDStream, LogitStore, StoreError, StoreLoader


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store"))
    write_store(path, n_rows=60, batch_tokens=60)
    return path


def _indices(batches) -> list[int]:
    return [int(i) for b in batches for i in b["source_index"]]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (2, 2), (1, 2)])
def test_every_row_exactly_once_per_epoch(store, world, workers):
    seen = []
    for rank in range(world):
        stream = KDStream(store, batch_size=4, seed=3, rank=rank, world_size=world, shuffle_buffer=8)
        expected = stream.rows_per_rank()
        got = _indices(StoreLoader(stream, num_workers=workers))
        assert len(got) == expected
        seen += got
    assert sorted(seen) == list(range(60))


def test_epochs_are_shuffled_differently_and_reproducibly(store):
    a = KDStream(store, batch_size=5, seed=1)
    e0, e1 = _indices(a), _indices(a)  # iterating twice runs epochs 0 and 1
    b = KDStream(store, batch_size=5, seed=1)
    assert _indices(b) == e0 and e0 != e1 and sorted(e0) == sorted(e1)
    assert _indices(KDStream(store, batch_size=5, shuffle=False)) == list(range(60))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(store, workers):
    full = StoreLoader(KDStream(store, batch_size=4, seed=7, shuffle_buffer=16), num_workers=workers)
    reference = [b["source_index"].tolist() for b in full]

    first = StoreLoader(KDStream(store, batch_size=4, seed=7, shuffle_buffer=16), num_workers=workers)
    head = []
    for b in first:
        head.append(b["source_index"].tolist())
        if len(head) == 5:
            break
    state = first.state_dict()
    resumed = StoreLoader(KDStream(store, batch_size=4, seed=7, shuffle_buffer=16), num_workers=workers)
    resumed.load_state_dict(state)
    tail = [b["source_index"].tolist() for b in resumed]
    assert head + tail == reference


def test_resume_refuses_a_different_layout(store, tmp_path):
    state = KDStream(store, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        KDStream(store, batch_size=8).load_state_dict(state)
    for key, other in (("seed", dict(seed=1)), ("shuffle_buffer", dict(shuffle_buffer=7)),
                       ("world_size", dict(rank=0, world_size=2)), ("shuffle", dict(shuffle=False))):
        with pytest.raises(ValueError, match=key):
            KDStream(store, batch_size=4, **other).load_state_dict(state)
    # the same rows in other record batches: another shuffled order
    write_store(str(tmp_path), n_rows=60, batch_tokens=200)
    with pytest.raises(ValueError, match="layout"):
        KDStream(str(tmp_path), batch_size=4).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "dealing"}  # a position saved by the record-batch dealer
    with pytest.raises(ValueError, match="earlier moekd"):
        KDStream(store, batch_size=4).load_state_dict(old)
    # the worker count may change: the batches do not depend on it
    changed = StoreLoader(KDStream(store, batch_size=4), num_workers=3)
    changed.load_state_dict(StoreLoader(KDStream(store, batch_size=4), num_workers=2).state_dict())


def _endless(loader: StoreLoader):
    """Batches of epoch after epoch, as the trainer takes them (student.train._micro_batches)."""
    while True:
        yield from loader


def _take(loader: StoreLoader, n: int) -> list[list[int]]:
    it = _endless(loader)
    return [next(it)["source_index"].tolist() for _ in range(n)]


@pytest.mark.parametrize("workers,resumed_workers", [(0, 0), (2, 2), (3, 2), (2, 0)])
def test_resume_at_any_position_gives_the_same_batches(store, workers, resumed_workers):
    """Cuts at 0, inside, on and just after an epoch boundary, near the end of the next epoch; record batches of
    unequal sizes (this store's), and a worker count that changes at the resume."""
    def loader(w):
        return StoreLoader(KDStream(store, batch_size=4, seed=7, shuffle_buffer=16), num_workers=w)

    per_epoch = len(loader(0))
    assert per_epoch == 15 and len({n for *_, n in LogitStore.open(store).units()}) > 1
    reference = _take(loader(0), 2 * per_epoch)
    assert reference[:per_epoch] != reference[per_epoch:]
    for cut in (0, 5, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch - 1):
        first = loader(workers)
        head = _take(first, cut)
        resumed = loader(resumed_workers)
        resumed.load_state_dict(first.state_dict())
        assert head + _take(resumed, 2 * per_epoch - cut) == reference, f"cut after batch {cut}"


@pytest.mark.parametrize("world,rows", [(2, 61), (3, 61), (4, 62), (7, 60)])
def test_ranks_get_equal_shares_and_every_row_every_epoch(tmp_path, world, rows):
    """Rows that do not divide by the ranks: the first (world - rows % world) % world rows of the epoch's order are
    dealt twice, so every rank has the same rows and batches; over epochs no row is favoured by its rank."""
    write_store(str(tmp_path), n_rows=rows, shard_tokens=10_000, batch_tokens=10_000)  # one record batch
    assert len(LogitStore.open(str(tmp_path)).units()) == 1
    pad = (-rows) % world
    for epoch in range(2):
        seen, lengths = [], set()
        for rank in range(world):
            stream = KDStream(str(tmp_path), batch_size=3, seed=5, rank=rank, world_size=world)
            stream.set_epoch(epoch)
            got = _indices(stream)
            assert len(got) == stream.rows_per_rank() == -(-rows // world)
            lengths.add(len(stream))
            seen += got
        counts = np.bincount(seen, minlength=rows)
        assert counts.min() == 1 and counts.sum() == rows + pad and len(lengths) == 1
        assert sorted(np.flatnonzero(counts == 2)) == sorted(stream.epoch_order(epoch)[:pad])


@pytest.mark.parametrize("world", [2, 3])
def test_n_ranks_at_batch_b_see_the_rows_one_rank_sees_at_batch_nb(store, world):
    one = [sorted(b) for b in _take(StoreLoader(KDStream(store, batch_size=4 * world, seed=2)), 6)]
    ranks = [_take(StoreLoader(KDStream(store, batch_size=4, seed=2, rank=r, world_size=world)), 6)
             for r in range(world)]
    assert [sorted(sum((ranks[r][j] for r in range(world)), [])) for j in range(6)] == one


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 2), (2, 3), (4, 1)])
def test_a_store_of_one_record_batch_serves_every_rank_and_worker(tmp_path, world, workers):
    """Today's demo store is one record batch: every rank gets rows, every worker batches, in plan order."""
    write_store(str(tmp_path), n_rows=24, shard_tokens=10_000, batch_tokens=10_000)
    assert len(LogitStore.open(str(tmp_path)).units()) == 1
    seen = []
    for rank in range(world):
        plain = _indices(StoreLoader(KDStream(str(tmp_path), batch_size=2, rank=rank, world_size=world)))
        pooled = _indices(StoreLoader(KDStream(str(tmp_path), batch_size=2, rank=rank, world_size=world),
                                      num_workers=workers))
        assert pooled == plain and len(plain) == 24 // world
        seen += plain
    assert sorted(seen) == list(range(24))


def test_a_store_smaller_than_the_ranks_is_refused(tmp_path):
    write_store(str(tmp_path), n_rows=3)
    with pytest.raises(ValueError, match="3 rows, fewer than the 4 processes"):
        KDStream(str(tmp_path), batch_size=1, rank=0, world_size=4)
    with pytest.raises(ValueError, match="no full batch of 3 rows for each of 2 processes"):
        KDStream(str(tmp_path), batch_size=3, rank=0, world_size=2, drop_last=True)


def test_workers_leave_the_global_torch_rng_alone(store):
    """DataLoader draws its workers' base seed from the global RNG unless given a generator: a resume that starts
    workers mid-epoch would then shift dropout masks against the uninterrupted run."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _take(StoreLoader(KDStream(store, batch_size=4), num_workers=2), 2)
    assert torch.equal(torch.rand(3), expected)


def test_batch_tensors_are_aligned_with_the_logits(tmp_path):
    _, rows, exact = write_store(str(tmp_path), n_rows=6, loss_from=3)
    batch = next(iter(KDStream(str(tmp_path), batch_size=6, shuffle=False)))
    assert batch["target_ids"].dtype == torch.long and batch["target_logprobs"].dtype == torch.float32
    for b, (row, lp) in enumerate(zip(rows, exact, strict=False)):
        n = row.input_ids.size
        assert batch["attention_mask"][b].sum() == n
        # position t predicts token t + 1; the first loss token is 3, so the first loss position is 2
        expect_mask = np.zeros(batch["input_ids"].shape[1], bool)
        expect_mask[2:n - 1] = True
        assert (batch["loss_mask"][b].numpy() == expect_mask).all()
        assert (batch["labels"][b, 2:n - 1].numpy() == row.input_ids[3:]).all()
        assert (batch["labels"][b, ~torch.from_numpy(expect_mask)] == -100).all()
        for j, t in enumerate(range(2, n - 1)):
            ids = batch["target_ids"][b, t].numpy()
            assert set(ids.tolist()) == set(row.targets.ids[j].tolist())
            np.testing.assert_allclose(batch["target_logprobs"][b, t].exp().numpy(), np.exp(lp[j, ids]), atol=4e-3)
            tail = torch.logaddexp(batch["target_logprobs"][b, t].logsumexp(0), batch["target_tail"][b, t])
            assert abs(float(tail)) < 1e-5  # candidates + tail sum to one


def test_sampled_batches_carry_count_weights(tmp_path):
    _, rows, _ = write_store(str(tmp_path), n_rows=4, kind="sampled", samples=20)
    batch = next(iter(KDStream(str(tmp_path), batch_size=4, shuffle=False)))
    w = batch["target_logprobs"].exp() * batch["target_mask"]
    at_loss = w.sum(-1)[batch["loss_mask"]]
    torch.testing.assert_close(at_loss, torch.ones_like(at_loss))
    assert not batch["target_mask"][~batch["loss_mask"]].any()


def test_row_access_by_number(store):
    s = LogitStore.open(store)
    assert s.row(17).source_index == 17
    with pytest.raises(IndexError, match="60 rows"):
        s.row(60)


def test_a_store_with_open_shards_pickles_for_spawned_workers(store):
    import pickle

    s = LogitStore.open(store)
    s.row(0)  # opens a shard
    again = pickle.loads(pickle.dumps(s))
    assert again.row(5).source_index == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_a_broken_shard_is_reported_by_name_with_or_without_workers(tmp_path, workers):
    write_store(str(tmp_path), n_rows=30)
    shards = LogitStore.open(str(tmp_path)).manifest.shards
    assert len(shards) > 1
    shard = tmp_path / shards[1].file
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match=f"{shard.name}: .*truncated") as caught:
        _indices(StoreLoader(KDStream(str(tmp_path), batch_size=2, shuffle=False), num_workers=workers))
    message = str(caught.value)
    assert "Traceback" not in message and "\n" not in message  # not DataLoader's re-raise with the worker's traceback
