"""The pipelined shard worker (workers.pipeline) against the serial path it replaced (workers.build), and its sizing."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from reader.config import BTRConfig
from reader.inputs import ReaderInputError
from reader.load import ReaderSpec, load_reader
from reader.retriever import Encoder, passage_text
from storage.codec import Codec
from storage.index import IndexWriter
from storage.record import Passage, RecordFormat, decode_records
from storage.shard import SHARDS, shard_name
from workers.build import encode_corpus
from workers.corpus import normalize, read_rows
from workers.indexer import ShardIndexer, calibrate_codec, plan_shards
from workers.pipeline import Device, ShardPipeline
from workers.sizing import size_workers

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_extractive_module):
    """A normalized corpus of empty (rejected), one-token, max-length and ordinary passages, and a tiny reader on disk."""
    from reader.assets import wikipedia_sample

    root = tmp_path_factory.mktemp("worker-pipeline")
    reader = make_extractive_module(BTRConfig(split_layer=2, max_passage_tokens=MAX_TOKENS), hidden_size=64)
    reader.model.save_pretrained(root / "reader")
    reader.tokenizer.save_pretrained(root / "reader")
    rows = [{"id": f"p{i}", "title": p.title, "text": p.text} for i, p in enumerate(wikipedia_sample(40))]
    rows[3]["text"] = ""  # empty: rejected before any worker sees it
    rows[5]["text"] = "a"  # one token
    rows[7]["text"] = " ".join(["river"] * 400)  # cut at the reader's maximum
    rows[11]["text"] = "word " * 30 + "end"
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    normalized = normalize(str(root / "corpus.jsonl"), "jsonl", root / "work")
    assert normalized.passages == 39 and normalized.rejects == 1
    spec = ReaderSpec("extractive", str(root / "reader"), 2, MAX_TOKENS)
    return root, normalized.path, spec


def serial_shards(root, corpus_path, spec, shard_size: int) -> tuple[list[str], np.ndarray]:
    """Today's serial path: encode_corpus, Encoder.embed, IndexWriter.write_shard, shard by shard."""
    reader = load_reader(spec)
    calibrate_codec(root, corpus_path, reader, 39)
    writer, encoder = IndexWriter(root, reader.identity()), Encoder(spec.checkpoint)
    digests, vectors = [], []
    for plan in plan_shards(39, shard_size):
        passages = read_rows(corpus_path, plan.first_row, plan.first_row + plan.rows)
        records = encode_corpus(reader, passages, 4)
        rows = ((p.id, p.title, p.text, r) for p, r in zip(passages, records))
        digests.append(writer.write_shard(plan.shard_id, plan.first_row, rows).digest)
        vectors.append(encoder.embed([passage_text(p) for p in passages]))
    return digests, np.concatenate(vectors)


def pipelined_shards(
    root, corpus_path, spec, shard_size: int, level: int | None, threads: int = 3, shared: bool = True
) -> tuple[list[str], np.ndarray]:
    calibrate_codec(root, corpus_path, load_reader(spec), 39)
    indexer = ShardIndexer(str(root), str(corpus_path), spec, spec.checkpoint, batch_size=4, threads=threads, level=level)
    indexer.pipeline.depth = 2  # the bounded queues fill and drain many times over a shard
    summaries = [indexer.index(plan) for plan in plan_shards(39, shard_size)]
    # reader and retriever share a tokenizer here: each passage was tokenized once (workers.pipeline's share_tokens)
    assert (indexer.pipeline.pieces is not None) == shared
    vectors = np.concatenate([np.load(root / "embeddings" / f"{shard_name(p.shard_id)}.npy") for p in plan_shards(39, shard_size)])
    return [s["shard"]["digest"] for s in summaries], vectors


