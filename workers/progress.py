"""A worker's report on the shard it is on, in a small JSON file the flow reads while the run goes on."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

WORKER_FOLDER = ".progress"  # under the staging folder: one file per shard a worker is on


def write_json(path: Path, data: dict) -> None:
    """Replace ``path`` atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The file's record, or None while it does not exist (or is being replaced)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class ShardProgress:
    """A worker's report on the shard it is encoding: rows and tokens done so far.

    Written at most every ``interval`` seconds (and once at the end), so it costs nothing next to
    the encoding.
    """

    def __init__(self, folder: Path, shard_id: int, rows: int, interval: float = 1.0) -> None:
        self.path = folder / WORKER_FOLDER / f"shard-{shard_id:06d}.json"
        self.record = {"shard_id": shard_id, "rows": rows, "done": 0, "tokens": 0, "started": time.time()}
        self.interval, self.written = interval, 0.0

    def add(self, passages: int, tokens: int) -> None:
        self.record["done"] += passages
        self.record["tokens"] += tokens
        now = time.monotonic()
        if now - self.written >= self.interval or self.record["done"] >= self.record["rows"]:
            write_json(self.path, self.record | {"updated": time.time()})
            self.written = now


def in_flight(staging: Path, finished: set[int]) -> list[dict]:
    """The workers' reports on shards not finished yet."""
    reports = (read_json(p) for p in sorted((staging / WORKER_FOLDER).glob("shard-*.json")))
    return [r for r in reports if r is not None and r["shard_id"] not in finished]
