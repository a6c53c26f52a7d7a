"""The study's own arithmetic (benchmarks/quality_study.py): the pre-registered decision rule and the routing
tallies per domain. The study itself needs the real teacher and hours; these parts need neither."""

import math
import statistics

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


# ================================================================ study v2's run keys
def test_v2_committed_runs_keep_their_keys():
    """Every committed v2 run's config, as its key hashes it, is what `arm_config` builds today: fields TrainConfig
    gained since (routing, init_from, cross_tokenizer, ...) stay out of a key while at their default, so the study's
    report and resume still find the runs (the key's other part, the stores' fingerprints, needs the stores)."""
    import glob
    import json

    from benchmarks import quality_study as q

    paths = sorted(glob.glob(f"{q.RESULTS}/runs/*.json"))
    assert len(paths) >= 48
    shape = dict(dense_rank=86, shared_rank=21)
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        cfg = q.arm_config(run["arm"], {"train": "s"}, "t", q.SCALES["cpu"], run["lr"], run["seed"], "o", shape)
        want = {k: v for k, v in run["config"].items() if k not in q._KEY_IGNORED}
        assert json.loads(json.dumps(q.key_config(cfg))) == want, path
    for arm in ("moe-fair", "dense-split", "moe-fair-fixed"):  # matched_shapes counts moe-fair without a shared expert
        cfg = q.arm_config(arm, {"train": "s"}, "t", q.SCALES["cpu"], 3e-3, 0, "o", dict(shape, shared_rank=0))
        assert cfg.shared_expert_rank == 0
    fixed = q.arm_config("moe-fair-fixed", {"train": "s"}, "t", q.SCALES["cpu"], 3e-3, 0, "o", shape)
    assert q.key_config(fixed)["routing"] == "hash"  # a v3 control's routing is part of its key


# ================================================================ study v3
def test_v3_lr_grid_steps_and_recheck():
    from benchmarks import quality_study as q

    assert [q.v3_lr(s) for s in q.V3_LR_STEPS] == [1.5e-3, 2.1e-3, 3e-3, 4.2e-3, 6e-3]  # the protocol's grid
    assert (q.v3_lr(-3), q.v3_lr(3), q.v3_lr(-4), q.v3_lr(4)) == (1.1e-3, 8.5e-3, 7.5e-4, 1.2e-2)
    assert all(q.v3_step(q.v3_lr(s)) == s for s in range(-6, 7))
    assert q.v3_recheck_lrs(3e-3) == (2.1e-3, 3e-3, 4.2e-3)
    with pytest.raises(ValueError):
        q.v3_step(1e-3)


def test_v3_stage_lr_runs_the_whole_grid_then_extends_an_edge(monkeypatch):
    """A curve whose minimum (1e-3) lies below the grid: all five values run (middle first), the best sits on the
    lower edge, so 1.1e-3 runs, then 7.5e-4, which makes 1.1e-3 interior. A run held by another process leaves the
    choice open without stopping the rest of the grid."""
    import math

    from benchmarks import quality_study as q

    ran, held = [], set()

    def fake_run_one(arm, lr, seed, split, ctx, train_missing=True):
        assert seed == 0 and split == "validation"
        if lr in held or (lr not in ran and not train_missing):
            return None
        if lr not in ran:
            ran.append(lr)
        return {"eval": {split: {"full_kl": 2 + (math.log(lr) - math.log(1e-3)) ** 2}}}

    monkeypatch.setattr(q, "run_one", fake_run_one)
    assert q.v3_stage_lr("dense", {}, train_missing=False) == (None, {})
    held.add(2.1e-3)
    lr, kl = q.v3_stage_lr("dense", {})
    assert lr is None and 2.1e-3 not in kl and ran == [3e-3, 4.2e-3, 1.5e-3, 6e-3]
    held.clear()
    lr, kl = q.v3_stage_lr("dense", {})
    assert lr == 1.1e-3 and ran == [3e-3, 4.2e-3, 1.5e-3, 6e-3, 2.1e-3, 1.1e-3, 7.5e-4]
    assert sorted(kl) == sorted(ran)
    assert q.v3_stage_lr("dense", {}, train_missing=False)[0] == 1.1e-3  # the choice, training nothing


