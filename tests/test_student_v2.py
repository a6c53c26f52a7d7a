"""MoE-LoRA student v2 (issue 15): rsLoRA scaling, the shared expert, routing that cannot quietly collapse
(fp32 router, Mixtral's balance loss, router-bias balancing, soft routing, router LR, routing metrics), a trained
base, and the fused expert kernels on every supported gate activation."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from store_fixtures import write_teacher_store
from student_fixtures import randomize_adapters, sample_ids, save_tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from student.baselines import build_dense_lora, count_parameters, moe_lora_trainable
from student.config import MoELoRAConfig, TrainConfig
from student.convert import build_student, decoder_layers, load_base, moe_modules
from student.export import UnsupportedExportError, export_student, to_mixtral
from student.io import BASE_WEIGHTS_NAME, CONFIG_NAME, BaseMismatchError, load_student, save_student
from student.moe_lora import MoELoRAMLP, UnsupportedModelError
from student.router_loss import (
    count_only,
    effective_experts,
    router_losses,
    routing_metrics,
    update_router_bias,
    usage_imbalance,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", num_layers=3)



def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _randomize_shared(model: torch.nn.Module, std: float = 0.05, seed: int = 2) -> None:
    """Non-zero shared-expert B factors (randomize_adapters leaves them at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in moe_modules(model) if not isinstance(model, MoELoRAMLP) else [model]:
            for p in (m.shared_in_B, m.shared_out_B):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _perturb_base(model: torch.nn.Module, std: float = 0.02, seed: int = 3) -> None:
    """Stand-in for --train_base: move every trainable weight that is not an adapter."""
    g = torch.Generator().manual_seed(seed)
    adapters = ("router", "in_A", "in_B", "out_A", "out_B", "lora_")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(a in name for a in adapters):
                p.add_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------- 1. LoRA scaling
def test_rslora_scales_every_lora_by_alpha_over_sqrt_rank(llama_dir):
    cfg = MoELoRAConfig(experts=2, rank=16, attn_rank=4, shared_expert_rank=9, lora_scaling="rslora")
    assert (cfg.alpha, cfg.attn_alpha, cfg.shared_expert_alpha) == (32.0, 8.0, 18.0)  # the one rule: 2 × rank
    student = build_student(llama_dir, cfg)
    layer = moe_modules(student)[0]
    assert layer.scaling == 32 / 4 and layer.shared_scaling == 18 / 3
    assert decoder_layers(student)[0].self_attn.q_proj.scaling["default"] == 8 / 2
    dense = build_dense_lora(llama_dir, rank=16, lora_scaling="rslora")
    assert decoder_layers(dense)[0].mlp.up_proj.scaling["default"] == 32 / 4
    standard = build_student(llama_dir, MoELoRAConfig(experts=2, rank=16, attn_rank=4, shared_expert_rank=9))
    assert moe_modules(standard)[0].scaling == 2.0 and moe_modules(standard)[0].shared_scaling == 2.0
    assert decoder_layers(standard)[0].self_attn.q_proj.scaling["default"] == 2.0
    with pytest.raises(ValueError, match="lora_scaling"):
        MoELoRAConfig(lora_scaling="sqrt")


def test_rslora_layer_computes_standard_layer_with_alpha_times_sqrt_rank(one_thread):
    """The scale is all that differs: rsLoRA at alpha equals standard scaling at alpha·√r (forward and grads)."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48))
    rs = MoELoRAMLP(mlp, num_experts=3, rank=9, alpha=6, lora_scaling="rslora", shared_rank=4, shared_alpha=2,
                    impl="loop")
    randomize_adapters(rs)
    _randomize_shared(rs)
    std = MoELoRAMLP(mlp, num_experts=3, rank=9, alpha=6 * 3, lora_scaling="standard", shared_rank=4, shared_alpha=4,
                     impl="loop")
    std.load_state_dict(rs.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(rs(x), std(x))
    assert (rs(x) - mlp(x)).abs().max() > 0.01  # the adapters are not zero


# ---------------------------------------------------------------- 2. shared expert
def _reference(layer: MoELoRAMLP, x: torch.Tensor) -> torch.Tensor:
    """Textbook MoE with a shared expert: every token's k experts as full MLPs with W + s'B'A' + s B_e A_e."""
    mlp, s, r, s2, r2 = layer.base, layer.scaling, layer.rank, layer.shared_scaling, layer.shared_rank
    x2 = x.reshape(-1, x.shape[-1])
    probs = (x2.float() @ layer.router.weight.T).softmax(-1)
    w, idx = probs.topk(layer.experts_per_token, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    sg = mlp.gate_proj.weight + s2 * layer.shared_in_B[0].T @ layer.shared_in_A[:r2]
    su = mlp.up_proj.weight + s2 * layer.shared_in_B[1].T @ layer.shared_in_A[r2:]
    sd = mlp.down_proj.weight + s2 * layer.shared_out_B.T @ layer.shared_out_A
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        for j in range(layer.experts_per_token):
            e = idx[t, j]
            wg = sg + s * layer.in_B[e, 0].T @ layer.in_A[e, :r]
            wu = su + s * layer.in_B[e, 1].T @ layer.in_A[e, r:]
            wd = sd + s * layer.out_B[e].T @ layer.out_A[e]
            out[t] += w[t, j] * ((mlp.act_fn(x2[t] @ wg.T) * (x2[t] @ wu.T)) @ wd.T)
    return out.reshape(x.shape)


def test_shared_expert_is_part_of_every_expert():
    torch.manual_seed(0)
    layer = MoELoRAMLP(LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48)), num_experts=5, rank=4,
                       shared_rank=6, impl="loop")
    randomize_adapters(layer)
    _randomize_shared(layer)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_expert_and_soft_routing_are_exact_at_init(family, tmp_path, llama_dir):
    base_dir = llama_dir if family == "llama" else save_tiny_model(tmp_path / "gpt2", "gpt2")
    ids = sample_ids()
    want = _logits(AutoModelForCausalLM.from_pretrained(base_dir).eval(), ids)
    for cfg in (MoELoRAConfig(experts=4, rank=4, shared_expert_rank=8, lora_scaling="rslora"),
                MoELoRAConfig(experts=3, experts_per_token=3, rank=4, shared_expert_rank=2)):
        student = build_student(base_dir, cfg).eval()
        assert torch.equal(want, _logits(student, ids))
        count = count_parameters(student).trainable
        assert count == moe_lora_trainable(load_base(base_dir)[0], cfg)  # the shared expert is counted
    assert any("shared_in_A" in n for n, p in student.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- 3. routing
def test_router_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = MoELoRAMLP(LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=64)), num_experts=8)
    x = torch.randn(1000, 64)
    ref_logits, ref_w, ref_i = layer.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, w, i = layer.route(x)
        layer(x.unsqueeze(0))
    assert logits.dtype == w.dtype == torch.float32
    assert torch.equal(i, ref_i) and torch.equal(w, ref_w) and torch.equal(logits, ref_logits)
    assert layer.router_stats.prob_sum.dtype == torch.float32


def test_a_student_cast_to_bf16_still_routes_in_fp32(llama_dir):
    """model.to(bfloat16) (inference, a Trainer's bf16 eval) casts the routers too: routing still runs in fp32 on
    the same weights, and picks the experts the fp32 student picks for the same (bf16-rounded) input."""
    torch.manual_seed(0)
    student = build_student(llama_dir, MoELoRAConfig(experts=4, rank=4))
    layer = moe_modules(student)[0]
    x = torch.randn(50, layer.hidden_size).bfloat16()
    ref = layer.route(x.float())
    student.to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.bfloat16
    logits, w, i = layer.route(x)
    assert logits.dtype == torch.float32 and torch.equal(i, ref[2])
    torch.testing.assert_close(logits, ref[0], atol=0.05, rtol=0.02)  # the weights themselves are bf16 now
    assert torch.isfinite(student(input_ids=sample_ids(batch=1, seq=8)).logits).all()


@pytest.mark.parametrize("k,padded", [(2, True), (1, False)])
def test_balance_loss_is_transformers_mixtral_loss(llama_dir, k, padded, one_thread):
    """Pooled over layers before the product, f over all k slots, padding excluded: Mixtral's function."""
    student = build_student(llama_dir, MoELoRAConfig(experts=4, experts_per_token=k, rank=4))
    randomize_adapters(student)
    ids = sample_ids(batch=2, seq=12)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 7:] = 0
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append((mod, a[0]))) for m in moe_modules(student)]
    count_only(student, mask)
    student(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    logits = tuple(F.linear(x.reshape(-1, x.shape[-1]).float(), m.router.weight) for m, x in inputs)
    assert len(logits) == 3
    want = load_balancing_loss_func(logits, 4, k, mask if padded else None)
    got = router_losses(student)
    torch.testing.assert_close(got.balance, want)
    assert got.balance.requires_grad
    torch.testing.assert_close(got.loss, 0.01 * want)  # the default coefficient, Mixtral's meaning


def test_export_records_the_coefficient_and_mixtral_computes_the_same_aux_loss(llama_dir, tmp_path):
    student = build_student(llama_dir, MoELoRAConfig(experts=4, rank=4)).eval()
    randomize_adapters(student)
    mixtral = AutoModelForCausalLM.from_pretrained(export_student(student, tmp_path / "mx", balance_coef=0.02)).eval()
    assert mixtral.config.router_aux_loss_coef == 0.02
    ids = sample_ids(batch=2, seq=12)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    count_only(student, mask)
    with torch.no_grad():
        student(input_ids=ids, attention_mask=mask)
        balance = router_losses(student).balance
        aux = mixtral(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(balance, aux)


def _skewed_layer() -> tuple[MoELoRAMLP, torch.Tensor]:
    torch.manual_seed(0)
    layer = MoELoRAMLP(LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64)), num_experts=8, rank=4,
                       router_init_std=0.3, impl="loop")
    direction = torch.randn(32)
    x = torch.randn(512, 32) + 1.5 * direction / direction.norm()
    with torch.no_grad():
        layer.router.weight[0] = 2.0 * direction / direction.norm()
        layer.router.weight[1] = 1.0 * direction / direction.norm()
    return layer, x


