"""The answer rule's re-scoring (reader.answer_rule): counted by hand on cached logits, and the budget fit."""

from __future__ import annotations

import pytest

from reader.answer_rule import question_logits, score
from reader.config import BTRConfig
from reader.inputs import Passage
from reader.normalize import has_answer
from reader.train import Stage
from reader.train_chain import fit_to_budget


def test_recall_and_em_when_recalled_count_the_questions_whose_passages_hold_an_answer(make_extractive):
    reader = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=48))
    holds = [Passage("Tower", "the zzqx tower stands in paris", "a"), Passage("River", "a long river runs", "b")]
    lacks = [Passage("Hill", "a green hill stands", "c"), Passage("Lake", "the lake is deep and cold", "d")]
    records = [{"question": "where is the tower?", "answers": ["zzqx tower"]},   # its first passage holds it
               {"question": "what runs long?", "answers": ["glacier"]},          # none holds it
               {"question": "what stands green?", "answers": ["Green hill"]}]   # held, case and article aside
    groups = [holds, lacks, lacks]
    cached = [question_logits(reader, r, g, [0.5, 0.4], "btr") for r, g in zip(records, groups)]
    assert [c["recalled"] for c in cached] == [True, False, True]
    result = score(reader, cached, 0.0, 0.0)
    recalled_right = [e for e, c in zip(result["exact"], cached) if c["recalled"]].count("1")
    assert result["recall"] == pytest.approx(200 / 3, abs=0.01)
    assert result["em_when_recalled"] == 100 * recalled_right / 2
    assert sum(result["cited_rank"]) == 3 and len(result["exact"]) == 3
    with pytest.raises(TypeError, match="list of passage texts"):  # the mistake that once read recall 0
        has_answer("the zzqx tower stands in paris", ["zzqx tower"])


def test_the_reading_ceiling_lets_the_reader_cite_only_the_passages_that_hold_an_answer(make_extractive):
    """A passage whose every allowed token is the answer, among passages of other words: cited alone, it
    can only be read right, whatever the (random) weights; the rule over all passages misses it here."""
    reader = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=48))
    words = "river hill lake stone field bridge forest valley tower garden market harbour castle meadow"
    lacks = [Passage(f"Place {i}", " ".join(words.split()[i:] + words.split()[:i]), str(i)) for i in range(5)]
    holds = Passage("paris", "paris", "p")
    records = [{"question": "where is it?", "answers": ["Paris"]}, {"question": "where else?", "answers": ["Rome"]}]
    cached = [question_logits(reader, records[0], lacks + [holds], [0.0] * 6, "btr"),
              question_logits(reader, records[1], lacks + [holds], [0.0] * 6, "btr")]  # none holds "Rome"
    assert cached[0]["holds"] == [False] * 5 + [True] and not cached[1]["recalled"]
    result = score(reader, cached, 0.0, 0.0)
    assert result["em_when_recalled_reading_answer_passages"] == 100.0  # one recalled question, read right
    assert result["em_when_recalled"] == 0.0  # 70 other words to choose from: the random reader picks one


def test_a_chain_is_scaled_by_one_factor_to_fit_its_budget_with_the_control_beside_it():
    stages = [Stage("plain", steps=1000), Stage("split", steps=1000), Stage("bits", steps=500)]
    # at 0.1 s a plain step: plain 100 s + split 170 s + bits 60 s = 330 s; control beside: 100 + 200 = 300 s
    fitted, control, factor = fit_to_budget(stages, 0.1, 165.0, control_steps=2000)
    assert factor == pytest.approx(0.5) and [s.steps for s in fitted] == [500, 500, 250] and control == 1000
    _, _, factor = fit_to_budget(stages, 0.1, 165.0, control_steps=10_000)  # the control is now the longer
    assert factor == pytest.approx(165 / 1100)
    same, control, factor = fit_to_budget(stages, 0.1, 10_000.0, control_steps=2000)  # room to spare: as asked
    assert factor == 1.0 and [s.steps for s in same] == [1000, 1000, 500] and control == 2000
