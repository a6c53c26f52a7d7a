"""`kdstore build`: input -> teacher -> codec -> writer, resumable, one of N independent workers.

Worker i of N takes the input examples with index % N == i and writes its own shards
(`shard-wIIIII-NNNNN.arrow`) and manifest (`manifest-wIIIII-of-NNNNN.json`) into the shared store directory;
`manifest.merge_workers` (kdstore merge) then writes the combined manifest.json. With one worker the build writes
manifest.json itself. A rerun with `resume` continues after the last complete shard: the rows a worker
produces are a deterministic function of its input share, so it skips as many as its manifest holds.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .format import worker_names
from .inputs import (
    Example,
    ExampleTokenizer,
    FieldSpec,
    InputError,
    InputStats,
    iter_examples,
    load_input,
    pack_examples,
)
from .manifest import CodecSpec, Manifest, ManifestError, TargetSpec
from .teachers import (
    Teacher,
    TeacherError,
    TeacherWarning,
    bos_warning,
    check_teacher_path,
    load_teacher,
    resolve_dtype,
)
from .writer import ShardWriter, StoreRow


@dataclass
class BuildConfig:
    """Everything `kdstore build` takes (as flags, or in a YAML/JSON file)."""

    teacher: str = field(metadata={"help": "teacher model: a local directory (or a hub name when a hub is reachable)"})
    data: str = field(metadata={"help": "input: a .jsonl/.json/.parquet/.csv/.arrow file or folder of them, a "
                                        "Dataset.save_to_disk directory, or a hub dataset name"})
    out: str = field(metadata={"help": "store directory or URL (file://, s3://, memory://, ...)"})
    backend: str = field(default="vllm", metadata={"help": "teacher backend", "choices": ["vllm", "hf"]})
    text_field: str | None = field(default=None, metadata={"help": "field with plain text (loss on every token)"})
    messages_field: str | None = field(default=None, metadata={
        "help": "field with chat messages [{role, content}], rendered with the tokenizer's chat template; loss "
                "on assistant turns only"})
    prompt_field: str | None = field(default=None, metadata={"help": "field with the prompt (loss on the response)"})
    response_field: str | None = field(default=None, metadata={"help": "field with the response"})
    input_ids_field: str | None = field(default=None, metadata={"help": "field with pre-tokenised ids"})
    split: str = field(default="train", metadata={"help": "split, for saved dataset dicts and hub datasets"})
    data_format: str | None = field(default=None, metadata={"help": "json|parquet|csv|arrow|text (default: from "
                                                                       "the file extension)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N input examples"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer (default: the teacher's)"})
    max_seq_len: int = field(default=2048, metadata={"help": "rows longer than this are truncated (and counted)"})
    pack: bool = field(default=False, metadata={"help": "pack short examples into full max_seq_len rows"})
    add_eos: bool = field(default=True, metadata={"help": "end texts and responses with the EOS token"})
    generate: bool = field(default=False, metadata={
        "help": "the teacher writes the responses to prompt-only data (sequence-level KD); the store keeps "
                "prompt + response with targets on the response"})
    max_new_tokens: int = field(default=256, metadata={"help": "--generate: response length limit"})
    temperature: float = field(default=1.0, metadata={"help": "--generate: sampling temperature (0 = greedy)"})
    seed: int = field(default=0, metadata={"help": "seed for sampled targets and generation (per input row)"})
    top_k: int | None = field(default=None, metadata={"help": "store the top-K candidates (default 64)"})
    samples: int | None = field(default=None, metadata={"help": "store N sampled draws per position (RS-KD) "
                                                                  "instead of top-k"})
    sample_from_top_k: int | None = field(default=None, metadata={
        "help": "draw samples from the teacher's top-K + tail (vllm needs it; default 128 there); hf draws "
                "exactly from the full distribution when unset"})
    levels: int = field(default=255, metadata={"help": "probability quantisation levels (top-k codec)"})
    compression_level: int = field(default=9, metadata={"help": "zstd level"})
    shard_tokens: int = field(default=1 << 22, metadata={"help": "tokens per shard file"})
    batch_rows: int = field(default=64, metadata={"help": "rows per teacher call"})
    num_workers: int = field(default=1, metadata={"help": "total number of independent build workers"})
    worker_index: int | None = field(default=None, metadata={
        "help": "this worker's index in [0, num_workers); default from SLURM_ARRAY_TASK_ID or "
                "JOB_COMPLETION_INDEX (Kubernetes indexed jobs), else 0"})
    resume: bool = field(default=False, metadata={"help": "continue a crashed or interrupted build"})
    dtype: str = field(default="auto", metadata={"help": "teacher dtype: auto|float32|bfloat16|float16"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs per teacher"})
    max_model_len: int | None = field(default=None, metadata={"help": "vllm: context length limit"})
    max_num_batched_tokens: int | None = field(default=None, metadata={
        "help": "vllm: tokens per engine step (bounds prompt-logprob memory)"})
    gpu_memory_utilization: float | None = field(default=None, metadata={"help": "vllm: GPU memory fraction"})
    kv_cache_memory_bytes: int | None = field(default=None, metadata={"help": "vllm: KV cache size in bytes"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        if self.top_k and self.samples:
            raise InputError("choose --top-k or --samples, not both")
        if not self.samples and not self.top_k:
            self.top_k = 64
        if self.worker_index is None:
            env = os.environ.get("SLURM_ARRAY_TASK_ID") or os.environ.get("JOB_COMPLETION_INDEX")
            self.worker_index = int(env) if env and self.num_workers > 1 else 0
        if not 0 <= self.worker_index < self.num_workers:
            raise InputError(f"--worker-index {self.worker_index} not in [0, --num-workers={self.num_workers})")
        if self.samples and self.backend == "vllm" and not self.sample_from_top_k:
            self.sample_from_top_k = 128
        if self.max_seq_len < 2:
            raise InputError("--max-seq-len must be at least 2")


@dataclass
class BuildSummary:
    store: str
    rows: int = 0
    tokens: int = 0
    target_positions: int = 0
    bytes: int = 0
    shards: int = 0
    resumed_rows: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: dict = field(default_factory=dict)
    first_errors: list = field(default_factory=list)
    seconds: float = 0.0
    load_seconds: float = 0.0  # loading the input, tokenizer and teacher
    new_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds - self.load_seconds, 1e-9)

    def format(self) -> str:
        lines = [f"store           {self.store}",
                 f"rows            {self.rows:,}" + (f" ({self.resumed_rows:,} from before the resume)"
                                                     if self.resumed_rows else ""),
                 f"tokens          {self.tokens:,} ({self.target_positions:,} with targets)",
                 f"bytes           {self.bytes:,} ({self.bytes / max(self.tokens, 1):.1f} B/token) in "
                 f"{self.shards} shards",
                 f"input examples  {self.examples:,} read, {self.truncated:,} truncated, "
                 f"{sum(self.skipped.values()):,} skipped",
                 f"time            {self.seconds:.1f} s ({self.load_seconds:.1f} s loading), "
                 f"{self.tokens_per_s:,.0f} tokens/s"]
        lines += [f"  skipped: {n:,} x {reason}" for reason, n in sorted(self.skipped.items())]
        lines += [f"  e.g. {e}" for e in self.first_errors]
        return "\n".join(lines)


def build(cfg: BuildConfig, teacher: Teacher | None = None) -> BuildSummary:
    """Run one build worker. `teacher` may be passed in to reuse a loaded engine (tests, notebooks)."""
    from transformers import AutoTokenizer

    start = time.time()
    fields = FieldSpec(cfg.text_field, cfg.messages_field, cfg.prompt_field, cfg.response_field, cfg.input_ids_field)
    fields.mode(cfg.generate)  # fail on bad options before loading anything
    check_teacher_path(cfg.teacher)
    tok_path = cfg.tokenizer or cfg.teacher
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot load the tokenizer from {tok_path!r}: {e}") from e
    dataset = load_input(cfg.data, cfg.split, cfg.data_format)
    _check_bos(cfg, tokenizer)
    if teacher is None:
        teacher = load_teacher(cfg.backend, cfg.teacher, **_teacher_options(cfg))
    if len(tokenizer) > teacher.vocab_size:
        raise TeacherError(f"the tokenizer has {len(tokenizer):,} tokens but the teacher's vocabulary is "
                           f"{teacher.vocab_size:,}: they do not belong together")
    manifest = _manifest(cfg, teacher, tokenizer, dataset, fields)
    prefix, manifest_name = worker_names(cfg.worker_index, cfg.num_workers)
    writer = ShardWriter(cfg.out, manifest, shard_tokens=cfg.shard_tokens, prefix=prefix,
                         manifest_name=manifest_name, resume=cfg.resume)
    stats = InputStats()
    done = writer.manifest.rows
    summary = BuildSummary(store=cfg.out, resumed_rows=done, load_seconds=time.time() - start)

    examples = iter_examples(dataset, ExampleTokenizer(tokenizer, fields, cfg.max_seq_len, cfg.generate,
                                                       cfg.add_eos),
                             stats, cfg.worker_index, cfg.num_workers, cfg.limit)
    if cfg.pack:
        examples = pack_examples(examples, cfg.max_seq_len)
    share = len(range(cfg.worker_index, min(cfg.limit or len(dataset), len(dataset)), cfg.num_workers))
    bar = _progress(cfg, share)
    try:
        skipped_rows = 0
        batch: list[Example] = []
        for ex in examples:
            if skipped_rows < done:  # already in complete shards: rows are deterministic, skip without the teacher
                skipped_rows += 1
                continue
            batch.append(ex)
            if len(batch) == cfg.batch_rows:
                summary.new_tokens += _process(batch, cfg, teacher, writer, tokenizer)
                batch = []
                _update(bar, stats, summary, start)
        if batch:
            summary.new_tokens += _process(batch, cfg, teacher, writer, tokenizer)
        if skipped_rows < done:
            raise ManifestError(f"{cfg.out}: the store holds {done} rows but the input now yields only "
                                f"{skipped_rows}: the input changed since the build started")
        final = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            _update(bar, stats, summary, start)
            bar.close()
    summary.rows, summary.tokens = final.rows, final.tokens
    summary.target_positions, summary.bytes, summary.shards = final.target_positions, final.bytes, len(final.shards)
    summary.examples, summary.truncated = stats.examples, stats.truncated
    summary.skipped, summary.first_errors = dict(stats.skipped), stats.first_errors
    summary.seconds = time.time() - start
    return summary


def _process(batch: list[Example], cfg: BuildConfig, teacher: Teacher, writer: ShardWriter, tokenizer) -> int:
    """Teacher targets for a batch of rows (generating responses first with --generate), then write them."""
    seeds = [cfg.seed * 1_000_003 + ex.source_index for ex in batch]
    if cfg.generate:
        responses = teacher.generate([ex.input_ids for ex in batch], cfg.max_new_tokens, cfg.temperature, seeds)
        for ex, resp in zip(batch, responses, strict=True):
            if resp.size == 0:  # keep rows 1:1 with prompts (resume relies on it): an empty answer is just EOS
                resp = np.array([tokenizer.eos_token_id], dtype=np.int64)
            room = cfg.max_seq_len - ex.input_ids.size
            mask = np.zeros(ex.input_ids.size + min(resp.size, room), bool)
            mask[ex.input_ids.size:] = True
            ex.input_ids = np.concatenate([ex.input_ids, resp[:room]])
            ex.loss_mask = mask
    rows = [(ex.input_ids, ex.loss_mask) for ex in batch]
    if cfg.samples:
        targets = teacher.sample(rows, cfg.samples, seeds, cfg.sample_from_top_k)
    else:
        targets = teacher.topk(rows, cfg.top_k)
    for ex, tgt in zip(batch, targets, strict=True):
        writer.write(StoreRow(ex.input_ids, ex.loss_mask, tgt, ex.source_index))
    return sum(ex.input_ids.size for ex in batch)


def _manifest(cfg: BuildConfig, teacher: Teacher, tokenizer, dataset, fields: FieldSpec) -> Manifest:
    from .fingerprint import describe_tokenizer

    if cfg.samples:
        target = TargetSpec("sampled", samples=cfg.samples, sampled_from_top_k=cfg.sample_from_top_k)
    else:
        target = TargetSpec("topk", k=cfg.top_k)
    return Manifest(
        target=target, vocab_size=teacher.vocab_size,
        codec=CodecSpec(levels=cfg.levels, compression_level=cfg.compression_level),
        teacher=teacher.describe(),
        tokenizer=describe_tokenizer(tokenizer, cfg.tokenizer or cfg.teacher),
        input={"source": cfg.data, "split": cfg.split, "fingerprint": getattr(dataset, "_fingerprint", None),
               "examples": len(dataset), "limit": cfg.limit, "fields": fields.used(), "num_workers": cfg.num_workers},
        sequence={"max_seq_len": cfg.max_seq_len, "packing": cfg.pack, "add_eos": cfg.add_eos,
                  "generate": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}
                  if cfg.generate else None, "seed": cfg.seed},
    )


def _teacher_options(cfg: BuildConfig) -> dict:
    """The backend's options, settled before anything loads: the dtype (`auto` is float32 on both backends, see
    `resolve_dtype`) and, for vLLM, a context as long as the longest sequence the build passes it (a row of
    --max-seq-len tokens + the one token vLLM generates after prompt log-probs; --generate stops at that context,
    as a row keeps at most --max-seq-len tokens anyway), which also sizes its KV cache on a CPU."""
    dtype = resolve_dtype(cfg.dtype)
    if cfg.backend == "hf":
        return {"dtype": dtype}
    context = cfg.max_seq_len + 1
    if cfg.max_model_len is not None and cfg.max_model_len < context:
        raise TeacherError(f"--max-model-len {cfg.max_model_len} is shorter than the rows of --max-seq-len "
                           f"{cfg.max_seq_len} (+ 1): raise it, or leave it unset to size it from --max-seq-len")
    needed = max(cfg.top_k or 0, cfg.sample_from_top_k or 0, 20)
    return dict(dtype=dtype, max_logprobs=needed, tensor_parallel_size=cfg.tensor_parallel_size,
                max_model_len=cfg.max_model_len or context, max_num_batched_tokens=cfg.max_num_batched_tokens,
                gpu_memory_utilization=cfg.gpu_memory_utilization, kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
                seed=cfg.seed)


def _check_bos(cfg: BuildConfig, tokenizer) -> None:
    """Warn, before the teacher loads, if its config names a BOS its tokenizer does not add (`bos_warning`)."""
    import warnings

    from transformers import AutoConfig

    try:
        bos = AutoConfig.from_pretrained(cfg.teacher).bos_token_id
    except (OSError, ValueError, AttributeError):
        return  # the teacher's loader says what is wrong with its config
    message = bos_warning(bos if isinstance(bos, int) else None, tokenizer, cfg.teacher, cfg.tokenizer is None)
    if message:
        warnings.warn(message, TeacherWarning, stacklevel=3)


def _progress(cfg: BuildConfig, total: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="ex", desc=f"build w{cfg.worker_index}", file=sys.stderr, dynamic_ncols=True)


def _update(bar, stats: InputStats, summary: BuildSummary, start: float) -> None:
    if bar is not None:
        bar.update(stats.examples - bar.n)
        rate = summary.new_tokens / max(time.time() - start - summary.load_seconds, 1e-9)
        bar.set_postfix(tok_s=f"{rate:,.0f}",
                        skipped=sum(stats.skipped.values()), refresh=False)
