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

The trainer writes these (student/train.py); the readers (load_trained, student.io, plots, the CLI) find them here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from student.config import TrainConfig

RUN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
TRAINABLE = "trainable.safetensors"  # in a checkpoint: the trainable parameters by name
TRAIN_STATE = "train_state.pt"  # in a checkpoint: step, optimizer, scheduler, reader and RNG states per rank
STUDENT = "student"  # a saved MoE-LoRA student inside a checkpoint or final/
FINAL = "final"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run (it holds a train_config.json)."""
    return (Path(path) / RUN_CONFIG).is_file()


def checkpoint_dir(run: str | os.PathLike, step: int) -> Path:
    return Path(run) / f"checkpoint-{step}"


def temp_checkpoint_dir(run: str | os.PathLike, step: int) -> Path:
    """Where checkpoint `step` is written before it is renamed into place."""
    return Path(run) / f".tmp-checkpoint-{step}"


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


def truncate_metrics(run: str | os.PathLike, step: int) -> None:
    """Drop the records after `step` (what a crashed run logged after the checkpoint it resumes from)."""
    path = Path(run) / METRICS
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(run) if r["step"] <= step))
