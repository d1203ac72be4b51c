"""What an indexing run has done so far, in a JSON file anyone can read while it runs.

The flow keeps ``<index>/.work/progress.json`` up to date (phase, shards done of total, passages
and tokens per second, an estimate of the time left, the Ray dashboard's URL); ``make demo`` prints
it in the terminal, and the flow mirrors it as Prefect artifacts for the UI. Workers report the
shard they are on in small files of their own (``workers.progress``), so the figures move within a
shard, not only when one ends. At the end the same record, with one row per shard (passages/s,
tokens/s, seconds, bytes, worker, attempts), is kept as ``<index>/run.json``.

    python -m flows.progress indexes/wikipedia-sample     # print a run's progress until it ends
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from workers.progress import read_json, write_json

PROGRESS_FILE = "progress.json"  # under the index's .work folder, while the run goes on
RUN_FILE = "run.json"  # in the index folder, once it is published
FINAL_PHASES = ("done", "failed")


class RunProgress:
    """The run's record, kept in one JSON file; every change is written at once."""

    def __init__(self, path: Path, record: dict) -> None:
        self.path, self.record = path, record

    @classmethod
    def start(cls, path: Path, index: str, passages: int, shards: int) -> "RunProgress":
        """A fresh record (an earlier run's file is replaced)."""
        now = time.time()
        record = {
            "index": index, "phase": "starting", "started": now, "updated": now, "phases": {},
            "shards_total": shards, "shards_done": 0, "shards_resumed": 0,
            "passages_total": passages, "passages_done": 0, "tokens_done": 0,
            "passages_per_s": None, "tokens_per_s": None, "eta_s": None, "ray_dashboard": None, "shards": [],
        }
        progress = cls(path, record)
        progress.save()
        return progress

    @classmethod
    def load(cls, path: Path) -> "RunProgress":
        record = read_json(path)
        if record is None:
            raise FileNotFoundError(f"no run progress at {path}")
        return cls(path, record)

    def save(self) -> None:
        self.record["updated"] = time.time()
        write_json(self.path, self.record)

    def phase(self, name: str) -> None:
        """Enter a phase; the time spent in the previous one is kept under ``phases``."""
        now = time.time()
        previous, since = self.record["phase"], self.record.get("phase_started", self.record["started"])
        if previous not in ("starting", *FINAL_PHASES):
            self.record["phases"][previous] = round(now - since, 1)
        self.record["phase"], self.record["phase_started"] = name, now
        self.save()

    def set(self, **fields) -> None:
        self.record.update(fields)
        self.save()

    def shards(self, finished: list[dict], in_flight: list[dict], since: float) -> None:
        """Update the counts from the shards finished (their summaries) and the workers' reports."""
        fresh = [r for r in finished if not r["skipped"]]
        done = sum(r["passages"] for r in finished) + sum(p["done"] for p in in_flight)
        worked = sum(r["passages"] for r in fresh) + sum(p["done"] for p in in_flight)
        tokens = sum(r["tokens"] for r in fresh) + sum(p["tokens"] for p in in_flight)
        elapsed = max(time.time() - since, 1e-9)
        rate = worked / elapsed
        left = self.record["passages_total"] - done
        self.record.update(
            shards_done=len(finished), shards_resumed=len(finished) - len(fresh), passages_done=done,
            tokens_done=tokens, passages_per_s=round(rate, 1) if worked else None,
            tokens_per_s=round(tokens / elapsed, 1) if worked else None,
            eta_s=round(left / rate, 1) if worked else None,
            shards=[shard_row(r) for r in sorted(finished, key=lambda r: r["shard"]["first_row"])],
        )
        self.save()

    def finish(self, phase: str = "done") -> None:
        self.phase(phase)
        self.record["seconds"] = round(time.time() - self.record["started"], 1)
        self.record["eta_s"] = 0 if phase == "done" else None
        self.save()


def shard_row(result: dict) -> dict:
    """One shard's line of the run record: what it measured and where it ran."""
    return {
        "shard": result["shard"]["name"], "passages": result["passages"], "tokens": result["tokens"],
        "bytes": result["shard"]["bytes"], "seconds": result["seconds"],
        "passages_per_s": result.get("passages_per_s"), "tokens_per_s": result.get("tokens_per_s"),
        "worker": result.get("worker"), "attempts": result.get("attempts", 1), "resumed": result["skipped"],
    }


