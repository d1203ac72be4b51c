"""`--update`: a new corpus into an existing index, published as its next version (``storage.versions``).

    normalize the new corpus -> match it by id and digest of title + text against the current version
      -> encode the changed and added passages on the same Ray workers as a build (new shards, after the last row)
      -> the retriever extended under its trained quantizer -> tombstones and digests -> the manifest, last

Unchanged passages keep their records and vectors untouched; deleted ones and the old text of edited
ones become deleted rows. The index keeps its reader, codec and retriever encoder: an update with
another is refused. Until the manifest is replaced the current version is served whole; a stopped
update reruns from its work folder (``INDEX/.work/update``: sealed shards are kept) to the same files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from reader.inputs import stopword_ids
from reader.load import ReaderSpec, load_reader
from reader.retriever_versions import extend_faiss
from storage.codec import file_digest
from storage.index import CODEC, FAISS_FILE, INFO_FILE, IVF_DATA, MANIFEST, Index, IndexWriter, Manifest
from storage.offline import OfflineMerge, merge_index
from storage.shard import DATA, SHARDS, ShardInfo, default_shard_size, shard_name, shard_number
from storage.tasks import Runner
from storage.versions import (
    DIGEST_SCHEMA, digest_table, files_folder, load_deleted, match, passage_digests, prune, read_passages, version_name,
    version_number, write_version_files,
)
from workers.corpus import SCHEMA, normalize
from workers.indexer import EMBEDDINGS, STAGING_LEVEL, ShardPlan
from workers.offline import index_tokenizer, merge_on_cluster

from .progress import PROGRESS_FILE, RunProgress
from .shards import flow_cluster, index_shards, ray_runner

UPDATE = "update"  # INDEX/.work/update: the update's normalized corpus, its plan, its staged shards
_BATCH = 4096  # passages read at a time to digest them


class Refused(ValueError):
    """A run the flow will not start (another reader, no passages, another corpus in the folder): one line, exit 2."""


def _texts(path: Path, columns: list[str]):
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH, columns=columns):
        yield batch


def corpus_digests(path: Path) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Ids and digests of a normalized corpus, in corpus order (read a batch at a time)."""
    ids, digests = [], []
    for batch in _texts(path, ["id", "title", "text"]):
        ids.append(batch.column("id"))
        digests.append(passage_digests(batch.column("title").to_pylist(), batch.column("text").to_pylist()))
    return pa.chunked_array(ids, pa.string()), np.concatenate(digests) if digests else np.zeros(0, np.uint64)


def current_passages(root: Path, manifest: Manifest) -> pa.Table:
    """(row, id, digest) of the current version's live passages: its file, or (version 1) read from its records."""
    table = read_passages(root, manifest.extra)
    if table is not None:
        return table
    index = Index.open(root)  # a build records no digests: read title and text once (not the bits), a block at a time
    rows, ids, digests = np.arange(len(index), dtype=np.int64), [], []
    for start in range(0, len(index), _BATCH):
        stored = index.texts(range(start, min(start + _BATCH, len(index))))
        ids += [s.id for s in stored]
        digests.append(passage_digests([s.title for s in stored], [s.text for s in stored]))
    return digest_table(rows, ids, np.concatenate(digests) if digests else np.zeros(0, np.uint64))


def check_same_reader(manifest: Manifest, spec: dict | None, encoder: str | None) -> tuple[dict, str]:
    """The index's reader spec and retriever encoder; Refused when the caller asks for others or the reader's weights
    changed. (The encoder is checked by name: its identity hashes weights a loader may initialize at random, as
    a checkpoint without a pooler gets one.)"""
    built = manifest.extra.get("reader_spec")
    if built is None:
        raise Refused("the index does not say which reader built it (no reader_spec): it cannot be updated")
    asked = {k: v for k, v in (spec or {}).items() if v is not None}
    differ = sorted(k for k, v in asked.items() if built.get(k) != v)
    if differ:
        raise Refused(f"an update keeps the index's reader and split; asked for another {', '.join(differ)} "
                      f"(the index has {', '.join(f'{k}={built.get(k)!r}' for k in differ)})")
    try:
        load_reader(ReaderSpec(**built)).identity().check_matches(manifest.reader)
    except ValueError as error:
        raise Refused(f"the reader that built the index has changed since: {error}") from None
    retriever = manifest.extra.get("retriever") or {}
    name = retriever.get("encoder", {}).get("name")
    if name is None:
        raise Refused("the index records no retriever encoder: it cannot be updated")
    if encoder is not None and encoder != name:
        raise Refused(f"an update keeps the index's retriever encoder ({name}); asked for {encoder}")
    return built, name