@pytest.mark.parametrize("threads", [3, 0])  # a GPU worker's threads; a CPU worker's stages one after the other
def test_the_pipelined_worker_writes_the_serial_paths_shards_byte_for_byte(corpus, tmp_path, threads):
    root, corpus_path, spec = corpus
    serial, serial_vectors = serial_shards(tmp_path / "serial", corpus_path, spec, 16)
    piped, piped_vectors = pipelined_shards(tmp_path / "piped", corpus_path, spec, 16, level=None, threads=threads)
    assert len(serial) == 3 and piped == serial
    # The indexer stores float16 vectors: the same as the serial path's float32 ones, rounded.
    assert np.array_equal(piped_vectors, serial_vectors.astype(np.float16))


def stored(root) -> list[tuple]:
    """Every record of an index folder's shards, decoded: (pid, title, text, ids, bits, scale)."""
    import lmdb

    from storage.shard import block_records

    codec = Codec.load(root / "codec")
    fmt = RecordFormat(codec, 2, "mean_abs")
    out = []
    for folder in sorted((root / SHARDS).glob("shard-*")):
        env = lmdb.open(str(folder), readonly=True, lock=False, subdir=True)
        with env.begin() as txn:
            values = [bytes(r) for _, block in txn.cursor() for r in block_records(block)]
        env.close()
        for p in decode_records(fmt, values, list(range(len(values))), ["x"] * len(values)):
            out.append((p.pid, p.title, p.text, p.tokens.token_ids.tolist(), p.tokens.bits.numpy().tobytes(),
                        p.tokens.scale.numpy().tobytes()))
    return out


def test_a_fast_staging_level_changes_the_bytes_but_not_what_they_decode_to(corpus, tmp_path):
    root, corpus_path, spec = corpus
    slow, _ = pipelined_shards(tmp_path / "slow", corpus_path, spec, 16, level=None)
    fast, _ = pipelined_shards(tmp_path / "fast", corpus_path, spec, 16, level=1)
    assert fast != slow  # level 1, not the codec's 19
    assert stored(tmp_path / "fast") == stored(tmp_path / "slow")
    assert len(stored(tmp_path / "fast")) == 39


def test_a_passage_the_tokenizer_refuses_stops_the_shard_with_its_error_and_the_thread(corpus, tmp_path):
    root, corpus_path, spec = corpus
    reader = load_reader(spec)
    codec = calibrate_codec(tmp_path, corpus_path, reader, 39)
    fmt = IndexWriter(tmp_path, reader.identity()).format
    pipeline = ShardPipeline(reader, Encoder(spec.checkpoint), fmt, batch_size=2, threads=2, depth=1)
    passages = read_rows(corpus_path, 0, 20)
    passages[13] = Passage("Blank", "   ", "blank")
    before = threading.active_count()
    with pytest.raises(ReaderInputError, match="blank"):
        pipeline.run(passages)
    pipeline.close()
    assert threading.active_count() <= before  # the tokenizer thread was stopped, not left blocked on a full queue
    assert codec["settings"]["level"] == 19


def test_workers_are_sized_from_the_cluster_and_the_override_wins():
    cpu = size_workers(cpus=2, gpus=0)
    assert (cpu.workers, cpu.cpus, cpu.torch_threads, cpu.pool_threads, cpu.gpu) == (1, 2, 2, 0, 0.0)
    gpu = size_workers(cpus=16, gpus=1)  # one worker feeds its GPU; all but two of its cores code records
    assert (gpu.workers, gpu.cpus, gpu.torch_threads, gpu.pool_threads, gpu.gpu) == (1, 16, 2, 14, 1.0)
    eight = size_workers(cpus=128, gpus=8)
    assert (eight.workers, eight.cpus, eight.pool_threads, eight.gpu) == (8, 16, 14, 1.0)
    shared = size_workers(cpus=16, gpus=1, workers=2, threads=4)
    assert (shared.workers, shared.cpus, shared.torch_threads, shared.pool_threads, shared.gpu) == (2, 4, 2, 2, 0.5)
    assert "2 worker(s), each 0.5 GPU, 4 CPU(s)" in shared.describe()


