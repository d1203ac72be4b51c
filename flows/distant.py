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

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from reader.retriever import Encoder, Retriever, build_faiss, passage_text
from storage.index import FAISS_FILE
from storage.record import Passage

from .qa_sets import AnswerFinder

BATCH = 64  # Encoder.embed's default batch


def embed_in_parts(
    encoder: Encoder, texts: Sequence[str], progress: Callable[[int, int], None] | None = None, part: int = 8 * BATCH,
) -> np.ndarray:
    """``encoder.embed(texts)``, a part at a time, calling ``progress(done, total)`` before the first and after each.

    Parts are cut from embed's own order (by length, stable) at multiples of its batch, so every
    batch, and so every vector, is bit for bit the one a single call gives.
    """
    if part % BATCH:
        raise ValueError(f"part must be a multiple of {BATCH}, got {part}")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), encoder.dimension), dtype=np.float32)
    progress = progress or (lambda done, total: None)
    progress(0, len(order))
    for start in range(0, len(order), part):
        rows = order[start : start + part]
        out[rows] = encoder.embed([texts[i] for i in rows], batch_size=BATCH)
        progress(start + len(rows), len(order))
    return out


def sample_retriever(
    folder: Path, passages: Sequence[Passage], progress: Callable[[int, int], None] | None = None,
) -> Retriever:
    """The default retriever over ``passages`` (rows in order), built in ``folder`` once;
    ``progress(done, total)`` follows the embedding."""
    encoder = Encoder()
    if not (folder / FAISS_FILE).exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_faiss([embed_in_parts(encoder, [passage_text(p) for p in passages], progress)], folder, encoder.identity())
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
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Training records ``{"question", "answers", "passages", "positives"}`` (positives first, each
    group in retrieval order), and counts: questions kept, dropped for no positive in the top ``depth``.
    ``progress(done, total)`` is called after each chunk of questions."""
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
        if progress is not None:
            progress(start + len(chunk), len(records))
    return out, {"questions": len(records), "kept": len(out), "no_positive_in_top": dropped, "depth": depth}
