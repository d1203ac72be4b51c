"""bench.scale: a synthetic corpus through the product's writer, faiss, offline merge, verify and reads (small here)."""

import json

import numpy as np
import pytest

from bench.scale import main
from bench.scale_steps import _tokenizer
from bench.synthetic import BitModel, SyntheticCorpus, measure_bit_model


@pytest.fixture(scope="module")
def corpus():
    tokenizer, layout = _tokenizer()
    return SyntheticCorpus(tokenizer, layout, 384, BitModel(), seed=1)


def test_synthetic_passages_look_like_wikipedia_passages_and_are_reproducible(corpus):
    passages = corpus.passages(3, 3000, 50)
    assert [p.id for p in passages[:2]] == ["syn-3000", "syn-3001"]
    assert all(len(p.text.split()) == 100 and p.title for p in passages)
    records = corpus.bits(3, passages)
    lengths = np.array([len(r) for r in records])
    assert 120 < lengths.mean() < 160  # DPR's 100 words are about 140 tokens with this tokenizer
    again = corpus.bits(3, corpus.passages(3, 3000, 50))
    assert all(np.array_equal(a.bits, b.bits) and np.array_equal(a.scale, b.scale) for a, b in zip(records, again))
    assert not np.array_equal(records[0].bits, corpus.bits(4, passages[:1])[0].bits)  # another block, other bits


def test_synthetic_bits_flip_their_tokens_prototype_at_the_measured_rates(corpus):
    records = corpus.bits(0, corpus.passages(0, 0, 200))
    ids = np.concatenate([r.token_ids.numpy() for r in records])
    bits = np.concatenate([r.bits.numpy() for r in records])
    residual = np.unpackbits(bits ^ corpus.prototypes[ids], axis=1).mean()
    assert abs(residual - np.mean(BitModel().flip_rate)) < 0.03  # ~0.23: the real residual's share of ones
    scale = np.concatenate([r.scale.float().numpy() for r in records])
    low, high = np.float16(BitModel().scale[0]), np.float16(BitModel().scale[-1])  # scales are stored as fp16
    assert low <= scale.min() and scale.max() <= high
    assert abs(np.median(scale) - BitModel().scale[16]) < 0.005


def test_the_bit_model_is_measured_on_the_default_readers_bits():
    model = measure_bit_model(passages=10, min_count=2)
    for quantiles in (model.prototype_rate, model.flip_rate, model.scale):
        assert len(quantiles) == 33 and list(quantiles) == sorted(quantiles)
    assert 0 <= model.flip_rate[0] and model.flip_rate[-1] <= 0.5
    assert "10 sample articles" in model.source


@pytest.mark.bench  # the whole benchmark on 1,200 passages: about 2 min of `make test` on two cores
def test_scale_runs_every_step_and_reports_sane_figures(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["--passages", "1200", "--shard-size", "300", "--draws", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verified"] and result["passages"] == 1200
    assert 120 < result["tokens_per_passage"] < 160
    assert result["write_passages_per_s"] > 0 and result["write_tokens_per_s"] > result["write_passages_per_s"]
    disk, bits = result["disk_bytes_per_token"], result["bits_per_dim"]
    assert 10 < disk["merged"] < disk["lossless"] < 80
    assert 0.2 < bits["merged"] < bits["lossless"] < 0.95  # the real default reader's bits: 0.39 / 0.76
    for name in ("lossless", "merged"):
        assert 0 < result["fetch_ms"][name]["p50"] <= result["fetch_ms"][name]["p99"]
    assert set(result["peak_rss_mb"]) == {"write", "faiss", "faiss_pq", "fetch_lossless", "merge", "verify", "fetch"}
    assert all(mb > 0 for mb in result["peak_rss_mb"].values())
    assert all(result["peak_anon_mb"][step] <= result["peak_rss_mb"][step] for step in result["peak_rss_mb"])
    assert result["steps"]["write"]["shards"] == 4
    flat, pq = result["faiss"]["faiss"], result["faiss"]["faiss_pq"]
    assert flat["factory"] == "Flat" and flat["train_s"] is None  # what the flow picks below 200k passages
    assert pq["factory"] == "IVF138,PQ48np" and pq["train_s"] > 0 and pq["train_peak_rss_mb"] > 0
    # Per vector 48 bytes of code and an 8-byte id (Flat: 1,536 bytes); fixed: 138 centroids, 48 x 256 codewords.
    assert 0 <= pq["bytes"] - (1200 * (48 + 8) + 138 * 384 * 4 + 256 * 384 * 4) < 4096
    assert 0 <= flat["bytes"] - 1200 * 384 * 4 < 4096
    assert result["bucket_files"] == 8 and result["total_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary work folder is gone


def test_scale_refuses_a_folder_that_holds_something(tmp_path):
    (tmp_path / "old").write_text("x")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])


def test_the_retriever_type_follows_the_corpus_size_and_skips_polysemous_training():
    from reader.retriever import index_factory

    assert index_factory(199_999, 384) == "Flat"
    assert index_factory(1_000_000, 384) == "IVF4000,Flat"
    assert index_factory(21_000_000, 384) == "IVF18330,PQ48np"  # "np": the ~75 s annealing nothing uses


@pytest.mark.bench
def test_scale_on_one_or_two_ray_workers_gives_the_same_digests(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    runs = {}
    for workers in (1, 2):
        assert main(["--passages", "1200", "--shard-size", "300", "--draws", "5", "--workers", str(workers), "--json"]) == 0
        runs[workers] = json.loads(capsys.readouterr().out)
    assert runs[1]["workers"] == 1 and runs[2]["workers"] == 2 and runs[1]["passages"] == 1200
    assert runs[1]["digests"] == runs[2]["digests"]
    assert runs[1]["faiss"]["faiss_pq"]["factory"] == "IVF138,PQ48np"  # built apart, lists merged on disk
    assert all(runs[2]["peak_disk_bytes"][step] > 0 for step in runs[2]["seconds"])
