"""What the benchmarks share: the teacher they measure, running a CLI step as its node would, results."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from assets import default_cache
from assets.smollm2 import prepared_teacher_dir

SMOLLM2_DIR = prepared_teacher_dir()  # where `make teacher` puts SmolLM2
ROOT = Path(__file__).resolve().parents[1]


def teacher_dir() -> tuple[str, str]:
    """(folder, name): SmolLM2-135M-Instruct when `make teacher` has prepared it, else the tiny synthetic teacher."""
    if os.path.exists(os.path.join(SMOLLM2_DIR, "config.json")):
        return SMOLLM2_DIR, "SmolLM2-135M-Instruct"
    from assets.synthetic import make_tiny_teacher

    folder = os.path.join(default_cache(), "tiny-teacher")
    if not os.path.exists(os.path.join(folder, "config.json")):
        make_tiny_teacher(folder)
    print("SmolLM2 is not prepared (make teacher): using the tiny synthetic teacher")
    return folder, "tiny-llama (synthetic)"


def write_json(path: str, data) -> None:
    """Write a benchmark's results (creating the folder), and say where."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")


def cli(argv: list[str], log: dict, key: str, capture: bool = False) -> str | None:
    """Run one CLI command as its node would (a fresh process, so each vLLM engine is freed with it), echoed under
    `key` (which step, on which node); log[key] = its seconds. `capture`: return its stdout."""
    print(f"[{key}] python -m {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, check=True, capture_output=capture, text=True)
    log[key] = round(time.time() - start, 1)
    return done.stdout if capture else None


def complete_store(path: str | Path) -> bool:
    """Whether `path` holds a store whose build finished (a step to skip on a re-run)."""
    from logit_store import LogitStore
    from logit_store.format import MANIFEST_NAME

    if not os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return False
    return LogitStore.open(str(path)).manifest.status == "complete"
