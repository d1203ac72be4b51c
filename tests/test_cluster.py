"""index-wikipedia on a real two-node Ray cluster (a head and a second node, each its own raylet and
object store, all on 127.0.0.1) that loses its second node mid-run: SIGKILL to that node's raylet.

The run completes on the head alone and its shards are byte for byte those of a single-node run.
About two minutes on 2 busy cores (a Prefect server, two flow runs, three Ray start-ups), so it runs
with `make bench`, not `make test`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from reader.config import BTRConfig
from storage.shard import SHARDS
from storage.verify import main as verify_main

PASSAGES = 300
SHARD_SIZE = 10  # 30 shards
# Ray declares a node dead after its health checks fail: about 15 s with the defaults, longer than
# this whole run takes after the kill (the lost node's worker goes on serving until then). Here ~2 s.
FAST_DEATH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_extractive_module, write_flow_inputs):
    """A JSONL corpus of a few hundred sample articles and a tiny reader checkpoint on disk."""
    reader = make_extractive_module(BTRConfig(split_layer=2, max_passage_tokens=96), hidden_size=64)
    return write_flow_inputs(tmp_path_factory.mktemp("cluster"), reader, PASSAGES)


def run_flow(root: Path, index: Path, **options) -> dict:
    from flows.index_wikipedia import index_wikipedia

    return index_wikipedia(
        index=str(index), corpus=str(root / "corpus.jsonl"), corpus_format="jsonl",
        reader_checkpoint=str(root / "reader"), retriever=str(root / "reader"), max_passage_tokens=96,
        split_layer=2, shard_size=SHARD_SIZE, codec_sample=PASSAGES, **options,
    )


def digests(index: Path) -> list[str]:
    return [s["digest"] for s in json.loads((index / "manifest.json").read_text())["shards"]]


def free_port(start: int) -> int:
    """The first port from ``start`` on that nothing listens on at 127.0.0.1."""
    for port in range(start, start + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {start}..{start + 199}")


@contextmanager
def two_node_cluster():
    """A head and a second Ray node, 1 CPU each, as separate processes on 127.0.0.1; torn down after.

    ``ray.cluster_utils.Cluster`` starts each node's GCS / raylet / object store as its own processes
    and stops exactly those. Both nodes live in a temporary Ray folder of their own, so no other Ray
    on this machine is found by, or finds, this one.
    """
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    folder = tempfile.mkdtemp(prefix="btr-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    os.environ["RAY_TMPDIR"] = folder
    # Loopback only: otherwise Ray swaps 127.0.0.1 for the machine's outward address.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    memory = 100 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": memory, "include_dashboard": False,
        "gcs_server_port": free_port(6390), "dashboard_agent_listen_port": free_port(8275),
        "_system_config": FAST_DEATH,
    })
    try:
        second = cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1, object_store_memory=memory)
        yield cluster, second
    finally:
        cluster.shutdown()
        del os.environ["RAY_TMPDIR"]
        shutil.rmtree(folder, ignore_errors=True)


def kill_when_sealed(index: Path, raylet, seen: dict) -> None:
    """SIGKILL ``raylet`` once the first shard of ``index`` is sealed, noting what the cluster looked like."""
    import ray

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        sealed = [p for p in (index / ".work" / "lossless" / SHARDS).glob("shard-*")] if index.exists() else []
        if sealed:
            # Two workers of 1 CPU each on two nodes of 1 CPU each: one of them is on the second node.
            seen["cpus"] = ray.cluster_resources().get("CPU"), ray.available_resources().get("CPU", 0.0)
            seen["nodes"] = sum(node["Alive"] for node in ray.nodes())
            seen["sealed"] = len(sealed)
            os.kill(raylet.pid, signal.SIGKILL)
            return
        time.sleep(0.05)


@pytest.mark.bench
def test_a_two_node_run_that_loses_its_second_node_completes_with_the_single_node_shards(setup, prefect_server, tmp_path):
    single = run_flow(setup, tmp_path / "single")  # a local, single-node Ray (the flow's default)
    assert single["passages"] == PASSAGES and single["reassigned_shards"] == 0

    with two_node_cluster() as (cluster, second):
        from ray._private.ray_constants import PROCESS_TYPE_RAYLET

        raylet = second.all_processes[PROCESS_TYPE_RAYLET][0].process
        seen: dict = {}
        killer = threading.Thread(target=kill_when_sealed, args=(tmp_path / "multi", raylet, seen), daemon=True)
        killer.start()
        multi = run_flow(setup, tmp_path / "multi", ray_address=cluster.address, workers=2)
        killer.join(timeout=10)
        assert raylet.wait(timeout=10) == -signal.SIGKILL  # the second node's raylet really died, by SIGKILL

    assert seen["nodes"] == 2 and seen["cpus"] == (2.0, 0.0)  # both nodes up, a worker on each
    assert seen["sealed"] < PASSAGES // SHARD_SIZE  # killed mid-run
    assert multi["passages"] == PASSAGES
    assert multi["reassigned_shards"] >= 1  # the shard the second node held was finished on the head
    assert digests(tmp_path / "multi") == digests(tmp_path / "single")
    assert verify_main([str(tmp_path / "multi")]) == 0
