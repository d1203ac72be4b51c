"""One LMDB environment per shard, written once by one writer, sealed by an atomic rename.

A shard is built in ``shards/.tmp-shard-NNNNN`` and renamed to ``shards/shard-NNNNN`` only when
complete, with ``shard.json`` (rows, sizes, digest) beside its data file. A killed writer leaves
only a temporary folder, which the next write of that shard removes. Sealed shards are opened
read-only without a lock file: nothing ever writes them again.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, NoReturn

import lmdb
from pydantic import Field

from .codec import file_digest
from .space import disk_full

KEY = struct.Struct(">Q")  # a block's first global row: fixed width, big-endian, so keys sort and loads append
SHARDS = "shards"
DATA = "data.mdb"
# Records of consecutive rows share one LMDB value: a ~2.6 KB record alone would take a whole 4 KB
# overflow page (1.46x on disk, measured); 16 of them waste under 4 KB in ~40 KB.
BLOCK_ROWS = 16
_COUNT = struct.Struct("<I")
_PAGE = 4096


def pack_block(records: Sequence[bytes]) -> bytes:
    """One LMDB value: record count, end offsets, then the records."""
    ends = itertools.accumulate(len(r) for r in records)
    return _COUNT.pack(len(records)) + struct.pack(f"<{len(records)}I", *ends) + b"".join(records)


def block_records(block) -> list:
    """The records of a block (as slices of the buffer given: no copy of a memory-mapped value)."""
    view = memoryview(block)
    (count,) = _COUNT.unpack_from(view)
    ends = struct.unpack_from(f"<{count}I", view, _COUNT.size)
    base = _COUNT.size + 4 * count
    starts = (0, *ends[:-1])
    return [view[base + a : base + b] for a, b in zip(starts, ends)]


def block_record(block, index: int):
    """Record ``index`` of a block (a slice of the buffer, no copy), or None when the block is shorter."""
    view = memoryview(block)
    (count,) = _COUNT.unpack_from(view)
    if index >= count:
        return None
    base = _COUNT.size + 4 * count
    start = struct.unpack_from("<I", view, _COUNT.size + 4 * (index - 1))[0] if index else 0
    end = struct.unpack_from("<I", view, _COUNT.size + 4 * index)[0]
    return view[base + start : base + end]


def block_key(row: int, first_row: int) -> bytes:
    """The key of the block holding ``row`` in a shard starting at ``first_row``."""
    return KEY.pack(first_row + (row - first_row) // BLOCK_ROWS * BLOCK_ROWS)


# The most shards the default shard size makes (see default_shard_size).
MAX_DEFAULT_SHARDS = 4096


def default_shard_size(passages: int) -> int:
    """Passages per shard for a corpus of ``passages``: 1,000, or whole thousands more so that there are at most 4,096 shards.

    A shard is a file and a memory map to whoever reads it: 21M passages make 3,500 shards of
    6,000, 100M make 4,000 of 25,000, well under a usual hard limit of 20,000 open files and
    ``vm.max_map_count`` (65,530) even for a process that opens every shard (readers keep at most
    ``BTR_MAX_OPEN_SHARDS`` open anyway). Up to 4M passages this is the 1,000 it always was.
    """
    return max(1, -(-passages // (MAX_DEFAULT_SHARDS * 1000))) * 1000


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


def shard_number(name: str) -> int:
    """The id in a shard's name: ``shard_name``'s inverse."""
    return int(name.split("-")[1])


class DamagedIndex(RuntimeError):
    """The index's files are damaged, or changed under a running reader: the index's fault, never the question's."""


def repair_hint(root: Path, verified: bool = False) -> str:
    """What to do about a damaged index (the end of every DamagedIndex message about files)."""
    rebuild = (
        f"rebuild: rerun the index flow on {root} with the same settings; it keeps every shard that still matches "
        "its digest and rebuilds the rest (an offline-merged index is encoded again whole: its lossless shards are not kept)"
    )
    if verified:
        return rebuild[0].upper() + rebuild[1:]
    return f"run `python -m storage.verify {root}` for the full list, then {rebuild}"


