"""Options accepted and applied, writes that never land on an input, one snapshot per run (issue 22, deliver 2-3).

- `--resume` refuses every setting that changes what is trained (the student's shape, the loss, the data, the
  optimizer) naming it with both values, before anything loads; the settings that may change are applied and
  recorded in the run's train_config.json.
- `kdstudent eval --max-rows N` evaluates exactly N rows; a store listed twice under two spellings is refused; the
  text report shows domain names whole and a domain named `all` apart from the store's own column.
- `kdstudent export` and `train --out` refuse an output that is, contains or is inside an input.
- `eval` and `export` read the same state of a run (its newest checkpoint), also after a `--resume` that extended
  a finished run and died; an FSDP run killed before its end (its checkpoints hold dcp/ only) exports.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from store_fixtures import write_teacher_store

from cli import kdstudent
from student import run as runs
from student.config import TrainConfig, may_change_on_resume
from student.run import check_output, check_resume, read_metrics
from student.train import TrainError, load_trained, train

SEQ = 32


@pytest.fixture(scope="module")
def store(tiny_teacher_dir, tmp_path_factory):
    """24 rows of exactly SEQ tokens, 2 rows per record batch."""
    return write_teacher_store(str(tmp_path_factory.mktemp("resume_store")), tiny_teacher_dir, 24, SEQ, 2)


@pytest.fixture(scope="module")
def other_store(tiny_teacher_dir, tmp_path_factory):
    return write_teacher_store(str(tmp_path_factory.mktemp("resume_other")), tiny_teacher_dir, 8, SEQ, 2,
                               corpus_seed=9)


def _cfg(store, base, out, **kw) -> TrainConfig:
    defaults = dict(keep_layers="0", experts=4, rank=4, attn_rank=4, batch_size=4, max_steps=3, lr=3e-3,
                    warmup_steps=1, log_every=1, progress=False, seed=1)
    return TrainConfig(store=store, base=base, out=str(out), **{**defaults, **kw})


@pytest.fixture(scope="module")
def done(store, tiny_teacher_dir, tmp_path_factory) -> Path:
    """A finished 3-step MoE-LoRA run (checkpoint-3, final/student). Tests copy it before changing it."""
    out = tmp_path_factory.mktemp("resume_done") / "run"
    train(_cfg(store, tiny_teacher_dir, out))
    return out


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != runs.LOCK}


# ================================================================ --resume: what may change, what may not
# values for the settings an automatic choice cannot make (paths, layer specs, choices that need others)
OTHER = {"store": "elsewhere", "base": "/elsewhere/base", "eval_store": "elsewhere", "keep_layers": "0,1",
         "moe_layers": "0", "layer_experts": "0:3", "student": "lora", "loss": "rkl", "base_dtype": "bfloat16",
         "sharding": "fsdp", "fsdp_frozen": "replicate", "lora_scaling": "rslora", "cross_tokenizer": "gold",
         "init_from": "/elsewhere/run"}
INVALID_ALONE = {"shared_expert_alpha"}  # an alpha without its LoRA (shared_expert_rank 0) is refused by itself


def _other(f: dataclasses.Field, value):
    if f.name in OTHER:
        return OTHER[f.name]
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.125 if value < 0.5 else value / 2
    raise AssertionError(f"give TrainConfig.{f.name} (= {value!r}) another value in OTHER")


def test_resume_refuses_every_setting_that_changes_what_is_trained(store, tiny_teacher_dir, done):
    """Walks every TrainConfig field: one that may not change on --resume is refused naming its flag and both
    values; one that may (its help says so) passes. A new field is refused until it is declared resumable."""
    saved = runs.load_config(done)
    refused, passed, invalid = [], [], []
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("out", "resume"):
            continue
        value = _other(f, getattr(saved, f.name))
        try:
            given = dataclasses.replace(saved, resume=True, **{f.name: value})
        except ValueError:
            invalid.append(f.name)
            continue
        try:
            check_resume(done, given)
            passed.append(f.name)
        except ValueError as e:
            flag = "--" + f.name.replace("_", "-")
            assert f"{flag}: the run has " in str(e) and "this command gives" in str(e), (f.name, str(e))
            refused.append(f.name)
    assert set(invalid) == INVALID_ALONE
    assert passed == [f.name for f in dataclasses.fields(TrainConfig) if may_change_on_resume(f.name)]
    assert {"rank", "experts", "keep_layers", "student", "loss", "temperature", "store", "batch_size", "seed",
            "shuffle", "weight_decay", "warmup_steps", "balance_coef", "router_lr_scale", "sharding"} <= set(refused)


@pytest.mark.parametrize("setting,value,shown", [
    ("rank", 8, "--rank: the run has 4, this command gives 8"),
    ("experts", 2, "--experts: the run has 4, this command gives 2"),
    ("keep_layers", "1", "--keep-layers: the run has 0, this command gives 1"),
    ("student", "full", "--student: the run has moe-lora, this command gives full"),
    ("loss", "jsd", "--loss: the run has fkl, this command gives jsd"),
    ("batch_size", 2, "--batch-size: the run has 4, this command gives 2"),
])
def test_a_refused_resume_names_the_setting_and_loads_nothing(store, tiny_teacher_dir, done, monkeypatch, setting,
                                                               value, shown):
    def nothing_loads(*a, **kw):
        raise AssertionError("the training went past its checks")

    monkeypatch.setattr("student.train._train", nothing_loads)
    before = _files(done)
    with pytest.raises(TrainError, match=r"cannot --resume .*" + re.escape(shown)):
        train(_cfg(store, tiny_teacher_dir, done, resume=True, **{setting: value}))
    assert _files(done) == before  # the run's config is not rewritten


def test_resume_accepts_the_same_stores_and_base_under_other_spellings(store, tiny_teacher_dir, done, tmp_path,
                                                                        monkeypatch, other_store):
    link = tmp_path / "link"
    link.symlink_to(store)
    monkeypatch.chdir(Path(tiny_teacher_dir).parent)
    same = _cfg(str(link) + "/", os.path.relpath(tiny_teacher_dir), done, resume=True)
    check_resume(done, same)
    with pytest.raises(ValueError, match="--store: the run has"):  # a store added to the mixture
        check_resume(done, dataclasses.replace(same, store=[store, other_store]))


def test_resume_refuses_max_steps_below_the_step_reached(store, tiny_teacher_dir, done):
    check_resume(done, _cfg(store, tiny_teacher_dir, done, resume=True, max_steps=3))
    with pytest.raises(ValueError, match="--max-steps 2 is below step 3"):
        check_resume(done, _cfg(store, tiny_teacher_dir, done, resume=True, max_steps=2))


def test_a_resume_before_the_first_checkpoint_may_change_anything(store, tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    runs.write_config(run, _cfg(store, tiny_teacher_dir, run))
    runs.append_metrics(run, {"step": 1, "loss": 1.0})
    check_resume(run, _cfg(store, tiny_teacher_dir, run, resume=True, rank=8, experts=2))  # nothing to continue


def test_a_setting_the_run_does_not_record_is_not_compared(store, tiny_teacher_dir, done, tmp_path):
    """A run of an earlier version lacks the settings added since: their defaults need not be what it did, so a
    resume may give them (the checkpoint's own checks judge them); a recorded one is compared."""
    run = tmp_path / "run"
    shutil.copytree(done, run)
    given = _cfg(store, tiny_teacher_dir, run, resume=True, z_coef=0.5)
    with pytest.raises(ValueError, match="--z-coef: the run has 0.0, this command gives 0.5"):
        check_resume(run, given)
    path = run / "checkpoint-3" / runs.RUN_CONFIG
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "z_coef"}))
    check_resume(run, given)