def start_work(work: Path, plan: dict) -> None:
    """Keep an earlier attempt of the same update (its sealed shards); discard one of another (nothing names it)."""
    path = work / "plan.json"
    if path.exists() and json.loads(path.read_text()) != plan:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(json.dumps(plan, indent=1))


@task(name="plan-update", cache_policy=NO_CACHE)
def plan_update(index: str, corpus: str | None, corpus_format: str, corpus_digest: str | None, spec: dict | None,
                encoder: str | None, shard_size: int) -> dict:
    """Normalize the new corpus, match it against the current version, write the corpus of the passages to encode."""
    root = Path(index)
    manifest = Manifest.load(root)
    spec, encoder = check_same_reader(manifest, spec, encoder)
    return plan_changes(root, manifest, corpus, corpus_format, corpus_digest, shard_size) | {"spec": spec, "encoder": encoder}


def plan_changes(root: Path, manifest: Manifest, corpus: str | None, corpus_format: str, corpus_digest: str | None,
                 shard_size: int) -> dict:
    """``plan_update`` once the reader is checked (``bench.scale`` calls it on an index of synthetic bits):
    the counts, the shards to encode and the files ``publish_version`` reads, in the update's work folder."""
    number = version_number(manifest.extra) + 1
    work = root / ".work" / UPDATE
    start_work(work, {"corpus": corpus, "format": corpus_format, "corpus_digest": corpus_digest, "version": number,
                       "manifest": file_digest(root / MANIFEST)})
    if not (work / "corpus.json").exists():
        (work / "corpus.json").write_text(json.dumps(normalize(corpus, corpus_format, work).__dict__))
    summary = json.loads((work / "corpus.json").read_text())
    if summary["passages"] == 0:
        raise Refused(f"{corpus or 'the corpus'}: no passages to index ({summary['rejects']} rejected; reasons in "
                      f"{summary['rejects_path']}); an update to an empty corpus would delete every passage")
    ids, digests = corpus_digests(Path(summary["path"]))
    changes = match(current_passages(root, manifest), ids, digests)
    counts = changes.counts()
    first_row, encode = manifest.passages, changes.encode
    # The workers read a shard's rows by their row numbers: rows before the update's first are left empty.
    delta = work / "delta.parquet"
    if not delta.exists():
        tmp, offset = work / ".tmp-delta.parquet", 0
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            for start in range(0, first_row, 1 << 16):
                empty = pa.nulls(min(1 << 16, first_row - start), pa.string())
                writer.write_table(pa.Table.from_arrays([empty] * 3, schema=SCHEMA))
            for batch in _texts(Path(summary["path"]), ["id", "title", "text"]):  # streamed: the corpus never whole in memory
                wanted = encode[(encode >= offset) & (encode < offset + batch.num_rows)] - offset
                if len(wanted):
                    writer.write_table(pa.Table.from_batches([batch.take(pa.array(wanted, pa.int64()))]).cast(SCHEMA))
                offset += batch.num_rows
        os.replace(tmp, delta)
    new_rows = np.arange(first_row, first_row + len(encode), dtype=np.int64)
    pq.write_table(pa.concat_tables([changes.kept, digest_table(new_rows, ids.take(pa.array(encode, pa.int64())),
                                                                 digests[encode])]), work / "digests.parquet")
    np.save(work / "removed.npy", changes.removed_rows)
    plans = new_shard_plans(manifest, first_row, len(encode), shard_size)
    return {"version": number, "first_row": first_row, "counts": counts, "plans": plans,
            "staging": str(work / "staging"), "corpus": str(delta), "manifest": file_digest(root / MANIFEST),
            "merge": merge_setting(manifest) is not None}


def new_shard_plans(manifest: Manifest, first_row: int, rows: int, shard_size: int = 0) -> list[dict]:
    """Shards for ``rows`` rows from ``first_row``, numbered after the index's last shard (a version's new shards may
    not reuse a name the previous version's readers map), of ``shard_size`` rows (0: the index's own)."""
    size = shard_size or manifest.extra.get("shard_size") or default_shard_size(rows)
    next_id = max((shard_number(s.name) for s in manifest.shards), default=-1) + 1
    return [ShardPlan(next_id + i, first, min(size, first_row + rows - first)).__dict__
            for i, first in enumerate(range(first_row, first_row + rows, size))]


