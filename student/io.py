"""Save and reload MoE-LoRA students.

A saved student is a small directory: `student.json` (MoE-LoRA config, MoE layers, kept base layers, base
path and fingerprint) and `adapters.safetensors` (router and expert LoRA factors, attention LoRA), never the
frozen base. Reloading rebuilds the student on its base and refuses a base whose files differ from the one it
was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from student import run as runs
from student.config import MoELoRAConfig, student_spec
from student.convert import convert_to_moe_lora, fingerprint_model_dir, load_base
from student.moe_lora import MoELoRAMLP

STUDENT_FORMAT = "moekd-moe-lora-student"
STUDENT_FORMAT_VERSION = 1
CONFIG_NAME = "student.json"
WEIGHTS_NAME = "adapters.safetensors"


class BaseMismatchError(ValueError):
    """The base model offered for a saved student is not the one it was built on."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's own weights (routers, expert and attention LoRA factors) by parameter name."""
    moe_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, MoELoRAMLP)]
    out = {}
    for name, p in model.named_parameters():
        is_moe = any(name.startswith(pre) and not name.startswith(pre + "base.") for pre in moe_prefixes)
        if is_moe or ".lora_A." in name or ".lora_B." in name:
            out[name] = p.detach().to("cpu", torch.float32).contiguous()
    return out


def save_student(model: PreTrainedModel, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write student.json + adapters.safetensors to out_dir (created); `extra` is stored verbatim."""
    spec = student_spec(model)
    if not spec.base_path or not spec.base_fingerprint:
        raise ValueError(
            "the student has no base reference (path + fingerprint), so it could not be reloaded: "
            "build it with "
            "build_student(base_dir, ...) or set model.kd_student.base_path/base_fingerprint"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    meta = {
        "format": STUDENT_FORMAT,
        "format_version": STUDENT_FORMAT_VERSION,
        "config": spec.config.to_dict(),
        "moe_layers": spec.moe_layers,
        "experts": {str(m.layer_index): m.num_experts for m in model.modules() if isinstance(m, MoELoRAMLP)},
        "base": {
            "path": spec.base_path,
            "fingerprint": spec.base_fingerprint,
            "model_type": spec.model_type,
            "keep_layers": spec.keep_layers,
        },
        "num_adapter_params": sum(t.numel() for t in tensors.values()),
        "extra": extra or {},
    }
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": STUDENT_FORMAT})
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_student_meta(student_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(student_dir) / CONFIG_NAME
    meta = json.loads(path.read_text())
    if meta.get("format") != STUDENT_FORMAT:
        raise ValueError(f"{path} is not a MoE-LoRA student config (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > STUDENT_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {meta['format_version']}; this tool reads up to "
            f"{STUDENT_FORMAT_VERSION}: upgrade moekd"
        )
    return meta


def resolve_student_dir(path: str | os.PathLike) -> Path:
    """A student directory, or a run holding one (run/student, run/final/student, newest run/checkpoint-N)."""
    root = Path(path)
    candidates = [root, root / runs.STUDENT, root / runs.FINAL, runs.final_student_dir(root)]
    for c in reversed(runs.checkpoints(root)):
        candidates += [c, c / runs.STUDENT]
    for c in candidates:
        if (c / CONFIG_NAME).is_file():
            return c
    raise FileNotFoundError(
        f"no saved student under {root}: looked for {CONFIG_NAME} in it, in student/, final/ and checkpoint-N/"
    )


def load_student(
    student_dir: str | os.PathLike,
    base_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    check_fingerprint: bool = True,
) -> PreTrainedModel:
    """Rebuild a saved student on its base (the recorded path unless `base_path` is given)."""
    student_dir = resolve_student_dir(student_dir)
    meta = read_student_meta(student_dir)
    base = meta["base"]
    base_path = str(base_path or base["path"])
    if not Path(base_path, "config.json").is_file():
        raise FileNotFoundError(
            f"base model of student {student_dir} not found at {base_path}: pass the directory of "
            f"the base it was built on (fingerprint {base['fingerprint'][:16]}...) as base_path / --base"
        )
    fingerprint = fingerprint_model_dir(base_path) if check_fingerprint else base["fingerprint"]
    if fingerprint != base["fingerprint"]:
        raise BaseMismatchError(
            f"student {student_dir} was built on base {base['path']} "
            f"(fingerprint {base['fingerprint'][:16]}...), but {base_path} has fingerprint "
            f"{fingerprint[:16]}...: its config or weights differ. Load it against the original base "
            "model directory (base_path / --base)."
        )
    config = MoELoRAConfig.from_dict(meta["config"])
    if config.keep_layers is None and base["keep_layers"] is not None:  # saved before keep_layers was in the config
        config = dataclasses.replace(config, keep_layers=",".join(map(str, base["keep_layers"])))
    model, kept = load_base(base_path, keep=base["keep_layers"], dtype=dtype)
    convert_to_moe_lora(model, config)
    spec = student_spec(model)
    spec.base_path, spec.base_fingerprint, spec.keep_layers = os.path.abspath(base_path), fingerprint, kept
    tensors = load_file(str(student_dir / WEIGHTS_NAME))
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{student_dir / WEIGHTS_NAME} does not match the rebuilt student: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise ValueError(f"{name}: saved shape {tuple(t.shape)} != rebuilt {tuple(params[name].shape)}")
            params[name].copy_(t)
    model.eval()
    return model
