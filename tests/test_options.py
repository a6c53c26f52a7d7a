"""No command accepts an option it ignores: every option of `kdstudent convert` and `params` changes what they
write or print, or is refused; every option of `kdstudent train` and `kdstore build` is read by the code that runs
them; every option of `kdstudent eval`, `export`, `info` and `plot` and of `kdstore merge`, `info`, `verify`,
`inspect`, `prepare-teacher` and `prepare-data` changes what the command does or is refused.
A new option fails here until it does something (or is refused). What `--resume` may change:
tests/test_resume_and_outputs.py."""

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from store_fixtures import random_row, target_spec, write_store
from student_fixtures import VOCAB, save_tiny_model

from cli.kdstudent import main
from logit_store import Manifest, ShardWriter
from logit_store.build import BuildConfig
from logit_store.format import worker_names
from student.config import MoELoRAConfig, RouterLossConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# a value other than the default for every shape option (a new option must be added here)
SHAPE = {"keep_layers": "0,2", "experts": "3", "experts_per_token": "1", "rank": "3", "alpha": "5", "lora_scaling":
         "rslora", "lora_dropout": "0.1", "moe_layers": "0", "layer_experts": "2:3", "attn_rank": "2",
         "attn_alpha": "3", "shared_expert_rank": "3", "shared_expert_alpha": "3", "router_init_std": "0.1",
         "train_base": "true", "expert_impl": "loop", "routing": "hash"}


def test_every_shape_option_is_listed():
    assert set(SHAPE) == {f.name for f in dataclasses.fields(MoELoRAConfig)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("options") / "base", "llama", num_layers=3))


BASELINE = ["--shared-expert-rank", "2"]  # so that the shared expert's alpha has an adapter to scale


def _flag(name: str, value: str) -> list[str]:
    return [*BASELINE, f"--{name.replace('_', '-')}", value]


def test_every_convert_option_changes_the_saved_student(base, tmp_path):
    """What convert writes (student.json and the weight files) differs from the defaults' for every option."""
    def written(name: str, *flags: str) -> dict[str, bytes]:
        out = tmp_path / name
        assert main(["convert", base, "--out", str(out), *flags]) == 0
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    default = written("default", *BASELINE)
    same = [name for name, value in SHAPE.items() if written(name, *_flag(name, value)) == default]
    assert not same, f"kdstudent convert accepts options that change nothing: {same}"


def test_every_params_option_changes_the_counts_or_is_refused(base, capsys):
    def printed(*flags: str) -> str | None:
        code = main(["params", base, *flags])
        out, err = capsys.readouterr()
        return out if code == 0 else (None if re.search("no parameter count", err) else f"error {err}")

    default = printed(*BASELINE)
    outcomes = {name: printed(*_flag(name, value)) for name, value in SHAPE.items()}
    assert not [n for n, out in outcomes.items() if out == default], "params accepts options that change nothing"
    assert not [out for out in outcomes.values() if out and out.startswith("error")]
    assert {n for n, out in outcomes.items() if out is None} == {"lora_dropout", "router_init_std", "expert_impl"}
    with pytest.raises(ValueError, match="shared-expert-rank"):  # an alpha for a LoRA that is not there
        MoELoRAConfig(shared_expert_alpha=4.0)


def test_training_options_are_refused_by_convert_and_params(base, tmp_path, capsys):
    """balance_coef & co. are training settings (TrainConfig), not what a saved student is."""
    for option in ("--balance-coef", "--router-lr-scale", "--router-bias-update", "--z-coef"):
        for command in (["convert", base, "--out", str(tmp_path / "s")], ["params", base]):
            assert main([*command, option, "2"]) == 2
            assert f"not used by the HfArgumentParser: ['{option}', '2']" in capsys.readouterr().err


def _read(cfg_fields: list[str], sources: list[Path], receivers: tuple[str, ...]) -> list[str]:
    """The fields no source reads as `<receiver>.<field>`."""
    text = "".join(p.read_text() for p in sources)
    return [f for f in cfg_fields if not any(f"{r}.{f}" in text for r in receivers)]


