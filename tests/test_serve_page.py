"""reader.serve's page in a real browser (headless Chromium: `make test` installs it as root; without it the browser
tests fail, unless BTR_SKIP_BROWSER is set) and the limits on a request."""

from __future__ import annotations

import html
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlencode

import pytest
import uvicorn
from starlette.testclient import TestClient

from reader.answer import Answerer
from reader.assets import wikipedia_sample
from reader.inputs import passage_string
from reader.loadtest import free_port, request
from reader.serve import Limits, create_app
from reader.serve_http import ConnectionLimits, uvicorn_config
from tests.conftest import chromium

PASSAGES = wikipedia_sample(40, min_words=30)
QUESTION = f"What is {PASSAGES[0].title}?"


@pytest.fixture(scope="module")
def answerer(tmp_path_factory, answering_index) -> Answerer:
    """40 sample passages indexed by a tiny saved reader, loaded once for the module."""
    return Answerer(answering_index(tmp_path_factory.mktemp("page") / "index", PASSAGES))


@contextmanager
def serving(app, limits: ConnectionLimits = ConnectionLimits()) -> Iterator[int]:
    """``app`` on uvicorn on a free loopback port, in a thread of this process; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits))  # as reader.serve runs it
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def browse(tmp_path, port: int, **query) -> str:
    """The page's DOM once it has asked ``/?q=...`` (virtual time lets the fetches finish first)."""
    # No sandbox (CI runs as root); nothing fetched in the background, so an offline machine loads only the page.
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=60000", "--dump-dom", f"http://127.0.0.1:{port}/?{urlencode(query)}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def text(value: str) -> str:
    return html.escape(value, quote=False)  # how the DOM serializes a text node


def test_the_page_asks_from_its_link_and_shows_the_answer_in_its_passage_the_passages_and_timings(answerer, tmp_path):
    expected = answerer.answer(QUESTION, 3, "btr")
    with serving(create_app(answerer)) as port:
        dom = browse(tmp_path, port, q=QUESTION, k=3, mode="btr")
    assert 'data-state="done"' in dom, dom[-3000:]
    assert f'<p class="answer">{text(expected["answer"])}</p>' in dom
    start, end = expected["span"]
    context = expected["context"]
    assert text(context[:start]) + f"<mark>{text(context[start:end])}</mark>" + text(context[end:]) in dom
    assert all(f'<strong class="title">{text(p["title"])}</strong>' in dom for p in expected["passages"])
    assert dom.count('class="cited"') == 1 and "retrieve" in dom and "upper" in dom and "total" in dom


def test_compare_asks_both_modes_and_shows_their_timings_side_by_side(answerer, tmp_path):
    with serving(create_app(answerer)) as port:
        dom = browse(tmp_path, port, q=QUESTION, k=2, mode="compare")
    assert 'data-state="done"' in dom, dom[-3000:]
    assert 'data-mode="btr"' in dom and 'data-mode="baseline"' in dom and "baseline / btr:" in dom
    assert dom.count('<section class="panel" data-mode=') == 2


def test_the_page_shows_a_refusal(answerer, tmp_path):
    with serving(create_app(answerer, limits=Limits(max_k=3))) as port:
        dom = browse(tmp_path, port, q=QUESTION, k=4, mode="btr")
    assert 'data-state="error"' in dom and "error: k must be a whole number from 1 to 3" in dom