def _imbalance(layer: MoELoRAMLP, x: torch.Tensor) -> float:
    with torch.no_grad():
        layer(x)
    c = layer.router_stats.counts
    return usage_imbalance((c / c.sum()).tolist())


def test_router_bias_moves_selection_towards_balance_without_touching_the_weights(one_thread):
    layer, x = _skewed_layer()
    before = _imbalance(layer, x)
    counts = layer.router_stats.counts.float()
    update_router_bias(layer, 0.01)
    assert torch.equal(layer.router_bias, 0.01 * torch.sign(counts.mean() - counts))  # + under-, - overloaded
    trace = [before]
    for _ in range(100):
        trace.append(_imbalance(layer, x))
        update_router_bias(layer, 0.01)
    assert before > 3.0 and max(trace[-10:]) < 1.3, (before, trace[-10:])
    assert sum(trace[-10:]) < sum(trace[:10]) / 2
    logits, w, i = layer.route(x)
    probs = logits.softmax(-1)
    assert not torch.equal(i, probs.topk(2).indices)  # the bias changed which experts are picked ...
    picked = probs.gather(1, i)
    torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True))  # ... but not how they are weighted


def test_soft_routing_runs_every_expert_batched_and_equals_top_k_dispatch(monkeypatch):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48))
    soft = MoELoRAMLP(mlp, num_experts=4, experts_per_token=4, rank=4, shared_rank=3)
    randomize_adapters(soft)
    _randomize_shared(soft)
    dispatch = MoELoRAMLP(mlp, num_experts=4, experts_per_token=4, rank=4, shared_rank=3, impl="loop")
    dispatch.load_state_dict(soft.state_dict())
    calls = []
    original = MoELoRAMLP._soft_experts
    monkeypatch.setattr(MoELoRAMLP, "_soft_experts", lambda self, *a: calls.append(1) or original(self, *a))
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: pytest.fail("soft routing must not dispatch"))
    x = torch.randn(3, 6, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = soft(xa)
    monkeypatch.undo()
    yb = dispatch(xb)
    assert calls == [1]
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for name, p in soft.named_parameters():
        torch.testing.assert_close(p.grad, dict(dispatch.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)
    assert routing_metrics(soft)[0]["effective_experts"] == pytest.approx(4.0)  # every expert on every token


def test_routing_metrics(one_thread):
    assert effective_experts([0.25] * 4) == pytest.approx(4.0)
    assert effective_experts([1.0, 0, 0, 0]) == pytest.approx(1.0)
    layer = MoELoRAMLP(LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=16, num_attention_heads=1)),
                       num_experts=4, impl="loop")
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities: top-2 weights 0.5 / 0.5
        layer(torch.randn(10, 16))
    assert routing_metrics(layer) == {0: {"effective_experts": pytest.approx(2.0),  # experts 0 and 1 take all
                                          "effective_experts_per_token": pytest.approx(2.0)}}
    skewed, x = _skewed_layer()
    with torch.no_grad():
        skewed(x)
    r, load = routing_metrics(skewed)[0], skewed.router_stats.counts.double() / skewed.router_stats.counts.sum()
    assert r["effective_experts"] == pytest.approx(math.exp(-(load * load.log()).sum().item()))
    assert 1.0 < r["effective_experts"] < 7.0 and 1.0 < r["effective_experts_per_token"] < 2.0


