"""The README stays true: its demo figures come from the committed demo summary through the script, its Python
example runs, and its commands table names every subcommand."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re

import pytest

from cli.demo import BEGIN, COMMITTED_SUMMARY, END, README, readme_block, render_readme_block, rewrite_readme

EXAMPLE_HEADING = "## Python API"
EXAMPLE_PATHS = ("STORE", "HELD_OUT", "BASE")  # assigned one per line at the top of the example


def _section(heading: str) -> str:
    """The README's text from `heading` to the next second-level heading."""
    text = README.read_text()
    assert heading + "\n" in text, f"README.md has no {heading!r} section"
    return re.split(r"^## ", text.split(heading + "\n", 1)[1], flags=re.M)[0]


def test_the_demo_block_is_what_the_script_renders_from_the_committed_summary():
    summary = json.loads(COMMITTED_SUMMARY.read_text())
    assert summary["teacher_kind"] == "real", "benchmarks/results/demo.json must come from `make demo` (real teacher)"
    assert readme_block() == render_readme_block(summary), (
        "README.md's demo block differs from benchmarks/results/demo.json: run `python -m cli.demo --readme` "
        "(after a `make demo`: `python -m cli.demo --readme demo-out/summary.json`)")


def test_rewriting_the_readme_fills_the_block_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{BEGIN}\nstale figures\n{END}\n\nafter\n")
    assert rewrite_readme(readme=readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "stale" not in text
    assert readme_block(readme) == render_readme_block(json.loads(COMMITTED_SUMMARY.read_text()))
    assert not rewrite_readme(readme=readme)  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="demo:begin"):
        rewrite_readme(readme=readme)


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", _section(EXAMPLE_HEADING), flags=re.S)
    assert blocks, f"no ```python block under {EXAMPLE_HEADING!r}"
    return blocks[0]


def test_the_python_example_runs(tmp_path):
    """The example as printed, on stores of a tiny random 2-layer teacher (the student keeps its layer 0): only
    its three path assignments are replaced."""
    from store_fixtures import write_teacher_store
    from student_fixtures import save_tiny_model

    base = str(save_tiny_model(tmp_path / "teacher"))
    store = write_teacher_store(str(tmp_path / "train"), base, 16, 32)
    held_out = write_teacher_store(str(tmp_path / "held-out"), base, 8, 32, corpus_seed=5)
    paths = {"STORE": store, "HELD_OUT": held_out, "BASE": base}
    code = _example()
    for name in EXAMPLE_PATHS:
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {paths[name]!r}", code, count=1, flags=re.M)
        assert n == 1, f"the README example no longer assigns {name} on a line of its own"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (Python API example)", "exec"), {"__name__": "readme_example"})
    printed = out.getvalue()
    assert "16 rows" in printed and re.search(r"teacher-KL \d+\.\d+ -> \d+\.\d+, top-1 agreement", printed), printed


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_the_commands_table_names_every_subcommand():
    from cli import kdstore, kdstudent

    rows = [line for line in _section("## Commands").splitlines() if line.startswith("| `")]
    listed = [re.match(r"\| `(kdstore|kdstudent) ([a-z-]+)", row).groups() for row in rows]
    for tool, module in (("kdstore", kdstore), ("kdstudent", kdstudent)):
        commands = _subcommands(module.build_parser())
        # main() hands these to their own config parsers before argparse: they are in the parser too
        assert {"build"} <= commands if tool == "kdstore" else {"train", "convert", "params"} <= commands
        names = [name for t, name in listed if t == tool]
        assert sorted(names) == sorted(commands), f"{tool}: the table lists {sorted(names)}, the CLI has " \
                                                  f"{sorted(commands)} (one row each)"
