"""Extractive BERT reader: the split against the library forward, spans, bits, the real MiniLM."""

import copy

import pytest
import torch

from reader.assets import minilm_path
from reader.config import BTRConfig
from reader.extractive import ExtractiveReader, Span, most_probable_answer
from reader.inputs import pad
from storage.record import Passage
from tests.conftest import PASSAGES, QUESTIONS


def split_and_baseline_logits(reader):
    """Start and end logits [2, ...] of the split and the unsplit reader on real passage tokens."""
    batch = reader.prepare(QUESTIONS, PASSAGES)
    with torch.no_grad():
        split = torch.stack(reader.span_logits(batch, "split"))
        base = torch.stack(reader.span_logits(batch, "baseline"))
    real = torch.isfinite(base)
    assert torch.equal(real, torch.isfinite(split)) and real.sum() > 60
    return split[real], base[real]


def test_split_at_zero_equals_unsplit_library_forward(make_extractive):
    split, base = split_and_baseline_logits(make_extractive(BTRConfig(split_layer=0)))
    assert torch.allclose(split, base, atol=1e-5)


def test_split_above_zero_differs_from_unsplit(make_extractive):
    split, base = split_and_baseline_logits(make_extractive(BTRConfig(split_layer=2)))
    assert not torch.allclose(split, base, atol=1e-4)


def test_spans_are_valid_and_map_back_to_passage_text(make_extractive):
    reader = make_extractive(BTRConfig(split_layer=2))
    reader.max_answer_tokens = 5
    for span, group in zip(reader.extract(QUESTIONS, PASSAGES, "split"), PASSAGES):
        assert 0 <= span.passage < len(group)
        assert 0 <= span.start <= span.end < span.start + 5
        passage = group[span.passage]
        assert span.text and span.text in f"title: {passage.title} context: {passage.text}"


def test_stored_bits_and_in_graph_bits_pick_the_same_spans(make_extractive):
    reader = make_extractive(BTRConfig(split_layer=2))
    reader.pool = 1  # the single best span: compared position by position
    stored = [reader.encode_passages(group) for group in PASSAGES]
    assert stored[0][0].calibration == "mean_abs"
    from_text = reader.extract(QUESTIONS, PASSAGES, "btr")
    from_bits = reader.extract(QUESTIONS, stored, "btr")
    for a, b in zip(from_text, from_bits):
        assert (a.passage, a.start, a.end) == (b.passage, b.start, b.end)
        assert a.score == pytest.approx(b.score, abs=1e-2)
        assert b.text.replace(" ", "") in a.text.lower().replace(" ", "")


def test_gradients_flow_through_the_bits(make_extractive, tokenizer):
    reader = make_extractive(BTRConfig(split_layer=2)).train()
    batch = reader.prepare(QUESTIONS, PASSAGES)
    start, end = reader.span_logits(batch, "btr")
    target = torch.zeros(start.shape[0], dtype=torch.long)  # every passage: answer at token 0
    loss = torch.nn.functional.cross_entropy(start, target) + torch.nn.functional.cross_entropy(end, target)
    loss.backward()
    passage_only = tokenizer.convert_tokens_to_ids("tragedy")
    grad = reader.model.base_model.embeddings.word_embeddings.weight.grad[passage_only]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_answer_string_with_the_most_probability_wins():
    kubrick = Span(0, 4, 4, 2.0, "Kubrick")
    full = [Span(0, 3, 4, 1.8, "Stanley Kubrick"), Span(1, 0, 1, 1.7, "stanley Kubrick.")]
    # one span of "Kubrick" scores best, but two spans read "Stanley Kubrick" and hold more mass
    assert most_probable_answer([kubrick, *full]) == full[0]
    assert most_probable_answer([kubrick, full[0]]) == kubrick


def test_pool_sums_spans_of_the_same_answer_across_passages(make_extractive):
    reader = make_extractive(BTRConfig(split_layer=2))
    group = [Passage("A", "Lyon is small and Paris is big."), Passage("B", "Paris again.")]
    batch = reader.prepare(["which city?"], [group])
    width = batch.passage_width
    start, end = torch.full((2, width), float("-inf")), torch.full((2, width), float("-inf"))
    for passage, word, logit in ((0, "lyon", 3.0), (0, "paris", 2.8), (1, "paris", 2.7)):
        tokens = reader.tokenizer.convert_ids_to_tokens(batch.passage_ids[passage])
        start[passage, tokens.index(word)] = end[passage, tokens.index(word)] = logit
    reader.pool = 1
    assert reader.best_spans(batch, start, end)[0].text == "Lyon"  # e^6 against e^5.6
    reader.pool = 20
    best = reader.best_spans(batch, start, end)[0]  # e^5.6 + e^5.4 > e^6: cited by the better span
    assert (best.text, best.passage) == ("Paris", 0)
    with pytest.raises(ValueError, match="at least 1"):
        ExtractiveReader(reader.model, reader.tokenizer, pool=0)