# ---------------------------------------------------------------- 4. trained base
def test_trained_base_round_trip_and_base_checks(llama_dir, tmp_path):
    cfg = MoELoRAConfig(experts=4, rank=4, shared_expert_rank=4, keep_layers="0,2", train_base=True)
    student = build_student(llama_dir, cfg).eval()
    assert all(p.requires_grad for p in student.parameters())
    assert count_parameters(student).trainable == moe_lora_trainable(load_base(llama_dir, keep="0,2")[0], cfg)
    randomize_adapters(student)
    _randomize_shared(student)
    _perturb_base(student)
    with torch.no_grad():
        moe_modules(student)[0].router_bias.copy_(torch.tensor([0.1, -0.1, 0.0, 0.05]))
    ids = sample_ids()
    ref = _logits(student, ids)
    out = save_student(student, tmp_path / "s")
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["trained_base"]["file"] == BASE_WEIGHTS_NAME and (out / BASE_WEIGHTS_NAME).is_file()
    reloaded = load_student(out)
    assert torch.equal(ref, _logits(reloaded, ids))
    assert torch.equal(moe_modules(reloaded)[0].router_bias, moe_modules(student)[0].router_bias)
    # the base directory only gives the architecture: another base with the same config works ...
    other = save_tiny_model(tmp_path / "other", "llama", num_layers=3, seed=123)
    assert torch.equal(ref, _logits(load_student(out, base_path=other), ids))
    # ... one with another config does not
    wider = save_tiny_model(tmp_path / "wider", "llama", num_layers=3, intermediate_size=96)
    with pytest.raises(BaseMismatchError, match="config"):
        load_student(out, base_path=wider)
    tensors = load_file(str(out / BASE_WEIGHTS_NAME))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, str(out / BASE_WEIGHTS_NAME))
    with pytest.raises(BaseMismatchError, match="sha256"):
        load_student(out)


