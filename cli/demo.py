"""`make demo`: the main job end to end on a tiny teacher and text generated here (nothing is downloaded).

Trains a tiny teacher for a few seconds, captures its top-k distributions for held-out text with
`kdstore build` (vLLM backend), then shows `kdstore info`, `verify` and `inspect` on the store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from cli import kdstore
from logit_store.build import BuildConfig, build
from logit_store.synthetic import make_tiny_teacher, synthetic_corpus


def build_demo_store(out: str, backend: str = "vllm", k: int = 16, n_docs: int = 200) -> str:
    teacher = os.path.join(out, "teacher")
    if not os.path.exists(os.path.join(teacher, "config.json")):
        print(f"training a tiny teacher on generated text -> {teacher}")
        make_tiny_teacher(teacher, n_docs=n_docs)
    data = os.path.join(out, "data.jsonl")
    with open(data, "w") as f:
        for text in synthetic_corpus(n_docs, seed=1):  # held out: the teacher trained on seed 0
            f.write(json.dumps({"text": text}) + "\n")
    store = os.path.join(out, "store")
    shutil.rmtree(store, ignore_errors=True)
    cfg = BuildConfig(teacher=teacher, data=data, out=store, backend=backend, text_field="text", top_k=k,
                      max_seq_len=256, shard_tokens=8192, dtype="float32")
    print(f"\n$ kdstore build --teacher {teacher} --data {data} --text-field text --out {store} --top-k {k} "
          f"--backend {backend}")
    print(build(cfg).format())
    return store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="teacher backend (default vllm)")
    args = p.parse_args(argv)
    store = build_demo_store(args.out, args.backend)
    print("\n$ kdstore info", store)
    kdstore.main(["info", store])
    print("\n$ kdstore verify", store)
    rc = kdstore.main(["verify", store])
    print("\n$ kdstore inspect", store, "--row 0 --max-positions 12 --top 3")
    kdstore.main(["inspect", store, "--row", "0", "--max-positions", "12", "--top", "3"])
    print(f"\neverything is under {args.out}/: teacher/ (the tiny teacher), data.jsonl, store/")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
