"""One model pass over a batch of questions: the reader's part of a query, without the index or the retriever.

``reader.query.Answerer.read`` runs it over what the index returned; ``bench.reader`` times it over
passages it made itself (it imports neither faiss nor the index's storage, which a GPU image may lack).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .split import PassageLike, SplitReader


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[stage]`` (milliseconds)."""
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + 1000 * (time.perf_counter() - start)


def run_reader(
    reader: SplitReader, questions: Sequence[str], groups: Sequence[Sequence[PassageLike]],
    scores: Sequence[Sequence[float]], mode: str, timings: dict[str, float],
) -> list:
    """The model's part of a query, for a batch of questions: one pass, the reader's outputs (spans or Generated).

    ``groups``: each question's passages (BinaryTokens in btr mode, text otherwise); ``scores``:
    the retriever's. Adds milliseconds to ``timings``: decode (tokenizing, bits to floats), lower
    (split mode), upper, extract or generate. ``bench.reader`` times this same function.
    """
    with timed(timings, "decode"):
        batch = reader.prepare(questions, groups, scores)
        with torch.inference_mode():
            states = reader.passage_states(batch, mode) if mode == "btr" else None
    with torch.inference_mode():
        if mode == "split":  # continuous lower states, computed now from the passage text
            with timed(timings, "lower"):
                states = reader.passage_states(batch, mode)
        with timed(timings, "upper"):
            pairs = reader.encode_pairs(batch, mode, reader.encoder_merge_ratio(mode), passages=states)
        with timed(timings, "extract" if hasattr(reader, "span_offsets") else "generate"):
            return reader.read_out(batch, pairs, mode)
