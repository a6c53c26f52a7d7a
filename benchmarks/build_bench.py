"""Capture throughput: the vllm backend vs the hf backend on the same teacher and inputs, in one run, and what
encoding + writing a store costs on top of the teacher's forward alone.

    python -m benchmarks.build_bench [--quick] [--json PATH] [--teacher DIR]

Teacher: SmolLM2-135M-Instruct converted by `kdstore prepare-teacher` (run `make teacher` first), else the tiny
synthetic teacher. Inputs: World English Bible chapters (public domain), cut to --seq-len tokens.
For each backend: `forward` = the backend's top-k call alone (teacher forward + candidate extraction);
`build` = the whole `kdstore build` path (tokenise, teacher, encode, compress, write, manifest) with the same
teacher already loaded. overhead = build time / forward time - 1. Best of --repeats runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from assets.corpora import bible_chapters
from benchmarks.common import teacher_dir, write_json
from logit_store.build import BuildConfig, build


def _teacher_dir(arg: str | None) -> tuple[str, str]:
    return (arg, os.path.basename(arg.rstrip("/"))) if arg else teacher_dir()


def _rows(tokenizer, n_rows: int, seq_len: int) -> tuple[list, str]:
    docs = [d["text"] for d in bible_chapters()[:n_rows]]
    rows = []
    for text in docs:
        ids = np.asarray(tokenizer(text).input_ids[:seq_len], dtype=np.int64)
        mask = np.ones(ids.size, bool)
        mask[0] = False
        rows.append((ids, mask))
    data = os.path.join(tempfile.mkdtemp(prefix="build-bench-"), "data.jsonl")
    with open(data, "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    return rows, data


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="teacher folder (default: prepared SmolLM2, else the tiny teacher)")
    p.add_argument("--quick", action="store_true", help="8 rows of 128 tokens, one repeat")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backends", default="vllm,hf")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.seq_len, args.repeats = 8, 128, 1
    from transformers import AutoTokenizer

    folder, teacher_name = _teacher_dir(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows, data = _rows(tokenizer, args.rows, args.seq_len)
    tokens = sum(ids.size for ids, _ in rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results = []
    for backend in args.backends.split(","):
        from logit_store.teachers import load_teacher

        options = {"dtype": args.dtype} if backend == "hf" else {"dtype": args.dtype, "max_logprobs": args.k}
        start = time.perf_counter()
        teacher = load_teacher(backend, folder, **options)
        load_s = time.perf_counter() - start
        teacher.topk(rows[:2], args.k)  # warm-up
        forward_s = _best(lambda t=teacher: t.topk(rows, args.k), args.repeats)

        def run_build(t=teacher, b=backend) -> None:
            with tempfile.TemporaryDirectory() as out:
                cfg = BuildConfig(teacher=folder, data=data, out=os.path.join(out, "s"), backend=b,
                                  text_field="text", top_k=args.k, max_seq_len=args.seq_len, add_eos=False,
                                  batch_rows=len(rows), progress=False, dtype=args.dtype)
                summary = build(cfg, teacher=t)
                if summary.tokens != tokens:  # the two timings must cover the same tokens
                    raise SystemExit(f"build wrote {summary.tokens} tokens, the forward saw {tokens}")

        build_s = _best(run_build, args.repeats)
        results.append(dict(backend=backend, teacher=teacher_name, dtype=args.dtype, k=args.k, rows=len(rows),
                            tokens=tokens, device=device, load_s=round(load_s, 1),
                            forward_tokens_per_s=round(tokens / forward_s), build_tokens_per_s=round(tokens / build_s),
                            overhead=round(build_s / forward_s - 1, 3)))
        del teacher
    print(f"\nteacher {teacher_name}, {args.dtype}, top-{args.k}, {len(rows)} rows x {args.seq_len} tokens "
          f"({tokens:,} tokens), {device}, {platform.processor() or platform.machine()}")
    print(f"{'backend':8s} {'load s':>7s} {'forward tok/s':>14s} {'build tok/s':>12s} {'overhead':>9s}")
    for r in results:
        print(f"{r['backend']:8s} {r['load_s']:7.1f} {r['forward_tokens_per_s']:14,d} {r['build_tokens_per_s']:12,d} "
              f"{100 * r['overhead']:8.1f}%")
    if len(results) == 2:
        a, b = results
        print(f"{a['backend']} / {b['backend']} build throughput: "
              f"{a['build_tokens_per_s'] / b['build_tokens_per_s']:.2f}x")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
