"""Training killed at named points and resumed equals the uninterrupted run, bit for bit (CPU).

The kills are real SIGKILLs placed by crash points (`MOEKD_FAULT=<point>:<n>`, logit_store/faults.py), never by
timers: `step:N` after step N's backward, before its optimizer step; `checkpoint-temp:N` when checkpoint N is
written to its temporary folder, before the rename; `checkpoint-rename:N` after the rename, before older
checkpoints are pruned; `epoch:E` when the stream starts epoch E. Each training is its own process
(tests/fork_runner.py forks them from one process that imported torch once; the 2-process resume runs under
torchrun). Compared: every metrics.jsonl record (all fields but the wall-clock tokens_per_s) and the final
trainable weights, byte for byte.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from store_fixtures import write_teacher_store

from logit_store import LogitStore
from student.run import RunLock, checkpoints, read_metrics

ROOT = Path(__file__).resolve().parent.parent
SEQ, ROWS, BATCH = 32, 16, 4  # one record batch; 4 steps per epoch on one process (and on two at batch 2)
STEPS = 14
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
ENV.pop("MOEKD_FAULT", None)

# (crash point, extra flags, exit code, newest checkpoint afterwards): one run killed five times, resumed each time
CHAIN = [
    ("step:2", [], -9, None),  # before the first checkpoint: the resume restarts and drops the logged step 1
    ("step:4", ["--resume"], -9, 2),  # mid-step, mid-epoch: resumes from checkpoint 2 with 2 workers mid-epoch
    ("checkpoint-temp:6", ["--resume"], -9, 4),  # checkpoint 6 never lands: 4, on an epoch boundary, is newest
    ("checkpoint-rename:8", ["--resume", "--num-workers", "0"], -9, 8),  # from the boundary; unpruned 4, 6, 8
    ("epoch:3", ["--resume"], -9, 12),  # killed as epoch 3 starts; checkpoint 12 is on the boundary
    (None, ["--resume"], 0, STEPS),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_argv(store: str, base: str, out: Path, batch: int, *extra: str) -> list[str]:
    return ["train", "--store", store, "--base", base, "--out", str(out), "--keep-layers", "0", "--experts", "4",
            "--rank", "4", "--attn-rank", "4", "--expert-impl", "loop", "--lora-dropout", "0.1", "--batch-size",
            str(batch), "--max-steps", str(STEPS), "--save-every", "2", "--keep-checkpoints", "2", "--lr", "3e-3",
            "--warmup-steps", "1", "--log-every", "1", "--num-workers", "2", "--no-progress", "--seed", "3", *extra]


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run)]


def _weights(run: Path, step: int) -> bytes:
    return (run / f"checkpoint-{step}" / "trainable.safetensors").read_bytes()


@pytest.fixture(scope="module")
def store(tiny_teacher_dir, tmp_path_factory) -> str:
    path = write_teacher_store(str(tmp_path_factory.mktemp("fault_store")), tiny_teacher_dir, ROWS, SEQ)
    assert len(LogitStore.open(path).units()) == 1
    return path


@pytest.fixture(scope="module")
def runs(store, tiny_teacher_dir, tmp_path_factory) -> dict:
    """Every forked training of this module in one fork_runner call (one import of torch): the reference, the
    killed-and-resumed chain, a training refused by a held lock, and the 2-process reference and killed run."""
    tmp = tmp_path_factory.mktemp("faults")
    ref, chain, locked, ref2, killed2 = (tmp / n for n in ("reference", "chain", "locked", "reference2", "killed2"))
    jobs = [dict(argv=_train_argv(store, tiny_teacher_dir, ref, BATCH), log=str(tmp / "reference.log"))]
    for i, (fault, extra, _, _) in enumerate(CHAIN):
        jobs.append(dict(argv=_train_argv(store, tiny_teacher_dir, chain, BATCH, *extra),
                         log=str(tmp / f"chain{i}.log"), env={"MOEKD_FAULT": fault} if fault else {},
                         snapshot=str(chain)))
    jobs.append(dict(argv=_train_argv(store, tiny_teacher_dir, locked, BATCH), log=str(tmp / "locked.log")))
    two = dict(ranks=2, env={"MASTER_PORT": str(_free_port())})
    jobs.append(dict(argv=_train_argv(store, tiny_teacher_dir, locked, BATCH // 2), log=str(tmp / "locked2.log"),
                     **two))
    jobs.append(dict(argv=_train_argv(store, tiny_teacher_dir, ref2, BATCH // 2), log=str(tmp / "reference2.log"),
                     **two))
    jobs.append(dict(argv=_train_argv(store, tiny_teacher_dir, killed2, BATCH // 2), log=str(tmp / "killed2.log"),
                     **dict(two, env=dict(two["env"], MOEKD_FAULT="step:5"))))
    with RunLock(locked):  # what a training of `locked` holds from its start to its end
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "fork_runner.py")], input=json.dumps(jobs),
                              env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.splitlines()[-1])
    return dict(tmp=tmp, codes=codes, ref=ref, chain=chain, locked=locked, ref2=ref2, killed2=killed2,
                store=store, base=tiny_teacher_dir)


def _log(runs: dict, name: str) -> str:
    return (runs["tmp"] / name).read_text()


def test_the_reference_trains(runs):
    assert runs["codes"][0] == 0, _log(runs, "reference.log")[-3000:]
    records = _records(runs["ref"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["epoch"] for r in records] == [s // 4 for s in range(STEPS)]  # 4 steps per epoch


def test_each_kill_leaves_what_its_point_promises(runs):
    reference = _records(runs["ref"])
    for i, (fault, _, code, newest) in enumerate(CHAIN):
        after = Path(f"{runs['chain']}.after-{i + 1}")
        assert runs["codes"][i + 1] == code, (fault, _log(runs, f"chain{i}.log")[-3000:])
        found = [int(p.name.split("-")[1]) for p in checkpoints(after)]
        assert (found[-1] if found else None) == newest, (fault, found)
        # what the dead run logged is the uninterrupted run's first records
        records = _records(after)
        assert records == reference[:len(records)], fault
        if fault == "checkpoint-temp:6":
            assert (after / ".tmp-checkpoint-6").is_dir() and found == [2, 4]
        if fault == "checkpoint-rename:8":
            assert found == [4, 6, 8]  # renamed, not yet pruned
        if fault == "step:2":
            assert found == [] and [r["step"] for r in records] == [1]
    log = _log(runs, "chain1.log")
    assert "resuming" not in log  # no checkpoint to resume from: a fresh start (step 1's record dropped)
    assert "resuming at step 4" in _log(runs, "chain3.log")  # the epoch-boundary checkpoint


def test_killed_and_resumed_run_equals_the_uninterrupted_one(runs):
    ref, chain = runs["ref"], runs["chain"]
    assert _records(chain) == _records(ref)  # no record lost or repeated, every value equal
    assert _weights(chain, STEPS) == _weights(ref, STEPS)
    student = Path("final", "student")
    for f in sorted(p.name for p in (ref / student).iterdir() if p.suffix == ".safetensors"):
        assert (chain / student / f).read_bytes() == (ref / student / f).read_bytes()
    assert not list(chain.glob(".tmp-checkpoint-*")) and len(checkpoints(chain)) == 2


def test_a_second_training_of_the_same_run_stops_at_its_lock(runs):
    log = _log(runs, "locked.log")
    assert runs["codes"][len(CHAIN) + 1] == 2, log[-3000:]
    assert f"is in use by another training (pid {os.getpid()} on" in log and "Traceback" not in log
    assert not (runs["locked"] / "train_config.json").exists()  # stopped before writing anything
    # on 2 processes rank 0 takes the lock, and both stop with its error (none waits for the other)
    assert runs["codes"][len(CHAIN) + 2] == 2
    for rank in (0, 1):
        assert "is in use by another training" in _log(runs, f"locked2.log.rank{rank}")


def test_two_processes_with_workers_on_one_record_batch_resume_exactly_under_torchrun(runs):
    """2 ranks x 2 DataLoader workers on a store of one record batch: killed mid-step 5, resumed under torchrun
    from checkpoint 4 (an epoch boundary), equal to the uninterrupted 2-process run."""
    ref2, killed2 = runs["ref2"], runs["killed2"]
    assert runs["codes"][-2] == 0, _log(runs, "reference2.log.rank0")[-3000:]
    assert runs["codes"][-1] == -9 and checkpoints(killed2)[-1].name == "checkpoint-4"
    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "cli.kdstudent", *_train_argv(runs["store"], runs["base"], killed2, BATCH // 2, "--resume")],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 process(es), global batch 4 rows; resuming at step 4" in resumed.stdout
    assert _records(killed2) == _records(ref2) and len(_records(ref2)) == STEPS
    assert _weights(killed2, STEPS) == _weights(ref2, STEPS)
