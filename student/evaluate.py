"""`kdstudent eval`: how close a student is to its teacher on a held-out store, and how good it is on its own."""

from __future__ import annotations

import torch
from torch import nn

from logit_store import KDStream, LogitStore
from student.losses import DistillLossConfig, distill_loss
from student.router_loss import count_only, expert_usage

ECE_BINS = 15


def evaluate_trained(model_path: str, store: str, batch_size: int = 8, max_rows: int | None = None,
                     device: torch.device | str = "cpu") -> dict:
    """`kdstudent eval`: a run's student (or a saved student) on a store, after the check training makes, that the
    student speaks the store's token ids (its base's tokenizer, a vocabulary that holds every stored id)."""
    from student.config import student_spec
    from student.run import is_run, load_config
    from student.train import check_tokenizer, load_trained

    opened = LogitStore.open(store)
    model = load_trained(model_path, device)
    base = load_config(model_path).base if is_run(model_path) else student_spec(model).base_path
    check_tokenizer(base, opened, model)
    return evaluate(model, opened, batch_size=batch_size, max_rows=max_rows, device=device)


@torch.no_grad()
def evaluate(model: nn.Module, store: str | LogitStore, batch_size: int = 8, max_rows: int | None = None,
             device: torch.device | str = "cpu", chunk_size: int = 1024) -> dict:
    """Per-token means over the store's loss positions:

    teacher_kl   KL(teacher || student) on the stored support + tail bucket (forward KL)
    ce, ppl      the student's cross-entropy on the actual next tokens, and exp(ce)
    top1_agree   how often the student's most likely token is the teacher's
    ece          expected calibration error of the student's top-1 prediction (15 equal-width bins)
    expert_usage mean fraction of routed assignments per expert and MoE layer (MoE students)
    """
    was_training = model.training
    model.eval()
    stream = KDStream(store, batch_size, shuffle=False, rank=0, world_size=1)
    head = model.get_output_embeddings()
    kd_cfg = DistillLossConfig(kind="fkl", ce_weight=1.0, chunk_size=chunk_size, reduction="sum")
    totals = {"kd": 0.0, "ce": 0.0, "agree": 0.0, "tokens": 0}
    conf_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
    correct_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
    count = torch.zeros(ECE_BINS, dtype=torch.float64)
    usage: dict[int, torch.Tensor] = {}
    rows = 0
    for batch in stream:
        batch = {k: v.to(device) for k, v in batch.items()}
        count_only(model, batch["attention_mask"])
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = hidden.last_hidden_state
        _, m = distill_loss(hidden, head.weight, batch, kd_cfg, getattr(head, "bias", None))
        totals["kd"] += float(m["kd"])
        totals["ce"] += float(m["ce"])
        mask = batch["loss_mask"]
        h = hidden[mask]
        labels = batch["labels"][mask]
        t_lp = batch["target_logprobs"][mask].masked_fill(~batch["target_mask"][mask], float("-inf"))
        teacher_top1 = batch["target_ids"][mask].gather(1, t_lp.argmax(1, keepdim=True))[:, 0]
        for lo in range(0, h.shape[0], chunk_size):
            logits = h[lo:lo + chunk_size] @ head.weight.T
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias
            probs = logits.float().softmax(-1)
            conf, pred = probs.max(-1)
            totals["agree"] += float((pred == teacher_top1[lo:lo + chunk_size]).sum())
            correct = (pred == labels[lo:lo + chunk_size]).double()
            b = (conf.double() * ECE_BINS).long().clamp(max=ECE_BINS - 1)
            conf_sum.index_add_(0, b.cpu(), conf.double().cpu())
            correct_sum.index_add_(0, b.cpu(), correct.cpu())
            count.index_add_(0, b.cpu(), torch.ones_like(correct).cpu())
        totals["tokens"] += int(mask.sum())
        for layer, fractions in expert_usage(model).items():
            usage[layer] = usage.get(layer, 0) + torch.tensor(fractions) * int(mask.sum())
        rows += batch["input_ids"].shape[0]
        if max_rows is not None and rows >= max_rows:
            break
    n = max(totals["tokens"], 1)
    ece = float(((conf_sum - correct_sum).abs()).sum() / n)
    model.train(was_training)
    out = {"teacher_kl": totals["kd"] / n, "ce": totals["ce"] / n, "ppl": float(torch.tensor(totals["ce"] / n).exp()),
           "top1_agree": totals["agree"] / n, "ece": ece, "tokens": totals["tokens"], "rows": rows}
    if usage:
        out["expert_usage"] = {str(k): (v / n).tolist() for k, v in usage.items()}
    return out
