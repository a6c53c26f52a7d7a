"""What `kdstore build` does with options, inputs and filesystems that do not fit (docs/BUILD.md, "What happens
when..."): non-finite numbers, an --out that overlaps an input, one huge input row, filesystems that cannot lock, a
`kill -9` while an engine process lives on, and the messages of the kdstore CLI (a closed pipe, an unreadable
teacher file, a store named `s:3`)."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import typing

import pyarrow.fs as pafs
import pytest
from store_fixtures import write_store

from cli import kdstore
from logit_store import LogitStore, Manifest, TargetSpec
from logit_store.build import BuildConfig, _check_out_apart_from_inputs, build
from logit_store.inputs import ExampleTokenizer, FieldSpec, InputError, InputStats
from logit_store.manifest import ManifestError
from logit_store.teachers import TeacherError, check_teacher_path
from logit_store.writer import OutputLock
from student.run import RunLock, RunLockedError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _build_cli(teacher: str, data: str, out: str, *extra: str) -> list[str]:
    return ["build", "--teacher", teacher, "--data", data, "--text-field", "text", "--out", out, "--backend", "hf",
            "--no-progress", *extra]


@pytest.fixture()
def data_file(tmp_path) -> str:
    return _jsonl(tmp_path / "d.jsonl", [{"text": "The cat sees a dog."}, {"text": "A dog sees the cat."}])


# ================================================================ non-finite and negative numbers
def _float_fields() -> list[str]:
    hints = typing.get_type_hints(BuildConfig)
    return [f.name for f in dataclasses.fields(BuildConfig)
            if hints[f.name] is float or float in typing.get_args(hints[f.name])]


def test_every_float_option_refuses_nan_and_infinity_naming_its_flag():
    names = _float_fields()
    assert {"temperature", "gpu_memory_utilization"} <= set(names)
    for name in names:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(InputError, match=f"--{name.replace('_', '-')} must be a finite number"):
                BuildConfig(teacher="t", data="d", out="o", **{name: value})


@pytest.mark.parametrize(("option", "message"), [
    ({"temperature": -0.5}, "--temperature must be >= 0 (got -0.5)"),
    ({"gpu_memory_utilization": 0.0}, "--gpu-memory-utilization must be in (0, 1] (got 0.0)"),
    ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization must be in (0, 1] (got 1.5)"),
    ({"seed": -1}, "--seed must be >= 0 (got -1)"),
])
def test_negative_and_out_of_range_numbers_are_refused(option, message):
    with pytest.raises(InputError) as e:
        BuildConfig(teacher="t", data="d", out="o", **option)
    assert message in str(e.value)


def test_temperature_nan_on_the_command_line_stops_before_anything_is_written(data_file, tmp_path, capsys):
    out = tmp_path / "s"
    assert kdstore.main(["build", "--teacher", str(tmp_path / "none"), "--data", data_file, "--prompt-field", "text",
                         "--generate", "--temperature", "nan", "--out", str(out), "--no-progress"]) == 2
    assert "--temperature must be a finite number (got nan)" in capsys.readouterr().err
    assert not out.exists()


def test_the_manifest_is_strict_json_or_is_not_written(tmp_path):
    manifest = Manifest(target=TargetSpec("topk", k=4), vocab_size=10, sequence={"generate": {"temperature": math.nan}})
    with pytest.raises(ManifestError, match=r"nan at sequence\.generate\.temperature"):
        manifest.save(pafs.LocalFileSystem(), str(tmp_path))
    assert not list(tmp_path.iterdir())
    manifest.sequence = {"generate": {"temperature": 0.7}}
    strict = json.loads(manifest.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in the manifest"))
    assert strict["sequence"]["generate"]["temperature"] == 0.7


# ================================================================ --out apart from every input
@pytest.fixture()
def teacher_copy(tiny_teacher_dir, tmp_path) -> str:
    """A teacher folder of this test's own: a refusal that failed would write into it, not the shared fixture."""
    return shutil.copytree(tiny_teacher_dir, tmp_path / "teacher")


def _listing(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["out is the teacher", "out inside the teacher", "out is the tokenizer",
                                  "out is the data folder", "out inside the data folder", "out contains the data",
                                  "out is a symlink to the teacher", "out is the teacher as file://"])
