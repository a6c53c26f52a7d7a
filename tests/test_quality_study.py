"""The study's own arithmetic (benchmarks/quality_study.py): the pre-registered decision rule and the routing
tallies per domain. The study itself needs the real teacher and hours; these parts need neither."""

import pytest
import torch
from store_fixtures import write_teacher_store
from student_fixtures import randomize_adapters

from benchmarks.quality_study import _paired, routing_by_domain
from student.config import MoELoRAConfig
from student.convert import build_student


def _runs(full_kls: list[float]) -> list[dict]:
    metrics = dict(teacher_kl=1.0, ppl=10.0, top1_agree=0.5, ece=0.01)
    return [{"seed": s, "eval": {"test": dict(metrics, full_kl=v)}} for s, v in enumerate(full_kls)]


@pytest.mark.parametrize(("diffs", "verdict"), [
    ([-0.018, -0.023, -0.026], "better"),  # interval [-0.033, -0.012]
    ([+0.012, +0.037, +0.047], "no difference shown"),  # [-0.013, +0.077]
    ([+0.030, +0.031, +0.033], "worse"),
])
def test_paired_difference_and_verdict_follow_the_preregistered_rule(diffs, verdict):
    """Per-seed differences, their mean and 95 % Student-t half-width (2 degrees of freedom: t = 4.303)."""
    base = [2.80, 2.83, 2.87]
    out = _paired({"moe": _runs([b + d for b, d in zip(base, diffs, strict=True)]), "dense": _runs(base)},
                  [("moe", "dense")])["moe - dense"]
    mean, sd, half = out["full_kl"]
    m = sum(diffs) / 3
    assert mean == pytest.approx(m)
    assert sd == pytest.approx((sum((d - m) ** 2 for d in diffs) / 2) ** 0.5)
    assert half == pytest.approx(4.303 * sd / 3 ** 0.5)
    assert out["verdict"] == verdict
    assert out["teacher_kl"][0] == 0.0  # every metric is paired the same way


def test_paired_needs_two_common_seeds():
    runs = {"moe": _runs([2.8]), "dense": _runs([2.9, 2.7])}
    assert _paired(runs, [("moe", "dense")]) == {}


@pytest.mark.parametrize("experts_per_token", [2, 4])
def test_routing_by_domain_pools_real_tokens_of_each_domain(tiny_teacher_dir, tmp_path, experts_per_token):
    """Padded batches of mixed lengths give each domain's routing over its real tokens: the figures of its rows run
    one at a time. Loads and weights are distributions over experts; under soft routing (k = E) the load is even
    and the weights are not."""
    from logit_store import LogitStore
    from student.router_loss import RoutingTally

    store = write_teacher_store(str(tmp_path / "store"), tiny_teacher_dir, rows=10, seq=16, domains=["a", "b"],
                                lengths=[16, 16, 9, 5, 12])
    student = build_student(tiny_teacher_dir, MoELoRAConfig(experts=4, experts_per_token=experts_per_token, rank=4))
    randomize_adapters(student, std=0.5)
    found, pooled = routing_by_domain(store, student, batch=3, device="cpu")
    alone = {"a": RoutingTally(), "b": RoutingTally()}
    with torch.no_grad():
        for row in LogitStore.open(store):
            ids = torch.as_tensor(row.input_ids)[None]
            student(input_ids=ids, attention_mask=torch.ones_like(ids))
            alone[row.domain].add_forward(student)
    for name, key in (("expert_load_by_domain", "expert_usage"), ("routing_weight_by_domain", "routing_weights")):
        assert set(found[name]) == {"a", "b"}
        for domain, layers in found[name].items():
            want = alone[domain].result()[key]
            assert set(layers) == set(want) == {"0", "1"}
            for layer, values in layers.items():
                assert values == pytest.approx(want[layer], abs=1e-6), (name, domain, layer)
                assert sum(values) == pytest.approx(1.0)
    both = alone["a"].add(alone["b"]).result()  # pooled over the split: what stage_routing records beside them
    for layer, r in pooled["routing"].items():
        assert r["effective_experts_per_token"] == pytest.approx(both["routing"][layer]["effective_experts_per_token"])
        assert pooled["routing_weights"][layer] == pytest.approx(both["routing_weights"][layer], abs=1e-6)
    load, weight = found["expert_load_by_domain"]["a"]["0"], found["routing_weight_by_domain"]["a"]["0"]
    if experts_per_token == 4:
        assert load == pytest.approx([0.25] * 4) and max(weight) - min(weight) > 1e-3


def test_stage_lr_brackets_the_best_first_then_runs_the_rest_of_the_grid(monkeypatch):
    """A validation curve with its minimum above the full fine-tune grid (1e-5 … 3e-4): the grid grows a half-decade
    at a time (9e-4, 3e-3, 9e-3) until the best is interior; the bracketing runs come first, the rest of the
    grid after; without training, a choice waits for its runs."""
    import math

    from benchmarks import quality_study as q

    ran = []

    def fake_run_one(arm, lr, seed, split, ctx, train_missing=True):
        done = lr in ran
        if not done and not train_missing:
            return None
        if not done:
            ran.append(lr)
        return {"eval": {split: {"full_kl": (math.log(lr) - math.log(2e-3)) ** 2}}}

    monkeypatch.setattr(q, "run_one", fake_run_one)
    assert q.stage_lr("full", {}, train_missing=False) is None and ran == []
    assert q.stage_lr("full", {}, whole_grid=False) == 3e-3
    assert ran == [1e-4, 3e-4, 9e-4, 3e-3, 9e-3]  # the middle, then the best's neighbour above, up the edge
    assert q.grid_not_run("full", {}) == [1e-5, 3e-5]
    assert q.choice("full", {}, train_missing=False) == 3e-3  # bracketed: provisional while 1e-5, 3e-5 have not run
    assert q.stage_lr("full", {}) == 3e-3 and ran[-2:] == [1e-5, 3e-5] and q.grid_not_run("full", {}) == []
