"""Look at a running cluster's Ray dashboard the way a person does: in Chromium, past its token dialog.

Ray's dashboard asks for the cluster's token (token authentication is on by default and stays on
here). A person pastes the output of ``ray get-auth-token`` into the dialog, which stores it as the
``ray-authentication-token`` cookie; this tool sets the same cookie through Chromium's DevTools
protocol, opens a page, waits until the texts it is told to expect appear, and can save a
screenshot. ``make browser`` installs Chromium.

    python -m flows.dashboard http://127.0.0.1:8265 --page actors --expect IndexWorker \\
        --screenshot docs/ray-dashboard.png
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

COOKIE = "ray-authentication-token"  # what the dashboard's own token dialog sets


def auth_token() -> str | None:
    """The local cluster's token, as ``ray get-auth-token`` prints it (None when there is none)."""
    ray = Path(sys.executable).parent / "ray"
    done = subprocess.run([str(ray), "get-auth-token"], capture_output=True, text=True)
    token = done.stdout.strip() if done.returncode == 0 else ""
    return token or None


class DevTools:
    """Commands to one page over Chromium's DevTools protocol (events in between are skipped)."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket, self.next_id = socket, 0

    async def __call__(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.socket.send_json({"id": self.next_id, "method": method, "params": params})
        async for message in self.socket:
            reply = json.loads(message.data)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise RuntimeError("Chromium closed the DevTools connection")


async def _page_socket(session: aiohttp.ClientSession, port: int, deadline: float) -> str:
    while True:
        try:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in await response.json() if t["type"] == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("Chromium's DevTools endpoint did not come up")
        await asyncio.sleep(0.2)


async def _look(url: str, token: str | None, page: str, expect: list[str], screenshot: Path | None, timeout: float) -> str:
    browser = shutil.which("chromium")
    if browser is None:
        raise FileNotFoundError("chromium is not installed (make browser)")
    from reader.loadtest import free_port

    port = free_port()
    # Chromium's helper processes keep writing the profile after the main one exits: the browser runs in
    # its own process group, which is ended as a whole before the profile is removed.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        try:
            async with aiohttp.ClientSession() as session:
                address = await _page_socket(session, port, deadline)
                async with session.ws_connect(address, max_msg_size=0) as socket:
                    tools = DevTools(socket)
                    if token:
                        await tools("Network.enable")
                        await tools("Network.setCookie", name=COOKIE, value=token, url=url)
                    await tools("Page.navigate", url=f"{url.rstrip('/')}/#/{page}")
                    text = ""
                    while time.monotonic() < deadline:
                        result = await tools("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)
                        text = result.get("result", {}).get("value") or ""
                        if text and all(e in text for e in expect):
                            break
                        await asyncio.sleep(0.5)
                    else:
                        missing = [e for e in expect if e not in text]
                        raise TimeoutError(f"{url}/#/{page} did not show {missing} within {timeout:.0f} s; it shows:\n{text[:600]}")
                    if screenshot is not None:
                        await asyncio.sleep(1.0)  # let the tables finish drawing
                        shot = await tools("Page.captureScreenshot", format="png")
                        screenshot.parent.mkdir(parents=True, exist_ok=True)
                        screenshot.write_bytes(base64.b64decode(shot["data"]))
                    return text
        finally:
            _end_group(process)


def _end_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``process`` and every process it started (it leads its own session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            process.poll()
            time.sleep(0.1)
        else:
            continue
        break
    process.wait(timeout=grace)


def look(
    url: str, page: str = "overview", expect: list[str] | None = None, screenshot: Path | None = None,
    token: str | None = None, timeout: float = 60.0,
) -> str:
    """The text of dashboard page ``page`` once every string of ``expect`` is on it; raises TimeoutError if not."""
    return asyncio.run(_look(url, token if token is not None else auth_token(), page, expect or [], screenshot, timeout))


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m flows.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the dashboard, e.g. http://127.0.0.1:8265")
    parser.add_argument("--page", default="overview",
                        help="the dashboard page: overview, cluster, actors, jobs, ... (default: %(default)s)")
    parser.add_argument("--expect", action="append", default=[],
                        help="text to wait for on the page, repeatable (default: none: the page once it shows any text)")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="save a PNG of the page here (default: no screenshot)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds for Chromium to open the page and show every --expect text (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = look(args.url, args.page, args.expect, args.screenshot, timeout=args.timeout)
    except (FileNotFoundError, TimeoutError, RuntimeError, aiohttp.ClientError) as error:
        print(f"dashboard: {error}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
