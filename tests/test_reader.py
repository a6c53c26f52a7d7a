"""KDStream: exactly-once delivery across ranks x workers, exact resume, tensors aligned with the logits."""

import numpy as np
import pytest
import torch
from store_fixtures import write_store

from logit_store import KDStream, LogitStore, StoreLoader


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


def test_resume_refuses_a_different_layout(store):
    state = KDStream(store, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        KDStream(store, batch_size=8).load_state_dict(state)


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