def test_text_passages_are_tokenized_once_and_forgotten_least_recent_first(make_extractive, monkeypatch):
    import reader.split as split

    reader = make_extractive(BTRConfig(split_layer=2))
    calls = []
    real = split.encode_passages
    monkeypatch.setattr(split, "encode_passages", lambda *a: calls.append(len(a[2])) or real(*a))
    monkeypatch.setattr(split, "PASSAGE_CACHE", 6)
    first = reader.prepare(QUESTIONS, PASSAGES)
    again = reader.prepare(QUESTIONS, PASSAGES)
    assert again.passage_ids == first.passage_ids and calls == [sum(map(len, PASSAGES))]
    fresh = [[Passage("t", f"passage {g}.{i}") for i in range(len(PASSAGES[0]))] for g in range(len(PASSAGES))]
    reader.prepare(QUESTIONS, fresh)  # the cache keeps the last 6: the first batch's were dropped
    reader.prepare(QUESTIONS, PASSAGES)
    assert calls[-1] == sum(map(len, PASSAGES)) and len(reader._passage_tokens) == 6
    assert reader.prepare(QUESTIONS, PASSAGES).passage_ids == [reader.passage_ids(p) for g in PASSAGES for p in g]


def test_no_answer_holds_the_template_words(make_extractive):
    reader = make_extractive(BTRConfig(split_layer=2))
    group = [Passage("Martin Scorsese", "Martin Charles Scorsese is a film director."), Passage("Other", "text.")]
    batch = reader.prepare(["who directed the aviator?"], [group])
    template = reader.template_tokens(batch.passage_ids, batch.passage_width)
    tokens = reader.tokenizer.convert_ids_to_tokens(batch.passage_ids[0])
    assert [t for t, marked in zip(tokens, template[0]) if marked] == ["title", ":", "context", ":"]
    text_start = int(template[0].nonzero().max()) + 1
    assert tokens[text_start] == "martin" and tokens[text_start - 2] == "context"
    with torch.no_grad():
        start, end = reader.span_logits(batch, "split")
    assert torch.isinf(start[template]).all() and torch.isinf(end[template]).all()
    # The best-scoring pair runs from the title's "martin" to the text's "scorsese": not an answer.
    start, end = (torch.where(torch.isinf(x), x, torch.full_like(x, -5.0)) for x in (start, end))
    start[0, 2] = 4.0  # "martin" in the title
    end[0, len(tokens) - 1 - tokens[::-1].index("##ese")] = 4.0  # the text's "scorsese"
    end[0, tokens.index("##ese")] = 3.0  # the title's "scorsese"
    reader.pool = 1
    assert reader.best_spans(batch, start, end)[0].text == "Martin Scorsese"


def test_real_minilm_checkpoint_loads_and_splits_at_four_of_six():
    reader = ExtractiveReader.from_pretrained(str(minilm_path()), local_files_only=True)
    assert (reader.num_layers, reader.split_layer, reader.hidden_size) == (6, 4, 384)
    stored = reader.encode_passages(PASSAGES[0])
    assert stored[0].bits.shape[1] == 384 // 8
    spans = reader.extract(QUESTIONS[:1], [stored], "btr")
    assert spans[0].text


def test_position_budget_is_checked(make_extractive):
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        make_extractive(BTRConfig(max_query_tokens=300, max_passage_tokens=300))


BF16_SCORE_TOLERANCE = 0.01  # bf16 keeps 8 bits of mantissa (0.4% per rounding); these scores are about 0.1-0.4


def test_bf16_reader_extracts_the_fp32_readers_spans_from_bits(make_extractive):
    """Bits read in bf16 (an index written in fp32, or the bf16 reader's own): the fp32 reader's spans, scores
    within BF16_SCORE_TOLERANCE. Seed 0 of the tiny reader has no near tie between its best spans."""
    full = make_extractive(BTRConfig(split_layer=2))
    half = copy.deepcopy(full).to(torch.bfloat16)
    with torch.no_grad():
        stored = [full.encode_passages(group) for group in PASSAGES]
        reference = full.extract(QUESTIONS, stored, "btr")
        for bits in (stored, [half.encode_passages(group) for group in PASSAGES]):
            spans = half.extract(QUESTIONS, bits, "btr")
            assert [(s.passage, s.start, s.end, s.text) for s in spans] == [
                (s.passage, s.start, s.end, s.text) for s in reference]
            assert [s.score for s in spans] == pytest.approx([s.score for s in reference], abs=BF16_SCORE_TOLERANCE)


def test_upper_layers_by_length_match_one_padded_batch(make_extractive):
    reader = make_extractive(BTRConfig(split_layer=2))
    batch = reader.prepare(QUESTIONS, PASSAGES)  # passages of different lengths
    padded = reader.encode_pairs(batch, "split")  # gradients on (training): one padded batch
    with torch.no_grad():
        chunked = reader.encode_pairs(batch, "split")  # inference: chunks of similar length
        query = reader.lower(*pad(batch.query_ids, reader.layout.pad_id), segment="query")
        one_by_one = reader.upper_by_length(query, reader.passage_states(batch, "split"), batch.per_query, 1)
    real = padded.size > 0
    for other in (chunked, one_by_one):
        assert torch.equal(real, other.size > 0)
        assert torch.allclose(padded.hidden[real], other.hidden[real], atol=1e-5)
