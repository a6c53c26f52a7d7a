"""Mixtures of stores (`kdstudent train --store A --store B:0.3`): weights as shares of the loss positions (or of
the tokens, `mix_by="tokens"`), every store at its share over an epoch, every row of a store at its rate, seeded,
dealt to ranks and workers, exact resume; stores with other tokenizers refused; stores of other target kinds and k
mixed in one batch."""

import shutil

import numpy as np
import pytest
from store_fixtures import write_store, write_teacher_store

from logit_store import KDStream, LogitStore, StoreLoader
from logit_store.plan import mixture_rows, parse_store_spec
from student.config import TrainConfig
from student.run import read_metrics
from student.train import TrainError, train


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """chat: 90 rows of top-8 targets; code: 30 rows of sampled targets (other widths), each its own domain."""
    root = tmp_path_factory.mktemp("mixture")
    chat, code = str(root / "chat"), str(root / "code")
    write_store(chat, n_rows=90, domain="chat", seed=1, batch_tokens=120)
    write_store(code, n_rows=30, kind="sampled", domain="code", seed=2, batch_tokens=80)
    return dict(chat=chat, code=code)


def _epoch(stream: KDStream, count: str = "loss_mask") -> list[tuple[str, int, int]]:
    """(domain, source row, loss positions (or tokens, `count="attention_mask"`)) of every row of one epoch, in
    order."""
    out = []
    for batch in stream:
        for d, i, n in zip(batch["domain"], batch["source_index"], batch[count].sum(1), strict=True):
            out.append((stream.domain_names[int(d)], int(i), int(n)))
        if stream.batches_done == 0:  # the epoch rolled over
            break
    return out


def test_store_spec_takes_a_last_numeric_weight():
    assert parse_store_spec("a/b") == ("a/b", None)
    assert parse_store_spec("a/b:0.3") == ("a/b", 0.3)
    assert parse_store_spec("s3://bucket/store") == ("s3://bucket/store", None)
    assert parse_store_spec("s3://bucket/store:2") == ("s3://bucket/store", 2.0)
    for bad in ("a:0", "a:-1", "a:nan", "a:inf"):
        with pytest.raises(ValueError, match="positive number"):
            parse_store_spec(bad)
    # a URL's port is not a weight, in its authority or in a query value; a weight may still follow
    assert parse_store_spec("http://host:8080") == ("http://host:8080", None)
    assert parse_store_spec("http://host:8080/store:0.3") == ("http://host:8080/store", 0.3)
    s3 = "s3://bucket/store?endpoint_override=localhost:9000"
    assert parse_store_spec(s3) == (s3, None)
    assert parse_store_spec(s3 + ":0.3") == (s3, 0.3)
    assert parse_store_spec(s3 + "&scheme=http") == (s3 + "&scheme=http", None)
    for endpoint in ("http://localhost:9000", "[::1]:9000"):
        url = f"s3://bucket/store?endpoint_override={endpoint}"
        assert parse_store_spec(url) == (url, None) and parse_store_spec(url + ":0.3") == (url, 0.3)
    # object stores name no port; other query values hold no host
    assert parse_store_spec("s3://bucket:0.3") == ("s3://bucket", 0.3)
    assert parse_store_spec("s3://b/s?region=us-east-1:0.3") == ("s3://b/s?region=us-east-1", 0.3)
    assert parse_store_spec("hdfs://namenode:8020/stores/a") == ("hdfs://namenode:8020/stores/a", None)


def test_a_local_path_that_exists_keeps_its_colon(tmp_path):
    store = tmp_path / "ckpt:3"
    store.mkdir()
    assert parse_store_spec(str(store)) == (str(store), None)
    assert parse_store_spec(f"{store}:0.5") == (str(store), 0.5)
    assert parse_store_spec(str(tmp_path / "absent:3")) == (str(tmp_path / "absent"), 3.0)


