"""Sharded data parallelism for `kdstudent train --sharding fsdp`: FSDP2 wrapping and DCP checkpoints.

The trainer's default is DDP (every process holds the whole student). `--sharding fsdp` wraps the same
`DistillStep` with FSDP2 (`torch.distributed.fsdp.fully_shard`) on a `DeviceMesh` (gloo on CPU, NCCL on CUDA):
one FSDP unit per transformer block, and the root (`DistillStep`: embeddings, final norm, LM head). Gradients
are reduce-scattered (averaged over ranks, like DDP) and the optimizer steps on each rank's shard.

The frozen base (`--fsdp_frozen`):
  shard      (default) the frozen weights are sharded with the rest: per block they are all-gathered before its
             forward, freed after it, and all-gathered again for its backward (the input gradients need them).
             Memory per process is about (base + trainable + optimizer) / N plus one block unsharded: the mode
             for a base that does not fit one device.
  replicate  the frozen weights are `ignored_params`: every process keeps a full copy, nothing of them is
             ever communicated, and only the trainable parameters (adapters, routers) are sharded. Per step
             that all-gathers the adapters only (their bytes, not the base's): the mode for a base that fits
             one device, where DDP's cost is the replicated optimizer state and gradients of a large trainable
             part, or where sharding the frozen base would move gigabytes per step for nothing.
`--fsdp_replicas R` builds a 2-D mesh (R replicas x N/R shards: HSDP): parameters are sharded within groups of
N/R processes (a node) and gradients all-reduced across groups, so the all-gathers stay on the fast links.

Under `--bf16` the policy is MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): parameters (fp32
master copies, sharded) are gathered in bf16 and gradients reduced in fp32, except the MoE routers: each is its
own FSDP unit gathered in fp32, since the router runs in fp32 under autocast too (bf16-rounded router weights
move tokens to other experts). The root does not cast its inputs (the batch carries the teacher's fp32
log-probs).

Checkpoints (`checkpoint-N/dcp/`) are written with torch.distributed.checkpoint: every process writes its own
shard of the trainable parameters and of the optimizer state (`get_model_state_dict` /
`get_optimizer_state_dict`, frozen parameters left out), and `set_state_dict` loads them back, also into a
different sharding of the same number of processes. The reader positions, RNG states, scheduler and step are
gathered to rank 0 and written as for DDP (`train_state.pt`). The last checkpoint also holds the gathered full
trainable state (`trainable.safetensors`, rank 0) so `kdstudent eval`/`export` read it unchanged.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SHARDINGS = ("ddp", "fsdp")
FROZEN_MODES = ("shard", "replicate")
DCP_DIR = "dcp"


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_process_group() -> tuple[int, int, torch.device]:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = rank_world()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def make_mesh(device: torch.device, replicas: int = 1):
    """1-D mesh over all processes, or a 2-D (replicate, shard) mesh for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    _, world = rank_world()
    if replicas < 1 or world % replicas:
        raise ValueError(f"--fsdp_replicas {replicas} must divide the number of processes ({world})")
    if replicas == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def apply_fsdp(step_module: nn.Module, model: nn.Module, device: torch.device, *, frozen: str = "shard",
               bf16: bool = False, replicas: int = 1) -> nn.Module:
    """Shard `step_module` (a DistillStep around `model`) in place: each decoder block, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from student.convert import decoder_layers

    if frozen not in FROZEN_MODES:
        raise ValueError(f"--fsdp_frozen must be one of {FROZEN_MODES}, got {frozen!r}")
    mesh = make_mesh(device, replicas)
    ignored = {p for p in model.parameters() if not p.requires_grad} if frozen == "replicate" else set()
    managed = [p for p in model.parameters() if p not in ignored]
    dtypes = {p.dtype for p in managed}
    if len(dtypes) > 1 and not bf16:
        raise ValueError(f"FSDP gathers the parameters of a unit in one dtype, these have {sorted(map(str, dtypes))}:"
                         " pass --bf16 (gathers them in bf16) or --fsdp_frozen replicate")
    if bf16:
        block_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
    else:
        block_mp = root_mp = MixedPrecisionPolicy()
    # With a replicated base only the (small) trainable parameters are sharded: keep them gathered from the
    # forward to the end of the backward (one all-gather per block and micro-batch instead of two).
    reshard = frozen == "shard"
    if bf16:  # routers stay fp32 (MoELoRAMLP.route): a unit of their own, gathered in fp32
        from student.moe_lora import MoELoRAMLP

        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for layer in model.modules():
            if isinstance(layer, MoELoRAMLP) and layer.router is not None:  # fixed routing has none
                fully_shard(layer.router, mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard)
    for block in decoder_layers(model):
        own = set(block.parameters())
        if own - ignored:
            fully_shard(block, mesh=mesh, mp_policy=block_mp, reshard_after_forward=reshard,
                        ignored_params=own & ignored or None)
    fully_shard(step_module, mesh=mesh, mp_policy=root_mp, ignored_params=ignored or None)
    step_module.kd_keep_gathered = not reshard
    return step_module


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def set_gradient_sync(step_module: nn.Module, sync: bool) -> None:
    """Gradient accumulation: skip the reduce-scatter on all micro-batches but the last one. With a replicated
    base the trainable parameters also stay gathered between micro-batches (gathered once per step)."""
    if is_fsdp(step_module):
        step_module.set_requires_gradient_sync(sync)
        if getattr(step_module, "kd_keep_gathered", False):
            step_module.set_reshard_after_backward(sync)


def to_local_float(t: torch.Tensor) -> float:
    """A (possibly DTensor) scalar as a Python float."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return float(t)


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients without clipping (DTensor-aware)."""
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


# ================================================================ checkpoints
def _options(full: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, full_state_dict=full, cpu_offload=full, strict=strict)


def save_sharded(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the trainable parameters and of the optimizer state into `folder`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model, options=_options()),
             "optim": get_optimizer_state_dict(model, opt, options=_options())}
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load what `save_sharded` wrote (resharding if needed) into the wrapped model and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_state_dict,
    )

    state = {"model": get_model_state_dict(model, options=_options()),
             "optim": get_optimizer_state_dict(model, opt, options=_options())}
    dcp.load(state, checkpoint_id=str(folder))
    # not strict: the frozen parameters are not in a checkpoint (dcp.load above fails on any trainable one missing)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable state gathered on every rank's CPU (all ranks must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(full=True))
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def load_sharded_into_plain(folder: Path, model: nn.Module) -> None:
    """Read the trainable weights of a DCP checkpoint into an unwrapped model, in one process."""
    import torch.distributed.checkpoint as dcp

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params.update({n: b for n, b in model.named_buffers() if n.endswith(".router_bias")})  # MoE selection biases
    state = {"model": {n: torch.empty_like(p.detach()) for n, p in params.items()}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    with torch.no_grad():
        for n, t in state["model"].items():
            params[n].copy_(t)


# ================================================================ measurement
class CommCounter:
    """Bytes through the collectives FSDP2 uses (all-gather of parameters, reduce-scatter of gradients), per
    process; installed by benchmarks. FSDP2 calls `dist.all_gather_single` / `dist.reduce_scatter_single`.
    DDP's bucketed all-reduce runs in C++ and is not seen here (it moves the trainable gradients once a step)."""

    NAMES = ("all_gather_single", "reduce_scatter_single", "all_reduce")

    def __init__(self) -> None:
        self.bytes = {n: 0 for n in self.NAMES}
        self.calls = {n: 0 for n in self.NAMES}
        self._orig: dict = {}

    def install(self) -> CommCounter:
        for name in self.NAMES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _name=name, _orig=orig, **kw):
                # the full (unsharded) side: all-gather's output, reduce-scatter's input, all-reduce's tensor
                if _name == "all_gather_single":
                    t = kw.get("output_tensor", args[0] if args else None)
                elif _name == "reduce_scatter_single":
                    t = kw.get("input", args[1] if len(args) > 1 else None)
                else:
                    t = kw.get("tensor", args[0] if args else None)
                if isinstance(t, torch.Tensor):
                    self.bytes[_name] += t.numel() * t.element_size()
                self.calls[_name] += 1
                return _orig(*args, **kw)

            setattr(dist, name, wrapped)
        return self

    def uninstall(self) -> None:
        for name, orig in self._orig.items():
            setattr(dist, name, orig)
