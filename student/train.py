"""`kdstudent train`: distil a student from a logit store, on one process or many (torchrun), resumably.

A plain loop rather than transformers' Trainer: the loss needs the model body's hidden states and a chunked LM
head (never [batch, seq, vocab] logits), and the reader's position is part of a checkpoint; both fight the
Trainer's compute_loss/sampler/resume machinery. What the Trainer would give is here: gradient accumulation,
bf16 autocast, AdamW, warmup + cosine schedule (transformers' get_cosine_schedule_with_warmup), clipping,
checkpoints every N steps, exact resume, DDP or FSDP2 under torchrun (`--sharding`; student/distributed.py),
metrics.jsonl and a tqdm bar.

Loss normalisation is global: each optimizer step sums the KD/CE loss over all tokens of all micro-batches on
all ranks and divides by their total count, so N processes give the loss and gradients of one process that
sees the same global batch.

The options are `student.config.TrainConfig` (the student's shape included); what a run directory holds, and
under which names, is `student.run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from logit_store.model_logits import logit_transform
from logit_store.plan import check_store_for_model, open_stores
from student import distributed
from student.config import RouterLossConfig, TrainConfig, is_moe_student
from student.losses import DistillLossConfig, distill_loss
from student.router_loss import (
    count_only,
    expert_loads,
    expert_usage,
    router_losses,
    routing_metrics,
    update_router_bias,
)
from student.run import (
    METRICS,
    STUDENT,
    TRAIN_STATE,
    TRAINABLE,
    MetricsLog,
    RunLock,
    RunLockedError,
    check_output,
    check_resume,
    checkpoint_dir,
    checkpoints,
    final_student_dir,
    is_run,
    load_config,
    remove_temp_checkpoints,
    state_fingerprint,
    student_snapshot,
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

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.base_dtype)
    if dtype is None:
        raise TrainError(f"--base_dtype {cfg.base_dtype!r}: float32 or bfloat16")
    if dtype != torch.float32 and cfg.student == "full":
        raise TrainError("--student full trains every weight, which needs fp32 master weights (bf16 weights lose "
                         "AdamW updates smaller than their rounding step): use --base_dtype float32 with --bf16 "
                         "(autocast; under --sharding fsdp the weights are also gathered in bf16)")
    if dtype != torch.float32 and not cfg.bf16:
        raise TrainError("--base_dtype bfloat16 computes the base in bf16: pass --bf16 too, so the fp32 adapters' "
                         "products run under the same autocast")
    torch.manual_seed(cfg.seed)
    if cfg.student == "moe-lora":
        model = build_student(cfg.base, cfg.student_config(), seed=cfg.seed, dtype=dtype)
    elif cfg.student == "lora":
        model = build_dense_lora(cfg.base, cfg.rank, cfg.alpha, cfg.lora_dropout, keep=cfg.keep_layers, dtype=dtype,
                                 lora_scaling=cfg.lora_scaling, train_base=cfg.train_base)
    elif cfg.student == "full":
        if cfg.train_base:
            raise TrainError("--train_base adds the base's weights to a student's adapters; --student full has no "
                             "adapters and already trains every weight: drop --train_base")
        model = build_full_finetune(cfg.base, keep=cfg.keep_layers)
    else:
        raise TrainError(f"unknown student kind {cfg.student!r}: moe-lora, lora or full")
    for p in model.parameters():  # peft creates LoRA factors in the base's dtype: train them in fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


# shape options that change no trained weight's meaning: a run may start from a student trained with others
INIT_FREE = ("lora_dropout", "router_init_std", "expert_impl")


def init_from_run(model: nn.Module, cfg: TrainConfig) -> None:
    """--init-from: this run's student starts as another run's trained student (the state `kdstudent eval` reads),
    so that it computes exactly what that student computed; refused, naming each, when the runs differ in student
    kind, base or a shape option (a LoRA's scale or the routing would change what the copied weights mean)."""
    from student.config import MoELoRAConfig

    source = Path(cfg.init_from)
    if not is_run(source):
        raise TrainError(f"--init-from {source}: not a training run (no {source / 'train_config.json'})")
    was = load_config(source)
    names = ["student", *(f.name for f in dataclasses.fields(MoELoRAConfig) if f.name not in INIT_FREE)]
    differ = [f"--{name.replace('_', '-')}: {source} has {getattr(was, name)!r}, this run {getattr(cfg, name)!r}"
              for name in names if getattr(was, name) != getattr(cfg, name)]
    if os.path.realpath(was.base) != os.path.realpath(cfg.base):
        differ.append(f"--base: {source} has {was.base}, this run {cfg.base}")
    if differ:
        raise TrainError(f"--init-from {source} trained another student than this run builds: {'; '.join(differ)}")
    trained = load_trained(source)
    state = {**dict(trained.named_parameters()), **dict(trained.named_buffers())}
    with torch.no_grad():
        for name, t in [*((n, p) for n, p in model.named_parameters() if p.requires_grad), *model.named_buffers()]:
            t.copy_(state[name])


def check_tokenizer(tokenizer_dir: str, store: LogitStore, model: nn.Module, cross_tokenizer: str | None = None):
    """`plan.check_store_for_model` with the tokenizer of `tokenizer_dir` and the model's LM head: training checks
    it before the first step, `kdstudent eval` before evaluating. With `cross_tokenizer` a store of another
    tokenizer passes (it is then read as text). Returns the tokenizer."""
    from transformers import AutoTokenizer

    vocab = model.get_output_embeddings().weight.shape[0]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    try:
        check_store_for_model(store, tokenizer, vocab, tokenizer_dir, cross_tokenizer)
    except ValueError as e:
        raise TrainError(str(e)) from None
    return tokenizer


class DistillStep(nn.Module):
    """Student body + chunked-head KD loss + router losses in one forward, so DDP sees the whole step."""

    def __init__(self, model: nn.Module, loss_cfg: DistillLossConfig, router_cfg: RouterLossConfig | None = None):
        super().__init__()
        self.model, self.loss_cfg, self.router_cfg = model, loss_cfg, router_cfg or RouterLossConfig()
        self.is_moe = is_moe_student(model)
        self.logit_transform = logit_transform(model)  # the logits the student serves (Granite scaling, softcap, ...)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.is_moe:
            count_only(self.model, batch["attention_mask"])
        body = self.model.base_model
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        head = self.model.get_output_embeddings()
        loss_sum, metrics = distill_loss(hidden, head.weight, batch, self.loss_cfg, getattr(head, "bias", None),
                                         self.logit_transform)
        aux = torch.zeros((), device=hidden.device)
        if self.is_moe:
            r = router_losses(self.model, self.router_cfg)
            aux = r.loss
            metrics = dict(metrics, balance=r.balance.detach(), z=r.z.detach())
        return loss_sum, dict(metrics, aux=aux)


# ================================================================ distributed helpers
_dist = distributed.rank_world
_setup_distributed = distributed.setup_process_group


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
    """Trainable parameters, and the router selection biases (buffers that --router_bias_update moves)."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu().contiguous() for n, b in model.named_buffers() if n.endswith(".router_bias")})
    return state


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
                    cfg: TrainConfig, final: bool = True) -> Path:
    """All ranks call it (reader states are gathered); rank 0 writes `checkpoint-STEP` atomically.

    Under FSDP every rank also writes its shards (`dcp/`), and the gathered full trainable state
    (`trainable.safetensors`, `student/`) is written only for the `final` checkpoint."""
    from safetensors.torch import save_file

    rank, world = _dist()
    sharded = cfg.sharding == "fsdp" and world > 1
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
    done = checkpoint_dir(run, step)
    tmp = temp_checkpoint_dir(run, step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    full = None
    if sharded:
        dist.barrier()  # tmp exists for every rank
        distributed.save_sharded(tmp / distributed.DCP_DIR, model, opt)
        if final:  # what _trainable_state holds: trainable parameters and router selection biases
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            keep |= {n for n, _ in model.named_buffers() if n.endswith(".router_bias")}
            full = {k: v for k, v in distributed.full_trainable_state(model).items() if k in keep}
    elif rank == 0:
        full = _trainable_state(model)
    if rank == 0:
        if full is not None:
            save_file(full, str(tmp / TRAINABLE))
        state = {"step": step, "scheduler": sched.state_dict(), "rng": rngs, "readers": readers,
                 "world_size": world, "sharding": "fsdp" if sharded else "ddp"}
        if not sharded:
            state["optimizer"] = opt.state_dict()
        torch.save(state, tmp / TRAIN_STATE)
        write_config(tmp, cfg)
        if is_moe_student(model) and full is not None:
            from student.io import save_student

            with _full_weights(model, full):
                save_student(model, tmp / STUDENT, extra={"step": step})
        crash_point("checkpoint-temp", step)  # written, not renamed: a resume starts from the previous checkpoint
        shutil.rmtree(done, ignore_errors=True)
        os.replace(tmp, done)
        crash_point("checkpoint-rename", step)  # in place, older ones not yet pruned
        for old in checkpoints(run)[: -cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return done


@contextlib.contextmanager
def _full_weights(model: nn.Module, full: dict[str, torch.Tensor]):
    """Temporarily show gathered full tensors in place of (sharded) trainable parameters, for writers that read
    `model.named_parameters()` (save_student)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        yield
        return
    saved = {}
    for name, t in full.items():
        owner, _, leaf = name.rpartition(".")
        mod = model.get_submodule(owner)
        if leaf not in mod._parameters:  # a buffer (router_bias): FSDP leaves those whole on every process
            continue
        saved[name] = (mod, leaf, mod._parameters[leaf])
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=True)
    try:
        yield
    finally:
        for mod, leaf, p in saved.values():
            mod._parameters[leaf] = p


