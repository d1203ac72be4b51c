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
    check_passage(passage)
    return passage_string(passage)


def check_passage(passage: Passage) -> None:
    """ReaderInputError for a passage with no text (the one rule every path that tokenizes passages applies)."""
    if not passage.text or not passage.text.strip():
        label = f" {passage.id!r}" if passage.id else ""
        raise ReaderInputError(f"passage{label} (title {passage.title!r}) has no text")


def splits_words_alone(described: dict) -> bool:
    """Whether a ``tokenizers`` description (tokenizer.json) cuts text at whitespace and punctuation (BERT's
    pre-tokenizer) and then word-pieces each word alone (WordPiece): the tokens of a string are then those of
    its words, end to end."""
    return (described.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer" and described["model"]["type"] == "WordPiece"


class PassagePieces:
    """Titles and texts tokenized once, composed into both the reader's passage ids and the retriever's input ids.

    An indexing worker tokenized every passage twice: "title: T context: X" for the reader
    (``encode_passages``) and "T: X" for the retriever (``reader.encoder.Encoder``), 37% of its host side
    (issue 41). Where the tokenizer cuts words at whitespace and punctuation before its word pieces,
    one word at a time (BERT's WordPiece: ``exact_for``), the tokens of either string are those of its
    pieces end to end, so T and X are tokenized once and both id lists are composed from them, equal to
    the direct ones (``tests/test_worker_pipeline.py`` compares them over the whole bundled sample).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        before_title, after_title = PASSAGE_TEMPLATE.split("{title}")
        marks = [before_title.strip(), after_title.split("{text}")[0].strip(), ":"]  # "title:", "context:", ":"
        self.title_mark, self.text_mark, self.colon = tokenizer(marks, add_special_tokens=False)["input_ids"]

    @classmethod
    def shared_by(cls, reader_tokenizer, retriever_tokenizer) -> "PassagePieces | None":
        """Pieces for both models when they tokenize alike (the same normalizer, pre-tokenizer, vocabulary and
        special tokens) and composing is exact (``exact_for``); None otherwise."""
        if not (cls.exact_for(reader_tokenizer) and cls.exact_for(retriever_tokenizer)):
            return None
        parts = ("normalizer", "pre_tokenizer", "model")
        described = [json.loads(t.backend_tokenizer.to_str()) for t in (reader_tokenizer, retriever_tokenizer)]
        specials = [(t.cls_token_id, t.sep_token_id, t.pad_token_id) for t in (reader_tokenizer, retriever_tokenizer)]
        same = all(described[0].get(part) == described[1].get(part) for part in parts) and specials[0] == specials[1]
        return cls(reader_tokenizer) if same else None

    @staticmethod
    def exact_for(tokenizer) -> bool:
        """Whether composing pieces gives the direct tokenization (``splits_words_alone``): a fast tokenizer only."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        return backend is not None and splits_words_alone(json.loads(backend.to_str()))

    def split(self, passages: Sequence[Passage]) -> list[tuple[list[int], list[int]]]:
        """(title ids, text ids) of each passage, in one tokenizer call; ReaderInputError for a passage with no text."""
        for passage in passages:
            check_passage(passage)
        ids = self.tokenizer([p.title for p in passages] + [p.text for p in passages], add_special_tokens=False)["input_ids"]
        return list(zip(ids[: len(passages)], ids[len(passages) :]))

    def reader_ids(self, pieces: Sequence[tuple[list[int], list[int]]], layout: TokenLayout, max_tokens: int) -> list[list[int]]:
        """What ``encode_passages`` gives for the same passages."""
        room = _body_room(layout, max_tokens)
        return [[*(self.title_mark + title + self.text_mark + text)[:room], *layout.passage_suffix] for title, text in pieces]

    def retriever_ids(self, pieces: Sequence[tuple[list[int], list[int]]], max_tokens: int) -> list[list[int]]:
        """The ids the retriever's tokenizer gives "T: X" with its special tokens, cut to ``max_tokens``."""
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        return [[cls, *(title + self.colon + text)[: max_tokens - 2], sep] for title, text in pieces]


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
