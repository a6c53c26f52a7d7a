"""Forward+backward cost of a MoE-LoRA MLP layer against the dense MLP it wraps, same process, same inputs.

Variants (all with the frozen base weights, trainable router + expert LoRA, input requiring grad as inside a
network whose earlier layers train):
  dense          the base LlamaMLP alone, frozen (the 1.0x reference: same frozen weights as the MoE)
  dense-trainable  the same MLP with trainable weights (what a dense fine-tune of it costs; for context)
  naive-k-full   per expert, its routed tokens run a full MLP (W x + s B A x on every projection): k x the base
  mixlora-style  base gate/up once per token, per-expert LoRA + a full down projection per routed token
  moe-loop       this package, autograd path: base projections once, only LoRA deltas per expert
  moe-fused      this package, hand-written SwiGLU expert autograd function, elementwise parts eager
  moe-compiled   the same with its two elementwise functions fused by torch.compile (the CPU default); routed
                 rows padded per expert so the LoRA products are batched matmuls (when that pads <= 30 %)
  moe-compiled-ragged  the same with rows ragged by expert: a loop of small matmuls per product (before)
  moe-grouped    this package with torch._grouped_mm (the CUDA path; on CPU for reference only)

    python -m benchmarks.moe_bench [--quick] [--json out.json]

Measures and reports; never asserts. Timings interleave the variants round-robin so that a noisy neighbour
affects them alike; the median is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from benchmarks.common import write_json
from student.moe_lora import MoELoRAMLP
from student.train import retain_freed_memory


def _route(moe: MoELoRAMLP, x2: torch.Tensor):
    _, w, idx = moe.route(x2)
    return w, idx


class NaiveKFull(nn.Module):
    """Each routed token runs through k complete experts (base weights recomputed per expert)."""

    def __init__(self, moe: MoELoRAMLP):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, r, s = self.moe, self.moe.rank, self.moe.scaling
        x2 = x.reshape(-1, x.shape[-1])
        w, idx = _route(m, x2)
        out = torch.zeros_like(x2)
        for e in range(m.num_experts):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            xe = x2[tok]
            g = m.base.gate_proj(xe) + s * (xe @ m.in_A[e, :r].T) @ m.in_B[e, 0]
            u = m.base.up_proj(xe) + s * (xe @ m.in_A[e, r:].T) @ m.in_B[e, 1]
            a = F.silu(g) * u
            y = m.base.down_proj(a) + s * (a @ m.out_A[e].T) @ m.out_B[e]
            out = out.index_add(0, tok, w[tok, slot].unsqueeze(1) * y)
        return out.reshape(x.shape)


class MixLoRAStyle(nn.Module):
    """Base gate/up once per token; per expert its LoRA deltas and its own full down projection."""

    def __init__(self, moe: MoELoRAMLP):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, r, s = self.moe, self.moe.rank, self.moe.scaling
        x2 = x.reshape(-1, x.shape[-1])
        g_all, u_all = m.base.gate_proj(x2), m.base.up_proj(x2)
        w, idx = _route(m, x2)
        out = torch.zeros_like(x2)
        for e in range(m.num_experts):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            xe = x2[tok]
            g = g_all[tok] + s * (xe @ m.in_A[e, :r].T) @ m.in_B[e, 0]
            u = u_all[tok] + s * (xe @ m.in_A[e, r:].T) @ m.in_B[e, 1]
            a = F.silu(g) * u
            y = m.base.down_proj(a) + s * (a @ m.out_A[e].T) @ m.out_B[e]
            out = out.index_add(0, tok, w[tok, slot].unsqueeze(1) * y)
        return out.reshape(x.shape)


def _fwd_bwd(module: nn.Module, x: torch.Tensor) -> None:
    xi = x.detach().requires_grad_()
    module(xi).float().square().mean().backward()
    for p in module.parameters():
        p.grad = None


def _fwd(module: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        module(x)


def run(
    hidden: int,
    inter: int,
    tokens: int,
    experts: int,
    experts_per_token: int,
    rank: int,
    reps: int,
    warmup: int,
    seed: int = 0,
    only: list[str] | None = None,
) -> dict:
    torch.manual_seed(seed)
    base = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=1)).requires_grad_(
        False
    )
    moe = {
        impl: MoELoRAMLP(base, experts, experts_per_token, rank, alpha=2 * rank, impl=impl)
        for impl in ("loop", "fused", "compiled", "grouped")
    }
    # the compiled path with its rows ragged by expert (a matmul loop per expert) instead of padded (batched)
    moe["compiled-ragged"] = MoELoRAMLP(base, experts, experts_per_token, rank, alpha=2 * rank, impl="compiled")
    moe["compiled-ragged"].max_padding = 0.0
    with torch.no_grad():  # trained-looking adapters and router, so routing is not degenerate
        ref = moe["loop"]
        ref.in_B.normal_(std=0.01)
        ref.out_B.normal_(std=0.01)
        ref.router.weight.normal_(std=0.5)
    for m in moe.values():
        m.load_state_dict(ref.state_dict())
    trainable = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=1))
    trainable.load_state_dict(base.state_dict())
    variants: dict[str, nn.Module] = {
        "dense": base,
        "dense-trainable": trainable,
        "naive-k-full": NaiveKFull(moe["loop"]),
        "mixlora-style": MixLoRAStyle(moe["loop"]),
        "moe-loop": moe["loop"],
        "moe-fused": moe["fused"],
        "moe-compiled": moe["compiled"],
        "moe-compiled-ragged": moe["compiled-ragged"],
        "moe-grouped": moe["grouped"],
    }
    if only:
        unknown = set(only) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(variants)}")
        variants = {n: m for n, m in variants.items() if n == "dense" or n in only}
    seq = 512 if tokens % 512 == 0 else tokens
    x = torch.randn(tokens // seq, seq, hidden)
    with torch.no_grad():  # sanity: every MoE variant computes the same function
        y0 = moe["loop"](x)
        max_diff = {
            n: (variants[n](x) - y0).abs().max().item() for n in variants if n.startswith(("moe", "naive", "mix"))
        }
    kinds = ("fwd_bwd", "fwd", "fwd_bwd_cpu")
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in variants}
    for i in range(warmup + reps):
        for name, mod in variants.items():
            for kind, fn in (("fwd_bwd", _fwd_bwd), ("fwd", _fwd)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn(mod, x)
                if i >= warmup:
                    times[name][kind].append(time.perf_counter() - t0)
                    if kind == "fwd_bwd":  # CPU seconds of all threads: less sensitive to a busy neighbour
                        times[name]["fwd_bwd_cpu"].append(time.process_time() - c0)
    dense = {k: statistics.median(times["dense"][k]) for k in kinds}
    results = {}
    for name in variants:
        med = {k: statistics.median(times[name][k]) for k in kinds}
        results[name] = {
            "fwd_bwd_ms": med["fwd_bwd"] * 1e3,
            "fwd_ms": med["fwd"] * 1e3,
            "fwd_bwd_cpu_ms": med["fwd_bwd_cpu"] * 1e3,
            "fwd_bwd_ratio": med["fwd_bwd"] / dense["fwd_bwd"],
            "fwd_ratio": med["fwd"] / dense["fwd"],
            "fwd_bwd_cpu_ratio": med["fwd_bwd_cpu"] / dense["fwd_bwd_cpu"],
            "max_abs_diff_vs_moe_loop": max_diff.get(name),
        }
    usage = ref.router_stats.counts.tolist() if ref.router_stats is not None else None
    return {
        "config": dict(hidden=hidden, intermediate=inter, tokens=tokens, experts=experts,
                       experts_per_token=experts_per_token, rank=rank),
        "reps": reps,
        "expert_load": usage,
        "results": results,
    }


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s in which some runnable task waited for a CPU (a busy neighbour)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (a smoke run)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M: 576")
    ap.add_argument("--intermediate", type=int, default=1536, help="SmolLM2-135M: 1536")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--experts-per-token", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--variants", default="", help="comma-separated subset (dense is always run)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc as it is (kdstudent train sets retain_freed_memory(), and so does this "
                         "benchmark unless told)")
    args = ap.parse_args(argv)
    retained = False if args.default_malloc else retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.reps = 512, 3
    load_before, pressure_before = os.getloadavg(), cpu_pressure()
    only = [v for v in args.variants.split(",") if v] or None
    out = run(args.hidden, args.intermediate, args.tokens, args.experts, args.experts_per_token, args.rank, args.reps,
              3, only=only)
    out["env"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_retains_freed_memory": retained,
        "cpu": platform.processor() or platform.machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_pressure_some_avg10_before": pressure_before,
        "cpu_pressure_some_avg10_after": cpu_pressure(),
    }
    c = out["config"]
    print(
        f"MoE-LoRA MLP fwd+bwd, hidden {c['hidden']}, intermediate {c['intermediate']}, {c['tokens']} tokens, "
        f"{c['experts']} experts, top-{c['experts_per_token']}, rank {c['rank']}, {torch.get_num_threads()} threads, "
        f"malloc {'retaining freed memory' if retained else 'default'} (load avg before {load_before[0]:.2f})"
    )
    if (pressure_before or 0) > 20 or (out["env"]["cpu_pressure_some_avg10_after"] or 0) > 20:
        print("WARNING: other processes competed for the CPU during this run; ratios are unreliable")
    head = ("variant", "fwd+bwd ms", "x dense", "cpu ms", "x dense", "fwd ms", "x dense", "max|diff|")
    print(f"{head[0]:<15}" + "".join(f"{h:>11}" for h in head[1:]))
    for name, r in out["results"].items():
        diff = "" if r["max_abs_diff_vs_moe_loop"] is None else f"{r['max_abs_diff_vs_moe_loop']:.1e}"
        cols = (r["fwd_bwd_ms"], r["fwd_bwd_ratio"], r["fwd_bwd_cpu_ms"], r["fwd_bwd_cpu_ratio"])
        cols += (r["fwd_ms"], r["fwd_ratio"])
        print(f"{name:<15}" + "".join(f"{c:>11.2f}" for c in cols) + f"{diff:>11}")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
