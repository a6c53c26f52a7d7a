"""Run under torchrun by tests/test_distributed.py: a MoE-LoRA student wrapped with FSDP2 under --bf16 computes
its router logits with the fp32 router weights, exactly as the unwrapped student does on the same input."""

import sys

import torch
import torch.nn.functional as F

from student.config import TrainConfig
from student.distributed import apply_fsdp, setup_process_group
from student.moe_lora import MoELoRAMLP
from student.train import DistillStep, build_model


def main(base: str) -> None:
    _, _, device = setup_process_group()
    cfg = TrainConfig(store="unused", base=base, out="unused", keep_layers="0,1", experts=4, rank=8, attn_rank=4,
                      seed=1, bf16=True)
    reference = [m.router.weight.detach().clone() for m in build_model(cfg).modules() if isinstance(m, MoELoRAMLP)]
    model = build_model(cfg)  # the same init (seeded)
    step = DistillStep(model, cfg.loss_config(), cfg.router_loss_config())
    apply_fsdp(step, model, device, bf16=True)
    seen = []
    routers = [m.router for m in model.modules() if isinstance(m, MoELoRAMLP)]
    for router, weight in zip(routers, reference, strict=True):
        def check(module, args, out, weight=weight):
            seen.append((module.weight.dtype, torch.equal(out, F.linear(args[0], weight))))
        router.register_forward_hook(check)
    step.unshard()  # the root's own parameters (embeddings), as its forward would
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.randint(3, 100, (2, 16)))
    assert len(seen) == len(reference) > 0, seen
    assert all(dtype == torch.float32 and same for dtype, same in seen), seen
    print("ok", seen)


if __name__ == "__main__":
    main(sys.argv[1])
