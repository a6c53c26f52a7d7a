"""Peak memory and time of the sparse KD loss (forward + backward), chunked LM head vs dense [B, T, V] logits.

Variants (same inputs, same loss: the paper's skew reverse KL, alpha 0.1, + 0.1 CE, top-k targets + tail):
  dense          full logits, log-softmax, gather, the same bucket math: the frugal way a dense trainer does it
  dense-ref      `dense_distill_loss`, the test reference (probability space, dense candidate mask): slower still
  chunked-C      `distill_loss` with chunk_size C (logits recomputed in backward, never [B, T, V])
  chunked-bf16-C the same under bf16 autocast (matmuls in bf16, softmax math and accumulation in fp32)

    python -m benchmarks.loss_bench [--quick] [--json out.json] [--device cpu|cuda]

Memory: each variant runs in its own subprocess. On CPU the figure is the peak resident set size (getrusage
ru_maxrss) minus the RSS once the inputs and parameters exist, i.e. what the loss's forward + backward add,
gradients of hidden and the LM head included. Big tensors are mmap'ed by glibc and returned on free, so RSS
follows allocations closely; it counts allocator slack and is an upper bound on tensor bytes. On CUDA it is
torch.cuda.max_memory_allocated minus the allocation before the step.
Time: after the memory runs, the parent process times `--reps` forward + backward runs of every variant,
interleaved round-robin (so a busy neighbour slows all alike), and reports the median; torch at `--threads`
threads (1 by default: the machine is shared, timings are noisy, the load average is recorded). The subprocesses'
cold first-run times are kept too. Gradients (hidden and LM head) are compared with the dense variant's.
Measures and reports; never asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import write_json
from student.losses import NEG, DistillLossConfig, dense_distill_loss, distill_loss, kd_per_token

LOSS = dict(kind="srkl", alpha=0.1, ce_weight=0.1)


# ================================================================ inputs
def make_inputs(batch: int, seq: int, vocab: int, hidden: int, k: int, device: str, seed: int = 0):
    """SmolLM2-like student head and a top-k batch shaped like `collate`'s, without any [B, T, V] temporary."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (2.0 / math.sqrt(hidden))  # logits spread ~2
    loss_mask = torch.ones(batch, seq, dtype=torch.bool)
    loss_mask[:, -1] = False  # the last position predicts nothing
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.where(loss_mask, torch.roll(input_ids, -1, 1), -100)
    # k distinct ids per position (an arithmetic progression mod V, random start and odd stride)
    start = torch.randint(0, vocab, (batch, seq, 1), generator=g)
    stride = 2 * torch.randint(1, vocab // (2 * k), (batch, seq, 1), generator=g) + 1
    ids = (start + stride * torch.arange(k)) % vocab
    tail = torch.log(torch.rand(batch, seq, generator=g) * 0.2 + 0.01)  # 1 % .. 21 % of the mass outside top-k
    lp = (torch.randn(batch, seq, k, generator=g) * 2.0).sort(-1, descending=True).values.log_softmax(-1)
    lp = lp + torch.log1p(-tail.exp())[..., None]
    batch_d = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                   loss_mask=loss_mask, target_ids=ids, target_logprobs=lp.float(),
                   target_mask=torch.ones_like(ids, dtype=torch.bool), target_tail=tail.float())
    batch_d = {key: v.to(device) for key, v in batch_d.items()}
    return h.to(device).requires_grad_(), w.to(device).requires_grad_(), batch_d


def dense_frugal(h, w, batch, cfg, bias=None):
    """Full [B, T, V] logits and log-softmax, then the same bucket loss: the usual dense implementation."""
    logq = torch.log_softmax(F.linear(h, w, bias).float() / cfg.temperature, -1)  # [B, T, V], kept for backward
    m, tmask = batch["loss_mask"], batch["target_mask"]
    cand = logq.gather(-1, batch["target_ids"])  # gather first, then select: no [N, V] copy
    tail = torch.log1p(-torch.logsumexp(cand.masked_fill(~tmask, -math.inf), -1).exp().clamp(max=1 - 1e-7))
    lq = torch.cat([cand.masked_fill(~tmask, NEG), tail[..., None]], -1)[m].clamp(min=NEG)
    lp = torch.cat([batch["target_logprobs"].masked_fill(~tmask, -math.inf), batch["target_tail"][..., None]], -1)
    kd = kd_per_token(lq, lp[m].clamp(min=NEG), cfg).mean()
    labels = batch["labels"]
    ce = -logq.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)[m & (labels != -100)].mean()
    return cfg.kd_weight * kd + cfg.ce_weight * ce, {}


# ================================================================ one variant
def make_step(name: str, h: torch.Tensor, w: torch.Tensor, batch: dict, dev: str):
    """A closure running one forward + backward of the variant `name`; returns the loss."""
    chunk = int(name.rsplit("-", 1)[1]) if name.startswith("chunked-") else None
    cfg = DistillLossConfig(**LOSS, chunk_size=chunk or 1)
    fn = {"dense": dense_frugal, "dense-ref": dense_distill_loss}.get(name, distill_loss)
    autocast = name.startswith("chunked-bf16-")

    def step() -> torch.Tensor:
        h.grad = w.grad = None
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = fn(h, w, batch, cfg)
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        return loss

    return step


