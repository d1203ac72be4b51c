"""make data's progress: a line per step and a heartbeat while a step runs, and the retriever's
embeddings reported part by part with the bytes a single call gives."""

from __future__ import annotations

import io
import re
import threading

import numpy as np
import pytest

from flows.distant import embed_in_parts
from flows.progress import Steps
from reader.retriever import Encoder


class Log(io.StringIO):
    """A log that says (an event) when a heartbeat line is written: the test waits for it, not for a clock."""

    def __init__(self) -> None:
        super().__init__()
        self.beat = threading.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        if "into this step" in text:
            self.beat.set()
        return written


def test_a_long_step_says_how_far_it_is_every_few_seconds():
    log = Log()
    steps = Steps(log, every=0.05)
    with steps.step("embedding") as step:
        step.counter("passages embedded")(1024, 10_033)
        assert log.beat.wait(60)
    steps.every = 60.0  # a step that ends long before its first beat, however loaded the machine
    with steps.step("quick"):
        pass
    lines = log.getvalue().splitlines()
    assert re.fullmatch(r"\[\d+s\] embedding", lines[0]), lines
    assert re.fullmatch(r"\[\d+s\]     passages embedded 1,024/10,033 \(\d+s into this step\)", lines[1]), lines
    assert re.fullmatch(r"\[\d+s\] quick", lines[-1]) and "still at it" not in log.getvalue(), lines  # its line only


def test_embedding_in_parts_gives_the_single_calls_bytes_and_reports_each_part():
    encoder = Encoder()
    texts = [" ".join(["word"] * (1 + (i * 37) % 90)) + f" {i}" for i in range(150)]  # lengths in no order
    reports = []
    parts = embed_in_parts(encoder, texts, lambda done, total: reports.append((done, total)), part=64)
    assert np.array_equal(parts, encoder.embed(texts))
    assert reports == [(0, 150), (64, 150), (128, 150), (150, 150)]
    with pytest.raises(ValueError, match="multiple of 64"):
        embed_in_parts(encoder, texts, part=100)
