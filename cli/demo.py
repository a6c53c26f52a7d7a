"""`make demo`: the whole path on a tiny teacher and text generated here (nothing is downloaded).

1. train a tiny teacher for a few seconds (a stand-in for a big model),
2. `kdstore build` its top-k distributions for training and held-out text (vLLM backend, on the CPU here),
3. `kdstudent train` a MoE-LoRA student (the teacher pruned to one layer) from the store, evaluating on the
   held-out store, 4. `kdstudent eval` and `kdstudent plot`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from cli import kdstore, kdstudent
from logit_store.build import BuildConfig, build
from logit_store.synthetic import make_tiny_teacher, synthetic_corpus


def _write_jsonl(path: str, texts: list[str]) -> str:
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def build_demo_stores(out: str, backend: str = "vllm", k: int = 16) -> tuple[str, str, str]:
    """(teacher dir, train store, validation store)."""
    from logit_store.teachers import load_teacher

    teacher_dir = os.path.join(out, "teacher")
    if not os.path.exists(os.path.join(teacher_dir, "config.json")):
        print(f"training a tiny teacher on generated text -> {teacher_dir}")
        make_tiny_teacher(teacher_dir)
    texts = synthetic_corpus(480, seed=1)  # held out from the teacher's own training text (seed 0)
    splits = {"train": texts[:400], "validation": texts[400:]}
    options = {"dtype": "float32"} if backend == "hf" else {"dtype": "float32", "max_logprobs": k}
    teacher = load_teacher(backend, teacher_dir, **options)  # one engine for both stores
    stores = []
    for split, docs in splits.items():
        data = _write_jsonl(os.path.join(out, f"{split}.jsonl"), docs)
        store = os.path.join(out, f"store-{split}")
        shutil.rmtree(store, ignore_errors=True)
        print(f"\n$ kdstore build --teacher {teacher_dir} --data {data} --text-field text --out {store} "
              f"--top-k {k} --backend {backend}")
        cfg = BuildConfig(teacher=teacher_dir, data=data, out=store, backend=backend, text_field="text", top_k=k,
                          max_seq_len=256, shard_tokens=8192, dtype="float32")
        print(build(cfg, teacher=teacher).format())
        stores.append(store)
    return teacher_dir, stores[0], stores[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="teacher backend (default vllm)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    args = p.parse_args(argv)
    teacher, train_store, val_store = build_demo_stores(args.out, args.backend)
    print("\n$ kdstore verify", train_store)
    if kdstore.main(["verify", train_store]):
        return 1
    print("\n$ kdstore inspect", train_store, "--row 0 --max-positions 8 --top 3")
    kdstore.main(["inspect", train_store, "--row", "0", "--max-positions", "8", "--top", "3"])

    run = os.path.join(args.out, "run")
    shutil.rmtree(run, ignore_errors=True)
    train_args = ["--store", train_store, "--base", teacher, "--out", run, "--keep_layers", "0", "--experts", "4",
                  "--rank", "8", "--attn_rank", "8", "--batch_size", "8", "--max_steps", str(args.steps),
                  "--lr", "2e-3", "--warmup_steps", "5", "--log_every", "5", "--eval_store", val_store,
                  "--eval_every", str(max(args.steps // 3, 1)), "--loss", "srkl", "--ce_weight", "0.1"]
    print("\n$ kdstudent train " + " ".join(train_args))
    if kdstudent.main(["train", *train_args]):
        return 1
    print(f"\n$ kdstudent eval --model {run} --store {val_store}")
    kdstudent.main(["eval", "--model", run, "--store", val_store])
    print(f"\n$ kdstudent plot {run}")
    kdstudent.main(["plot", run])
    print(f"\neverything is under {args.out}/: teacher/, train.jsonl, validation.jsonl, store-train/, "
          f"store-validation/, run/ (metrics.jsonl, checkpoints, final/student, plots/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
