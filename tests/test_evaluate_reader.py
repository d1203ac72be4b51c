"""The accuracy table command (flows.evaluate_reader) over a folder of tiny stage checkpoints."""

from __future__ import annotations

import json

import pytest

import flows.evaluate_reader as evaluate_reader
from reader.config import BTRConfig
from reader.evaluate import paired_ratio_interval
from reader.train import save_checkpoint

from tests.conftest import PASSAGES, QUESTIONS

ANSWERS = [["William Shakespeare"], ["Paris"]]


@pytest.fixture
def files(tmp_path):
    corpus, questions = tmp_path / "corpus.jsonl", tmp_path / "dev.jsonl"
    corpus.write_text("".join(
        json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for group in PASSAGES for p in group
    ))
    questions.write_text("".join(json.dumps({"question": q, "answers": a}) + "\n" for q, a in zip(QUESTIONS, ANSWERS)))
    return corpus, questions


def run(tmp_path, files, *extra: str) -> int:
    corpus, questions = files
    return evaluate_reader.main([
        "--checkpoints", str(tmp_path / "checkpoints"), "--questions", str(questions), "--corpus", str(corpus),
        "--indexes", str(tmp_path / "indexes"), "--k", "2", "--out", str(tmp_path / "accuracy.json"), *extra,
    ])


def test_a_folder_with_only_an_ablation_chain_is_measured_and_rows_are_kept(tmp_path, files, make_extractive, monkeypatch, capsys):
    root = tmp_path / "checkpoints"
    for seed, stage in enumerate(("plain", "plain+split-nodistill", "plain+split-nodistill+bits")):
        save_checkpoint(make_extractive(BTRConfig(split_layer=2), seed=seed), root / stage, {"chain": stage})

    assert run(tmp_path, files) == 2
    assert "lacks plain+split, plain+split+bits" in capsys.readouterr().err
    assert not (tmp_path / "accuracy.json").exists()

    assert run(tmp_path, files, "--skip-missing") == 0
    rows = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert [(r["row"], r["mode"]) for r in rows] == [
        ("baseline", "baseline"), ("btr, no distillation", "btr"), ("split, no distillation", "split")
    ]
    assert all(r["n"] == 2 and r["k"] == 2 and len(r["exact"]) == 2 for r in rows)
    # Every row reads the same retrieved passages (the ablation's index serves the text rows too).
    assert len({r["recall_at_k"] for r in rows}) == 1
    assert (tmp_path / "indexes" / "eval-checkpoints-plain+split-nodistill+bits" / "manifest.json").exists()

    def measured_again(*args, **kwargs):
        raise AssertionError("a row with unchanged weights, questions and k was measured again")

    monkeypatch.setattr(evaluate_reader, "evaluate", measured_again)
    assert run(tmp_path, files, "--skip-missing") == 0
    assert json.loads((tmp_path / "accuracy.json").read_text())["rows"] == rows


def test_without_a_bits_stage_there_is_nothing_to_index_with(tmp_path, files, make_extractive, capsys):
    save_checkpoint(make_extractive(BTRConfig(split_layer=2)), tmp_path / "checkpoints" / "plain", {"chain": "plain"})
    assert run(tmp_path, files, "--skip-missing") == 2
    assert "no bits stage" in capsys.readouterr().err


def test_the_table_has_one_cell_per_column_with_or_without_reference_rows():
    row = {"mode": "btr", "em": 42.0, "f1": 50.0, "recall_at_k": 90.0, "qps": 5.0,
           "latency_p50_ms": 100.0, "latency_p95_ms": 200.0}
    rows = [row | {"row": "baseline", "mode": "baseline", "em": 60.0},
            row | {"row": "baseline, continued unsplit (control)", "mode": "baseline", "em": 84.0}, row | {"row": "btr"}]
    for results, relative in ((rows, ["70.0%", "50.0%"]), (rows[2:], [])):
        lines = evaluate_reader.table(results).splitlines()
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
        assert {len(c) for c in cells} == {8 + len(relative)}
        assert cells[-1][4 : 4 + len(relative)] == relative


def test_paired_interval_of_the_em_ratio():
    control = "1" * 80 + "0" * 20
    assert paired_ratio_interval(control, control) == (100.0, 100.0)
    worse = "0" * 8 + "1" * 72 + "0" * 20  # 8 of the control's hits missed: 90%
    low, high = paired_ratio_interval(worse, control)
    assert 80 < low < 90 < high < 100
    with pytest.raises(ValueError, match="cannot be paired"):
        paired_ratio_interval(worse, control[:-1])
    rows = [{"row": "baseline", "mode": "baseline", "em": 80.0, "exact": control},
            {"row": "btr", "mode": "btr", "em": 72.0, "exact": worse}]
    rows = [r | {"f1": r["em"], "recall_at_k": 90.0, "qps": 5.0, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0} for r in rows]
    assert f"| 90.0% ({low:.1f}-{high:.1f}) |" in evaluate_reader.table(rows)
