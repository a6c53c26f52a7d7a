"""Sparse knowledge-distillation losses on the stored teacher support plus a tail bucket, memory-bounded.

At every loss position the store gives S teacher candidates (top-k ids, or unique sampled ids) with log-probs
and the log of the teacher mass outside them (the tail). Both distributions are compared over the same S + 1
buckets: the candidates and "everything else". The student's bucket masses come from its full softmax, so the
student keeps its real tail instead of being renormalised onto the candidates (which would teach over-confidence).

The student's log-partition needs all V logits. `distill_loss` never builds [B, T, V]: it gathers the loss
positions, applies the LM head chunk by chunk keeping only the log-partition, the tail log-partition and the
gathered candidate / label logits, and recomputes each chunk's logits in backward (`_ChunkedHead`). Peak memory
is O(chunk_size * V), independent of batch and sequence length.

`dense_distill_loss` is the slow reference (full [B, T, V] logits, probability space); tests and the benchmark
compare against it. The math and the options are documented in docs/LOSSES.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the loss takes any object with its interface; the definition lives with the teachers' backends
    from logit_store.model_logits import LogitTransform

KINDS = ("fkl", "rkl", "skl", "srkl", "jsd")
# Finite stand-in for log 0: exp(NEG) == 0 exactly in every float dtype, and NEG keeps -inf (and the NaN
# gradients of -inf - -inf) out of the bucket math. Masked slots and empty tails are set to it.
NEG = -1.0e4


@dataclass
class DistillLossConfig:
    """How the KD loss is formed. loss = kd_weight * KD + ce_weight * CE, each a mean over loss tokens.

    kind: fkl = KL(p||q), rkl = KL(q||p), skl = KL(p || a p + (1-a) q), srkl = KL(q || a q + (1-a) p),
          jsd = b KL(p||m) + (1-b) KL(q||m) with m = b p + (1-b) q.  (p teacher, q student, over S+1 buckets)
    alpha: skew of skl / srkl (the MoE-KD paper: srkl, alpha 0.1, ce_weight 0.1).
    beta: generalised JSD mixture weight, in (0, 1).
    temperature: student logits / tau; teacher p^(1/tau) renormalised over the buckets (approximate for tau != 1:
        the tail bucket is tempered as one token). CE always uses the student at tau = 1.
    logp_floor: rkl only: log p used for teacher buckets with zero mass (a sampled store's empty tail), where
        KL(q||p) would be infinite.
    chunk_size: loss positions per LM-head chunk; peak memory ~ 2-3 x chunk_size x V floats.
    keep_logits: keep every chunk's logits from the forward for the backward instead of recomputing them: one of
        the LM head's three matmuls per chunk saved (+5 % tokens/s for a 3-layer SmolLM2 student on CPU), for
        N x V floats of memory (0.4 GB at 2,048 positions and vocabulary 49,152). Gradients are bitwise the same.
    reduction: "mean" over this batch's loss tokens, or "sum" (divide by a global token count yourself, e.g. DDP).
    cross_tokenizer: None for a batch in the store's own ids; "gold" or "uld" for a cross-tokenizer batch
        (`student.cross_tokenizer.CrossTokenizerCollator`): KD only at its aligned positions, candidates spelled the
        same as a student token compared by `kind` over [matched candidates, rest] and the others by ULD (sorted
        probabilities; "gold"), or every candidate by ULD ("uld"). `cross_tokenizer_loss` has the details.
    """

    kind: str = "fkl"
    alpha: float = 0.1
    beta: float = 0.5
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    logp_floor: float = -20.0
    chunk_size: int = 1024
    reduction: str = "mean"
    keep_logits: bool = False
    cross_tokenizer: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} not in {KINDS}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if self.cross_tokenizer not in (None, "gold", "uld"):
            raise ValueError(f"cross_tokenizer must be None, 'gold' or 'uld', got {self.cross_tokenizer!r}")


# ================================================================ the public entry point
def distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    batch: dict[str, torch.Tensor],
    config: DistillLossConfig | None = None,
    lm_head_bias: torch.Tensor | None = None,
    logit_transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KD (+ CE) loss from the student's final hidden states [B, T, H] (after the final norm) and its LM head.

    `batch` is a `logit_store.stream.KDBatch`: position t's targets describe token t + 1, like the logits.
    `logit_transform`: what the model does to its head's output (`logit_store.model_logits.logit_transform(model)`:
    Granite's scaling, Gemma-2's softcap, ...), so that the loss sees the logits the model serves.
    Returns (loss, metrics); metrics are detached tensors (kd, ce, loss, tokens, student/teacher tail mass).
    """
    cfg = config or DistillLossConfig()
    if ("aligned" in batch) != (cfg.cross_tokenizer is not None):  # ids of another vocabulary would be misread
        raise ValueError("a cross-tokenizer batch needs DistillLossConfig(cross_tokenizer='gold' or 'uld'), and "
                         "only such a batch takes it" if "aligned" in batch else
                         f"cross_tokenizer={cfg.cross_tokenizer!r} needs a batch of CrossTokenizerCollator")
    if cfg.cross_tokenizer is not None:
        return cross_tokenizer_loss(hidden, lm_head_weight, batch, cfg, lm_head_bias, logit_transform)
    mask = batch["loss_mask"].to(hidden.device, torch.bool)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"loss_mask {tuple(mask.shape)} does not match hidden {tuple(hidden.shape[:2])}")
    t = _targets_at(batch, mask)
    h = hidden[mask]  # [N, H]: only the positions that carry a loss ever meet the LM head
    compute_dtype = _compute_dtype(hidden, lm_head_weight)
    plain_lse = cfg.temperature != 1.0  # CE needs the tau = 1 log-partition too
    # Gather the candidates and, in the last column, the label (its raw logit feeds CE).
    ids = torch.cat([t["ids"], t["labels"].clamp(min=0)[:, None]], 1)
    raw, lse, tail_lse, lse1 = _ChunkedHead.apply(
        h, lm_head_weight, lm_head_bias, ids, t["mask"], 1.0 / cfg.temperature, plain_lse, cfg.chunk_size,
        compute_dtype, cfg.keep_logits, logit_transform,
    )
    inv_t = 1.0 / cfg.temperature
    lq = _student_buckets(raw[:, :-1] * inv_t, lse, tail_lse, t["mask"])
    lp = _teacher_buckets(t["logprobs"].to(lq.dtype), t["tail"].to(lq.dtype), t["mask"], cfg.temperature)
    kd_tok = kd_per_token(lq, lp, cfg)
    ce_tok = (lse1 if plain_lse else lse) - raw[:, -1]
    return _reduce(kd_tok, ce_tok, t["has_label"], lq, lp, cfg)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The LM head's matmul dtype: autocast's where it is on, else the inputs' common dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _targets_at(batch: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's targets at the loss positions, flattened to [N, ...] (masked slots get id 0)."""
    dev = mask.device
    tmask = batch["target_mask"].to(dev, torch.bool)[mask]
    labels = batch["labels"].to(dev)[mask]
    return dict(
        ids=torch.where(tmask, batch["target_ids"].to(dev)[mask], 0),
        mask=tmask,
        logprobs=batch["target_logprobs"].to(dev)[mask],
        tail=batch["target_tail"].to(dev)[mask],
        labels=labels,
        has_label=labels != -100,
    )


# ================================================================ the memory-bounded LM head
class _ChunkedHead(torch.autograd.Function):
    """LM head over chunks of positions, returning only what the losses need; logits recomputed in backward.

    Outputs for hidden [N, H]: raw logits at `ids` [N, G]; lse [N] of logits * inv_temp; tail_lse [N], the
    logsumexp of logits * inv_temp over the tokens that are not valid candidates (ids[:, :S] where cand_mask);
    and lse1 [N] of the raw logits if `plain_lse` (else empty). The tail is a masked logsumexp rather than
    log(1 - sum q): exact, with no cancellation when the candidates hold almost all the mass.
    Matmuls run in `compute_dtype` (bf16 under autocast), everything else in fp32 (fp64 for fp64 inputs).
    "Logits" are the served ones: `transform` (the model's scaling / softcap) applied to each chunk's head output;
    the backward multiplies by its derivative (a softcap needs one more [chunk, V] buffer there).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, cand_mask, inv_temp, plain_lse, chunk_size, compute_dtype,
                keep_logits=False, transform=None):
        transform = None if transform is None or transform.identity else transform
        acc = _acc_dtype(compute_dtype)
        n, s = hidden.shape[0], cand_mask.shape[1]
        raw = hidden.new_empty((n, ids.shape[1]), dtype=acc)
        lse, tail_lse = hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)
        lse1 = hidden.new_empty(n if plain_lse else 0, dtype=acc)
        ctx.kept = [] if keep_logits else None  # the chunks' logits, as the backward would recompute them
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for lo in range(0, n, chunk_size):
                sl = slice(lo, lo + chunk_size)
                z = _logits(hidden[sl], w, bias, acc, transform)
                if keep_logits:
                    ctx.kept.append(z.clone())
                raw[sl] = z.gather(1, ids[sl])
                if plain_lse:
                    lse1[sl] = torch.logsumexp(z, 1)
                if inv_temp != 1.0:
                    z.mul_(inv_temp)
                lse[sl] = torch.logsumexp(z, 1)
                z[_valid_index(ids[sl, :s], cand_mask[sl])] = -math.inf
                tail_lse[sl] = torch.logsumexp(z, 1)
                del z
        ctx.save_for_backward(hidden, weight, bias, ids, cand_mask, lse, tail_lse, lse1)
        ctx.cfg = (inv_temp, plain_lse, chunk_size, compute_dtype, transform)
        ctx.set_materialize_grads(False)  # an unused output (e.g. lse1 kept as a metric) costs nothing in backward
        return raw, lse, tail_lse, lse1

    @staticmethod
    def backward(ctx, g_raw, g_lse, g_tail, g_lse1):
        hidden, weight, bias, ids, cand_mask, lse, tail_lse, lse1 = ctx.saved_tensors
        inv_temp, plain_lse, chunk_size, compute_dtype, transform = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(compute_dtype)
        n, s = hidden.shape[0], cand_mask.shape[1]
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        # softmax(z * inv_temp) over the tail set; set to 0 where the set is empty (tail_lse = -inf)
        tail_ok = torch.isfinite(tail_lse)
        tail_c = torch.where(tail_ok, tail_lse, 0)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for i, lo in enumerate(range(0, n, chunk_size)):
                sl = slice(lo, lo + chunk_size)
                kept = None if ctx.kept is None else ctx.kept[i]
                if kept is None:  # (also a second backward through a kept graph: the first one used them)
                    z = _logits(hidden[sl], w, bias, acc, transform)
                else:  # modified in place below: released chunk by chunk
                    z, ctx.kept[i] = kept, None
                dzdh = transform.grad_factor(z) if transform is not None else None  # served logit / head output
                # d loss / d raw logits: softmax-shaped terms + the gathered entries; two [C, V] buffers at τ = 1
                dz = None
                if plain_lse and g_lse1 is not None:
                    dz = (z - lse1[sl, None]).exp_().mul_(g_lse1[sl, None])
                if inv_temp != 1.0:
                    z.mul_(inv_temp)
                if g_lse is not None:
                    term = (z - lse[sl, None]).exp_().mul_(g_lse[sl, None] * inv_temp)
                    dz = term if dz is None else dz.add_(term)
                    del term
                if dz is None:
                    dz = torch.zeros_like(z)
                if g_tail is not None:
                    z.sub_(tail_c[sl, None]).exp_()
                    z[_valid_index(ids[sl, :s], cand_mask[sl])] = 0
                    dz.addcmul_(z, (torch.where(tail_ok[sl], g_tail[sl], 0) * inv_temp)[:, None])
                del z
                if g_raw is not None:
                    dz.scatter_add_(1, ids[sl], g_raw[sl])
                if dzdh is not None:  # from d loss / d served logits to d loss / d head output
                    dz.mul_(dzdh)
                    del dzdh
                if need_b:
                    grad_b += dz.sum(0)
                dzc, hc = dz.to(compute_dtype), hidden[sl].to(compute_dtype)
                if need_h:
                    grad_h[sl] = (dzc @ w).to(acc)
                if need_w:
                    if compute_dtype == acc:
                        grad_w.addmm_(dzc.T, hc)
                    else:
                        grad_w += (dzc.T @ hc).to(acc)
                del dz, dzc
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _acc_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype,
            transform: LogitTransform | None = None) -> torch.Tensor:
    """A chunk's served logits in `acc`: the head's output, then the model's post-processing (in place)."""
    z = (h.to(w.dtype) @ w.T).to(acc)
    if bias is not None:
        z.add_(bias.to(acc))
    return transform.apply_(z) if transform is not None else z


