"""Text to token ids: the query and passage layouts both reader families share, with their limits."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from storage.record import Passage


class ReaderInputError(ValueError):
    """A question or passage the reader cannot take: the message says which and why."""


QUERY_TEMPLATE = "question: {question}"
PASSAGE_TEMPLATE = "title: {title} context: {text}"

# A standard English function-word list (as in common stopword lists).
ENGLISH_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she should
    so some such than that the their theirs them themselves then there these they this those through to
    too under until up very was we were what when where which while who whom why will with would you
    your yours yourself yourselves also its""".split()
)


def stopword_ids(tokenizer) -> set[int]:
    """Token ids that carry no content: function words, punctuation, special and template tokens.

    The offline merge collapses them to their prototype; question-word matching ignores them.
    """
    template_words = PASSAGE_TEMPLATE.replace("{title}", " ").replace("{text}", " ")
    words = set(ENGLISH_STOPWORDS) | set(re.findall(r"\w+", template_words))
    ids = set(tokenizer.all_special_ids)
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:  # a word split into pieces has no single vector to collapse
            ids.add(pieces[0])
    for token, i in tokenizer.get_vocab().items():
        text = token.removeprefix("##").removeprefix("\u2581")
        if text and not any(ch.isalnum() for ch in text):
            ids.add(i)
    return ids


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


def clean_text(text: str) -> str:
    """The form every question and passage is read in: NFKC-normalized, outer whitespace stripped.

    NFKC folds compatibility forms onto the characters the tokenizers know: fullwidth letters
    ("ｗｈｏ" is "who"), ligatures, no-break and thin spaces, superscript digits.
    """
    return unicodedata.normalize("NFKC", text).strip()


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing to read: no letter and no digit once cleaned (``clean_text``).

    The one rule for questions and passages: whitespace, control and format characters (NUL,
    zero-width space), private-use characters, lone combining marks, punctuation, symbols and emoji
    alone are empty.
    """
    return not any(unicodedata.category(char)[0] in "LN" for char in clean_text(text))


def read_json(text: str) -> object:
    """``text`` parsed as JSON; a ValueError saying why not in a few words (for a line of a file: one reject, not a crash).

    Besides syntax, Python's parser refuses a number past 4,300 digits (a ValueError of its own) and
    nesting past its depth (RecursionError): each is one more reason, never a traceback.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg})") from None
    except ValueError as error:
        raise ValueError(f"not JSON this reads ({str(error).split(':')[0]})") from None
    except RecursionError:
        raise ValueError("not JSON this reads (nested too deeply)") from None


def encode_question(tokenizer, layout: TokenLayout, question: str, max_tokens: int) -> list[int]:
    """Token ids of a question, its tail cut so that it fits ``max_tokens`` (see ``question_overflow``)."""
    if not isinstance(question, str) or is_blank(question):
        raise ReaderInputError("the question is empty")
    body = tokenizer(QUERY_TEMPLATE.format(question=clean_text(question)), add_special_tokens=False)["input_ids"]
    room = max_tokens - len(layout.query_prefix) - len(layout.query_suffix)
    if room < 1:
        raise ReaderInputError(f"max question length {max_tokens} leaves no room for text")
    return [*layout.query_prefix, *body[:room], *layout.query_suffix]


def question_overflow(tokenizer, layout: TokenLayout, question: str, max_tokens: int) -> int:
    """How many of a question's tokens ``encode_question`` cuts off (0 when it fits)."""
    body = tokenizer(QUERY_TEMPLATE.format(question=clean_text(question)), add_special_tokens=False)["input_ids"]
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
