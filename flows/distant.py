"""Distant supervision: training examples for human-written questions from retrieved passages.

Questions come with answer strings but no passages. For each one, the product's own retriever
(the faiss index over the sample, built once under ``data/qa/retriever``) returns its top
``depth`` passages; those that contain a SQuAD-normalized answer as whole words are positives,
the rest are negatives, in retrieval order. A question with no positive among them is dropped
and counted: a positive found only far down the whole corpus is more often a coincidence ("1968",
"John") than evidence. Span labels (every occurrence of every answer) are found later, in the
reader's own tokens (``reader.supervision.targets``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from reader.inputs import Passage
from reader.retriever import FAISS_FILE, Encoder, Retriever, build_faiss, passage_text

from .qa_sets import AnswerFinder


def sample_retriever(folder: Path, passages: Sequence[Passage]) -> Retriever:
    """The default retriever over ``passages`` (rows in order), built in ``folder`` once."""
    encoder = Encoder()
    if not (folder / FAISS_FILE).exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_faiss([encoder.embed([passage_text(p) for p in passages])], folder, encoder.identity())
    return Retriever(folder, encoder)


def passage_json(passage: Passage) -> dict:
    return {"id": passage.id, "title": passage.title, "text": passage.text}


def supervise(
    records: Sequence[dict],
    passages: Sequence[Passage],
    retriever: Retriever,
    finder: AnswerFinder,
    depth: int = 20,
    keep_positives: int = 4,
    keep_negatives: int = 8,
) -> tuple[list[dict], dict[str, int]]:
    """Training records ``{"question", "answers", "passages", "positives"}`` (positives first, each
    group in retrieval order), and counts: questions kept, dropped for no positive in the top ``depth``."""
    out, dropped = [], 0
    for start in range(0, len(records), 256):
        chunk = records[start : start + 256]
        for record, hits in zip(chunk, retriever.search([r["question"] for r in chunk], depth)):
            holding = finder.rows(record["answers"])
            positives = [h.row for h in hits if h.row in holding][:keep_positives]
            if not positives:
                dropped += 1
                continue
            negatives = [h.row for h in hits if h.row not in holding][:keep_negatives]
            out.append({
                "question": record["question"],
                "answers": record["answers"],
                "positives": len(positives),
                "passages": [passage_json(passages[row]) for row in positives + negatives],
            })
    return out, {"questions": len(records), "kept": len(out), "no_positive_in_top": dropped, "depth": depth}
