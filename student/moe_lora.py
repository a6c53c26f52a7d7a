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
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from student.config import EXPERT_IMPLS, default_alpha
from student.fused_experts import KERNELS, Groups, RoutedSwiGLULoRA, padded_capacity


class UnsupportedModelError(ValueError):
    """The model (or one of its modules) has a shape this package does not know how to convert."""


@dataclass
class RouterStats:
    """Router outcome of the most recent forward of one layer (overwritten, never appended: a gradient
    checkpointing recompute replaces it instead of counting a layer twice)."""

    balance: torch.Tensor  # Switch/Mixtral load-balancing loss, 1.0 when perfectly balanced
    z: torch.Tensor  # router z-loss: mean squared log-partition of the router logits
    counts: torch.Tensor  # [E] routed (token, slot) assignments per expert, detached


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


def _expert_counts(top_i: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """[E] (weighted) number of (token, slot) assignments per expert; a scatter-add, so no host sync on CUDA
    (torch.bincount reads the input's maximum back to size its output)."""
    flat = top_i.reshape(-1)
    src = torch.ones_like(flat) if weight is None else weight[:, None].expand(top_i.shape).reshape(-1)
    return torch.zeros(num_experts, dtype=src.dtype, device=flat.device).scatter_add_(0, flat, src)


class MoELoRAMLP(nn.Module):
    """A dense MLP turned into a top-k mixture of LoRA experts that share its frozen weights.

    Each token goes to `experts_per_token` of `num_experts` experts; `alpha` unset is 2 × rank (the
    MoELoRAConfig rule). Students build these through `student.convert` from a MoELoRAConfig.

    Trainable: `router` (fp32 [E, H]) and the stacked expert LoRA factors
    in_A [E, P*r, H], in_B [E, P, r, I] (P = 2 input projections gate/up, or 1 for GPT-2's c_fc),
    out_A [E, r, I], out_B [E, r, H]. The B factors are stored transposed (rank first): their weight-gradient
    GEMMs run about twice as fast in that layout on CPU. B starts at zero, so the layer starts equal to the
    base MLP.
    """

    def __init__(
        self,
        base: nn.Module,
        num_experts: int = 8,
        experts_per_token: int = 2,
        rank: int = 16,
        alpha: float | None = None,
        lora_dropout: float = 0.0,
        router_init_std: float = 0.02,
        impl: str = "auto",
        layer_index: int | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= experts_per_token <= num_experts:
            raise ValueError(f"experts_per_token must be in [1, num_experts={num_experts}], got {experts_per_token}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"impl must be one of {EXPERT_IMPLS}, got {impl!r}")
        self.kind, self.in_names, self.out_name, self.act_name = mlp_layout(base)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        hidden, inter = projection_features(getattr(base, self.in_names[0]))
        self.hidden_size, self.intermediate_size = hidden, inter
        self.num_experts, self.experts_per_token, self.rank = num_experts, experts_per_token, rank
        alpha = default_alpha(rank) if alpha is None else alpha
        self.alpha, self.scaling = alpha, alpha / rank
        self.impl = impl
        # fused/compiled paths: lay the routed rows out padded to the largest expert's count (batched matmuls)
        # while that adds at most this fraction - 1 of rows; 0 = always the ragged per-expert loop
        self.max_padding = 1.3
        self.layer_index = layer_index  # which decoder layer of its model this is (None: standalone)
        n_in = len(self.in_names)
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=torch.float32)
        self.in_A = nn.Parameter(torch.empty(num_experts, n_in * rank, hidden, dtype=torch.float32))
        self.in_B = nn.Parameter(torch.zeros(num_experts, n_in, rank, inter, dtype=torch.float32))
        self.out_A = nn.Parameter(torch.empty(num_experts, rank, inter, dtype=torch.float32))
        self.out_B = nn.Parameter(torch.zeros(num_experts, rank, hidden, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_parameters(router_init_std)
        self.router_stats: RouterStats | None = None
        # [N] bool over the flattened tokens of the next forwards: which are real (not padding). Set by
        # `router_loss.count_only(model, attention_mask)`; used for the router stats only, when N matches.
        self.token_mask: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self, router_init_std: float = 0.02) -> None:
        """peft's LoRA init per expert (A Kaiming-uniform, B zero) and a small random router."""
        nn.init.normal_(self.router.weight, std=router_init_std)
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.in_A[e], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.out_A[e], a=math.sqrt(5))
        self.in_B.zero_()
        self.out_B.zero_()

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, experts={self.num_experts}, experts_per_token={self.experts_per_token}, "
            f"rank={self.rank}, alpha={self.alpha}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"
        )

    def _activation(self, pre: list[torch.Tensor]) -> torch.Tensor:
        act = getattr(self.base, self.act_name)
        return act(pre[0]) * pre[1] if self.kind == "gated" else act(pre[0])

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 router, also under autocast: (logits [N, E], top-k renormalised weights [N, k], top-k expert ids
        [N, k]), k = experts_per_token.

        No host synchronisation (no boolean indexing, no bincount): on CUDA the layer runs without waiting
        for the GPU."""
        with torch.autocast(x2.device.type, enabled=False):
            logits = F.linear(x2.float(), self.router.weight.float())
            probs = logits.softmax(dim=-1)
            top_w, top_i = probs.topk(self.experts_per_token, dim=-1)
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
            real = self.token_mask
            if real is not None and real.numel() == x2.shape[0]:  # padding takes no part in the stats
                weight = real.to(probs.dtype)
            else:
                weight = torch.ones(x2.shape[0], dtype=probs.dtype, device=x2.device)
            n = weight.sum().clamp(min=1)
            counts = _expert_counts(top_i, self.num_experts, weight)
            # Switch/Mixtral balance loss: E * sum_e f_e * P_e; f_e (routed fraction) carries no gradient.
            frac = counts / (n * self.experts_per_token)
            balance = self.num_experts * (frac * ((probs * weight[:, None]).sum(dim=0) / n)).sum()
            z = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / n
        self.router_stats = RouterStats(balance=balance, z=z, counts=counts.detach().round().long())
        return logits, top_w, top_i

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
            and type(getattr(self.base, self.act_name)).__name__ in ("SiLU", "SiLUActivation")
            and x.dtype == self.in_A.dtype == torch.float32  # the hand-written kernel is fp32
            and not torch.is_autocast_enabled(x.device.type)
        )
        return "compiled" if fusable and not KERNELS.failed else "loop"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        impl = self.resolve_impl(x)
        # Frozen base projections once per token, called exactly as the base MLP calls them (same shapes,
        # same kernels), so that zero corrections leave the output bit-identical.
        pre3 = [getattr(self.base, n)(x) for n in self.in_names]
        fused = impl in ("fused", "compiled")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not fused):
            a3 = self._activation(pre3)
        x2 = x.reshape(-1, self.hidden_size)
        pre = [p.reshape(-1, self.intermediate_size) for p in pre3]
        a = a3.reshape(-1, self.intermediate_size)
        _, top_w, top_i = self.route(x2)

        # Group the N*k (token, expert) assignments by expert.
        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        tok = order // self.experts_per_token
        w = top_w.reshape(-1)[order]
        count_t = _expert_counts(top_i, self.num_experts)
        # Python counts (a host sync) only for the paths that slice per expert; the grouped GEMM takes offsets.
        counts = None if impl == "grouped" else count_t.tolist()
        down = getattr(self.base, self.out_name)

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
            h, yd = RoutedSwiGLULoRA.apply(
                xs, pre[0], pre[1], a, tok, inv, w, self.in_A, self.in_B, self.out_A, self.out_B,
                Groups(counts, cap, self.num_experts), self.scaling, p, impl == "compiled",
            )  # fmt: skip
            return down(h.reshape(*lead, -1)) + yd.reshape(*lead, -1)

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
        if self.kind == "gpt2":
            y = self.base.dropout(y)
        return y
