"""The retriever build's peak disk: one add unit per shard (as it was), grouped units, and grouped units
that consume the embeddings (as the flow builds it).

    python -m bench.retriever_disk --shards 300 --factory IVF2000,PQ48np --json

Writes ``--shards`` embedding files of 1,000 random unit vectors (float16, as the workers store
them), builds the same index from them three times with ``reader.retriever.build_faiss_apart`` in
this process (the consuming build from a copy of the files, which it deletes), and reports each
build's peak disk (the index folder's and the embeddings' allocated blocks, sampled every 0.2 s: the
add units' files live in the index folder until their lists are merged), final size and time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.step_monitor import folder_bytes
from reader.retriever import build_faiss_apart

ROWS = 1000  # vectors a shard


def embedding_files(folder: Path, shards: int, dimension: int = 384) -> list[Path]:
    """``shards`` files of random unit vectors, float16 like the workers' embeddings."""
    rng, files = np.random.default_rng(0), []
    for shard in range(shards):
        vectors = rng.standard_normal((ROWS, dimension)).astype(np.float32)
        files.append(folder / f"shard-{shard:05d}.npy")
        np.save(files[-1], (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16))
    return files


def measured_build(files: list[Path], out: Path, factory: str, tasks: int | None, consume: bool = False) -> dict:
    """One build into ``out`` while a thread samples the size of ``out`` and of the embeddings' folder."""
    out.mkdir()
    peak, done = [0], threading.Event()
    footprint = lambda: folder_bytes(out) + folder_bytes(files[0].parent)  # noqa: E731

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], footprint())

    watcher = threading.Thread(target=watch)
    watcher.start()
    began = time.perf_counter()
    try:
        build_faiss_apart(files, out, {}, factory=factory, consume=consume, **({} if tasks is None else {"tasks": tasks}))
    finally:
        done.set()
        watcher.join()
    units = "one per shard" if tasks else "grouped, consuming the embeddings (the flow)" if consume else "grouped (default)"
    return {"units": units, "seconds": round(time.perf_counter() - began, 1),
            "peak_mb": round(max(peak[0], footprint()) / 2**20, 1), "final_mb": round(folder_bytes(out) / 2**20, 1),
            "embeddings_left_mb": round(folder_bytes(files[0].parent) / 2**20, 1)}


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.retriever_disk", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=300,
                        help=f"embedding files of {ROWS:,} random vectors (default: %(default)s)")
    parser.add_argument("--factory", default="IVF2000,PQ48np",
                        help="a faiss factory string, an IVF index (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, a line per build)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="btr-retriever-disk-") as work:
        (Path(work) / "embeddings").mkdir()
        files = embedding_files(Path(work) / "embeddings", args.shards)
        embeddings_mb = round(folder_bytes(Path(work) / "embeddings") / 2**20, 1)
        builds = [measured_build(files, Path(work) / name, args.factory, tasks)
                  for name, tasks in (("per-shard", args.shards), ("grouped", None))]
        copies = Path(shutil.copytree(Path(work) / "embeddings", Path(work) / "consumed"))
        builds.append(measured_build(sorted(copies.glob("*.npy")), Path(work) / "consuming", args.factory, None, consume=True))
    result = {"vectors": ROWS * args.shards, "factory": args.factory, "embeddings_mb": embeddings_mb, "builds": builds}
    print(json.dumps(result, indent=1) if args.json else "\n".join(
        f"{b['units']:>44}: peak {b['peak_mb']:,.1f} MB, final {b['final_mb']:,.1f} MB, {b['seconds']} s" for b in builds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
