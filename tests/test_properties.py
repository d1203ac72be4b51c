"""Property tests (hypothesis): the codec's lossless round trip over edge cases, and the SQuAD metrics
against the official evaluation script's normalisation, several gold answers each."""

from __future__ import annotations

import collections
import re
import string

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from reader.binary import to_binary_tokens
from reader.normalize import exact_match, f1_score
from storage.codec import Codec, CodecSettings

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPECIAL_FP16 = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, -65504.0, 6e-8, 6.1e-5, 1.0]  # max, subnormal, normal min


@st.composite
def passages(draw):
    """A codec fitted on random passages, and passages to code: 2- or 4-byte ids, rare and frequent tokens, any fp16."""
    vocab = draw(st.sampled_from([30, 70_000]))  # over 65,536 ids: stored as 4 bytes
    width = draw(st.sampled_from([1, 2, 8]))  # d = 8, 16, 64
    frequent = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=5))
    def one(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Mostly a few frequent tokens (their own prototype), some rare ones (the global prototype).
        ids = np.array(draw(st.lists(st.one_of(st.sampled_from(frequent), st.integers(0, vocab - 1)),
                                     min_size=n, max_size=n)), dtype=np.int64)
        bits = draw(arrays(np.uint8, (n, width)))
        # Any fp16 bit pattern (NaN payloads, subnormals), the special values among them.
        special = np.array(SPECIAL_FP16, np.float16).view(np.uint16)
        raw = draw(arrays(np.uint16, n, elements=st.one_of(st.sampled_from(special.tolist()), st.integers(0, 65535))))
        scale = raw.view(np.float16)
        return ids, bits, scale
    fitted = [one(draw(st.integers(1, 30))) for _ in range(draw(st.integers(1, 4)))]
    coded = [one(draw(st.integers(0, 30))) for _ in range(draw(st.integers(1, 3)))]
    return vocab, width, fitted, coded


@FAST
@given(passages())
def test_the_codec_gives_back_every_id_bit_and_scale_bit_for_bit(case):
    vocab, width, fitted, coded = case
    codec = Codec.fit([(ids, bits) for ids, bits, _ in fitted], vocab, width * 8, CodecSettings(level=3, min_count=2))
    sections = [codec.encode(ids, bits, scale) for ids, bits, scale in coded]
    for (ids, bits, scale), (got_ids, got_bits, got_scale), section in zip(coded, codec.decode_many(sections), sections):
        assert np.array_equal(got_ids, ids) and got_ids.dtype == np.int32
        assert np.array_equal(got_bits, bits)
        assert np.array_equal(got_scale.view(np.uint16), scale.view(np.uint16))  # NaN payloads, -0.0 included
        assert np.array_equal(codec.decode_ids(section[0]), ids)


@FAST
@given(arrays(np.float32, st.tuples(st.integers(1, 12), st.sampled_from([8, 32])),
              elements=st.one_of(st.floats(-4, 4, width=32), st.floats(1e4, float(np.float32(1e30)), width=32),
                                 st.floats(-float(np.float32(1e30)), -1e4, width=32))),
       st.sampled_from(["rms", "mean_abs"]))
def test_scales_past_fp16_are_clamped_to_its_largest_finite_value_and_round_trip(hidden, calibration):
    """T5's lower-layer states reach 1e4..1e6: their scale must stay a finite fp16, not inf."""
    states = torch.from_numpy(hidden)
    tokens = to_binary_tokens(torch.arange(len(states), dtype=torch.int32), states, 2, calibration)
    assert torch.isfinite(tokens.scale).all()
    expected = (states.double().pow(2).mean(-1).sqrt() if calibration == "rms" else states.double().abs().mean(-1))
    huge = expected > 65504
    assert (tokens.scale[huge] == 65504).all()
    codec = Codec(np.zeros((len(states), hidden.shape[1] // 8), np.uint8), None, CodecSettings(level=3))
    got_ids, got_bits, got_scale = codec.decode(*codec.encode(tokens.token_ids.numpy(), tokens.bits.numpy(), tokens.scale.numpy()))
    assert np.array_equal(got_scale.view(np.uint16), tokens.scale.numpy().view(np.uint16))
    assert np.array_equal(got_bits, tokens.bits.numpy())


# ---- SQuAD metrics: the official evaluation script (v2.0; v1.1's normalisation is the same) ----------
def official_normalize(s: str) -> str:
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = official_normalize(a_gold).split() if a_gold else []
    pred_toks = official_normalize(a_pred).split() if a_pred else []
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


WORDS = ["the", "The", "THE", "a", "A", "an", "An", "anthem", "theatre", "Eiffel", "eiffel", "tower", "Tower",
         "1889", "1,889", "U.S.", "us", "Paris's", "naïve", "Éclair", "ﬁsh", "İstanbul", "-", "!", "'", "(", ")"]
answers_text = st.lists(st.sampled_from(WORDS), max_size=6).flatmap(
    lambda words: st.lists(st.sampled_from([" ", "", "  ", "\t", "\n", "."]), min_size=len(words), max_size=len(words))
    .map(lambda gaps: "".join(w + g for w, g in zip(words, gaps))))


@settings(max_examples=400, deadline=None)
@given(st.one_of(answers_text, st.text(max_size=20)), st.lists(st.one_of(answers_text, st.text(max_size=20)), min_size=1, max_size=4))
def test_exact_match_and_f1_are_the_official_scripts_maximised_over_every_gold_answer(prediction, golds):
    assert exact_match(prediction, golds) == max(float(official_normalize(prediction) == official_normalize(g)) for g in golds)
    assert abs(f1_score(prediction, golds) - max(official_f1(g, prediction) for g in golds)) < 1e-12


def test_the_official_scripts_normalisation_cases_with_several_gold_answers():
    golds = ["Denver Broncos", "The Denver Broncos", "Broncos"]
    assert exact_match("the  denver broncos!", golds) == 1.0
    assert exact_match("Broncos.", golds) == 1.0 and exact_match("Denver", golds) == 0.0
    assert f1_score("Denver", golds) == official_f1("Denver Broncos", "Denver") == 2 / 3  # the best gold, not the first
    assert f1_score("broncos of denver", ["Broncos", "Denver Broncos"]) == 0.8
    assert exact_match("an apple", ["the apple"]) == 1.0 and exact_match("anapple", ["apple"]) == 0.0
    assert f1_score("", [""]) == 1.0 and f1_score("", ["x"]) == 0.0 and f1_score("the", ["a"]) == 1.0
