"""`kdstudent train / eval / plot` on a tiny teacher's store: resume equality, torchrun equality, refusals."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from store_fixtures import write_teacher_store

from student.config import TrainConfig
from student.run import read_metrics
from student.train import TrainError, train

SEQ, ROWS_PER_UNIT = 32, 2


@pytest.fixture(scope="module")
def store(tiny_teacher_dir, tmp_path_factory):
    """48 rows of exactly SEQ tokens, ROWS_PER_UNIT rows per record batch."""
    return write_teacher_store(str(tmp_path_factory.mktemp("train_store")), tiny_teacher_dir, 48, SEQ, ROWS_PER_UNIT)


def _cfg(store, base, out, **kw) -> TrainConfig:
    defaults = dict(keep_layers="0", experts=4, rank=4, attn_rank=4, batch_size=4, max_steps=6, lr=3e-3,
                    warmup_steps=1, log_every=1, progress=False, seed=1)
    defaults.update(kw)
    return TrainConfig(store=store, base=base, out=str(out), **defaults)


def _losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def test_training_reduces_the_kd_loss_and_writes_a_run(store, tiny_teacher_dir, tmp_path):
    last = train(_cfg(store, tiny_teacher_dir, tmp_path, max_steps=10, ce_weight=0.1, loss="srkl",
                      eval_store=store, eval_every=5, eval_rows=16))
    losses = _losses(tmp_path)
    assert len(losses) == 10 and losses[-1][1] < losses[0][1]
    assert last["balance"] > 0 and last["lr"] == 0.0
    evals = [r["eval"] for r in read_metrics(tmp_path) if "eval" in r]
    assert [e["rows"] for e in evals] == [16, 16]
    assert 0 <= evals[-1]["top1_agree"] <= 1 and evals[-1]["teacher_kl"] >= 0 and np.isfinite(evals[-1]["ppl"])
    assert (tmp_path / "final" / "student" / "student.json").exists()


def test_resume_reproduces_the_uninterrupted_loss_curve(store, tiny_teacher_dir, tmp_path):
    full = tmp_path / "full"
    train(_cfg(store, tiny_teacher_dir, full, save_every=3, keep_checkpoints=5))
    # a crash after step 4: the newest checkpoint is step 3, and step 4 was logged
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoint-6")
    shutil.rmtree(crashed / "final")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    with pytest.raises(TrainError, match="--resume"):
        train(_cfg(store, tiny_teacher_dir, crashed))
    train(_cfg(store, tiny_teacher_dir, crashed, save_every=3, resume=True))
    assert _losses(crashed) == _losses(full)  # bit for bit: model, optimiser, schedule, RNG and reader restored


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_baseline_students_train(store, tiny_teacher_dir, tmp_path, kind):
    train(_cfg(store, tiny_teacher_dir, tmp_path, student=kind, max_steps=4, rank=4))
    losses = [loss for _, loss in _losses(tmp_path)]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory) -> str:
    """A tiny teacher whose BPE is trained on other text: another tokenizer."""
    from assets.synthetic import make_tiny_teacher

    other = str(tmp_path_factory.mktemp("other_teacher"))
    make_tiny_teacher(other, n_docs=30, steps=1, seed=5)
    return other


@pytest.fixture(scope="module")
def other_store(other_teacher, tmp_path_factory) -> str:
    """4 rows in the other tokenizer's ids."""
    return write_teacher_store(str(tmp_path_factory.mktemp("other_store")), other_teacher, 4, SEQ)


