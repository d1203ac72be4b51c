"""The query path over a small index built here: reader.answer, reader.evaluate, reader.serve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reader.answer import Answerer, main as answer_main
from reader.assets import wikipedia_sample
from reader.config import BTRConfig
from reader.evaluate import exact_match, f1_score, has_answer, main as evaluate_main, normalize_answer
from reader.serve import Batcher

PASSAGES = wikipedia_sample(40, min_words=30)
QUESTIONS = [f"What is {p.title}?" for p in PASSAGES[:4]]
STAGES = {"retrieve", "fetch", "decode", "upper", "extract", "total", "batch"}


@pytest.fixture(scope="module")
def index(tmp_path_factory, answering_index) -> Path:
    """40 sample passages indexed by a tiny saved reader (k=2), with a faiss retriever."""
    return answering_index(tmp_path_factory.mktemp("query") / "index", PASSAGES)


def run_answer(capsys, *argv) -> tuple[int, str, str]:
    status = answer_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_answer_prints_the_answer_its_passages_and_stage_timings(index, capsys):
    status, out, err = run_answer(capsys, QUESTIONS[0], "--index", index, "--k", 3, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert isinstance(result["answer"], str) and result["answer"]
    assert len(result["passages"]) == 3 and all({"id", "title", "score", "snippet"} <= set(p) for p in result["passages"])
    scores = [p["score"] for p in result["passages"]]
    assert scores == sorted(scores, reverse=True)
    assert set(result["timings_ms"]) == STAGES and result["timings_ms"]["batch"] == 1
    # The answer is a piece of the passage it cites.
    source = result["passages"][result["source"]]
    text = next(p.text for p in PASSAGES if p.id == source["id"])
    assert result["answer"] in f"title: {source['title']} context: {text}"

    status, out, _ = run_answer(capsys, QUESTIONS[0], "--index", index, "--k", 3)
    assert status == 0 and out.startswith(f"answer: {result['answer']}\n")
    assert all(p["title"] in out for p in result["passages"]) and "retrieve" in out and "upper" in out


def test_a_question_longer_than_the_reader_takes_is_answered_without_its_tail_and_says_so(index, capsys):
    question = QUESTIONS[0] + " and" + " why" * 80
    status, out, err = run_answer(capsys, question, "--index", index, "--k", 2, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["question_tokens_cut"] > 0 and result["answer"]
    status, out, _ = run_answer(capsys, question, "--index", index, "--k", 2)
    assert status == 0 and out.startswith("note: the question is longer than the reader takes")
    status, out, _ = run_answer(capsys, QUESTIONS[0], "--index", index, "--k", 2, "--json")
    assert json.loads(out)["question_tokens_cut"] == 0


def test_every_mode_reads_the_same_passages(index):
    answerer = Answerer(index)
    results = {mode: answerer.answer(QUESTIONS[1], 4, mode) for mode in ("baseline", "split", "btr")}
    assert all(r["passages"] == results["btr"]["passages"] for r in results.values())
    assert "lower" in results["split"]["timings_ms"] and "lower" not in results["btr"]["timings_ms"]


def _copy_with_spec(index: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "index-copy"
    shutil.copytree(index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["extra"]["reader_spec"].update(changes)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    "question, options, message",
    [
        ("   ", [], "the question is empty"),
        ("what is \udcff?", [], "not valid UTF-8"),
        (QUESTIONS[0], ["--k", "0"], "k must be a whole number from 1 to 40"),
        (QUESTIONS[0], ["--k", "41"], "k must be a whole number from 1 to 40"),
    ],
)
def test_bad_questions_and_options_are_one_line_and_exit_2(index, capsys, question, options, message):
    status, out, err = run_answer(capsys, question, "--index", index, *options)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_or_foreign_index_exit_2_and_a_corrupt_record_3(index, tmp_path, capsys, flip_record_byte, make_extractive):
    status, _, err = run_answer(capsys, QUESTIONS[0], "--index", tmp_path / "nowhere")
    assert status == 2 and "manifest.json is missing" in err

    # Another split layer than the bits were made with.
    other_k = _copy_with_spec(index, tmp_path / "k", split_layer=3)
    status, _, err = run_answer(capsys, QUESTIONS[0], "--index", other_k)
    assert status == 2 and "split layer k: index 2, reader 3" in err

    # The checkpoint at the recorded path was replaced by another model since the index was built.
    other = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=96), hidden_size=64, seed=7)
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    other_model = _copy_with_spec(index, tmp_path / "model", checkpoint=str(tmp_path / "other"))
    status, _, err = run_answer(capsys, QUESTIONS[0], "--index", other_model)
    assert status == 2 and "built by another reader" in err and "model weights" in err

    corrupt = tmp_path / "corrupt"
    shutil.copytree(index, corrupt)
    shard = flip_record_byte(corrupt, row=5)
    status, _, err = run_answer(capsys, QUESTIONS[0], "--index", corrupt, "--k", 40)
    assert status == 3 and f"{shard} row 5: checksum mismatch" in err  # the index's fault, not the question's


def test_questions_file_streams_one_json_line_each_and_keeps_going_past_bad_lines(index, tmp_path, capsys):
    lines = [json.dumps({"question": QUESTIONS[0]}), "{not json", json.dumps({"question": " "}),
             json.dumps({"q": "x"}), json.dumps({"question": QUESTIONS[1]})]
    path = tmp_path / "questions.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"question": "caf\xe9?"}\n')
    status, out, err = run_answer(capsys, "--questions", path, "--index", index, "--k", 2)
    results = [json.loads(line) for line in out.splitlines()]
    assert status == 2 and len(results) == 6
    assert [r.get("line") for r in results] == [None, 2, 3, 4, None, 6]
    assert results[0]["question"] == QUESTIONS[0] and results[4]["question"] == QUESTIONS[1]
    assert "not JSON" in results[1]["error"] and "empty" in results[2]["error"]
    assert '"question" string' in results[3]["error"] and "UTF-8" in results[5]["error"]
    assert err.count("error: line") == 4
    status, _, err = run_answer(capsys, "--questions", tmp_path / "none.jsonl", "--index", index)
    assert status == 2 and "does not exist" in err


def test_four_processes_answer_the_same_questions_identically(index, tmp_path):
    """Concurrent readers of one index's LMDB shards (four: eight took 75 s of `make test` on two cores)."""
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    command = [sys.executable, "-m", "reader.answer", "--questions", str(path), "--index", str(index), "--k", "3"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, [err[-500:] for _, err in outputs]
    answers = []
    for out, err in outputs:
        assert "lmdb" not in err.lower()
        results = [json.loads(line) for line in out.splitlines()]
        answers.append([(r["answer"], r["source"], r["passages"]) for r in results])
    assert len(answers[0]) == len(QUESTIONS) and all(a == answers[0] for a in answers)


def test_evaluate_prints_the_summary_and_metrics_follow_squad():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("eiffel tower", ["The Eiffel Tower"]) == 1.0 and exact_match("tower", ["Eiffel Tower"]) == 0.0
    assert f1_score("the tower", ["Eiffel Tower"]) == pytest.approx(2 * (1 * 0.5) / 1.5)
    assert has_answer(["It opened in 1889."], ["1889"]) and not has_answer(["It opened in 18890."], ["1889"])


def test_evaluate_command(index, tmp_path, capsys):
    answerer = Answerer(index)
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answers": [p.title]}) + "\n" for q, p in zip(QUESTIONS, PASSAGES)))
    for mode in ("baseline", "btr"):
        assert evaluate_main(["--index", str(index), "--questions", str(path), "--mode", mode, "--k", "3", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["n"] == 4 and summary["mode"] == mode and 0 <= summary["em"] <= summary["f1"] <= 100
        assert summary["recall_at_k"] > 0 and summary["qps"] > 0
        assert summary["latency_p50_ms"] <= summary["latency_p95_ms"]
        assert len(summary["exact"]) == 4 and set(summary["exact"]) <= {"0", "1"}
        assert summary["em"] == round(100 * summary["exact"].count("1") / 4, 2)
        # EM counts only where the answer was read, so EM given recall is EM over recall
        assert summary["em_when_recalled"] == pytest.approx(100 * summary["em"] / summary["recall_at_k"], abs=0.01)
        # the cited passage's rank and the title answers, counted here from each answer on its own
        results = [answerer.answer(q, 3, mode) for q in QUESTIONS]
        assert summary["cited_rank"] == [sum(r["source"] == rank for r in results) for rank in range(3)]
        titles = sum(normalize_answer(r["answer"]) in {normalize_answer(p["title"]) for p in r["passages"]} for r in results)
        assert summary["answer_is_title"] == round(100 * titles / len(QUESTIONS), 2)
    assert evaluate_main(["--index", str(index), "--questions", str(path), "--pool", "0"]) == 2
    assert "pool must be at least 1" in capsys.readouterr().err
    path.write_text('{"question": "no answers"}\n')
    assert evaluate_main(["--index", str(index), "--questions", str(path), "--mode", "btr"]) == 2
    assert '"answers"' in capsys.readouterr().err


def test_evaluate_scores_right_wrong_unrecalled_and_refused_questions_as_counted_by_hand(index):
    """A reader that gets some questions right: gold answers made from its own answers, so EM is not 0."""
    from reader.evaluate import evaluate

    answerer = Answerer(index)
    said = [answerer.answer(q, 3, "btr") for q in QUESTIONS]
    assert all(normalize_answer(r["answer"]) for r in said)
    text = answerer.index.fetch([answerer.lookup(QUESTIONS[2], 3).hits[0].row])[0].text
    words = [w for w in text.split() if normalize_answer(w) and normalize_answer(w) not in normalize_answer(said[2]["answer"]).split()]
    records = [
        {"question": QUESTIONS[0], "answers": ["no such answer", said[0]["answer"].upper()]},  # right (second gold)
        {"question": QUESTIONS[1], "answers": [said[1]["answer"]]},  # right
        {"question": QUESTIONS[2], "answers": [words[0]]},  # wrong, but a retrieved passage holds it
        {"question": QUESTIONS[3], "answers": ["zzqx"]},  # wrong, and no passage holds it
        {"question": "   ", "answers": ["anything"]},  # refused: a miss
    ]
    got = evaluate(answerer, records, "btr", 3)
    assert got["exact"] == "11000" and got["em"] == 40.0 and got["refused"] == 1
    f1s = [1.0, 1.0, f1_score(said[2]["answer"], [words[0]]), f1_score(said[3]["answer"], ["zzqx"]), 0.0]
    assert got["f1"] == round(100 * sum(f1s) / 5, 2)
    # Recall by has_answer over each question's retrieved passages (a right answer like "Arabic-" may not be "held"
    # by "Arabic-speaking", so it is counted here, not assumed).
    held = [has_answer([f"{p.title} {p.text}" for p in answerer.index.fetch([h.row for h in answerer.lookup(r["question"], 3).hits])],
                       r["answers"]) for r in records[:4]] + [False]
    assert held[2] and not held[3]
    assert got["recall_at_k"] == round(100 * sum(held) / 5, 2)
    right_held = [e == "1" for e, h in zip(got["exact"], held) if h]
    assert got["em_when_recalled"] == round(100 * sum(right_held) / len(right_held), 2)
    assert sum(got["cited_rank"]) == 4  # the refused question cites nothing


def test_batcher_reads_waiting_questions_in_one_pass_with_the_same_answers(index):
    answerer = Answerer(index)
    lookups = [answerer.lookup(q, 3) for q in QUESTIONS]
    alone = [answerer.read([lookup], "btr")[0] for lookup in lookups]
    batcher = Batcher(answerer, max_batch=8, window_ms=500)
    try:
        futures = [batcher.submit(lookup, "btr") for lookup in lookups]
        together = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert batcher.batches == [len(QUESTIONS)]
    assert all(t["timings_ms"]["batch"] == len(QUESTIONS) for t in together)
    assert [(t["answer"], t["passages"]) for t in together] == [(a["answer"], a["passages"]) for a in alone]


def test_service_answers_reports_health_refuses_bad_input_and_survives_concurrency(index):
    from reader.loadtest import phase, request, running_service

    with running_service(str(index), max_batch=8) as port:
        status, health = request(port, "GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["passages"] == 40
        status, result = request(port, "POST", "/answer", {"question": QUESTIONS[0], "k": 3})
        assert status == 200 and result["answer"] and len(result["passages"]) == 3
        for body, message in [({"question": " "}, "empty"), ({"question": QUESTIONS[0], "k": 0}, "k must"),
                              ({"question": QUESTIONS[0], "mode": "fast"}, "unknown mode"), ([1], "JSON object")]:
            status, reply = request(port, "POST", "/answer", body)
            assert status == 400 and message in reply["error"]
        began = time.monotonic()
        load = phase(port, QUESTIONS, clients=4, requests=12, time_limit=120, k=3)
        assert load["errors"] == 0 and load["answered"] == 12, load["first_error"]
        assert time.monotonic() - began < 120
        status, again = request(port, "POST", "/answer", {"question": QUESTIONS[0], "k": 3})
        assert again["answer"] == result["answer"] and again["passages"] == result["passages"]


def test_tune_answer_rescores_as_the_query_path_reads_and_refuses_test_sets(index, tmp_path, capsys):
    from flows import tune_answer
    from reader.evaluate import evaluate

    data = tmp_path / "qa"
    data.mkdir()
    records = [{"question": q, "answers": [p.title]} for q, p in zip(QUESTIONS, PASSAGES)]
    (data / "nq-dev-heldout-in-sample.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "grid.json"
    argv = ["--index", str(index), "--data", str(data), "--sets", "nq-dev-heldout-in-sample", "--k", "3",
            "--relevance", "0", "--retrieval", "0,1000", "--out", str(out)]
    assert tune_answer.main(argv) == 0
    points = json.loads(out.read_text())["points"]
    for point in points:  # the reference: the query path itself, with the same rule
        answerer = Answerer(index)
        answerer.reader.retrieval_weight = point["retrieval_weight"]
        expected = evaluate(answerer, records, "btr", 3)
        got = point["sets"]["nq-dev-heldout-in-sample"]
        assert (got["exact"], got["cited_rank"], got["em"]) == (expected["exact"], expected["cited_rank"], expected["em"])
    assert points[1]["sets"]["nq-dev-heldout-in-sample"]["cited_rank"][0] == len(records)  # a huge weight: rank 1
    assert tune_answer.main([*argv[:4], "--sets", "nq-test-in-sample"]) == 2
    assert "dev sets only" in capsys.readouterr().err


def test_an_answer_is_the_reader_span_widened_to_whole_words_and_names(index):
    """The query path widens the reader's span (reader.spans.whole_name); off, it answers the span as read.

    Widened, no answer starts or ends inside a word, and each holds the span the reader chose, cited
    from the same passage; the tiny random reader's "Reap, Cambodia, and" becomes "Siem Reap, ..."."""
    answerer = Answerer(index)
    questions = [f"Who or what is {p.title}?" for p in PASSAGES[:12]] + QUESTIONS
    lookups = [answerer.lookup(q, 3) for q in questions]
    widened = answerer.read(lookups, "btr")
    answerer.whole_names = False
    as_read = answerer.read(lookups, "btr")
    grown = 0
    for wide, read in zip(widened, as_read):
        assert wide["source"] == read["source"] and wide["context"] == read["context"]
        (first, last), (start, end) = wide["span"], read["span"]
        assert first <= start and end <= last and wide["answer"] == wide["context"][first:last]
        text = wide["context"]
        assert first == 0 or not (text[first - 1].isalnum() and text[first].isalnum()), wide["answer"]
        assert last == len(text) or not (text[last - 1].isalnum() and text[last].isalnum()), wide["answer"]
        grown += (first, last) != (start, end)
    assert grown, "no answer was widened: the test shows nothing (the random reader's spans changed?)"
