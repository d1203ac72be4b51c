"""Fanning shards out over Ray: the task runner, the workers' dispatch loop, lost workers.

``index_shards`` is the subflow of `index-wikipedia` that runs here: each idle worker actor gets the
next shard, a lost worker's shard goes to another, and the run's progress is kept up to date.
"""

from __future__ import annotations

import collections
import os
import queue
import shutil
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

import prefect_ray
import ray
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.logging.handlers import APILogWorker
from prefect.runtime import task_run
from prefect_ray.context import remote_options
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.actor import index_or_lost, start_workers, stop_workers, when_back
from workers.sizing import size_workers
from workers.cluster import LOCAL_RAY, cluster, loopback_ray
from workers.progress import WORKER_FOLDER, in_flight
from workers.quiet import quiet

from .console import ray_logging_level, worker_console_env
from .progress import Printer, RunProgress


class RayTaskRunner(prefect_ray.RayTaskRunner):
    """prefect-ray's runner, with each task's logs sent before its Ray process may be stopped.

    Prefect ships log lines from a background worker every couple of seconds, and Ray stops a task
    process soon after it goes idle: the last lines of a task (its "Finished in state ..." too)
    were lost that way. Draining the log worker when the task returns keeps them.
    """

    @staticmethod
    def _run_prefect_task(*args, **kwargs):
        try:
            return prefect_ray.RayTaskRunner._run_prefect_task(*args, **kwargs)
        finally:
            APILogWorker.drain_all(timeout=10)


def ray_env() -> dict:
    """What Ray's processes are started with: quiet, and reporting to this run's Prefect API."""
    return {"env_vars": quiet() | worker_console_env() | {"PREFECT_API_URL": prefect_api_url()}}


def ray_runner(ray_address: str | None) -> RayTaskRunner:
    """The task runner for ``index_shards``: the cluster at ``ray_address``, else a local loopback Ray.

    Ray's processes report to this run's Prefect API, and phone nobody. Inside ``flow_cluster``, the
    cluster it connected to.
    """
    if not ray_address:
        loopback_ray()
    return RayTaskRunner(address=ray_address, init_kwargs=({} if ray_address else LOCAL_RAY) | {"runtime_env": ray_env()})


def flow_cluster(ray_address: str | None) -> AbstractContextManager:
    """The run's Ray, for every step from the shards on: the cluster at ``ray_address``, else a loopback one started here."""
    return cluster(ray_address, runtime_env=ray_env(), logging_level=ray_logging_level())


