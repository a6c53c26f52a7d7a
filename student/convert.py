"""Turn a dense transformers causal LM into a MoE-LoRA student.

`build_student(base_path, MoELoRAConfig(...))` loads the base (optionally keeping only some of its layers,
to make a smaller student from a larger model of the same family), adds plain LoRA to attention through peft
and replaces the chosen MLPs by `MoELoRAMLP`. Everything of the base is frozen; the router and LoRA factors
are trainable. The spec needed to rebuild the same student (config, base path + fingerprint, kept layers) is
attached as `model.kd_student`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from student.moe_lora import MoELoRAMLP, UnsupportedModelError

SUPPORTED_FAMILIES = "Llama-like (llama, mistral, qwen2, SmolLM2) and gpt2"


@dataclass
class MoELoRAConfig:
    """Shape of a MoE-LoRA student; saved with it, so it must stay JSON-serialisable."""

    num_experts: int = 8
    top_k: int = 2
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    moe_layers: str = "all"  # "all", "none", "top-half", "bottom-half", "0,2,5", "0-3", "::2"
    experts_per_layer: dict[int, int] = field(default_factory=dict)  # per-layer overrides of num_experts
    router_init_std: float = 0.02
    attn_rank: int = 16  # plain LoRA on attention through peft; 0 = attention stays frozen
    attn_alpha: float = 32.0
    balance_coef: float = 0.01  # load-balancing loss coefficient
    z_coef: float = 0.0  # router z-loss coefficient
    expert_impl: str = "auto"  # "auto", "fused" (CPU SwiGLU), "loop" (autograd reference), "grouped" (CUDA)

    def __post_init__(self) -> None:
        self.experts_per_layer = {int(k): int(v) for k, v in self.experts_per_layer.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoELoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MoE-LoRA config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class StudentSpec:
    """Everything needed to rebuild a student on top of its base; attached to the model as `kd_student`."""

    config: MoELoRAConfig
    moe_layers: list[int]
    base_path: str | None = None
    base_fingerprint: str | None = None
    keep_layers: list[int] | None = None  # layers of the base that were kept, None = all
    model_type: str = ""


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Layer indices from "all", "none", "top-half", "bottom-half", "every-other", a list "0,2,5",
    ranges "0-3" or a Python slice "::2" / "1::2" / "-4:". "Top" means closer to the output."""
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, (list, tuple)):
        picked = [int(i) for i in spec]
    else:
        s = str(spec).strip().lower()
        if s in ("all", ""):
            return list(range(num_layers))
        if s == "none":
            return []
        if s == "top-half":
            return list(range(num_layers // 2, num_layers))
        if s == "bottom-half":
            return list(range(num_layers // 2))
        if s == "every-other":
            return list(range(0, num_layers, 2))
        if ":" in s:
            parts = [int(p) if p else None for p in s.split(":")]
            if len(parts) > 3:
                raise ValueError(f"bad layer slice {spec!r}")
            return list(range(num_layers))[slice(*parts)]
        picked = []
        for part in s.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                picked.extend(range(int(lo), int(hi) + 1))
            else:
                picked.append(int(part))
    picked = [i + num_layers if i < 0 else i for i in picked]
    bad = [i for i in picked if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a model with {num_layers} layers (spec {spec!r})")
    return sorted(set(picked))


def parse_experts_per_layer(spec: str) -> dict[int, int]:
    """'0:4,3:16' -> {0: 4, 3: 16}."""
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if ":" not in part:
            raise ValueError(f"per-layer experts must look like 'LAYER:EXPERTS,...', got {part!r} in {spec!r}")
        layer, n = part.split(":", 1)
        out[int(layer)] = int(n)
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a supported causal LM."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    tr = getattr(model, "transformer", None)
    if tr is not None and isinstance(getattr(tr, "h", None), nn.ModuleList):
        return tr.h
    raise UnsupportedModelError(
        f"{type(model).__name__} has no model.layers or transformer.h; supported families: {SUPPORTED_FAMILIES}"
    )


def attention_lora_targets(model: nn.Module) -> str:
    """peft target regex for the attention projections of every layer (not the MLP's: the MoE owns those)."""
    layer0 = decoder_layers(model)[0]
    if hasattr(layer0, "self_attn"):
        return r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    if hasattr(layer0, "attn"):
        return r".*\.attn\.(c_attn|c_proj)"
    raise UnsupportedModelError(f"cannot find the attention of {type(layer0).__name__}")


def keep_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """Drop all transformer blocks but `keep` (in place): a smaller student initialised from a larger model of
    the same family, sharing its tokenizer."""
    layers = decoder_layers(model)
    n = len(layers)
    if not keep:
        raise ValueError("keep_layers must keep at least one layer")
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ValueError(f"keep_layers {bad} out of range for a model with {n} layers")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):  # KV-cache slots are indexed by layer_idx
        for mod in layer.modules():
            if hasattr(mod, "layer_idx") and isinstance(mod.layer_idx, int):
                mod.layer_idx = new_idx
    if hasattr(model, "model") and hasattr(model.model, "layers"):
        model.model.layers = kept
    else:
        model.transformer.h = kept
    cfg = model.config
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, len(keep))
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return model


def load_base(
    path: str | os.PathLike, keep: str | list[int] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, list[int] | None]:
    """Load a dense causal LM from a directory, keeping only the chosen layers. Returns (model, kept)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    kept = None
    if keep is not None:
        kept = parse_layers(keep, len(decoder_layers(model)))
        keep_layers(model, kept)
    model.eval()
    return model, kept


def convert_to_moe_lora(model: PreTrainedModel, config: MoELoRAConfig) -> PreTrainedModel:
    """Freeze `model`, add attention LoRA (peft) and swap the chosen MLPs for MoE-LoRA layers, in place.

    With every LoRA B at zero the result computes exactly the base model's logits."""
    if hasattr(model, "kd_student"):
        raise ValueError("model is already a MoE-LoRA student; convert the dense base instead")
    layers = decoder_layers(model)
    moe_layers = parse_layers(config.moe_layers, len(layers))
    bad = sorted(set(config.experts_per_layer) - set(moe_layers))
    if bad:
        raise ValueError(f"experts_per_layer names layers {bad} that are not MoE layers {moe_layers}")
    model.requires_grad_(False)
    if config.attn_rank > 0:
        lora = LoraConfig(
            r=config.attn_rank,
            lora_alpha=config.attn_alpha,
            lora_dropout=config.dropout,
            target_modules=attention_lora_targets(model),
            fan_in_fan_out=model.config.model_type == "gpt2",
        )
        inject_adapter_in_model(lora, model)
    for i in moe_layers:
        base_mlp = layers[i].mlp
        weight = next(base_mlp.parameters())
        moe = MoELoRAMLP(
            base_mlp,
            num_experts=config.experts_per_layer.get(i, config.num_experts),
            top_k=config.top_k,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            router_init_std=config.router_init_std,
            impl=config.expert_impl,
        ).to(weight.device)
        moe.layer_index = i
        layers[i].mlp = moe
    model.kd_student = StudentSpec(config=config, moe_layers=moe_layers, model_type=model.config.model_type)
    return model


def build_student(
    base_path: str | os.PathLike,
    config: MoELoRAConfig | None = None,
    keep: str | list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> PreTrainedModel:
    """Load the base from a directory and convert it; the base reference (path + fingerprint) is
    recorded so the student can be saved and safely reloaded."""
    from student.io import fingerprint_model_dir  # io depends on this module

    config = config or MoELoRAConfig()
    if seed is not None:
        torch.manual_seed(seed)
    model, kept = load_base(base_path, keep=keep, dtype=dtype)
    convert_to_moe_lora(model, config)
    spec: StudentSpec = model.kd_student
    spec.base_path = os.path.abspath(str(base_path))
    spec.base_fingerprint = fingerprint_model_dir(base_path)
    spec.keep_layers = kept
    return model


def moe_modules(model: nn.Module) -> list[MoELoRAMLP]:
    """The MoE-LoRA layers of a student, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoELoRAMLP)]