def test_every_train_option_is_read_by_training():
    """TrainConfig's own options are read by the training loop (or the loss/router configs it builds); the shape
    goes to the student whole (`student_config()`, checked above through convert)."""
    inherited = {f.name for cls in (MoELoRAConfig, RouterLossConfig) for f in dataclasses.fields(cls)}
    own = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in inherited]
    unread = _read(own, [ROOT / "student" / "train.py", ROOT / "student" / "config.py"], ("cfg", "self"))
    assert not unread, f"TrainConfig options nothing reads: {unread}"
    assert not _read([f.name for f in dataclasses.fields(RouterLossConfig)], [ROOT / "student" / "router_loss.py"],
                     ("config",))


def test_every_build_option_is_read_by_the_build():
    from logit_store.teachers.vllm import VLLMOptions

    engine = {f.name for f in dataclasses.fields(VLLMOptions)}  # passed to vLLM whole (dataclasses.asdict)
    own = [f.name for f in dataclasses.fields(BuildConfig) if f.name not in engine]
    sources = [ROOT / "logit_store" / name for name in ("build.py", "inputs.py")]
    unread = _read(own, sources, ("cfg", "self"))
    assert not unread, f"BuildConfig options nothing reads: {unread}"


def test_every_generate_option_is_read_by_generate():
    from logit_store.teachers.vllm import VLLMOptions
    from student.generate import GenerateConfig

    engine = {f.name for f in dataclasses.fields(VLLMOptions)}  # passed to vLLM whole (--backend vllm)
    own = [f.name for f in dataclasses.fields(GenerateConfig) if f.name not in engine]
    unread = _read(own, [ROOT / "student" / "generate.py"], ("cfg", "self"))
    assert not unread, f"GenerateConfig options nothing reads: {unread}"


# ================================================================ the argparse subcommands
REFUSED = "refused"
# per subcommand: the function it calls (patched to record the call), a baseline command line, and for every
# option (argparse dest) a command line with another value, or REFUSED with one (the only other values there are)
WALK = {
    "eval": ("student.train.evaluate_trained", ["eval", "--model", "RUN", "--store", "S"], {
        "model": ["eval", "--model", "RUN2", "--store", "S"],
        "store": ["eval", "--model", "RUN", "--store", "S", "--store", "S2"],
        "batch_size": ["eval", "--model", "RUN", "--store", "S", "--batch-size", "2"],
        "max_rows": ["eval", "--model", "RUN", "--store", "S", "--max-rows", "3"],
        "json": ["eval", "--model", "RUN", "--store", "S", "--json"],
    }),
    "export": ("student.export.export_student", ["export", "RUN", "--out", "O"], {
        "student": ["export", "RUN2", "--out", "O"],
        "to": (REFUSED, ["export", "RUN", "--out", "O", "--to", "llama"]),  # mixtral is the only target
        "out": ["export", "RUN", "--out", "O2"],
        "base": ["export", "RUN", "--out", "O", "--base", "B"],
        "dtype": ["export", "RUN", "--out", "O", "--dtype", "bfloat16"],
        "drop_router_bias": ["export", "RUN", "--out", "O", "--drop-router-bias"],
    }),
    "info": ("student.io.resolve_student_dir", ["info", "RUN"], {"student": ["info", "RUN2"]}),
    "plot": ("student.plots.plot_run", ["plot", "RUN"], {"run": ["plot", "RUN2"],
                                                          "out": ["plot", "RUN", "--out", "P"]}),
}
# values the commands refuse although their type parses them
ALSO_REFUSED = [["eval", "--model", "RUN", "--store", "S", "--max-rows", "0"],
                ["eval", "--model", "RUN", "--store", "S", "--batch-size", "0"]]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from cli.kdstudent import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_subcommand_option_is_walked():
    """convert, params, train and generate parse their dataclasses (walked above); every other subcommand's options
    here."""
    parsers = _subparsers()
    assert set(parsers) - {"convert", "params", "train", "generate"} == set(WALK)
    for command, (_, _, variants) in WALK.items():
        options = {a.dest for a in parsers[command]._actions if not isinstance(a, argparse._HelpAction)}
        assert options == set(variants), f"kdstudent {command}: walk every option: {options ^ set(variants)}"


