"""`make demo`: a local Prefect server and worker, the index-wikipedia deployment on the bundled
sample, then a question answered from the index. Everything it starts listens on 127.0.0.1 and is
stopped at the end, also on failure or Ctrl-C.

    python -m flows.demo [--question "..."] [--port 4200]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .progress import PROGRESS_FILE, follow
from .services import ROOT, prefect, run, start_stack, step, stop_pids

DEMO_INDEX = ROOT / "indexes" / "wikipedia-sample"
QUESTION = "Who directed 2001: A Space Odyssey?"
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def drop_stale_index(index: Path, weights_digest: str) -> bool:
    """Remove ``index`` when the reader that built it is not the one with ``weights_digest``.

    Only for the demo's own index: it is rebuilt from the bundled sample right after, whereas the
    flow itself (rightly) refuses to resume a build with another reader. This is what makes
    ``make demo`` work again after a pull that changed the default checkpoint.
    """
    plan = index / ".work" / "plan.json"
    if not plan.exists() or json.loads(plan.read_text()).get("reader_weights") == weights_digest:
        return False
    shutil.rmtree(index)
    return True


def flow_run_state(port: int, run_id: str) -> str | None:
    """The flow run's state type (COMPLETED, RUNNING, ...) from the server's REST API."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/flow_runs/{run_id}", timeout=5) as response:
            return json.load(response)["state_type"]
    except OSError:
        return None


def run_deployment(env: dict[str, str], port: int) -> str:
    """``prefect deployment run index-wikipedia/local``, then its progress until the run ends.

    The run's progress comes from the file the flow keeps in the index folder (shards, speeds, time
    left); its end from the Prefect API. Returns the flow run's final state type.
    """
    progress = DEMO_INDEX / ".work" / PROGRESS_FILE
    progress.unlink(missing_ok=True)  # an earlier run's record would read as this one's
    command = [prefect(), "deployment", "run", "index-wikipedia/local"]
    created = subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    print(created.rstrip(), flush=True)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", created)
    if run_id is None:
        raise RuntimeError("`prefect deployment run` did not print the flow run's id")
    run_id = run_id.group(1)
    print(f"    follow it in the Prefect UI: http://127.0.0.1:{port}/runs/flow-run/{run_id}", flush=True)
    print("    waiting for the worker to pick the run up ...", flush=True)
    state: dict[str, str | None] = {"type": None}

    def ended() -> bool:
        state["type"] = flow_run_state(port, run_id)
        return state["type"] in FINAL_STATES

    follow(progress, done=ended)
    while not ended():  # the flow's last phase is written just before Prefect records its end
        time.sleep(1)
    return state["type"]


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=QUESTION,
                        help="the question answered from the new index (default: %(default)s)")
    parser.add_argument("--port", type=int, default=4200,
                        help="the local Prefect server's port on 127.0.0.1 (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    services: list[subprocess.Popen] = []
    from reader.load import ReaderSpec, load_reader  # torch: after argparse, so --help stays fast

    if drop_stale_index(DEMO_INDEX, load_reader(ReaderSpec()).identity().weights_digest):
        step(f"{DEMO_INDEX.relative_to(ROOT)} was built by another reader than the default one: removed, to be rebuilt")
    try:
        env = start_stack(args.port, services)
        step("prefect deployment run index-wikipedia/local (the worker's own log: .prefect/worker.log)")
        final = run_deployment(env, args.port)
        if final != "COMPLETED":
            raise RuntimeError(f"the flow run ended {final} (its logs: the Prefect UI, or .prefect/worker.log)")
        if not (DEMO_INDEX / "manifest.json").exists():
            raise RuntimeError("the flow run ended without an index (see .prefect/worker.log)")

        step(f"python -m reader.answer {args.question!r}")
        run([sys.executable, "-m", "reader.answer", args.question], env)
        return 0
    except (subprocess.CalledProcessError, RuntimeError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    finally:
        step("stopping the worker and the server")
        stop_pids([process.pid for process in reversed(services)])


if __name__ == "__main__":
    sys.exit(main())
