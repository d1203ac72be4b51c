"""The flow `index-wikipedia`: a corpus in, a BTR index out.

    normalize the corpus -> plan shards -> fit the codec on a sample
      -> fan shards out over Ray workers (lower layers, bits, embeddings, sealed shards)
      -> faiss retriever index -> offline merge -> manifest, last

Run it as a deployment (`prefect deployment run index-wikipedia/local`, see prefect.yaml) or
directly: `python -m flows.index_wikipedia --index indexes/wikipedia-sample`. A rerun with the same
settings resumes: shards already sealed and verified are skipped.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import ray
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.logging.handlers import APILogWorker
from prefect.runtime import task_run
import prefect_ray
from prefect_ray.context import remote_options
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from reader.load import ReaderSpec, load_reader
from reader.identity import ReaderIdentity
from reader.retriever import build_faiss
from storage.codec import CodecSettings
from storage.index import IndexWriter
from storage.offline import OfflineMerge, merge_index, stopword_ids
from storage.shard import ShardInfo
from workers.actor import index_or_lost, start_workers, stop_workers, when_back
from workers.indexer import ShardPlan, calibrate_codec, plan_shards, shard_embeddings

from .corpus import normalize
from .progress import PROGRESS_FILE, RUN_FILE, WORKER_FOLDER, RunProgress, in_flight, markdown_table
from .quiet import quiet

# A local Ray listens on loopback only, dashboard included (on 8265, or the next free port; the
# task runner logs its URL).
LOCAL_RAY = {"_node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1"}


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


def _loopback_ray() -> None:
    """Make a local Ray single-node and loopback-only (its default picks the machine's outward IP).

    Ray reads this switch at import; the environment carries it to Ray's own processes and the
    constant to this one. A cluster given by address is left alone.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def check_plan(work: Path, plan: dict) -> None:
    """Record what this index folder is being built from; refuse to resume a build of something else.

    Resuming trusts sealed shards and the normalized corpus, so they must come from the same corpus
    file (path, size, modification time), reader and shard settings.
    """
    path = work / "plan.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != plan:
            changed = sorted(k for k in plan.keys() | earlier.keys() if plan.get(k) != earlier.get(k))
            raise ValueError(
                f"{work.parent} holds an unfinished or finished build with other settings ({', '.join(changed)} "
                "differ); choose another index folder, or delete this one to start over"
            )
    else:
        path.write_text(json.dumps(plan, indent=1))


@task(name="normalize-corpus", cache_policy=NO_CACHE)
def normalize_corpus(corpus: str | None, corpus_format: str, work: str) -> dict:
    """The corpus as passages.parquet (skipped when an earlier run left it), rejects counted."""
    logger = get_run_logger()
    target = Path(work) / "passages.parquet"
    if target.exists() and (Path(work) / "corpus.json").exists():
        summary = json.loads((Path(work) / "corpus.json").read_text())
        logger.info("corpus already normalized: %s passages, %s rejected", summary["passages"], summary["rejects"])
        return summary
    summary = asdict(normalize(corpus, corpus_format, work))
    (Path(work) / "corpus.json").write_text(json.dumps(summary))
    logger.info("corpus: %s passages, %s rejected (reasons in %s)", summary["passages"], summary["rejects"], summary["rejects_path"])
    return summary


@task(name="fit-codec", cache_policy=NO_CACHE)
def fit_codec(staging: str, corpus_path: str, spec: dict, sample: int) -> dict:
    """Codec prototypes and dictionary from a sample; the reader's identity for the manifest."""
    reader = load_reader(ReaderSpec(**spec))
    description = calibrate_codec(Path(staging), Path(corpus_path), reader, sample, CodecSettings())
    return {"codec": description, "reader": reader.identity().to_dict()}


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
    progress_path: str | None = None,
) -> dict:
    """Fan the shards out over Ray workers (started here, stopped at the end): their summaries, in row order.

    Each idle worker gets the next shard, so a shard whose worker is lost goes to another. A lost
    worker gets no more shards until it answers again: Ray restarts a worker whose process died,
    but one whose node left the cluster may find no room anywhere else.

    Every couple of seconds the run's progress (``progress_path``), its Prefect progress artifact
    and, on a terminal, a progress bar are brought up to date from the shards finished and the
    workers' reports on the shards they are on.
    """
    logger = get_run_logger()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or gpus or 1
    nodes = sum(node["Alive"] for node in ray.nodes())
    logger.info("Ray: %s, %s node(s); %s worker(s), %s", ray.get_runtime_context().gcs_address, nodes, count,
                "1 GPU each" if gpus else "CPU")
    dashboard = ray_dashboard()
    if dashboard:
        logger.info("Ray dashboard: %s", dashboard)
    progress = RunProgress.load(Path(progress_path)) if progress_path else None
    if progress is not None:
        progress.set(ray_dashboard=dashboard)
    artifact = create_progress_artifact(0.0, key="index-shards-progress", description="shards indexed")
    handles = start_workers(count, gpus > 0, staging, corpus_path, spec, encoder, batch_size)
    # Dispatchers only wait: no CPU, and on this process's node (losing it loses the flow anyway).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    todo, idle = collections.deque(plans), list(handles)
    running: dict = {}  # Prefect future -> (plan, worker)
    finished: queue.Queue = queue.Queue()
    lost: dict[str, ray.ObjectRef] = {}  # worker -> a call that answers once it is back
    results, reassigned, tokens, start = [], 0, 0, time.perf_counter()
    began, bar, shown, reported = time.time(), _Progress(len(plans)), 0.0, 0.0
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
            if progress is not None and time.monotonic() - reported >= 2.0:
                ids = {p["shard_id"] for p in plans} - {plan["shard_id"] for plan, _ in running.values()}
                progress.shards(results, in_flight(Path(staging), ids), began)
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
            bar.update(len(results), f"{tokens / max(elapsed, 1e-9):,.0f} tokens/s")
            logger.info("%d/%d shards done (%.0f tokens/s overall)", len(results), len(plans), tokens / max(elapsed, 1e-9))
            reported = 0.0  # report a finished shard at once
            share = 100.0 * len(results) / len(plans)
            if share > shown:
                update_progress_artifact(artifact, share)
                shown = share
        if progress is not None:
            progress.shards(results, [], began)
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


