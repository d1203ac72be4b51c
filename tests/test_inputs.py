"""Bad input: clear errors, truncation by rule, mismatched bits."""

import pytest

from reader.config import BTRConfig, RuntimeMerge
from reader.inputs import ReaderInputError
from storage.bits import IncompatibleRepresentation
from storage.record import Passage
from tests.conftest import PASSAGES, QUESTIONS

LONG = Passage("Long", " ".join(f"word{i}" for i in range(2000)), "long")


@pytest.mark.parametrize("family", ["make_fid", "make_extractive"])
def test_long_passages_are_truncated_keeping_the_end_token(family, request):
    reader = request.getfixturevalue(family)(BTRConfig(max_passage_tokens=50))
    ids = reader.passage_ids(LONG)
    assert len(ids) == 50 and ids[-1] == reader.layout.passage_suffix[-1]
    # The rule keeps the head: the first tokens are those of the untruncated text.
    head = reader.tokenizer("title: Long context: word0 word1", add_special_tokens=False)["input_ids"]
    assert ids[: len(head)] == head
    [record] = reader.encode_passages([LONG])
    assert len(record) == 50


@pytest.mark.parametrize("family", ["make_fid", "make_extractive"])
@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_passages_are_rejected_by_name(family, text, request):
    reader = request.getfixturevalue(family)()
    with pytest.raises(ReaderInputError, match="passage 'p9' .*has no text"):
        reader.encode_passages([Passage("Empty", text, "p9")])


@pytest.mark.parametrize("family", ["make_fid", "make_extractive"])
def test_question_errors(family, request):
    reader = request.getfixturevalue(family)(BTRConfig(max_query_tokens=12))
    with pytest.raises(ReaderInputError, match="empty"):
        reader.prepare(["  "], PASSAGES[:1])
    long = "why " * 30
    batch = reader.prepare([long], PASSAGES[:1])  # a long question is cut to the limit, not refused
    ids, suffix = batch.query_ids[0], list(reader.layout.query_suffix)
    assert len(ids) == 12 and ids[len(ids) - len(suffix) :] == suffix
    assert reader.question_overflow(long) > 0 and reader.question_overflow(QUESTIONS[0]) == 0
    assert batch.query_ids[0][:-1] == reader.question_ids(long)[:-1]
    with pytest.raises(ReaderInputError, match="list of strings"):
        reader.prepare(QUESTIONS[0], PASSAGES[:1])
    with pytest.raises(ReaderInputError, match="same, non-zero number"):
        reader.prepare(QUESTIONS, [PASSAGES[0], PASSAGES[1][:2]])


@pytest.mark.parametrize("family", ["make_fid", "make_extractive"])
def test_bits_from_another_split_layer_are_refused(family, request):
    make = request.getfixturevalue(family)
    stored = [make(BTRConfig(split_layer=2)).encode_passages(g) for g in PASSAGES]
    reader = make(BTRConfig(split_layer=3))
    with pytest.raises(IncompatibleRepresentation, match="k=2.*k=3"):
        reader.encode_pairs(reader.prepare(QUESTIONS, stored), "btr")


def test_bits_from_another_hidden_size_are_refused(make_fid):
    stored = [make_fid(BTRConfig(split_layer=2)).encode_passages(g) for g in PASSAGES]
    wider = make_fid(BTRConfig(split_layer=2), d_model=48)
    with pytest.raises(IncompatibleRepresentation, match="hidden size 32.*hidden size 48"):
        wider.encode(QUESTIONS, stored, "btr")


def test_settings_are_validated(make_fid):
    with pytest.raises(ValueError, match="outside 0..4"):
        make_fid(BTRConfig(split_layer=5))
    with pytest.raises(ValueError, match="encoder_ratio"):
        RuntimeMerge(encoder_ratio=1.0)
    with pytest.raises(ValueError, match="unknown mode"):
        make_fid().encode(QUESTIONS, PASSAGES, "fast")


@pytest.mark.parametrize("family", ["make_fid", "make_extractive"])
def test_passages_tokenized_together_get_the_ids_each_gets_alone(family, request):
    from reader.inputs import encode_passages, passage_string

    reader = request.getfixturevalue(family)(BTRConfig(max_passage_tokens=50))
    passages = [*PASSAGES[0], LONG]
    together = encode_passages(reader.tokenizer, reader.layout, passages, 50)
    room = 50 - len(reader.layout.passage_suffix)
    for p, ids in zip(passages, together):  # one tokenizer call per passage, as before batching
        alone = reader.tokenizer(passage_string(p), add_special_tokens=False, truncation=True, max_length=room)
        assert ids == [*alone["input_ids"], *reader.layout.passage_suffix]
    with pytest.raises(ReaderInputError, match="has no text"):
        encode_passages(reader.tokenizer, reader.layout, [PASSAGES[0][0], Passage("Empty", " ", "e")], 50)
