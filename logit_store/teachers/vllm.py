"""`vllm` backend: prompt log-probs from a vLLM engine (the default; on GPUs it is much faster).

vLLM returns, for every prompt position, the top-k candidates (+ the actual token when it is outside them), so
it writes `topk` targets only: draws from its top-K plus one tail bucket (`sampled` targets) would give biased KD
gradients, because a store cannot say which unsampled ids were in the top-K (docs/BUILD.md, "Sampled targets");
`sample` refuses and points to the hf backend, which draws exactly. Prefix caching stays off (prompt log-probs
bypass it and have had stale-value bugs with it).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from ..codecs import SampledTargets, TopKTargets, tail_logmass
from .base import Row, Teacher, TeacherError, resolve_dtype

CPU_KV_FLOOR = 256 * 2**20  # never less KV cache than this on a CPU: room for many short rows at once
_KV_ROWS = 2  # the CPU KV cache holds at least this many rows of the longest length at once


def kv_bytes_per_token(config, dtype: str) -> int | None:
    """K and V bytes one token takes in the KV cache of a standard decoder (every layer, every KV head), from
    its transformers config; None when the config does not say (then only the floor applies)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, heads = getattr(text, "num_hidden_layers", None), getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)


def cpu_kv_cache_bytes(config, dtype: str, max_model_len: int | None) -> int:
    """The KV cache to give vLLM on a CPU: `_KV_ROWS` rows of `max_model_len` tokens (vLLM refuses to start with
    less than one), and at least CPU_KV_FLOOR. Sized from the rows the build makes, not the model's native
    context: a 128k-context model would otherwise need gigabytes, or fail after minutes of loading."""
    per_token = kv_bytes_per_token(config, dtype)
    if per_token is None or not max_model_len:
        return CPU_KV_FLOOR
    return max(CPU_KV_FLOOR, _KV_ROWS * (max_model_len + 128) * per_token)  # + a block of slack per row


@dataclass
class VLLMOptions:
    """The vLLM engine settings a build passes through, each declared once (`BuildConfig` inherits them; unset
    ones are left to vLLM, except the CPU KV cache, sized from the rows: `cpu_kv_cache_bytes`)."""

    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs per teacher"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "vllm: context length limit (default: --max-seq-len + 1, the longest sequence a build passes)"})
    max_num_batched_tokens: int | None = field(default=None, metadata={
        "help": "vllm: tokens per engine step (bounds prompt-logprob memory)"})
    gpu_memory_utilization: float | None = field(default=None, metadata={"help": "vllm: GPU memory fraction"})
    kv_cache_memory_bytes: int | None = field(default=None, metadata={"help": "vllm: KV cache size in bytes"})


def check_fallback_logits(config, architecture: str) -> None:
    """vLLM applies a family's logit post-processing in its own model classes; its generic Transformers backend
    (the `Transformers*` architectures, for families vLLM does not implement) applies only `logit_scale` and
    `final_logit_softcapping`. Refuse a teacher served that way whose transformers model does something else
    (`model_logits.logit_transform`): its stored distribution would not be the model's."""
    if not architecture.startswith("Transformers"):
        return
    from ..model_logits import LogitTransform, logit_transform  # torch: only where a vLLM engine runs anyway

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    served = LogitTransform(scale=float(getattr(text, "logit_scale", None) or 1.0),
                            softcap=getattr(text, "final_logit_softcapping", None) or None)
    wanted = logit_transform(config)
    if (served.scale, served.softcap) != (wanted.scale, wanted.softcap):
        raise TeacherError(f"vLLM serves this {getattr(config, 'model_type', '?')} teacher through its generic "
                           f"Transformers backend ({architecture}), which post-processes its logits as "
                           f"{served.describe()}, not as the model does ({wanted.describe()}): its stored "
                           "distribution would be wrong. Use --backend hf")


