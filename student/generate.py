"""`kdstudent generate`: a trained student's own samples (rollouts) for prompts, for on-policy distillation offline.

The student samples on an inference node; `kdstore build` scores the samples with the teacher there (the rollouts
folder format: logit_store/rollouts.py); training nodes then distil from that store mixed with the offline one, and
`kdstudent eval` estimates the reverse KL(student || teacher) on it (student/evaluate.py). No node ever holds the
teacher and the student together.

Rollouts are a pure function of (student, prompts, settings): prompt i is sampled with its own seed
(`prompt_seed`), one prompt per `generate` call on the hf backend (no padding), so a chunk of prompts is the same
bytes whoever writes it, a resumed run writes only the missing chunks, and W workers write what one does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from logit_store.build import worker_index_from_env
from logit_store.inputs import ExampleTokenizer, FieldSpec, InputError, InputSource, InputStats, iter_examples
from logit_store.rollouts import (
    RolloutsError,
    chunk_path,
    read_manifests,
    remove_temp_chunks,
    write_chunk,
    write_manifest,
)
from logit_store.teachers.vllm import VLLMOptions
from student.sampling import eos_ids, sample_hf


@dataclass(kw_only=True)
class GenerateConfig(VLLMOptions):
    """Everything `kdstudent generate` takes (flags, or a YAML/JSON file); the vLLM engine's options
    (`VLLMOptions`) apply to --backend vllm."""

    model: str = field(metadata={"help": "the policy: a training run (any student kind; the state kdstudent eval "
                                         "reads) or a saved MoE-LoRA student directory"})
    data: str = field(metadata={"help": "prompts: a .jsonl/.json/.parquet/.csv/.arrow file or folder of them, or a "
                                        "Dataset.save_to_disk directory"})
    out: str = field(metadata={"help": "rollouts folder to write (local): chunk files + one manifest per worker"})
    prompt_field: str | None = field(default=None, metadata={"help": "field with the prompt text"})
    messages_field: str | None = field(default=None, metadata={
        "help": "field with chat messages, rendered with the student's chat template and a generation prompt (a "
                "final assistant turn is dropped)"})
    input_ids_field: str | None = field(default=None, metadata={"help": "field with the prompt's token ids"})
    domain_field: str | None = field(default=None, metadata={
        "help": "string field naming each prompt's domain, copied to its rollouts (and so to the scored store)"})
    split: str = field(default="train", metadata={"help": "split, for saved dataset dicts"})
    data_format: str | None = field(default=None, metadata={"help": "json|parquet|csv|arrow|text (default: from "
                                                                   "the file extension)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    samples_per_prompt: int = field(default=1, metadata={"help": "rollouts per prompt"})
    max_new_tokens: int = field(default=256, metadata={"help": "response length limit"})
    max_seq_len: int = field(default=2048, metadata={
        "help": "prompt + response limit (prompts that leave no room are skipped and counted; responses stop "
                "there): the --max-seq-len of the build that scores them"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy, one sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 = the full distribution)"})
    seed: int = field(default=0, metadata={"help": "seed; prompt i samples with its own seed derived from it"})
    round: int = field(default=1, metadata={"help": "on-policy round these rollouts belong to (recorded)"})
    backend: str = field(default="hf", metadata={
        "help": "hf: transformers generate, deterministic for a seed; vllm: serves the student's export (Mixtral "
                "for a MoE-LoRA student, the merged model for lora/full)", "choices": ["hf", "vllm"]})
    dtype: str = field(default="float32", metadata={"help": "dtype the student samples in",
                                                    "choices": ["float32", "bfloat16", "float16"]})
    chunk_prompts: int = field(default=64, metadata={"help": "prompts per chunk file (the unit of resume and of "
                                                           "work between workers)"})
    num_workers: int = field(default=1, metadata={"help": "total number of independent generate workers"})
    worker_index: int | None = field(default=None, metadata={
        "help": "this worker's index in [0, num_workers); default from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run (writes the missing chunks)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        self.worker_index = worker_index_from_env(self.worker_index, self.num_workers)
        problems = [message for wrong, message in (
            (self.samples_per_prompt < 1, f"--samples-per-prompt must be at least 1 (got {self.samples_per_prompt})"),
            (self.temperature == 0 and self.samples_per_prompt > 1,
             "--temperature 0 is greedy: every sample of a prompt would be the same; use --samples-per-prompt 1"),
            (not math.isfinite(self.temperature) or self.temperature < 0,
             f"--temperature must be a finite number >= 0 (got {self.temperature})"),
            (not (0 < self.top_p <= 1), f"--top-p must be in (0, 1] (got {self.top_p})"),
            (self.max_new_tokens < 1, f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})"),
            (self.max_seq_len < 2, f"--max-seq-len must be at least 2 (got {self.max_seq_len})"),
            (self.seed < 0, f"--seed must be >= 0 (got {self.seed})"),
            (self.round < 0, f"--round must be >= 0 (got {self.round})"),
            (self.limit is not None and self.limit < 1, f"--limit must be at least 1 (got {self.limit})"),
            (self.chunk_prompts < 1, f"--chunk-prompts must be at least 1 (got {self.chunk_prompts})"),
            (self.num_workers < 1, f"--num-workers must be at least 1 (got {self.num_workers})"),
            (not 0 <= self.worker_index < self.num_workers,
             f"--worker-index {self.worker_index} not in [0, --num-workers={self.num_workers})"),
            (self.backend not in ("hf", "vllm"), f"--backend {self.backend!r}: choose hf or vllm"),
        ) if wrong]
        if problems:
            raise InputError("; ".join(problems))
        self.fields().mode(generate=True)

    def fields(self) -> FieldSpec:
        return FieldSpec(prompt_field=self.prompt_field, messages_field=self.messages_field,
                         input_ids_field=self.input_ids_field, domain_field=self.domain_field)

    def sampling(self) -> dict:
        """What the samples' distribution depends on besides the policy (recorded; a resume must keep it)."""
        return {"samples_per_prompt": self.samples_per_prompt, "max_new_tokens": self.max_new_tokens,
                "max_seq_len": self.max_seq_len, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "backend": self.backend, "dtype": self.dtype}


