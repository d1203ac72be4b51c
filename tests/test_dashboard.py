"""The Ray dashboard a run prints can be opened: token authentication stays on, and past it Chromium
shows the node and the run's IndexWorker actors (`make browser` installs Chromium; without it the test fails,
unless BTR_SKIP_BROWSER is set)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from flows.dashboard import auth_token, look
from flows.shards import ray_dashboard
from reader.config import BTRConfig
from reader.load import ReaderSpec, load_reader
from tests.conftest import chromium
from workers.actor import start_workers, stop_workers
from workers.sizing import size_workers
from workers.cluster import LOCAL_RAY, loopback_ray
from workers.corpus import normalize
from workers.indexer import calibrate_codec


@pytest.fixture(scope="module")
def cluster_with_workers(tmp_path_factory, make_extractive_module, write_flow_inputs):
    """A local Ray as the flow starts it, with the flow's IndexWorker actors up (a tiny reader)."""
    chromium()  # fails without it (or skips where BTR_SKIP_BROWSER is set), before Ray starts
    reader = make_extractive_module(BTRConfig(split_layer=2, max_passage_tokens=64), hidden_size=32)
    root = write_flow_inputs(tmp_path_factory.mktemp("dashboard"), reader, 4)
    corpus = normalize(root / "corpus.jsonl", "jsonl", root / "work").path
    spec = ReaderSpec("extractive", str(root / "reader"), 2, 64)
    calibrate_codec(root / "staging", Path(corpus), load_reader(spec), 4)
    loopback_ray()
    ray.init(**LOCAL_RAY)
    workers = start_workers(size_workers(1, 0), str(root / "staging"), str(corpus), spec.to_dict(), str(root / "reader"), 4)
    try:
        ray.get([w.__ray_ready__.remote() for w in workers.values()])
        yield ray_dashboard()
    finally:
        stop_workers(workers)
        ray.shutdown()


def test_the_printed_dashboard_says_how_to_authenticate_and_the_token_opens_it(cluster_with_workers):
    printed = cluster_with_workers
    assert printed.startswith("http://127.0.0.1:")
    assert "ray get-auth-token" in printed  # token authentication is on, and the line says what to do
    url = printed.split()[0]
    with pytest.raises(TimeoutError):  # without the token: the dialog, no actors
        look(url, "actors", ["IndexWorker"], token="", timeout=15)
    assert auth_token()
    actors = look(url, "actors", ["IndexWorker", "btr-index-worker-0", "ALIVE"])
    assert "IndexWorker" in actors
    nodes = look(url, "cluster", ["127.0.0.1", "ALIVE"])
    assert "127.0.0.1" in nodes
