"""kdstudent CLI end to end on a tiny model: convert, params, info, export (and its refusal for GPT-2), and the
student's shape given to convert, params and train alike."""

from __future__ import annotations

import json
import re

import torch
from student_fixtures import sample_ids, save_tiny_model
from transformers import AutoModelForCausalLM

from cli.config import parse_config
from cli.kdstudent import main
from student.baselines import count_parameters
from student.config import MoELoRAConfig, TrainConfig
from student.io import load_student, read_student_meta
from student.train import build_model


def test_convert_info_params_export(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "base", "llama", num_layers=4)
    student_dir = tmp_path / "student"
    args = ["--experts", "4", "--rank", "4", "--attn-rank", "4", "--moe-layers", "top-half", "--keep-layers", "::2"]
    assert main(["convert", str(base), "--out", str(student_dir), *args]) == 0
    assert "trainable" in capsys.readouterr().out
    student = load_student(student_dir).eval()
    assert student.config.num_hidden_layers == 2
    assert [m.layer_index for m in student.modules() if hasattr(m, "layer_index")] == [1]

    assert main(["params", str(base), *args]) == 0
    out = capsys.readouterr().out
    assert "moe_lora" in out and "parameter-matched dense-LoRA rank" in out

    assert main(["info", str(student_dir)]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["base"]["keep_layers"] == [0, 2] and info["config"]["experts"] == 4

    assert main(["export", str(student_dir), "--to", "mixtral", "--out", str(tmp_path / "mx")]) == 0
    ids = sample_ids()
    with torch.no_grad():
        want = student(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "mx").eval()(ids).logits
    assert (want - got).abs().max().item() < 1e-4


def test_export_of_gpt2_student_fails_with_message(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "gpt2", "gpt2")
    assert main(["convert", str(base), "--out", str(tmp_path / "s"), "--experts", "2", "--rank", "4"]) == 0
    assert main(["export", str(tmp_path / "s"), "--to", "mixtral", "--out", str(tmp_path / "mx")]) == 2
    err = capsys.readouterr().err
    assert "not supported for 'gpt2'" in err and "llama" in err


def test_convert_params_and_train_build_the_same_student_from_the_same_options(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "base", "llama", num_layers=4)
    shape = ["--keep-layers", "0,1,3", "--experts", "4", "--experts-per-token", "1", "--rank", "4",
             "--moe-layers", "top-half", "--layer-experts", "2:3", "--attn-rank", "8", "--lora-dropout", "0.1",
             "--router-init-std", "0.05", "--expert-impl", "loop"]
    assert main(["convert", str(base), "--out", str(tmp_path / "student"), *shape]) == 0
    converted = MoELoRAConfig.from_dict(read_student_meta(tmp_path / "student")["config"])
    counts = shape[:shape.index("--lora-dropout")]  # the options that change a count
    assert main(["params", str(base), *counts]) == 0  # params refuses options that change no count
    counted = int(re.search(r"moe_lora\s+trainable\s+([\d,]+)", capsys.readouterr().out).group(1).replace(",", ""))
    cfg = parse_config(TrainConfig, ["--store", "unused", "--base", str(base), "--out", str(tmp_path / "run"), *shape],
                       "kdstudent train", "")

    assert cfg.student_config().to_dict() == converted.to_dict()
    assert (converted.alpha, converted.attn_alpha) == (8.0, 16.0)  # unset alpha: 2 × rank, resolved and saved
    trained = count_parameters(build_model(cfg)).trainable
    assert trained == count_parameters(load_student(tmp_path / "student")).trainable == counted