def test_v3_long_runs_change_the_length_only():
    from benchmarks import quality_study as q

    shape, scale = dict(dense_rank=86, shared_rank=21), q.SCALES["cpu"]
    for arm in q.V3_LONG_ARMS:
        short = q.v3_config(arm, {"train": "s"}, "t", scale, 3e-3, 1, "o", shape)
        long = q.v3_config(arm + q.V3_LONG, {"train": "s"}, "t", scale, 3e-3, 1, "o", shape)
        assert (long.max_steps, long.warmup_steps, short.max_steps, short.warmup_steps) == (800, 10, 200, 10)
        differ = {k for k, v in long.to_dict().items() if short.to_dict()[k] != v}
        assert differ == {"max_steps", "log_every", "save_every"}  # the last two: bookkeeping, not the run
    assert q.v3_config("dense", {"train": "s"}, "t", scale, 3e-3, 1, "o", shape) == \
        q.arm_config("dense", {"train": "s"}, "t", scale, 3e-3, 1, "o", shape)


def _v3_students(teacher: str, shape: dict) -> dict:
    from benchmarks import quality_study as q
    from student.train import build_model

    scale = dict(q.SCALES["quick"], keep=None)
    return {arm: build_model(q.arm_config(arm, {"train": "s"}, teacher, scale, 1e-3, 0, "o", shape))
            for arm in q.V3_ARMS}


def test_v3_arms_build_the_protocols_students(tiny_teacher_dir):
    """dense-split: moe-fair's shared expert and 8 rank-8 experts, each at its rsLoRA scale, all on with weight 1
    and no router; moe-fair-fixed: the same experts, top-2 by token-id hash, no router; both count moe-fair's
    parameters less its routers, attention LoRA the dense arm's."""
    from student.baselines import count_parameters
    from student.convert import moe_modules

    shape = dict(dense_rank=12, shared_rank=3)
    students = _v3_students(tiny_teacher_dir, shape)
    layers = {arm: moe_modules(m) for arm, m in students.items() if arm != "dense"}
    assert layers["moe-fair"] and all(len(v) == len(layers["moe-fair"]) for v in layers.values())
    for arm, routing, k in (("moe-fair", "learned", 2), ("dense-split", "all", 8), ("moe-fair-fixed", "hash", 2)):
        for m in layers[arm]:
            assert (m.routing, m.num_experts, m.experts_per_token, m.rank, m.shared_rank) == (routing, 8, k, 8, 3)
            assert m.scaling == pytest.approx(8 / 8 ** 0.5) and m.shared_scaling == pytest.approx(8 / 3 ** 0.5)
            assert (m.router is None) == (routing != "learned")
    counts = {arm: count_parameters(m).trainable for arm, m in students.items()}
    routers = sum(p.numel() for m in layers["moe-fair"] for n, p in m.named_parameters()
                  if n.startswith("router") and p.requires_grad)
    hidden = layers["moe-fair"][0].router.weight.shape[1]
    assert routers == 8 * hidden * len(layers["moe-fair"])
    assert counts["dense-split"] == counts["moe-fair-fixed"] == counts["moe-fair"] - routers

    def attention(model):
        return sorted((n.split("base_model.")[-1], p.numel()) for n, p in model.named_parameters()
                      if p.requires_grad and "attn" in n)

    assert attention(students["dense-split"]) == attention(students["moe-fair"]) == \
        attention(students["moe-fair-fixed"])
    assert sum(n for _, n in attention(students["dense"])) == sum(n for _, n in attention(students["moe-fair"]))


