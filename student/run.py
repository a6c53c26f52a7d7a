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
      final/student/        the trained MoE-LoRA student (student.io format), at the step of the run's end
      plots/                `kdstudent plot`
      tensorboard/          with --report-to tensorboard: the metrics.jsonl scalars as TensorBoard events
      .lock                 locked (lockf) by the training that owns the run; its pid and host inside

The trainer writes these (student/train.py); the readers (load_trained, student.io, plots, the CLI) find them here,
and `student_snapshot` says which of them is the run's student, for every reader alike.

Also here: what a `--resume` may change (`check_resume`), and the rule that no write lands on an input
(`check_output`).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

from logit_store.fs import overlap
from logit_store.plan import parse_store_specs
from student.config import _RENAMED, REPORT_TO, TrainConfig, may_change_on_resume, parse_layer_experts

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
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):  # held elsewhere
                raise RunLockedError(f"{Path(run)} is in use by another training ({holder}; lock {self.path}): "
                                     "wait for it to finish, or choose another --out") from None
            # ENOLCK (NFS without lockd), ENOSYS / EOPNOTSUPP (Lustre without flock, FUSE): no lock here at all,
            # and `holder` is only the last run that wrote the file
            raise RunLockedError(f"{Path(run)}: locking is not supported on this filesystem (errno {e.errno}, "
                                 f"{e.strerror}, locking {self.path}), so two trainings of one run could not be "
                                 "kept apart: train into a local --out (then copy the run), or onto a filesystem "
                                 "with locks (NFS with lockd running, Lustre mounted with -o flock)") from None
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


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The step of a `checkpoint-STEP` directory."""
    m = _CHECKPOINT.fullmatch(Path(checkpoint).name)
    if m is None:
        raise ValueError(f"{checkpoint} is not a checkpoint-STEP directory")
    return int(m.group(1))


def student_snapshot(run: str | os.PathLike) -> Path:
    """The saved state that is a run's student, for every reader (kdstudent eval, export, info; load_trained,
    load_student): the newest complete checkpoint — the state a --resume continues from; a finished run's last
    checkpoint holds the weights of final/student (written after it, at the same step), and after a --resume that
    extends a run and dies, final/ is the older end. final/ itself only when no checkpoint is left."""
    found = checkpoints(run)
    if found:
        return found[-1]
    if (Path(run) / FINAL).is_dir():
        return Path(run) / FINAL
    raise FileNotFoundError(f"{run} has no checkpoint yet (nor final/): nothing to read until its first "
                            "checkpoint (--save-every) or its end")


def state_fingerprint(snapshot: Path) -> str:
    """sha256 (16 hex digits) of every file of a student's state (`student_snapshot`, or a saved student directory):
    names and bytes. What identifies the policy a rollouts folder came from."""
    h = hashlib.sha256()
    files = [snapshot] if snapshot.is_file() else sorted(p for p in snapshot.rglob("*") if p.is_file())
    for path in files:
        h.update(str(path.relative_to(snapshot.parent if snapshot.is_file() else snapshot)).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:16]


def check_output(output: str | os.PathLike, inputs: list[tuple[str, str | os.PathLike | None]],
                 option: str = "--out") -> None:
    """Refuse an output directory that is, contains or is inside one of `inputs` ((what, path); None and URLs are
    skipped), compared by real path (symlinks, `./x`): writing there could overwrite an input (transformers'
    save_pretrained also deletes weight files it did not write) or mix outputs into it. Reads and writes nothing."""
    for what, path in inputs:
        if path is None or "://" in str(path):
            continue
        relation = overlap(str(output), str(path))
        if relation:
            raise ValueError(f"{option} {output} {relation} the {what} {path}: writing there could overwrite or "
                             f"clutter an input. Choose an {option} outside every input")


# TrainConfig fields that name the run rather than set it: always as given
_RUN_ITSELF = ("out", "resume")


def _comparable(name: str, value: object) -> object:
    """A setting's value as a resume compares it: paths by where they lead, stores with their weights in order."""
    if name == "store":
        paths, weights = parse_store_specs(list(value))
        return [(p if "://" in p else os.path.realpath(p), w) for p, w in zip(paths, weights, strict=True)]
    if name == "base":
        return os.path.realpath(value)
    if name == "layer_experts":
        return parse_layer_experts(value)
    return value


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def check_resume(run: str | os.PathLike, cfg: TrainConfig) -> None:
    """Refuse a `--resume` whose settings differ from those the run's newest checkpoint was trained with (its
    student's shape, the loss, the data, the optimizer), naming each with both values; also a --max-steps below
    the step reached. Settings whose help says they may change on --resume (`student.config.resumable`) may.
    Reads two small files, so a mistake costs no model load. A run without a checkpoint starts afresh: any
    setting goes. A setting the run's file does not record (the run is older than it) is not compared."""
    found = checkpoints(run)
    if not found:
        return
    newest = found[-1]
    source = newest if is_run(newest) else Path(run)  # checkpoints of earlier versions held no config
    if not is_run(source):
        return
    raw = json.loads((source / RUN_CONFIG).read_text())
    saved = TrainConfig.from_dict(raw)
    # a setting newer than the run is not in its file: its default need not be what the run did (the checkpoint's
    # own checks, such as the reader's, judge it)
    recorded = {_RENAMED.get(k, k) for k in raw}
    changed = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in _RUN_ITSELF or may_change_on_resume(f.name) or f.name not in recorded:
            continue
        was, now = getattr(saved, f.name), getattr(cfg, f.name)
        if _comparable(f.name, was) != _comparable(f.name, now):
            why = " (the stores of a mixture and their weights make its data order)" if f.name == "store" else ""
            changed.append(f"--{f.name.replace('_', '-')}: the run has {_shown(was)}, this command gives "
                           f"{_shown(now)}{why}")
    if changed:
        may = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig) if may_change_on_resume(f.name)]
        raise ValueError(f"cannot --resume {run} with other settings than it was trained with ({source / RUN_CONFIG}"
                         f"): {'; '.join(changed)}. Give the run's values, or train a new run (another --out); "
                         f"only {', '.join(may)} may change on --resume.")
    step = checkpoint_step(newest)
    if cfg.max_steps < step:
        raise ValueError(f"--max-steps {cfg.max_steps} is below step {step}, which {run} has reached ({newest}): "
                         f"give --max-steps {step} or more to resume it")


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
