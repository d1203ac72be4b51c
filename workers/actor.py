"""The Ray actor: one ShardIndexer per worker process, loaded once, serving many shards."""

from __future__ import annotations

import ray
import torch

from reader.load import ReaderSpec, quiet_library_logs

from .indexer import ShardIndexer, ShardPlan
from .quiet import verbose
from .sizing import Sizing

ACTOR_PREFIX = "btr-index-worker"


@ray.remote(max_restarts=3, max_task_retries=0)
class IndexWorker:
    """A Ray actor around ShardIndexer; Ray restarts it if its process dies.

    The call in flight then fails instead of waiting for the restart (which never comes when its node
    is gone and no other node has room), and the flow gives that shard to another worker.
    """

    def __init__(
        self, index_root: str, corpus: str, spec: dict, encoder: str | None, batch_size: int, sizing: dict,
        level: int | None = None,
    ) -> None:
        torch.set_num_threads(sizing["torch_threads"])  # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs reserved
        if not verbose():  # transformers' load reports (a retriever loaded from a QA checkpoint: a table of unused keys)
            quiet_library_logs()
        self.indexer = ShardIndexer(index_root, corpus, ReaderSpec(**spec), encoder, batch_size, sizing["pool_threads"], level)

    def index(self, plan: dict) -> dict:
        return self.indexer.index(ShardPlan(**plan))


def start_workers(
    sizing: Sizing, index_root: str, corpus: str, spec: dict, encoder: str | None, batch_size: int,
    level: int | None = None,
) -> dict[str, ray.actor.ActorHandle]:
    """Start ``sizing.workers`` named workers, each with its CPUs and share of a GPU (``size_workers``).

    ``level``: the zstd level of their records (None: the codec's). The caller keeps the returned handles
    for as long as the workers should live: Ray collects a named actor once no handle to it is left.
    """
    workers = {}
    for i in range(sizing.workers):
        name = f"{ACTOR_PREFIX}-{i}"
        options = {"name": name, "get_if_exists": True, "num_gpus": sizing.gpu, "num_cpus": sizing.cpus}
        workers[name] = IndexWorker.options(**options).remote(
            index_root, corpus, spec, encoder, batch_size, sizing.to_dict(), level
        )
    return workers


# How often a call to a worker checks that the worker is still up while it waits for the answer.
CHECK_EVERY_S = 2.0


def index_or_lost(worker: ray.actor.ActorHandle, plan: dict, check_every: float = CHECK_EVERY_S) -> dict | None:
    """The summary of shard ``plan`` from ``worker``, or None when the worker is lost meanwhile.

    A call in flight when the worker's node dies fails (``max_task_retries=0``), but one submitted
    just after is queued until the worker is restarted, which never happens when no node has room
    for it. So the wait checks the worker's state, and a call still queued to a restarting or dead
    worker is cancelled.
    """
    call = worker.index.remote(plan)
    while True:
        ready, _ = ray.wait([call], timeout=check_every)
        if ready:
            try:
                return ray.get(call)
            except ray.exceptions.RayActorError:
                return None
        if actor_state(worker) in ("RESTARTING", "DEAD"):
            ray.cancel(call)
            return None


def actor_state(worker: ray.actor.ActorHandle) -> str | None:
    """ALIVE, RESTARTING, DEAD, ... as the cluster's control store (GCS) has it; None if it cannot say.

    Ray's public state API (ray.util.state) goes through the dashboard, which a cluster may run
    without; this reads the GCS directly, through Ray's private state module.
    """
    try:
        from ray._private import state

        return state.actors(worker._actor_id.hex()).get("State")
    except Exception:  # noqa: BLE001 (a private API: if it moves, fall back to waiting)
        return None


def when_back(worker: ray.actor.ActorHandle) -> ray.ObjectRef:
    """A call that returns once ``worker`` is up again (after a restart), or raises RayActorError if it never will."""
    return worker.__ray_ready__.options(max_task_retries=-1).remote()


def stop_workers(workers: dict[str, ray.actor.ActorHandle]) -> None:
    for handle in workers.values():
        ray.kill(handle)