def test_v3_students_compute_the_base_at_initialisation(tiny_teacher_dir):
    """Every arm starts as the base (every LoRA's B is 0), dense-split's always-on experts included."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    ids = torch.randint(5, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        for arm, model in _v3_students(tiny_teacher_dir, dict(dense_rank=12, shared_rank=3)).items():
            torch.testing.assert_close(model.eval()(input_ids=ids).logits, want, msg=arm)


def test_v3_counts_at_the_cpu_scale_match_within_one_percent():
    """The real student (SmolLM2-135M-Instruct's layers ::10) at v2's shapes: dense 2,625,408 and moe-fair 2,620,224
    (v2's counts); the controls lack moe-fair's routers (3 layers × 8 × 576): 2,606,400, 0.72 % below dense."""
    import os

    from assets.smollm2 import prepared_teacher_dir
    from benchmarks import quality_study as q

    teacher = prepared_teacher_dir()
    if not os.path.exists(os.path.join(teacher, "config.json")):
        pytest.skip("the teacher is not prepared (make teacher)")
    counts = q.v3_counts({"train": "s"}, teacher, q.SCALES["cpu"], dict(dense_rank=86, shared_rank=21))
    assert counts == {"dense": 2_625_408, "moe-fair": 2_620_224, "dense-split": 2_606_400,
                      "moe-fair-fixed": 2_606_400}


# ---------------------------------------------------------------- v3 statistics
@pytest.mark.parametrize(("df", "t95"), [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262)])
def test_t_p_values_and_quantiles(df, t95):
    from benchmarks.quality_study import t_quantile, t_two_sided_p

    assert t_two_sided_p(t95, df) == pytest.approx(0.05, abs=2e-4)
    assert t_quantile(0.95, df) == pytest.approx(t95, abs=1e-3)
    assert t_two_sided_p(0.0, df) == pytest.approx(1.0) and t_two_sided_p(float("inf"), df) == 0.0
    assert t_two_sided_p(-1.3, df) == t_two_sided_p(1.3, df)


def test_t_p_matches_a_closed_form_and_the_bonferroni_quantile():
    from benchmarks.quality_study import t_quantile, t_two_sided_p

    for t in (0.3, 1.0, 2.5, 7.0):  # df = 2: p = 1 - t / sqrt(2 + t²); df = 1: Cauchy
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / (2 + t * t) ** 0.5, rel=1e-12)
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-12)
    assert t_quantile(1 - 0.05 / 4, 4) == pytest.approx(4.3147, abs=1e-3)  # the 98.75 % interval at 4 df


def test_holm_on_a_hand_example():
    """Sorted p: 0.005, 0.01, 0.03, 0.04 -> × 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06,
    0.06; capped at 1."""
    from benchmarks.quality_study import holm

    got = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert got == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert holm({"x": 0.6, "y": 0.5}) == pytest.approx({"x": 1.0, "y": 1.0})


def test_holm_over_v2s_primary_comparisons_reproduces_the_correction_in_results_md():
    """RESULTS.md, 'Correction to v2's explanation': moe-fair − dense p = 0.012, Holm-adjusted 0.046; the other
    three 0.28 — from the committed report's per-seed values."""
    import json

    from benchmarks import quality_study as q

    with open(f"{q.RESULTS}.json") as f:
        arms = json.load(f)["arms"]
    ps = {}
    for arm, base in (("moe-v1", "dense"), ("moe-fair", "dense"), ("moe-fair-soft", "dense"), ("full-moe", "full")):
        d = [a["full_kl"] - b["full_kl"] for a, b in zip(arms[arm]["per_seed"], arms[base]["per_seed"], strict=True)]
        ps[arm] = q.paired_test(d)["p"]
    adjusted = q.holm(ps)
    assert round(ps["moe-fair"], 3) == 0.011 and round(adjusted["moe-fair"], 3) == 0.046
    assert {round(adjusted[a], 2) for a in ("moe-v1", "moe-fair-soft", "full-moe")} == {0.28}


def _eval(full_kl: float, domains: dict[str, float] | None = None) -> dict:
    domains = domains or {"bible": full_kl - 0.1, "python": full_kl + 0.2}
    return dict(full_kl=full_kl, teacher_kl=full_kl - 0.4, ppl=300.0 + full_kl, top1_agree=0.28, ece=0.014,
                full_kl_by_domain=domains,
                domains={d: dict(teacher_kl=v - 0.4, ppl=300.0, top1_agree=0.28, ece=0.01) for d, v in domains.items()})


def test_v3_primary_comparisons_holm_and_reading():
    """Four comparisons at 5 seeds: per-seed differences, t(4) intervals (95 % and Bonferroni 98.75 %), Holm over
    the four, the verdict by the adjusted p, and the protocol's reading of the pattern."""
    from benchmarks import quality_study as q

    base = [2.80, 2.83, 2.87, 2.82, 2.85]
    shifts = {"dense": [0] * 5, "dense-split": [-0.02, -0.021, -0.019, -0.022, -0.018],
              "moe-fair": [-0.021, -0.02, -0.02, -0.019, -0.022],
              "moe-fair-fixed": [-0.03, 0.01, -0.02, 0.0, -0.025]}
    tests = {arm: {s: _eval(b + d) for s, (b, d) in enumerate(zip(base, ds, strict=True))}
             for arm, ds in shifts.items()}
    primary = q.v3_primary(tests)
    assert list(primary) == ["moe-fair - dense", "dense-split - dense", "moe-fair - dense-split",
                             "moe-fair - moe-fair-fixed"]
    raw = {}
    for name, row in primary.items():
        t = row["test"]
        arm, b = name.split(" - ")
        d = [tests[arm][s]["full_kl"] - tests[b][s]["full_kl"] for s in range(5)]
        assert t["per_seed"] == pytest.approx(d) and t["n"] == 5 and t["df"] == 4 and t["final"]
        half = 2.7764 * statistics.stdev(d) / 5 ** 0.5
        assert t["ci95"] == pytest.approx([statistics.mean(d) - half, statistics.mean(d) + half], rel=1e-3)
        assert t["ci98.75"][1] - t["mean"] > half and t["bonferroni_level"] == 0.9875
        assert row["full_kl"][0] == pytest.approx(t["mean"]) and row["full_kl"][2] == pytest.approx(half, rel=1e-3)
        assert set(row["full_kl_by_domain"]) == {"bible", "python"}
        raw[name] = t["p"]
    holm = q.holm(raw)
    assert {n: r["test"]["p_holm"] for n, r in primary.items()} == pytest.approx(holm)
    verdicts = {n: r["test"]["verdict"] for n, r in primary.items()}
    assert verdicts["moe-fair - dense"] == verdicts["dense-split - dense"] == "lower full KL (arm better)"
    assert verdicts["moe-fair - dense-split"] == verdicts["moe-fair - moe-fair-fixed"] == "no difference shown"
    assert q.v3_reading(primary)["reading"] == "the gain is the step size / split, not routing"
    tests["moe-fair-fixed"].pop(4)  # a missing seed: the numbers stay, marked provisional, and nothing is read
    partial = q.v3_primary(tests)
    assert not any(r["test"]["final"] for r in partial.values())
    assert q.v3_reading(partial)["reading"] is None


def test_v3_reading_of_the_protocols_patterns():
    from benchmarks import quality_study as q

    def primary(ps_means):
        return {f"{a} - {b}": {"test": {"p_holm": p, "mean": m, "final": True}}
                for (a, b), (p, m) in zip(q.V3_PRIMARY, ps_means, strict=True)}

    no, better = (0.5, -0.01), (0.01, -0.02)
    assert q.v3_reading(primary([no, no, no, no]))["reading"] == "v2's win is not reproduced"
    assert q.v3_reading(primary([better, no, better, better]))["reading"] == "learned routing carries it"
    assert q.v3_reading(primary([better, no, better, no]))["reading"] == \
        "sparsity carries it, learning where does not"
    assert q.v3_reading(primary([better, (0.01, 0.02), no, no]))["reading"] is None  # split shown to hurt: no rule


# ---------------------------------------------------------------- v3 report on fake run JSONs
V3_FAKE_CHOICE = {"dense": 3e-3, "moe-fair": 1.1e-3, "dense-split": 4.2e-3, "moe-fair-fixed": 2.1e-3}


@pytest.fixture(scope="module")
def v3_fake_study(tiny_teacher_dir, tmp_path_factory):
    """A v3 results folder of fake run JSONs keyed as run_one keys them (tiny stores, quick scale): stage A curves
    (moe-fair's best on the lower edge until 7.5e-4 makes 1.1e-3 interior), 5 test seeds per arm, stage C's runs
    (dense's LR re-check ran, moe-fair's did not) and stage D's generations of dense and moe-fair; then the report."""
    import json
    import os

    from benchmarks import quality_study as q

    tmp = tmp_path_factory.mktemp("v3")
    store = write_teacher_store(str(tmp / "store"), tiny_teacher_dir, rows=6, seq=16, domains=["bible", "python"])
    ctx = dict(study="v3", out=str(tmp / "out"), results=str(tmp / "results"),
               stores={"train": store, "validation": store, "test": store}, scale=q.SCALES["quick"],
               shape=dict(dense_rank=12, shared_rank=3), device="cpu", teacher=q.Teacher(tiny_teacher_dir, "cpu"))

    def write(arm, lr, seed, split, result):
        run = os.path.join(ctx["out"], "runs", f"{arm}_lr{lr:g}_s{seed}")
        cfg = q.v3_config(arm, ctx["stores"], tiny_teacher_dir, ctx["scale"], lr, seed, run, ctx["shape"])
        path = q.result_path(ctx["results"], arm, lr, seed)
        cached = q._read(path) or dict(arm=arm, lr=lr, seed=seed, key=q.run_key(cfg, ctx["stores"]), train_s=1.0,
                                       eval={}, config=cfg.to_dict())
        cached["eval"][split] = result
        q._write_json_atomic(path, cached)

    offsets = {"dense": 0.0, "moe-fair": -0.02, "dense-split": -0.015, "moe-fair-fixed": -0.01}
    for arm, best in V3_FAKE_CHOICE.items():
        for step in range(-4, 3):
            lr = q.v3_lr(step)
            if step < -2 and arm != "moe-fair":
                continue
            write(arm, lr, 0, "validation", _eval(3.0 + abs(step - q.v3_step(best)) * 0.1 + offsets[arm]))
        for seed in q.V3_SEEDS:
            noise = 0.001 * ((seed * 7 + len(arm)) % 5)
            write(arm, best, seed, "test", _eval(2.83 + 0.01 * seed + offsets[arm] + noise))
    for arm in q.V3_LONG_ARMS:
        for seed in q.V3_LONG_SEEDS:
            write(arm + q.V3_LONG, V3_FAKE_CHOICE[arm], seed, "test", _eval(2.6 + 0.01 * seed + offsets[arm]))
    for lr in q.v3_recheck_lrs(V3_FAKE_CHOICE["dense"]):
        write("dense" + q.V3_LONG, lr, 0, "validation", _eval(2.7 + abs(q.v3_step(lr) - q.v3_step(3e-3)) * 0.05))
    os.makedirs(os.path.join(ctx["results"], "generate"))
    for arm in ("dense", "moe-fair"):
        for seed in q.V3_SEEDS:
            with open(os.path.join(ctx["results"], "generate", f"{arm}_lr{V3_FAKE_CHOICE[arm]:g}_s{seed}.json"),
                      "w") as f:
                json.dump(dict(arm=arm, lr=V3_FAKE_CHOICE[arm], seed=seed, key="k", reverse_kl=0.5 + 0.01 * seed
                               + (0.02 if arm == "dense" else 0), rouge_l=0.3 - 0.01 * seed, by_domain={}), f)
    counts = {"dense": 1000, "moe-fair": 998, "dense-split": 990, "moe-fair-fixed": 990}
    path = str(tmp / "quality_study_v3.json")
    q.v3_report(ctx, counts, path)
    with open(path) as f:
        return json.load(f)


def test_v3_report_from_run_jsons(v3_fake_study):
    from benchmarks import quality_study as q

    report = v3_fake_study
    assert {a: s["chosen"] for a, s in report["stage_a"].items()} == V3_FAKE_CHOICE
    assert report["stage_a"]["moe-fair"]["extended"] == [7.5e-4, 1.1e-3]  # the edge rule: two steps below
    assert report["stage_a"]["dense"]["extended"] == [] and not report["stage_a"]["dense"]["on_edge_of_run_grid"]
    assert set(report["lr_grid_validation_full_kl"]["moe-fair"]) == {str(q.v3_lr(s)) for s in range(-4, 3)}
    for arm in q.V3_ARMS:
        row = report["arms"][arm]
        assert row["lr"] == V3_FAKE_CHOICE[arm] and row["seeds"] == list(q.V3_SEEDS)
        assert row["trainable"] == {"dense": 1000, "moe-fair": 998, "dense-split": 990, "moe-fair-fixed": 990}[arm]
        assert len(row["per_seed"]) == 5 and set(row["per_domain"]) == {"bible", "python"}
        assert row["full_kl"][0] == pytest.approx(statistics.mean(s["full_kl"] for s in row["per_seed"]))
        assert row["per_domain"]["python"]["full_kl"] == pytest.approx(row["full_kl"][0] + 0.2)
    primary = report["paired_differences"]
    assert list(primary) == [f"{a} - {b}" for a, b in q.V3_PRIMARY]
    assert all(r["test"]["final"] and r["test"]["holm_over"] == 4 for r in primary.values())
    assert {n: r["test"]["p_holm"] for n, r in primary.items()} == \
        pytest.approx(q.holm({n: r["test"]["p"] for n, r in primary.items()}))
    assert primary["moe-fair - dense"]["test"]["mean"] == pytest.approx(-0.02 + 0.001 * (
        statistics.mean((s * 7 + 8) % 5 for s in range(5)) - statistics.mean((s * 7 + 5) % 5 for s in range(5))))
    assert report["reading"]["reading"] is not None or report["reading"]["shown"]
    c = report["stage_c"]
    assert set(c["arms"]) == {"dense-4x", "moe-fair-4x"} and c["arms"]["dense-4x"]["seeds"] == [0, 1, 2]
    five = c["paired_differences"]["moe-fair-4x - dense-4x"]["test"]
    assert five["n"] == 3 and five["final"] and five["mean"] == pytest.approx(-0.02)
    assert c["lr_recheck"]["dense-4x"]["ran"] and c["lr_recheck"]["dense-4x"]["best"] == 3e-3
    assert not c["lr_recheck"]["moe-fair-4x"]["ran"]
    d = report["stage_d"]
    assert set(d["arms"]) == {"dense", "moe-fair"}
    assert d["paired_differences_exploratory"]["moe-fair - dense"]["reverse_kl"]["mean"] == pytest.approx(-0.02)
    assert "p_holm" not in d["paired_differences_exploratory"]["moe-fair - dense"]["reverse_kl"]  # no verdict


def test_v3_report_trains_nothing(v3_fake_study, monkeypatch):
    """The report reads run JSONs only: no run of stage A is missing here, and none would be trained."""
    import student.train

    monkeypatch.setattr(student.train, "train", lambda *a, **k: pytest.fail("the report trained"))
    assert v3_fake_study["stage_a"]["dense"]["chosen"] == 3e-3


def test_main_keeps_v2_the_default_and_its_stages():
    from benchmarks.quality_study import main

    for stage in ("long", "generate"):
        with pytest.raises(SystemExit) as e:
            main(["--stage", stage])
        assert e.value.code == 2  # argparse's refusal: v3's stages need --study v3
    with pytest.raises(SystemExit, match="v2's"):
        main(["--study", "v3", "--stage", "balance"])


def test_v3_tables_are_checked_against_the_report_like_v2s(v3_fake_study):
    """RESULTS.md tables in v2's layout, written from a v3 report (stage A, stage B with trainable counts, the
    primary comparisons with p, Holm p and both intervals, stage C's arms and comparison 5), pass the checker;
    one changed digit does not."""
    from benchmarks import quality_study as q
    from benchmarks.check_results_tables import check_study

    r = v3_fake_study
    grid = [q.v3_lr(s) for s in range(-4, 3)]

    def f(x, d=3):
        return f"{x:.{d}f}".replace("-", "−")

    lines = ["## Study v3: results", "", "| arm | " + " | ".join(f"{lr:.1e}".replace("e-0", "e-") for lr in grid)
             + " | chosen |", "|---" * (len(grid) + 2) + "|"]
    for arm in q.V3_ARMS:
        kl = {float(k): v for k, v in r["lr_grid_validation_full_kl"][arm].items()}
        cells = [("**" + f(kl[lr]) + "**" if lr == r["stage_a"][arm]["chosen"] else f(kl[lr])) if lr in kl else ""
                 for lr in grid]
        lines.append(f"| `{arm}` | " + " | ".join(cells) + f" | {r['stage_a'][arm]['chosen']:.1e} |")
    lines += ["", "| arm | trainable | full_kl | teacher_kl | ppl | p | Holm p | 95 % interval | 98.75 % interval |",
              "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for arm, row in {**r["arms"], **r["stage_c"]["arms"]}.items():
        lines.append(f"| `{arm}` | {row['trainable']:,} | {f(row['full_kl'][0])} ± {f(row['full_kl'][1])} | "
                     f"{f(row['teacher_kl'][0])} ± {f(row['teacher_kl'][1])} | "
                     f"{row['ppl'][0]:.0f} ± {row['ppl'][1]:.2f} | | | | |")
    for name, row in {**r["paired_differences"], **r["stage_c"]["paired_differences"]}.items():
        t = row["test"]
        a, b = name.split(" - ")
        bonf = t.get("ci98.75")  # comparison 5 is a family of its own: no Bonferroni interval
        lines.append(f"| `{a}` − `{b}`, per seed | | {f(t['mean'], 4)} ± {f(row['full_kl'][2], 4)} | "
                     f"{f(row['teacher_kl'][0], 4)} ± {f(row['teacher_kl'][2], 4)} | | {t['p']:.2g} | "
                     f"{t['p_holm']:.2g} | [{f(t['ci95'][0], 4)}, {f(t['ci95'][1], 4)}] | "
                     + (f"[{f(bonf[0], 4)}, {f(bonf[1], 4)}] |" if bonf else " |"))
    text = "\n".join(lines) + "\n"
    check = check_study(text, "Study v3", r)
    assert check.mismatches == [] and not check.unchecked_columns
    assert len(check.found) == 26 + 6 * 7 + 4 * 10 + 8  # stage A (LRs + chosen), arms, comparisons 1-4, 5
    columns = {c for _, _, c, _, _ in check.found}
    assert {"Holm p", "p", "95 % interval", "98.75 % interval", "trainable", "chosen"} <= columns
    rows = {row for _, row, _, _, _ in check.found}
    assert {"`dense-4x`", "`moe-fair-4x` − `dense-4x`, per seed"} <= rows
    moe = f(r["arms"]["moe-fair"]["full_kl"][0])
    changed = text.replace(f"| {moe} ±", f"| {moe[:-1]}{(int(moe[-1]) + 1) % 10} ±", 1)
    assert len(check_study(changed, "Study v3", r).mismatches) == 1
