"""Does a MoE-LoRA student distil better than a dense one? Study v2: pre-registered, a tuned LR per arm, three domains.

    python -m benchmarks.quality_study --stage lr       # stage 1: each arm over its LR grid, seed 0, on validation
    python -m benchmarks.quality_study --stage seeds    # stage 2: 3 seeds at each arm's chosen LR, on test
    python -m benchmarks.quality_study --stage balance  # stage 3: balance variants of the best top-k MoE arm
    python -m benchmarks.quality_study --stage routing  # routing weights by domain for runs measured without them
    python -m benchmarks.quality_study --stage report   # table, paired differences, JSON, plots (trains nothing)

The protocol, its decision rule and the reasons for each choice are in docs/RESULTS.md, written before the runs.
Teacher: SmolLM2-135M-Instruct (`make teacher`). Text (assets/corpora.py): World English Bible chapters,
Shakespeare scenes and Python standard-library modules, split train/validation/test by document, every row tagged
with its domain; one top-64 capture per split, shared by every run. Students: the teacher cut to --keep-layers.

Arms (budget arms matched to within 1 % of moe-v1's trainable count; every LoRA uses the same scaling rule):
  dense          dense LoRA on every attention and MLP projection, rank matched to moe-v1
  moe-v1         8 experts × rank 16, top-2, attention LoRA rank 16 (the v1 study's MoE student)
  moe-fair       attention LoRA at the dense arm's rank; the MLP budget equal to the dense arm's, spent as an
                 always-on shared expert + 8 routed experts of rank 8, top-2
  moe-fair-soft  moe-fair with soft routing (every token through all 8 experts)
  full           full fine-tune (outside the budget)
  full-moe       full fine-tune + moe-v1's experts (--train-base; the paper's student, outside the budget)

Every finished run of the cpu scale leaves a small JSON under benchmarks/results/quality_study_v2/runs/ (committed;
other scales keep theirs under --out), keyed by its config and the stores' fingerprints: the study resumes across
machines and sessions, and several processes can share a stage (each run is claimed by one process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time

import torch

from student.config import TrainConfig

SCALES = {
    # rows per split, tokens per row, steps × batch × tokens = tokens per run, student layers
    "quick": dict(train_rows=24, val_rows=6, test_rows=9, seq_len=128, steps=6, batch=4, keep="::10"),
    "cpu": dict(train_rows=1200, val_rows=60, test_rows=120, seq_len=256, steps=200, batch=8, keep="::10"),  # 410k
    "gpu": dict(train_rows=5400, val_rows=300, test_rows=300, seq_len=1024, steps=2000, batch=16, keep="::2",
                bf16=True),
}
ARMS = ("dense", "moe-v1", "moe-fair", "moe-fair-soft", "full", "full-moe")
BUDGET_ARMS = ("dense", "moe-v1", "moe-fair", "moe-fair-soft")
LR_GRID = {"lora": (3e-4, 1e-3, 3e-3, 1e-2), "full": (1e-5, 3e-5, 1e-4, 3e-4)}  # ≥ 3 values spanning ≥ 10×
SEEDS = (0, 1, 2)
# (arm, baseline): differences are taken seed by seed (same data order); the first block is the pre-registered test
PAIRS = (("moe-v1", "dense"), ("moe-fair", "dense"), ("moe-fair-soft", "dense"), ("full-moe", "full"),
         ("moe-fair", "moe-v1"))
METRICS = ("full_kl", "teacher_kl", "ppl", "top1_agree", "ece")
RESULTS = "benchmarks/results/quality_study_v2"
# one rule for every LoRA (experts, shared expert, attention, dense): rsLoRA, scale = alpha / sqrt(rank), with one
# fixed alpha, so adapters of different ranks change the function about equally per Adam step (docs/STUDENT.md);
# alpha 8 gives scale 2 at rank 16, v1's scale
LORA_RULE = dict(lora_scaling="rslora", alpha=8.0, attn_alpha=8.0)


# ================================================================ data and stores
def _stores(out: str, teacher: str, scale: dict, on_built=None) -> dict[str, str]:
    """The store of each split: one top-64 capture per split, rows tagged with their domain. `on_built(split,
    summary)` is called with each build's `BuildSummary` (what capturing it cost)."""
    from assets.corpora import write_domain_splits
    from benchmarks.common import complete_store
    from logit_store.build import BuildConfig, build
    from logit_store.teachers import load_teacher

    data = write_domain_splits(os.path.join(out, "data"))
    stores, engine = {}, None
    for split, rows in (("train", scale["train_rows"]), ("validation", scale["val_rows"]),
                        ("test", scale["test_rows"])):
        path = stores[split] = os.path.join(out, f"store-{split}")
        if complete_store(path):
            continue
        engine = engine or load_teacher("hf", teacher, dtype="float32")
        cfg = BuildConfig(teacher=teacher, data=data[split], out=path, backend="hf", text_field="text",
                          domain_field="domain", max_seq_len=scale["seq_len"], limit=rows, resume=True,
                          dtype="float32", top_k=64, progress=False)
        summary = build(cfg, teacher=engine)
        print(summary.format(), flush=True)
        if on_built is not None:
            on_built(split, summary)
    return stores


