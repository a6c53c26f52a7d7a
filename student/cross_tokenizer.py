"""Cross-tokenizer distillation: a store built with one tokenizer teaches a student of another.

A store row is the teacher's token ids, and the teacher's targets at each position. To teach a student that splits
text differently:

1. **Text, exactly.** Every token spells a byte string (`token_bytes`: read from the tokenizer's vocabulary and
   decoder, byte-level BPE and SentencePiece-style byte fallback alike); a row's text is their concatenation, and
   special tokens (BOS, EOS, ...) are markers between runs of text, not text.
2. **Student tokens.** The student's own tokenizer encodes each run of text (`StudentRows`), so the student sees
   what it would see at inference; the teacher's special tokens become the student's (same spelling, or the same
   role: EOS for EOS; the teacher's leading BOS becomes what the student's tokenizer puts before a text).
3. **Aligned positions.** A causal LM's position predicts the next token from the prefix before it. Where the
   teacher's next token and the student's next token start at the same byte of the same run (`align`), both
   predict the continuation of the same prefix: there their next-token distributions can be compared. Elsewhere
   the student gets its cross-entropy only.
4. **Candidates.** A teacher candidate that spells the same bytes as a student token (`vocab_map`, computed once per
   tokenizer pair and cached on disk under both tokenizers' fingerprints) is matched exactly; the others can only
   be compared by their sorted probabilities (ULD). The loss is in `student.losses` (`cross_tokenizer`).

`CrossTokenizerCollator` does 1-4 for a batch of store rows and returns a student `KDBatch` (plus `aligned` and
`target_matched`): `KDStream` (`kdstudent train`) and `KDCollator` (the transformers Trainer) run it in their
DataLoader workers.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from logit_store.fingerprint import special_tokens_added, tokenizer_fingerprint

MODES = ("gold", "uld")
MAP_VERSION = 1  # of the vocabulary map's rule; part of its cache key
_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PROBE = "Hello world, 12 34."


class CrossTokenizerError(ValueError):
    """A tokenizer whose tokens do not spell the text they encode (a normalising tokenizer, WordPiece, ...)."""


# ================================================================ what each token spells
def _decoder_steps(tokenizer: Any) -> list[dict]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CrossTokenizerError(f"{_name(tokenizer)}: not a fast (tokenizers-backed) tokenizer; cross-tokenizer "
                                  "distillation reads each token's bytes from its tokenizer.json")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder] if decoder else []


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: markers (BOS, EOS, chat roles, unk), no text."""
    ids = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids | {int(i) for i in tokenizer.all_special_ids}


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each id spells (None: a special token), from the vocabulary and the decoder's rules: byte-level
    (GPT-2, SmolLM2, Qwen) maps each character back to its byte; SentencePiece-style BPE/Unigram (Llama, Gemma)
    turns `▁` into a space and byte-fallback tokens `<0xNN>` into their byte. Checked on a probe text
    (`prefix_space`); a decoder this does not know is refused."""
    steps = _decoder_steps(tokenizer)
    kinds = {s.get("type") for s in steps}
    unknown = kinds - {"ByteLevel", "Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}
    if unknown:
        raise CrossTokenizerError(f"{_name(tokenizer)}: its decoder ({', '.join(sorted(map(str, unknown)))}) is not "
                                  "one whose tokens' bytes can be read (byte-level or SentencePiece-style)")
    if "ByteLevel" in kinds:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {c: b for b, c in bytes_to_unicode().items()}
    replace = [(s["pattern"]["String"], s["content"]) for s in steps
               if s.get("type") == "Replace" and "String" in s.get("pattern", {})]
    replace += [(s.get("replacement", "\u2581"), " ") for s in steps if s.get("type") == "Metaspace"]
    specials = special_ids(tokenizer)
    added = {int(i): t.content for i, t in tokenizer.added_tokens_decoder.items()}
    vocab = tokenizer.get_vocab()
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        if i in specials:
            continue
        if i in added:  # added tokens are kept as their text, not in the model's alphabet
            out[i] = added[i].encode()
        elif "ByteLevel" in kinds:
            out[i] = b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in token)
        elif "ByteFallback" in kinds and _FALLBACK.fullmatch(token):
            out[i] = bytes([int(token[3:5], 16)])
        else:
            for pattern, content in replace:
                token = token.replace(pattern, content)
            out[i] = token.encode()
    return out


def prefix_space(tokenizer: Any, table: list[bytes | None]) -> int:
    """1 if the tokenizer puts a space before a text it encodes (SentencePiece's dummy prefix), else 0; raises if
    its tokens do not spell the text they encode (a normaliser that changes text)."""
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    spelled = b"".join(table[i] or b"" for i in ids)
    for prefix in (0, 1):
        if spelled == b" " * prefix + _PROBE.encode():
            return prefix
    raise CrossTokenizerError(f"{_name(tokenizer)}: encoding {_PROBE!r} gives tokens that spell {spelled!r}: its "
                              "text cannot be recovered byte for byte (a normaliser?), so it cannot be aligned")


def fallback_ids(tokenizer: Any) -> set[int]:
    """Ids of byte-fallback tokens (`<0xNN>`): they spell a byte that a regular token may spell too."""
    if "ByteFallback" not in {s.get("type") for s in _decoder_steps(tokenizer)}:
        return set()
    return {i for t, i in tokenizer.get_vocab().items() if _FALLBACK.fullmatch(t)}


# ================================================================ the vocabulary map
def cache_dir() -> str:
    """Where vocabulary maps are kept: $MOEKD_CACHE/vocab-maps (default ~/.cache/moekd/vocab-maps)."""
    return os.path.join(os.path.expanduser(os.environ.get("MOEKD_CACHE", "~/.cache/moekd")), "vocab-maps")


def compute_vocab_map(teacher: Any, student: Any) -> np.ndarray:
    """[teacher vocabulary] int32: the student id spelled exactly as each teacher id, -1 where none is. One teacher id
    per student id (a regular token before a byte-fallback one spelling the same byte), so matched candidates never
    share a student id. Special tokens match by spelling, else by role (EOS for EOS, BOS for BOS, unk for unk)."""
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(s_bytes):
        if b is not None:
            by_bytes.setdefault(b, []).append(i)
    out = np.full(len(t_bytes), -1, np.int32)
    claimed: set[int] = set()

    def claim(i: int, j: int | None) -> None:
        if j is not None and out[i] < 0 and j not in claimed:
            out[i] = j
            claimed.add(j)

    s_vocab = student.get_vocab()
    for token, i in teacher.get_vocab().items():  # the same token string spelling the same bytes first
        j = s_vocab.get(token)
        if i < len(t_bytes) and t_bytes[i] is not None and j is not None and s_bytes[j] == t_bytes[i]:
            claim(i, j)
    fallback = fallback_ids(teacher)
    for i in [i for i in range(len(t_bytes)) if i not in fallback] + sorted(fallback):
        for j in by_bytes.get(t_bytes[i], []) if t_bytes[i] is not None else []:
            if j not in claimed:
                claim(i, j)
                break
    s_special = {student.convert_ids_to_tokens(j): j for j in special_ids(student)}
    for i in special_ids(teacher):
        if i >= len(out):
            continue
        j = s_special.get(teacher.convert_ids_to_tokens(i))
        for role in ("eos_token_id", "bos_token_id", "unk_token_id"):
            if j is None and i == getattr(teacher, role, None):
                j = getattr(student, role, None)
        claim(i, j)
    return out


def vocab_map(teacher: Any, student: Any, directory: str | None = None) -> np.ndarray:
    """`compute_vocab_map`, computed once per tokenizer pair and kept in `directory` (default `cache_dir()`) under
    both tokenizers' fingerprints (and this rule's version): a 262k x 49k pair takes seconds, every run reuses it."""
    directory = directory or cache_dir()
    key = f"v{MAP_VERSION}-{tokenizer_fingerprint(teacher)}-{tokenizer_fingerprint(student)}"
    path = os.path.join(directory, f"{key}.npy")
    try:
        return np.load(path)
    except (OSError, ValueError):
        pass
    table = compute_vocab_map(teacher, student)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, table)
        os.replace(tmp, path)  # whole or not at all: concurrent runs may write it at once
    except OSError:
        pass  # a read-only cache: computed again next time
    return table


# ================================================================ one row, both tokenizations
@dataclass
class Tokenized:
    """One tokenization of a row: ids, which tokens carry a loss, and each token's start key: (position in the
    row's text stream) x 4 + (index within a special marker), unique within the row; -1 where the token starts
    nowhere the other side could (a zero-width token, or a run the student tokenizer does not spell back)."""

    ids: np.ndarray  # [n] int64
    loss: np.ndarray  # [n] bool
    key: np.ndarray  # [n] int64
    nbytes: np.ndarray  # [n] int64: bytes of text the token spells (0 for a special token)


def teacher_segments(ids: np.ndarray, table: list[bytes | None], before: list[int]) -> list[tuple[str, Any]]:
    """A teacher row as ("text", [token indices]) runs and ("special", [token indices]) markers, in order. The
    row's leading `before` tokens (what the teacher's tokenizer puts before every text) are one marker, "before"."""
    out: list[tuple[str, Any]] = []
    start = 0
    if before and len(ids) >= len(before) and [int(i) for i in ids[:len(before)]] == before:
        out.append(("before", list(range(len(before)))))
        start = len(before)
    run: list[int] = []
    for k in range(start, len(ids)):
        if table[int(ids[k])] is None if int(ids[k]) < len(table) else True:
            if run:
                out.append(("text", run))
                run = []
            out.append(("special", [k]))
        else:
            run.append(k)
    if run:
        out.append(("text", run))
    return out


def utf8_pieces(data: bytes) -> list[tuple[int, str]]:
    """(byte offset, text) of the valid UTF-8 stretches of `data`: a row cut mid-character, or byte-fallback tokens
    that spell part of one, leave bytes no text holds; they are skipped (no student token starts there)."""
    out, pos = [], 0
    while pos < len(data):
        try:
            out.append((pos, data[pos:].decode()))
            break
        except UnicodeDecodeError as e:
            if e.start:
                out.append((pos, data[pos:pos + e.start].decode()))
            pos += max(e.end, e.start + 1)
    return [(o, s) for o, s in out if s]


class StudentRows:
    """Teacher rows -> (teacher tokenization, student tokenization) with comparable keys (`Tokenized`)."""

    def __init__(self, teacher: Any, student: Any, table: np.ndarray | None = None):
        self.teacher, self.student = teacher, student
        self.t_bytes, self.s_bytes = token_bytes(teacher), token_bytes(student)
        prefix_space(teacher, self.t_bytes)  # refuses a tokenizer whose text cannot be recovered
        self.s_prefix = prefix_space(student, self.s_bytes)
        self.map = vocab_map(teacher, student) if table is None else table
        self.t_before = special_tokens_added(teacher)["before"]
        self.s_before = special_tokens_added(student)["before"]
        self.s_len = np.array([len(b) if b is not None else 0 for b in self.s_bytes], np.int64)

    def convert(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[Tokenized, Tokenized]]:
        """(input_ids, loss_mask) teacher rows -> their (teacher, student) tokenizations. The student's texts are
        encoded in one batch call of its tokenizer."""
        plans, texts = [], []
        for ids, mask in rows:
            plan = self._plan(ids, mask)
            for item in plan[2]:
                if item[0] == "text":
                    item[3] = len(texts)
                    texts.append(item[2])
            plans.append(plan)
        encoded = self.student(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [(teacher, self._student(items, encoded)) for teacher, _, items in plans]

    def _plan(self, ids: np.ndarray, mask: np.ndarray):
        """The teacher's keys and what the student encodes: [kind, key base, text or ids, slot, loss per byte]."""
        ids = np.asarray(ids, np.int64)
        key = np.full(len(ids), -1, np.int64)
        nbytes = np.zeros(len(ids), np.int64)
        items: list[list] = []
        v = 0  # position in the text stream: a byte of text, or one marker
        for kind, where in teacher_segments(ids, self.t_bytes, self.t_before):
            if kind != "text":
                key[where] = v * 4 + np.minimum(np.arange(len(where)), 3)
                mapped = self.s_before if kind == "before" else (
                    [int(self.map[ids[where[0]]])] if 0 <= ids[where[0]] < len(self.map)
                    and self.map[ids[where[0]]] >= 0 else [])
                items.append(["special", v, mapped, None, bool(mask[where[-1]])])
                v += 1
                continue
            spelled = [self.t_bytes[int(ids[k])] for k in where]
            sizes = np.array([len(b) for b in spelled], np.int64)
            starts = np.cumsum(sizes) - sizes
            nbytes[where] = sizes
            key[where] = np.where(sizes > 0, (v + starts) * 4, -1)
            data = b"".join(spelled)
            owner = np.repeat(np.arange(len(where)), sizes)  # the teacher token of each byte
            byte_loss = np.asarray(mask, bool)[np.asarray(where)][owner]
            for offset, text in utf8_pieces(data):
                items.append(["text", v + offset, text, None, byte_loss[offset:]])
            v += len(data)
        return Tokenized(ids, np.asarray(mask, bool).copy(), key, nbytes), None, items

    def _student(self, items: list[list], encoded: list[list[int]]) -> Tokenized:
        ids, loss, key, nbytes = [], [], [], []
        for kind, base, payload, slot, row_loss in items:
            if kind == "special":
                for k, j in enumerate(payload):
                    ids.append(j)
                    loss.append(row_loss)
                    key.append(base * 4 + min(k, 3))
                    nbytes.append(0)
                continue
            tokens = encoded[slot]
            sizes = self.s_len[tokens] if tokens else np.zeros(0, np.int64)
            starts = np.cumsum(sizes) - sizes - self.s_prefix
            spelled_back = b"".join(self.s_bytes[j] or b"" for j in tokens)
            exact = spelled_back == b" " * self.s_prefix + payload.encode()
            starts = np.maximum(starts, 0)
            ends = np.minimum(np.cumsum(sizes) - self.s_prefix, len(row_loss))
            for j, s, e in zip(tokens, starts.tolist(), ends.tolist(), strict=True):
                ids.append(j)
                width = e - s
                loss.append(bool(row_loss[min(s, len(row_loss) - 1)]) if len(row_loss) else False)
                key.append((base + s) * 4 if exact and width > 0 else -1)
                nbytes.append(max(width, 0))
        return Tokenized(np.array(ids, np.int64), np.array(loss, bool), np.array(key, np.int64),
                         np.array(nbytes, np.int64))


