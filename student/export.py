"""Export a Llama-family MoE-LoRA student as a standard Mixtral checkpoint that transformers and vLLM serve.

A MoE-LoRA layer with renormalised top-k routing *is* a Mixtral sparse MoE block: expert e's weights are the
frozen projections plus its merged LoRA (W + s B A), plus the shared expert's LoRA, which every token uses and so
merges into every expert; the router is Mixtral's gate. Attention LoRA is merged into q/k/v/o. Layers the student
left dense become MoE blocks whose experts are all the base MLP (any mix of identical experts is that MLP).
Everything else (embeddings, norms, rotary settings, head) is copied, trained base weights included. The balance
loss coefficient is recorded as `router_aux_loss_coef`: the student's balance loss is Mixtral's own.

Fixed routings (`routing` hash or all) are refused: Mixtral routes by a learned gate over hidden states, so it can
neither route by token id nor add every expert with weight 1.

A router selection bias (`--router-bias-update`) is not representable: Mixtral selects and weighs experts by the
same logits, and no per-expert bias on them keeps the student's weights. A student with a non-zero bias is
refused unless `drop_router_bias` (the export then routes without it, and moekd_export.json records the bias).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, PreTrainedModel

from student import run as runs
from student.config import student_spec
from student.convert import decoder_layers
from student.io import CONFIG_NAME, load_student, read_student_meta, resolve_student_dir
from student.moe_lora import MoELoRAMLP

EXPORT_TARGETS = ("mixtral",)
MIXTRAL_BASES = ("llama", "mistral")
_COPIED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "sliding_window",
    "attention_dropout",
    "rope_parameters",
)


class UnsupportedExportError(ValueError):
    """The student's base family (or one of its options) has no exact equivalent in the export target."""


