"""The index-wikipedia flow end to end: Prefect + Ray workers, SIGKILL mid-shard, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reader.assets import wikipedia_sample
from reader.config import BTRConfig
from reader.load import ReaderSpec, load_reader
from storage.index import Index
from storage.verify import main as verify_main
from workers.corpus import normalize
from workers.indexer import FAULT_ENV, ShardIndexer, calibrate_codec, plan_shards

PASSAGES = 36
SHARD_SIZE = 9
PASSAGE_TITLE = wikipedia_sample(1)[0].title


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_extractive_module, write_flow_inputs):
    """A small JSONL corpus and a tiny reader checkpoint on disk (the flow loads readers by path)."""
    reader = make_extractive_module(BTRConfig(split_layer=2, max_passage_tokens=96), hidden_size=64)
    root = write_flow_inputs(tmp_path_factory.mktemp("pipeline"), reader, PASSAGES)
    with open(root / "corpus.jsonl", "a") as f:
        f.write("{broken json\n")
    return root


def run_flow(root: Path, index: Path, offline_merge: float = 0.0) -> dict:
    from flows.index_wikipedia import index_wikipedia

    return index_wikipedia(
        index=str(index), corpus=str(root / "corpus.jsonl"), corpus_format="jsonl",
        reader_checkpoint=str(root / "reader"), retriever=str(root / "reader"), max_passage_tokens=96,
        split_layer=2, shard_size=SHARD_SIZE, offline_merge=offline_merge, codec_sample=PASSAGES,
    )


def digests(index: Path) -> list[str]:
    return [s["digest"] for s in json.loads((index / "manifest.json").read_text())["shards"]]


def test_a_worker_killed_mid_shard_is_retried_and_a_resumed_run_gives_the_same_shards(setup, prefect_server, tmp_path, monkeypatch):
    # (a) Uninterrupted, except that the worker SIGKILLs itself half-way through shard 1 once.
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"1:{marker}")
    first = run_flow(setup, tmp_path / "a")
    assert marker.exists(), "the fault was never injected"
    assert first == {
        "index": str(tmp_path / "a"), "passages": PASSAGES, "tokens": first["tokens"], "resumed_shards": 0,
        "reassigned_shards": 1,  # the killed worker's shard, given back to it once Ray restarted it
    }
    assert verify_main([str(tmp_path / "a")]) == 0
    monkeypatch.delenv(FAULT_ENV)

    # (b) Interrupted: two shards finished, a third left half-written, then the flow runs again.
    index_b = tmp_path / "b"
    work = index_b / ".work"
    corpus = normalize(setup / "corpus.jsonl", "jsonl", work)
    spec = ReaderSpec("extractive", str(setup / "reader"), 2, 96)
    calibrate_codec(index_b, Path(corpus.path), load_reader(spec), PASSAGES)
    indexer = ShardIndexer(str(index_b), corpus.path, spec, str(setup / "reader"))
    plans = plan_shards(corpus.passages, SHARD_SIZE)
    for plan in plans[:2]:
        indexer.index(plan)
    (index_b / "shards" / ".tmp-shard-00002").mkdir()
    (index_b / "shards" / ".tmp-shard-00002" / "data.mdb").write_bytes(b"half a shard")
    second = run_flow(setup, index_b)
    assert second["resumed_shards"] == 2
    assert digests(index_b) == digests(tmp_path / "a")
    assert not (index_b / "shards" / ".tmp-shard-00002").exists()

    # The index answers like any other: rows, text and the retriever line up.
    index = Index.open(index_b)
    assert [p.pid for p in index.fetch([0, 35])] == ["p0", "p35"]
    manifest = json.loads((index_b / "manifest.json").read_text())
    assert manifest["extra"]["corpus"]["rejects"] == 1 and manifest["extra"]["retriever"]["count"] == PASSAGES

    # reader.answer reads it: retrieval, bits, the reader; every mode reads the same passages.
    from reader.answer import Answerer, main as answer_main

    answerer = Answerer(index_b)
    results = {mode: answerer.answer(f"What is {PASSAGE_TITLE}?", k=4, mode=mode) for mode in ("baseline", "split", "btr")}
    ids = [p["id"] for p in results["btr"]["passages"]]
    assert len(ids) == 4 and all(r["passages"] == results["btr"]["passages"] for r in results.values())
    assert all(r["answer"] for r in results.values())
    assert {"retrieve", "fetch", "decode", "upper", "extract"} <= set(results["btr"]["timings_ms"])
    assert answer_main(["  ", "--index", str(index_b)]) == 2
    assert answer_main(["a question", "--index", str(tmp_path / "nowhere")]) == 2

    # make demo rebuilds its index only when the reader that built it is no longer the one in use.
    from flows.demo import drop_stale_index

    assert not drop_stale_index(index_b, load_reader(spec).identity().weights_digest)
    assert (index_b / "manifest.json").exists()
    assert drop_stale_index(index_b, "weights of a newer default reader")
    assert not index_b.exists()


def test_a_shard_whose_embeddings_went_into_the_retriever_counts_as_done_without_them(setup, tmp_path):
    from workers.indexer import consume_embeddings, embedding_files, embeddings_consumed

    corpus = normalize(setup / "corpus.jsonl", "jsonl", tmp_path / "work")
    spec = ReaderSpec("extractive", str(setup / "reader"), 2, 96)
    calibrate_codec(tmp_path / "staging", Path(corpus.path), load_reader(spec), PASSAGES)
    indexer = ShardIndexer(str(tmp_path / "staging"), corpus.path, spec, str(setup / "reader"))
    plans = plan_shards(corpus.passages, SHARD_SIZE)[:2]
    for plan in plans:
        indexer.index(plan)
    files = embedding_files(tmp_path / "staging", plans)
    # stored in half precision (half the pile before the retriever takes them), the encoder's vectors rounded
    from reader.retriever import Encoder, passage_text
    from workers.corpus import read_rows

    stored = np.load(files[0])
    expected = Encoder(str(setup / "reader")).embed([passage_text(p) for p in read_rows(corpus.path, 0, SHARD_SIZE)])
    assert stored.dtype == np.float16 and np.array_equal(stored, expected.astype(np.float16))
    files[0].unlink()  # lost, with no retriever built from it: the shard is indexed again
    assert indexer.done(plans[0]) is None and indexer.done(plans[1])["skipped"]
    indexer.index(plans[0])
    from reader.retriever import ADDED

    files[0].with_suffix(ADDED).touch()  # in a finished add unit of a retriever build that stopped (build_faiss_apart)
    files[0].unlink()
    assert indexer.done(plans[0])["skipped"]
    consume_embeddings(tmp_path / "staging", plans, {"factory": "Flat", "count": 2 * SHARD_SIZE})
    assert not any(f.exists() for f in files) and embeddings_consumed(tmp_path / "staging")["count"] == 2 * SHARD_SIZE
    assert all(indexer.done(plan)["skipped"] for plan in plans)


def test_a_run_stopped_mid_merge_resumes_without_the_lossless_shards_it_merged(setup, prefect_server, tmp_path, monkeypatch):
    """The merge deletes each window's lossless shards once its merged ones are sealed; a rerun neither needs them
    nor indexes them again, and ends with the bytes of a run that was never stopped."""
    import functools

    import flows.index_wikipedia as flow_module
    import storage.offline as offline
    from storage.shard import SHARDS

    # Windows of two shards (the default is 500,000 passages): 36 passages in 4 shards, 2 windows.
    monkeypatch.setattr(flow_module, "OfflineMerge", functools.partial(offline.OfflineMerge, window=2 * SHARD_SIZE))
    reference = tmp_path / "reference"
    run_flow(setup, reference, offline_merge=0.2)
    merge_window, windows_begun = offline._merge_window, []

    def stopped_in_the_second_window(*args, **kwargs):
        windows_begun.append(args[0])
        if len(windows_begun) == 2:
            raise RuntimeError("stopped")
        return merge_window(*args, **kwargs)

    index = tmp_path / "index"
    monkeypatch.setattr(offline, "_merge_window", stopped_in_the_second_window)
    with pytest.raises(RuntimeError, match="stopped"):
        run_flow(setup, index, offline_merge=0.2)
    lossless = index / ".work" / "lossless" / SHARDS
    assert sorted(p.name for p in lossless.iterdir()) == ["shard-00002", "shard-00003"]  # the first window's are gone
    monkeypatch.setattr(offline, "_merge_window", merge_window)
    result = run_flow(setup, index, offline_merge=0.2)
    assert result["resumed_shards"] == PASSAGES // SHARD_SIZE  # none indexed again
    assert digests(index) == digests(reference)
    assert verify_main([str(index)]) == 0
    assert not lossless.exists() and not (index / ".work" / "lossless" / "manifest.json").exists()
