"""Shared fixtures: the real MiniLM tokenizer and tiny randomly initialised readers."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering, T5Config, T5ForConditionalGeneration

from reader.assets import minilm_path
from reader.config import BTRConfig
from reader.extractive import ExtractiveReader
from reader.fid import FiDReader
from storage.index import SHARDS, Index
from storage.record import Passage

QUESTIONS = ["who wrote hamlet?", "what is the capital of france?"]
PASSAGES = [
    [
        Passage("Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600.", "p0"),
        Passage("Macbeth", "Macbeth is a short play about ambition and murder.", "p1"),
        Passage("Globe Theatre", "The Globe was a theatre in London built in 1599.", "p2"),
    ],
    [
        Passage("Paris", "Paris is the capital and largest city of France, on the Seine.", "p3"),
        Passage("Lyon", "Lyon is a city in France.", "p4"),
        Passage("France", "France is a country in Western Europe with a long history of kings.", "p5"),
    ],
]


SKIP_BROWSER = "BTR_SKIP_BROWSER"  # set (not 0) on a machine that cannot have Chromium: the browser tests skip


def chromium() -> str:
    """Chromium's path. Without it a browser test fails, saying how to install it (`make test` does, as root),
    unless BTR_SKIP_BROWSER is set: the page must not go untested where it lands for want of a browser."""
    path = shutil.which("chromium")
    if path is not None:
        return path
    if os.environ.get(SKIP_BROWSER, "") not in ("", "0"):
        pytest.skip(f"chromium not installed and {SKIP_BROWSER} is set")
    pytest.fail(f"chromium not installed: `make browser` installs it (as root), {SKIP_BROWSER}=1 skips the browser tests")


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


@pytest.fixture
def make_fid(tokenizer):
    """Build a tiny FiD reader: 4 encoder layers, 3 decoder layers, d=32."""

    def build(config: BTRConfig | None = None, d_model: int = 32, seed: int = 0, dropout: float = 0.0) -> FiDReader:
        torch.manual_seed(seed)
        t5 = T5Config(
            vocab_size=tokenizer.vocab_size, d_model=d_model, d_ff=64, d_kv=8, num_heads=4,
            num_layers=4, num_decoder_layers=3, dropout_rate=dropout,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=0,
        )
        return FiDReader(T5ForConditionalGeneration(t5).eval(), tokenizer, config)

    return build


def _extractive_builder(tokenizer):

    def build(config: BTRConfig | None = None, hidden_size: int = 32, seed: int = 0, dropout: float = 0.0) -> ExtractiveReader:
        torch.manual_seed(seed)
        bert = BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=4, max_position_embeddings=512, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        return ExtractiveReader(BertForQuestionAnswering(bert).eval(), tokenizer, config)

    return build


@pytest.fixture
def make_extractive(tokenizer):
    """Build a tiny extractive BERT reader: 4 layers, d=32."""
    return _extractive_builder(tokenizer)


@pytest.fixture(scope="module")
def make_extractive_module(tokenizer):
    return _extractive_builder(tokenizer)


@pytest.fixture(scope="module")
def answering_index(tmp_path_factory, make_extractive_module):
    """``build(root, passages)``: an index reader.answer opens (shards of 16, a tiny saved reader with k=2, a retriever)."""
    from reader.load import ReaderSpec, load_reader
    from reader.retriever import Encoder, build_faiss, passage_text, record_retriever
    from workers.build import build_index

    folder = tmp_path_factory.mktemp("reader")
    tiny = make_extractive_module(BTRConfig(split_layer=2, max_passage_tokens=96), hidden_size=64)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    spec = ReaderSpec("extractive", str(folder), 2, 96)

    def build(root, passages):
        build_index(root, load_reader(spec), passages, shard_size=16, extra={"reader_spec": spec.to_dict()})
        encoder = Encoder(folder)
        build_faiss([encoder.embed([passage_text(p) for p in passages])], root, encoder.identity())
        record_retriever(root)  # as the index flow's manifest does: the retriever's digest
        return root

    return build


@pytest.fixture(scope="session")
def flip_record_byte():
    """Corrupt one byte inside a stored record (found by its bytes in the shard file); returns the shard."""

    def flip(index_path, row: int) -> str:
        [(shard, value)] = Index.open(index_path).read([row])
        data_file = index_path / SHARDS / shard / "data.mdb"
        data = bytearray(data_file.read_bytes())
        at = data.find(value[40:80])
        assert at > 0 and data.find(value[40:80], at + 1) == -1
        data[at + 10] ^= 0x40
        data_file.write_bytes(bytes(data))
        return shard

    return flip


@pytest.fixture(scope="session")
def write_flow_inputs():
    return _write_flow_inputs


def _write_flow_inputs(root, reader, passages: int):
    """What the indexing flow reads, on disk: ``corpus.jsonl`` (the first ``passages`` of the
    sample) and ``reader/`` (the tiny reader, saved: the flow loads readers by path)."""
    import json

    from reader.assets import wikipedia_sample

    with open(root / "corpus.jsonl", "w") as f:
        for i, p in enumerate(wikipedia_sample(passages)):
            f.write(json.dumps({"id": f"p{i}", "title": p.title, "text": p.text}) + "\n")
    reader.model.save_pretrained(root / "reader")
    reader.tokenizer.save_pretrained(root / "reader")
    return root


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect server (its own database, an unused port) for the flows a test module runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
