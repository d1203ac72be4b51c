"""Answer strings compared as SQuAD compares them: normalized, maximised over the gold answers.

One normalization serves EM/F1, retrieval recall, the answer-in-sample filter and the positives of
distant supervision, so a passage that counts as holding an answer is one the reader is scored on.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: list[str]) -> float:
    """Token-overlap F1 against the best-matching gold answer."""
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(predicted) & Counter(gold)).values())
        if common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not predicted and not gold:
            best = 1.0
    return best


def has_answer(texts: list[str], answers: list[str]) -> bool:
    """Whether any passage contains a gold answer (normalized, as whole tokens).

    ``texts`` is a list: one string would be read a character at a time and hold no answer.
    """
    if isinstance(texts, str):
        raise TypeError("has_answer takes a list of passage texts, not one string")
    wanted = [f" {normalize_answer(a)} " for a in answers if normalize_answer(a)]
    return any(w in f" {normalize_answer(t)} " for t in texts for w in wanted)


def paired_ratio_interval(exact: str, reference: str, samples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of EM(exact) / EM(reference), in percent, over the same questions."""
    if len(exact) != len(reference) or not exact:
        raise ValueError(f"per-question outcomes of {len(exact)} and {len(reference)} questions cannot be paired")
    a, b = (np.frombuffer(x.encode(), dtype=np.uint8) == ord("1") for x in (exact, reference))
    picks = np.random.default_rng(seed).integers(0, len(a), size=(samples, len(a)), dtype=np.int32)
    ratios = 100 * a[picks].sum(1) / np.maximum(b[picks].sum(1), 1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)