def check_unchanged(root: Path, planned: dict, what: str) -> Manifest:
    """The index's manifest, Refused unless it is still the one the run was planned on."""
    if file_digest(root / MANIFEST) != planned["manifest"]:
        raise Refused(f"{root} was changed by another run since this {what} was planned; run it again")
    return Manifest.load(root)


def commit_version(root: Path, published: Manifest, work: Path) -> list[str]:
    """Publish ``published`` (its version files written): the current manifest kept in its version's folder for the
    readers still on it, the new one saved atomically (the commit point), then what no reader may still need pruned
    and the run's work folder removed. What was pruned."""
    number = version_number(published.extra)
    previous = root / version_name(number - 1) / MANIFEST
    previous.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / MANIFEST, previous)
    published.save(root)  # the commit point: readers opening the index from now on get this version
    removed = prune_versions(root, number)
    shutil.rmtree(work)
    return removed


def prune_versions(root: Path, current: int) -> list[str]:
    """``storage.versions.prune`` with version 1's retriever files."""
    return prune(root, current, (FAISS_FILE, INFO_FILE, IVF_DATA))


def stage_codec(root: Path, staging: Path) -> None:
    """The index's codec in the staging folder: new shards are coded as the index's are."""
    if not (staging / CODEC).exists():
        staging.mkdir(parents=True, exist_ok=True)
        shutil.copytree(root / CODEC, staging / ".tmp-codec")
        os.replace(staging / ".tmp-codec", staging / CODEC)


def merge_setting(manifest: Manifest) -> OfflineMerge | None:
    """The offline merge the index's shards went through (its settings as recorded), or None for a lossless index."""
    recorded = manifest.extra.get("offline_merge")
    if not recorded or not recorded.get("ratio"):
        return None
    return OfflineMerge(**{f.name: recorded[f.name] for f in fields(OfflineMerge) if f.name in recorded})


def merge_new_shards(root: Path, manifest: Manifest, settings: OfflineMerge, staging: Path, infos: list[ShardInfo],
                     run: Runner | None = None) -> tuple[Path, list[ShardInfo]]:
    """The update's lossless shards merged as the index's were, in a window of their own, with the index's codec.

    A token's occurrences in the new passages merge among themselves (a window: ``storage.offline``),
    at the index's ratio; the merged shards are written with the index's codec (its dictionary is
    not trained again), so the index stays one codec. On the flow's Ray (``run``: another runner); a
    rerun resumes the merge. Returns the folder of the merged shards and their infos.
    """
    work = staging.parent
    # the staged shards as an index part (rows from the update's first), for the merge
    IndexWriter(staging, manifest.reader).publish(infos, extra={}, first_row=infos[0].first_row)
    merged = work / "merged"
    stage_codec(root, merged)
    merge = merge_on_cluster if run is None else partial(merge_index, run=run)
    merged_manifest = merge(staging, merged, stopword_ids(index_tokenizer(root)), settings, scratch=work / "merge",
                            codec_final=True)
    return merged, list(merged_manifest.shards)


def link_shard(staging: Path, root: Path, info: ShardInfo) -> None:
    """A staged shard into the index's shards/ by hard links (its files are immutable), sealed by rename.

    The staged copy stays until the update is published, so a rerun skips it; a shard of the same name
    left by an update that was never published (no manifest names it) is replaced.
    """
    source, final = staging / SHARDS / info.name, root / SHARDS / info.name
    if (final / DATA).exists() and file_digest(final / DATA) == info.digest:
        return
    tmp = root / SHARDS / f".tmp-{info.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for item in source.iterdir():
        os.link(item, tmp / item.name)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)


@task(name="publish-update", cache_policy=NO_CACHE)
def publish_update(index: str, planned: dict, shards: list[dict]) -> dict:
    """Shards linked in, the retriever extended, tombstones and digests written, then the new manifest, atomically."""
    return publish_version(index, planned, shards)