# What the manifest schema (storage.index) accepts for a shard's fields.
Count = Annotated[int, Field(ge=0, strict=True)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# A bare shard folder name: no separator, no "..", so a manifest can only name folders inside shards/.
ShardName = Annotated[str, Field(pattern=r"^shard-[0-9]{5,}$")]


def os_fault(path: Path, error: OSError) -> str:
    """What the system said about an index file it would not open, in one line ("PATH: Not a directory")."""
    return f"{path}: {error.strerror or type(error).__name__}"


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest lists about a sealed shard (its annotations are the manifest schema's)."""

    name: ShardName
    first_row: Count
    rows: Count
    tokens: Count
    bytes: Count
    digest: Digest

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ShardInfo":
        return cls(**data)


def map_size_for(values: Sequence[bytes]) -> int:
    """An upper bound on the LMDB map a shard needs, from its values' sizes.

    Large values take whole overflow pages; small ones share leaf pages. Each value is charged its
    page-rounded size plus a node header, and a tenth more covers branch pages and the free list.
    """
    pages = sum(math.ceil((len(v) + KEY.size + 64) / _PAGE) for v in values)
    return (int(pages * 1.1) + 64) * _PAGE


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(root: Path, shard_id: int, first_row: int, records: Sequence[bytes], tokens: int) -> ShardInfo:
    """Write records ``first_row..`` as one sealed shard; replaces leftovers of an earlier attempt."""
    records = list(records)
    values = [pack_block(records[i : i + BLOCK_ROWS]) for i in range(0, len(records), BLOCK_ROWS)]
    shards = root / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    name = shard_name(shard_id)
    final, tmp = shards / name, shards / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    map_size = map_size_for(values)
    try:
        env = lmdb.open(str(tmp), map_size=map_size, subdir=True, max_dbs=0, sync=True)
        try:
            with env.begin(write=True) as txn:
                for block, value in enumerate(values):
                    row = first_row + block * BLOCK_ROWS
                    if not txn.put(KEY.pack(row), value, append=True):
                        raise RuntimeError(f"{name}: the block at row {row} was not appended")
            env.sync(True)
        finally:
            env.close()
        (tmp / "lock.mdb").unlink(missing_ok=True)  # sealed shards are opened without a lock file
        data = tmp / DATA
        info = ShardInfo(name, first_row, len(records), tokens, data.stat().st_size, file_digest(data))
        (tmp / "shard.json").write_text(json.dumps(info.to_dict(), indent=1))
    except (OSError, lmdb.Error) as error:
        _write_failed(error, name, tmp, map_size)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(shards)
    return info


def _write_failed(error: Exception, name: str, tmp: Path, needed: int) -> NoReturn:
    """Clear a failed write away and say why; a full disk (LMDB reports a short write as EIO) by name (``storage.space``)."""
    full = disk_full(error, tmp.parent / name, needed,
                     "Free space and rerun the flow: it keeps every shard already sealed and writes this one again")
    shutil.rmtree(tmp, ignore_errors=True)
    if full is not None:
        raise full from error
    raise error


def sealed_shard(root: Path, shard_id: int) -> ShardInfo | None:
    """The info of a sealed shard whose data still matches its recorded digest, else None."""
    folder = root / SHARDS / shard_name(shard_id)
    try:
        info = ShardInfo.from_dict(json.loads((folder / "shard.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return info if file_digest(folder / DATA) == info.digest else None


def shard_file(root: Path, shard: ShardInfo) -> os.stat_result:
    """The stat of a shard's data file, refused (DamagedIndex) unless its size is the manifest's.

    LMDB maps the file and takes its length from its own meta page: a shorter file (an interrupted
    copy, a full disk) would kill the process with SIGBUS at the first read past its end. One stat,
    no read; ``ShardInfo.bytes`` is the file's size when it was sealed.
    """
    path = root / SHARDS / shard.name / DATA
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise DamagedIndex(f"{shard.name} is missing ({path})") from None
    except OSError as error:  # its folder replaced by a file, a symlink loop, no permission
        raise DamagedIndex(f"{shard.name} cannot be read ({os_fault(path, error)})") from None
    if stat.st_size != shard.bytes:
        what = "truncated" if stat.st_size < shard.bytes else "larger than when it was sealed"
        raise DamagedIndex(f"{shard.name} is {what}: {stat.st_size:,} bytes, the manifest says {shard.bytes:,}")
    return stat


def check_shard_files(root: Path, shards: Sequence[ShardInfo]) -> dict[str, int]:
    """Every shard's inode, after checking every size (all problems named in one DamagedIndex)."""
    inodes, problems = {}, []
    for shard in shards:
        try:
            inodes[shard.name] = shard_file(root, shard).st_ino
        except DamagedIndex as error:
            problems.append(str(error))
    if problems:
        raise DamagedIndex(f"the index at {root} is damaged: {'; '.join(problems)}. {repair_hint(root)}")
    return inodes
