"""The dataset card (`README.md`) of a store, so that a store directory can be published as a dataset as it is.

`kdstore build` (single worker) and `build.merge_workers` (`kdstore merge`) write it; `kdstore info STORE --card`
prints it again. It is a pure function of the manifest, so the card printed for a store is byte for byte the
file its build wrote, on any copy of the store. Its YAML front matter is what the Hugging Face Hub reads for a
dataset (license, tags, size, and `configs` pointing `datasets` at the shard files); its body says what the
store holds, how it was built and how to load it.

The card is not part of the store (docs/FORMAT.md §1): readers never look at it, and a store without one is just
as valid. The license it declares is the manifest's `input.license` (`kdstore build --license`), recorded only when
given so that stores built without it keep their fingerprint.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from . import fs as storefs
from .format import BUILD_SHARD_PREFIX, SHARD_FILE

if TYPE_CHECKING:
    from .manifest import Manifest

CARD_NAME = "README.md"
# license when the build was given none: a valid Hub id that says so, rather than claiming a license
UNKNOWN_LICENSE = "unknown"
# the form of a Hugging Face Hub license id (apache-2.0, cc-by-nc-4.0, llama3.1, openrail++, other, unknown): the
# Hub refuses a card whose license is not on its list; the list grows, so only the form is checked here
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")
_TAG_CHARS = re.compile(r"[^a-z0-9._-]+")
# Hub `size_categories` by number of rows (examples)
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
          (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T"))
_DEFAULT_DTYPE = "float32"  # what --dtype auto records: omitted from the reconstructed command


def license_problem(value: str | None) -> str | None:
    """Why `value` cannot be a store's license (None if it can): checked before a build starts, so that a typo
    does not surface only when the Hub refuses the card."""
    if value is None or LICENSE_ID.fullmatch(value):
        return None
    return (f"--license {value!r} is not a Hugging Face Hub license id (lower case, like apache-2.0, mit, cc-by-4.0, "
            "cc-by-nc-4.0, llama3.1, other, unknown: https://huggingface.co/docs/hub/repositories-licenses)")


def store_license(manifest: Manifest) -> str:
    """The license the store declares: its manifest's `input.license`, or `unknown` for a build given none."""
    return manifest.input.get("license") or UNKNOWN_LICENSE


def data_files(manifest: Manifest) -> list[str]:
    """Glob patterns, relative to the store directory, that select the manifest's shard files.

    One pattern for the shards `kdstore build` writes (`shard-NNNNN.arrow` and `shard-wIIIII-NNNNN.arrow`), one per
    writer prefix otherwise, none covering another's files (`datasets` would load them twice). A complete store
    holds no unlisted file named like its shards (readers refuse it), so they select the listed shards."""
    prefixes = {m.group(1) for s in manifest.shards if (m := SHARD_FILE.fullmatch(s.file))}
    prefixes = {"shard" if BUILD_SHARD_PREFIX.fullmatch(p) else p for p in prefixes} or {"shard"}
    return [f"{p}-*.arrow" for p in sorted(prefixes) if not any(p.startswith(f"{q}-") for q in prefixes)]


