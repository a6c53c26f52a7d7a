"""Peak RSS and wall time of `kdstore build` on one huge JSONL line (default 50 MB) at --max-seq-len 64.

    python -m benchmarks.huge_row_bench TREE TEACHER [MB]

TREE: the moekd checkout to run (its cli.kdstore: this one, or an older commit's `git worktree` to compare);
TEACHER: a teacher folder (its tokenizer tokenises the line; `make teacher` prepares the demo's). The line is
English-like words (seeded), written to a temp dir; the build runs in a child process, whose peak RSS is read from
getrusage(RUSAGE_CHILDREN). A row keeps only --max-seq-len tokens, so memory and time should not grow with the line.
"""
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

tree, teacher = sys.argv[1], sys.argv[2]
mb = float(sys.argv[3]) if len(sys.argv) > 3 else 50
words = ["the", "store", "teacher", "student", "distribution", "token", "row", "shard", "manifest", "of", "and",
         "a", "build", "with", "lock", "input", "output", "mixture", "weight", "loss,", "positions."]
rng = random.Random(0)
with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "big.jsonl")
    parts, size = [], 0
    while size < mb * 1e6:
        w = rng.choice(words)
        parts.append(w)
        size += len(w) + 1
    with open(data, "w") as f:
        f.write(json.dumps({"text": " ".join(parts)}) + "\n")
        f.write(json.dumps({"text": "a short second row of text"}) + "\n")
    del parts
    print(f"input: {os.path.getsize(data) / 1e6:.1f} MB, 2 lines (one huge)")
    cmd = [sys.executable, "-m", "cli.kdstore", "build", "--teacher", teacher, "--data", data, "--text-field",
           "text", "--max-seq-len", "64", "--backend", "hf", "--top-k", "8", "--no-progress",
           "--out", os.path.join(tmp, "store")]
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    start = time.time()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB -> GB (approx)
    print(done.stdout[-1500:], done.stderr[-1500:])
    print(f"exit {done.returncode}; wall {seconds:.1f} s; peak RSS {peak:.2f} GB")
