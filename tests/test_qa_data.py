"""make data's progress: a line per step and a heartbeat while a step runs, and the retriever's
embeddings reported part by part with the bytes a single call gives."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from flows.distant import embed_in_parts
from flows.progress import Steps
from reader.retriever import Encoder


def test_a_long_step_says_how_far_it_is_every_few_seconds():
    log = io.StringIO()
    steps = Steps(log, every=0.05)
    with steps.step("embedding") as step:
        step.counter("passages embedded")(1024, 10_033)
        time.sleep(0.2)
    with steps.step("quick"):
        pass
    lines = log.getvalue().splitlines()
    assert lines[0] == "[0s] embedding"
    assert "passages embedded 1,024/10,033 (0s into this step)" in lines[1]
    assert lines[-1] == "[0s] quick"  # a step that ends at once prints its line only


def test_embedding_in_parts_gives_the_single_calls_bytes_and_reports_each_part():
    encoder = Encoder()
    texts = [" ".join(["word"] * (1 + (i * 37) % 90)) + f" {i}" for i in range(150)]  # lengths in no order
    reports = []
    parts = embed_in_parts(encoder, texts, lambda done, total: reports.append((done, total)), part=64)
    assert np.array_equal(parts, encoder.embed(texts))
    assert reports == [(0, 150), (64, 150), (128, 150), (150, 150)]
    with pytest.raises(ValueError, match="multiple of 64"):
        embed_in_parts(encoder, texts, part=100)
