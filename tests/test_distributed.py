"""The steps after the workers on a Ray cluster (loopback, 1 and 2 CPUs): the same bytes as in one process, a lost task retried."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.scale_steps import _tokenizer, step_write
from reader.inputs import stopword_ids
from storage.index import Manifest
from storage.offline import OfflineMerge, merge_index
from storage.tasks import serial as serial_run
from storage.verify import verify
from workers.cluster import FAULT_ENV, cluster
from workers.offline import merge_on_cluster, verify_on_cluster

SETTINGS = OfflineMerge(0.2, chunk=64, buckets=5)


@pytest.fixture(scope="module")
def lossless(tmp_path_factory) -> Path:
    """600 synthetic passages (d = 384, the default reader's tokenizer) in 6 shards."""
    out = tmp_path_factory.mktemp("distributed")
    cfg = {"passages": 600, "shard_size": 100, "words": 60, "max_tokens": 128, "codec_sample": 200, "seed": 0}
    step_write(cfg, out)
    return out / "lossless"


def published(index: Path) -> dict:
    """The manifest without its timestamp, and the codec's bytes: all that two identical merges share."""
    manifest = json.loads((index / "manifest.json").read_text())
    del manifest["created"]
    return manifest | {"codec_bytes": {f.name: f.read_bytes() for f in sorted((index / "codec").iterdir())}}


def test_merge_and_verify_on_one_or_two_workers_match_one_process_and_survive_a_killed_task(lossless, tmp_path, monkeypatch):
    stopwords = stopword_ids(_tokenizer()[0])
    serial = merge_index(lossless, tmp_path / "serial", stopwords, SETTINGS)
    assert len(serial.shards) == 6 and serial.extra["offline_merge"]["changed_tokens"] > 0
    with cluster(cpus=1, include_dashboard=False):
        merge_on_cluster(lossless, tmp_path / "one", stopwords, SETTINGS)
    assert published(tmp_path / "one") == published(tmp_path / "serial")

    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"merge_bucket:1:{marker}")  # bucket 1's task kills its process once
    with cluster(cpus=2, include_dashboard=False):
        merge_on_cluster(lossless, tmp_path / "two", stopwords, SETTINGS, workdir=tmp_path)
        assert marker.exists(), "the fault was never injected"
        assert published(tmp_path / "two") == published(tmp_path / "serial")
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("btr-merge-")] == []  # scratch removed

        # verify: the same verdicts and messages, intact or damaged.
        assert verify_on_cluster(tmp_path / "two") == verify(tmp_path / "serial") == ([], 600)
        damaged = tmp_path / "damaged"
        shutil.copytree(tmp_path / "two", damaged)
        shard = Manifest.load(damaged).shards[2]
        data = damaged / "shards" / shard.name / "data.mdb"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 3] ^= 0x40
        data.write_bytes(bytes(raw))
        (damaged / "shards" / Manifest.load(damaged).shards[4].name / "data.mdb").write_bytes(b"short")
        problems, checked = verify(damaged)
        assert problems and any("shard-00004" in p for p in problems)
        assert verify_on_cluster(damaged) == (problems, checked)

        # The retriever, trained in units and a task per shard's vectors: what one process builds, searched alike.
        from reader.retriever import build_faiss_apart
        from workers.cluster import cluster_runner

        for folder, run in (("one-process", serial_run), ("cluster", cluster_runner())):
            (tmp_path / folder).mkdir()
            build_faiss_apart(embedding_files(lossless), tmp_path / folder, {}, run, train_size=300, factory="IVF8,PQ16np")
        queries = np.load(embedding_files(lossless)[3])[:20].astype(np.float32) + 0.01
        assert all(np.array_equal(a, b) for a, b in zip(search(tmp_path / "cluster", queries), search(tmp_path / "one-process", queries)))
        # trained in units on two CPUs too (reader.quantizer): the same codes, byte for byte
        from storage.index import IVF_DATA

        assert (tmp_path / "cluster" / IVF_DATA).read_bytes() == (tmp_path / "one-process" / IVF_DATA).read_bytes()


def embedding_files(lossless: Path) -> list[Path]:
    from workers.indexer import EMBEDDINGS

    return sorted((lossless / EMBEDDINGS).glob("shard-*.npy"))


def search(folder: Path, queries, probes: int = 4):
    from reader.retriever import read_faiss

    index = read_faiss(folder)
    index.nprobe = probes
    return index.search(queries, 10)


