"""The whole-name rule: an extracted span widened to the name it stops inside, judged against hand-read passages."""

from __future__ import annotations

import pytest

from reader.spans import whole_name

DEMO = ("title: 2001: A Space Odyssey context: 2001: A Space Odyssey is a 1968 epic science fiction film "
        "produced and directed by Stanley Kubrick, who co-wrote the screenplay with Arthur C. Clarke.")


def widened(text: str, piece: str, occurrence: int = 0) -> str:
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(piece, start + 1)
    first, last = whole_name(text, start, start + len(piece))
    return text[first:last]


@pytest.mark.parametrize(
    "text, piece, expected",
    [
        (DEMO, "Kubrick", "Stanley Kubrick"),  # the demo's own question: the comma ends the name
        (DEMO, "Stanley", "Stanley Kubrick"),
        (DEMO, "Clarke", "Arthur C. Clarke"),  # an initial's dot does not end a name
        (DEMO, "Kub", "Stanley Kubrick"),  # a word piece short of its word, then the name
        (DEMO, "science fiction", "science fiction"),  # lower case: not a name, left alone
        ("title: Louis Philippe I context: Louis Philippe I was King of the French.", "Louis", "Louis Philippe I"),
        ("Charles I of England was king.", "Charles", "Charles I"),  # "of" ends it
        ("It was built in the United States. Kubrick filmed it there.", "Kubrick", "Kubrick"),  # a sentence's end
        ("It was built in the United States. Kubrick filmed it there.", "United", "United States"),
        ("The Beatles were a band.", "Beatles", "Beatles"),  # a sentence's "The" is no part of a name
        ("In Paris the river is wide.", "Paris", "Paris"),
        ("a film (Stanley Kubrick) made", "Kubrick", "Kubrick"),  # punctuation between words breaks the name
        ("George W. Bush was president.", "Bush", "George W. Bush"),
        ("George W. Bush was president.", "George", "George W. Bush"),
        ("He met her in 1968.", "1968", "1968"),  # numbers are no names
        ("the hadron collider", "ron", "hadron"),  # inside a word: to the whole word, no further
    ],
)
def test_a_span_is_widened_to_the_whole_name_and_no_further(text, piece, expected):
    assert widened(text, piece) == expected


def test_the_widened_span_always_holds_the_reader_span_and_whole_words():
    text = DEMO + " Clarke was born in Minehead, Somerset, England."
    for start in range(len(text)):
        for end in range(start + 1, min(len(text), start + 30) + 1):
            first, last = whole_name(text, start, end)
            assert first <= start and end <= last
            if text[start:end].strip():  # no word is cut at either end
                assert first == 0 or not (text[first - 1].isalnum() and text[first].isalnum())
                assert last == len(text) or not (text[last - 1].isalnum() and text[last].isalnum())
    assert whole_name(text, 10, 10) == (10, 10) and whole_name(text, 6, 7) == (6, 7)  # empty, or a space: as is
