"""`kdstudent eval`: how close a student is to its teacher on held-out stores, and how good it is on its own.

Every metric is a mean over loss positions (tokens), so results add up: a store's figures are the token-weighted
pool of its domains', and `evaluate_stores` pools several stores as if they were one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from logit_store import KDStream, LogitStore
from logit_store.model_logits import LogitTransform, logit_transform
from student.losses import DistillLossConfig, distill_loss
from student.router_loss import RoutingTally, count_only

ECE_BINS = 15
TEXT_METRICS = ("bpb", "aligned", "matched_mass")  # reported where the store's text is known (`_result`)
METRICS = ("teacher_kl", "ce", "ppl", "top1_agree", "ece", "teacher_nll", "reverse_kl", "rouge_l", "tokens", "rows")


@dataclass
class _Tally:
    """Sums over loss positions of one group of rows (a domain, a store, a pool); `result()` turns them to means."""

    kd: float = 0.0
    ce: float = 0.0
    agree: float = 0.0
    tokens: int = 0
    rows: int = 0
    nbytes: int = 0  # bytes of text the loss positions' tokens spell (bits per byte)
    cross: bool = False  # a cross-tokenizer store: KD figures are over the aligned positions
    aligned: int = 0
    matched_mass: float = 0.0
    conf: torch.Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS, dtype=torch.float64))
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS, dtype=torch.float64))
    count: torch.Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS, dtype=torch.float64))
    # rows of stores with label log-probs (rollouts): per row, the sum over its loss positions of log p_student -
    # log p_teacher of the row's own tokens, and its number of loss positions
    row_diff: list[float] = field(default_factory=list)
    row_tokens: list[int] = field(default_factory=list)
    teacher_nll: float = 0.0

    def add(self, other: _Tally) -> _Tally:
        self.kd, self.ce, self.agree = self.kd + other.kd, self.ce + other.ce, self.agree + other.agree
        self.tokens, self.rows = self.tokens + other.tokens, self.rows + other.rows
        self.nbytes, self.aligned = self.nbytes + other.nbytes, self.aligned + other.aligned
        self.matched_mass, self.cross = self.matched_mass + other.matched_mass, self.cross or other.cross
        self.conf, self.correct, self.count = self.conf + other.conf, self.correct + other.correct, \
            self.count + other.count
        self.row_diff, self.row_tokens = self.row_diff + other.row_diff, self.row_tokens + other.row_tokens
        self.teacher_nll += other.teacher_nll
        return self

    def result(self) -> dict:
        n = max(self.tokens, 1)
        out = {"teacher_kl": self.kd / n, "ce": self.ce / n, "ppl": float(torch.tensor(self.ce / n).exp()),
               "top1_agree": self.agree / n, "ece": float((self.conf - self.correct).abs().sum() / n),
               "tokens": self.tokens, "rows": self.rows}
        if self.row_tokens and len(self.row_tokens) == self.rows:  # every row carries the teacher's label log-probs
            out |= {"teacher_nll": self.teacher_nll / n} | reverse_kl_estimate(self.row_diff, self.row_tokens)
        return out


def reverse_kl_estimate(row_diff: list[float], row_tokens: list[int]) -> dict:
    """Monte-Carlo estimate of the reverse KL(student || teacher) per token, from rows the student sampled itself:
    sum(log p_s - log p_t) / tokens over the rows (a ratio estimator: rows are the independent draws), with a 95 %
    normal interval from its delta-method variance. On rows the student did not sample it is not a KL."""
    d = torch.tensor(row_diff, dtype=torch.float64)
    n = torch.tensor(row_tokens, dtype=torch.float64)
    m = d.numel()
    r = float(d.sum() / n.sum())
    if m < 2:
        return {"reverse_kl": r, "reverse_kl_ci95": [float("nan"), float("nan")]}
    se = float(((d - r * n).pow(2).sum() / (m - 1)).sqrt() / (n.mean() * m ** 0.5))
    return {"reverse_kl": r, "reverse_kl_ci95": [r - 1.959964 * se, r + 1.959964 * se]}


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
    if "label_bytes" in batch:
        t.nbytes = int(batch["label_bytes"][mask].sum())
    if "aligned" in batch:  # another tokenizer's store: the teacher's top-1 counts where it is a student token
        t.cross, t.aligned, t.matched_mass, t.kd = True, int(m["aligned"]), float(m["matched_mass"]), \
            float(m["kd_match"])
        top = batch["aligned"][mask] & batch["target_matched"][mask].gather(1, t_lp.argmax(1, keepdim=True))[:, 0]
        teacher_top1 = torch.where(top, teacher_top1, -1)
    rollouts = "label_logprobs" in batch
    if rollouts:  # per row: log p_student - log p_teacher of its own tokens
        row_of = mask.nonzero()[:, 0]
        diff = torch.zeros(hidden.shape[0], dtype=torch.float64, device=hidden.device)
        diff.index_add_(0, row_of, -batch["label_logprobs"][mask].double())
        t.teacher_nll = float(-batch["label_logprobs"][mask].double().sum())
    for lo in range(0, h.shape[0], chunk_size):
        logits = h[lo:lo + chunk_size] @ head.weight.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias
        logits = transform(logits.float()) if transform is not None else logits.float()
        if rollouts:
            own = logits.log_softmax(-1).gather(1, labels[lo:lo + chunk_size, None])[:, 0]
            diff.index_add_(0, row_of[lo:lo + chunk_size], own.double())
        probs = logits.softmax(-1)
        conf, pred = probs.max(-1)
        t.agree += float((pred == teacher_top1[lo:lo + chunk_size]).sum())
        correct = (pred == labels[lo:lo + chunk_size]).double().cpu()
        b = (conf.double() * ECE_BINS).long().clamp(max=ECE_BINS - 1).cpu()
        t.conf.index_add_(0, b, conf.double().cpu())
        t.correct.index_add_(0, b, correct)
        t.count.index_add_(0, b, torch.ones_like(correct))
    t.tokens = int(mask.sum())
    if rollouts:
        t.row_diff, t.row_tokens = diff.tolist(), mask.sum(1).tolist()
    return t


@torch.no_grad()
def _evaluate_store(model: nn.Module, store: str | LogitStore, batch_size: int, max_rows: int | None,
                    device: torch.device | str, chunk_size: int,
                    tokenizer=None) -> tuple[dict[str | None, _Tally], RoutingTally]:
    """Per-domain tallies of one store (key None: rows without a domain) and its routing tally (MoE students).
    `tokenizer`: the student's, for bits per byte and to read a store of another tokenizer as text."""
    stream = KDStream(store, batch_size, shuffle=False, rank=0, world_size=1)
    names = stream.domain_names
    head, transform = model.get_output_embeddings(), logit_transform(model)
    kd_cfg = DistillLossConfig(kind="fkl", ce_weight=1.0, chunk_size=chunk_size, reduction="sum")
    label_bytes = None
    if tokenizer is not None:
        from student.cross_tokenizer import eval_reading

        collator, label_bytes = eval_reading(stream.stores[0], tokenizer)
        if collator is not None:  # another tokenizer's store: its text, tokenized by the student, compared by gold
            stream.collate_fn, kd_cfg = collator, replace(kd_cfg, cross_tokenizer="gold")
    tallies: dict[str | None, _Tally] = {}
    routing = RoutingTally()
    rows = 0
    for batch in stream:
        if max_rows is not None and rows + len(batch["input_ids"]) > max_rows:  # exactly the first max_rows rows
            batch = {k: v[:max_rows - rows] for k, v in batch.items()}
        batch = {k: v.to(device) for k, v in batch.items()}
        if label_bytes is not None:
            batch["label_bytes"] = label_bytes.to(device)[batch["labels"].clamp(min=0)] * batch["loss_mask"]
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


