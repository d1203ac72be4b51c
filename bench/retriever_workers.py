"""The retriever build on one and on two Ray workers, side by side: training in units (``reader.quantizer``)
and the adds, against faiss's own one-process training of the same sample.

    python -m bench.retriever_workers --shards 1000 --factory IVF4000,PQ48np --json

Writes ``--shards`` embedding files of 1,000 random unit vectors (float16, as the workers store them;
``bench.retriever_disk``'s), then for each factory builds the index with
``reader.retriever.build_faiss_apart`` on a local Ray cluster (127.0.0.1) of 1 CPU and of 2 CPUs, and
times ``index.train`` (faiss, one process, all its threads) on the same sample. Per build: the seconds
to the end of training and in all, the ratio of two workers to one, and the SHA-256 of the merged
inverted lists (the same whatever the workers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from bench.retriever_disk import embedding_files
from reader.quantizer import sample_chunks
from reader.retriever import build_faiss_apart, ivf_lists, ivfpq_factory
from storage.index import IVF_DATA
from workers.cluster import cluster, cluster_runner

TRAIN_SIZE = 200_000  # build_faiss_apart's default sample


def built(files: list[Path], out: Path, factory: str, workers: int) -> dict:
    """One build on a fresh local cluster of ``workers`` CPUs."""
    out.mkdir(parents=True)
    marks: dict[str, float] = {}
    with cluster(cpus=workers, include_dashboard=False):
        start = time.perf_counter()

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "train":
                marks["train_s"] = round(time.perf_counter() - start, 1)

        build_faiss_apart(files, out, {"name": "random unit vectors"}, cluster_runner(), factory=factory, progress=progress)
        marks["total_s"] = round(time.perf_counter() - start, 1)
    digest = hashlib.sha256((out / IVF_DATA).read_bytes()).hexdigest()
    return {"workers": workers, **marks, "add_s": round(marks["total_s"] - marks["train_s"], 1), "ivfdata_sha256": digest}


def faiss_train_s(files: list[Path], factory: str) -> float:
    """faiss's ``index.train`` on the same first vectors, in this process (what the build did before)."""
    lengths = [len(np.load(f, mmap_mode="r")) for f in files]
    rows = [np.load(src, mmap_mode="r")[a:b] for chunk in sample_chunks([str(f) for f in files], lengths, TRAIN_SIZE)
            for src, a, b in chunk]
    sample = np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    start = time.perf_counter()
    index.train(sample)
    return round(time.perf_counter() - start, 1)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.retriever_workers", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1000,
                        help="embedding files of 1,000 random vectors (default: %(default)s)")
    parser.add_argument("--factory", action="append",
                        help="faiss factory, repeatable (default: the IVF-Flat and IVF-PQ the flow picks for the count)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, a line per factory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    count = args.shards * 1000
    factories = args.factory or [f"IVF{ivf_lists(count)},Flat", ivfpq_factory(count, 384)]
    result = {"passages": count, "train_size": TRAIN_SIZE, "threads": faiss.omp_get_max_threads(), "builds": {}}
    with tempfile.TemporaryDirectory(prefix="retriever-workers-") as tmp:
        files = embedding_files(Path(tmp), args.shards)
        for factory in factories:
            runs = [built(files, Path(tmp) / f"{factory}-{w}", factory, w) for w in (1, 2)]
            one, two = runs
            result["builds"][factory] = {
                "one_worker": one, "two_workers": two,
                "two_over_one_total": round(two["total_s"] / one["total_s"], 3),
                "two_over_one_train": round(two["train_s"] / one["train_s"], 3),
                "identical_lists": one["ivfdata_sha256"] == two["ivfdata_sha256"],
                "faiss_train_one_process_s": faiss_train_s(files, factory),
            }
            print(json.dumps({factory: result["builds"][factory]}), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1) if args.json else "\n".join(
        f"{f}: 1 worker {b['one_worker']['total_s']} s (train {b['one_worker']['train_s']}), 2 workers {b['two_workers']['total_s']} s "
        f"(train {b['two_workers']['train_s']}): {b['two_over_one_total']}x; faiss's own training {b['faiss_train_one_process_s']} s; "
        f"identical lists: {b['identical_lists']}" for f, b in result["builds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
