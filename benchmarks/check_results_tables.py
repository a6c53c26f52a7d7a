"""Checks docs/RESULTS.md's study tables against the JSON reports they were written from.

    python -m benchmarks.check_results_tables      # every study whose report exists; exit status 1 on a mismatch

A study's tables are those of the RESULTS.md sections whose heading starts with its name ("## Study v2: ...",
"## Study v3: ..."); they are checked only once its report exists. In each table, a row names its arm with the
first backticked name in its first cell that the report knows (`dense`, `moe-fair+bias`; `+bias` alone is a variant
of the arm the first header cell names in backticks), or a paired difference as "`arm` − `base`". Columns are read
by their header:

  an LR (3e-4)          the arm's validation full KL at that LR (`lr_grid_validation_full_kl`); a bold cell must
                        sit in the column of the chosen LR
  chosen                the arm's chosen LR (`arms[arm].lr`)
  trainable             the arm's trainable count
  a metric (full_kl)    "mean ± std" of the arm, or of a difference "mean ± 95 % half-width"
  per seed              the arm's per-seed full KL, in seed order
  − `base` (...)        the arm's paired difference with `base`: "mean ± 95 % half-width"
  effective experts by load / by routing weight   "a / b / c", one per MoE layer
  p / holm p            a paired difference's p-value / Holm-adjusted p-value (study v3's `test`)
  NN % interval         a paired difference's t interval "[lo, hi]" at NN % (study v3: 95, 98.75)

Any other column is not checked (and reported as such). A printed number matches a value when it is that value
rounded to the decimals printed. Study v3's report keeps v2's layout (`arms`, `paired_differences`,
`lr_grid_validation_full_kl`) and adds stage C's arms and comparison under `stage_c`, looked up the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

RESULTS_MD = "docs/RESULTS.md"
STUDIES = {"Study v2": "benchmarks/results/quality_study_v2.json",
           "Study v3": "benchmarks/results/quality_study_v3.json"}
METRICS = ("full_kl", "teacher_kl", "ppl", "top1_agree", "ece")
_NUM = r"[+\-−]?\d[\d,]*(?:\.\d+)?(?:e[+\-−]?\d+)?"


@dataclass
class Check:
    found: list[tuple[str, str, str, float, float]] = field(default_factory=list)  # where, row, column, printed, want
    mismatches: list[str] = field(default_factory=list)
    unchecked_columns: set[str] = field(default_factory=set)

    def number(self, where: str, row: str, column: str, text: str, want: float | None, exact: bool = False) -> None:
        """`text` against `want`: rounded to the digits printed, or (`exact`, a learning rate) equal."""
        if want is None:
            self.mismatches.append(f"{where} | {row} | {column}: {text!r} has no value in the report")
            return
        printed, tolerance = _parse(text)
        self.found.append((where, row, column, printed, want))
        ok = math.isclose(printed, want, rel_tol=1e-9) if exact else abs(want - printed) <= tolerance
        if not ok:
            self.mismatches.append(f"{where} | {row} | {column}: printed {text!r}, report {want!r}")


def _parse(text: str) -> tuple[float, float]:
    """The printed number and half a unit of its last printed digit (8.2e-05: 5e-07; 2.810: 5e-4)."""
    t = text.strip().replace("−", "-").replace(",", "").replace("*", "")
    mantissa, _, exponent = t.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return float(t), 0.5 * 10 ** (int(exponent or 0) - decimals) * (1 + 1e-9) + 1e-15


def _numbers(cell: str) -> list[str]:
    return re.findall(_NUM, cell.replace("**", ""))


def _tables(lines: list[str]) -> list[tuple[int, list[list[str]]]]:
    """(line number of the header, rows of cells) of every markdown table in `lines`."""
    tables, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|\s*$", lines[i + 1]):
            rows = [lines[i]]
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(lines[j])
                j += 1
            tables.append((i + 1, [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]))
            i = j
        else:
            i += 1
    return tables


def sections(text: str, study: str) -> list[tuple[str, list[str]]]:
    """(heading, lines) of the sections whose heading starts with `study`."""
    out, current = [], None
    for line in text.splitlines():
        if line.startswith("## "):
            current = (line[3:].strip(), []) if line[3:].startswith(study) else None
            if current:
                out.append(current)
        elif current:
            current[1].append(line)
    return out


def _lookup(report: dict, key: str, name: str) -> dict | None:
    """report[key][name], or report['stage_c'][key][name] (study v3's long runs)."""
    for where in (report, report.get("stage_c", {})):
        if name in where.get(key, {}):
            return where[key][name]
    return None


def _row_arm(cell: str, base: str | None, report: dict) -> str | None:
    for name in re.findall(r"`([^`]+)`", cell):
        if name.startswith("+") and base:
            name = base + name
        if _lookup(report, "arms", name) is not None:
            return name
    return None


def _column(header: str) -> tuple[str, str | None]:
    """(kind, argument) of a header cell."""
    h = header.replace("**", "").strip()
    low = h.lower()
    if re.fullmatch(r"\d(?:\.\d+)?e[+\-−]?\d+", low):
        return "lr", h
    if low.startswith("chosen"):
        return "chosen", None
    if low.startswith("trainable"):
        return "trainable", None
    if low in METRICS:
        return "metric", low
    if low == "per seed":
        return "per_seed", None
    if m := re.match(r"^[−-]\s*`([^`]+)`", h):
        return "minus", m.group(1)
    if "effective experts by load" in low:
        return "experts", "effective_experts"
    if low.startswith("by routing weight"):
        return "experts", "effective_experts_by_weight"
    if low in ("p", "p-value"):
        return "p", "p"
    if low.startswith("holm"):
        return "p", "p_holm"
    if m := re.match(r"^(\d+(?:\.\d+)?)\s*%\s*interval", low):
        return "interval", f"ci{float(m.group(1)):g}"
    return "other", h


def check_table(where: str, table: list[list[str]], report: dict, check: Check) -> None:
    header, *rows = table
    base = (re.findall(r"`([^`]+)`", header[0]) or [None])[0]
    columns = [_column(h) for h in header]
    grid = report.get("lr_grid_validation_full_kl", {})
    for row in rows:
        first = row[0]
        pair = re.search(r"`([^`]+)`\s*[−-]\s*`([^`]+)`", first)
        diff = _lookup(report, "paired_differences", f"{pair.group(1)} - {pair.group(2)}") if pair else None
        arm = None if pair else _row_arm(first, base, report)
        summary = _lookup(report, "arms", arm) if arm else None
        if diff is None and summary is None:
            continue
        label = first.replace("**", "")
        for (kind, arg), cell in zip(columns[1:], row[1:], strict=False):
            nums = _numbers(cell)
            if not nums:
                continue
            col = header[columns.index((kind, arg))]
            if kind == "other":
                check.unchecked_columns.add(arg)
            elif diff is not None:
                test = diff.get("test", {})
                if kind == "metric" and arg in diff:
                    mean, _, half = diff[arg]
                    check.number(where, label, col, nums[0], mean)
                    if len(nums) > 1:
                        check.number(where, label, col + " (±)", nums[1], half)
                elif kind == "p":
                    check.number(where, label, col, nums[0], test.get(arg))
                elif kind == "interval":
                    for text, want in zip(nums[:2], test.get(arg) or [None, None], strict=False):
                        check.number(where, label, col, text, want)
                else:
                    check.unchecked_columns.add(col)
            elif kind == "lr":
                values = {float(k): v for k, v in grid.get(arm, {}).items()}
                check.number(where, label, col, nums[0], values.get(float(arg.replace("−", "-"))))
                if "**" in cell and not math.isclose(float(arg.replace("−", "-")), summary.get("lr") or -1):
                    check.mismatches.append(f"{where} | {label} | {col}: bold, but the chosen LR is "
                                            f"{summary.get('lr')}")
            elif kind == "chosen":
                check.number(where, label, col, nums[0], summary.get("lr"), exact=True)
            elif kind == "trainable":
                check.number(where, label, col, nums[0], summary.get("trainable"))
            elif kind == "metric":
                mean, std = summary[arg]
                check.number(where, label, col, nums[0], mean)
                if len(nums) > 1:
                    check.number(where, label, col + " (±)", nums[1], std)
            elif kind == "per_seed":
                seeds = [s["full_kl"] for s in summary["per_seed"]]
                if len(nums) != len(seeds):
                    check.mismatches.append(f"{where} | {label} | {col}: {len(nums)} seeds printed, {len(seeds)} "
                                            "in the report")
                for text, want in zip(nums, seeds, strict=False):
                    check.number(where, label, col, text, want)
            elif kind == "minus":
                d = _lookup(report, "paired_differences", f"{arm} - {arg}")
                check.number(where, label, col, nums[0], d["full_kl"][0] if d else None)
                if len(nums) > 1 and d:
                    check.number(where, label, col + " (±)", nums[1], d["full_kl"][2])
            elif kind == "experts":
                layers = summary.get(arg) or {}
                wants = [layers[k] for k in sorted(layers, key=int)]
                if len(nums) != len(wants):
                    check.mismatches.append(f"{where} | {label} | {col}: {len(nums)} layers printed, "
                                            f"{len(wants)} in the report")
                for text, want in zip(nums, wants, strict=False):
                    check.number(where, label, col, text, want)
            else:
                check.unchecked_columns.add(col)


def check_study(text: str, study: str, report: dict) -> Check:
    check = Check()
    for heading, lines in sections(text, study):
        for line, table in _tables(lines):
            check_table(f"{heading[:40]}, table at +{line}", table, report, check)
    return check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-md", default=RESULTS_MD)
    p.add_argument("-v", "--verbose", action="store_true", help="list every checked cell")
    args = p.parse_args(argv)
    with open(args.results_md) as f:
        text = f.read()
    failed = False
    for study, path in STUDIES.items():
        if not os.path.exists(path):
            print(f"{study}: no report ({path}) yet; its tables are not checked")
            continue
        with open(path) as f:
            check = check_study(text, study, json.load(f))
        if args.verbose:
            for where, row, column, printed, want in check.found:
                print(f"  {where} | {row} | {column}: {printed:g} ~ {want:.6g}")
        print(f"{study}: {len(check.found)} numbers checked against {path}, {len(check.mismatches)} mismatches"
              + (f"; columns not checked: {', '.join(sorted(check.unchecked_columns))}"
                 if check.unchecked_columns else ""))
        for m in check.mismatches:
            print("  MISMATCH " + m)
        failed |= bool(check.mismatches)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
