"""`kdstore build`: input -> teacher -> codec -> writer, resumable, one of N independent workers.

Worker i of N takes the input examples with index % N == i and writes its own shards
(`shard-wIIIII-NNNNN.arrow`) and manifest (`manifest-wIIIII-of-NNNNN.json`) into the shared store directory;
`merge_workers` (kdstore merge) then writes the combined manifest.json. With one worker the build writes
manifest.json itself.

Exact under interruption: the rows a worker produces are a pure function of its input share, and so are the
teacher's batches (batch j = rows [j*B, (j+1)*B) of the share, B = --batch-rows). A rerun with `resume` skips the
rows its complete shards hold, runs the teacher again on the whole batch the first missing row belongs to, and
writes only the rows not yet written: every row gets its targets from the same batch, with the same companions
and padding, as in an uninterrupted build, so a resumed store is bit-identical to one built in a single run
(docs/BUILD.md says where that holds and where it is tested).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from . import fs as storefs
from .card import license_problem, write_card
from .codecs import CODEC_NAMES, DEFAULT_LEVELS_V2, default_levels
from .format import WORKER_MANIFEST, worker_names
from .inputs import (
    Example,
    ExampleTokenizer,
    FieldSpec,
    InputError,
    InputSource,
    InputStats,
    iter_examples,
    pack_examples,
)
from .manifest import CodecSpec, Manifest, ManifestError, TargetSpec
from .rollouts import provenance as rollout_provenance
from .teachers import (
    Teacher,
    TeacherError,
    TeacherWarning,
    bos_warning,
    check_teacher_path,
    load_teacher,
    resolve_dtype,
)
from .teachers.vllm import VLLMOptions
from .writer import OutputLock, ShardWriter, StoreRow


@dataclass(kw_only=True)
class BuildConfig(VLLMOptions):
    """Everything `kdstore build` takes (as flags, or in a YAML/JSON file): the build's own options and the vLLM
    engine's (`VLLMOptions`)."""

    teacher: str = field(metadata={"help": "teacher model: a local directory (or a hub name when a hub is reachable)"})
    data: str = field(metadata={"help": "input: a .jsonl/.json/.parquet/.csv/.arrow file or folder of them, a "
                                        "Dataset.save_to_disk directory, or a hub dataset name"})
    out: str = field(metadata={"help": "store directory or URL (file://, s3://, memory://, ...)"})
    backend: str | None = field(default=None, metadata={
        "help": "teacher backend (default: vllm for --top-k, hf for --samples)", "choices": ["vllm", "hf"]})
    text_field: str | None = field(default=None, metadata={"help": "field with plain text (loss on every token)"})
    messages_field: str | None = field(default=None, metadata={
        "help": "field with chat messages [{role, content}], rendered with the tokenizer's chat template; loss "
                "on assistant turns only"})
    prompt_field: str | None = field(default=None, metadata={"help": "field with the prompt (loss on the response)"})
    response_field: str | None = field(default=None, metadata={"help": "field with the response"})
    input_ids_field: str | None = field(default=None, metadata={
        "help": "field with pre-tokenised ids (loss on every token; with --response-ids-field, the prompt's ids)"})
    response_ids_field: str | None = field(default=None, metadata={
        "help": "field with the pre-tokenised response to --input-ids-field (loss on the response): scores exactly "
                "the tokens a policy sampled, e.g. the rollouts of kdstudent generate (response_ids)"})
    domain_field: str | None = field(default=None, metadata={
        "help": "string field naming each example's domain (code, chat, ...): the store records it per row and "
                "counts rows and tokens per domain; examples without it are skipped and counted"})
    domain: str | None = field(default=None, metadata={"help": "one domain for every row of this build"})
    license: str | None = field(default=None, metadata={
        "help": "the store's license for its dataset card (README.md), as a Hugging Face Hub license id "
                "(apache-2.0, cc-by-4.0, other, ...): it follows from the input data's and the teacher's terms. "
                "Recorded as the manifest's input.license (default: none, and the card says unknown)"})
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
    label_logprobs: bool | None = field(default=None, metadata={
        "help": "also store the teacher's exact log-prob of each row's own token (4 bytes per target position; "
                "top-k only): the teacher's NLL of the text, which kdstudent eval's rollout metrics need. Default: "
                "on when --data is a rollouts folder of kdstudent generate, else off"})
    samples: int | None = field(default=None, metadata={
        "help": "store N draws per position from the teacher's full distribution (RS-KD) instead of top-k; "
                "needs the hf backend (the default with --samples)"})
    sample_from_top_k: int | None = field(default=None, metadata={
        "help": "not accepted: draws from a top-K plus one tail bucket bias the KD gradient (docs/BUILD.md)"})
    codec: str = field(default="v1", metadata={
        "help": "target codec: v1 (sqrtp-rankdelta-v1) or v2 (ctxrank-v2: ids ranked by a per-shard model of the "
                "context token, smaller stores; docs/FORMAT.md, docs/PERFORMANCE.md)", "choices": ["v1", "v2"]})
    levels: int | None = field(default=None, metadata={
        "help": f"probability quantisation levels (top-k; default {CodecSpec.levels} with --codec v1, "
                f"{DEFAULT_LEVELS_V2} with v2)"})
    compression_level: int = field(default=CodecSpec.compression_level, metadata={"help": "zstd level"})
    shard_tokens: int = field(default=1 << 22, metadata={"help": "tokens per shard file"})
    record_batch_tokens: int = field(default=1 << 16, metadata={
        "help": "tokens per Arrow record batch inside a shard (what a reader decodes at once)"})
    batch_rows: int = field(default=64, metadata={"help": "rows per teacher call (the teacher's batches are rows "
                                                          "[j*B, (j+1)*B) of the worker's share, also on resume)"})
    num_workers: int = field(default=1, metadata={"help": "total number of independent build workers"})
    worker_index: int | None = field(default=None, metadata={
        "help": "this worker's index in [0, num_workers); default from SLURM_ARRAY_TASK_ID or "
                "JOB_COMPLETION_INDEX (Kubernetes indexed jobs), else 0"})
    resume: bool = field(default=False, metadata={"help": "continue a crashed or interrupted build"})
    dtype: str = field(default="auto", metadata={"help": "teacher dtype: auto|float32|bfloat16|float16"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        """Refuse options that cannot work before anything loads; never replace a given value by a default."""
        if self.top_k is not None and self.samples is not None:
            raise InputError("choose --top-k or --samples, not both")
        if self.top_k is None and self.samples is None:
            self.top_k = 64
        if self.label_logprobs and self.samples:
            raise InputError("--label-logprobs goes with --top-k: a sampled store records draws, not log-probs")
        self.worker_index = worker_index_from_env(self.worker_index, self.num_workers)
        if self.backend is None:
            self.backend = "hf" if self.samples else "vllm"
        if self.samples and self.backend == "vllm":
            raise InputError("--samples needs --backend hf: vLLM returns only the teacher's top-K candidates, so "
                             "its draws would come from the top-K plus one tail bucket, and the loss cannot tell "
                             "that bucket from the unsampled top-K ids (biased gradients; docs/BUILD.md, 'Sampled "
                             "targets'). Use --backend hf (the default with --samples), or --top-k K with vllm")
        if self.sample_from_top_k:
            raise InputError("--sample-from-top-k is not accepted: draws from a top-K plus one tail bucket give "
                             "biased KD gradients (docs/BUILD.md, 'Sampled targets'). Leave it unset: --samples "
                             "draws exactly from the full distribution (--backend hf)")
        if self.domain is not None and self.domain_field:
            raise InputError("choose --domain NAME (one domain for the whole build) or --domain-field FIELD "
                             "(a domain per example), not both")
        if self.domain is not None and not self.domain:
            raise InputError("--domain must be a non-empty name")
        if self.domain_field and self.pack:
            raise InputError("--pack joins examples into one row, which then has no single domain: drop --pack, "
                             "or build one store (or one --domain build) per domain")
        problems = [f"--{f.name.replace('_', '-')} must be a finite number (got {getattr(self, f.name)})"
                    for f in dataclasses.fields(self)  # NaN passes every comparison below, and is not JSON
                    if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]
        if problems:
            raise InputError("; ".join(problems))
        problems = [message for wrong, message in (
            (self.backend not in ("vllm", "hf"), f"--backend {self.backend!r}: choose vllm or hf"),
            (self.top_k is not None and self.top_k < 1, f"--top-k must be at least 1 (got {self.top_k})"),
            (self.samples is not None and not 1 <= self.samples <= 255,
             f"--samples must be in [1, 255] (got {self.samples}): each draw count is stored in one byte"),
            (self.limit is not None and self.limit < 1,
             f"--limit must be at least 1 (got {self.limit}); leave it out to use every example"),
            (self.max_seq_len < 2, f"--max-seq-len must be at least 2 (got {self.max_seq_len})"),
            (license_problem(self.license) is not None, license_problem(self.license)),
            (self.pack and self.generate, "--pack cannot be combined with --generate (responses are not known "
                                          "before the teacher writes them)"),
            (self.generate and self.max_new_tokens < 1,
             f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})"),
            (self.temperature < 0, f"--temperature must be >= 0 (got {self.temperature})"),
            (self.seed < 0, f"--seed must be >= 0 (got {self.seed}): it seeds numpy generators, which refuse "
                            "negative seeds"),
            (self.levels is not None and not 1 <= self.levels <= 255,
             f"--levels must be in [1, 255] (got {self.levels}): a probability is stored in one byte"),
            (not 1 <= self.compression_level <= 22,
             f"--compression-level must be a zstd level in [1, 22] (got {self.compression_level})"),
            (self.shard_tokens < 1, f"--shard-tokens must be at least 1 (got {self.shard_tokens})"),
            (self.record_batch_tokens < 1,
             f"--record-batch-tokens must be at least 1 (got {self.record_batch_tokens})"),
            (self.batch_rows < 1, f"--batch-rows must be at least 1 (got {self.batch_rows})"),
            (self.num_workers < 1, f"--num-workers must be at least 1 (got {self.num_workers})"),
            (not 0 <= self.worker_index < max(self.num_workers, 1),
             f"--worker-index {self.worker_index} not in [0, --num-workers={self.num_workers})"),
            (self.tensor_parallel_size < 1,
             f"--tensor-parallel-size must be at least 1 (got {self.tensor_parallel_size})"),
            (self.max_model_len is not None and self.max_model_len < 2,
             f"--max-model-len must be at least 2 (got {self.max_model_len})"),
            (self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1,
             f"--max-num-batched-tokens must be at least 1 (got {self.max_num_batched_tokens})"),
            (self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1,
             f"--gpu-memory-utilization must be in (0, 1] (got {self.gpu_memory_utilization})"),
            (self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1,
             f"--kv-cache-memory-bytes must be at least 1 (got {self.kv_cache_memory_bytes})"),
        ) if wrong]
        if problems:
            raise InputError("; ".join(problems))


def worker_index_from_env(index: int | None, num_workers: int) -> int:
    """A worker's index: the one given, else the array job's (SLURM_ARRAY_TASK_ID, or JOB_COMPLETION_INDEX of a
    Kubernetes indexed job) when there are several workers, else 0."""
    if index is not None:
        return index
    env = os.environ.get("SLURM_ARRAY_TASK_ID") or os.environ.get("JOB_COMPLETION_INDEX")
    if env and num_workers > 1 and not env.isdigit():
        raise InputError(f"the worker index from the environment ({env!r}) is not a number: pass --worker-index")
    return int(env) if env and num_workers > 1 else 0


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
    domains: dict = field(default_factory=dict)  # rows / tokens / target_positions per domain (Manifest.domains)
    recomputed_rows: int = 0  # rows of a resumed batch that were already stored: the teacher ran on them again
    notes: list = field(default_factory=list)  # what was not read, what a crashed run left and was removed

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds - self.load_seconds, 1e-9)

    def format(self) -> str:
        resumed = (f" ({self.resumed_rows:,} from before the resume; the teacher ran again on "
                   f"{self.recomputed_rows:,} of them to keep its batches as in one run)" if self.recomputed_rows
                   else f" ({self.resumed_rows:,} from before the resume)" if self.resumed_rows else "")
        lines = [f"store           {self.store}",
                 f"rows            {self.rows:,}{resumed}",
                 f"tokens          {self.tokens:,} ({self.target_positions:,} with targets)",
                 f"bytes           {self.bytes:,} ({self.bytes / max(self.tokens, 1):.1f} B/token) in "
                 f"{self.shards} shards",
                 f"input examples  {self.examples:,} read, {self.truncated:,} truncated, "
                 f"{sum(self.skipped.values()):,} skipped",
                 f"time            {self.seconds:.1f} s ({self.load_seconds:.1f} s loading), "
                 f"{self.tokens_per_s:,.0f} tokens/s"]
        if self.domains:
            lines.append(f"domains         {len(self.domains)}: " + ", ".join(
                f"{name} {c['rows']:,} rows ({c['tokens']:,} tokens)" for name, c in self.domains.items()))
        lines += [f"  skipped: {n:,} x {reason}" for reason, n in sorted(self.skipped.items())]
        lines += [f"  e.g. {e}" for e in self.first_errors]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def build(cfg: BuildConfig, teacher: Teacher | None = None) -> BuildSummary:
    """Run one build worker. `teacher` may be passed in to reuse a loaded engine (tests, notebooks).

    What can be checked without the model is checked first (fields, the teacher's config, the output directory
    and its lock, the input files), so that a mistake costs seconds, not a model load."""
    from transformers import AutoTokenizer

    start = time.time()
    fields = FieldSpec(cfg.text_field, cfg.messages_field, cfg.prompt_field, cfg.response_field, cfg.input_ids_field,
                       cfg.response_ids_field, cfg.domain_field)
    fields.mode(cfg.generate)  # fail on bad options before loading anything
    _check_teacher_folder(cfg)
    _check_out_apart_from_inputs(cfg)  # before the lock, which creates --out
    prefix, manifest_name = worker_names(cfg.worker_index, cfg.num_workers)
    lock = OutputLock(cfg.out, manifest_name)  # before anything slow: a second build of this worker stops here
    writer = None
    try:
        if not cfg.resume and storefs.exists(lock.fs, storefs.join(lock.root, manifest_name)):
            raise ManifestError(f"{cfg.out} already holds a store ({manifest_name}): pass --resume to continue it, "
                                "or choose a new --out")
        source = InputSource(cfg.data, cfg.split, cfg.data_format)
        rollouts = rollout_provenance(cfg.data) if os.path.exists(cfg.data) else None
        tok_path = cfg.tokenizer or cfg.teacher
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_path)
        except (OSError, ValueError) as e:
            raise TeacherError(f"cannot load the tokenizer from {tok_path!r}: {e}") from e
        _check_bos(cfg, tokenizer)
        example_tokenizer = ExampleTokenizer(tokenizer, fields, cfg.max_seq_len, cfg.generate, cfg.add_eos)
        dataset = source.load()
        input_fingerprint = source.fingerprint(dataset)
        if teacher is None:
            teacher = load_teacher(cfg.backend, cfg.teacher, **_teacher_options(cfg))
        if len(tokenizer) > teacher.vocab_size:
            raise TeacherError(f"the tokenizer has {len(tokenizer):,} tokens but the teacher's vocabulary is "
                               f"{teacher.vocab_size:,}: they do not belong together")
        manifest = _manifest(cfg, teacher, tokenizer, dataset, fields, input_fingerprint, rollouts)
        _carry_tokenizer(cfg, lock, manifest_name, manifest, tokenizer)
        writer = ShardWriter(cfg.out, manifest, shard_tokens=cfg.shard_tokens, batch_tokens=cfg.record_batch_tokens,
                             prefix=prefix, manifest_name=manifest_name, resume=cfg.resume, lock=lock)
    except BaseException:
        if writer is None:
            lock.release()
        raise
    stats = InputStats()
    done = writer.rows
    summary = BuildSummary(store=cfg.out, resumed_rows=done, load_seconds=time.time() - start,
                           notes=source.notes + [f"removed {name}: left by the crashed run, not in its manifest"
                                                 for name in writer.removed_files])
    examples = iter_examples(dataset, example_tokenizer, stats, cfg.worker_index, cfg.num_workers, cfg.limit)
    if cfg.pack:
        examples = pack_examples(examples, cfg.max_seq_len)
    share = len(range(cfg.worker_index, min(cfg.limit or len(dataset), len(dataset)), cfg.num_workers))
    bar = _progress(cfg, share)
    first_batch_row = done - done % cfg.batch_rows  # the batch the first missing row belongs to starts here
    try:
        row = 0  # rows of this worker's share seen so far
        batch: list[Example] = []
        for ex in examples:
            row += 1
            if row <= first_batch_row:  # in complete shards, in batches that ended there: no teacher needed
                continue
            batch.append(ex)
            if len(batch) == cfg.batch_rows:
                summary.new_tokens += _process(batch, cfg, teacher, writer, tokenizer, _stored(done, row, batch))
                batch = []
                _update(bar, stats, summary, start)
        if batch:
            summary.new_tokens += _process(batch, cfg, teacher, writer, tokenizer, _stored(done, row, batch))
        if row < done:
            raise ManifestError(f"{cfg.out}: the store holds {done} rows but the input now yields only "
                                f"{row}: the input changed since the build started")
        summary.recomputed_rows = done - first_batch_row
        if writer.rows == 0 and cfg.num_workers == 1:
            raise InputError(f"{cfg.data}: no row to store: all {stats.examples:,} input examples were skipped ("
                             + "; ".join(f"{n:,} x {r}" for r, n in stats.skipped.most_common(3)) + ")")
        if writer.manifest.tokenizer.get("files"):  # the tokenizer the manifest says the store carries
            from .store_tokenizer import save_tokenizer

            save_tokenizer(writer.fs, writer.root, tokenizer)
        final = writer.close()
    except BaseException:
        if writer.rows == 0:
            writer.discard()
        else:
            writer.abort()
        raise
    finally:
        if bar is not None:
            _update(bar, stats, summary, start)
            bar.close()
    if cfg.num_workers == 1:  # a worker's part is not a store yet: `kdstore merge` writes the card
        write_card(writer.fs, writer.root, final)
    summary.rows, summary.tokens, summary.domains = final.rows, final.tokens, final.domains
    summary.target_positions, summary.bytes, summary.shards = final.target_positions, final.bytes, len(final.shards)
    summary.examples, summary.truncated = stats.examples, stats.truncated
    located = source.locate(stats.first_rows)
    summary.skipped = dict(stats.skipped)
    summary.first_errors = [f"{e} ({located[i]})" if i in located else e
                            for e, i in zip(stats.first_errors, stats.first_rows, strict=True)]
    summary.seconds = time.time() - start
    return summary