def test_a_student_with_another_tokenizer_is_refused(store, tmp_path, other_teacher, other_store, tiny_teacher_dir):
    with pytest.raises(TrainError, match="tokenizer"):
        train(_cfg(store, other_teacher, tmp_path / "run"))
    with pytest.raises(TrainError, match=f"is not the one the store {other_store} was built with"):
        train(_cfg(store, tiny_teacher_dir, tmp_path / "run2", eval_store=other_store))  # --eval-store too
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_a_student_vocabulary_smaller_than_the_store_is_refused(store, tiny_teacher_dir):
    from student_fixtures import VOCAB, llama_config
    from transformers import LlamaForCausalLM

    from logit_store import LogitStore
    from student.train import check_tokenizer

    opened = LogitStore.open(store)
    assert VOCAB < opened.manifest.vocab_size
    with pytest.raises(TrainError, match=rf"vocabulary \({VOCAB}\) is smaller than the store's .* "
                                         rf"\({opened.manifest.vocab_size}\)"):
        check_tokenizer(tiny_teacher_dir, opened, LlamaForCausalLM(llama_config()))


def test_torchrun_two_processes_equal_one(store, tiny_teacher_dir, tmp_path):
    common = ["--store", store, "--base", tiny_teacher_dir, "--keep_layers", "0", "--experts", "4", "--rank", "4",
              "--attn_rank", "4", "--max_steps", "4", "--lr", "3e-3", "--warmup_steps", "0", "--log_every", "1",
              "--no_shuffle", "--no_progress", "--seed", "1", "--balance_coef", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "cli.kdstudent", "train", *common, "--out", str(tmp_path / "one"),
                          "--batch_size", str(2 * ROWS_PER_UNIT)], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "cli.kdstudent", "train", *common, "--out", str(tmp_path / "two"),
                          "--batch_size", str(ROWS_PER_UNIT)], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    # The balance loss is computed per process (as Switch/Mixtral do), so it is off here: then N processes
    # train exactly like one with the same global batch.
    np.testing.assert_allclose([x for _, x in b], [x for _, x in a], rtol=1e-5)
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["batch_size"] == ROWS_PER_UNIT


