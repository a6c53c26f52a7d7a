"""Option tables in the docs, generated from the config dataclasses, so a documented option cannot drift.

Each option is declared once, as a dataclass field with its help text (`field.metadata["help"]`); this module
renders those fields as a markdown table (flag, type, default, meaning) and writes it between marker comments:

    <!-- options: student.config.MoELoRAConfig -->
    ...generated...
    <!-- /options -->

`python -m cli.docs` (`make docs`) rewrites the blocks; `python -m cli.docs --check` changes nothing and exits 1,
naming the doc and the option, when a block is not what the code gives (tests/test_docs.py runs it).

A class whose base is documented too lists only the fields it adds, and links to the base's table: a field that
moves between the two classes moves between the tables at the next `make docs`. Fields without help text keep
the meaning the doc gives them (only their name, type and default are then checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Options:
    """One generated table: the dataclass (dotted path, also the marker's name) and how its rows are named."""

    cls: str
    flags: bool = True  # rows named by CLI flag (`--flag-name`); False: by field name (a library-only config)


# doc file (relative to the repository root) -> the tables it holds. Adding a table is one line here plus its
# marker pair in the doc.
DOCS: dict[str, list[Options]] = {
    "docs/STUDENT.md": [Options("student.config.MoELoRAConfig")],
    "docs/TRAINING.md": [Options("student.config.TrainConfig"), Options("student.generate.GenerateConfig")],
    "docs/BUILD.md": [Options("logit_store.build.BuildConfig")],
    "docs/LOSSES.md": [Options("student.losses.DistillLossConfig", flags=False)],
}

# markers stand on lines of their own (a marker quoted in prose is not one)
_BLOCK = re.compile(r"^(<!-- options: (?P<name>[\w.]+) -->\n)(?P<body>.*?)^(<!-- /options -->)$", re.S | re.M)
_ANY_MARKER = re.compile(r"^<!-- options: ([\w.]+) -->$", re.M)
_HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


class DocsError(Exception):
    """A doc or the registry cannot be processed (missing marker, unknown class): fix the doc or DOCS."""


def load_class(dotted: str) -> type:
    """The dataclass at `module.Class`; the module is imported as code imports it (no vLLM, no model)."""
    module, _, name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DocsError(f"cannot load {dotted}: {e}") from e
    if not dataclasses.is_dataclass(cls):
        raise DocsError(f"{dotted} is not a dataclass")
    return cls


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading, so generated links land where a reader clicks."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _type_name(f: dataclasses.Field) -> str:
    """The value type a flag takes: `str | None` is shown as `str` (None is the 'unset' default)."""
    # a string annotation, or the type itself once HfArgumentParser has resolved the field in place (it assigns
    # `field.type`): a generic (`list[str]`) or a union then prints whole, a plain class by its name
    t = f.type if isinstance(f.type, str) else (
        f.type.__name__ if not getattr(f.type, "__args__", None) else str(f.type).replace("typing.", ""))
    t = re.sub(r"^Optional\[(.*)\]$", r"\1", t)
    parts = [p.strip() for p in t.split("|") if p.strip() != "None"]
    return " | ".join(parts)


def _default(f: dataclasses.Field) -> str:
    """A field's default as the docs show it: `required`, `unset` (None), or the value."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, (list, tuple)):
        return "`" + ",".join(map(str, value)) + "`" if value else "empty"
    return f"`{value!r}`" if isinstance(value, float) else f"`{value}`"


def _escape(text: str) -> str:
    """Help text in a table cell: a pipe would split the cell, a `*` start emphasis."""
    return text.replace("|", "\\|").replace("*", "\\*")


def _name_cell(f: dataclasses.Field, flags: bool) -> str:
    if not flags:
        return f"`{f.name}`"
    flag = "--" + f.name.replace("_", "-")
    if f.type in ("bool", bool) and f.default is True:  # HfArgumentParser adds the negation
        return f"`{flag}`, `--no-{flag[2:]}`"
    return f"`{flag}`"


def _type_cell(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    cell = "one of " + ", ".join(f"`{c}`" for c in choices) if choices else f"`{_type_name(f)}`"
    if f.metadata.get("action") in ("append", "extend"):
        cell += ", repeatable"
    return _escape(cell)


def _split_row(line: str) -> list[str]:
    return [c.strip() for c in _CELL_SPLIT.split(line.strip())[1:-1]]


def _table_rows(body: str) -> dict[str, list[str]]:
    """The rows of the first markdown table in `body`, by their first cell (header and rule skipped)."""
    lines = [ln for ln in body.splitlines() if ln.startswith("|")]
    return {cells[0]: cells for cells in map(_split_row, lines[2:]) if cells}


def own_fields(cls: type, documented: Sequence[type]) -> tuple[list[dataclasses.Field], list[type]]:
    """The fields `cls` documents itself (not those of a documented base), and the documented bases to link to
    (the nearest ones: a base of a linked base is reached through its table)."""
    bases = [b for b in cls.__mro__[1:] if b in documented]
    inherited = {f.name for b in bases for f in dataclasses.fields(b)}
    nearest = [b for b in bases if not any(o is not b and issubclass(o, b) for o in bases)]
    return [f for f in dataclasses.fields(cls) if f.name not in inherited], nearest


class Registry:
    """The tables of `DOCS` under `root`, their classes loaded, and where each class's table lives."""

    def __init__(self, root: Path = ROOT, docs: dict[str, list[Options]] | None = None):
        self.root = Path(root)
        self.docs = DOCS if docs is None else docs
        self.options = {o.cls: (doc, o) for doc, tables in self.docs.items() for o in tables}
        self.classes = {name: load_class(name) for name in self.options}

    def _link(self, base: type, from_doc: str) -> str:
        """A markdown link from `from_doc` to the table of `base`: its doc and the heading above its marker."""
        name = next(n for n, c in self.classes.items() if c is base)
        doc, _ = self.options[name]
        text = (self.root / doc).read_text()
        at = text.find(f"<!-- options: {name} -->")
        headings = [m.group(1) for m in _HEADING.finditer(text, 0, max(at, 0))]
        anchor = "#" + github_slug(headings[-1]) if headings else ""
        target = "" if doc == from_doc else os.path.relpath(self.root / doc, (self.root / from_doc).parent)
        return f"[`{base.__name__}`]({target}{anchor})"

    def render(self, doc: str, options: Options, old_body: str = "") -> str:
        """The generated block body for `options` in `doc`; `old_body` supplies meanings the code lacks."""
        cls = self.classes[options.cls]
        fields, bases = own_fields(cls, list(self.classes.values()))
        old = _table_rows(old_body)
        lines = [f"<!-- generated by `make docs` from {options.cls}: edit its fields, not this table -->"]
        if bases:
            lines.append("Plus the options of " + " and ".join(self._link(b, doc) for b in bases) + ".")
            lines.append("")
        lines += [f"| {'flag' if options.flags else 'field'} | type | default | meaning |", "|---|---|---|---|"]
        for f in fields:
            name = _name_cell(f, options.flags)
            help_text = f.metadata.get("help")
            meaning = _escape(help_text) if help_text else (old.get(name) or [""])[-1]  # the doc's own words
            meaning = meaning or f"(undocumented: give {cls.__name__}.{f.name} a `help` in its field metadata)"
            lines.append(f"| {name} | {_type_cell(f)} | {_default(f)} | {meaning} |")
        return "\n".join(lines) + "\n"

    def regenerate(self, doc: str, text: str) -> str:
        """`text` (the content of `doc`) with every option block regenerated; DocsError on a missing or unknown
        marker."""
        wanted = {o.cls: o for o in self.docs.get(doc, [])}
        found = set()

        def replace(m: re.Match) -> str:
            name = m.group("name")
            if name not in wanted:
                raise DocsError(f"{doc}: marker <!-- options: {name} --> is not in cli/docs.py's DOCS for this doc")
            if name in found:
                raise DocsError(f"{doc}: two <!-- options: {name} --> blocks")
            found.add(name)
            return m.group(1) + self.render(doc, wanted[name], m.group("body")) + m.group(4)

        out = _BLOCK.sub(replace, text)
        if len(_ANY_MARKER.findall(text)) != len(_BLOCK.findall(text)):
            raise DocsError(f"{doc}: an <!-- options: ... --> marker has no <!-- /options --> after it")
        for name in (name for name in wanted if name not in found):  # the first missing, in DOCS order
            raise DocsError(f"{doc}: no <!-- options: {name} --> ... <!-- /options --> block (cli/docs.py DOCS "
                            "lists one)")
        return out


def _differences(doc: str, old: str, new: str) -> list[str]:
    """What differs, option by option (`doc: --flag: default: doc `9`, code `8``), then a unified diff."""
    problems = []
    columns = ("name", "type", "default", "meaning")
    for (name, old_body), (_, new_body) in zip(_blocks(old), _blocks(new), strict=True):
        before = len(problems)
        old_rows, new_rows = _table_rows(old_body), _table_rows(new_body)
        for key, cells in new_rows.items():
            if key not in old_rows:
                problems.append(f"{doc}: option {key} ({name}) is not documented")
                continue
            for col, was, now in zip(columns, old_rows[key], cells, strict=False):
                if was != now:
                    problems.append(f"{doc}: option {key}: {col}: doc says {was!r}, code says {now!r}")
        problems += [f"{doc}: option {key} is documented but {name} has no such field"
                     for key in old_rows.keys() - new_rows.keys()]
        if old_body != new_body and len(problems) == before:
            problems.append(f"{doc}: the {name} block differs from the code (text around the table)")
    diff = difflib.unified_diff(old.splitlines(), new.splitlines(), f"{doc} (as written)", f"{doc} (from the code)",
                                lineterm="", n=1)
    return problems + ["\n".join(diff)]


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group("name"), m.group("body")) for m in _BLOCK.finditer(text)]