def _check_exportable(model: PreTrainedModel) -> list[MoELoRAMLP]:
    cfg = model.config
    if cfg.model_type not in MIXTRAL_BASES:
        why = " (its q/k/v projections have biases, which Mixtral lacks)" if cfg.model_type == "qwen2" else ""
        raise UnsupportedExportError(
            f"export to mixtral is not supported for {cfg.model_type!r} bases{why}; supported base families: "
            f"{', '.join(MIXTRAL_BASES)} (SmolLM2 is llama). The student itself still saves/loads with "
            "student.io.save_student."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise UnsupportedExportError(f"export to mixtral needs a base without {flag}; this one has it")
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        raise UnsupportedExportError("export to mixtral needs pretraining_tp == 1")
    moes = [m for m in model.modules() if isinstance(m, MoELoRAMLP)]
    if not moes:
        raise UnsupportedExportError("the model has no MoE-LoRA layers: nothing to export as a MoE")
    fixed = sorted({m.routing for m in moes} - {"learned"})
    if fixed:
        raise UnsupportedExportError(
            f"this student routes with --routing {', '.join(fixed)}, which Mixtral cannot represent (its gate is a "
            "learned linear router over hidden states with renormalised top-k weights: it can neither route by token "
            "id (hash) nor add every expert with weight 1 (all)); only --routing learned students export. The "
            "student itself still saves/loads with student.io.save_student")
    if len({m.num_experts for m in moes}) > 1:
        raise UnsupportedExportError(
            "Mixtral has one expert count for all layers, but this student has per-layer counts "
            f"{ {m.layer_index: m.num_experts for m in moes} }; export needs a uniform expert count"
        )
    return moes


def _merged_linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight of a (possibly peft-LoRA-wrapped) Linear with its active adapters merged."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight.detach().float()
    w = base.weight.detach().float().clone()
    for name in module.active_adapters:
        if name in module.lora_A:
            w += module.get_delta_weight(name).float()
    return w


@torch.no_grad()
def expert_weights(moe: MoELoRAMLP) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged per-expert weights of a gated MoE-LoRA layer: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""
    r, s = moe.rank, moe.scaling
    w_g = moe.base.gate_proj.weight.float()
    w_u = moe.base.up_proj.weight.float()
    w_d = moe.base.down_proj.weight.float()
    if moe.shared_rank:  # always on: part of every expert
        big_r, s_sh = moe.shared_rank, moe.shared_scaling
        w_g = w_g + s_sh * moe.shared_in_B[0].float().T @ moe.shared_in_A[:big_r].float()
        w_u = w_u + s_sh * moe.shared_in_B[1].float().T @ moe.shared_in_A[big_r:].float()
        w_d = w_d + s_sh * moe.shared_out_B.float().T @ moe.shared_out_A.float()
    gate = w_g + s * moe.in_B[:, 0].float().transpose(1, 2) @ moe.in_A[:, :r].float()
    up = w_u + s * moe.in_B[:, 1].float().transpose(1, 2) @ moe.in_A[:, r:].float()
    down = w_d + s * moe.out_B.float().transpose(1, 2) @ moe.out_A.float()
    return torch.cat([gate, up], dim=1), down


def mixtral_config(
    model: PreTrainedModel, num_experts: int, experts_per_token: int, balance_coef: float | None = None
) -> MixtralConfig:
    """`balance_coef`: the training's, recorded as Mixtral's router_aux_loss_coef (None: Mixtral's default)."""
    src = model.config.to_dict()
    kw = {k: src[k] for k in _COPIED_CONFIG_KEYS if src.get(k) is not None}
    kw["num_hidden_layers"] = len(decoder_layers(model))
    if balance_coef is not None:
        kw["router_aux_loss_coef"] = balance_coef
    return MixtralConfig(
        **kw,
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        architectures=["MixtralForCausalLM"],
    )


@torch.no_grad()
def to_mixtral(
    student: PreTrainedModel, dtype: torch.dtype = torch.float32, drop_router_bias: bool = False,
    balance_coef: float | None = None,
) -> MixtralForCausalLM:
    """An in-memory MixtralForCausalLM computing what the student computes (without its router selection bias
    if `drop_router_bias`; refused if it has one otherwise). `balance_coef`: see `mixtral_config`."""
    moes = _check_exportable(student)
    biased = {m.layer_index: m.router_bias.tolist() for m in moes if bool(m.router_bias.any())}
    if biased and not drop_router_bias:
        raise UnsupportedExportError(
            f"layers {sorted(biased)} select experts with a router bias (--router-bias-update), which Mixtral "
            "cannot represent (it selects and weighs experts by the same logits): pass drop_router_bias=True "
            "(kdstudent export --drop-router-bias) to export routing without it; the export then picks experts by "
            "the router probabilities alone"
        )
    spec = student_spec(student)
    n_exp = moes[0].num_experts
    cfg = mixtral_config(student, n_exp, spec.config.experts_per_token, balance_coef)
    out = MixtralForCausalLM(cfg).to(torch.float32).eval()
    src_inner, dst_inner = student.model, out.model
    dst_inner.embed_tokens.weight.copy_(src_inner.embed_tokens.weight)
    dst_inner.norm.weight.copy_(src_inner.norm.weight)
    out.lm_head.weight.copy_(student.lm_head.weight)
    for src, dst in zip(decoder_layers(student), dst_inner.layers, strict=True):
        dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
        dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(dst.self_attn, proj).weight.copy_(_merged_linear_weight(getattr(src.self_attn, proj)))
        experts = dst.mlp.experts
        if isinstance(src.mlp, MoELoRAMLP):
            gate_up, down = expert_weights(src.mlp)
            dst.mlp.gate.weight.copy_(src.mlp.router.weight)
        else:  # a dense layer: every expert is the base MLP, the router is irrelevant
            gate_up = torch.cat([src.mlp.gate_proj.weight, src.mlp.up_proj.weight]).expand(n_exp, -1, -1)
            down = src.mlp.down_proj.weight.expand(n_exp, -1, -1)
            dst.mlp.gate.weight.zero_()
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    return out.to(dtype)


def export_student(
    student: PreTrainedModel | str | os.PathLike,
    out_dir: str | os.PathLike,
    to: str = "mixtral",
    base_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    drop_router_bias: bool = False,
    balance_coef: float | None = None,
) -> Path:
    """Write a standard checkpoint (config, safetensors, tokenizer) for a student or a saved student / run dir.

    A run exports the state `student.run.student_snapshot` names (the one `kdstudent eval` reads), also an FSDP
    checkpoint written before the run's end. `out_dir` must be apart from every input (the base, the student, the
    run): `student.run.check_output`, checked before anything loads.
    `dtype` defaults to the base model's saved dtype (fp32 if it has none). `drop_router_bias`: see `to_mixtral`.
    `balance_coef` (Mixtral's router_aux_loss_coef) defaults to the one the student was trained with, when that is
    recorded (a run, a run's final student), else Mixtral's default."""
    if to not in EXPORT_TARGETS:
        raise UnsupportedExportError(f"unknown export target {to!r}; supported: {', '.join(EXPORT_TARGETS)}")
    source = None
    if isinstance(student, nn.Module):
        runs.check_output(out_dir, [("base model", student_spec(student).base_path)])
    elif runs.is_run(student):
        config = runs.load_config(student)
        if config.student != "moe-lora":
            raise UnsupportedExportError(f"{student} trained a --student {config.student} student: export writes "
                                         "MoE-LoRA students as Mixtral (a dense student is its base's architecture)")
        snapshot = runs.student_snapshot(student)
        saved = snapshot / runs.STUDENT
        source = str(saved if (saved / CONFIG_NAME).is_file() else snapshot)
        runs.check_output(out_dir, [("run", student), ("base model", base_path or config.base)])
        if source == str(saved):
            student = load_student(saved, base_path=base_path)
        else:  # an FSDP checkpoint before the run's end: dcp/ only
            from student.train import load_trained

            student = load_trained(student, base=base_path)
        balance_coef = config.balance_coef if balance_coef is None else balance_coef
    else:
        source = str(resolve_student_dir(student))
        meta = read_student_meta(source)
        runs.check_output(out_dir, [("student", student), ("student", source),
                                    ("base model", base_path or meta["base"]["path"])])
        student = load_student(source, base_path=base_path)
        if balance_coef is None:
            balance_coef = meta.get("extra", {}).get("train_config", {}).get("balance_coef")
    spec = student_spec(student)
    if dtype is None:
        saved = getattr(student.config, "dtype", None)
        dtype = getattr(torch, saved) if isinstance(saved, str) else (saved or torch.float32)
    mixtral = to_mixtral(student, dtype=dtype, drop_router_bias=drop_router_bias, balance_coef=balance_coef)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mixtral.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(spec.base_path).save_pretrained(out)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"exported weights to {out}, but the base {spec.base_path} has no loadable tokenizer ({err}); "
            "copy the tokenizer files into the export directory before serving it"
        ) from err
    info = {
        "exported_from": source,
        "base": {"path": spec.base_path, "fingerprint": spec.base_fingerprint, "keep_layers": spec.keep_layers},
        "moe_lora": spec.config.to_dict(),
        "trained_base": spec.config.train_base,
        "dropped_router_bias": {str(m.layer_index): m.router_bias.tolist() for m in student.modules()
                                if isinstance(m, MoELoRAMLP) and bool(m.router_bias.any())},
        "target": to,
        "dtype": str(dtype).removeprefix("torch."),
    }
    (out / "moekd_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


@torch.no_grad()
def export_merged(student: PreTrainedModel, out_dir: str | os.PathLike, base_path: str | os.PathLike,
                  dtype: torch.dtype = torch.float32) -> Path:
    """The checkpoint a serving engine runs for any student kind (`kdstudent generate --backend vllm`): Mixtral
    for a MoE-LoRA student (`to_mixtral`), else the base's own architecture, with a dense LoRA merged into its
    weights, or as trained (full). The student itself is left as it is."""
    import copy

    from student.config import is_moe_student

    if is_moe_student(student):
        model = to_mixtral(student, dtype=dtype)
    else:
        model = copy.deepcopy(student)
        for name, module in list(model.named_modules()):
            if getattr(module, "base_layer", None) is not None and hasattr(module, "lora_A"):  # a peft LoRA layer
                merged = module.base_layer
                merged.weight.data = _merged_linear_weight(module).to(merged.weight.dtype)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, merged)
        model = model.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    return out
