"""One-shot GPU check: capture, training throughput and memory, the MoE fast path, the chunked loss, bf16 numerics.

    python -m benchmarks.gpu_check [--json benchmarks/results/gpu_check.json]   # on a GPU node, ~4-5 min
    python -m benchmarks.gpu_check --dry-run                                    # tiny sizes on CPU, < 1 min

Built for a bare machine: torch (CUDA), transformers, peft, pyarrow, numpy, safetensors, tqdm; no network, no
vllm, no `datasets`, no real teacher. Models are random-init from published configs (SmolLM2-135M and a
Llama-3.2-1B-shaped model), the tokenizer is a small BPE trained offline on generated text (its vocabulary is
smaller than the models'; its fingerprint goes into the store manifest as `kdstudent train` requires), and the
store is captured from random token rows by the hf teacher backend (`HFTeacher` -> `ShardWriter`).

Measurements, most important first (each in its own try/except: a failure is recorded in the JSON, not fatal;
a global time budget skips what no longer fits; the JSON is rewritten after every item):
  env            torch / CUDA / device
  capture        hf-backend capture tokens/s (teacher forward + top-k + tail) and store-write tokens/s
  moe_layer      one MoE-LoRA MLP (SmolLM2 shapes, 8 experts, top-2, rank 16, bf16 base): fwd+bwd ms of the
                 dense MLP, the loop and the grouped GEMM; grouped-vs-loop max difference; host-sync check
  train_<model>_<student>  the real `student.train.train()` for a few steps at bf16: steady tokens/s (from
                 metrics.jsonl, warm-up steps excluded) and peak GPU memory; students: moe-lora with the
                 grouped GEMM, moe-lora with the per-expert loop, dense LoRA (all at --base_dtype bfloat16),
                 full fine-tune (fp32 master weights + bf16 autocast)
  fsdp_<model>   `kdstudent train --sharding fsdp --bf16 --base-dtype bfloat16` under torchrun (1 process, NCCL),
                 killed after its middle checkpoint and resumed: tokens/s, loss difference to the uninterrupted run,
                 the final student read back
  loss_memory    chunked KD loss vs dense [B, T, V] logits, peak memory and time, vocab 49,152 and 151,936
  bf16_agreement loss and gradients of one MoE-LoRA step: fp32 vs bf16 autocast vs bf16 base (grouped)
  full_1b        full fine-tune of the 1B model with the trainer's pieces (DistillStep + AdamW; the real
                 trainer would write a 15 GB checkpoint at the end), tokens/s and peak memory

Never asserts; the table at the end and the JSON say what worked.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; never wait on a network that is not there
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ================================================================ sizes
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY_A = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=256)
TINY_B = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256)

SIZES = {
    "full": dict(small=("smollm2-135m", SMOLLM2_135M), large=("llama-1b", LLAMA_1B), seq=512, capture_rows=256,
                 k=64, batch=8, steps=6, warmup=2, layer_tokens=4096, layer_shape=(576, 1536), layer_reps=10,
                 loss_batch=4, loss_seq=2048, loss_vocabs=((49152, 576), (151936, 896)), experts=8, rank=16),
    "tiny": dict(small=("tiny-a", TINY_A), large=("tiny-b", TINY_B), seq=32, capture_rows=32, k=16, batch=4,
                 steps=2, warmup=1, layer_tokens=256, layer_shape=(64, 128), layer_reps=2, loss_batch=2,
                 loss_seq=64, loss_vocabs=((4096, 64), (8192, 64)), experts=4, rank=8),
}
# rough seconds each item needs at full size on one H100 (an item is skipped when less than this is left)
ESTIMATE_S = {"capture": 25, "moe_layer": 15, "train": 25, "fsdp": 60, "train_large": 40, "loss_memory": 25,
              "bf16_agreement": 15, "full_1b": 45}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ================================================================ context
class Check:
    def __init__(self, args):
        self.args = args
        self.size = SIZES[args.sizes]
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.results: dict = {}
        self.out = {"env": env_info(self.device), "sizes": args.sizes, "dry_run": args.dry_run,
                    "budget_s": args.budget_s, "size_config": _jsonable(self.size), "results": self.results}
        self.models: dict[str, Path] = {}
        self.store: str | None = None

    def require_store(self) -> str:
        """The captured store; the items that train or read it fail without one."""
        if self.store is None:
            raise RuntimeError("no store (the capture step failed)")
        return self.store

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.start)

    def save(self) -> None:
        self.out["elapsed_s"] = round(time.time() - self.start, 1)
        if self.args.json:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
            tmp = self.args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(_jsonable(self.out), f, indent=1)
            os.replace(tmp, self.args.json)

    def run(self, name: str, fn, estimate: str | None = None, *a, **kw) -> dict | None:
        only = [o for o in self.args.only.split(",") if o]
        if only and not any(name.startswith(o) for o in only):
            return None
        need = ESTIMATE_S.get(estimate or name, 10) * (1.0 if self.args.sizes == "full" else 0.05)
        if self.left() < need:
            self.results[name] = {"skipped": f"time budget: {self.left():.0f} s left, needs ~{need:.0f} s"}
            log(f"{name}: skipped (budget)")
            self.save()
            return None
        log(f"{name} ...")
        t0 = time.time()
        try:
            res = fn(self, *a, **kw)
            res["wall_s"] = round(time.time() - t0, 2)
            log(f"{name}: {_short(res)}")
        except Exception as e:  # recorded, never fatal
            res = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:],
                   "wall_s": round(time.time() - t0, 2)}
            log(f"{name}: FAILED {res['error'][:300]}")
        finally:
            self.free()
        self.results[name] = res
        self.save()
        return res

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> int:
        if not self.cuda:
            return 0
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_gib(self, base: int = 0) -> float | None:
        if not self.cuda:
            return None
        self.sync()
        return round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)


def env_info(device: torch.device) -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device), "cuda": torch.version.cuda, "grouped_mm": hasattr(torch, "_grouped_mm")}
    try:
        import peft

        info["peft"] = peft.__version__
    except Exception as e:  # pragma: no cover - reported, not fatal
        info["peft"] = f"unavailable: {e}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _short(res: dict) -> str:
    keys = [k for k in res if k not in ("traceback", "per_step_s", "losses")]
    return ", ".join(f"{k}={res[k]}" for k in keys[:10])


# ================================================================ setup: tokenizer, models, store
def make_tokenizer(ctx: Check):
    from assets.synthetic import synthetic_corpus, train_tokenizer

    return train_tokenizer(synthetic_corpus(200, seed=0), vocab_size=512)


def make_models(ctx: Check) -> dict:
    """Random-init models saved (bf16 safetensors) with the offline tokenizer, as `train()` loads them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(ctx)
    out = {}
    for name, shape in (ctx.size["small"], ctx.size["large"]):
        folder = ctx.work / name
        t0 = time.time()
        torch.manual_seed(0)
        cfg = LlamaConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=1)
        with torch.device(ctx.device):
            model = LlamaForCausalLM(cfg)
        model.to(torch.bfloat16).save_pretrained(folder)
        tok.save_pretrained(folder)
        n = sum(p.numel() for p in model.parameters())
        del model
        ctx.free()
        ctx.models[name] = folder
        out[name] = {"params": n, "build_s": round(time.time() - t0, 2)}
    out["tokenizer_vocab"] = len(tok)
    return out


