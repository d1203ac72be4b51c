"""Training examples from distant supervision: read, label passages, find every answer span, batch.

Examples are ``{"question", "answers", "passages": [{"title", "text", "id"?}, ...]}``; a passage
whose normalized text (title included) holds an answer as whole words is a positive, the others
are negatives. A Target is an example cut to the passages one step trains on, with every
occurrence of every answer in its positives as a (passage, start token, end token) span: what the
marginal likelihood of ``reader.train.span_loss`` sums over.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.record import Passage

from .extractive import ExtractiveReader
from .inputs import ENGLISH_STOPWORDS, ReaderInputError, passage_string, tokenize_passage
from .normalize import has_answer

class TrainingDataError(ValueError):
    """A training file that cannot be used: the message names the file, line and reason."""


@dataclass(frozen=True)
class Example:
    """A question, its answers, and its passages: those holding an answer first, then the others."""

    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...]
    positives: int


def read_examples(path: Path | str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSONL file; bad lines raise with their number."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TrainingDataError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise TrainingDataError(f"{path}:{number}: needs a \"question\" string")
            answers = record.get("answers")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise TrainingDataError(f"{path}:{number}: needs \"answers\", a non-empty list of strings")
            yield number, record


def to_example(record: dict) -> Example | None:
    """An Example (passages holding an answer first, order otherwise kept), or None if none holds one."""
    passages = [Passage(p.get("title", ""), p.get("text", ""), str(p.get("id", ""))) for p in record["passages"]]
    holds = [has_answer([f"{p.title} {p.text}"], record["answers"]) for p in passages]
    positives = [p for p, has in zip(passages, holds) if has]
    if not positives:
        return None
    negatives = [p for p, has in zip(passages, holds) if not has]
    return Example(record["question"], tuple(record["answers"]), (*positives, *negatives), len(positives))


_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)
_WORD = re.compile(r"\w+")


def answer_spans(reader: ExtractiveReader, passage: Passage, answers: Sequence[str]) -> list[tuple[int, int]]:
    """Every (start, end) token span of an answer inside the passage's kept tokens, in order.

    Answers match case-insensitively as whole words, also without a leading article ("the Saint
    Lawrence River" is found as "Saint Lawrence River"); a span cut off by truncation is left out.
    """
    text = passage_string(passage).lower()
    offsets = tokenize_passage(reader.tokenizer, reader.layout, passage, reader.config.max_passage_tokens, offsets=True)[
        "offset_mapping"
    ]
    body = len(offsets) - len(reader.layout.passage_suffix)
    spans = set()
    for answer in answers:
        for form in {answer.strip().lower(), _ARTICLE.sub("", answer.strip().lower())}:
            if not form:
                continue
            for match in re.finditer(r"(?<!\w)" + re.escape(form) + r"(?!\w)", text):
                begin, end = match.span()
                starts = [i for i in range(body) if offsets[i][1] > begin]
                ends = [i for i in range(body) if offsets[i][0] < end]
                if starts and ends and offsets[ends[-1]][1] >= end and starts[0] <= ends[-1]:
                    spans.add((starts[0], ends[-1]))
    return sorted(spans)


@dataclass(frozen=True)
class Target:
    """A question with the passages it trains on (positives first) and every gold span in them."""

    example: Example
    passages: tuple[Passage, ...]
    spans: tuple[tuple[int, int, int], ...]  # (passage, start token, end token)


def shares_question_word(question: str, passage: Passage) -> bool:
    """Whether the passage holds a content word of the question (not a stopword), title included."""
    wanted = set(_WORD.findall(question.lower())) - ENGLISH_STOPWORDS
    return bool(wanted & set(_WORD.findall(passage_string(passage).lower())))


def targets(
    reader: ExtractiveReader,
    examples: Sequence[Example],
    per_question: int,
    max_positives: int = 2,
    question_word: bool = False,
) -> tuple[list[Target], dict[str, int]]:
    """Each example with ``per_question`` passages: up to ``max_positives`` positives whose answer
    survives truncation, then negatives; with counts of the examples dropped and why.

    ``question_word``: a positive must also share a content word with the question (a passage that
    holds the answer string but nothing of the question, "1968" or a person's own article for "who
    sang ...?", is more often a coincidence than evidence). With ``max_positives`` = 1 it is the
    DPR reader's one positive against retrieved negatives. Both were tried with the reader heads
    (docs/accuracy.md) and did not help on held-out dev; the defaults are the default reader's.
    """
    kept = []
    dropped = {"question_empty": 0, "no_positive_kept": 0, "too_few_negatives": 0}
    for example in examples:
        try:
            reader.question_ids(example.question)
        except ReaderInputError:
            dropped["question_empty"] += 1
            continue
        positives = []
        for passage in example.passages[: example.positives]:
            if question_word and not shares_question_word(example.question, passage):
                continue
            found = answer_spans(reader, passage, example.answers)
            if found:
                positives.append((passage, found))
            if len(positives) == max_positives:
                break
        if not positives:
            dropped["no_positive_kept"] += 1  # answer cut off by truncation, or no question word
            continue
        negatives = example.passages[example.positives :][: per_question - len(positives)]
        if len(positives) + len(negatives) < per_question:
            dropped["too_few_negatives"] += 1
            continue
        spans = tuple((p, start, end) for p, (_, found) in enumerate(positives) for start, end in found)
        kept.append(Target(example, (*(p for p, _ in positives), *negatives), spans))
    return kept, dropped


def batch_order(
    count: int, steps: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None, pool: int = 50
) -> list[list[int]]:
    """Deterministic batches for every step (epochs reshuffled), so a resumed run sees the same data.

    With ``lengths`` (tokens per example), each run of ``pool`` batches is drawn at random, sorted by
    length and cut into batches, whose order is shuffled again: a batch pads to its longest
    example, so similar lengths together cost less padding, while every batch stays a random draw.
    """
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, count)  # fewer examples than a batch: every step takes them all
    batches: list[list[int]] = []
    while len(batches) < steps:
        epoch = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count - batch_size + 1, batch_size * pool):
            chunk = epoch[start : start + batch_size * pool]
            chunk = chunk[: len(chunk) - len(chunk) % batch_size]
            if lengths is not None:
                chunk.sort(key=lambda i: lengths[i])
            group = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            batches += [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
    return batches[:steps]


def example_tokens(reader: ExtractiveReader, target: Target) -> int:
    """Tokens a training example pads to: its question plus its longest passage."""
    passages = max(len(reader.passage_ids(p)) for p in target.passages)
    return len(reader.question_ids(target.example.question)) + passages
