"""On-policy distillation rounds, offline: each step is the command its node type runs, in order.

    round r:  [inference node]  kdstudent generate  (the round r-1 student samples responses to training prompts)
              [inference node]  kdstore build       (the teacher scores those samples: a rollouts store)
              [training node]   kdstudent train     (--init-from the round r-1 run, offline store + rollouts mixed)
              [inference node]  kdstudent generate + kdstore build on held-out prompts, then
              [training node]   kdstudent eval      (reverse-KL estimate on the student's own samples; teacher-forced
                                                     KL on the held-out store)

No node holds the teacher and the student together. Prompts are the first --prompt-tokens tokens of store rows
(training rows for the rounds, held-out rows for the evaluation). Every step is skipped when its output is
complete, so a killed script re-run goes on where it stopped. Results: OUT/rounds.json (and --json).

    python -m benchmarks.onpolicy_rounds --teacher T --start-run demo-out/run --offline-store demo-out/store-train \\
        --heldout-store demo-out/store-validation --out onpolicy-out --rounds 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import cli, complete_store


def write_prompts(store: str, out: Path, rows: int, tokens: int, skip: int = 0) -> Path:
    """The first `tokens` tokens of `rows` rows of `store` (after the first `skip`), as prompt ids with domains."""
    from logit_store import LogitStore

    if out.exists():
        return out
    lines = []
    for n, row in enumerate(LogitStore.open(store)):
        if n < skip:
            continue
        if len(lines) == rows:
            break
        lines.append(json.dumps({"prompt_ids": row.input_ids[:tokens].tolist(), "domain": row.domain or "all"}))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out


def rollouts_and_store(name: str, policy: str, prompts: Path, out: Path, args, round_: int, log: dict,
                       samples: int) -> tuple[Path, dict]:
    """generate (inference node) then build (inference node): the teacher's scores of the policy's samples."""
    from logit_store.rollouts import provenance

    rollouts, store = out / f"{name}-rollouts", out / f"{name}-store"
    if not complete_store(store):
        resume = ["--resume"] if rollouts.exists() else []
        cli([
            "cli.kdstudent", "generate", "--model", policy, "--data", str(prompts), "--input-ids-field", "prompt_ids",
            "--domain-field", "domain", "--out", str(rollouts), "--samples-per-prompt", str(samples),
            "--max-new-tokens", str(args.max_new_tokens), "--max-seq-len", str(args.max_seq_len),
            "--round", str(round_), "--seed", str(args.seed + round_), "--backend", args.generate_backend,
            "--progress", "false", *resume], log, f"{name}: generate (inference node)")
        cli([
            "cli.kdstore", "build", "--teacher", args.teacher, "--data", str(rollouts),
            "--input-ids-field", "prompt_ids", "--response-ids-field", "response_ids", "--domain-field", "domain",
            "--max-seq-len", str(args.max_seq_len), "--top-k", str(args.top_k), "--out", str(store),
            "--progress", "false", *(["--resume"] if store.exists() else [])], log, f"{name}: score (inference node)")
    return store, provenance(str(rollouts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher folder (what kdstore build takes)")
    p.add_argument("--start-run", required=True, help="the offline-trained run round 1 starts from")
    p.add_argument("--offline-store", required=True, help="the offline store, mixed into every round")
    p.add_argument("--heldout-store", required=True, help="held-out store: eval prompts and teacher-forced KL")
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=64, help="training prompts per round")
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--rollout-share", type=float, default=0.5, help="rollout store's share of the loss positions")
    p.add_argument("--steps", type=int, default=20, help="training steps per round")
    p.add_argument("--lr", type=float, default=None, help="default: the start run's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generate-backend", choices=["hf", "vllm"], default="vllm")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log: dict[str, float] = {}
    start_cfg = json.loads((Path(args.start_run) / "train_config.json").read_text())
    eval_prompts = write_prompts(args.heldout_store, out / "eval-prompts.jsonl", args.eval_prompts, args.prompt_tokens)
    results = {"settings": vars(args), "rounds": []}
    policy = args.start_run
    for r in range(0, args.rounds + 1):  # round 0: the start run, evaluated the same way
        entry: dict = {"round": r, "run": policy}
        if r > 0:
            prompts = write_prompts(args.offline_store, out / f"r{r}-prompts.jsonl", args.prompts, args.prompt_tokens,
                                    skip=(r - 1) * args.prompts)
            store, prov = rollouts_and_store(f"r{r}", policy, prompts, out, args, r, log, samples=1)
            run_dir = out / f"r{r}-run"
            if not (run_dir / "final").exists():
                cfg = {k: v for k, v in start_cfg.items() if k not in ("resume", "eval_store", "init_from")}
                cfg |= {"store": [args.offline_store, f"{store}:{args.rollout_share}"], "out": str(run_dir),
                        "init_from": policy, "max_steps": args.steps, "lr": args.lr or start_cfg["lr"],
                        "warmup_steps": min(start_cfg.get("warmup_steps", 0), args.steps // 4), "progress": False,
                        "save_every": 0, "seed": args.seed + r}
                config = out / f"r{r}-train.json"
                config.write_text(json.dumps(cfg, indent=1))
                cli(["cli.kdstudent", "train", str(config)], log, f"r{r}: train (training node)")
            entry |= {"rollouts": prov["counts"], "run": str(run_dir)}
            policy = str(run_dir)
        eval_store, _ = rollouts_and_store(f"eval{r}", policy, eval_prompts, out, args, r, log, samples=1)
        result_file = out / f"eval{r}.json"
        if not result_file.exists():
            result_file.write_text(cli([
                "cli.kdstudent", "eval", "--model", policy, "--store", str(eval_store), "--store", args.heldout_store,
                "--json"], log, f"eval {r} (training node)", capture=True))
        ev = json.loads(result_file.read_text())
        own, heldout = ev["stores"][str(eval_store)], ev["stores"][args.heldout_store]
        entry |= {"reverse_kl": own["reverse_kl"], "reverse_kl_ci95": own["reverse_kl_ci95"],
                  "teacher_nll": own["teacher_nll"], "student_nll": own["ce"],
                  "heldout_teacher_kl": heldout["teacher_kl"], "heldout_ce": heldout["ce"]}
        results["rounds"].append(entry)
        print(json.dumps(entry), flush=True)
    results["seconds"] = log  # of the steps this invocation ran
    for path in [out / "rounds.json", *([Path(args.json)] if args.json else [])]:
        path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