def _valid_index(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, id) of every valid candidate, to index a [rows, V] tensor."""
    rows, slots = mask.nonzero(as_tuple=True)
    return rows, ids[rows, slots]


# ================================================================ the loss on S + 1 buckets
def _student_buckets(
    cand_logits: torch.Tensor, lse: torch.Tensor, tail_lse: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """[N, S+1] student log-probs: the candidates' (tempered) log-softmax, then the log of the tail mass."""
    lq = torch.cat([cand_logits - lse[:, None], (tail_lse - lse)[:, None]], 1)
    return _with_slots(lq, mask).clamp(min=NEG)


@torch.no_grad()
def _teacher_buckets(
    logprobs: torch.Tensor, tail: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """[N, S+1] teacher log-probs; for tau != 1, p^(1/tau) renormalised over the S + 1 buckets."""
    lp = _with_slots(torch.cat([logprobs, tail[:, None]], 1), mask, fill=-math.inf)
    if temperature != 1.0:
        lp = lp / temperature
        lp = lp - torch.logsumexp(lp, 1, keepdim=True)
    return lp.clamp(min=NEG)


def _with_slots(x: torch.Tensor, mask: torch.Tensor, fill: float = NEG) -> torch.Tensor:
    """Set the empty candidate slots of an [N, S+1] bucket tensor (the tail, last, always counts)."""
    valid = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return x.masked_fill(~valid, fill)


def kd_per_token(lq: torch.Tensor, lp: torch.Tensor, cfg: DistillLossConfig) -> torch.Tensor:
    """Per-position KD loss from bucket log-probs [N, S+1] of the student (lq) and teacher (lp).

    Log-probs must be finite (NEG stands for log 0); then 0 log 0 terms vanish with zero gradient.
    """
    if cfg.kind == "fkl":
        return _kl(lp, lq)
    if cfg.kind == "rkl" or (cfg.kind == "srkl" and cfg.alpha == 0.0):
        return _kl(lq, lp.clamp(min=cfg.logp_floor))
    if cfg.kind == "skl":
        return _kl(lp, _log_mix(lp, lq, cfg.alpha))
    if cfg.kind == "srkl":
        return _kl(lq, _log_mix(lq, lp, cfg.alpha))
    lm = _log_mix(lp, lq, cfg.beta)  # jsd
    return cfg.beta * _kl(lp, lm) + (1.0 - cfg.beta) * _kl(lq, lm)


def _kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_j a_j (log a_j - log b_j) over the last dim, from log-probs."""
    return (la.exp() * (la - lb)).sum(-1)


def _log_mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) for 0 <= w < 1."""
    if w == 0.0:
        return lb
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def _reduce(
    kd_tok: torch.Tensor,
    ce_tok: torch.Tensor,
    has_label: torch.Tensor,
    lq: torch.Tensor,
    lp: torch.Tensor,
    cfg: DistillLossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    n, n_ce = kd_tok.shape[0], has_label.sum()
    ce_tok = torch.where(has_label, ce_tok, 0)
    kd, ce = kd_tok.sum(), ce_tok.sum()
    if cfg.reduction == "mean":
        kd, ce = kd / max(n, 1), ce / n_ce.clamp(min=1)
    loss = cfg.kd_weight * kd + cfg.ce_weight * ce
    with torch.no_grad():
        metrics = dict(
            loss=loss.detach(),
            kd=kd.detach(),
            ce=ce.detach(),
            tokens=torch.tensor(n),
            ce_tokens=n_ce,
            student_tail_mass=lq[:, -1].exp().sum() / max(n, 1),
            teacher_tail_mass=lp[:, -1].exp().sum() / max(n, 1),
        )
    return loss, metrics


# ================================================================ another tokenizer's student (cross-tokenizer KD)
def cross_tokenizer_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    batch: dict[str, torch.Tensor],
    config: DistillLossConfig,
    lm_head_bias: torch.Tensor | None = None,
    logit_transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KD (+ CE) of a student whose tokenizer is not the store's, on a `CrossTokenizerCollator` batch.

    CE on every loss position. KD only where `aligned` (both tokenizations predict the continuation of the same
    text; elsewhere 0, so a mean over loss positions counts the unaligned ones as CE only). With the position's S
    teacher candidates, those with `target_matched` being student tokens:

    gold  `kind`(p, q) over the buckets [matched candidates, rest] (the teacher's rest = its tail + its unmatched
          candidates; the student's = its mass outside the matched ids), plus ULD over the U unmatched candidates:
          sum_{r < U} |p_(r) - q_(r)|, p_(r) the teacher's unmatched probabilities sorted, q_(r) the student's
          largest probabilities outside the matched ids. With one tokenizer every candidate is matched, U = 0, and
          this is `distill_loss` exactly.
    uld   sum_{r < S} |p_(r) - q_(r)|: every candidate by its rank only (Boizard et al. 2024 on the stored top-S).

    The LM head runs chunked as in `distill_loss` (`_ChunkedHead`: no [B, T, V]); the student's largest ids come
    from one more chunked pass without gradient. Metrics add `aligned` (positions with KD), `matched_mass` (sum of
    the teacher's mass on matched candidates there), `kd_match` and `uld` (the two parts, summed).
    """
    cfg = config
    mask = batch["loss_mask"].to(hidden.device, torch.bool)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"loss_mask {tuple(mask.shape)} does not match hidden {tuple(hidden.shape[:2])}")
    t = _targets_at(batch, mask)
    aligned = batch["aligned"].to(mask.device, torch.bool)[mask]
    matched = batch["target_matched"].to(mask.device, torch.bool)[mask] & t["mask"]
    if cfg.cross_tokenizer == "uld":
        matched = torch.zeros_like(matched)
    h = hidden[mask]
    compute_dtype = _compute_dtype(hidden, lm_head_weight)
    s, inv_t, plain_lse = t["mask"].shape[1], 1.0 / cfg.temperature, cfg.temperature != 1.0
    ids_matched = torch.where(matched, t["ids"], 0)
    top = _top_outside(h, lm_head_weight, lm_head_bias, ids_matched, matched, s, cfg.chunk_size, compute_dtype,
                       logit_transform)
    ids = torch.cat([ids_matched, top, t["labels"].clamp(min=0)[:, None]], 1)
    raw, lse, tail_lse, lse1 = _ChunkedHead.apply(
        h, lm_head_weight, lm_head_bias, ids, matched, inv_t, plain_lse, cfg.chunk_size, compute_dtype,
        cfg.keep_logits, logit_transform,
    )
    # the teacher: tempered buckets [candidates, tail], regrouped as [matched, rest]
    full = _teacher_buckets(t["logprobs"].to(raw.dtype), t["tail"].to(raw.dtype), t["mask"], cfg.temperature)
    lp_cand, unmatched = full[:, :s], t["mask"] & ~matched
    rest = torch.logsumexp(torch.cat([full[:, s:], lp_cand.masked_fill(~unmatched, -math.inf)], 1), 1)
    lp = torch.cat([lp_cand.masked_fill(~matched, NEG), rest[:, None]], 1).clamp(min=NEG)
    lq = _student_buckets(raw[:, :s] * inv_t, lse, tail_lse, matched)
    kd_match = kd_per_token(lq, lp, cfg) if cfg.cross_tokenizer == "gold" else torch.zeros_like(lse)
    # ULD: the teacher's unmatched probabilities, sorted, against the student's largest outside the matched ids
    q_top = (raw[:, s:2 * s] * inv_t - lse[:, None]).exp()
    p_sorted = lp_cand.exp().masked_fill(~unmatched, 0).sort(1, descending=True).values
    ranks = torch.arange(s, device=raw.device)[None] < unmatched.sum(1, keepdim=True)
    uld = ((p_sorted - q_top).abs() * ranks).sum(1)
    zero = torch.zeros_like(lse)
    kd_tok = torch.where(aligned, kd_match + uld, zero)
    ce_tok = (lse1 if plain_lse else lse) - raw[:, -1]
    loss, metrics = _reduce(kd_tok, ce_tok, t["has_label"], lq, lp, cfg)
    with torch.no_grad():
        teacher_p = t["logprobs"].exp().masked_fill(~t["mask"], 0)
        metrics.update(aligned=aligned.sum(), matched_mass=(teacher_p * matched)[aligned].sum(),
                       kd_match=torch.where(aligned, kd_match, zero).sum(), uld=torch.where(aligned, uld, zero).sum())
    return loss, metrics


@torch.no_grad()
def _top_outside(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                 mask: torch.Tensor, count: int, chunk_size: int, compute_dtype: torch.dtype,
                 transform: LogitTransform | None) -> torch.Tensor:
    """[N, count] the ids of each position's largest student logits outside its valid `ids`, largest first (the
    student side of ULD); chunk by chunk, never [N, V]."""
    transform = None if transform is None or transform.identity else transform
    out = torch.zeros((h.shape[0], count), dtype=torch.int64, device=h.device)
    if count == 0:
        return out
    acc = _acc_dtype(compute_dtype)
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(compute_dtype)
        for lo in range(0, h.shape[0], chunk_size):
            sl = slice(lo, lo + chunk_size)
            z = _logits(h[sl], w, bias, acc, transform)
            z[_valid_index(ids[sl], mask[sl])] = -math.inf
            out[sl] = z.topk(min(count, z.shape[1]), 1).indices
    return out


# ================================================================ the dense reference (slow, [B, T, V])
def dense_distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    batch: dict[str, torch.Tensor],
    config: DistillLossConfig | None = None,
    lm_head_bias: torch.Tensor | None = None,
    logit_transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same loss the obvious way: full [B, T, V] logits, bucket masses as probability sums. For tests/benchmarks.

    Written independently of the chunked path (probability space, a dense candidate mask, xlogy) so that the
    two check each other.
    """
    cfg = config or DistillLossConfig()
    logits = F.linear(hidden, lm_head_weight, lm_head_bias)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logits = logit_transform(logits) if logit_transform is not None else logits
    probs = torch.softmax(logits / cfg.temperature, -1)  # [B, T, V]
    ids, tmask = batch["target_ids"], batch["target_mask"].bool()
    valid = torch.cat([tmask, torch.ones_like(tmask[..., :1])], -1)
    is_cand = _dense_candidate_mask(ids, tmask, probs.shape[-1])
    q_cand = probs.gather(-1, ids)
    q_tail = (probs * ~is_cand).sum(-1, keepdim=True)  # 1 - sum q_i, summed the slow way
    q = torch.cat([q_cand, q_tail], -1).masked_fill(~valid, 0)

    p = torch.cat([batch["target_logprobs"], batch["target_tail"][..., None]], -1).to(q.dtype).exp()
    p = p.masked_fill(~valid, 0)
    if cfg.temperature != 1.0:
        p = p ** (1.0 / cfg.temperature)
        p = p / p.sum(-1, keepdim=True)

    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    if cfg.kind == "fkl":
        kd_tok = kl(p, q)
    elif cfg.kind == "rkl" or (cfg.kind == "srkl" and cfg.alpha == 0.0):
        kd_tok = kl(q, p.clamp(min=math.exp(cfg.logp_floor)))
    elif cfg.kind == "skl":
        kd_tok = kl(p, cfg.alpha * p + (1 - cfg.alpha) * q)
    elif cfg.kind == "srkl":
        kd_tok = kl(q, cfg.alpha * q + (1 - cfg.alpha) * p)
    else:
        m = cfg.beta * p + (1 - cfg.beta) * q
        kd_tok = cfg.beta * kl(p, m) + (1 - cfg.beta) * kl(q, m)

    labels = batch["labels"]
    ce_all = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    mask = batch["loss_mask"].bool()
    lq = torch.log(q.clamp(min=1e-300))[mask]
    lp = torch.log(p.clamp(min=1e-300))[mask]
    return _reduce(kd_tok[mask], ce_all.view_as(labels)[mask], labels[mask] != -100, lq, lp, cfg)


def _dense_candidate_mask(ids: torch.Tensor, tmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, T, V] bool: which vocabulary entries are valid candidates at each position."""
    counts = torch.zeros((*ids.shape[:-1], vocab), dtype=torch.int32, device=ids.device)
    counts.scatter_add_(-1, ids, tmask.to(torch.int32))
    return counts > 0