def markdown_table(record: dict) -> str:
    """The run's shards as a markdown table (the Prefect UI shows it as an artifact)."""
    lines = [
        f"**{record['passages_done']:,} passages, {record['tokens_done']:,} tokens indexed** "
        f"({record['shards_resumed']} of {record['shards_total']} shards resumed from an earlier run)",
        "",
        "| shard | passages | tokens | seconds | passages/s | tokens/s | MB | worker | attempts |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in record["shards"]:
        lines.append(
            f"| {row['shard']} | {row['passages']:,} | {row['tokens']:,} | {row['seconds']:.1f} | "
            f"{row['passages_per_s'] or '-'} | {row['tokens_per_s'] or '-'} | {row['bytes'] / 1e6:.2f} | "
            f"{row['worker'] or '-'} | {row['attempts']} |"
        )
    return "\n".join(lines)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def took(record: dict) -> float:
    """Seconds the run has been going, or, once it has ended, how long it took."""
    if record["phase"] in FINAL_PHASES:
        return record.get("seconds") or record["updated"] - record["started"]
    return time.time() - record["started"]


def status_line(record: dict) -> str:
    """One line a person reads: the phase, and while indexing the shard counts, speeds and time left."""
    elapsed = duration(took(record))
    if record["phase"] != "indexing shards":
        return f"[{elapsed}] {record['phase']}"
    speed = (
        f"{record['passages_per_s']:,.0f} passages/s, {record['tokens_per_s']:,.0f} tokens/s, "
        f"about {duration(record['eta_s'])} left"
        if record["passages_per_s"] else "warming up"
    )
    return (
        f"[{elapsed}] shards {record['shards_done']}/{record['shards_total']}, "
        f"passages {record['passages_done']:,}/{record['passages_total']:,} ({speed})"
    )


class Printer:
    """Prints a run's progress: one line rewritten in place on a terminal, else a line per change.

    Off a terminal (CI logs, pipes) a new line comes when the shards done or the phase change, or
    every ``every`` seconds, so logs stay short.
    """

    def __init__(self, stream=None, every: float = 15.0) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every, self.last, self.key, self.said_dashboard, self.width = every, 0.0, None, False, 0

    def show(self, record: dict) -> None:
        if record.get("ray_dashboard") and not self.said_dashboard and record["phase"] not in FINAL_PHASES:
            # an ended run's Ray, when the run started it, is gone with it: no URL that answers nothing
            self._newline()
            self.stream.write(f"    Ray dashboard: {record['ray_dashboard']}\n")
            self.said_dashboard = True
        line = status_line(record)
        key = (record["phase"], record["shards_done"])
        now = time.monotonic()
        if self.tty:
            if key != self.key and self.key is not None and key[0] != self.key[0]:
                self._newline()  # a finished phase keeps its line
            line = line[: shutil.get_terminal_size().columns - 1]  # \r rewrites one row: a wrapped line would pile up
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        elif key != self.key or now - self.last >= self.every:
            self.stream.write(line + "\n")
            self.last = now
        self.key = key
        self.stream.flush()

    def _newline(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.width = 0

    def close(self) -> None:
        self._newline()
        self.stream.flush()


class Steps:
    """A long command's progress in a log: a line per step, and while a step runs, a line every
    ``every`` seconds with its latest ``detail`` (so a slow step never looks like a hang)."""

    def __init__(self, stream=None, every: float = 15.0) -> None:
        self.stream = stream or sys.stderr
        self.every, self.began, self.detail = every, time.monotonic(), ""

    def say(self, text: str) -> None:
        self.stream.write(f"[{duration(time.monotonic() - self.began)}] {text}\n")
        self.stream.flush()

    def counter(self, what: str):
        """A ``progress(done, total)`` callback that keeps ``detail`` as "what done/total"."""
        def progress(done: int, total: int) -> None:
            self.detail = f"{what} {done:,}/{total:,}"
        return progress

    @contextmanager
    def step(self, title: str):
        """Say ``title`` now, then every ``every`` seconds how far the step is, until it ends."""
        self.say(title)
        self.detail, began, stop = "", time.monotonic(), threading.Event()

        def beat() -> None:
            while not stop.wait(self.every):
                self.say(f"    {self.detail or 'still at it'} ({duration(time.monotonic() - began)} into this step)")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


def follow(path: Path, done=lambda: False, interval: float = 1.0, printer: Printer | None = None) -> dict | None:
    """Print the run's progress from ``path`` until its phase is final or ``done()`` says so."""
    printer = printer or Printer()
    record = None
    try:
        while True:
            record = read_json(path) or record
            if record is not None:
                printer.show(record)
                if record["phase"] in FINAL_PHASES:
                    return record
            if done():
                return read_json(path) or record
            time.sleep(interval)
    finally:
        printer.close()


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it."""
    parser = argparse.ArgumentParser(prog="python -m flows.progress", description="Print an indexing run's progress.")
    parser.add_argument("index", type=Path, help="the index folder the run writes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.index / ".work" / PROGRESS_FILE
    record = read_json(path)
    if record is None:
        print(f"no run in progress at {args.index} (nothing in {path})", file=sys.stderr)
        return 2
    if record["phase"] in FINAL_PHASES:
        ended = time.strftime("%Y-%m-%d %H:%M", time.localtime(record["updated"]))
        print(f"this run ended ({record['phase']}) at {ended}; its flow run took {duration(took(record))} "
              "(the command that started it also spent its start-up: libraries, Prefect's temporary server)")
    record = follow(path)
    return 0 if record and record["phase"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
