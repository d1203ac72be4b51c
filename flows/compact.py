"""`--compact`: an index's deleted rows given back, its live rows published as its next version.

    plan (share of deleted rows against the threshold) -> copy the live rows' records into new shards (tasks on Ray)
      -> the retriever compacted (codes moved, nothing encoded) -> version files -> the manifest, last

Updates never rewrite a shard (``flows.update``): a deleted passage keeps its space and retrieval
skips it, so after many updates an index carries rows nobody reads. A compaction copies the live
rows, in order, into new shards (``storage.compact``): row r of the new version is the r-th live
row of the old; records and retriever codes are copied, not encoded again, so every question gets
the answer and citations it got before. The old shards stay for readers of the previous version
until the version after this one is published. Until the manifest is replaced the current version
is served whole; a stopped compaction reruns from ``INDEX/.work/compact`` (sealed shards kept).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from reader.retriever_versions import compact_faiss
from storage.codec import file_digest
from storage.compact import copy_rows
from storage.index import MANIFEST, Manifest
from storage.shard import ShardInfo
from storage.versions import (
    DIGEST_SCHEMA, files_folder, load_deleted, read_passages, version_name, version_number, write_version_files,
)
from workers.cluster import cluster_runner

from .progress import PROGRESS_FILE, RunProgress
from .shards import flow_cluster
from .update import Refused, check_unchanged, commit_version, link_shard, new_shard_plans, prune_versions, start_work

COMPACT = "compact"  # INDEX/.work/compact: the plan, the live rows, the new shards before they join the index
DEFAULT_THRESHOLD = 0.1  # compact once a tenth of the rows are deleted: a tenth of the shards' bytes is dead weight


def deleted_share(root: Path) -> tuple[int, int]:
    """(deleted rows, rows) of the index's current version."""
    manifest = Manifest.load(root)
    return len(load_deleted(root, manifest.extra, manifest.passages)), manifest.passages


def compaction_hint(root: Path, threshold: float = DEFAULT_THRESHOLD) -> str | None:
    """A line for the end of an update whose index passed the threshold, else None."""
    deleted, rows = deleted_share(root)
    if rows and deleted / rows >= threshold:
        return (f"{deleted:,} of {root}'s {rows:,} rows ({deleted / rows:.1%}) are deleted passages: --compact "
                "rewrites the index without them (docs/indexing.md#compacting-an-index)")
    return None


@task(name="plan-compaction", cache_policy=NO_CACHE)
def plan_compaction(index: str, threshold: float, shard_size: int) -> dict:
    """The compaction to do, or ``{"skip": ...}`` when the deleted share is below ``threshold``."""
    root = Path(index)
    manifest = Manifest.load(root)
    deleted = load_deleted(root, manifest.extra, manifest.passages)
    share = len(deleted) / manifest.passages if manifest.passages else 0.0
    counts = {"deleted_rows": len(deleted), "rows": manifest.passages, "share": round(share, 6)}
    if not len(deleted) or share < threshold:
        return {"skip": True, "version": version_number(manifest.extra)} | counts
    number, work = version_number(manifest.extra) + 1, root / ".work" / COMPACT
    start_work(work, {"version": number, "manifest": file_digest(root / MANIFEST), "shard_size": shard_size})
    live = np.setdiff1d(np.arange(manifest.passages, dtype=np.int64), deleted)
    np.save(work / "live.npy", live)
    units = new_shard_plans(manifest, 0, len(live), shard_size)  # row r of the new version: the r-th live row
    return {"skip": False, "version": number, "staging": str(work / "staging"), "units": units,
            "manifest": file_digest(root / MANIFEST)} | counts


@task(name="copy-live-rows", cache_policy=NO_CACHE)
def copy_live_rows(index: str, planned: dict, progress_path: str) -> list[dict]:
    """The live rows' records into the new shards: a task per shard on the run's Ray."""
    live = np.load(Path(planned["staging"]).parent / "live.npy")
    calls = [(index, planned["staging"], u["shard_id"], u["first_row"], live[u["first_row"] : u["first_row"] + u["rows"]].tolist())
             for u in planned["units"]]
    progress = RunProgress.load(Path(progress_path))
    return cluster_runner()(copy_rows, calls, lambda done, total: progress.set(shards_done=done))


