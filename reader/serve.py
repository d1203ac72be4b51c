"""A question-answering service over a BTR index (Starlette on uvicorn, loopback by default).

    python -m reader.serve [--index indexes/wikipedia-sample] [--port 8000] [--max-batch 16] [--window-ms 5]
                           [--max-k 100] [--max-body-bytes 65536] [--timeout-s 30] [--max-question-chars 2000]

    GET  /        -> a page to ask questions from a browser (reader/static/, no build step, offline)
    POST /answer  {"question": "...", "k": 5, "mode": "btr"}  -> the same JSON as `reader.answer --json`
    GET  /health  -> {"status": "ok", "passages": ..., "reader": ..., "split_layer": ...}

Each request retrieves and reads its LMDB records in a worker thread (the index's environments are
opened once per process and read from every thread); the model part is batched: one thread takes
the questions waiting, up to ``--max-batch``, waiting at most ``--window-ms`` for company when it
is idle, and runs the upper layers over all of them at once. Every refusal is one line of JSON,
``{"error": ...}``: bad input 400 (a question over ``--max-question-chars``, counted before any
tokenization, and a k over ``--max-k`` included), a body over ``--max-body-bytes`` 413, a request
not answered within ``--timeout-s`` 504 (the batcher then skips it if it has not started it), an
unknown path 404. A request that meets a damaged index (a shard truncated, missing or replaced
since the service started, a corrupt record) is HTTP 503 with ``{"error": ...}``; from then on
``/health`` is 503 ``{"status": "unhealthy", "error": ...}`` and the service goes on answering
what the rest of the index can answer.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from storage.shard import DamagedIndex

from .answer import DAMAGED_INDEX, DEFAULT_INDEX, DEFAULT_K, DEFAULT_MAX_K, Answerer, Lookup, bad_input_errors
from .load import quiet_library_logs

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the service (each a flag of ``reader.serve``)."""

    max_k: int = DEFAULT_MAX_K
    max_body_bytes: int = 64 * 1024
    timeout_s: float = 30.0
    max_question_chars: int = 2000

    def __post_init__(self) -> None:
        if min(self.max_k, self.max_body_bytes, self.timeout_s, self.max_question_chars) <= 0:
            raise ValueError(f"every limit must be positive, got {self}")


class Refused(Exception):
    """A request the service will not answer: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
            # A request that timed out has cancelled its future: skip it; the rest can no longer be cancelled.
            items = [item for item in items if item[2].set_running_or_notify_cancel()]
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


def refusal(status: int, message: str) -> JSONResponse:
    """A refused request's reply: its status and one line of JSON saying why."""
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    too_large = Refused(413, f"the request body is over {limit} bytes (the service's --max-body-bytes)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():  # a chunked body declares no length: count what arrives
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(answerer: Answerer, max_batch: int = 16, window_ms: float = 5.0, limits: Limits = Limits()) -> Starlette:
    """The ASGI app: the page, POST /answer and GET /health over one Answerer and one Batcher."""
    batcher = Batcher(answerer, max_batch, window_ms)
    errors = bad_input_errors()
    damage: list[str] = []  # what damage requests met (the first is kept); health reports it

    def damaged(error: DamagedIndex) -> JSONResponse:
        if not damage:
            damage.append(str(error))
        return refusal(503, str(error))

    async def question_of(request: Request) -> tuple[str, int, str]:
        """The question, k and mode of a request, refused (4xx) when they break a limit."""
        try:
            body = json.loads(await read_body(request, limits.max_body_bytes))
        except ValueError:
            raise Refused(400, "the request body is not JSON (or not UTF-8)") from None
        if not isinstance(body, dict):
            raise Refused(400, 'the body must be a JSON object with a "question"')
        question = body.get("question")
        if isinstance(question, str) and len(question) > limits.max_question_chars:  # before any tokenizer
            raise Refused(
                400, f"the question is {len(question)} characters, over {limits.max_question_chars} "
                "(the service's --max-question-chars)"
            )
        return question, body.get("k", DEFAULT_K), body.get("mode", "btr")

    async def answered(question: str, k: int, mode: str) -> dict:
        lookup = await run_in_threadpool(answerer.lookup, question, k)  # retrieve + LMDB read
        return await asyncio.wrap_future(batcher.submit(lookup, mode))  # cancelled on timeout

    async def answer(request: Request) -> JSONResponse:
        try:
            question, k, mode = await question_of(request)
            answerer.check(question, k, mode, limits.max_k)
            result = await asyncio.wait_for(answered(question, k, mode), limits.timeout_s)
        except Refused as error:
            return refusal(error.status, str(error))
        except DamagedIndex as error:  # before ``errors``: a corrupt record is also a ValueError
            return damaged(error)
        except errors as error:
            return refusal(400, str(error))
        except TimeoutError:
            return refusal(504, f"no answer within {limits.timeout_s:g} s (the service's --timeout-s)")
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

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return refusal(error.status_code, error.detail)  # 404, 405: JSON like every other refusal

    routes = [
        Route("/", lambda request: FileResponse(STATIC / "index.html")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/answer", answer, methods=["POST"]),
        Route("/health", health),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
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
    default = Limits()
    parser.add_argument("--max-k", type=int, default=default.max_k, help="most passages one request may ask for")
    parser.add_argument("--max-body-bytes", type=int, default=default.max_body_bytes, help="larger bodies: 413")
    parser.add_argument("--timeout-s", type=float, default=default.timeout_s, help="slower answers: 504")
    parser.add_argument(
        "--max-question-chars", type=int, default=default.max_question_chars, help="longer questions: 400"
    )
    args = parser.parse_args(argv)
    try:
        limits = Limits(args.max_k, args.max_body_bytes, args.timeout_s, args.max_question_chars)
    except ValueError as error:
        parser.error(str(error))
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
    app = create_app(answerer, args.max_batch, args.window_ms, limits)
    print(f"serving {args.index} on http://{args.host}:{args.port} (max batch {args.max_batch})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
