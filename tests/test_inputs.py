"""Bad input, tried as a new user would: each case ends in a message naming the file and line (and what to do), or
in a skip counted in the build summary with its file and line. Nothing is left out without a word."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from cli import kdstore
from logit_store import LogitStore
from logit_store.build import BuildConfig, build
from logit_store.inputs import InputError, InputSource
from logit_store.teachers.hf import HFTeacher


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return HFTeacher.from_pretrained(tiny_teacher_dir, dtype="float32")


def _build(teacher_dir, teacher, data, out, **kw):
    kw.setdefault("text_field", "text")
    return build(BuildConfig(teacher=teacher_dir, data=str(data), out=str(out), backend="hf", top_k=4,
                             progress=False, **kw), teacher=teacher)


def _lines(path, lines: list[bytes]) -> str:
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("compressed", [False, True], ids=["jsonl", "jsonl.gz"])
def test_invalid_utf8_skips_that_row_and_names_file_and_line(tiny_teacher_dir, teacher, tmp_path, compressed):
    lines = [b'{"text": "The cat sees a dog."}', b"", b'{"text": "caf\xe9 in latin-1"}', b'{"text": "A dog."}']
    path = tmp_path / ("d.jsonl.gz" if compressed else "d.jsonl")
    with (gzip.open if compressed else open)(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
    summary = _build(tiny_teacher_dir, teacher, path, tmp_path / "s")
    assert summary.rows == 2 and summary.skipped == {"not valid UTF-8 text": 1}
    assert summary.first_errors == [f"input row 1: not valid UTF-8 text: byte 0xe9; re-encode the file as UTF-8 "
                                    f"({path} line 3)"]  # line 2 is blank: rows and lines differ


def test_a_line_that_is_not_json_is_named_before_the_teacher_loads(tiny_teacher_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _lines(data / "a.jsonl", [b'{"text": "fine"}'])
    _lines(data / "b.jsonl", [b'{"text": "fine"}', b'{"text": "no closing quote}', b'{"text": "fine"}'])
    monkeypatch.setattr("logit_store.build.load_teacher", _no_teacher)
    with pytest.raises(InputError, match=r"^b\.jsonl line 2: not valid JSON \(.* at column \d+\): fix or delete"):
        _build(tiny_teacher_dir, None, data, tmp_path / "s")
    assert not os.path.exists(tmp_path / "s" / "manifest.json")


def _no_teacher(*args, **kwargs):
    raise AssertionError("the teacher was loaded before the input was checked")


def test_empty_input_is_refused_and_an_empty_file_among_others_is_harmless(tiny_teacher_dir, teacher, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty.jsonl: the file is empty; nothing to build"):
        _build(tiny_teacher_dir, teacher, tmp_path / "empty.jsonl", tmp_path / "s1")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text("")
    with pytest.raises(InputError, match="every file is empty"):
        _build(tiny_teacher_dir, teacher, folder, tmp_path / "s2")
    _lines(folder / "b.jsonl", [b'{"text": "The cat sees a dog."}'])
    assert _build(tiny_teacher_dir, teacher, folder, tmp_path / "s3").rows == 1


def test_a_folder_of_mixed_or_unknown_formats_is_refused_naming_the_files(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _lines(mixed / "a.jsonl", [b'{"text": "from json lines"}'])
    (mixed / "b.csv").write_text("text\nfrom csv\n")
    with pytest.raises(InputError, match=r"several formats \(csv: b\.csv; json: a\.jsonl\)"):
        InputSource(str(mixed))
    (mixed / "b.csv").unlink()
    (mixed / "README.md").write_text("about the data\n")
    with pytest.raises(InputError, match=r"cannot tell the format of README\.md .*--data-format"):
        InputSource(str(mixed))


def test_hidden_files_are_not_read_and_the_summary_names_them(tiny_teacher_dir, teacher, tmp_path):
    data = tmp_path / "data"
    (data / "part").mkdir(parents=True)
    _lines(data / "part" / "a.jsonl", [b'{"text": "The cat sees a dog."}'])  # folders are read recursively
    (data / "_SUCCESS").write_text("")
    (data / ".DS_Store").write_bytes(b"\x00\x01")
    summary = _build(tiny_teacher_dir, teacher, data, tmp_path / "s")
    assert summary.rows == 1
    assert summary.notes == [f"not read: 2 hidden name(s) in {data} (.DS_Store, _SUCCESS)"]
    assert "note: not read: 2 hidden name(s)" in summary.format()


def test_compressed_files_in_a_folder_are_read(tiny_teacher_dir, teacher, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _lines(data / "a.jsonl", [b'{"text": "The cat sees a dog."}'])
    with gzip.open(data / "b.jsonl.gz", "wb") as f:
        f.write(b'{"text": "A dog sees the cat."}\n{"text": "The old man helps."}\n')
    summary = _build(tiny_teacher_dir, teacher, data, tmp_path / "s")
    assert summary.rows == 3 and summary.examples == 3


def test_zstd_files_need_the_zstandard_package(tiny_teacher_dir, teacher, tmp_path):
    import pyarrow as pa

    data = tmp_path / "data"
    data.mkdir()
    with pa.CompressedOutputStream(str(data / "a.jsonl.zst"), "zstd") as f:
        f.write(b'{"text": "The cat sees a dog."}\n')
    try:
        import zstandard  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match=r"a\.jsonl\.zst is zstd-compressed.*pip install zstandard"):
            _build(tiny_teacher_dir, teacher, data, tmp_path / "s")
    else:
        assert _build(tiny_teacher_dir, teacher, data, tmp_path / "s").rows == 1


def test_one_float_in_an_id_column_skips_only_its_row(tiny_teacher_dir, teacher, tmp_path):
    # Arrow reads the whole column as float64 once one value is a float; whole numbers are still token ids
    data = _lines(tmp_path / "ids.jsonl", [b'{"ids": [5, 6, 7, 8]}', b'{"ids": [9, 10.5, 11]}',
                                           b'{"ids": [12, 13.0, 14]}'])
    summary = _build(tiny_teacher_dir, teacher, data, tmp_path / "s", text_field=None, input_ids_field="ids")
    assert summary.rows == 2
    assert summary.skipped == {"field 'ids' holds a value that is not a token id": 1}
    assert summary.first_errors == [f"input row 1: field 'ids' holds a value that is not a token id: 10.5 at "
                                    f"position 1 ({data} line 2)"]
    rows = list(LogitStore.open(str(tmp_path / "s")))
    assert [r.input_ids.tolist() for r in rows] == [[5, 6, 7, 8], [12, 13, 14]]


def test_when_every_example_is_skipped_the_build_fails_and_leaves_no_store(tiny_teacher_dir, teacher, tmp_path):
    data = _lines(tmp_path / "d.jsonl", [json.dumps({"text": ""}).encode(), json.dumps({"text": 3}).encode()])
    with pytest.raises(InputError, match=r"no row to store: all 2 input examples were skipped \(1 x field 'text' is "
                                         r"empty; 1 x field 'text' is not str\)"):
        _build(tiny_teacher_dir, teacher, data, tmp_path / "s")
    assert os.listdir(tmp_path / "s") == [".manifest.json.lock"]  # no manifest: nothing to --resume


def test_the_cli_reports_bad_input_in_one_line(tiny_teacher_dir, tmp_path, capsys):
    data = _lines(tmp_path / "d.jsonl", [b'{"text": "fine"}', b"{not json"])
    code = kdstore.main(["build", "--teacher", tiny_teacher_dir, "--data", data, "--text-field", "text", "--out",
                         str(tmp_path / "s"), "--backend", "hf", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith(f"kdstore build: error: {data} line 2: not valid JSON")
    assert "Traceback" not in err and "Failed to load" not in err