def build_command(manifest: Manifest) -> list[str]:
    """The `kdstore build` command (and, for several workers, the merge) that writes a store like this one,
    reconstructed from its manifest. Options the manifest does not record (shard and record-batch sizes, rows per
    teacher call, the input's format when not its extension, vLLM engine settings) are left out."""
    teacher, inp, seq = manifest.teacher, manifest.input, manifest.sequence
    args = ["kdstore", "build", "--teacher", str(teacher.get("name_or_path") or "TEACHER")]
    if teacher.get("backend"):
        args += ["--backend", str(teacher["backend"])]
    if teacher.get("dtype") and teacher["dtype"] != _DEFAULT_DTYPE:
        args += ["--dtype", str(teacher["dtype"])]
    tokenizer = manifest.tokenizer.get("name_or_path")
    if tokenizer and tokenizer != teacher.get("name_or_path"):
        args += ["--tokenizer", str(tokenizer)]
    args += ["--data", str(inp.get("source") or "DATA")]
    if inp.get("split") not in (None, "train"):
        args += ["--split", str(inp["split"])]
    for name, value in (inp.get("fields") or {}).items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    if inp.get("domain") is not None:
        args += ["--domain", str(inp["domain"])]
    if inp.get("limit") is not None:
        args += ["--limit", str(inp["limit"])]
    t = manifest.target
    args += ["--top-k", str(t.k)] if t.kind == "topk" else ["--samples", str(t.samples)]
    if "max_seq_len" in seq:
        args += ["--max-seq-len", str(seq["max_seq_len"])]
    if seq.get("packing"):
        args.append("--pack")
    if seq.get("add_eos") is False:
        args.append("--no-add-eos")
    generate = seq.get("generate")
    if generate:
        args += ["--generate", "--max-new-tokens", str(generate.get("max_new_tokens")),
                 "--temperature", str(generate.get("temperature"))]
    if seq.get("seed"):
        args += ["--seed", str(seq["seed"])]
    from .codecs import CODEC_NAME_V2, default_levels
    from .manifest import CodecSpec  # the defaults `kdstore build` uses (BuildConfig takes them from here)

    if manifest.codec.name == CODEC_NAME_V2:
        args += ["--codec", "v2"]
    if manifest.codec.levels != default_levels(manifest.codec.name):
        args += ["--levels", str(manifest.codec.levels)]
    if manifest.codec.compression_level != CodecSpec.compression_level:
        args += ["--compression-level", str(manifest.codec.compression_level)]
    if inp.get("license"):
        args += ["--license", str(inp["license"])]
    workers = int(inp.get("num_workers") or 1)
    if workers > 1:
        args += ["--num-workers", str(workers), "--worker-index", "I"]
    lines = [" ".join(shlex.quote(a) for a in args + ["--out", "STORE"])]
    if workers > 1:
        lines = [f"# once per worker I = 0 … {workers - 1}, then the merge", lines[0], "kdstore merge STORE"]
    return lines


def render_card(manifest: Manifest) -> str:
    """The store's dataset card (Markdown with YAML front matter), from its manifest alone."""
    return _front_matter(manifest) + "\n" + _body(manifest)


def write_card(fs: pafs.FileSystem, root: str, manifest: Manifest) -> str:
    """Write the card as `README.md` in the store directory, atomically (temp name + rename, like the manifest,
    so a reader of the directory never sees half a card); returns its path."""
    path = storefs.join(root, CARD_NAME)
    storefs.write_atomic(fs, path, render_card(manifest).encode())
    return path


# ---------------------------------------------------------------- front matter
def _yaml_str(value: str) -> str:
    """A YAML double-quoted scalar: JSON's string syntax is a subset of it (ASCII-escaped, so no line breaks)."""
    return json.dumps(value)


