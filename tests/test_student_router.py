"""Router losses: balance loss balances, stats are right under gradient checkpointing, usage is reported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from student_fixtures import randomize_adapters, sample_ids, save_tiny_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from student.config import MoELoRAConfig, RouterLossConfig
from student.convert import build_student, moe_modules
from student.moe_lora import MoELoRAMLP
from student.router_loss import count_only, expert_usage, router_losses, routing_weights, usage_imbalance


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", num_layers=2)



def _skewed_toy(balance_coef: float, steps: int = 60) -> tuple[float, float, list[float]]:
    """Fit a random target MLP with a router that starts sending most tokens to expert 0.
    Returns (imbalance before, imbalance after, balance-loss trace)."""
    torch.manual_seed(0)
    hidden, n_exp = 32, 8
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=64))
    layer = MoELoRAMLP(mlp, num_experts=n_exp, experts_per_token=2, rank=4)
    target = MoELoRAMLP(mlp, num_experts=n_exp, experts_per_token=2, rank=4)
    randomize_adapters(target, std=0.3, seed=5)
    direction = torch.randn(hidden)
    x = torch.randn(256, hidden) + 1.5 * direction / direction.norm()
    with torch.no_grad():
        layer.router.weight[0] = 2.0 * direction / direction.norm()
        layer.router.weight[1] = 1.0 * direction / direction.norm()
        y_target = target(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-2)
    trace, before = [], None
    for _ in range(steps):
        y = layer(x)
        stats = layer.router_stats
        usage = (stats.counts / stats.counts.sum()).tolist()
        before = usage_imbalance(usage) if before is None else before
        loss = F.mse_loss(y, y_target) + balance_coef * stats.balance
        trace.append(stats.balance.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        layer(x)
    counts = layer.router_stats.counts
    return before, usage_imbalance((counts / counts.sum()).tolist()), trace


def test_balance_loss_reduces_imbalance_on_toy_task(one_thread):
    before, after_plain, _ = _skewed_toy(balance_coef=0.0)
    before_b, after_bal, trace = _skewed_toy(balance_coef=3.0)
    assert before == before_b and before > 3.0  # the skewed start: expert 0 takes most of the load
    assert after_bal < 0.6 * before, f"balance loss left imbalance {after_bal:.2f} (start {before:.2f})"
    assert after_bal < after_plain - 0.5, (after_bal, after_plain)  # the task alone balances far less
    assert trace[-1] < 0.6 * trace[0]  # the loss itself fell towards 1.0 (perfect balance)


def test_balance_loss_is_one_when_uniform():
    layer = MoELoRAMLP(
        LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=16, num_attention_heads=1)),
        num_experts=4,
        experts_per_token=1,
    )
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities; topk ties pick expert 0 -> f = (1, 0, 0, 0)
    layer(torch.randn(10, 16))
    assert layer.router_stats.balance.item() == pytest.approx(1.0)  # 4 * (1 * 1/4)
    assert layer.router_stats.z.item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def _loss_and_grads(model, ids, checkpointing: bool):
    model.zero_grad()
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in moe_modules(model)]
    out = model(ids, labels=ids)
    aux = router_losses(model, RouterLossConfig(balance_coef=0.1, z_coef=0.01))
    (out.loss + aux.loss).backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return aux, grads, len(calls)


def test_router_losses_are_counted_once_under_gradient_checkpointing(llama_dir, one_thread):
    cfg = MoELoRAConfig(experts=4, rank=4)
    student = build_student(llama_dir, cfg)
    randomize_adapters(student)
    ids = sample_ids()
    aux_plain, grads_plain, calls_plain = _loss_and_grads(student, ids, checkpointing=False)
    aux_ckpt, grads_ckpt, calls_ckpt = _loss_and_grads(student, ids, checkpointing=True)
    assert calls_plain == 2 and calls_ckpt == 4  # checkpointing re-ran every MoE layer in backward ...
    torch.testing.assert_close(aux_ckpt.balance, aux_plain.balance)  # ... yet each is counted once
    torch.testing.assert_close(aux_ckpt.z, aux_plain.z)
    assert grads_plain.keys() == grads_ckpt.keys()
    assert any(".router." in n for n in grads_plain)
    for n in grads_plain:
        torch.testing.assert_close(grads_ckpt[n], grads_plain[n], rtol=1e-4, atol=1e-6)


def test_reentrant_checkpointing_is_refused_with_advice(llama_dir):
    student = build_student(llama_dir, MoELoRAConfig(experts=2, rank=4))
    student.train()
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    student(sample_ids())
    with pytest.raises(RuntimeError, match="use_reentrant"):
        router_losses(student)


def test_expert_usage_per_layer(llama_dir):
    student = build_student(llama_dir, MoELoRAConfig(experts=4, rank=4, layer_experts="1:3"))
    with torch.no_grad():
        student(sample_ids())
    usage = expert_usage(student)
    assert sorted(usage) == [0, 1]
    assert len(usage[0]) == 4 and len(usage[1]) == 3
    for fractions in usage.values():
        assert sum(fractions) == pytest.approx(1.0)


def test_padding_takes_no_part_in_router_stats(llama_dir, one_thread):
    student = build_student(llama_dir, MoELoRAConfig(experts=4, rank=4))
    randomize_adapters(student)
    row = sample_ids(batch=1, seq=16)
    ids = torch.cat([row, torch.cat([row[:, :9], torch.zeros(1, 7, dtype=row.dtype)], 1)])
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: the real tokens' activations do not depend on it

    def counts(x, m):
        count_only(student, m)
        with torch.no_grad():
            student(input_ids=x, attention_mask=m)
        return [mod.router_stats.counts.clone() for mod in moe_modules(student)]

    padded = counts(ids, mask)
    apart = [a + b for a, b in zip(counts(row, torch.ones_like(row)), counts(row[:, :9], torch.ones(1, 9)),
                                   strict=True)]
    for p, a in zip(padded, apart, strict=True):
        assert torch.equal(p, a) and int(p.sum()) == 25 * 2  # 25 real tokens x top-2, no padding counted


@pytest.mark.parametrize("k", [2, 4])
def test_routing_weights_are_the_mean_routing_weight_of_real_tokens(k):
    """Top-k: each token's renormalised top-k weights, zero elsewhere; soft (k = E): the router's softmax. Padding
    takes no part; every layer's weights sum to 1."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=1))
    layer = MoELoRAMLP(mlp, num_experts=4, experts_per_token=k)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(2, 12, 16)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    count_only(layer, mask)
    with torch.no_grad():
        layer(x)
    probs = F.linear(x.reshape(-1, 16), layer.router.weight).softmax(-1)[mask.reshape(-1).bool()]
    top = probs.topk(k, dim=-1)
    dense = torch.zeros_like(probs).scatter_(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    weights = routing_weights(layer)[0]
    assert weights == pytest.approx(dense.mean(0).tolist(), abs=1e-6)
    assert sum(weights) == pytest.approx(1.0)
    if k == 4:
        assert weights == pytest.approx(probs.mean(0).tolist(), abs=1e-6)
        assert expert_usage(layer)[0] == pytest.approx([0.25] * 4)  # the load says nothing under soft routing
