"""Input stage: a dataset (files, a saved dataset, or a hub name) -> token rows with loss masks.

Bad examples never stop a build and are never lost silently: each is skipped with a reason that the build
summary counts (and the first few are shown with their row number, file and line). A file that cannot be read
at all (not UTF-8, a line that is not JSON, an unknown or mixed format, an empty input) stops the build before
the teacher loads, with a message naming the file and line and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
                  ".txt": "text"}
# compressed files that datasets decompresses itself (zstd only with the zstandard package installed)
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_TEXT_BUILDERS = ("json", "csv", "text")
# A row keeps at most --max-seq-len tokens, so a longer text is tokenised only as far as they need: its first
# (tokens + margin) x _CHARS_PER_TOKEN characters, 4x more each time that holds too few tokens. Whole-text
# tokenisation of one 50 MB line took a minute and 7 GB. The margin keeps the cut far from the kept tokens (a
# token at the cut may merge differently from the whole text), so the kept tokens are the whole text's.
_CHARS_PER_TOKEN = 16  # generous: English BPE averages about 4 characters a token
_CUT_MARGIN_TOKENS = 32


class InputError(ValueError):
    """The input cannot be used at all (missing file, unknown field, bad options)."""


@dataclass
class FieldSpec:
    """Which fields hold the data, and how a row's loss mask follows from them."""

    text_field: str | None = None  # plain text, loss on every token
    messages_field: str | None = None  # chat messages, loss on assistant turns
    prompt_field: str | None = None  # prompt (+ response): loss on the response
    response_field: str | None = None
    input_ids_field: str | None = None  # pre-tokenised, loss on every token (or, with response ids, on those)
    response_ids_field: str | None = None  # pre-tokenised response to input_ids (student rollouts): loss on it
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
        if self.response_field and mode != "prompt":
            raise InputError("--response-field goes with --prompt-field (pre-tokenised: --input-ids-field with "
                             "--response-ids-field)")
        if self.response_ids_field and (mode != "input_ids" or generate):
            raise InputError("--response-ids-field goes with --input-ids-field (the prompt's ids), without --generate")
        if generate and mode == "text":
            raise InputError("--generate needs prompts: --prompt-field, --messages-field or --input-ids-field")
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
    first_rows: list[int] = field(default_factory=list)  # the input rows first_errors are about

    def skip(self, index: int, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"input row {index}: {reason}{': ' + detail if detail else ''}")
            self.first_rows.append(index)


