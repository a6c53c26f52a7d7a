"""No command accepts an option it ignores: every option of `kdstudent convert` and `params` changes what they
write or print, or is refused; every option of `kdstudent train` and `kdstore build` is read by the code that runs
them. A new option fails here until it does something (or is refused)."""

import dataclasses
import re
from pathlib import Path

import pytest
from student_fixtures import save_tiny_model

from cli.kdstudent import main
from logit_store.build import BuildConfig
from student.config import MoELoRAConfig, RouterLossConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# a value other than the default for every shape option (a new option must be added here)
SHAPE = {"keep_layers": "0,2", "experts": "3", "experts_per_token": "1", "rank": "3", "alpha": "5", "lora_scaling":
         "rslora", "lora_dropout": "0.1", "moe_layers": "0", "layer_experts": "2:3", "attn_rank": "2",
         "attn_alpha": "3", "shared_expert_rank": "3", "shared_expert_alpha": "3", "router_init_std": "0.1",
         "train_base": "true", "expert_impl": "loop"}


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
