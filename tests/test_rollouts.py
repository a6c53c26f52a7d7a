"""Student rollouts: `kdstudent generate` (deterministic, split across workers, resumed after a kill), scored by
`kdstore build` with the teacher's label log-probs, the reverse-KL estimate of `kdstudent eval` against an exact
computation, ROUGE-L against the teacher's responses, and `kdstudent train --init-from`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.kdstore import main as kdstore
from cli.kdstudent import main as kdstudent
from logit_store import LogitStore
from logit_store.rollouts import RolloutsError, provenance
from tests.student_fixtures import randomize_adapters

ROOT = Path(__file__).resolve().parents[1]


def _student(base: str, out: Path) -> Path:
    """A MoE-LoRA student of `base` whose adapters are random: it differs from the base (the teacher)."""
    from student.config import MoELoRAConfig
    from student.convert import build_student
    from student.io import save_student

    model = build_student(base, MoELoRAConfig(experts=4, experts_per_token=2, rank=4), seed=0)
    randomize_adapters(model, std=0.2)
    return save_student(model, out)


def _prompts(path: Path, texts: list[str]) -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"p": t, "dom": "odd" if i % 2 else "even"}) + "\n")
    return path


def _generate(student: Path, prompts: Path, out: Path, *extra: str) -> int:
    return kdstudent(["generate", "--model", str(student), "--data", str(prompts), "--prompt-field", "p",
                      "--domain-field", "dom", "--out", str(out), "--samples-per-prompt", "2", "--max-new-tokens", "8",
                      "--chunk-prompts", "2", "--progress", "false", *extra])


def _chunks(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("rollouts-*.jsonl"))}


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("rollouts")
    student = _student(tiny_teacher_dir, d / "student")
    texts = ["the cat sat", "a dog ran to", "", "one two three", "we go home", "the sun is"]
    return tiny_teacher_dir, student, _prompts(d / "prompts.jsonl", texts)


def test_generate_is_deterministic_split_and_resumable(setup, tmp_path, capsys):
    _, student, prompts = setup
    assert _generate(student, prompts, tmp_path / "one") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompts"] == 6 and summary["skipped"] == 1  # the empty prompt: counted, not dropped silently
    assert summary["rollouts"] == 10 and summary["stop"] + summary["length"] == 10
    one = _chunks(tmp_path / "one")
    assert list(one) == ["rollouts-000000.jsonl", "rollouts-000001.jsonl", "rollouts-000002.jsonl"]
    lines = [json.loads(x) for x in one["rollouts-000000.jsonl"].splitlines()]
    assert [(r["prompt_index"], r["sample"]) for r in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(r["logprobs"]) == len(r["response_ids"]) for r in lines)
    assert lines[0]["response_ids"] != lines[1]["response_ids"]  # two samples, not one twice

    assert _generate(student, prompts, tmp_path / "again") == 0  # deterministic for a seed
    assert _chunks(tmp_path / "again") == one
    assert _generate(student, prompts, tmp_path / "seed1", "--seed", "1") == 0
    assert _chunks(tmp_path / "seed1") != one

    for worker in (1, 0):  # two workers write what one does, byte for byte
        assert _generate(student, prompts, tmp_path / "two", "--num-workers", "2", "--worker-index", str(worker)) == 0
    assert _chunks(tmp_path / "two") == one
    assert provenance(str(tmp_path / "two"))["counts"]["rollouts"] == 10

    # killed (SIGKILL) while writing chunk 1, then resumed: the same files, and nothing half-written left
    code = ("import sys; from cli.kdstudent import main; sys.exit(main(sys.argv[1:]))")
    args = ["generate", "--model", str(student), "--data", str(prompts), "--prompt-field", "p", "--domain-field", "dom",
            "--out", str(tmp_path / "killed"), "--samples-per-prompt", "2", "--max-new-tokens", "8",
            "--chunk-prompts", "2", "--progress", "false"]
    run = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                         env={**os.environ, "MOEKD_FAULT": "rollouts-chunk-written:1"})
    assert run.returncode == -9, run.stderr[-2000:]
    assert list(_chunks(tmp_path / "killed")) == ["rollouts-000000.jsonl"]
    with pytest.raises(RolloutsError, match="not complete"):
        provenance(str(tmp_path / "killed"))
    assert kdstudent(args) == 2  # without --resume: refused
    assert "--resume" in capsys.readouterr().err
    assert kdstudent([*args, "--resume"]) == 0
    assert _chunks(tmp_path / "killed") == one
    assert not list((tmp_path / "killed").glob(".tmp-*"))
    assert kdstudent([*args, "--resume", "--temperature", "0.5", "--samples-per-prompt", "2"]) == 2  # other settings
    assert "another sampling" in capsys.readouterr().err


def _sequence_logprobs(model, prefixes: torch.Tensor) -> torch.Tensor:
    """[N, V] next-token log-probs after each prefix."""
    with torch.no_grad():
        return model(input_ids=prefixes).logits[:, -1].float().log_softmax(-1)


def test_reverse_kl_estimate_matches_exact_within_its_interval(setup, tmp_path, capsys):
    """Two-token responses: KL(student || teacher) per token is computable exactly by enumerating every response;
    the Monte-Carlo estimate from the student's own samples, scored by the teacher, holds it in its interval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student.io import load_student

    teacher_dir, student_dir, _ = setup
    prompts = _prompts(tmp_path / "p.jsonl", ["the cat sat", "a dog ran to", "we go home"])
    assert kdstudent(["generate", "--model", str(student_dir), "--data", str(prompts), "--prompt-field", "p",
                      "--out", str(tmp_path / "r"), "--samples-per-prompt", "400", "--max-new-tokens", "2",
                      "--progress", "false"]) == 0
    assert kdstore(["build", "--teacher", teacher_dir, "--data", str(tmp_path / "r"), "--input-ids-field",
                    "prompt_ids", "--response-ids-field", "response_ids", "--backend", "hf", "--top-k", "4",
                    "--out", str(tmp_path / "s"), "--progress", "false"]) == 0
    store = LogitStore.open(str(tmp_path / "s"))
    assert store.manifest.target.label_logprobs  # on by default for rollouts
    assert store.manifest.input["rollouts"]["policy"]["kind"] == "moe-lora"
    capsys.readouterr()
    assert kdstudent(["eval", "--model", str(student_dir), "--store", str(tmp_path / "s"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rollouts"]["own_samples"] and result["rollouts"]["untempered"]
    assert result["reverse_kl"] == pytest.approx(result["teacher_nll"] - result["ce"], abs=1e-6)

    student = load_student(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    eos = tok.eos_token_id
    kl_sum, len_sum = 0.0, 0.0
    for text in ["the cat sat", "a dog ran to", "we go home"]:
        prompt = torch.tensor(tok(text).input_ids)[None]
        s1, t1 = _sequence_logprobs(student, prompt)[0], _sequence_logprobs(teacher, prompt)[0]
        p1 = s1.exp()
        vocab = torch.arange(s1.numel())
        seconds = torch.cat([prompt.expand(len(vocab), -1), vocab[:, None]], 1)
        s2, t2 = _sequence_logprobs(student, seconds), _sequence_logprobs(teacher, seconds)
        go_on = (vocab != eos).double()  # a first token that is EOS ends the response
        kl_second = (s2.exp() * (s2 - t2)).sum(-1).double()
        kl_sum += float((p1 * (s1 - t1)).sum()) + float((p1.double() * go_on * kl_second).sum())
        len_sum += 1 + float((p1.double() * go_on).sum())
    exact = kl_sum / len_sum
    lo, hi = result["reverse_kl_ci95"]
    assert lo <= exact <= hi, (exact, result["reverse_kl"], lo, hi)
    assert hi - lo < 0.5 * exact  # an interval that says something


def test_rouge_l_of_greedy_responses_against_the_teachers(setup, tmp_path, capsys):
    """The teacher answered greedily; its own converted student (no adapters trained: exactly the teacher) answers
    the same (ROUGE-L 1), a student with random adapters less so."""
    from student.config import MoELoRAConfig
    from student.convert import build_student
    from student.io import save_student

    teacher_dir, student_dir, prompts = setup
    assert kdstore(["build", "--teacher", teacher_dir, "--data", str(prompts), "--prompt-field", "p",
                    "--domain-field", "dom", "--generate", "--temperature", "0", "--max-new-tokens", "8",
                    "--backend", "hf", "--top-k", "4", "--out", str(tmp_path / "g"), "--progress", "false"]) == 0
    exact = save_student(build_student(teacher_dir, MoELoRAConfig(experts=4, rank=4)), tmp_path / "exact")
    scores = {}
    for name, model in (("exact", exact), ("random", student_dir)):
        capsys.readouterr()
        assert kdstudent(["eval", "--model", str(model), "--store", str(tmp_path / "g"), "--json"]) == 0
        scores[name] = json.loads(capsys.readouterr().out)
    assert scores["exact"]["rouge_l"] == pytest.approx(1.0) and scores["exact"]["rouge_rows"] == 5
    assert set(scores["exact"]["domains"]) == {"even", "odd"}
    assert scores["exact"]["domains"]["odd"]["rouge_rows"] == 3
    assert scores["random"]["rouge_l"] < 0.99


def test_label_logprobs_are_the_teachers_exact_logprobs(setup, tmp_path):
    """Every label log-prob equals log_softmax of the teacher's own forward at that position, in or out of the
    top-k; a store built without them reads as before (no column, fingerprint unchanged)."""
    from transformers import AutoModelForCausalLM

    teacher_dir, _, prompts = setup
    for labels in ("true", "false"):
        assert kdstore(["build", "--teacher", teacher_dir, "--data", str(prompts), "--text-field", "p", "--backend",
                        "hf", "--top-k", "2", "--label-logprobs", labels, "--out", str(tmp_path / labels),
                        "--progress", "false"]) == 0
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    outside = 0
    for row in LogitStore.open(str(tmp_path / "true")):
        with torch.no_grad():
            lp = teacher(input_ids=torch.as_tensor(row.input_ids)[None]).logits[0].log_softmax(-1)
        pos = row.positions
        want = lp[pos - 1, torch.as_tensor(row.input_ids[pos])].numpy()
        np.testing.assert_allclose(row.label_logprobs, want, atol=1e-5)
        outside += int((~(row.target_ids == row.input_ids[pos][:, None]).any(1)).sum())
    assert outside > 0  # some labels were outside the top-2: only the label column holds their log-prob
    plain = LogitStore.open(str(tmp_path / "false"))
    assert "label_logprobs" not in plain.manifest.to_dict()["target"]
    assert all(r.label_logprobs is None for r in plain)


def _train(out: Path, store: str, base: str, *extra: str) -> list[str]:
    return ["train", "--store", store, "--base", base, "--out", str(out), "--experts", "4", "--rank", "4",
            "--batch-size", "4", "--max-steps", "3", "--lr", "1e-2", "--progress", "false", *extra]


def test_init_from_continues_the_same_weights(setup, tmp_path, capsys):
    from student.config import TrainConfig
    from student.train import build_model, init_from_run, load_trained
    from tests.store_fixtures import write_teacher_store

    teacher_dir, _, _ = setup
    store = write_teacher_store(str(tmp_path / "store"), teacher_dir, rows=8, seq=16)
    assert kdstudent(_train(tmp_path / "a", store, teacher_dir)) == 0
    trained = load_trained(tmp_path / "a")
    cfg = TrainConfig(store=[store], base=teacher_dir, out=str(tmp_path / "b"), experts=4, rank=4, seed=5,
                      init_from=str(tmp_path / "a"))
    model = build_model(cfg)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, trained(input_ids=ids).logits)
        init_from_run(model, cfg)
        torch.testing.assert_close(model(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
    assert kdstudent(_train(tmp_path / "b", store, teacher_dir, "--init-from", str(tmp_path / "a"))) == 0
    capsys.readouterr()
    assert kdstudent(_train(tmp_path / "c", store, teacher_dir, "--init-from", str(tmp_path / "a"), "--rank",
                            "8")) == 2
    err = capsys.readouterr().err
    assert "--rank: " in err and "has 4, this run 8" in err


def test_vllm_rollouts_scored_by_vllm_end_to_end(setup, tmp_path, capsys):
    """--backend vllm serves the student's Mixtral export: the log-probs it records are the student's own (checked
    against a transformers forward of the same tokens); the vllm teacher scores them; eval reads the store."""
    from student.io import load_student

    teacher_dir, student_dir, prompts = setup
    assert _generate(student_dir, prompts, tmp_path / "r", "--backend", "vllm") == 0
    chunks = sorted((tmp_path / "r").glob("rollouts-*.jsonl"))
    lines = [json.loads(x) for p in chunks for x in p.read_text().splitlines()]
    assert len(lines) == 10 and {r["sample"] for r in lines} == {0, 1}
    student = load_student(student_dir).eval()
    for r in lines:
        ids = torch.tensor(r["prompt_ids"] + r["response_ids"])[None]
        with torch.no_grad():
            lp = student(input_ids=ids).logits[0].log_softmax(-1)
        start = len(r["prompt_ids"])
        want = lp[start - 1:-1].gather(1, torch.tensor(r["response_ids"])[:, None])[:, 0]
        np.testing.assert_allclose(r["logprobs"], want.numpy(), atol=2e-3)
    assert kdstore(["build", "--teacher", teacher_dir, "--data", str(tmp_path / "r"), "--input-ids-field",
                    "prompt_ids", "--response-ids-field", "response_ids", "--domain-field", "domain", "--top-k", "4",
                    "--max-seq-len", "256", "--out", str(tmp_path / "s"), "--progress", "false"]) == 0
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    for row in LogitStore.open(str(tmp_path / "s")):  # vLLM's label log-probs are the teacher's own
        with torch.no_grad():
            lp = teacher(input_ids=torch.as_tensor(row.input_ids)[None]).logits[0].log_softmax(-1)
        want = lp[row.positions - 1, torch.as_tensor(row.input_ids[row.positions])].numpy()
        np.testing.assert_allclose(row.label_logprobs, want, atol=2e-3)
    capsys.readouterr()
    assert kdstore(["info", str(tmp_path / "s")]) == 0
    assert "round 1 rollouts of moe-lora student" in capsys.readouterr().out
    assert kdstudent(["eval", "--model", str(student_dir), "--store", str(tmp_path / "s"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 10 and set(result["domains"]) == {"even", "odd"}
    assert result["reverse_kl"] == pytest.approx(result["teacher_nll"] - result["ce"], abs=1e-6)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_dense_students_generate_and_export_merged(setup, tmp_path, kind, capsys):
    """A dense LoRA or full run samples on the hf backend, and the checkpoint vLLM would serve for it (LoRA merged
    into the base's own architecture) computes what the student computes."""
    from transformers import AutoModelForCausalLM

    from student.export import export_merged
    from student.train import load_trained
    from tests.store_fixtures import write_teacher_store

    teacher_dir, _, prompts = setup
    store = write_teacher_store(str(tmp_path / "store"), teacher_dir, rows=8, seq=16)
    run = tmp_path / "run"
    assert kdstudent(["train", "--store", store, "--base", teacher_dir, "--out", str(run), "--student", kind,
                      "--rank", "4", "--batch-size", "4", "--max-steps", "2", "--lr", "1e-2", "--progress",
                      "false"]) == 0
    assert _generate(run, prompts, tmp_path / "r") == 0
    manifest = json.loads((tmp_path / "r" / "_rollouts.w00000.json").read_text())
    assert manifest["policy"]["kind"] == kind and manifest["counts"]["rollouts"] == 10
    student = load_trained(run)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(student, tmp_path / "x", teacher_dir)).eval()
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, student(input_ids=ids).logits, rtol=1e-4,
                                   atol=1e-4)
    assert not any("lora" in name for name in merged.state_dict())