def test_export_merges_trained_base_shared_expert_and_rslora(llama_dir, tmp_path):
    cfg = MoELoRAConfig(experts=4, rank=4, shared_expert_rank=4, lora_scaling="rslora", train_base=True,
                        moe_layers="0,2")
    student = build_student(llama_dir, cfg).eval()
    randomize_adapters(student)
    _randomize_shared(student)
    _perturb_base(student)
    save_student(student, tmp_path / "run" / "student")
    out = export_student(tmp_path / "run", tmp_path / "mx")
    ids = sample_ids(batch=2, seq=16)
    got = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids)
    assert (got - _logits(student, ids)).abs().max().item() < 1e-4
    assert json.loads((out / "moekd_export.json").read_text())["trained_base"] is True


def test_export_refuses_a_router_bias_unless_dropped(llama_dir, tmp_path):
    student = build_student(llama_dir, MoELoRAConfig(experts=4, rank=4)).eval()
    randomize_adapters(student)
    unbiased = to_mixtral(student)
    with torch.no_grad():
        moe_modules(student)[1].router_bias.copy_(torch.tensor([0.25, 0.0, -0.5, 0.0]))
    with pytest.raises(UnsupportedExportError, match="drop-router-bias"):
        export_student(student, tmp_path / "mx")
    out = export_student(student, tmp_path / "mx", drop_router_bias=True)
    assert json.loads((out / "moekd_export.json").read_text())["dropped_router_bias"] == {"1": [0.25, 0.0, -0.5, 0.0]}
    ids = sample_ids()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids), _logits(unbiased, ids))