def _stored(done: int, row: int, batch: list[Example]) -> int:
    """How many rows at the head of `batch` (its last row is row number `row` of the share) the store holds."""
    return min(max(done - (row - len(batch)), 0), len(batch))


def _process(batch: list[Example], cfg: BuildConfig, teacher: Teacher, writer: ShardWriter, tokenizer,
             stored: int = 0) -> int:
    """Teacher targets for a batch of rows (generating responses first with --generate), then write them, less the
    first `stored` rows (stored before a resume: the teacher sees the whole batch, as in an uninterrupted run)."""
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
        targets = teacher.sample(rows, cfg.samples, seeds, None)  # exact draws (BuildConfig refuses top-K draws)
    else:
        targets = teacher.topk(rows, cfg.top_k)
    for ex, tgt in zip(batch[stored:], targets[stored:], strict=True):
        writer.write(StoreRow(ex.input_ids, ex.loss_mask, tgt, ex.source_index, ex.domain or cfg.domain))
    return sum(ex.input_ids.size for ex in batch[stored:])


def _check_teacher_folder(cfg: BuildConfig) -> None:
    """A local teacher must be a readable model folder, and --top-k within its vocabulary:
    read from config.json, before any weight is loaded. (A hub name is checked when it loads.)"""
    check_teacher_path(cfg.teacher)
    folder = os.path.expanduser(cfg.teacher)
    if not os.path.isdir(folder):
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot read the teacher's config in {cfg.teacher} ({e}); a teacher is a transformers "
                           "model folder (config.json + weights); for a GGUF file run kdstore prepare-teacher") from e
    names = os.listdir(folder)
    if not any(n.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")) for n in names):
        raise TeacherError(f"the teacher folder {cfg.teacher} holds no weights (*.safetensors, *.bin, ...): "
                           f"found {sorted(names)}")
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    for option, k in (("--top-k", cfg.top_k),):
        if vocab and k and k > vocab:
            raise InputError(f"{option} {k} exceeds the teacher's vocabulary of {vocab:,} tokens "
                             f"({os.path.join(cfg.teacher, 'config.json')})")


def _check_out_apart_from_inputs(cfg: BuildConfig) -> None:
    """Refuse an --out that is, contains or is inside an input (--data, --teacher, --tokenizer): the build writes
    shards, manifests and README.md there (and a resume deletes files it takes for its own), so an input there
    could be overwritten. Inputs that are not local paths (hub names) have no place to collide with."""
    for option, value in (("--data", cfg.data), ("--teacher", cfg.teacher), ("--tokenizer", cfg.tokenizer)):
        if not value:
            continue
        where, local = storefs.location(value)
        if local and not os.path.lexists(where):
            continue  # a hub name, or a path that does not exist (refused where it is read)
        relation = storefs.overlap(cfg.out, value)
        if relation:
            raise InputError(f"--out {cfg.out} {relation} the {option} input {value}: a build writes its shards, "
                             "manifest and README.md into --out and may delete files there, so it could destroy "
                             "that input. Choose an --out outside every input")


def _manifest(cfg: BuildConfig, teacher: Teacher, tokenizer, dataset, fields: FieldSpec,
              input_fingerprint: str, rollouts: dict | None = None) -> Manifest:
    from .fingerprint import describe_tokenizer

    if cfg.samples:
        target = TargetSpec("sampled", samples=cfg.samples)
    else:
        labels = cfg.label_logprobs if cfg.label_logprobs is not None else rollouts is not None
        target = TargetSpec("topk", k=cfg.top_k, label_logprobs=labels)
    source = {"source": cfg.data, "split": cfg.split, "fingerprint": input_fingerprint,
              "examples": len(dataset), "limit": cfg.limit, "fields": fields.used(), "num_workers": cfg.num_workers}
    if cfg.domain is not None:  # only when set, so that stores without domains keep their fingerprint
        source["domain"] = cfg.domain
    if cfg.license is not None:  # the same: stores built without --license keep their fingerprint
        source["license"] = cfg.license
    if rollouts is not None:  # a policy's samples (kdstudent generate): which policy, how sampled, which round
        source["rollouts"] = rollouts
    return Manifest(
        target=target, vocab_size=teacher.vocab_size,
        codec=CodecSpec(name=CODEC_NAMES[cfg.codec], levels=cfg.levels or default_levels(CODEC_NAMES[cfg.codec]),
                        compression_level=cfg.compression_level),
        teacher=teacher.describe(),
        tokenizer=describe_tokenizer(tokenizer, cfg.tokenizer or cfg.teacher),
        input=source,
        sequence={"max_seq_len": cfg.max_seq_len, "packing": cfg.pack, "add_eos": cfg.add_eos,
                  "generate": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}
                  if cfg.generate else None, "seed": cfg.seed,
                  # --pack concatenates the examples of one worker's share: N workers cut other rows than one
                  **({"pack_scope": "worker share" if cfg.num_workers > 1 else "all examples"} if cfg.pack else {})},
    )


