"""Tiny random causal LMs and a tiny BPE tokenizer, built offline, for the student tests.

Sizes keep head_dim = 32 (vLLM's CPU attention needs >= 32) and everything well under a second to build.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from assets.synthetic import synthetic_corpus, train_tokenizer

VOCAB = 320
EOS = 0  # "<|endoftext|>" in assets.synthetic.train_tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(synthetic_corpus(40), vocab_size=VOCAB)


def llama_config(num_layers: int = 2, **kw) -> LlamaConfig:
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=num_layers,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=EOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


def gpt2_config(num_layers: int = 2, **kw) -> GPT2Config:
    base = dict(
        n_embd=64,
        n_head=2,
        n_layer=num_layers,
        n_positions=256,
        vocab_size=VOCAB,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    base.update(kw)
    return GPT2Config(**base)


def save_tiny_model(out: Path, family: str = "llama", num_layers: int = 2, seed: int = 0, **kw) -> Path:
    """A random tiny model + tokenizer saved as a normal HF directory (fp32 safetensors)."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(llama_config(num_layers, **kw))
    elif family in ("mistral", "qwen2"):  # same shapes as the Llama, through their own config classes
        from transformers import AutoConfig, AutoModelForCausalLM

        shape = {k: v for k, v in llama_config(num_layers).to_diff_dict().items() if k != "model_type"}
        cfg = AutoConfig.for_model(family, **{**shape, **kw})
        model = AutoModelForCausalLM.from_config(cfg)
    elif family == "gpt2":
        model = GPT2LMHeadModel(gpt2_config(num_layers, **kw))
    else:
        raise ValueError(family)
    # Random init of tiny models is near-uniform; widen it so logit comparisons are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.08)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def randomize_adapters(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Stand-in for training: give every LoRA B (and the routers) non-zero values so the student differs from
    its base."""
    from student.moe_lora import MoELoRAMLP

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in model.modules():
            if isinstance(m, MoELoRAMLP):
                for p in (m.in_B, m.out_B):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                if m.router is not None:  # fixed routing (hash, all) has none
                    m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g) * 0.5)


def assert_layer_matches_loop(loop: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor) -> None:
    """`fast` (a MoE-LoRA layer on another expert path, same weights) computes what the autograd `loop` layer
    computes: outputs, the input's gradient and every trainable parameter's gradient (balance loss included)."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = loop(xa), fast(xb)
    torch.testing.assert_close(yb, ya)
    (ya.square().sum() + loop.router_stats.balance).backward()
    (yb.square().sum() + fast.router_stats.balance).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    fast_params = dict(fast.named_parameters())
    for name, p in loop.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast_params[name].grad, p.grad, rtol=1e-4, atol=1e-5)


def loop_and_fast_layers(impl: str, **layer) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama MLP as a MoE-LoRA layer twice, with the same non-zero adapters: the autograd loop (the
    reference) and the expert path `impl`; `layer`: MoELoRAMLP options (default 6 experts, top-2, rank 4)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from student.moe_lora import MoELoRAMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=1))
    layer = dict(dict(num_experts=6, experts_per_token=2, rank=4), **layer)
    loop = MoELoRAMLP(mlp, impl="loop", **layer)
    randomize_adapters(loop)
    fast = MoELoRAMLP(mlp, impl=impl, **layer)
    fast.load_state_dict(loop.state_dict())
    return loop, fast


def sample_ids(batch: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def as_if_killed_after(run: Path, copy: Path, step: int) -> Path:
    """`copy` of a finished `run` as a kill right after logging `step` would leave it: only the checkpoints up to
    `step` and the metrics up to it (the multi-process resume tests make this state without killing torchrun)."""
    import json
    import shutil

    from student.run import read_metrics

    shutil.copytree(run, copy)
    for path in copy.iterdir():
        if path.name == "final" or (path.name.startswith("checkpoint-") and int(path.name.split("-")[1]) > step):
            shutil.rmtree(path)
    kept = [m for m in read_metrics(copy) if m["step"] <= step]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    return copy
