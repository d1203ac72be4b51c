"""Question-word match and passage relevance (reader.heads): where they enter, what they learn, how they load."""

from __future__ import annotations

import json

import pytest
import torch

from reader.config import BTRConfig
from reader.heads import HEADS_FILE, QuestionMatch, ReaderHeads
from reader.load import ReaderSpec, load_reader
from reader.supervision import Example, shares_question_word, targets
from reader.losses import relevance_loss
from reader.train import Stage, save_checkpoint, stage_losses, train_stage
from storage.record import Passage
from tests.conftest import PASSAGES, QUESTIONS


def with_heads(reader, seed: int = 3):
    """The reader with heads whose match vector and relevance head are not zero (as after training)."""
    heads = ReaderHeads(reader.hidden_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        heads.match.copy_(torch.randn(reader.hidden_size, generator=generator))
        heads.relevance.weight.copy_(torch.randn(1, reader.hidden_size, generator=generator))
    reader.attach_heads(heads)
    return reader


def test_match_marks_whole_content_words_of_the_question(tokenizer):
    match = QuestionMatch(tokenizer)
    question = tokenizer("question: who met harker in the castle?")["input_ids"]
    passage = tokenizer("title: Harker context: Jonathan Harker meets Dracula in a castle; the harkers "
                        "question who met him", add_special_tokens=False)["input_ids"]
    flags = match.flags(question, [passage], len(passage))[0]
    marked = [tokenizer.convert_ids_to_tokens(i) for i, f in zip(passage, flags.tolist()) if f]
    pieces = tokenizer.tokenize("harker")
    assert len(pieces) == 3  # a word of several pieces matches as a whole
    # harker (title and text), castle, met; never "the", "in", "who" (stopwords) nor "question" (template),
    # and not "harkers", which shares its first pieces with "harker" but is another word
    assert marked == pieces * 2 + ["castle", "met"]


def test_split_at_zero_with_heads_equals_the_library_forward_with_the_match_vector(make_extractive):
    """The baseline adds the match vector by a hook at layer k; split mode adds it to the lower states.
    At k = 0 both must give the same logits: the hook puts the vector where the split puts it."""
    reader = with_heads(make_extractive(BTRConfig(split_layer=0)))
    batch = reader.prepare(QUESTIONS, PASSAGES)
    with torch.no_grad():
        split = torch.stack(reader.span_logits(batch, "split"))
        base = torch.stack(reader.span_logits(batch, "baseline"))
        plain = torch.stack(make_extractive(BTRConfig(split_layer=0)).span_logits(batch, "baseline"))
    real = torch.isfinite(base)
    assert torch.allclose(split[real], base[real], atol=1e-5)
    assert not torch.allclose(base[real], plain[real], atol=1e-3)  # the vector did change the output


def test_match_vector_changes_only_passages_that_share_a_question_word(make_extractive):
    reader = with_heads(make_extractive(BTRConfig(split_layer=2)))
    unrelated = [[Passage("Lyon", "Lyon is a city.")], [Passage("Hamlet", "Hamlet is a play.")]]
    questions = ["who built the globe?", "who wrote hamlet?"]
    batch = reader.prepare(questions, unrelated)
    flags = reader.match_flags(batch, batch.passage_width)
    assert flags[0].sum() == 0 and flags[1].sum() == 2  # "hamlet" in the title and in the text
    with torch.no_grad():
        states = reader.passage_states(batch, "split")
        moved = reader._at_split(batch, states)
    assert torch.equal(moved.hidden[0], states.hidden[0])
    assert torch.allclose(moved.hidden[1] - states.hidden[1], flags[1][:, None] * reader.heads.match)


def test_relevance_weight_moves_the_answer_to_the_passage_the_head_prefers(make_extractive):
    reader = with_heads(make_extractive(BTRConfig(split_layer=2)))
    batch = reader.prepare(QUESTIONS, PASSAGES, [[0.9, 0.5, 0.1], [0.1, 0.5, 0.9]])
    with torch.no_grad():
        pairs = reader.encode_pairs(batch, "split")
        relevance = reader.relevance_logits(batch, pairs)
        reader.relevance_weight = 1000.0
        by_relevance = reader.read_out(batch, pairs, "split")
        reader.relevance_weight, reader.retrieval_weight = 0.0, 1000.0
        by_retrieval = reader.read_out(batch, pairs, "split")
    assert [s.passage for s in by_relevance] == relevance.argmax(-1).tolist()
    assert [s.passage for s in by_retrieval] == [0, 2]


def test_relevance_loss_is_minus_log_of_the_positives_share(make_extractive):
    reader = with_heads(make_extractive(BTRConfig(split_layer=2, max_passage_tokens=64)))
    example = Example("who wrote hamlet?", ("William Shakespeare",), tuple(PASSAGES[0]), 1)
    [target], _ = targets(reader, [example], 3)
    batch = reader.prepare([example.question], [target.passages])
    pairs = reader.encode_pairs(batch, "split")
    width = batch.passage_width  # a passage's score: logsumexp over its own tokens of the head's token scores
    logits = torch.stack([reader.heads.relevance(pairs.hidden[i, -width:][: len(ids)]).logsumexp(0)[0]
                          for i, ids in enumerate(batch.passage_ids)])
    expected = -(logits[0].exp() / logits.exp().sum()).log()
    assert torch.allclose(relevance_loss(reader, batch, [target], pairs), expected, atol=1e-5)
    assert set(stage_losses(reader, Stage("plain"), [target])) == {"task", "relevance", "loss"}


def test_a_positive_must_share_a_question_word():
    assert shares_question_word("who wrote hamlet?", Passage("Hamlet", "A tragedy by William Shakespeare."))
    assert not shares_question_word("who wrote hamlet?", Passage("William Shakespeare", "An English playwright."))


def test_heads_are_trained_saved_and_loaded_with_the_answer_rule(make_extractive, tmp_path):
    reader = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=64)).train()
    example = Example("who wrote hamlet?", ("William Shakespeare",), tuple(PASSAGES[0]), 1)
    data, _ = targets(reader, [example], 3)
    train_stage(reader, Stage("plain", steps=3, batch_size=1, learning_rate=1e-2, heads=True), data, tmp_path / "plain",
                log=lambda _: None)
    assert reader.heads is not None and reader.heads.match.abs().sum() > 0  # created and trained
    assert (tmp_path / "plain" / HEADS_FILE).exists()
    reader.relevance_weight, reader.retrieval_weight = 0.5, 7.0
    save_checkpoint(reader, tmp_path / "saved", {"chain": "plain"})
    assert json.loads((tmp_path / "saved" / "btr.json").read_text())["answer"] == {
        "relevance_weight": 0.5, "retrieval_weight": 7.0}
    loaded = load_reader(ReaderSpec(checkpoint=str(tmp_path / "saved"), max_passage_tokens=64))
    assert (loaded.relevance_weight, loaded.retrieval_weight) == (0.5, 7.0)
    assert torch.equal(loaded.heads.match, reader.heads.match.detach())
    assert loaded.identity().weights_digest == reader.eval().identity().weights_digest
    without = load_reader(ReaderSpec(checkpoint=str(tmp_path / "saved"), max_passage_tokens=64))
    without.attach_heads(None)
    assert without.identity().weights_digest != loaded.identity().weights_digest


