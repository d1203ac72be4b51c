"""Run a command as a child process and watch it: wall time, the heap of its largest process, the disk a folder takes.

The child's whole process tree is sampled (every 0.1 s for memory, 1 s for disk), so the Ray
processes a step starts (raylet, workers) count: the figure is the largest single process, which is
what bounds the memory a machine of the cluster needs.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def _status(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of a process in kB (absent where /proc does not say)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    values[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return values


def _tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (files that vanish while counted are skipped)."""
    total = 0
    for path, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(path, name)).st_blocks * 512
            except OSError:
                continue
    return total


def run_watched(command: list[str], disk: Path) -> dict:
    """Run ``command``; its exit code, seconds, peak RSS (ru_maxrss), largest heap of one process and peak bytes under ``disk``."""
    start = time.perf_counter()
    # Its output goes to stderr: stdout is the caller's (faiss prints there from C++).
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=2)
    anon, disk_peak, disk_at = 0, folder_bytes(disk), 0.0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        anon = max([anon] + [_status(p).get("RssAnon", 0) for p in _tree(child.pid)])
        if time.monotonic() - disk_at >= 1.0:
            disk_peak, disk_at = max(disk_peak, folder_bytes(disk)), time.monotonic()
        time.sleep(0.1)
    return {
        "exit": os.waitstatus_to_exitcode(status),
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_anon_mb": round(anon / 1024, 1),
        "peak_disk_bytes": max(disk_peak, folder_bytes(disk)),
    }
