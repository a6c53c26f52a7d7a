"""`make demo`: build a small store end to end from a tiny teacher and text generated here, then check it."""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

from cli import kdstore
from logit_store import Manifest, ShardWriter, StoreRow, TargetSpec
from logit_store.fingerprint import model_fingerprint, tokenizer_fingerprint
from logit_store.synthetic import make_tiny_teacher, synthetic_corpus


def build_demo_store(out: str, k: int = 16, n_docs: int = 200) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logit_store.teachers.hf import HFTeacher

    teacher_dir = os.path.join(out, "teacher")
    if not os.path.exists(os.path.join(teacher_dir, "config.json")):
        print(f"training a tiny teacher on generated text -> {teacher_dir}")
        make_tiny_teacher(teacher_dir, n_docs=n_docs)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    teacher = HFTeacher(model)

    store = os.path.join(out, "store")
    shutil.rmtree(store, ignore_errors=True)
    manifest = Manifest(
        target=TargetSpec("topk", k=k), vocab_size=teacher.vocab_size,
        teacher={"name_or_path": teacher_dir, "fingerprint": model_fingerprint(teacher_dir), "backend": "hf",
                 "dtype": "float32"},
        tokenizer={"name_or_path": teacher_dir, "fingerprint": tokenizer_fingerprint(tok),
                   "vocab_size": len(tok)},
        input={"source": "logit_store.synthetic.synthetic_corpus", "n_docs": n_docs, "seed": 1,
               "fields": {"text": "text"}},
        sequence={"max_seq_len": 256, "packing": False},
    )
    texts = synthetic_corpus(n_docs, seed=1)  # held-out from the teacher's training corpus (seed 0)
    start = time.time()
    with ShardWriter(store, manifest, shard_tokens=4096, batch_tokens=1024) as writer:
        for lo in range(0, len(texts), 16):
            rows = []
            for i, text in enumerate(texts[lo:lo + 16], start=lo):
                ids = np.array(tok(text).input_ids[:256] + [tok.eos_token_id], dtype=np.int64)
                mask = np.ones(ids.size, dtype=bool)
                mask[0] = False
                rows.append((i, ids, mask))
            with torch.no_grad():
                targets = teacher.topk([(ids, mask) for _, ids, mask in rows], k)
            for (i, ids, mask), tgt in zip(rows, targets, strict=False):
                writer.write(StoreRow(ids, mask, tgt, source_index=i))
    print(f"built {store} in {time.time() - start:.1f}s\n")
    return store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    args = p.parse_args(argv)
    store = build_demo_store(args.out)
    print("$ kdstore info", store)
    kdstore.main(["info", store])
    print("\n$ kdstore verify", store)
    rc = kdstore.main(["verify", store])
    print("\n$ kdstore inspect", store, "--row 0 --max-positions 12 --top 3")
    kdstore.main(["inspect", store, "--row", "0", "--max-positions", "12", "--top", "3"])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