# ---------------------------------------------------------------- 5. fused kernels: the base MLP's activation
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_every_expert_path_computes_the_mlps_own_activation(act):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act=act))
    x = torch.randn(3, 11, 32)
    for impl in ("fused", "compiled", "grouped"):  # exact at init, like the loop
        with torch.no_grad():
            assert torch.equal(MoELoRAMLP(mlp, num_experts=6, rank=4, shared_rank=3, impl=impl)(x), mlp(x)), impl
    loop = MoELoRAMLP(mlp, num_experts=6, rank=4, shared_rank=3, impl="loop")
    randomize_adapters(loop, std=0.3)
    _randomize_shared(loop, std=0.3)
    mlp.requires_grad_(True)  # as under --train_base: the base's own weights get gradients too
    xa = x.clone().requires_grad_()
    ya = loop(xa)
    ya.square().sum().backward()
    want = {n: p.grad.clone() for n, p in loop.named_parameters()}
    assert (ya - mlp(x)).abs().max() > 0.1  # the adapters matter
    for impl in ("fused", "compiled", "grouped"):
        fast = MoELoRAMLP(mlp, num_experts=6, rank=4, shared_rank=3, impl=impl)
        fast.load_state_dict(loop.state_dict())
        mlp.requires_grad_(True).zero_grad()
        xb = x.clone().requires_grad_()
        yb = fast(xb)
        torch.testing.assert_close(yb, ya, msg=lambda m, impl=impl: f"{impl}: {m}")
        yb.square().sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
        got = dict(fast.named_parameters())
        assert want.keys() == got.keys() and any(n.startswith("base.") for n in want)
        for name, grad in want.items():
            torch.testing.assert_close(got[name].grad, grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_paths_refuse_activations_they_do_not_compute(tmp_path):
    relu = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=16, num_attention_heads=1, hidden_act="relu"))
    for impl in ("fused", "compiled"):
        with pytest.raises(UnsupportedModelError, match="ReLU.*'loop'"):
            MoELoRAMLP(relu, num_experts=2, impl=impl)
    assert MoELoRAMLP(relu, num_experts=2).resolve_impl(torch.zeros(1, 16)) == "loop"
    gelu = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=16, num_attention_heads=1,
                                hidden_act="gelu_pytorch_tanh"))
    assert MoELoRAMLP(gelu, num_experts=2).resolve_impl(torch.zeros(1, 16)) in ("compiled", "loop")
    gpt2 = save_tiny_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2 MLP"):
        build_student(gpt2, MoELoRAConfig(experts=2, rank=4, expert_impl="fused"))


# ---------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def store(tiny_teacher_dir, tmp_path_factory):
    return write_teacher_store(str(tmp_path_factory.mktemp("v2_store")), tiny_teacher_dir, 24, 32, rows_per_batch=2)