def _result(t: _Tally) -> dict:
    """`_Tally.result()` plus what needs the store's text: bits per byte (when its tokens' bytes are known), and for a
    store of another tokenizer the share of aligned positions and of the teacher's candidate mass matched exactly,
    with teacher_kl and top1_agree taken over the aligned positions."""
    out = t.result()
    if t.nbytes:
        out["bpb"] = t.ce / math.log(2) / t.nbytes
    if t.cross:
        aligned = max(t.aligned, 1)
        out |= {"teacher_kl": t.kd / aligned, "top1_agree": t.agree / aligned,
                "aligned": t.aligned / max(t.tokens, 1), "matched_mass": t.matched_mass / aligned}
    return out


def _report(tallies: dict[str | None, _Tally], routing: RoutingTally) -> dict:
    """Pooled metrics, then per domain ("domains", when any row has one), expert usage and routing (MoE students)."""
    pooled = _pool(tallies.values())
    out = _result(pooled)
    named = {name: _result(t) for name, t in sorted((k, v) for k, v in tallies.items() if k is not None)}
    if named:
        out["domains"] = named
    return out | routing.result()


def evaluate(model: nn.Module, store: str | LogitStore, batch_size: int = 8, max_rows: int | None = None,
             device: torch.device | str = "cpu", chunk_size: int = 1024, tokenizer=None) -> dict:
    """Per-token means over the store's loss positions (its first `max_rows` rows):

    teacher_kl   KL(teacher || student) on the stored support + tail bucket (forward KL)
    ce, ppl      the student's cross-entropy on the actual next tokens, and exp(ce)
    top1_agree   how often the student's most likely token is the teacher's
    ece          expected calibration error of the student's top-1 prediction (15 equal-width bins)
    teacher_nll  (stores with the teacher's label log-probs, e.g. scored rollouts) the teacher's NLL of the text;
                 `ce` is the student's
    reverse_kl   (the same) teacher_nll - ce, by rows: on the student's own samples, a Monte-Carlo estimate of
                 KL(student || teacher) per token, with `reverse_kl_ci95` (`reverse_kl_estimate`)
    tokens, rows what they were computed on
    bpb          (given the student's `tokenizer`, on a store that records its tokenizer) bits per byte: the
                 student's cross-entropy over the bytes of text its predicted tokens spell; comparable across
                 tokenizers
    aligned, matched_mass (a store of another tokenizer, read as text: student/cross_tokenizer.py) the share of
                 the student's loss positions aligned with a teacher position, and of the teacher's mass there on
                 candidates spelled as a student token; teacher_kl (forward KL over [matched candidates, rest]) and
                 top1_agree are then means over the aligned positions
    domains      the same per domain ({name: {...}}), for a store built with domains
    expert_usage mean fraction of routed assignments per expert and MoE layer (MoE students)
    routing_weights mean routing weight per expert and MoE layer: where the output mass goes (under soft
                 routing, where every token uses every expert and the usage is even, only this varies)
    routing      per MoE layer: effective_experts (exp of the entropy of expert_usage) and
                 effective_experts_per_token (1 / sum of squared routing weights, mean over tokens)
    """
    return evaluate_stores(model, [store], batch_size, max_rows, device, chunk_size,
                           tokenizer)["stores"][_name(store)]