class InputSource:
    """Where a build's examples come from: local files of one format, a `save_to_disk` folder, or a hub name.

    The constructor reads no data but refuses an input a build could not use whole: a folder holding files of an
    unknown type or of several formats, zstd files without the `zstandard` package, an input with no bytes.
    Names starting with '.' or '_' in a folder (`.DS_Store`, Spark's `_SUCCESS`) are not read; `notes` names
    them for the build summary.
    """

    def __init__(self, data: str, split: str = "train", data_format: str | None = None):
        self.data, self.split, self.data_format = data, split, data_format
        self.files: list[str] = []  # local data files, in the order their rows are read
        self.builder: str | None = None  # the datasets builder that reads them (json, parquet, csv, arrow, text)
        self.notes: list[str] = []
        self.saved = os.path.isdir(data) and os.path.exists(os.path.join(data, "dataset_info.json"))
        if self.saved:
            return
        if os.path.isfile(data):
            self.files = [data]
        elif os.path.isdir(data):
            self.files, hidden = _walk(data)
            if hidden:
                self.notes.append(f"not read: {len(hidden)} hidden name(s) in {data} ({', '.join(hidden[:5])}"
                                  f"{', ...' if len(hidden) > 5 else ''})")
            if not self.files:
                raise InputError(f"{data}: no data files in this folder (expected .jsonl/.json/.parquet/.csv/"
                                 ".arrow/.txt files, optionally .gz/.bz2/.xz/.zst-compressed, or a directory saved "
                                 "with Dataset.save_to_disk)")
        elif os.path.exists(data) or data.startswith((".", "/", "~")):
            raise InputError(f"{data}: no such file or directory")
        else:
            return  # a hub dataset name
        self.builder = self._builder()
        zstd = [f for f in self.files if f.lower().endswith(".zst")]
        if zstd:
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise InputError(f"{self._name(zstd[0])} is zstd-compressed, which datasets reads only with the "
                                 "zstandard package: pip install zstandard, or decompress it (zstd -d)") from None
        if all(os.path.getsize(f) == 0 for f in self.files):
            raise InputError(f"{data}: {'every file is' if os.path.isdir(data) else 'the file is'} empty; "
                             "nothing to build")

    def _name(self, path: str) -> str:
        """A file's name as the user knows it: relative to a --data folder, else as given."""
        return os.path.relpath(path, self.data) if os.path.isdir(self.data) else path

    def _builder(self) -> str:
        if self.data_format:
            return self.data_format
        by_format: dict[str, list[str]] = {}
        unknown = []
        for f in self.files:
            builder = _FILE_BUILDERS.get(os.path.splitext(_uncompressed_name(f))[1].lower())
            if builder is None:
                unknown.append(self._name(f))
            else:
                by_format.setdefault(builder, []).append(self._name(f))
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise InputError(f"{self.data}: cannot tell the format of {', '.join(unknown[:5])}{more} (known: .jsonl "
                             ".json .parquet .csv .arrow .txt, optionally .gz/.bz2/.xz/.zst): move what is not data "
                             "out of the folder, or pass --data-format to read every file as one format")
        if len(by_format) > 1:
            listing = "; ".join(f"{b}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                                for b, names in sorted(by_format.items()))
            raise InputError(f"{self.data} holds files of several formats ({listing}); a build reads one format: "
                             "put each format in its own folder (and build each), or convert them to one")
        return next(iter(by_format))

    def load(self):
        """The examples as a `datasets.Dataset`. A file that cannot be read is named, with its line and the fix."""
        import datasets

        if self.saved:
            ds = datasets.load_from_disk(self.data)
            return ds[self.split] if isinstance(ds, datasets.DatasetDict) else ds
        if not self.files:
            try:
                return datasets.load_dataset(self.data, split=self.split)
            except Exception as e:  # the hub may be unreachable, or the name wrong: say which input failed
                raise InputError(f"{self.data}: not a local file or directory, and loading it as a hub dataset "
                                 f"failed ({type(e).__name__}: {e})") from e
        log = logging.getLogger("datasets")
        level = log.level
        log.setLevel(logging.CRITICAL)  # its "Failed to load JSON" lines name no line: the error below does
        try:
            return datasets.load_dataset(self.builder, data_files=self.files, split="train")
        except Exception as e:  # datasets and Arrow name no file or line: find the bad one ourselves
            raise self._diagnose(e) from e
        finally:
            log.setLevel(level)

    def _diagnose(self, error: Exception) -> InputError:
        for path in self.files:
            problem = _first_problem(path, self.builder)
            if problem:
                return InputError(f"{self._name(path)} {problem}")
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        return InputError(f"{self.data}: datasets cannot read these {self.builder} files ({type(cause).__name__}: "
                          f"{cause}); check that every file is {self.builder} with the same fields")

    def fingerprint(self, dataset) -> str:
        """What the examples are, from the input files' names and bytes, not their dates: a copy or a `touch`
        keeps it, an edit changes it. A hub dataset: datasets' own fingerprint (of its revision)."""
        if not self.files and not self.saved:
            return str(getattr(dataset, "_fingerprint", None))
        paths = self.files or [p for p in _walk(self.data)[0] if os.path.basename(p) != "state.json"]
        root = self.data if os.path.isdir(self.data) else os.path.dirname(self.data)
        h = hashlib.sha256()
        for path in paths:  # state.json (save_to_disk) holds datasets' own, date-dependent fingerprint
            h.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0".encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        return h.hexdigest()[:16]

    def locate(self, rows: list[int]) -> dict[int, str]:
        """`{row: "FILE line L"}` for input rows read from JSON-lines files (row i is the i-th non-blank line);
        other inputs name rows by index only. One pass over the files, for the few rows a summary shows."""
        if self.builder != "json" or not rows:
            return {}
        wanted, last, found, row = set(rows), max(rows), {}, 0
        for path in self.files:
            if not _one_json_per_line(path):  # one JSON document: rows are not lines; nothing after it maps either
                return found
            with _open_binary(path) as f:
                for number, line in enumerate(f, 1):
                    if row > last:
                        return found
                    if line.strip():
                        if row in wanted:
                            found[row] = f"{self._name(path)} line {number}"
                        row += 1
        return found


def load_input(data: str, split: str = "train", data_format: str | None = None):
    """Local file(s) by extension, a `save_to_disk` directory, or a hub dataset name -> datasets.Dataset."""
    return InputSource(data, split, data_format).load()


def _walk(folder: str) -> tuple[list[str], list[str]]:
    """(data files, hidden names) under `folder`, recursively, sorted. Hidden: the name starts with '.' or '_'."""
    files, hidden = [], []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        hidden += [os.path.relpath(os.path.join(root, d), folder) + "/" for d in dirs if d.startswith((".", "_"))]
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.startswith((".", "_")):
                hidden.append(os.path.relpath(path, folder))
            else:
                files.append(path)
    return files, hidden


def _uncompressed_name(path: str) -> str:
    base, ext = os.path.splitext(path)
    return base if ext.lower() in _COMPRESSIONS else path


def _open_binary(path: str):
    """The file's bytes as a binary file object that iterates over lines, decompressed if its name says so."""
    import bz2
    import gzip
    import lzma

    opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(
        _COMPRESSIONS.get(os.path.splitext(path)[1].lower()))
    if opener is not None:
        return opener(path, "rb")
    if path.lower().endswith(".zst"):
        import io

        import pyarrow as pa

        return io.BufferedReader(_RawStream(pa.CompressedInputStream(pa.OSFile(path), "zstd")))
    return open(path, "rb")


class _RawStream:
    """Just enough of io.RawIOBase over a pyarrow input stream for io.BufferedReader (lines of a .zst file)."""

    closed = False

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        self.closed = True


def _first_problem(path: str, builder: str) -> str | None:
    """Why `path` cannot be read as `builder` input, naming the line ("line 7: not valid UTF-8 ..."), or None."""
    import pyarrow as pa

    if builder not in _TEXT_BUILDERS:
        import pyarrow.parquet as pq

        try:
            if builder == "parquet":
                pq.ParquetFile(path).metadata  # noqa: B018
            elif builder == "arrow":
                try:
                    pa.ipc.open_file(path).schema  # noqa: B018
                except pa.ArrowInvalid:
                    pa.ipc.open_stream(path).schema  # noqa: B018
        except (pa.ArrowException, OSError) as e:
            return f"is not a readable {builder} file ({e}): check that it was written whole, or remove it"
        return None
    json_lines = None
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return (f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
                            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or fix that line")
                if builder != "json" or not line.strip():
                    continue
                if json_lines is None:  # a .json file may also hold one JSON document over many lines
                    json_lines = _one_json_per_line(path)
                if json_lines:
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return (f"line {number}: not valid JSON ({e.msg} at column {e.colno}): fix or delete that "
                                "line (JSON lines: one object per line)")
        if json_lines is False:
            with _open_binary(path) as f:
                json.loads(f.read())
    except json.JSONDecodeError as e:
        return f"line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}): fix the file"
    except (OSError, EOFError, pa.ArrowException) as e:
        return f"cannot be read ({type(e).__name__}: {e}): check that it was copied whole"
    return None


def _one_json_per_line(path: str) -> bool:
    """Whether the file is JSON lines (its first non-blank line is a JSON value by itself, or is meant to be one)
    rather than one JSON document spread over lines (first line `[` or `{` that does not close)."""
    with _open_binary(path) as f:
        for raw in f:
            if raw.strip():
                try:
                    json.loads(raw)
                    return True
                except ValueError:  # includes UnicodeDecodeError
                    return raw.strip() not in (b"[", b"{") and not raw.rstrip().endswith(b",")
    return True


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

    def _encode(self, text: str, special: bool, budget: int | None = None, offsets: bool = False):
        """The tokenizer's encoding of `text`, or of a prefix of it that still holds more than `budget` (default
        --max-seq-len) tokens plus a margin: the rest would be truncated away (`_CHARS_PER_TOKEN`)."""
        need = (self.max_seq_len if budget is None else budget) + _CUT_MARGIN_TOKENS
        limit = need * _CHARS_PER_TOKEN
        while len(text) > limit:
            enc = self.tok(text[:limit], add_special_tokens=special, return_offsets_mapping=offsets)
            if len(enc.input_ids) > need:
                return enc
            limit *= 4
        return self.tok(text, add_special_tokens=special, return_offsets_mapping=offsets)

    def _text(self, record: dict):
        ids = self._encode(self._field(record, self.fields.text_field), True).input_ids
        if self.eos is not None:
            ids = ids + [self.eos]
        ids = np.asarray(ids, dtype=np.int64)
        return ids, np.ones(ids.size, bool)

    def _input_ids(self, record: dict):
        raw = self._field(record, self.fields.input_ids_field, list)[: self.max_seq_len + 1]  # + 1: seen as truncated
        ids = self._ids(raw, self.fields.input_ids_field)
        if self.generate:
            return ids, None
        if not self.fields.response_ids_field:
            return ids, np.ones(ids.size, bool)
        response = self._field(record, self.fields.response_ids_field, list)[: max(self.max_seq_len + 1 - ids.size, 1)]
        response = self._ids(response, self.fields.response_ids_field)
        mask = np.zeros(ids.size + response.size, bool)
        mask[ids.size:] = True
        return np.concatenate([ids, response]), mask

    def _ids(self, raw: list, name: str) -> np.ndarray:
        """A list field of token ids as int64, or a skip naming what is wrong."""
        # One float anywhere in a JSON file (5.5, or 5.0) makes Arrow read the whole column as floats: whole
        # numbers are still ids, and only a row holding something else is skipped.
        for position, t in enumerate(raw):
            whole = isinstance(t, int | np.integer) or (isinstance(t, float | np.floating) and float(t).is_integer())
            if isinstance(t, bool) or not whole:
                raise _Skip(f"field {name!r} holds a value that is not a token id", f"{t!r} at position {position}")
        ids = np.asarray(raw).astype(np.int64)
        if ids.min() < 0 or ids.max() >= len(self.tok):
            raise _Skip("token id outside the tokenizer's vocabulary", f"max id {int(ids.max())}")
        return ids

    def _prompt(self, record: dict):
        prompt = self._encode(self._field(record, self.fields.prompt_field), True).input_ids
        if self.generate:
            return np.asarray(prompt, dtype=np.int64), None
        response = self._encode(self._field(record, self.fields.response_field), False,
                                budget=max(self.max_seq_len - len(prompt), 1)).input_ids
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
            return np.asarray(self._encode(text, False).input_ids, dtype=np.int64), None
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
        enc = self._encode(text, False, offsets=True)
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
                  num_workers: int = 1, limit: int | None = None, rows: range | None = None) -> Iterator[Example]:
    """This worker's share of the input (example i goes to worker i % num_workers), or the examples `rows`,
    tokenised."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in rows if rows is not None else range(worker_index, n, num_workers):
        stats.examples += 1
        try:
            record = dataset[i]
        except UnicodeDecodeError as e:  # Arrow reads JSON strings without checking them; Python decodes here
            stats.skip(i, "not valid UTF-8 text", f"byte 0x{e.object[e.start]:02x}; re-encode the file as UTF-8")
            continue
        ex = tokenizer(i, record, stats)
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
