"""Storage's passes as Ray tasks: a ``storage.tasks.Runner`` for the cluster, and a loopback cluster to run on.

Each unit (a shard to partition, a bucket to merge, a shard to verify, ...) is one task of one CPU;
a task lost with its process or node is run again by Ray (``max_retries``). A unit writes its files
under temporary names and renames them, so a rerun finds either nothing or the whole result, and
the result is the same bytes whoever runs it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from storage.tasks import Done, Runner

# A local Ray listens on loopback only, dashboard included (on 8265, or the next free port).
LOCAL_RAY = {"_node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1"}
# Fault injection for the tests: "<unit function>:<unit number>:<marker file>" makes the task running
# that unit SIGKILL its own process once (the marker records that it happened).
FAULT_ENV = "BTR_FAULT_KILL_TASK"
RETRIES = 3


def loopback_ray() -> None:
    """Make a local Ray single-node and loopback-only (its default picks the machine's outward IP).

    Ray reads this switch at import; the environment carries it to Ray's own processes and the
    constant to this one. A cluster given by address is left alone.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def cluster(address: str | None = None, cpus: int | None = None, **init: Any) -> Iterator[None]:
    """Inside: connected to the Ray cluster at ``address``, else to a local loopback one of ``cpus`` CPUs started here.

    A Ray already connected in this process is used as it is; what is started here is stopped on the way out.
    """
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address, **init)
    else:
        loopback_ray()
        ray.init(**(LOCAL_RAY | {"num_cpus": cpus} | init))
    try:
        yield
    finally:
        ray.shutdown()


def _maybe_die(fn: Callable[..., Any], args: tuple) -> None:
    """Under FAULT_ENV, SIGKILL this process once when it runs the named unit."""
    fault = os.environ.get(FAULT_ENV)
    if not fault:
        return
    name, unit, marker = fault.split(":", 2)
    if fn.__name__ == name and args and args[-1] == int(unit) and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


@ray.remote(num_cpus=1)
def _run_unit(fn: Callable[..., Any], args: tuple) -> Any:
    _maybe_die(fn, args)
    return fn(*args)


def cluster_runner(retries: int = RETRIES) -> Runner:
    """A Runner whose units are Ray tasks on the connected cluster (one CPU each), retried when their process is lost."""

    def run(fn: Callable[..., Any], calls: Sequence[tuple], done: Done | None = None) -> list:
        refs = [_run_unit.options(max_retries=retries).remote(fn, tuple(args)) for args in calls]
        pending, finished = list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            if ready and done is not None:
                finished += len(ready)
                done(finished, len(refs))
        return ray.get(refs)

    return run
