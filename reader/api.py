"""Ask a BTR index questions from Python: open it once, then answer one question or many, or retrieve only.

    from reader.api import open_index

    index = open_index("indexes/wikipedia-sample")   # device="auto": the GPU if torch sees one
    index.answer("Who wrote Dracula?")["answer"]       # the same dict as `reader.answer --json`
    index.answer_many(["Who wrote Dracula?", "What is Paris?"], k=3)  # one model pass per batch
    index.retrieve("Who wrote Dracula?", k=3)          # passages and scores, no reader pass

A thin facade over ``reader.query.Answerer`` (what the commands and the service run); docs/python-api.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .answer import DEFAULT_K
from .query import Answerer

DEFAULT_BATCH = 16  # questions per model pass in answer_many, as reader.serve's --max-batch


class BTRIndex:
    """An opened index: its records, its retriever and the reader that built it, loaded once."""

    def __init__(self, answerer: Answerer) -> None:
        self.answerer = answerer

    @property
    def passages(self) -> int:
        """How many passages the index holds."""
        return len(self.answerer.index)

    def answer(self, question: str, k: int = DEFAULT_K, mode: str = "btr") -> dict:
        """One question's answer, cited passage and stage timings (``reader.answer --json``'s object)."""
        return self.answerer.answer(question, k, mode)

    def answer_many(self, questions: Sequence[str], k: int = DEFAULT_K, mode: str = "btr",
                    batch_size: int = DEFAULT_BATCH) -> list[dict]:
        """Answers in the questions' order, ``batch_size`` questions per model pass (as the service batches them).

        Every question is checked before any is read: a bad one raises (ReaderInputError, ValueError) naming its position.
        """
        if isinstance(questions, str):
            raise TypeError("answer_many takes a list of questions; answer() takes one")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for position, question in enumerate(questions):
            try:
                self.answerer.check(question, k, mode)
            except ValueError as error:  # ReaderInputError is one
                raise type(error)(f"question {position}: {error}") from None
        results: list[dict] = []
        for start in range(0, len(questions), batch_size):
            lookups = [self.answerer.lookup(question, k) for question in questions[start : start + batch_size]]
            results += self.answerer.read(lookups, mode)
        return results

    def retrieve(self, question: str, k: int = DEFAULT_K) -> list[dict]:
        """The retriever's top-k passages for a question, best first (``id``, ``title``, ``text``, ``score``, ``row``)."""
        self.answerer.check(question, k, "baseline")  # the question and k; any mode reads the same passages
        lookup = self.answerer.lookup(question, k)
        stored = self.answerer.index.decode(lookup.raw, [hit.row for hit in lookup.hits])
        return [{"id": s.pid, "title": s.title, "text": s.text, "score": hit.score, "row": hit.row}
                for s, hit in zip(stored, lookup.hits)]


def open_index(path: Path | str, device: str = "auto", dtype: str = "auto") -> BTRIndex:
    """Open an index folder for questions; ``device``/``dtype`` as the commands' flags (docs/serving.md)."""
    return BTRIndex(Answerer(path, device=device, dtype=dtype))
