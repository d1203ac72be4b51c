"""`--help` of every command: each flag says what it does and its default.

Each module's ``build_parser()`` is built in this process (the heavy modules' imports, torch, Prefect and faiss
among them, take a few seconds in all). The help is rendered as a user sees it, 1,000 columns wide, so that
no word of a default is wrapped onto another line.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).parents[1]
PACKAGES = ("reader", "flows", "storage", "workers", "bench")
IN_PROCESS = [
    "reader.answer", "reader.serve", "reader.evaluate", "reader.loadtest",
    "flows.index_wikipedia", "flows.demo", "flows.update_corpus", "flows.qa_data", "flows.train_reader",
    "flows.tune_answer", "flows.evaluate_reader", "flows.dashboard", "flows.services", "flows.synthetic_qa",
    "flows.fid_synthetic", "flows.retriever_recall",
    "storage.verify", "workers.offline",
    "bench.reader", "bench.storage", "bench.workers", "bench.scale", "bench.answer_spans", "bench.figures",
    "bench.update_sample", "flows.progress",
    "bench.gpu_readers", "bench.retriever_disk", "bench.retriever_workers", "bench.synthetic", "bench.t5_copy",
    "bench.wikitext",
]
BUILT_ELSEWHERE = {"flows.index_args": "flows.index_wikipedia"}  # the module whose parser `python -m` shows
UNSAID = ("(default: None)", "(default: False)", "(default: [])", "(default: )")  # a default that tells nothing


def entries(text: str) -> dict[str, str]:
    """Each argument's entry in a rendered help, on one line, by its first option string (or its name)."""
    found: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if re.match(r"  \S", line):  # an argument's first line; its help may go on indented lines below
            key = line.split()[0].rstrip(",")
            found[key] = line.strip()
        elif line.startswith("   ") and key is not None:
            found[key] += " " + line.strip()
        else:
            key = None
    return found


def parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The parser and, for a command with subcommands, each subcommand's."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice, sub in action.choices.items():
                yield from parsers(sub, f"{name} {choice}")


def problems(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """Each flag of the parser that lacks a help text, or whose rendered help names no (telling) default."""
    said = entries(parser.format_help())
    found = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue  # -h; the subcommands (checked one by one); a flag hidden from --help (bench.scale --step)
        flag = parser._get_formatter()._format_action_invocation(action).split()[0].rstrip(",")
        entry = said.get(flag)
        if not (action.help or "").strip() or entry is None:
            found.append(f"{name} {flag}: no help")
        elif action.option_strings and not action.required and "(default: " not in entry:
            found.append(f"{name} {flag}: no default in {entry!r}")
        elif any(unsaid in entry for unsaid in UNSAID):
            found.append(f"{name} {flag}: a default that says nothing in {entry!r}")
    return found


def test_every_command_with_a_parser_is_checked_here():
    """A new command under reader/, flows/, storage/, workers/ or bench/ is added to this file's lists."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for package in PACKAGES for path in (ROOT / package).glob("*.py") if "ArgumentParser(" in path.read_text()
    }
    assert {BUILT_ELSEWHERE.get(module, module) for module in modules} == set(IN_PROCESS)


def test_every_flag_says_what_it_does_and_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    found, flags = [], 0
    for module in IN_PROCESS:
        command = importlib.import_module(module).build_parser()
        assert command.description, f"{module}: no description"
        for name, parser in parsers(command, module):
            flags += len(parser._actions)
            found += problems(name, parser)
    assert not found, "\n".join(found)
    assert flags > 300  # every parser was read (there are about 320 arguments)


def test_the_token_flag_never_shows_the_token(monkeypatch):
    """--token's default comes from $BTR_TOKEN: its help names the variable, never the value."""
    monkeypatch.setenv("BTR_TOKEN", "s3cret-value")
    from reader.serve import build_parser

    parser = build_parser()
    assert parser.parse_args([]).token == "s3cret-value"
    assert "s3cret" not in parser.format_help() and "$BTR_TOKEN" in parser.format_help()
