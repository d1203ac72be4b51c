"""The flow `index-wikipedia`: a corpus in, a BTR index out.

    normalize the corpus -> plan shards -> fit the codec on a sample
      -> fan shards out over Ray workers (lower layers, bits, embeddings, sealed shards)
      -> faiss retriever index -> offline merge -> manifest, last

Run it as a deployment (`prefect deployment run index-wikipedia/local`, see prefect.yaml) or
directly: `python -m flows.index_wikipedia --index indexes/wikipedia-sample`. A rerun with the same
settings resumes: shards already sealed and verified are skipped.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .index_args import build_parser


if __name__ == "__main__":  # --help and a bad flag answer before the imports below (prefect, torch: seconds)
    build_parser().parse_args()

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from reader.inputs import stopword_ids
from reader.load import ReaderSpec, load_reader
from reader.retriever import build_faiss_apart
from storage.codec import CodecSettings, file_digest
from storage.identity import IncompatibleIndex, ReaderIdentity
from storage.index import INFO_FILE, MANIFEST, IndexWriter, Manifest
from storage.offline import OfflineMerge
from storage.shard import ShardInfo, default_shard_size
from workers.cluster import cluster_runner
from workers.corpus import CorpusError, corpus_format as format_of, normalize
from workers.indexer import (
    STAGING_LEVEL, ShardPlan, calibrate_codec, consume_embeddings, embedding_files, embeddings_consumed, plan_shards, resumed,
)
from workers.offline import merge_on_cluster
from workers.progress import read_json

from .console import command_started, quiet_console, wall_time_line
from .progress import PROGRESS_FILE, RUN_FILE, RunProgress, markdown_table
from .shards import flow_cluster, index_shards, ray_runner
from .compact import DEFAULT_THRESHOLD, compact_index, compaction_hint
from .update import Refused, update_index

def check_plan(work: Path, plan: dict) -> None:
    """Record what this index folder is being built from; refuse (Refused) to resume a build of something else.

    Resuming trusts sealed shards and the normalized corpus, so they must come from the same corpus
    (path and content digest: a file touched but not changed resumes), reader and shard settings.
    """
    path = work / "plan.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != plan:
            changed = sorted(k for k in plan.keys() | earlier.keys() if plan.get(k) != earlier.get(k))
            raise Refused(
                f"{work.parent} holds an unfinished or finished build with other settings ({', '.join(changed)} "
                "differ); choose another index folder, delete this one to start over, or add --update to publish "
                "the new corpus as its next version"
            )
    else:
        path.write_text(json.dumps(plan, indent=1))


def corpus_digest(source: Path | None, work: Path) -> str | None:
    """sha256 of the corpus file, remembered in ``work`` with its size and modification time (not read again until they change)."""
    if source is None or not source.exists():
        return None
    stat, cache = source.stat(), work / "corpus-digest.json"
    key = {"path": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if {k: known.get(k) for k in key} == key:
        return known["sha256"]
    digest = file_digest(source)
    cache.write_text(json.dumps(key | {"sha256": digest}))
    return digest


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
    if summary["passages"] == 0:  # before the codec, Ray or any shard: nothing to index is the corpus's fault
        raise Refused(f"{corpus or 'the corpus'}: no passages to index ({summary['rejects']} rejected; reasons in "
                      f"{summary['rejects_path']})")
    (Path(work) / "corpus.json").write_text(json.dumps(summary))
    logger.info("corpus: %s passages, %s rejected (reasons in %s)", summary["passages"], summary["rejects"], summary["rejects_path"])
    return summary


@task(name="fit-codec", cache_policy=NO_CACHE)
def fit_codec(staging: str, corpus_path: str, spec: dict, sample: int) -> dict:
    """Codec prototypes and dictionary from a sample; the reader's identity for the manifest."""
    reader = load_reader(ReaderSpec(**spec))
    kept = (Path(staging) / "codec" / "codec.json").exists()
    description = calibrate_codec(Path(staging), Path(corpus_path), reader, sample, CodecSettings())
    get_run_logger().info("codec: %s", "kept from an earlier attempt" if kept else f"fitted on the first {sample:,} passages at most")
    return {"codec": description, "reader": reader.identity().to_dict()}


