"""`kdstudent train --sharding fsdp` under torchrun (gloo, 2 CPU processes): equal to one process, exact resume."""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file
from store_fixtures import write_teacher_store
from student_fixtures import as_if_killed_after

from student.distributed import load_sharded_into_plain
from student.run import read_metrics
from student.train import TrainConfig, build_model, train

SEQ, ROWS_PER_UNIT, STEPS = 32, 2, 6
# balance loss off: it is computed per process (as Switch/Mixtral do), so only without it do N processes equal one
OPTIONS = dict(keep_layers="0,1", experts=4, rank=8, attn_rank=4, max_steps=STEPS, lr=3e-3, warmup_steps=0,
               log_every=1, shuffle=False, progress=False, seed=1, balance_coef=0.0, eval_every=3, eval_rows=8,
               router_bias_update=1e-3)  # the selection biases (buffers) go through checkpoints too


@pytest.fixture(scope="module")
def store(tiny_teacher_dir, tmp_path_factory):
    """48 rows of SEQ tokens, ROWS_PER_UNIT rows per record batch (the unit the reader deals to ranks)."""
    return write_teacher_store(str(tmp_path_factory.mktemp("fsdp_store")), tiny_teacher_dir, 48, SEQ, ROWS_PER_UNIT)


def _flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        if isinstance(v, bool):
            out.append(f"--{k}" if v else f"--no_{k}")
        else:
            out += [f"--{k}", str(v)]
    return out


def _torchrun(store, base, out, **kw) -> None:
    opts = dict(OPTIONS, batch_size=ROWS_PER_UNIT, sharding="fsdp", **kw)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cli.kdstudent", "train", "--store", store, "--base", base, "--out", str(out), "--eval_store", store,
           *_flags(**opts)]
    run = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.fixture(scope="module")
def one_process(store, tiny_teacher_dir, tmp_path_factory):
    """The reference: one process, the same global batch (2 processes x ROWS_PER_UNIT rows)."""
    out = tmp_path_factory.mktemp("one")
    train(TrainConfig(store=store, base=tiny_teacher_dir, out=str(out), eval_store=store,
                      batch_size=2 * ROWS_PER_UNIT, **OPTIONS))
    return out


def _losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def _evals(run) -> list[float]:
    return [r["eval"]["teacher_kl"] for r in read_metrics(run) if "eval" in r]


def _weights(run, step: int = STEPS) -> dict:
    return load_file(str(run / f"checkpoint-{step}" / "trainable.safetensors"))


def _assert_equal_to(run, ref) -> None:
    a, b = _losses(ref), _losses(run)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    # measured: relative differences up to 1.5e-5 on these ~1e-3 losses, absolute < 1e-7; DDP gives the same
    np.testing.assert_allclose([x for _, x in b], [x for _, x in a], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_evals(run), _evals(ref), rtol=1e-4, atol=1e-6)
    wa, wb = _weights(ref), _weights(run)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), atol=1e-5, err_msg=k)


def test_fsdp_two_processes_equal_one_and_resume_exactly(store, tiny_teacher_dir, one_process, tmp_path):
    full = tmp_path / "full"
    _torchrun(store, tiny_teacher_dir, full, save_every=2, keep_checkpoints=5)
    _assert_equal_to(full, one_process)
    assert (full / "checkpoint-2" / "dcp").is_dir() and not (full / "checkpoint-2" / "trainable.safetensors").exists()
    assert (full / "final" / "student" / "adapters.safetensors").is_file()  # same format as DDP's
    # the DCP shards read back into an unwrapped model in one process (kdstudent eval of a killed run)
    model = build_model(TrainConfig(store=store, base=tiny_teacher_dir, out=str(full), **OPTIONS))
    load_sharded_into_plain(full / f"checkpoint-{STEPS}" / "dcp", model)
    final = _weights(full)
    for name, p in model.named_parameters():
        if p.requires_grad:
            np.testing.assert_array_equal(p.detach().numpy(), final[name].numpy(), err_msg=name)

    # killed after step 3: the newest checkpoint is step 2 (mid-epoch), step 3 was logged
    crashed = as_if_killed_after(full, tmp_path / "crashed", 3)
    _torchrun(store, tiny_teacher_dir, crashed, save_every=2, keep_checkpoints=5, resume=True)
    assert _losses(crashed) == _losses(full)  # bit for bit: sharded weights, optimizer, RNG, reader restored
    assert _evals(crashed) == _evals(full)
    wa, wb = _weights(full), _weights(crashed)
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)


def test_fsdp_with_a_replicated_frozen_base_equals_one_process(store, tiny_teacher_dir, one_process, tmp_path):
    _torchrun(store, tiny_teacher_dir, tmp_path, fsdp_frozen="replicate", grad_accum=1)
    _assert_equal_to(tmp_path, one_process)


def test_fsdp_bf16_gathers_the_routers_in_fp32(tiny_teacher_dir):
    """Under --bf16 every FSDP unit is gathered in bf16 except the routers, whose logits stay those of the fp32
    weights (tests/fsdp_router_probe.py, 2 processes)."""
    probe = os.path.join(os.path.dirname(__file__), "fsdp_router_probe.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", probe,
           tiny_teacher_dir]
    run = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd()),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("ok") == 2
