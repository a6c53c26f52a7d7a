"""The GPU fast path of the MoE-LoRA layer: grouped GEMM = autograd loop, no host sync, reachable under bf16.

The CPU tests run wherever `torch._grouped_mm` exists on CPU (torch >= 2.9); the CUDA tests run when a GPU is
present (CI has none: they skip).
"""

import pytest
import torch
from student_fixtures import randomize_adapters
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from student.moe_lora import MoELoRAMLP

HAS_CPU_GROUPED = hasattr(torch, "_grouped_mm")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pair(dtype=torch.float32, device="cpu", hidden=64, inter=128, experts=6, rank=8):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=1))
    loop = MoELoRAMLP(mlp, num_experts=experts, experts_per_token=2, rank=rank, impl="loop")
    randomize_adapters(loop)
    grouped = MoELoRAMLP(mlp, num_experts=experts, experts_per_token=2, rank=rank, impl="grouped")
    grouped.load_state_dict(loop.state_dict())
    mlp.to(device=device, dtype=dtype)  # the frozen base in `dtype`; adapters and routers stay fp32
    loop.to(device)
    grouped.to(device)
    return loop, grouped


def _fwd_bwd(layer, x):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y.float().square().sum() + layer.router_stats.balance).backward()
    return y, x.grad, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}


def _compare(loop, grouped, x, rtol, atol):
    ya, xa, ga = _fwd_bwd(loop, x)
    yb, xb, gb = _fwd_bwd(grouped, x)
    torch.testing.assert_close(yb.float(), ya.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(xb.float(), xa.float(), rtol=rtol, atol=atol)
    for name, g in ga.items():
        scale = g.abs().max().item()  # gradients of summed losses: compare relative to their magnitude
        torch.testing.assert_close(gb[name] / scale, g / scale, rtol=rtol, atol=atol, msg=name)


def test_router_logits_are_fp32_under_autocast():
    loop, _ = _pair()
    x = torch.randn(50, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights, _ = loop.route(x)
        assert logits.dtype == weights.dtype == loop.router_stats.balance.dtype == torch.float32
    ref, _, _ = loop.route(x)
    torch.testing.assert_close(logits, ref)


@pytest.mark.skipif(not HAS_CPU_GROUPED, reason="torch._grouped_mm is not available")
def test_grouped_path_matches_the_loop_on_cpu_fp32():
    loop, grouped = _pair()
    _compare(loop, grouped, torch.randn(3, 11, 64), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_CPU_GROUPED, reason="torch._grouped_mm is not available")
def test_grouped_path_matches_the_loop_on_a_bf16_base_on_cpu():
    """bf16 activations from a bf16 base (as with --base_dtype bfloat16); on CPU both paths run the LoRA
    products in the adapters' fp32, so they differ only by the order of bf16 roundings: 2e-2 relative."""
    loop, grouped = _pair(torch.bfloat16)
    x = torch.randn(3, 11, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _compare(loop, grouped, x, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not HAS_CPU_GROUPED, reason="torch._grouped_mm is not available")
def test_grouped_path_makes_no_host_sync(monkeypatch):
    """No `.tolist()`/`.item()` (each a GPU -> host wait on CUDA) in its forward or backward."""
    _, grouped = _pair()
    x = torch.randn(2, 9, 64, requires_grad=True)

    def boom(*_a, **_k):
        raise AssertionError("host sync in the grouped path")

    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "item", boom)
    y = grouped(x)
    (y.square().sum() + grouped.router_stats.balance).backward()
    monkeypatch.undo()
    assert grouped.in_A.grad is not None and grouped.in_A.grad.abs().sum().item() > 0


@cuda
def test_resolve_impl_picks_grouped_on_cuda_under_bf16():
    _, layer = _pair(device="cuda")
    layer.impl = "auto"
    assert layer.resolve_impl(torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)) == "grouped"
    assert layer.resolve_impl(torch.randn(4, 64, device="cuda")) == "loop"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert layer.resolve_impl(torch.randn(4, 64, device="cuda")) == "grouped"


@cuda
def test_grouped_path_matches_the_loop_on_cuda_bf16():
    """On CUDA the grouped GEMM computes the LoRA products in bf16 while the loop computes them in fp32:
    agreement to bf16 precision, 3e-2 relative (outputs and gradients, relative to their largest entry)."""
    loop, grouped = _pair(torch.bfloat16, "cuda", hidden=576, inter=1536, experts=8, rank=16)
    x = torch.randn(4, 128, 576, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _compare(loop, grouped, x, rtol=3e-2, atol=3e-2)


@cuda
def test_grouped_path_makes_no_host_sync_on_cuda():
    _, grouped = _pair(torch.bfloat16, "cuda", hidden=576, inter=1536, experts=8, rank=16)
    x = torch.randn(4, 128, 576, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grouped(x)  # warm-up (lazy initialisations may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = grouped(x)
        (y.float().square().sum() + grouped.router_stats.balance).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kind", ["moe-lora", "lora"])
def test_a_bf16_base_keeps_adapters_and_routers_in_fp32(tiny_teacher_dir, tmp_path, kind):
    from student.train import TrainConfig, build_model

    model = build_model(TrainConfig(store="-", base=tiny_teacher_dir, out=str(tmp_path), student=kind, rank=8,
                                    base_dtype="bfloat16", bf16=True))
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert any(".lora_A." in n for n in trainable)  # peft's attention LoRA too


def test_bf16_base_refusals(tiny_teacher_dir, tmp_path):
    from student.train import TrainConfig, TrainError, build_model

    with pytest.raises(TrainError, match="master weights"):
        build_model(TrainConfig(store="-", base=tiny_teacher_dir, out=str(tmp_path), student="full",
                                base_dtype="bfloat16", bf16=True))
    with pytest.raises(TrainError, match="--bf16"):
        build_model(TrainConfig(store="-", base=tiny_teacher_dir, out=str(tmp_path), base_dtype="bfloat16"))
