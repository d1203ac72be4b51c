"""Check an index: every shard's digest against the manifest, every record's checksum.

    python -m storage.verify INDEX

Exit 0 when intact; 1, naming each bad shard and passage, when not; 2 when there is no index.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .codec import Codec, file_digest
from .index import CODEC, IndexNotFound, Manifest
from .record import CorruptRecord, check_record, record_pid
from .shard import KEY, SHARDS, block_records, open_shard


def verify(root: Path) -> tuple[list[str], int]:
    """Problems found (empty when intact) and the number of records checked."""
    manifest = Manifest.load(root)
    problems: list[str] = []
    try:
        Codec.load(root / CODEC, manifest.codec)
    except (OSError, ValueError) as error:
        problems.append(f"codec: {error}")
    checked = 0
    for shard in manifest.shards:
        data = root / SHARDS / shard.name / "data.mdb"
        if not data.exists():
            problems.append(f"{shard.name}: missing ({data})")
            continue
        if file_digest(data) != shard.digest:
            problems.append(f"{shard.name}: digest differs from the manifest (the file changed after it was sealed)")
        env = open_shard(root, shard.name)
        try:
            with env.begin(buffers=True) as txn:
                expected = shard.first_row
                for key, block in txn.cursor():
                    first = KEY.unpack(key)[0]
                    if first != expected:
                        problems.append(f"{shard.name}: row {expected} is missing (next block starts at row {first})")
                        expected = first
                    for row, value in enumerate(block_records(block), start=first):
                        try:
                            check_record(value, f"{shard.name} row {row} (passage {record_pid(value)!r})")
                        except CorruptRecord as error:
                            problems.append(str(error))
                        expected += 1
                        checked += 1
                if expected != shard.first_row + shard.rows:
                    problems.append(f"{shard.name}: {expected - shard.first_row} rows, manifest says {shard.rows}")
        except Exception as error:  # lmdb raises its own errors on a damaged file
            problems.append(f"{shard.name}: unreadable ({type(error).__name__}: {error})")
    return problems, checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.verify", description=__doc__.splitlines()[0])
    parser.add_argument("index", type=Path, help="index folder (with manifest.json)")
    args = parser.parse_args(argv)
    try:
        problems, checked = verify(args.index)
    except (IndexNotFound, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} problem(s) in {args.index}", file=sys.stderr)
        return 1
    print(f"ok: {checked} records in {len(Manifest.load(args.index).shards)} shards verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