def capture(ctx: Check, model_name: str, rows_n: int, write: bool) -> dict:
    """The hf backend on random token rows: teacher forward + top-k + exact tail, then ShardWriter."""
    from transformers import AutoTokenizer

    from logit_store import Manifest, ShardWriter, StoreRow, TargetSpec
    from logit_store.fingerprint import describe_tokenizer
    from logit_store.teachers.hf import HFTeacher

    folder = str(ctx.models[model_name])
    seq, k = ctx.size["seq"], ctx.size["k"]
    teacher = HFTeacher.from_pretrained(folder, dtype="bfloat16", device=str(ctx.device))
    rng = np.random.default_rng(0)
    ids = [rng.integers(2, teacher.vocab_size, seq) for _ in range(rows_n)]
    mask = np.ones(seq, bool)
    mask[0] = False
    rows = [(r, mask) for r in ids]
    teacher.topk(rows[: max(1, rows_n // 16)], k)  # warm-up (kernels, allocator)
    ctx.sync()
    t0 = time.perf_counter()
    targets = teacher.topk(rows, k)
    ctx.sync()
    t_teacher = time.perf_counter() - t0
    tokens = rows_n * (seq - 1)
    res = {"teacher": model_name, "rows": rows_n, "seq": seq, "k": k, "vocab": teacher.vocab_size,
           "teacher_tokens_per_s": round(tokens / t_teacher), "teacher_s": round(t_teacher, 3)}
    if write:
        tok = AutoTokenizer.from_pretrained(folder)
        manifest = Manifest(target=TargetSpec("topk", k=k), vocab_size=teacher.vocab_size, teacher=teacher.describe(),
                            tokenizer=describe_tokenizer(tok, folder))
        path = str(ctx.work / "store")
        t0 = time.perf_counter()
        with ShardWriter(path, manifest, batch_tokens=seq * ctx.size["batch"]) as w:
            for i, (r, t) in enumerate(zip(ids, targets, strict=True)):
                w.write(StoreRow(r, mask, t, i))
        t_write = time.perf_counter() - t0
        ctx.store = path
        res.update(write_tokens_per_s=round(tokens / t_write), write_s=round(t_write, 3),
                   capture_tokens_per_s=round(tokens / (t_teacher + t_write)),
                   store_bytes=sum(f.stat().st_size for f in Path(path).iterdir()))
    del teacher
    return res


# ================================================================ the MoE layer
def moe_layer(ctx: Check) -> dict:
    """Dense MLP vs MoE-LoRA loop vs grouped, bf16 base under autocast, fwd+bwd; agreement and host syncs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from student.moe_lora import MoELoRAMLP

    hidden, inter = ctx.size["layer_shape"]
    n, dev = ctx.size["layer_tokens"], ctx.device
    torch.manual_seed(0)
    base = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=1))
    base.requires_grad_(False)
    experts, rank = ctx.size["experts"], ctx.size["rank"]
    layers = {impl: MoELoRAMLP(base, experts, 2, rank, alpha=2 * rank, impl=impl) for impl in ("loop", "grouped")}
    with torch.no_grad():
        ref = layers["loop"]
        ref.in_B.normal_(std=0.01)
        ref.out_B.normal_(std=0.01)
        ref.router.weight.normal_(std=0.5)
    layers["grouped"].load_state_dict(ref.state_dict())
    base.to(dev, torch.bfloat16)
    for m in layers.values():
        m.to(dev)
    x = torch.randn(n // 512 if n >= 512 else 1, min(n, 512), hidden, device=dev, dtype=torch.bfloat16)
    variants = {"dense": base, "moe-loop": layers["loop"], "moe-grouped": layers["grouped"]}

    def step(mod):
        xi = x.detach().requires_grad_()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            y = mod(xi)
        y.float().square().mean().backward()
        for p in mod.parameters():
            p.grad = None
        return y

    times = {k: [] for k in variants}
    for i in range(2 + ctx.size["layer_reps"]):
        for name, mod in variants.items():
            ctx.sync()
            t0 = time.perf_counter()
            step(mod)
            ctx.sync()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    res = {"hidden": hidden, "intermediate": inter, "tokens": x.shape[0] * x.shape[1], "experts": experts,
           "experts_per_token": 2, "rank": rank,
           "fwd_bwd_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
           "x_dense": {k: round(v / med["dense"], 3) for k, v in med.items()}}
    # agreement (grouped computes the LoRA products in bf16 on CUDA, the loop in fp32)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        ya, yb = layers["loop"](x).float(), layers["grouped"](x).float()
    res["grouped_vs_loop_max_abs"] = float((ya - yb).abs().max())
    res["grouped_vs_loop_rel"] = float((ya - yb).norm() / ya.norm().clamp(min=1e-30))
    probe = MoELoRAMLP(base, experts, 2, rank, alpha=2 * rank, impl="auto").to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        res["auto_impl_bf16_base"] = probe.resolve_impl(x)
        res["auto_impl_fp32_input_autocast"] = probe.resolve_impl(x.float())
    if ctx.cuda:  # any host sync in the grouped path's forward + backward raises in "error" mode
        try:
            torch.cuda.set_sync_debug_mode("error")
            step(layers["grouped"])
            res["grouped_host_sync"] = "none"
        except RuntimeError as e:
            res["grouped_host_sync"] = f"SYNC: {e}"[:500]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return res


# ================================================================ the real trainer
def train_config(**kw):
    from student.config import TrainConfig

    return TrainConfig(**kw)


def steady_rate(run: Path, warmup: int) -> tuple[float | None, list[float]]:
    """tokens/s after the warm-up steps, from metrics.jsonl's cumulative rates (one line per step)."""
    from student.run import read_metrics

    recs = [r for r in read_metrics(run) if "tokens_per_s" in r]
    cum, t = 0, []
    for r in recs:
        cum += r["tokens"]
        t.append((cum, cum / r["tokens_per_s"]))
    steps = [t[0][1]] + [b[1] - a[1] for a, b in zip(t, t[1:], strict=False)]
    if len(t) <= warmup:
        return None, steps
    (c0, t0), (c1, t1) = t[warmup - 1] if warmup else (0, 0.0), t[-1]
    return (c1 - c0) / max(t1 - t0, 1e-9), steps


def train_run(ctx: Check, model_name: str, student: str, impl: str = "auto") -> dict:
    from student.run import read_metrics
    from student.train import train

    ctx.require_store()
    size = ctx.size
    out = ctx.work / f"run-{model_name}-{student}-{impl}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_config(store=ctx.store, base=str(ctx.models[model_name]), out=str(out), student=student,
                       experts=size["experts"], experts_per_token=2, rank=size["rank"], attn_rank=size["rank"],
                       expert_impl=impl, batch_size=size["batch"], max_steps=size["warmup"] + size["steps"],
                       lr=1e-4, warmup_steps=0, log_every=1, progress=False, bf16=True, shuffle=False,
                       base_dtype="float32" if student == "full" else "bfloat16", keep_checkpoints=1, seed=0)
    base = ctx.reset_peak()
    t0 = time.perf_counter()
    last = train(cfg)
    wall = time.perf_counter() - t0
    rate, steps = steady_rate(out, size["warmup"])
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    res = {"model": model_name, "student": student, "expert_impl": impl, "batch": size["batch"], "seq": size["seq"],
           "steps": cfg.max_steps, "warmup_steps": size["warmup"],
           "tokens_per_s": round(rate) if rate else None, "step_s": round(float(np.median(steps[size["warmup"]:])), 4)
           if len(steps) > size["warmup"] else None, "peak_gib": ctx.peak_gib(base), "train_wall_s": round(wall, 2),
           "final_loss": last.get("loss"), "losses_finite": bool(np.all(np.isfinite(losses))),
           "per_step_s": [round(s, 4) for s in steps]}
    shutil.rmtree(out, ignore_errors=True)
    return res


# ================================================================ chunked loss memory
def loss_memory(ctx: Check) -> dict:
    """Peak extra memory and time of one KD loss fwd+bwd: chunked LM head vs dense [B, T, V] logits."""
    from benchmarks.loss_bench import make_inputs, make_step

    b, s = ctx.size["loss_batch"], ctx.size["loss_seq"]
    res = {"tokens": b * s, "k": ctx.size["k"]}
    for vocab, hidden in ctx.size["loss_vocabs"]:
        row = {}
        h, w, batch = make_inputs(b, s, vocab, hidden, ctx.size["k"], ctx.device.type)
        for name in ("chunked-1024", "chunked-bf16-1024", "dense"):  # dense last: it may run out of memory
            try:
                step = make_step(name, h, w, batch, ctx.device.type)
                base = ctx.reset_peak()
                t0 = time.perf_counter()
                loss = step()
                ctx.sync()
                first = time.perf_counter() - t0
                peak = ctx.peak_gib(base)
                t0 = time.perf_counter()
                step()
                ctx.sync()
                row[name] = {"peak_extra_gib": peak, "first_s": round(first, 4),
                             "s": round(time.perf_counter() - t0, 4), "loss": float(loss.detach())}
            except torch.OutOfMemoryError as e:
                row[name] = {"error": f"OOM: {str(e)[:200]}"}
            finally:
                step = loss = None
                h.grad = w.grad = None
                ctx.free()
        res[f"vocab_{vocab}_hidden_{hidden}"] = row
        h = w = batch = None
        ctx.free()
    return res


# ================================================================ bf16 numerics
def bf16_agreement(ctx: Check) -> dict:
    """One MoE-LoRA step on the same batch: fp32 reference vs bf16 autocast (fp32 base) vs bf16 base (grouped)."""
    from logit_store import KDStream
    from student.train import DistillStep, build_model

    ctx.require_store()
    size = ctx.size
    batch = next(iter(KDStream(ctx.store, size["batch"], shuffle=False, rank=0, world_size=1)))
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    arms = {"fp32": ("float32", False, "loop"), "autocast_fp32_base": ("float32", True, "auto"),
            "bf16_base_grouped": ("bfloat16", True, "grouped"), "bf16_base_loop": ("bfloat16", True, "loop")}
    out, ref = {}, None
    for arm, (dtype, bf16, impl) in arms.items():
        cfg = train_config(store=ctx.store, base=str(ctx.models[size["small"][0]]), out=str(ctx.work / "x"),
                           experts=size["experts"], experts_per_token=2, rank=size["rank"], attn_rank=size["rank"],
                           base_dtype=dtype, bf16=bf16, expert_impl=impl, seed=0)
        model = build_model(cfg).to(ctx.device)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # trained-looking adapters (B != 0), the same in every arm
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad and ("lora_B" in name or name.endswith(("in_B", "out_B"))):
                    p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)
        step = DistillStep(model, cfg.loss_config(), cfg.router_loss_config())
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, m = step(batch)
        tokens = float(batch["loss_mask"].sum())
        (loss / tokens).backward()
        grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters())
                           if p.requires_grad and p.grad is not None])
        kd = float(m["kd"]) / tokens
        if ref is None:
            ref = (kd, grads)
            out[arm] = {"kd": kd}
        else:
            out[arm] = {"kd": kd, "kd_rel_diff": abs(kd - ref[0]) / abs(ref[0]),
                        "grad_rel_diff": float((grads - ref[1]).norm() / ref[1].norm()),
                        "grad_cosine": float(torch.nn.functional.cosine_similarity(grads, ref[1], dim=0))}
        del model, step, grads
        ctx.free()
    return out