def _load_trainable(model: nn.Module, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    if not (checkpoint / TRAINABLE).is_file() and (checkpoint / distributed.DCP_DIR).is_dir():
        distributed.load_sharded_into_plain(checkpoint / distributed.DCP_DIR, model)
        return
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, t in load_file(str(checkpoint / TRAINABLE)).items():
            params[name].copy_(t)


def load_checkpoint(path: Path, model: nn.Module, opt, sched, loader: StoreLoader) -> int:

    rank, world = _dist()
    state = torch.load(path / TRAIN_STATE, weights_only=False)
    if state["world_size"] != world:
        raise TrainError(f"{path} was written by {state['world_size']} processes, this run has {world}: the "
                         "reader position cannot be resumed exactly; use the same number of processes")
    sharded = any(distributed.is_fsdp(m) for m in model.modules())
    if state.get("sharding", "ddp") != ("fsdp" if sharded else "ddp"):
        raise TrainError(f"{path} was written with --sharding {state.get('sharding', 'ddp')}: resume it with the "
                         "same --sharding")
    if sharded:
        distributed.load_sharded(path / distributed.DCP_DIR, model, opt)
    else:
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
    """Rank 0 checks that --out is apart from every input (before the lock creates it), locks the run directory
    for the whole training and checks that it may start there (a --resume: with the run's settings); on any rank
    the same error if not. Returns the lock (rank 0) to release at the end."""
    lock, error = None, None
    if rank == 0:
        try:
            paths, _ = cfg.store_weights()
            try:
                check_output(run, [("--base", cfg.base), *(("--store", p) for p in paths),
                                   ("--eval-store", cfg.eval_store)])
            except ValueError as e:
                raise TrainError(str(e)) from None
            lock = RunLock(run)
            if not cfg.resume and (checkpoints(run) or (run / METRICS).exists()):
                raise TrainError(f"{run} already holds a run: pass --resume to continue it, or choose a new --out")
            if cfg.resume:
                try:
                    check_resume(run, cfg)
                except ValueError as e:
                    raise TrainError(str(e)) from None
        except (RunLockedError, TrainError, OSError) as e:
            error = e
    try:
        _raise_everywhere(error)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: the trainable parameters at --lr, except the MoE routers at
    --lr × --router_lr_scale (one group, as before, when the scale is 1; group 0 is always the adapters')."""
    from student.convert import moe_modules

    routers = [m.router.weight for m in moe_modules(model) if m.router is not None]  # fixed routing: none
    ids = {id(w) for w in routers}
    rest = [p for p in model.parameters() if p.requires_grad and (cfg.router_lr_scale == 1 or id(p) not in ids)]
    groups = [{"params": rest, "lr": cfg.lr}]
    if cfg.router_lr_scale != 1 and routers:
        groups.append({"params": [w for w in routers if w.requires_grad], "lr": cfg.lr * cfg.router_lr_scale})
    return groups


def _sum_loads(loads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Per-layer expert loads summed over all processes (so every process moves its router biases alike)."""
    if _dist()[1] == 1 or not loads:
        return loads
    flat = torch.cat(loads).to(device)
    dist.all_reduce(flat)
    return list(flat.split([len(x) for x in loads]))


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MB in the process (M_MMAP_THRESHOLD) and trim the heap
    only past 1 GiB of free top (M_TRIM_THRESHOLD). By default every activation-sized CPU tensor is a fresh mmap
    that the kernel zero-fills page by page on first touch, then unmaps when freed, over and over each step.
    Measured on 2 threads (docs/PERFORMANCE.md): MoE-LoRA layer fwd+bwd 188 -> 138 ms, dense MLP 82 -> 77 ms; the
    numbers computed do not change. The process keeps its peak heap instead of returning it between steps (what
    the CUDA caching allocator does on GPU). False where there is no glibc (nothing changed)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl), or no mallopt
        return False


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training; returns the last metrics line. Rank 0 holds the run directory's lock
    (student.run.RunLock) from before anything is loaded until the end."""
    retain_freed_memory()
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
    paths, weights = cfg.store_weights()
    try:  # stores that cannot be mixed, a weight that gives a store no row
        stream = KDStream(paths, cfg.batch_size, weights=weights, mix_by=cfg.mix_by, shuffle=cfg.shuffle,
                          shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, rank=rank, world_size=world)
    except ValueError as e:
        raise TrainError(str(e)) from None
    stores = stream.stores
    if stream.rows < world * cfg.batch_size:
        raise TrainError(f"the store(s) {', '.join(paths)} hold {stream.rows} rows, fewer than one batch for each "
                         f"process: {world} process(es) x --batch-size {cfg.batch_size} = {world * cfg.batch_size} "
                         "rows. Use a smaller --batch-size, fewer processes, or a larger store")
    loader = StoreLoader(stream, num_workers=cfg.num_workers)
    model = build_model(cfg).to(device)
    if cfg.init_from:
        init_from_run(model, cfg)
    trainable = count_parameters(model)
    for store in stores:
        tokenizer = check_tokenizer(cfg.base, store, model, cfg.cross_tokenizer)
    if cfg.eval_store:
        check_tokenizer(cfg.base, LogitStore.open(cfg.eval_store), model, cfg.cross_tokenizer)
    if cfg.cross_tokenizer:  # rows read as text and tokenized by the student, in the DataLoader workers
        from student.cross_tokenizer import collator_for

        try:
            stream.collate_fn = collator_for(stores[0], tokenizer)
        except ValueError as e:
            raise TrainError(f"--cross-tokenizer: {e}") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    step_module: nn.Module = DistillStep(model, cfg.loss_config(), cfg.router_loss_config())
    if cfg.sharding not in distributed.SHARDINGS:
        raise TrainError(f"--sharding {cfg.sharding!r}: one of {distributed.SHARDINGS}")
    fsdp = cfg.sharding == "fsdp" and world > 1
    if fsdp:
        try:
            distributed.apply_fsdp(step_module, model, device, frozen=cfg.fsdp_frozen, bf16=cfg.bf16,
                                   replicas=cfg.fsdp_replicas)
        except ValueError as e:
            raise TrainError(str(e)) from e
    elif world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bias_step = cfg.router_bias_update if is_moe_student(model) else 0.0
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    step = 0
    if cfg.resume and checkpoints(run):
        peaks = list(sched.base_lrs)  # this run's --lr (per group); the checkpoint restores the run's old peaks
        step = load_checkpoint(checkpoints(run)[-1], model, opt, sched, loader)
        _resume_schedule(opt, sched, peaks)
    if rank == 0:
        if cfg.resume:  # drop what a killed run logged after its last checkpoint (everything, if it wrote none)
            truncate_metrics(run, step)
        remove_temp_checkpoints(run)
        write_config(run, cfg)
        log = MetricsLog(run, cfg.report_to, step)
        print(f"student {cfg.student}: {trainable}; {world} process(es), global batch "
              f"{cfg.batch_size * cfg.grad_accum * world} rows" + (f"; resuming at step {step}" if step else ""))
        if len(stores) > 1:
            print("mixture (share of the loss positions, of the tokens; rows per epoch of the mixture): " + ", ".join(
                f"{path} {share:.1%}, {tokens:.1%} ({n:,})" for path, share, tokens, n in
                zip(paths, stream.position_share, stream.token_share, stream.epoch_rows, strict=True)))
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
        sums = {"kd": 0.0, "ce": 0.0, "balance": 0.0, "z": 0.0, "aligned": 0.0}
        loads = None  # per MoE layer, the step's expert loads (for --router_bias_update)
        for i, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = i == len(micro) - 1 or world == 1
            if fsdp:
                distributed.set_gradient_sync(step_module, sync)
                ctx = contextlib.nullcontext()
            else:
                ctx = step_module.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with autocast:
                    loss_sum, m = step_module(batch)
                if bias_step:
                    now = expert_loads(model)
                    loads = now if loads is None else [a + b for a, b in zip(loads, now, strict=True)]
                # DDP and FSDP average gradients over ranks: scale by world to get the global-token mean
                loss = loss_sum * (world / max(global_tokens, 1)) + m["aux"] / len(micro)
                loss.backward()
            for key in ("kd", "ce", "aligned"):
                sums[key] += float(m[key]) if key in m else 0.0
            for key in ("balance", "z"):
                sums[key] += float(m[key]) / len(micro) if key in m else 0.0
        crash_point("step", step + 1)  # mid-step: gradients computed, weights not yet updated
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 \
            else _grad_norm(params)
        opt.step()
        if bias_step:  # DeepSeek-V3 balancing: after the step, the selection biases move towards balance
            update_router_bias(model, bias_step, _sum_loads(loads, device))
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += global_tokens
        kd = _all_sum(sums["kd"], device) / max(global_tokens, 1)
        ce = _all_sum(sums["ce"], device) / max(global_tokens, 1)
        last = {"step": step, "epoch": stream.epoch, "loss": cfg.kd_weight * kd + cfg.ce_weight * ce, "kd": kd,
                "ce": ce, "balance": sums["balance"], "z": sums["z"], "lr": sched.get_last_lr()[0],
                "grad_norm": distributed.to_local_float(grad_norm), "tokens": int(global_tokens),
                "tokens_per_s": tokens_seen / max(time.time() - start, 1e-9)}
        if cfg.cross_tokenizer:  # the share of the loss positions that got KD (the rest: CE only)
            last["aligned"] = _all_sum(sums["aligned"], device) / max(global_tokens, 1)
        if rank == 0:
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                record = dict(last)
                if is_moe_student(model):
                    record["expert_usage"] = expert_usage(model)
                    record["routing"] = routing_metrics(model)
                log.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:,.0f}", refresh=False)
        # evaluate before checkpointing: a checkpoint at step s implies every metrics record up to s is written
        due = cfg.eval_store and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps)
        if due and (rank == 0 or fsdp):  # a sharded model evaluates on every rank (its gathers are collective)
            from student.evaluate import evaluate

            if fsdp:
                step_module.unshard()  # the root's parameters (embeddings, head); blocks gather in their hooks
            result = evaluate(model, cfg.eval_store, batch_size=cfg.batch_size, max_rows=cfg.eval_rows, device=device,
                              chunk_size=cfg.loss_chunk, tokenizer=tokenizer)
            if fsdp:
                step_module.reshard()
            if rank == 0:
                log.append({"step": step, "eval": result})
            model.train()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save_checkpoint(run, step, model, opt, sched, loader, cfg, final=False)
    if bar is not None:
        bar.close()
    if rank == 0:
        log.close()
    final = save_checkpoint(run, step, model, opt, sched, loader, cfg)
    if rank == 0 and is_moe_student(model):
        from safetensors.torch import load_file

        from student.io import save_student

        with _full_weights(model, load_file(str(final / TRAINABLE))):
            save_student(model, final_student_dir(run), extra={"step": step, "train_config": cfg.to_dict()})
    if world > 1:
        dist.barrier()
    return last


def _resume_schedule(opt, sched, peaks: list[float]) -> None:
    """After a resume, the schedule of this run's settings: its --lr as the peak and its --max-steps (both may change
    on --resume; the lambdas are this run's, the checkpoint restores only their step), the learning rate of the
    next step set from them as the scheduler's last step would have. With unchanged settings the same numbers."""
    sched.base_lrs = list(peaks)
    for group, peak, factor in zip(opt.param_groups, peaks, sched.lr_lambdas, strict=True):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]


