"""The Python API (reader.api): docs/python-api.md's example runs as written, and the facade answers as the commands do."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from reader.api import open_index
from reader.assets import wikipedia_sample
from reader.inputs import ReaderInputError

ROOT = Path(__file__).resolve().parents[1]
PASSAGES = wikipedia_sample(30, min_words=30)
QUESTIONS = [f"What is {p.title}?" for p in PASSAGES[:5]]


@pytest.fixture(scope="module")
def index_path(tmp_path_factory, answering_index) -> Path:
    return answering_index(tmp_path_factory.mktemp("api") / "index", PASSAGES)


@pytest.fixture(scope="module")
def index(index_path):
    return open_index(index_path, device="cpu")


def test_the_documented_example_runs_as_written(index_path, capsys):
    page = (ROOT / "docs" / "python-api.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", page, re.S)
    assert '"indexes/wikipedia-sample"' in code
    namespace: dict = {}
    exec(compile(code.replace('"indexes/wikipedia-sample"', repr(str(index_path))), "python-api.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.startswith("30 passages\n")
    result, results, hits = namespace["result"], namespace["results"], namespace["hits"]
    assert isinstance(result["answer"], str) and result["answer"] and len(result["passages"]) == 3
    assert [r["question"] for r in results] == ["Who wrote Dracula?", "What is the capital of France?"]
    assert [h["title"] for h in hits] == [p["title"] for p in result["passages"]]
    assert f"{result['answer']} - from" in out


def test_answer_many_gives_what_answer_gives_one_by_one(index):
    alone = [index.answer(q, k=3) for q in QUESTIONS]
    together = index.answer_many(QUESTIONS, k=3, batch_size=2)  # passes of 2, 2 and 1
    assert [t["timings_ms"]["batch"] for t in together] == [2, 2, 2, 2, 1]
    assert [(t["question"], t["answer"], t["source"], t["passages"]) for t in together] == [
        (a["question"], a["answer"], a["source"], a["passages"]) for a in alone
    ]


def test_answer_many_checks_every_question_before_reading_any(index, monkeypatch):
    read = []
    monkeypatch.setattr(index.answerer, "read", lambda lookups, mode: read.append(lookups) or [])
    with pytest.raises(ReaderInputError, match="question 2: the question is empty"):
        index.answer_many([QUESTIONS[0], QUESTIONS[1], "  "])
    with pytest.raises(ValueError, match="question 0: k must be a whole number from 1 to 30"):
        index.answer_many([QUESTIONS[0]], k=31)
    with pytest.raises(TypeError):
        index.answer_many(QUESTIONS[0])
    assert read == []


def test_retrieve_returns_the_passages_the_answer_read(index):
    hits = index.retrieve(QUESTIONS[0], k=4)
    answer = index.answer(QUESTIONS[0], k=4)
    assert [(h["id"], round(h["score"], 4)) for h in hits] == [(p["id"], p["score"]) for p in answer["passages"]]
    by_id = {p.id: p for p in PASSAGES}
    assert all(h["text"] == by_id[h["id"]].text and h["title"] == by_id[h["id"]].title for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_console_scripts_point_at_the_commands_mains():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"btr-answer", "btr-serve", "btr-evaluate", "btr-index"}
    import importlib

    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