# ================================================================ arms
def arm_config(arm: str, stores: dict[str, str], teacher: str, scale: dict, lr: float, seed: int, run: str,
               shape: dict) -> TrainConfig:
    """The TrainConfig of one run. `shape` holds the matched ranks (`dense_rank`, `shared_rank`). Study v3's arms
    (`dense-split`, `moe-fair-fixed`) are here too; its long runs are `v3_config`'s."""
    steps = scale["steps"]
    common = dict(base=teacher, out=run, store=stores["train"], keep_layers=scale["keep"], batch_size=scale["batch"],
                  max_steps=steps, warmup_steps=max(steps // 20, 1), lr=lr, seed=seed, loss="fkl",
                  log_every=max(steps // 10, 1), save_every=max(steps // 4, 1), progress=False, loss_keep_logits=True,
                  bf16=scale.get("bf16", False), **LORA_RULE)
    moe_v1 = dict(experts=8, experts_per_token=2, rank=16, attn_rank=16)
    # (no shared-expert alpha without a shared expert: matched_shapes counts the shape at shared rank 0 too, and
    # the config refuses an alpha for a LoRA that is not there; the alpha changes no count)
    fair = dict(experts=8, experts_per_token=2, rank=8, attn_rank=shape["dense_rank"],
                shared_expert_rank=shape["shared_rank"],
                shared_expert_alpha=LORA_RULE["alpha"] if shape["shared_rank"] else None)
    arms = {"dense": dict(student="lora", rank=shape["dense_rank"]), "moe-v1": moe_v1, "moe-fair": fair,
            "moe-fair-soft": dict(fair, experts_per_token=8), "full": dict(student="full"),
            "full-moe": dict(moe_v1, train_base=True),
            # study v3's controls: moe-fair's adapters all on with weight 1 (no router), or routed by token-id hash
            "dense-split": dict(fair, experts_per_token=8, routing="all"),
            "moe-fair-fixed": dict(fair, routing="hash")}
    base_arm, _, variant = arm.partition("+")  # stage 3: "<arm>+bias" / "+nobalance" / "+mixtral"
    options = dict(common, **arms[base_arm])
    if variant == "bias":
        options.update(balance_coef=0.0, router_bias_update=1e-3)
    elif variant == "nobalance":
        options.update(balance_coef=0.0)
    elif variant and variant != "mixtral":
        raise ValueError(f"unknown balance variant {variant!r}")
    return TrainConfig(**options)


def matched_shapes(stores: dict[str, str], teacher: str, scale: dict) -> tuple[dict, dict[str, int]]:
    """The dense rank matching moe-v1's trainable count and the shared-expert rank that makes moe-fair's MLP budget
    the dense arm's; returns (shape, trainable count of every arm). Refuses budgets that miss by more than 1 %."""
    from student.baselines import count_parameters
    from student.train import build_model

    def count(arm: str, shape: dict) -> int:
        return count_parameters(build_model(arm_config(arm, stores, teacher, scale, 1e-3, 0, "", shape))).trainable

    target = count("moe-v1", dict(dense_rank=1, shared_rank=0))
    d1, d2 = count("dense", dict(dense_rank=1, shared_rank=0)), count("dense", dict(dense_rank=2, shared_rank=0))
    dense_rank = round(target / (d2 - d1))  # dense LoRA is linear in its rank with no constant part
    s0 = count("moe-fair", dict(dense_rank=dense_rank, shared_rank=0))
    s1 = count("moe-fair", dict(dense_rank=dense_rank, shared_rank=1))
    dense_total = count("dense", dict(dense_rank=dense_rank, shared_rank=0))
    shape = dict(dense_rank=dense_rank, shared_rank=max(round((dense_total - s0) / (s1 - s0)), 1))
    counts = {arm: count(arm, shape) for arm in ARMS}
    off = {arm: counts[arm] / counts["moe-v1"] - 1 for arm in BUDGET_ARMS}
    if any(abs(v) > 0.01 for v in off.values()):
        raise SystemExit(f"budget arms are not matched within 1 %: {off}")
    return shape, counts


# ================================================================ one run
def run_key(cfg: TrainConfig, stores: dict[str, str]) -> str:
    """What a result is valid for: the config (output folder aside) and the stores' fingerprints."""
    import hashlib

    from logit_store import LogitStore

    d = key_config(cfg)
    d["stores"] = {s: LogitStore.open(p).manifest.fingerprint() for s, p in stores.items()}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# where it runs and how fast (keeping logits is bitwise the same) do not change what a run computes
_KEY_IGNORED = ("out", "store", "base", "progress", "resume", "loss_keep_logits")
# the TrainConfig fields study v2's runs were keyed by (their JSONs' "config"); a field added to TrainConfig since
# enters a key only when set away from its default, so v2's committed runs keep their keys as options are added
_V2_FIELDS = frozenset((
    "alpha", "attn_alpha", "attn_rank", "balance_coef", "base", "base_dtype", "batch_size", "bf16", "ce_weight",
    "eval_every", "eval_rows", "eval_store", "expert_impl", "experts", "experts_per_token", "fsdp_frozen",
    "fsdp_replicas", "grad_accum", "gradient_checkpointing", "jsd_beta", "kd_weight", "keep_checkpoints",
    "keep_layers", "layer_experts", "log_every", "lora_dropout", "lora_scaling", "loss", "loss_chunk", "lr",
    "max_grad_norm", "max_steps", "moe_layers", "num_workers", "out", "progress", "rank", "resume",
    "router_bias_update", "router_init_std", "router_lr_scale", "save_every", "seed", "sharding",
    "shared_expert_alpha", "shared_expert_rank", "shuffle", "shuffle_buffer", "skew_alpha", "store", "student",
    "temperature", "train_base", "warmup_steps", "weight_decay", "z_coef"))


def key_config(cfg: TrainConfig) -> dict:
    """The settings a run's key hashes: the config less where it runs, less fields newer than v2 at their default."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                for f in dataclasses.fields(cfg)}
    return {k: v for k, v in cfg.to_dict().items()
            if k not in _KEY_IGNORED and (k in _V2_FIELDS or v != defaults[k])}


def result_path(results: str, arm: str, lr: float, seed: int) -> str:
    return os.path.join(results, "runs", f"{arm}_lr{lr:g}_s{seed}.json")


class Teacher:
    """The live teacher (fp32), loaded once per process, for the full-vocabulary KL. Its last hidden states are kept
    per batch, so every evaluation after the first runs only the LM head (the logits are the same computation)."""

    def __init__(self, path: str, device: str):
        self.path, self.device, self._model, self._hidden = path, device, None, {}

    @property
    def model(self):
        if self._model is None:
            from student.convert import load_base

            self._model = load_base(self.path)[0].to(self.device)
        return self._model

    def logits(self, key: tuple, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        if key not in self._hidden:
            self._hidden[key] = self.model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        return self.model.lm_head(self._hidden[key])


def _domain_batches(store: str, batch: int, device: str):
    """(domain, first row, input_ids, attention_mask, loss_mask) over `store` in batches that hold one domain each."""
    from logit_store import LogitStore
    from logit_store.stream import collate

    opened = LogitStore.open(store)
    rows_by_domain: dict[str, list] = {}
    for row in opened:
        rows_by_domain.setdefault(row.domain, []).append(row)
    for domain, rows in sorted(rows_by_domain.items()):
        for lo in range(0, len(rows), batch):
            b = collate(rows[lo:lo + batch], domains=opened.manifest.domain_names)
            yield (domain, lo, *(b[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask")))


def _by_domain(tallies: dict) -> dict:
    """Per-domain RoutingTally results as the study records them: each MoE layer's expert load (share of routed
    assignments) and mean routing weight per domain. Do experts specialise? Under soft routing only the weights
    can say (the load is even)."""
    results = {d: t.result() for d, t in tallies.items()}
    if not any(results.values()):  # a dense student
        return {}
    return {"expert_load_by_domain": {d: r["expert_usage"] for d, r in results.items()},
            "routing_weight_by_domain": {d: r["routing_weights"] for d, r in results.items()}}


@torch.no_grad()
def full_vocab_kl(teacher: Teacher, store: str, model, batch: int, device: str) -> dict:
    """KL(teacher || student) over the whole vocabulary per token, pooled and per domain, with the teacher run live;
    for MoE students also each MoE layer's routing per domain (`_by_domain`)."""
    from student.router_loss import RoutingTally, count_only

    sums, tokens, routing = {}, {}, {}
    for domain, lo, ids, attn, mask in _domain_batches(store, batch, device):
        t_lp = teacher.logits((store, domain, lo), ids, attn)[mask].float().log_softmax(-1)
        count_only(model, attn)  # (a no-op for a dense student, whose tallies stay empty)
        s_lp = model(input_ids=ids, attention_mask=attn).logits[mask].float().log_softmax(-1)
        n = int(mask.sum())
        sums[domain] = sums.get(domain, 0.0) + float((t_lp.exp() * (t_lp - s_lp)).sum())
        tokens[domain] = tokens.get(domain, 0) + n
        routing.setdefault(domain, RoutingTally()).add_forward(model)
    return {"full_kl": sum(sums.values()) / sum(tokens.values()),
            "full_kl_by_domain": {d: sums[d] / tokens[d] for d in sums}, **_by_domain(routing)}


@torch.no_grad()
def routing_by_domain(store: str, model, batch: int, device: str) -> tuple[dict, dict]:
    """A MoE student's routing alone (its body, no teacher, no LM head), for runs measured before the weights were
    recorded: (`_by_domain` of it, its RoutingTally pooled over domains)."""
    from student.router_loss import RoutingTally, count_only

    tallies: dict[str, RoutingTally] = {}
    for domain, _, ids, attn, _ in _domain_batches(store, batch, device):
        count_only(model, attn)
        model.base_model(input_ids=ids, attention_mask=attn)
        tallies.setdefault(domain, RoutingTally()).add_forward(model)
    pooled = RoutingTally()
    for t in tallies.values():
        pooled.add(t)
    return _by_domain(tallies), pooled.result()


def stage_routing(ctx: dict) -> None:
    """Adds `routing_weight_by_domain` and `routing_weights` (pooled over the split, as `kdstudent eval` reports
    it) to finished MoE runs measured without them (the runs trained at commit 238f47e, whose evaluation recorded
    the load only), from each finished run's last checkpoint. Two recorded figures are measured again on the way
    and must match (to 1e-3 — room for a rare top-k tie flipped by rounding; another checkpoint is off by far more):
    the load per domain (even under soft routing, so not enough alone) and the effective experts per token (the
    weights' ESS): the checkpoint is the run that was measured. Finished runs' JSONs are never rewritten by the
    stages that train, so this may run beside them."""
    from student.train import load_trained

    folder = os.path.join(ctx["results"], "runs")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        cached = _read(path)
        test = cached["eval"].get("test", {})
        if "expert_load_by_domain" not in test or {"routing_weight_by_domain", "routing_weights"} <= test.keys():
            continue
        run = os.path.join(ctx["out"], "runs", name.removesuffix(".json"))
        if not os.path.isdir(os.path.join(run, "final")):
            print(f"{name}: {run} holds no finished run; its routing weights stay unmeasured", flush=True)
            continue
        model = load_trained(run, ctx["device"])
        found, pooled = routing_by_domain(ctx["stores"]["test"], model, ctx["scale"]["batch"], ctx["device"])
        off = max([abs(a - b) for domain, layers in test["expert_load_by_domain"].items()
                   for layer, load in layers.items()
                   for a, b in zip(load, found["expert_load_by_domain"][domain][layer], strict=True)]
                  + [abs(r["effective_experts_per_token"] - pooled["routing"][layer]["effective_experts_per_token"])
                     for layer, r in test["routing"].items()])
        if off > 1e-3:
            raise SystemExit(f"{name}: the checkpoint under {run} routes tokens differently from the recorded "
                             f"evaluation (off by {off:.2g}); not the run that was measured")
        test["routing_weight_by_domain"] = found["routing_weight_by_domain"]
        test["routing_weights"] = pooled["routing_weights"]
        _write_json_atomic(path, cached)
        print(f"{name}: routing weights added (recorded routing reproduced to {off:.1g})", flush=True)


def run_one(arm: str, lr: float, seed: int, split: str, ctx: dict, train_missing: bool = True) -> dict | None:
    """Train (or resume) one run and measure it on `split`; the result is cached under RESULTS. None when another
    process holds the run, or when it has no result and `train_missing` is False."""
    from student.evaluate import evaluate
    from student.run import RunLock, RunLockedError, is_run
    from student.train import load_trained, train

    path = result_path(ctx["results"], arm, lr, seed)
    run = os.path.join(ctx["out"], "runs", f"{arm}_lr{lr:g}_s{seed}")
    if ctx.get("study") == "v3":
        cfg = v3_config(arm, ctx["stores"], ctx["teacher"].path, ctx["scale"], lr, seed, run, ctx["shape"])
    else:
        cfg = arm_config(arm, ctx["stores"], ctx["teacher"].path, ctx["scale"], lr, seed, run, ctx["shape"])
    key = run_key(cfg, ctx["stores"])
    cached = _read(path)
    if cached and cached["key"] == key and split in cached["eval"]:
        return cached
    if not train_missing:
        return None
    try:  # one process per run; the kernel drops the lock if it dies (no stale claim, whatever the pids)
        claim = RunLock(os.path.join(run, "study-claim"))
    except RunLockedError:
        print(f"{arm} lr {lr:g} seed {seed}: held by another process", flush=True)
        return None
    with claim:
        cached = _read(path)  # another process may have finished it meanwhile
        if cached and cached["key"] == key and split in cached["eval"]:
            return cached
        t = time.time()
        if not (cached and cached["key"] == key):
            train(dataclasses.replace(cfg, resume=is_run(run)))
            cached = dict(arm=arm, lr=lr, seed=seed, key=key, train_s=round(time.time() - t, 1), eval={},
                          config=cfg.to_dict())
        model = load_trained(run, ctx["device"])
        store, scale = ctx["stores"][split], ctx["scale"]
        result = evaluate(model, store, batch_size=scale["batch"], device=ctx["device"])
        result.update(full_vocab_kl(ctx["teacher"], store, model, scale["batch"], ctx["device"]))
        cached["eval"][split] = result
        _write_json_atomic(path, cached)
    print(f"{arm:14s} lr {lr:<7g} seed {seed} {split:10s} full_kl {result['full_kl']:.4f} "
          f"teacher_kl {result['teacher_kl']:.4f} ppl {result['ppl']:.1f}", flush=True)
    return cached


# ================================================================ stages
def stage_lr(arm: str, ctx: dict, train_missing: bool = True, whole_grid: bool = True) -> float | None:
    """Stage 1: seed 0 at learning rates of the arm's grid, chosen on validation full-vocabulary KL. The best value is
    bracketed first — the middle of the grid, then one missing neighbour of the best so far at a time (the one
    above first), the grid growing by a half-decade beyond an edge whenever the best sits on it — so that a stage
    cut short by time still leaves a choice; with `whole_grid` the rest of the grid runs too and the choice is the
    best of all of it. None while a run it needs is missing (`train_missing` False) or held by another process."""
    grid = list(LR_GRID["full" if arm.startswith("full") else "lora"])
    kl: dict[float, float] = {}
    todo = [grid[len(grid) // 2]]
    while todo:
        for lr in todo:
            result = run_one(arm, lr, 0, "validation", ctx, train_missing)
            if result is None:
                return None
            kl[lr] = result["eval"]["validation"]["full_kl"]
        best = min(kl, key=kl.get)
        if best == grid[0]:
            grid.insert(0, _round_lr(grid[0] / math.sqrt(10)))
        elif best == grid[-1]:
            grid.append(_round_lr(grid[-1] * math.sqrt(10)))
        i = grid.index(best)
        todo = [lr for lr in (grid[i + 1], grid[i - 1]) if lr not in kl][:1]
        if not todo and whole_grid:
            todo = [lr for lr in grid if lr not in kl]
    return best


def grid_not_run(arm: str, ctx: dict) -> list[float]:
    """The arm's pre-registered grid values that have no stage-1 result yet."""
    return [lr for lr in LR_GRID["full" if arm.startswith("full") else "lora"]
            if run_one(arm, lr, 0, "validation", ctx, train_missing=False) is None]


def _round_lr(lr: float) -> float:
    return float(f"{lr:.1g}")


def choice(arm: str, ctx: dict, train_missing: bool = True) -> float | None:
    """The arm's stage-1 choice: the best of its whole grid once that has run, else the bracketed best (training
    the runs that bracket it, unless `train_missing` is False); None while those are missing."""
    lr = stage_lr(arm, ctx, train_missing=False)
    return lr if lr is not None else stage_lr(arm, ctx, train_missing, whole_grid=False)


def chosen_lrs(arms: list[str], ctx: dict) -> dict[str, float]:
    """Each arm's stage-1 choice (`choice`), for the stages that follow."""
    chosen = {}
    for arm in arms:
        lr = choice(arm, ctx)
        if lr is None:
            raise SystemExit(f"stage 1 is not finished for {arm}: run --stage lr")
        chosen[arm] = lr
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=["v2", "v3"], default="v2")
    p.add_argument("--stage", choices=["lr", "seeds", "balance", "routing", "long", "generate", "report"],
                   default="report",
                   help="v2: lr, seeds, balance, routing, report; v3: lr, seeds, long, generate, report")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--arms", default=None, help=f"a comma list (v2 default: {','.join(ARMS)}; v3: "
                   f"{','.join(V3_ARMS)}, and for --stage long {','.join(V3_LONG_ARMS)})")
    p.add_argument("--seeds", default=None, help=f"the seeds stage (v2: 2, v3: B) or long runs (a comma list; "
                   f"v2 default {','.join(map(str, SEEDS))}; v3 {','.join(map(str, V3_SEEDS))}, long "
                   f"{','.join(map(str, V3_LONG_SEEDS))})")
    p.add_argument("--no-recheck", action="store_true", help="v3 --stage long: skip the LR re-check at 4x")
    p.add_argument("--out", default=None, help="runs and stores (default ~/.cache/moekd/quality-study-<study>)")
    p.add_argument("--json", default=None, help="report of the cpu scale (other scales write to --out; default "
                   f"{RESULTS}.json, v3 {V3_RESULTS}.json)")
    args = p.parse_args(argv)
    if args.study == "v3":
        return main_v3(args)
    if args.stage in ("long", "generate"):
        p.error(f"--stage {args.stage} is study v3's: add --study v3")
    args.arms = args.arms or ",".join(ARMS)
    args.seeds = args.seeds or ",".join(map(str, SEEDS))
    args.out = args.out or os.path.expanduser("~/.cache/moekd/quality-study-v2")
    args.json = args.json or f"{RESULTS}.json"
    from assets.smollm2 import prepared_teacher_dir

    teacher = prepared_teacher_dir()
    if not os.path.exists(os.path.join(teacher, "config.json")):
        raise SystemExit("the teacher is not prepared: run `make teacher` first")
    scale = SCALES[args.scale]
    out = os.path.join(args.out, args.scale)
    os.makedirs(out, exist_ok=True)
    stores = _stores(out, teacher, scale)
    shape, counts = matched_shapes(stores, teacher, scale)
    print(f"shapes {shape}; trainable " + ", ".join(f"{a} {n:,}" for a, n in counts.items()), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # only the CPU study's results are committed (resumable across sessions); other scales keep theirs in --out
    results = RESULTS if args.scale == "cpu" else os.path.join(out, "results")
    ctx = dict(out=out, results=results, stores=stores, scale=scale, shape=shape, device=device,
               teacher=Teacher(teacher, device))
    arms = args.arms.split(",")
    if args.stage == "lr":
        for arm in arms:
            lr = stage_lr(arm, ctx)
            print(f"stage 1 {arm}: " + (f"LR {lr:g}" if lr else "runs held by other processes"), flush=True)
        return 0
    if args.stage == "seeds":
        for arm, lr in chosen_lrs(arms, ctx).items():
            for seed in (int(s) for s in args.seeds.split(",")):
                run_one(arm, lr, seed, "test", ctx)
        return 0
    if args.stage == "routing":
        stage_routing(ctx)
        return 0
    if args.stage == "balance":
        # balancing acts on top-k selection: soft routing (every token through every expert) has nothing to balance
        lrs = chosen_lrs([a for a in arms if a.startswith("moe") and not a.endswith("-soft")], ctx)
        if not lrs:
            raise SystemExit(f"stage 3 needs a top-k MoE arm among --arms {args.arms}")
        best = min(lrs, key=lambda a: statistics.mean(
            _read(result_path(ctx["results"], a, lrs[a], s))["eval"]["test"]["full_kl"] for s in SEEDS))
        for variant in ("bias", "nobalance"):
            for seed in SEEDS:
                run_one(f"{best}+{variant}", lrs[best], seed, "test", ctx)
        return 0
    report(arms, ctx, counts, args.json if args.scale == "cpu" else os.path.join(out, "quality_study_v2.json"))
    return 0


def main_v3(args: argparse.Namespace) -> int:
    """Study v3's stages (docs/RESULTS.md, 'Study v3: protocol'); same stores, shapes and run machinery as v2's."""
    if args.stage in ("balance", "routing"):
        raise SystemExit(f"--stage {args.stage} is study v2's; v3 has lr, seeds, long, generate, report")
    from assets.smollm2 import prepared_teacher_dir

    teacher = prepared_teacher_dir()
    if not os.path.exists(os.path.join(teacher, "config.json")):
        raise SystemExit("the teacher is not prepared: run `make teacher` first")
    scale = SCALES[args.scale]
    out = os.path.join(args.out or os.path.expanduser("~/.cache/moekd/quality-study-v3"), args.scale)
    os.makedirs(out, exist_ok=True)
    stores = _stores(out, teacher, scale)
    shape, counts = matched_shapes(stores, teacher, scale)  # v2's shapes (dense rank, shared rank)
    counts |= v3_counts(stores, teacher, scale, shape)
    print(f"shapes {shape}; trainable " + ", ".join(f"{a} {counts[a]:,}" for a in V3_ARMS)
          + " (off dense: " + ", ".join(f"{a} {counts[a] / counts['dense'] - 1:+.2%}" for a in V3_ARMS) + ")",
          flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = V3_RESULTS if args.scale == "cpu" else os.path.join(out, "results")
    ctx = dict(study="v3", out=out, results=results, stores=stores, scale=scale, shape=shape, device=device,
               teacher=Teacher(teacher, device))
    long_stage = args.stage == "long"
    arms = args.arms.split(",") if args.arms else list(V3_LONG_ARMS if long_stage else V3_ARMS)
    allowed = V3_LONG_ARMS if long_stage else V3_ARMS
    if args.stage in ("lr", "seeds", "long") and not set(arms) <= set(allowed):
        raise SystemExit(f"--arms {args.arms}: study v3's --stage {args.stage} takes {', '.join(allowed)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(V3_LONG_SEEDS if long_stage else V3_SEEDS)
    if args.stage == "lr":
        for arm in arms:
            lr, _ = v3_stage_lr(arm, ctx)
            print(f"stage A {arm}: " + (f"LR {lr:g}" if lr else "runs held by other processes"), flush=True)
    elif args.stage == "seeds":
        for arm, lr in v3_chosen(arms, ctx).items():
            for seed in seeds:
                run_one(arm, lr, seed, "test", ctx)
    elif args.stage == "long":
        v3_stage_long(arms, seeds, ctx, recheck=not args.no_recheck)
    elif args.stage == "generate":
        v3_stage_generate(ctx, args.arms.split(",") if args.arms else None)
    else:
        v3_report(ctx, counts, args.json or (f"{V3_RESULTS}.json" if args.scale == "cpu"
                                             else os.path.join(out, "quality_study_v3.json")))
    return 0


# ================================================================ report
def report(arms: list[str], ctx: dict, counts: dict[str, int], json_path: str) -> None:
    from benchmarks.common import write_json

    chosen = {arm: choice(arm, ctx, train_missing=False) for arm in arms}  # trains nothing
    lrs = {arm: lr for arm, lr in chosen.items() if lr is not None}
    pending = [arm for arm, lr in chosen.items() if lr is None]
    # a choice made before the rest of its grid ran (bracketed, provisional): the grid values it lacks
    provisional = {arm: missing for arm in lrs if (missing := grid_not_run(arm, ctx))}
    results = ctx["results"]
    grid = {arm: {r["lr"]: r["eval"]["validation"]["full_kl"] for r in map(_read, _runs_of(results, arm)) if r
                  and r["seed"] == 0 and "validation" in r["eval"]} for arm in arms}
    runs = {arm: [r for s in SEEDS if (r := _read(result_path(results, arm, lrs[arm], s))) and "test" in r["eval"]]
            for arm in lrs}
    folder = os.path.join(results, "runs")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    variants = sorted({n.split("_lr")[0] for n in names if "+" in n and n.split("+")[0] in lrs})
    for v in variants:
        base = v.split("+")[0]
        runs[v] = [r for s in SEEDS if (r := _read(result_path(results, v, lrs[base], s))) and "test" in r["eval"]]
    summary = {arm: _arm_summary(arm, lrs.get(arm.split("+")[0]), counts.get(arm.split("+")[0]), rs)
               for arm, rs in runs.items() if rs}
    diffs = _paired(runs, list(PAIRS) + [(v, v.split("+")[0]) for v in variants])
    print(_format(summary, diffs, grid))
    if pending:
        print(f"stage 1 unfinished (runs missing) for: {', '.join(pending)}")
    for arm, missing in provisional.items():
        print(f"{arm}: LR {lrs[arm]:g} bracketed; grid values not run yet: {', '.join(f'{lr:g}' for lr in missing)}")
    write_json(json_path, {"protocol": "docs/RESULTS.md (study v2)", "settings": ctx["scale"], "shape": ctx["shape"],
                           "lr_grid_validation_full_kl": grid, "stage1_unfinished": pending,
                           "stage1_grid_not_run": provisional, "arms": summary, "paired_differences": diffs})
    if summary:
        _plot(summary, os.path.splitext(json_path)[0] + ".png")


def _runs_of(results: str, arm: str) -> list[str]:
    folder = os.path.join(results, "runs")
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith(arm + "_lr")]


def _arm_summary(arm: str, lr: float | None, trainable: int | None, runs: list[dict]) -> dict:
    from student.router_loss import effective_experts

    tests = [r["eval"]["test"] for r in runs]
    out = {"lr": lr, "trainable": trainable, "seeds": [r["seed"] for r in runs],
           "per_seed": [{m: t[m] for m in (*METRICS, "full_kl_by_domain")} for t in tests]}
    for m in METRICS:
        values = [t[m] for t in tests]
        out[m] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    if all("expert_usage" in t for t in tests):  # exp(entropy) of each MoE layer's load: 8 = even, 1 = collapsed
        layers = list(tests[0]["expert_usage"])
        out["effective_experts"] = {
            layer: statistics.mean(effective_experts(t["expert_usage"][layer]) for t in tests) for layer in layers}
        if all("routing_weights" in t for t in tests):  # the same of the mean routing weight: output mass
            out["effective_experts_by_weight"] = {
                layer: statistics.mean(effective_experts(t["routing_weights"][layer]) for t in tests)
                for layer in layers}
        for name in ("expert_load_by_domain", "routing_weight_by_domain"):  # seed 0's
            out[name] = tests[0].get(name)
    return out


# two-sided 95 % Student-t quantiles by degrees of freedom (no scipy here)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _paired(runs: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> dict:
    """arm − baseline per seed: mean, std, 95 % CI half-width, and the verdict of the pre-registered rule."""
    out = {}
    for arm, base in pairs:
        a = {r["seed"]: r["eval"]["test"] for r in runs.get(arm, [])}
        b = {r["seed"]: r["eval"]["test"] for r in runs.get(base, [])}
        seeds = sorted(set(a) & set(b))
        if len(seeds) < 2:
            continue
        row = {}
        for m in METRICS:
            d = [a[s][m] - b[s][m] for s in seeds]
            sd = statistics.stdev(d)
            half = _T95.get(len(d) - 1, 1.96) * sd / len(d) ** 0.5
            row[m] = (statistics.mean(d), sd, half)
        mean, _, half = row["full_kl"]
        row["verdict"] = "better" if mean + half < 0 else "worse" if mean - half > 0 else "no difference shown"
        out[f"{arm} - {base}"] = row
    return out


def _format(summary: dict, diffs: dict, grid: dict) -> str:
    lines = ["\nstage 1 (validation full-vocabulary KL, seed 0):"]
    for arm, g in grid.items():
        lines.append(f"  {arm:18s} " + "  ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(g.items())))
    head = f"{'':18s} {'lr':>7s} {'trainable':>11s} " + " ".join(f"{m:>10s}" + " " * 11 for m in METRICS)
    lines += ["stage 2 (test, mean ± std over seeds):", head]
    for arm, row in summary.items():
        lines.append(f"{arm:18s} {row['lr'] or 0:7.0e} {row['trainable'] or 0:11,d} "
                     + " ".join(f"{row[m][0]:10.4g} ± {row[m][1]:<8.2g}" for m in METRICS))
    routed = {arm: row for arm, row in summary.items() if "effective_experts" in row}
    if routed:
        lines += ["routing (effective experts per MoE layer, mean of seeds: by load / by mean routing weight):"]
        for arm, row in routed.items():
            by_weight = row.get("effective_experts_by_weight", {})
            lines.append(f"{arm:18s} " + "  ".join(
                f"layer {layer}: {n:.2f} / " + (f"{by_weight[layer]:.2f}" if layer in by_weight else "-")
                for layer, n in row["effective_experts"].items()))
    if diffs:
        lines += ["paired differences (per seed: mean ± 95 % CI half-width; * = CI excludes 0)"]
        for pair, row in diffs.items():
            lines.append(f"{pair:29s} " + " ".join(
                f"{row[m][0]:+10.4g} ± {row[m][2]:<7.2g}{'*' if abs(row[m][0]) > row[m][2] else ' '}" for m in METRICS)
                + f"  {row['verdict']}")
    return "\n".join(lines)


def _plot(summary: dict, path: str) -> None:
    """Per metric: every seed as a dot, mean ± std as a bar, a row for the budget arms, one for stage 3's balance
    variants beside their arm, and one for the full fine-tune pair (whose scale would flatten the budget arms'
    differences); then each MoE arm's expert load per domain, or its mean routing weight per domain under soft
    routing (whose load is even by construction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def varies(by_domain: dict | None) -> bool:
        return bool(by_domain) and len({round(f, 9) for ls in by_domain.values() for v in ls.values() for f in v}) > 1

    full = [a for a in summary if a.startswith("full")]
    variants = [a for a in summary if "+" in a]
    balance = [a for a in summary if a in {v.split("+")[0] for v in variants}] + variants
    groups = [g for g in ([a for a in summary if a not in full and a not in variants], balance, full) if g]
    maps = {}
    for arm, s in summary.items():
        if varies(s.get("expert_load_by_domain")):
            maps[arm] = ("load", s["expert_load_by_domain"])
        elif varies(s.get("routing_weight_by_domain")):
            maps[arm] = ("routing weight", s["routing_weight_by_domain"])
    rows = len(groups) + len(maps)
    fig = plt.figure(figsize=(4 * len(METRICS), 3.6 * rows))
    for g, arms in enumerate(groups):
        for i, m in enumerate(METRICS):
            ax = fig.add_subplot(rows, len(METRICS), g * len(METRICS) + i + 1)
            for j, arm in enumerate(arms):
                values = [s[m] for s in summary[arm]["per_seed"]]
                ax.plot([j] * len(values), values, "o", color="C0", alpha=0.5, ms=4)
                ax.errorbar(j + 0.15, summary[arm][m][0], yerr=summary[arm][m][1], fmt="s", color="C1", capsize=3,
                            ms=5)
            ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right")
            ax.set_xlim(-0.5, len(arms) - 0.5)
            ax.set_title(m)
    for r, (arm, (what, by_domain)) in enumerate(maps.items(), start=len(groups)):
        domains = sorted(by_domain)
        layers = sorted(by_domain[domains[0]], key=int)
        for c, layer in enumerate(layers[: len(METRICS)]):
            ax = fig.add_subplot(rows, len(METRICS), r * len(METRICS) + c + 1)
            ax.imshow([by_domain[d][layer] for d in domains], aspect="auto", cmap="viridis", vmin=0)
            ax.set_yticks(range(len(domains)), domains)
            ax.set_xlabel("expert")
            ax.set_title(f"{arm}: layer {layer} {what} by domain", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ================================================================ study v3
# docs/RESULTS.md, "Study v3: protocol (pre-registered 2026-12-07, before any v3 run)": what each constant below
# encodes is quoted from there; a change to any of them is a change to the protocol
V3_RESULTS = "benchmarks/results/quality_study_v3"
V3_ARMS = ("dense", "moe-fair", "dense-split", "moe-fair-fixed")
V3_LR_CENTRE = 3e-3  # v2's choice, around which stage A's grid is laid in √2 steps
V3_LR_STEPS = (-2, -1, 0, 1, 2)  # 1.5e-3, 2.1e-3, 3e-3, 4.2e-3, 6e-3; a best on an edge adds one step beyond it
V3_MAX_EXTENSIONS = 6  # a guard, not a rule: a best still on an edge after 6 extensions stops the stage to be looked at
V3_SEEDS = (0, 1, 2, 3, 4)
# the four primary comparisons (arm, baseline), test full KL paired by seed, Holm over the four at family-wise α
V3_PRIMARY = (("moe-fair", "dense"), ("dense-split", "dense"), ("moe-fair", "dense-split"),
              ("moe-fair", "moe-fair-fixed"))
V3_ALPHA = 0.05
V3_LONG = "-4x"  # stage C's runs are arms named '<arm>-4x': 4× the steps, the rest of the run unchanged
V3_LONG_FACTOR = 4
V3_LONG_ARMS = ("dense", "moe-fair")
V3_LONG_SEEDS = (0, 1, 2)
V3_FULL = {"full": 3e-3, "full-moe": 3e-3}  # stage D: v2's chosen LR of the full pair, 3 seeds
V3_FULL_SEEDS = (0, 1, 2)
# stage D: test prompts = the first 64 tokens of each test row; 4 samples of 128 tokens at temperature 1 per prompt
# (reverse KL); the student's and the teacher's greedy responses of 128 tokens (ROUGE-L). The quick scale shrinks it.
V3_GENERATE = {"cpu": dict(prompt_tokens=64, new_tokens=128, samples=4, temperature=1.0, seed=12345, max_seq_len=256),
               "quick": dict(prompt_tokens=16, new_tokens=8, samples=2, temperature=1.0, seed=12345, max_seq_len=64)}
GEN_METRICS = ("reverse_kl", "rouge_l")
# the teacher in stage D as in every capture of the study: hf, fp32 (kdstore build's default for top-k is vllm)
TEACHER_BACKEND = ("--backend", "hf", "--dtype", "float32")


def v3_lr(step: int) -> float:
    """Stage A's grid: v2's choice times √2^step, at two significant figures (2.1e-3 for 2.12e-3)."""
    return float(f"{V3_LR_CENTRE * 2 ** (step / 2):.2g}")


def v3_step(lr: float) -> int:
    step = round(2 * math.log2(lr / V3_LR_CENTRE))
    if v3_lr(step) != lr:
        raise ValueError(f"LR {lr:g} is not on study v3's √2 grid")
    return step


def v3_config(arm: str, stores: dict[str, str], teacher: str, scale: dict, lr: float, seed: int, run: str,
              shape: dict) -> TrainConfig:
    """A v3 run's TrainConfig: `arm_config`'s, and for stage C's '<arm>-4x' the same run with 4× the steps (warmup
    stays 10 steps at the cpu scale: the protocol keeps "warmup 10 then cosine" and changes only the length)."""
    if not arm.endswith(V3_LONG):
        return arm_config(arm, stores, teacher, scale, lr, seed, run, shape)
    steps = scale["steps"]
    cfg = arm_config(arm.removesuffix(V3_LONG), stores, teacher, dict(scale, steps=steps * V3_LONG_FACTOR), lr,
                     seed, run, shape)
    return dataclasses.replace(cfg, warmup_steps=max(steps // 20, 1))


def v3_counts(stores: dict[str, str], teacher: str, scale: dict, shape: dict) -> dict[str, int]:
    """Each v3 arm's trainable count; refuses counts more than 1 % from `dense`'s (the protocol's matching)."""
    from student.baselines import count_parameters
    from student.train import build_model

    counts = {arm: count_parameters(build_model(arm_config(arm, stores, teacher, scale, 1e-3, 0, "", shape))).trainable
              for arm in V3_ARMS}
    off = {arm: counts[arm] / counts["dense"] - 1 for arm in V3_ARMS}
    if any(abs(v) > 0.01 for v in off.values()):
        raise SystemExit(f"study v3's arms are not matched within 1 % of dense: {off}")
    return counts


def v3_stage_lr(arm: str, ctx: dict, train_missing: bool = True) -> tuple[float | None, dict[float, float]]:
    """Stage A: seed 0 at every LR of the grid (the middle first, then outwards; the order changes no number), chosen
    by the lowest validation full KL; a best on an edge adds one √2 step beyond it and the stage repeats for it.
    Returns (the choice, or None while a run is missing or held by another process; {lr: validation full KL})."""
    steps, kl = list(V3_LR_STEPS), {}
    for _ in range(V3_MAX_EXTENSIONS + 1):
        missing = False
        for step in sorted(steps, key=abs):
            lr = v3_lr(step)
            if lr in kl:
                continue
            result = run_one(arm, lr, 0, "validation", ctx, train_missing)
            if result is None:
                missing = True
                continue
            kl[lr] = result["eval"]["validation"]["full_kl"]
        if missing:
            return None, kl
        best = min(kl, key=kl.get)
        if best == v3_lr(steps[0]):
            steps.insert(0, steps[0] - 1)
        elif best == v3_lr(steps[-1]):
            steps.append(steps[-1] + 1)
        else:
            return best, kl
    raise SystemExit(f"stage A {arm}: the best LR is still on the grid's edge after {V3_MAX_EXTENSIONS} extensions "
                     f"({ {f'{k:g}': v for k, v in sorted(kl.items())} }); look at the curve before going on")


def v3_chosen(arms: list[str], ctx: dict) -> dict[str, float]:
    """Each arm's stage-A choice, for the stages that follow (trains nothing)."""
    chosen = {}
    for arm in arms:
        lr, _ = v3_stage_lr(arm, ctx, train_missing=False)
        if lr is None:
            raise SystemExit(f"stage A is not finished for {arm}: run --study v3 --stage lr")
        chosen[arm] = lr
    return chosen


def v3_recheck_lrs(lr: float) -> tuple[float, float, float]:
    """Stage C's LR re-check at 4× the tokens: the stage-A choice and one √2 step each side."""
    step = v3_step(lr)
    return v3_lr(step - 1), lr, v3_lr(step + 1)


def v3_stage_long(arms: list[str], seeds: list[int], ctx: dict, recheck: bool) -> None:
    """Stage C: each arm at 4× the steps, at its stage-A LR, on test; then (if `recheck`) the LR re-check on
    validation, seed 0 (the seed-0 run at the chosen LR is measured on validation too)."""
    chosen = v3_chosen(arms, ctx)
    for arm in arms:
        for seed in seeds:
            run_one(arm + V3_LONG, chosen[arm], seed, "test", ctx)
    if recheck:
        for arm in arms:
            for lr in v3_recheck_lrs(chosen[arm]):
                run_one(arm + V3_LONG, lr, 0, "validation", ctx)


def v3_generation_runs(ctx: dict, train_missing: bool, arms: list[str] | None = None) -> list[tuple[str, float, int]]:
    """Stage D's runs as (arm, LR, seed): the four arms' stage-B runs, the full pair at v2's LR, stage C's runs
    (of `arms` only, when given: processes may share the stage by arm)."""
    runs = []
    for arm in V3_ARMS:
        if arms is not None and arm not in arms:
            continue
        lr, _ = v3_stage_lr(arm, ctx, train_missing=False)
        if lr is None:
            if train_missing:
                raise SystemExit(f"stage A is not finished for {arm}: run --study v3 --stage lr")
            continue
        runs += [(arm, lr, s) for s in V3_SEEDS]
        if arm in V3_LONG_ARMS:
            runs += [(arm + V3_LONG, lr, s) for s in V3_LONG_SEEDS]
    runs += [(arm, lr, s) for arm, lr in V3_FULL.items() for s in V3_FULL_SEEDS if arms is None or arm in arms]
    return runs


def _checkpoint(arm: str, lr: float, seed: int, ctx: dict) -> tuple[str, dict] | None:
    """The run's folder, with its final checkpoint, and its result (trained and measured on test where missing;
    retrained under the same config where the result is here but its checkpoint is gone, e.g. another machine's).
    None while another process holds the run."""
    from student.run import RunLock, RunLockedError, is_run
    from student.train import train

    record = run_one(arm, lr, seed, "test", ctx)
    if record is None:
        return None
    run = os.path.join(ctx["out"], "runs", f"{arm}_lr{lr:g}_s{seed}")
    if not os.path.isdir(os.path.join(run, "final")):
        try:
            claim = RunLock(os.path.join(run, "study-claim"))
        except RunLockedError:
            return None
        with claim:
            if not os.path.isdir(os.path.join(run, "final")):
                print(f"{arm} lr {lr:g} seed {seed}: checkpoint gone, retraining it for stage D", flush=True)
                cfg = v3_config(arm, ctx["stores"], ctx["teacher"].path, ctx["scale"], lr, seed, run, ctx["shape"])
                train(dataclasses.replace(cfg, resume=is_run(run)))
    return run, record


def v3_generate_setup(ctx: dict) -> dict:
    """The test prompts and the teacher's greedy responses to them (a store, for ROUGE-L); built once."""
    from pathlib import Path

    from benchmarks.common import cli, complete_store
    from benchmarks.onpolicy_rounds import write_prompts

    g = V3_GENERATE["quick" if ctx["scale"] is SCALES["quick"] else "cpu"]
    folder = Path(ctx["out"]) / "generate"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(ctx["stores"]["test"], folder / "test-prompts.jsonl", ctx["scale"]["test_rows"],
                            g["prompt_tokens"])
    responses = folder / "teacher-greedy-test"
    if not complete_store(responses):
        cli(["cli.kdstore", "build", "--teacher", ctx["teacher"].path, "--data", str(prompts), "--input-ids-field",
             "prompt_ids", "--domain-field", "domain", "--generate", "--temperature", "0", "--max-new-tokens",
             str(g["new_tokens"]), "--max-seq-len", str(g["max_seq_len"]), "--top-k", "64", "--out", str(responses),
             *TEACHER_BACKEND, "--progress", "false", *(["--resume"] if responses.exists() else [])], {},
            "teacher_greedy_s")
    return dict(settings=g, folder=folder, prompts=prompts, responses=str(responses))


def v3_generations(arm: str, lr: float, seed: int, ctx: dict, gen: dict) -> dict | None:
    """Stage D for one run: its samples on the test prompts (hf backend, which serves every arm, hash and
    always-on routing included), scored by the teacher (`kdstudent generate` -> `kdstore build`, the rollout
    issue's path), then `kdstudent eval`'s reverse_kl on them and rouge_l against the teacher's greedy responses.
    Cached under <results>/generate/, keyed by the run's key. None while another process holds the run."""
    from benchmarks.common import cli, complete_store
    from student.train import evaluate_trained

    path = os.path.join(ctx["results"], "generate", f"{arm}_lr{lr:g}_s{seed}.json")
    found = _checkpoint(arm, lr, seed, ctx)
    if found is None:
        return None
    run, record = found
    cached = _read(path)
    if cached and cached["key"] == record["key"]:
        return cached
    g, name = gen["settings"], f"{arm}_lr{lr:g}_s{seed}"
    rollouts, store, log = gen["folder"] / f"{name}-rollouts", gen["folder"] / f"{name}-store", {}
    if not complete_store(store):
        cli(["cli.kdstudent", "generate", "--model", run, "--data", str(gen["prompts"]), "--input-ids-field",
             "prompt_ids", "--domain-field", "domain", "--out", str(rollouts), "--samples-per-prompt",
             str(g["samples"]), "--max-new-tokens", str(g["new_tokens"]), "--max-seq-len", str(g["max_seq_len"]),
             "--temperature", str(g["temperature"]), "--seed", str(g["seed"]), "--backend", "hf", "--progress",
             "false", *(["--resume"] if rollouts.exists() else [])], log, "generate_s")
        cli(["cli.kdstore", "build", "--teacher", ctx["teacher"].path, "--data", str(rollouts), "--input-ids-field",
             "prompt_ids", "--response-ids-field", "response_ids", "--domain-field", "domain", "--top-k", "64",
             "--max-seq-len", str(g["max_seq_len"]), "--out", str(store), *TEACHER_BACKEND, "--progress", "false",
             *(["--resume"] if store.exists() else [])], log, "score_s")
    t = time.time()
    result = evaluate_trained(run, [str(store), gen["responses"]], batch_size=ctx["scale"]["batch"],
                              device=ctx["device"])
    own, greedy = result["stores"][str(store)], result["stores"][gen["responses"]]
    domains = sorted(set(own.get("domains", {})) | set(greedy.get("domains", {})))
    out = dict(arm=arm, lr=lr, seed=seed, key=record["key"], settings=g, reverse_kl=own["reverse_kl"],
               reverse_kl_ci95=own["reverse_kl_ci95"], teacher_nll=own["teacher_nll"], student_nll=own["ce"],
               rouge_l=greedy["rouge_l"], rouge_l_ci95=greedy["rouge_l_ci95"],
               by_domain={d: {m: r[m] for r in (own.get("domains", {}).get(d, {}), greedy.get("domains", {}).get(d, {}))
                              for m in GEN_METRICS if m in r} for d in domains},
               rollouts=own.get("rollouts"), eval_s=round(time.time() - t, 1), **log)
    _write_json_atomic(path, out)
    print(f"{name}: reverse_kl {out['reverse_kl']:.4f} rouge_l {out['rouge_l']:.4f}", flush=True)
    return out


def v3_stage_generate(ctx: dict, arms: list[str] | None = None) -> None:
    gen = v3_generate_setup(ctx)
    for arm, lr, seed in v3_generation_runs(ctx, train_missing=True, arms=arms):
        v3_generations(arm, lr, seed, ctx, gen)


# ---------------------------------------------------------------- v3 statistics (no scipy here)
def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| ≥ |t|) for Student's t with `df` degrees of freedom (Abramowitz & Stegun 26.7.3-4, exact for
    integer df)."""
    if math.isinf(t):
        return 0.0
    if math.isnan(t):
        return float("nan")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 0:
        term = total = 1.0
        for j in range(1, (df - 2) // 2 + 1):
            term *= c * c * (2 * j - 1) / (2 * j)
            total += term
        a = s * total
    elif df == 1:
        a = 2 * theta / math.pi
    else:
        term = total = c
        for j in range(1, (df - 3) // 2 + 1):
            term *= c * c * (2 * j) / (2 * j + 1)
            total += term
        a = 2 / math.pi * (theta + s * total)
    return min(max(1.0 - a, 0.0), 1.0)


def t_quantile(level: float, df: int) -> float:
    """The half-width multiplier of a two-sided `level` Student-t interval (4.303 for 95 % at 2 df)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 1 - level else (lo, mid)
    return (lo + hi) / 2


def holm(p: dict[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values: sorted ascending, the i-th (from 0) of m times (m - i), made monotone."""
    adjusted, running = {}, 0.0
    for i, name in enumerate(sorted(p, key=p.get)):
        running = max(running, min(1.0, (len(p) - i) * p[name]))
        adjusted[name] = running
    return {name: adjusted[name] for name in p}


def paired_test(differences: list[float], levels: tuple[float, ...] = (0.95,)) -> dict:
    """Mean of per-seed paired differences, its std, a two-sided paired t test and t intervals at `levels`."""
    n = len(differences)
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    se = sd / math.sqrt(n)
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    out = {"n": n, "df": n - 1, "mean": mean, "std": sd, "t": t, "p": t_two_sided_p(t, n - 1),
           "per_seed": list(differences)}
    for level in levels:
        half = t_quantile(level, n - 1) * se
        out[f"ci{level * 100:g}"] = [mean - half, mean + half]
    return out


def _metric_pairs(a: dict[int, dict], b: dict[int, dict], metrics: tuple[str, ...]) -> dict:
    """v2's form of a paired difference, per metric [mean, std, 95 % t half-width], and full KL per domain."""
    seeds = sorted(set(a) & set(b))
    out = {}
    for m in metrics:
        d = [a[s][m] - b[s][m] for s in seeds if m in a[s] and m in b[s]]
        if len(d) >= 2:
            test = paired_test(d)
            out[m] = [test["mean"], test["std"], test["ci95"][1] - test["mean"]]
    domains = sorted(set.intersection(*(set(a[s].get("full_kl_by_domain", {})) for s in seeds))) if seeds else []
    out["full_kl_by_domain"] = {}
    for dom in domains:
        d = [a[s]["full_kl_by_domain"][dom] - b[s]["full_kl_by_domain"][dom] for s in seeds
             if dom in b[s].get("full_kl_by_domain", {})]
        if len(d) >= 2:
            test = paired_test(d)
            out["full_kl_by_domain"][dom] = [test["mean"], test["std"], test["ci95"][1] - test["mean"]]
    return out


def v3_primary(tests: dict[str, dict[int, dict]], pairs=V3_PRIMARY, alpha: float = V3_ALPHA) -> dict:
    """The primary comparisons: per pair 'arm - baseline', v2's per-metric rows plus `test`: the paired t test of
    test full KL over the common seeds, its 95 % interval and the Bonferroni interval (1 - α/m), the Holm-adjusted
    p over the pairs present, and the verdict. `tests` maps arm -> {seed: test eval}."""
    m = len(pairs)
    bonferroni = 1 - alpha / m
    out, ps = {}, {}
    for arm, base in pairs:
        a, b = tests.get(arm, {}), tests.get(base, {})
        seeds = sorted(set(a) & set(b))
        if len(seeds) < 2:
            continue
        name = f"{arm} - {base}"
        row = _metric_pairs(a, b, METRICS)
        row["test"] = paired_test([a[s]["full_kl"] - b[s]["full_kl"] for s in seeds], (0.95, bonferroni))
        row["test"] |= {"seeds": seeds, "bonferroni_level": bonferroni}
        out[name], ps[name] = row, row["test"]["p"]
    complete = len(out) == m and all(r["test"]["n"] == len(V3_SEEDS) for r in out.values())
    for name, p in holm(ps).items():
        test = out[name]["test"]
        test["p_holm"] = p
        test["holm_over"] = len(ps)
        test["verdict"] = ("no difference shown" if p >= alpha else
                           "lower full KL (arm better)" if test["mean"] < 0 else "higher full KL (arm worse)")
        test["final"] = complete  # False: the family or the seeds are incomplete; the numbers are provisional
    return out


V3_READINGS = (  # the protocol's "how the answers read", over "comparison i shows arm better" (Holm p < α, mean < 0)
    (lambda h: h[2] and not h[3], "the gain is the step size / split, not routing"),
    (lambda h: h[3] and h[4], "learned routing carries it"),
    (lambda h: h[3] and not h[4], "sparsity carries it, learning where does not"),
)


def v3_reading(primary: dict) -> dict:
    """Which of the protocol's readings the four verdicts match (mechanically; the write-up says what it means)."""
    names = [f"{a} - {b}" for a, b in V3_PRIMARY]
    if not all(n in primary and primary[n]["test"].get("final") for n in names):
        return {"reading": None, "why": "the four comparisons are not all final (5 seeds each)"}
    shown = {i + 1: primary[n]["test"]["p_holm"] < V3_ALPHA for i, n in enumerate(names)}
    helps = {i + 1: shown[i + 1] and primary[n]["test"]["mean"] < 0 for i, n in enumerate(names)}
    if not any(shown.values()):
        return {"shown": shown, "helps": helps, "reading": "v2's win is not reproduced"}
    found = [text for rule, text in V3_READINGS if rule(helps)]
    return {"shown": shown, "helps": helps, "reading": "; ".join(found) if found else None}


def _tests_of(results: str, arm: str, lr: float | None, seeds: tuple[int, ...]) -> list[dict]:
    if lr is None:
        return []
    return [r for s in seeds if (r := _read(result_path(results, arm, lr, s))) and "test" in r["eval"]]


def _v3_arm(arm: str, lr: float, trainable: int | None, runs: list[dict]) -> dict:
    """`_arm_summary` (per-seed test metrics, mean ± std) with each metric's mean per domain beside it."""
    out = _arm_summary(arm, lr, trainable, runs)
    tests = [r["eval"]["test"] for r in runs]
    domains = sorted(set.intersection(*(set(t.get("full_kl_by_domain", {})) for t in tests)))
    out["per_domain"] = {d: {m: statistics.mean(t["domains"][d][m] for t in tests) for m in METRICS
                             if all(m in t.get("domains", {}).get(d, {}) for t in tests)} for d in domains}
    for d in domains:
        out["per_domain"][d]["full_kl"] = statistics.mean(t["full_kl_by_domain"][d] for t in tests)
    return out


def v3_report(ctx: dict, counts: dict[str, int], json_path: str) -> dict:
    """Stages A-D from the run JSONs (trains nothing): the JSON the RESULTS.md tables are checked against."""
    from benchmarks.common import write_json

    results = ctx["results"]
    grid, chosen = {}, {}
    for arm in V3_ARMS:
        chosen[arm], grid[arm] = v3_stage_lr(arm, ctx, train_missing=False)
    pre = [v3_lr(s) for s in V3_LR_STEPS]
    stage_a = {arm: {"chosen": chosen[arm], "extended": sorted(lr for lr in grid[arm] if lr not in pre),
                     "on_edge_of_run_grid": chosen[arm] is not None and chosen[arm] in (min(grid[arm]), max(grid[arm]))}
               for arm in V3_ARMS}
    runs = {arm: _tests_of(results, arm, chosen[arm], V3_SEEDS) for arm in V3_ARMS}
    summary = {arm: _v3_arm(arm, chosen[arm], counts.get(arm), rs) for arm, rs in runs.items() if rs}
    tests = {arm: {r["seed"]: r["eval"]["test"] for r in rs} for arm, rs in runs.items()}
    primary = v3_primary(tests)
    # stage C: its own family (comparison 5), 95 % t interval
    long_runs = {arm + V3_LONG: _tests_of(results, arm + V3_LONG, chosen.get(arm), V3_LONG_SEEDS)
                 for arm in V3_LONG_ARMS}
    long_summary = {arm: _v3_arm(arm, chosen[arm.removesuffix(V3_LONG)], counts.get(arm.removesuffix(V3_LONG)), rs)
                    for arm, rs in long_runs.items() if rs}
    long_tests = {arm: {r["seed"]: r["eval"]["test"] for r in rs} for arm, rs in long_runs.items()}
    comparison5 = v3_primary(long_tests, pairs=(("moe-fair" + V3_LONG, "dense" + V3_LONG),))
    for row in comparison5.values():
        row["test"]["final"] = row["test"]["n"] == len(V3_LONG_SEEDS)
    recheck = {}
    for arm in V3_LONG_ARMS:
        if chosen.get(arm) is None:
            continue
        found = {lr: r["eval"]["validation"]["full_kl"] for lr in v3_recheck_lrs(chosen[arm])
                 if (r := _read(result_path(results, arm + V3_LONG, lr, 0))) and "validation" in r["eval"]}
        recheck[arm + V3_LONG] = {"validation_full_kl": found, "ran": len(found) == 3,
                                  "best": min(found, key=found.get) if len(found) == 3 else None}
    # stage D: exploratory, unadjusted 95 % intervals
    generated: dict[str, dict[int, dict]] = {}
    folder = os.path.join(results, "generate")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        g = _read(os.path.join(folder, name))
        generated.setdefault(g["arm"], {})[g["seed"]] = g
    gen_pairs = {}
    for arm, base in (*V3_PRIMARY, ("moe-fair" + V3_LONG, "dense" + V3_LONG)):
        a, b = generated.get(arm, {}), generated.get(base, {})
        seeds = sorted(set(a) & set(b))
        if len(seeds) >= 2:
            gen_pairs[f"{arm} - {base}"] = {m: paired_test([a[s][m] - b[s][m] for s in seeds]) for m in GEN_METRICS}
    gen_summary = {arm: {"seeds": sorted(by_seed), **{m: [statistics.mean(g[m] for g in by_seed.values()),
                                                          statistics.stdev(g[m] for g in by_seed.values())
                                                          if len(by_seed) > 1 else 0.0] for m in GEN_METRICS},
                         "per_seed": {s: {m: g[m] for m in (*GEN_METRICS, "by_domain")} for s, g in by_seed.items()}}
                   for arm, by_seed in generated.items()}
    report = {
        "protocol": "docs/RESULTS.md, 'Study v3: protocol (pre-registered 2026-12-07, before any v3 run)'",
        "settings": ctx["scale"], "shape": ctx["shape"], "trainable": counts,
        "lr_grid_validation_full_kl": grid, "stage_a": stage_a, "arms": summary,
        "paired_differences": primary, "reading": v3_reading(primary),
        "stage_c": {"arms": long_summary, "paired_differences": comparison5, "lr_recheck": recheck},
        "stage_d": {"settings": V3_GENERATE["quick" if ctx["scale"] is SCALES["quick"] else "cpu"],
                    "arms": gen_summary, "paired_differences_exploratory": gen_pairs},
    }
    print(_format_v3(report))
    write_json(json_path, report)
    return report


def _format_v3(report: dict) -> str:
    lines = ["\nstage A (validation full-vocabulary KL, seed 0):"]
    for arm, g in report["lr_grid_validation_full_kl"].items():
        chosen = report["stage_a"][arm]["chosen"]
        lines.append(f"  {arm:16s} " + "  ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(g.items()))
                     + (f"   chosen {chosen:g}" if chosen else "   (unfinished)"))
    lines.append("stage B (test, mean ± std over seeds):")
    for arm, row in {**report["arms"], **report["stage_c"]["arms"]}.items():
        lines.append(f"  {arm:16s} lr {row['lr']:g} trainable {row['trainable'] or 0:,d} seeds {row['seeds']} "
                     + " ".join(f"{m} {row[m][0]:.4g} ± {row[m][1]:.2g}" for m in METRICS))
    lines.append("paired test full KL differences (mean, 95 % interval, p, Holm-adjusted p):")
    for name, row in {**report["paired_differences"], **report["stage_c"]["paired_differences"]}.items():
        t = row["test"]
        lines.append(f"  {name:32s} {t['mean']:+.4f} [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}] p {t['p']:.3g} "
                     f"holm {t['p_holm']:.3g} (n {t['n']}{'' if t['final'] else ', provisional'}) {t['verdict']}")
    lines.append(f"reading: {report['reading'].get('reading')}")
    return "\n".join(lines)


# ================================================================ small helpers
def _read(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json_atomic(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    raise SystemExit(main())