@task(name="publish-compaction", cache_policy=NO_CACHE)
def publish_compaction(index: str, planned: dict, shards: list[dict]) -> dict:
    """New shards linked in, the retriever compacted, version files written, then the new manifest, atomically."""
    root, staging = Path(index), Path(planned["staging"])
    work = staging.parent
    manifest = check_unchanged(root, planned, "compaction")
    live = np.load(work / "live.npy")
    infos = sorted((ShardInfo.from_dict(s) for s in shards), key=lambda s: s.first_row)
    for info in infos:
        link_shard(staging, root, info)
    number, folder = planned["version"], root / version_name(planned["version"])
    retriever = compact_faiss(files_folder(root, manifest.extra), folder, live)
    passages = read_passages(root, manifest.extra)
    rows = passages["row"].to_numpy()
    renumbered = np.searchsorted(live, rows)
    if len(rows) != len(live) or not np.array_equal(live[renumbered], rows):
        raise ValueError(f"{root}: the version's passage digests do not list its live rows; run storage.verify")
    passages = passages.set_column(0, "row", pa.array(renumbered, pa.int64())).cast(DIGEST_SCHEMA)
    record = write_version_files(root, number, np.zeros(0, dtype=np.int64), passages) | {
        "compacted": {"from_version": number - 1, "rows_before": planned["rows"], "deleted_rows": planned["deleted_rows"]}}
    extra = manifest.extra | {"retriever": retriever, "version": record}
    removed = commit_version(root, Manifest(manifest.reader, manifest.codec, infos, extra=extra), work)
    return {"index": str(root), "version": number, "passages": len(live), "shards": len(infos),
            "bytes": sum(s.bytes for s in infos), "bytes_before": sum(s.bytes for s in manifest.shards), "removed": removed,
            "deleted_rows": planned["deleted_rows"], "rows_before": planned["rows"]}


@flow(name="compact-index", log_prints=True)
def compact_index(index: str, threshold: float = DEFAULT_THRESHOLD, shard_size: int = 0, ray_address: str | None = None) -> dict:
    """Publish the index at ``index`` without its deleted rows as its next version, once they are ``threshold`` of its rows."""
    if not 0 <= threshold <= 1:
        raise Refused(f"the compaction threshold is a share of the rows, 0 to 1; got {threshold}")
    root = Path(index)
    progress = RunProgress.start(root / ".work" / PROGRESS_FILE, str(root), passages=0, shards=0)
    try:
        progress.phase("planning the compaction")
        planned = plan_compaction(index, threshold, shard_size)
        share = f"{planned['deleted_rows']:,} deleted rows of {planned['rows']:,} ({planned['share']:.1%})"
        if planned["skip"]:
            shutil.rmtree(root / ".work" / COMPACT, ignore_errors=True)
            prune_versions(root, planned["version"])  # a run stopped after its manifest left its clean-up undone
            progress.finish()
            why = "nothing to compact" if not planned["deleted_rows"] else f"below the threshold {threshold:.0%} (--compact-threshold)"
            print(f"{root} stays at version {planned['version']}: {share}, {why}")
            return {"index": index, "version": planned["version"], "compacted": False} | planned
        live = planned["rows"] - planned["deleted_rows"]
        print(f"compaction of {root} to version {planned['version']}: {share}; {live:,} live rows into "
              f"{len(planned['units'])} new shards")
        progress.set(passages_total=live, shards_total=len(planned["units"]))
        with flow_cluster(ray_address):
            progress.phase("copying the live rows")
            shards = copy_live_rows(index, planned, str(progress.path))
            progress = RunProgress.load(progress.path)
            progress.phase("publishing the new version")
            published = publish_compaction(index, planned, shards)
    except BaseException:
        progress.finish("failed")
        raise
    progress.finish()
    removed = f"; removed {', '.join(published['removed'])}" if published["removed"] else ""
    print(f"version {published['version']} of {root} published: {published['passages']:,} passages in {published['shards']} "
          f"shards, {published['bytes']:,} bytes (the previous version's shards: {published['bytes_before']:,}, kept for "
          f"its readers until the next version){removed}")
    return published | {"compacted": True}