@pytest.mark.parametrize("factory", ["IVF8,Flat", "IVF8,PQ16np"])
def test_a_retriever_built_apart_searches_like_one_built_whole_and_maps_its_lists(lossless, tmp_path, factory, capfd):
    import faiss

    from reader.retriever import build_faiss, build_faiss_apart
    from storage.index import IVF_DATA
    from storage.verify import retriever_problems

    files = embedding_files(lossless)
    parts = [np.load(f, mmap_mode="r") for f in files]
    whole, apart = tmp_path / "whole", tmp_path / "apart"
    whole.mkdir(), apart.mkdir()
    build_faiss(parts, whole, {"name": "test"}, train_size=300, factory=factory)
    build_faiss_apart(files, apart, {"name": "test"}, train_size=300, factory=factory)
    assert (apart / IVF_DATA).exists() and not (whole / IVF_DATA).exists()
    # One add unit per file, or all files in two units: the same lists, byte for byte (they keep row
    # order). (The index file differs only in the path of its lists.)
    for tasks in (len(files), 2):
        other = tmp_path / f"apart-{tasks}"
        other.mkdir()
        build_faiss_apart(files, other, {"name": "test"}, train_size=300, factory=factory, tasks=tasks)
        assert (other / IVF_DATA).read_bytes() == (apart / IVF_DATA).read_bytes()
    queries = np.ascontiguousarray(np.concatenate([p[:5] for p in parts]) + 0.01, dtype=np.float32)
    expected = search(whole, queries)
    assert (expected[1] >= 0).all()
    moved = tmp_path / "moved"
    apart.rename(moved)  # the lists are found beside the index file, wherever the folder goes
    got = search(moved, queries)
    assert np.array_equal(got[1], expected[1]) and np.array_equal(got[0], expected[0])
    assert capfd.readouterr().out == ""  # faiss's notes on its on-disk lists kept off stdout (a --json output)
    plain = faiss.read_index(str(whole / "retriever.faiss"))
    plain.nprobe = 4
    assert np.array_equal(plain.search(queries, 10)[1], expected[1])  # mapped or read: the same answers

    manifest = type("M", (), {"passages": 600, "extra": {"retriever": {}}})()
    assert retriever_problems(moved, manifest) == []
    os.truncate(moved / IVF_DATA, (moved / IVF_DATA).stat().st_size // 2)
    assert retriever_problems(moved, manifest) == [f"retriever: {IVF_DATA} is truncated"]


@pytest.mark.parametrize("factory", ["IVF8,Flat", "IVF8,PQ16np"])
def test_an_update_extends_lists_on_disk_without_touching_the_previous_versions_file(lossless, tmp_path, factory):
    """``extend_faiss`` on a retriever whose lists are on disk: the old file is left as it was (readers of the
    previous version map it), the new version's lists hold the old codes and the new vectors', found alike."""
    import faiss

    from reader.retriever import build_faiss_apart, read_faiss
    from reader.retriever_versions import extend_faiss
    from storage.index import IVF_DATA

    files = embedding_files(lossless)
    old, new = tmp_path / "v1", tmp_path / "v2"
    old.mkdir()
    build_faiss_apart(files[:4], old, {"name": "test"}, train_size=300, factory=factory)
    before = (old / IVF_DATA).read_bytes()
    first = sum(len(np.load(f, mmap_mode="r")) for f in files[:4])
    info = extend_faiss(old, new, files[4:], first)
    assert info["count"] == 600 and (new / IVF_DATA).exists()
    assert (old / IVF_DATA).read_bytes() == before
    # The reference: the trained index with every vector added in memory by faiss itself, ids = rows.
    reference = faiss.read_index(str(old / "retriever.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    ivf = faiss.extract_index_ivf(reference)
    ivf.own_invlists = False
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    reference.ntotal = ivf.ntotal = 0
    vectors = np.concatenate([np.load(f) for f in files]).astype(np.float32)
    reference.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    reference.nprobe = 8
    queries = np.ascontiguousarray(vectors[::37] + 0.01)
    expected = reference.search(queries, 10)
    got = read_faiss(new)
    got.nprobe = 8
    found = got.search(queries, 10)
    assert np.array_equal(found[1], expected[1]) and np.allclose(found[0], expected[0])
    if factory == "IVF8,Flat":  # all lists probed: exact search, as numpy computes it
        assert np.array_equal(found[1][:, 0], np.argmax(queries @ vectors.T, axis=1))
    assert (found[1] >= first).any()  # new rows are found


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "IVF8,PQ16np"])
def test_a_compacted_retriever_finds_what_the_filtered_one_found_renumbered(lossless, tmp_path, factory):
    """``compact_faiss``: searching the compacted retriever gives what a search of the old one skipping the deleted
    rows gave (faiss's own selector), rows renumbered, scores equal; lists on disk go through several parts."""
    import faiss

    from reader.retriever import build_faiss, build_faiss_apart, read_faiss
    from reader.retriever_versions import compact_faiss
    from storage.index import IVF_DATA

    files = embedding_files(lossless)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    if factory == "Flat":
        build_faiss([np.load(f, mmap_mode="r") for f in files], old, {"name": "test"}, factory=factory)
    else:
        build_faiss_apart(files, old, {"name": "test"}, train_size=300, factory=factory)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    rng = np.random.default_rng(0)
    live = np.sort(rng.choice(600, 450, replace=False))
    info = compact_faiss(old, new, live, part_bytes=4096)
    assert info["count"] == 450 and {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert (new / IVF_DATA).exists() == (factory != "Flat")
    vectors = np.concatenate([np.load(f) for f in files]).astype(np.float32)
    queries = np.ascontiguousarray(vectors[::29] + 0.01)
    source, compacted = read_faiss(old), read_faiss(new)
    bitmap = np.packbits(np.isin(np.arange(600), live), bitorder="little")
    selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    if hasattr(source, "nprobe"):
        source.nprobe = compacted.nprobe = 8
        params = faiss.SearchParametersIVF(sel=selector, nprobe=8)
    else:
        params = faiss.SearchParameters(sel=selector)
    scores, rows = source.search(queries, 10, params=params)
    assert (rows >= 0).all() and np.isin(rows, live).all()
    got_scores, got_rows = compacted.search(queries, 10)
    assert np.array_equal(got_rows, np.searchsorted(live, rows)) and np.allclose(got_scores, scores, atol=1e-6)


def test_a_consuming_build_stopped_midway_resumes_without_the_embeddings_it_took(lossless, tmp_path):
    from reader.retriever import ADDED, BUILD_DIR, add_part, build_faiss_apart
    from storage.index import IVF_DATA

    (tmp_path / "embeddings").mkdir()
    files = [Path(shutil.copy(f, tmp_path / "embeddings" / f.name)) for f in embedding_files(lossless)]  # consumed below
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    reference.mkdir(), resumed.mkdir()
    settings = {"train_size": 300, "factory": "IVF8,PQ16np", "tasks": 6}
    build_faiss_apart(embedding_files(lossless), reference, {}, **settings)

    def stopped(fn, calls, done=None):  # the cluster is lost after two of the six add units
        if fn is add_part:
            serial_run(fn, calls[:2])
            raise RuntimeError("node lost")
        return serial_run(fn, calls, done)

    with pytest.raises(RuntimeError, match="node lost"):
        build_faiss_apart(files, resumed, {}, stopped, consume=True, **settings)
    gone = [f for f in files if not f.exists()]
    assert gone == files[:2] and all(f.with_suffix(ADDED).exists() for f in gone)  # the workers count them done
    with pytest.raises(ValueError, match="other settings"):  # nothing of the stopped build is touched
        build_faiss_apart(files, resumed, {}, consume=True, **settings | {"factory": "IVF8,Flat"})
    with pytest.raises(FileNotFoundError, match="2 embedding files are missing"):  # no build there to resume
        build_faiss_apart(files, tmp_path / "elsewhere", {}, **settings)

    ran = []

    def counting(fn, calls, done=None):
        ran.append((fn.__name__, len(calls)))
        return serial_run(fn, calls, done)

    build_faiss_apart(files, resumed, {}, counting, consume=True, **settings)
    assert ran == [("add_part", 6)]  # not trained again; the two finished units read nothing
    assert (resumed / IVF_DATA).read_bytes() == (reference / IVF_DATA).read_bytes()
    assert not any(f.exists() for f in files) and not (resumed / BUILD_DIR).exists()


def test_add_units_group_consecutive_files_few_enough_and_small_enough():
    from reader.retriever import part_groups

    groups = part_groups([1000] * 1000, code_bytes=56)  # 1M vectors, IVF-PQ codes: 64 units, not 1,000
    assert len(groups) == 64 and [i for g in groups for i in g] == list(range(1000))
    assert part_groups([1000] * 10, code_bytes=56) == [range(i, i + 1) for i in range(10)]  # fewer files: one each
    flat = part_groups([1000] * 1000, code_bytes=1536, tasks=2, part_bytes=100 * 2**20)  # 1.5 GB of codes and ids
    assert len(flat) == 15 and max(len(g) for g in flat) <= 67  # units of 100 MB at most


def test_workers_beyond_the_gpu_count_share_the_gpus_instead_of_waiting_forever():
    from workers.sizing import gpu_share

    assert gpu_share(0, 4) == 0.0  # a CPU cluster asks for no GPU
    assert gpu_share(8, 8) == gpu_share(8, 3) == 1.0  # one GPU each, as before
    assert gpu_share(1, 4) == 0.25 and gpu_share(8, 32) == 0.25
    # shares are floored to Ray's resolution, so that count of them fit the cluster's GPUs
    for gpus, count in ((1, 3), (2, 7), (3, 64), (1, 9999)):
        share = gpu_share(gpus, count)
        assert 0 < share < 1 and share * count <= gpus and round(share, 4) == share