def test_a_store_listed_twice_or_a_bad_weight_is_refused(stores, tmp_path):
    with pytest.raises(ValueError, match="listed twice"):
        KDStream([stores["chat"], stores["chat"] + "/"], batch_size=4)
    alias = tmp_path / "alias"
    alias.symlink_to(stores["chat"])
    with pytest.raises(ValueError, match="listed twice"):
        KDStream([stores["chat"], str(alias)], batch_size=4)
    opened = [LogitStore.open(stores["chat"]), LogitStore.open(stores["code"])]
    for bad in (-0.5, float("nan"), 0.0):
        with pytest.raises(ValueError, match="not a positive number"):
            mixture_rows(opened, [90, 30], [bad, None])


@pytest.mark.parametrize("by", ["positions", "tokens"])
def test_weights_are_shares_of_loss_positions_or_tokens(stores, by):
    opened = [LogitStore.open(stores["chat"]), LogitStore.open(stores["code"])]
    rows = [90, 30]
    field = "target_positions" if by == "positions" else "tokens"
    amount = np.array([getattr(s.manifest, field) for s in opened], float)
    n, share = mixture_rows(opened, rows, [None, None], by)  # default: each store once per epoch
    assert n == rows and np.allclose(share, amount / amount.sum())
    n, share = mixture_rows(opened, rows, [None, 0.3], by)  # code 30 %, chat the rest
    assert share == pytest.approx([0.7, 0.3]) and sum(n) == 120
    per_row = amount / rows
    assert n[1] * per_row[1] / (n @ per_row) == pytest.approx(0.3, abs=0.01)
    assert mixture_rows(opened, rows, [3.0, 1.0], by)[1] == pytest.approx([0.75, 0.25])  # all given: normalised
    with pytest.raises(ValueError, match="leave nothing"):
        mixture_rows(opened, rows, [None, 1.0])
    with pytest.raises(ValueError, match="no row"):
        mixture_rows(opened, rows, [1.0, 1e-5])


@pytest.mark.parametrize("weight", [0.3, 0.6])
def test_each_store_comes_at_its_share_and_each_row_at_its_rate(stores, weight):
    stream = KDStream([stores["chat"], stores["code"]], batch_size=4, weights=[None, weight], seed=5,
                      shuffle_buffer=16)
    per_store = dict(zip(("chat", "code"), stream.epoch_rows, strict=True))
    seen = {"chat": [], "code": []}
    positions = {d: 0 for d in seen}
    for epoch in range(6):
        rows = _epoch(stream)
        assert len(rows) == stream.rows == 120  # an epoch of the mixture = as many rows as the stores hold
        epoch_positions = {d: sum(n for dd, _, n in rows if dd == d) for d in seen}
        # its share of the loss positions, up to which rows of a partial pass over a store (of various lengths) the
        # epoch holds: 2.3 points at most here, up to 3.7 over 20 seeds (the same under the tokens rule)
        assert abs(epoch_positions["code"] / sum(epoch_positions.values()) - weight) <= 0.03, epoch
        positions = {d: positions[d] + epoch_positions[d] for d in seen}
        for d in seen:
            got = [i for dd, i, _ in rows if dd == d]
            assert len(got) == per_store[d]
            seen[d] += got
    assert abs(positions["code"] / sum(positions.values()) - weight) <= 0.01  # over epochs, the fluctuation averages
    for d, n_rows in (("chat", 90), ("code", 30)):  # a store's rows come pass after pass: each at the same rate
        counts = np.bincount(seen[d], minlength=n_rows)
        assert counts.max() - counts.min() <= 1 and counts.sum() == 6 * per_store[d]


def test_mixture_is_seeded_and_interleaves_the_stores(stores):
    def order(seed):
        return _epoch(KDStream([stores["chat"], stores["code"]], batch_size=4, weights=[None, 0.3], seed=seed))

    assert order(1) == order(1) and order(1) != order(2)
    first_half = [d for d, _, _ in order(1)[:60]]
    assert 0.1 < first_half.count("code") / 60 < 0.6  # spread through the epoch, not one store after the other


def test_one_store_in_a_list_is_that_store(stores):
    alone = _epoch(KDStream(stores["chat"], batch_size=4, seed=3))
    assert _epoch(KDStream([stores["chat"]], batch_size=4, seed=3)) == alone