# ================================================================ full fine-tune of the large model
def full_large(ctx: Check) -> dict:
    """Full fine-tune of the large model (fp32 master weights, bf16 autocast) with the trainer's own pieces."""
    from logit_store import KDStream
    from student.train import DistillStep, build_model

    ctx.require_store()
    size = ctx.size
    name = size["large"][0]
    cfg = train_config(store=ctx.store, base=str(ctx.models[name]), out=str(ctx.work / "y"), student="full",
                       batch_size=size["batch"], bf16=True, seed=0)
    base = ctx.reset_peak()
    model = build_model(cfg).to(ctx.device)
    model.train()
    step = DistillStep(model, cfg.loss_config(), cfg.router_loss_config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    stream = KDStream(ctx.store, size["batch"], shuffle=False, rank=0, world_size=1)
    it = iter(stream)
    times, tokens = [], 0
    for i in range(size["warmup"] + size["steps"]):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(stream)
            batch = next(it)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        n = float(batch["loss_mask"].sum())
        ctx.sync()
        t0 = time.perf_counter()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            loss, m = step(batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.sync()
        if i >= size["warmup"]:
            times.append(time.perf_counter() - t0)
            tokens += n
    res = {"model": name, "params": sum(p.numel() for p in model.parameters()), "batch": size["batch"],
           "seq": size["seq"], "tokens_per_s": round(tokens / sum(times)), "step_s": round(float(np.median(times)), 4),
           "peak_gib": ctx.peak_gib(base), "final_kd": float(m["kd"]) / n}
    del model, step, opt
    return res


# ================================================================ FSDP2 under torchrun
def fsdp_run(ctx: Check, model_name: str) -> dict:
    """`kdstudent train --sharding fsdp --bf16` under torchrun with one process (NCCL on a GPU, gloo on CPU), then
    the same run killed after its middle checkpoint and resumed: the losses after the resume against the
    uninterrupted run's, and the final student read back by `load_trained`."""
    import subprocess

    from student.run import read_metrics
    from student.train import load_trained

    ctx.require_store()
    size = ctx.size
    steps = size["warmup"] + size["steps"]
    half = steps // 2
    out = ctx.work / f"fsdp-{model_name}"
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--store", ctx.store, "--base", str(ctx.models[model_name]), "--experts", str(size["experts"]),
             "--experts-per-token", "2", "--rank", str(size["rank"]), "--attn-rank", str(size["rank"]),
             "--batch-size", str(size["batch"]), "--max-steps", str(steps), "--save-every", str(half),
             "--keep-checkpoints", "0", "--lr", "1e-4", "--warmup-steps", "0", "--log-every", "1", "--no-progress",
             "--no-shuffle", "--bf16", "--base-dtype", "bfloat16", "--sharding", "fsdp", "--seed", "0"]

    def launch(run: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "cli.kdstudent", "train", *flags, "--out", str(run), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(ctx.left(), 30))
        if done.returncode:
            raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr[-1500:]}")

    t0 = time.perf_counter()
    launch(out)
    wall = time.perf_counter() - t0
    rate, per_step = steady_rate(out, size["warmup"])
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    resumed = ctx.work / f"fsdp-{model_name}-resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(out, resumed)
    for name in os.listdir(resumed):  # as if killed right after the middle checkpoint
        if name == "final" or (name.startswith("checkpoint-") and int(name.split("-")[1]) > half):
            shutil.rmtree(resumed / name)
    launch(resumed, "--resume")
    again = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    diff = max(abs(again[s] - losses[s]) for s in losses if s > half)
    model = load_trained(str(out), ctx.device)
    res = {"model": model_name, "processes": 1, "steps": steps, "resumed_at": half,
           "tokens_per_s": round(rate) if rate else None, "train_wall_s": round(wall, 2),
           "final_loss": losses[steps], "resume_max_abs_loss_diff": diff,
           "resume_bitwise_equal": all(again[s] == losses[s] for s in losses),
           "final_student_loads": sum(p.numel() for p in model.parameters()) > 0}
    shutil.rmtree(resumed, ignore_errors=True)
    return res


