"""Bytes of shards hashed (the integrity sha256, docs/FORMAT.md §7) per run and per epoch, on both training paths.

The reader hashes a shard before any row of it is decoded. Before issue 22 it did so the first time each
*process* opened the shard, so DataLoader workers (new processes every epoch) repeated it: 2-3.4x the store per
run through `KDStream`, and 2x, 4x, 6x after epochs 0-2 through `StoreDataset` with the Trainer's non-persistent
workers. This counts every byte hashed (`logit_store.fs.sha256_of`, wrapped in the training process; forked
workers inherit the wrapper) for 1-2 ranks x 0-4 DataLoader workers, 3 epochs each:

- `kdstream`: `KDStream` read through `StoreLoader` (what `kdstudent train --num-workers N` does);
- `storedataset`: `StoreDataset` under a torch `DataLoader` with `persistent_workers=False` and a
  `DistributedSampler` (what transformers' Trainer does, one process per rank).

Ranks are simulated one after the other in this process, each with its own opened store, as separate rank
processes would be. The same script measures any checkout: with `--before DIR` it also runs itself under
`PYTHONPATH=DIR` (e.g. `git worktree add /tmp/before HEAD`) and prints both:

    python -m benchmarks.hash_bench --before /tmp/before --json benchmarks/results/hash_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

EPOCHS = 3


def write_store(path: str, rows: int, seq: int, k: int, vocab: int, shard_tokens: int, batch_tokens: int) -> None:
    """A store of random top-k rows, several shards of several record batches each (workers share shards)."""
    from logit_store import Manifest, ShardWriter, StoreRow, TargetSpec, TopKTargets

    rng = np.random.default_rng(0)
    manifest = Manifest(target=TargetSpec("topk", k=k), vocab_size=vocab, teacher={"name_or_path": "hash-bench"})
    mask = np.arange(seq) > 0
    with ShardWriter(path, manifest, shard_tokens=shard_tokens, batch_tokens=batch_tokens) as w:
        for i in range(rows):
            base, stride = rng.integers(0, vocab, (seq - 1, 1)), rng.integers(1, vocab // k, (seq - 1, 1))
            ids = (base + stride * np.arange(k)) % vocab  # k distinct ids per position
            logits = np.sort(rng.standard_t(3, size=(seq - 1, k + 1)) * 3, axis=1)[:, ::-1]
            lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            w.write(StoreRow(rng.integers(0, vocab, seq), mask, TopKTargets(ids, lp[:, :k], lp[:, k]), i))


def _rows(rows: list) -> int:
    """The DataLoader's collate_fn for StoreDataset: the row count (decoding is what the workers do)."""
    return len(rows)


def _count_hashes(log: str) -> None:
    """Wrap the reader's sha256 so that every call, in this process or a forked worker, appends its bytes."""
    from logit_store import fs as storefs

    real = storefs.sha256_of

    def counting(fs, path, *args, **kwargs):
        digest, size = real(fs, path, *args, **kwargs)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {size} {os.path.basename(path)}\n")
        return digest, size

    storefs.sha256_of = counting


def _hashed_since(log: str, seen: int) -> tuple[int, int, int]:
    """(bytes hashed, hashes, lines read) since line `seen` of the log."""
    lines = open(log).read().splitlines()[seen:] if os.path.exists(log) else []
    return sum(int(line.split()[1]) for line in lines), len(lines), seen + len(lines)


def run_case(store: str, path: str, world: int, workers: int, batch_size: int, log: str) -> dict:
    """3 epochs of every rank of one (path, ranks, workers) case: bytes hashed per epoch over the ranks."""
    import torch

    from logit_store import KDStream, StoreLoader

    per_epoch, hashes, seen, rows = [0] * EPOCHS, 0, _hashed_since(log, 0)[2], 0
    start = time.perf_counter()
    for rank in range(world):
        if path == "kdstream":
            loader = StoreLoader(KDStream(store, batch_size, seed=0, rank=rank, world_size=world),
                                 num_workers=workers)
        else:
            from student.hf_trainer import StoreDataset

            dataset = StoreDataset(store)
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                                 num_workers=workers, persistent_workers=False, collate_fn=_rows)
        for epoch in range(EPOCHS):
            if path != "kdstream":
                sampler.set_epoch(epoch)
            for batch in loader:
                rows += int(batch["input_ids"].shape[0]) if isinstance(batch, dict) else batch
            nbytes, n, seen = _hashed_since(log, seen)
            per_epoch[epoch] += nbytes
            hashes += n
        del loader
    return dict(path=path, ranks=world, workers=workers, rows_read=rows, hashes=hashes, bytes_per_epoch=per_epoch,
                bytes_per_run=sum(per_epoch), seconds=round(time.perf_counter() - start, 2))


