"""Load test of `reader.serve` on loopback: QPS and latency at several client counts, batched or not.

    python -m reader.loadtest [--index indexes/wikipedia-sample] [--questions data/qa/dev.jsonl]
                              [--clients 1 4 16] [--requests 48] [--time-limit 120] [--json]
    python -m reader.loadtest --health-pollers 4 [--poll-interval 0] [--rounds 3] ...


Starts the service itself on a free 127.0.0.1 port, twice: with dynamic batching (``--max-batch``,
default 16) and one question at a time (max batch 1), and for each runs every client count: that
many threads post questions back to back until ``--requests`` are answered or ``--time-limit``
seconds pass. Prints QPS, p50/p95 latency and errors per phase, and batched/unbatched QPS ratios.
Without ``--questions``, questions are made from the index's passage titles.

``--health-pollers N`` measures what health probes cost instead: one client's /answer latency
alone, then while N processes poll ``GET /health`` (back to back, or every ``--poll-interval``
seconds), alternating ``--rounds`` times on one batched service; prints the median p50 of each and
the slowdown.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from storage.index import Index, Manifest

from .answer import DEFAULT_INDEX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    """One HTTP request to the local service; (status, JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


@contextmanager
def running_service(index: str, max_batch: int, threads: int | None = None, startup: float = 180):
    """A `reader.serve` subprocess on a free loopback port, stopped on exit; yields the port."""
    port = free_port()
    command = [sys.executable, "-m", "reader.serve", "--index", index, "--port", str(port), "--max-batch", str(max_batch)]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + startup
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"reader.serve exited with {process.returncode}: {process.stderr.read()[-2000:]}")
            try:
                if request(port, "GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"reader.serve did not answer /health within {startup} s")
            time.sleep(0.5)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def phase(port: int, questions: list[str], clients: int, requests: int, time_limit: float, k: int) -> dict:
    """``clients`` threads posting questions until ``requests`` are done or time runs out."""
    lock, latencies, errors, batches = threading.Lock(), [], [], []
    counter = iter(range(requests))
    stop = time.monotonic() + time_limit

    def client() -> None:
        while time.monotonic() < stop:
            with lock:
                number = next(counter, None)
            if number is None:
                return
            begin = time.perf_counter()
            try:
                status, body = request(port, "POST", "/answer", {"question": questions[number % len(questions)], "k": k})
            except OSError as error:
                status, body = 0, {"error": str(error)}
            with lock:
                if status == 200:
                    latencies.append(1000 * (time.perf_counter() - begin))
                    batches.append(body["timings_ms"]["batch"])
                else:
                    errors.append(body.get("error", f"HTTP {status}"))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return {
        "clients": clients,
        "answered": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "qps": round(len(latencies) / elapsed, 3),
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "latency_p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
        "mean_batch": round(float(np.mean(batches)), 2) if batches else None,
    }


def _poll_health(port: int, interval: float, stop, count) -> None:
    """One poller (a process of its own, as a load balancer is): GET /health until ``stop`` is set."""
    while not stop.is_set():
        if request(port, "GET", "/health", timeout=60)[0] == 200:
            with count.get_lock():
                count.value += 1
        stop.wait(interval)


def health_cost(port: int, questions: list[str], pollers: int, interval: float, requests: int, time_limit: float,
                k: int, rounds: int) -> dict:
    """/answer latency of one client alone and while ``pollers`` processes poll /health, alternating ``rounds`` times."""
    context = multiprocessing.get_context("spawn")
    alone, polled, polls = [], [], []
    for _ in range(rounds):
        alone.append(phase(port, questions, 1, requests, time_limit, k))
        stop, count = context.Event(), context.Value("l", 0)
        processes = [context.Process(target=_poll_health, args=(port, interval, stop, count)) for _ in range(pollers)]
        for process in processes:
            process.start()
        while count.value < pollers:  # every poller is up before the clock starts
            time.sleep(0.05)
        began, start_count = time.perf_counter(), count.value
        try:
            polled.append(phase(port, questions, 1, requests, time_limit, k))
        finally:
            polls.append((count.value - start_count) / (time.perf_counter() - began))
            stop.set()
            for process in processes:
                process.join()
    p50_alone = float(np.median([r["latency_p50_ms"] for r in alone]))
    p50_polled = float(np.median([r["latency_p50_ms"] for r in polled]))
    return {
        "pollers": pollers, "poll_interval_s": interval, "rounds": rounds, "requests_per_phase": requests,
        "health_polls_per_s": round(float(np.median(polls)), 1),
        "answer_p50_ms_alone": round(p50_alone, 1), "answer_p50_ms_polled": round(p50_polled, 1),
        "slowdown_pct": round(100 * (p50_polled / p50_alone - 1), 1),
        "errors": sum(r["errors"] for r in alone + polled),
    }


def default_questions(index: str, count: int = 64) -> list[str]:
    """Questions from the index's first passage titles, when no questions file is given."""
    opened = Index.open(index)
    stored = opened.fetch(range(min(count, len(opened))))
    return [f"What is {s.title}?" for s in stored]


def accepted(index: str, questions: list[str]) -> list[str]:
    """The questions the index's reader takes (an empty one is a 400, not load)."""
    from .inputs import ReaderInputError
    from .load import ReaderSpec, load_reader

    reader = load_reader(ReaderSpec(**Manifest.load(Path(index)).extra["reader_spec"]))
    kept = []
    for question in questions:
        try:
            reader.question_ids(question)
        except ReaderInputError:
            continue
        kept.append(question)
    return kept


def run(index: str, questions: list[str], clients: list[int], requests: int, time_limit: float,
        k: int = 5, max_batch: int = 16, threads: int | None = None) -> dict:
    """Every client count against a batched and an unbatched service; returns all phases and ratios."""
    results: dict = {"index": index, "requests_per_phase": requests, "k": k, "phases": {}}
    for label, batch in (("batched", max_batch), ("unbatched", 1)):
        with running_service(index, batch, threads) as port:
            request(port, "POST", "/answer", {"question": questions[0], "k": k})  # warm up
            results["phases"][label] = [phase(port, questions, c, requests, time_limit, k) for c in clients]
            for row in results["phases"][label]:
                print(json.dumps({"service": label, "max_batch": batch} | row), file=sys.stderr, flush=True)
    results["qps_ratio_batched_over_unbatched"] = {
        str(b["clients"]): round(b["qps"] / u["qps"], 2) if u["qps"] else None
        for b, u in zip(results["phases"]["batched"], results["phases"]["unbatched"])
    }
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m reader.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=DEFAULT_INDEX,
                        help="index folder the service answers from (default: %(default)s)")
    parser.add_argument("--questions",
                        help='JSONL of {"question": ...} lines '
                             "(default: What is TITLE? for the first 64 passage titles)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16],
                        help="client counts, one phase each: that many threads post questions back to back "
                             "(default: 1 4 16)")
    parser.add_argument("--requests", type=int, default=48, help="requests answered per phase (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=120, help="seconds per phase at most (default: %(default)s)")
    parser.add_argument("--k", type=int, default=5, help="passages per question (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="the batched service's questions per model pass; the unbatched one takes 1 "
                             "(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, a table)")
    parser.add_argument("--health-pollers", type=int, default=0,
                        help="measure /answer with N processes polling /health instead; 0: the client phases "
                             "(default: %(default)s)")
    parser.add_argument("--poll-interval", type=float, default=0.0,
                        help="seconds between one poller's polls; 0: back to back (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alone/polled alternations of --health-pollers (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.index, "manifest.json").exists():
        print(f"error: no index at {args.index}; run `make demo` or pass --index", file=sys.stderr)
        return 2
    if args.questions:
        lines = Path(args.questions).read_text(encoding="utf-8").splitlines()
        questions = [json.loads(line)["question"] for line in lines if line.strip()]
    else:
        questions = default_questions(args.index)
    questions = accepted(args.index, questions)
    if args.health_pollers:
        with running_service(args.index, args.max_batch) as port:
            request(port, "POST", "/answer", {"question": questions[0], "k": args.k})  # warm up
            cost = health_cost(port, questions, args.health_pollers, args.poll_interval, args.requests,
                               args.time_limit, args.k, args.rounds)
        print(json.dumps(cost))
        return 1 if cost["errors"] else 0
    results = run(args.index, questions, args.clients, args.requests, args.time_limit, args.k, args.max_batch)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{'service':<10} {'clients':>7} {'answered':>8} {'errors':>6} {'QPS':>7} {'p50 ms':>8} {'p95 ms':>8} {'batch':>6}")
        for label, rows in results["phases"].items():
            for r in rows:
                print(f"{label:<10} {r['clients']:>7} {r['answered']:>8} {r['errors']:>6} {r['qps']:>7.2f} "
                      f"{r['latency_p50_ms']:>8} {r['latency_p95_ms']:>8} {r['mean_batch']:>6}")
        print("QPS batched / unbatched: " + ", ".join(
            f"{c} clients {r}x" for c, r in results["qps_ratio_batched_over_unbatched"].items()))
    errors = sum(r["errors"] for rows in results["phases"].values() for r in rows)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
