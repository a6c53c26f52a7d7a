"""On-policy rounds against offline-only training, pre-registered (docs/RESULTS.md, 'On-policy rounds: protocol').

    python -m benchmarks.onpolicy_study --student moe-fair   # both arms, seeds 0-2 (beside it: --student dense)
    python -m benchmarks.onpolicy_study --report             # paired differences, Holm, JSON (trains nothing)

Study v2's data, teacher and students (benchmarks/quality_study.py: stores, parameter-matched shapes, the full-
vocabulary KL). Per student and seed: `offline` trains 100 steps on the offline store; `on-policy` trains 50, then
2 rounds of (generate on 100 training prompts -> teacher scores -> 25 steps --init-from, offline + rollouts mixed
0.5). Each final student is measured on held-out prompts: its own samples scored by the teacher (reverse KL), the
test split's full-vocabulary KL, ROUGE-L of greedy responses against the teacher's. Rollouts and scoring run the
CLI (`kdstudent generate`, `kdstore build`) as an inference node would; every step is skipped when its output is
complete, and each finished (student, arm, seed) leaves a JSON under benchmarks/results/onpolicy_study/.

    python -m benchmarks.onpolicy_study --student moe-fair --arm restarts   # the exploratory control (below)

`restarts` (added after the pre-registered runs, so exploratory, never a finding): the on-policy arm's three phases
(50 + 25 + 25 steps, each `--init-from` the last with a fresh optimizer and warmup) on the offline store alone.
It differs from `on-policy` only in the rollouts, and from `offline` only in the restarts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import cli, complete_store
from benchmarks.onpolicy_rounds import write_prompts
from benchmarks.quality_study import SCALES, Teacher, _read, _stores, _write_json_atomic, arm_config, matched_shapes

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = ("moe-fair", "dense")
ARMS = ("offline", "on-policy")  # pre-registered
CONTROL = "restarts"  # exploratory
METRICS = ("reverse_kl", "full_kl", "rouge_l")  # primary, then the two secondary
SAMPLE_NLLS = ("teacher_nll", "student_nll")  # the reverse KL's two halves: NLLs of the student's own samples
SEEDS = (0, 1, 2)
LR = 3e-3  # study v2's choice for both students
STEPS, OFFLINE_HALF, ROUND_STEPS, ROUNDS = 100, 50, 25, 2
PROMPTS, PROMPT_TOKENS, NEW_TOKENS, TEST_PROMPTS, EVAL_SEED = 100, 64, 128, 100, 12345
ROLLOUT_SHARE = 0.5
RESULTS = "benchmarks/results/onpolicy_study"
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # two-sided 95 % Student-t quantiles by degrees of freedom


def rollouts(policy: str, prompts: Path, out: Path, seed: int, round_: int, teacher: str) -> dict:
    """The policy's samples on `prompts`, scored by the teacher (a store with label log-probs); resumable."""
    from logit_store import LogitStore
    from logit_store.rollouts import provenance

    folder, store, log = Path(f"{out}-rollouts"), Path(f"{out}-store"), {}
    if not complete_store(store):
        cli(["cli.kdstudent", "generate", "--model", policy, "--data", str(prompts), "--input-ids-field",
             "prompt_ids", "--domain-field", "domain", "--out", str(folder), "--max-new-tokens", str(NEW_TOKENS),
             "--max-seq-len", "256", "--seed", str(seed), "--round", str(round_), "--backend", "vllm",
             "--progress", "false", *(["--resume"] if folder.exists() else [])], log, "generate_s")
        cli(["cli.kdstore", "build", "--teacher", teacher, "--data", str(folder), "--input-ids-field", "prompt_ids",
             "--response-ids-field", "response_ids", "--domain-field", "domain", "--top-k", "64", "--max-seq-len",
             "256", "--out", str(store), "--progress", "false", *(["--resume"] if store.exists() else [])],
            log, "score_s")
    manifest = LogitStore.open(str(store)).manifest
    return {"store": str(store), "counts": provenance(str(folder))["counts"], "scored_tokens": manifest.tokens,
            "scored_positions": manifest.target_positions, **log}


