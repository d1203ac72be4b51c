"""The retriever build's peak disk: one add unit per shard (as it was) against grouped units (as it is).

    python -m bench.retriever_disk --shards 300 --factory IVF2000,PQ48np --json

Writes ``--shards`` embedding files of 1,000 random unit vectors (float16, as the workers store
them), builds the same index from them twice with ``reader.retriever.build_faiss_apart`` in this
process, and reports each build's peak disk (the index folder's allocated blocks, sampled every
0.2 s: the add units' files live there until their lists are merged), final size and time.
"""

from __future__ import annotations

import argparse
import json
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


def measured_build(files: list[Path], out: Path, factory: str, tasks: int | None) -> dict:
    """One build into ``out`` while a thread samples the folder's size."""
    out.mkdir()
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], folder_bytes(out))

    watcher = threading.Thread(target=watch)
    watcher.start()
    began = time.perf_counter()
    try:
        build_faiss_apart(files, out, {}, factory=factory, **({} if tasks is None else {"tasks": tasks}))
    finally:
        done.set()
        watcher.join()
    return {"units": "one per shard" if tasks else "grouped (default)", "seconds": round(time.perf_counter() - began, 1),
            "peak_mb": round(max(peak[0], folder_bytes(out)) / 2**20, 1), "final_mb": round(folder_bytes(out) / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retriever_disk", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=300, help=f"embedding files of {ROWS:,} vectors")
    parser.add_argument("--factory", default="IVF2000,PQ48np", help="a faiss factory string (an IVF index)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="btr-retriever-disk-") as work:
        files = embedding_files(Path(work), args.shards)
        builds = [measured_build(files, Path(work) / name, args.factory, tasks)
                  for name, tasks in (("per-shard", args.shards), ("grouped", None))]
    result = {"vectors": ROWS * args.shards, "factory": args.factory, "builds": builds}
    print(json.dumps(result, indent=1) if args.json else "\n".join(
        f"{b['units']:>20}: peak {b['peak_mb']:,.1f} MB, final {b['final_mb']:,.1f} MB, {b['seconds']} s" for b in builds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
