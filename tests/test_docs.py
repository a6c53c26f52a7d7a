"""The docs cannot drift from the code: option tables are what `make docs` generates from the config dataclasses,
and DESIGN.md's code map names every module and only files that exist."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import pytest

from cli import docs

ROOT = Path(__file__).resolve().parents[1]


def test_option_tables_match_the_code(capsys):
    """Regenerating changes nothing: every documented option, type, default and help text is the code's."""
    vllm_before = "vllm" in sys.modules
    assert docs.main(["--check"]) == 0, capsys.readouterr().err
    if not vllm_before:  # the config modules import their heavy backends lazily
        assert "vllm" not in sys.modules


def _copy_docs(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    for doc in docs.DOCS:
        shutil.copy(ROOT / doc, tmp_path / doc)
    return tmp_path


def test_check_names_the_doc_and_option_of_a_tampered_default(tmp_path, capsys):
    root = _copy_docs(tmp_path)
    path = root / "docs/STUDENT.md"
    text = path.read_text()
    row = re.search(r"^\| `--experts` \| `int` \| `8` \|.*$", text, re.M)
    assert row, "the generated --experts row"
    path.write_text(text.replace(row.group(0), row.group(0).replace("`8`", "`9`", 1)))
    assert docs.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "docs/STUDENT.md: option `--experts`: default: doc says '`9`', code says '`8`'" in err
    assert "make docs" in err
    assert docs.main(["--root", str(root)]) == 0  # writing repairs it
    assert path.read_text() == text


def test_check_reports_an_option_the_code_no_longer_has_and_a_missing_block(tmp_path, capsys):
    root = _copy_docs(tmp_path)
    path = root / "docs/TRAINING.md"
    text = path.read_text()
    path.write_text(text.replace("<!-- /options -->", "| `--old-flag` | `int` | `1` | gone |\n<!-- /options -->"))
    assert docs.main(["--check", "--root", str(root)]) == 1
    assert "docs/TRAINING.md: option `--old-flag` is documented but" in capsys.readouterr().err
    path.write_text(re.sub(r"<!-- options: .*?<!-- /options -->", "", text, flags=re.S))
    assert docs.main(["--check", "--root", str(root)]) == 2
    assert "docs/TRAINING.md: no <!-- options: student.config.TrainConfig -->" in capsys.readouterr().err


def test_a_subclass_documents_only_its_own_fields_and_links_its_base(tmp_path):
    """Generic over dataclasses: a field that moves into a documented base leaves the subclass's table."""
    root, here = tmp_path, __name__  # this module, as pytest imported it
    (root / "docs").mkdir()
    (root / "docs/A.md").write_text(f"# A\n\n## Base options\n\n<!-- options: {here}.Base -->\n<!-- /options -->\n")
    (root / "docs/B.md").write_text(f"# B\n\n<!-- options: {here}.Child -->\n<!-- /options -->\n")
    registry = {"docs/A.md": [docs.Options(f"{here}.Base")], "docs/B.md": [docs.Options(f"{here}.Child")]}
    assert docs.run(root, docs=registry) == ["updated docs/A.md", "updated docs/B.md"]
    a, b = (root / "docs/A.md").read_text(), (root / "docs/B.md").read_text()
    assert "| `--rank` | `int` | `16` | LoRA rank |" in a
    assert "| `--alpha` | `float` | unset | LoRA alpha. Unset: 2 × rank |" in a
    assert "| `--tags` | `list[str]` | empty | tags |" in a
    assert "--rank" not in b and "--alpha" not in b
    assert "| `--lr` | `float` | `0.0002` | learning rate |" in b
    assert "| `--mix` | `float` | `0.5` | from an undocumented base |" in b  # not documented elsewhere: here
    assert "| `--shuffle`, `--no-shuffle` | `bool` | `true` | shuffle |" in b
    assert "| `--kind` | one of `a`, `b` | `a` | pick |" in b
    assert "| `--store` | `list[str]`, repeatable | required | stores |" in b
    assert "Plus the options of [`Base`](A.md#base-options)." in b
    assert "| `--note` | `int` | `0` | (undocumented: give Child.note a `help` in its field metadata) |" in b
    assert docs.run(root, check=True, docs=registry) == []


@dataclasses.dataclass(kw_only=True)
class Base:
    rank: int = dataclasses.field(default=16, metadata={"help": "LoRA rank"})
    alpha: float | None = dataclasses.field(default=None, metadata={"help": "LoRA alpha. Unset: 2 × rank"})
    tags: list[str] = dataclasses.field(default_factory=list, metadata={"help": "tags"})


@dataclasses.dataclass(kw_only=True)
class Undocumented:
    mix: float = dataclasses.field(default=0.5, metadata={"help": "from an undocumented base"})


@dataclasses.dataclass(kw_only=True)
class Child(Base, Undocumented):
    store: list[str] = dataclasses.field(metadata={"help": "stores", "action": "extend"})
    lr: float = dataclasses.field(default=2e-4, metadata={"help": "learning rate"})
    shuffle: bool = dataclasses.field(default=True, metadata={"help": "shuffle"})
    kind: str = dataclasses.field(default="a", metadata={"help": "pick", "choices": ["a", "b"]})
    note: int = 0  # no help text


# --- DESIGN.md's code map ------------------------------------------------------------------------------------

PACKAGES = ("logit_store", "logit_store/teachers", "student", "cli", "assets", "benchmarks")
FOLDERS = ("logit_store", "student", "cli", "assets", "benchmarks", "tests", "docs")


def _code_map() -> tuple[set[str], str]:
    """The paths DESIGN.md's "Shape of the code" list names (nested items are under their parent folder), and
    the section's text."""
    text = (ROOT / "docs/DESIGN.md").read_text()
    section = re.search(r"^## Shape of the code.*?(?=^## )", text, re.M | re.S)
    assert section, "DESIGN.md has a '## Shape of the code' section"
    stack: list[tuple[int, str]] = []
    named = set()
    for m in re.finditer(r"^( *)- `([^`]+)`", section.group(0), re.M):
        indent, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack else "") + name
        named.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append((indent, path))
    return named, section.group(0)


def test_design_code_map_names_every_module_and_only_existing_files():
    named, _ = _code_map()
    modules = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")
               if p.name != "__init__.py"}
    assert modules - named == set(), "modules missing from DESIGN.md's code map"
    assert set(FOLDERS) - named == set(), "folders missing from DESIGN.md's code map"
    assert {"logit_store/plan.py", "student/hf_trainer.py", "cli/docs.py"} <= named
    assert sorted(p for p in named if not (ROOT / p).exists()) == [], "DESIGN.md names files that do not exist"


def test_design_diagram_reads_through_the_plan():
    _, section = _code_map()
    line = next((ln for ln in section.splitlines() if "reader.py" in ln), "")
    assert 0 <= line.find("reader.py") < line.find("plan.py") < line.find("stream.py"), line


@pytest.mark.parametrize("heading,slug", [("Options (`MoELoRAConfig`, CLI flag)", "options-moeloraconfig-cli-flag"),
                                          ("LoRA scaling (`--lora-scaling standard|rslora`)",
                                           "lora-scaling---lora-scaling-standardrslora")])
def test_github_slug(heading, slug):
    assert docs.github_slug(heading) == slug