def train_run(ctx: dict, student: str, seed: int, steps: int, run: str, stores: list[str],
              init_from: str | None = None) -> dict:
    """Train (or resume, or skip when finished) one run of `steps` steps; its trained loss positions and time."""
    from student.run import is_run, read_metrics
    from student.train import train

    scale = dict(ctx["scale"], steps=steps)
    cfg = arm_config(student, ctx["stores"], ctx["teacher"].path, scale, LR, seed, run, ctx["shape"])
    cfg = dataclasses.replace(cfg, store=stores, init_from=init_from, log_every=1)
    start = time.time()
    if not os.path.isdir(os.path.join(run, "final")):
        train(dataclasses.replace(cfg, resume=is_run(run)))
    positions = sum(m["tokens"] for m in read_metrics(run) if "tokens" in m and "eval" not in m)
    return {"run": run, "steps": steps, "loss_positions": positions, "train_s": round(time.time() - start, 1)}


def measure(ctx: dict, run: str, name: str) -> dict:
    """The final student on held-out prompts and the test split (the protocol's primary and secondary metrics)."""
    from benchmarks.quality_study import full_vocab_kl
    from student.train import evaluate_trained, load_trained

    own = rollouts(run, ctx["test_prompts"], ctx["out"] / "eval" / name, EVAL_SEED, 0, ctx["teacher"].path)
    result = evaluate_trained(run, [own["store"], ctx["teacher_responses"]], batch_size=8)
    on_own, greedy = result["stores"][own["store"]], result["stores"][ctx["teacher_responses"]]
    model = load_trained(run)
    full = full_vocab_kl(ctx["teacher"], ctx["stores"]["test"], model, 8, "cpu")
    return {"reverse_kl": on_own["reverse_kl"], "reverse_kl_ci95": on_own["reverse_kl_ci95"],
            "teacher_nll": on_own["teacher_nll"], "student_nll": on_own["ce"], "rollouts": on_own["rollouts"],
            "reverse_kl_by_domain": {d: r["reverse_kl"] for d, r in on_own.get("domains", {}).items()},
            "rouge_l": greedy["rouge_l"], "rouge_l_ci95": greedy["rouge_l_ci95"], "full_kl": full["full_kl"],
            "full_kl_by_domain": full["full_kl_by_domain"], "eval_rollouts": own}


def one(ctx: dict, student: str, arm: str, seed: int) -> dict:
    path = os.path.join(RESULTS, f"{student}_{arm}_s{seed}.json")
    cached = _read(path)
    if cached:
        return cached
    runs = ctx["out"] / "runs"
    offline = ctx["stores"]["train"]
    name = f"{student}_{arm}_s{seed}"
    record = {"student": student, "arm": arm, "seed": seed, "lr": LR, "phases": []}
    if arm == "offline":
        record["phases"].append(train_run(ctx, student, seed, STEPS, str(runs / name), [offline]))
    else:
        policy = str(runs / f"{name}_r0")
        if arm == CONTROL:  # its first phase is the on-policy arm's: the same 50 steps (bit-identical at seed 0)
            policy = str(runs / f"{student}_on-policy_s{seed}_r0")
        record["phases"].append(train_run(ctx, student, seed, OFFLINE_HALF, policy, [offline]))
        for r in range(1, ROUNDS + 1):
            nxt = str(runs / f"{name}_r{r}")
            if arm == CONTROL:
                record["phases"].append(train_run(ctx, student, seed, ROUND_STEPS, nxt, [offline], init_from=policy))
            else:
                scored = rollouts(policy, ctx["train_prompts"][r - 1], ctx["out"] / "rounds" / f"{name}_r{r}",
                                  seed * 10 + r, r, ctx["teacher"].path)
                phase = train_run(ctx, student, seed, ROUND_STEPS, nxt,
                                  [offline, f"{scored['store']}:{ROLLOUT_SHARE}"], init_from=policy)
                record["phases"].append(phase | {"rollouts": scored})
            policy = nxt
    final = record["phases"][-1]["run"]
    record["eval"] = measure(ctx, final, name)
    _write_json_atomic(path, record)
    print(f"{name}: reverse_kl {record['eval']['reverse_kl']:.4f} full_kl {record['eval']['full_kl']:.4f} "
          f"rouge_l {record['eval']['rouge_l']:.3f}", flush=True)
    return record