def test_resume_applies_and_records_the_settings_that_may_change(store, tiny_teacher_dir, done, tmp_path):
    """A resume with another --lr, --max-steps, cadence and memory settings: train_config.json says them, the
    schedule is the new length's with the new peak from the step reached, the cadences are the new ones."""
    from transformers import get_cosine_schedule_with_warmup

    run = tmp_path / "run"
    shutil.copytree(done, run)
    changes = dict(max_steps=5, lr=1e-3, log_every=2, save_every=4, keep_checkpoints=1, eval_store=store,
                   eval_rows=4, gradient_checkpointing=True, loss_chunk=16, loss_keep_logits=True, expert_impl="loop")
    assert all(may_change_on_resume(name) for name in changes)
    train(_cfg(store, tiny_teacher_dir, run, resume=True, **changes))
    recorded = runs.load_config(run)
    assert {name: getattr(recorded, name) for name in changes} == changes
    assert runs.load_config(run / "checkpoint-5") == recorded
    # the schedule of a 5-step run at peak 1e-3, from step 3 on
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = get_cosine_schedule_with_warmup(opt, 1, 5)
    want = {}
    for step in range(1, 6):
        opt.step()
        sched.step()
        want[step] = sched.get_last_lr()[0]
    logged = {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    assert logged[4] == pytest.approx(want[4], rel=1e-12) and logged[5] == want[5] == 0.0
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5]  # log_every 2: 4, and the end
    assert [(r["step"], r["eval"]["rows"]) for r in read_metrics(run) if "eval" in r] == [(5, 4)]
    assert [p.name for p in runs.checkpoints(run)] == ["checkpoint-5"]  # keep_checkpoints 1
    state = torch.load(run / "checkpoint-5" / runs.TRAIN_STATE, weights_only=False)
    assert state["scheduler"]["base_lrs"] == [1e-3]
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-3]