def test_the_page_its_files_and_json_for_every_refusal(answerer):
    with TestClient(create_app(answerer)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/static/app.js" in page.text and "/static/style.css" in page.text
        assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
        for response, status in [(client.get("/nowhere"), 404), (client.get("/static/none.js"), 404),
                                 (client.get("/answer"), 405), (client.post("/answer", content=b"{"), 415),
                                 (client.post("/answer", content=b"{", headers={"Content-Type": "application/json"}), 400)]:
            assert response.status_code == status and set(response.json()) == {"error"}


def test_an_answer_carries_its_passage_and_the_span_it_highlights(answerer):
    with TestClient(create_app(answerer)) as client:
        result = client.post("/answer", json={"question": QUESTION, "k": 3}).json()
    start, end = result["span"]
    assert result["context"][start:end] == result["answer"]
    cited = next(p for p in PASSAGES if p.id == result["passages"][result["source"]]["id"])
    assert result["context"] == passage_string(cited)


def test_k_above_the_services_bound_is_400(answerer):
    with TestClient(create_app(answerer, limits=Limits(max_k=3))) as client:
        assert client.post("/answer", json={"question": QUESTION, "k": 3}).status_code == 200
        reply = client.post("/answer", json={"question": QUESTION, "k": 4})
        assert reply.status_code == 400 and reply.json() == {
            "error": "k must be a whole number from 1 to 3 (the service's --max-k), got 4"
        }
    with TestClient(create_app(answerer)) as client:  # the default (100) is above this index's 40 passages
        reply = client.post("/answer", json={"question": QUESTION, "k": 41})
        assert reply.status_code == 400 and "1 to 40 (the index's passages)" in reply.json()["error"]


def test_a_body_over_the_limit_is_413_declared_or_chunked(answerer):
    body = b'{"question": "' + b"x" * 300 + b'"}'
    with TestClient(create_app(answerer, limits=Limits(max_body_bytes=256))) as client:
        for content in (body, iter([body[:100], body[100:200], body[200:]])):  # Content-Length, then chunked
            reply = client.post("/answer", content=content, headers={"Content-Type": "application/json"})
            assert reply.status_code == 413 and "over 256 bytes (the service's --max-body-bytes)" in reply.json()["error"]
        assert client.post("/answer", json={"question": QUESTION, "k": 2}).status_code == 200


def test_a_question_over_the_limit_is_400_before_any_tokenization(answerer, monkeypatch):
    with TestClient(create_app(answerer, limits=Limits(max_question_chars=50))) as client:
        assert client.post("/answer", json={"question": "x" * 50, "k": 2}).status_code == 200
        monkeypatch.setattr(answerer.reader, "question_ids", lambda question: pytest.fail("tokenized"))
        reply = client.post("/answer", json={"question": "é" * 51, "k": 2})
    assert reply.status_code == 400 and reply.json() == {
        "error": "the question is 51 characters, over 50 (the service's --max-question-chars)"
    }


def hold_reads(answerer: Answerer, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make each model pass wait for the test: (reading, set when a pass starts; release, for the test to set).
    Events, not sleeps racing a timeout on a loaded machine."""
    read, reading, release = answerer.read, threading.Event(), threading.Event()

    def held_read(lookups, mode):
        reading.set()
        assert release.wait(60), "the test never let the pass go"
        return read(lookups, mode)

    monkeypatch.setattr(answerer, "read", held_read)
    return reading, release


def test_a_request_past_the_timeout_is_504_and_a_waiting_one_is_never_read(answerer, monkeypatch):
    """The first question's pass is held until both requests have had their 504."""
    read = answerer.read
    reading, release = hold_reads(answerer, monkeypatch)
    app = create_app(answerer, max_batch=1, window_ms=0, limits=Limits(timeout_s=1.0))
    submitted, batcher = [], app.state.batcher
    submit = batcher.submit
    monkeypatch.setattr(batcher, "submit", lambda *args: submitted.append(submit(*args)) or submitted[-1])
    with serving(app) as port:
        replies = [None, None]

        def ask(slot: int) -> None:
            replies[slot] = request(port, "POST", "/answer", {"question": QUESTION, "k": 2})

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        assert reading.wait(60)  # the first is being read (held); the second waits behind it
        ask(1)
        first.join()
        assert [status for status, _ in replies] == [504, 504]
        assert replies[1][1] == {"error": "no answer within 1 s (the service's --timeout-s)"}
        assert len(submitted) == 2 and submitted[1].cancelled()
        release.set()
        submitted[0].result(timeout=60)  # the first was being read: it finishes, unseen
        monkeypatch.setattr(answerer, "read", read)
        status, again = request(port, "POST", "/answer", {"question": QUESTION, "k": 2})
        assert status == 200 and again["answer"]
    assert batcher.batches == [1, 1]  # the first and the last: the cancelled one was skipped


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        Limits(timeout_s=0)
