"""Routing modes of the MoE-LoRA layer (issue 24, study v3's controls): `learned` (the default, unchanged), `hash`
(fixed experts per input token id, no router) and `all` (every expert's LoRA always on, weight 1: `dense-split`)."""

from __future__ import annotations

import json

import pytest
import torch
from student_fixtures import (
    assert_layer_matches_loop,
    loop_and_fast_layers,
    randomize_adapters,
    sample_ids,
    save_tiny_model,
)
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from cli.kdstudent import main
from student.baselines import count_parameters, moe_lora_trainable
from student.config import MoELoRAConfig
from student.convert import build_student, decoder_layers, load_base, moe_modules
from student.export import UnsupportedExportError, export_student, to_mixtral
from student.io import CONFIG_NAME, WEIGHTS_NAME, load_student, save_student
from student.moe_lora import MoELoRAMLP, hash_experts, set_token_ids
from student.router_loss import RoutingTally, router_losses, update_router_bias

SHAPE = dict(experts=4, experts_per_token=2, rank=3, attn_rank=2, shared_expert_rank=2)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", num_layers=3)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2", num_layers=2)


def _student(base, routing: str | None, seed: int = 0, **shape):
    kw = {**SHAPE, **shape}
    if routing is not None:
        kw["routing"] = routing
    if routing == "all":
        kw["experts_per_token"] = kw["experts"]
    model = build_student(base, MoELoRAConfig(**kw), seed=seed)
    randomize_adapters(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in moe_modules(model):
            for p in (m.shared_in_B, m.shared_out_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _mlp(hidden: int = 16, inter: int = 24) -> LlamaMLP:
    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=1))