def align(teacher: Tokenized, student: Tokenized) -> np.ndarray:
    """[student tokens] int64: for student token j >= 1 carrying a loss, the teacher token i >= 1 carrying a loss
    that starts at the same key (so position j - 1 and position i - 1 predict the continuation of the same text),
    -1 where there is none."""
    out = np.full(len(student.ids), -1, np.int64)
    t_ok = (teacher.key >= 0) & teacher.loss & (np.arange(len(teacher.ids)) >= 1)
    s_ok = (student.key >= 0) & student.loss & (np.arange(len(student.ids)) >= 1)
    _, si, ti = np.intersect1d(student.key[s_ok], teacher.key[t_ok], assume_unique=True, return_indices=True)
    out[np.flatnonzero(s_ok)[si]] = np.flatnonzero(t_ok)[ti]
    return out


# ================================================================ batches
class CrossTokenizerCollator:
    """Store rows (`DecodedRow`s of the teacher's tokenizer) -> a student `KDBatch`: the student's tokens, labels
    and loss mask (right-padded, position t predicts token t + 1), and at the aligned positions the teacher's
    targets with candidate ids mapped to the student's vocabulary. Extra keys: `aligned` [B, T] bool (the position
    has teacher targets) and `target_matched` [B, T, S] bool (the candidate's bytes are a student token: its
    `target_ids` entry is that token; other candidates hold 0 and count by their probability only). Picklable: it
    runs in DataLoader workers. Called like `logit_store.stream.collate` (rows, pad_id, domains)."""

    def __init__(self, teacher: Any, student: Any, table: np.ndarray | None = None):
        self.rows = StudentRows(teacher, student, table)

    def __call__(self, rows: list, pad_id: int = 0, domains: list[str] | None = None) -> dict[str, torch.Tensor]:
        pairs = self.rows.convert([(r.input_ids, r.loss_mask) for r in rows])
        bsz = len(rows)
        seq = max(len(s.ids) for _, s in pairs)
        width = max((r.target_ids.shape[1] for r in rows), default=0)
        input_ids = np.full((bsz, seq), pad_id, np.int64)
        attention = np.zeros((bsz, seq), np.int64)
        labels = np.full((bsz, seq), -100, np.int64)
        loss_mask = np.zeros((bsz, seq), bool)
        aligned = np.zeros((bsz, seq), bool)
        t_ids = np.zeros((bsz, seq, width), np.int64)
        t_lp = np.zeros((bsz, seq, width), np.float32)
        t_mask = np.zeros((bsz, seq, width), bool)
        matched = np.zeros((bsz, seq, width), bool)
        t_tail = np.zeros((bsz, seq), np.float32)
        for b, (r, (teacher, student)) in enumerate(zip(rows, pairs, strict=True)):
            n = len(student.ids)
            input_ids[b, :n], attention[b, :n] = student.ids, 1
            carries = np.flatnonzero(student.loss[1:]) + 1  # student tokens with a loss (token 0 has no predictor)
            labels[b, carries - 1], loss_mask[b, carries - 1] = student.ids[carries], True
            partner = align(teacher, student)
            js = np.flatnonzero(partner >= 0)
            target_row = np.cumsum(r.loss_mask) - 1  # token i's row of the decoded targets
            rows_t = target_row[partner[js]]
            s = r.target_ids.shape[1]
            ids = r.target_ids[rows_t]
            mapped = self.rows.map[np.clip(ids, 0, len(self.rows.map) - 1)]
            ok = r.target_mask[rows_t] & (ids < len(self.rows.map)) & (mapped >= 0)
            pos = js - 1
            aligned[b, pos] = True
            t_ids[b, pos, :s] = np.where(ok, mapped, 0)
            matched[b, pos, :s] = ok
            t_lp[b, pos, :s], t_mask[b, pos, :s] = r.target_logprobs[rows_t], r.target_mask[rows_t]
            t_tail[b, pos] = r.target_tail[rows_t]
        domain = [-1 if r.domain is None else (domains or []).index(r.domain) for r in rows]
        out = dict(input_ids=input_ids, attention_mask=attention, labels=labels, loss_mask=loss_mask,
                   target_ids=t_ids, target_logprobs=t_lp, target_mask=t_mask, target_tail=t_tail,
                   source_index=np.array([r.source_index for r in rows], np.int64),
                   domain=np.array(domain, np.int64), aligned=aligned, target_matched=matched)
        return {k: torch.from_numpy(v) for k, v in out.items()}


