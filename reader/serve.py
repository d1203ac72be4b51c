"""A question-answering service over a BTR index (Starlette on uvicorn, loopback by default).

    python -m reader.serve [--index indexes/wikipedia-sample] [--port 8000] [--max-batch 16] [--window-ms 5]
                           [--max-k 100] [--max-body-bytes 65536] [--timeout-s 30] [--max-question-chars 2000]
                           [--body-timeout-s 10] [--max-batch-passages 400] [--allow-host NAME]
                           [--header-timeout-s 10] [--keep-alive-s 5] [--max-connections 256]
                           [--token TOKEN | $BTR_TOKEN] [--insecure-no-auth]

    GET  /        -> a page to ask questions from a browser (reader/static/, no build step, offline)
    POST /answer  {"question": "...", "k": 5, "mode": "btr"}  -> the same JSON as `reader.answer --json`
    GET  /health  -> {"status": "ok", "passages": ..., "version": ..., "reader": ..., "split_layer": ...}  (no I/O)
    GET  /health/deep -> the same after a stat of every shard

Each request retrieves and reads its LMDB records in a worker thread (the index's environments are
opened once per process and read from every thread); the model part is batched: one thread takes
the questions waiting, up to ``--max-batch``, waiting at most ``--window-ms`` for company when it
is idle, and runs the upper layers over all of them at once, in passes of at most
``--max-batch-passages``. Every refusal is one line of JSON, ``{"error": ...}``: bad input 400 (a
question over ``--max-question-chars``, counted before any tokenization, a k over ``--max-k``, JSON
nested too deeply included), a Host header other than the bound address or ``--allow-host`` 400, a
POST from another site's page (its Origin) 403, a request without the token (``--token``, required
for a non-loopback ``--host``) 401, a body that is not JSON by its Content-Type (or has none) 415, a
request head not whole within ``--header-timeout-s`` 408, a body over ``--max-body-bytes`` 413, one not arrived
within ``--body-timeout-s`` 408, a request not answered within ``--timeout-s`` 504 (the batcher then
skips it if its pass has not started), an unknown path 404, an internal error 500, and uvicorn's own
400 for a request it cannot parse. A request that meets a damaged index (a shard truncated, missing
or replaced since the service started, a corrupt record) is HTTP 503 with ``{"error": ...}``; from then on
``/health`` is 503 ``{"status": "unhealthy", "error": ...}`` and the service goes on answering
what the rest of the index can answer.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from storage.shard import DamagedIndex

from .answer import DAMAGED_INDEX, DEFAULT_INDEX, DEFAULT_K, DEFAULT_MAX_K
from .device import add_device_arguments
from .serve_http import RequestCheck, add_connection_flags, allowed_hosts, connection_options, public, uvicorn_config

if TYPE_CHECKING:  # the query path (torch, the reader) is imported once the flags are parsed: --help is instant
    from .query import Answerer, Lookup

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the service (each a flag of ``reader.serve``)."""

    max_k: int = DEFAULT_MAX_K
    max_body_bytes: int = 64 * 1024
    timeout_s: float = 30.0
    max_question_chars: int = 2000
    body_timeout_s: float = 10.0  # for the body to arrive: a slow sender holds no worker past it

    def __post_init__(self) -> None:
        if min(self.max_k, self.max_body_bytes, self.timeout_s, self.max_question_chars, self.body_timeout_s) <= 0:
            raise ValueError(f"every limit must be positive, got {self}")


