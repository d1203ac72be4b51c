"""Compaction: an index's live rows copied into new shards, renumbered in order, without decoding a record.

An update never rewrites a shard: deleted rows keep their space and retrieval skips them. A
compaction (``flows.compact``) publishes a version whose shards hold only the live rows, row r of
the new version being the r-th live row of the old, record bytes copied as they are (a record holds
no row number) and checked (CRC-32) on the way. The old shards stay for readers of the previous
version until the version after the compaction is published (``storage.versions.prune``).
"""

from __future__ import annotations

from pathlib import Path

from .index import Index
from .record import check_record, record_tokens
from .shard import ShardInfo, sealed_shard, write_shard

READ_ROWS = 512  # records read at a time


def copy_rows(source: str, staging: str, shard_id: int, first_row: int, rows: list[int]) -> dict:
    """One unit of a compaction: the records of ``rows`` of the index at ``source`` sealed as shard ``shard_id`` of
    ``staging`` (rows ``first_row``..). A shard an earlier attempt sealed whole is kept. Its info as a dict."""
    done = sealed_shard(Path(staging), shard_id)
    if done is not None and (done.first_row, done.rows) == (first_row, len(rows)):
        return done.to_dict()
    index, values, tokens = Index.open(source), [], 0
    for start in range(0, len(rows), READ_ROWS):
        chunk = rows[start : start + READ_ROWS]
        for row, (name, value) in zip(chunk, index.read(chunk)):
            check_record(value, f"{name} row {row}")  # a damaged record is not carried into the new version
            tokens += record_tokens(value)
            values.append(value)
    info: ShardInfo = write_shard(Path(staging), shard_id, first_row, values, tokens)
    return info.to_dict()
