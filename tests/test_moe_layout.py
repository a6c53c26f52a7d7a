"""The fused/compiled MoE-LoRA paths lay routed rows out ragged (a matmul loop per expert) or padded (batched
matmuls): both equal the autograd loop, gradients included, with and without LoRA dropout in eval."""

import pytest
import torch
from student_fixtures import randomize_adapters
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from student.fused_experts import padded_capacity
from student.moe_lora import MoELoRAMLP


@pytest.mark.parametrize("impl,max_padding", [("fused", 0.0), ("fused", 100.0), ("compiled", 100.0)])
def test_ragged_and_padded_layouts_match_the_loop(impl, max_padding):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=1))
    loop = MoELoRAMLP(mlp, num_experts=6, experts_per_token=2, rank=4, impl="loop")
    randomize_adapters(loop)
    fast = MoELoRAMLP(mlp, num_experts=6, experts_per_token=2, rank=4, impl=impl)
    fast.load_state_dict(loop.state_dict())
    fast.max_padding = max_padding
    x = torch.randn(3, 11, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = loop(xa), fast(xb)
    torch.testing.assert_close(yb, ya)
    (ya.square().sum() + loop.router_stats.balance).backward()
    (yb.square().sum() + fast.router_stats.balance).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for name, p in loop.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(dict(fast.named_parameters())[name].grad, p.grad, rtol=1e-4, atol=1e-5)


def test_padded_capacity():
    assert padded_capacity([500, 520, 510, 530], 1.3) == 536  # rounded up to 8, 5 % padding
    assert padded_capacity([10, 200, 10, 10], 1.3) is None  # unbalanced: the ragged loop
    assert padded_capacity([5, 5], 0.0) is None
