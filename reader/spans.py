"""An extracted answer widened to the whole name it stops inside ("Kubrick" -> "Stanley Kubrick").

The extractive reader picks a span of word pieces; its text is a slice of the passage string. A
span may stop inside a word (a word piece short of it) or inside a capitalized name whose other
words scored lower ("Kubrick" held 67% of the demo question's pool, "Stanley Kubrick" 9%).
``whole_name`` moves the span's ends outward, first to whole words, then over the neighbouring
capitalized words of the name, never over the template's words (``title:``, ``context:``, both
lower case), punctuation, or the capitalized words that start sentences (``The``, ``In``, ``He``).
It runs on the answer's character offsets, after the reader chose the span; docs/accuracy.md has
its effect on dev and test.
"""

from __future__ import annotations

import re

# Capitalized words that start sentences or join clauses: never part of the name beside them.
NOT_NAMES = frozenset(
    """a about according after against also although among an and another any are as at because
    before being between both but by can despite did do does during each either even every for
    from had has have he her here hers his how however if in instead into is it its many may
    more most much neither no nor not now of on once one or other others our over several she
    since so some such than that the their them then there these they this those though through
    thus to today under unlike until upon was we were what when where whereas which while who
    whom whose why with within without yet you your""".split()
)
_PIECE = re.compile(r"\S+")  # the passage's words, as whitespace separates them
_BARE = re.compile(r"[^\W_](?:[\w'’\-]*[^\W_])?")  # a word with no punctuation around it
_INITIALS = re.compile(r"(?:[A-Z]\.)+")  # "W." or "E.B.": an initial's dot does not end the name
_TRAILING = ",.;:!?)\"”’"  # punctuation that ends a name after its last word


def _is_name_word(word: str) -> bool:
    """A word a name may hold: bare and capitalized (or initials), and not a sentence's function word."""
    if _INITIALS.fullmatch(word):
        return True
    return bool(_BARE.fullmatch(word)) and word[0].isupper() and word.lower() not in NOT_NAMES


def whole_name(text: str, start: int, end: int) -> tuple[int, int]:
    """``text[start:end]`` widened to whole words, then to the whole capitalized name it lies in.

    Returns the new [start, end) offsets; an empty or whitespace span comes back unchanged.
    """
    if not text[start:end].strip():
        return start, end
    while start > 0 and text[start - 1].isalnum() and text[start].isalnum():
        start -= 1  # a word piece short of its word's start
    while end < len(text) and text[end].isalnum() and text[end - 1].isalnum():
        end += 1  # ... or of its end
    words = [(m.start(), m.end()) for m in _PIECE.finditer(text)]
    first = next(i for i, (_, e) in enumerate(words) if e > start)
    last = max(i for i, (b, _) in enumerate(words) if b < end)
    # Leftward: the span starts a word that is a name's, and the words before it are whole name words.
    if start == words[first][0] and _is_name_word(text[start:words[first][1]].rstrip(_TRAILING)):
        while first > 0 and _is_name_word(text[slice(*words[first - 1])]):
            first -= 1
            start = words[first][0]
    # Rightward: the span ends a bare name word, and the next words are name words (their trailing
    # punctuation ends the name: "Stanley Kubrick," stops at the comma).
    if end == words[last][1] and _is_name_word(text[words[last][0]:end]):
        while last + 1 < len(words):
            b, e = words[last + 1]
            word = text[b:e]
            bare = word if _INITIALS.fullmatch(word) else word.rstrip(_TRAILING)
            if not _is_name_word(bare):
                break
            last, end = last + 1, b + len(bare)
            if bare != word:
                break
    return start, end


__all__ = ["NOT_NAMES", "whole_name"]