def _teacher_tag(manifest: Manifest) -> str:
    name = str(manifest.teacher.get("name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
    return _TAG_CHARS.sub("-", name.lower()).strip("-.")[:64]


def _size_category(rows: int) -> str:
    return next((label for bound, label in _SIZES if rows < bound), "n>1T")


def _front_matter(manifest: Manifest) -> str:
    kind_tag = "top-k-targets" if manifest.target.kind == "topk" else "sampled-targets"
    tags = ["knowledge-distillation", "logit-store", "moekd", kind_tag]
    teacher_tag = _teacher_tag(manifest)
    if teacher_tag and teacher_tag not in tags:
        tags.append(teacher_tag)
    lines = ["---", f"license: {store_license(manifest)}", f"pretty_name: {_yaml_str(_title(manifest))}", "tags:"]
    lines += [f"- {_yaml_str(tag)}" for tag in tags]
    lines += ["task_categories:", "- text-generation", "size_categories:", f"- {_size_category(manifest.rows)}",
              "configs:", "- config_name: default", "  data_files:"]
    lines += [f"  - split: train\n    path: {_yaml_str(p)}" for p in data_files(manifest)]
    lines.append("---")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- body
def _title(manifest: Manifest) -> str:
    teacher = str(manifest.teacher.get("name_or_path") or "a teacher").rstrip("/").rsplit("/", 1)[-1]
    t = manifest.target
    what = f"top-{t.k}" if t.kind == "topk" else f"{t.samples} sampled"
    return f"Logit store: {what} targets of {teacher}"


def _cell(value: Any) -> str:
    """A table cell: code-formatted, with the characters that would break a Markdown table escaped."""
    if value is None or value == "":
        return "not recorded"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _count(value: Any, unit: str = "") -> str:
    """A recorded count with thousands separators and its unit, or `not recorded`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}{unit}"
    return _cell(value) + (unit if value not in (None, "") else "")


def _targets(manifest: Manifest) -> str:
    t = manifest.target
    if t.kind == "topk":
        return (f"top-{t.k}: the teacher's {t.k} most likely next tokens at every predicted position, with their "
                "probabilities, and the probability mass of all other tokens (the tail)")
    source = (f"its top-{t.sampled_from_top_k} candidates (draws outside them counted in the tail)"
              if t.sampled_from_top_k else "its full distribution (exact: count / N is an unbiased estimate of the "
              "teacher's probability of every token; RS-KD)")
    return f"sampled, N = {t.samples}: {t.samples} draws per predicted position from {source}, as ids with counts"


def _counts_table(manifest: Manifest) -> list[str]:
    lines = ["| | rows | tokens | tokens with targets |", "|---|---:|---:|---:|",
             f"| total | {manifest.rows:,} | {manifest.tokens:,} | {manifest.target_positions:,} |"]
    for name, c in manifest.domains.items():
        lines.append(f"| domain {_cell(name)} | {c['rows']:,} | {c['tokens']:,} | {c['target_positions']:,} |")
    return lines


def _body(manifest: Manifest) -> str:
    m, teacher, tok, inp, seq = manifest, manifest.teacher, manifest.tokenizer, manifest.input, manifest.sequence
    status = ("complete" if m.status == "complete" else
              "in progress: the build has not finished; the figures below count the shards listed so far")
    per_token = f"{m.bytes / m.tokens:.1f}" if m.tokens else "n/a"
    license_id = store_license(m)
    license_note = ("not declared: the build was given no `--license`; the terms of the input data and of the "
                    "teacher model apply" if license_id == UNKNOWN_LICENSE else
                    f"`{license_id}`, as declared by whoever built it (`kdstore build --license`); the terms of the "
                    "input data and of the teacher model apply as well")
    tok_fp = _cell(tok.get("fingerprint"))
    if tok.get("fingerprint") and tok.get("fingerprint_version"):
        tok_fp += f" (version {tok['fingerprint_version']})"
    codec = m.codec
    fields = ", ".join(f"{k.removesuffix('_field')}: `{v}`" for k, v in (inp.get("fields") or {}).items())
    out = [
        f"# {_title(m)}",
        "",
        "A teacher model's next-token distributions over a dataset, captured once by `kdstore build` (moekd, "
        "offline knowledge distillation) so that students distil from them without running the teacher. This "
        "card is generated from the store's `manifest.json` (`kdstore info STORE --card` prints it again); it is "
        "not part of the store, and readers ignore it.",
        "",
        f"- **Status**: {status}",
        f"- **Store fingerprint**: `{m.fingerprint()}` (stores with the same fingerprint hold the same teacher, "
        "tokenizer, targets, codec, input and sequence settings)",
        f"- **License**: {license_note}",
        f"- **Format**: `{m.format}` version {m.format_version}, written by {m.tool.get('name') or 'moekd'} "
        f"{m.tool.get('version') or ''}, started {m.created}",
        "",
        "## Contents",
        "",
        *_counts_table(m),
        "",
        f"{m.bytes:,} bytes in {len(m.shards):,} shard file(s), {per_token} bytes per token.",
        "",
        "## Teacher and targets",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {_cell(teacher.get('name_or_path'))} |",
        f"| teacher fingerprint | {_cell(teacher.get('fingerprint'))} |",
        f"| backend | {_cell(teacher.get('backend'))} |",
        f"| dtype | {_cell(teacher.get('dtype'))} |",
        f"| tokenizer | {_cell(tok.get('name_or_path'))} |",
        f"| tokenizer fingerprint | {tok_fp} |",
        f"| tokenizer vocabulary | {_count(tok.get('vocab_size'), ' tokens')} |",
        f"| teacher vocabulary | {m.vocab_size:,} ids |",
        f"| targets | {_targets(m)} |",
        f"| codec | {_cell(codec.name)}, {codec.levels} levels, {codec.id_bytes}-byte ids, {codec.compression} "
        f"level {codec.compression_level} |",
        "",
        "## Input",
        "",
        "| | |",
        "|---|---|",
        f"| data | {_cell(inp.get('source'))} |",
        f"| split | {_cell(inp.get('split'))} |",
        f"| input fingerprint | {_cell(inp.get('fingerprint'))} |",
        f"| fields | {fields or 'not recorded'} |",
        f"| examples | {_count(inp.get('examples'), ' in the input')}"
        + (f", the first {_count(inp['limit'])} used" if inp.get("limit") is not None else "") + " |",
        f"| max sequence length | {_count(seq.get('max_seq_len'), ' tokens')}"
        + (", examples packed into full rows" if seq.get("packing") else "") + " |",
        "",
        "## How it was built",
        "",
        "Reconstructed from `manifest.json`; options the manifest does not record (`--shard-tokens`, "
        "`--record-batch-tokens`, `--batch-rows`, `--data-format`, vLLM engine settings) are left out:",
        "",
        "```bash",
        *build_command(m),
        "```",
        "",
        "## Loading it",
        "",
        "`STORE` below is this directory; a copy on the Hugging Face Hub downloads with "
        "`huggingface_hub.snapshot_download(\"OWNER/NAME\", repo_type=\"dataset\", local_dir=\"STORE\")`.",
        "",
        "With moekd, which checks every shard against the manifest (sizes, sha256) and decodes the targets:",
        "",
        "```python",
        "from logit_store import KDStream, LogitStore",
        "",
        "store = LogitStore.open(\"STORE\")   # also s3://, gs://, any fsspec URL",
        "row = store.row(0)                 # input_ids, loss_mask, target_ids, target_logprobs, target_mask, "
        "target_tail",
        "stream = KDStream(\"STORE\", batch_size=8, seed=0)   # padded torch batches for training",
        "```",
        "",
        "```bash",
        "kdstore verify STORE",
        "kdstudent train --store STORE --base STUDENT_DIR --out RUN   # a student with the teacher's tokenizer",
        "```",
        "",
        "With Hugging Face `datasets` (the shards are Arrow IPC files; this card's `configs` point at them):",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        "ds = load_dataset(\"OWNER/NAME\", split=\"train\")   # from the Hub, or a local copy:",
        f"ds = load_dataset(\"arrow\", data_files=\"STORE/{data_files(m)[0]}\", split=\"train\")",
        "```",
        "",
        "`input_ids`, `loss_mask` (true where a token is predicted from the tokens before it) and `source_index` (the "
        "input example) are plain columns" + (", and `domain` the row's domain" if m.domains else "") + "; the "
        "`target_*` columns hold the targets encoded as bytes (codec `" + codec.name + "`, moekd's docs/FORMAT.md "
        "§4), which moekd decodes.",
        "",
    ]
    return "\n".join(out)
