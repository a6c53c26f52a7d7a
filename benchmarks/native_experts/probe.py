"""Would a hand-written C++ expert kernel bring the CPU MoE-LoRA layer under 1.4x the dense MLP? (issue 12)

Builds routed_experts.cpp (ATen Vectorized, AVX-512 where the CPU has it, OpenMP) with torch's cpp_extension,
checks it against the package's fused path (outputs and every gradient, relative max difference), and times the
routed-expert function (forward, backward) of the package's compiled path against the same function with the
intermediate-size work done by the C++ kernels, interleaved in one process, at bench-moe's shape (SmolLM2-135M's
MLP, 2,048 tokens, 8 experts, top-2, rank 16). Both use the ragged row layout.

    python -m benchmarks.native_experts.probe [--json benchmarks/results/native_experts_probe.json]

Measures and reports; never asserts. Needs a C++ compiler (first build ~45 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import write_json
from student.fused_experts import KERNELS, Groups, RoutedGatedLoRA
from student.train import retain_freed_memory

TILE_ROWS = 8  # R in routed_experts.cpp


def build():
    from torch.utils.cpp_extension import load

    cap = torch.backends.cpu.get_cpu_capability()
    flags = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
    defs = [f"-DCPU_CAPABILITY_{cap}", f"-DCPU_CAPABILITY={cap}"] if cap in flags else []
    src = os.path.join(os.path.dirname(__file__), "routed_experts.cpp")
    return load(f"moekd_routed_experts_probe_{cap.lower()}", [src], verbose=False,
                extra_cflags=["-O3", "-fopenmp", *flags.get(cap, []), *defs], extra_ldflags=["-fopenmp"])


def problem(tokens: int, hidden: int, inter: int, experts: int, k: int, rank: int, seed: int = 0) -> dict:
    """Routed rows (ragged by expert), base pre-activations and trained-looking adapters."""
    g = torch.Generator().manual_seed(seed)
    top_w, top_i = (torch.randn(tokens, experts, generator=g) * 2).softmax(-1).topk(k, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts).tolist()
    tiles, start = [], 0
    for e, n in enumerate(counts):
        tiles += [[e, start + i, min(TILE_ROWS, n - i)] for i in range(0, n, TILE_ROWS)]
        start += n
    gate, up = torch.randn(tokens, inter, generator=g), torch.randn(tokens, inter, generator=g)

    def param(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).requires_grad_()

    return dict(
        k=k, counts=counts, tok=order // k, inv=torch.argsort(order), w=top_w.reshape(-1)[order],
        tiles=torch.tensor(tiles, dtype=torch.long), x=torch.randn(tokens, hidden, generator=g), g=gate, u=up,
        a=F.silu(gate) * up, params=[param(experts, 2 * rank, hidden), param(experts, 2, rank, inter),
                                     param(experts, rank, inter), param(experts, rank, hidden)],
    )  # fmt: skip


def native_function(ext, p: dict, scaling: float):
    """RoutedGatedLoRA's contract with the intermediate-size work in the C++ kernels; the rank-r products on the
    hidden side, the token sums and everything else as the package does them (compiled token sums)."""
    tok, inv, k, tiles = p["tok"], p["inv"], p["k"], p["tiles"]
    groups = Groups(p["counts"], None, len(p["counts"]))

    class Native(torch.autograd.Function):
        @staticmethod
        def forward(ctx, xs, g, u, a, w, a_in, b_in, a_down, b_down):
            t = groups.mm(xs, a_in.transpose(1, 2)).mul_(scaling)
            wdiff, v = ext.routed_forward(t, g, u, tok, w, b_in, a_down, tiles, scaling)
            h = KERNELS("mix_h", True, a, wdiff, inv, k)
            y_rows = groups.mm(v * w.unsqueeze(1), b_down)
            ctx.save_for_backward(xs, g, u, w, a_in, b_in, a_down, b_down, t, v)
            return h, KERNELS("token_sum", True, y_rows, inv, k)

        @staticmethod
        def backward(ctx, gh, gyd):
            xs, g, u, w, a_in, b_in, a_down, b_down, t, v = ctx.saved_tensors
            wc = w.unsqueeze(1)
            gy_t = gyd.contiguous().index_select(0, tok)
            dvw = groups.mm(gy_t, b_down.transpose(1, 2))
            d_b_down = groups.wgrad(v * wc, gy_t, torch.empty_like(b_down))
            dw_down = (dvw * v).sum(1)
            dv = dvw.mul_(wc * scaling)
            d_gg, d_uu, dt, d_w, d_b_in, d_a_down = ext.routed_backward(
                gh.contiguous(), g, u, tok, w, t, dv, b_in, a_down, tiles)
            dt.mul_(scaling)
            d_a_in = groups.wgrad(dt, xs, torch.empty_like(a_in))
            d_g, d_u = KERNELS("grad_gate_up", True, d_gg, d_uu, inv, k)
            return groups.mm(dt, a_in), d_g, d_u, None, d_w + dw_down, d_a_in, d_b_in, d_a_down, d_b_down

    return Native


def step(impl: str, p: dict, native, scaling: float) -> tuple[list[torch.Tensor], float, float]:
    """One forward + backward of the routed experts: (outputs and gradients, forward s, backward s)."""
    xs = p["x"][p["tok"]].requires_grad_()
    g, u, w = (p[n].clone().requires_grad_() for n in ("g", "u", "w"))
    t0 = time.perf_counter()
    if impl == "native":
        h, yd = native.apply(xs, g, u, p["a"], w, *p["params"])
    else:
        groups = Groups(p["counts"], None, len(p["counts"]))
        h, yd = RoutedGatedLoRA.apply(xs, g, u, p["a"], p["tok"], p["inv"], w, *p["params"], groups, scaling, 0.0,
                                      impl == "compiled", "silu")
    loss = h.square().mean() + yd.square().mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    out = [h.detach(), yd.detach(), xs.grad, g.grad, u.grad, w.grad] + [q.grad for q in p["params"]]
    for q in p["params"]:
        q.grad = None
    return out, t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    t0 = time.time()
    ext = build()
    built_s = time.time() - t0
    p, scaling = problem(2048, 576, 1536, 8, 2, 16), 2.0
    native = native_function(ext, p, scaling)
    names = ("h", "yd", "d_xs", "d_g", "d_u", "d_w", "d_A_in", "d_B_in", "d_A_down", "d_B_down")
    ref, got = step("fused", p, native, scaling)[0], step("native", p, native, scaling)[0]
    rel = {n: ((a - b).abs().max() / b.abs().max()).item() for n, a, b in zip(names, got, ref, strict=True)}
    times: dict[str, list] = {"compiled": [], "native": []}
    for i in range(args.reps + 2):
        for impl in times:
            _, fwd, bwd = step(impl, p, native, scaling)
            if i >= 2:
                times[impl].append((fwd, bwd))
    with torch.no_grad():  # the C++ kernels alone
        xs = p["x"][p["tok"]]
        t = Groups(p["counts"], None, 8).mm(xs, p["params"][0].transpose(1, 2)) * scaling
        gh, dv = torch.randn_like(p["g"]), torch.randn(t.shape[0], 16) * 0.01
        kernel = {"forward": lambda: ext.routed_forward(t, p["g"], p["u"], p["tok"], p["w"], p["params"][1],
                                                        p["params"][2], p["tiles"], scaling),
                  "backward": lambda: ext.routed_backward(gh, p["g"], p["u"], p["tok"], p["w"], t, dv, p["params"][1],
                                                          p["params"][2], p["tiles"])}  # fmt: skip
        kernel_ms = {}
        for name, fn in kernel.items():
            fn()
            samples = []
            for _ in range(args.reps):
                s0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - s0)
            kernel_ms[name] = statistics.median(samples) * 1e3
    out = {
        "config": dict(tokens=2048, hidden=576, intermediate=1536, experts=8, experts_per_token=2, rank=16,
                       threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability()),
        "build_s": round(built_s, 1),
        "relative_max_diff_vs_fused": rel,
        "expert_function_ms": {impl: {"forward": statistics.median(f for f, _ in v) * 1e3,
                                      "backward": statistics.median(b for _, b in v) * 1e3}
                               for impl, v in times.items()},
        "native_kernel_ms": kernel_ms,
    }  # fmt: skip
    print(f"built in {built_s:.0f} s; native vs fused, relative max |diff|: "
          + ", ".join(f"{n} {d:.1e}" for n, d in rel.items()))
    print(f"{'routed experts':<16}{'fwd ms':>10}{'bwd ms':>10}{'total':>10}")
    for impl, r in out["expert_function_ms"].items():
        print(f"{impl:<16}{r['forward']:>10.1f}{r['backward']:>10.1f}{r['forward'] + r['backward']:>10.1f}")
    print("C++ kernels alone: " + ", ".join(f"{n} {v:.1f} ms" for n, v in kernel_ms.items()))
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