class VLLMTeacher(Teacher):
    """A vLLM engine over a teacher folder. `options.max_model_len` should be the longest sequence the caller will
    pass (`kdstore build` gives --max-seq-len + 1, or what --generate can reach); None leaves vLLM's default, the
    model's native context. `engine_args`: any other `vllm.LLM` argument, passed as it is."""

    backend = "vllm"

    def __init__(self, path: str, dtype: str = "auto", max_logprobs: int = 128, seed: int = 0,
                 options: VLLMOptions | None = None, engine_args: dict | None = None):
        import torch

        on_cpu = not torch.cuda.is_available()
        if on_cpu:  # in-process engine: quick to start, no spawn guard needed
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoConfig
        from vllm import LLM

        dtype = resolve_dtype(dtype)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise TeacherError(f"cannot read the teacher's config at {path!r}: {e}") from e
        self.vocab_size = int(config.vocab_size)
        options = options or VLLMOptions()
        args = dict(model=path, dtype=dtype, max_logprobs=max_logprobs, enable_prefix_caching=False, seed=seed)
        args.update({k: v for k, v in dataclasses.asdict(options).items() if v is not None})
        if on_cpu and options.kv_cache_memory_bytes is None and options.gpu_memory_utilization is None:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config  # else vLLM
            context = options.max_model_len or getattr(text, "max_position_embeddings", None)  # takes 92 % of RAM
            args["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(config, dtype, context)
        if on_cpu and options.tensor_parallel_size == 1:
            args["distributed_executor_backend"] = "uni"
        args.update(engine_args or {})
        self.llm = LLM(**args)
        check_fallback_logits(config, self.llm.llm_engine.model_config.architecture)
        self.name_or_path = path
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.kv_cache_memory_bytes = args.get("kv_cache_memory_bytes")
        self.max_logprobs = max_logprobs

    def _prompt_logprobs(self, rows: list[Row], k: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per row: ([P, k] ids, [P, k] log-probs) ordered by rank, for the loss positions, and [P] the log-probs of
        the row's own tokens (vLLM lists each prompt token beside its top-k, whatever its rank)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if k > self.max_logprobs:
            raise TeacherError(f"k = {k} exceeds the engine's max_logprobs = {self.max_logprobs}")
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids, _ in rows],
                                 params, use_tqdm=False)
        result = []
        for (ids, mask), out in zip(rows, outs, strict=True):
            pos = np.flatnonzero(mask)
            top_ids = np.empty((pos.size, k), np.int64)
            top_lp = np.empty((pos.size, k), np.float32)
            labels = np.array([min(out.prompt_logprobs[t][int(ids[t])].logprob, 0.0) for t in pos], np.float32)
            for j, t in enumerate(pos):
                ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in out.prompt_logprobs[t].items()
                                if lp.rank <= k)
                if len(ranked) != k:
                    raise TeacherError(f"vLLM returned {len(ranked)} candidates of rank <= {k} at position {t}")
                top_ids[j] = [r[1] for r in ranked]
                top_lp[j] = [r[2] for r in ranked]
            result.append((top_ids, top_lp, labels))
        return result

    def topk(self, rows: list[Row], k: int) -> list[TopKTargets]:
        return [TopKTargets(i, lp, tail_logmass(lp), labels) for i, lp, labels in self._prompt_logprobs(rows, k)]

    def sample(self, rows: list[Row], n: int, seeds: list[int], from_top_k: int | None) -> list[SampledTargets]:
        """Refused: vLLM sees only the top-K, so its draws would be biased (see the module docstring)."""
        raise TeacherError("the vllm backend cannot write sampled (RS-KD) targets: it sees only the teacher's "
                           "top-K, and draws from the top-K plus one tail bucket give biased gradients. Use "
                           "--backend hf, which draws exactly from the full distribution, or --top-k K with vllm")

    def generate(self, prompts: list[np.ndarray], max_new_tokens: int, temperature: float,
                 seeds: list[int]) -> list[np.ndarray]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=int(s), detokenize=False)
                  for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts], params,
                                 use_tqdm=False)
        return [np.asarray(o.outputs[0].token_ids, dtype=np.int64) for o in outs]