@pytest.mark.parametrize("fail_at", [("lower", 3), ("embed", 4)])  # the tokenizer ahead; done with its queue full
def test_a_device_error_mid_shard_stops_the_shard_and_the_tokenizer_ahead_of_it(corpus, tmp_path, fail_at):
    root, corpus_path, spec = corpus
    reader = load_reader(spec)
    calibrate_codec(tmp_path, corpus_path, reader, 39)
    fmt = IndexWriter(tmp_path, reader.identity()).format
    encoder = Encoder(spec.checkpoint)
    device, calls = Device(reader, encoder), []
    stage, at = fail_at

    def failing(batch):
        calls.append(batch)
        if len(calls) == at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return getattr(Device, stage)(device, batch)

    setattr(device, stage, failing)
    pipeline = ShardPipeline(reader, encoder, fmt, batch_size=2, threads=2, embed_batch_size=8, device=device, depth=1)
    before, raised = threading.active_count(), []
    run = threading.Thread(target=lambda: raised.append(pytest.raises(RuntimeError, pipeline.run, read_rows(corpus_path, 0, 39))))
    run.start()
    run.join(timeout=120)  # a tokenizer thread blocked on its full queue would hold the shard here for ever
    assert not run.is_alive(), "the shard did not end after the device failed"
    assert "illegal memory access" in str(raised[0].value) and len(calls) == at
    pipeline.close()
    assert threading.active_count() <= before


def test_passages_tokenized_once_compose_each_models_ids_as_their_tokenizers_give_them_over_the_whole_sample():
    """reader.inputs.PassagePieces against the tokenizer itself on the full strings, for all 10,033 bundled passages
    (accents, CJK, symbols, long texts cut at both limits)."""
    from transformers import AutoTokenizer

    from reader.assets import minilm_path, wikipedia_sample
    from reader.inputs import PassagePieces, TokenLayout, encode_passages

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    layout = TokenLayout((tokenizer.cls_token_id,), (tokenizer.sep_token_id,), (tokenizer.sep_token_id,), tokenizer.pad_token_id)
    passages = [Passage(p.title, p.text, str(i)) for i, p in enumerate(wikipedia_sample())]
    pieces = PassagePieces.shared_by(tokenizer, tokenizer)
    assert pieces is not None
    split = pieces.split(passages)
    assert pieces.reader_ids(split, layout, 320) == encode_passages(tokenizer, layout, passages, 320)
    direct = tokenizer([passage_text(p) for p in passages], truncation=True, max_length=256)["input_ids"]
    assert pieces.retriever_ids(split, 256) == direct
    with pytest.raises(ReaderInputError, match="'x' .* has no text"):
        pieces.split([Passage("Blank", "  ", "x")])


def test_tokenizers_that_do_not_split_words_alike_are_not_shared(tokenizer):
    from reader.inputs import PassagePieces

    class Slow:  # no fast backend: nothing says how it cuts words
        cls_token_id = sep_token_id = pad_token_id = 0

    assert PassagePieces.shared_by(tokenizer, Slow()) is None
    other = json.loads(tokenizer.backend_tokenizer.to_str())
    other["model"]["vocab"] = dict(list(other["model"]["vocab"].items())[:-1])  # one word piece fewer: another vocabulary
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    shrunk = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(other)), cls_token="[CLS]",
                                     sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    assert PassagePieces.shared_by(tokenizer, shrunk) is None and PassagePieces.shared_by(tokenizer, tokenizer) is not None


def test_a_worker_whose_composed_ids_differ_warns_and_tokenizes_apart_with_the_same_shards(corpus, tmp_path, monkeypatch):
    from reader.inputs import PassagePieces

    root, corpus_path, spec = corpus
    serial, serial_vectors = serial_shards(tmp_path / "serial", corpus_path, spec, 16)
    real = PassagePieces.retriever_ids
    monkeypatch.setattr(PassagePieces, "retriever_ids", lambda self, pieces, limit: [ids[:-2] + ids[-1:] for ids in real(self, pieces, limit)])
    with pytest.warns(UserWarning, match="retriever's passage ids composed from shared pieces differ"):
        piped, piped_vectors = pipelined_shards(tmp_path / "piped", corpus_path, spec, 16, level=None, shared=False)
    assert piped == serial and np.array_equal(piped_vectors, serial_vectors.astype(np.float16))
