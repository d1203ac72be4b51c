"""Re-scoring a reader's answers under the answer rule, from logits computed once per question.

Each span's score is start + end logit (normalized over all of a question's passages) plus
``relevance_weight`` x the log-softmax of the passage's relevance plus ``retrieval_weight`` x the
retriever's score of the passage. ``flows.tune_answer`` (over an index's bits) and
``bench.gpu_readers`` (over given passages) cache ``question_logits`` once and ``score`` each grid
point over the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .normalize import exact_match, has_answer, normalize_answer


def question_logits(
    reader, record: dict, passages: Sequence, retrieval: Sequence[float], mode: str, inputs: Sequence | None = None
) -> dict:
    """What re-scoring needs for one question: its batch, span logits, relevance and titles (one model pass).

    ``passages``: anything with a ``title`` and ``text`` (a ``Passage``, a ``StoredPassage``); the reader
    reads ``inputs`` instead when given (an index's ``BinaryTokens``); ``retrieval``: the retriever's
    score of each.
    """
    batch = reader.prepare([record["question"]], [list(passages if inputs is None else inputs)], [list(retrieval)])
    with torch.inference_mode():
        pairs = reader.encode_pairs(batch, mode)
        start, end = reader.span_logits(batch, mode, pairs)
        relevance = reader.relevance_logits(batch, pairs)
    holds = [has_answer([p.text], record["answers"]) for p in passages]
    return {
        "record": record, "batch": batch, "start": start, "end": end, "relevance": relevance,
        "titles": [normalize_answer(p.title) for p in passages], "holds": holds, "recalled": any(holds),
    }


def score(reader, cached: list[dict], relevance_weight: float, retrieval_weight: float) -> dict:
    """EM, cited ranks and title answers of the rule at one grid point (set on ``reader``), over cached logits.

    Also the share of questions whose passages hold an answer (recall), EM among them, and
    ``em_when_recalled_reading_answer_passages``: EM among them when the reader may cite only the passages
    that hold an answer, i.e. with passage choice made perfect: how well it reads the right passage.
    """
    ems, ranks, titles, reading = [], [0] * cached[0]["batch"].per_query, 0, []
    reader.relevance_weight, reader.retrieval_weight = relevance_weight, retrieval_weight
    for item in cached:
        batch = item["batch"]
        prior = reader.passage_prior(batch, item["relevance"])
        span = reader.best_spans(batch, item["start"], item["end"], prior)[0]
        ems.append(exact_match(span.text, item["record"]["answers"]))
        ranks[span.passage] += 1
        titles += normalize_answer(span.text) in item["titles"]
        if item["recalled"]:
            lacks = ~torch.tensor(item["holds"], device=item["start"].device)[:, None]  # those without an answer: never cited
            given = reader.best_spans(batch, item["start"].masked_fill(lacks, float("-inf")), item["end"], prior)[0]
            reading.append(exact_match(given.text, item["record"]["answers"]))
    n = len(cached)
    result = {"em": round(100 * sum(ems) / n, 2), "cited_rank": ranks, "answer_is_title": round(100 * titles / n, 2),
              "exact": "".join("1" if e else "0" for e in ems)}
    recalled = [em for em, item in zip(ems, cached) if item["recalled"]]
    result["recall"] = round(100 * len(recalled) / n, 2)
    result["em_when_recalled"] = round(100 * sum(recalled) / max(len(recalled), 1), 2)
    result["em_when_recalled_reading_answer_passages"] = round(100 * sum(reading) / max(len(reading), 1), 2)
    return result
