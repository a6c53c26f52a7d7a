"""Domains: `kdstore build --domain-field/--domain` on a real (tiny) teacher, what the manifest, `kdstore info`, the
reader and the stream say about them, resume, old stores, and `kdstudent eval` per domain and per store."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from store_fixtures import random_row, target_spec

from assets.synthetic import synthetic_corpus
from cli import kdstore, kdstudent
from logit_store import KDStream, LogitStore, Manifest, ShardWriter, TargetError
from logit_store.build import BuildConfig, build
from logit_store.inputs import InputError
from logit_store.teachers.hf import HFTeacher
from student.evaluate import evaluate

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def hf_teacher(tiny_teacher_dir):
    return HFTeacher.from_pretrained(tiny_teacher_dir, dtype="float32")


def _jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _records() -> list[dict]:
    """Two domains the teacher sees differently (its own grammar, and the same words reversed), one bad row."""
    texts = synthetic_corpus(16, seed=5)
    records = [{"text": t, "src": "prose"} if i % 2 == 0 else {"text": " ".join(t.split()[::-1]), "src": "reversed"}
               for i, t in enumerate(texts)]
    records[5] = {"text": records[5]["text"], "src": None}  # no domain: skipped and counted
    records[7] = {"text": records[7]["text"], "src": 3}  # not a string: skipped and counted
    return records


def _cfg(teacher_dir, data, out, **kw) -> BuildConfig:
    kw.setdefault("top_k", 8)
    return BuildConfig(teacher=teacher_dir, data=data, out=str(out), backend="hf", text_field="text",
                       progress=False, **kw)


@pytest.fixture(scope="module")
def mixed(tiny_teacher_dir, hf_teacher, tmp_path_factory):
    """A store of two domains, built with --domain-field src, in several shards."""
    tmp = tmp_path_factory.mktemp("mixed")
    data = _jsonl(tmp / "d.jsonl", _records())
    summary = build(_cfg(tiny_teacher_dir, data, tmp / "store", domain_field="src", shard_tokens=150,
                         batch_rows=4), teacher=hf_teacher)
    return str(tmp / "store"), summary


def test_domain_field_is_recorded_per_row_and_counted_per_domain(mixed):
    path, summary = mixed
    records = _records()
    store = LogitStore.open(path)
    m = store.manifest
    assert store.verify() == []
    assert summary.rows == 14 and summary.skipped == {"field 'src' is missing": 1, "field 'src' is not str": 1}
    assert "domains         2: prose 8 rows" in summary.format()
    rows = list(store)
    assert [r.domain for r in rows] == [records[r.source_index]["src"] for r in rows]
    assert m.domain_names == ["prose", "reversed"] and len(m.shards) > 1
    for name in m.domain_names:  # the manifest's per-domain figures are the rows' own
        mine = [r for r in rows if r.domain == name]
        assert m.domains[name] == {"rows": len(mine), "tokens": sum(r.input_ids.size for r in mine),
                                   "target_positions": sum(int(r.loss_mask.sum()) for r in mine)}
    assert sum(d["rows"] for d in m.domains.values()) == m.rows
    assert sum(d["tokens"] for d in m.domains.values()) == m.tokens
    assert m.input["fields"] == {"text_field": "text", "domain_field": "src"}  # part of the fingerprint
    # the stream carries each row's domain as an index into domain_names
    seen = {}
    for batch in KDStream(path, batch_size=3, seed=1):
        for source, d in zip(batch["source_index"].tolist(), batch["domain"].tolist(), strict=True):
            seen[source] = m.domain_names[d]
    assert seen == {r.source_index: r.domain for r in rows}


def test_kdstore_info_shows_rows_and_tokens_per_domain(mixed, capsys):
    path, _ = mixed
    m = LogitStore.open(path).manifest
    assert kdstore.main(["info", path]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^domains\s+2$", out, re.M)
    for name, c in m.domains.items():
        assert re.search(rf"^  {name}\s+{c['rows']:,}\s+{c['tokens']:,}\s+{c['target_positions']:,}$", out, re.M)
    assert kdstore.main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"]["domains"] == m.domains
    assert all("domains" in s for s in info["manifest"]["shards"])


def test_one_domain_for_a_whole_build(tiny_teacher_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in synthetic_corpus(5, seed=2)])
    assert kdstore.main(["build", "--teacher", tiny_teacher_dir, "--data", data, "--text-field", "text", "--out",
                         str(tmp_path / "s"), "--backend", "hf", "--top-k", "8", "--domain", "legal", "--pack",
                         "--max-seq-len", "32", "--no-progress"]) == 0
    assert "domains         1: legal " in capsys.readouterr().out
    store = LogitStore.open(str(tmp_path / "s"))
    assert {r.domain for r in store} == {"legal"} and store.manifest.input["domain"] == "legal"
    assert store.manifest.domains["legal"]["rows"] == store.manifest.rows and store.verify() == []


def test_domain_options_are_checked_before_anything_loads(tiny_teacher_dir, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "The cat sees a dog."}])
    with pytest.raises(InputError, match="not both"):
        _cfg(tiny_teacher_dir, data, tmp_path / "a", domain="x", domain_field="src")
    with pytest.raises(InputError, match="--pack joins examples"):
        _cfg(tiny_teacher_dir, data, tmp_path / "b", domain_field="src", pack=True)
    with pytest.raises(InputError, match="non-empty"):
        _cfg(tiny_teacher_dir, data, tmp_path / "c", domain="")
    with pytest.raises(InputError, match="field 'src' not in the input"):
        build(_cfg(tiny_teacher_dir, data, tmp_path / "d", domain_field="src"))


def test_workers_merge_their_domain_counts(tiny_teacher_dir, hf_teacher, mixed, tmp_path):
    from logit_store.build import merge_workers

    path, _ = mixed
    data = _jsonl(tmp_path / "d.jsonl", _records())
    for i in range(2):
        build(_cfg(tiny_teacher_dir, data, tmp_path / "s", domain_field="src", shard_tokens=150, num_workers=2,
                   worker_index=i), teacher=hf_teacher)
    merged = merge_workers(str(tmp_path / "s"))
    assert merged.domains == LogitStore.open(path).manifest.domains
    assert LogitStore.open(str(tmp_path / "s")).verify() == []


class _CrashingTeacher:
    """Fault injection: the teacher fails on its (calls + 1)-th call, as a build killed at that point would stop."""

    def __init__(self, teacher, calls: int):
        self.teacher, self.calls = teacher, calls

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def topk(self, rows, k):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("injected crash")
        return self.teacher.topk(rows, k)


def test_resume_keeps_domains_and_their_counts(tiny_teacher_dir, hf_teacher, mixed, tmp_path):
    path, _ = mixed
    data = _jsonl(tmp_path / "d.jsonl", _records())
    cfg = _cfg(tiny_teacher_dir, data, tmp_path / "s", domain_field="src", shard_tokens=150, batch_rows=4)
    with pytest.raises(RuntimeError, match="injected crash"):
        build(cfg, teacher=_CrashingTeacher(hf_teacher, calls=2))
    crashed = LogitStore.open(cfg.out).manifest
    assert crashed.status == "in_progress" and 0 < crashed.rows < 14
    cfg.resume = True
    build(cfg, teacher=hf_teacher)
    ref, got = LogitStore.open(path), LogitStore.open(cfg.out)
    assert got.manifest.domains == ref.manifest.domains and got.verify() == []
    assert [(r.source_index, r.domain) for r in got] == [(r.source_index, r.domain) for r in ref]


def test_writer_refuses_rows_with_and_without_domains_in_one_store(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(TargetError, match="row 1: has no domain, but this store's rows carry one"):
        with ShardWriter(str(tmp_path / "a"), Manifest(target=target_spec("topk"), vocab_size=50)) as w:
            for i, domain in enumerate(["code", None]):
                row, _ = random_row(rng, 50, 6, source_index=i)
                row.domain = domain
                w.write(row)
    with pytest.raises(TargetError, match="domain must be a non-empty string"):
        with ShardWriter(str(tmp_path / "b"), Manifest(target=target_spec("topk"), vocab_size=50)) as w:
            row, _ = random_row(rng, 50, 6)
            row.domain = ""
            w.write(row)


def test_verify_catches_a_wrong_domain_count(mixed, tmp_path):
    import shutil

    path, _ = mixed
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    first = manifest["shards"][0]
    name = next(iter(first["domains"]))
    first["domains"][name]["rows"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    faults = LogitStore.open(str(copy)).verify()
    assert len(faults) == 1 and faults[0].startswith(f"{first['file']}: rows / tokens / targets per domain")


def test_stores_without_domains_read_as_before():
    store = LogitStore.open(str(FIXTURES / "v1-topk"))  # written by the code before domains existed
    assert store.manifest.domains == {} and store.manifest.domain_names == []
    assert all(r.domain is None for r in store)
    batch = next(iter(KDStream(store, batch_size=4, shuffle=False)))
    assert (batch["domain"] == -1).all()
    assert "domains" not in store.manifest.to_dict()["shards"][0]  # and a rewrite keeps their manifest as it was


def _student(tiny_teacher_dir):
    """A student that differs from the teacher: the teacher with its LM head perturbed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    return model