def byte_lengths(tokenizer: Any) -> np.ndarray:
    """[vocabulary] int64: the bytes of text each id spells (0 for special tokens): bits per byte's denominator."""
    return np.array([len(b) if b is not None else 0 for b in token_bytes(tokenizer)], np.int64)


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def collator_for(store: Any, student: Any) -> CrossTokenizerCollator:
    """The collator that reads `store` (a `LogitStore`) for a student of tokenizer `student`: the store's own
    tokenizer (the copy it carries, `logit_store.store_tokenizer.load_tokenizer`) against the student's."""
    from logit_store.store_tokenizer import load_tokenizer

    return CrossTokenizerCollator(load_tokenizer(store), student)


def eval_reading(store: Any, tokenizer: Any) -> tuple[CrossTokenizerCollator | None, torch.Tensor | None]:
    """How `kdstudent eval` reads `store` for a student of `tokenizer`: (a cross-tokenizer collator, or None when the
    store is in the student's ids) and the bytes each student id spells (bits per byte's denominator; None when the
    store records no tokenizer, so its text is unknown)."""
    from logit_store.fingerprint import tokenizer_matches

    recorded = store.manifest.tokenizer
    if not recorded.get("fingerprint"):
        return None, None
    collator = None if tokenizer_matches(tokenizer, recorded) else collator_for(store, tokenizer)
    try:
        lengths = byte_lengths(tokenizer)
    except CrossTokenizerError:
        if collator is not None:
            raise
        return None, None  # a tokenizer whose bytes cannot be read (WordPiece, ...): no bits per byte
    size = max(len(lengths), store.manifest.vocab_size)
    return collator, torch.from_numpy(np.pad(lengths, (0, size - len(lengths))))
