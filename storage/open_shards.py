"""The shards a process has open: shared by every reader in it, at most a bounded number, least recently used closed first.

Every open shard holds a file and a memory map. A reader that touches every shard (verify, the
offline merge, a query service over time) would otherwise hold them all: 21,000 shards are over a
usual hard limit of 20,000 open files, 100,000 over ``vm.max_map_count`` (65,530 maps). So a
process keeps at most ``BTR_MAX_OPEN_SHARDS`` (default 512) open, fewer when its file limit leaves
less room, and closes the least recently used one that no reader is inside to open another.

LMDB allows one environment per file per process, and none may cross fork(): entries are keyed by
path and pid, and a child process or a rebuilt shard (new inode) reopens.
"""

from __future__ import annotations

import collections
import os
import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lmdb

from .shard import DATA, SHARDS

MAX_OPEN_ENV = "BTR_MAX_OPEN_SHARDS"
DEFAULT_MAX_OPEN = 512
# Files a process may hold besides its shards (sockets, libraries, a few temporary files).
_HEADROOM = 256


@dataclass
class _Entry:
    pid: int
    inode: int
    env: lmdb.Environment
    users: int = 0  # readers inside it now: it is never closed under them


_OPEN: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # least recently used first
_LOCK = threading.Lock()


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return _HEADROOM


def max_open_shards() -> int:
    """Shards this process keeps open: BTR_MAX_OPEN_SHARDS, at most half the files its hard limit leaves to shards."""
    wanted = int(os.environ.get(MAX_OPEN_ENV, DEFAULT_MAX_OPEN))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return max(1, wanted)
    others = _open_fds() - sum(e.pid == os.getpid() for e in _OPEN.values())  # files that are not shards
    return max(1, min(wanted, (hard - others) // 2))


def _raise_soft_limit(files: int) -> None:
    """Raise this process's soft limit on open files, up to the hard one, to hold ``files`` shards and a few more."""
    needed = files + _HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (2 * needed if hard == resource.RLIM_INFINITY else min(hard, 2 * needed), hard))


def _make_room(keep: int) -> None:
    """Close least recently used shards nobody reads until at most ``keep`` stay open (lock held)."""
    for path in [p for p, e in _OPEN.items() if e.users == 0]:
        if len(_OPEN) <= keep:
            break
        # Closing a read-only, lock-free environment only unmaps this process's view, so a child
        # may close what it inherited from its parent.
        _OPEN.pop(path).env.close()


def _acquire(root: Path, name: str) -> _Entry:
    path = os.path.realpath(root / SHARDS / name)
    inode = os.stat(os.path.join(path, DATA)).st_ino
    with _LOCK:
        entry = _OPEN.get(path)
        if entry is not None and (entry.pid, entry.inode) == (os.getpid(), inode):
            _OPEN.move_to_end(path)
            entry.users += 1
            return entry
        if entry is not None and entry.users == 0 or entry is not None and entry.pid != os.getpid():
            del _OPEN[path]  # inherited through fork, or the shard was rebuilt
            entry.env.close()
        elif entry is not None:  # rebuilt while a reader of the old file is inside: leave it to that reader
            del _OPEN[path]
        _make_room(max_open_shards() - 1)
        _raise_soft_limit(len(_OPEN) + 1)
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True, max_readers=1024)
        entry = _OPEN[path] = _Entry(os.getpid(), inode, env, users=1)
        return entry


def _release(entry: _Entry) -> None:
    with _LOCK:
        entry.users -= 1
        if entry.users == 0 and _OPEN.get(os.path.realpath(entry.env.path())) is not entry:
            entry.env.close()  # replaced while read: closed once its last reader is out
        elif entry.users == 0 and len(_OPEN) > max_open_shards():
            _make_room(max_open_shards())


@contextmanager
def open_shard(root: Path, name: str) -> Iterator[lmdb.Environment]:
    """A sealed shard, read-only and lock-free (safe: it is never written again), for the ``with`` block.

    Shared by every thread of the process, and never closed while a block is inside it.
    """
    entry = _acquire(root, name)
    try:
        yield entry.env
    finally:
        _release(entry)


def close_shards(root: Path) -> None:
    """Close this process's unused shards of the index at ``root`` (deleted ones free their disk only once closed)."""
    prefix = os.path.join(os.path.realpath(root), "")
    with _LOCK:
        for path in [p for p, e in _OPEN.items() if p.startswith(prefix) and e.users == 0]:
            _OPEN.pop(path).env.close()


def open_count() -> int:
    """Shards this process holds open now."""
    with _LOCK:
        return len(_OPEN)