# ================================================================ eval
def test_eval_max_rows_is_exact(done, store, capsys):
    for rows, batch in ((3, 8), (5, 2), (24, 7)):
        capsys.readouterr()
        assert kdstudent.main(["eval", "--model", str(done), "--store", store, "--json", "--max-rows", str(rows),
                               "--batch-size", str(batch)]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["rows"], result["tokens"]) == (rows, rows * (SEQ - 1))
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            kdstudent.main(["eval", "--model", str(done), "--store", store, "--max-rows", bad])
        assert e.value.code == 2
        assert "must be an integer >= 1" in capsys.readouterr().err


def test_eval_refuses_a_store_listed_twice(done, store, capsys, monkeypatch):
    monkeypatch.chdir(Path(store).parent)
    name = Path(store).name
    assert kdstudent.main(["eval", "--model", str(done), "--store", name, "--store", f"./{name}/"]) == 2
    assert "is listed twice" in capsys.readouterr().err


def test_the_eval_table_shows_whole_domain_names_and_a_domain_named_all_apart():
    from student.evaluate import METRICS, format_report

    def metrics(x: float) -> dict:
        return {k: (7 if k in ("tokens", "rows") else x) for k in METRICS}

    long = "a_domain_name_longer_than_twelve"
    text = format_report({"stores": {"S": dict(metrics(0.1), domains={"all": metrics(0.2), long: metrics(0.3)})},
                          "pooled": metrics(0.1)})
    lines = text.splitlines()
    assert lines[1].split()[0] == "store" and "domains" in lines[1]  # a bracket over the domain columns
    assert lines[2].split() == ["metric", "all", "all", long]
    assert lines[3].split() == ["teacher_kl", "0.1000", "0.2000", "0.3000"]
    assert lines[2].index("all") < lines[1].index("-") < lines[2].rindex("all")  # the second `all` is a domain


# ================================================================ outputs apart from inputs
def test_check_output_compares_real_paths(tmp_path):
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(base)
    inputs = [("base model", str(base))]
    for out, relation in ((base, "is"), (tmp_path / "alias", "is"), (base / "export", "is inside"),
                          (tmp_path / "alias" / "x", "is inside"), (tmp_path / "models", "contains"),
                          (tmp_path, "contains")):
        with pytest.raises(ValueError, match=re.escape(f"--out {out} {relation} the base model")):
            check_output(out, inputs)
    for out in (tmp_path / "models" / "base2", tmp_path / "models" / "bas", tmp_path / "elsewhere"):
        check_output(out, inputs)  # siblings, even with a common prefix
    check_output(tmp_path, [("--store", "s3://bucket/store"), ("--eval-store", None)])  # URLs and unset: skipped
    assert not (base / "export").exists() and not (tmp_path / "elsewhere").exists()


