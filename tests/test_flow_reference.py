"""The index-wikipedia flow at the demo's settings (Prefect, Ray workers, offline merge 0.2) against an independent
reference: the same passages through the serial path (workers.build, zstd level 19) and the brute-force merge.

The flow's workers are pipelined and write their lossless staging shards at a fast zstd level; the merge decodes
them and codes the index again. What it publishes must hold exactly the reference's bits, token ids, scales,
texts and retriever vectors.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from reader.config import BTRConfig
from reader.inputs import stopword_ids
from reader.load import ReaderSpec, load_reader
from reader.retriever import Encoder, passage_text
from storage.index import FAISS_FILE, Index
from storage.offline import OfflineMerge
from test_offline import reference_merge
from workers.build import build_index
from workers.corpus import normalize, read_rows
from workers.indexer import STAGING_LEVEL

PASSAGES = 30
SHARD_SIZE = 8
RATIO = 0.2  # the demo's (flows.index_wikipedia's default)


@pytest.fixture(scope="module")
def flow_and_reference(tmp_path_factory, make_extractive_module, write_flow_inputs, prefect_server):
    from flows.index_wikipedia import index_wikipedia

    reader = make_extractive_module(BTRConfig(split_layer=2, max_passage_tokens=96), hidden_size=64)
    root = write_flow_inputs(tmp_path_factory.mktemp("flow-reference"), reader, PASSAGES)
    index_wikipedia(
        index=str(root / "index"), corpus=str(root / "corpus.jsonl"), corpus_format="jsonl",
        reader_checkpoint=str(root / "reader"), retriever=str(root / "reader"), max_passage_tokens=96, split_layer=2,
        shard_size=SHARD_SIZE, offline_merge=RATIO, codec_sample=PASSAGES,
    )
    spec = ReaderSpec("extractive", str(root / "reader"), 2, 96)
    loaded = load_reader(spec)
    passages = read_rows(normalize(str(root / "corpus.jsonl"), "jsonl", root / "reference-corpus").path, 0, PASSAGES)
    build_index(root / "lossless", loaded, passages, shard_size=SHARD_SIZE)  # codec fitted on all: the flow's sample
    return root, Index.open(root / "index"), Index.open(root / "lossless"), stopword_ids(loaded.tokenizer), passages


def test_the_flow_publishes_the_serial_paths_passages_with_the_brute_force_merge_of_their_bits(flow_and_reference):
    root, published, lossless, stopwords, passages = flow_and_reference
    assert published.manifest.extra["offline_merge"]["ratio"] == RATIO
    assert published.format.codec.settings.level == 19 != STAGING_LEVEL  # the index keeps its level
    rows = range(PASSAGES)
    expected_bits = reference_merge(lossless, stopwords, OfflineMerge(RATIO))
    merged, reference = published.fetch(rows), lossless.fetch(rows)
    assert sum(not np.array_equal(e, r.tokens.bits.numpy()) for e, r in zip(expected_bits, reference)) > PASSAGES // 2
    for got, want, bits in zip(merged, reference, expected_bits):
        assert (got.pid, got.title, got.text) == (want.pid, want.title, want.text)
        assert np.array_equal(got.tokens.token_ids, want.tokens.token_ids)
        assert np.array_equal(got.tokens.scale, want.tokens.scale)
        assert np.array_equal(got.tokens.bits.numpy(), bits)


def test_the_flows_retriever_holds_the_encoders_vectors_of_every_passage(flow_and_reference):
    root, _, _, _, passages = flow_and_reference
    retriever = faiss.read_index(str(root / "index" / FAISS_FILE))
    stored = retriever.reconstruct_n(0, retriever.ntotal)
    expected = Encoder(root / "reader").embed([passage_text(p) for p in passages])
    assert retriever.ntotal == PASSAGES
    assert np.array_equal(stored, expected.astype(np.float16).astype(np.float32))  # float16 on the way, as documented
