"""FiD over T5: the split against the unsplit library model, bits, merging, gradients."""

import torch
from transformers.modeling_outputs import BaseModelOutput

from reader.config import NO_MERGE, BTRConfig, RuntimeMerge
from storage.bits import BinaryTokens
from tests.conftest import PASSAGES, QUESTIONS

DECODER_IDS = torch.tensor([[0, 2023, 2003, 1037], [0, 3000, 2003, 102]])


def test_split_at_zero_equals_unsplit_library_forward(make_fid):
    reader = make_fid(BTRConfig(split_layer=0))
    with torch.no_grad():
        split = reader.encode(QUESTIONS, PASSAGES, "split", NO_MERGE)
        base = reader.encode(QUESTIONS, PASSAGES, "baseline", NO_MERGE)
        split_logits = reader.decoder_logits(split, DECODER_IDS, NO_MERGE)
        base_logits = reader.decoder_logits(base, DECODER_IDS, NO_MERGE)
        # The library's own FiD forward over the baseline memory.
        hf_logits = reader.model(
            encoder_outputs=(base.hidden,), attention_mask=base.size.bool(), decoder_input_ids=DECODER_IDS
        ).logits
    assert torch.allclose(split_logits, base_logits, atol=1e-5)
    assert torch.allclose(base_logits, hf_logits, atol=1e-6)


def test_split_above_zero_differs_from_unsplit(make_fid):
    reader = make_fid(BTRConfig(split_layer=2))
    with torch.no_grad():
        split = reader.decoder_logits(reader.encode(QUESTIONS, PASSAGES, "split", NO_MERGE), DECODER_IDS, NO_MERGE)
        base = reader.decoder_logits(reader.encode(QUESTIONS, PASSAGES, "baseline", NO_MERGE), DECODER_IDS, NO_MERGE)
    assert not torch.allclose(split, base, atol=1e-4)


def test_cached_greedy_decoding_matches_library_generate(make_fid):
    reader = make_fid()
    with torch.no_grad():
        memory = reader.encode(QUESTIONS, PASSAGES, "baseline")
        ours = reader.generate(memory, NO_MERGE, max_new_tokens=6, stop_at_eos=False)
        theirs = reader.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory.hidden),
            attention_mask=memory.size.long(), max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1,
        )
    assert torch.equal(ours, theirs[:, 1:])


def test_default_split_is_three_quarters_of_the_encoder(make_fid):
    assert make_fid().split_layer == 3  # 4 layers


def test_stored_bits_give_the_same_memory_as_bits_computed_in_graph(make_fid):
    reader = make_fid(BTRConfig(split_layer=2))
    stored = [reader.encode_passages(group) for group in PASSAGES]
    assert all(isinstance(r, BinaryTokens) and r.split_layer == 2 for g in stored for r in g)
    with torch.no_grad():
        from_text = reader.encode(QUESTIONS, PASSAGES, "btr", NO_MERGE)
        from_bits = reader.encode(QUESTIONS, stored, "btr", NO_MERGE)
        split = reader.encode(QUESTIONS, PASSAGES, "split", NO_MERGE)
    real = from_bits.size > 0  # padding rows are masked and hold anything
    assert torch.equal(real, from_text.size > 0)
    assert torch.allclose(from_text.hidden[real], from_bits.hidden[real], atol=1e-2)  # fp16 scales
    assert not torch.allclose(from_bits.hidden[real], split.hidden[real], atol=1e-2)  # bits are lossy


def test_baseline_and_split_read_the_stored_token_ids(make_fid):
    reader = make_fid(BTRConfig(split_layer=2))
    stored = [reader.encode_passages(group) for group in PASSAGES]
    with torch.no_grad():
        for mode in ("baseline", "split"):
            a = reader.encode(QUESTIONS, PASSAGES, mode, NO_MERGE)
            b = reader.encode(QUESTIONS, stored, mode, NO_MERGE)
            assert torch.equal(a.size, b.size)
            assert torch.allclose(a.hidden[a.size > 0], b.hidden[b.size > 0], atol=1e-6)


