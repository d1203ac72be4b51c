"""The local Prefect stack the deployments run on: a server on 127.0.0.1, the process work pool
``btr-local``, the deployments of prefect.yaml and a worker. ``make demo`` starts it around one run
and stops it; ``make services`` starts it and leaves it up, ``make stop`` stops it:

    python -m flows.services start [--port 4200]   # returns once the worker is up
    python -m flows.services stop

What it started is kept in ``.prefect/services.json`` (process ids, port); the logs are
``.prefect/server.log`` and ``.prefect/worker.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from workers.quiet import quiet

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".prefect"
POOL = "btr-local"
STATE = HOME / "services.json"


def prefect_env(port: int) -> dict[str, str]:
    """A project-local Prefect home, telemetry off, the API on loopback."""
    return {
        **os.environ,
        **quiet(),
        "PREFECT_HOME": str(HOME),
        "PREFECT_API_URL": api_url(port),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_ENABLED": "true",
        "PWD": str(ROOT),  # prefect.yaml's pull step runs flows in {{ $PWD }}: the project, wherever make ran
    }


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def prefect() -> str:
    """The ``prefect`` command of this environment."""
    return str(Path(sys.executable).parent / "prefect")


def run(args: list[str], env: dict[str, str]) -> None:
    subprocess.run(args, env=env, cwd=ROOT, check=True)


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A background service in its own process group (so it can be stopped with its children)."""
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url(port)}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_healthy(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the Prefect server exited (see {HOME / 'server.log'})")
        if healthy(port):
            return
        time.sleep(1)
    raise RuntimeError(f"the Prefect server did not answer on 127.0.0.1:{port} within {timeout:.0f} s")


def start_stack(port: int, services: list[subprocess.Popen]) -> dict[str, str]:
    """Server, work pool, deployments, worker; each process is appended to ``services`` as it starts
    (so the caller can stop what did start when a later step fails). Returns the environment."""
    if healthy(port):
        raise RuntimeError(
            f"a Prefect server already answers on 127.0.0.1:{port}: `make stop` stops the one `make services` "
            "started; or choose another port"
        )
    env = prefect_env(port)
    HOME.mkdir(exist_ok=True)
    step(f"Prefect server; its UI, to open now: http://127.0.0.1:{port} (log: .prefect/server.log)")
    server = start([prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, HOME / "server.log")
    services.append(server)
    wait_healthy(port, server)
    step(f"work pool {POOL}, deployments index-wikipedia/local and train-reader/local, worker")
    run([prefect(), "work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
    run([prefect(), "deploy", "--all", "--no-prompt"], env)
    services.append(start([prefect(), "worker", "start", "--pool", POOL], env, HOME / "worker.log"))
    return env


def alive(pid: int) -> bool:
    """Whether ``pid`` is still one of the Prefect processes this module started."""
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_pids(pids: list[int], timeout: float = 20) -> None:
    """SIGTERM each process group (a service with its children), then SIGKILL what is left after
    ``timeout`` seconds."""
    for pid in pids:
        if alive(pid):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in pids:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)


def cmd_start(port: int) -> int:
    if STATE.exists() and any(alive(pid) for pid in json.loads(STATE.read_text())["pids"]):
        print(f"already running (see {STATE}); `make stop` stops it", file=sys.stderr)
        return 1
    services: list[subprocess.Popen] = []
    try:
        start_stack(port, services)
    except (subprocess.CalledProcessError, RuntimeError) as error:
        print(f"services failed: {error}", file=sys.stderr)
        stop_pids([p.pid for p in reversed(services)])
        return 1
    STATE.write_text(json.dumps({"port": port, "pids": [p.pid for p in reversed(services)]}) + "\n")
    step(f"up: the Prefect UI at http://127.0.0.1:{port}, worker on {POOL} (logs: .prefect/server.log, .prefect/worker.log)")
    print(f"    export PREFECT_API_URL={api_url(port)}")
    print("    .venv/bin/prefect deployment run index-wikipedia/local --watch  # add --param name=value; see prefect.yaml")
    print("    make stop                                                        # when done", flush=True)
    return 0


def cmd_stop() -> int:
    if not STATE.exists():
        print("nothing to stop: no services started by `make services`", file=sys.stderr)
        return 0
    state = json.loads(STATE.read_text())
    step(f"stopping the worker and the server on 127.0.0.1:{state['port']}")
    stop_pids(state["pids"])
    STATE.unlink()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.services",
        description="Start (and leave up) or stop a local Prefect server, the btr-local work pool, the deployments and a worker.",
    )
    parser.add_argument("action", choices=("start", "stop"),
                        help="start: the server, work pool, deployments and a worker, left running; stop: what start "
                             "left running")
    parser.add_argument("--port", type=int, default=4200,
                        help="the Prefect server's port on 127.0.0.1 (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_start(args.port) if args.action == "start" else cmd_stop()


if __name__ == "__main__":
    sys.exit(main())
