"""Save / load of MoE-LoRA students: exact round trip, base identity enforced."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from student_fixtures import randomize_adapters, sample_ids, save_tiny_model
from transformers import AutoModelForCausalLM

from student.config import MoELoRAConfig
from student.convert import build_student, fingerprint_model_dir
from student.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    BaseMismatchError,
    load_student,
    resolve_student_dir,
    save_student,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", num_layers=4)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_reproduces_logits_exactly(family, tmp_path, llama_dir):
    base_dir = llama_dir if family == "llama" else save_tiny_model(tmp_path / "gpt2", "gpt2")
    cfg = MoELoRAConfig(experts=4, rank=4, moe_layers="top-half", layer_experts="1:3", lora_dropout=0.1,
                        keep_layers="0,1,3" if family == "llama" else None)
    student = build_student(base_dir, cfg).eval()
    randomize_adapters(student)
    ids = sample_ids()
    ref = _logits(student, ids)
    assert not torch.equal(ref, _logits(AutoModelForCausalLM.from_pretrained(base_dir).eval(), ids)[:, :, :])

    out = save_student(student, tmp_path / "run" / "student", extra={"step": 7})
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["base"]["fingerprint"] == fingerprint_model_dir(base_dir)
    assert meta["extra"] == {"step": 7}
    assert (out / WEIGHTS_NAME).stat().st_size < sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))

    reloaded = load_student(tmp_path / "run")  # a run directory resolves to its student/
    assert torch.equal(ref, _logits(reloaded, ids))
    assert reloaded.kd_student.config == student.kd_student.config
    assert reloaded.kd_student.keep_layers == student.kd_student.keep_layers


def test_moved_base_loads_with_explicit_path(tmp_path, llama_dir):
    student = build_student(llama_dir, MoELoRAConfig(experts=2, rank=4)).eval()
    randomize_adapters(student)
    save_student(student, tmp_path / "s")
    moved = shutil.copytree(llama_dir, tmp_path / "moved")
    ids = sample_ids()
    assert torch.equal(_logits(student, ids), _logits(load_student(tmp_path / "s", base_path=moved), ids))


def test_different_base_is_refused(tmp_path, llama_dir):
    student = build_student(llama_dir, MoELoRAConfig(experts=2, rank=4))
    save_student(student, tmp_path / "s")
    other = save_tiny_model(tmp_path / "other", "llama", num_layers=4, seed=123)  # same shapes, other weights
    with pytest.raises(BaseMismatchError, match="fingerprint") as err:
        load_student(tmp_path / "s", base_path=other)
    assert str(llama_dir) in str(err.value) and str(other) in str(err.value)
    with pytest.raises(FileNotFoundError, match="base model of student"):
        load_student(tmp_path / "s", base_path=tmp_path / "nowhere")


def test_resolve_student_dir_picks_newest_checkpoint(tmp_path, llama_dir):
    student = build_student(llama_dir, MoELoRAConfig(experts=2, rank=4))
    save_student(student, tmp_path / "run" / "checkpoint-2")
    save_student(student, tmp_path / "run" / "checkpoint-10" / "student")
    assert resolve_student_dir(tmp_path / "run") == tmp_path / "run" / "checkpoint-10" / "student"
    with pytest.raises(FileNotFoundError, match="no saved student"):
        resolve_student_dir(tmp_path / "empty")


def test_student_without_base_reference_cannot_be_saved(tmp_path, llama_dir):
    from student.convert import convert_to_moe_lora

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    convert_to_moe_lora(model, MoELoRAConfig(experts=2, rank=4))
    with pytest.raises(ValueError, match="no base reference"):
        save_student(model, tmp_path / "s")


def test_base_fingerprint_sees_every_weight_byte(tmp_path):
    """The student's base check reads whole files; the teacher's cheap fingerprint samples their ends only."""
    from logit_store.fingerprint import model_fingerprint

    (tmp_path / "config.json").write_text("{}")
    blob = bytearray(3 << 20)
    (tmp_path / "model.safetensors").write_bytes(blob)
    exact, sampled = fingerprint_model_dir(tmp_path), model_fingerprint(str(tmp_path))
    blob[len(blob) // 2] = 1  # one byte in the middle, outside the sampled first and last MiB
    (tmp_path / "model.safetensors").write_bytes(blob)
    assert fingerprint_model_dir(tmp_path) != exact
    assert model_fingerprint(str(tmp_path)) == sampled
    blob[-1] = 1
    (tmp_path / "model.safetensors").write_bytes(blob)
    assert model_fingerprint(str(tmp_path)) != sampled