def run(root: Path = ROOT, check: bool = False, docs: dict[str, list[Options]] | None = None) -> list[str]:
    """Regenerate (or, with `check`, compare) every registered doc under `root`. Returns the problems found
    (check) or the docs rewritten (write); raises DocsError when a doc cannot be processed."""
    registry = Registry(root, docs)
    messages = []
    for doc in registry.docs:
        path = registry.root / doc
        old = path.read_text()
        new = registry.regenerate(doc, old)
        if old == new:
            continue
        if check:
            messages += _differences(doc, old, new)
        else:
            path.write_text(new)
            messages.append(f"updated {doc}")
    for path in sorted((registry.root / "docs").glob("*.md")):  # a marker in a doc the registry does not list
        doc = path.relative_to(registry.root).as_posix()
        if doc not in registry.docs and _ANY_MARKER.search(path.read_text()):
            raise DocsError(f"{doc} has an <!-- options: ... --> block but is not in cli/docs.py's DOCS")
    return messages


def main(argv: list[str] | None = None) -> int:
    """`python -m cli.docs [--check]`: 0 when the docs are (now) what the code gives, 1 when --check differs."""
    parser = argparse.ArgumentParser(prog="python -m cli.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a doc differs")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    try:
        messages = run(args.root, check=args.check)
    except DocsError as e:
        print(f"cli.docs: error: {e}", file=sys.stderr)
        return 2
    if args.check and messages:
        print("\n".join(messages), file=sys.stderr)
        print("the option tables differ from the code: run `make docs` (python -m cli.docs)", file=sys.stderr)
        return 1
    if messages:
        print("\n".join(messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
