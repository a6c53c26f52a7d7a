"""The student's options (student/config.py) and the run directory (student/run.py): one alpha rule, early
refusal of bad shapes, and files written by earlier versions (old option names) still load."""

from __future__ import annotations

import json

import pytest
from student_fixtures import save_tiny_model

from student import run as runs
from student.config import MoELoRAConfig, TrainConfig
from student.convert import build_student
from student.io import CONFIG_NAME, load_student, save_student

# a student.json "config" as the first versions wrote it
OLD_STUDENT_CONFIG = {"num_experts": 4, "top_k": 1, "rank": 4, "alpha": 32.0, "dropout": 0.1, "moe_layers": "all",
                      "experts_per_layer": {"1": 3, "0": 2}, "router_init_std": 0.02, "attn_rank": 8,
                      "attn_alpha": 32.0, "balance_coef": 0.01, "z_coef": 0.0, "expert_impl": "auto"}


def test_unset_alpha_is_twice_the_rank_and_is_recorded():
    cfg = MoELoRAConfig(rank=8, attn_rank=4)
    assert (cfg.alpha, cfg.attn_alpha) == (16.0, 8.0)
    assert cfg.to_dict()["alpha"] == 16.0
    assert MoELoRAConfig(rank=8, alpha=32, attn_alpha=4).alpha == 32
    lora = TrainConfig(store="s", base="b", out="o", student="lora", rank=86)
    assert lora.alpha == 172.0 and lora.student_config().alpha == 172.0


def test_bad_shapes_are_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match="experts_per_token"):
        MoELoRAConfig(experts=2, experts_per_token=3)
    with pytest.raises(ValueError, match="LAYER:EXPERTS"):
        MoELoRAConfig(layer_experts="0-4")
    with pytest.raises(ValueError, match="expert_impl"):
        MoELoRAConfig(expert_impl="fast")
    with pytest.raises(ValueError, match="both 'top_k' and its new name"):
        MoELoRAConfig.from_dict({"top_k": 1, "experts_per_token": 2})
    assert MoELoRAConfig(experts=4, layer_experts="0:2, 3:8").experts_at(3) == 8


def test_configs_saved_under_the_old_option_names_load():
    cfg = MoELoRAConfig.from_dict(OLD_STUDENT_CONFIG)
    assert (cfg.experts, cfg.experts_per_token, cfg.lora_dropout, cfg.layer_experts) == (4, 1, 0.1, "0:2,1:3")
    assert (cfg.alpha, cfg.attn_alpha) == (32.0, 32.0)  # what the old student was built with, not today's default


def test_a_student_saved_by_an_earlier_version_reloads(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama", num_layers=3)
    student = build_student(base, MoELoRAConfig.from_dict(dict(OLD_STUDENT_CONFIG, keep_layers="0,2")))
    out = save_student(student, tmp_path / "student")
    meta = json.loads((out / CONFIG_NAME).read_text())
    del meta["config"]["keep_layers"]  # what an old student.json holds: old names, kept layers in "base" only
    meta["config"] = {"num_experts" if k == "experts" else k: v for k, v in meta["config"].items()}
    (out / CONFIG_NAME).write_text(json.dumps(meta))
    reloaded = load_student(out)
    assert reloaded.kd_student.config == student.kd_student.config
    assert reloaded.kd_student.keep_layers == [0, 2]


def test_run_config_round_trip_and_old_run_configs(tmp_path):
    cfg = TrainConfig(store="s", base="b", out=str(tmp_path), experts=4, layer_experts="0:2", keep_layers="::2")
    runs.write_config(tmp_path, cfg)
    assert runs.is_run(tmp_path) and runs.load_config(tmp_path) == cfg
    assert TrainConfig(**json.loads((tmp_path / runs.RUN_CONFIG).read_text())) == cfg
    old = tmp_path / "old"
    old.mkdir()
    (old / runs.RUN_CONFIG).write_text(json.dumps({"store": "s", "base": "b", "out": "o", "experts": 4,
                                                   "experts_top_k": 1, "alpha": None, "lora_dropout": 0.0}))
    loaded = runs.load_config(old)
    assert (loaded.experts_per_token, loaded.alpha, loaded.attn_alpha) == (1, 32.0, 32.0)


def test_checkpoints_and_metrics(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-3-old", ".tmp-checkpoint-12", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert runs.checkpoints(tmp_path) == [runs.checkpoint_dir(tmp_path, 2), runs.checkpoint_dir(tmp_path, 10)]
    for step in (1, 2, 3):
        runs.append_metrics(tmp_path, {"step": step, "loss": 1.0 / step})
    runs.truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in runs.read_metrics(tmp_path)] == [1, 2]