def test_an_out_that_is_contains_or_is_inside_an_input_is_refused(case, teacher_copy, tmp_path, capsys):
    teacher, data_dir = teacher_copy, tmp_path / "data"
    data_dir.mkdir()
    _jsonl(data_dir / "d.jsonl", [{"text": "The cat sees a dog."}])
    data, extra = str(data_dir), []
    out, option, relation = {
        "out is the teacher": (teacher, "--teacher", "is"),
        "out inside the teacher": (teacher / "store", "--teacher", "is inside"),
        "out is the tokenizer": (teacher, "--tokenizer", "is"),
        "out is the data folder": (data_dir, "--data", "is"),
        "out inside the data folder": (data_dir / "store", "--data", "is inside"),
        "out contains the data": (tmp_path, "--data", "contains"),
        "out is a symlink to the teacher": (tmp_path / "link", "--teacher", "is"),
        "out is the teacher as file://": (f"file://{teacher}", "--teacher", "is"),
    }[case]
    if case == "out is the tokenizer":  # a teacher elsewhere, its tokenizer folder as --out
        extra, teacher = ["--tokenizer", str(teacher)], shutil.copytree(teacher, tmp_path / "teacher2")
    if case == "out is a symlink to the teacher":
        os.symlink(teacher, out)
    before = _listing(tmp_path)
    assert kdstore.main(_build_cli(str(teacher), data, str(out), *extra)) == 2
    err = capsys.readouterr().err
    assert f"--out {out} {relation} the {option} input" in err and "Choose an --out outside every input" in err
    assert _listing(tmp_path) == before  # nothing written, not even the lock file or the --out folder


def test_an_out_beside_the_inputs_is_accepted(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "teacher").mkdir()
    for out in (tmp_path / "data2", tmp_path / "teacher-store", tmp_path / "stores" / "a"):  # prefixes, not parents
        _check_out_apart_from_inputs(BuildConfig(teacher=str(tmp_path / "teacher"), data=str(tmp_path / "data"),
                                                 out=str(out)))
    # hub names have no place on disk; URLs are compared as written
    _check_out_apart_from_inputs(BuildConfig(teacher="org/model", data="org/dataset", out="org"))
    _check_out_apart_from_inputs(BuildConfig(teacher="t", data="s3://b/data", out="s3://b/data2"))
    with pytest.raises(InputError, match="--out s3://b/data/store is inside the --data input s3://b/data"):
        _check_out_apart_from_inputs(BuildConfig(teacher="t", data="s3://b/data/", out="s3://b/data/store"))


# ================================================================ huge input rows
class _WideTokenizer:
    """A tokenizer whose tokens are `width` characters each (byte-level BPE's worst case is far below 16), and which
    records the length of every text it is given."""

    eos_token_id = 0
    chat_template = None

    def __init__(self, width: int):
        self.width, self.seen = width, []

    def __len__(self) -> int:
        return 1000

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        self.seen.append(len(text))
        starts = range(0, len(text), self.width)
        ids = [1 + (hash(text[s:s + self.width]) % 998) for s in starts]
        return type("Encoding", (), {"input_ids": ([1] if add_special_tokens else []) + ids,
                                     "offset_mapping": [(s, min(s + self.width, len(text))) for s in starts]})


@pytest.mark.parametrize("width", [1, 4, 40, 1000])
def test_a_huge_text_is_tokenised_only_as_far_as_its_row_keeps(width):
    tok = _WideTokenizer(width)
    text = "".join(chr(97 + (i * 7919) % 26) for i in range(3_000_000))
    stats = InputStats()
    example = ExampleTokenizer(tok, FieldSpec(text_field="text"), 64)(0, {"text": text}, stats)
    whole = tok(text).input_ids[:64]
    assert list(example.input_ids) == whole and stats.truncated == 1
    # (64 + 32 margin tokens) x 16 characters first, then 4x that while it holds too few tokens
    assert max(tok.seen[:-1]) <= max(96 * 16, 4 * 96 * width), tok.seen


