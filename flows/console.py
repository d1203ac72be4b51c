"""What a flow command prints: a line per phase and the wall time at the end, not the libraries' chatter.

Everything filtered here still reaches Prefect's API (the UI and ``prefect flow-run logs`` keep
every line, the engine's included) and Ray's log files; only the terminal is spared. Filtered:
Prefect's engine lines for runs that went well ("Beginning subflow run", "Finished in state
Completed()", the temporary server's stop), the console lines of tasks run inside Ray's processes
(the flow reports their shards itself), Prefect's "EventsWorker - Still processing items", and
Ray's start-up lines (its token notice: the flow says how to get past the dashboard's token
dialog), and transformers' load reports (a table of unused keys when a retriever is loaded from a QA
checkpoint). Weight-loading bars go through ``workers.quiet``. ``BTR_VERBOSE=1`` turns all of it off.
"""

from __future__ import annotations

import logging
import time

import psutil

from reader.load import quiet_library_logs
from workers.quiet import verbose

from .progress import duration

# Engine lines of runs that went well; a failed or crashed run's lines all stay.
CHATTER = ("Finished in state Completed()", "Beginning subflow run", "Stopping temporary server",
           "Still processing items")


class Chatter(logging.Filter):
    """Drops the log records whose message holds one of ``CHATTER``; the temporary server's start
    keeps its first line (the URL), not Prefect's advice on running a server of one's own."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in CHATTER):
            return False
        if message.startswith("Starting temporary server"):
            record.msg, record.args = message.splitlines()[0], ()
        return True


def quiet_console() -> None:
    """Attach ``Chatter`` to the console handlers in this process (Prefect's, set up when it is imported), unless
    ``BTR_VERBOSE``."""
    if verbose():
        return
    quiet_library_logs()  # transformers' load reports: a retriever loaded from a QA checkpoint prints a table

    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:
        if not any(isinstance(f, Chatter) for f in handler.filters):
            handler.addFilter(Chatter())


def worker_console_env() -> dict[str, str]:
    """For the processes Ray starts: their Prefect tasks print errors only (their logs still go to the API)."""
    return {} if verbose() else {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "ERROR"}


def ray_logging_level() -> int:
    """The driver's Ray logger level: errors only, unless ``BTR_VERBOSE``."""
    return logging.INFO if verbose() else logging.ERROR


def command_started() -> float:
    """When this process started (epoch seconds): a command's wall time counts its imports too."""
    return psutil.Process().create_time()


def wall_time_line(began: float, flow_seconds: float | None) -> str:
    """The command's last line: its wall time, and how much of it the flow run took."""
    total = time.time() - began
    if flow_seconds is None:
        return f"done in {duration(total)}"
    return (f"done in {duration(total)}: {duration(flow_seconds)} in the flow run (what `python -m flows.progress` "
            f"reports), {duration(max(total - flow_seconds, 0))} starting up (libraries, Prefect's temporary server)")
