"""Turn a dense transformers causal LM into a MoE-LoRA student.

`build_student(base_path, MoELoRAConfig(...))` loads the base (optionally keeping only some of its layers,
`keep_layers`, to make a smaller student from a larger model of the same family), adds plain LoRA to attention
through peft and replaces the chosen MLPs by `MoELoRAMLP`. Everything of the base is frozen; the router and LoRA
factors are trainable. The spec needed to rebuild the same student (config, base path + fingerprint, kept
layers; `student.config.StudentSpec`) is attached as `model.kd_student`, the one attribute a student carries:
test for it with `student.config.is_moe_student(model)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from logit_store.fingerprint import model_fingerprint
from logit_store.model_logits import LogitTransformError, check_served_logits
from student.config import (
    MoELoRAConfig,
    StudentSpec,
    is_moe_student,
    parse_layer_experts,
    parse_layers,
    student_spec,
)
from student.moe_lora import MoELoRAMLP, TokenIdsHook, UnsupportedModelError

SUPPORTED_FAMILIES = "Llama-like (llama, mistral, qwen2, SmolLM2) and gpt2"


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
    try:  # the losses apply the LM head themselves: refuse a logit post-processing they would not reproduce
        check_served_logits(model)
    except LogitTransformError as e:
        raise UnsupportedModelError(str(e)) from None
    return model, kept


def fingerprint_model_dir(path: str | os.PathLike) -> str:
    """The exact fingerprint (every config and weight byte) of the base a student was built on."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
    return model_fingerprint(str(path), sample=None)


def convert_to_moe_lora(model: PreTrainedModel, config: MoELoRAConfig) -> PreTrainedModel:
    """Freeze `model` (unless `config.train_base`), add attention LoRA (peft) and swap the chosen MLPs for MoE-LoRA
    layers, in place. With `config.routing` "hash" a forward pre-hook on the decoder (`model.base_model`, which
    every caller reaches with the ids) hands the input token ids to the MoE layers before each forward.

    With every LoRA B at zero the result computes exactly the base model's logits. `config.keep_layers` is not
    applied here: `model` is the base as loaded (see `build_student`)."""
    if is_moe_student(model):
        raise ValueError("model is already a MoE-LoRA student; convert the dense base instead")
    layers = decoder_layers(model)
    moe_layers = parse_layers(config.moe_layers, len(layers))
    bad = sorted(set(parse_layer_experts(config.layer_experts)) - set(moe_layers))
    if bad:
        raise ValueError(f"layer_experts names layers {bad} that are not MoE layers {moe_layers}")
    model.requires_grad_(False)
    if config.attn_rank > 0:
        lora = LoraConfig(
            r=config.attn_rank,
            lora_alpha=config.attn_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.lora_scaling == "rslora",
            target_modules=attention_lora_targets(model),
            fan_in_fan_out=model.config.model_type == "gpt2",
        )
        inject_adapter_in_model(lora, model)
    for i in moe_layers:
        base_mlp = layers[i].mlp
        weight = next(base_mlp.parameters())
        layers[i].mlp = MoELoRAMLP(
            base_mlp,
            num_experts=config.experts_at(i),
            experts_per_token=config.experts_per_token,
            rank=config.rank,
            alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            router_init_std=config.router_init_std,
            impl=config.expert_impl,
            layer_index=i,
            lora_scaling=config.lora_scaling,
            shared_rank=config.shared_expert_rank,
            shared_alpha=config.shared_expert_alpha,
            routing=config.routing,
        ).to(weight.device)
    if config.routing == "hash":  # hash layers route by token id: the decoder hands them its input_ids
        model.base_model.register_forward_pre_hook(TokenIdsHook(), with_kwargs=True)
    if config.train_base:  # the paper's setup: the base trains too, the adapters on top of it
        model.requires_grad_(True)
    model.kd_student = StudentSpec(config=config, moe_layers=moe_layers, model_type=model.config.model_type)
    return model


def build_student(
    base_path: str | os.PathLike,
    config: MoELoRAConfig | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> PreTrainedModel:
    """Load the base from a directory (its `config.keep_layers` only) and convert it; the base reference (path +
    fingerprint) is recorded so the student can be saved and safely reloaded."""
    config = config or MoELoRAConfig()
    if seed is not None:
        torch.manual_seed(seed)
    model, kept = load_base(base_path, keep=config.keep_layers, dtype=dtype)
    convert_to_moe_lora(model, config)
    spec = student_spec(model)
    spec.base_path = os.path.abspath(str(base_path))
    spec.base_fingerprint = fingerprint_model_dir(base_path)
    spec.keep_layers = kept
    return model


def moe_modules(model: nn.Module) -> list[MoELoRAMLP]:
    """The MoE-LoRA layers of a student, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoELoRAMLP)]