def test_mixed_kinds_and_widths_share_a_batch(stores):
    stream = KDStream([stores["chat"], stores["code"]], batch_size=12, seed=0)
    batch = next(b for b in stream if len(set(b["domain"].tolist())) == 2)  # a batch holding rows of both
    width = batch["target_ids"].shape[2]
    assert width >= 8  # the widest row's candidates; narrower rows' extra slots are masked
    for b, d in enumerate(batch["domain"]):
        slots = batch["target_mask"][b][batch["loss_mask"][b]].sum(1)
        if stream.domain_names[int(d)] == "chat":
            assert (slots == 8).all()
        else:
            assert (slots >= 1).all() and (slots <= width).all()


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_mixture_resumes_exactly_at_any_position(stores, world, workers):
    def loader(rank):
        stream = KDStream([stores["chat"], stores["code"]], batch_size=4, weights=[None, 0.4], seed=7,
                          shuffle_buffer=8, rank=rank, world_size=world)
        return StoreLoader(stream, num_workers=workers)

    def take(ld, n):
        out, it = [], None
        while len(out) < n:
            it = it or iter(ld)
            try:
                b = next(it)
            except StopIteration:
                it = None
                continue
            out.append(list(zip(b["domain"].tolist(), b["source_index"].tolist(), strict=True)))
        return out

    for rank in range(world):
        epoch = len(loader(rank))
        full = take(loader(rank), 2 * epoch + 5)
        for stop in (3, epoch, epoch + 2):
            first = loader(rank)
            head = take(first, stop)
            resumed = loader(rank)
            resumed.load_state_dict(first.state_dict())
            assert head + take(resumed, 2 * epoch + 5 - stop) == full


def test_resume_refuses_other_weights(stores):
    a = KDStream([stores["chat"], stores["code"]], batch_size=4, weights=[None, 0.4])
    b = KDStream([stores["chat"], stores["code"]], batch_size=4, weights=[None, 0.5])
    with pytest.raises(ValueError, match="mixture.*weights changed"):
        b.load_state_dict(a.state_dict())


def test_a_run_weighted_by_tokens_resumes_only_as_such(prompt_masked):
    """A checkpoint from before weights were shares of the loss positions records no `mix_by`: its weights were
    shares of the tokens. Resumed under the new rule it is refused, saying why and what to do; with
    mix_by="tokens" it continues exactly. Unweighted mixtures read the same rows under either rule."""
    stores = [prompt_masked["chat"], prompt_masked["text"]]
    old = KDStream(stores, batch_size=4, weights=[0.5, None], mix_by="tokens", seed=2)
    _epoch(old)
    state = {k: v for k, v in old.state_dict().items() if k != "mix_by"}  # as an earlier moekd saved it
    with pytest.raises(ValueError, match=r"shares of the stores' tokens.*loss positions.*--mix-by tokens"):
        KDStream(stores, batch_size=4, weights=[0.5, None], seed=2).load_state_dict(state)
    again = KDStream(stores, batch_size=4, weights=[0.5, None], mix_by="tokens", seed=2)
    again.load_state_dict(state)
    assert _epoch(again) == _epoch(old)
    plain = [KDStream(stores, batch_size=4, mix_by=by).epoch_rows for by in ("positions", "tokens")]
    assert plain[0] == plain[1] == [60, 60]


