"""reader.bert: the query path's BERT and tokenizer without transformers' model classes, against transformers' own.

The reference is transformers itself, loading the same checkpoints: the bundled reader (reader/checkpoint) and
the packaged retriever encoder (all-MiniLM-L6-v2). Equal means equal: weights digests, token ids, offsets, bits,
span scores and vectors, not close.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from reader.assets import minilm_path, wikipedia_sample
from reader.bert import LightTokenizer, load_bert
from reader.encoder import Encoder, passage_text
from reader.load import DEFAULT_CHECKPOINT, ReaderSpec, load_reader
from storage.record import Passage
from workers.build import encode_corpus

PASSAGES = [Passage(p.title, p.text, str(i)) for i, p in enumerate(wikipedia_sample(300))]
QUESTIONS = ["Who wrote Dracula?", "When did the Berlin Wall fall?", "what is the capital of australia",
             "Which element has the symbol Fe?", "How many moons does Mars have?", "Who painted the Mona Lisa?",
             "Qui a écrit « Les Misérables » ?", "東京はどこですか", "Is 2 + 2 = 4?", "who's the author of 'Ulysses'?"]


@pytest.fixture(scope="module")
def readers():
    return load_reader(ReaderSpec()), load_reader(ReaderSpec(), light=True)


def test_the_light_reader_is_the_bundled_reader_weight_for_weight(readers):
    hf, light = readers
    assert type(light.model).__module__ == "reader.bert" and type(hf.model).__module__.startswith("transformers.")
    assert light.identity() == hf.identity()  # what an index records: name, weights digest, split, calibration
    assert (light.relevance_weight, light.retrieval_weight, light.pool) == (hf.relevance_weight, hf.retrieval_weight, hf.pool)
    assert (light.heads is None) == (hf.heads is None)  # heads.safetensors, read alike where a checkpoint has one


@pytest.mark.parametrize("mode", ["btr", "baseline"])
def test_the_light_reader_reads_bits_and_text_as_transformers_does(readers, mode):
    hf, light = readers
    passages = PASSAGES[:40]
    bits, light_bits = encode_corpus(hf, passages), encode_corpus(light, passages)  # layers 1..k, binarized
    assert all(torch.equal(a.bits, b.bits) and torch.equal(a.scale, b.scale) for a, b in zip(bits, light_bits))
    per_question = [bits[i * 4 : i * 4 + 4] if mode == "btr" else passages[i * 4 : i * 4 + 4] for i in range(len(QUESTIONS))]
    got, want = light.extract(QUESTIONS, per_question, mode), hf.extract(QUESTIONS, per_question, mode)
    assert [(s.passage, s.start, s.end, s.text) for s in got] == [(s.passage, s.start, s.end, s.text) for s in want]
    assert [s.score for s in got] == [s.score for s in want]


def test_the_light_question_encoder_gives_transformers_vectors():
    hf, light = Encoder(), Encoder(light=True)
    assert type(light.model).__module__ == "reader.bert"
    texts = QUESTIONS + [passage_text(p) for p in PASSAGES[:150]]  # batches of mixed lengths: padding, truncation at 256
    assert np.array_equal(light.embed(texts), hf.embed(texts))
    assert np.array_equal(light.embed(QUESTIONS[:1]), hf.embed(QUESTIONS[:1]))  # one question, nothing padded


@pytest.mark.parametrize("path", [DEFAULT_CHECKPOINT, minilm_path()], ids=["reader", "retriever"])
def test_the_light_tokenizer_gives_what_transformers_tokenizer_gives(path):
    from transformers import AutoTokenizer

    hf, light = AutoTokenizer.from_pretrained(str(path), local_files_only=True), LightTokenizer.load(path)
    assert light is not None
    strings = QUESTIONS + [p.text for p in PASSAGES] + ["", "  ", "a" * 600, "\u200b\u00a0x"]
    for kwargs in ({"add_special_tokens": False}, {"add_special_tokens": False, "truncation": True, "max_length": 20,
                                                   "return_offsets_mapping": True}):
        want, got = hf(strings, **kwargs), light(strings, **kwargs)
        for key in ("input_ids", "offset_mapping"):
            if key in want:
                assert [list(map(tuple, row)) if key == "offset_mapping" else row for row in got[key]] == \
                       [list(map(tuple, row)) if key == "offset_mapping" else row for row in want[key]], key
        assert light(strings[0], **kwargs)["input_ids"] == hf(strings[0], **kwargs)["input_ids"]
    batch = {"padding": True, "truncation": True, "max_length": 64, "return_tensors": "pt"}
    want, got = hf(strings[:40], **batch), light(strings[:40], **batch)
    assert set(got) == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(torch.equal(got[key], want[key]) for key in got)
    rng = np.random.default_rng(0)
    for _ in range(50):  # an answer span's tokens, as reader.extractive decodes them
        ids = hf(PASSAGES[int(rng.integers(300))].text, add_special_tokens=False)["input_ids"]
        start = int(rng.integers(len(ids)))
        piece = ids[start : start + int(rng.integers(1, 8))]
        assert light.decode(piece) == hf.decode(piece)
    assert len(light) == len(hf) and sorted(light.all_special_ids) == sorted(hf.all_special_ids)
    assert light.get_vocab() == hf.get_vocab() and light.convert_ids_to_tokens(list(range(0, 30522, 97))) == \
        hf.convert_ids_to_tokens(list(range(0, 30522, 97)))
    assert (light.cls_token_id, light.sep_token_id, light.pad_token_id) == (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id)


def test_a_checkpoint_the_light_path_would_not_read_exactly_loads_through_transformers(tmp_path):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(DEFAULT_CHECKPOINT, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"position_embedding_type": "relative_key"}))
    assert load_bert(other, "qa") is None  # positions it does not compute
    (other / "config.json").write_text(json.dumps(config))
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("qa_outputs.")}, str(other / "model.safetensors"))
    assert load_bert(other, "qa") is None  # transformers would draw the missing span head
    reader = load_reader(ReaderSpec(checkpoint=str(other)), light=True)
    assert type(reader.model).__module__.startswith("transformers.")
    tokenizer_config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(tokenizer_config | {"do_lower_case": False}))
    assert LightTokenizer.load(other) is None  # a config that changes the normalizer
