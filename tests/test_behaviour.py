"""What the type-level checks stood for, checked as behaviour: bf16 close to fp32, FiD's btr answers
against the library's own decoding, the rms calibration through T5's own norm, and retrieval with the
real MiniLM encoder finding each question's own passage."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from reader.binary import binarize, restore
from reader.config import NO_MERGE, BTRConfig, RuntimeMerge
from tests.conftest import PASSAGES, QUESTIONS

MODES = ("baseline", "split", "btr")


def passages_for(reader, mode: str):
    """Text for baseline and split; for btr, the bits an fp32 reader stored (an index, read in bf16)."""
    return [reader.encode_passages(group) for group in PASSAGES] if mode == "btr" else PASSAGES


def test_bits_stored_by_a_bf16_reader_are_an_fp32_readers_but_for_near_zero_states(make_extractive, make_fid):
    for full in (make_extractive(BTRConfig(split_layer=2), hidden_size=64), make_fid(BTRConfig(split_layer=2))):
        half = copy.deepcopy(full).to(torch.bfloat16)
        for group in PASSAGES:
            ours, reference = half.encode_passages(group), full.encode_passages(group)
            for a, b in zip(ours, reference):
                signs = lambda t: np.unpackbits(t.bits.numpy(), axis=1)  # noqa: E731
                assert (signs(a) == signs(b)).mean() > 0.97
                assert torch.allclose(a.scale.float(), b.scale.float(), rtol=0.03)


def close(ours: torch.Tensor, reference: torch.Tensor, share: float) -> float:
    """Largest difference over finite entries, as a share of the reference's largest magnitude."""
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(ours))
    error = float((ours.float() - reference.float())[finite].abs().max() / reference[finite].abs().max())
    print(f"bf16 error {error:.4f} of the fp32 range")
    return error < share


@pytest.mark.parametrize("mode", MODES)
def test_bf16_extractive_span_logits_are_close_to_fp32(make_extractive, mode):
    full = make_extractive(BTRConfig(split_layer=2), hidden_size=64)
    half = copy.deepcopy(full).to(torch.bfloat16)
    with torch.no_grad():
        stored = passages_for(full, mode)
        logits = [r.span_logits(r.prepare(QUESTIONS, stored), mode) for r in (full, half)]
    for reference, ours in zip(*logits):  # start, end
        assert close(ours, reference, 0.05), mode


@pytest.mark.parametrize("mode", MODES)
def test_bf16_fid_memory_and_decoder_logits_are_close_to_fp32(make_fid, mode):
    full = make_fid(BTRConfig(split_layer=2))
    half = copy.deepcopy(full).to(torch.bfloat16)
    with torch.no_grad():
        stored = passages_for(full, mode)
        memories = [r.encode(QUESTIONS, stored, mode, NO_MERGE) for r in (full, half)]
        logits = [r.decoder_logits(m, torch.tensor([[0, 2023, 2003, 1037], [0, 3000, 2003, 102]]), NO_MERGE)
                  for r, m in zip((full, half), memories)]
    real = memories[0].size > 0
    assert close(memories[1].hidden[real], memories[0].hidden[real], 0.05)
    assert close(logits[1], logits[0], 0.05)


def test_fid_btr_answers_are_the_librarys_greedy_decoding_of_the_same_memory(make_fid):
    """``answer`` from stored bits against T5's own ``generate`` over the btr memory, decoded by the tokenizer."""
    reader = make_fid(BTRConfig(split_layer=2, merge=RuntimeMerge(encoder_ratio=0.0, decoder_ratio=0.0)))
    stored = [reader.encode_passages(group) for group in PASSAGES]
    answers = reader.answer(QUESTIONS, stored, "btr", max_new_tokens=5)
    with torch.no_grad():
        memory = reader.encode(QUESTIONS, stored, "btr", NO_MERGE)
        ids = reader.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory.hidden), attention_mask=memory.size.long(),
            max_new_tokens=5, do_sample=False, num_beams=1,
        )
    expected = [text.strip() for text in reader.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert answers == expected and all(answers)
    # The bits matter: the answer read from the split reader's continuous states is another memory.
    with torch.no_grad():
        split = reader.encode(QUESTIONS, PASSAGES, "split", NO_MERGE)
    assert not torch.allclose(split.hidden, memory.hidden, atol=1e-2)


def test_the_rms_scale_is_the_statistic_t5s_own_norm_divides_by_and_survives_the_bits(make_fid, tokenizer):
    """BTR's calibration, on real layer-k states: the stored scale is what block k's RMSNorm divides
    the state by, and the restored s * sign(h) gives the norm that same statistic back."""
    reader = make_fid(BTRConfig(split_layer=2))
    k = reader.split_layer
    norm = reader.model.encoder.block[k].layer[0].layer_norm  # T5LayerNorm, weight 1 at initialisation
    divisor = lambda x: x.norm(dim=-1) / norm(x).norm(dim=-1)  # sqrt(mean(x^2) + eps), as T5 computes it  # noqa: E731
    with torch.no_grad():
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        ids = tokenizer([p.text for group in PASSAGES for p in group], padding=True, return_tensors="pt")
        states = reader.model.encoder(**ids, output_hidden_states=True).hidden_states[k]  # block k's input
        states = states * torch.logspace(-1, 3, states.shape[1])[None, :, None]  # T5's residuals span decades
        signs, scale = binarize(states, "rms")
        assert torch.allclose(scale[..., 0], divisor(states), rtol=1e-4)
        assert torch.allclose(divisor(restore(signs, scale)), divisor(states), rtol=1e-4)
        signs, scale = binarize(states, "mean_abs")  # the other family's scale: not the norm's statistic
        assert not torch.allclose(divisor(restore(signs, scale)), divisor(states), rtol=1e-2)


def test_the_real_minilm_retriever_finds_each_questions_own_passage(tmp_path):
    from flows.qa_data import article_questions
    from reader.assets import wikipedia_sample
    from reader.retriever import Encoder, Retriever, build_faiss, passage_text

    passages = wikipedia_sample(80)
    asked = [(row, q.question) for row, p in enumerate(passages) for q in article_questions(p, 1)]
    assert len(asked) >= 40
    encoder = Encoder()  # the packaged all-MiniLM-L6-v2
    vectors = encoder.embed([passage_text(p) for p in passages])
    build_faiss([vectors], tmp_path, encoder.identity())
    hits = Retriever(tmp_path, encoder).search([q for _, q in asked], 5)
    # Exact search: each hit scores what brute-force cosine gives its row, and the five best scores are found.
    cosine = encoder.embed([q for _, q in asked]) @ vectors.T
    for found, scores in zip(hits, cosine):
        assert np.allclose([h.score for h in found], [scores[h.row] for h in found], atol=1e-5)
        assert np.allclose([h.score for h in found], np.sort(scores)[::-1][:5], atol=1e-5)
    first = sum(found[0].row == row for (row, _), found in zip(asked, hits)) / len(asked)
    top5 = sum(row in {h.row for h in found} for (row, _), found in zip(asked, hits)) / len(asked)
    print(f"own passage first for {first:.0%}, in the top 5 for {top5:.0%} of {len(asked)} questions")
    assert first >= 0.85 and top5 >= 0.95, (first, top5)
