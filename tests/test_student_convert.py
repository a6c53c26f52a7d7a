"""Conversion of dense causal LMs into MoE-LoRA students: exact at init, correct math, right trainables."""

from __future__ import annotations

import pytest
import torch
from student_fixtures import (
    assert_layer_matches_loop,
    loop_and_fast_layers,
    randomize_adapters,
    sample_ids,
    save_tiny_model,
)
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from student.config import MoELoRAConfig, parse_layer_experts, parse_layers
from student.convert import build_student, convert_to_moe_lora, decoder_layers, moe_modules
from student.moe_lora import MoELoRAMLP, UnsupportedModelError


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", num_layers=4)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2", num_layers=2)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, llama_dir, gpt2_dir):
    dirs = {"llama": llama_dir, "gpt2": gpt2_dir}
    for family in ("mistral", "qwen2"):
        dirs[family] = save_tiny_model(tmp_path_factory.mktemp(family), family, num_layers=2)
    return dirs


@pytest.mark.parametrize(
    "family,moe_layers,impl",
    [
        ("llama", "all", "auto"),
        ("llama", "top-half", "loop"),
        ("mistral", "all", "auto"),
        ("qwen2", "bottom-half", "auto"),
        ("gpt2", "all", "auto"),
        ("gpt2", "top-half", "auto"),
    ],
)
def test_student_equals_base_bitwise_at_init(family, moe_layers, impl, family_dirs):
    path = family_dirs[family]
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    last = parse_layers(moe_layers, len(decoder_layers(base)))[-1]  # a per-layer expert count override
    cfg = MoELoRAConfig(
        experts=4, experts_per_token=2, rank=8, moe_layers=moe_layers, layer_experts=f"{last}:3", expert_impl=impl
    )
    student = build_student(path, cfg).eval()
    ids = sample_ids()
    assert torch.equal(_logits(base, ids), _logits(student, ids))
    n_layers = len(decoder_layers(base))
    assert [m.layer_index for m in moe_modules(student)] == parse_layers(moe_layers, n_layers)
    if family != "gpt2":  # no dropout in the Llama family: training mode is the same computation
        assert torch.equal(base.train()(ids).logits, student.train()(ids).logits)


def test_only_router_and_lora_are_trainable(llama_dir):
    student = build_student(llama_dir, MoELoRAConfig(experts=4, rank=4, attn_rank=4))
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable, "student has no trainable parameters"
    for n in trainable:
        assert any(key in n for key in ("router", "in_A", "in_B", "out_A", "out_B", "lora_A", "lora_B")), n
    assert not any(".mlp.base." in n for n in trainable)
    assert any(".self_attn.q_proj.lora_A" in n for n in trainable)
    layer = moe_modules(student)[0]
    assert layer.router.weight.dtype == torch.float32


def test_attention_lora_can_be_disabled(llama_dir):
    student = build_student(llama_dir, MoELoRAConfig(experts=2, rank=4, attn_rank=0))
    assert not any("lora_A" in n for n, _ in student.named_parameters())


def _reference_moe(layer: MoELoRAMLP, x: torch.Tensor) -> torch.Tensor:
    """Textbook MoE: run each token through each of its k experts as a full MLP with merged W + s*B@A."""
    mlp, s, r = layer.base, layer.scaling, layer.rank
    x2 = x.reshape(-1, x.shape[-1])
    probs = (x2.float() @ layer.router.weight.T).softmax(-1)
    w, idx = probs.topk(layer.experts_per_token, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        for j in range(layer.experts_per_token):
            e = idx[t, j]
            wg = mlp.gate_proj.weight + s * layer.in_B[e, 0].T @ layer.in_A[e, :r]
            wu = mlp.up_proj.weight + s * layer.in_B[e, 1].T @ layer.in_A[e, r:]
            wd = mlp.down_proj.weight + s * layer.out_B[e].T @ layer.out_A[e]
            a = mlp.act_fn(x2[t] @ wg.T) * (x2[t] @ wu.T)
            out[t] += w[t, j] * (a @ wd.T)
    return out.reshape(x.shape)


def test_moe_layer_matches_textbook_mixture():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48))
    layer = MoELoRAMLP(mlp, num_experts=5, experts_per_token=2, rank=4, alpha=8)
    randomize_adapters(layer)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference_moe(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "compiled", "grouped"])
def test_fast_paths_match_the_autograd_loop(impl):
    """The fused CPU kernel and the grouped-GEMM path (used on CUDA) must compute what the autograd
    per-expert loop computes, gradients included."""
    loop, fast = loop_and_fast_layers(impl)
    x = torch.randn(3, 11, 32)
    assert_layer_matches_loop(loop, fast, x)


@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_fused_path_with_lora_dropout_trains_and_is_exact_in_eval(impl):
    loop, fused = loop_and_fast_layers(impl, num_experts=4, lora_dropout=0.3)
    x = torch.randn(2, 9, 32)
    y = fused.train()(x.requires_grad_())
    y.square().sum().backward()
    assert torch.isfinite(fused.out_A.grad).all() and fused.out_A.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), loop.eval()(x))


def test_gradients_reach_every_expert_parameter():
    torch.manual_seed(0)
    layer = MoELoRAMLP(LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64)), num_experts=4, rank=4)
    randomize_adapters(layer)
    layer(torch.randn(4, 16, 32)).square().mean().backward()
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in layer.base.parameters())


def test_keep_layers_builds_smaller_student_that_generates(llama_dir):
    student = build_student(llama_dir, MoELoRAConfig(experts=2, rank=4, keep_layers="::2")).eval()
    assert student.config.num_hidden_layers == 2
    assert student.kd_student.keep_layers == [0, 2]
    # The kept blocks are the teacher's blocks 0 and 2, and the KV cache is indexed consistently.
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir)
    kept_q = decoder_layers(student)[1].self_attn.q_proj.base_layer.weight
    assert torch.equal(kept_q, decoder_layers(teacher)[2].self_attn.q_proj.weight)
    ids = sample_ids(batch=1, seq=8)
    out = student.generate(ids, max_new_tokens=5, do_sample=False)
    full = _logits(student, out[:, :-1])
    assert torch.equal(full[0, ids.shape[1] - 1 :].argmax(-1), out[0, ids.shape[1] :])


def test_parse_layer_specs():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("top-half", 6) == [3, 4, 5]
    assert parse_layers("bottom-half", 6) == [0, 1, 2]
    assert parse_layers("::2", 5) == [0, 2, 4]
    assert parse_layers("1::2", 5) == [1, 3]
    assert parse_layers("0,2-3,-1", 6) == [0, 2, 3, 5]
    assert parse_layers("none", 3) == []
    assert parse_layer_experts("0:4, 3:16") == {0: 4, 3: 16}
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("7", 4)


def test_unsupported_models_get_clear_errors(llama_dir):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="gate_proj"):
        MoELoRAMLP(Odd())
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="not MoE layers"):
        convert_to_moe_lora(model, MoELoRAConfig(moe_layers="0", layer_experts="1:4"))
    with pytest.raises(ValueError, match="experts_per_token"):
        MoELoRAMLP(
            LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=8, num_attention_heads=1)),
            num_experts=2,
            experts_per_token=3,
        )