@task(name="build-retriever", cache_policy=NO_CACHE)
def build_retriever(staging: str, index: str, plans: list[dict], encoder: str | None) -> dict:
    """The faiss retriever over every shard's embeddings: a task per shard on the run's Ray, lists merged on disk."""
    from reader.retriever import Encoder

    shards = [ShardPlan(**p) for p in plans]
    built = embeddings_consumed(Path(staging))
    if built is not None and (Path(index) / INFO_FILE).exists():  # an earlier attempt built it, then freed the disk
        get_run_logger().info("retriever: kept from an earlier attempt (faiss %s over %s passages)", built["factory"], built["count"])
        return built
    # consume: each add unit deletes its shards' embeddings once its part is written (the disk's peak is the
    # lossless shards + embeddings at the build's start, not + the build's parts); a stopped build resumes
    info = build_faiss_apart(embedding_files(Path(staging), shards), Path(index), Encoder(encoder).identity(), cluster_runner(),
                             consume=True)
    get_run_logger().info("retriever: faiss %s over %s passages", info["factory"], info["count"])
    consume_embeddings(Path(staging), shards, info)  # 1.5 KB a passage at d = 384: 32 GB at 21M
    return info


def merging_shards(staging: Path) -> list[dict] | None:
    """The lossless shards' summaries when an earlier run published them and began merging (its shards may be gone)."""
    if not (staging / MANIFEST).exists():
        return None
    return [resumed(info) for info in Manifest.load(staging).shards]


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
    # On the run's Ray cluster; a rerun after a crash resumes from the scratch folder's finished units.
    scratch = Path(staging).parent / "merge"
    # Each window's lossless shards go once merged: the disk holds the lossless copy and one window's scratch at most.
    manifest = merge_on_cluster(
        staging, index, stopword_ids(tokenizer), OfflineMerge(offline_ratio), scratch=scratch, consume_source=True
    )
    return manifest.to_dict()


