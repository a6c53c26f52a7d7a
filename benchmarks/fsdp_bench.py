"""DDP vs FSDP2 (frozen base sharded / replicated) under torchrun: seconds per step and bytes communicated.

    python -m benchmarks.fsdp_bench [--nproc 2] [--layers 4] [--steps 6] [--json out.json]

Student: MoE-LoRA (8 experts, top-2, rank 16, attention LoRA 16) on a random-init model of SmolLM2-135M's shape
cut to `--layers` blocks (vocab 49,152: the tied embedding is most of the frozen weights), fp32, gloo on CPU
(NCCL on GPUs). The store is captured from random token rows by the hf backend. Each variant runs the real
`kdstudent train` under `torch.distributed.run`; every rank counts the bytes of the collectives FSDP2 calls
(`student.distributed.CommCounter`: all-gather = full unsharded size, reduce-scatter = full gradient size).
DDP's bucketed all-reduce runs in C++ and is not counted (it moves the trainable gradients once a step; the
figure given for it is that size). Seconds per step: median over the steps after the first, from metrics.jsonl.
Measures and reports; never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = {
    "ddp": ["--sharding", "ddp"],
    "fsdp-shard": ["--sharding", "fsdp", "--fsdp_frozen", "shard"],
    "fsdp-replicate": ["--sharding", "fsdp", "--fsdp_frozen", "replicate"],
}


def prepare(work: Path, layers: int, seq: int, rows: int) -> tuple[str, str]:
    """A random SmolLM2-shaped base with `layers` blocks + offline tokenizer, and a top-64 store from it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from benchmarks.gpu_check import SMOLLM2_135M, make_tokenizer
    from logit_store import Manifest, ShardWriter, StoreRow, TargetSpec
    from logit_store.fingerprint import describe_tokenizer
    from logit_store.teachers.hf import HFTeacher

    base = work / "base"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(SMOLLM2_135M, num_hidden_layers=layers), bos_token_id=0,
                                         eos_token_id=0, pad_token_id=1))
    model.save_pretrained(base)
    make_tokenizer(None).save_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    teacher = HFTeacher(model, str(base))
    rng = np.random.default_rng(0)
    ids = [rng.integers(2, teacher.vocab_size, seq) for _ in range(rows)]
    mask = np.ones(seq, bool)
    mask[0] = False
    store = str(work / "store")
    manifest = Manifest(target=TargetSpec("topk", k=64), vocab_size=teacher.vocab_size,
                        tokenizer=describe_tokenizer(tok, str(base)))
    with ShardWriter(store, manifest, batch_tokens=seq * 2) as w:
        for i, (r, t) in enumerate(zip(ids, teacher.topk([(r, mask) for r in ids], 64), strict=True)):
            w.write(StoreRow(r, mask, t, i))
    return str(base), store


def worker(argv: list[str]) -> None:
    """One rank: count the collectives, run the real trainer, write this rank's counts."""
    from cli.config import parse_config
    from student.distributed import CommCounter
    from student.train import TrainConfig, train

    counter = CommCounter().install()
    cfg = parse_config(TrainConfig, argv, "fsdp_bench worker", "")
    train(cfg)
    rank = int(os.environ.get("RANK", 0))
    Path(cfg.out, f"comm-rank{rank}.json").write_text(json.dumps({"bytes": counter.bytes, "calls": counter.calls}))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2, help="rows per process and micro-batch")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fsdp-bench-"))
    rows = args.nproc * args.batch * args.grad_accum * args.steps
    base, store = prepare(work, args.layers, args.seq, rows)
    from student.train import TrainConfig, build_model

    model = build_model(TrainConfig(store=store, base=base, out="-", attn_rank=16))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    del model
    common = ["--store", store, "--base", base, "--attn_rank", "16", "--batch_size", str(args.batch),
              "--grad_accum", str(args.grad_accum), "--max_steps", str(args.steps), "--log_every", "1",
              "--no_progress", "--no_shuffle", "--warmup_steps", "0"]
    out = {"config": dict(vars(args), trainable_bytes=trainable, frozen_bytes=frozen), "results": {},
           "loadavg_before": os.getloadavg()}
    print(f"student: trainable {trainable / 2**20:.1f} MiB, frozen {frozen / 2**20:.1f} MiB (fp32); "
          f"{args.nproc} processes, {args.layers} layers, batch {args.batch} x {args.seq} x accum {args.grad_accum}",
          flush=True)
    for name in [v for v in args.variants.split(",") if v]:
        run = work / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "benchmarks.fsdp_bench", "--worker", *common, *VARIANTS[name], "--out", str(run)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if p.returncode != 0:
            out["results"][name] = {"error": p.stderr[-2000:]}
            print(f"{name}: FAILED\n{p.stderr[-2000:]}", flush=True)
            continue
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        cum, t = 0, []
        for r in recs:
            cum += r["tokens"]
            t.append(cum / r["tokens_per_s"])
        step_s = float(np.median(np.diff(t))) if len(t) > 1 else None
        comm = json.loads((run / "comm-rank0.json").read_text())
        per_step = {k: v / args.steps for k, v in comm["bytes"].items()}
        if name == "ddp":
            per_step["all_reduce (C++ buckets, not counted; = trainable grads)"] = trainable
        out["results"][name] = {"step_s": step_s, "bytes_per_step_rank0": per_step, "calls": comm["calls"],
                                "final_loss": recs[-1]["loss"]}
        print(f"{name:<15} {step_s:.3f} s/step; per step and process: all-gather "
              f"{per_step['all_gather_single'] / 2**20:.1f} MiB, reduce-scatter "
              f"{per_step['reduce_scatter_single'] / 2**20:.1f} MiB; final loss {recs[-1]['loss']:.6f}", flush=True)
    out["loadavg_after"] = os.getloadavg()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