def _random_layer(routing: str, experts: int, k: int, impl: str = "loop", shared: int = 2) -> MoELoRAMLP:
    layer = MoELoRAMLP(_mlp(), num_experts=experts, experts_per_token=k, rank=3, impl=impl, shared_rank=shared,
                       routing=routing, layer_index=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return layer


def _full_weights(layer: MoELoRAMLP, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate, up and down weights of the base plus the shared expert plus the LoRAs of `experts` (textbook)."""
    mlp, s, r, s2, r2 = layer.base, layer.scaling, layer.rank, layer.shared_scaling, layer.shared_rank
    wg = mlp.gate_proj.weight + s2 * layer.shared_in_B[0].T @ layer.shared_in_A[:r2]
    wu = mlp.up_proj.weight + s2 * layer.shared_in_B[1].T @ layer.shared_in_A[r2:]
    wd = mlp.down_proj.weight + s2 * layer.shared_out_B.T @ layer.shared_out_A
    for e in experts:
        wg = wg + s * layer.in_B[e, 0].T @ layer.in_A[e, :r]
        wu = wu + s * layer.in_B[e, 1].T @ layer.in_A[e, r:]
        wd = wd + s * layer.out_B[e].T @ layer.out_A[e]
    return wg, wu, wd


def _mlp_with(layer: MoELoRAMLP, x: torch.Tensor, experts: list[int]) -> torch.Tensor:
    wg, wu, wd = _full_weights(layer, experts)
    return (layer.base.act_fn(x @ wg.T) * (x @ wu.T)) @ wd.T


# ---------------------------------------------------------------- hash
def test_hash_experts_are_distinct_fixed_per_token_and_spread():
    ids = torch.arange(4096)
    top = hash_experts(ids, 8, 2, salt=3)
    assert top.shape == (4096, 2) and (top[:, 0] != top[:, 1]).all()
    torch.testing.assert_close(hash_experts(ids.flip(0), 8, 2, salt=3), top.flip(0), rtol=0, atol=0)
    loads = torch.bincount(top.reshape(-1), minlength=8).float()
    assert (loads / loads.mean() - 1).abs().max() < 0.1  # balanced over token ids
    pairs = top.sort(-1).values
    assert len(torch.unique(pairs[:, 0] * 8 + pairs[:, 1])) == 28  # every pair of experts occurs
    assert (hash_experts(ids, 8, 2, salt=4) != top).any()  # layers hash differently


def test_hash_layer_routes_by_token_id_in_any_context():
    layer = _random_layer("hash", experts=6, k=2)
    ids = torch.tensor([7, 3, 7, 9, 3, 7])
    set_token_ids(layer, ids)
    _, w1, i1 = layer.route(torch.randn(6, 16))
    _, w2, i2 = layer.route(torch.randn(6, 16))  # other hidden states: the same experts
    torch.testing.assert_close(i1, i2, rtol=0, atol=0)
    torch.testing.assert_close(w1, torch.full((6, 2), 0.5), rtol=0, atol=0)
    assert (i1[0] == i1[2]).all() and (i1[0] == i1[5]).all() and (i1[1] == i1[4]).all()
    set_token_ids(layer, torch.tensor([9, 7]))  # another batch: token 7 still goes where it went
    _, _, i3 = layer.route(torch.randn(2, 16))
    assert (i3[1] == i1[0]).all() and (i3[0] == i1[3]).all()
    set_token_ids(layer, None)
    with pytest.raises(RuntimeError, match="needs the input token ids"):
        layer(torch.randn(6, 16))
    set_token_ids(layer, ids[:4])
    with pytest.raises(RuntimeError, match="needs the input token ids"):
        layer(torch.randn(6, 16))


def test_hash_student_routes_by_its_input_ids_in_every_call(llama_dir):
    """The pre-hook hands the ids over for model(ids), model.base_model(input_ids=...) and generate(); a forward
    on inputs_embeds fails loudly."""
    student = _student(llama_dir, "hash")
    ids = sample_ids(2, 12)

    def routed_by(ids_: torch.Tensor) -> None:
        for m in moe_modules(student):
            top = hash_experts(ids_.reshape(-1), 4, 2, salt=m.layer_index)
            torch.testing.assert_close(m.router_stats.counts, torch.bincount(top.reshape(-1), minlength=4))

    student(ids)
    routed_by(ids)
    student.base_model(input_ids=ids[:1, :7])  # the body alone, as train and eval call it
    routed_by(ids[:1, :7])
    out = student.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    with pytest.raises(RuntimeError, match="needs the input token ids"):
        student(inputs_embeds=student.get_input_embeddings()(ids))
    student(ids)
    tally = RoutingTally().add_forward(student).result()
    assert set(tally["expert_usage"]) == {"0", "1", "2"}
    assert all(abs(v["effective_experts_per_token"] - 2) < 1e-6 for v in tally["routing"].values())


def test_hash_student_of_gpt2_routes_by_positional_ids(gpt2_dir):
    student = _student(gpt2_dir, "hash")
    ids = sample_ids(2, 8)
    torch.testing.assert_close(_logits(student, ids), _logits(student, ids), rtol=0, atol=0)


def test_hash_student_has_no_router_and_trains_no_router(llama_dir):
    student = _student(llama_dir, "hash")
    names = [n for n, _ in student.named_parameters()] + [n for n, _ in student.named_buffers()]
    assert not [n for n in names if "router" in n]
    base, _ = load_base(llama_dir)
    learned_cfg, hash_cfg = MoELoRAConfig(**SHAPE), MoELoRAConfig(**SHAPE, routing="hash")
    assert count_parameters(student).trainable == moe_lora_trainable(base, hash_cfg)
    hidden = base.config.hidden_size
    assert moe_lora_trainable(base, learned_cfg) - moe_lora_trainable(base, hash_cfg) == 3 * 4 * hidden
    ids = sample_ids(2, 10)
    loss = student(ids).logits.square().mean()
    losses = router_losses(student)
    assert float(losses.loss) == 0 and float(losses.balance) == 0 and not losses.loss.requires_grad
    (loss + losses.loss).backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in student.named_parameters() if p.requires_grad}
    assert all(m.router is None and m.router_bias is None for m in moe_modules(student))
    update_router_bias(student, 0.1)  # nothing to move: no error


@pytest.mark.parametrize("impl", ["loop", "fused", "compiled"])
def test_hash_layer_matches_the_textbook_moe(impl, one_thread):
    """Output and gradients equal a per-token reference: the token's k hashed experts as full MLPs, weight 1/k."""
    layer = _random_layer("hash", experts=5, k=2, impl=impl)
    ref = _random_layer("hash", experts=5, k=2)
    x = torch.randn(3, 7, 16)
    ids = torch.randint(0, 50, (3, 7))
    set_token_ids(layer, ids)
    experts = hash_experts(ids.reshape(-1), 5, 2, salt=1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xa)
    rows = [sum(_mlp_with(ref, xt, [int(e)]) for e in es) / 2 for xt, es in zip(xb.reshape(-1, 16), experts,
                                                                                 strict=True)]
    y_ref = torch.stack(rows).reshape(y.shape)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn(y.shape)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["fused", "compiled"])
def test_hash_layer_fast_paths_match_the_loop(impl, one_thread):
    loop, fast = loop_and_fast_layers(impl, routing="hash")
    ids = torch.randint(0, 100, (4, 9))
    set_token_ids(loop, ids)
    set_token_ids(fast, ids)
    assert_layer_matches_loop(loop, fast, torch.randn(4, 9, 32))


# ---------------------------------------------------------------- all
@pytest.mark.parametrize("impl", ["auto", "loop"])
def test_all_routing_is_base_plus_shared_plus_every_expert(impl):
    """Every expert's LoRA on every token with weight 1: one MLP with W + shared + sum of the experts' updates."""
    layer = _random_layer("all", experts=3, k=3, impl=impl)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, _mlp_with(layer, x, [0, 1, 2]), rtol=1e-4, atol=1e-5)
    assert (y - layer.base(x)).abs().max() > 1e-2
    assert (layer.router_stats.counts == 10).all() and abs(float(layer.router_stats.weight_ess) - 3) < 1e-6
    assert float(layer.router_stats.balance) == 0
    y.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    assert not [n for n, _ in layer.named_parameters() if "router" in n]
    with pytest.raises(ValueError, match="every expert"):
        MoELoRAMLP(_mlp(), num_experts=3, experts_per_token=2, routing="all")