def test_huge_rows_of_every_field_mode_keep_the_whole_texts_tokens(tiny_teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    words = "the cat sees a dog and the bird, 1234 ; é " * 40_000  # 1.7 MB
    long_runs = "a" * 200_000 + " " * 5_000 + "-" * 50_000
    for text in (words, long_runs, "日本語のテキスト" * 20_000, "1234567890" * 20_000):
        whole = tok(text).input_ids
        stats = InputStats()
        ex = ExampleTokenizer(tok, FieldSpec(text_field="t"), 64)(0, {"t": text}, stats)
        assert list(ex.input_ids) == whole[:64] and stats.truncated == 1
        ex = ExampleTokenizer(tok, FieldSpec(prompt_field="p", response_field="r"), 64)(
            0, {"p": "a question?", "r": text}, stats)
        prompt = tok("a question?").input_ids
        assert list(ex.input_ids) == (prompt + tok(text, add_special_tokens=False).input_ids)[:64]
        assert ex.loss_mask[len(prompt):].all() and not ex.loss_mask[:len(prompt)].any()
    ids = ExampleTokenizer(tok, FieldSpec(input_ids_field="ids"), 64)(0, {"ids": [5] * 1_000_000}, stats)
    assert ids.input_ids.size == 64 and ids.truncated


def test_a_build_of_one_huge_jsonl_line_keeps_its_first_tokens(tiny_teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    text = "the cat sees a dog and the bird . " * 300_000  # a 10 MB line
    data = _jsonl(tmp_path / "big.jsonl", [{"text": text}, {"text": "a short row"}])
    start = time.time()
    summary = build(BuildConfig(teacher=tiny_teacher_dir, data=data, out=str(tmp_path / "s"), text_field="text",
                                backend="hf", top_k=4, max_seq_len=64, progress=False))
    seconds = time.time() - start
    assert summary.rows == 2 and summary.truncated == 1
    row = next(iter(LogitStore.open(str(tmp_path / "s"))))
    assert list(row.input_ids) == AutoTokenizer.from_pretrained(tiny_teacher_dir)(text[:20_000]).input_ids[:64]
    assert seconds < 60, seconds  # whole-text tokenisation took minutes (and 7 GB for 50 MB)


# ================================================================ filesystems that cannot lock
@pytest.fixture()
def lock_fails(monkeypatch):
    """fcntl.lockf raising `errno` on a lock request, as NFS without lockd (ENOLCK) or Lustre without flock
    (ENOSYS) do."""

    def set_errno(code: int) -> None:
        def lockf(fd, cmd, *args):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(fcntl, "lockf", lockf)
        monkeypatch.setattr(fcntl, "flock", lockf)

    return set_errno


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL])
def test_a_filesystem_without_locks_is_named_not_taken_for_a_holder(code, lock_fails, tmp_path):
    OutputLock(str(tmp_path / "s")).release()  # a run before wrote its pid into the lock files
    RunLock(tmp_path / "run").release()
    lock_fails(code)
    with pytest.raises(ManifestError) as e:
        OutputLock(str(tmp_path / "s"))
    assert f"locking is not supported on this filesystem (errno {code}, {os.strerror(code)}" in str(e.value)
    assert "local --out" in str(e.value) and "being written by" not in str(e.value)
    with pytest.raises(RunLockedError) as e:
        RunLock(tmp_path / "run")
    assert f"locking is not supported on this filesystem (errno {code}, {os.strerror(code)}" in str(e.value)
    assert "local --out" in str(e.value) and "in use by another" not in str(e.value)


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.EACCES])
def test_a_held_lock_is_still_reported_as_held(code, lock_fails, tmp_path):
    lock_fails(code)
    with pytest.raises(ManifestError, match="is being written by another build of the same worker"):
        OutputLock(str(tmp_path / "s"))
    with pytest.raises(RunLockedError, match="is in use by another training"):
        RunLock(tmp_path / "run")


def test_the_output_lock_refuses_a_second_holder_in_this_process(tmp_path):
    first = OutputLock(str(tmp_path / "s"))
    with pytest.raises(ManifestError, match="another build of the same worker in this process"):
        OutputLock(str(tmp_path / "s"))
    first.release()
    OutputLock(str(tmp_path / "s")).release()


def test_the_cli_says_so_when_the_store_filesystem_cannot_lock(tiny_teacher_dir, data_file, lock_fails, tmp_path,
                                                               capsys):
    lock_fails(errno.ENOLCK)
    assert kdstore.main(_build_cli(tiny_teacher_dir, data_file, str(tmp_path / "s"))) == 2
    assert "locking is not supported on this filesystem (errno" in capsys.readouterr().err