def _carry_tokenizer(cfg: BuildConfig, lock: OutputLock, manifest_name: str, manifest: Manifest, tokenizer) -> None:
    """Record the manifest's `tokenizer.files`: the store will carry its tokenizer (`store_tokenizer`, written when
    the worker closes its part, so a build that stores nothing leaves nothing), and a training node reads the rows
    as text (a student of another tokenizer) without the teacher's folder. A resumed build of a store begun before
    stores carried their tokenizer keeps its manifest as it was (its settings, and so its fingerprint, must not
    change mid-build)."""
    from .store_tokenizer import TOKENIZER_DIR

    if cfg.resume and storefs.exists(lock.fs, storefs.join(lock.root, manifest_name)):
        if "files" not in Manifest.load(lock.fs, lock.root, manifest_name).tokenizer:
            return
    manifest.tokenizer["files"] = TOKENIZER_DIR


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
    options = VLLMOptions(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(VLLMOptions)})
    return dict(dtype=dtype, max_logprobs=max(cfg.top_k or 0, 20), seed=cfg.seed,
                options=dataclasses.replace(options, max_model_len=cfg.max_model_len or context))


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


def merge_workers(store: str, allow_incomplete: bool = False) -> Manifest:
    """Combine the worker manifests of a multi-worker build into manifest.json (`kdstore merge`), and write the
    store's dataset card (README.md, `card.write_card`), which no worker writes."""
    fs, root = storefs.resolve(store)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        m = WORKER_MANIFEST.fullmatch(info.base_name)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), info.base_name)
    if not found:
        raise ManifestError(f"{store}: no worker manifests (manifest-wIIIII-of-NNNNN.json) to merge")
    counts = {n for n, _ in found.values()}
    if len(counts) != 1:
        raise ManifestError(f"{store}: worker manifests of different worker counts {sorted(counts)}")
    (count,) = counts
    missing = sorted(set(range(count)) - set(found))
    parts = [Manifest.load(fs, root, found[i][1]) for i in sorted(found)]
    incomplete = [i for i, p in zip(sorted(found), parts, strict=True) if p.status != "complete"]
    if (missing or incomplete) and not allow_incomplete:
        raise ManifestError(f"{store}: workers {missing} have not started and workers {incomplete} have not "
                            "finished; rerun them (with --resume), or merge anyway with --allow-incomplete")
    if len({p.fingerprint() for p in parts}) != 1:
        workers = sorted(found)
        j = next(j for j, p in enumerate(parts) if p.fingerprint() != parts[0].fingerprint())
        differ = "; ".join(parts[0].differences(parts[j]))
        raise ManifestError(f"{store}: the workers were run with different settings; they cannot form one store "
                            f"(worker {workers[0]} vs worker {workers[j]}: {differ})")
    merged = dataclasses.replace(parts[0], shards=[s for p in parts for s in p.shards],
                                 status="complete" if not (missing or incomplete) else "in_progress")
    if merged.status == "complete" and not merged.shards:
        raise ManifestError(f"{store}: none of the {count} workers stored a row (their inputs were empty or every "
                            "example was skipped: each worker's build summary counts the skips); check --data and "
                            "--text-field, then build again")
    merged.save(fs, root)
    write_card(fs, root, merged)
    return merged
