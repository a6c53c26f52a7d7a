"""Router auxiliary losses, router-bias balancing and routing statistics, gathered from the MoE-LoRA layers.

Each layer keeps only the stats of its latest forward (overwritten, not appended), so a
gradient-checkpointing recompute during backward cannot count a layer twice. Call `router_losses(model)` after
the forward and before the backward of the same step.

The balance loss is transformers' Mixtral `load_balancing_loss_func`, so `balance_coef` means what Mixtral's
`router_aux_loss_coef` means: num_experts × sum_e f_e P_e with f_e the fraction of tokens routed to expert e
counting all k slots, P_e its mean router probability, both pooled over the MoE layers before the product. It is
k (experts_per_token) when the load is balanced.

Layers with fixed routing (`routing` hash or all) have no router, hence no balance or z loss: they contribute 0 and
take no part in the pooling; their loads and weights are still recorded, so expert usage is reported for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from student.config import RouterLossConfig
from student.moe_lora import MoELoRAMLP, RouterStats


@dataclass
class RouterLosses:
    balance: torch.Tensor  # Mixtral balance loss pooled over MoE layers (experts_per_token when balanced)
    z: torch.Tensor  # router z-loss, mean over the MoE layers' tokens
    loss: torch.Tensor  # balance_coef * balance + z_coef * z: add this to the training loss


def _layers(model: nn.Module) -> list[MoELoRAMLP]:
    return [m for m in model.modules() if isinstance(m, MoELoRAMLP)]


def _layer_key(i: int, m: MoELoRAMLP) -> int:
    return i if m.layer_index is None else m.layer_index


def pooled_balance(stats: list[RouterStats]) -> torch.Tensor:
    """Mixtral's balance loss over layers that share one expert count: routed fractions and mean probabilities
    summed over the layers' tokens first, then E * sum_e f_e P_e."""
    tokens = torch.stack([s.tokens for s in stats]).sum().clamp(min=1)
    frac = torch.stack([s.counts for s in stats]).sum(0).to(tokens.dtype) / tokens
    prob = torch.stack([s.prob_sum for s in stats]).sum(0) / tokens
    return frac.numel() * (frac * prob).sum()


def router_losses(model: nn.Module, config: RouterLossConfig | None = None) -> RouterLosses:
    """Aux losses of the latest forward, weighted by `config`'s coefficients (default: RouterLossConfig()).

    Only layers with a learned router count: hash- and all-routed layers have no router, so a student of those
    alone has balance, z and loss 0 (without gradient). Layers with different expert counts (`layer_experts`)
    cannot be pooled into one product: each group of layers sharing a count is pooled, and the groups are averaged
    weighted by their number of layers."""
    layers = _layers(model)
    config = config or RouterLossConfig()
    if not layers:
        zero = torch.zeros(())
        return RouterLosses(zero, zero, zero)
    stats = [m.router_stats for m in layers]
    if any(s is None for s in stats):
        raise RuntimeError("router_losses() called before a forward pass of the student")
    learned = [(m, s) for m, s in zip(layers, stats, strict=True) if m.routing == "learned"]
    if not learned:  # fixed routing: no router, nothing to balance
        zero = torch.zeros((), device=stats[0].tokens.device)
        return RouterLosses(zero, zero, zero)
    layers, stats = [m for m, _ in learned], [s for _, s in learned]
    if torch.is_grad_enabled() and any(m.router.weight.requires_grad for m in layers):
        if not any(s.balance.requires_grad for s in stats):
            raise RuntimeError(
                "router stats carry no gradient although the router is trainable: the forward ran "
                "under no_grad, "
                "e.g. reentrant gradient checkpointing. Use model.gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs={'use_reentrant': False}) (the transformers 5 default)."
            )
    groups: dict[int, list[RouterStats]] = {}
    for m, s in zip(layers, stats, strict=True):
        groups.setdefault(m.num_experts, []).append(s)
    balance = sum(pooled_balance(g) * len(g) for g in groups.values()) / len(stats)
    z = torch.stack([s.z_sum for s in stats]).sum() / torch.stack([s.tokens for s in stats]).sum().clamp(min=1)
    return RouterLosses(balance=balance, z=z, loss=config.balance_coef * balance + config.z_coef * z)


def expert_usage(model: nn.Module) -> dict[int, list[float]]:
    """Fraction of routed (token, slot) assignments per expert for each MoE layer, from the latest forward."""
    out: dict[int, list[float]] = {}
    for i, m in enumerate(_layers(model)):
        if m.router_stats is None:
            continue
        counts = m.router_stats.counts.float()
        out[_layer_key(i, m)] = (counts / counts.sum().clamp_min(1)).tolist()
    return out


