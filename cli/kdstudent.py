"""kdstudent: build, inspect and export MoE-LoRA students. Parses arguments and calls `student`, nothing else.

kdstudent convert BASE_DIR --out STUDENT_DIR [--experts 8 --experts-per-token 2 --rank 16 --moe-layers all ...]
kdstudent params BASE_DIR [shape options]        trainable counts: MoE-LoRA, matched dense LoRA, full FT
kdstudent info STUDENT_OR_RUN_DIR
kdstudent export STUDENT_OR_RUN_DIR --to mixtral --out DIR [--base BASE_DIR] [--dtype bfloat16]
kdstudent train --store STORE --base BASE_DIR --out RUN [...]   (or: kdstudent train config.yaml; --help)
kdstudent generate --model RUN --data PROMPTS --prompt-field prompt --out ROLLOUTS [--samples-per-prompt N ...]
kdstudent eval --model RUN --store VAL_STORE [--store VAL_STORE_2 ...] [--json]
kdstudent plot RUN
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_shape(command: str, argv: list[str], description: str, writes: bool):
    """(MoELoRAConfig, namespace of BASE_DIR [, --out, --seed]) for `kdstudent convert` / `params`."""
    from cli.config import parse_config
    from student.config import MoELoRAConfig

    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("base", metavar="BASE_DIR", help="directory of a transformers causal LM (Llama family or GPT-2)")
        if writes:
            p.add_argument("--out", required=True, help="student directory to write")
            p.add_argument("--seed", type=int, default=0, help="seed of the router and LoRA initialisation")

    return parse_config(MoELoRAConfig, argv, f"kdstudent {command}", description, extra=arguments)


CONVERT = "build a MoE-LoRA student from a dense base and save it (exact at init)"
PARAMS = "trainable parameter counts for MoE-LoRA, matched dense LoRA, full FT"
PARAMS_IGNORES = ("lora_dropout", "router_init_std", "expert_impl")  # shape options that change no count


def cmd_convert(argv: list[str]) -> int:
    from student.baselines import count_parameters
    from student.convert import build_student
    from student.io import save_student

    cfg, args = _parse_shape("convert", argv, CONVERT, writes=True)
    model = build_student(args.base, cfg, seed=args.seed)
    out = save_student(model, args.out)
    print(f"MoE-LoRA student of {args.base}: {count_parameters(model)}")
    print(f"saved to {out}")
    return 0


def cmd_params(argv: list[str]) -> int:
    from student.baselines import count_parameters, matching_dense_lora_rank
    from student.config import MoELoRAConfig, default_alpha, lora_scale
    from student.convert import load_base

    cfg, args = _parse_shape("params", argv, PARAMS, writes=False)
    unused = [f"--{name.replace('_', '-')}" for name in PARAMS_IGNORES
              if getattr(cfg, name) != getattr(MoELoRAConfig(), name)]
    if unused:
        raise ValueError(f"{', '.join(unused)} change(s) no parameter count: kdstudent params does not take them "
                         "(kdstudent convert and train do)")
    base, _ = load_base(args.base, keep=cfg.keep_layers)
    total = count_parameters(base).total
    rank, dense, moe = matching_dense_lora_rank(base, cfg)
    rows = {
        "moe_lora": moe,
        f"dense_lora_rank_{rank}": dense,
        "full_finetune": total,
    }
    for name, n in rows.items():
        print(f"{name:<22} trainable {n:>14,}  ({100 * n / total:.3f}% of {total:,})")
    print(f"parameter-matched dense-LoRA rank: {rank}")
    print({"learned": f"routing: learned, top-{cfg.experts_per_token} of {cfg.experts} experts per token",
           "hash": f"routing: hash of the token id, {cfg.experts_per_token} of {cfg.experts} experts per token "
                   "(weight 1/k each, no router)",
           "all": f"routing: all, every one of {cfg.experts} experts on every token (weight 1, no router)",
           }[cfg.routing])
    scales = {"experts": (cfg.alpha, cfg.rank), "attention": (cfg.attn_alpha, cfg.attn_rank),
              "shared expert": (cfg.shared_expert_alpha, cfg.shared_expert_rank),
              f"dense LoRA rank {rank}": (default_alpha(rank), rank)}
    print(f"LoRA update scales ({cfg.lora_scaling}): " + ", ".join(
        f"{name} {lora_scale(alpha, r, cfg.lora_scaling):.3g}" for name, (alpha, r) in scales.items() if r))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from student.io import read_student_meta, resolve_student_dir

    path = resolve_student_dir(args.student)
    meta = read_student_meta(path)
    print(f"student: {path}")
    print(json.dumps({k: meta[k] for k in ("base", "config", "moe_layers", "experts", "num_adapter_params")}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from student.export import export_student

    out = export_student(args.student, args.out, to=args.to, base_path=args.base, dtype=DTYPES.get(args.dtype),
                         drop_router_bias=args.drop_router_bias)
    print(f"exported {args.student} as {args.to} to {out}")
    return 0


def cmd_train(argv: list[str]) -> int:
    from cli.config import parse_config
    from student.config import TrainConfig
    from student.train import train

    cfg = parse_config(TrainConfig, argv, "kdstudent train", (
        "Distil a student from a logit store. Options as flags or one YAML/JSON file (kdstudent train run.yaml). "
        "Several processes: torchrun --nproc-per-node N -m cli.kdstudent train ..."))
    last = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in last.items() if k != "expert_usage"}))
    return 0


GENERATE = "sample a trained student's responses to prompts (rollouts), to be scored by kdstore build"


def cmd_generate(argv: list[str]) -> int:
    from cli.config import parse_config
    from student.generate import GenerateConfig, generate

    cfg = parse_config(GenerateConfig, argv, "kdstudent generate", GENERATE + (
        ". Options as flags or one YAML/JSON file. Then: kdstore build --data OUT --input-ids-field prompt_ids "
        "--response-ids-field response_ids (docs/TRAINING.md, 'On-policy rounds')"))
    print(json.dumps(generate(cfg)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from student.evaluate import format_report
    from student.train import evaluate_trained

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_trained(args.model, args.store, batch_size=args.batch_size, max_rows=args.max_rows,
                              device=device)
    if args.json:  # one store: its result, as `evaluate` returns it; several: per store and pooled
        print(json.dumps(result["stores"][args.store[0]] if len(args.store) == 1 else result, indent=1))
        return 0
    print(format_report(result))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from student.plots import plot_run

    for path in plot_run(args.run, args.out):
        print(path)
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of rows)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kdstudent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)

    # convert, params and train parse their config dataclasses (student/config.py) themselves: see main()
    sub.add_parser("convert", add_help=False, help=CONVERT + " (kdstudent convert --help)")
    sub.add_parser("params", add_help=False, help=PARAMS + " (kdstudent params --help)")

    p = sub.add_parser("info", help="show a saved student's config and base reference")
    p.add_argument("student", help="student directory or a training run holding one")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="write a standard checkpoint (Mixtral) that transformers and vLLM serve")
    p.add_argument("student", metavar="RUN_OR_DIR", help="student directory or a training run holding one")
    p.add_argument("--to", default="mixtral", choices=["mixtral"], help="target architecture")
    p.add_argument("--out", required=True, help="directory to write; refused if it is, contains or is inside the "
                                                "student, its run or its base model directory")
    p.add_argument("--base", default=None, help="base model directory, if it moved since training")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the base model's dtype")
    p.add_argument("--drop-router-bias", action="store_true",
                   help="export a student trained with --router-bias-update, routing without its selection bias "
                        "(Mixtral cannot represent it; see docs/STUDENT.md)")
    p.set_defaults(func=cmd_export)

    sub.add_parser("train", add_help=False, help="distil a student from a logit store (kdstudent train --help)")
    sub.add_parser("generate", add_help=False, help=GENERATE + " (kdstudent generate --help)")
    p = sub.add_parser("eval", help="teacher-KL, perplexity, top-1 agreement, calibration, expert usage on stores, "
                                    "per domain and pooled")
    p.add_argument("--model", required=True, help="a training run (any student kind; its newest checkpoint, the "
                                                  "state export reads too) or a saved student directory")
    p.add_argument("--store", required=True, action="append",
                   help="held-out logit store; give it several times to report each store and all of them pooled "
                        "(each store once: the same store under two spellings is refused)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="rows per forward (memory; not the result)")
    p.add_argument("--max-rows", type=_positive_int, default=None,
                   help="evaluate exactly the first N rows of each store")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="PNGs of a run's loss curves, evaluations and expert load")
    p.add_argument("run")
    p.add_argument("--out", default=None, help="output folder (default RUN/plots)")
    p.set_defaults(func=cmd_plot)
    return ap


def _errors() -> tuple[type[BaseException], ...]:
    """What the user can fix, reported as one line (exit 2) instead of a traceback: bad options and mismatches
    (ValueError: TrainError, ManifestError, TargetError, ...), a store that does not match its manifest
    (StoreError), a run directory another training holds, missing or unreadable files (OSError)."""
    from logit_store import StoreError
    from student.run import RunLockedError

    return ValueError, OSError, StoreError, RunLockedError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        dataclass_commands = {"train": cmd_train, "convert": cmd_convert, "params": cmd_params,
                              "generate": cmd_generate}
        if argv[:1] and argv[0] in dataclass_commands:
            return dataclass_commands[argv[0]](argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except _errors() as err:  # our errors say what is wrong and what to do
        rank = os.environ.get("RANK")  # under torchrun every process reports; say which
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"kdstudent {argv[0] if argv else ''}{where}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
