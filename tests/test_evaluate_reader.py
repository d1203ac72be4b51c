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
    corpus, questions = tmp_path / "corpus.jsonl", tmp_path / "dev.jsonl"  # the set "dev" in tmp_path
    corpus.write_text("".join(
        json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for group in PASSAGES for p in group
    ))
    questions.write_text("".join(json.dumps({"question": q, "answers": a}) + "\n" for q, a in zip(QUESTIONS, ANSWERS)))
    return corpus, questions


def run(tmp_path, files, *extra: str) -> int:
    corpus, questions = files
    return evaluate_reader.main([
        "--checkpoints", str(tmp_path / "checkpoints"), "--data", str(questions.parent), "--sets", "dev",
        "--corpus", str(corpus), "--indexes", str(tmp_path / "indexes"), "--k", "2",
        "--out", str(tmp_path / "accuracy.json"), *extra,
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
    assert all(r["sets"]["dev"]["n"] == 2 and r["sets"]["dev"]["k"] == 2 and len(r["sets"]["dev"]["exact"]) == 2
               for r in rows)
    # Every row reads the same retrieved passages (the ablation's index serves the text rows too).
    assert len({r["sets"]["dev"]["recall_at_k"] for r in rows}) == 1
    [built] = (tmp_path / "indexes").glob("eval-checkpoints-plain+split-nodistill+bits-*")
    assert (built / "manifest.json").exists()

    def measured_again(*args, **kwargs):
        raise AssertionError("a row with unchanged weights, questions and k was measured again")

    monkeypatch.setattr(evaluate_reader, "evaluate", measured_again)
    assert run(tmp_path, files, "--skip-missing") == 0
    assert json.loads((tmp_path / "accuracy.json").read_text())["rows"] == rows

    # A control trained later is measured; the rows kept after it in the table stay in the file.
    monkeypatch.undo()
    save_checkpoint(make_extractive(BTRConfig(split_layer=2), seed=5), root / "plain+plain", {"chain": "plain+plain"})
    assert run(tmp_path, files, "--skip-missing") == 0
    after = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert [r["row"] for r in after] == ["baseline", "baseline, continued unsplit (control)", "btr, no distillation",
                                         "split, no distillation"]
    assert [after[0], *after[2:]] == rows


def test_without_a_bits_stage_there_is_nothing_to_index_with(tmp_path, files, make_extractive, capsys):
    save_checkpoint(make_extractive(BTRConfig(split_layer=2)), tmp_path / "checkpoints" / "plain", {"chain": "plain"})
    assert run(tmp_path, files, "--skip-missing") == 2
    assert "no bits stage" in capsys.readouterr().err


def test_a_missing_question_set_is_named(tmp_path, files, capsys):
    assert evaluate_reader.main(["--data", str(tmp_path), "--sets", "dev,nq-test"]) == 2
    assert "nq-test.jsonl missing; run `make data`" in capsys.readouterr().err


def _row(label: str, mode: str, em: float, exact: str | None = None) -> dict:
    cell = {"em": em, "f1": em, "recall_at_k": 90.0, "em_when_recalled": em / 0.9, "qps": 5.0, "latency_p50_ms": 100.0,
            "latency_p95_ms": 200.0, "cited_rank": [3, 2, 1], "answer_is_title": 25.0}
    if exact:
        cell["exact"] = exact
    return {"row": label, "mode": mode, "sets": {"a": cell, "b": cell | {"em": em / 2}}}


def test_the_table_has_one_cell_per_column_and_compares_with_the_control_when_there_is_one():
    rows = [_row("baseline", "baseline", 60.0), _row("baseline, continued unsplit (control)", "baseline", 84.0),
            _row("btr", "btr", 42.0)]
    for results, reference, relative in ((rows, "control", "50.0%"), ([rows[0], rows[2]], "baseline", "70.0%")):
        lines = evaluate_reader.table(results, ["a", "b"]).splitlines()
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
        assert {len(c) for c in cells} == {9} and cells[0][6] == f"EM vs {reference} (a)"
        assert cells[-1][2:7] == ["42.0 / 42.0 / 90.0 / 46.7", "3 / 2 / 1, 25%", "21.0 / 42.0 / 90.0 / 46.7",
                                  "3 / 2 / 1, 25%", relative]


def test_paired_interval_of_the_em_ratio():
    control = "1" * 80 + "0" * 20
    assert paired_ratio_interval(control, control) == (100.0, 100.0)
    worse = "0" * 8 + "1" * 72 + "0" * 20  # 8 of the control's hits missed: 90%
    low, high = paired_ratio_interval(worse, control)
    assert 80 < low < 90 < high < 100
    with pytest.raises(ValueError, match="cannot be paired"):
        paired_ratio_interval(worse, control[:-1])
    rows = [_row("baseline", "baseline", 80.0, control), _row("btr", "btr", 72.0, worse)]
    assert f"| 90.0% ({low:.1f}-{high:.1f}) |" in evaluate_reader.table(rows, ["a"])


def test_k_curve_and_offline_merge_rows(tmp_path, files, make_extractive):
    root = tmp_path / "checkpoints"
    for seed, stage in enumerate(("plain", "plain+split", "plain+split+bits")):
        save_checkpoint(make_extractive(BTRConfig(split_layer=2), seed=seed), root / stage, {"chain": stage})
    assert run(tmp_path, files, "--k-curve", "1,3") == 0
    points = json.loads((tmp_path / "accuracy.json").read_text())["points"]
    assert [p["k"] for p in points] == [1, 3]
    assert points[0]["sets"]["dev"]["recall_at_k"] <= points[1]["sets"]["dev"]["recall_at_k"]
    assert run(tmp_path, files, "--offline", "0,0.4", "--reader", str(root / "plain+split+bits"), "--pool", "1") == 0
    rows = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert [(r["offline_merge"], r["pool"]) for r in rows] == [(0.0, 1), (0.4, 1)]
    assert 0 < rows[1]["bits_per_dim"] < rows[0]["bits_per_dim"]  # merging stores fewer bits
    assert rows[0]["sets"]["dev"]["recall_at_k"] == rows[1]["sets"]["dev"]["recall_at_k"]  # same passages