def worker(args) -> dict:
    """Memory and gradients of one variant, alone in this process (its first, cold, forward + backward)."""
    torch.set_num_threads(args.threads)
    dev = args.device
    h, w, batch = make_inputs(args.batch, args.seq, args.vocab, args.hidden, args.k, dev)
    step = make_step(args.worker, h, w, batch, dev)
    base_rss = _rss_bytes()
    if dev == "cuda":
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    if dev == "cuda":
        extra = torch.cuda.max_memory_allocated() - base_alloc
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    torch.save(dict(loss=loss.detach().cpu(), h=h.grad.cpu(), w=w.grad.cpu()),
               os.path.join(args.out, args.worker + ".pt"))
    chunk = int(args.worker.rsplit("-", 1)[1]) if args.worker.startswith("chunked-") else None
    return dict(variant=args.worker, chunk_size=chunk, peak_extra_bytes=extra, baseline_rss_bytes=base_rss,
                first_s=first, loss=loss.item())


def interleaved_times(args, names: list[str]) -> dict[str, list[float]]:
    """Round-robin timing in this process, so that a noisy neighbour slows every variant alike."""
    torch.set_num_threads(args.threads)
    h, w, batch = make_inputs(args.batch, args.seq, args.vocab, args.hidden, args.k, args.device)
    steps = {n: make_step(n, h, w, batch, args.device) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.warmup + args.reps):
        for n in names:
            t0 = time.perf_counter()
            steps[n]()
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ================================================================ driver
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (vocab 8192, seq 512, batch 2): < 1 min")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2: 49,152")
    ap.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M: 576")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0, help="untimed rounds before the timed ones (--quick: 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", help="comma-separated; default: dense,dense-ref,chunked-1024,chunked-256,"
                    "chunked-bf16-1024 (--quick: dense,dense-ref,chunked-128,chunked-bf16-128)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.vocab, args.reps, args.warmup = 2, 512, 8192, 3, 1
    args.variants = args.variants or ("dense,dense-ref,chunked-128,chunked-bf16-128" if args.quick else
                                      "dense,dense-ref,chunked-1024,chunked-256,chunked-bf16-1024")
    if args.worker:
        print(json.dumps(worker(args)))
        return {}

    load_before = os.getloadavg()
    shape = dict(batch=args.batch, seq=args.seq, vocab=args.vocab, hidden=args.hidden, k=args.k)
    print(f"sparse KD loss fwd+bwd, {shape}, loss {LOSS}, {args.device}, {args.threads} thread(s), "
          f"load avg {load_before[0]:.2f}")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            cmd = [sys.executable, "-m", "benchmarks.loss_bench", "--worker", name, "--out", tmp,
                   "--device", args.device, "--threads", str(args.threads)]
            cmd += [f"--{key}={val}" for key, val in shape.items()]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                records.append(dict(variant=name, error=proc.stderr[-2000:]))
                continue
            records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        ref_name = "dense" if any(r["variant"] == "dense" and "error" not in r for r in records) else None
        if ref_name:
            ref = torch.load(os.path.join(tmp, ref_name + ".pt"))
            for r in records:
                if "error" in r:
                    continue
                got = torch.load(os.path.join(tmp, r["variant"] + ".pt"))
                r["loss_abs_diff_vs_dense"] = abs(got["loss"].item() - ref["loss"].item())
                for key in ("h", "w"):
                    diff = (got[key].float() - ref[key].float()).abs().max().item()
                    r[f"grad_{key}_max_abs_diff_vs_dense"] = diff
                    r[f"grad_{key}_max_rel_diff_vs_dense"] = diff / ref[key].abs().max().item()
    ok = [r["variant"] for r in records if "error" not in r]
    for name, ts in interleaved_times(args, ok).items():
        r = next(r for r in records if r["variant"] == name)
        r["times_s"], r["median_s"] = ts, statistics.median(ts) if ts else r["first_s"]
    dense_peak = next((r["peak_extra_bytes"] for r in records if r["variant"] == "dense" and "error" not in r), None)
    print(f"{'variant':<18}{'peak MiB':>10}{'x dense':>9}{'median s':>10}{'loss':>12}{'|dL|':>9}"
          f"{'max|dgh|':>10}{'max|dgW|':>10}{'rel dgW':>9}")
    for r in records:
        if "error" in r:
            continue
        ratio = r["peak_extra_bytes"] / dense_peak if dense_peak else float("nan")
        r["peak_ratio_vs_dense"] = ratio
        print(f"{r['variant']:<18}{r['peak_extra_bytes'] / 2**20:>10.0f}{ratio:>9.3f}{r['median_s']:>10.2f}"
              f"{r['loss']:>12.6f}{r.get('loss_abs_diff_vs_dense', 0):>9.1e}"
              f"{r.get('grad_h_max_abs_diff_vs_dense', 0):>10.1e}{r.get('grad_w_max_abs_diff_vs_dense', 0):>10.1e}"
              f"{r.get('grad_w_max_rel_diff_vs_dense', 0):>9.1e}")
    out = dict(config=dict(shape, loss=LOSS, device=args.device, threads=args.threads, reps=args.reps,
                           warmup=args.warmup, quick=args.quick),
               memory_measure="peak RSS (ru_maxrss) - RSS after inputs, per subprocess" if args.device == "cpu"
               else "torch.cuda.max_memory_allocated - memory_allocated before the step",
               env=dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                        loadavg_before=load_before, loadavg_after=os.getloadavg()),
               results=records)
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
