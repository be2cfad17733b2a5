"""The README's Reliability table, written by the tests that prove each row.

A test calls ``record(section, test, rows)`` after its assertions pass, with rows whose
outcome text was taken from what the test observed (the exception, the counts, the losses),
never typed by hand. Each (section, test) is one JSON file under
``benchmarks/results/reliability/``; ``render()`` rebuilds ``benchmarks/results/reliability.md``
from all of them, sections in a fixed order, tests by name.
Regenerate everything: ``OMP_NUM_THREADS=1 python -m pytest tests/test_reliability*.py -q``.
"""

from __future__ import annotations

import json
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
SECTIONS = {
    "bad_inputs": ("Bad inputs", ("input", "policy", "what it gets", "test")),
    "fault_points": ("Fault points (SIGKILL, then --resume)", ("fault point", "resume result", "test")),
    "signals": ("Signals", ("signal", "result", "test")),
    "ranks": ("2 ranks = 1 rank", ("check", "result", "test")),
}


def record(section: str, test: str, rows: list[dict], strip=None) -> None:
    """Replace the rows ``test`` (e.g. "test_reliability_data.py::test_x") gave ``section`` and
    re-render; a row is a dict keyed by the section's columns except "test". ``strip``: a
    temporary folder (or a list of them) whose path is shown as "..." (so the table does not
    change run to run)."""
    title, columns = SECTIONS[section]
    for row in rows:
        if set(row) != set(columns) - {"test"}:
            raise ValueError(f"row {row}: expected the columns {columns[:-1]}")
    for folder in [] if strip is None else strip if isinstance(strip, list) else [strip]:
        rows = [{k: str(v).replace(str(folder), "...") for k, v in row.items()} for row in rows]
    rows = [dict(row, test=test) for row in rows]
    folder = os.path.join(ROOT, "reliability")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{section}.{test.replace('::', '.').replace('/', '.')}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    render()


def render() -> str:
    """Write reliability.md from the section files present; returns its text."""
    out = ["# Reliability (written by tests/test_reliability*.py; do not edit by hand)", ""]
    folder = os.path.join(ROOT, "reliability")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for section, (title, columns) in SECTIONS.items():
        rows = []
        for name in names:
            if name.startswith(section + ".") and name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    rows += json.load(f)
        if not rows:
            continue
        out += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in columns) + " |"
                for r in rows]
        out.append("")
    text = "\n".join(out)
    with open(os.path.join(ROOT, "reliability.md.tmp"), "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(os.path.join(ROOT, "reliability.md.tmp"), os.path.join(ROOT, "reliability.md"))
    return text
