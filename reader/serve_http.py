"""What reader.serve adds around its app at the HTTP level: who may ask, and how long a connection may say nothing.

A service on 127.0.0.1 is reachable from any page a local browser opens, through DNS rebinding (a
name of the attacker's that resolves to 127.0.0.1): ``RequestCheck`` refuses a Host header that is
not the bound address unless ``--allow-host`` names it, a POST whose Origin is another site's (a
page elsewhere can send one without asking: it cannot read the reply, but the model runs), and,
when the service has a token (``--token`` or ``BTR_TOKEN``; required for a non-loopback bind), a
request without ``Authorization: Bearer <token>``. ``GuardedH11Protocol`` is uvicorn's HTTP/1.1
protocol with uvicorn's own 400 (a bad Content-Length, TLS bytes on a plain port) in JSON like every
other refusal, a deadline for a request's head (a connection that sends nothing, or half a request
line, is closed after ``--header-timeout-s``) and a cap on open connections (``--max-connections``:
past it the connection idle longest is closed, so idle sockets cannot crowd out a request).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

import h11
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_NAMES = {"localhost"}
ANY_HOST = "*"
TOKEN_ENV = "BTR_TOKEN"
OPEN_PATHS = ("/health",)  # what a probe polls answers without the token (GET only)
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}  # what a cross-site page may send: none of them runs the model
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a connection may say nothing, and how many may be open (each a flag of ``reader.serve``)."""

    header_timeout_s: float = 10.0  # from the connection's first byte (or its opening) to a whole request head
    keep_alive_s: float = 5.0  # after an answer, for the next request to start (uvicorn's timeout_keep_alive)
    max_connections: int = 256  # open at once; past it, the one idle longest is closed

    def __post_init__(self) -> None:
        if min(self.header_timeout_s, self.keep_alive_s, self.max_connections) <= 0:
            raise ValueError(f"every connection limit must be positive, got {self}")


def host_name(header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(bound: str, allow: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a service bound to ``bound`` answers: that address (and ``localhost`` on loopback), plus ``allow``.

    None (any Host) for ``--allow-host '*'``, or for a wildcard bind (0.0.0.0, ::) that names none:
    such a service is reachable under every address of the machine, which this cannot list.
    """
    allow = {host_name(host) for host in allow}
    if ANY_HOST in allow:
        return None
    try:
        address = ipaddress.ip_address(bound)
    except ValueError:  # a name: it is what clients send
        return frozenset({bound.lower(), *allow})
    if address.is_unspecified:
        return frozenset(allow) or None
    return frozenset({str(address), *(LOOPBACK_NAMES if address.is_loopback else ()), *allow})


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def check_bind(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """ValueError for a non-loopback bind without a token, unless ``--insecure-no-auth`` says so on purpose."""
    if not is_loopback(host) and not token and not insecure_no_auth:
        raise ValueError(
            f"--host {host} is reachable from other machines, and this service has no other protection: give it a "
            f"token (--token or {TOKEN_ENV}; clients send 'Authorization: Bearer TOKEN'), or pass --insecure-no-auth "
            "to serve anyone who can reach it"
        )


class RequestCheck:
    """ASGI middleware: one line of JSON refusing a request by Host (400), Origin (403) or token (401), before the app."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None, token: str | None = None) -> None:
        self.app, self.hosts, self.token = app, hosts, token

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return 400, (f"Host {host!r} is not one this service answers to ({', '.join(sorted(self.hosts))}): "
                         "ask by one of those, or start it with --allow-host NAME")
        origin = headers.get("origin")
        if scope["method"] not in SAFE_METHODS and origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return 403, f"a request from the page of another site ({origin:.100}) is refused: ask from {host or 'this service'} itself"
        if self.token is None or (scope["method"] in SAFE_METHODS and scope["path"] in OPEN_PATHS):
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return 401, "this service needs its token: send 'Authorization: Bearer TOKEN'"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.refusal(scope) if scope["type"] == "http" else None
        if refused is not None:
            status, message = refused
            headers = {"www-authenticate": "Bearer"} if status == 401 else None
            await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def public(text: str, *paths: str | Path) -> str:
    """``text`` with each of these absolute paths cut to its last part: what a reply may say of this machine's files."""
    for path in sorted((str(p) for p in paths if p), key=len, reverse=True):
        if os.path.isabs(path):
            text = text.replace(path.rstrip("/"), Path(path).name)
    return text


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with its own 400 in JSON, a deadline for each request's head and a connection cap."""

    limits = ConnectionLimits()  # set per server by ``uvicorn_config``
    _head_timer: asyncio.TimerHandle | None = None
    _idle_since = 0.0
    _warned_at = float("-inf")  # when the cap was last said in the log (shared by every connection)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        if len(self.connections) > self.limits.max_connections:
            self._make_room()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head still to come whole: the deadline runs
            if self._head_timer is None and not self.transport.is_closing():
                self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        self._idle_since = self.loop.time()
        super().on_response_complete()  # the keep-alive timeout now runs, until the next request's first byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _make_room(self) -> None:
        """Close the connection idle longest (this one if every other is busy): idle sockets cannot crowd out requests."""
        idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self and c._idle()]
        victim = min(idle, key=lambda c: c._idle_since) if idle else self
        now = self.loop.time()
        if now - GuardedH11Protocol._warned_at >= 60:  # a flood of sockets is one line a minute, not one each
            GuardedH11Protocol._warned_at = now
            log.warning("%d connections open, over --max-connections %d: closing the one idle longest (said once a minute)",
                        len(self.connections), self.limits.max_connections)
        victim.transport.close()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:  # half a request: say why it ends
            self._send_json(408, f"the request head did not arrive within {self.limits.header_timeout_s:g} s "
                                 "(the service's --header-timeout-s)")
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._send_json(400, f"{msg.rstrip('.')}: not an HTTP/1.1 request this service can parse")

    def _send_json(self, status: int, message: str) -> None:
        """One reply written as bytes, then the connection closed (h11 may be in no state to send one)."""
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """``reader.serve``'s flags for connections and access: timeouts, the cap, the token."""
    default = ConnectionLimits()
    parser.add_argument("--header-timeout-s", type=float, default=default.header_timeout_s,
                        help="seconds for a request head to arrive whole; past it the connection is closed, with a 408 "
                             "if part came (default: %(default)s)")
    parser.add_argument("--keep-alive-s", type=float, default=default.keep_alive_s,
                        help="seconds an idle connection stays open after its last answer (default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=default.max_connections,
                        help="connections open at once; past it the one idle longest is closed (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                        help=f"require 'Authorization: Bearer TOKEN'; needed for a non-loopback --host "
                             f"(default: ${TOKEN_ENV} if set, else none: no token asked)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="serve a non-loopback --host without a token: anyone who reaches it may ask (default: off)")


def connection_options(args: argparse.Namespace) -> ConnectionLimits:
    """The limits the flags name; ValueError for a bad value or a non-loopback bind without a token."""
    check_bind(args.host, args.token, args.insecure_no_auth)
    return ConnectionLimits(args.header_timeout_s, args.keep_alive_s, args.max_connections)


def uvicorn_config(app: ASGIApp, host: str, port: int, limits: ConnectionLimits = ConnectionLimits()) -> uvicorn.Config:
    """How reader.serve runs ``app`` on uvicorn (the tests run the same)."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=protocol,
                          timeout_keep_alive=limits.keep_alive_s)