def _run(monkeypatch, capsys, target: str, argv: list[str]):
    """What the command did: the call it made to `target` and what it printed, or REFUSED (exit 2)."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        if target.endswith("evaluate_trained"):
            metrics = {"teacher_kl": 0.5, "ce": 1.0, "ppl": 2.7, "top1_agree": 0.5, "ece": 0.1, "tokens": 9, "rows": 1}
            return {"stores": {s: metrics for s in args[1]}, "pooled": metrics}
        if target.endswith("plot_run"):
            return ["loss.png"]
        return Path(args[0])

    monkeypatch.setattr(target, record)
    monkeypatch.setattr("student.io.read_student_meta", lambda path: {k: k for k in (
        "base", "config", "moe_layers", "experts", "num_adapter_params")})
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses a value
        code = e.code
    out, _ = capsys.readouterr()
    return REFUSED if code == 2 else (code, json.dumps(calls, default=str), out)


def test_every_eval_export_info_plot_option_changes_what_the_command_does(monkeypatch, capsys):
    """Each option's other value reaches the function the command calls (or changes what it prints), or is
    refused; no value of a declared option is silently dropped. The functions themselves are tested on real runs
    (tests/test_resume_and_outputs.py, test_train.py, test_student_export.py)."""
    for command, (target, baseline, variants) in WALK.items():
        default = _run(monkeypatch, capsys, target, baseline)
        assert default != REFUSED and default[0] == 0, (command, default)
        for option, argv in variants.items():
            if isinstance(argv, tuple):
                assert _run(monkeypatch, capsys, target, argv[1]) == REFUSED, (command, option)
                continue
            assert _run(monkeypatch, capsys, target, argv) not in (default, REFUSED), (command, option)
    for argv in ALSO_REFUSED:
        assert _run(monkeypatch, capsys, WALK[argv[0]][0], argv) == REFUSED, argv


# ================================================================ kdstore's argparse subcommands
# (`kdstore build` parses BuildConfig: test_every_build_option_is_read_by_the_build above.) Per subcommand: a
# baseline command line and, for every option (argparse dest), a command line with another value, REFUSED with
# one, or (a baseline of its own, the command line) where the option only matters on another store. Capitalised
# words name the stores and the tokenizer of the `kdstore_paths` fixture; merge, info, verify and inspect run on
# those real stores, prepare-teacher and prepare-data on recorders of the asset functions they call.
KDSTORE_WALK = {
    "merge": (["merge", "W"], {
        "store": ["merge", "W2"],
        "allow_incomplete": (["merge", "PARTIAL"], ["merge", "PARTIAL", "--allow-incomplete"]),  # worker 1 missing
    }),
    "info": (["info", "S"], {
        "store": ["info", "S2"],
        "json": ["info", "S", "--json"],
        "card": ["info", "S", "--card"],
    }),
    "verify": (["verify", "S"], {
        "store": ["verify", "S2"],
        "quick": ["verify", "S", "--quick"],
    }),
    "inspect": (["inspect", "S"], {
        "store": ["inspect", "S2"],
        "row": ["inspect", "S", "--row", "1"],
        "top": ["inspect", "S", "--top", "2"],
        "max_positions": ["inspect", "S", "--max-positions", "3"],
        "tokenizer": ["inspect", "S", "--tokenizer", "TOK"],  # the store's manifest names none: ids by default
    }),
    "prepare-teacher": (["prepare-teacher"], {
        "gguf": ["prepare-teacher", "--gguf", "G/other.gguf"],
        "out": ["prepare-teacher", "--out", "T"],
        "dtype": ["prepare-teacher", "--dtype", "float16"],
    }),
    "prepare-data": (["prepare-data", "--out", "D"], {
        "out": ["prepare-data", "--out", "D2"],
        "seed": ["prepare-data", "--out", "D", "--seed", "1"],
    }),
}
# values the commands refuse although their type parses them
KDSTORE_ALSO_REFUSED = [["inspect", "S", "--row", "40"], ["inspect", "S", "--row", "-1"],
                        ["info", "S", "--json", "--card"], ["prepare-teacher", "--dtype", "int8"],
                        ["inspect", "S", "--top", "-1"], ["inspect", "S", "--max-positions", "0"]]


def _kdstore_subparsers() -> dict[str, argparse.ArgumentParser]:
    from cli.kdstore import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_kdstore_subcommand_option_is_walked():
    """build parses its dataclass (checked above); every other subcommand's options are walked here."""
    parsers = _kdstore_subparsers()
    assert set(parsers) - {"build"} == set(KDSTORE_WALK)
    for command, (_, variants) in KDSTORE_WALK.items():
        options = {a.dest for a in parsers[command]._actions if not isinstance(a, argparse._HelpAction)}
        assert options == set(variants), f"kdstore {command}: walk every option: {options ^ set(variants)}"


