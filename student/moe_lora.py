"""The MoE-LoRA layer: a frozen dense MLP plus a top-k routed mixture of LoRA experts.

Expert e computes the base MLP with its own LoRA on every MLP projection. For a gated (Llama-like) MLP:

    a_e = act(x W_g + s B_g A_g x) * (x W_u + s B_u A_u x)        E_e(x) = W_d a_e + s B_d A_d a_e

and the layer returns sum_e w_e E_e(x) over the top-k experts (renormalised softmax weights, sum_e w_e = 1).
Running k full experts per token would multiply the dense cost by k; instead we use, exactly by linearity,

    sum_e w_e E_e(x) = W_d (a + sum_e w_e (a_e - a)) + sum_e w_e s B_d A_d a_e,     a = base activation

so the frozen projections W_g, W_u, W_d run once per token and the per-expert work is only the rank-r LoRA
products and the elementwise activation of routed tokens. Writing the mix as a correction to the base
activation also makes the layer bit-identical to the base MLP while the B matrices are zero (the
corrections are exact zeros), which is what "the student equals its base at init" needs.

A shared expert (`shared_rank` > 0) is one more LoRA on every projection that every token uses: it adds to the
base projections themselves (W + s' B' A'), so every expert, and the base activation `a`, sit on top of it, and
on export it merges into every expert's weights. With k = E (`experts_per_token == num_experts`) the layer is a
soft mixture: every expert runs on every token, batched, with no top-k dispatch.

The router is fp32, also under autocast. Its top-k *selection* may add a per-expert bias (`router_bias`, moved
towards balance by `router_loss.update_router_bias`, DeepSeek-V3's auxiliary-loss-free balancing); the mixing
weights are always the plain softmax probabilities of the selected experts, renormalised.

Two fixed routings (`routing`), study v3's controls for "does *learned* routing matter", have no router at all:
`hash` sends each token to experts_per_token distinct experts chosen by a seeded hash of its input token id (the
same for every occurrence of the token), weight 1/k each; `all` puts every expert on every token with weight 1,
not renormalised, as LoRA updates: the MLP adapter is then the shared expert plus the sum of all experts' LoRAs
(one rank E·r LoRA in E blocks at the experts' scale, the protocol's `dense-split`). The layer sees hidden
states, not ids: `set_token_ids` hands them over before a forward (a pre-hook that `student.convert` installs
does it for every caller), as `router_loss.count_only` hands over the attention mask.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from student.config import DEFAULT_ROUTER_INIT_STD, EXPERT_IMPLS, ROUTINGS, default_alpha, lora_scale
from student.fused_experts import (
    FUSED_ACTIVATIONS,
    KERNELS,
    Groups,
    RoutedGatedLoRA,
    fused_activation,
    padded_capacity,
)


class UnsupportedModelError(ValueError):
    """The model (or one of its modules) has a shape this package does not know how to convert."""


@dataclass
class RouterStats:
    """Router outcome of the most recent forward of one layer over its real (non-padding) tokens (overwritten,
    never appended: a gradient checkpointing recompute replaces it instead of counting a layer twice).

    The sums let `router_loss.router_losses` pool layers before the product, as transformers' Mixtral does."""

    balance: torch.Tensor  # this layer's Mixtral balance loss E * sum_e f_e P_e (f over all k slots): k if balanced
    z: torch.Tensor  # router z-loss: mean squared log-partition of the router logits
    counts: torch.Tensor  # [E] routed (token, slot) assignments per expert, detached (long)
    prob_sum: torch.Tensor  # [E] sum over tokens of the router probabilities (carries the gradient)
    z_sum: torch.Tensor  # sum over tokens of the squared log-partition (carries the gradient)
    tokens: torch.Tensor  # number of tokens counted (float scalar)
    weight_ess: torch.Tensor  # mean over tokens of 1 / sum_j w_j^2: effective experts per token, detached
    weight_sum: torch.Tensor  # [E] sum over tokens of each expert's routing weight, detached (soft routing's "load")


class MLPLayout(NamedTuple):
    """Where the parts of a dense MLP are: its kind and the attribute names of its projections and activation."""

    kind: str  # "gated" (act(gate) * up, then down) or "gpt2" (act(c_fc), then c_proj)
    inputs: list[str]  # input projections (gate_proj, up_proj / c_fc)
    output: str  # output projection (down_proj / c_proj)
    activation: str  # activation module attribute


