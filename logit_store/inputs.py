"""Input stage: a dataset (files, a saved dataset, or a hub name) -> token rows with loss masks.

Bad examples never stop a build and are never lost silently: each is skipped with a reason that the build
summary counts (and the first few are shown with their row number and field).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
                  ".txt": "text"}


class InputError(ValueError):
    """The input cannot be used at all (missing file, unknown field, bad options)."""


@dataclass
class FieldSpec:
    """Which fields hold the data, and how a row's loss mask follows from them."""

    text_field: str | None = None  # plain text, loss on every token
    messages_field: str | None = None  # chat messages, loss on assistant turns
    prompt_field: str | None = None  # prompt (+ response): loss on the response
    response_field: str | None = None
    input_ids_field: str | None = None  # pre-tokenised, loss on every token
    domain_field: str | None = None  # a string field naming each example's domain (code, chat, ...)

    def mode(self, generate: bool = False) -> str:
        chosen = [m for m, f in (("text", self.text_field), ("messages", self.messages_field),
                                 ("prompt", self.prompt_field), ("input_ids", self.input_ids_field)) if f]
        if len(chosen) != 1:
            raise InputError("choose exactly one of --text-field, --messages-field, --prompt-field "
                             f"(+ --response-field), --input-ids-field (got {chosen or 'none'})")
        mode = chosen[0]
        if mode == "prompt" and not self.response_field and not generate:
            raise InputError("--prompt-field needs --response-field, or --generate to let the teacher answer")
        if generate and mode not in ("prompt", "messages"):
            raise InputError("--generate needs prompts: --prompt-field or --messages-field")
        return mode

    def used(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass
class Example:
    """One input example turned into tokens: a full row, or a prompt awaiting the teacher's response."""

    source_index: int
    input_ids: np.ndarray
    loss_mask: np.ndarray | None  # None: a prompt for --generate
    truncated: bool = False
    domain: str | None = None  # from FieldSpec.domain_field


@dataclass
class InputStats:
    examples: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def skip(self, index: int, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"input row {index}: {reason}{': ' + detail if detail else ''}")


def load_input(data: str, split: str = "train", data_format: str | None = None):
    """Local file(s) by extension, a `save_to_disk` directory, or a hub dataset name -> datasets.Dataset."""
    import datasets

    if os.path.isdir(data) and os.path.exists(os.path.join(data, "dataset_info.json")):
        ds = datasets.load_from_disk(data)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    files = [data] if os.path.isfile(data) else []
    if os.path.isdir(data):
        files = sorted(os.path.join(data, f) for f in os.listdir(data) if os.path.splitext(f)[1] in _FILE_BUILDERS)
    if files:
        ext = os.path.splitext(files[0])[1]
        builder = data_format or _FILE_BUILDERS.get(ext)
        if builder is None:
            raise InputError(f"{data}: unknown file type {ext!r}; pass --data-format (json, parquet, csv, arrow)")
        return datasets.load_dataset(builder, data_files=files, split="train")
    if os.path.exists(data) or data.startswith((".", "/")):
        raise InputError(f"{data}: no dataset files found (expected .jsonl/.json/.parquet/.csv/.arrow/.txt "
                         "or a directory saved with Dataset.save_to_disk)")
    try:
        return datasets.load_dataset(data, split=split)
    except Exception as e:  # the hub may be unreachable, or the name wrong: say which input failed
        raise InputError(f"{data}: not a local file or directory, and loading it as a hub dataset failed "
                         f"({type(e).__name__}: {e})") from e


class ExampleTokenizer:
    """Turns dataset records into `Example`s for one field mode."""

    def __init__(self, tokenizer, fields: FieldSpec, max_seq_len: int, generate: bool = False,
                 add_eos: bool = True):
        self.tok, self.fields, self.max_seq_len = tokenizer, fields, max_seq_len
        self.mode = fields.mode(generate)
        self.generate = generate
        self.eos = tokenizer.eos_token_id if add_eos else None
        if self.mode == "messages" and not getattr(tokenizer, "chat_template", None):
            raise InputError("--messages-field needs a tokenizer with a chat template; this one has none")

    def __call__(self, index: int, record: dict, stats: InputStats) -> Example | None:
        try:
            ids, mask = getattr(self, f"_{self.mode}")(record)
            domain = self._field(record, self.fields.domain_field) if self.fields.domain_field else None
        except _Skip as s:
            stats.skip(index, s.reason, s.detail)
            return None
        truncated = ids.size > self.max_seq_len
        if truncated:
            ids = ids[: self.max_seq_len]
            mask = None if mask is None else mask[: self.max_seq_len]
            stats.truncated += 1
        if ids.size < 2 and mask is not None:
            stats.skip(index, "fewer than 2 tokens")
            return None
        if mask is not None:
            mask[0] = False
            if not mask.any():
                stats.skip(index, "no loss token left after truncation" if truncated else "no loss token")
                return None
        if mask is None and ids.size >= self.max_seq_len:
            stats.skip(index, "prompt leaves no room for a response within --max-seq-len")
            return None
        return Example(index, ids, mask, truncated, domain)

    # ------------------------------------------------------------ field modes
    def _field(self, record: dict, name: str, kind: type | tuple = str):
        if name not in record:
            raise InputError(f"field {name!r} not in the input (fields: {sorted(record)})")
        value = record[name]
        if value is None:
            raise _Skip(f"field {name!r} is missing")
        if not isinstance(value, kind):
            raise _Skip(f"field {name!r} is not {getattr(kind, '__name__', kind)}", f"got {type(value).__name__}")
        if isinstance(value, str | list) and len(value) == 0:
            raise _Skip(f"field {name!r} is empty")
        return value

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special).input_ids

    def _text(self, record: dict):
        ids = self._encode(self._field(record, self.fields.text_field), True)
        if self.eos is not None:
            ids = ids + [self.eos]
        ids = np.asarray(ids, dtype=np.int64)
        return ids, np.ones(ids.size, bool)

    def _input_ids(self, record: dict):
        raw = self._field(record, self.fields.input_ids_field, list)
        if not all(isinstance(t, int | np.integer) for t in raw):
            raise _Skip(f"field {self.fields.input_ids_field!r} holds non-integers")
        ids = np.asarray(raw, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= len(self.tok):
            raise _Skip("token id outside the tokenizer's vocabulary", f"max id {int(ids.max())}")
        return ids, np.ones(ids.size, bool)

    def _prompt(self, record: dict):
        prompt = self._encode(self._field(record, self.fields.prompt_field), True)
        if self.generate:
            return np.asarray(prompt, dtype=np.int64), None
        response = self._encode(self._field(record, self.fields.response_field), False)
        if self.eos is not None:
            response = response + [self.eos]
        ids = np.asarray(prompt + response, dtype=np.int64)
        mask = np.zeros(ids.size, bool)
        mask[len(prompt):] = True
        return ids, mask

    def _messages(self, record: dict):
        messages = self._field(record, self.fields.messages_field, list)
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise _Skip("a message is not a {'role', 'content'} dict with text content")
        render = self.tok.apply_chat_template
        if self.generate:
            prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            text = render(prompt, tokenize=False, add_generation_prompt=True)
            return np.asarray(self._encode(text, False), dtype=np.int64), None
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise _Skip("chat has no assistant turn")
        text = render(messages, tokenize=False)
        spans = []
        for i in turns:
            head = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = render(messages[: i + 1], tokenize=False)
            if not (text.startswith(head) and text.startswith(upto)):
                raise InputError("the chat template does not render a conversation's prefix as a prefix of the "
                                 "whole conversation, so assistant tokens cannot be located; use "
                                 "--prompt-field/--response-field instead")
            spans.append((len(head), len(upto)))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.array([s for s, _ in enc.offset_mapping])
        mask = np.zeros(len(enc.input_ids), bool)
        for lo, hi in spans:
            mask |= (starts >= lo) & (starts < hi)
        return np.asarray(enc.input_ids, dtype=np.int64), mask


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def iter_examples(dataset, tokenizer: ExampleTokenizer, stats: InputStats, worker_index: int = 0,
                  num_workers: int = 1, limit: int | None = None) -> Iterator[Example]:
    """This worker's share of the input (example i goes to worker i % num_workers), tokenised."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(worker_index, n, num_workers):
        stats.examples += 1
        ex = tokenizer(i, dataset[i], stats)
        if ex is not None:
            yield ex


def pack_examples(examples: Iterator[Example], max_seq_len: int) -> Iterator[Example]:
    """Concatenate examples into rows of exactly max_seq_len tokens (the last row may be shorter).

    Each example keeps its own loss mask (its first token carries none); a row's source_index is the example
    its first token comes from. Documents attend to the ones before them in the row, as in pretraining.
    """
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    size, first = 0, -1
    for ex in examples:
        if size == 0:
            first = ex.source_index
        ids.append(ex.input_ids)
        masks.append(ex.loss_mask)
        size += ex.input_ids.size
        while size >= max_seq_len:
            row_ids, row_mask = np.concatenate(ids), np.concatenate(masks)
            out_mask = row_mask[:max_seq_len].copy()
            out_mask[0] = False
            if out_mask.any():
                yield Example(first, row_ids[:max_seq_len], out_mask)
            ids, masks = [row_ids[max_seq_len:]], [row_mask[max_seq_len:]]
            size -= max_seq_len
            first = ex.source_index
    if size >= 2:
        row_ids, row_mask = np.concatenate(ids), np.concatenate(masks)
        row_mask[0] = False
        if row_mask.any():
            yield Example(first, row_ids, row_mask)