def measure(store: str, batch_size: int, max_workers: int) -> dict:
    """Every case, against the `logit_store` this interpreter imports."""
    import torch

    import logit_store
    from logit_store import LogitStore

    torch.set_num_threads(1)
    log = tempfile.mktemp(prefix="hash-bench-", suffix=".log")
    _count_hashes(log)
    store_bytes = sum(s.bytes for s in LogitStore.open(store).manifest.shards)
    cases = []
    for path in ("kdstream", "storedataset"):
        for world in (1, 2):
            for workers in range(max_workers + 1):
                case = run_case(store, path, world, workers, batch_size, log)
                case["x_store_per_run"] = round(case["bytes_per_run"] / store_bytes, 2)
                case["x_store_after_epoch"] = [round(float(x) / store_bytes, 2) for x in np.cumsum(
                    case["bytes_per_epoch"])]
                cases.append(case)
                print(json.dumps(case), file=sys.stderr)
    if os.path.exists(log):
        os.unlink(log)
    return {"logit_store": os.path.dirname(logit_store.__file__), "store_bytes": store_bytes,
            "shards": len(LogitStore.open(store).manifest.shards), "epochs": EPOCHS, "cases": cases}


def table(results: dict[str, dict]) -> str:
    """Times the store's bytes hashed after epochs 0, 1, 2 (the last: per run), each version side by side."""
    labels = list(results)
    head = f"{'path':13s} {'ranks':>5s} {'workers':>7s} " + " ".join(f"{label + ' (x store, epochs 0/1/2)':>32s}"
                                                                      for label in labels)
    lines = [head]
    first = results[labels[0]]["cases"]
    for i, case in enumerate(first):
        cells = []
        for label in labels:
            c = results[label]["cases"][i]
            cells.append(f"{' / '.join(f'{x:.2f}' for x in c['x_store_after_epoch']):>32s}")
        lines.append(f"{case['path']:13s} {case['ranks']:>5d} {case['workers']:>7d} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="the benchmark store (written there if absent; default: a "
                                                  "temporary directory)")
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-tokens", type=int, default=12288, help="tokens per shard (8 shards by default)")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="tokens per record batch")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-workers", type=int, default=4)
    ap.add_argument("--before", default=None, help="a checkout of the earlier code, measured too (a subprocess "
                                                   "with PYTHONPATH=BEFORE)")
    ap.add_argument("--measure-only", action="store_true", help="print this interpreter's measurement as JSON")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    store = args.store or os.path.join(tempfile.gettempdir(), f"hash-bench-store-{args.rows}-{args.seq}-{args.k}")
    if not os.path.exists(os.path.join(store, "manifest.json")):
        write_store(store, args.rows, args.seq, args.k, args.vocab, args.shard_tokens, args.batch_tokens)
    if args.measure_only:
        print(json.dumps(measure(store, args.batch_size, args.max_workers)))
        return 0
    results = {}
    if args.before:
        cmd = [sys.executable, os.path.abspath(__file__), "--measure-only", "--store", store,
               "--batch-size", str(args.batch_size), "--max-workers", str(args.max_workers)]
        env = dict(os.environ, PYTHONPATH=os.path.abspath(args.before))
        out = subprocess.run(cmd, env=env, cwd=args.before, check=True, capture_output=True, text=True).stdout
        results["before"] = json.loads(out.splitlines()[-1])
    results["after" if args.before else "this checkout"] = measure(store, args.batch_size, args.max_workers)
    text = table(results)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "table": text.splitlines(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