def test_export_refuses_an_output_on_an_input(done, tiny_teacher_dir, capsys):
    """The base folder (the data loss the issue reports), inside or around it, the run, the student: refused before
    anything is written, and the base's files are unchanged."""
    before = _files(Path(tiny_teacher_dir))
    base = Path(tiny_teacher_dir)
    for source, out, relation in ((done, base, "is the base model"),
                                  (done, base / "mixtral", "is inside the base model"),
                                  (done, base.parent, "contains the"),  # the base and the run
                                  (done, done, "is the run"),
                                  (done, done / "mixtral", "is inside the run"),
                                  (done / "final" / "student", done / "final" / "student", "is the student"),
                                  (done / "final" / "student", done, "contains the student")):
        assert kdstudent.main(["export", str(source), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert relation in err and "Traceback" not in err, err
        assert not (base / "mixtral").exists() and not (done / "mixtral").exists()
    assert _files(base) == before


def test_train_refuses_an_out_on_an_input(store, other_store, tiny_teacher_dir, monkeypatch, tmp_path):
    def nothing_loads(*a, **kw):
        raise AssertionError("the training went past its checks")

    monkeypatch.setattr("student.train._train", nothing_loads)
    data = tmp_path / "data"
    nested = shutil.copytree(store, data / "store")
    for out, kw, relation in ((tiny_teacher_dir, {}, "is the --base"),
                              (nested / "run", {}, "is inside the --store"),
                              (data, {}, "contains the --store"),
                              (other_store, {"eval_store": other_store}, "is the --eval-store")):
        with pytest.raises(TrainError, match=re.escape(f"--out {out} {relation}")):
            train(_cfg(str(nested), tiny_teacher_dir, out, **kw))
    assert [p.name for p in data.iterdir()] == ["store"]
    assert _files(nested) == _files(Path(store))  # nothing written in it (no run, no lock)


# ================================================================ one snapshot per run
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids() -> torch.Tensor:
    return torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def test_eval_and_export_read_the_same_state_of_an_extended_run(done, store, tiny_teacher_dir, tmp_path):
    """A finished run extended by --resume and killed after the extension's first checkpoint: final/student is the
    old end (step 3), checkpoint-4 the newest state. eval, export, info and load_student all read checkpoint-4."""
    from student.export import export_student
    from student.io import load_student, resolve_student_dir

    run = tmp_path / "run"
    shutil.copytree(done, run)
    train(_cfg(store, tiny_teacher_dir, run, resume=True, max_steps=5, save_every=4))
    shutil.rmtree(run / "checkpoint-5")  # killed after checkpoint-4: the old end's final/ is still there
    shutil.rmtree(run / "final")
    shutil.copytree(done / "final", run / "final")
    assert runs.student_snapshot(run) == run / "checkpoint-4"
    assert resolve_student_dir(run) == run / "checkpoint-4" / "student"
    ids = _ids()
    evaluated = _logits(load_trained(run), ids)  # what kdstudent eval reads
    assert torch.equal(evaluated, _logits(load_student(run), ids))
    assert not torch.equal(evaluated, _logits(load_student(run / "final" / "student"), ids))
    out = export_student(run, tmp_path / "mixtral")
    assert json.loads((out / "moekd_export.json").read_text())["exported_from"] == str(run / "checkpoint-4" /
                                                                                       "student")
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), ids), evaluated, atol=1e-4,
                               rtol=0)


def _as_fsdp_checkpoint(checkpoint: Path) -> None:
    """What an FSDP run writes before its end: the trainable weights as DCP shards (dcp/), no
    trainable.safetensors and no student/ (the format is tested against real FSDP in test_distributed)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    state = {"model": load_file(str(checkpoint / runs.TRAINABLE))}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(checkpoint / "dcp"), no_dist=True)
    (checkpoint / runs.TRAINABLE).unlink()
    shutil.rmtree(checkpoint / runs.STUDENT)


def test_an_fsdp_run_killed_before_its_end_evaluates_and_exports(done, tmp_path, capsys):
    from student.export import export_student
    from student.io import load_student, resolve_student_dir

    run = tmp_path / "run"
    shutil.copytree(done, run)
    shutil.rmtree(run / "final")
    _as_fsdp_checkpoint(run / "checkpoint-3")
    with pytest.raises(FileNotFoundError, match="FSDP checkpoint written before the run's end.*kdstudent eval and "
                                                "export read the run"):
        resolve_student_dir(run)
    assert kdstudent.main(["info", str(run)]) == 2
    assert "FSDP checkpoint" in capsys.readouterr().err
    ids = _ids()
    want = _logits(load_student(done / "final" / "student"), ids)
    assert torch.equal(_logits(load_trained(run), ids), want)
    out = export_student(run, tmp_path / "mixtral")
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), ids), want, atol=1e-4, rtol=0)
    info = json.loads((out / "moekd_export.json").read_text())
    assert info["exported_from"] == str(run / "checkpoint-3")


def test_export_of_a_dense_student_run_says_why(store, tiny_teacher_dir, tmp_path):
    from student.export import UnsupportedExportError, export_student

    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    runs.write_config(run, _cfg(store, tiny_teacher_dir, run, student="lora"))
    with pytest.raises(UnsupportedExportError, match="--student lora student: export writes MoE-LoRA students"):
        export_student(run, tmp_path / "mixtral")
    assert not (tmp_path / "mixtral").exists()