def setup(out: Path) -> dict:
    from assets.smollm2 import prepared_teacher_dir

    teacher = prepared_teacher_dir()
    if not os.path.exists(os.path.join(teacher, "config.json")):
        raise SystemExit("the teacher is not prepared: run `make teacher` first")
    scale = SCALES["cpu"]
    out.mkdir(parents=True, exist_ok=True)
    stores = _stores(str(out), teacher, scale)
    shape, counts = matched_shapes(stores, teacher, scale)
    train_prompts = [write_prompts(stores["train"], out / f"train-prompts-r{r}.jsonl", PROMPTS, PROMPT_TOKENS,
                                   skip=(r - 1) * PROMPTS) for r in range(1, ROUNDS + 1)]
    test_prompts = write_prompts(stores["test"], out / "test-prompts.jsonl", TEST_PROMPTS, PROMPT_TOKENS)
    responses = out / "teacher-greedy-test"
    if not complete_store(responses):  # the teacher's greedy responses to the test prompts, for ROUGE-L
        cli(["cli.kdstore", "build", "--teacher", teacher, "--data", str(test_prompts), "--input-ids-field",
             "prompt_ids", "--domain-field", "domain", "--generate", "--temperature", "0", "--max-new-tokens",
             str(NEW_TOKENS), "--max-seq-len", "256", "--top-k", "64", "--out", str(responses), "--progress", "false",
             *(["--resume"] if responses.exists() else [])], {}, "teacher_greedy_s")
    return dict(out=out, stores=stores, scale=scale, shape=shape, counts=counts, teacher=Teacher(teacher, "cpu"),
                train_prompts=train_prompts, test_prompts=test_prompts, teacher_responses=str(responses))


def paired(runs: dict, a: str, b: str, metric: str, seeds: list[int]) -> dict:
    """Arm a − arm b on `metric`, per seed, with its mean, sd and 95 % Student-t interval."""
    d = [runs[a][s]["eval"][metric] - runs[b][s]["eval"][metric] for s in seeds]
    mean, sd = statistics.mean(d), statistics.stdev(d)
    half = _T95[len(d) - 1] * sd / len(d) ** 0.5
    return {"mean": mean, "std": sd, "ci95": [mean - half, mean + half], "per_seed": d}


def costs(run: dict) -> dict:
    """What one run trained on and had scored: loss positions, teacher-scored tokens, and the wall seconds of each
    round's rollout and scoring step that ran in this study's processes (a step found complete on a re-run was
    skipped and has none; one resumed mid-way counts only its last part, so the report quotes medians)."""
    phases = run["phases"]
    rounds = [p["rollouts"] for p in phases if "rollouts" in p]
    return {"loss_positions": sum(p["loss_positions"] for p in phases),
            "scored_tokens": sum(r["scored_tokens"] for r in rounds),
            "rollout_s": [r["generate_s"] for r in rounds if "generate_s" in r],
            "score_s": [r["score_s"] for r in rounds if "score_s" in r]}


def report(json_path: str) -> dict:
    """Per student: each arm's per-seed metrics, the paired differences with t intervals, Holm over students;
    the `restarts` control's differences apart, as exploratory."""
    from benchmarks.common import write_json

    out: dict = {"protocol": "docs/RESULTS.md, 'On-policy rounds: protocol'", "students": {}}
    tests = {}
    for student in STUDENTS:
        runs = {arm: {s: _read(os.path.join(RESULTS, f"{student}_{arm}_s{s}.json")) for s in SEEDS}
                for arm in (*ARMS, CONTROL)}
        seeds = [s for s in SEEDS if all(runs[a][s] for a in ARMS)]
        entry = {"seeds": seeds, "per_seed": {a: {s: runs[a][s]["eval"] | costs(runs[a][s]) for s in seeds}
                                              for a in ARMS}}
        if len(seeds) >= 2:
            entry |= {f"{m}_difference": paired(runs, "on-policy", "offline", m, seeds) for m in METRICS}
            if len(seeds) == 3:
                d = entry["reverse_kl_difference"]
                t = d["mean"] / (d["std"] / math.sqrt(3)) if d["std"] > 0 else math.inf
                tests[student] = 1 - abs(t) / math.sqrt(2 + t * t)  # two-sided p of a t(2) statistic
        control = [s for s in seeds if runs[CONTROL][s]]
        if len(control) >= 2:
            entry["exploratory"] = {
                "note": "not pre-registered: no correction, no decision",
                "seeds": control,
                "per_seed": {s: runs[CONTROL][s]["eval"] | costs(runs[CONTROL][s]) for s in control},
                **{f"{m}_{a}_minus_{b}": paired(runs, a, b, m, control) for m in METRICS
                   for a, b in (("on-policy", CONTROL), (CONTROL, "offline"))}}
        out["students"][student] = entry
    if len(tests) == len(STUDENTS):  # Holm over the primary comparisons
        order = sorted(tests, key=tests.get)
        adjusted, running = {}, 0.0
        for i, student in enumerate(order):
            running = max(running, min(1.0, (len(order) - i) * tests[student]))
            adjusted[student] = running
        for student in STUDENTS:
            d = out["students"][student]["reverse_kl_difference"]["mean"]
            out["students"][student] |= {"p": tests[student], "p_holm": adjusted[student], "verdict": (
                ("on-policy rounds lower the reverse KL" if d < 0 else "on-policy rounds raise the reverse KL")
                if adjusted[student] < 0.05 else "no finding")}
    write_json(json_path, out)
    return out


