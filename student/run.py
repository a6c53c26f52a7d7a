"""The run directory of `kdstudent train`: what is in it, under which names, and how to read it.

    RUN/
      train_config.json     the run's TrainConfig (written at every start and resume)
      metrics.jsonl         one JSON object per line: a logged step {"step", "loss", "kd", ...} or an evaluation
                            {"step", "eval": {...}}
      checkpoint-STEP/      trainable.safetensors, train_state.pt (optimizer, scheduler, reader positions, RNG),
                            train_config.json and, for a MoE-LoRA student, student/ (a saved student); the newest
                            --keep-checkpoints are kept. Written as .tmp-checkpoint-STEP, then renamed. Under
                            --sharding fsdp: dcp/ (every process's shards of the trainable weights and optimizer
                            state, torch.distributed.checkpoint) instead of the optimizer in train_state.pt, and
                            trainable.safetensors + student/ in the run's last checkpoint only.
      final/student/        the trained MoE-LoRA student (student.io format)
      plots/                `kdstudent plot`
      tensorboard/          with --report-to tensorboard: the metrics.jsonl scalars as TensorBoard events
      .lock                 locked (lockf) by the training that owns the run; its pid and host inside

The trainer writes these (student/train.py); the readers (load_trained, student.io, plots, the CLI) find them here.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
from pathlib import Path

from student.config import REPORT_TO, TrainConfig

RUN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
TRAINABLE = "trainable.safetensors"  # in a checkpoint: the trainable parameters by name
TRAIN_STATE = "train_state.pt"  # in a checkpoint: step, optimizer, scheduler, reader and RNG states per rank
STUDENT = "student"  # a saved MoE-LoRA student inside a checkpoint or final/
FINAL = "final"
LOCK = ".lock"
TENSORBOARD = "tensorboard"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class RunLockedError(RuntimeError):
    """Another training holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory, held by the one training that writes it (rank 0 of a torchrun).

    A POSIX record lock (`fcntl.lockf`) on RUN/.lock. The kernel drops it when the holder exits or dies (kill -9
    included), so a killed run leaves no stale lock; a second training of the same --out stops at once with an
    error naming the holder (its pid and host, written in the file). Not `flock`: an flock is shared with forked
    children, so the DataLoader workers of a killed run would hold it on for seconds; a record lock belongs to
    the process alone. Record locks work across hosts on NFS. Within one process a second lock of the same run is
    refused as well (record locks do not conflict within a process).
    """

    _held: set[str] = set()  # runs this process holds

    def __init__(self, run: str | os.PathLike):
        self.path = Path(run) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = os.path.realpath(self.path)
        self._fd: int | None = None
        if self._key in RunLock._held:
            raise RunLockedError(f"{Path(run)} is in use by another training in this process (lock {self.path})")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN / EACCES: held elsewhere
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunLockedError(f"{Path(run)} is in use by another training ({holder}; lock {self.path}): wait "
                                 "for it to finish, or choose another --out") from None
        self._fd = fd
        RunLock._held.add(self._key)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        """Give the lock up (closing the file releases it). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            RunLock._held.discard(self._key)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run (it holds a train_config.json)."""
    return (Path(path) / RUN_CONFIG).is_file()


def checkpoint_dir(run: str | os.PathLike, step: int) -> Path:
    return Path(run) / f"checkpoint-{step}"


def temp_checkpoint_dir(run: str | os.PathLike, step: int) -> Path:
    """Where checkpoint `step` is written before it is renamed into place."""
    return Path(run) / f".tmp-checkpoint-{step}"


def remove_temp_checkpoints(run: str | os.PathLike) -> None:
    """Delete checkpoints a killed run left half-written (they were never renamed into place)."""
    for tmp in Path(run).glob(".tmp-checkpoint-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoints(run: str | os.PathLike) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run).glob("checkpoint-*") if (m := _CHECKPOINT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def final_student_dir(run: str | os.PathLike) -> Path:
    return Path(run) / FINAL / STUDENT


def write_config(run: str | os.PathLike, cfg: TrainConfig) -> None:
    (Path(run) / RUN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1))


def load_config(run: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a run (or a checkpoint) was trained with; files of earlier versions included."""
    return TrainConfig.from_dict(json.loads((Path(run) / RUN_CONFIG).read_text()))


def read_metrics(run: str | os.PathLike) -> list[dict]:
    path = Path(run) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(run: str | os.PathLike, record: dict) -> None:
    with open(Path(run) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


class MetricsLog:
    """Where a training's metrics go: metrics.jsonl always, and with `report_to="tensorboard"` every numeric value
    of each record also as a TensorBoard scalar (`train/loss`, `eval/teacher_kl`, `eval/domains/code/ce`, ...) in
    RUN/tensorboard. A run resumed at step s drops the events logged after s, as it drops those lines of
    metrics.jsonl (`truncate_metrics`)."""

    def __init__(self, run: str | os.PathLike, report_to: str = "none", resume_step: int = 0):
        if report_to not in REPORT_TO:
            raise ValueError(f"--report-to {report_to!r}: one of {', '.join(REPORT_TO)}")
        self.run, self.tensorboard = Path(run), None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run / TENSORBOARD), purge_step=resume_step + 1)

    def append(self, record: dict) -> None:
        append_metrics(self.run, record)
        if self.tensorboard is not None:
            step = record["step"]
            section = "eval" if "eval" in record else "train"
            for tag, value in _scalars(record.get("eval", record)):
                if tag != "step":
                    self.tensorboard.add_scalar(f"{section}/{tag}", value, step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _scalars(record: dict, prefix: str = ""):
    """(tag, number) for every number in a nested record; list items are tagged by their index."""
    items = record.items() if isinstance(record, dict) else enumerate(record)
    for key, value in items:
        tag = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            yield from _scalars(value, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


def truncate_metrics(run: str | os.PathLike, step: int) -> None:
    """Drop the records after `step` (what a crashed run logged after the checkpoint it resumes from; all of them
    when it resumes from none), and a last line a kill cut short. Replaced atomically."""
    path = Path(run) / METRICS
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill: the step it belongs to is trained again
        if record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
