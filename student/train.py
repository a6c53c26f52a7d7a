"""`kdstudent train`: distil a student from a logit store, on one process or many (torchrun), resumably.

A plain loop rather than transformers' Trainer: the loss needs the model body's hidden states and a chunked LM
head (never [batch, seq, vocab] logits), and the reader's position is part of a checkpoint; both fight the
Trainer's compute_loss/sampler/resume machinery. What the Trainer would give is here: gradient accumulation,
bf16 autocast, AdamW, warmup + cosine schedule (transformers' get_cosine_schedule_with_warmup), clipping,
checkpoints every N steps, exact resume, DDP under torchrun, metrics.jsonl and a tqdm bar.

Loss normalisation is global: each optimizer step sums the KD/CE loss over all tokens of all micro-batches on
all ranks and divides by their total count, so N processes give the loss and gradients of one process that
sees the same global batch.

The options are `student.config.TrainConfig` (the student's shape included); what a run directory holds, and
under which names, is `student.run`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from logit_store import KDStream, LogitStore, StoreLoader
from logit_store.faults import crash_point
from logit_store.fingerprint import tokenizer_fingerprint
from student.config import TrainConfig, is_moe_student
from student.losses import DistillLossConfig, distill_loss
from student.router_loss import count_only, expert_usage, router_losses
from student.run import (
    METRICS,
    STUDENT,
    TRAIN_STATE,
    TRAINABLE,
    RunLock,
    RunLockedError,
    append_metrics,
    checkpoint_dir,
    checkpoints,
    final_student_dir,
    is_run,
    load_config,
    remove_temp_checkpoints,
    temp_checkpoint_dir,
    truncate_metrics,
    write_config,
)


class TrainError(ValueError):
    """A training setup that cannot work (tokenizer/store mismatch, bad options)."""


# ================================================================ student construction
def build_model(cfg: TrainConfig) -> nn.Module:
    """The student of the configured kind, trainable parameters initialised from cfg.seed."""
    from student.baselines import build_dense_lora, build_full_finetune
    from student.convert import build_student

    torch.manual_seed(cfg.seed)
    if cfg.student == "moe-lora":
        return build_student(cfg.base, cfg.student_config(), seed=cfg.seed)
    if cfg.student == "lora":
        return build_dense_lora(cfg.base, cfg.rank, cfg.alpha, cfg.lora_dropout, keep=cfg.keep_layers)
    if cfg.student == "full":
        return build_full_finetune(cfg.base, keep=cfg.keep_layers)
    raise TrainError(f"unknown student kind {cfg.student!r}: moe-lora, lora or full")


def check_tokenizer(tokenizer_dir: str, store: LogitStore, model: nn.Module) -> None:
    """The student must speak the store's token ids: same tokenizer, a vocabulary that holds every id.
    Training checks it before the first step, `kdstudent eval` before evaluating: both would otherwise run and
    report numbers that mean nothing."""
    from transformers import AutoTokenizer

    m = store.manifest
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    mine, theirs = tokenizer_fingerprint(tok), m.tokenizer.get("fingerprint")
    if theirs and mine != theirs:
        raise TrainError(f"the student's tokenizer ({tokenizer_dir}, fingerprint {mine}) is not the one the store "
                         f"{store.root} was built with ({m.tokenizer.get('name_or_path')}, fingerprint {theirs}): "
                         "token ids would mean different things. Use a student of the teacher's family.")
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < m.vocab_size:
        raise TrainError(f"the student's vocabulary ({vocab}) is smaller than the store's {store.root} "
                         f"({m.vocab_size}): it cannot score every stored token id")


class DistillStep(nn.Module):
    """Student body + chunked-head KD loss + router losses in one forward, so DDP sees the whole step."""

    def __init__(self, model: nn.Module, loss_cfg: DistillLossConfig):
        super().__init__()
        self.model, self.loss_cfg = model, loss_cfg
        self.is_moe = is_moe_student(model)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.is_moe:
            count_only(self.model, batch["attention_mask"])
        body = self.model.base_model
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        head = self.model.get_output_embeddings()
        loss_sum, metrics = distill_loss(hidden, head.weight, batch, self.loss_cfg, getattr(head, "bias", None))
        aux = torch.zeros((), device=hidden.device)
        if self.is_moe:
            r = router_losses(self.model)
            aux = r.loss
            metrics = dict(metrics, balance=r.balance.detach(), z=r.z.detach())
        return loss_sum, dict(metrics, aux=aux)


# ================================================================ distributed helpers
def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _setup_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on GPU)."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank, world = _dist()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _raise_everywhere(error: Exception | None) -> None:
    """Raise rank 0's error (or None) on every rank, so that no rank waits for peers that have stopped."""
    if _dist()[1] > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def _all_sum(x: float, device: torch.device) -> float:
    if _dist()[1] == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