class _Progress:
    """A progress bar when stderr is a terminal; otherwise silent (the logs carry the progress)."""

    def __init__(self, total: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="shard")

    def update(self, done: int, note: str) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(note)
            if done == self.bar.total:
                self.bar.close()


@task(name="build-retriever", cache_policy=NO_CACHE)
def build_retriever(staging: str, index: str, plans: list[dict], encoder: str | None) -> dict:
    from reader.retriever import Encoder

    parts = shard_embeddings(Path(staging), [ShardPlan(**p) for p in plans])
    info = build_faiss(parts, Path(index), Encoder(encoder).identity())
    get_run_logger().info("retriever: faiss %s over %s passages", info["factory"], info["count"])
    return info


@task(name="publish", cache_policy=NO_CACHE)
def publish(
    staging: str, index: str, reader: dict, shards: list[dict], extra: dict, offline_ratio: float, spec: dict
) -> dict:
    """Write the manifest last: directly, or after the offline merge into the final folder."""
    identity = ReaderIdentity.from_dict(reader)
    infos = [ShardInfo.from_dict(s) for s in shards]
    staged = IndexWriter(staging, identity).publish(infos, extra=extra)
    if Path(staging).resolve() == Path(index).resolve():
        return staged.to_dict()
    tokenizer = load_reader(ReaderSpec(**spec)).tokenizer
    manifest = merge_index(staging, index, stopword_ids(tokenizer), OfflineMerge(offline_ratio))
    return manifest.to_dict()


