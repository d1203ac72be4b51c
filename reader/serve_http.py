"""What reader.serve adds around its app at the HTTP level: the Host check, and uvicorn's own refusals in JSON.

A service on 127.0.0.1 is reachable from any page a local browser opens, through DNS rebinding (a
name of the attacker's that resolves to 127.0.0.1): ``HostCheck`` refuses a Host header that is not
the bound address unless ``--allow-host`` names it. uvicorn answers a request it cannot parse (a
bad Content-Length, TLS bytes on a plain port) itself, in plain text; ``JsonH11Protocol`` makes
that one line of JSON too, like every other refusal.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

import h11
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_NAMES = {"localhost"}
ANY_HOST = "*"


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


class HostCheck:
    """ASGI middleware: 400 with one line of JSON for a Host header the service does not answer to."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.hosts is not None:
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.hosts:
                message = (
                    f"Host {header!r} is not one this service answers to ({', '.join(sorted(self.hosts))}): "
                    "ask by one of those, or start it with --allow-host NAME"
                )
                await JSONResponse({"error": message}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JsonH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with its own 400 (a request it cannot parse) in JSON like the app's refusals."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": f"{msg.rstrip('.')}: not an HTTP/1.1 request this service can parse"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def uvicorn_config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    """How reader.serve runs ``app`` on uvicorn (the tests run the same)."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=JsonH11Protocol)