def _worker_store(path: Path, workers: list[int], count: int = 2, seed: int = 0) -> str:
    """A multi-worker build of random rows (no teacher) with the manifests of `workers` of `count`, not merged."""
    rng = np.random.default_rng(seed)
    for i in workers:
        prefix, manifest_name = worker_names(i, count)
        manifest = Manifest(target=target_spec("topk"), vocab_size=VOCAB, teacher={"name_or_path": "random"})
        with ShardWriter(str(path), manifest, prefix=prefix, manifest_name=manifest_name) as w:
            for j in range(3):
                w.write(random_row(rng, VOCAB, int(rng.integers(4, 12)), source_index=3 * i + j)[0])
    return str(path)


@pytest.fixture
def kdstore_paths(base, tmp_path) -> dict[str, str]:
    write_store(str(tmp_path / "s"), vocab=VOCAB)
    write_store(str(tmp_path / "s2"), n_rows=30, vocab=VOCAB, seed=1)
    return {"S": str(tmp_path / "s"), "S2": str(tmp_path / "s2"), "TOK": base,
            "W": _worker_store(tmp_path / "w", [0, 1]), "W2": _worker_store(tmp_path / "w2", [0, 1], seed=1),
            "PARTIAL": _worker_store(tmp_path / "partial", [0])}


def _kdstore_run(monkeypatch, capsys, paths: dict[str, str], argv: list[str]):
    """What `kdstore ARGV` did: the asset calls it made and what it printed, or REFUSED (exit 2)."""
    from cli import kdstore

    calls = []

    def record(name: str, result):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result(*args, **kwargs)
        return call

    for target, result in {
        "assets.smollm2.packaged_smollm2": lambda: ("PKG", "smollm2.gguf"),
        "assets.smollm2.prepared_teacher_dir": lambda name: f"CACHE/{name}",
        "assets.smollm2.convert_gguf": lambda folder, name, out, dtype: out,
        "assets.corpora.bible_chapters": lambda: [{"text": f"chapter {i}"} for i in range(20)],
        "assets.corpora.write_splits": lambda docs, out, seed: {s: f"{out}/{s}.jsonl" for s in ("train", "test")},
    }.items():
        monkeypatch.setattr(target, record(target, result))
    capsys.readouterr()
    try:
        code = kdstore.main([paths.get(a, a) for a in argv])
    except SystemExit as e:  # argparse refuses a value
        code = e.code
    out, _ = capsys.readouterr()
    return REFUSED if code == 2 else (code, json.dumps(calls, default=str), out)


def test_every_kdstore_option_changes_what_the_command_does(kdstore_paths, monkeypatch, capsys):
    """Each option's other value changes what the command prints or the call it makes (on a store where the
    option matters), or is refused; no value of a declared option is silently dropped. What the commands print is
    tested in tests/test_kdstore_cli.py, merging in tests/test_build.py."""
    def run(argv: list[str]):
        return _kdstore_run(monkeypatch, capsys, kdstore_paths, argv)

    for command, (baseline, variants) in KDSTORE_WALK.items():
        default = run(baseline)
        assert default != REFUSED and default[0] == 0, (command, default)
        assert run(baseline) == default, (command, "not deterministic")
        for option, argv in variants.items():
            if isinstance(argv, tuple) and argv[0] == REFUSED:
                assert run(argv[1]) == REFUSED, (command, option)
                continue
            before = default
            if isinstance(argv, tuple):  # its own baseline
                before, argv = run(argv[0]), argv[1]
            outcome = run(argv)
            assert outcome != REFUSED and outcome[0] == 0 and outcome != before, (command, option, outcome)
    for argv in KDSTORE_ALSO_REFUSED:
        assert run(argv) == REFUSED, argv