def test_eval_per_domain_equals_eval_of_that_domain_alone(tiny_teacher_dir, hf_teacher, mixed, tmp_path):
    path, _ = mixed
    records = [r for r in _records() if r["src"] == "prose"]
    alone = tmp_path / "prose"
    build(_cfg(tiny_teacher_dir, _jsonl(tmp_path / "p.jsonl", records), alone, domain="prose"), teacher=hf_teacher)
    model = _student(tiny_teacher_dir)
    mixed_result, alone_result = evaluate(model, path, batch_size=4), evaluate(model, str(alone), batch_size=3)
    prose, single = mixed_result["domains"]["prose"], alone_result["domains"]["prose"]
    assert prose["rows"] == single["rows"] == 8 and prose["tokens"] == single["tokens"]
    for key in ("teacher_kl", "ce", "top1_agree", "ece"):
        assert prose[key] == pytest.approx(single[key], abs=1e-4), key
    reversed_ = mixed_result["domains"]["reversed"]
    assert reversed_["ce"] > prose["ce"] + 0.5  # the teacher's grammar reversed: the domains really differ
    # the store's figures are the token-weighted pool of its domains'
    n = mixed_result["tokens"]
    assert n == prose["tokens"] + reversed_["tokens"]
    for key in ("teacher_kl", "ce", "top1_agree"):
        pooled = (prose[key] * prose["tokens"] + reversed_[key] * reversed_["tokens"]) / n
        assert mixed_result[key] == pytest.approx(pooled, rel=1e-6), key


