"""`kdstudent eval`: how close a student is to its teacher on held-out stores, and how good it is on its own.

Every metric is a mean over loss positions (tokens), so results add up: a store's figures are the token-weighted
pool of its domains', and `evaluate_stores` pools several stores as if they were one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from logit_store import KDStream, LogitStore
from logit_store.model_logits import LogitTransform, logit_transform
from student.losses import DistillLossConfig, distill_loss
from student.router_loss import RoutingTally, count_only

ECE_BINS = 15
METRICS = ("teacher_kl", "ce", "ppl", "top1_agree", "ece", "tokens", "rows")


@dataclass
class _Tally:
    """Sums over loss positions of one group of rows (a domain, a store, a pool); `result()` turns them to means."""

    kd: float = 0.0
    ce: float = 0.0
    agree: float = 0.0
    tokens: int = 0
    rows: int = 0
    conf: torch.Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS, dtype=torch.float64))
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS, dtype=torch.float64))
    count: torch.Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS, dtype=torch.float64))

    def add(self, other: _Tally) -> _Tally:
        self.kd, self.ce, self.agree = self.kd + other.kd, self.ce + other.ce, self.agree + other.agree
        self.tokens, self.rows = self.tokens + other.tokens, self.rows + other.rows
        self.conf, self.correct, self.count = self.conf + other.conf, self.correct + other.correct, \
            self.count + other.count
        return self

    def result(self) -> dict:
        n = max(self.tokens, 1)
        return {"teacher_kl": self.kd / n, "ce": self.ce / n, "ppl": float(torch.tensor(self.ce / n).exp()),
                "top1_agree": self.agree / n, "ece": float((self.conf - self.correct).abs().sum() / n),
                "tokens": self.tokens, "rows": self.rows}


def _pool(tallies) -> _Tally:
    total = _Tally()
    for t in tallies:
        total.add(t)
    return total


def _tally_rows(hidden: torch.Tensor, batch: dict, head: nn.Module, kd_cfg: DistillLossConfig,
                chunk_size: int, transform: LogitTransform | None = None) -> _Tally:
    """The sums of a batch's rows (hidden [B, T, H] from the student's body, `batch` a KDBatch); `transform`: the
    model's post-processing of its head's output (`logit_transform`), so that eval scores the logits it serves."""
    t = _Tally(rows=hidden.shape[0])
    _, m = distill_loss(hidden, head.weight, batch, kd_cfg, getattr(head, "bias", None), transform)
    t.kd, t.ce = float(m["kd"]), float(m["ce"])
    mask = batch["loss_mask"]
    h = hidden[mask]
    labels = batch["labels"][mask]
    t_lp = batch["target_logprobs"][mask].masked_fill(~batch["target_mask"][mask], float("-inf"))
    teacher_top1 = batch["target_ids"][mask].gather(1, t_lp.argmax(1, keepdim=True))[:, 0]
    for lo in range(0, h.shape[0], chunk_size):
        logits = h[lo:lo + chunk_size] @ head.weight.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias
        probs = (transform(logits.float()) if transform is not None else logits.float()).softmax(-1)
        conf, pred = probs.max(-1)
        t.agree += float((pred == teacher_top1[lo:lo + chunk_size]).sum())
        correct = (pred == labels[lo:lo + chunk_size]).double().cpu()
        b = (conf.double() * ECE_BINS).long().clamp(max=ECE_BINS - 1).cpu()
        t.conf.index_add_(0, b, conf.double().cpu())
        t.correct.index_add_(0, b, correct)
        t.count.index_add_(0, b, torch.ones_like(correct))
    t.tokens = int(mask.sum())
    return t


@torch.no_grad()
def _evaluate_store(model: nn.Module, store: str | LogitStore, batch_size: int, max_rows: int | None,
                    device: torch.device | str, chunk_size: int) -> tuple[dict[str | None, _Tally], RoutingTally]:
    """Per-domain tallies of one store (key None: rows without a domain) and its routing tally (MoE students)."""
    stream = KDStream(store, batch_size, shuffle=False, rank=0, world_size=1)
    names = stream.domain_names
    head, transform = model.get_output_embeddings(), logit_transform(model)
    kd_cfg = DistillLossConfig(kind="fkl", ce_weight=1.0, chunk_size=chunk_size, reduction="sum")
    tallies: dict[str | None, _Tally] = {}
    routing = RoutingTally()
    rows = 0
    for batch in stream:
        if max_rows is not None and rows + len(batch["input_ids"]) > max_rows:  # exactly the first max_rows rows
            batch = {k: v[:max_rows - rows] for k, v in batch.items()}
        batch = {k: v.to(device) for k, v in batch.items()}
        count_only(model, batch["attention_mask"])
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = hidden.last_hidden_state
        domain = batch["domain"]
        for d in domain.unique().tolist():
            name = names[d] if d >= 0 else None
            if d == -1 and (domain == -1).all():  # no domains: the whole batch, without copying it
                part = _tally_rows(hidden, batch, head, kd_cfg, chunk_size, transform)
            else:
                sel = (domain == d).nonzero()[:, 0]
                part = _tally_rows(hidden[sel], {k: v[sel] for k, v in batch.items()}, head, kd_cfg, chunk_size,
                                   transform)
            tallies.setdefault(name, _Tally()).add(part)
        routing.add_forward(model)
        rows += batch["input_ids"].shape[0]
        if max_rows is not None and rows >= max_rows:
            break
    return tallies, routing


def _report(tallies: dict[str | None, _Tally], routing: RoutingTally) -> dict:
    """Pooled metrics, then per domain ("domains", when any row has one), expert usage and routing (MoE students)."""
    pooled = _pool(tallies.values())
    out = pooled.result()
    named = {name: t.result() for name, t in sorted((k, v) for k, v in tallies.items() if k is not None)}
    if named:
        out["domains"] = named
    return out | routing.result()


def evaluate(model: nn.Module, store: str | LogitStore, batch_size: int = 8, max_rows: int | None = None,
             device: torch.device | str = "cpu", chunk_size: int = 1024) -> dict:
    """Per-token means over the store's loss positions (its first `max_rows` rows):

    teacher_kl   KL(teacher || student) on the stored support + tail bucket (forward KL)
    ce, ppl      the student's cross-entropy on the actual next tokens, and exp(ce)
    top1_agree   how often the student's most likely token is the teacher's
    ece          expected calibration error of the student's top-1 prediction (15 equal-width bins)
    tokens, rows what they were computed on
    domains      the same per domain ({name: {...}}), for a store built with domains
    expert_usage mean fraction of routed assignments per expert and MoE layer (MoE students)
    routing_weights mean routing weight per expert and MoE layer: where the output mass goes (under soft
                 routing, where every token uses every expert and the usage is even, only this varies)
    routing      per MoE layer: effective_experts (exp of the entropy of expert_usage) and
                 effective_experts_per_token (1 / sum of squared routing weights, mean over tokens)
    """
    return evaluate_stores(model, [store], batch_size, max_rows, device, chunk_size)["stores"][_name(store)]


def evaluate_stores(model: nn.Module, stores: list[str | LogitStore], batch_size: int = 8,
                    max_rows: int | None = None, device: torch.device | str = "cpu", chunk_size: int = 1024) -> dict:
    """`evaluate` on each store (`max_rows` per store), and pooled over all of them: {"stores": {store: result},
    "pooled": result}. The pool weighs every token once (a store with more tokens counts more); its `domains`
    pool each domain over the stores that hold it."""
    if not stores:
        raise ValueError("no store to evaluate")
    names = [_name(s) for s in stores]
    if len(set(names)) != len(names):
        raise ValueError(f"a store is given twice: {names}")
    was_training = model.training
    model.eval()
    per_store, pooled, pooled_routing = {}, {}, RoutingTally()
    try:
        for name, store in zip(names, stores, strict=True):
            tallies, routing = _evaluate_store(model, store, batch_size, max_rows, device, chunk_size)
            per_store[name] = _report(tallies, routing)
            for key, t in tallies.items():
                pooled.setdefault(key, _Tally()).add(t)
            pooled_routing.add(routing)
    finally:
        model.train(was_training)
    return {"stores": per_store, "pooled": _report(pooled, pooled_routing)}


def _name(store: str | LogitStore) -> str:
    return store if isinstance(store, str) else store.root


def format_report(result: dict) -> str:
    """`evaluate_stores`' result as text tables: each store (all rows, then each domain), then the pool. Domain
    names are shown whole, under a `domains` bracket, so a domain called `all` is not the store's own column."""
    sections = list(result["stores"].items())
    if len(sections) > 1:
        sections.append((f"pooled over {len(sections)} stores", result["pooled"]))
    lines = []
    for title, r in sections:
        columns = [("all", r), *r.get("domains", {}).items()]
        widths = [max(12, len(name)) for name, _ in columns]
        lines.append(f"store {title}" if not title.startswith("pooled") else title)
        if len(columns) > 1:  # which columns are domains
            span = sum(widths[1:]) + len(widths) - 2
            lines.append(f"{'':12s} {'store':>{widths[0]}s} " + " domains ".center(span, "-"))
        lines.append(f"{'metric':12s}" + "".join(f" {name:>{w}s}" for (name, _), w in zip(columns, widths,
                                                                                         strict=True)))
        for key in METRICS:
            cells = [c[key] for _, c in columns]
            lines.append(f"{key:12s}" + "".join(f" {v:>{w}.4f}" if isinstance(v, float) else f" {v:>{w},}"
                                                for v, w in zip(cells, widths, strict=True)))
        for layer, fractions in r.get("expert_usage", {}).items():
            lines.append(f"experts L{layer:<3s} " + " ".join(f"{f:.2f}" for f in fractions))
        for layer, weights in r.get("routing_weights", {}).items():
            lines.append(f"weights L{layer:<3s} " + " ".join(f"{w:.2f}" for w in weights))
        for layer, m in r.get("routing", {}).items():
            lines.append(f"routing L{layer:<3s} effective experts {m['effective_experts']:.2f}, "
                         f"per token {m['effective_experts_per_token']:.2f}")
    if len(sections) > 1:  # what each store weighs in the pool: its share of the loss positions (`tokens`)
        total = max(result["pooled"]["tokens"], 1)
        lines.append("share of the loss positions: " + ", ".join(f"{name} {r['tokens'] / total:.1%}"
                                                                 for name, r in result["stores"].items()))
    return "\n".join(lines)