@pytest.fixture(scope="module")
def prompt_masked(tmp_path_factory) -> dict[str, str]:
    """chat: 60 rows whose first ~2/3 (the prompt) carry no loss; text: 60 rows with a loss on every token but
    the first (like the review's case, where weight 0.5 as a share of tokens gave a chat store 18 % of the loss
    positions)."""
    from store_fixtures import random_row, target_spec

    from logit_store import Manifest, ShardWriter

    root = tmp_path_factory.mktemp("prompt-masked")
    chat, text = str(root / "chat"), str(root / "text")
    rng = np.random.default_rng(3)
    manifest = Manifest(target=target_spec("topk"), vocab_size=500, teacher={"name_or_path": "random"})
    with ShardWriter(chat, manifest, shard_tokens=300, batch_tokens=120) as w:
        for i in range(60):
            length = int(rng.integers(6, 30))
            row, _ = random_row(rng, 500, length, source_index=i, loss_from=2 * length // 3)
            row.domain = "chat"
            w.write(row)
    write_store(text, n_rows=60, domain="text", seed=4, batch_tokens=120)
    return dict(chat=chat, text=text)


@pytest.mark.parametrize("weight", [0.5, 0.2])
def test_a_prompt_masked_store_gets_its_weight_of_the_loss_positions(prompt_masked, weight):
    """By default a weight is a share of the loss positions: over epochs that read every store in whole passes,
    the prompt-masked store gets its weight of the positions the loss averages over, within one row's worth
    (rows are whole: rounding the rows per epoch moves less than a row). By tokens (`mix_by="tokens"`, the earlier
    rule) the same weight gives it far fewer loss positions."""
    from math import lcm

    stores = [prompt_masked["chat"], prompt_masked["text"]]
    for by in ("positions", "tokens"):
        stream = KDStream(stores, batch_size=4, weights=[weight, None], seed=1, mix_by=by)
        assert stream.share == pytest.approx([weight, 1 - weight])
        positions = np.array([int(r.loss_mask.sum()) for store in stream.stores for r in store])
        epochs = lcm(*(rows // np.gcd(n, rows) for n, rows in zip(stream.epoch_rows, stream.store_rows,
                                                                   strict=True)))
        order = np.concatenate([stream.epoch_order(e) for e in range(epochs)])  # whole passes over each store
        chat, total = positions[order[order < stream.store_start[1]]].sum() / epochs, positions[order].sum() / epochs
        row = max(p.manifest.target_positions / p.manifest.rows for p in stream.stores)  # a mean row's positions
        assert chat / total == pytest.approx(stream.position_share[0])  # what the run reports
        if by == "positions":
            assert abs(chat - weight * total) <= row, (chat, total)
        else:
            assert chat / total < weight - 0.1  # a prompt-masked store's weight overstated its loss positions
            assert stream.token_share[0] == pytest.approx(weight, abs=0.02)


def test_stores_of_other_tokenizers_or_vocabularies_are_refused_naming_both(stores, tmp_path):
    other_tok = str(tmp_path / "other_tok")
    write_store(other_tok, n_rows=10, tokenizer={"name_or_path": "x", "fingerprint": "abc", "fingerprint_version": 2})
    first = str(tmp_path / "first_tok")
    write_store(first, n_rows=10, tokenizer={"name_or_path": "y", "fingerprint": "def", "fingerprint_version": 2})
    with pytest.raises(ValueError, match="different tokenizers") as e:
        KDStream([first, other_tok], batch_size=2)
    assert first in str(e.value) and other_tok in str(e.value)
    other_vocab = str(tmp_path / "other_vocab")
    write_store(other_vocab, n_rows=10, vocab=600)
    with pytest.raises(ValueError, match="vocabular") as e:
        KDStream([stores["chat"], other_vocab], batch_size=2)
    assert stores["chat"] in str(e.value) and other_vocab in str(e.value)


# ------------------------------------------------------------------ kdstudent train on a mixture
@pytest.fixture(scope="module")
def teacher_stores(tiny_teacher_dir, tmp_path_factory) -> tuple[str, str]:
    """Two captures of the tiny teacher on other text, with other k."""
    root = tmp_path_factory.mktemp("teacher_mixture")
    a = write_teacher_store(str(root / "a"), tiny_teacher_dir, 24, 32, rows_per_batch=4, k=16)
    b = write_teacher_store(str(root / "b"), tiny_teacher_dir, 12, 32, rows_per_batch=4, k=4, corpus_seed=9)
    return a, b


def _cfg(stores, base, out, **kw) -> TrainConfig:
    options = dict(keep_layers="0", experts=4, rank=4, attn_rank=4, batch_size=4, max_steps=8, lr=3e-3,
                   warmup_steps=1, log_every=1, progress=False, seed=1, save_every=3, keep_checkpoints=5)
    options.update(kw)
    return TrainConfig(store=stores, base=base, out=str(out), **options)


