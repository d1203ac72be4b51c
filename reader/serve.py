"""A question-answering service over a BTR index (Starlette on uvicorn, loopback by default).

    python -m reader.serve [--index indexes/wikipedia-sample] [--port 8000] [--max-batch 16] [--window-ms 5]

    POST /answer  {"question": "...", "k": 5, "mode": "btr"}  -> the same JSON as `reader.answer --json`
    GET  /health  -> {"status": "ok", "passages": ..., "reader": ..., "split_layer": ...}

Each request retrieves and reads its LMDB records in a worker thread (the index's environments are
opened once per process and read from every thread); the model part is batched: one thread takes
the questions waiting, up to ``--max-batch``, waiting at most ``--window-ms`` for company when it
is idle, and runs the upper layers over all of them at once. Bad input is HTTP 400 with
``{"error": ...}``. A request that meets a damaged index (a shard truncated, missing or replaced
since the service started, a corrupt record) is HTTP 503 with ``{"error": ...}``; from then on
``/health`` is 503 ``{"status": "unhealthy", "error": ...}`` and the service goes on answering
what the rest of the index can answer.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import queue
import sys
import threading
import time
from concurrent.futures import Future

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from storage.shard import DamagedIndex

from .answer import DAMAGED_INDEX, DEFAULT_INDEX, DEFAULT_K, Answerer, Lookup, bad_input_errors
from .load import quiet_library_logs


class Batcher:
    """Runs the model over concurrent questions in batches, on one thread of its own."""

    def __init__(self, answerer: Answerer, max_batch: int = 16, window_ms: float = 5.0) -> None:
        if max_batch < 1 or window_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and window_ms >= 0, got {max_batch}, {window_ms}")
        self.answerer, self.max_batch, self.window = answerer, max_batch, window_ms / 1000
        self.queue: queue.Queue[tuple[Lookup, str, Future] | None] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (for the health endpoint and tests)
        self.thread = threading.Thread(target=self._run, name="btr-batcher", daemon=True)
        self.thread.start()

    def submit(self, lookup: Lookup, mode: str) -> Future:
        """Queue one looked-up question; the future gets its answer dict (or the reader's exception)."""
        future: Future = Future()
        self.queue.put((lookup, mode, future))
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _take(self) -> list[tuple[Lookup, str, Future]] | None:
        """The next batch: whatever waits, up to max_batch; an idle batcher waits ``window`` for more."""
        first = self.queue.get()
        if first is None:
            return None
        items, deadline = [first], time.monotonic() + self.window
        while len(items) < self.max_batch:
            left = deadline - time.monotonic()
            try:  # within the window wait for more; after it take only what already waits
                item = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)  # stop after this batch
                break
            items.append(item)
        return items

    def _run(self) -> None:
        while (items := self._take()) is not None:
            # One model pass per (mode, k): a batch needs the same number of passages per question.
            for (mode, _), group in itertools.groupby(sorted(items, key=_batch_key), key=_batch_key):
                group = list(group)
                self.batches.append(len(group))
                try:
                    results = self.answerer.read([lookup for lookup, _, _ in group], mode)
                except Exception as error:  # the reader's failure belongs to these requests only
                    for _, _, future in group:
                        future.set_exception(error)
                    continue
                for (_, _, future), result in zip(group, results):
                    future.set_result(result)


def _batch_key(item: tuple[Lookup, str, Future]) -> tuple[str, int]:
    return item[1], len(item[0].hits)


def create_app(answerer: Answerer, max_batch: int = 16, window_ms: float = 5.0) -> Starlette:
    """The ASGI app: POST /answer and GET /health over one Answerer and one Batcher."""
    batcher = Batcher(answerer, max_batch, window_ms)
    errors = bad_input_errors()
    damage: list[str] = []  # what damage requests met (the first is kept); health reports it

    def damaged(error: DamagedIndex) -> JSONResponse:
        if not damage:
            damage.append(str(error))
        return JSONResponse({"error": str(error)}, status_code=503)

    async def answer(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the request body is not JSON (or not UTF-8)"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": 'the body must be a JSON object with a "question"'}, status_code=400)
        question, k, mode = body.get("question"), body.get("k", DEFAULT_K), body.get("mode", "btr")
        try:
            answerer.check(question, k, mode)
            lookup = await run_in_threadpool(answerer.lookup, question, k)
            result = await asyncio.wrap_future(batcher.submit(lookup, mode))
        except DamagedIndex as error:  # before ``errors``: a corrupt record is also a ValueError
            return damaged(error)
        except errors as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse(result)

    async def health(request: Request) -> JSONResponse:
        reader = answerer.reader
        try:
            answerer.index.check()  # a stat per shard: damage found before a question meets it
        except DamagedIndex as error:
            damaged(error)
        if damage:
            return JSONResponse({"status": "unhealthy", "error": damage[0]}, status_code=503)
        return JSONResponse(
            {
                "status": "ok",
                "passages": len(answerer.index),
                "reader": reader.identity().name,
                "split_layer": reader.split_layer,
                "batches": len(batcher.batches),
                "largest_batch": max(batcher.batches, default=0),
            }
        )

    app = Starlette(routes=[Route("/answer", answer, methods=["POST"]), Route("/health", health)])
    app.state.batcher = batcher
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reader.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=DEFAULT_INDEX)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=16, help="questions per model pass (1 = no batching)")
    parser.add_argument("--window-ms", type=float, default=5.0, help="how long an idle batcher waits for company")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    quiet_library_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        answerer = Answerer(args.index)
    except DamagedIndex as error:
        print(f"error: {error}", file=sys.stderr)
        return DAMAGED_INDEX
    except bad_input_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    app = create_app(answerer, args.max_batch, args.window_ms)
    print(f"serving {args.index} on http://{args.host}:{args.port} (max batch {args.max_batch})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
