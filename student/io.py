"""Save and reload MoE-LoRA students.

A saved student is a small directory: `student.json` (MoE-LoRA config, MoE layers, kept base layers, base
path and fingerprint) and `adapters.safetensors` (routers, router selection biases, expert and shared-expert LoRA
factors, attention LoRA), never the frozen base. Reloading rebuilds the student on its base and refuses a base
whose files differ from the one it was trained on.

A student trained with `train_base` also holds its trained base weights (`base.safetensors`, every parameter
that is not an adapter, under the student's names). Its base directory then only supplies the architecture
(and tokenizer), so reloading checks the directory's config, not its weight bytes, and checks that
base.safetensors is the file that was saved (sha256).
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from student.distributed import DCP_DIR
from student.moe_lora import MoELoRAMLP

STUDENT_FORMAT = "moekd-moe-lora-student"
STUDENT_FORMAT_VERSION = 1
CONFIG_NAME = "student.json"
WEIGHTS_NAME = "adapters.safetensors"
BASE_WEIGHTS_NAME = "base.safetensors"  # the trained base of a `train_base` student
# config.json keys that do not change what a model computes (a base re-saved in another dtype or version)
_VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "_name_or_path")


class BaseMismatchError(ValueError):
    """The base model offered for a saved student is not the one it was built on."""


def _is_adapter(name: str, moe_prefixes: list[str]) -> bool:
    is_moe = any(name.startswith(pre) and not name.startswith(pre + "base.") for pre in moe_prefixes)
    return is_moe or ".lora_A." in name or ".lora_B." in name


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's own weights (routers and their selection biases, expert, shared-expert and attention LoRA
    factors) by parameter/buffer name."""
    moe_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, MoELoRAMLP)]
    out = {}
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if _is_adapter(name, moe_prefixes):
            out[name] = p.detach().to("cpu", torch.float32).contiguous()
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the student that is not an adapter (the base's weights), by name, in its own dtype."""
    moe_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, MoELoRAMLP)]
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if not _is_adapter(name, moe_prefixes)}


def config_fingerprint(path: str | os.PathLike) -> str:
    """Hash of a model directory's config.json without the keys that do not change what it computes: what a
    trained-base student needs of its base directory (the architecture)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    for key in _VOLATILE_CONFIG_KEYS:
        cfg.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


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
        "num_adapter_params": sum(t.numel() for n, t in tensors.items() if not n.endswith("router_bias")),
        "extra": extra or {},
    }
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": STUDENT_FORMAT})
    if spec.config.train_base:
        base_tensors = base_state_dict(model)
        save_file(base_tensors, str(out / BASE_WEIGHTS_NAME), metadata={"format": STUDENT_FORMAT})
        meta["trained_base"] = {"file": BASE_WEIGHTS_NAME, "sha256": _file_sha256(out / BASE_WEIGHTS_NAME),
                                "config_fingerprint": config_fingerprint(spec.base_path),
                                "num_params": sum(t.numel() for t in base_tensors.values())}
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
    """A student directory, or a run holding one: the student of the state `student.run.student_snapshot` names
    (the newest checkpoint; final/ when none is left), the one kdstudent eval and export read too; or
    run/student."""
    root = Path(path)
    for c in (root, root / runs.STUDENT):
        if (c / CONFIG_NAME).is_file():
            return c
    if runs.is_run(root) or runs.checkpoints(root) or (root / runs.FINAL).is_dir():
        snapshot = runs.student_snapshot(root)
        for c in (snapshot / runs.STUDENT, snapshot):  # a student directory saved as checkpoint-N itself
            if (c / CONFIG_NAME).is_file():
                return c
        if (snapshot / DCP_DIR).is_dir():
            why = ("it is an FSDP checkpoint written before the run's end, which keeps the weights sharded (dcp/): "
                   f"kdstudent eval and export read the run ({root}) itself, or resume the run to its end")
        else:
            why = "the run's student is not a MoE-LoRA student (--student lora/full): kdstudent eval reads the run"
        raise FileNotFoundError(f"no saved student in {snapshot}, the newest state of run {root}: {why}")
    raise FileNotFoundError(
        f"no saved student under {root}: looked for {CONFIG_NAME} in it, in student/, and in a run's newest "
        "checkpoint-N/ or final/"
    )


def load_student(
    student_dir: str | os.PathLike,
    base_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    check_fingerprint: bool = True,
) -> PreTrainedModel:
    """Rebuild a saved student on its base (the recorded path unless `base_path` is given).

    The base directory must be the one the student was built on (every config and weight byte), or, for a
    student with a trained base (base.safetensors), one with the same config.json."""
    student_dir = resolve_student_dir(student_dir)
    meta = read_student_meta(student_dir)
    base = meta["base"]
    trained = meta.get("trained_base")
    base_path = str(base_path or base["path"])
    if not Path(base_path, "config.json").is_file():
        raise FileNotFoundError(
            f"base model of student {student_dir} not found at {base_path}: pass the directory of "
            f"the base it was built on (fingerprint {base['fingerprint'][:16]}...) as base_path / --base"
        )
    if trained is not None:
        _check_trained_base(student_dir, trained, base_path, check_fingerprint)
        fingerprint = base["fingerprint"]  # provenance only: the directory's weights are replaced by the trained ones
    elif check_fingerprint:
        fingerprint = fingerprint_model_dir(base_path)
    else:
        fingerprint = base["fingerprint"]
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
    _copy_into(model, tensors, student_dir / WEIGHTS_NAME)
    if trained is not None:
        _copy_into(model, load_file(str(student_dir / trained["file"])), student_dir / trained["file"],
                   expected=base_state_dict(model))
    model.eval()
    return model


def _check_trained_base(student_dir: Path, trained: dict, base_path: str, check: bool) -> None:
    """A trained base's weights come from the student's own file: check it is the one saved, and that the base
    directory has the same architecture (config)."""
    path = student_dir / trained["file"]
    if not path.is_file():
        raise FileNotFoundError(f"student {student_dir} was trained with train_base, but its {trained['file']} "
                                "is missing: copy the whole student directory")
    if not check:
        return
    if _file_sha256(path) != trained["sha256"]:
        raise BaseMismatchError(f"{path} is not the trained base this student saved (sha256 differs): the file was "
                                "changed or replaced; restore it from the run's checkpoint")
    mine = config_fingerprint(base_path)
    if mine != trained["config_fingerprint"]:
        raise BaseMismatchError(
            f"student {student_dir} has a trained base whose architecture is {base_path}'s config as it was "
            f"(config fingerprint {trained['config_fingerprint']}), but {base_path}/config.json now has "
            f"{mine}: load it against a base directory with the original config.json (base_path / --base)"
        )


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path,
               expected: dict[str, torch.Tensor] | None = None) -> None:
    """Copy saved tensors into the rebuilt student's parameters/buffers of the same names. Router selection
    biases that students saved before they existed lack stay zero."""
    expected = adapter_state_dict(model) if expected is None else expected
    missing = sorted(n for n in set(expected) - set(tensors) if not n.endswith(".router_bias"))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the rebuilt student: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, t in tensors.items():
            if targets[name].shape != t.shape:
                raise ValueError(f"{source}: {name} has saved shape {tuple(t.shape)}, the rebuilt student "
                                 f"{tuple(targets[name].shape)}")
            targets[name].copy_(t)