def _grad_norm(params) -> torch.Tensor:
    grads = [p for p in params if p.grad is not None]
    return distributed.grad_norm(grads) if grads else torch.zeros(())


def load_trained(path: str | os.PathLike, device: torch.device | str = "cpu",
                 base: str | os.PathLike | None = None) -> nn.Module:
    """The student of a run (any kind; the state `student.run.student_snapshot` names, also an FSDP checkpoint
    written before the run's end), or a saved MoE-LoRA student directory; `base`: the base's directory if it moved
    since training."""
    from student.io import load_student

    run = Path(path)
    if not is_run(run):
        return load_student(run, base_path=base).to(device)
    snapshot = student_snapshot(run)
    if not ((snapshot / TRAINABLE).is_file() or (snapshot / distributed.DCP_DIR).is_dir()):
        return load_student(snapshot / STUDENT, base_path=base).to(device)  # final/ alone: its saved student
    cfg = load_config(run)
    if base is not None:
        cfg = dataclasses.replace(cfg, base=str(base))
    model = build_model(cfg)
    _load_trainable(model, snapshot)
    return model.to(device).eval()


def evaluate_trained(model_path: str, stores: list[str], batch_size: int = 8, max_rows: int | None = None,
                     device: torch.device | str = "cpu") -> dict:
    """`kdstudent eval`: a run's student (or a saved student) on each store and pooled (`evaluate_stores`), after
    the check training makes, that the student speaks every store's token ids (its base's tokenizer, a vocabulary
    that holds every stored id)."""
    from student.config import student_spec
    from student.evaluate import evaluate_stores, rouge_l
    from student.run import is_run, load_config

    opened = open_stores(list(stores))  # a store listed twice (`S`, `./S`) is refused, not counted twice
    model = load_trained(model_path, device)
    base = load_config(model_path).base if is_run(model_path) else student_spec(model).base_path
    for store in opened:  # a store of another tokenizer is read as text (bits per byte, alignment)
        tokenizer = check_tokenizer(base, store, model, cross_tokenizer="gold")
    result = evaluate_stores(model, list(stores), batch_size=batch_size, max_rows=max_rows, device=device,
                             tokenizer=tokenizer)
    fingerprint = None  # of the evaluated student's state: hashed once, when a store holds rollouts
    for name, store in zip(stores, opened, strict=True):
        report = result["stores"][name]
        if "rollouts" in store.manifest.input:
            fingerprint = fingerprint or state_fingerprint(
                student_snapshot(model_path) if is_run(model_path) else Path(model_path))
            report["rollouts"] = rollouts_policy(store.manifest.input["rollouts"], fingerprint)
        if store.manifest.sequence.get("generate"):  # the teacher's own responses: the student's, compared
            rouge = rouge_l(model, tokenizer, store, max_rows, device)
            for domain, metrics in rouge.pop("domains", {}).items():
                report["domains"][domain] |= metrics
            report |= rouge
    return result


def rollouts_policy(rollouts: dict, fingerprint: str) -> dict:
    """Whether a store's rollouts are the samples of the evaluated student (its `state_fingerprint`) at temperature
    1 and top-p 1, the case in which `reverse_kl` estimates KL(student || teacher) (else it is
    E_q[log p_s - log p_t] under the policy and sampling that drew them)."""
    sampling = rollouts["sampling"]
    own = rollouts["policy"]["fingerprint"] == fingerprint
    exact = sampling["temperature"] == 1 and sampling["top_p"] == 1
    return {"policy": rollouts["policy"]["fingerprint"], "own_samples": own, "untempered": exact,
            "estimates": "KL(student || teacher)" if own and exact else
            "E_q[log p_student - log p_teacher], q = the policy and sampling that drew the rollouts"}