def test_training_on_a_mixture_resumes_exactly(teacher_stores, tiny_teacher_dir, tmp_path, capsys):
    a, b = teacher_stores
    full = tmp_path / "full"
    train(_cfg([a, f"{b}:0.5"], tiny_teacher_dir, full))
    assert "mixture" in capsys.readouterr().out
    losses = [(r["step"], r["loss"]) for r in read_metrics(full) if "loss" in r]
    assert len(losses) == 8 and all(np.isfinite(loss) for _, loss in losses)
    crashed = tmp_path / "crashed"  # killed after step 4: checkpoint 3 is the newest
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoint-6")
    shutil.rmtree(crashed / "final")
    train(_cfg([a, f"{b}:0.5"], tiny_teacher_dir, crashed, resume=True))
    assert [(r["step"], r["loss"]) for r in read_metrics(crashed) if "loss" in r] == losses
    with pytest.raises(TrainError, match="mixture"):  # other weights cannot continue this run's order
        train(_cfg([a, f"{b}:0.3"], tiny_teacher_dir, crashed, resume=True, max_steps=9))


def test_a_training_weighted_by_tokens_before_resumes_with_mix_by_tokens(teacher_stores, tiny_teacher_dir,
                                                                         tmp_path):
    """`kdstudent train --resume` of a weighted mixture checkpointed by an earlier moekd (weights were shares of the
    tokens; its reader state records no `mix_by`): refused under the new default, saying why and what to give;
    with --mix-by tokens it continues exactly."""
    import torch

    from student.run import TRAIN_STATE

    a, _ = teacher_stores
    short = write_teacher_store(str(tmp_path / "short"), tiny_teacher_dir, 12, 32, rows_per_batch=4, k=4,
                                corpus_seed=9, lengths=[2, 4])  # fewer loss positions per token than `a`
    full = tmp_path / "full"
    train(_cfg([a, f"{short}:0.5"], tiny_teacher_dir, full, mix_by="tokens", max_steps=4, save_every=2))
    losses = [(r["step"], r["loss"]) for r in read_metrics(full) if "loss" in r]
    old = tmp_path / "old"
    shutil.copytree(full, old)
    shutil.rmtree(old / "checkpoint-4")
    shutil.rmtree(old / "final")
    state = torch.load(old / "checkpoint-2" / TRAIN_STATE, weights_only=False)
    for reader in state["readers"]:
        del reader["mix_by"]  # as earlier versions saved it
    torch.save(state, old / "checkpoint-2" / TRAIN_STATE)
    with pytest.raises(TrainError, match=r"weights were shares of the stores' tokens.*--mix-by tokens"):
        train(_cfg([a, f"{short}:0.5"], tiny_teacher_dir, old, resume=True, max_steps=4, save_every=2))
    train(_cfg([a, f"{short}:0.5"], tiny_teacher_dir, old, resume=True, max_steps=4, save_every=2, mix_by="tokens"))
    assert [(r["step"], r["loss"]) for r in read_metrics(old) if "loss" in r] == losses


def test_store_option_is_repeatable_and_checked_early(teacher_stores, tiny_teacher_dir, tmp_path):
    from cli.config import parse_config

    a, b = teacher_stores
    cfg = parse_config(TrainConfig, ["--store", a, "--store", f"{b}:0.3", "--base", "x", "--out", "y"], "t", "")
    assert cfg.store_weights() == ([a, b], [None, 0.3])
    assert TrainConfig(store=a, base="x", out="y").store == [a]  # one store as a config file gives it
    with pytest.raises(ValueError, match="twice"):
        TrainConfig(store=[a, f"{a}:0.5"], base="x", out="y")
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(store=[f"{a}:-2"], base="x", out="y")


