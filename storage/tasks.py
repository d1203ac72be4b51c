"""Many independent units of work, run one after another here, or spread by another runner (``workers.tasks``).

A unit is a module-level function and its arguments, small and picklable (paths, numbers); it returns
something small. Storage's passes over an index (the offline merge, verify) are written as such
units, so that the same code runs in one process or on a cluster and gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

Done = Callable[[int, int], None]  # (units done, units in all)


class Runner(Protocol):
    """Runs ``fn(*args)`` for every ``args`` of ``calls``; the results in the order of ``calls``."""

    def __call__(self, fn: Callable[..., Any], calls: Sequence[tuple], done: Done | None = None) -> list: ...


def serial(fn: Callable[..., Any], calls: Sequence[tuple], done: Done | None = None) -> list:
    """Every unit in this process, in order."""
    results = []
    for count, args in enumerate(calls, start=1):
        results.append(fn(*args))
        if done is not None:
            done(count, len(calls))
    return results
