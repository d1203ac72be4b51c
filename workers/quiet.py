"""Nothing this project starts phones home or draws progress bars: telemetry off, library bars off, in every process.

Applied when ``flows`` or ``workers`` is imported, before Prefect or Ray is, and inherited by every
process they start (a temporary or local Prefect server, Ray's raylet and workers), so it holds
however a run is started: a deployment, ``python -m flows.index_wikipedia``, ``make demo``, tests.
A variable already set in the environment is left as it is.
"""

from __future__ import annotations

import os

QUIET_ENV = {
    "DO_NOT_TRACK": "1",  # the cross-tool convention; Prefect honours it
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the Prefect server's telemetry service
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray's usage-stats reporting
    "HF_HUB_DISABLE_TELEMETRY": "1",  # Hugging Face Hub telemetry (loading by name still works)
    # transformers' "Loading weights" bar, once per model load in every worker: 2 lines each in a run's log
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def quiet() -> dict[str, str]:
    """Set the variables of ``QUIET_ENV`` that are not set yet; return the values in force."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in QUIET_ENV}


VERBOSE_ENV = "BTR_VERBOSE"  # set (not 0): every library line on the terminal too (flows.console)


def verbose() -> bool:
    """Whether the user asked for the libraries' own lines (``BTR_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")
