"""What the benchmarks share: the teacher they measure."""

from __future__ import annotations

import os

from assets import default_cache
from assets.smollm2 import prepared_teacher_dir

SMOLLM2_DIR = prepared_teacher_dir()  # where `make teacher` puts SmolLM2


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