def prompt_seed(seed: int, prompt_index: int) -> int:
    """Prompt i's own seed: its samples do not depend on which other prompts a worker or a chunk holds."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class Policy:
    """A loaded student that samples: its model, tokenizer and what identifies it (recorded with its rollouts)."""

    model: torch.nn.Module
    tokenizer: object
    describe: dict


def load_policy(cfg: GenerateConfig) -> Policy:
    """The student of `cfg.model`, whatever its kind, with its base's tokenizer and what identifies it."""
    from transformers import AutoTokenizer

    from student.config import student_spec
    from student.run import is_run, load_config, state_fingerprint, student_snapshot
    from student.train import load_trained

    path = Path(cfg.model)
    model = load_trained(path).to(getattr(torch, cfg.dtype)).eval()
    if is_run(path):
        run_cfg = load_config(path)
        kind, base, snapshot = run_cfg.student, run_cfg.base, student_snapshot(path)
    else:
        kind, base, snapshot = "moe-lora", student_spec(model).base_path, path
    tokenizer = AutoTokenizer.from_pretrained(base)
    describe = {"path": str(cfg.model), "kind": kind, "base": str(base), "fingerprint": state_fingerprint(snapshot)}
    return Policy(model, tokenizer, describe)


class VLLMSampler:
    """--backend vllm: the student exported to a standard checkpoint (Mixtral for a MoE-LoRA student, the merged
    model otherwise) in a temporary folder, served by a vLLM engine."""

    def __init__(self, cfg: GenerateConfig, policy: Policy):
        from logit_store.teachers.vllm import VLLMTeacher
        from student.export import export_merged

        self._folder = tempfile.TemporaryDirectory(prefix="moekd-policy-")
        export_merged(policy.model, self._folder.name, policy.describe["base"], getattr(torch, cfg.dtype))
        options = VLLMOptions(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(VLLMOptions)})
        context = min(cfg.max_seq_len + 1, getattr(policy.model.config, "max_position_embeddings", None) or 1 << 30)
        options = dataclasses.replace(options, max_model_len=options.max_model_len or context)
        self.engine = VLLMTeacher(self._folder.name, dtype=cfg.dtype, max_logprobs=20, seed=cfg.seed,
                                  options=options).llm

    def sample(self, prompts: list[np.ndarray], cfg: GenerateConfig, seeds: list[int]) -> list[list[dict]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = cfg.temperature == 0
        params = [SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.temperature,
                                 top_p=1.0 if greedy else cfg.top_p, seed=s, logprobs=0, detokenize=False,
                                 max_tokens=min(cfg.max_new_tokens, cfg.max_seq_len - len(p)))
                  for p, s in zip(prompts, seeds, strict=True)]
        outs = self.engine.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts], params,
                                    use_tqdm=False)
        return [[{"response_ids": list(o.token_ids),
                  "logprobs": [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)],
                  "finish_reason": "stop" if o.finish_reason == "stop" else "length"} for o in out.outputs]
                for out in outs]

    def close(self) -> None:
        self._folder.cleanup()