# ================================================================ checkpoints
def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, step: int, model: nn.Module, opt, sched, loader: StoreLoader,
                    cfg: TrainConfig) -> Path:
    """All ranks call it (reader states are gathered); rank 0 writes `checkpoint-STEP` atomically."""
    from safetensors.torch import save_file

    rank, world = _dist()
    reader = loader.state_dict()
    readers = [None] * world
    if world > 1:
        dist.all_gather_object(readers, reader)
    else:
        readers = [reader]
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    final = checkpoint_dir(run, step)
    if rank == 0:
        tmp = temp_checkpoint_dir(run, step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_trainable_state(model), str(tmp / TRAINABLE))
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs,
                    "readers": readers, "world_size": world}, tmp / TRAIN_STATE)
        write_config(tmp, cfg)
        if is_moe_student(model):
            from student.io import save_student

            save_student(model, tmp / STUDENT, extra={"step": step})
        crash_point("checkpoint-temp", step)  # written, not renamed: a resume starts from the previous checkpoint
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        crash_point("checkpoint-rename", step)  # in place, older ones not yet pruned
        for old in checkpoints(run)[: -cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return final


def _load_trainable(model: nn.Module, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in load_file(str(checkpoint / TRAINABLE)).items():
            params[name].copy_(t)


def load_checkpoint(path: Path, model: nn.Module, opt, sched, loader: StoreLoader) -> int:

    rank, world = _dist()
    state = torch.load(path / TRAIN_STATE, weights_only=False)
    if state["world_size"] != world:
        raise TrainError(f"{path} was written by {state['world_size']} processes, this run has {world}: the "
                         "reader position cannot be resumed exactly; use the same number of processes")
    _load_trainable(model, path)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    try:
        loader.load_state_dict(state["readers"][rank])
    except ValueError as e:
        raise TrainError(f"cannot resume from {path}: {e}") from None
    _set_rng_state(state["rng"][rank])
    return int(state["step"])


# ================================================================ training
def _micro_batches(loader: StoreLoader):
    """Endless batches: epochs follow one another. Every rank has the same number of batches per epoch
    (KDStream deals equal shares), so ranks change epochs in lockstep."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:  # KDStream refuses, when it is made, a store that gives a rank no batch
            raise TrainError(f"the store yields no batch in epoch {loader.stream.epoch - 1}")


def _claim_run(run: Path, cfg: TrainConfig, rank: int) -> RunLock | None:
    """Rank 0 locks the run directory for the whole training and checks that it may start there; on any rank the
    same error if not. Returns the lock (rank 0) to release at the end."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run)
            if not cfg.resume and (checkpoints(run) or (run / METRICS).exists()):
                raise TrainError(f"{run} already holds a run: pass --resume to continue it, or choose a new --out")
        except (RunLockedError, TrainError, OSError) as e:
            error = e
    try:
        _raise_everywhere(error)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training; returns the last metrics line. Rank 0 holds the run directory's lock
    (student.run.RunLock) from before anything is loaded until the end."""
    rank, world, device = _setup_distributed()
    run = Path(cfg.out)
    lock = _claim_run(run, cfg, rank)
    try:
        return _train(cfg, run, rank, world, device)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, run: Path, rank: int, world: int, device: torch.device) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    from student.baselines import count_parameters

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    store = LogitStore.open(cfg.store)
    rows = sum(n for _, _, n in store.units())
    if rows < world * cfg.batch_size:
        raise TrainError(f"the store {cfg.store} has {rows} rows, fewer than one batch for each process: {world} "
                         f"process(es) x --batch-size {cfg.batch_size} = {world * cfg.batch_size} rows. Use a "
                         "smaller --batch-size, fewer processes, or a larger store")
    stream = KDStream(store, cfg.batch_size, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                      rank=rank, world_size=world)
    loader = StoreLoader(stream, num_workers=cfg.num_workers)
    model = build_model(cfg).to(device)
    trainable = count_parameters(model)
    check_tokenizer(cfg.base, store, model)
    if cfg.eval_store:
        check_tokenizer(cfg.base, LogitStore.open(cfg.eval_store), model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    step_module: nn.Module = DistillStep(model, cfg.loss_config())
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    step = 0
    if cfg.resume and checkpoints(run):
        step = load_checkpoint(checkpoints(run)[-1], model, opt, sched, loader)
    if rank == 0:
        if cfg.resume:  # drop what a killed run logged after its last checkpoint (everything, if it wrote none)
            truncate_metrics(run, step)
        remove_temp_checkpoints(run)
        write_config(run, cfg)
        print(f"student {cfg.student}: {trainable}; {world} process(es), global batch "
              f"{cfg.batch_size * cfg.grad_accum * world} rows" + (f"; resuming at step {step}" if step else ""))
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", desc="train", dynamic_ncols=True)
    batches = _micro_batches(loader)
    last: dict = {}
    tokens_seen, start = 0, time.time()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    while step < cfg.max_steps:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        local_tokens = sum(int(b["loss_mask"].sum()) for b in micro)
        global_tokens = _all_sum(local_tokens, device)
        sums = {"kd": 0.0, "ce": 0.0, "balance": 0.0, "z": 0.0}
        for i, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = i == len(micro) - 1 or world == 1
            ctx = step_module.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with autocast:
                    loss_sum, m = step_module(batch)
                # DDP averages gradients over ranks: scale by world to get the global-token mean
                loss = loss_sum * (world / max(global_tokens, 1)) + m["aux"] / len(micro)
                loss.backward()
            for key in ("kd", "ce"):
                sums[key] += float(m[key]) if key in m else 0.0
            for key in ("balance", "z"):
                sums[key] += float(m[key]) / len(micro) if key in m else 0.0
        crash_point("step", step + 1)  # mid-step: gradients computed, weights not yet updated
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 \
            else _grad_norm(params)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += global_tokens
        kd = _all_sum(sums["kd"], device) / max(global_tokens, 1)
        ce = _all_sum(sums["ce"], device) / max(global_tokens, 1)
        last = {"step": step, "epoch": stream.epoch, "loss": cfg.kd_weight * kd + cfg.ce_weight * ce, "kd": kd,
                "ce": ce, "balance": sums["balance"], "z": sums["z"], "lr": sched.get_last_lr()[0],
                "grad_norm": float(grad_norm), "tokens": int(global_tokens),
                "tokens_per_s": tokens_seen / max(time.time() - start, 1e-9)}
        if rank == 0:
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                record = dict(last)
                if is_moe_student(model):
                    record["expert_usage"] = expert_usage(model)
                append_metrics(run, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:,.0f}", refresh=False)
        # evaluate before checkpointing: a checkpoint at step s implies every metrics record up to s is written
        if cfg.eval_store and rank == 0 and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            from student.evaluate import evaluate

            result = evaluate(model, cfg.eval_store, batch_size=cfg.batch_size, max_rows=cfg.eval_rows, device=device,
                              chunk_size=cfg.loss_chunk)
            append_metrics(run, {"step": step, "eval": result})
            model.train()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save_checkpoint(run, step, model, opt, sched, loader, cfg)
    if bar is not None:
        bar.close()
    save_checkpoint(run, step, model, opt, sched, loader, cfg)
    if rank == 0 and is_moe_student(model):
        from student.io import save_student

        save_student(model, final_student_dir(run), extra={"step": step, "train_config": cfg.to_dict()})
    if world > 1:
        dist.barrier()
    return last


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def load_trained(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """The student of a run (any kind, from its newest checkpoint), or a saved MoE-LoRA student directory."""

    run = Path(path)
    if not is_run(run):
        from student.io import load_student

        return load_student(run).to(device)
    cfg = load_config(run)
    found = checkpoints(run)
    if not found:
        raise TrainError(f"{run} has no checkpoint yet")
    model = build_model(cfg)
    _load_trainable(model, found[-1])
    return model.to(device).eval()
