"""Does a MoE-LoRA student distil better than a dense one? One teacher capture, shared by every run.

    python -m benchmarks.quality_study [--scale quick|cpu|gpu] [--seeds 3] [--out DIR]

Teacher: SmolLM2-135M-Instruct (`make teacher`). Text: the World English Bible, split by chapter
(`kdstore prepare-data`). Students: the teacher pruned to --keep-layers, equal token budgets. Arms:

  ce          dense LoRA, cross-entropy on the text only (no teacher)
  lora-fkl    dense LoRA, forward KL on the top-64 store, rank matched to moe-fkl's trainable count
              (every LoRA has alpha = 2 × rank, so the update scale is the same in every arm)
  moe-fkl     MoE-LoRA (8 experts, top-2), forward KL, top-64 store
  moe-srkl    MoE-LoRA, the paper's skew reverse KL (alpha 0.1) + 0.1 CE, top-64 store
  moe-rs      MoE-LoRA, forward KL on the sampled store (RS-KD, N = 50, exact draws)
  lora-rs     dense LoRA, forward KL on the sampled store

Each arm runs --seeds times; every run is evaluated on the test store (teacher-KL on the stored support,
full-vocabulary KL against the live teacher, perplexity, top-1 agreement, ECE). Two references are evaluated
the same way: the teacher itself (its teacher-KL is the floor set by the bf16 capture and the codec) and the
pruned student before training. Results: a table of mean ± std, per-seed paired differences with 95 %
confidence intervals, raw JSON, a plot.

Several processes (or GPUs) can share one study: give each its own --arms / --seeds (e.g. --seeds 2,1); a
final run with the defaults trains nothing new and gathers everything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import time

import torch

from student.config import TrainConfig

SCALES = {
    # rows per split (chapters), tokens per row, steps, batch, student layers, vLLM/HF dtype
    "quick": dict(train_rows=48, test_rows=8, seq_len=128, steps=8, batch=4, keep="::10"),
    "cpu": dict(train_rows=400, test_rows=59, seq_len=256, steps=100, batch=8, keep="::10"),  # ~1.2 h here
    "gpu": dict(train_rows=1071, test_rows=59, seq_len=1024, steps=2000, batch=16, keep="::2", bf16=True),
}
ARMS = ("ce", "lora-fkl", "moe-fkl", "moe-srkl", "moe-rs", "lora-rs")


def _stores(out: str, teacher: str, scale: dict, backend: str) -> dict[str, str]:
    """The shared captures: top-64 (train, test) and sampled N=50 (train). Built once, reused by every run."""
    from assets.corpora import bible_chapters, write_splits
    from logit_store import LogitStore
    from logit_store.build import BuildConfig, build
    from logit_store.teachers import load_teacher

    splits = write_splits(bible_chapters(), os.path.join(out, "data"))
    engines = {}  # one teacher per backend, shared by the builds that need it
    stores = {}
    for name, split, targets, rows in (("train", "train", {"top_k": 64}, scale["train_rows"]),
                                       ("test", "test", {"top_k": 64}, scale["test_rows"]),
                                       ("train-rs", "train", {"samples": 50}, scale["train_rows"])):
        path = os.path.join(out, f"store-{name}")
        stores[name] = path
        if os.path.exists(os.path.join(path, "manifest.json")) and \
                LogitStore.open(path).manifest.status == "complete":
            continue
        # exact RS-KD draws need the full distribution: the hf backend
        b = "hf" if "samples" in targets else backend
        if b not in engines:
            engines[b] = load_teacher(b, teacher, dtype="bfloat16", **({"max_logprobs": 64} if b == "vllm" else {}))
        cfg = BuildConfig(teacher=teacher, data=splits[split], out=path, backend=b, text_field="text",
                          max_seq_len=scale["seq_len"], limit=rows, resume=True, dtype="bfloat16", **targets)
        print(build(cfg, teacher=engines[b]).format(), flush=True)
    return stores


def _arm_config(arm: str, stores: dict[str, str], teacher: str, scale: dict, seed: int, run: str,
                lora_rank: int | None):
    """The TrainConfig of one run; `lora_rank` (the dense arms' rank) is needed by the dense arms only."""
    common = dict(base=teacher, out=run, keep_layers=scale["keep"], batch_size=scale["batch"],
                  max_steps=scale["steps"], warmup_steps=max(scale["steps"] // 20, 1), lr=1e-3, seed=seed,
                  log_every=max(scale["steps"] // 10, 1), save_every=max(scale["steps"] // 4, 1), progress=False,
                  experts=8, experts_per_token=2, rank=16, attn_rank=16, store=stores["train"],
                  bf16=scale.get("bf16", False))  # alpha: the default 2 × rank, the same LoRA scale in every arm
    if arm == "ce":
        return TrainConfig(**dict(common, student="lora", rank=lora_rank, kd_weight=0.0, ce_weight=1.0))
    if arm == "lora-fkl":
        return TrainConfig(**dict(common, student="lora", rank=lora_rank, loss="fkl"))
    if arm == "moe-fkl":
        return TrainConfig(**dict(common, loss="fkl"))
    if arm == "moe-srkl":
        return TrainConfig(**dict(common, loss="srkl", skew_alpha=0.1, ce_weight=0.1))
    if arm == "moe-rs":
        return TrainConfig(**dict(common, loss="fkl", store=stores["train-rs"]))
    if arm == "lora-rs":
        return TrainConfig(**dict(common, student="lora", rank=lora_rank, loss="fkl", store=stores["train-rs"]))
    raise ValueError(arm)


def _matched_rank(moe: TrainConfig) -> tuple[int, int, int]:
    """The dense-LoRA rank matching the MoE-LoRA arms' trainable count (the student `moe` builds)."""
    from student.baselines import matching_dense_lora_rank
    from student.convert import load_base

    base, _ = load_base(moe.base, keep=moe.keep_layers)
    return matching_dense_lora_rank(base, moe.student_config())


def _cached_references(out: str, test_store: str) -> dict[str, dict] | None:
    """The references (teacher, untrained pruned student) of an earlier run over the same test store, if any."""
    from logit_store import LogitStore

    path = os.path.join(out, "references.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        refs = json.load(f)
    if refs.pop("store", None) != LogitStore.open(test_store).manifest.fingerprint():
        return None
    return refs if all("full_kl" in v for v in refs.values()) else None


@torch.no_grad()
def _full_vocab_kl(t_model, test_store: str, models: dict, batch: int, device: str) -> dict[str, float]:
    """KL(teacher || student) over the whole vocabulary, per token, with the teacher run live in fp32.

    The store's teacher_kl is measured on the top-64 support + tail bucket, the very quantity the top-64 arms
    minimise; this is the exact KL, which treats top-64 and sampled (RS-KD) students alike. One teacher forward
    per batch serves every student."""
    from logit_store import KDStream

    sums = dict.fromkeys(models, 0.0)
    tokens = 0
    for b in KDStream(test_store, batch, shuffle=False, rank=0, world_size=1):
        ids, attn, mask = (b[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
        t_lp = t_model(input_ids=ids, attention_mask=attn).logits[mask].float().log_softmax(-1)
        for name, model in models.items():
            s_lp = model(input_ids=ids, attention_mask=attn).logits[mask].float().log_softmax(-1)
            sums[name] += float((t_lp.exp() * (t_lp - s_lp)).sum())
        tokens += int(mask.sum())
    return {name: v / tokens for name, v in sums.items()}


def _teacher_measures(out: str, teacher: str, test_store: str, scale: dict, runs: list[dict], device: str) -> dict:
    """What needs the live teacher, loaded once: the full-vocabulary KL of every run that lacks it (written into
    its test_eval.json) and the references, both from one pass over the test store. Returns the references."""
    from logit_store import LogitStore
    from student.convert import load_base
    from student.evaluate import evaluate
    from student.train import load_trained

    refs = _cached_references(out, test_store)
    pending = {r["run"]: r for r in runs if "full_kl" not in r}
    if refs is not None and not pending:
        return refs
    print(f"full-vocabulary KL of {len(pending)} run(s) against the live teacher", flush=True)
    t_model = load_base(teacher)[0].to(device)
    students = {run: load_trained(run, device) for run in pending}
    if refs is None:
        pruned = load_base(teacher, keep=scale["keep"])[0].to(device)
        refs = {name: evaluate(m, test_store, batch_size=scale["batch"], device=device)
                for name, m in (("teacher", t_model), ("pruned", pruned))}
        students["(pruned)"] = pruned
    kl = _full_vocab_kl(t_model, test_store, students, scale["batch"], device)
    for run, r in pending.items():
        r["full_kl"] = kl[run]
        _write_json_atomic(os.path.join(run, "test_eval.json"), {k: v for k, v in r.items() if k != "run"})
    if "(pruned)" in kl:
        refs["teacher"]["full_kl"], refs["pruned"]["full_kl"] = 0.0, kl["(pruned)"]
        store = LogitStore.open(test_store).manifest.fingerprint()
        _write_json_atomic(os.path.join(out, "references.json"), dict(refs, store=store))
    return refs


def _claim(run: str) -> bool:
    """Take a run for this process, so that processes sharing a study on one machine never train the same run.

    The claim is a file holding the owner's pid; a claim whose process is gone is taken over."""
    os.makedirs(run, exist_ok=True)
    path = os.path.join(run, ".claim")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    os.kill(int(f.read() or 0), 0)
                return False  # its owner is alive
            except (ProcessLookupError, ValueError, FileNotFoundError):  # gone: take it over
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _write_json_atomic(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


# (arm, baseline): what each comparison isolates; differences are taken seed by seed (same data order and init)
PAIRS = (("lora-fkl", "ce"), ("moe-fkl", "lora-fkl"), ("moe-srkl", "moe-fkl"), ("moe-rs", "moe-fkl"),
         ("lora-rs", "lora-fkl"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--seeds", default="3", help="how many seeds (0..N-1), or a comma list of seeds to run")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--out", default=os.path.expanduser("~/.cache/moekd/quality-study"))
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="top-64 capture backend")
    p.add_argument("--json", default="benchmarks/results/quality_study.json")
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    seed_list = [int(x) for x in args.seeds.split(",")] if "," in args.seeds else range(int(args.seeds))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the trainer picks the same device
    from benchmarks.common import SMOLLM2_DIR as teacher
    from benchmarks.common import write_json
    from student.evaluate import evaluate
    from student.run import is_run
    from student.train import load_trained, train

    if not os.path.exists(os.path.join(teacher, "config.json")):
        raise SystemExit("the teacher is not prepared: run `make teacher` first")
    out = os.path.join(args.out, args.scale)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    stores = _stores(out, teacher, scale, args.backend)
    moe_arm = _arm_config("moe-fkl", stores, teacher, scale, 0, os.path.join(out, "runs", "moe-fkl-s0"), None)
    lora_rank, lora_params, moe_params = _matched_rank(moe_arm)
    print(f"dense-LoRA rank {lora_rank} ({lora_params:,} trainable) matches MoE-LoRA ({moe_params:,})", flush=True)
    runs = []
    for arm in args.arms.split(","):
        for seed in seed_list:
            run = os.path.join(out, "runs", f"{arm}-s{seed}")
            result_path = os.path.join(run, "test_eval.json")
            cfg = _arm_config(arm, stores, teacher, scale, seed, run, lora_rank)
            if not os.path.exists(result_path):  # finished runs are kept: rerunning the study resumes it
                if not _claim(run):
                    print(f"{arm:9s} seed {seed}: being trained by another process, skipped here", flush=True)
                    continue
                t = time.time()
                train(dataclasses.replace(cfg, resume=is_run(run)))
                metrics = evaluate(load_trained(run, device), stores["test"], batch_size=scale["batch"], device=device)
                metrics.update(arm=arm, seed=seed, train_s=round(time.time() - t, 1), config=cfg.to_dict())
                _write_json_atomic(result_path, metrics)
                os.remove(os.path.join(run, ".claim"))
            with open(result_path) as f:
                runs.append(dict(json.load(f), run=run))
            trained = TrainConfig.from_dict(runs[-1]["config"]).to_dict()  # results of earlier versions too
            changed = {k for k, v in cfg.to_dict().items() if trained[k] != v}
            if changed:
                raise SystemExit(f"{run} was trained with other settings ({', '.join(sorted(changed))}): "
                                 "move it away, or pass another --out")
            r = runs[-1]
            print(f"{arm:9s} seed {seed}: teacher_kl {r['teacher_kl']:.4f} ppl {r['ppl']:.3f} "
                  f"top1 {r['top1_agree']:.4f} ece {r['ece']:.4f}", flush=True)
    refs = _teacher_measures(out, teacher, stores["test"], scale, runs, device)
    table = _summarise(runs)
    diffs = _paired(runs)
    print(_format(table, refs, diffs, args.scale, lora_rank, lora_params, moe_params))
    if args.json:
        write_json(args.json, {"scale": args.scale, "settings": scale, "lora_rank": lora_rank,
                               "trainable": {"lora": lora_params, "moe": moe_params}, "summary": table,
                               "paired_differences": diffs,
                               "references": {k: {m: v[m] for m in METRICS} for k, v in refs.items()},
                               "runs": [{k: v for k, v in r.items() if k != "run"} for r in runs],
                               "seconds": round(time.time() - start)})
        _plot(runs, table, refs["teacher"], os.path.splitext(args.json)[0] + ".png")
    return 0


METRICS = ("teacher_kl", "full_kl", "ppl", "top1_agree", "ece")


def _summarise(runs: list[dict]) -> dict:
    table = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        table[arm] = {m: (statistics.mean(r[m] for r in mine),
                          statistics.stdev(r[m] for r in mine) if len(mine) > 1 else 0.0) for m in METRICS}
        table[arm]["n"] = len(mine)
        if all("expert_usage" in r for r in mine):  # exp(entropy) of each MoE layer's load: 8 = even, 2 = collapsed
            table[arm]["effective_experts"] = {
                layer: statistics.mean(math.exp(-sum(f * math.log(f) for f in r["expert_usage"][layer] if f > 0))
                                       for r in mine) for layer in mine[0]["expert_usage"]}
        table[arm]["train_s"] = statistics.mean(r["train_s"] for r in mine)
    return table


# two-sided 95 % Student-t quantiles by degrees of freedom (no scipy here)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _paired(runs: list[dict]) -> dict:
    """arm − baseline per seed: mean, std and the 95 % confidence half-width of the mean difference."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    out = {}
    for arm, base in PAIRS:
        seeds = [s for (a, s) in by if a == arm and (base, s) in by]
        if len(seeds) < 2:
            continue
        row = {}
        for m in METRICS:
            d = [by[arm, s][m] - by[base, s][m] for s in seeds]
            sd = statistics.stdev(d)
            row[m] = (statistics.mean(d), sd, _T95.get(len(d) - 1, 1.96) * sd / len(d) ** 0.5)
        out[f"{arm} - {base}"] = row
    return out


def _format(table: dict, refs: dict, diffs: dict, scale: str, rank: int, lora_params: int,
            moe_params: int) -> str:
    head = f"{'':18s} {'n':>2s} " + " ".join(f"{m:>10s}" + " " * 11 for m in METRICS)
    lines = [f"\nquality study ({scale}); dense-LoRA rank {rank}: {lora_params:,} vs MoE-LoRA {moe_params:,} "
             "trainable", head]
    for name, row in refs.items():
        lines.append(f"{'(' + name + ')':18s} {'':2s} " + " ".join(f"{row[m]:10.4g}           " for m in METRICS))
    for arm, row in table.items():
        lines.append(f"{arm:18s} {row['n']:2d} " + " ".join(f"{row[m][0]:10.4g} ± {row[m][1]:<8.2g}" for m in METRICS))
    if diffs:
        lines += ["paired differences (per seed: mean ± 95 % CI half-width; * = CI excludes 0)", head]
        for pair, row in diffs.items():
            lines.append(f"{pair:18s} {'':2s} " + " ".join(
                f"{row[m][0]:+10.4g} ± {row[m][2]:<7.2g}{'*' if abs(row[m][0]) > row[m][2] else ' '}" for m in METRICS))
    return "\n".join(lines)


def _plot(runs: list[dict], table: dict, teacher: dict, path: str) -> None:
    """Every seed as a dot, mean ± std as a bar: the arms differ by less than the metrics' scale, so no zero axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(table)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, m in zip(axes, METRICS, strict=True):
        for i, arm in enumerate(arms):
            values = [r[m] for r in runs if r["arm"] == arm]
            ax.plot([i] * len(values), values, "o", color="C0", alpha=0.5, ms=4)
            mean, sd = table[arm][m]
            ax.errorbar(i + 0.15, mean, yerr=sd, fmt="s", color="C1", capsize=3, ms=5)
        ax.set_xticks(range(len(arms)), arms, rotation=45)
        ax.set_title(f"{m} (teacher {teacher[m]:.3g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