@task(name="index-shard", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def index_shard(plan: dict, worker: str) -> dict:
    """One shard on one Ray worker actor: its summary (paths, counts, digest, worker, attempts), or ``{"lost": worker}``.

    A worker is lost when its process dies or its node leaves the cluster while it holds the shard;
    the flow then gives the shard to another worker (a Prefect retry would wait on the same one).
    """
    try:
        handle = ray.get_actor(worker)
    except ValueError:  # dead for good: no actor by that name any more
        return {"lost": worker}
    result = index_or_lost(handle, plan)
    if result is None:
        get_run_logger().warning("worker %s was lost during shard %s", worker, plan["shard_id"])
        return {"lost": worker}
    if not result["skipped"]:
        get_run_logger().info(
            "shard %s: %s passages, %s tokens in %.1f s (%s passages/s, %s tokens/s) on %s",
            plan["shard_id"], result["passages"], result["tokens"], result["seconds"],
            result["passages_per_s"], result["tokens_per_s"], worker,
        )
    return result | {"worker": worker, "attempts": task_run.run_count}


def prefect_api_url() -> str:
    """The Prefect API this run reports to (a temporary server's, when none was configured).

    Ray's worker processes are given it, so their task runs and logs land in this run instead of
    in temporary servers of their own.
    """
    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def ray_dashboard() -> str | None:
    """Where the Ray dashboard of the connected cluster is, and how to get past its token dialog."""
    try:
        address = ray._private.worker.get_dashboard_url()
    except Exception:  # noqa: BLE001 (no dashboard: Ray without its dashboard extras)
        return None
    if not address:
        return None
    url = address if "://" in address else f"http://{address}"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return f"{url} (it asks for a token: paste the output of `ray get-auth-token`, run in this virtualenv)"
    return url


# How long a run whose workers are all lost waits for one to come back before it fails.
LOST_WORKERS_WAIT_S = 600.0


@flow(name="index-shards")
def index_shards(
    plans: list[dict], staging: str, corpus_path: str, spec: dict, encoder: str | None, workers: int, batch_size: int,
    progress_path: str, worker_threads: int = 0, level: int | None = None,
) -> dict:
    """Fan the shards out over Ray workers (started here, stopped at the end): their summaries, in row order.

    Each idle worker gets the next shard, so a shard whose worker is lost goes to another. A lost
    worker gets no more shards until it answers again: Ray restarts a worker whose process died,
    but one whose node left the cluster may find no room anywhere else.

    Every couple of seconds the run's progress (``progress_path``), and on a terminal its status
    line, are brought up to date from the shards finished and the workers' reports on the shards
    they are on; the Prefect progress artifact moves with each shard finished. ``workers`` and
    ``worker_threads`` (CPUs a worker) override ``size_workers``' choice; ``level``: the records' zstd level.
    """
    logger = get_run_logger()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    sizing = size_workers(int(ray.available_resources().get("CPU", 1)), gpus, workers, worker_threads)
    nodes = sum(node["Alive"] for node in ray.nodes())
    logger.info("Ray: %s, %s node(s), %s GPU(s); %s", ray.get_runtime_context().gcs_address, nodes, gpus, sizing.describe())
    dashboard = ray_dashboard()
    if dashboard:
        logger.info("Ray dashboard: %s", dashboard)
    progress = RunProgress.load(Path(progress_path))
    progress.set(ray_dashboard=dashboard)
    printer = Printer(sys.stderr) if sys.stderr.isatty() else None  # off a terminal the logs say it
    artifact = create_progress_artifact(0.0, key="index-shards-progress", description="shards indexed")
    handles = start_workers(sizing, staging, corpus_path, spec, encoder, batch_size, level)
    # Dispatchers only wait: no CPU, and on this process's node (losing it loses the flow anyway).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    todo, idle = collections.deque(plans), list(handles)
    running: dict = {}  # Prefect future -> (plan, worker)
    finished: queue.Queue = queue.Queue()
    lost: dict[str, ray.ObjectRef] = {}  # worker -> a call that answers once it is back
    results, reassigned, tokens, start = [], 0, 0, time.perf_counter()
    began, reported = time.time(), 0.0
    try:
        while todo or running:
            with remote_options(num_cpus=0, scheduling_strategy=here):
                while todo and idle:
                    plan, worker = todo.popleft(), idle.pop(0)
                    future = index_shard.submit(plan, worker)
                    running[future] = plan, worker
                    future.add_done_callback(finished.put)
            idle += _returned_workers(lost, wait=0.0 if running or idle else LOST_WORKERS_WAIT_S, logger=logger)
            if not running and not idle:
                raise RuntimeError(
                    f"every Ray worker was lost and none came back within {LOST_WORKERS_WAIT_S:.0f} s "
                    f"({len(todo)} of {len(plans)} shards left); rerun the flow: it keeps every shard already sealed"
                )
            if time.monotonic() - reported >= 2.0:
                ids = {p["shard_id"] for p in plans} - {plan["shard_id"] for plan, _ in running.values()}
                progress.shards(results, in_flight(Path(staging), ids), began)
                if printer is not None:
                    printer.show(progress.record)
                reported = time.monotonic()
            try:
                future = finished.get(timeout=1.0)
            except queue.Empty:
                continue
            plan, worker = running.pop(future)
            result = future.result()
            if "lost" in result:
                reassigned += 1
                todo.appendleft(plan)
                lost[worker] = when_back(handles[worker])
                logger.warning("shard %s goes back to the queue; worker %s gets no more until it answers", plan["shard_id"], worker)
                continue
            idle.append(worker)
            results.append(result)
            tokens += 0 if result["skipped"] else result["tokens"]
            elapsed = time.perf_counter() - start
            logger.info("%d/%d shards done (%.0f tokens/s overall)", len(results), len(plans), tokens / max(elapsed, 1e-9))
            update_progress_artifact(artifact, 100.0 * len(results) / len(plans))
            reported = 0.0  # report a finished shard at once
        progress.shards(results, [], began)
        if printer is not None:
            printer.show(progress.record)
            printer.stream.write("\n")
        if reassigned:
            logger.warning("%d shard(s) were given to another worker after theirs was lost", reassigned)
        return {"shards": sorted(results, key=lambda r: r["shard"]["first_row"]), "reassigned": reassigned}
    finally:
        stop_workers(handles)
        shutil.rmtree(Path(staging) / WORKER_FOLDER, ignore_errors=True)


def _returned_workers(lost: dict[str, ray.ObjectRef], wait: float, logger) -> list[str]:
    """Lost workers that answer again (removed from ``lost``), waiting up to ``wait`` s for the first."""
    if not lost:
        return []
    ray.wait(list(lost.values()), num_returns=1, timeout=wait)
    back = []
    for worker, probe in list(lost.items()):
        if not ray.wait([probe], timeout=0)[0]:
            continue
        del lost[worker]
        try:
            ray.get(probe)
        except ray.exceptions.RayActorError:
            logger.warning("worker %s is gone for good", worker)
            continue
        logger.info("worker %s is back", worker)
        back.append(worker)
    return back