class Refused(Exception):
    """A request the service will not answer: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        """``close``: end the connection after the reply (a body left unread, a client too slow to keep)."""
        super().__init__(message)
        self.status, self.close = status, close


class Batcher:
    """Runs the model over concurrent questions in batches, on one thread of its own."""

    def __init__(self, answerer: Answerer, max_batch: int = 16, window_ms: float = 5.0, max_passages: int = 400) -> None:
        """``max_passages``: passages per model pass; a batch of more is read in several, so a request that
        times out while an earlier pass runs is dropped unread (16 questions at k = 100 held 4 GB for 80 s)."""
        if max_batch < 1 or window_ms < 0 or max_passages < 1:
            raise ValueError(
                f"max_batch and max_passages must be >= 1 and window_ms >= 0, got {max_batch}, {max_passages}, {window_ms}"
            )
        self.answerer, self.max_batch, self.window = answerer, max_batch, window_ms / 1000
        self.max_passages = max_passages
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
            for (mode, k), group in itertools.groupby(sorted(items, key=_batch_key), key=_batch_key):
                waiting, per_pass = list(group), max(1, self.max_passages // max(k, 1))
                while waiting:
                    # A request that timed out has cancelled its future: skip it. The others are marked
                    # running only as their pass starts, so one that times out meanwhile is skipped too.
                    chunk = []
                    while waiting and len(chunk) < per_pass:
                        item = waiting.pop(0)
                        if item[2].set_running_or_notify_cancel():
                            chunk.append(item)
                    if chunk:
                        self._read(chunk, mode)

    def _read(self, chunk: list[tuple[Lookup, str, Future]], mode: str) -> None:
        self.batches.append(len(chunk))
        try:
            results = self.answerer.read([lookup for lookup, _, _ in chunk], mode)
        except Exception as error:  # the reader's failure belongs to these requests only
            for _, _, future in chunk:
                future.set_exception(error)
            return
        for (_, _, future), result in zip(chunk, results):
            future.set_result(result)


def _batch_key(item: tuple[Lookup, str, Future]) -> tuple[str, int]:
    return item[1], len(item[0].hits)


def refusal(status: int, message: str, close: bool = False) -> JSONResponse:
    """A refused request's reply: its status and one line of JSON saying why."""
    return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body: 413 as soon as it is known to exceed the limit, 408 when it has not arrived in time."""
    limit = limits.max_body_bytes
    too_large = Refused(413, f"the request body is over {limit} bytes (the service's --max-body-bytes)", close=True)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()  # none is not JSON either
    if media != "application/json":  # a page elsewhere may post text/plain without asking: refused before any work
        raise Refused(415, f"the body must be sent as Content-Type: application/json, not {media or 'none'}")
    body = bytearray()

    async def receive() -> None:
        nonlocal body
        async for chunk in request.stream():  # a chunked body declares no length: count what arrives
            body += chunk
            if len(body) > limit:
                raise too_large

    try:
        await asyncio.wait_for(receive(), limits.body_timeout_s)
    except TimeoutError:
        raise Refused(
            408, f"the request body did not arrive within {limits.body_timeout_s:g} s (the service's --body-timeout-s)", close=True
        ) from None
    except ClientDisconnect:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.warning("%s disconnected after sending %d bytes of its request body", client, len(body))
        raise Refused(400, "the client disconnected before its body was complete", close=True) from None
    return bytes(body)


def create_app(
    answerer: Answerer, max_batch: int = 16, window_ms: float = 5.0, limits: Limits = Limits(),
    hosts: frozenset[str] | None = None, max_batch_passages: int = 400, token: str | None = None,
) -> Starlette:
    """The ASGI app: the page, POST /answer and GET /health over one Answerer and one Batcher.

    ``hosts``: the Host names it answers (``serve_http.allowed_hosts``); None, any.
    """
    from .query import bad_input_errors  # loaded with the answerer already: no cost here
    from .reload import VersionWatch

    batcher = Batcher(answerer, max_batch, window_ms, max_batch_passages)
    watch = VersionWatch(answerer)  # an update published to the index is served from the next request on
    errors = bad_input_errors()
    damage: list[str] = []  # what damage requests met (the first is kept); health reports it
    # What /health reports, computed once: the reader's name comes with a digest of all its weights. (The
    # passages and version are read per request: an update moves the service to another version.)
    facts = {"reader": answerer.identity.name,
             "split_layer": answerer.reader.split_layer, "device": str(answerer.reader.device),
             "dtype": str(answerer.reader.dtype).removeprefix("torch.")}

    private = (facts["reader"], answerer.index.root, Path(answerer.index.root).resolve())  # no absolute path in a reply
    facts["reader"] = public(facts["reader"], *private)

    def damaged(error: DamagedIndex) -> JSONResponse:
        message = public(str(error), *private)
        if not damage:
            damage.append(message)
        return refusal(503, message)

    async def question_of(request: Request) -> tuple[str, int, str]:
        """The question, k and mode of a request, refused (4xx) when they break a limit."""
        try:
            body = json.loads(await read_body(request, limits))
        except ValueError:
            raise Refused(400, "the request body is not JSON (or not UTF-8)") from None
        except RecursionError:
            raise Refused(400, "the request body is JSON nested too deeply to parse") from None
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
        lookup = await run_in_threadpool(watch.lookup, question, k)  # retrieve + LMDB read
        return await asyncio.wrap_future(batcher.submit(lookup, mode))  # cancelled on timeout

    async def answer(request: Request) -> JSONResponse:
        try:
            question, k, mode = await question_of(request)
            answerer.check(question, k, mode, limits.max_k)
            result = await asyncio.wait_for(answered(question, k, mode), limits.timeout_s)
        except Refused as error:
            return refusal(error.status, str(error), error.close)
        except DamagedIndex as error:  # before ``errors``: a corrupt record is also a ValueError
            return damaged(error)
        except errors as error:
            return refusal(400, str(error))
        except TimeoutError:
            return refusal(504, f"no answer within {limits.timeout_s:g} s (the service's --timeout-s)")
        return JSONResponse(result)

    async def health(request: Request) -> JSONResponse:
        """What a probe polls: values computed at start and the damage requests met; no I/O, no hashing."""
        if damage:
            return JSONResponse({"status": "unhealthy", "error": damage[0]}, status_code=503)
        batches, index = batcher.batches, answerer.index
        return JSONResponse({"status": "ok", "passages": index.live, "version": index.version, **facts,
                             "batches": len(batches), "largest_batch": max(batches, default=0)})

    async def deep_health(request: Request) -> JSONResponse:
        """/health after a stat of every shard (in a worker thread): damage found before a question meets it."""
        try:
            await run_in_threadpool(answerer.index.check)
        except DamagedIndex as error:
            damaged(error)
        return await health(request)

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return refusal(error.status_code, error.detail)  # 404, 405: JSON like every other refusal

    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return refusal(500, f"internal error ({type(error).__name__}); the service's log has the details")

    routes = [
        Route("/", lambda request: FileResponse(STATIC / "index.html")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/answer", answer, methods=["POST"]),
        Route("/health", health),
        Route("/health/deep", deep_health),
    ]
    app = Starlette(
        routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
        middleware=[Middleware(RequestCheck, hosts=hosts, token=token)],
    )
    app.state.batcher, app.state.watch = batcher, watch
    return app


def build_parser() -> argparse.ArgumentParser:
    """The service's flags (no heavy import: ``--help`` answers at once)."""
    parser = argparse.ArgumentParser(prog="python -m reader.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=DEFAULT_INDEX, help="index folder (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 127.0.0.1: this machine only (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="another Host name to answer to, besides the bound address (repeat; '*' for any) "
                             "(default: the bound address only)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="questions per model pass; 1: no batching (default: %(default)s)")
    parser.add_argument("--max-batch-passages", type=int, default=400,
                        help="passages per model pass: a larger batch is read in several, and a timed-out request is "
                             "dropped between them (default: %(default)s)")
    parser.add_argument("--window-ms", type=float, default=5.0,
                        help="milliseconds an idle batcher waits for company (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    default = Limits()
    parser.add_argument("--max-k", type=int, default=default.max_k,
                        help="most passages one request may ask for (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=default.max_body_bytes,
                        help="bytes a request body may have; larger bodies: 413 (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=default.timeout_s,
                        help="seconds an answer may take; slower answers: 504 (default: %(default)s)")
    parser.add_argument("--body-timeout-s", type=float, default=default.body_timeout_s,
                        help="seconds a request body may take to arrive; slower bodies: 408 (default: %(default)s)")
    parser.add_argument("--max-question-chars", type=int, default=default.max_question_chars,
                        help="characters a question may have; longer questions: 400 (default: %(default)s)")
    add_connection_flags(parser)
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        limits = Limits(args.max_k, args.max_body_bytes, args.timeout_s, args.max_question_chars, args.body_timeout_s)
        connection = connection_options(args)  # and a non-loopback bind needs a token
    except ValueError as error:
        parser.error(str(error))
    import torch  # the query path, now that the flags are good

    from .load import quiet_library_logs
    from .query import Answerer, bad_input_errors

    quiet_library_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        answerer = Answerer(args.index, device=args.device, dtype=args.dtype)
    except DamagedIndex as error:
        print(f"error: {error}", file=sys.stderr)
        return DAMAGED_INDEX
    except bad_input_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    hosts = allowed_hosts(args.host, args.allow_host)
    try:
        app = create_app(answerer, args.max_batch, args.window_ms, limits, hosts, args.max_batch_passages, args.token)
    except ValueError as error:  # --max-batch, --window-ms, --max-batch-passages
        parser.error(str(error))
    print(f"serving {args.index} on http://{args.host}:{args.port} (max batch {args.max_batch}; "
          f"{answerer.reader.device} {str(answerer.reader.dtype).removeprefix('torch.')}; Host: "
          f"{', '.join(sorted(hosts)) if hosts else 'any'})", flush=True)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, connection)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