def effective_experts(usage: list[float]) -> float:
    """exp(entropy) of a load distribution: how many experts the layer really uses (E when balanced, 1 when one
    expert takes everything)."""
    total = sum(usage)
    if total <= 0:
        return float("nan")
    return math.exp(-sum(p / total * math.log(p / total) for p in usage if p > 0))


def routing_weights(model: nn.Module) -> dict[int, list[float]]:
    """Mean routing weight per expert (over tokens) for each MoE layer, from the latest forward: where the layer
    sends its output mass. Unlike `expert_usage` it varies under soft routing, where every token uses every expert."""
    out: dict[int, list[float]] = {}
    for i, m in enumerate(_layers(model)):
        if m.router_stats is not None:
            out[_layer_key(i, m)] = (m.router_stats.weight_sum / m.router_stats.tokens.clamp_min(1)).tolist()
    return out


@dataclass
class RoutingTally:
    """Routing over many forwards, per MoE layer, pooled exactly over their real (non-padding) tokens: sums, not
    means of means. `result()`: expert_usage (share of routed assignments), routing_weights (mean routing weight),
    routing (effective experts by load, and per token)."""

    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # [E] assignments, float64, on the CPU
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # [E] summed routing weights
    ess: dict[int, float] = field(default_factory=dict)  # summed per-token effective experts
    tokens: dict[int, float] = field(default_factory=dict)

    def add_forward(self, model: nn.Module) -> RoutingTally:
        """Add the latest forward of every MoE layer of `model`."""
        for i, m in enumerate(_layers(model)):
            st = m.router_stats
            if st is not None:
                n = float(st.tokens)
                self._add(_layer_key(i, m), st.counts.double().cpu(), st.weight_sum.double().cpu(),
                          float(st.weight_ess) * n, n)
        return self

    def add(self, other: RoutingTally) -> RoutingTally:
        for layer in other.tokens:
            self._add(layer, other.counts[layer], other.weights[layer], other.ess[layer], other.tokens[layer])
        return self

    def _add(self, layer: int, counts: torch.Tensor, weights: torch.Tensor, ess: float, tokens: float) -> None:
        self.counts[layer] = self.counts.get(layer, 0) + counts
        self.weights[layer] = self.weights.get(layer, 0) + weights
        self.ess[layer] = self.ess.get(layer, 0.0) + ess
        self.tokens[layer] = self.tokens.get(layer, 0.0) + tokens

    def result(self) -> dict:
        """{} for a model without MoE layers."""
        if not self.tokens:
            return {}
        usage = {k: (c / c.sum().clamp_min(1)).tolist() for k, c in self.counts.items()}
        return {"expert_usage": {str(k): u for k, u in usage.items()},
                "routing_weights": {str(k): (w / max(self.tokens[k], 1)).tolist() for k, w in self.weights.items()},
                "routing": {str(k): {"effective_experts": effective_experts(u),
                                     "effective_experts_per_token": self.ess[k] / max(self.tokens[k], 1)}
                            for k, u in usage.items()}}


def routing_metrics(model: nn.Module) -> dict[int, dict[str, float]]:
    """Per MoE layer, from the latest forward: `effective_experts` (exp of the entropy of the load over experts)
    and `effective_experts_per_token` (1 / sum_j w_j^2 of a token's routing weights, averaged over tokens: k for
    uniform weights over k experts, 1 when one expert gets all the weight)."""
    out: dict[int, dict[str, float]] = {}
    for i, m in enumerate(_layers(model)):
        if m.router_stats is None:
            continue
        out[_layer_key(i, m)] = {
            "effective_experts": effective_experts(m.router_stats.counts.tolist()),
            "effective_experts_per_token": float(m.router_stats.weight_ess),
        }
    return out


def expert_loads(model: nn.Module) -> list[torch.Tensor]:
    """[E] routed assignments per expert of every MoE layer (in module order) in its latest forward."""
    return [m.router_stats.counts for m in _layers(model)]


@torch.no_grad()
def update_router_bias(model: nn.Module, step_size: float, loads: list[torch.Tensor] | None = None) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing, once per optimizer step: every MoE layer's selection bias
    moves by `step_size` towards balance, b_e += step_size * sign(mean load - load_e). `loads` are the layers'
    [E] assignment counts over the step (as `expert_loads` lists them; summed over micro-batches and
    processes by the caller); default: the latest forward. Layers with fixed routing have no bias: skipped."""
    layers = _layers(model)
    loads = expert_loads(model) if loads is None else loads
    if len(loads) != len(layers):
        raise ValueError(f"got loads for {len(loads)} MoE layers, the model has {len(layers)}")
    for m, load in zip(layers, loads, strict=True):
        if m.router_bias is None:
            continue
        load = load.to(m.router_bias.device, torch.float32)
        m.router_bias += step_size * torch.sign(load.mean() - load)


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
