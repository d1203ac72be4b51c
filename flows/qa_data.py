"""The QA data: human-written question sets (distantly supervised) and generated questions.

    python -m flows.qa_data [--out data/qa] [--cache data/cache] [--depth 20] [--dev-share 0.1] [--per-article 2]

Human-written questions (``flows.qa_sets``): NQ-open, TriviaQA and SQuAD from the pyserini wheel,
each as JSONL and as its answer-in-sample subset, with ``DATA_CARD.md``; the dev sets and SQuAD
get passages by distant supervision (``flows.distant``) in ``real-train.jsonl``, the reader's
training file. The test sets are written for evaluation only.

Generated questions (below): pairs made from the bundled Wikipedia sample, split by article.

No QA dataset can be downloaded here, so questions are made from the sample's own sentences: an
answer span is chosen by rule (a year, a quantity, a capitalised name) and the sentence is turned
into a wh-question around it ("The Apollo 11 mission landed in what year?"). A leading pronoun is
replaced by the article title so that the question says what it is about. Writes:

- ``train.jsonl``: ``{"question", "answers", "passages"}``, passages = the source passage first,
  then one hard negative (the training passage sharing the rarest words with the question, without
  the answer);
- ``dev.jsonl``: ``{"question", "answers", "article"}`` from held-out articles only (no passages:
  evaluation retrieves them);
- ``corpus.jsonl``: the evaluation corpus (every dev article plus training articles up to
  ``--corpus-size``), in the format ``index-wikipedia`` reads with ``corpus_format="jsonl"``;
- ``summary.json``: counts per split and per question kind.

Everything is a pure function of the sample and the arguments: the same command gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from reader.assets import wikipedia_sample
from storage.record import Passage

from .progress import Steps

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z0-9]+")
_YEAR = re.compile(r"\b([Ii]n|[Ss]ince|[Bb]y|[Uu]ntil|[Ff]rom) (1[0-9]{3}|20[0-2][0-9])\b(?! ?[-–%])")
_QUANTITY = re.compile(r"\b(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)( (?:million|billion|thousand|hundred))? ([a-z]{3,})\b")
_NAME = re.compile(r"(?<=[a-z,] )((?:[A-Z][a-z]+)(?: (?:of |the |de |von )?[A-Z][a-z]+){0,3})(?=[ ,.;])")
_PRONOUNS = {"It": "", "He": "", "She": "", "They": "", "Its": "'s", "His": "'s", "Her": "'s", "Their": "'s"}
_STOP = set("the and for that with from this which was were are has have had its into also been their other".split())
MAX_QUESTION_WORDS = 24


@dataclass(frozen=True)
class Question:
    """One generated question, the answer span it asks for, and the article it came from."""

    question: str
    answer: str
    kind: str  # year | quantity | name
    article: str


def is_dev(title: str, share: float) -> bool:
    """Whether an article is held out for evaluation (a stable hash of its title)."""
    bucket = int.from_bytes(hashlib.sha256(title.encode()).digest()[:8], "big") / 2**64
    return bucket < share


def _with_subject(sentence: str, title: str) -> str:
    """Replace a leading pronoun by the article title ("It was built" -> "The Eiffel Tower was built")."""
    first, _, rest = sentence.partition(" ")
    if first in _PRONOUNS:
        return f"{title}{_PRONOUNS[first]} {rest}"
    return sentence


def _ask(sentence: str, start: int, end: int, wh: str) -> str | None:
    """The sentence with [start, end) replaced by ``wh`` and a question mark, or None if unusable."""
    question = f"{sentence[:start]}{wh}{sentence[end:]}".rstrip(" .;:")
    if not question or len(question.split()) > MAX_QUESTION_WORDS or "\n" in question:
        return None
    return question[0].upper() + question[1:] + "?"


def sentence_questions(sentence: str, title: str) -> Iterator[tuple[str, str, str]]:
    """(question, answer, kind) for every answer span the rules find in one sentence."""
    sentence = _with_subject(sentence.strip(), title)
    for match in _YEAR.finditer(sentence):
        preposition, year = match.groups()
        question = _ask(sentence, match.start(), match.end(), f"{preposition} what year")
        if question:
            yield question, year, "year"
    for match in _QUANTITY.finditer(sentence):
        number, scale, noun = match.groups()
        if _YEAR.fullmatch(f"in {number}") or noun in {"and", "the", "bc", "bce", "ad", "ce"}:
            continue  # a bare year or a date, not a count
        question = _ask(sentence, match.start(), match.end(), f"how many {noun}")
        if question:
            yield question, number + (scale or ""), "quantity"
    for match in _NAME.finditer(sentence):
        name = match.group(1)
        before = sentence[: match.start(1)].split()
        if before and before[-1][0].isupper():
            continue  # the tail of a longer name ("Louis Burt Mayer")
        if name in title or title in name or name.split()[0] in _PRONOUNS:
            continue  # asking for the article's own title is trivial
        question = _ask(sentence, match.start(1), match.end(1), "what")
        if question:
            yield question, name, "name"


def article_questions(passage: Passage, limit: int) -> list[Question]:
    """Up to ``limit`` questions from one article, one kind after another (years and counts first)."""
    found: dict[str, list[Question]] = defaultdict(list)
    seen = set()
    for sentence in _SENTENCE.split(passage.text):
        for question, answer, kind in sentence_questions(sentence, passage.title):
            if answer not in seen:
                seen.add(answer)
                found[kind].append(Question(question, answer, kind, passage.title))
    ordered = [q for group in zip_longest(*(found[k] for k in ("year", "quantity", "name"))) for q in group if q]
    return ordered[:limit]


def _words(text: str) -> set[str]:
    return {w for w in (m.lower() for m in _WORD.findall(text)) if len(w) > 2 and w not in _STOP}


class LexicalNegatives:
    """Hard negatives: the passage sharing the rarest question words, that does not hold the answer."""

    def __init__(self, passages: list[Passage], max_df: int = 300) -> None:
        self.passages = passages
        self.postings: dict[str, list[int]] = defaultdict(list)
        for row, passage in enumerate(passages):
            for word in _words(f"{passage.title} {passage.text}"):
                self.postings[word].append(row)
        self.max_df = max_df

    def negative(self, question: Question, positive: int) -> Passage:
        """The best-scoring other passage without the answer (the next passage if none shares a word)."""
        scores: Counter[int] = Counter()
        n = len(self.passages)
        for word in sorted(_words(question.question)):  # a fixed order: float sums must not follow set hashing
            rows = self.postings.get(word, ())
            if 0 < len(rows) <= self.max_df:
                weight = math.log(n / len(rows))
                for row in rows:
                    scores[row] += weight
        for row, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0])):
            if row != positive and question.answer not in self.passages[row].text:
                return self.passages[row]
        return self.passages[(positive + 1) % n]


def passage_json(passage: Passage) -> dict:
    return {"id": passage.id, "title": passage.title, "text": passage.text}


def generate(out: Path, dev_share: float = 0.1, per_article: int = 2, corpus_size: int = 2000) -> dict:
    """Write train.jsonl, dev.jsonl, corpus.jsonl and summary.json under ``out``; return the summary."""
    passages = wikipedia_sample(min_words=20)
    train_rows = [row for row, p in enumerate(passages) if not is_dev(p.title, dev_share)]
    dev_rows = [row for row, p in enumerate(passages) if is_dev(p.title, dev_share)]
    train_passages = [passages[row] for row in train_rows]
    negatives = LexicalNegatives(train_passages)
    out.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, Counter] = {"train": Counter(), "dev": Counter()}
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for position, passage in enumerate(train_passages):
            for q in article_questions(passage, per_article):
                record = {
                    "question": q.question,
                    "answers": [q.answer],
                    "passages": [passage_json(passage), passage_json(negatives.negative(q, position))],
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                kinds["train"][q.kind] += 1
    with open(out / "dev.jsonl", "w", encoding="utf-8") as f:
        for row in dev_rows:
            for q in article_questions(passages[row], 1):
                f.write(json.dumps({"question": q.question, "answers": [q.answer], "article": q.article}) + "\n")
                kinds["dev"][q.kind] += 1
    corpus_rows = sorted(dev_rows + train_rows[: max(0, corpus_size - len(dev_rows))])
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for row in corpus_rows:
            f.write(json.dumps(passage_json(passages[row]), ensure_ascii=False) + "\n")
    summary = {
        "articles": {"train": len(train_rows), "dev": len(dev_rows)},
        "questions": {split: sum(counts.values()) for split, counts in kinds.items()},
        "kinds": {split: dict(sorted(counts.items())) for split, counts in kinds.items()},
        "corpus_passages": len(corpus_rows),
        "settings": {"dev_share": dev_share, "per_article": per_article, "corpus_size": corpus_size},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


TRAIN_SETS = ("nq-dev-train", "trivia-dev-train", "squad")


def real_sets(out: Path, cache: Path, depth: int = 20, holdout: float = 0.1, steps: Steps | None = None) -> dict:
    """The human-written sets under ``out`` and ``real-train.jsonl``, their distantly supervised
    training examples (the three training sets interleaved); returns the counts. ``steps`` reports
    progress (stderr by default)."""
    from storage.index import FAISS_FILE
    from workers.corpus import read_sample

    from .distant import sample_retriever, supervise
    from .qa_sets import WHEEL_FILE, AnswerFinder, convert, data_card, fetch_wheel, write_jsonl

    steps = steps or Steps()
    fetching = "checking" if (cache / WHEEL_FILE).exists() else "downloading (85 MB, once)"
    with steps.step(f"{fetching} the pyserini wheel in {cache} (its jar holds the question files)"):
        wheel = fetch_wheel(cache)
    with steps.step("NQ-open, TriviaQA and SQuAD questions, and which have an answer in the sample"):
        passages = [p for p in read_sample(None) if isinstance(p, Passage)]  # the rows the demo index holds
        finder = AnswerFinder(passages)
        counts = convert(wheel, out, finder, holdout)
    built = (out / "retriever" / FAISS_FILE).exists()
    with steps.step(f"the retriever over the sample: {'kept' if built else f'embedding {len(passages):,} passages into'} {out / 'retriever'}"):
        retriever = sample_retriever(out / "retriever", passages, steps.counter("passages embedded"))
    supervised, groups = {}, []
    for name in TRAIN_SETS:
        records = [json.loads(line) for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").split("\n") if line]
        with steps.step(f"distant supervision of {name}: the top {depth} passages of {len(records):,} questions"):
            examples, supervised[name] = supervise(
                records, passages, retriever, finder, depth, progress=steps.counter("questions")
            )
        groups.append(examples)
    interleaved = (r for group in zip_longest(*groups) for r in group if r)
    supervised["real-train"] = write_jsonl(out / "real-train.jsonl", interleaved)
    (out / "DATA_CARD.md").write_text(data_card(counts, len(passages), holdout, supervised))
    summary = {"sets": counts, "supervised": supervised}
    (out / "sets.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m flows.qa_data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/qa"),
                        help="folder the question sets, corpus and data card are written to (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=Path("data/cache"),
                        help="where the pyserini wheel is kept (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=20,
                        help="passages retrieved per training question (default: %(default)s)")
    parser.add_argument("--holdout", type=float, default=0.1,
                        help="share of dev questions kept out of training (default: %(default)s)")
    parser.add_argument("--dev-share", type=float, default=0.1,
                        help="share of articles held out, for the generated questions (default: %(default)s)")
    parser.add_argument("--per-article", type=int, default=2,
                        help="training questions per article, generated (default: %(default)s)")
    parser.add_argument("--corpus-size", type=int, default=2000,
                        help="passages in the evaluation corpus of the generated questions (default: %(default)s)")
    parser.add_argument("--generated-only", action="store_true", help="skip the human-written sets (default: off)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    steps = Steps()
    with steps.step(f"generated questions from the sample's sentences ({args.out}/train.jsonl, dev.jsonl, corpus.jsonl)"):
        summary = {"generated": generate(args.out, args.dev_share, args.per_article, args.corpus_size)}
    if not args.generated_only:
        from .qa_sets import QASetError

        try:
            summary |= real_sets(args.out, args.cache, args.depth, args.holdout, steps)
        except QASetError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
    steps.say(f"done: {args.out} (counts below and in {args.out}/sets.json, sources in {args.out}/DATA_CARD.md)")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