def _mean_sd(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _interval(d: dict, digits: int) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def markdown(report: dict) -> str:
    """RESULTS.md's tables, rendered from the report (tests/test_results_tables.py checks they are there verbatim)."""
    lines = ["| student | arm | seeds | reverse KL, own samples | full KL, test | ROUGE-L | teacher NLL, own samples | "
             "student NLL, own samples | loss positions | teacher-scored tokens | rollout s per round | "
             "scoring s per round |", "|" + "---|" * 12]
    for student, e in report["students"].items():
        arms = dict(e["per_seed"])
        if "exploratory" in e:
            arms[f"{CONTROL} (exploratory)"] = e["exploratory"]["per_seed"]
        for arm, per_seed in arms.items():
            runs = list(per_seed.values())
            if not runs:
                continue
            cells = [_mean_sd([r[m] for r in runs], 3) for m in (*METRICS, *SAMPLE_NLLS)]
            cells += [f"{statistics.mean(r[k] for r in runs):,.0f}" for k in ("loss_positions", "scored_tokens")]
            for k in ("rollout_s", "score_s"):  # median over the rounds timed in one go, and how many
                times = [t for r in runs for t in r[k]]
                cells.append(f"{statistics.median(times):.0f} (n = {len(times)})" if times else "—")
            lines.append(f"| `{student}` | {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "| student | on-policy − offline: reverse KL [95 % interval] | p | Holm p | verdict | "
              "full KL [95 %] | ROUGE-L [95 %] |", "|" + "---|" * 7]
    for student, e in report["students"].items():
        if "reverse_kl_difference" in e:
            lines.append(f"| `{student}` | {_interval(e['reverse_kl_difference'], 3)} | "
                         f"{e.get('p', float('nan')):.3f} | {e.get('p_holm', float('nan')):.3f} | "
                         f"{e.get('verdict', 'not all seeds')} | {_interval(e['full_kl_difference'], 3)} | "
                         f"{_interval(e['rouge_l_difference'], 3)} |")
    explored = {s: e["exploratory"] for s, e in report["students"].items() if "exploratory" in e}
    if explored:
        lines += ["", "| student (exploratory) | comparison | reverse KL [95 %] | full KL [95 %] | ROUGE-L [95 %] |",
                  "|" + "---|" * 5]
        for student, x in explored.items():
            for a, b in (("on-policy", CONTROL), (CONTROL, "offline")):
                cells = [_interval(x[f"{m}_{a}_minus_{b}"], 3) for m in METRICS]
                lines.append(f"| `{student}` | {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", choices=STUDENTS, action="append", help="default: both")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--arm", choices=(*ARMS, CONTROL), action="append", help="default: the pre-registered two")
    p.add_argument("--report", action="store_true")
    p.add_argument("--out", default=os.path.expanduser("~/.cache/moekd/onpolicy-study"))
    p.add_argument("--json", default=f"{RESULTS}.json")
    args = p.parse_args(argv)
    if args.report:
        print(markdown(report(args.json)), end="")
        return 0
    ctx = setup(Path(args.out))
    for student in args.student or STUDENTS:
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in args.arm or ARMS:
                one(ctx, student, arm, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