# ================================================================ kill -9 and the processes a build started
_FORKING_HOLDER = textwrap.dedent("""
    import os, signal, sys, time
    from logit_store.writer import OutputLock
    lock = OutputLock(sys.argv[1])
    child = os.fork()  # as vLLM forks its engine core on a GPU, after the build took its lock
    if child == 0:
        time.sleep(60)
        os._exit(0)
    with open(sys.argv[2], "w") as f:
        f.write(str(child))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_forked_child_of_a_killed_build_holds_no_lock(tmp_path):
    """The lock is the build's alone: a process it forked (vLLM's engine core on a GPU) and that outlives a
    `kill -9` of the build does not keep it (an flock, shared with forked children, would)."""
    out, pid_file = str(tmp_path / "s"), tmp_path / "child.pid"
    with open(tmp_path / "log", "w") as log:  # not a pipe: the child would hold it open
        killed = subprocess.run([sys.executable, "-c", _FORKING_HOLDER, out, str(pid_file)], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, timeout=60)
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()
    child = int(pid_file.read_text())
    try:
        assert _alive(child)  # the forked child lives on, with the build's open lock file
        OutputLock(out).release()  # ... and the lock is free at once
    finally:
        os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _descendants(pid: int) -> list[int]:
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


@pytest.mark.slow
def test_kill_9_of_a_vllm_build_leaves_the_lock_free_and_resume_takes_it(tiny_teacher_dir, tmp_path):
    """A real vLLM build (its engine core in a process of its own, VLLM_ENABLE_V1_MULTIPROCESSING=1), killed with
    SIGKILL after its first shard: the lock is free at once, though the engine processes live on, and a --resume
    takes it and finishes the store. Slow: each vLLM engine takes ~20 s to start on this CPU."""
    from assets.synthetic import synthetic_corpus

    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in synthetic_corpus(400, seed=1)])
    out = tmp_path / "s"
    args = [sys.executable, "-m", "cli.kdstore", "build", "--teacher", tiny_teacher_dir, "--data", data,
            "--text-field", "text", "--backend", "vllm", "--top-k", "8", "--batch-rows", "8", "--shard-tokens", "500",
            "--max-seq-len", "256", "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    with open(tmp_path / "build.log", "w") as log:  # not a pipe: the engine processes would hold it open
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    started: list[int] = []
    try:
        deadline = time.time() + 300
        while not (out / "manifest.json").exists() or not json.loads((out / "manifest.json").read_text())["shards"]:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "build.log").read_text()[-3000:]
            time.sleep(0.05)
        started = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        living = [p for p in started if _alive(p)]
        OutputLock(str(out)).release()  # free at once, whatever still lives
        print(f"processes of the killed build still alive when the lock was taken: {len(living)}")
        resumed = subprocess.run(args + ["--resume"], cwd=ROOT, env=dict(env, VLLM_ENABLE_V1_MULTIPROCESSING="0"),
                                 capture_output=True, text=True, timeout=400)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "from before the resume" in resumed.stdout
        store = LogitStore.open(str(out))
        assert store.manifest.status == "complete" and store.manifest.rows == 400 and store.verify(decode=False) == []
    finally:
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ================================================================ messages of the kdstore CLI
def test_a_closed_pipe_ends_kdstore_quietly(tmp_path):
    """`kdstore info STORE --json | head -1`: the reader is gone before kdstore writes; no traceback, exit 141."""
    write_store(str(tmp_path / "s"), n_rows=200, shard_tokens=40)
    proc = subprocess.Popen([sys.executable, "-m", "cli.kdstore", "info", str(tmp_path / "s"), "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has even imported what it needs
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGPIPE and err == b""


def test_a_teacher_that_is_not_a_readable_folder_is_named_for_what_it_is(teacher_copy, tmp_path, monkeypatch):
    with pytest.raises(TeacherError, match="does not exist"):
        check_teacher_path(str(tmp_path / "absent"))
    with pytest.raises(TeacherError, match="is a file, not a model folder"):
        check_teacher_path(str(teacher_copy / "config.json"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(TeacherError, match="is a GGUF file: convert it once with kdstore prepare-teacher"):
        check_teacher_path(str(tmp_path / "m.gguf"))
    with pytest.raises(TeacherError, match=r"cannot be reached \(Not a directory\)"):
        check_teacher_path(str(teacher_copy / "config.json" / "x"))
    check_teacher_path("org/model")  # a hub name
    check_teacher_path(str(teacher_copy))
    weights = str(teacher_copy / "model.safetensors")
    real_open = os.open

    def denied(path, flags, *args, **kw):  # what a file without read permission gives (the tests may run as root)
        if path == weights:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(TeacherError) as e:
        check_teacher_path(str(teacher_copy))
    assert f"teacher file {weights} exists but cannot be read (Permission denied)" in str(e.value)


def test_an_unreadable_teacher_file_is_reported_by_the_build(teacher_copy, data_file, tmp_path, monkeypatch, capsys):
    config = str(teacher_copy / "config.json")
    real_open = os.open

    def denied(path, flags, *args, **kw):
        if path == config:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", denied)
    assert kdstore.main(_build_cli(str(teacher_copy), data_file, str(tmp_path / "s"))) == 2
    assert f"teacher file {config} exists but cannot be read (Permission denied)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["local", "file", "memory"])
def test_kdstore_reads_a_store_named_with_a_colon_number_as_named(name, tmp_path, capsys):
    """kdstore commands take one store: `s:3` is its name, never `s` with weight 3."""
    path = {"local": str(tmp_path / "s:3"), "file": f"file://{tmp_path}/s:3", "memory": f"memory://b{os.getpid()}/s:2"}
    path = path[name]
    write_store(path, n_rows=7)
    assert kdstore.main(["info", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["rows"] == 7
    assert kdstore.main(["verify", path, "--quick"]) == 0
    assert f"OK {path}: " in capsys.readouterr().out