def test_all_student_is_exact_at_init_and_has_no_router(llama_dir):
    cfg = MoELoRAConfig(**{**SHAPE, "experts_per_token": 4}, routing="all")
    student = build_student(llama_dir, cfg)
    base, _ = load_base(llama_dir)
    ids = sample_ids(2, 8)
    torch.testing.assert_close(_logits(student, ids), _logits(base, ids), rtol=0, atol=0)
    assert count_parameters(student).trainable == moe_lora_trainable(base, cfg)
    assert float(router_losses(student).loss) == 0


# ---------------------------------------------------------------- learned: unchanged
def test_learned_is_the_default_and_unchanged(llama_dir, tmp_path):
    unset, learned = _student(llama_dir, None), _student(llama_dir, "learned")
    assert unset.kd_student.config.routing == "learned"
    sa, sb = unset.state_dict(), learned.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = sample_ids(2, 12)
    torch.testing.assert_close(_logits(unset, ids), _logits(learned, ids), rtol=0, atol=0)
    assert not unset.base_model._forward_pre_hooks  # no hook for learned routing
    assert all(m.router_bias is not None and isinstance(m.router, torch.nn.Linear) for m in moe_modules(unset))
    # a student.json of before the option (no "routing" key) loads as learned, to the same logits
    out = save_student(unset, tmp_path / "s")
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["config"].pop("routing") == "learned"
    (out / CONFIG_NAME).write_text(json.dumps(meta))
    reloaded = load_student(out)
    assert reloaded.kd_student.config.routing == "learned"
    torch.testing.assert_close(_logits(reloaded, ids), _logits(unset, ids), rtol=0, atol=0)


# ---------------------------------------------------------------- config, save, params, export
def test_config_validates_routing():
    with pytest.raises(ValueError, match="routing must be one of"):
        MoELoRAConfig(routing="random")
    with pytest.raises(ValueError, match="--experts-per-token"):
        MoELoRAConfig(routing="all")  # k = 2 of 8: not "all"
    with pytest.raises(ValueError, match="no router"):
        MoELoRAConfig(routing="hash", router_init_std=0.1)
    assert MoELoRAConfig.from_dict({"experts": 4}).routing == "learned"


@pytest.mark.parametrize("routing", ["hash", "all"])
def test_fixed_routing_student_saves_reloads_and_refuses_export(llama_dir, tmp_path, routing):
    student = _student(llama_dir, routing)
    out = save_student(student, tmp_path / "s")
    assert json.loads((out / CONFIG_NAME).read_text())["config"]["routing"] == routing
    from safetensors.torch import load_file

    assert not [n for n in load_file(out / WEIGHTS_NAME) if "router" in n]
    reloaded = load_student(out)
    assert reloaded.kd_student.config == student.kd_student.config
    ids = sample_ids(2, 9)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(student, ids), rtol=0, atol=0)
    with pytest.raises(UnsupportedExportError, match="Mixtral cannot represent"):
        to_mixtral(student)
    with pytest.raises(UnsupportedExportError, match=f"--routing {routing}"):
        export_student(out, tmp_path / "export")
    assert not (tmp_path / "export").exists()  # refused before writing anything


def test_params_prints_the_mode_and_counts_no_router(llama_dir, capsys):
    def printed(*flags: str) -> str:
        assert main(["params", str(llama_dir), "--experts", "4", *flags]) == 0
        return capsys.readouterr().out

    learned, hashed = printed(), printed("--routing", "hash")
    every = printed("--routing", "all", "--experts-per-token", "4")
    assert "routing: learned, top-2 of 4" in learned and "routing: hash" in hashed and "routing: all" in every
    count = {name: int(next(line for line in out.splitlines() if line.startswith("moe_lora")).split()[2]
                       .replace(",", "")) for name, out in (("learned", learned), ("hash", hashed))}
    hidden = load_base(llama_dir)[0].config.hidden_size
    assert count["learned"] - count["hash"] == len(decoder_layers(load_base(llama_dir)[0])) * 4 * hidden


def test_training_refuses_router_settings_without_a_router():
    """Under fixed routing no router setting can do anything: given, it is refused, not ignored."""
    from student.config import TrainConfig

    base = dict(store="s", base="b", out="o", routing="hash")
    for option in (dict(router_bias_update=1e-3), dict(router_lr_scale=2.0), dict(z_coef=0.1),
                   dict(balance_coef=0.02)):
        with pytest.raises(ValueError, match="has no router"):
            TrainConfig(**base, **option)
    TrainConfig(**base)  # the defaults stand
    TrainConfig(**dict(base, routing="all", experts_per_token=8))
