"""Configs as dataclasses, read by transformers' HfArgumentParser from flags or from one YAML/JSON file."""

from __future__ import annotations


def parse_config(cls: type, argv: list[str], prog: str, description: str):
    """An instance of dataclass `cls` from `argv`: flags, or a single .yaml/.yml/.json file holding them."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, prog=prog, description=description)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        read = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        (cfg,) = read(argv[0])
    else:
        (cfg,) = parser.parse_args_into_dataclasses(argv)
    return cfg