def test_an_empty_store_is_refused_by_name(stores, tmp_path):
    empty = str(tmp_path / "empty")
    write_store(empty, n_rows=0)
    for given in (empty, [stores["chat"], empty]):
        with pytest.raises(ValueError, match="no rows") as e:
            KDStream(given, batch_size=2)
        assert empty in str(e.value)


def _peak_decoded(stream: KDStream, epochs: int) -> int:
    """The most record batches `stream` holds decoded at once over `epochs` epochs (each decode is counted until
    it is garbage)."""
    import weakref

    live, peak = [0], [0]

    def dropped():
        live[0] -= 1

    for store in stream.stores:
        def counted(*args, _decode=store.decode_batch):
            out = _decode(*args)
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            weakref.finalize(out, dropped)
            return out

        store.decode_batch = counted
    for _ in range(epochs):
        for _batch in stream:
            pass
    return peak[0]


def test_a_weighted_store_keeps_about_one_shuffle_window_decoded(tmp_path):
    """A weighted store's rows of one mixture epoch come from two of its own epochs (its passes); a record batch
    read in both is dropped after its last row of the first pass and read again, rather than held in between
    (before: ~30 % of all record batches were held at once)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_store(a, n_rows=1500, seed=1, batch_tokens=100)
    write_store(b, n_rows=1500, seed=2, batch_tokens=100)
    units = len(LogitStore.open(a).units())
    plain = _peak_decoded(KDStream([a, b], batch_size=8, shuffle_buffer=64), epochs=2)
    weighted = _peak_decoded(KDStream([a, b], batch_size=8, shuffle_buffer=64, weights=[0.3, None]), epochs=2)
    assert units > 200 and plain < 30
    assert weighted <= 2 * plain


def test_each_rank_gets_each_store_at_its_share(stores):
    """On several ranks a mixture's batch is split so that every rank holds each store's rows at about the batch's
    share (before: the rows sorted by store, rank 0 took mostly the first store), each rank's rows of a store
    contiguous in store order; the ranks still cover the global batch exactly."""
    streams = [KDStream([stores["chat"], stores["code"]], batch_size=8, weights=[None, 0.5], rank=r, world_size=2)
               for r in range(2)]
    starts = streams[0].store_start
    for index in range(len(streams[0])):
        parts = [s.batch_rows(index) for s in streams]
        whole = np.sort(streams[0].epoch_order(0)[index * 16:(index + 1) * 16])
        assert np.array_equal(np.sort(np.concatenate(parts)), whole)
        code = [int((p >= starts[1]).sum()) for p in parts]
        assert abs(code[0] - code[1]) <= 1


def test_eval_reports_each_store_share_of_the_loss_positions():
    """`kdstudent eval --store A --store B` says what each store weighs in the pool: its share of the pool's loss
    positions (`tokens` in the tables counts the positions scored)."""
    from student.evaluate import METRICS, format_report

    def result(tokens: int) -> dict:
        return {key: (tokens if key == "tokens" else 1 if key == "rows" else 0.5) for key in METRICS}

    out = format_report({"stores": {"chat": result(300), "text": result(900)}, "pooled": result(1200)})
    assert out.splitlines()[-1] == "share of the loss positions: chat 25.0%, text 75.0%"
    assert "share of the loss positions" not in format_report({"stores": {"chat": result(300)},
                                                              "pooled": result(300)})


@pytest.mark.parametrize("by", ["positions", "tokens"])
def test_mixture_sampler_reads_weights_as_the_training_does(prompt_masked, by):
    """`StoreDataset(..., mix_by=)` and its `MixtureSampler` order an epoch as `kdstudent train --mix-by` does."""
    from student.hf_trainer import MixtureSampler, StoreDataset

    stores = [prompt_masked["chat"], prompt_masked["text"]]
    dataset = StoreDataset([f"{stores[0]}:0.5", stores[1]], mix_by=by)
    stream = KDStream(stores, batch_size=1, weights=[0.5, None], seed=3, mix_by=by)
    assert list(MixtureSampler(dataset, seed=3)) == stream.epoch_order(0).tolist()
    assert MixtureSampler(dataset, seed=3).plan.epoch_rows == stream.epoch_rows
