"""Configs as dataclasses, read by transformers' HfArgumentParser from flags or from one YAML/JSON file.

HfArgumentParser takes every flag as `--flag-name` and as `--flag_name`; the docs and help use dashes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def parse_config(cls: type, argv: list[str], prog: str, description: str,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """An instance of dataclass `cls` from `argv`: flags, or a single .yaml/.yml/.json file holding them.

    A file goes through `cls.from_dict` where `cls` has one (it may read option names of earlier versions).
    `extra(parser)` may add arguments that are not fields of `cls` (a positional input, an output path); then
    the result is `(config, namespace of those arguments)`, and the options come as flags only."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, prog=prog, description=description)
    if extra is not None:
        extra(parser)
        cfg, args = parser.parse_args_into_dataclasses(argv)
        return cfg, args
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        if hasattr(cls, "from_dict"):
            import yaml

            text = Path(argv[0]).read_text()
            return cls.from_dict(json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text))
        read = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        (cfg,) = read(argv[0])
    else:
        (cfg,) = parser.parse_args_into_dataclasses(argv)
    return cfg