def mlp_layout(mlp: nn.Module) -> MLPLayout:
    """The layout of a dense MLP of a supported family; UnsupportedModelError for any other."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return MLPLayout("gated", ["gate_proj", "up_proj"], "down_proj", "act_fn")
    if all(hasattr(mlp, n) for n in ("c_fc", "c_proj", "act")):
        return MLPLayout("gpt2", ["c_fc"], "c_proj", "act")
    raise UnsupportedModelError(
        f"cannot convert MLP of type {type(mlp).__name__}: supported are gated MLPs with gate_proj/up_proj/"
        "down_proj/act_fn (Llama, Mistral, Qwen2, SmolLM2) and GPT-2 MLPs with c_fc/c_proj/act"
    )


def projection_features(proj: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an MLP projection: a Linear or GPT-2's transposed Conv1D."""
    if isinstance(proj, nn.Linear):
        return proj.in_features, proj.out_features
    if type(proj).__name__ == "Conv1D":  # GPT-2's transposed linear: weight is [in, out]
        return proj.weight.shape[0], proj.weight.shape[1]
    raise UnsupportedModelError(f"MLP projection of type {type(proj).__name__} is not a Linear or GPT-2 Conv1D")


def _segment_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int], offsets: torch.Tensor | None) -> torch.Tensor:
    """Rows of x are grouped by expert (counts[e] rows for expert e); returns x_seg @ w[e] for every group.

    With `offsets` it is one grouped GEMM (torch._grouped_mm, the CUDA fast path; CUDA's kernel takes bf16
    only, so there the product is computed in bf16); otherwise a loop of plain matmuls, the reference."""
    if offsets is not None:
        if x.is_cuda:
            return torch._grouped_mm(x.bfloat16(), w.bfloat16(), offs=offsets).to(x.dtype)
        return torch._grouped_mm(x, w, offs=offsets)
    outs = [seg @ w[e] for e, seg in enumerate(x.split(counts)) if counts[e] > 0]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _is_sharded(t: torch.Tensor) -> bool:
    """An FSDP2-sharded parameter (a DTensor): calling its module gathers it in its policy's dtype."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _expert_counts(top_i: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """[E] (token, slot) assignments per expert, counted or summed with a weight per token [N] or per slot [N, k];
    a scatter-add, so no host sync on CUDA (torch.bincount reads the input's maximum back to size its output)."""
    flat = top_i.reshape(-1)
    if weight is None:
        src = torch.ones_like(flat)
    else:
        src = (weight[:, None] if weight.dim() == 1 else weight).expand(top_i.shape).reshape(-1)
    return torch.zeros(num_experts, dtype=src.dtype, device=flat.device).scatter_add_(0, flat, src)


# fixed seed of hash routing: a student's hash routing is a function of (token id, layer) alone, reproducible
# anywhere and after a reload without saving a table
HASH_SEED = 0x5EED


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h < 2^32, without int64 overflow (the constant is split in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values: integer ops only, so the same on
    every device."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_experts(ids: torch.Tensor, num_experts: int, k: int, salt: int = 0) -> torch.Tensor:
    """[N, k] distinct experts per token id (ids [N]): the k largest of a seeded hash of (id, expert), i.e. a fixed
    pseudo-random k-subset per id and `salt` (the layer), so every occurrence of a token goes to the same experts."""
    salt_key = (HASH_SEED + 0x9E3779B9 * (salt + 1)) & 0xFFFFFFFF
    key = _fmix32((ids.reshape(-1).long() ^ salt_key) & 0xFFFFFFFF)  # [N]
    e = torch.arange(num_experts, device=ids.device)
    scores = _fmix32((key[:, None] + _mul32(e[None], 0x9E3779B9) + 1) & 0xFFFFFFFF)  # [N, E]
    return scores.topk(k, dim=-1).indices


def set_token_ids(model: nn.Module, input_ids: torch.Tensor | None) -> None:
    """Hand the input token ids of the next forwards to every hash-routed MoE layer of `model` (None: there are
    none, e.g. a forward on inputs_embeds; a hash layer then refuses to run). Stays set until the next call, so a
    gradient-checkpointing recompute routes alike."""
    ids = None if input_ids is None else input_ids.reshape(-1)
    for m in model.modules():
        if isinstance(m, MoELoRAMLP) and m.routing == "hash":
            m.token_ids = ids


class TokenIdsHook:
    """Forward pre-hook (with kwargs) for a student's decoder (`model.base_model`, which every path through the
    model calls with the ids: train, eval, HF Trainer, generate): hands its `input_ids` to the hash-routed layers.
    A class, not a closure, so a student still deep-copies and pickles."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        set_token_ids(module, ids)


class MoELoRAMLP(nn.Module):
    """A dense MLP turned into a top-k mixture of LoRA experts that share its frozen weights.

    Each token goes to `experts_per_token` of `num_experts` experts; `alpha` unset is 2 × rank (the
    MoELoRAConfig rule) and `lora_scaling` is "standard" (scale alpha / rank) or "rslora" (alpha / sqrt(rank)).
    Students build these through `student.convert` from a MoELoRAConfig.

    Trainable: `router` (fp32 [E, H]) and the stacked expert LoRA factors
    in_A [E, P*r, H], in_B [E, P, r, I] (P = 2 input projections gate/up, or 1 for GPT-2's c_fc),
    out_A [E, r, I], out_B [E, r, H]. The B factors are stored transposed (rank first): their weight-gradient
    GEMMs run about twice as fast in that layout on CPU. With a shared expert of rank R, the same layout without
    the expert axis: shared_in_A [P*R, H], shared_in_B [P, R, I], shared_out_A [R, I], shared_out_B [R, H].
    B starts at zero, so the layer starts equal to the base MLP. Buffer: `router_bias` [E] (selection only).
    With fixed `routing` ("hash", "all") there is neither router nor router_bias (both None).
    """

    def __init__(
        self,
        base: nn.Module,
        num_experts: int = 8,
        experts_per_token: int = 2,
        rank: int = 16,
        alpha: float | None = None,
        lora_dropout: float = 0.0,
        router_init_std: float = DEFAULT_ROUTER_INIT_STD,
        impl: str = "auto",
        layer_index: int | None = None,
        lora_scaling: str = "standard",
        shared_rank: int = 0,
        shared_alpha: float | None = None,
        routing: str = "learned",
    ) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if routing == "all" and experts_per_token != num_experts:
            raise ValueError(f"routing 'all' uses every expert: experts_per_token must be {num_experts}, got "
                             f"{experts_per_token}")
        if not 1 <= experts_per_token <= num_experts:
            raise ValueError(f"experts_per_token must be in [1, num_experts={num_experts}], got {experts_per_token}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"impl must be one of {EXPERT_IMPLS}, got {impl!r}")
        if shared_rank < 0:
            raise ValueError(f"shared expert rank must be >= 0, got {shared_rank}")
        self.kind, self.in_names, self.out_name, self.act_name = mlp_layout(base)
        # the fused/compiled kernels' name for the gate activation; None: they cannot compute this MLP
        self.fused_act = fused_activation(getattr(base, self.act_name)) if self.kind == "gated" else None
        if impl in ("fused", "compiled") and self.fused_act is None:
            act = type(getattr(base, self.act_name)).__name__
            raise UnsupportedModelError(
                f"expert_impl {impl!r} computes gated MLPs with the activations {FUSED_ACTIVATIONS} only; this "
                f"{self.kind} MLP uses {act}: use expert_impl 'loop' or 'auto' (which picks loop for it)"
            )
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        hidden, inter = projection_features(getattr(base, self.in_names[0]))
        self.hidden_size, self.intermediate_size = hidden, inter
        self.num_experts, self.experts_per_token, self.rank = num_experts, experts_per_token, rank
        alpha = default_alpha(rank) if alpha is None else alpha
        self.lora_scaling = lora_scaling
        self.alpha, self.scaling = alpha, lora_scale(alpha, rank, lora_scaling)
        self.impl = impl
        # fused/compiled paths: lay the routed rows out padded to the largest expert's count (batched matmuls)
        # while that adds at most this fraction - 1 of rows; 0 = always the ragged per-expert loop
        self.max_padding = 1.3
        self.layer_index = layer_index  # which decoder layer of its model this is (None: standalone)
        n_in = len(self.in_names)
        self.routing = routing
        learned = routing == "learned"
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=torch.float32) if learned else None
        self.in_A = nn.Parameter(torch.empty(num_experts, n_in * rank, hidden, dtype=torch.float32))
        self.in_B = nn.Parameter(torch.zeros(num_experts, n_in, rank, inter, dtype=torch.float32))
        self.out_A = nn.Parameter(torch.empty(num_experts, rank, inter, dtype=torch.float32))
        self.out_B = nn.Parameter(torch.zeros(num_experts, rank, hidden, dtype=torch.float32))
        self.shared_rank = shared_rank
        if shared_rank:
            shared_alpha = default_alpha(shared_rank) if shared_alpha is None else shared_alpha
            self.shared_alpha, self.shared_scaling = shared_alpha, lora_scale(shared_alpha, shared_rank, lora_scaling)
            self.shared_in_A = nn.Parameter(torch.empty(n_in * shared_rank, hidden, dtype=torch.float32))
            self.shared_in_B = nn.Parameter(torch.zeros(n_in, shared_rank, inter, dtype=torch.float32))
            self.shared_out_A = nn.Parameter(torch.empty(shared_rank, inter, dtype=torch.float32))
            self.shared_out_B = nn.Parameter(torch.zeros(shared_rank, hidden, dtype=torch.float32))
        # added to the router probabilities for top-k selection only (DeepSeek-V3 balancing); saved with the student
        if learned:
            self.register_buffer("router_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.router_bias = None
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_parameters(router_init_std)
        self.router_stats: RouterStats | None = None
        # [N] bool over the flattened tokens of the next forwards: which are real (not padding). Set by
        # `router_loss.count_only(model, attention_mask)`; used for the router stats only, when N matches.
        self.token_mask: torch.Tensor | None = None
        # [N] input token ids of the next forwards, for hash routing: set by `set_token_ids` (convert's pre-hook)
        self.token_ids: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self, router_init_std: float = DEFAULT_ROUTER_INIT_STD) -> None:
        """peft's LoRA init per expert (A Kaiming-uniform, B zero) and a small random router (if learned)."""
        if self.routing == "learned":
            nn.init.normal_(self.router.weight, std=router_init_std)
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.in_A[e], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.out_A[e], a=math.sqrt(5))
        self.in_B.zero_()
        self.out_B.zero_()
        if self.shared_rank:
            nn.init.kaiming_uniform_(self.shared_in_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.shared_out_A, a=math.sqrt(5))
            self.shared_in_B.zero_()
            self.shared_out_B.zero_()

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, routing={self.routing}, experts={self.num_experts}, "
            f"experts_per_token={self.experts_per_token}, "
            f"rank={self.rank}, alpha={self.alpha}, scaling={self.lora_scaling}, shared_rank={self.shared_rank}, "
            f"hidden={self.hidden_size}, intermediate={self.intermediate_size}"
        )

    def _activation(self, pre: list[torch.Tensor]) -> torch.Tensor:
        act = getattr(self.base, self.act_name)
        return act(pre[0]) * pre[1] if self.kind == "gated" else act(pre[0])

    @property
    def soft(self) -> bool:
        """Soft routing: every token uses every expert (k = E)."""
        return self.experts_per_token == self.num_experts

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """fp32 router, also under autocast: (logits [N, E], top-k renormalised weights [N, k], top-k expert ids
        [N, k]), k = experts_per_token. Selection ranks probs + router_bias; the weights are the probs.
        Hash routing: (None, 1/k each, the token ids' hashed experts)."""
        if self.routing != "learned":
            return None, *self._hash_route(x2)
        with torch.autocast(x2.device.type, enabled=False):
            # the module is called (not its weight read), so FSDP gathers the router as its own fp32 unit; a
            # student cast whole to bf16 (model.to(bfloat16), a Trainer's bf16 eval) still routes in fp32
            w = self.router.weight
            if w.dtype == torch.float32 or _is_sharded(w):
                logits = self.router(x2.float())
            else:
                logits = F.linear(x2.float(), w.float())
            probs = logits.softmax(dim=-1)
            n_tok, k = probs.shape[0], self.experts_per_token
            if self.soft:  # nothing to select
                top_i = torch.arange(self.num_experts, device=probs.device).expand(n_tok, -1)
                top_w = probs
            else:
                top_i = (probs + self.router_bias).topk(k, dim=-1).indices
                top_w = probs.gather(1, top_i)
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
            self.router_stats = self._router_stats(logits, probs, top_i, top_w)
        return logits, top_w, top_i

    def _hash_route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hash routing's (weights [N, k], experts [N, k]) from the token ids `set_token_ids` handed over."""
        ids, n_tok = self.token_ids, x2.shape[0]
        if ids is None or ids.numel() != n_tok:
            got = "none" if ids is None else f"{ids.numel()}"
            raise RuntimeError(
                f"hash-routed MoE layer {self.layer_index} needs the input token ids of its {n_tok} tokens, got "
                f"{got}: call the model with input_ids (not inputs_embeds), through a student built by "
                "student.convert (its pre-hook hands them over), or call moe_lora.set_token_ids(model, ids) first")
        k = self.experts_per_token
        top_i = hash_experts(ids.to(x2.device), self.num_experts, k, salt=self.layer_index or 0)
        top_w = torch.full(top_i.shape, 1.0 / k, dtype=torch.float32, device=x2.device)
        self.router_stats = self._fixed_stats(top_i, top_w)
        return top_w, top_i

    def _fixed_stats(self, top_i: torch.Tensor, top_w: torch.Tensor) -> RouterStats:
        """Stats of a fixed routing (hash, all): loads and weights as for a learned router; no probabilities, so
        balance and z are 0 (and carry no gradient)."""
        real = self.token_mask
        if real is not None and real.numel() == top_i.shape[0]:
            weight = real.to(device=top_w.device, dtype=top_w.dtype)
        else:
            weight = torch.ones(top_i.shape[0], dtype=top_w.dtype, device=top_w.device)
        counts = _expert_counts(top_i, self.num_experts, weight)
        tokens = weight.sum()
        n = tokens.clamp(min=1)
        share = top_w / top_w.sum(dim=-1, keepdim=True)  # 'all' weighs each expert 1: per token it uses all E
        ess = ((1.0 / share.square().sum(dim=-1)) * weight).sum() / n
        zero = torch.zeros((), dtype=top_w.dtype, device=top_w.device)
        return RouterStats(balance=zero, z=zero, counts=counts.round().long(), prob_sum=torch.zeros_like(counts),
                           z_sum=zero, tokens=tokens, weight_ess=ess,
                           weight_sum=_expert_counts(top_i, self.num_experts, top_w * weight[:, None]))

    def _router_stats(self, logits, probs, top_i, top_w) -> RouterStats:
        """Stats of the real tokens (all of them unless `token_mask` says which), as masked sums: no host sync."""
        real = self.token_mask
        if real is not None and real.numel() == probs.shape[0]:  # padding takes no part in the stats
            weight = real.to(device=probs.device, dtype=probs.dtype)
        else:
            weight = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
        counts = _expert_counts(top_i, self.num_experts, weight)
        tokens = weight.sum()
        prob_sum = (probs * weight[:, None]).sum(dim=0)
        z_sum = (torch.logsumexp(logits, dim=-1).square() * weight).sum()
        n = tokens.clamp(min=1)
        # transformers' Mixtral load_balancing_loss_func: E * sum_e f_e P_e, f_e = assignments to e (all k slots)
        # per token, P_e = mean probability; f carries no gradient
        balance = self.num_experts * ((counts / n) * (prob_sum / n)).sum()
        top_w = top_w.detach()
        ess = ((1.0 / top_w.square().sum(dim=-1)) * weight).sum() / n
        weight_sum = _expert_counts(top_i, self.num_experts, top_w * weight[:, None])
        return RouterStats(balance=balance, z=z_sum / n, counts=counts.detach().round().long(), prob_sum=prob_sum,
                           z_sum=z_sum, tokens=tokens.detach(), weight_ess=ess, weight_sum=weight_sum)

    def resolve_impl(self, x: torch.Tensor) -> str:
        """Which expert implementation runs for this input (see `impl` and student.config.EXPERT_IMPLS)."""
        if self.impl == "compiled" and KERNELS.failed:
            return "loop"  # torch.compile is unavailable here; the eager kernels are slower than the loop
        if self.impl != "auto":
            return self.impl
        if x.is_cuda:  # grouped GEMM (its CUDA kernel takes bf16) for bf16 activations or bf16 autocast
            bf16 = x.dtype == torch.bfloat16 or (
                torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
            )
            # the kernel needs 16-byte aligned rows: bf16 dimensions that are multiples of 8
            aligned = all(n % 8 == 0 for n in (self.rank, self.hidden_size, self.intermediate_size))
            return "grouped" if bf16 and aligned else "loop"
        fusable = (
            self.kind == "gated"
            and self.fused_act is not None
            and x.dtype == self.in_A.dtype == torch.float32  # the hand-written kernel is fp32
            and not torch.is_autocast_enabled(x.device.type)
        )
        return "compiled" if fusable and not KERNELS.failed else "loop"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing == "all":
            return self._all_experts(x)
        lead = x.shape[:-1]
        impl = "soft" if self.soft and self.impl == "auto" else self.resolve_impl(x)
        x2 = x.reshape(-1, self.hidden_size)
        # Frozen base projections once per token, called exactly as the base MLP calls them (same shapes,
        # same kernels), so that zero corrections leave the output bit-identical. A shared expert adds to them.
        pre3 = [getattr(self.base, n)(x) for n in self.in_names]
        if self.shared_rank:
            pre3 = self._shared_inputs(x2, pre3)
        fused = impl in ("fused", "compiled")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not fused):
            a3 = self._activation(pre3)
        pre = [p.reshape(-1, self.intermediate_size) for p in pre3]
        a = a3.reshape(-1, self.intermediate_size)
        _, top_w, top_i = self.route(x2)
        down = getattr(self.base, self.out_name)

        if impl == "soft":
            h, yd = self._soft_experts(x2, pre, a, top_w)
            y = down(h.reshape(*lead, -1)) + yd.reshape(*lead, -1).to(a.dtype)
            return self._finish(y, h)

        # Group the N*k (token, expert) assignments by expert.
        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        tok = order // self.experts_per_token
        w = top_w.reshape(-1)[order]
        count_t = _expert_counts(top_i, self.num_experts)
        # Python counts (a host sync) only for the paths that slice per expert; the grouped GEMM takes offsets.
        counts = None if impl == "grouped" else count_t.tolist()

        if fused:
            inv = torch.argsort(order)
            cap = padded_capacity(counts, self.max_padding)
            if cap:  # expert e's rows at [e * cap, e * cap + counts[e]); padding rows: token 0, weight 0
                e_sorted = flat_e[order]
                starts = torch.tensor([0, *itertools.accumulate(counts[:-1])], device=x.device)
                pos = e_sorted * cap + torch.arange(order.numel(), device=x.device) - starts[e_sorted]
                rows = self.num_experts * cap
                tok = tok.new_zeros(rows).index_copy_(0, pos, tok)
                w = w.new_zeros(rows).index_copy(0, pos, w)
                inv = pos[inv]
            xs = self.lora_dropout(x2.index_select(0, tok))
            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) and self.training else 0.0
            h, yd = RoutedGatedLoRA.apply(
                xs, pre[0], pre[1], a, tok, inv, w, self.in_A, self.in_B, self.out_A, self.out_B,
                Groups(counts, cap, self.num_experts), self.scaling, p, impl == "compiled", self.fused_act,
            )  # fmt: skip
            return self._finish(down(h.reshape(*lead, -1)) + yd.reshape(*lead, -1), h)

        offsets = torch.cumsum(count_t, 0).to(torch.int32) if impl == "grouped" else None
        r, s, n_in = self.rank, self.scaling, len(self.in_names)
        w = w.unsqueeze(-1)
        # LoRA products in the adapters' dtype; on CUDA the grouped GEMM computes in bf16 (its kernel's dtype).
        lora_dtype = torch.bfloat16 if offsets is not None and x.is_cuda else self.in_A.dtype
        xs = self.lora_dropout(x2.index_select(0, tok).to(lora_dtype))
        t = s * _segment_matmul(xs, self.in_A.transpose(1, 2), counts, offsets)  # [M, P*r], scaled while it is small
        a_e = self._activation(
            [
                pre[p].index_select(0, tok)
                + _segment_matmul(t[:, p * r : (p + 1) * r].contiguous(), self.in_B[:, p], counts, offsets).to(x.dtype)
                for p in range(n_in)
            ]
        )
        # Mix activations as corrections to the base one (exact zeros at init); one frozen down-proj.
        h = a.index_add(0, tok, (w * (a_e - a.index_select(0, tok))).to(a.dtype))
        y = down(h.reshape(*lead, self.intermediate_size))
        # Per-expert LoRA on the down projection, applied to each expert's own activation.
        u = (s * w) * _segment_matmul(
            self.lora_dropout(a_e.to(lora_dtype)), self.out_A.transpose(1, 2), counts, offsets
        )
        d = _segment_matmul(u.to(lora_dtype), self.out_B, counts, offsets)
        y = y.reshape(-1, self.hidden_size).index_add(0, tok, d.to(y.dtype)).reshape(*lead, -1)
        return self._finish(y, h)

    def _finish(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The shared expert's down-projection LoRA on the mixed activation h, and GPT-2's residual dropout."""
        if self.shared_rank:
            s, dtype = self.shared_scaling, self.shared_out_A.dtype
            hs = self.lora_dropout(h.reshape(-1, self.intermediate_size).to(dtype))
            y = y + (s * (hs @ self.shared_out_A.T) @ self.shared_out_B).to(y.dtype).reshape(y.shape)
        if self.kind == "gpt2":
            y = self.base.dropout(y)
        return y

    def _all_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Routing 'all': every expert's LoRA on every token with weight 1, as one rank E·r LoRA per projection
        (the experts' blocks side by side) on top of the base and the shared expert. Exact zeros at init."""
        lead, e, r, n_in = x.shape[:-1], self.num_experts, self.rank, len(self.in_names)
        x2 = x.reshape(-1, self.hidden_size)
        pre3 = [getattr(self.base, n)(x) for n in self.in_names]
        if self.shared_rank:
            pre3 = self._shared_inputs(x2, pre3)
        s, dtype = self.scaling, self.in_A.dtype
        t = s * (self.lora_dropout(x2.to(dtype)) @ self.in_A.reshape(-1, self.hidden_size).T)  # [N, E*P*r]
        t = t.reshape(-1, e, n_in, r)
        pre3 = [p3 + (t[:, :, i].reshape(-1, e * r) @ self.in_B[:, i].reshape(e * r, -1)).to(p3.dtype).reshape(
            p3.shape) for i, p3 in enumerate(pre3)]
        h = self._activation(pre3)
        hd = self.lora_dropout(h.reshape(-1, self.intermediate_size).to(dtype))
        yd = (s * (hd @ self.out_A.reshape(e * r, -1).T)) @ self.out_B.reshape(e * r, -1)
        y = getattr(self.base, self.out_name)(h) + yd.to(h.dtype).reshape(*lead, -1)
        n_tok = x2.shape[0]
        top_i = torch.arange(e, device=x.device).expand(n_tok, -1)
        self.router_stats = self._fixed_stats(top_i, torch.ones(n_tok, e, dtype=torch.float32, device=x.device))
        return self._finish(y, h)

    def _shared_inputs(self, x2: torch.Tensor, pre3: list[torch.Tensor]) -> list[torch.Tensor]:
        """The input projections with the shared expert's LoRA added (exact zeros while its B is zero)."""
        big_r, s = self.shared_rank, self.shared_scaling
        t = s * (self.lora_dropout(x2.to(self.shared_in_A.dtype)) @ self.shared_in_A.T)  # [N, P*R]
        return [
            p3 + (t[:, i * big_r : (i + 1) * big_r] @ self.shared_in_B[i]).to(p3.dtype).reshape(p3.shape)
            for i, p3 in enumerate(pre3)
        ]

    def _soft_experts(
        self, x2: torch.Tensor, pre: list[torch.Tensor], a: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft routing: every expert on every token, batched over experts (no dispatch). Returns the mixed
        activation h [N, I] and the experts' down-projection LoRA yd [N, H]; w [N, E]."""
        r, s, n_in = self.rank, self.scaling, len(self.in_names)
        lora_dtype = self.in_A.dtype
        xs = self.lora_dropout(x2.to(lora_dtype))
        t = s * torch.matmul(xs, self.in_A.transpose(1, 2))  # [E, N, P*r]
        a_e = self._activation(
            [pre[p] + torch.bmm(t[..., p * r : (p + 1) * r], self.in_B[:, p]).to(pre[p].dtype) for p in range(n_in)]
        )  # [E, N, I]
        w_t = w.t().unsqueeze(-1)  # [E, N, 1]
        h = a + (w_t.to(a.dtype) * (a_e - a)).sum(0)
        u = (s * w_t) * torch.matmul(self.lora_dropout(a_e.to(lora_dtype)), self.out_A.transpose(1, 2))  # [E, N, r]
        return h, torch.bmm(u, self.out_B).sum(0)
