"""Baselines: dense LoRA and full fine-tuning, parameter counts, and parameter matching against MoE-LoRA."""

from __future__ import annotations

import pytest
import torch
from student_fixtures import sample_ids, save_tiny_model
from transformers import AutoModelForCausalLM

from student.baselines import (
    build_dense_lora,
    build_full_finetune,
    count_parameters,
    matching_dense_lora_rank,
    moe_lora_trainable,
)
from student.config import MoELoRAConfig
from student.convert import build_student, load_base


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_counts_and_parameter_matching(family, tmp_path):
    base_dir = save_tiny_model(tmp_path / family, family, num_layers=3)
    cfg = MoELoRAConfig(experts=4, rank=8, moe_layers="top-half", layer_experts="2:3")
    student = build_student(base_dir, cfg)
    base, _ = load_base(base_dir)
    # The analytic count is what the built student really trains.
    assert moe_lora_trainable(base, cfg) == count_parameters(student).trainable

    rank, dense_count, moe_count = matching_dense_lora_rank(base, cfg)
    dense = build_dense_lora(base_dir, rank)
    assert count_parameters(dense).trainable == dense_count
    per_rank = dense_count // rank
    assert abs(dense_count - moe_count) <= per_rank / 2  # closest rank
    names = [n for n, p in dense.named_parameters() if p.requires_grad]
    assert any("mlp" in n for n in names) and any("attn" in n for n in names)
    assert all("lora_" in n for n in names)

    full = build_full_finetune(base_dir)
    assert count_parameters(full).trainable == count_parameters(full).total == count_parameters(base).total


def test_dense_lora_is_exact_at_init(tmp_path):
    base_dir = save_tiny_model(tmp_path / "llama", "llama")
    ids = sample_ids()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
        got = build_dense_lora(base_dir, rank=4).eval()(ids).logits
    assert torch.equal(want, got)