@flow(name="index-wikipedia", log_prints=True)
def index_wikipedia(
    index: str = "indexes/wikipedia-sample",
    corpus: str | None = None,
    corpus_format: str = "auto",
    reader_checkpoint: str | None = None,
    reader_family: str = "extractive",
    split_layer: int | None = None,
    max_passage_tokens: int = 320,
    retriever: str | None = None,
    shard_size: int = 0,
    offline_merge: float = 0.2,
    codec_sample: int = 2000,
    ray_address: str | None = None,
    workers: int = 0,
    batch_size: int = 32,
    worker_threads: int = 0,
    update: bool = False,
    compact: bool = False,
    compact_threshold: float = DEFAULT_THRESHOLD,
) -> dict:
    """Index a corpus (default: the bundled Wikipedia sample) into a BTR index folder.

    ``shard_size`` 0: from the corpus size (``storage.shard.default_shard_size``: 1,000 up to 4M passages).
    ``update``: publish the corpus as the next version of the index already there (``flows.update``):
    only its changed, added and deleted passages cost work; reader and retriever stay the index's.
    ``compact``: rewrite the index without its deleted rows once they are ``compact_threshold`` of its rows
    (``flows.compact``); alone, no corpus is read; with ``update``, after it.
    """
    if compact and not update:
        return compact_index(index, compact_threshold, shard_size, ray_address)
    OfflineMerge(offline_merge)  # validate before any work
    corpus_format = format_of(corpus, corpus_format)  # "auto": from the file's name; recorded as found
    out = Path(index)
    work = out / ".work"
    staging = work / "lossless" if offline_merge > 0 else out
    work.mkdir(parents=True, exist_ok=True)
    spec = ReaderSpec(reader_family, reader_checkpoint, split_layer, max_passage_tokens).to_dict()
    source = Path(corpus) if corpus else None
    if update:
        default = ReaderSpec()  # the flags left at their defaults ask for nothing: the index's reader stays
        asked = {k: v for k, v in spec.items() if v != getattr(default, k)}
        updated = update_index(index, corpus, corpus_format, asked, retriever, shard_size, ray_address, workers, batch_size,
                               corpus_digest(source, work), worker_threads)
        if compact:
            return updated | {"compaction": compact_index(index, compact_threshold, shard_size, ray_address)}
        if hint := compaction_hint(out, compact_threshold):
            print(hint)
        return updated
    check_plan(work, {
        "corpus": str(source.resolve()) if source else None, "corpus_format": corpus_format,
        "corpus_sha256": corpus_digest(source, work),
        "reader": spec, "reader_weights": load_reader(ReaderSpec(**spec)).identity().weights_digest,
        "retriever": retriever, "shard_size": shard_size, "offline_merge": offline_merge,
        "codec_sample": codec_sample,
    })

    progress = RunProgress.start(work / PROGRESS_FILE, str(out), passages=0, shards=0)
    try:
        progress.phase("normalizing the corpus")
        corpus_summary = normalize_corpus(corpus, corpus_format, str(work))
        shard_size = shard_size or default_shard_size(corpus_summary["passages"])
        plans = [asdict(p) for p in plan_shards(corpus_summary["passages"], shard_size)]
        progress.set(passages_total=corpus_summary["passages"], shards_total=len(plans))
        progress.phase("fitting the codec")
        fitted = fit_codec(str(staging), corpus_summary["path"], spec, codec_sample)

        with flow_cluster(ray_address):  # one Ray for the shards, the retriever and the merge
            progress.phase("indexing shards")
            staged = merging_shards(staging) if offline_merge > 0 else None
            if staged is not None:  # a merge under way deletes the lossless shards it has merged: keep going
                fanned = {"shards": staged, "reassigned": 0}
                progress.shards(staged, [], time.time())
            else:
                fanned = index_shards.with_options(task_runner=ray_runner(ray_address))(
                    plans, str(staging), corpus_summary["path"], spec, retriever, workers, batch_size, str(progress.path),
                    worker_threads, STAGING_LEVEL if offline_merge > 0 else None,  # the merge codes staging shards again
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
    if offline_merge > 0:  # the merged copy is the index; a rerun indexes the corpus again
        shutil.rmtree(work / "lossless" / "shards", ignore_errors=True)
        (work / "lossless" / MANIFEST).unlink(missing_ok=True)
    progress.finish()
    (out / RUN_FILE).write_text(json.dumps(progress.record, indent=1) + "\n")
    create_markdown_artifact(markdown_table(progress.record), key="index-shards", description=f"shards of {out}")
    return {"index": str(out), "passages": manifest["passages"], "tokens": manifest["tokens"], "resumed_shards": skipped,
            "reassigned_shards": fanned["reassigned"]}


def main(argv: list[str] | None = None) -> None:
    began = command_started()
    args = build_parser().parse_args(argv)
    quiet_console()
    try:
        index_wikipedia(
        index=args.index, corpus=args.corpus, corpus_format=args.corpus_format, shard_size=args.shard_size,
        offline_merge=args.offline_merge, ray_address=args.ray_address, reader_checkpoint=args.reader_checkpoint,
        reader_family=args.reader_family, split_layer=args.split_layer, max_passage_tokens=args.max_passage_tokens, retriever=args.retriever,
        codec_sample=args.codec_sample, workers=args.workers, worker_threads=args.worker_threads, update=args.update,
        compact=args.compact, compact_threshold=args.compact_threshold,
        )
    except (Refused, CorpusError, IncompatibleIndex) as error:  # the input's fault: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    record = read_json(Path(args.index) / ".work" / PROGRESS_FILE) or {}
    print(wall_time_line(began, record.get("seconds")))

if __name__ == "__main__":
    main()
