"""The dataset card (README.md) that `kdstore build` and `kdstore merge` write into a store: a Hub-readable front
matter, figures equal to the manifest's, regenerated exactly by `kdstore info --card`, and ignored by readers."""

import fnmatch
import json
import re
import shlex

import pytest
import yaml

from assets.synthetic import synthetic_corpus
from cli import kdstore
from cli.config import parse_config
from logit_store import KDStream, LogitStore, Manifest, ShardInfo, TargetSpec
from logit_store.build import BuildConfig, build, merge_workers
from logit_store.card import CARD_NAME, build_command, data_files, render_card
from logit_store.inputs import InputError
from logit_store.teachers.hf import HFTeacher


@pytest.fixture(scope="module")
def hf_teacher(tiny_teacher_dir):
    return HFTeacher.from_pretrained(tiny_teacher_dir, dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("card_data") / "d.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(synthetic_corpus(10, seed=7)):
            f.write(json.dumps({"text": text, "src": "odd" if i % 2 else "even"}) + "\n")
    return str(path)


def _cfg(teacher_dir, data, out, **kw) -> BuildConfig:
    return BuildConfig(teacher=teacher_dir, data=data, out=str(out), backend="hf", text_field="text", top_k=4,
                       max_seq_len=48, shard_tokens=120, progress=False, **kw)


@pytest.fixture(scope="module")
def store(tiny_teacher_dir, hf_teacher, data, tmp_path_factory):
    """A single-worker store with domains and a license, in several shards."""
    out = tmp_path_factory.mktemp("card") / "store"
    cfg = _cfg(tiny_teacher_dir, data, out, domain_field="src", license="apache-2.0", limit=8, seed=3)
    build(cfg, teacher=hf_teacher)
    return str(out), cfg


def _card(store: str) -> tuple[dict, str]:
    """(front matter, body) of a store's README.md."""
    with open(f"{store}/{CARD_NAME}") as f:
        text = f.read()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _table_row(body: str, label: str) -> list[int]:
    """The numbers of the contents table's row `label` (`total`, or "domain `name`")."""
    line = next(line for line in body.splitlines() if line.startswith(f"| {label} |"))
    return [int(cell.strip().replace(",", "")) for cell in line.strip("|").split("|")[1:]]


def _matched(store: str, front: dict) -> set[str]:
    """The files of the store directory that the card's `configs` data_files select."""
    import os

    (config,) = front["configs"]
    patterns = [entry["path"] for entry in config["data_files"]]
    return {name for name in os.listdir(store) if any(fnmatch.fnmatch(name, p) for p in patterns)}


def test_build_writes_a_card_with_the_manifests_figures(store):
    path, _ = store
    m = LogitStore.open(path).manifest
    assert len(m.shards) > 1 and m.input["license"] == "apache-2.0"
    front, body = _card(path)
    assert front["license"] == "apache-2.0"
    assert {"knowledge-distillation", "logit-store", "moekd", "top-k-targets"} <= set(front["tags"])
    assert front["task_categories"] == ["text-generation"] and front["size_categories"] == ["n<1K"]
    (config,) = front["configs"]
    assert config["config_name"] == "default" and [e["split"] for e in config["data_files"]] == ["train"]
    assert _matched(path, front) == {s.file for s in m.shards}
    assert _table_row(body, "total") == [m.rows, m.tokens, m.target_positions]
    assert set(m.domains) == {"even", "odd"}
    for name, c in m.domains.items():
        assert _table_row(body, f"domain `{name}`") == [c["rows"], c["tokens"], c["target_positions"]]
    assert f"{m.bytes:,} bytes in {len(m.shards)} shard file(s), {m.bytes / m.tokens:.1f} bytes per token" in body
    assert f"`{m.fingerprint()}`" in body and "**Status**: complete" in body
    for value in (m.teacher["fingerprint"], m.tokenizer["fingerprint"], m.teacher["dtype"], m.codec.name):
        assert f"`{value}" in body
    assert f"| tokenizer vocabulary | {m.tokenizer['vocab_size']:,} tokens |" in body


def test_the_reconstructed_command_gives_the_same_settings(store, tiny_teacher_dir):
    """The card's build command, parsed as `kdstore build` parses it, has every setting the manifest records."""
    path, cfg = store
    _, body = _card(path)
    command = body.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert command == build_command(LogitStore.open(path).manifest)[0]
    argv = shlex.split(command)
    assert argv[:2] == ["kdstore", "build"] and argv[-2:] == ["--out", "STORE"]
    again = parse_config(BuildConfig, argv[2:-2] + ["--out", cfg.out, "--progress", "false"], "kdstore build", "")
    for key in ("teacher", "data", "backend", "text_field", "domain_field", "top_k", "limit", "max_seq_len", "seed",
                "license", "pack", "add_eos", "levels", "compression_level", "num_workers"):
        assert getattr(again, key) == getattr(cfg, key), key


def test_info_card_prints_exactly_the_file(store, capsys):
    path, _ = store
    assert kdstore.main(["info", path, "--card"]) == 0
    with open(f"{path}/{CARD_NAME}") as f:
        assert capsys.readouterr().out == f.read()


def test_readers_ignore_the_card(store, tmp_path):
    """LogitStore.open, verify (and its unlisted-shard check), KDStream and `kdstore verify` read a store with a
    README.md, even one edited by hand, and without one."""
    import shutil

    path = str(tmp_path / "copy")
    shutil.copytree(store[0], path)
    rows = LogitStore.open(path).manifest.rows
    for card in ("edited", None):
        if card:
            with open(f"{path}/{CARD_NAME}", "a") as f:
                f.write("\nA note the publisher added.\n")
        else:
            (tmp_path / "copy" / CARD_NAME).unlink()
        opened = LogitStore.open(path)
        assert opened.manifest_faults() == [] and opened.verify() == []
        assert len(list(opened)) == rows
        seen = sorted(int(i) for batch in KDStream(path, batch_size=3) for i in batch["source_index"])
        assert seen == sorted(r.source_index for r in LogitStore.open(path))
        assert kdstore.main(["verify", path]) == 0


def test_datasets_loads_the_rows_the_card_points_at(store, tmp_path):
    """`load_dataset` on the store directory reads the card's `configs` (what the Hub does for a published store),
    and the card's `load_dataset("arrow", data_files=...)` line loads the same rows."""
    from datasets import load_dataset

    path, _ = store
    m = LogitStore.open(path).manifest
    front, _ = _card(path)
    by_card = load_dataset(path, split="train", cache_dir=str(tmp_path / "a"))
    pattern = f"{path}/{data_files(m)[0]}"
    by_glob = load_dataset("arrow", data_files=pattern, split="train", cache_dir=str(tmp_path / "b"))
    for ds in (by_card, by_glob):
        assert ds.num_rows == m.rows
        assert sorted(ds["source_index"]) == sorted(r.source_index for r in LogitStore.open(path))
        assert {"input_ids", "loss_mask", "target_ids", "target_values", "target_tail", "domain"} <= set(
            ds.column_names)


def test_merge_writes_the_card_workers_do_not(tiny_teacher_dir, hf_teacher, data, tmp_path, capsys):
    out = tmp_path / "two"
    build(_cfg(tiny_teacher_dir, data, out, num_workers=2, worker_index=0, limit=6), teacher=hf_teacher)
    assert not (out / CARD_NAME).exists()
    partial = merge_workers(str(out), allow_incomplete=True)
    front, body = _card(str(out))
    assert partial.status == "in_progress" and "**Status**: in progress" in body
    assert _table_row(body, "total")[0] == partial.rows
    build(_cfg(tiny_teacher_dir, data, out, num_workers=2, worker_index=1, limit=6), teacher=hf_teacher)
    assert kdstore.main(["merge", str(out)]) == 0
    assert f"dataset card: {out}/README.md" in capsys.readouterr().out
    m = LogitStore.open(str(out)).manifest
    front, body = _card(str(out))
    assert front["license"] == "unknown" and "license" not in m.input  # none given: none recorded
    assert "**Status**: complete" in body and _table_row(body, "total") == [m.rows, m.tokens, m.target_positions]
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": "shard-*.arrow"}]
    assert _matched(str(out), front) == {s.file for s in m.shards}
    assert all(s.file.startswith("shard-w") for s in m.shards)
    assert "--num-workers 2 --worker-index I" in body and "kdstore merge STORE" in body
    with open(out / CARD_NAME) as f:
        assert f.read() == render_card(m)


def test_license_is_checked_and_adds_to_the_manifest_only_when_given(tiny_teacher_dir, hf_teacher, data, tmp_path):
    """A license that is not a Hub id is refused before anything loads; a store built with one differs from one built
    without only in `input.license`, so stores built without it keep the fingerprint they always had."""
    for bad in ("Apache 2.0", "", "apache-2.0\nx"):
        with pytest.raises(InputError, match="not a Hugging Face Hub license id"):
            _cfg(tiny_teacher_dir, data, tmp_path / "x", license=bad)
    build(_cfg(tiny_teacher_dir, data, tmp_path / "plain", limit=2), teacher=hf_teacher)
    build(_cfg(tiny_teacher_dir, data, tmp_path / "cc", limit=2, license="cc-by-4.0"), teacher=hf_teacher)
    plain, cc = (LogitStore.open(str(tmp_path / n)).manifest for n in ("plain", "cc"))
    assert plain.differences(cc) == ["input.license: None vs 'cc-by-4.0'"]
    assert _card(str(tmp_path / "plain"))[0]["license"] == "unknown"
    assert _card(str(tmp_path / "cc"))[0]["license"] == "cc-by-4.0"


def test_resuming_a_finished_build_writes_the_card_again(tiny_teacher_dir, hf_teacher, data, tmp_path):
    out = tmp_path / "s"
    build(_cfg(tiny_teacher_dir, data, out, limit=2), teacher=hf_teacher)
    written = (out / CARD_NAME).read_text()
    (out / CARD_NAME).write_text(written + "edited by hand\n")
    summary = build(_cfg(tiny_teacher_dir, data, out, limit=2, resume=True), teacher=hf_teacher)
    assert summary.resumed_rows == 2 and (out / CARD_NAME).read_text() == written


def test_card_of_a_hand_made_manifest():
    """Stores written through the Python API: other shard prefixes get their own patterns, sampled targets and
    generation settings appear in the command, and missing sections read `not recorded`."""
    shards = [ShardInfo(f"{p}-00000.arrow", 2, 20, 10, 100, "0" * 64, [2]) for p in ("part-a", "part-b", "part-b-x")]
    m = Manifest(target=TargetSpec("sampled", samples=16), vocab_size=1000, shards=shards, status="complete",
                 teacher={"name_or_path": "org/Teacher-1B", "backend": "hf", "dtype": "bfloat16"},
                 tokenizer={"name_or_path": "org/tok"},
                 input={"source": "prompts.jsonl", "fields": {"prompt_field": "q"}, "num_workers": 1},
                 sequence={"max_seq_len": 512, "add_eos": False, "seed": 5,
                           "generate": {"max_new_tokens": 64, "temperature": 0.7}})
    assert data_files(m) == ["part-a-*.arrow", "part-b-*.arrow"]  # part-b-x's shards are part-b-*: not twice
    (command,) = build_command(m)
    assert command == ("kdstore build --teacher org/Teacher-1B --backend hf --dtype bfloat16 --tokenizer org/tok "
                       "--data prompts.jsonl --prompt-field q --samples 16 --max-seq-len 512 --no-add-eos --generate "
                       "--max-new-tokens 64 --temperature 0.7 --seed 5 --out STORE")
    cfg = parse_config(BuildConfig, shlex.split(command)[2:], "kdstore build", "")  # kdstore build takes it
    assert (cfg.samples, cfg.add_eos, cfg.generate, cfg.temperature, cfg.dtype) == (16, False, True, 0.7, "bfloat16")
    card = render_card(m)
    front = yaml.safe_load(card.split("---\n", 2)[1])
    assert front["license"] == "unknown" and "teacher-1b" in front["tags"] and "sampled-targets" in front["tags"]
    assert [e["path"] for e in front["configs"][0]["data_files"]] == ["part-a-*.arrow", "part-b-*.arrow"]
    assert "| teacher fingerprint | not recorded |" in card
    assert re.search(r"\| total \| 6 \| 60 \| 30 \|", card)
    assert render_card(m) == card  # a pure function of the manifest
