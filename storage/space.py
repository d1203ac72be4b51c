"""A write that failed on a full disk, said in one line: which file, how much is free, what to do."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Free bytes on the device of ``path`` (of its nearest folder that exists)."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 0


def disk_full(error: BaseException, path: Path, needed: int, then: str) -> OSError | None:
    """OSError(ENOSPC) naming ``path``, its device's free bytes and ``needed`` when ``error`` is a full disk's; else None.

    A full disk shows as ENOSPC or EDQUOT, as their text inside a library's own error (faiss: "write
    error in ...: 4096 != 15360 (No space left on device)"), or, where a library reports the short
    write otherwise (LMDB: EIO), as less free space than the write needed.
    """
    free, said = free_bytes(path.parent), str(error)
    full = getattr(error, "errno", None) in FULL or any(os.strerror(code) in said for code in FULL)
    if not full and free >= needed:
        return None
    cause = said.splitlines()[0][:300] if said else type(error).__name__
    return OSError(
        errno.ENOSPC,
        f"{path.name}: no space left on the device of {path.parent} ({free:,} bytes free, the write needs up to "
        f"{needed:,}; it failed with: {cause}). {then}",
    )
