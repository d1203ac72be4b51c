"""Text to token ids: the query and passage layouts both reader families share, with their limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class ReaderInputError(ValueError):
    """A question or passage the reader cannot take: the message says which and why."""


@dataclass(frozen=True)
class Passage:
    """A retrieved passage as text."""

    title: str
    text: str
    id: str = ""


QUERY_TEMPLATE = "question: {question}"
PASSAGE_TEMPLATE = "title: {title} context: {text}"


@dataclass(frozen=True)
class TokenLayout:
    """Special tokens around the query and after each passage, per model family."""

    query_prefix: tuple[int, ...]
    query_suffix: tuple[int, ...]
    passage_suffix: tuple[int, ...]
    pad_id: int


def passage_string(passage: Passage) -> str:
    """The text a passage is tokenized from (the extractive reader maps spans back into it)."""
    return PASSAGE_TEMPLATE.format(title=passage.title.strip(), text=passage.text.strip())


def encode_question(tokenizer, layout: TokenLayout, question: str, max_tokens: int) -> list[int]:
    """Token ids of a question, its tail cut so that it fits ``max_tokens`` (see ``question_overflow``)."""
    if not isinstance(question, str) or not question.strip():
        raise ReaderInputError("the question is empty")
    body = tokenizer(QUERY_TEMPLATE.format(question=question.strip()), add_special_tokens=False)["input_ids"]
    room = max_tokens - len(layout.query_prefix) - len(layout.query_suffix)
    if room < 1:
        raise ReaderInputError(f"max question length {max_tokens} leaves no room for text")
    return [*layout.query_prefix, *body[:room], *layout.query_suffix]


def question_overflow(tokenizer, layout: TokenLayout, question: str, max_tokens: int) -> int:
    """How many of a question's tokens ``encode_question`` cuts off (0 when it fits)."""
    body = tokenizer(QUERY_TEMPLATE.format(question=question.strip()), add_special_tokens=False)["input_ids"]
    return max(0, len(body) + len(layout.query_prefix) + len(layout.query_suffix) - max_tokens)


def tokenize_passage(tokenizer, layout: TokenLayout, passage: Passage, max_tokens: int, offsets: bool = False):
    """Tokenizer output for a passage, its body truncated so that body + suffix fits ``max_tokens``.

    The truncation rule: keep the first tokens, drop the tail, always end with the family's suffix.
    """
    return tokenizer(
        _checked_string(passage), add_special_tokens=False, truncation=True,
        max_length=_body_room(layout, max_tokens), return_offsets_mapping=offsets,
    )


def encode_passage(tokenizer, layout: TokenLayout, passage: Passage, max_tokens: int) -> list[int]:
    """Token ids of a passage under the truncation rule, suffix included."""
    return encode_passages(tokenizer, layout, [passage], max_tokens)[0]


def encode_passages(tokenizer, layout: TokenLayout, passages: Sequence[Passage], max_tokens: int) -> list[list[int]]:
    """Token ids of each passage, as ``encode_passage`` gives them, in one tokenizer call."""
    bodies = tokenizer(
        [_checked_string(p) for p in passages], add_special_tokens=False, truncation=True,
        max_length=_body_room(layout, max_tokens),
    )["input_ids"]
    return [[*body, *layout.passage_suffix] for body in bodies]


def _checked_string(passage: Passage) -> str:
    if not passage.text or not passage.text.strip():
        label = f" {passage.id!r}" if passage.id else ""
        raise ReaderInputError(f"passage{label} (title {passage.title!r}) has no text")
    return passage_string(passage)


def _body_room(layout: TokenLayout, max_tokens: int) -> int:
    room = max_tokens - len(layout.passage_suffix)
    if room < 1:
        raise ReaderInputError(f"max passage length {max_tokens} leaves no room for text")
    return room


def pad(sequences: list[list[int]] | list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, L] (long) and mask [N, L] (bool)."""
    if not sequences:
        raise ReaderInputError("no sequences to encode")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = True
    return ids, mask