def test_kdstudent_eval_reports_each_store_and_the_pool(tiny_teacher_dir, hf_teacher, mixed, tmp_path, capsys):
    from student.config import MoELoRAConfig
    from student.convert import build_student
    from student.io import save_student

    path, _ = mixed
    other = tmp_path / "other"
    build(_cfg(tiny_teacher_dir, _jsonl(tmp_path / "o.jsonl", [{"text": t} for t in synthetic_corpus(6, seed=8)]),
               other), teacher=hf_teacher)
    shape = MoELoRAConfig(experts=2, experts_per_token=1, rank=4, attn_rank=0, expert_impl="loop")
    student_dir = save_student(build_student(tiny_teacher_dir, shape), tmp_path / "student")
    assert kdstudent.main(["eval", "--model", str(student_dir), "--store", path, "--store", str(other),
                           "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    a, b, pooled = result["stores"][path], result["stores"][str(other)], result["pooled"]
    assert set(a["domains"]) == {"prose", "reversed"} and "domains" not in b
    assert pooled["tokens"] == a["tokens"] + b["tokens"] and pooled["rows"] == a["rows"] + b["rows"]
    for key in ("teacher_kl", "ce", "top1_agree"):
        want = (a[key] * a["tokens"] + b[key] * b["tokens"]) / pooled["tokens"]
        assert pooled[key] == pytest.approx(want, rel=1e-6), key
    assert pooled["domains"] == a["domains"]  # only the first store has domains
    assert abs(sum(pooled["expert_usage"]["0"]) - 1) < 1e-6
    # routing pools over the routed tokens: the loss tokens and every row's first token (routed, predicts nothing)
    na, nb = a["tokens"] + a["rows"], b["tokens"] + b["rows"]
    for name in ("expert_usage", "routing_weights"):
        want = [(x * na + y * nb) / (na + nb) for x, y in zip(a[name]["0"], b[name]["0"], strict=True)]
        assert pooled[name]["0"] == pytest.approx(want, abs=1e-9), name
    assert pooled["routing_weights"]["0"] == pytest.approx(pooled["expert_usage"]["0"])  # top-1: each weight is 1
    assert kdstudent.main(["eval", "--model", str(student_dir), "--store", path, "--store", str(other)]) == 0
    out = capsys.readouterr().out
    assert f"store {path}\n" in out and "pooled over 2 stores" in out and "weights L0" in out
    assert re.search(r"^metric\s+all\s+prose\s+reversed$", out, re.M)
    assert re.search(rf"^tokens\s+{a['tokens']:,}\s+{a['domains']['prose']['tokens']:,}\s+", out, re.M)
