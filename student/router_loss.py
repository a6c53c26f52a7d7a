"""Router auxiliary losses and expert-usage statistics, gathered from the MoE-LoRA layers after a forward.

Each layer keeps only the stats of its latest forward (overwritten, not appended), so a
gradient-checkpointing recompute during backward cannot count a layer twice. Call `router_losses(model)` after
the forward and before the backward of the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from student.config import is_moe_student, student_spec
from student.moe_lora import MoELoRAMLP


@dataclass
class RouterLosses:
    balance: torch.Tensor  # mean over MoE layers of the Switch/Mixtral balance loss (1.0 = perfectly balanced)
    z: torch.Tensor  # mean over MoE layers of the router z-loss
    loss: torch.Tensor  # balance_coef * balance + z_coef * z: add this to the training loss


def router_losses(model: nn.Module, balance_coef: float | None = None, z_coef: float | None = None) -> RouterLosses:
    """Aux losses of the latest forward. Coefficients default to the student's MoELoRAConfig."""
    layers = [m for m in model.modules() if isinstance(m, MoELoRAMLP)]
    spec = student_spec(model) if is_moe_student(model) else None
    if balance_coef is None:
        balance_coef = spec.config.balance_coef if spec is not None else 0.0
    if z_coef is None:
        z_coef = spec.config.z_coef if spec is not None else 0.0
    if not layers:
        zero = torch.zeros(())
        return RouterLosses(zero, zero, zero)
    stats = [m.router_stats for m in layers]
    if any(s is None for s in stats):
        raise RuntimeError("router_losses() called before a forward pass of the student")
    if torch.is_grad_enabled() and any(m.router.weight.requires_grad for m in layers):
        if not any(s.balance.requires_grad for s in stats):
            raise RuntimeError(
                "router stats carry no gradient although the router is trainable: the forward ran "
                "under no_grad, "
                "e.g. reentrant gradient checkpointing. Use model.gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs={'use_reentrant': False}) (the transformers 5 default)."
            )
    balance = torch.stack([s.balance for s in stats]).mean()
    z = torch.stack([s.z for s in stats]).mean()
    return RouterLosses(balance=balance, z=z, loss=balance_coef * balance + z_coef * z)


def expert_usage(model: nn.Module) -> dict[int, list[float]]:
    """Fraction of routed (token, slot) assignments per expert for each MoE layer, from the latest forward."""
    out: dict[int, list[float]] = {}
    for i, m in enumerate(m for m in model.modules() if isinstance(m, MoELoRAMLP)):
        if m.router_stats is None:
            continue
        counts = m.router_stats.counts.float()
        out[i if m.layer_index is None else m.layer_index] = (counts / counts.sum().clamp_min(1)).tolist()
    return out


def usage_imbalance(usage: list[float]) -> float:
    """max / mean expert load: 1.0 when balanced, num_experts when one expert takes everything."""
    mean = sum(usage) / len(usage)
    return max(usage) / mean if mean > 0 else float("nan")


def count_only(model: nn.Module, attention_mask: torch.Tensor) -> None:
    """Make the router stats (balance/z losses, expert usage) of the following forwards ignore padding.

    The mask stays set until the next call, so a gradient-checkpointing recompute sees it too; it applies only
    to forwards over the same number of tokens.
    """
    mask = attention_mask.reshape(-1).bool()
    for m in model.modules():
        if isinstance(m, MoELoRAMLP):
            m.token_mask = mask
