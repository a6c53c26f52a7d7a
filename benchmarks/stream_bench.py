"""Decoded rows/s through `KDStream` at the sizes a trainer sees, per rank, for 1, 2 and 4 ranks.

Issue 14 changed what the stream deals to ranks and DataLoader workers from whole Arrow record batches (~64k
tokens, fixed at build time) to rows. Dealing rows costs reads: every rank reads the record batches its rows
are in, which for a shuffled order is all of them, where whole-record-batch dealing read 1/N of them. This
measures what that costs, on a store shaped like a real capture (rows of 256 tokens, top-64 targets, a 49k
vocabulary, 64k-token record batches): the same script, run against either version of `logit_store`:

    PYTHONPATH=. python benchmarks/stream_bench.py --store /tmp/stream-bench-store            # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/stream_bench.py --store /tmp/stream-bench-store

The store is written once (deterministic) and reused. One thread, no DataLoader workers: per-rank cost. Compare
`rows_per_cpu_s` (CPU time of the process) on a shared machine: wall time there measures the neighbours. The last
case reads a mixture (`--store` at 70 % of the tokens, a second store of half the rows and top-16 targets at 30 %),
with the time to plan its epoch (`plan_ms`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def write_bench_store(path: str, rows: int, seq: int, k: int, vocab: int, seed: int = 0) -> None:
    """Rows of `seq` tokens with Zipf-distributed top-k ids (distinct per position) and heavy-tailed probs."""
    from logit_store import Manifest, ShardWriter, StoreRow, TargetSpec, TopKTargets

    rng = np.random.default_rng(seed)
    pool = 4096  # candidates come from the pool's Zipf head, spread over the vocabulary
    to_vocab = rng.permutation(vocab)[:pool]
    zipf = -np.log(np.arange(1, pool + 1))
    manifest = Manifest(target=TargetSpec("topk", k=k), vocab_size=vocab, teacher={"name_or_path": "bench"})
    mask = np.ones(seq, bool)
    mask[0] = False
    with ShardWriter(path, manifest, batch_tokens=1 << 16) as w:
        for i in range(rows):
            keys = zipf[None, :] + rng.gumbel(size=(seq - 1, pool))
            ids = to_vocab[np.argpartition(-keys, k, axis=1)[:, :k]]
            logits = np.sort(rng.standard_t(3, size=(seq - 1, k + 1)) * 3, axis=1)[:, ::-1]
            lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            w.write(StoreRow(rng.integers(0, vocab, seq), mask, TopKTargets(ids, lp[:, :k], lp[:, k]), i))


def measure(stores: list[str], world: int, batch_size: int, shuffle_buffer: int,
            weights: list[float | None] | None = None) -> dict:
    """Rank 0's first epoch of one store or a mixture: decoded rows per second of wall time and of CPU time (this
    process, all threads; steadier on a shared machine), record batches read."""
    from logit_store import KDStream, LogitStore

    opened, reads = [LogitStore.open(s) for s in stores], []
    for store in opened:
        read_batch = store.read_batch
        store.read_batch = lambda file, b, read_batch=read_batch: reads.append((file, b)) or read_batch(file, b)
    plan = time.perf_counter()
    stream = KDStream(opened, batch_size, weights=weights, seed=0, rank=0, world_size=world,
                      shuffle_buffer=shuffle_buffer)
    stream.epoch_order(0)
    plan = time.perf_counter() - plan
    start, cpu = time.perf_counter(), time.process_time()
    rows = sum(int(b["input_ids"].shape[0]) for b in stream)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"stores": len(stores), "weights": weights, "world_size": world, "rows": rows,
            "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1), "cpu_seconds": round(cpu, 3),
            "rows_per_cpu_s": round(rows / cpu, 1), "plan_ms": round(plan * 1e3, 2), "record_batches_read": len(reads),
            "record_batches_in_store": sum(len(s.units()) for s in opened)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="the benchmark store (written here if absent)")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shuffle-buffer", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch

    import logit_store

    torch.set_num_threads(1)
    if not os.path.exists(os.path.join(args.store, "manifest.json")):
        write_bench_store(args.store, args.rows, args.seq, args.k, args.vocab)
    # a second store for the mixture: half the rows, top-16 (other candidate widths in one batch)
    other = args.store.rstrip("/") + "-mix"
    if not os.path.exists(os.path.join(other, "manifest.json")):
        write_bench_store(other, args.rows // 2, args.seq, 16, args.vocab, seed=1)
    results = []
    cases = [([args.store], world, None) for world in (1, 2, 4)] + [([args.store, other], 1, [None, 0.3])]
    for stores, world, weights in cases:
        runs = [measure(stores, world, args.batch_size, args.shuffle_buffer, weights) for _ in range(args.repeats)]
        best = max(runs, key=lambda r: r["rows_per_cpu_s"])
        results.append(best)
        print(json.dumps(best))
    out = {"logit_store": os.path.dirname(logit_store.__file__), "args": vars(args), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
