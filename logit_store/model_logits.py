"""A model's logits as it serves them: what transformers does to the LM head's output, defined once.

Several families post-process `lm_head(hidden)` before returning `model(...).logits`: Granite divides by
`logits_scaling`, Cohere multiplies by `logit_scale`, FalconH1 by `lm_head_multiplier`, Gemma-2/3 softcap with
`final_logit_softcapping`, ... Code that applies the head itself (the hf teacher backend over chunks of positions,
the students' chunked KD loss, eval) must apply the same transform, or it stores and trains a distribution the model
does not serve. `logit_transform` reads it from the config, for the families listed in `FAMILIES`;
`check_served_logits` compares it with the model's own forward on a few tokens, so that a family this table does
not know is refused by name instead of being stored or trained wrong.

It lives in logit_store because both sides need the one definition and the layering allows only that direction:
the teacher backends (logit_store) never import student, and student imports logit_store. Torch only: no
transformers, no vLLM (vLLM applies these transforms itself, in its own LogitsProcessor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PROBE_TOKENS = 8
# The largest |model(...).logits - transform(head(hidden))| accepted, relative to max(1, max |logits|): the two
# paths run the same matmul, so only the transform's own rounding differs (fp32), or the served logits' rounding
# (transformers applies the transform in the model's dtype).
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
PROBE_TOLERANCE_16BIT = 2e-2


class LogitTransformError(ValueError):
    """The model post-processes its logits in a way moekd does not reproduce: refused rather than used wrong."""


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap * tanh(scale * z / softcap), or scale * z when softcap is None; z = the LM head's output.

    Every post-processing transformers applies to a causal LM's head output is of this form (scaling, then an
    optional tanh softcap). `family` names the model type it was read from, for messages.
    """

    scale: float = 1.0
    softcap: float | None = None
    family: str = ""

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The served logits from head outputs z, out of place (differentiable; z itself for the identity)."""
        if self.softcap is not None:
            return torch.tanh(z * (self.scale / self.softcap)) * self.softcap
        return z * self.scale if self.scale != 1.0 else z

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """In place: z becomes the served logits (no [rows, V] buffer beyond z itself)."""
        if self.softcap is not None:
            return z.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)
        return z.mul_(self.scale) if self.scale != 1.0 else z

    def grad_factor(self, y: torch.Tensor) -> torch.Tensor | float:
        """d served / d z, from the served logits y: a scalar, or a new tensor shaped like y (softcap)."""
        if self.softcap is None:
            return self.scale
        return (y / self.softcap).square_().neg_().add_(1.0).mul_(self.scale)

    def describe(self) -> str:
        parts = [f"x {self.scale:g}"] if self.scale != 1.0 else []
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}")
        return ", then ".join(parts) or "none"


def _granite(c: Any) -> LogitTransform:  # logits / logits_scaling
    return LogitTransform(scale=1.0 / float(c.logits_scaling))


def _times(attr: str) -> Callable[[Any], LogitTransform]:  # logits * attr
    return lambda c: LogitTransform(scale=float(getattr(c, attr, None) or 1.0))


def _softcap(attr: str, scale_attr: str | None = None) -> Callable[[Any], LogitTransform]:
    def rule(c: Any) -> LogitTransform:
        cap = getattr(c, attr, None)
        scale = float(getattr(c, scale_attr, None) or 1.0) if scale_attr else 1.0
        return LogitTransform(scale=scale, softcap=float(cap) if cap else None)
    return rule


def _inv(attr: str) -> Callable[[Any], LogitTransform]:  # hidden / attr before a bias-free head: logits / attr
    return lambda c: LogitTransform(scale=1.0 / float(getattr(c, attr, None) or 1.0))


# model_type (of the config or of its text config) -> the transform its transformers CausalLM applies. Read from
# transformers' modeling_*.py (5.x): every `logits = ...` after the LM head in a causal LM's forward.
FAMILIES: dict[str, Callable[[Any], LogitTransform]] = {
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                     "granitemoeshared", "granite4_vision", "granite4_vision_text"), _granite),
    **dict.fromkeys(("hyperclovax", "hyperclovax_vision_v2"), _times("logits_scaling")),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"),
                    _times("logit_scale")),
    "falcon_h1": _times("lm_head_multiplier"),
    "minicpm3": _inv("logits_scaling"),
    **dict.fromkeys(("inkling_text", "inkling_mm_model"), _inv("logits_mup_width_multiplier")),
    **dict.fromkeys(("gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text",
                     "gemma4_unified", "gemma4_unified_text", "vaultgemma", "nanochat", "diffusion_gemma",
                     "diffusion_gemma_text"), _softcap("final_logit_softcapping")),
    **dict.fromkeys(("muse_glimmer", "muse_glimmer_text"), _softcap("final_logit_softcapping", "output_multiplier")),
    "recurrent_gemma": _softcap("logits_soft_cap"),
    "xlstm": _softcap("output_logit_soft_cap"),
}
# Config attributes that post-process logits in the families above: in a family FAMILIES does not list, one of
# them set to a non-neutral value is refused before any weight loads (its meaning there is unknown).
POST_PROCESSING_ATTRS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier",
                         "logits_mup_width_multiplier", "final_logit_softcapping", "logits_soft_cap",
                         "output_logit_soft_cap")


def _configs(model_or_config: Any) -> tuple[Any, Any]:
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config, text


def _name(model_or_config: Any) -> str:
    config, text = _configs(model_or_config)
    kind = getattr(text, "model_type", None) or getattr(config, "model_type", "?")
    return f"{type(model_or_config).__name__} ({kind})" if hasattr(model_or_config, "config") else kind


def logit_transform(model_or_config: Any) -> LogitTransform:
    """The transform between a causal LM's head output and its `model(...).logits`, from its config.

    Raises LogitTransformError for a family not in FAMILIES whose config sets a logit post-processing attribute.
    """
    config, text = _configs(model_or_config)
    for kind in dict.fromkeys((getattr(text, "model_type", None), getattr(config, "model_type", None))):
        if kind in FAMILIES:
            t = FAMILIES[kind](text)
            if not (math.isfinite(t.scale) and t.scale > 0 and (t.softcap is None or t.softcap > 0)):
                raise LogitTransformError(f"{_name(model_or_config)}: its logit post-processing ({t.describe()}) "
                                          "is not a positive scale and cap")
            return LogitTransform(t.scale, t.softcap, kind)
    set_attrs = {a: getattr(c, a) for c in (text, config) for a in POST_PROCESSING_ATTRS
                 if getattr(c, a, None) not in (None, 0, 1, 1.0, False)}
    if set_attrs:
        raise LogitTransformError(
            f"{_name(model_or_config)} sets {', '.join(f'{a}={v}' for a, v in set_attrs.items())}, which "
            "post-processes logits in other families, and moekd does not know what it does in this one: refused "
            f"rather than stored or trained on the wrong distribution. Known families: {', '.join(sorted(FAMILIES))}")
    return LogitTransform(family=getattr(text, "model_type", None) or "")


@torch.no_grad()
def check_served_logits(model: Any) -> LogitTransform:
    """`logit_transform(model)`, checked against the model's own forward on a few tokens; refuses a mismatch.

    Compares `model(ids).logits` with the transform applied to `head(base_model(ids).last_hidden_state)`: a
    family that post-processes its logits in a way FAMILIES does not know (or reads the hidden states
    differently) is refused by name. One forward of PROBE_TOKENS tokens; the model is left in its mode.
    """
    transform = logit_transform(model)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    device = embed.weight.device
    vocab = int(head.weight.shape[0])
    ids = ((torch.arange(PROBE_TOKENS) * 7919 + 11) % min(vocab, int(embed.weight.shape[0])))[None].to(device)
    attn = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        served = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
        ours = transform(head(hidden.to(head.weight.device)).float())
    finally:
        model.train(was_training)
    if served.shape[-1] != vocab:
        raise LogitTransformError(f"{_name(model)} serves {served.shape[-1]} logits per token from an LM head of "
                                  f"{vocab} rows: moekd applies the head itself and cannot reproduce that; refused")
    served = served.float().to(ours.device)
    diff = float((served - ours).abs().max())
    tol = PROBE_TOLERANCE.get(head.weight.dtype, PROBE_TOLERANCE_16BIT) * max(1.0, float(served.abs().max()))
    if not diff <= tol:  # (also NaN)
        raise LogitTransformError(
            f"{_name(model)} post-processes its logits in a way moekd does not know: model(...).logits differs "
            f"from its LM head's output with the transform moekd applies ({transform.describe()}) by up to "
            f"{diff:.3g}. Refused rather than stored or trained on a distribution the model does not serve; "
            "the known families are in logit_store/model_logits.py (FAMILIES)")
    return transform
