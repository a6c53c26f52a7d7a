"""Export of MoE-LoRA students to Mixtral: transformers reproduces the student, vLLM (CPU) serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from student_fixtures import randomize_adapters, sample_ids, save_tiny_model
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from student.config import MoELoRAConfig
from student.convert import build_student
from student.export import UnsupportedExportError, export_student
from student.io import save_student


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained-looking tiny Llama student (layer 1 left dense, 2 of 4 base layers kept), saved and exported."""
    root = tmp_path_factory.mktemp("export")
    base = save_tiny_model(root / "base", "llama", num_layers=4)
    cfg = MoELoRAConfig(experts=4, experts_per_token=2, rank=4, moe_layers="0,2", keep_layers="0,1,3")
    student = build_student(base, cfg).eval()
    randomize_adapters(student)
    save_student(student, root / "run" / "student")
    out = export_student(root / "run", root / "mixtral", to="mixtral")
    return student, out


def test_transformers_loads_export_with_student_logits(exported):
    student, out = exported
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(model, MixtralForCausalLM)
    assert model.config.num_hidden_layers == 3 and model.config.num_local_experts == 4
    ids = sample_ids(batch=2, seq=32)
    with torch.no_grad():
        want, got = student(ids).logits, model(ids).logits
    assert (want - got).abs().max().item() < 1e-4
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "moekd_export.json").read_text())["target"] == "mixtral"


_VLLM_SCRIPT = r"""
import json, os, sys
from vllm import LLM, SamplingParams
model_dir, prompt = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=model_dir, distributed_executor_backend="uni", kv_cache_memory_bytes=64 * 2**20,
          enforce_eager=True, dtype="float32", max_model_len=128, enable_prefix_caching=False, seed=0)
params = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
out = llm.generate([{"prompt_token_ids": prompt}], params)[0]
prompt_lp = [None if d is None else {str(k): v.logprob for k, v in d.items()} for d in out.prompt_logprobs]
print("RESULT" + json.dumps({"tokens": list(out.outputs[0].token_ids), "prompt_logprobs": prompt_lp}))
"""


def test_vllm_serves_export_like_the_student(exported, tmp_path):
    """Real vLLM (CPU build) in a child process, so its thread settings do not leak into other tests."""
    student, out = exported
    prompt = sample_ids(batch=1, seq=12, seed=3)[0].tolist()
    script = tmp_path / "serve.py"
    script.write_text(_VLLM_SCRIPT)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(
        [sys.executable, str(script), str(out), json.dumps(prompt)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"vLLM failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(lines[0][len("RESULT") :])

    ids = torch.tensor([prompt])
    with torch.no_grad():
        greedy = student.generate(ids, max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
        logprobs = student(ids).logits[0].log_softmax(-1)
    assert result["tokens"] == greedy
    for pos in range(1, len(prompt)):  # entry pos: log-prob of prompt[pos] given prompt[:pos]
        served = result["prompt_logprobs"][pos][str(prompt[pos])]
        assert served == pytest.approx(logprobs[pos - 1, prompt[pos]].item(), abs=1e-3)


def test_gpt2_export_is_refused_naming_supported_families(tmp_path):
    base = save_tiny_model(tmp_path / "gpt2", "gpt2")
    student = build_student(base, MoELoRAConfig(experts=2, rank=4))
    with pytest.raises(UnsupportedExportError, match="not supported for 'gpt2'.*llama, mistral"):
        export_student(student, tmp_path / "out")


def test_per_layer_expert_counts_are_refused(tmp_path):
    base = save_tiny_model(tmp_path / "llama", "llama")
    student = build_student(base, MoELoRAConfig(experts=2, rank=4, layer_experts="1:4"))
    with pytest.raises(UnsupportedExportError, match="uniform expert count"):
        export_student(student, tmp_path / "out")
    with pytest.raises(UnsupportedExportError, match="unknown export target"):
        export_student(student, tmp_path / "out", to="qwen2_moe")


def test_mistral_exports_and_qwen2_is_refused(tmp_path):
    ids = sample_ids()
    mistral = build_student(save_tiny_model(tmp_path / "mistral", "mistral"), MoELoRAConfig(experts=2, rank=4))
    randomize_adapters(mistral.eval())
    out = export_student(mistral, tmp_path / "mx")
    with torch.no_grad():
        want, got = mistral(ids).logits, AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (want - got).abs().max().item() < 1e-4
    qwen = build_student(save_tiny_model(tmp_path / "qwen2", "qwen2"), MoELoRAConfig(experts=2, rank=4))
    with pytest.raises(UnsupportedExportError, match="qwen2.*biases"):
        export_student(qwen, tmp_path / "qx")