def test_eval_and_plot_commands(store, tiny_teacher_dir, other_store, tmp_path, capsys):
    from cli import kdstudent

    run = tmp_path / "run"
    train(_cfg(store, tiny_teacher_dir, run, max_steps=3))
    capsys.readouterr()
    assert kdstudent.main(["eval", "--model", str(run), "--store", store, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 48 and result["tokens"] == 48 * (SEQ - 1)
    assert set(result["expert_usage"]) == {"0"} and abs(sum(result["expert_usage"]["0"]) - 1) < 1e-6
    assert kdstudent.main(["plot", str(run)]) == 0
    pngs = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in pngs] == ["loss.png", "experts.png"]
    assert all(os.path.getsize(p) > 1000 for p in pngs)

    # eval makes training's checks, and every store error is one line, not a traceback
    cut = tmp_path / "cut"
    shutil.copytree(store, cut)
    shard = cut / json.loads((cut / "manifest.json").read_text())["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:100])
    for model in (run, run / "final" / "student"):  # a run, and a saved student
        for broken, message in ((str(cut), f"{shard.name}: size 100 bytes"),
                                (str(tmp_path / "nowhere"), "no manifest here")):
            assert kdstudent.main(["eval", "--model", str(model), "--store", broken]) == 2
            err = capsys.readouterr().err  # may hold transformers' progress bars before the error line
            last = err.rstrip("\n").split("\n")[-1]
            assert last.startswith("kdstudent eval: error:") and message in last and "Traceback" not in err, err
    # a store of another tokenizer is read as text (student/cross_tokenizer.py): bits per byte and alignment
    assert kdstudent.main(["eval", "--model", str(run), "--store", other_store, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["aligned"] <= 1 and result["bpb"] > 0


@pytest.mark.parametrize("flag,value", [("batch-size", "0"), ("grad-accum", "0"), ("max-steps", "0"),
                                        ("max-steps", "-5"), ("save-every", "-1"), ("num-workers", "-1"),
                                        ("log-every", "0"), ("keep-checkpoints", "-1"), ("shuffle-buffer", "0"),
                                        ("lr", "0"), ("temperature", "-1"), ("skew-alpha", "1.5")])
def test_invalid_options_are_refused_before_anything_loads(tmp_path, capsys, flag, value):
    from cli import kdstudent

    out = tmp_path / "run"
    # neither the store nor the base exists: an error about them would mean something was loaded first
    code = kdstudent.main(["train", "--store", str(tmp_path / "no-store"), "--base", str(tmp_path / "no-base"),
                           "--out", str(out), f"--{flag}", value])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdstudent train: error:") and err.count("\n") == 1, err
    assert (f"--{flag}" in err or "loss options" in err) and value in err and not out.exists()


def test_a_store_too_small_for_processes_times_batch_is_refused_before_the_model_loads(store, tmp_path):
    cfg = _cfg(store, str(tmp_path / "no-base"), tmp_path / "run", batch_size=49)
    with pytest.raises(TrainError, match=r"48 rows, fewer than one batch for each process: 1 process\(es\) x "
                                         r"--batch-size 49 = 49 rows"):
        train(cfg)


def test_a_run_in_use_is_refused(store, tmp_path):
    from student.run import RunLock, RunLockedError

    with RunLock(tmp_path / "run"):  # as a training of this run holds it (across processes: test_faults_train)
        with pytest.raises(RunLockedError, match="in use by another training"):
            train(_cfg(store, str(tmp_path / "no-base"), tmp_path / "run"))
    with pytest.raises(OSError):  # the lock is free again: now the missing base is what stops it
        train(_cfg(store, str(tmp_path / "no-base"), tmp_path / "run"))


def test_bf16_autocast_and_gradient_checkpointing_train(store, tiny_teacher_dir, tmp_path):
    last = train(_cfg(store, tiny_teacher_dir, tmp_path, max_steps=3, bf16=True, gradient_checkpointing=True,
                      grad_accum=2))
    losses = [loss for _, loss in _losses(tmp_path)]
    assert len(losses) == 3 and all(np.isfinite(losses)) and last["tokens"] == 2 * 4 * (SEQ - 1)


def test_a_bf16_base_trains_and_evaluates(store, tiny_teacher_dir, tmp_path, capsys):
    from cli import kdstudent

    last = train(_cfg(store, tiny_teacher_dir, tmp_path, max_steps=3, bf16=True, base_dtype="bfloat16", rank=8))
    assert np.isfinite(last["loss"]) and last["grad_norm"] > 0
    capsys.readouterr()
    assert kdstudent.main(["eval", "--model", str(tmp_path), "--store", store, "--json"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["teacher_kl"])


def test_report_to_tensorboard_mirrors_metrics_and_a_resume_replaces_the_lost_steps(store, tiny_teacher_dir,
                                                                                     tmp_path):
    """--report-to tensorboard: every logged step's scalars as TensorBoard events beside metrics.jsonl; a resume
    from step 3 drops the events of the steps after it and logs them again, so each step has one value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def events(run) -> dict[str, list[tuple[int, float]]]:
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:  # events hold float32
        return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx(
            [v for _, v in want], rel=1e-6)

    run = tmp_path / "run"
    train(_cfg(store, tiny_teacher_dir, run, save_every=3, keep_checkpoints=5, report_to="tensorboard",
               eval_store=store, eval_rows=8))
    logged = events(run)
    assert same(logged["train/loss"], _losses(run))
    teacher_kl = [(r["step"], r["eval"]["teacher_kl"]) for r in read_metrics(run) if "eval" in r]
    assert same(logged["eval/teacher_kl"], teacher_kl) and len(teacher_kl) == 1
    assert "train/routing/0/experts_by_load" in logged or any(t.startswith("train/expert_usage/") for t in logged)
    shutil.rmtree(run / "checkpoint-6")
    shutil.rmtree(run / "final")
    train(_cfg(store, tiny_teacher_dir, run, resume=True, report_to="tensorboard", eval_store=store, eval_rows=8))
    again = events(run)
    assert same(again["train/loss"], _losses(run)) and [s for s, _ in again["train/loss"]] == list(range(1, 7))
    with pytest.raises(ValueError, match="report-to"):
        _cfg(store, tiny_teacher_dir, run, report_to="wandb")
