"""The training losses of a BTR reader, each a function of one batch's encodings (``reader.train``
composes them per stage).

- task losses (``TASK_LOSSES``, one per family): ``span_loss`` (extractive: shared normalization over a
  question's passages, marginal likelihood over every gold span; Clark & Gardner 2018, the DPR reader)
  and ``answer_loss`` (FiD: teacher-forced answer cross-entropy, the decoder reading all passages);
- ``relevance_loss``: the DPR reader's passage selection, a softmax over each question's passages;
- ``distillation_loss`` (split stage): MSE to the unsplit teacher's passage states on the tokens the
  query attends to most; ``span_distillation_loss``: KL to the teacher's span distributions;
- ``recovery_loss`` (bits stage): the bits' linear map back to the continuous h_k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import NO_MERGE
from .extractive import ExtractiveReader
from .fid import FiDReader
from .merge import Tokens
from .supervision import Target


def span_loss(reader: ExtractiveReader, batch, chosen: Sequence[Target], pairs: Tokens, mode: str) -> torch.Tensor:
    """Shared normalization over each question's passages, marginal likelihood over its gold spans:
    -log of the summed start probability of every gold start, the same for the ends, averaged."""
    start, end = reader.span_logits(batch, mode, pairs)
    width = batch.passage_width
    start, end = (x.reshape(len(chosen), batch.per_query * width).log_softmax(-1) for x in (start, end))
    firsts = gold_mask(start.shape, [[p * width + s for p, s, _ in t.spans] for t in chosen], start.device)
    lasts = gold_mask(end.shape, [[p * width + e for p, _, e in t.spans] for t in chosen], end.device)
    gold = start.masked_fill(~firsts, float("-inf")).logsumexp(-1) + end.masked_fill(~lasts, float("-inf")).logsumexp(-1)
    return -gold.mean() / 2


def gold_mask(shape: torch.Size, rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """[B, N] bool, True at each row's listed positions: built on the host, sent in one copy (indexing
    the device's logits row by row cost a thousand host-device copies a step at batch 64)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, positions in enumerate(rows):
        mask[row, list(positions)] = True
    return mask.to(device, non_blocking=True)


def relevance_loss(reader: ExtractiveReader, batch, chosen: Sequence[Target], pairs: Tokens) -> torch.Tensor:
    """Passage selection (the DPR reader's): softmax over each question's passages, -log of the summed
    probability of the passages that hold a gold span."""
    logits = reader.relevance_logits(batch, pairs).float().log_softmax(-1)
    positive = gold_mask(logits.shape, [[p for p, _, _ in target.spans] for target in chosen], logits.device)
    return -logits.masked_fill(~positive, float("-inf")).logsumexp(-1).mean()


def distillation_loss(student: Tokens, teacher: Tokens, attention: torch.Tensor, width: int, share: float = 0.5):
    """MSE to the teacher's passage states on the top ``share`` of each passage's tokens by query attention."""
    query_width = teacher.hidden.shape[1] - width
    query_rows = teacher.size[:, :query_width, None]  # real query tokens only
    received = (attention[:, :query_width, query_width:] * query_rows).sum(1)  # [B*n, width]
    real = teacher.size[:, query_width:] > 0
    received = received.masked_fill(~real, float("-inf"))
    # Each row's top ceil(share x its real tokens), at least one: ranks by received attention, kept
    # below the row's quota (one sort for the batch, not a topk per row).
    quota = (real.sum(1, keepdim=True) * share).ceil().clamp_min(1)
    order = received.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    keep = (rank < quota) & real
    error = (student.hidden[:, -width:].float() - teacher.hidden[:, -width:].float()).pow(2).mean(-1)
    return error[keep].mean()


def span_distillation_loss(student: ExtractiveReader, teacher: ExtractiveReader, batch, pairs: Tokens, taught: Tokens) -> torch.Tensor:
    """KL(teacher || student) of each question's start and of its end distribution, normalized over all
    its passages as the task loss is: the split reader is taught where the unsplit one reads its
    answer, not only the states it reads it from. Averaged over questions and the two ends."""
    width, n = batch.passage_width, batch.per_query
    losses = []
    with torch.no_grad():
        targets = teacher.span_logits(batch, "baseline", taught)
    for mine, theirs in zip(student.span_logits(batch, "split", pairs), targets):
        # Positions where no answer may start or end are -inf in both: a finite floor keeps 0 x inf out.
        mine, theirs = (x.float().clamp_min(-1e4).reshape(-1, n * width).log_softmax(-1) for x in (mine, theirs))
        losses.append(torch.nn.functional.kl_div(mine, theirs, log_target=True, reduction="batchmean"))
    return sum(losses) / 2


def answer_loss(reader: FiDReader, batch, chosen: Sequence[Target], pairs: Tokens, mode: str) -> torch.Tensor:
    """FiD's task loss: teacher-forced cross-entropy of the first gold answer, the decoder reading
    every passage of its question at once (no runtime merging while training)."""
    labels = reader.answer_labels([t.example.answers[0] for t in chosen])
    return reader.loss(pairs.flatten_groups(batch.per_query), labels, NO_MERGE)


TASK_LOSSES: dict[type, Callable[..., torch.Tensor]] = {ExtractiveReader: span_loss, FiDReader: answer_loss}


def recovery_loss(projection: torch.nn.Linear, signs: torch.Tensor, states: Tokens, calibration: str = "mean_abs"):
    """MSE (averaged over d) between W b + c and the continuous h_k, on real passage tokens.

    Under ``rms`` calibration (T5) the target is h_k over its token RMS: pre-norm residuals reach
    hundreds in pretrained T5, which would drown the task loss, and the scale is stored anyway.
    """
    real = states.size > 0
    recovered = projection(signs.float())
    target = states.hidden.detach().float()
    if calibration == "rms":
        target = target / target.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    return (recovered - target).pow(2).mean(-1)[real].mean()