def evaluate_stores(model: nn.Module, stores: list[str | LogitStore], batch_size: int = 8,
                    max_rows: int | None = None, device: torch.device | str = "cpu", chunk_size: int = 1024,
                    tokenizer=None) -> dict:
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
            tallies, routing = _evaluate_store(model, store, batch_size, max_rows, device, chunk_size, tokenizer)
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
            if key not in r:  # rollout metrics: stores with label log-probs only
                continue
            cells = [c[key] for _, c in columns]
            lines.append(f"{key:12s}" + "".join(f" {v:>{w}.4f}" if isinstance(v, float) else f" {v:>{w},}"
                                                for v, w in zip(cells, widths, strict=True)))
        for key in TEXT_METRICS:  # bits per byte; alignment of a store of another tokenizer
            if key in r:
                lines.append(f"{key:12s}" + "".join(f" {c.get(key, float('nan')):>{w}.4f}"
                                                    for (_, c), w in zip(columns, widths, strict=True)))
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


@torch.no_grad()
def rouge_l(model: nn.Module, tokenizer, store: str | LogitStore, max_rows: int | None = None,
            device: torch.device | str = "cpu") -> dict:
    """ROUGE-L F1 (Google's `rouge-score`, stemmed) of the student's greedy responses against a store of the
    teacher's own responses (`kdstore build --generate`): each row's prompt is its tokens before the first target,
    its reference the teacher's response; the student answers greedily with the build's --max-new-tokens. Mean over
    rows with a 95 % normal interval, and per domain."""
    from rouge_score import rouge_scorer

    from student.sampling import eos_ids, sample_hf

    store = store if isinstance(store, LogitStore) else LogitStore.open(store)
    generate = store.manifest.sequence.get("generate")
    if not generate:
        raise ValueError(f"{store.root} holds no teacher responses (built without --generate): ROUGE-L compares "
                         "the student's responses with the teacher's")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    eos = eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    scores: dict[str | None, list[float]] = {}
    try:
        for n, row in enumerate(store):
            if max_rows is not None and n >= max_rows:
                break
            start = int(row.positions[0])
            prompt, reference = row.input_ids[:start], row.input_ids[start:]
            response = sample_hf(model, eos, prompt, 1, generate["max_new_tokens"], 0.0, 1.0, 0)[0]["response_ids"]
            text = [tokenizer.decode(ids, skip_special_tokens=True) for ids in (reference, response)]
            scores.setdefault(row.domain, []).append(scorer.score(*text)["rougeL"].fmeasure)
    finally:
        model.train(was_training)

    def summary(values: list[float]) -> dict:
        x = torch.tensor(values, dtype=torch.float64)
        half = 1.959964 * float(x.std() / len(values) ** 0.5) if len(values) > 1 else float("nan")
        return {"rouge_l": float(x.mean()), "rouge_l_ci95": [float(x.mean()) - half, float(x.mean()) + half],
                "rouge_rows": len(values)}

    out = summary([v for values in scores.values() for v in values])
    named = {name: summary(v) for name, v in sorted((k, v) for k, v in scores.items() if k is not None)}
    return out | ({"domains": named} if named else {})