def generate(cfg: GenerateConfig) -> dict:
    """Run one generate worker: write its missing chunks, then its manifest with the counts. Returns them."""
    from student.run import check_output

    start = time.time()
    check_output(cfg.out, [("--model", cfg.model), ("--data", cfg.data)])
    os.makedirs(cfg.out, exist_ok=True)
    source = InputSource(cfg.data, cfg.split, cfg.data_format)
    policy = load_policy(cfg)
    manifest = {"worker_index": cfg.worker_index, "num_workers": cfg.num_workers, "status": "in_progress",
                "round": cfg.round, "policy": policy.describe, "sampling": cfg.sampling(),
                "chunk_prompts": cfg.chunk_prompts}
    dataset = source.load()
    manifest["prompts"] = {"source": cfg.data, "fingerprint": source.fingerprint(dataset), "split": cfg.split,
                           "examples": len(dataset), "limit": cfg.limit, "fields": cfg.fields().used()}
    _check_resume(cfg, manifest)
    write_manifest(cfg.out, cfg.worker_index, manifest)
    example_tokenizer = ExampleTokenizer(policy.tokenizer, cfg.fields(), cfg.max_seq_len, generate=True)
    n = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    chunks = range(cfg.worker_index, math.ceil(n / cfg.chunk_prompts), cfg.num_workers)
    remove_temp_chunks(cfg.out, chunks)
    sampler = VLLMSampler(cfg, policy) if cfg.backend == "vllm" else None
    stats, counts = InputStats(), Counter()
    bar = _progress(cfg, len(chunks))
    try:
        for chunk in chunks:
            rows = range(chunk * cfg.chunk_prompts, min((chunk + 1) * cfg.chunk_prompts, n))
            examples = list(iter_examples(dataset, example_tokenizer, stats, rows=rows))  # always: counts skips
            path = chunk_path(cfg.out, chunk)
            if not os.path.exists(path):
                write_chunk(cfg.out, chunk, _rollouts(policy, sampler, examples, cfg))
                counts["chunks_written"] += 1
            _count(path, counts)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if sampler is not None:
            sampler.close()
    manifest["status"] = "complete"
    manifest["counts"] = {"prompts": stats.examples, "skipped": sum(stats.skipped.values()),
                          "rollouts": counts["rollouts"], "response_tokens": counts["response_tokens"],
                          "stop": counts["stop"], "length": counts["length"]}
    manifest["skipped"] = dict(stats.skipped)
    manifest["first_errors"] = stats.first_errors
    write_manifest(cfg.out, cfg.worker_index, manifest)
    return manifest["counts"] | {"chunks_written": counts["chunks_written"], "seconds": round(time.time() - start, 1),
                                 "skipped_reasons": dict(stats.skipped), "first_errors": stats.first_errors}


def _rollouts(policy: Policy, sampler: VLLMSampler | None, examples: list, cfg: GenerateConfig) -> list[dict]:
    """The lines of one chunk: each prompt's samples, in prompt then sample order."""
    seeds = [prompt_seed(cfg.seed, ex.source_index) for ex in examples]
    if sampler is not None:
        per_prompt = sampler.sample([ex.input_ids for ex in examples], cfg, seeds) if examples else []
    else:
        eos = eos_ids(policy.model, policy.tokenizer)
        per_prompt = [sample_hf(policy.model, eos, ex.input_ids, cfg.samples_per_prompt,
                                min(cfg.max_new_tokens, cfg.max_seq_len - len(ex.input_ids)), cfg.temperature,
                                cfg.top_p, s) for ex, s in zip(examples, seeds, strict=True)]
    decode = policy.tokenizer.decode
    lines = []
    for ex, samples in zip(examples, per_prompt, strict=True):
        prompt_text = decode(ex.input_ids, skip_special_tokens=True)
        for j, s in enumerate(samples):
            lines.append({"prompt_index": ex.source_index, "sample": j, "domain": ex.domain, "prompt": prompt_text,
                          "response": decode(s["response_ids"], skip_special_tokens=True),
                          "prompt_ids": [int(t) for t in ex.input_ids],
                          "response_ids": [int(t) for t in s["response_ids"]],
                          "logprobs": [round(float(x), 6) for x in s["logprobs"]],
                          "finish_reason": s["finish_reason"]})
    return lines


def _count(path: str, counts: Counter) -> None:
    import json

    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            counts["rollouts"] += 1
            counts["response_tokens"] += len(r["response_ids"])
            counts[r["finish_reason"]] += 1


def _check_resume(cfg: GenerateConfig, manifest: dict) -> None:
    """Rollouts this worker wrote before continue only with --resume; every worker's must come from the same policy,
    settings and split into workers: the folder would otherwise mix two distributions."""
    existing = read_manifests(cfg.out)
    for m in existing:
        differ = [key for key in ("round", "policy", "sampling", "prompts", "chunk_prompts", "num_workers")
                  if m.get(key) != manifest[key]]
        if differ:
            raise RolloutsError(f"{cfg.out}: worker {m['worker_index']} wrote rollouts here with another "
                                f"{', '.join(differ)} ({', '.join(f'{k}={m.get(k)!r}' for k in differ)}); a folder "
                                "holds one policy's rollouts under one setting: choose a new --out")
    chunks = [int(name[len("rollouts-"):-len(".jsonl")]) for name in os.listdir(cfg.out)
              if name.startswith("rollouts-") and name.endswith(".jsonl")]
    mine = any(m["worker_index"] == cfg.worker_index for m in existing) or any(
        c % cfg.num_workers == cfg.worker_index for c in chunks)
    if mine and not cfg.resume:
        raise RolloutsError(f"{cfg.out} already holds this worker's rollouts: pass --resume to continue them, or "
                            "choose a new --out")


def _progress(cfg: GenerateConfig, total: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="chunk", desc=f"generate (worker {cfg.worker_index})")
