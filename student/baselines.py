"""Baseline students for parameter-matched comparisons: dense LoRA (attention + MLP) and full fine-tuning.

`matching_dense_lora_rank` picks the dense-LoRA rank whose trainable count is closest to a MoE-LoRA config's,
so "MoE-LoRA beats dense LoRA" is a claim about architecture, not about parameter budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import PreTrainedModel

from student.config import LORA_SCALINGS, MoELoRAConfig, default_alpha, parse_layers
from student.convert import decoder_layers, load_base
from student.moe_lora import mlp_layout, projection_features


@dataclass
class ParamCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / total {self.total:,} ({100 * self.trainable / self.total:.3f}%)"


def count_parameters(model: nn.Module) -> ParamCount:
    params = list(model.parameters())
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def _projection_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(attention, MLP) projection module names of one decoder layer."""
    layer = decoder_layers(model)[0]
    layout = mlp_layout(layer.mlp)
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"] if hasattr(layer, "self_attn") else ["c_attn", "c_proj"]
    return attn, layout.inputs + [layout.output]


def dense_lora_targets(model: nn.Module) -> str:
    """peft regex: every attention and MLP projection of every layer."""
    attn, mlp = _projection_names(model)
    attn_mod = "self_attn" if attn[0] == "q_proj" else "attn"
    return rf".*\.({attn_mod}\.({'|'.join(attn)})|mlp\.({'|'.join(mlp)}))"


def build_dense_lora(
    base: str | os.PathLike | PreTrainedModel,
    rank: int,
    alpha: float | None = None,
    lora_dropout: float = 0.0,
    keep: str | list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    lora_scaling: str = "standard",
    train_base: bool = False,
) -> PreTrainedModel:
    """Base model with plain LoRA (B = 0, so exact at init) on all attention and MLP projections; `alpha` unset
    is 2 × rank and `lora_scaling` is standard (alpha / rank) or rslora (alpha / sqrt(rank)), the MoELoRAConfig
    rules. `train_base`: the base's weights train too (else they are frozen)."""
    if lora_scaling not in LORA_SCALINGS:
        raise ValueError(f"lora_scaling must be one of {LORA_SCALINGS}, got {lora_scaling!r}")
    model = base if isinstance(base, nn.Module) else load_base(base, keep=keep, dtype=dtype)[0]
    model.requires_grad_(False)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=default_alpha(rank) if alpha is None else alpha,
        lora_dropout=lora_dropout,
        use_rslora=lora_scaling == "rslora",
        target_modules=dense_lora_targets(model),
        fan_in_fan_out=model.config.model_type == "gpt2",
    )
    model = inject_adapter_in_model(cfg, model)
    if train_base:
        model.requires_grad_(True)
    return model


def build_full_finetune(
    base: str | os.PathLike | PreTrainedModel,
    keep: str | list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """The base with every parameter trainable."""
    model = base if isinstance(base, nn.Module) else load_base(base, keep=keep, dtype=dtype)[0]
    return model.requires_grad_(True)


def moe_lora_trainable(model: nn.Module, config: MoELoRAConfig) -> int:
    """Trainable parameter count of the MoE-LoRA student `config` would build on this (dense) model: routers,
    expert and shared-expert LoRA, attention LoRA, and with `train_base` every weight of the base. Fixed routing
    (hash, all) has no router weights."""
    layers = decoder_layers(model)
    attn, _ = _projection_names(model)
    count = sum(p.numel() for p in model.parameters()) if config.train_base else 0
    if config.attn_rank > 0:
        count += config.attn_rank * _attn_params_per_rank(model, attn)
    for i in parse_layers(config.moe_layers, len(layers)):
        mlp = layers[i].mlp
        ins = mlp_layout(mlp).inputs
        hidden, inter = projection_features(getattr(mlp, ins[0]))
        n_exp = config.experts_at(i)
        per_expert = config.rank * (len(ins) * (hidden + inter) + inter + hidden)
        count += n_exp * per_expert + (n_exp * hidden if config.routing == "learned" else 0)  # LoRA + router
        big_r = config.shared_expert_rank
        count += big_r * (len(ins) * (hidden + inter) + inter + hidden)  # the shared expert's LoRA
    return count


def _attn_params_per_rank(model: nn.Module, attn: list[str]) -> int:
    total = 0
    for layer in decoder_layers(model):
        parent = layer.self_attn if hasattr(layer, "self_attn") else layer.attn
        for name in attn:
            mod = getattr(parent, name)
            fin, fout = projection_features(getattr(mod, "base_layer", mod))
            total += fin + fout
    return total


def dense_lora_params_per_rank(model: nn.Module) -> int:
    attn, mlp = _projection_names(model)
    total = _attn_params_per_rank(model, attn)
    for layer in decoder_layers(model):
        for name in mlp:
            mod = getattr(layer.mlp, name)
            fin, fout = projection_features(getattr(mod, "base_layer", mod))
            total += fin + fout
    return total


def matching_dense_lora_rank(model: nn.Module, config: MoELoRAConfig) -> tuple[int, int, int]:
    """(rank, its trainable count, the MoE-LoRA trainable count): the dense-LoRA rank (attention + MLP) whose
    trainable parameter count is closest to the MoE-LoRA student's (both counting the base if `train_base`)."""
    target = moe_lora_trainable(model, config)
    base = sum(p.numel() for p in model.parameters()) if config.train_base else 0
    per_rank = dense_lora_params_per_rank(model)
    rank = max(1, round((target - base) / per_rank))
    return rank, base + rank * per_rank, target
