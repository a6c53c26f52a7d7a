"""`kdstore build` on a real (tiny) teacher: both backends, field modes, bad input, resume after SIGKILL, workers."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from assets.synthetic import synthetic_corpus
from logit_store import KDStream, LogitStore
from logit_store.build import BuildConfig, build, merge_workers
from logit_store.inputs import InputError
from logit_store.manifest import ManifestError
from logit_store.teachers import TeacherError
from logit_store.teachers.hf import HFTeacher


@pytest.fixture(scope="module")
def hf_teacher(tiny_teacher_dir):
    return HFTeacher.from_pretrained(tiny_teacher_dir, dtype="float32")


@pytest.fixture(scope="module")
def vllm_teacher(tiny_teacher_dir):
    from logit_store.teachers.vllm import VLLMTeacher

    return VLLMTeacher(tiny_teacher_dir, dtype="float32", max_logprobs=64)


def _jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return _jsonl(tmp_path_factory.mktemp("data") / "text.jsonl",
                  [{"text": t} for t in synthetic_corpus(24, seed=3)])


def _cfg(teacher_dir, data, out, **kw) -> BuildConfig:
    kw.setdefault("text_field", "text")
    kw.setdefault("top_k", 8)
    return BuildConfig(teacher=teacher_dir, data=data, out=str(out), backend=kw.pop("backend", "hf"),
                       progress=False, **kw)


def _rows(store: str) -> dict[int, tuple]:
    return {r.source_index: r for r in LogitStore.open(store)}


def test_backends_agree_on_topk_and_tail(tiny_teacher_dir, hf_teacher, vllm_teacher):
    rng = np.random.default_rng(0)
    rows = []
    for n in (7, 30, 61):
        ids = rng.integers(0, hf_teacher.vocab_size, n)
        mask = np.ones(n, bool)
        mask[0] = False
        mask[2:5] = False  # targets only where the loss mask says
        rows.append((ids, mask))
    for a, b in zip(hf_teacher.topk(rows, 32), vllm_teacher.topk(rows, 32), strict=True):
        assert a.ids.shape == b.ids.shape == (len(a.ids), 32)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        # equal log-probs may swap places; compare each position's candidate set
        assert all(set(x) == set(y) for x, y in zip(a.ids.tolist(), b.ids.tolist(), strict=True))
        np.testing.assert_allclose(np.exp(a.tail), np.exp(b.tail), atol=1e-4)


def test_vllm_build_verify_stream_round_trip(tiny_teacher_dir, vllm_teacher, text_file, tmp_path):
    summary = build(_cfg(tiny_teacher_dir, text_file, tmp_path / "s", backend="vllm", shard_tokens=400),
                    teacher=vllm_teacher)
    store = LogitStore.open(str(tmp_path / "s"))
    assert summary.rows == 24 == store.manifest.rows and store.verify() == []
    m = store.manifest
    assert m.teacher["backend"] == "vllm" and m.target.k == 8 and len(m.shards) > 1
    assert m.tokenizer["fingerprint"] and m.input["fingerprint"] and m.tool["vllm"]
    seen = [int(i) for b in KDStream(str(tmp_path / "s"), batch_size=5) for i in b["source_index"]]
    assert sorted(seen) == list(range(24))


def test_sampled_targets(tiny_teacher_dir, hf_teacher, vllm_teacher, text_file, tmp_path):
    exact = build(_cfg(tiny_teacher_dir, text_file, tmp_path / "hf", top_k=None, samples=50, limit=4),
                  teacher=hf_teacher)
    # vLLM sees only its top-K: draws from the top-K + a tail bucket bias the gradient (tests/test_rs_kd.py), so
    # the build and the backend refuse them and point to the hf backend
    with pytest.raises(InputError, match="--samples needs --backend hf"):
        _cfg(tiny_teacher_dir, text_file, tmp_path / "vl", top_k=None, samples=50, limit=4, backend="vllm")
    with pytest.raises(InputError, match="--sample-from-top-k is not accepted"):
        _cfg(tiny_teacher_dir, text_file, tmp_path / "vl", top_k=None, samples=50, sample_from_top_k=32)
    with pytest.raises(TeacherError, match="--backend hf"):
        vllm_teacher.sample([(np.arange(5), np.ones(5, bool))], 50, [0], 32)
    assert exact.rows == 4
    assert LogitStore.open(str(tmp_path / "hf")).manifest.target.sampled_from_top_k is None
    row = LogitStore.open(str(tmp_path / "hf")).row(0)
    weights = np.exp(row.target_logprobs) * row.target_mask
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)  # exact draws: no tail
    # same seed -> same draws
    again = build(_cfg(tiny_teacher_dir, text_file, tmp_path / "hf2", top_k=None, samples=50, limit=4),
                  teacher=hf_teacher)
    assert again.rows == 4
    b = LogitStore.open(str(tmp_path / "hf2")).row(0)
    assert (b.target_ids == row.target_ids).all() and (b.target_logprobs == row.target_logprobs).all()


def test_bad_input_rows_are_skipped_and_counted(tiny_teacher_dir, hf_teacher, tmp_path):
    records = [{"text": "A good row of text."}, {"text": ""}, {"text": None}, {"text": 42},
               {"text": "A long row. " * 40}, {"text": "Another good row."}]
    summary = build(_cfg(tiny_teacher_dir, _jsonl(tmp_path / "d.jsonl", records), tmp_path / "s",
                         max_seq_len=32), teacher=hf_teacher)
    assert summary.rows == 3 and summary.examples == 6 and summary.truncated == 1
    assert summary.skipped == {"field 'text' is empty": 1, "field 'text' is missing": 1,
                               "field 'text' is not str": 1}
    assert any(e.startswith("input row 3: field 'text' is not str") for e in summary.first_errors)
    assert "3 skipped" in summary.format()
    assert max(r.input_ids.size for r in LogitStore.open(str(tmp_path / "s"))) == 32


def test_bad_setups_get_clear_errors(tiny_teacher_dir, text_file, tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        build(_cfg(str(tmp_path / "nope"), text_file, tmp_path / "s"))
    with pytest.raises(InputError, match="not in the input"):
        build(_cfg(tiny_teacher_dir, text_file, tmp_path / "s2", text_field="body"))
    with pytest.raises(InputError, match="exactly one"):
        build(_cfg(tiny_teacher_dir, text_file, tmp_path / "s3", prompt_field="p", response_field="r"))
    small = HFTeacher.from_pretrained(tiny_teacher_dir)
    small.vocab_size = 100  # a teacher whose vocabulary is smaller than the tokenizer's
    with pytest.raises(TeacherError, match="do not belong together"):
        build(_cfg(tiny_teacher_dir, text_file, tmp_path / "s4"), teacher=small)


def test_chat_loss_only_on_assistant_turns(tiny_teacher_dir, hf_teacher, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    chats = [{"messages": [{"role": "user", "content": "The cat sees a dog."},
                           {"role": "assistant", "content": "A dog sees the cat."},
                           {"role": "user", "content": "Again?"},
                           {"role": "assistant", "content": "The old man helps."}]},
             {"messages": [{"role": "user", "content": "No answer here."}]}]
    summary = build(_cfg(tiny_teacher_dir, _jsonl(tmp_path / "c.jsonl", chats), tmp_path / "s", text_field=None,
                         messages_field="messages"), teacher=hf_teacher)
    assert summary.rows == 1 and summary.skipped == {"chat has no assistant turn": 1}
    row = LogitStore.open(str(tmp_path / "s")).row(0)
    said = tok.decode(row.input_ids[row.loss_mask])
    assert said == "A dog sees the cat.<|end|>The old man helps.<|end|>"


def test_prompt_response_and_generate(tiny_teacher_dir, hf_teacher, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    data = _jsonl(tmp_path / "p.jsonl", [{"p": "The farmer sees", "r": " the long road."},
                                         {"p": "A small bird", "r": " helps."}])
    build(_cfg(tiny_teacher_dir, data, tmp_path / "pr", text_field=None, prompt_field="p", response_field="r"),
          teacher=hf_teacher)
    row = LogitStore.open(str(tmp_path / "pr")).row(0)
    assert tok.decode(row.input_ids[row.loss_mask]) == " the long road.<|endoftext|>"

    gen = _cfg(tiny_teacher_dir, data, tmp_path / "g", text_field=None, prompt_field="p", generate=True,
               max_new_tokens=12, temperature=0.0)
    build(gen, teacher=hf_teacher)
    rows = list(LogitStore.open(str(tmp_path / "g")))
    assert len(rows) == 2
    for r in rows:
        n_prompt = int(np.argmax(r.loss_mask))
        assert 1 <= r.input_ids.size - n_prompt <= 12 and r.loss_mask[n_prompt:].all()
    gen.out = str(tmp_path / "g2")
    build(gen, teacher=hf_teacher)  # greedy: the same responses again
    assert [r.input_ids.tolist() for r in rows] == [r.input_ids.tolist() for r in LogitStore.open(gen.out)]


def test_packing_fills_rows(tiny_teacher_dir, hf_teacher, text_file, tmp_path):
    build(_cfg(tiny_teacher_dir, text_file, tmp_path / "s", pack=True, max_seq_len=64), teacher=hf_teacher)
    rows = list(LogitStore.open(str(tmp_path / "s")))
    assert all(r.input_ids.size == 64 for r in rows[:-1]) and len(rows) > 2


def test_two_workers_and_merge_equal_one_worker(tiny_teacher_dir, hf_teacher, text_file, tmp_path):
    build(_cfg(tiny_teacher_dir, text_file, tmp_path / "one", shard_tokens=300), teacher=hf_teacher)
    for i in range(2):
        build(_cfg(tiny_teacher_dir, text_file, tmp_path / "two", shard_tokens=300, num_workers=2, worker_index=i),
              teacher=hf_teacher)
    with pytest.raises(Exception, match="manifest"):
        LogitStore.open(str(tmp_path / "two"))  # not merged yet
    merged = merge_workers(str(tmp_path / "two"))
    assert merged.status == "complete"
    one, two = _rows(str(tmp_path / "one")), _rows(str(tmp_path / "two"))
    assert one.keys() == two.keys() == set(range(24))
    for i in one:
        assert (one[i].input_ids == two[i].input_ids).all()
        assert (np.sort(one[i].target_ids, 1) == np.sort(two[i].target_ids, 1)).all()
    assert LogitStore.open(str(tmp_path / "two")).verify() == []


def test_merge_refuses_unfinished_workers(tiny_teacher_dir, hf_teacher, text_file, tmp_path):
    build(_cfg(tiny_teacher_dir, text_file, tmp_path, num_workers=3, worker_index=1), teacher=hf_teacher)
    with pytest.raises(Exception, match=r"workers \[0, 2\] have not started"):
        merge_workers(str(tmp_path))
    assert merge_workers(str(tmp_path), allow_incomplete=True).status == "in_progress"


def test_merge_refuses_workers_that_stored_nothing(tiny_teacher_dir, hf_teacher, tmp_path):
    """Every example skipped in every worker's share: each worker finishes with no row (a worker may), but the
    merge refuses to make an empty store, saying why."""
    data = _jsonl(tmp_path / "d.jsonl", [{"text": ""}] * 3)
    for i in range(2):
        summary = build(_cfg(tiny_teacher_dir, data, tmp_path / "s", num_workers=2, worker_index=i),
                        teacher=hf_teacher)
        assert summary.rows == 0 and sum(summary.skipped.values()) > 0
    with pytest.raises(ManifestError, match=r"none of the 2 workers stored a row .* every example was skipped"):
        merge_workers(str(tmp_path / "s"))
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_resume_refuses_other_settings(tiny_teacher_dir, hf_teacher, text_file, tmp_path):
    build(_cfg(tiny_teacher_dir, text_file, tmp_path, limit=4), teacher=hf_teacher)
    with pytest.raises(Exception, match="different settings"):
        build(_cfg(tiny_teacher_dir, text_file, tmp_path, limit=4, top_k=16, resume=True), teacher=hf_teacher)


KILL_ARGS = ["--text-field", "text", "--backend", "hf", "--dtype", "float32", "--top-k", "8", "--shard-tokens",
             "2000", "--batch-rows", "8", "--no-progress"]


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> str:
    return _jsonl(tmp_path_factory.mktemp("kill") / "d.jsonl", [{"text": t} for t in synthetic_corpus(300, seed=9)])


@pytest.fixture(scope="module")
def kill_reference(tiny_teacher_dir, hf_teacher, kill_data, tmp_path_factory) -> str:
    """The build of the kill test, uninterrupted, in this process on one thread (the CLI runs get
    OMP_NUM_THREADS=1)."""
    import torch

    out = str(tmp_path_factory.mktemp("kill") / "ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build(_cfg(tiny_teacher_dir, kill_data, out, top_k=8, dtype="float32", shard_tokens=2000, batch_rows=8),
              teacher=hf_teacher)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("where", ["after shard 2 is listed", "in a teacher batch split by a shard end"])
def test_sigkill_then_resume_equals_an_uninterrupted_build(tiny_teacher_dir, kill_data, kill_reference, where,
                                                           tmp_path):
    ref_manifest = LogitStore.open(kill_reference).manifest
    ends = np.cumsum([s.rows for s in ref_manifest.shards])
    if where == "after shard 2 is listed":
        fault = "shard-listed:2"
    else:  # the first row of the next shard, in the same batch of 8 as the last rows of this one
        fault = f"row-written:{next(int(e) for e in ends[1:-1] if e % 8)}"
    args = ["build", "--teacher", tiny_teacher_dir, "--data", kill_data, *KILL_ARGS]
    exe = [sys.executable, "-m", "cli.kdstore"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "crash"
    killed = subprocess.run([*exe, *args, "--out", str(out)], env=dict(env, MOEKD_FAULT=fault), capture_output=True,
                            text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    crashed = LogitStore.open(str(out))
    assert crashed.manifest.status == "in_progress", "the build finished before it could be killed"
    assert crashed.verify() == []
    assert len(crashed.manifest.shards) >= 2
    resumed = subprocess.run([*exe, *args, "--out", str(out), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "from before the resume" in resumed.stdout
    ref, got = list(LogitStore.open(kill_reference)), list(LogitStore.open(str(out)))
    assert [r.source_index for r in got] == [r.source_index for r in ref]  # no row lost, none duplicated
    for a, b in zip(ref, got, strict=True):
        oa, ob = np.argsort(a.target_ids, 1), np.argsort(b.target_ids, 1)
        assert (a.input_ids == b.input_ids).all()
        assert (np.take_along_axis(a.target_ids, oa, 1) == np.take_along_axis(b.target_ids, ob, 1)).all()
        assert (np.take_along_axis(a.target_logprobs, oa, 1) == np.take_along_axis(b.target_logprobs, ob, 1)).all()
    # bit for bit: the same shard files (sha256, sizes, rows, record batches) as the uninterrupted build
    assert [vars(s) for s in LogitStore.open(str(out)).manifest.shards] == [vars(s) for s in ref_manifest.shards]


def test_build_reads_its_options_from_yaml(tiny_teacher_dir, text_file, tmp_path, capsys):
    from cli import kdstore

    config = tmp_path / "build.yaml"
    config.write_text(f"teacher: {tiny_teacher_dir}\ndata: {text_file}\ntext_field: text\nout: {tmp_path / 's'}\n"
                      "backend: hf\ntop_k: 4\nlimit: 5\nprogress: false\n")
    assert kdstore.main(["build", str(config)]) == 0
    assert "rows            5" in capsys.readouterr().out
    assert LogitStore.open(str(tmp_path / "s")).manifest.target.k == 4


def test_resume_and_merge_follow_the_data_not_the_file_dates(tiny_teacher_dir, hf_teacher, tmp_path):
    """The SLURM recipe: a worker requeued after the data was re-copied (new mtime, same bytes) still resumes, and
    the workers still merge; an edit of the data is refused, naming what differs."""
    import shutil

    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in synthetic_corpus(12, seed=5)])
    cfg = dict(shard_tokens=100, num_workers=2)
    build(_cfg(tiny_teacher_dir, data, tmp_path / "s", worker_index=0, **cfg), teacher=hf_teacher)
    shutil.copy(data, tmp_path / "copy.jsonl")
    os.replace(tmp_path / "copy.jsonl", data)  # the same bytes, a new file and date
    os.utime(data, (1e9, 1e9))
    assert build(_cfg(tiny_teacher_dir, data, tmp_path / "s", worker_index=0, resume=True, **cfg),
                 teacher=hf_teacher).resumed_rows == 6
    build(_cfg(tiny_teacher_dir, data, tmp_path / "s", worker_index=1, **cfg), teacher=hf_teacher)
    assert merge_workers(str(tmp_path / "s")).rows == 12
    with open(data, "a") as f:
        f.write(json.dumps({"text": "One more line."}) + "\n")
    with pytest.raises(ManifestError, match=r"different settings; refusing to mix them in one store: "
                                            r"input\.examples: 12 vs 13; input\.fingerprint: '[0-9a-f]{16}' vs "
                                            r"'[0-9a-f]{16}'$"):
        build(_cfg(tiny_teacher_dir, data, tmp_path / "s", worker_index=1, resume=True, **cfg), teacher=hf_teacher)


def test_refusals_name_the_setting_that_differs(tiny_teacher_dir, hf_teacher, text_file, tmp_path):
    build(_cfg(tiny_teacher_dir, text_file, tmp_path / "r", limit=4), teacher=hf_teacher)
    with pytest.raises(ManifestError, match=r"refusing to mix them in one store: target\.k: 8 vs 16$"):
        build(_cfg(tiny_teacher_dir, text_file, tmp_path / "r", limit=4, top_k=16, resume=True), teacher=hf_teacher)
    build(_cfg(tiny_teacher_dir, text_file, tmp_path / "m", limit=4, num_workers=2, worker_index=0),
          teacher=hf_teacher)
    build(_cfg(tiny_teacher_dir, text_file, tmp_path / "m", limit=4, num_workers=2, worker_index=1, max_seq_len=64),
          teacher=hf_teacher)
    with pytest.raises(ManifestError, match=r"\(worker 0 vs worker 1: sequence\.max_seq_len: 2048 vs 64\)$"):
        merge_workers(str(tmp_path / "m"))


def test_packed_multi_worker_store_packs_each_share_and_says_so(tiny_teacher_dir, hf_teacher, text_file, tmp_path):
    """--pack packs the examples of one worker's share (i % N == I): an N-worker packed store holds every example's
    tokens once, cut into other rows than a single-worker one; its manifest says so (and the fingerprints differ)."""
    build(_cfg(tiny_teacher_dir, text_file, tmp_path / "one", pack=True, max_seq_len=64), teacher=hf_teacher)
    for i in range(2):
        build(_cfg(tiny_teacher_dir, text_file, tmp_path / "two", pack=True, max_seq_len=64, num_workers=2,
                   worker_index=i), teacher=hf_teacher)
    two = merge_workers(str(tmp_path / "two"))
    one = LogitStore.open(str(tmp_path / "one")).manifest
    assert one.sequence["pack_scope"] == "all examples" and two.sequence["pack_scope"] == "worker share"
    from collections import Counter

    # every token once, but for a lone last token of a packed share (no context to predict it from: dropped); here
    # the single worker's input ends in one, the two workers' shares do not
    tokens = [Counter(np.concatenate([r.input_ids for r in LogitStore.open(str(tmp_path / s))]).tolist())
              for s in ("one", "two")]
    assert tokens[0] - tokens[1] == Counter() and sum((tokens[1] - tokens[0]).values()) == 1
    assert two.tokens == one.tokens + 1 and two.rows > one.rows


def test_vllm_builds_are_identical_and_a_resume_changes_nothing(tiny_teacher_dir, vllm_teacher, text_file,
                                                                  tmp_path):
    """What holds for the vLLM backend on this CPU (docs/BUILD.md): two builds, and a build resumed after a crash
    (the state a kill right after a shard is listed leaves), write byte-identical shards."""
    import shutil

    cfg = dict(backend="vllm", shard_tokens=300, batch_rows=5)
    build(_cfg(tiny_teacher_dir, text_file, tmp_path / "a", **cfg), teacher=vllm_teacher)
    build(_cfg(tiny_teacher_dir, text_file, tmp_path / "b", **cfg), teacher=vllm_teacher)
    shards = LogitStore.open(str(tmp_path / "a")).manifest.shards
    assert [vars(s) for s in LogitStore.open(str(tmp_path / "b")).manifest.shards] == [vars(s) for s in shards]
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    kept = next(i + 1 for i, s in enumerate(np.cumsum([s.rows for s in shards])[:-1]) if s % 5)
    for s in manifest["shards"][kept:]:
        os.remove(tmp_path / "c" / s["file"])
    manifest["shards"], manifest["status"] = manifest["shards"][:kept], "in_progress"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    summary = build(_cfg(tiny_teacher_dir, text_file, tmp_path / "c", resume=True, **cfg), teacher=vllm_teacher)
    assert summary.recomputed_rows > 0  # the resume point split a batch of 5
    assert [vars(s) for s in LogitStore.open(str(tmp_path / "c")).manifest.shards] == [vars(s) for s in shards]
