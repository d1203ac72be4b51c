"""The figures the README and docs/ repeat, kept in one place: docs/figures.json, written into every page.

    python -m bench.figures            # check: every marked figure in README.md and docs/*.md says what figures.json says
    python -m bench.figures --write    # rewrite the marked figures from figures.json

A page marks a figure as ``<!--fig:NAME-->4.18x<!--/fig-->`` (the comment does not render). Inside a
code block, where a comment would show, a figure is a whole line after a given one: ``"after": "==>
python -m reader.answer ...", "line": "answer: {}"`` (the line after each such line). In figures.json
a figure is either a ``value`` (with the ``command`` that measured it) or read from a results file:
``"from": "results/x.json", "key": "sets.nq-test-in-sample.em_after", "format": "{:.2f}"``.
A new measurement changes one line there (or its results file), then ``--write`` updates every page;
the test suite runs the check, so a page that disagrees fails ``make test``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures.json"
MARK = re.compile(r"<!--fig:([a-z0-9_]+)-->(.*?)<!--/fig-->", re.DOTALL)


def pages(root: Path = ROOT) -> list[Path]:
    """The pages that may quote figures: the README and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def load(path: Path = FIGURES) -> dict[str, dict]:
    return json.loads(path.read_text())


def figure_values(path: Path = FIGURES, root: Path = ROOT) -> dict[str, str]:
    """Each figure's text: its ``value``, or its ``key`` in its results file, formatted."""
    values = {}
    for name, figure in load(path).items():
        if "value" in figure:
            values[name] = figure["value"]
            continue
        found = json.loads((root / figure["from"]).read_text())
        for part in figure["key"].split("."):
            found = found[int(part)] if isinstance(found, list) else found[part]
        values[name] = figure.get("format", "{}").format(found)
    return values


def _lines_after(figures: dict[str, dict], values: dict[str, str]) -> dict[str, tuple[str, str]]:
    """The code-block figures: the line each follows -> (name, the line it must be)."""
    return {f["after"]: (name, f["line"].format(values[name])) for name, f in figures.items() if "after" in f}


def disagreements(values: dict[str, str], root: Path = ROOT, figures: dict[str, dict] | None = None) -> list[str]:
    """Every marked figure that is not what figures.json says, or that it does not know, as 'page: name'."""
    found = []
    after = _lines_after(figures if figures is not None else load(), values)
    for page in pages(root):
        text = page.read_text()
        lines = text.splitlines()
        for previous, line in zip(lines, lines[1:]):
            if previous in after and line != after[previous][1]:
                found.append(f"{page.relative_to(root)}: {after[previous][0]} says {line!r}, {FIGURES.name} {after[previous][1]!r}")
        for match in MARK.finditer(text):
            name, text = match.groups()
            if name not in values:
                found.append(f"{page.relative_to(root)}: {name} is not in {FIGURES.name}")
            elif text != values[name]:
                found.append(f"{page.relative_to(root)}: {name} says {text!r}, {FIGURES.name} {values[name]!r}")
    return found


def write(values: dict[str, str], root: Path = ROOT, figures: dict[str, dict] | None = None) -> list[Path]:
    """Rewrite every marked figure from ``values``; the pages changed."""
    changed = []
    after = _lines_after(figures if figures is not None else load(), values)
    for page in pages(root):
        text = page.read_text()
        lines = text.split("\n")
        for i in range(1, len(lines)):
            if lines[i - 1] in after:
                lines[i] = after[lines[i - 1]][1]
        new = MARK.sub(lambda m: f"<!--fig:{m[1]}-->{values.get(m[1], m[2])}<!--/fig-->", "\n".join(lines))
        if new != text:
            page.write_text(new)
            changed.append(page)
    return changed


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the pages' marked figures (default: check only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = figure_values()
    if args.write:
        for page in write(values):
            print(f"updated {page.relative_to(ROOT)}")
    problems = disagreements(values)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
