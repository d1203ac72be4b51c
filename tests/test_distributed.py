"""The steps after the workers on a Ray cluster (loopback, 1 and 2 CPUs): the same bytes as in one process, a lost task retried."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from storage.index import Manifest
from storage.offline import OfflineMerge, merge_index, stopword_ids
from storage.scale import _tokenizer, step_write
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