def _cfg(store, base, out, **kw) -> TrainConfig:
    defaults = dict(keep_layers="0", experts=4, rank=4, attn_rank=4, batch_size=4, max_steps=4, lr=3e-3,
                    warmup_steps=1, log_every=1, progress=False, seed=1)
    defaults.update(kw)
    return TrainConfig(store=store, base=base, out=str(out), **defaults)


def test_v2_student_trains_resumes_saves_and_reloads(store, tiny_teacher_dir, tmp_path):
    """shared expert + rsLoRA + router-bias balancing + trained base, with the routers held still by
    --router_lr_scale 0: the run logs routing metrics, moves the biases and the base, resumes bit for bit."""
    from student.run import read_metrics
    from student.train import load_trained, param_groups, train

    v2 = dict(shared_expert_rank=8, lora_scaling="rslora", router_bias_update=0.001, train_base=True,
              router_lr_scale=0.0, eval_store=store, eval_rows=8)
    full = tmp_path / "full"
    train(_cfg(store, tiny_teacher_dir, full, save_every=2, keep_checkpoints=5, **v2))
    records = read_metrics(full)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert set(steps[-1]["routing"]["0"]) == {"effective_experts", "effective_experts_per_token"}
    assert 1.0 <= steps[-1]["routing"]["0"]["effective_experts"] <= 4.0
    assert set(records[-1]["eval"]["routing"]["0"]) == {"effective_experts", "effective_experts_per_token"}

    initial = build_student(tiny_teacher_dir, _cfg(store, tiny_teacher_dir, full, **v2).student_config(), seed=1)
    trained = load_student(full)
    layer, start = moe_modules(trained)[0], moe_modules(initial)[0]
    assert layer.router_bias.abs().sum() > 0  # moved, in steps of 0.001
    assert torch.allclose(layer.router_bias * 1000, (layer.router_bias * 1000).round(), atol=1e-4)
    assert torch.equal(layer.router.weight, start.router.weight)  # router LR = 0 × lr
    assert not torch.equal(layer.base.gate_proj.weight, start.base.gate_proj.weight)  # the base trained
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    assert layer.shared_out_B.abs().sum() > 0
    ids = sample_ids(batch=1, seq=10)
    assert torch.equal(_logits(trained, ids), _logits(load_trained(full), ids))  # checkpoint == saved student

    groups = param_groups(initial, _cfg(store, tiny_teacher_dir, full, **v2))
    assert [g["lr"] for g in groups] == [3e-3, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(m.router.weight) for m in moe_modules(initial)}
    assert len(param_groups(initial, _cfg(store, tiny_teacher_dir, full))) == 1

    crashed = tmp_path / "crashed"  # a crash after step 3: the newest checkpoint is step 2
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoint-4")
    shutil.rmtree(crashed / "final")
    train(_cfg(store, tiny_teacher_dir, crashed, save_every=2, keep_checkpoints=5, resume=True, **v2))
    assert [(r["step"], r["loss"]) for r in read_metrics(crashed) if "loss" in r] == \
        [(r["step"], r["loss"]) for r in steps]
    assert torch.equal(moe_modules(load_student(crashed))[0].router_bias, layer.router_bias)


def test_dense_lora_trains_its_base_and_full_refuses_train_base(store, tiny_teacher_dir, tmp_path):
    from student.train import TrainError, load_trained, train

    cfg = _cfg(store, tiny_teacher_dir, tmp_path / "lora", student="lora", train_base=True, lora_scaling="rslora",
               max_steps=2)
    train(cfg)
    model = load_trained(tmp_path / "lora")
    original = load_base(tiny_teacher_dir, keep="0")[0]
    assert not torch.equal(decoder_layers(model)[0].mlp.up_proj.base_layer.weight,
                           decoder_layers(original)[0].mlp.up_proj.weight)
    assert decoder_layers(model)[0].mlp.up_proj.scaling["default"] == 2 * 4 / math.sqrt(4)
    with pytest.raises(TrainError, match="train_base"):
        train(_cfg(store, tiny_teacher_dir, tmp_path / "full", student="full", train_base=True))