def test_an_unknown_answer_setting_is_refused(make_extractive, tmp_path):
    save_checkpoint(make_extractive(BTRConfig(split_layer=2)), tmp_path, {"chain": "plain"})
    settings = json.loads((tmp_path / "btr.json").read_text())
    settings["answer"]["retrieval_wieght"] = 3.0
    (tmp_path / "btr.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="unknown answer setting 'retrieval_wieght'"):
        load_reader(ReaderSpec(checkpoint=str(tmp_path)))


def test_question_word_filter_drops_a_positive_that_shares_nothing_with_the_question(make_extractive):
    reader = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=64))
    unrelated = Passage("William Shakespeare", "William Shakespeare was an English playwright.")
    example = Example("who wrote hamlet?", ("William Shakespeare",), (unrelated, *PASSAGES[0]), 2)
    [kept], _ = targets(reader, [example], 3)
    assert kept.passages[0] is unrelated  # by default every passage holding the answer is a positive
    [kept], _ = targets(reader, [example], 3, max_positives=1, question_word=True)
    assert kept.passages[0].title == "Hamlet" and unrelated not in kept.passages


def test_the_answer_rule_is_written_into_a_chains_stages_and_nowhere_else(make_extractive, tmp_path):
    from flows.tune_answer import write_rule

    reader = make_extractive(BTRConfig(split_layer=2))
    for name in ("plain", "plain+plain", "plain+split", "plain+split+bits", "someone-elses-model"):
        save_checkpoint(reader, tmp_path / "chain" / name, {"chain": name})
    rule = {"relevance_weight": 0.0, "retrieval_weight": 80.0}
    written = write_rule(tmp_path / "chain" / "plain+split+bits", rule)
    assert sorted(p.parent.name for p in written) == ["plain", "plain+plain", "plain+split", "plain+split+bits"]
    other = json.loads((tmp_path / "chain" / "someone-elses-model" / "btr.json").read_text())
    assert other["answer"]["retrieval_weight"] == 0.0
    assert [p.parent.name for p in write_rule(tmp_path / "chain" / "someone-elses-model", rule)] == ["someone-elses-model"]
    with pytest.raises(FileNotFoundError, match="no btr.json"):
        write_rule(tmp_path, rule)
