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
import json
import os
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
from prefect.futures import wait
from prefect.logging.handlers import APILogWorker
from prefect.runtime import task_run
import prefect_ray
from prefect_ray.context import remote_options

from reader.load import ReaderSpec, load_reader
from reader.identity import ReaderIdentity
from reader.retriever import build_faiss
from storage.codec import CodecSettings
from storage.index import IndexWriter
from storage.offline import OfflineMerge, merge_index, stopword_ids
from storage.shard import ShardInfo
from workers.actor import start_workers, stop_workers
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
    """One shard on one Ray worker actor; returns its summary (paths, counts, digest, worker, attempts)."""
    result = ray.get(ray.get_actor(worker).index.remote(plan))
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


@flow(name="index-shards")
def index_shards(
    plans: list[dict], staging: str, corpus_path: str, spec: dict, encoder: str | None, workers: int, batch_size: int,
    progress_path: str | None = None,
) -> list[dict]:
    """Fan the shards out over Ray workers (started here, stopped at the end).

    Every couple of seconds the run's progress (``progress_path``), its Prefect progress artifact
    and, on a terminal, a progress bar are brought up to date from the shards finished and the
    workers' reports on the shards they are on.
    """
    logger = get_run_logger()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or gpus or 1
    logger.info("Ray: %s; %s worker(s), %s", ray.get_runtime_context().gcs_address, count, "1 GPU each" if gpus else "CPU")
    dashboard = ray_dashboard()
    if dashboard:
        logger.info("Ray dashboard: %s", dashboard)
    progress = RunProgress.load(Path(progress_path)) if progress_path else None
    if progress is not None:
        progress.set(ray_dashboard=dashboard)
    artifact = create_progress_artifact(0.0, key="index-shards-progress", description="shards indexed")
    workers_by_name = start_workers(count, gpus > 0, staging, corpus_path, spec, encoder, batch_size)
    names = list(workers_by_name)
    try:
        with remote_options(num_cpus=0):  # dispatchers only wait; the actors hold the CPUs/GPUs
            pending = [index_shard.submit(plan, names[i % count]) for i, plan in enumerate(plans)]
        results, start, tokens, shown = [], time.perf_counter(), 0, 0.0
        began, bar = time.time(), _Progress(len(plans))
        while pending:
            done, rest = wait(pending, timeout=2.0)
            pending = list(rest)
            for future in done:  # report shards as they finish, in any order
                results.append(future.result())
                tokens += 0 if results[-1]["skipped"] else results[-1]["tokens"]
                elapsed = time.perf_counter() - start
                bar.update(len(results), f"{tokens / max(elapsed, 1e-9):,.0f} tokens/s")
                logger.info("%d/%d shards done (%.0f tokens/s overall)", len(results), len(plans), tokens / max(elapsed, 1e-9))
            if progress is not None:
                finished = {r["shard"]["first_row"] for r in results}
                ids = {p["shard_id"] for p in plans if p["first_row"] in finished}
                progress.shards(results, in_flight(Path(staging), ids), began)
            share = 100.0 * len(results) / len(plans)
            if share > shown:
                update_progress_artifact(artifact, share)
                shown = share
        return sorted(results, key=lambda r: r["shard"]["first_row"])
    finally:
        stop_workers(workers_by_name)
        shutil.rmtree(Path(staging) / WORKER_FOLDER, ignore_errors=True)


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
        results = index_shards.with_options(task_runner=runner)(
            plans, str(staging), corpus_summary["path"], spec, retriever, workers, batch_size, str(progress.path)
        )
        progress = RunProgress.load(progress.path)  # the subflow brought it up to date
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
          f"{len(manifest['shards'])} shards ({skipped} resumed from an earlier run)")
    if offline_merge > 0:
        shutil.rmtree(work / "lossless" / "shards", ignore_errors=True)  # the merged copy is the index
    progress.finish()
    (out / RUN_FILE).write_text(json.dumps(progress.record, indent=1) + "\n")
    create_markdown_artifact(markdown_table(progress.record), key="index-shards", description=f"shards of {out}")
    return {"index": str(out), "passages": manifest["passages"], "tokens": manifest["tokens"], "resumed_shards": skipped}


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