def publish_version(index: str, planned: dict, shards: list[dict], run: Runner | None = None) -> dict:
    """``publish_update``'s work; the merge of the new shards on ``run`` (default: the connected Ray)."""
    root, staging = Path(index), Path(planned["staging"])
    work = staging.parent
    manifest = check_unchanged(root, planned, "update")
    infos = sorted((ShardInfo.from_dict(s) for s in shards), key=lambda s: s.first_row)
    settings, source = merge_setting(manifest), staging
    if settings is not None and infos:  # a merged index gets merged new shards: its bits/dim stays what it was
        source, infos = merge_new_shards(root, manifest, settings, staging, infos, run)
    for info in infos:
        link_shard(source, root, info)
    number, folder = planned["version"], root / version_name(planned["version"])
    embeddings = [staging / EMBEDDINGS / f"{shard_name(p['shard_id'])}.npy" for p in planned["plans"]]
    retriever = extend_faiss(files_folder(root, manifest.extra), folder, embeddings, planned["first_row"])
    current = load_deleted(root, manifest.extra, manifest.passages)
    deleted = np.union1d(current, np.load(work / "removed.npy")).astype(np.int64)
    passages = pq.read_table(work / "digests.parquet", schema=DIGEST_SCHEMA)
    record = write_version_files(root, number, deleted, passages) | {"counts": planned["counts"]}
    extra = manifest.extra | {"retriever": retriever, "version": record}
    published = Manifest(manifest.reader, manifest.codec, list(manifest.shards) + infos, extra=extra)
    removed = commit_version(root, published, work)
    return {"index": str(root), "version": number, "passages": published.passages - len(deleted), "rows": published.passages,
            "deleted_rows": len(deleted), "tokens": published.tokens, "new_shards": len(infos), "removed": removed} | planned["counts"]


@flow(name="update-index", log_prints=True)
def update_index(
    index: str, corpus: str | None, corpus_format: str = "sample", spec: dict | None = None, retriever: str | None = None,
    shard_size: int = 0, ray_address: str | None = None, workers: int = 0, batch_size: int = 32,
    corpus_digest: str | None = None, worker_threads: int = 0,
) -> dict:
    """Publish ``corpus`` as the next version of the index at ``index``: only its changes are encoded."""
    root = Path(index)
    progress = RunProgress.start(root / ".work" / PROGRESS_FILE, str(root), passages=0, shards=0)
    try:
        progress.phase("matching the new corpus")
        planned = plan_update(index, corpus, corpus_format, corpus_digest, spec, retriever, shard_size)
        counts = planned["counts"]
        print(f"update of {root} to version {planned['version']}: {counts['changed']} changed, {counts['added']} added, "
              f"{counts['deleted']} deleted, {counts['unchanged']} unchanged")
        if not (counts["changed"] or counts["added"] or counts["deleted"]):
            shutil.rmtree(Path(planned["staging"]).parent)
            # an update stopped after its manifest was renamed in left its clean-up undone: finish it
            prune_versions(root, planned["version"] - 1)
            progress.finish()
            print(f"nothing changed: {root} stays at version {planned['version'] - 1}")
            return {"index": index, "version": planned["version"] - 1} | counts
        progress.set(passages_total=counts["changed"] + counts["added"], shards_total=len(planned["plans"]))
        stage_codec(root, Path(planned["staging"]))
        with flow_cluster(ray_address):
            results = []
            if planned["plans"]:
                progress.phase("indexing shards")
                fanned = index_shards.with_options(task_runner=ray_runner(ray_address))(
                    plans=planned["plans"], staging=planned["staging"], corpus_path=planned["corpus"], spec=planned["spec"],
                    encoder=planned["encoder"], workers=workers, batch_size=batch_size, progress_path=str(progress.path),
                    worker_threads=worker_threads, level=STAGING_LEVEL if planned["merge"] else None,  # the merge codes them again
                )
                results = fanned["shards"]
                progress = RunProgress.load(progress.path)
            progress.phase("publishing the new version")
            published = publish_update(index, planned, [r["shard"] for r in results])
    except BaseException:
        progress.finish("failed")
        raise
    progress.finish()
    removed = f"; removed {', '.join(published['removed'])}" if published["removed"] else ""
    print(f"version {published['version']} of {root} published: {published['passages']} passages "
          f"({published['rows']} rows, {published['new_shards']} new shards, {published['deleted_rows']} deleted rows{removed})")
    return published