# ================================================================ report
def table(ctx: Check) -> str:
    lines = [f"{'item':<34} result"]
    for name, r in ctx.results.items():
        if "error" in r:
            text = "ERROR " + r["error"][:150]
        elif "skipped" in r:
            text = "skipped: " + r["skipped"]
        elif name.startswith(("train_", "full_")):
            text = (f"{r.get('tokens_per_s')} tok/s, step {r.get('step_s')} s, peak {r.get('peak_gib')} GiB, "
                    f"loss {r.get('final_loss', r.get('final_kd'))}")
        elif name.startswith("fsdp_"):
            text = (f"{r.get('tokens_per_s')} tok/s, loss {r.get('final_loss')}, resumed at step "
                    f"{r.get('resumed_at')}: max |loss diff| {r.get('resume_max_abs_loss_diff')}, "
                    f"bitwise {r.get('resume_bitwise_equal')}, student loads {r.get('final_student_loads')}")
        elif name.startswith("capture"):
            text = (f"teacher {r.get('teacher_tokens_per_s')} tok/s"
                    + (f", write {r['write_tokens_per_s']} tok/s, capture {r['capture_tokens_per_s']} tok/s"
                       if "write_tokens_per_s" in r else ""))
        elif name == "moe_layer":
            text = (f"fwd+bwd ms {r['fwd_bwd_ms']}, x dense {r['x_dense']}, grouped-vs-loop rel "
                    f"{r['grouped_vs_loop_rel']:.2e}, auto={r.get('auto_impl_bf16_base')}, "
                    f"sync={r.get('grouped_host_sync', 'n/a')}")
        elif name == "loss_memory":
            parts = []
            for key, row in r.items():
                if key.startswith("vocab_"):
                    cells = ", ".join(f"{v}: {row[v].get('peak_extra_gib', row[v].get('error'))} GiB "
                                      f"{row[v].get('s', '')} s" for v in row)
                    parts.append(f"{key} [{cells}]")
            text = "; ".join(parts)
        else:
            text = _short(r)
        lines.append(f"{name:<34} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (< 1 min): checks the script runs")
    ap.add_argument("--sizes", choices=sorted(SIZES), default="full", help="full (GPU) or tiny")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    ap.add_argument("--json", default="benchmarks/results/gpu_check.json", help="results file ('' = none)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="global time budget; items that no longer fit "
                    "are skipped")
    ap.add_argument("--workdir", default=None, help="models and stores go here (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--only", default="", help="comma-separated item name prefixes (setup always runs)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.sizes, args.device = "tiny", "cpu"
        if args.budget_s == 240.0:
            args.budget_s = 120.0
    ctx = Check(args)
    log(f"device {ctx.device}, sizes {args.sizes}, budget {args.budget_s:.0f} s, work dir {ctx.work}")
    log(f"env: {ctx.out['env']}")
    ctx.save()
    small, large = ctx.size["small"][0], ctx.size["large"][0]
    try:
        setup = ctx.run("setup_models", make_models)
        if setup is not None and "error" not in setup:
            ctx.run("capture", capture, "capture", small, ctx.size["capture_rows"], True)
            ctx.run("moe_layer", moe_layer)
            for student, impl in (("moe-lora", "grouped"), ("moe-lora", "loop"), ("lora", "auto"), ("full", "auto")):
                ctx.run(f"train_{small}_{student}_{impl}", train_run, "train", small, student, impl)
            ctx.run(f"fsdp_{small}", fsdp_run, "fsdp", small)
            ctx.run("loss_memory", loss_memory)
            ctx.run("bf16_agreement", bf16_agreement)
            for student, impl in (("moe-lora", "grouped"), ("moe-lora", "loop"), ("lora", "auto")):
                ctx.run(f"train_{large}_{student}_{impl}", train_run, "train_large", large, student, impl)
            ctx.run(f"capture_{large}", capture, "capture", large, max(ctx.size["capture_rows"] // 4, 4), False)
            ctx.run(f"full_{large}", full_large, "full_1b")
    finally:
        ctx.out["table"] = table(ctx).splitlines()
        ctx.save()
        if not args.keep and not args.workdir:
            shutil.rmtree(ctx.work, ignore_errors=True)
    print(table(ctx), flush=True)
    log(f"done in {time.time() - ctx.start:.0f} s" + (f"; wrote {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