@flow(name="index-wikipedia", log_prints=True)
def index_wikipedia(
    index: str = "indexes/wikipedia-sample",
    corpus: str | None = None,
    corpus_format: str = "sample",
    reader_checkpoint: str | None = None,
    reader_family: str = "extractive",
    split_layer: int | None = None,
    max_passage_tokens: int = 320,
    retriever: str | None = None,
    shard_size: int = 1000,
    offline_merge: float = 0.2,
    codec_sample: int = 2000,
    ray_address: str | None = None,
    workers: int = 0,
    batch_size: int = 32,
) -> dict:
    """Index a corpus (default: the bundled Wikipedia sample) into a BTR index folder."""
    OfflineMerge(offline_merge)  # validate before any work
    out = Path(index)
    work = out / ".work"
    staging = work / "lossless" if offline_merge > 0 else out
    work.mkdir(parents=True, exist_ok=True)
    spec = ReaderSpec(reader_family, reader_checkpoint, split_layer, max_passage_tokens).to_dict()
    source = Path(corpus) if corpus else None
    stat = source.stat() if source is not None and source.exists() else None
    check_plan(work, {
        "corpus": str(source.resolve()) if source else None, "corpus_format": corpus_format,
        "corpus_bytes": stat.st_size if stat else None, "corpus_mtime": stat.st_mtime if stat else None,
        "reader": spec, "reader_weights": load_reader(ReaderSpec(**spec)).identity().weights_digest,
        "retriever": retriever, "shard_size": shard_size, "offline_merge": offline_merge,
        "codec_sample": codec_sample,
    })

    progress = RunProgress.start(work / PROGRESS_FILE, str(out), passages=0, shards=0)
    try:
        progress.phase("normalizing the corpus")
        corpus_summary = normalize_corpus(corpus, corpus_format, str(work))
        plans = [asdict(p) for p in plan_shards(corpus_summary["passages"], shard_size)]
        progress.set(passages_total=corpus_summary["passages"], shards_total=len(plans))
        progress.phase("fitting the codec")
        fitted = fit_codec(str(staging), corpus_summary["path"], spec, codec_sample)

        if not ray_address:
            _loopback_ray()
        # Ray's processes report to this run's Prefect API, and phone nobody.
        runtime_env = {"env_vars": quiet() | {"PREFECT_API_URL": prefect_api_url()}}
        runner = RayTaskRunner(
            address=ray_address,
            init_kwargs=({} if ray_address else LOCAL_RAY) | {"runtime_env": runtime_env},
        )
        progress.phase("indexing shards")
        fanned = index_shards.with_options(task_runner=runner)(
            plans, str(staging), corpus_summary["path"], spec, retriever, workers, batch_size, str(progress.path)
        )
        results = fanned["shards"]
        progress = RunProgress.load(progress.path)  # the subflow brought it up to date
        progress.set(reassigned_shards=fanned["reassigned"])
        progress.phase("building the retriever")
        retriever_info = build_retriever(str(staging), str(out), plans, retriever)
        extra = {
            "reader_spec": spec,
            "corpus": {k: corpus_summary[k] for k in ("passages", "rejects")} | {"format": corpus_format, "source": corpus},
            "retriever": retriever_info,
            "shard_size": shard_size,
        }
        progress.phase("offline merge and publish" if offline_merge > 0 else "publishing")
        manifest = publish(str(staging), str(out), fitted["reader"], [r["shard"] for r in results], extra, offline_merge, spec)
    except BaseException:
        progress.finish("failed")
        raise
    skipped = sum(r["skipped"] for r in results)
    print(f"index ready at {out}: {manifest['passages']} passages, {manifest['tokens']} tokens, "
          f"{len(manifest['shards'])} shards ({skipped} resumed from an earlier run, {fanned['reassigned']} given to "
          "another worker after theirs was lost)")
    if offline_merge > 0:
        shutil.rmtree(work / "lossless" / "shards", ignore_errors=True)  # the merged copy is the index
    progress.finish()
    (out / RUN_FILE).write_text(json.dumps(progress.record, indent=1) + "\n")
    create_markdown_artifact(markdown_table(progress.record), key="index-shards", description=f"shards of {out}")
    return {"index": str(out), "passages": manifest["passages"], "tokens": manifest["tokens"], "resumed_shards": skipped,
            "reassigned_shards": fanned["reassigned"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.index_wikipedia", description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="indexes/wikipedia-sample")
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--corpus-format", default="sample")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--offline-merge", type=float, default=0.2)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--reader-checkpoint", default=None, help="reader to index with (default: the trained default)")
    parser.add_argument("--split-layer", type=int, default=None, help="k (default: the reader's own)")
    parser.add_argument("--max-passage-tokens", type=int, default=320)
    parser.add_argument("--retriever", default=None, help="passage encoder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--codec-sample", type=int, default=2000, help="passages the codec is fitted on")
    parser.add_argument("--workers", type=int, default=0, help="Ray workers (default: one per GPU, else one)")
    args = parser.parse_args(argv)
    index_wikipedia(
        index=args.index, corpus=args.corpus, corpus_format=args.corpus_format, shard_size=args.shard_size,
        offline_merge=args.offline_merge, ray_address=args.ray_address, reader_checkpoint=args.reader_checkpoint,
        split_layer=args.split_layer, max_passage_tokens=args.max_passage_tokens, retriever=args.retriever,
        codec_sample=args.codec_sample, workers=args.workers,
    )

if __name__ == "__main__":
    main()
