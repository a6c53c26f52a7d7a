"""`kdstudent plot RUN`: PNGs of a run's loss curves, evaluations and per-layer expert load (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from student.run import read_metrics


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Writes loss.png, eval.png (if the run evaluated) and experts.png (MoE students); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run)
    out = Path(out or Path(run) / "plots")
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in train]
    for ax, key, title in zip(axes, ("loss", "kd", "ce"), ("total loss", "KD loss (per token)",
                                                          "cross-entropy on labels"), strict=True):
        ax.plot(steps, [r[key] for r in train], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if evals:
        keys = ("teacher_kl", "ppl", "top1_agree", "ece")
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
        for ax, key in zip(axes, keys, strict=True):
            ax.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], marker="o")
            ax.set_title(f"eval {key}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(out / "eval.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    usage = [r for r in train if r.get("expert_usage")]
    if usage:
        last = usage[-1]["expert_usage"]
        layers = sorted(last, key=int)
        routed = [r for r in usage if r.get("routing")]
        fig, axes = plt.subplots(1, 3 if routed else 2, figsize=(18 if routed else 12, 3.8))
        # layers may have different expert counts (layer_experts): pad the rows, blank where a layer has none
        width = max(len(last[layer]) for layer in layers)
        grid = [last[layer] + [float("nan")] * (width - len(last[layer])) for layer in layers]
        im = axes[0].imshow(grid, aspect="auto", cmap="viridis")
        axes[0].set_yticks(range(len(layers)), layers)
        axes[0].set_xlabel("expert")
        axes[0].set_ylabel("layer")
        axes[0].set_title(f"expert load at step {usage[-1]['step']}")
        fig.colorbar(im, ax=axes[0])
        for layer in layers:
            axes[1].plot([r["step"] for r in usage],
                         [max(r["expert_usage"][layer]) * len(r["expert_usage"][layer]) for r in usage],
                         label=f"layer {layer}")
        axes[1].axhline(1.0, color="gray", lw=0.8)
        axes[1].set_title("imbalance (max load / mean load)")
        axes[1].set_xlabel("step")
        if routed:  # exp(entropy of the load): E when balanced, 1 when collapsed onto one expert
            for layer in layers:
                axes[2].plot([r["step"] for r in routed], [r["routing"][layer]["effective_experts"] for r in routed],
                             label=f"layer {layer}")
            axes[2].set_title("effective experts (exp of the load entropy)")
            axes[2].set_xlabel("step")
            axes[2].set_ylim(bottom=0)
        if len(layers) <= 12:
            axes[1].legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "experts.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