def test_merge_ratio_zero_reproduces_the_unmerged_result_exactly(make_fid):
    reader = make_fid(BTRConfig(split_layer=2))
    stored = [reader.encode_passages(group) for group in PASSAGES]
    zero = RuntimeMerge(encoder_ratio=0.0, decoder_ratio=0.0)
    with torch.no_grad():
        a = reader.decoder_logits(reader.encode(QUESTIONS, stored, "btr", zero), DECODER_IDS, zero)
        b = reader.decoder_logits(reader.encode(QUESTIONS, stored, "btr", NO_MERGE), DECODER_IDS, NO_MERGE)
    assert torch.equal(a, b)


def test_runtime_merging_shrinks_encoder_and_decoder_memories(make_fid):
    reader = make_fid(BTRConfig(split_layer=2))
    merge = RuntimeMerge(encoder_ratio=0.2, decoder_ratio=0.2, decoder_skip=3)
    with torch.no_grad():
        full = reader.encode(QUESTIONS, PASSAGES, "btr", NO_MERGE)
        merged = reader.encode(QUESTIONS, PASSAGES, "btr", merge)
        memories = reader.decoder_memories(merged, merge)
    per_pair = full.hidden.shape[1] // 3
    after_two_layers = per_pair - int(0.2 * per_pair)
    after_two_layers -= int(0.2 * after_two_layers)
    assert merged.hidden.shape[1] == 3 * after_two_layers
    # Sizes still account for every real token.
    assert torch.allclose(merged.size.sum(1), full.size.sum(1))
    # Decoder layers 1 and 2 merge, layer 3 (the g-th) does not.
    lengths = [len(m) for m in memories]
    assert lengths[0] < len(merged) and lengths[1] < lengths[0] and lengths[2] == lengths[1]
    with torch.no_grad():
        logits = reader.decoder_logits(merged, DECODER_IDS, merge)
    assert torch.isfinite(logits).all()


def test_btr_answers_are_strings_for_every_question(make_fid):
    reader = make_fid(BTRConfig(split_layer=2))
    stored = [reader.encode_passages(group) for group in PASSAGES]
    answers = reader.answer(QUESTIONS, stored, "btr", max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_gradients_flow_through_the_bits_into_the_lower_layers(make_fid, tokenizer):
    reader = make_fid(BTRConfig(split_layer=2)).train()
    labels = torch.tensor([[2520, 8101, 102], [3000, 102, -100]])
    memory = reader.encode(QUESTIONS, PASSAGES, "btr", NO_MERGE)
    reader.loss(memory, labels, NO_MERGE).backward()
    # Layer 1 sees the passages only through the bits, and the questions directly; compare a token
    # that occurs in passages alone: its embedding row gets gradient only through the sign.
    passage_only = tokenizer.convert_tokens_to_ids("tragedy")
    grad = reader.model.shared.weight.grad[passage_only]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    block_grad = reader.model.encoder.block[0].layer[0].SelfAttention.q.weight.grad
    assert torch.isfinite(block_grad).all() and block_grad.abs().sum() > 0


def test_bf16_reader_runs_every_mode(make_fid):
    """The GPU path runs bf16; dtypes must hold through bits, merging and the cached decoder."""
    reader = make_fid(BTRConfig(split_layer=2)).to(torch.bfloat16)
    stored = [reader.encode_passages(group) for group in PASSAGES]
    assert stored[0][0].scale.dtype == torch.float16
    for mode, passages in (("baseline", PASSAGES), ("split", PASSAGES), ("btr", stored)):
        memory = reader.encode(QUESTIONS, passages, mode)
        assert memory.hidden.dtype == torch.bfloat16
        assert reader.generate(memory, reader.config.merge_for(mode), max_new_tokens=3).shape[0] == 2
